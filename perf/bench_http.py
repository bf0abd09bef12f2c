"""Serving overhead: HTTP (uvicorn + Starlette + SSE) and the async engine loop against offline
LLMEngine.generate, same engine folder, same prompts, same machine, same run.

For each client count C: C distinct prompts of ~PROMPT tokens, greedy, NEW tokens each, EOS
ignored. Three ways, interleaved per repeat so machine noise hits them alike:
  offline  engine.generate(prompts) in this process (the floor: no serving layer at all)
  async    AsyncEngine streams in this process (engine thread + asyncio + detokenizer)
  http     C concurrent SSE clients on /v1/completions against `run_server` in a subprocess
Overhead per generated token = (wall(way) - wall(offline)) / tokens, medians over repeats.
On CUDA the same run gives output tokens/s and TTFT per client count (1, 16, 64 by default).
Usage: python -m spinserve.perf.bench_http [--engine DIR] [--clients 1 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import record, write_record
from .serve_harness import ServerProcess

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the "
    "face of the waters. And God said, Let there be light: and there was light. "
)
MODEL = "bench"
SERVER_SCRIPT = """
import sys
from pathlib import Path
port, engine, device, kv_tokens, null = sys.argv[1:6]  # serve_harness: the port first
if null == "1":  # the serving stack over NullEngine: no model cost at all
    import uvicorn
    from spinserve.control.server import create_app
    from spinserve.control.server_common import ServerConfig
    from spinserve.perf.bench_http import NullEngine
    app = create_app(lambda: NullEngine(Path(engine)), ServerConfig(model_name="bench"))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
else:
    from spinserve.configs.settings import load_settings
    from spinserve.control.server import run_server
    settings = load_settings(**{"engine.device": device, "cache.kv_cache_tokens": int(kv_tokens),
                                "engine.max_batched_tokens": 8192, "server.model_name": "bench"})
    run_server(Path(engine), settings, host="127.0.0.1", port=int(port), log_level="warning")
