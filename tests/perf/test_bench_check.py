"""`spinserve perf check`: baseline construction, verdicts, exit status; and the CPU gate end to
end on a real bench: a baseline measured here, a re-run passes (noise), the subject made 3x
slower fails (a real regression, confirmed by the second measurement)."""

from __future__ import annotations

import json
import random

import pytest

from spinserve.control import budgets
from spinserve.perf import check
from spinserve.perf.cli_bench import perf_main


def write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_make_baseline_noise_and_tolerance():
    samples = [
        {"metrics": {"a": v, "b": w}} for v, w in ((1.0, 2.0), (1.1, 2.02), (0.9, 2.0), (1.0, 1.98))
    ]
    b = check.make_baseline(samples)
    a, bb = b["metrics"]["a"], b["metrics"]["b"]
    assert (a["value"], a["noise"], a["tolerance"]) == (1.0, 0.2, 0.4)  # 2 x (1.1 - 0.9) / 1.0
    assert (bb["value"], bb["noise"], bb["tolerance"]) == (2.0, 0.02, 0.25)  # the floor
    assert a["samples"] == [1.0, 1.1, 0.9, 1.0] and b["measured"]["repeats"] == 4


def test_verdicts():
    base = {
        "bench": "x",
        "metrics": {
            "t": {"value": 2.0, "better": "lower", "tolerance": 0.5},
            "tput": {"value": 100.0, "better": "higher", "tolerance": 0.25},
            "gone": {"value": 1.0, "better": "lower", "tolerance": 0.3},
        },
    }
    rows = {
        r["metric"]: r for r in check.compare({"metrics": {"t": 2.9}, "tput": 79.0}, base)
    }  # top-level keys count (vLLM layout)
    assert rows["t"]["verdict"] == "ok" and rows["t"]["worse"] == pytest.approx(1.45)
    assert rows["tput"]["verdict"] == "REGRESSION"
    assert rows["tput"]["worse"] == pytest.approx(100 / 79)
    assert rows["gone"]["verdict"] == "MISSING"
    rows = {r["metric"]: r for r in check.compare({"t": 3.1, "tput": 81.0, "gone": 0.6}, base)}
    assert [rows[k]["verdict"] for k in ("t", "tput", "gone")] == ["REGRESSION", "ok", "improved"]


def test_results_cli_exit_status(tmp_path, capsys):
    bdir = tmp_path / "baselines"
    bdir.mkdir()
    value = random.uniform(10, 100)
    write(
        bdir / "serve.json",
        {
            "bench": "serve",
            "match": {"label": "h100"},
            "metrics": {
                "output_throughput": {"value": value, "better": "higher", "tolerance": 0.1},
                "median_ttft_ms": {"value": 50.0, "better": "lower", "tolerance": 0.2},
            },
        },
    )
    noise = write(
        tmp_path / "a.json",
        {
            "bench": "serve",
            "label": "h100",
            "output_throughput": value * 0.95,
            "median_ttft_ms": 55,
        },
    )
    slow = write(
        tmp_path / "b.json",
        {"bench": "serve", "label": "h100", "output_throughput": value * 0.8, "median_ttft_ms": 45},
    )
    other = write(tmp_path / "c.json", {"bench": "serve", "label": "a100"})
    assert perf_main(["check", "--results", noise, "--baselines", str(bdir)]) == 0
    assert perf_main(["check", "--results", noise, slow, "--baselines", str(bdir)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert perf_main(["check", "--results", other, "--baselines", str(bdir)]) == 2
    assert "no baseline" in capsys.readouterr().err


def test_cpu_gate_noise_passes_regression_fails(tmp_path, monkeypatch, capsys):
    only = ["budget_resize_b256"]
    samples = [check.run_cpu_gate(only=only, http=False) for _ in range(3)]
    bdir = tmp_path / "baselines"
    bdir.mkdir()
    base = check.make_baseline(samples)
    write(bdir / "cpu_gate.json", base)
    args = ["check", "--run", "--no-http", "--only", *only, "--baselines", str(bdir)]
    assert perf_main([*args, "--out", str(tmp_path / "r.json")]) == 0
    rerun = json.loads((tmp_path / "r.json").read_text())
    assert set(rerun["metrics"]) == set(only)
    assert rerun["details"]["budget_resize_b256"]["subject_us"] > 0

    real = budgets.resize_buffers

    def three_times_slower(*a, **k):
        real(*a, **k)
        real(*a, **k)
        return real(*a, **k)

    monkeypatch.setattr(budgets, "resize_buffers", three_times_slower)
    capsys.readouterr()
    assert perf_main(args) == 1
    out = capsys.readouterr().out
    assert "measuring again to confirm" in out and "REGRESSION" in out
