"""`spinserve perf check`: compare benchmark results with perf/baselines/*.json; fail on a
regression beyond the measured noise.

    spinserve perf check --run                  # CPU gate: run the CPU benches, compare (CI)
    spinserve perf check --results a.json ...   # compare existing result files
    spinserve perf check --update --repeats 8   # re-measure the CPU gate's baseline + noise

A baseline file:
    {"bench": "cpu_gate", "match": {...optional result fields that must be equal...},
     "measured": {"date", "git_sha", "device", "repeats"},
     "metrics": {NAME: {"value": v, "better": "lower"|"higher", "noise": n, "tolerance": t,
                        "samples": [...]}}}
noise = (max - min) / median over the repeats; tolerance = max(TOL_FLOOR, NOISE_MULT x noise)
(0.25 and 2: see the constants).
A result is a JSON object with the same "bench" (and match fields); a metric is read from its
"metrics" object, else from the top level (so `bench serve` files in vLLM's layout work too).
Verdict per metric, with worse = new / value ("lower" is better) or value / new ("higher"):
    worse > 1 + tolerance   REGRESSION (exit status 1)
    worse < 1 - tolerance   improved   (passes; consider --update)
A metric missing from the result also fails. With --run, a regressed bench is measured once
more and fails only if the second run also regresses (the box is shared; one slow round is not
a regression). Exit status: 0 pass, 1 regression or missing metric, 2 bad input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
CPU_GATE = "cpu_gate"
TOL_FLOOR = 0.25  # never gate tighter than +25%: the CI box is shared
NOISE_MULT = 2.0  # tolerance = 2 x the full spread (max - min) seen over repeated runs


class CheckError(Exception):
    """Bad input: no baseline for a result, unreadable file (exit status 2)."""


# ---- comparison ------------------------------------------------------------------------------
def metric_value(result: dict, name: str) -> float | None:
    for scope in (result.get("metrics") or {}, result):
        v = scope.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def compare(result: dict, baseline: dict) -> list[dict]:
    """One row per baseline metric: name, value, baseline, worse, tolerance, verdict."""
    rows = []
    for name, spec in baseline["metrics"].items():
        new, ref, tol = metric_value(result, name), float(spec["value"]), float(spec["tolerance"])
        if new is None:
            rows.append(
                {
                    "metric": name,
                    "value": None,
                    "baseline": ref,
                    "worse": None,
                    "tolerance": tol,
                    "verdict": "MISSING",
                }
            )
            continue
        if spec.get("better", "lower") == "lower":
            worse = new / ref if ref else float("inf") if new > 0 else 1.0
        else:
            worse = ref / new if new else float("inf")
        verdict = "REGRESSION" if worse > 1 + tol else "improved" if worse < 1 - tol else "ok"
        rows.append(
            {
                "metric": name,
                "value": new,
                "baseline": ref,
                "worse": worse,
                "tolerance": tol,
                "verdict": verdict,
            }
        )
    return rows


def failed(rows: list[dict]) -> bool:
    return any(r["verdict"] in ("REGRESSION", "MISSING") for r in rows)


def load_baselines(directory: Path) -> list[dict]:
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        b = _read_json(path)
        if "bench" not in b or "metrics" not in b:
            raise CheckError(f"{path}: a baseline needs 'bench' and 'metrics'")
        b["_path"] = str(path)
        out.append(b)
    return out


def find_baseline(result: dict, baselines: list[dict]) -> dict | None:
    for b in baselines:
        if b["bench"] == result.get("bench") and all(
            result.get(k) == v for k, v in (b.get("match") or {}).items()
        ):
            return b
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckError(f"{path}: expected a JSON object")
    return data


def format_rows(title: str, rows: list[dict]) -> str:
    lines = [title, f"  {'metric':<24} {'value':>10} {'baseline':>10} {'worse':>7} {'limit':>7}"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.4g}"
        w = "-" if r["worse"] is None else f"{r['worse']:.3f}"
        lines.append(
            f"  {r['metric']:<24} {v:>10} {r['baseline']:>10.4g} {w:>7} "
            f"{1 + r['tolerance']:>7.3f}  {r['verdict']}"
        )
    return "\n".join(lines)


# ---- the CPU gate ----------------------------------------------------------------------------
GATE_METRICS = {  # metric -> where it comes from; all are ratios, lower is better
    "control_step_b256": "micro",
    "metadata_step_b256": "micro",
    "hier_decode_step_b256": "micro",
    "lru_step_b256": "micro",
    "budget_resize_b256": "micro",
    "http_overhead_cpu": "http",
}


def run_cpu_gate(only: list[str] | None = None, http: bool = True, seed: int = 0) -> dict:
    """One measurement of the gate's metrics -> a result record (bench "cpu_gate")."""
    from .common import device_name, git_sha
    from .cpu_benches import run_micro

    names = [n for n in GATE_METRICS if only is None or n in only]
    micro = [n for n in names if GATE_METRICS[n] == "micro"]
    details = run_micro(seed=seed, only=micro) if micro else {}
    metrics = {n: details[n]["ratio"] for n in micro}
    if http and "http_overhead_cpu" in names:
        from .http_overhead import run_http_overhead

        details["http_overhead"] = h = run_http_overhead(clients=8, new_tokens=64, rounds=3)
        metrics["http_overhead_cpu"] = h["cpu_ratio"]
    return {
        "bench": CPU_GATE,
        "device": device_name(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics,
        "details": details,
    }


def make_baseline(samples: list[dict], bench: str = CPU_GATE) -> dict:
    """Baseline from repeated results: median value, spread as noise, tolerance from noise."""
    names = sorted({n for s in samples for n in s["metrics"]})
    metrics = {}
    for n in names:
        vals = [s["metrics"][n] for s in samples if n in s["metrics"]]
        med = statistics.median(vals)
        noise = (max(vals) - min(vals)) / med if med else 0.0
        metrics[n] = {
            "value": med,
            "better": "lower",
            "noise": round(noise, 4),
            "tolerance": round(max(TOL_FLOOR, NOISE_MULT * noise), 4),
            "samples": vals,
        }
    last = samples[-1]
    return {
        "bench": bench,
        "description": "CPU-measurable control-plane and serving benches as ratios to "
        "references measured in the same run (perf/cpu_benches.py)",
        "measured": {
            "date": last.get("date"),
            "git_sha": last.get("git_sha"),
            "device": last.get("device"),
            "repeats": len(samples),
        },
        "rule": f"tolerance = max({TOL_FLOOR}, {NOISE_MULT} x noise); noise = (max-min)/median",
        "metrics": metrics,
    }


def _gate(args) -> int:
    baselines = load_baselines(args.baselines)
    base = next((b for b in baselines if b["bench"] == CPU_GATE), None)
    if base is None:
        raise CheckError(
            f"no {CPU_GATE} baseline in {args.baselines}: run `spinserve perf check --update` first"
        )
    result = run_cpu_gate(only=args.only, http=not args.no_http)
    rows = compare(result, base)
    bad = [r["metric"] for r in rows if r["verdict"] == "REGRESSION"]
    if bad:  # confirm on a second measurement: keep the better of the two per metric
        print(f"possible regression in {bad}: measuring again to confirm")
        again = run_cpu_gate(only=bad, http=not args.no_http, seed=1)
        for n in bad:
            if n in again["metrics"]:
                result["metrics"][n] = min(result["metrics"][n], again["metrics"][n])
        result["confirmed"] = again["metrics"]
        rows = compare(result, base)
    skipped = set(GATE_METRICS) - set(result["metrics"])  # --no-http / --only: not measured
    rows = [r for r in rows if r["metric"] not in skipped]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_rows(f"{CPU_GATE} vs {base['_path']}", rows))
    return 1 if failed(rows) else 0


