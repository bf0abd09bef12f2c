"""The capturable selection (runtime/sparse/static_select.py) with the step-planned select:
select_static's page ids and rows, and plan_static's pool slots written by the select kernel,
equal the former construction (select_pages positions mapped through the candidates and the
page table) and the eager selection; the step's CSR is computed once for every layer. Run with
the Triton kernel (interpreter) and with the torch fallback."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins import ops
from spinserve.runtime.sparse import SparseParams, create_algorithm
from spinserve.runtime.sparse.planner import SparsePlanner

LAYERS, KV, HQ, D, P, M = 3, 2, 4, 64, 16, 24
I32 = torch.int32

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _world(name: str, g: torch.Generator):
    """A planner whose requests were prefilled with random keys, a batch of them (one padding
    row: slot -1, length 1) and a random page table [L, B, KV, M] of distinct slots."""
    params = SparseParams(budget_tokens=64, sink_tokens=16, window_tokens=32, dense_layers=1)
    algo = create_algorithm(name, P, KV, D, params)
    planner = SparsePlanner(algo, LAYERS, 5, "cpu")
    planner.reserve(M)
    req_slots = torch.tensor([3, 0, -1, 1, 4])
    seq_lens = torch.tensor([300, 17, 1, M * P, 129])
    for slot, n in zip(req_slots.tolist(), seq_lens.tolist()):
        for layer, state in enumerate(planner.states):
            if slot >= 0 and n > 1 and not planner.is_dense_layer(layer):
                algo.index_prefill(state, slot, torch.randn(n - 1, KV, D, generator=g))
    B = req_slots.numel()
    table = (1 + torch.randperm(LAYERS * B * KV * M, generator=g)).to(I32)
    return planner, req_slots, seq_lens, table.view(LAYERS, B, KV, M)


def _former(planner, layer, q, cand, budget, table):
    """The path before the step-planned select: positions, then glue (the selection part of
    the old select_static and _static_plan)."""
    algo = planner.algo
    sinks, window, dynamic = algo.page_quota(budget)
    scores = algo.candidate_scores(planner.states[layer], q, cand)
    indptr, pos = ops.select_pages(scores, cand.indptr, sinks, window, dynamic, cand.max_pages)
    pos = pos.long()
    page_ids, rows = cand.page[pos].to(I32), cand.row[pos]
    return indptr, page_ids, rows, table[rows, page_ids.long()]


@pytest.mark.parametrize("interpreted", [True, False])
@pytest.mark.parametrize("name", ["quest", "streaming"])
def test_static_select_equals_former_path_and_eager(name, interpreted, monkeypatch):
    if interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(7 if interpreted else 8)
    planner, req_slots, seq_lens, table = _world(name, g)
    B, budget = req_slots.numel(), 64
    cand = planner.candidates(req_slots, seq_lens, M)
    real = req_slots >= 0
    indptrs = set()
    for layer in range(LAYERS):
        q = torch.randn(B, HQ, D, generator=g)
        k = torch.randn(B, KV, D, generator=g)
        tab = table[layer].reshape(B * KV, M)
        sel, rows = planner.select_static(layer, q, k, cand, budget)
        ip, slots, last = planner.plan_static(layer, q, k, cand, budget, tab)  # fold: idempotent
        assert torch.equal(ip, sel.kv_indptr) and torch.equal(last, cand.last_len)
        if planner.is_dense_layer(layer):
            assert torch.equal(slots, tab[cand.row, cand.page])
            assert torch.equal(sel.page_ids, cand.page.to(I32))
            continue
        indptrs.add(id(ip))
        want_ip, want_pages, want_rows, want_slots = _former(planner, layer, q, cand, budget, tab)
        assert torch.equal(sel.kv_indptr, want_ip)
        assert torch.equal(sel.page_ids, want_pages)  # padding too: page 0
        assert torch.equal(rows, want_rows)  # padding too: row 0
        n = int(ip[-1])
        assert torch.equal(slots[:n], want_slots[:n]) and not slots[n:].any()  # pad: dummy
        eager = planner.select_logical(layer, q[real], k[real], req_slots[real], seq_lens[real])
        e_ip, s_ip = eager.kv_indptr.tolist(), ip.tolist()
        real_rows = [r for r in range(B * KV) if req_slots[r // KV] >= 0]
        for i, r in enumerate(real_rows):
            assert (
                eager.page_ids[e_ip[i] : e_ip[i + 1]].tolist()
                == sel.page_ids[s_ip[r] : s_ip[r + 1]].tolist()
            )
    assert len(indptrs) == 1  # one CSR for every sparse layer of the step


def test_step_values_are_computed_once(monkeypatch):
    """Every sparse layer reuses the step's sel_indptr and rows (same tensors); a new step's
    candidates compute them afresh."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(9)
    planner, req_slots, seq_lens, table = _world("quest", g)
    B = req_slots.numel()
    cand = planner.candidates(req_slots, seq_lens, M)
    q, k = torch.randn(B, HQ, D, generator=g), torch.randn(B, KV, D, generator=g)
    a, rows_a = planner.select_static(1, q, k, cand, 64)
    b, rows_b = planner.select_static(2, q, k, cand, 64)
    assert a.kv_indptr is b.kv_indptr and rows_a is rows_b
    assert not torch.equal(a.page_ids, b.page_ids)  # the layers' indexes differ
    quota = planner.algo.page_quota(64)
    assert cand.sel_indptr(quota) is a.kv_indptr
    other = planner.candidates(req_slots, seq_lens.clone(), M)
    c, _ = planner.select_static(1, q, k, other, 64)
    assert c.kv_indptr is not a.kv_indptr and torch.equal(c.kv_indptr, a.kv_indptr)
