"""PNG plots of serving benchmark runs: throughput vs request rate, latency CDFs.

    plot_throughput(runs, path)     runs: [(label, [result dict per request rate])]
    plot_latency_cdfs(runs, path)   runs: [(label, rate, [RequestResult])]
matplotlib (Agg backend, no display) is imported lazily: only the plotting needs it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .serve_metrics import RequestResult

CDF_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "plots need matplotlib: `.venv/bin/pip install matplotlib`, or pass --no-plots"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rate_value(result: dict, fallback: float) -> float:
    r = result.get("request_rate")
    return fallback if r in (None, "inf") or math.isinf(float(r)) else float(r)


def plot_throughput(runs: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Output tok/s and request/s against the offered request rate, one line per label.
    An infinite rate is drawn at the right edge (1.5 x the largest finite rate, or 1)."""
    plt = _pyplot()
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(11, 4))
    finite = [
        float(r["request_rate"])
        for _, rs in runs
        for r in rs
        if r.get("request_rate") not in (None, "inf") and not math.isinf(float(r["request_rate"]))
    ]
    inf_x = 1.5 * max(finite) if finite else 1.0
    for label, results in runs:
        pts = sorted((_rate_value(r, inf_x), r) for r in results)
        xs = [x for x, _ in pts]
        ax_tok.plot(xs, [r["output_throughput"] for _, r in pts], "o-", label=label)
        ax_req.plot(xs, [r["request_throughput"] for _, r in pts], "o-", label=label)
    for ax, ylabel in ((ax_tok, "output tokens / s"), (ax_req, "completed requests / s")):
        ax.set_xlabel("offered request rate (req/s; rightmost point = all at once)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Throughput vs request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _values(results: list[RequestResult], key: str) -> np.ndarray:
    ok = [r for r in results if r.success]
    if key == "ttft":
        v = [r.ttft for r in ok]
    elif key == "e2el":
        v = [r.latency for r in ok]
    else:
        v = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return np.sort(np.asarray(v, dtype=np.float64) * 1000.0)


def plot_latency_cdfs(runs: list[tuple[str, float, list[RequestResult]]], path: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT and E2E latency (ms), one curve per (label, rate)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CDF_METRICS), figsize=(5 * len(CDF_METRICS), 4))
    for ax, (key, title) in zip(axes, CDF_METRICS):
        for label, rate, results in runs:
            v = _values(results, key)
            if v.size:
                ax.step(
                    v,
                    np.arange(1, v.size + 1) / v.size,
                    where="post",
                    label=f"{label} @ {rate:g} req/s",
                )
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- `spinserve bench plot`: compare saved runs (e.g. spinserve vs dense) in one figure ------
def _load(paths: list[Path]) -> dict[str, list[dict]]:
    import json

    by_label: dict[str, list[dict]] = {}
    for path in paths:
        rec = json.loads(Path(path).read_text())
        if "output_throughput" not in rec:
            raise ValueError(f"{path} is not a `bench serve`/`bench engine` result")
        by_label.setdefault(str(rec.get("label") or Path(path).stem), []).append(rec)
    return by_label


def _detailed_results(rec: dict) -> list[RequestResult] | None:
    """RequestResults rebuilt from a --save-detailed record (None without the lists)."""
    keys = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "errors")
    if not all(k in rec for k in keys):
        return None
    return [
        RequestResult(n_in, n_out, not err, err, n_out, ttft, list(itl), lat)
        for n_in, n_out, ttft, itl, lat, err in zip(*(rec[k] for k in keys))
    ]


def add_plot_args(p) -> None:
    p.add_argument("results", type=Path, nargs="+", help="result JSON files (grouped by label)")
    p.add_argument(
        "--out-prefix",
        type=Path,
        default=Path("perf/results/compare"),
        help="writes PREFIX-throughput.png and PREFIX-latency-cdf.png",
    )


def run_plot(args) -> int:
    by_label = _load(args.results)
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    p1 = plot_throughput(list(by_label.items()), Path(f"{args.out_prefix}-throughput.png"))
    print(f"written {p1}")
    cdf_runs = []
    for label, recs in by_label.items():
        for rec in recs:
            res = _detailed_results(rec)
            if res is not None:
                cdf_runs.append((label, _rate_value(rec, math.inf), res))
    if cdf_runs:
        p2 = plot_latency_cdfs(cdf_runs, Path(f"{args.out_prefix}-latency-cdf.png"))
        print(f"written {p2}")
    else:
        print("no per-request lists in these files (run with --save-detailed): no latency CDFs")
    return 0
