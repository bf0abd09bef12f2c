"""The hierarchical step inside a captured CUDA graph: replays with host syncs forbidden give
the reference attention for every step, at an unlimited and at a mandatory-only HBM budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hierarchy_world import D, P, World, csr, reference_attention

from spinserve.plugins import ops
from spinserve.runtime.hierarchy import FETCHED, HITS, LOOKUPS, OFFLOADED, SHORT

pytestmark = pytest.mark.gpu

L, KV, B, K, N_PAGES = 2, 2, 2, 4, 8


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


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("row_width", [N_PAGES, K])
def test_graph_replay_matches_reference_without_sync(row_width, fused):
    dev = "cuda"
    # static inputs: [L, R + 1] indptr, [L, R * K] page ids, [L, B, Hq, D] queries
    indptr = torch.zeros(L, B * KV + 1, dtype=torch.int32, device=dev)
    ids = torch.zeros(L, B * KV * K, dtype=torch.int32, device=dev)
    q = torch.zeros(L, B, 2 * KV, D, device=dev)
    last = torch.full((B * KV,), P, dtype=torch.int32, device=dev)
    append = torch.zeros(L, B, KV, dtype=torch.int32, device=dev)  # no tail pages written
    req = torch.tensor([0, 1], device=dev)
    positions = torch.tensor([3, 5], device=dev)  # no page completes
    rng = np.random.default_rng(row_width)

    def fill(w: World) -> list[list[list[int]]]:
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

    warm = _world(row_width, fused)  # compiles every kernel for these shapes outside the capture
    fill(warm)
    _step_fn(warm, q, indptr, ids, last, append, req, positions)()
    torch.cuda.synchronize()
    w = _world(row_width, fused)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records only: w's state is untouched
        outs = _step_fn(w, q, indptr, ids, last, append, req, positions)()
    for _ in range(8):
        sel = fill(w)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for layer in range(L):
            ref = reference_attention(w, q[layer], [0, 1], layer, sel[layer], last, B * KV * K)
            assert torch.equal(outs[layer].cpu(), ref)
        w.dir.check_integrity(on_device=True)
    s = w.hier.stats.tolist()
    assert s[LOOKUPS] == 8 * L * B * KV * K and s[SHORT] == 0 and s[OFFLOADED] == 0
    assert s[FETCHED] + s[HITS] == s[LOOKUPS]
    if row_width == K:
        assert s[FETCHED] > s[LOOKUPS] // 2
