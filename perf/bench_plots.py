"""PNG plots of serving benchmark runs: throughput vs request rate, latency CDFs; the headline
table (dense vs sparse + hierarchical runs of `bench engine`, one row per part).

    plot_throughput(runs, path)     runs: [(label, [result dict per request rate])]
    plot_latency_cdfs(runs, path)   runs: [(label, rate, [RequestResult])]
    run_headline(args)              `spinserve bench headline FILES...`: table, JSON, bar plot
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


# ---- `spinserve bench headline`: dense vs sparse + hierarchical, one row per part ----------
HEADLINE_METRICS = (  # (key, label, scale to the unit shown)
    ("output_throughput", "output tok/s", 1.0),
    ("request_throughput", "req/s", 1.0),
    ("mean_ttft_ms", "mean TTFT s", 1e-3),
    ("median_ttft_ms", "p50 TTFT s", 1e-3),
    ("p99_ttft_ms", "p99 TTFT s", 1e-3),
    ("mean_tpot_ms", "mean TPOT ms", 1.0),
    ("median_tpot_ms", "p50 TPOT ms", 1.0),
    ("p99_tpot_ms", "p99 TPOT ms", 1.0),
    ("mean_running_requests", "mean batch", 1.0),
    ("mean_decode_batch", "decode batch", 1.0),
    ("num_preemptions", "preemptions", 1.0),
    ("hit_rate", "hit rate", 1.0),
    ("gpu_max_memory_allocated_bytes", "peak GPU GiB", 2.0**-30),
)
RATIO_KEYS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms")


def headline_pairs(recs: list[dict], base: str, test: str) -> dict[str, dict[str, dict]]:
    """{part: {base: rec, test: rec}} from records labelled `<part>-<base>` / `<part>-<test>`;
    ValueError for a label with neither suffix or a part that lacks one of the two."""
    parts: dict[str, dict[str, dict]] = {}
    for rec in recs:
        label = str(rec.get("label"))
        part, _, system = label.rpartition("-")
        if system not in (base, test) or not part:
            raise ValueError(f"label {label!r}: expected <part>-{base} or <part>-{test}")
        parts.setdefault(part, {})[system] = rec
    for part, pair in parts.items():
        if len(pair) != 2:
            raise ValueError(f"part {part!r} has no {base if base not in pair else test} run")
    return parts


def headline_rows(parts: dict[str, dict[str, dict]], base: str, test: str) -> list[dict]:
    """One row per part: both systems' metrics and the test/base ratios."""
    rows = []
    for part, pair in parts.items():
        b, t = pair[base], pair[test]
        ratios = {
            f"{k}_ratio": t[k] / b[k] if b.get(k) and t.get(k) is not None else None
            for k in RATIO_KEYS
        }
        keep = [k for k, _, _ in HEADLINE_METRICS] + ["completed", "failed", "duration"]
        rows.append(
            {
                "part": part,
                base: {k: b.get(k) for k in keep},
                test: {k: t.get(k) for k in keep},
                **ratios,
            }
        )
    return rows


def _cell(v, scale: float) -> str:
    if v is None:
        return "-"
    v = v * scale
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def format_headline(rows: list[dict], base: str, test: str) -> str:
    """Markdown table: a line per (part, system), then the ratio line of each part."""
    head = ["part", "system", "ok/failed"] + [label for _, label, _ in HEADLINE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for system in (base, test):
            m = row[system]
            cells = [_cell(m.get(k), s) for k, _, s in HEADLINE_METRICS]
            ok = f"{m['completed']}/{m['failed']}"
            lines.append("| " + " | ".join([row["part"], system, ok, *cells]) + " |")
    lines.append("")
    lines.append(
        f"| part | throughput {test}/{base} | TTFT {base}/{test} (mean, p50) | "
        f"TPOT {test}/{base} (mean) |"
    )
    lines.append("|---|---|---|---|")
    for row in rows:
        thr, ttft, ttft50, tpot = (row[f"{k}_ratio"] for k in RATIO_KEYS)
        inv = [f"{1 / r:.2f}x" if r else "-" for r in (ttft, ttft50)]
        lines.append(f"| {row['part']} | {_ratio(thr)} | {inv[0]}, {inv[1]} | {_ratio(tpot)} |")
    return "\n".join(lines)


def _ratio(r) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def plot_headline(rows: list[dict], base: str, test: str, path: Path) -> Path:
    """Grouped bars per part: output tok/s, mean TTFT, mean TPOT, mean batch (base vs test)."""
    plt = _pyplot()
    panels = (
        ("output_throughput", "output tokens / s", 1.0),
        ("mean_ttft_ms", "mean TTFT (s)", 1e-3),
        ("mean_tpot_ms", "mean TPOT (ms)", 1.0),
        ("mean_running_requests", "mean running batch", 1.0),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    x = np.arange(len(rows))
    for ax, (key, title, scale) in zip(axes, panels):
        for j, system in enumerate((base, test)):
            vals = [(row[system].get(key) or 0.0) * scale for row in rows]
            bars = ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=system)
            if j == 1:
                for bar, row in zip(bars, rows):
                    b = row[base].get(key)
                    if b:
                        ax.annotate(
                            f"{(row[test].get(key) or 0) / b:.2f}x",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=8,
                        )
        ax.set_xticks(x, [row["part"] for row in rows], fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.12)  # room for the ratio labels
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncol=2, fontsize=9)
    fig.suptitle(f"{test} vs {base} (bar labels: {test}/{base})")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def add_headline_args(p) -> None:
    p.add_argument("results", type=Path, nargs="+", help="`bench engine` result JSON files")
    p.add_argument("--base", default="dense", help="label suffix of the baseline runs")
    p.add_argument("--test", default="spin", help="label suffix of the runs compared with it")
    p.add_argument(
        "--out-prefix",
        type=Path,
        default=Path("perf/results/headline"),
        help="writes PREFIX.json, PREFIX.md and PREFIX.png (PNG needs matplotlib)",
    )


def run_headline(args) -> int:
    import json

    from .common import record

    recs = [json.loads(Path(p).read_text()) for p in args.results]
    rows = headline_rows(headline_pairs(recs, args.base, args.test), args.base, args.test)
    table = format_headline(rows, args.base, args.test)
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    devices = sorted({str(r.get("device", r.get("engine_device"))) for r in recs})
    config = {
        "labels": sorted(str(r["label"]) for r in recs),
        "devices": devices,
        "runs": {str(r["label"]): {k: r.get(k) for k in _RUN_CONFIG} for r in recs},
    }
    shas = sorted({str(r.get("git_sha")) for r in recs})
    rec = record("headline", config, {"rows": rows}, git_shas=shas)
    rec["device"] = ", ".join(devices)  # where the runs ran, not where this table is made
    Path(f"{args.out_prefix}.json").write_text(json.dumps(rec, indent=2) + "\n")
    Path(f"{args.out_prefix}.md").write_text(table + "\n")
    print(table)
    print(f"written {args.out_prefix}.json, {args.out_prefix}.md")
    try:
        print(
            f"written {plot_headline(rows, args.base, args.test, Path(f'{args.out_prefix}.png'))}"
        )
    except RuntimeError as e:  # no matplotlib (e.g. on the device): the JSON has it all
        print(f"no plot: {e}")
    return 1 if any(row[s]["failed"] for row in rows for s in (args.base, args.test)) else 0


_RUN_CONFIG = (
    "model_id", "random_weights", "engine_max_context", "num_prompts", "prompt_ids",
    "input_len", "output_len", "engine_settings", "device", "engine_device",
)  # fmt: skip
