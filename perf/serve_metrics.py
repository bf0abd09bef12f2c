"""Per-request timings -> serving metrics, with the key names `vllm bench serve` writes.

Both benches (`bench serve` over HTTP, `bench engine` offline) fill one RequestResult per request
and call compute_metrics(); the definitions follow vLLM's benchmarks/serve.py:
  TTFT   first output chunk - request sent
  TPOT   (E2E - TTFT) / (output_tokens - 1), requests with > 1 output token only
  ITL    gaps between consecutive output chunks (a chunk may carry several tokens)
  E2E    last byte - request sent ("e2el")
  request_throughput = completed / duration; output_throughput = output tokens / duration
  request_goodput    = completed requests meeting every SLO / duration (None without SLOs;
                       a request with <= 1 output token counts TPOT 0 for the SLO)
Times are seconds in RequestResult and milliseconds in the metric keys (`mean_ttft_ms`,
`median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ...). Failed requests count in "failed" only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_NAMES = ("ttft", "tpot", "e2el")
MS = 1000.0


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s, one per chunk after the first
    latency: float = 0.0  # s, E2E
    start_time: float = 0.0  # s, perf_counter when sent
    queue_time: float = 0.0  # s, waited for the concurrency cap before sending


def arrival_offsets(
    n: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """[n] float64 send times (s from the start): gamma inter-arrival gaps with mean
    1 / request_rate and shape `burstiness` (1 = Poisson, < 1 burstier, > 1 more regular),
    rescaled so the last request goes at exactly n / request_rate (as vLLM does);
    all zeros for an infinite rate."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    if math.isinf(request_rate) or n == 0:
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    t = np.cumsum(gaps)
    return t * ((n / request_rate) / t[-1]) if t[-1] > 0 else t


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """["ttft:2000", "tpot:50"] -> {"ttft": 2000.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, _, value = pair.partition(":")
        if name not in SLO_NAMES or not value:
            raise ValueError(f"bad SLO {pair!r}: use NAME:MS with NAME one of {SLO_NAMES}")
        slos[name] = float(value)
        if slos[name] < 0:
            raise ValueError(f"bad SLO {pair!r}: the value must be >= 0 ms")
    return slos


def _pct_key(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _stats(name: str, values_s: list[float], percentiles) -> dict[str, float]:
    a = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * MS
    out = {
        f"mean_{name}_ms": float(a.mean()),
        f"median_{name}_ms": float(np.median(a)),
        f"std_{name}_ms": float(a.std()),
    }
    for p in percentiles:
        out[f"p{_pct_key(p)}_{name}_ms"] = float(np.percentile(a, p))
    return out


def _good(r: RequestResult, tpot: float, slos: dict[str, float]) -> bool:
    got = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
    return all(got[k] <= v / MS for k, v in slos.items())


def _peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """(max output chunks in any 1 s bucket, peak number of requests in flight)."""
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    end = max(r.start_time + r.latency for r in ok)
    buckets = np.zeros(int(np.ceil(end - t0)) + 1)
    for r in ok:
        times = r.start_time + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        np.add.at(buckets, np.clip((times - t0).astype(np.int64), 0, buckets.size - 1), 1)
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    return float(buckets.max()), peak


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    percentiles=DEFAULT_PERCENTILES,
    slos: dict[str, float] | None = None,
) -> dict:
    ok = [r for r in results if r.success]
    tpots, all_tpots, itls = [], [], []
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        if r.output_tokens > 1:
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls += r.itl
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(_good(r, t, slos) for r, t in zip(ok, all_tpots)) if slos else 0
    peak_tok_s, peak_live = _peaks(ok)
    duration_s = max(duration_s, 1e-9)
    m = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if slos else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": peak_tok_s,
        "max_concurrent_requests": peak_live,
    }
    m |= _stats("ttft", [r.ttft for r in ok], percentiles)
    m |= _stats("tpot", tpots, percentiles)
    m |= _stats("itl", itls, percentiles)
    m |= _stats("e2el", [r.latency for r in ok], percentiles)
    return m


def detailed(results: list[RequestResult]) -> dict:
    """The per-request lists vLLM saves with --save-detailed (errors: "" when it succeeded)."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "queue_times": [r.queue_time for r in results],
        "errors": [r.error for r in results],
    }


def error_summary(results: list[RequestResult], limit: int = 5) -> list[str]:
    """Distinct error messages with their counts, most frequent first."""
    counts: dict[str, int] = {}
    for r in results:
        if not r.success:
            counts[r.error or "unknown error"] = counts.get(r.error or "unknown error", 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [f"{n} x {msg}" for msg, n in ranked[:limit]]


def format_summary(m: dict, title: str, percentiles=DEFAULT_PERCENTILES) -> str:
    """vLLM-style text block."""
    rows = [f"{f' {title} ':=^50}"]

    def row(label, value, fmt="{:<10.2f}"):
        rows.append(f"{label:<40} " + (fmt.format(value) if value is not None else "n/a"))

    row("Successful requests:", m["completed"], "{:<10}")
    row("Failed requests:", m["failed"], "{:<10}")
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", m["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", m["request_throughput"])
    if m["request_goodput"] is not None:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        rows.append(f"{f' {label} ':-^50}")
        row(f"Mean {label} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {label} (ms):", m[f"median_{key}_ms"])
        for p in percentiles:
            row(f"P{_pct_key(p)} {label} (ms):", m[f"p{_pct_key(p)}_{key}_ms"])
    rows.append("=" * 50)
    return "\n".join(rows)
