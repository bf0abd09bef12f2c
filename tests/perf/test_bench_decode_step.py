"""perf/bench_decode_step.py --smoke: the H100 run's code on a tiny model on the CPU, in seconds.
Exact counts follow from the shapes: pages fetched by a cold step and at forced fraction 1
(every selected page but the tail misses), none at fraction 0, pages the control-plane steps
started, floors and the control share recomputed from the record's own fields."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spinserve.perf.bench_decode_step import main, smoke_config
from spinserve.perf.decode_step_parts import SMOKE_SHAPES, P

CONTROL_STEPS, WARMUP = 33, 10  # > 32: one buffer rebalance falls among the timed steps


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a few shared cores OpenMP teams spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("decode-step")
    (out / "decode_step_h100.json").write_text("poison")  # must be overwritten
    args = ["--smoke", "--out", str(out), "--fractions", "0,1"]
    rec = main([*args, "--control-steps", str(CONTROL_STEPS)])
    return rec, json.loads((out / "decode_step_h100.json").read_text())


def _selected(shape) -> int:
    """Quest's quota: 1 sink page, 128 // P + 1 window pages (the tail included), budget."""
    return 1 + 128 // P + 1 + shape.budget // P


def test_record_on_disk_is_the_returned_one(run):
    rec, on_disk = run
    assert on_disk == rec and "partial" not in rec
    assert rec["bench"] == "decode_step" and rec["git_sha"]
    assert rec["targets"] == {"a_graph_over_floor": 1.3, "control_share": 0.10}


def test_hierarchy_fetch_counts_are_exact(run):
    rec, _ = run
    cfg, s = smoke_config(), SMOKE_SHAPES["32k"]
    rows = s.batch * cfg.num_layers * cfg.num_kv_heads
    C = _selected(s)
    b = rec["metrics"]["b_hierarchy"]
    assert b["selected_pages_per_row"] == C == 26
    assert b["cold_fetched_pages"] == rows * (C - 1)
    f0, f1 = b["rows"]
    assert (f0["forced_fraction"], f1["forced_fraction"]) == (0.0, 1.0)
    for mode in ("graph", "eager"):
        assert f0[f"{mode}_miss_rate"] == 0.0 and f0[f"{mode}_fetched_pages_per_step"] == 0.0
        assert f1[f"{mode}_miss_rate"] == (C - 1) / C
        assert f1[f"{mode}_fetched_pages_per_step"] == rows * (C - 1)
    page = 2 * P * cfg.head_dim * 2
    assert f1["pcie_bytes_per_step"] == rows * (C - 1) * page
    assert "fused_resolve_rows" not in b  # the fused kernel needs Triton: CUDA only


def test_floors_follow_the_bytes(run):
    rec, _ = run
    cfg, s = smoke_config(), SMOKE_SHAPES["32k"]
    L, KV, D, B, N = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, s.batch, s.pages
    fl = rec["floor"]
    hbm, pcie = fl["hbm_copy_gbps"] * 1e6, fl["pinned_h2d_gbps"] * 1e6
    a, c = rec["metrics"]["a_resident"], rec["metrics"]["c_dense"]
    page = 2 * P * D * 2
    assert a["bytes"] == {
        "selected_kv": B * L * KV * _selected(s) * page,
        "index": 4 * L * B * KV * N * D,
    }
    floor_a = (fl["weight_bytes_read"] + a["bytes"]["selected_kv"] + a["bytes"]["index"]) / hbm
    assert a["floor_ms"] == pytest.approx(floor_a, rel=1e-12)
    assert c["floor_ms"] == pytest.approx((fl["weight_bytes_read"] + B * L * KV * N * page) / hbm)
    f1 = rec["metrics"]["b_hierarchy"]["rows"][1]
    assert f1["floor_ms"] == pytest.approx(floor_a + f1["pcie_bytes_per_step"] / pcie)
    for r in (a, c, f1):
        assert r["graph_ms"] > 0 and r["eager_ms"] > 0
        assert r["graph_over_floor"] == pytest.approx(r["graph_ms"] / r["floor_ms"])
    assert a["eager_dynamic_ms"] > 0


def test_batch256_step_and_control_share(run):
    rec, _ = run
    cfg, s = smoke_config(), SMOKE_SHAPES["256"]
    m = rec["metrics"]["batch256"]
    C = _selected(s)
    rows = s.batch * cfg.num_layers * cfg.num_kv_heads
    assert m["step"]["cold_fetched_pages"] == rows * (C - 1)
    assert m["step"]["rows"][0]["graph_miss_rate"] == 0.0
    cp = m["control_plane"]
    assert cp["steps"] == CONTROL_STEPS
    # request i's prompt is context - 1 - (i % P) tokens; step k feeds token prompt + k
    prompts = [s.context - 1 - (i % P) for i in range(s.batch)]
    started = sum(
        math.ceil((n + WARMUP + CONTROL_STEPS) / P) - math.ceil((n + WARMUP) / P) for n in prompts
    )
    assert cp["pages_started"] == started > 0
    assert m["gpu_step_ms"] == m["step"]["rows"][0]["graph_ms"]
    assert m["control_share"] == cp["step_ms"]["median_ms"] / m["gpu_step_ms"]
    parts = cp["parts_mean_us"]
    assert parts["step"] == pytest.approx(sum(v for k, v in parts.items() if k != "step"))
    assert parts["kv.rebalance"] > 0 and parts["scheduler.schedule"] > 0
