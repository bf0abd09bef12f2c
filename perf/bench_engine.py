"""`spinserve bench engine`: the `bench serve` workloads offline, straight into LLMEngine.

    spinserve bench engine --engine ENGINE_DIR --workload longgenbench --num-prompts 64 \
        --request-rate inf --max-concurrency 32

Same arrivals (gamma/Poisson at --request-rate, --max-concurrency in flight), same prompts (real
text, same seed => the same token ids as `bench serve`), same metric names, written the same way;
no HTTP, no detokenizer. Timing: a request is "sent" at add_request; its first token arrives with
the engine step that returns it (TTFT); every later step that returns tokens for it adds one ITL.
A request the engine refuses (RequestError) or a step that raises counts as failed (exit 1).
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import numpy as np

from . import bench_args
from .serve_metrics import RequestResult, arrival_offsets, parse_goodput
from .workloads import SampleRequest


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", type=Path, help="engine folder (default: embedded SmolLM2)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--kv-cache-tokens", type=int, help="KV pool size in tokens")
    bench_args.add_workload_args(p)


def _params(req: SampleRequest):
    from spinserve.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)


class _Run:
    """One request-rate run: arrivals, the concurrency cap, per-request timing."""

    def __init__(self, engine, reqs: list[SampleRequest], offsets: np.ndarray, cap, tag: str):
        self.engine, self.reqs, self.offsets, self.cap, self.tag = engine, reqs, offsets, cap, tag
        self.results = [RequestResult(r.prompt_len, r.output_len) for r in reqs]
        self.pending = deque(range(len(reqs)))
        self.live: dict[str, int] = {}
        self.last_token_t: dict[int, float] = {}

    def admit(self, t0: float, pbar=None) -> None:
        while self.pending and time.perf_counter() - t0 >= self.offsets[self.pending[0]]:
            if self.cap is not None and len(self.live) >= self.cap:
                return
            i = self.pending.popleft()
            r, rid = self.results[i], f"{self.tag}-{i}"
            r.start_time = time.perf_counter()
            r.queue_time = r.start_time - (t0 + self.offsets[i])
            try:
                self.engine.add_request(rid, self.reqs[i].prompt_ids, _params(self.reqs[i]))
            except ValueError as e:  # RequestError, or SamplingParams validation
                r.error = f"{type(e).__name__}: {e}"
                if pbar is not None:
                    pbar.update(1)
                continue
            self.live[rid] = i

    def record(self, outputs, pbar) -> None:
        now = time.perf_counter()
        for out in outputs:
            i = self.live.get(out.request_id)
            if i is None:
                continue
            r = self.results[i]
            if r.output_tokens == 0:
                r.ttft = now - r.start_time
            else:
                r.itl.append(now - self.last_token_t[i])
            self.last_token_t[i] = now
            r.output_tokens += len(out.new_token_ids)
            if out.finished:
                r.latency, r.success = now - r.start_time, True
                del self.live[out.request_id]
                if pbar is not None:
                    pbar.update(1)

    def fail_all(self, error: str) -> None:
        for rid, i in list(self.live.items()):
            self.engine.abort(rid)
            self.results[i].error = error
        while self.pending:
            self.results[self.pending.popleft()].error = error
        self.live.clear()


def run_rate(engine, reqs, rate: float, args, pbar, tag: str):
    """-> (results, duration_s) for one request rate."""
    offsets = arrival_offsets(len(reqs), rate, args.burstiness, np.random.default_rng(args.seed))
    run = _Run(engine, reqs, offsets, args.max_concurrency, tag)
    t0 = time.perf_counter()
    while run.pending or run.live:
        run.admit(t0, pbar)
        if not run.live:
            if run.pending:
                wait = t0 + run.offsets[run.pending[0]] - time.perf_counter()
                time.sleep(max(wait, 0.0))
            continue
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001 - an engine failure fails every open request
            run.fail_all(f"engine step failed: {type(e).__name__}: {e}")
            break
        run.record(outputs, pbar)
    return run.results, time.perf_counter() - t0


def load_engine(args):
    from spinserve.control.engine import LLMEngine

    overrides = {"device": args.device}
    if args.kv_cache_tokens is not None:
        overrides["cache.kv_cache_tokens"] = args.kv_cache_tokens
    engine_dir = args.engine
    if engine_dir is None:
        from spinserve.engines.embedded import embedded_engine_dir

        engine_dir = embedded_engine_dir(progress=False)
    return LLMEngine.from_engine_dir(engine_dir, **overrides), engine_dir


def run(args: argparse.Namespace) -> int:
    slos = parse_goodput(args.goodput)
    bench_args.validate(args)
    engine, engine_dir = load_engine(args)
    wl = bench_args.resolve_workload(args, args.max_context or engine.max_context)
    reqs = bench_args.build_requests(args, wl, engine.tokenizer)
    warm = 0
    for _ in range(args.num_warmups):
        try:
            engine.generate([reqs[0].prompt_ids], _params(reqs[0]))
        except Exception as e:  # noqa: BLE001 - reported and counted, the run goes on
            print(f"warm-up request failed: {type(e).__name__}: {e}")
            warm += 1
    meta = {
        "backend": "spinserve-engine",
        "endpoint_type": "offline",
        "model_id": Path(engine_dir).name,
        "tokenizer_id": str(engine_dir),
        "engine_device": engine.device,
        **wl.describe(),
    }
    recs, runs = [], []
    for k, rate in enumerate(args.request_rate):
        pbar = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(reqs), desc=f"rate {rate:g} req/s", unit="req")
        results, dur = run_rate(engine, reqs, rate, args, pbar, tag=f"bench{k}")
        if pbar is not None:
            pbar.close()
        recs.append(bench_args.result_record(args, "engine", rate, results, dur, slos, meta))
        runs.append((rate, results))
    return bench_args.report(args, "engine", recs, runs, warm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinserve bench engine", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
