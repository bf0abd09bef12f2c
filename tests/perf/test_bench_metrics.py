"""Metric math (vLLM definitions and key names), arrivals, SLO parsing, workloads and prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spinserve.perf import workloads
from spinserve.perf.serve_metrics import (
    RequestResult,
    arrival_offsets,
    compute_metrics,
    error_summary,
    parse_goodput,
)
from spinserve.perf.workloads import WORKLOADS, LengthDist, make_requests

VLLM_KEYS = {
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(
        f"{s}_{m}_ms"
        for m in ("ttft", "tpot", "itl", "e2el")
        for s in ("mean", "median", "std", "p50", "p90", "p99")
    ),
}


def results_fixture() -> list[RequestResult]:
    return [
        RequestResult(10, 5, True, "", 5, 0.1, [0.05, 0.05, 0.1], 0.5, start_time=0.0),
        RequestResult(20, 1, True, "", 1, 0.2, [], 0.2, start_time=0.1),
        RequestResult(30, 3, True, "", 3, 0.3, [0.2], 0.7, start_time=0.15),
        RequestResult(40, 9, False, "HTTP 500: boom"),
    ]


def test_metrics_exact_values():
    m = compute_metrics(results_fixture(), duration_s=2.0, slos={"ttft": 250, "tpot": 150})
    assert set(m) == VLLM_KEYS
    exact = {
        "completed": 3,
        "failed": 1,
        "total_input_tokens": 60,
        "total_output_tokens": 9,
        "max_concurrent_requests": 3,
        "max_output_tokens_per_s": 7.0,
    }
    assert {k: m[k] for k in exact} == exact
    approx = {
        "duration": 2.0,
        "request_throughput": 1.5,
        "output_throughput": 4.5,
        "total_token_throughput": 34.5,
        "request_goodput": 1.0,  # r3 misses the TTFT SLO
        "mean_ttft_ms": 200.0,
        "median_ttft_ms": 200.0,
        "std_ttft_ms": math.sqrt(20000 / 3),
        "p50_ttft_ms": 200.0,
        "p90_ttft_ms": 280.0,
        "p99_ttft_ms": 298.0,
        # TPOT: r1 (0.5 - 0.1) / 4 = 100 ms, r3 (0.7 - 0.3) / 2 = 200 ms; r2 (1 token) excluded
        "mean_tpot_ms": 150.0,
        "median_tpot_ms": 150.0,
        "std_tpot_ms": 50.0,
        "p90_tpot_ms": 190.0,
        "p99_tpot_ms": 199.0,
        "mean_itl_ms": 100.0,
        "median_itl_ms": 75.0,
        "p90_itl_ms": 170.0,
        "p99_itl_ms": 197.0,
        "mean_e2el_ms": 1400 / 3,
        "median_e2el_ms": 500.0,
        "p90_e2el_ms": 660.0,
        "p99_e2el_ms": 696.0,
    }
    for k, v in approx.items():
        assert m[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k


def test_goodput_none_without_slo_and_tpot_slo_counts_single_token_as_zero():
    res = results_fixture()
    assert compute_metrics(res, 2.0)["request_goodput"] is None
    # TPOT SLO of 0 ms: only r2 (1 output token => TPOT 0) meets it
    assert compute_metrics(res, 4.0, slos={"tpot": 0})["request_goodput"] == 0.25
    assert compute_metrics(res, 1.0, slos={"e2el": 500})["request_goodput"] == 2.0


def test_all_failed_reports_zeros_and_errors():
    res = [RequestResult(5, 5, error="ConnectError: refused") for _ in range(3)]
    res.append(RequestResult(5, 5, error="HTTP 404: no such model"))
    m = compute_metrics(res, 0.0)
    assert (m["completed"], m["failed"], m["request_throughput"], m["mean_ttft_ms"]) == (0, 4, 0, 0)
    assert error_summary(res) == ["3 x ConnectError: refused", "1 x HTTP 404: no such model"]


def test_arrivals():
    rng = np.random.default_rng(1)
    assert np.array_equal(arrival_offsets(4, math.inf, 1.0, rng), np.zeros(4))
    assert np.allclose(arrival_offsets(4, 2.0, math.inf, rng), [0.5, 1.0, 1.5, 2.0])
    n, rate = 20000, 5.0
    for shape, cv in ((1.0, 1.0), (0.25, 2.0), (4.0, 0.5)):  # gamma gap CV = 1 / sqrt(shape)
        t = arrival_offsets(n, rate, shape, np.random.default_rng(7))
        gaps = np.diff(np.concatenate([[0.0], t]))
        assert t[-1] == pytest.approx(n / rate, rel=1e-12)
        assert (gaps >= 0).all()
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, 0.0, rng)


def test_parse_goodput():
    assert parse_goodput(["ttft:2000", "tpot:50.5"]) == {"ttft": 2000.0, "tpot": 50.5}
    assert parse_goodput(None) == {}
    for bad in (["latency:3"], ["ttft"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_length_distributions():
    rng = np.random.default_rng(3)
    for wl in WORKLOADS.values():
        for d in (wl.input_len, wl.output_len):
            a, b = d.beta_params
            assert d.lo + (d.hi - d.lo) * a / (a + b) == pytest.approx(d.mean, rel=1e-12)
            x = d.sample(rng, 50_000)
            assert x.min() >= d.lo and x.max() <= d.hi
            assert x.mean() == pytest.approx(d.mean, rel=0.01)
    lb, lg = WORKLOADS["longbench-v2"], WORKLOADS["longgenbench"]
    assert (lb.input_len.lo, lb.input_len.hi, lb.input_len.mean) == (32_000, 120_000, 55_000)
    assert (lb.output_len.lo, lb.output_len.hi, lb.output_len.mean) == (500, 15_000, 5_000)
    assert (lg.input_len.lo, lg.input_len.hi, lg.input_len.mean) == (16_000, 19_000, 18_000)
    assert (lg.output_len.lo, lg.output_len.hi, lg.output_len.mean) == (7_000, 32_000, 12_000)
    half = lg.scaled(0.5)
    assert (half.input_len.lo, half.input_len.hi, half.input_len.mean) == (8000, 9500, 9000)
    for ctx in (512, 8192, 65536, 1 << 20):
        for wl in WORKLOADS.values():
            fit = wl.fit_context(ctx)
            assert fit.max_total_tokens <= ctx
            assert fit.scale <= 1.0
            assert fit.max_total_tokens >= 0.95 * min(ctx, wl.max_total_tokens)
    with pytest.raises(ValueError):
        LengthDist(10, 20, 25)


class CharTokenizer:
    """One token per character (ord), enough to check prompt windows."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_prompts_are_windows_of_the_text():
    rng = np.random.default_rng()
    text = "".join(chr(97 + i) for i in rng.integers(0, 26, size=3000))
    wl = WORKLOADS["longgenbench"].scaled(0.01)  # prompts 160-190, outputs 70-320
    seed = int(rng.integers(1 << 30))
    reqs = make_requests(wl, CharTokenizer(), 20, seed=seed, text=text)
    again = make_requests(wl, CharTokenizer(), 20, seed=seed, text=text)
    assert [r.prompt_ids for r in reqs] == [r.prompt_ids for r in again]
    ring = text + text
    for r in reqs:
        assert wl.input_len.lo <= r.prompt_len <= wl.input_len.hi
        assert wl.output_len.lo <= r.output_len <= wl.output_len.hi
        assert "".join(map(chr, r.prompt_ids)) in ring
    assert len({tuple(r.prompt_ids) for r in reqs}) == 20  # distinct offsets
    other = make_requests(wl, CharTokenizer(), 20, seed=seed + 1, text=text)
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in reqs]


def test_kjv_text_is_real_prose():
    text = workloads.kjv_text()
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert text.rstrip().endswith("Amen.")
    assert len(text) > 4_000_000 and "Genesis 1" not in text[:50]


def test_missing_reader_names_the_package(monkeypatch):
    workloads.kjv_text.cache_clear()
    monkeypatch.setattr(workloads.shutil, "which", lambda _: None)
    try:
        with pytest.raises(FileNotFoundError, match="bible-kjv-text"):
            workloads.kjv_text()
    finally:
        workloads.kjv_text.cache_clear()


def test_dump_text_round_trips(tmp_path):
    path = tmp_path / "kjv.txt"
    assert workloads.main(["--dump-text", str(path)]) == 0
    assert workloads.load_text(path) == workloads.kjv_text()
