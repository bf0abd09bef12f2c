"""SparsePlanner: the runtime glue (read keys back from the pool, apply the layout permutation,
map selections to slots) against plain attention over the selected tokens."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins.reference import paged_decode_attention_ref
from spinserve.runtime.sparse import SparseParams, create_algorithm
from spinserve.runtime.sparse.planner import (
    SparsePlanner,
    apply_layout,
    csr_to_page_table,
    read_keys,
)

LAYERS, KV, HQ, D = 2, 2, 4, 16


def test_apply_layout_and_read_keys():
    P, L = 4, 10
    pool = torch.randn(9, 2, P, D)
    slots = torch.tensor([[5, 2, 7], [1, 8, 3]])  # [KV, 3 pages]
    before = pool.clone()
    keys = read_keys(pool, slots, L)
    assert keys.shape == (L, KV, D)
    assert torch.equal(keys[6, 1], before[8, 0, 2])  # token 6 = page 1 offset 2, head 1 -> slot 8
    perm = torch.stack([torch.randperm(L), torch.arange(L).flip(0)])
    apply_layout(pool, slots, perm)
    after = read_keys(pool, slots, L)
    for h in range(KV):
        assert torch.equal(after[:, h], keys[perm[h], h])
    assert torch.equal(pool[6], before[6]) and torch.equal(pool[0], before[0])  # others intact
    assert torch.equal(pool[7, :, 2:], before[7, :, 2:])  # beyond L: untouched
    v_before = before[slots.long(), 1].reshape(KV, 3 * P, D)[:, :L]
    v_after = pool[slots.long(), 1].reshape(KV, 3 * P, D)[:, :L]
    assert torch.equal(v_after, v_before.gather(1, perm[..., None].expand(-1, -1, D)))


def test_csr_to_page_table():
    indptr = torch.tensor([0, 3, 4, 4 + 2], dtype=torch.int32)
    slots = torch.tensor([9, 4, 6, 1, 7, 3], dtype=torch.int32)
    table = csr_to_page_table(indptr, slots)
    assert table.tolist() == [[9, 4, 6], [1, 0, 0], [7, 3, 0]]


@pytest.mark.parametrize("name,P", [("quest", 16), ("shadowkv", 8), ("retroinfer", 16)])
def test_planner_prefill_then_decode(name, P):
    g = torch.Generator().manual_seed(21)
    L0, steps = 300, 20
    n_pages = -(-(L0 + steps) // P)
    params = SparseParams(budget_tokens=64, sink_tokens=P, window_tokens=32, dense_layers=1)
    algo = create_algorithm(name, P, KV, D, params)
    planner = SparsePlanner(algo, LAYERS, 1, "cpu")
    k = torch.randn(LAYERS, L0 + steps, KV, D, generator=g)
    v = torch.randn(LAYERS, L0 + steps, KV, D, generator=g)
    num_slots = 1 + LAYERS * KV * n_pages
    pool = torch.zeros(num_slots, 2, P, D)
    table = (1 + torch.randperm(num_slots - 1, generator=g)).view(LAYERS, KV, n_pages)

    def write(layer, t):  # identity layout: token t at position t
        for h in range(KV):
            pool[table[layer, h, t // P], 0, t % P] = k[layer, t, h]
            pool[table[layer, h, t // P], 1, t % P] = v[layer, t, h]

    for layer in range(LAYERS):
        for t in range(L0):
            write(layer, t)
    planner.index_prefill(pool, 0, table, L0)
    for t in range(L0, L0 + steps):
        q = torch.randn(1, HQ, D, generator=g)
        for layer in range(LAYERS):
            write(layer, t)
            indptr, slots, last = planner.plan_decode(
                layer,
                q,
                k[layer, t][None],
                torch.tensor([0]),
                torch.tensor([t + 1]),
                table[layer][None],
                None,
            )
            out = paged_decode_attention_ref(q, pool, indptr, slots, last, D**-0.5)
            for h in range(KV):  # attention over the tokens of the selected slots, from k/v
                sel = slots[indptr[h] : indptr[h + 1]].long()
                pos = torch.cat([(table[layer, h] == s).nonzero()[0] for s in sel])
                n_valid = [P] * (len(sel) - 1) + [int(last[h])]
                stored = torch.cat([pool[s, 0, :c] for s, c in zip(sel, n_valid)])
                # each stored key is a real key of this (layer, head): the layout is a permutation
                match = (stored[:, None, :] == k[layer, : t + 1, h][None]).all(-1)
                assert (match.sum(-1) == 1).all() and pos.numel() == len(sel)
                toks = match.float().argmax(-1)
                qg = q[0, h * 2 : (h + 1) * 2]
                w = torch.softmax(qg @ k[layer, toks, h].T * D**-0.5, -1)
                torch.testing.assert_close(out[0, h * 2 : (h + 1) * 2], w @ v[layer, toks, h])
            dense_pages = KV * -(-(t + 1) // P)
            if layer < 1:  # dense layer: every page
                assert int(indptr[-1]) == dense_pages
            else:
                assert int(indptr[-1]) < dense_pages
