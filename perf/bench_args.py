"""What `bench serve` and `bench engine` share: workload flags, request building, result files.

A run at one request rate writes `<result-dir>/<label>-<rate>qps[-concurrency<C>].json`: the keys
of `vllm bench serve --save-result` (date, backend, label, model_id, num_prompts, request_rate,
burstiness, max_concurrency, completed, failed, request_throughput, mean_ttft_ms, ...) plus
spinserve's own (bench, workload, git_sha, error_summary). A sweep over several rates also
writes `<label>-throughput.png` and `<label>-latency-cdf.png`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path

import numpy as np

from .serve_metrics import (
    DEFAULT_PERCENTILES,
    RequestResult,
    compute_metrics,
    detailed,
    error_summary,
    format_summary,
)
from .workloads import WORKLOADS, SampleRequest, Workload, get_workload, load_text, make_requests


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="longgenbench", choices=sorted(WORKLOADS))
    g.add_argument("--num-prompts", type=int, default=32)
    g.add_argument(
        "--scale",
        type=float,
        help="multiply the published lengths by this factor "
        "(default: fit the longest request into the model's max context)",
    )
    g.add_argument("--max-context", type=int, help="context to fit the workload into")
    g.add_argument("--text-file", type=Path, help="prompt text (default: the KJV via `bible`)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("traffic")
    g.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests/s; several values = a sweep (default inf: all at once)",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier",
    )
    g.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    g.add_argument("--num-warmups", type=int, default=1)
    g.add_argument(
        "--goodput",
        nargs="+",
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:2000 tpot:100 (names ttft, tpot, e2el)",
    )
    g.add_argument("--metric-percentiles", default=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES))
    g = p.add_argument_group("output")
    g.add_argument("--result-dir", type=Path, default=Path("perf/results"))
    g.add_argument("--label", help="file name prefix (default: the bench and workload)")
    g.add_argument("--save-detailed", action="store_true", help="keep per-request lists")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def validate(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be >= 0")
    if any(r <= 0 for r in args.request_rate):
        raise ValueError("--request-rate values must be > 0 (inf = all at once)")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be > 0")


def percentiles(args: argparse.Namespace) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in args.metric_percentiles.split(","))
    except ValueError:
        raise ValueError("--metric-percentiles: comma-separated numbers, e.g. 50,90,99") from None
    if not all(0 <= p <= 100 for p in ps):
        raise ValueError("--metric-percentiles must lie in [0, 100]")
    return ps


def resolve_workload(args: argparse.Namespace, max_context: int | None) -> Workload:
    wl = get_workload(args.workload)
    if args.scale is not None:
        wl = wl.scaled(args.scale)
        if max_context is not None and wl.max_total_tokens > max_context:
            raise ValueError(
                f"--scale {args.scale} gives requests of up to {wl.max_total_tokens} tokens, "
                f"more than the max context {max_context}: lower --scale or drop it"
            )
        return wl
    ctx = args.max_context or max_context
    if ctx is None:
        raise ValueError("give --scale or --max-context (the server did not report one)")
    return wl.fit_context(ctx)


def build_requests(args, workload: Workload, tokenizer) -> list[SampleRequest]:
    text = load_text(args.text_file)
    return make_requests(workload, tokenizer, args.num_prompts, args.seed, text)


def rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def label_of(args, bench: str) -> str:
    return args.label or f"spinserve-{bench}-{args.workload}"


def result_record(
    args,
    bench: str,
    rate: float,
    results: list[RequestResult],
    duration_s: float,
    slos: dict,
    meta: dict,
) -> dict:
    from .common import git_sha

    rec = {
        "date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "bench": bench,
        "label": label_of(args, bench),
        "num_prompts": args.num_prompts,
        "request_rate": rate_json(rate),
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        **meta,
        **compute_metrics(results, duration_s, percentiles(args), slos or None),
        "error_summary": error_summary(results),
        "git_sha": git_sha(),
    }
    if args.save_detailed:
        rec |= detailed(results)
    return rec


def write_result(args, bench: str, rec: dict) -> Path:
    rate = rec["request_rate"]
    name = f"{label_of(args, bench)}-{rate}qps"
    if args.max_concurrency is not None:
        name += f"-concurrency{args.max_concurrency}"
    args.result_dir.mkdir(parents=True, exist_ok=True)
    path = args.result_dir / f"{name}.json"
    path.write_text(json.dumps(rec, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def report(
    args,
    bench: str,
    recs: list[dict],
    runs: list[tuple[float, list[RequestResult]]],
    warmup_failed: int,
) -> int:
    """Print summaries, write JSON (+ plots); exit status 1 if any request failed."""
    label = label_of(args, bench)
    for rec in recs:
        print(format_summary(rec, f"{label} @ {rec['request_rate']} req/s", percentiles(args)))
        for line in rec["error_summary"]:
            print(f"  error: {line}")
        print(f"written {write_result(args, bench, rec)}")
    if not args.no_plots:
        from .bench_plots import plot_latency_cdfs, plot_throughput

        p1 = plot_throughput([(label, recs)], args.result_dir / f"{label}-throughput.png")
        cdf_runs = [(label, rate, res) for rate, res in runs]
        p2 = plot_latency_cdfs(cdf_runs, args.result_dir / f"{label}-latency-cdf.png")
        print(f"written {p1}\nwritten {p2}")
    failed = sum(rec["failed"] for rec in recs)
    if failed or warmup_failed:
        total = sum(rec["completed"] + rec["failed"] for rec in recs)
        print(
            f"FAILED: {failed} of {total} requests failed"
            + (f", {warmup_failed} warm-up request(s) failed" if warmup_failed else "")
        )
        return 1
    return 0