def _update(args) -> int:
    samples = []
    for i in range(args.repeats):
        samples.append(run_cpu_gate(only=args.only, http=not args.no_http, seed=0))
        print(
            f"repeat {i + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in samples[-1]["metrics"].items())
        )
    base = make_baseline(samples)
    path = Path(args.baselines) / f"{CPU_GATE}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base, indent=2) + "\n")
    for n, m in base["metrics"].items():
        print(
            f"{n:<24} value {m['value']:.4g}  noise {m['noise']:.3f}  "
            f"tolerance {m['tolerance']:.3f}"
        )
    print(f"written {path}")
    return 0


def _results(args) -> int:
    baselines = load_baselines(args.baselines)
    status = 0
    for path in args.results:
        result = _read_json(path)
        base = find_baseline(result, baselines)
        if base is None:
            raise CheckError(
                f"{path}: no baseline for bench {result.get('bench')!r} in {args.baselines}"
            )
        rows = compare(result, base)
        print(format_rows(f"{path} vs {base['_path']}", rows))
        status = max(status, int(failed(rows)))
    return status


def add_args(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run", action="store_true", help="run the CPU gate and compare")
    mode.add_argument("--results", type=Path, nargs="+", help="result files to compare")
    mode.add_argument("--update", action="store_true", help="re-measure the CPU gate baseline")
    p.add_argument("--baselines", type=Path, default=BASELINES_DIR)
    p.add_argument("--repeats", type=int, default=8, help="runs for --update (noise estimate)")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP overhead bench")
    p.add_argument("--only", nargs="+", choices=sorted(GATE_METRICS), help="CPU gate subset")
    p.add_argument("--out", type=Path, help="write the --run result here")


def run(args: argparse.Namespace) -> int:
    try:
        if args.update:
            return _update(args)
        return _gate(args) if args.run else _results(args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinserve perf check", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
