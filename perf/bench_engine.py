"""`spinserve bench engine`: the `bench serve` workloads offline, straight into LLMEngine.

    spinserve bench engine --engine ENGINE_DIR --workload longgenbench --num-prompts 64 \
        --request-rate inf --max-concurrency 32

Same arrivals (gamma/Poisson at --request-rate, --max-concurrency in flight), same prompts (real
text, same seed => the same token ids as `bench serve`), same metric names, written the same way;
no HTTP, no detokenizer. Timing: a request is "sent" at add_request; its first token arrives with
the engine step that returns it (TTFT); every later step that returns tokens for it adds one ITL.
A request the engine refuses (RequestError) or a step that raises counts as failed (exit 1).
Outputs always run to their length (ignore_eos); warm-ups generate at most WARMUP_TOKENS.

Engine-side metrics (keys added to the vLLM ones): mean / peak running requests (len of the
scheduler's running list, sampled after every engine step; includes requests mid-prefill),
mean decode batch (requests that got a decode token, over steps that decoded), engine steps,
preemptions, and with the hierarchy on the run's page hit rate, lookups and PCIe bytes
(engine.stats() read before and after the run; per decode step too).
For random-weight engines: --prompt-ids random | text-rank (see perf/workloads.py) and fixed
lengths with --input-len / --output-len.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bench_args
from .serve_metrics import RequestResult, arrival_offsets, parse_goodput
from .workloads import PROMPT_IDS, SampleRequest, Workload, get_workload, load_text, make_requests

WARMUP_TOKENS = 16  # output tokens of a warm-up request: compiles kernels, not a long decode


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", type=Path, help="engine folder (default: embedded SmolLM2)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--kv-cache-tokens", type=int, help="KV pool size in tokens")
    bench_args.add_workload_args(p)
    g = p.add_argument_group("prompts (engine bench only)")
    g.add_argument("--input-len", type=int, help="fixed prompt length in tokens")
    g.add_argument("--output-len", type=int, help="fixed output length in tokens")
    g.add_argument(
        "--prompt-ids",
        choices=PROMPT_IDS,
        default="text",
        help="text: the text through the tokenizer; random: uniform random ids; text-rank: "
        "the text's words as ids by frequency rank (for random-weight engines)",
    )


def _params(req: SampleRequest, max_tokens: int | None = None):
    from spinserve.runtime.sampling import SamplingParams

    n = req.output_len if max_tokens is None else min(max_tokens, req.output_len)
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@dataclass
class StepStats:
    """Per engine step: running requests after the step, requests that decoded a token."""

    num_steps: int = 0
    running_sum: int = 0
    running_peak: int = 0
    decode_steps: int = 0
    decode_rows: int = 0

    def add(self, num_running: int, num_decoded: int) -> None:
        self.num_steps += 1
        self.running_sum += num_running
        self.running_peak = max(self.running_peak, num_running)
        self.decode_steps += num_decoded > 0
        self.decode_rows += num_decoded


def engine_metrics(before: dict, after: dict, steps: StepStats) -> dict:
    """The engine-side keys of one run (engine.stats() before/after it, the step samples)."""
    import torch

    m = {
        "num_engine_steps": steps.num_steps,
        "num_decode_steps": steps.decode_steps,
        "mean_running_requests": steps.running_sum / max(steps.num_steps, 1),
        "peak_running_requests": steps.running_peak,
        "mean_decode_batch": steps.decode_rows / max(steps.decode_steps, 1),
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        "kv_pages_total": after["kv_pages_total"],
        "gpu_max_memory_allocated_bytes": None,
        "hit_rate": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        m["gpu_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if "page_lookups" in after:  # the hierarchy is on
        lookups = after["page_lookups"] - before["page_lookups"]
        hits = after["page_hits"] - before["page_hits"]
        fetched = after["pcie_bytes_fetched"] - before["pcie_bytes_fetched"]
        m |= {
            "hit_rate": hits / lookups if lookups else None,
            "page_lookups": lookups,
            "page_hits": hits,
            "pcie_bytes_fetched": fetched,
            "pcie_bytes_offloaded": after["pcie_bytes_offloaded"] - before["pcie_bytes_offloaded"],
            "pcie_bytes_fetched_per_decode_step": fetched / max(steps.decode_steps, 1),
            "hbm_pages_total": after["hbm_pages_total"],
            "host_pages_total": after["host_pages_total"],
        }
    return m


def format_engine_metrics(m: dict) -> str:
    rows = [f"{' Engine ':-^50}"]
    for key, label in (
        ("mean_running_requests", "Mean running requests (per step):"),
        ("peak_running_requests", "Peak running requests:"),
        ("mean_decode_batch", "Mean decode batch:"),
        ("num_engine_steps", "Engine steps:"),
        ("num_preemptions", "Preemptions:"),
        ("hit_rate", "HBM page hit rate:"),
        ("pcie_bytes_fetched", "PCIe bytes fetched:"),
    ):
        v = m.get(key)
        if v is not None:
            rows.append(f"{label:<40} " + (f"{v:<10.4g}" if isinstance(v, float) else f"{v}"))
    return "\n".join(rows)


class _Run:
    """One request-rate run: arrivals, the concurrency cap, per-request timing."""

    def __init__(self, engine, reqs: list[SampleRequest], offsets: np.ndarray, cap, tag: str):
        self.engine, self.reqs, self.offsets, self.cap, self.tag = engine, reqs, offsets, cap, tag
        self.results = [RequestResult(r.prompt_len, r.output_len) for r in reqs]
        self.pending = deque(range(len(reqs)))
        self.live: dict[str, int] = {}
        self.last_token_t: dict[int, float] = {}
        self.steps = StepStats()

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

    def record(self, outputs, pbar, num_running: int) -> None:
        now = time.perf_counter()
        decoded = 0
        for out in outputs:
            i = self.live.get(out.request_id)
            if i is None:
                continue
            r = self.results[i]
            if r.output_tokens == 0:
                r.ttft = now - r.start_time
            else:
                decoded += 1
                r.itl.append(now - self.last_token_t[i])
            self.last_token_t[i] = now
            r.output_tokens += len(out.new_token_ids)
            if out.finished:
                r.latency, r.success = now - r.start_time, True
                del self.live[out.request_id]
                if pbar is not None:
                    pbar.update(1)
        self.steps.add(num_running, decoded)

    def fail_all(self, error: str) -> None:
        for rid, i in list(self.live.items()):
            self.engine.abort(rid)
            self.results[i].error = error
        while self.pending:
            self.results[self.pending.popleft()].error = error
        self.live.clear()


def run_rate(engine, reqs, rate: float, args, pbar, tag: str):
    """-> (results, duration_s, StepStats) for one request rate."""
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
        run.record(outputs, pbar, len(engine.scheduler.running))
    return run.results, time.perf_counter() - t0, run.steps


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


def resolve_workload(args, max_context: int) -> Workload:
    """The workload with --input-len / --output-len pinned, scaled by --scale or fitted to
    --max-context (default: the engine's)."""
    wl = get_workload(args.workload).with_fixed(args.input_len, args.output_len)
    if args.scale is None:
        return wl.fit_context(args.max_context or max_context)
    wl = wl.scaled(args.scale)
    if wl.max_total_tokens > max_context:
        raise ValueError(
            f"--scale {args.scale} gives requests of up to {wl.max_total_tokens} tokens, "
            f"more than the max context {max_context}: lower --scale or drop it"
        )
    return wl


def build_requests(args, wl: Workload, engine) -> list[SampleRequest]:
    text = None if args.prompt_ids == "random" else load_text(args.text_file)
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer))
    return make_requests(
        wl, engine.tokenizer, args.num_prompts, args.seed, text, args.prompt_ids, vocab
    )


