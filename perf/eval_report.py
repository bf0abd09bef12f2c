"""Summaries, the result record (perf/results/*.json) and the plot of the accuracy harness."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

DENSE = "dense"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _table(rows: list[dict], value, reduce=_mean) -> dict:
    """rows -> {algorithm: {context: {budget: reduced values}}} (dense under budget 0)."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        acc[r["algorithm"]][r["context"]][r["budget"]].append(value(r))
    return {
        a: {c: {b: reduce(v) for b, v in sorted(by_b.items())} for c, by_b in sorted(by_c.items())}
        for a, by_c in acc.items()
    }


def _get(table: dict, algorithm: str, context, budget):
    """A cell of a _table, whether its keys are ints or (after JSON) strings."""
    by_c = table.get(algorithm, {})
    by_b = by_c.get(context, by_c.get(str(context), {}))
    return by_b.get(budget, by_b.get(str(budget)))


def format_table(summary: dict, algorithms: list[str], budgets: list[int]) -> str:
    """Passkey accuracy (dense: its own) and perplexity per context, one line per algorithm."""
    lines = []
    for key, name, fmt in (
        ("passkey_accuracy", "passkey", "{:6.2f}"),
        ("perplexity", "ppl", "{:6.2f}"),
    ):
        table = summary[key]
        contexts = sorted({int(c) for by_c in table.values() for c in by_c})
        for c in contexts:
            lines.append(f"{name} ctx {c:>5} " + " ".join(f"{b:>6}" for b in budgets))
            for a in [DENSE] + algorithms:
                cells = [_get(table, a, c, 0 if a == DENSE else b) for b in budgets]
                text = [fmt.format(v) if v is not None else "     -" for v in cells]
                lines.append(f"  {a:>14} " + " ".join(text))
    return "\n".join(lines)


def summarize(metrics: dict, algorithms: list[str]) -> dict:
    passkey = _table(metrics["passkey"], lambda r: float(r["correct"]))
    dense = {c: v[0] for c, v in passkey.get(DENSE, {}).items()}
    retention = {
        a: {
            c: {b: (acc / dense[c] if dense.get(c) else None) for b, acc in by_b.items()}
            for c, by_b in passkey.get(a, {}).items()
        }
        for a in algorithms
    }
    return dict(
        passkey_accuracy=passkey,
        passkey_prompts=_table(metrics["passkey"], lambda r: 1.0, sum),
        passkey_retention_vs_dense=retention,
        agreement_match_rate=_table(metrics["agreement"], lambda r: r["match_rate"]),
        agreement_first_divergence=_table(metrics["agreement"], lambda r: r["first_divergence"]),
        perplexity=_table(metrics["perplexity"], lambda r: r["ppl"]),
    )


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor()}"


def git_sha() -> str:
    here = Path(__file__).parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "runtime/sparse", "perf"],
            cwd=here.parent,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # e.g. a copy of the tree without .git
        return os.environ.get("SPIN_GIT_SHA", "unknown")
    return sha + ("+dirty" if dirty else "")


def write_results(
    out_dir: Path, config: dict, metrics: dict, engine_dir, device: str | None = None
) -> Path:
    """device: where the rows were measured (default: this process's device)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    record = dict(
        bench="eval_accuracy",
        device=device or device_name(config["device"]),
        git_sha=git_sha(),
        date=now.isoformat(timespec="seconds"),
        engine=str(engine_dir),
        config=config,
        metrics=metrics,
    )
    path = out_dir / f"eval_accuracy_{now.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    plot(record, path.with_suffix(".png"))
    return path


def merge_results(paths: list[Path], out_dir: Path, measured_on: str | None = None) -> Path:
    """Records of partial grids (same model, settings) -> one record with the union of rows.
    measured_on: the device of records that lack one (eval_accuracy_partial.json files)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    metrics = {
        k: [r for rec in records for r in rec["metrics"].get(k, [])]
        for k in ("passkey", "agreement", "perplexity", "timing")
    }
    config = dict(records[0]["config"])
    for key in ("contexts", "ppl_contexts", "depths", "budgets", "algorithms"):
        config[key] = sorted({x for rec in records for x in rec["config"].get(key, [])})
    metrics["summary"] = summarize(metrics, config["algorithms"])
    metrics["merged_from"] = [str(p) for p in paths]
    metrics["wall_s"] = sum(rec["metrics"].get("wall_s", 0) for rec in records)
    metrics["git_sha_of_parts"] = [rec.get("git_sha", "unknown") for rec in records]
    devices = sorted({rec.get("device") or measured_on or "unknown" for rec in records})
    return write_results(
        out_dir, config, metrics, records[0].get("engine", "?"), device=" + ".join(devices)
    )


def plot(record: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = record["metrics"]["summary"]
    panels = [
        ("passkey_accuracy", "passkey accuracy"),
        ("agreement_match_rate", "greedy agreement with dense"),
        ("perplexity", "perplexity"),
    ]
    contexts = sorted({int(c) for k, _ in panels for by_c in s[k].values() for c in by_c})
    if not contexts:
        return None
    fig, axes = plt.subplots(
        len(panels), len(contexts), figsize=(4 * len(contexts), 9), squeeze=False
    )
    for i, (key, title) in enumerate(panels):
        for j, c in enumerate(contexts):
            ax = axes[i][j]
            for algo, by_c in s[key].items():
                by_b = {int(b): v for b, v in (by_c.get(c) or by_c.get(str(c)) or {}).items()}
                if not by_b:
                    continue
                if algo == DENSE:
                    ax.axhline(by_b[0], color="k", ls="--", label="dense")
                else:
                    bs = sorted(by_b)
                    ax.plot(bs, [by_b[b] for b in bs], marker="o", label=algo)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{title}, context {c}", fontsize=9)
            ax.set_xlabel("budget (tokens)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{record['device']} {record['git_sha'][:12]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
