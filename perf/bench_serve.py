"""`spinserve bench serve`: load a running OpenAI-compatible endpoint like `vllm bench serve`.

    spinserve bench serve --base-url http://127.0.0.1:8000 --workload longgenbench \
        --num-prompts 64 --request-rate 0.5 1 2 --max-concurrency 32 --goodput ttft:5000

Flow: ask /v1/models for the model name and its max context -> scale the workload to it ->
prompts of real text as token ids (exact lengths; --prompt-format text sends decoded text) ->
warm-ups -> for each request rate: requests sent at gamma/Poisson arrival times, at most
--max-concurrency in flight, each a streaming POST /v1/completions (temperature 0, ignore_eos,
max_tokens = the sampled output length, stream_options.include_usage) timed chunk by chunk ->
metrics with vLLM's key names (perf/serve_metrics.py), JSON per rate, PNG plots.

Failures are counted, never dropped: an unreachable server, a non-200 answer, an in-stream
`{"error": ...}` chunk, a stream cut before `data: [DONE]`. Any failure => exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

from . import bench_args
from .serve_metrics import RequestResult, arrival_offsets, parse_goodput
from .workloads import SampleRequest

CONNECT_TIMEOUT_S = 10.0


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--endpoint", default="/v1/completions")
    g.add_argument("--model", help="model name (default: the first of /v1/models)")
    g.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    g.add_argument(
        "--tokenizer",
        type=Path,
        help="engine folder or HF tokenizer folder (default: the embedded SmolLM2)",
    )
    g.add_argument("--prompt-format", choices=["ids", "text"], default="ids")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    bench_args.add_workload_args(p)


def load_tokenizer(path: Path | None):
    if path is None:
        from spinserve.engines.embedded import embedded_engine_dir

        path = embedded_engine_dir(progress=False)
    if (Path(path) / "manifest.json").is_file():
        from spinserve.engines.loader import load_tokenizer as load_engine_tokenizer

        return load_engine_tokenizer(Path(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _error_text(body: bytes) -> str:
    text = body.decode(errors="replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return text[:300]


class _Stream:
    """Chunk timing of one SSE response (see serve_metrics for the definitions)."""

    def __init__(self, result: RequestResult, start: float) -> None:
        self.r, self.start, self.last = result, start, start
        self.first = self.done = False
        self.text_chunks = 0

    def feed(self, data: str) -> None:
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            err = chunk["error"]
            raise _InStreamError(err.get("message", err) if isinstance(err, dict) else err)
        choices = chunk.get("choices")
        if choices:
            c = choices[0]
            text = c.get("text") or (c.get("delta") or {}).get("content")
            now = time.perf_counter()
            if not self.first:
                self.first, self.r.ttft = True, now - self.start
            elif text:
                self.r.itl.append(now - self.last)
            if text or self.text_chunks == 0:
                self.last = now
            self.text_chunks += bool(text)
        usage = chunk.get("usage")
        if usage:  # the server's counts: exact even when the prompt went as text
            self.r.output_tokens = int(usage.get("completion_tokens", 0))
            self.r.prompt_len = int(usage.get("prompt_tokens", self.r.prompt_len))


class _InStreamError(Exception):
    pass


async def send_request(
    client: httpx.AsyncClient, url: str, headers: dict, body: dict, result: RequestResult
) -> RequestResult:
    start = result.start_time = time.perf_counter()
    s = _Stream(result, start)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {_error_text(await resp.aread())}"
                return result
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    s.feed(line[5:].strip())
                    if s.done:
                        break
        result.latency = time.perf_counter() - start
        if not s.done:
            result.error = "stream ended before `data: [DONE]`"
        elif not s.first:
            result.error = "no output chunk before `data: [DONE]`"
        else:
            result.output_tokens = result.output_tokens or s.text_chunks
            result.success = True
    except _InStreamError as e:
        result.error = f"in-stream error: {e}"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except (ValueError, KeyError, TypeError) as e:
        result.error = f"malformed stream chunk: {e}"
    return result


def _body(req: SampleRequest, model: str, tokenizer, fmt: str) -> dict:
    prompt = req.prompt_ids if fmt == "ids" else tokenizer.decode(req.prompt_ids)
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def fetch_model(client: httpx.AsyncClient, base_url: str, headers: dict):
    """(model id, max context or None) from /v1/models."""
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    if resp.status_code != 200:
        raise httpx.HTTPStatusError(
            f"GET /v1/models: HTTP {resp.status_code}: {_error_text(resp.content)}",
            request=resp.request,
            response=resp,
        )
    data = resp.json()["data"]
    if not data:
        raise ValueError("the server lists no model")
    return data[0]["id"], data[0].get("max_model_len")


async def run_rate(client, url, headers, bodies, prompt_lens, out_lens, rate, args, pbar):
    """Send every request at its arrival time; -> (results, duration_s)."""
    rng = np.random.default_rng(args.seed)
    offsets = arrival_offsets(len(bodies), rate, args.burstiness, rng)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def one(body, n_in, n_out):
        arrived = time.perf_counter()
        r = RequestResult(n_in, n_out)
        if sem is None:
            await send_request(client, url, headers, body, r)
        else:
            async with sem:
                await send_request(client, url, headers, body, r)
        r.queue_time = r.start_time - arrived
        if pbar is not None:
            pbar.update(1)
        return r

    t0 = time.perf_counter()
    tasks = []
    for body, n_in, n_out, off in zip(bodies, prompt_lens, out_lens, offsets):
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, n_in, n_out)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - t0


async def _main(args) -> int:
    slos = parse_goodput(args.goodput)
    bench_args.validate(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    timeout = httpx.Timeout(args.request_timeout, connect=CONNECT_TIMEOUT_S)
    limits = httpx.Limits(max_connections=(args.max_concurrency or args.num_prompts) + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        try:
            model, max_ctx = await fetch_model(client, base, headers)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            error = f"server unreachable at {base}: {e}"
            return _report_unreachable(args, error, time.perf_counter() - t0)
        model = args.model or model
        tokenizer = load_tokenizer(args.tokenizer)
        wl = bench_args.resolve_workload(args, args.max_context or max_ctx)
        reqs = bench_args.build_requests(args, wl, tokenizer)
        bodies = [_body(r, model, tokenizer, args.prompt_format) for r in reqs]
        lens = ([r.prompt_len for r in reqs], [r.output_len for r in reqs])
        url = base + args.endpoint
        reqs0 = (reqs[0].prompt_len, reqs[0].output_len)
        warm = [
            await send_request(client, url, headers, bodies[0], RequestResult(*reqs0))
            for _ in range(args.num_warmups)
        ]
        warmup_failed = sum(not r.success for r in warm)
        for r in warm:
            if not r.success:
                print(f"warm-up request failed: {r.error}")
        meta = {
            "backend": "openai",
            "endpoint_type": "openai",
            "model_id": model,
            "tokenizer_id": str(args.tokenizer or "embedded"),
            "base_url": base,
            **wl.describe(),
        }
        recs, runs = [], []
        for rate in args.request_rate:
            pbar = _progress(args, len(bodies), rate)
            results, dur = await run_rate(client, url, headers, bodies, *lens, rate, args, pbar)
            if pbar is not None:
                pbar.close()
            recs.append(bench_args.result_record(args, "serve", rate, results, dur, slos, meta))
            runs.append((rate, results))
    return bench_args.report(args, "serve", recs, runs, warmup_failed)


def _report_unreachable(args, error: str, duration_s: float) -> int:
    print(f"error: {error}")
    recs, runs = [], []
    for rate in args.request_rate:
        results = [RequestResult(0, 0, error=error) for _ in range(args.num_prompts)]
        meta = {
            "backend": "openai",
            "endpoint_type": "openai",
            "model_id": args.model,
            "base_url": args.base_url,
        }
        recs.append(bench_args.result_record(args, "serve", rate, results, duration_s, {}, meta))
        runs.append((rate, results))
    args.no_plots = True
    return bench_args.report(args, "serve", recs, runs, warmup_failed=0)


def _progress(args, total: int, rate: float):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rate {rate:g} req/s", unit="req")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinserve bench serve", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