def _warm_up(engine, req: SampleRequest, n: int) -> int:
    """n warm-up requests (at most WARMUP_TOKENS outputs each); -> how many failed."""
    failed = 0
    for _ in range(n):
        try:
            engine.generate([req.prompt_ids], _params(req, WARMUP_TOKENS))
        except Exception as e:  # noqa: BLE001 - reported and counted, the run goes on
            print(f"warm-up request failed: {type(e).__name__}: {e}")
            failed += 1
    return failed


def _meta(args, engine, engine_dir, wl: Workload) -> dict:
    from .common import device_name

    rw = engine.manifest.random_weights
    return {
        "backend": "spinserve-engine",
        "endpoint_type": "offline",
        "model_id": Path(engine_dir).name,
        "tokenizer_id": str(engine_dir),
        "engine_device": engine.device,
        "device": device_name() if engine.device == "cuda" else "cpu",
        "engine_max_context": engine.max_context,
        "random_weights": rw.to_dict() if rw is not None else None,
        "prompt_ids": args.prompt_ids,
        "engine_settings": engine.settings.model_dump(
            mode="json", include={"engine", "cache", "sparse"}
        ),
        **wl.describe(),
    }


def run(args: argparse.Namespace) -> int:
    slos = parse_goodput(args.goodput)
    bench_args.validate(args)
    engine, engine_dir = load_engine(args)
    wl = resolve_workload(args, engine.max_context)
    reqs = build_requests(args, wl, engine)
    warm = _warm_up(engine, reqs[0], args.num_warmups)
    meta = _meta(args, engine, engine_dir, wl)
    recs, runs = [], []
    for k, rate in enumerate(args.request_rate):
        pbar = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(reqs), desc=f"rate {rate:g} req/s", unit="req")
        before = engine.stats()
        results, dur, steps = run_rate(engine, reqs, rate, args, pbar, tag=f"bench{k}")
        after = engine.stats()
        if pbar is not None:
            pbar.close()
        rec = bench_args.result_record(args, "engine", rate, results, dur, slos, meta)
        rec |= engine_metrics(before, after, steps)
        print(f"engine @ {rec['request_rate']} req/s\n{format_engine_metrics(rec)}")
        recs.append(rec)
        runs.append((rate, results))
    return bench_args.report(args, "engine", recs, runs, warm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinserve bench engine", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