"""


class NullEngine:
    """LLMEngine's serving API over a model that costs nothing: each step emits one token per
    unfinished request. Serving it measures the serving stack (HTTP, SSE, asyncio, engine
    thread, detokenizer) alone."""

    def __init__(self, engine_dir: Path) -> None:
        from spinserve.engines.loader import load_tokenizer
        from spinserve.engines.manifest import read_manifest

        manifest = read_manifest(engine_dir)
        self.model_config = manifest.model
        self.max_context = manifest.max_context
        self.tokenizer = load_tokenizer(engine_dir)
        self._left: dict[str, int] = {}  # request id -> tokens still to emit

    def add_request(self, request_id: str, prompt_ids: list[int], params) -> None:
        self._left[request_id] = params.max_tokens

    def abort(self, request_id: str) -> bool:
        return self._left.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self._left)

    def step(self) -> list:
        from spinserve.control.engine import RequestOutput

        outs = []
        for rid in list(self._left):
            self._left[rid] -= 1
            done = self._left[rid] == 0
            if done:
                del self._left[rid]
            token = 300 + self._left.get(rid, 0) % 500  # ordinary word pieces
            outs.append(RequestOutput(rid, [token], done, "length" if done else None))
        return outs

    def generate(self, prompts: list[list[int]], params) -> list:
        for i, p in enumerate(prompts):
            self.add_request(f"offline-{i}", p, params)
        tokens: dict[str, list[int]] = {f"offline-{i}": [] for i in range(len(prompts))}
        while self.has_unfinished():
            for out in self.step():
                tokens[out.request_id] += out.new_token_ids
        return [type("Out", (), {"token_ids": t}) for t in tokens.values()]


def _prompts(tokenizer, n: int, prompt_tokens: int, salt: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT * (1 + prompt_tokens // 40))
    return [[(salt + i) % 200 + 10, *ids[: prompt_tokens - 1]] for i in range(n)]


def time_offline(engine, prompts, params) -> float:
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    assert all(len(o.token_ids) == params.max_tokens for o in outs)
    return time.perf_counter() - t0


async def _async_run(aengine, prompts, params) -> tuple[float, list[float]]:
    async def one(p):
        t0 = time.perf_counter()
        ttft, n = None, 0
        stream = aengine.submit(p, params)
        try:
            async for d in stream:
                if ttft is None and d.token_ids:
                    ttft = time.perf_counter() - t0
                n += len(d.token_ids)
        finally:
            stream.close()
        assert n == params.max_tokens
        return ttft

    t0 = time.perf_counter()
    ttfts = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t0, list(ttfts)


async def _http_run(url: str, prompts, new_tokens: int) -> tuple[float, list[float]]:
    import httpx

    async def one(client, p):
        body = {
            "model": MODEL,
            "prompt": p,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft, usage = None, None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and chunk["choices"]:
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
        assert usage["completion_tokens"] == new_tokens
        return ttft

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        ttfts = await asyncio.gather(*(one(client, p) for p in prompts))
        return time.perf_counter() - t0, list(ttfts)


def _row(
    clients: int, tokens: int, walls: dict[str, list[float]], ttfts: dict[str, list[float]]
) -> dict:
    med = {k: statistics.median(v) for k, v in walls.items()}
    row = {"clients": clients, "generated_tokens": tokens}
    for way in ("offline", "async", "http"):
        row[f"{way}_wall_s"] = med[way]
        row[f"{way}_tok_s"] = tokens / med[way]
    for way in ("async", "http"):
        row[f"{way}_overhead_ms_per_token"] = (med[way] - med["offline"]) / tokens * 1e3
        row[f"{way}_over_offline_wall"] = med[way] / med["offline"]
        ts = sorted(ttfts[way])
        row[f"{way}_ttft_p50_s"] = statistics.median(ts)
        row[f"{way}_ttft_max_s"] = ts[-1]
    return row


def _bench_clients(engine, aengine, loop, url: str, clients: int, cfg: dict) -> dict:
    from spinserve.runtime.sampling import SamplingParams

    new_tokens = cfg["new_tokens"]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    walls: dict[str, list[float]] = {"offline": [], "async": [], "http": []}
    ttfts: dict[str, list[float]] = {"async": [], "http": []}
    steps: dict[str, list[float]] = {"offline": [], "async": [], "http": []}
    for rep in range(cfg["repeats"] + 1):  # repeat 0 warms every path up
        prompts = _prompts(engine.tokenizer, clients, cfg["prompt_tokens"], rep * 31 + clients)
        counts = [engine.num_bench_steps, aengine.num_steps, _server_steps(url)]
        wall_off = time_offline(engine, prompts, params)
        wall_async, t_async = loop.run_until_complete(_async_run(aengine, prompts, params))
        wall_http, t_http = asyncio.run(_http_run(url, prompts, new_tokens))
        if rep == 0:
            continue
        ends = [engine.num_bench_steps, aengine.num_steps, _server_steps(url)]
        for way, a, b in zip(("offline", "async", "http"), counts, ends):
            steps[way].append(b - a)
        walls["offline"].append(wall_off)
        walls["async"].append(wall_async)
        walls["http"].append(wall_http)
        ttfts["async"] += t_async
        ttfts["http"] += t_http
    row = _row(clients, clients * new_tokens, walls, ttfts)
    row.update({f"{way}_engine_steps": statistics.median(v) for way, v in steps.items()})
    return row


def _server_steps(url: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("spinserve_engine_steps_total "):
            return float(line.split()[1])
    return float("nan")


def _count_steps(engine):
    """Wrap engine.step to count scheduler steps (engine.num_bench_steps)."""
    step = engine.step
    engine.num_bench_steps = 0

    def counted():
        engine.num_bench_steps += 1
        return step()

    engine.step = counted
    return engine


def run_section(load, engine_dir: Path, cfg: dict, null: bool) -> list[dict]:
    """Offline / async / http rows for each client count; `load` builds one engine."""
    from spinserve.control.async_engine import AsyncEngine

    engine = _count_steps(load())  # offline; the async path gets its own engine
    loop = asyncio.new_event_loop()
    aengine = AsyncEngine(load)
    loop.run_until_complete(_start_async(aengine))
    args = [str(engine_dir), cfg["device"], str(cfg["kv_cache_tokens"]), str(int(null))]
    server = ServerProcess(SERVER_SCRIPT, args, Path(tempfile.mkdtemp()),
                           env={"OMP_NUM_THREADS": str(cfg["threads"])})  # fmt: skip
    server.wait_ready(timeout_s=600)
    url = server.base_url
    rows = []
    try:
        for clients in cfg["clients"]:
            rows.append(_bench_clients(engine, aengine, loop, url, clients, cfg))
            _print_row(rows[-1], "null model" if null else "model")
    finally:
        server.stop(timeout_s=60)
        loop.run_until_complete(aengine.shutdown(grace_s=0))
        loop.close()
    return rows


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", type=Path, help="engine folder (default: embedded SmolLM2)")
    ap.add_argument("--out", type=Path, default=Path("perf/results"))
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64] if cuda else [1, 8])
    ap.add_argument("--new-tokens", type=int, default=128 if cuda else 32)
    ap.add_argument("--prompt-tokens", type=int, default=128 if cuda else 64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-tokens", type=int, default=65536)
    ap.add_argument("--null-clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--null-new-tokens", type=int, default=256)
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads in every process (OMP_NUM_THREADS of the server)",
    )
    args = ap.parse_args(argv)

    from spinserve.control.engine import LLMEngine
    from spinserve.engines.embedded import embedded_engine_dir

    engine_dir = args.engine or embedded_engine_dir(progress=False)
    torch.set_num_threads(args.threads)
    cfg = {
        "device": args.device,
        "kv_cache_tokens": args.kv_cache_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens,
    }

    def load() -> LLMEngine:
        torch.set_num_threads(args.threads)  # also in the engine thread that calls this
        return LLMEngine.from_engine_dir(
            engine_dir,
            device=args.device,
            **{"cache.kv_cache_tokens": args.kv_cache_tokens, "engine.max_batched_tokens": 8192},
        )

    null_cfg = {**cfg, "clients": args.null_clients, "new_tokens": args.null_new_tokens}
    null_rows = run_section(lambda: NullEngine(engine_dir), engine_dir, null_cfg, null=True)
    model_cfg = {**cfg, "clients": args.clients, "new_tokens": args.new_tokens}
    rows = run_section(load, engine_dir, model_cfg, null=False)
    rec = record(
        "http_overhead",
        config={
            "engine": str(engine_dir),
            **model_cfg,
            "null_clients": args.null_clients,
            "null_new_tokens": args.null_new_tokens,
            "http_client": "httpx AsyncClient, SSE /v1/completions, same machine",
            "peer": "offline LLMEngine.generate, same engine folder, same prompts",
            "null_model": "NullEngine: LLMEngine's API, one token per request per step, "
            "no compute: the serving stack's own cost per token",
        },
        metrics={"rows": rows, "null_model_rows": null_rows},
        floor="offline generate wall time (no serving layer): overhead is measured against it",
    )
    path = write_record(rec, args.out, f"http_overhead_{args.device}")
    print(f"written {path}")
    return rec


async def _start_async(aengine) -> None:
    aengine.start()
    await aengine.wait_ready(600)


def _print_row(r: dict, what: str) -> None:
    print(
        f"{what}, clients {r['clients']:>3}: offline {r['offline_tok_s']:8.1f} tok/s | async "
        f"{r['async_tok_s']:8.1f} tok/s (+{r['async_overhead_ms_per_token']:.3f} ms/tok) | "
        f"http {r['http_tok_s']:8.1f} tok/s (+{r['http_overhead_ms_per_token']:.3f} ms/tok), "
        f"TTFT p50 {r['http_ttft_p50_s'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
