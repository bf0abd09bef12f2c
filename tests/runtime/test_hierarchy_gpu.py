"""The hierarchical step inside captured CUDA graphs, one per resolve path (torch ops, fused
kernel): replays with host syncs forbidden give the reference attention for every step, at an
unlimited and at a mandatory-only HBM budget, and the two paths leave the same tables, LRU epochs
and counters (stats, row_stats) behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hierarchy_world import D, P, World, assert_same_state, csr, reference_attention

from spinserve.plugins import ops
from spinserve.runtime.hierarchy import FETCHED, HITS, LOOKUPS, OFFLOADED, SHORT

pytestmark = pytest.mark.gpu

L, KV, B, K, N_PAGES = 2, 2, 2, 4, 8
PATHS = (False, True)  # fused


def _step_fn(w: World, q, indptr, ids, last, append, req, positions):
    """One decode step over static inputs: per layer resolve + attention; offload at the end."""

    def step() -> list[torch.Tensor]:
        w.hier.begin_step(append)
        outs = []
        for layer in range(L):
            slots = w.hier.resolve(layer, req, indptr[layer], ids[layer])
            outs.append(
                ops.paged_decode_attention(q[layer], w.hbm, indptr[layer], slots, last, D**-0.5)
            )
        w.hier.offload_completed(req, positions, append)
        return outs

    return step


def _world(row_width: int, fused: bool) -> World:
    w = World(
        num_layers=L, num_kv_heads=KV, row_width=row_width, max_selected=K, device="cuda",
        fused=fused,
    )  # fmt: skip
    w.admit(0, N_PAGES)
    w.admit(1, N_PAGES - 2)
    return w


@pytest.mark.parametrize("row_width", [N_PAGES, K])
def test_graph_replay_matches_reference_without_sync(row_width):
    dev = "cuda"
    # static inputs: [L, R + 1] indptr, [L, R * K] page ids, [L, B, Hq, D] queries
    indptr = torch.zeros(L, B * KV + 1, dtype=torch.int32, device=dev)
    ids = torch.zeros(L, B * KV * K, dtype=torch.int32, device=dev)
    q = torch.zeros(L, B, 2 * KV, D, device=dev)
    last = torch.full((B * KV,), P, dtype=torch.int32, device=dev)
    append = torch.zeros(L, B, KV, dtype=torch.int32, device=dev)  # no tail pages written
    req = torch.tensor([0, 1], device=dev)
    positions = torch.tensor([3, 5], device=dev)  # no page completes
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    static = (q, indptr, ids, last, append, req, positions)

    def fill() -> list[list[list[int]]]:
        sel = []
        for layer in range(L):
            rows = [
                sorted(rng.choice(N_PAGES - 2 * (r // KV), size=K, replace=False).tolist())
                for r in range(B * KV)
            ]
            ip, pid = csr(rows, B * KV * K, dev)
            indptr[layer].copy_(ip)
            ids[layer].copy_(pid)
            sel.append(rows)
        q.copy_(torch.randn(L, B, 2 * KV, D, device=dev))
        return sel

    fill()
    for fused in PATHS:  # compiles every kernel for these shapes outside the capture
        _step_fn(_world(row_width, fused), *static)()
    torch.cuda.synchronize()
    worlds = {fused: _world(row_width, fused) for fused in PATHS}
    graphs, outs = {}, {}
    for fused, w in worlds.items():
        graphs[fused] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[fused]):  # records only: w's state is untouched
            outs[fused] = _step_fn(w, *static)()
    distinct: set[tuple[int, int, int]] = set()  # (layer, row, page) selected so far
    for _ in range(8):
        sel = fill()
        distinct |= {
            (li, r, p) for li, rows in enumerate(sel) for r, ps in enumerate(rows) for p in ps
        }
        torch.cuda.set_sync_debug_mode("error")
        try:
            for fused in PATHS:
                graphs[fused].replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for layer in range(L):
            ref = reference_attention(
                worlds[False], q[layer], [0, 1], layer, sel[layer], last, B * KV * K
            )
            for fused in PATHS:
                assert torch.equal(outs[fused][layer].cpu(), ref), "fused" if fused else "torch"
        assert_same_state(worlds[False], worlds[True])
        for w in worlds.values():
            w.dir.check_integrity(on_device=True)
    w = worlds[True]
    s = w.hier.stats.tolist()
    assert s[LOOKUPS] == 8 * L * B * KV * K and s[SHORT] == 0 and s[OFFLOADED] == 0
    assert s[FETCHED] + s[HITS] == s[LOOKUPS]
    # per request row: every (layer, head) of it looked up K pages per replay; row 2 is idle
    rows = w.hier.row_stats.tolist()
    assert [r[0] for r in rows] == [8 * L * KV * K, 8 * L * KV * K, 0]
    assert sum(r[1] for r in rows) == s[HITS] and rows[2][1] == 0
    if row_width == N_PAGES:  # unlimited: each distinct (row, page) is fetched exactly once
        assert s[FETCHED] == len(distinct)
    else:  # mandatory-only: a random selection of K of 6-8 pages misses ~40% of its pages
        assert s[FETCHED] > s[LOOKUPS] // 4 and s[FETCHED] > len(distinct)
