"""Selection tests for the sparse algorithms: CSR validity, budget >= context == dense, planted
high-scoring keys always selected, decode indexing == prefill indexing."""

from __future__ import annotations

import pytest
import torch

from spinserve.runtime.sparse import SparseParams, create_algorithm

KV, HQ, D = 2, 6, 32
ALGOS = {"dense": 16, "streaming": 16, "quest": 16, "shadowkv": 8, "retroinfer": 16}
PARAMS = SparseParams(budget_tokens=64, sink_tokens=16, window_tokens=32)


def prefill_all(algo, state, seq_lens, keys_per_req):
    """index_prefill every request; returns the layout perm [KV, L] of each (identity if None)."""
    perms = []
    for slot, (n, keys) in enumerate(zip(seq_lens.tolist(), keys_per_req)):
        perm = algo.index_prefill(state, slot, keys[:n])
        perms.append(perm if perm is not None else torch.arange(n).repeat(KV, 1))
    return perms


def check_csr(sel, algo, seq_lens, budget_tokens):
    P, p = algo.page_size, algo.params
    B = seq_lens.numel()
    indptr = sel.kv_indptr.tolist()
    assert sel.kv_indptr.dtype == sel.page_ids.dtype == sel.kv_last_page_len.dtype == torch.int32
    assert indptr[0] == 0 and indptr[-1] == sel.page_ids.numel() and len(indptr) == B * KV + 1
    for r in range(B * KV):
        L = int(seq_lens[r // KV])
        n = -(-L // P)
        ids = sel.page_ids[indptr[r] : indptr[r + 1]].tolist()
        assert ids == sorted(set(ids)) and ids[-1] == n - 1 and ids[0] >= 0
        assert int(sel.kv_last_page_len[r]) == L - (n - 1) * P
        static = set(range(min(n, -(-p.sink_tokens // P))))  # sinks, then the window's pages:
        static |= set(range(max(n - (p.window_tokens // P + 1), 0), n))  # the tail + full ones
        assert static <= set(ids)
        if algo.name not in ("dense", "streaming"):
            assert len(set(ids) - static) <= budget_tokens // P


def random_batch(seq_lens, seed):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(int(n), KV, D, generator=g) for n in seq_lens]
    q = torch.randn(len(seq_lens), HQ, D, generator=g)
    return keys, q


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("seed", [0, 1])
def test_csr_valid_and_within_budget(name, seed):
    algo = create_algorithm(name, ALGOS[name], KV, D, PARAMS)
    seq_lens = torch.tensor([403, 97, 256 + 7 * seed, 1])
    keys, q = random_batch(seq_lens, seed)
    state = algo.new_state(len(seq_lens), "cpu")
    prefill_all(algo, state, seq_lens, keys)
    sel = algo.select(state, q, torch.arange(len(seq_lens)), seq_lens)
    check_csr(sel, algo, seq_lens, PARAMS.budget_tokens)


@pytest.mark.parametrize("name", list(ALGOS))
def test_budget_covering_context_selects_every_page(name):
    P = ALGOS[name]
    algo = create_algorithm(name, P, KV, D, PARAMS)
    seq_lens = torch.tensor([300, 129, 17])
    keys, q = random_batch(seq_lens, 7)
    state = algo.new_state(3, "cpu")
    prefill_all(algo, state, seq_lens, keys)
    budget = (seq_lens - PARAMS.sink_tokens - PARAMS.window_tokens).clamp(min=0)  # exactly covers
    sel = algo.select(state, q, torch.arange(3), seq_lens, budget)
    dense = create_algorithm("dense", P, KV, D, PARAMS).select(None, q, torch.arange(3), seq_lens)
    assert torch.equal(sel.kv_indptr, dense.kv_indptr)
    assert torch.equal(sel.page_ids, dense.page_ids)
    assert torch.equal(sel.kv_last_page_len, dense.kv_last_page_len)
    counts = (dense.kv_indptr[1:] - dense.kv_indptr[:-1]).tolist()
    assert counts == ([19, 19, 9, 9, 2, 2] if P == 16 else [38, 38, 17, 17, 3, 3])
    if name != "dense":
        short = algo.select(state, q, torch.arange(3), seq_lens, budget - P)  # one page short
        assert short.page_ids.numel() < dense.page_ids.numel()


def planted_batch(P, seed, L=1024, hits=3):
    """Keys of small norm; in each (request, kv_head) `hits` whole random pages of the middle get
    keys aligned with that head's queries (big q.k). Returns keys, q and the planted pages."""
    g = torch.Generator().manual_seed(seed)
    keys = 0.1 * torch.randn(2, L, KV, D, generator=g)
    q = torch.randn(2, HQ, D, generator=g)
    planted = {}
    for b in range(2):
        for h in range(KV):
            direction = q[b, h * (HQ // KV) : (h + 1) * (HQ // KV)].sum(0)
            direction = direction / direction.norm()
            pages = torch.randperm(L // P - 8, generator=g)[:hits] + 2
            for j in pages.tolist():
                noise = 0.1 * torch.randn(P, D, generator=g)
                keys[b, j * P : (j + 1) * P, h] = 4.0 * direction + noise
            planted[(b, h)] = sorted(pages.tolist())
    return keys, q, planted


@pytest.mark.parametrize("name", ["quest", "shadowkv", "retroinfer"])
@pytest.mark.parametrize("seed", [3, 4, 5, 6, 7, 8])
def test_planted_pages_always_selected(name, seed):
    P = ALGOS[name]
    params = SparseParams(budget_tokens=4 * P, sink_tokens=P, window_tokens=P)  # 3 planted
    algo = create_algorithm(name, P, KV, D, params)
    keys, q, planted = planted_batch(P, seed)
    L = keys.shape[1]
    state = algo.new_state(2, "cpu")
    perms = prefill_all(algo, state, torch.tensor([L, L]), list(keys))
    sel = algo.select(state, q, torch.arange(2), torch.tensor([L, L]))
    for (b, h), pages in planted.items():
        r = b * KV + h
        chosen = set(sel.page_ids[sel.kv_indptr[r] : sel.kv_indptr[r + 1]].tolist())
        layout_pos = torch.argsort(perms[b][h])  # token -> its layout position
        for j in pages:
            holding = set((layout_pos[j * P : (j + 1) * P] // P).tolist())
            assert holding <= chosen, (name, b, h, j, holding, chosen)


@pytest.mark.parametrize("name", ["quest", "shadowkv"])
def test_decode_indexing_matches_prefill_indexing(name):
    P = ALGOS[name]
    algo = create_algorithm(name, P, KV, D, PARAMS)
    keys, q = random_batch([300, 300], 11)
    L0 = [61, 200]
    inc, full = algo.new_state(2, "cpu"), algo.new_state(2, "cpu")
    for b in range(2):
        algo.index_prefill(inc, b, keys[b][: L0[b]])
        algo.index_prefill(full, b, keys[b])
    for t in range(61, 300):
        active = [b for b in range(2) if t >= L0[b]]
        pos = torch.full((len(active),), t)
        algo.index_decode(inc, torch.tensor(active), torch.stack([keys[b][t] for b in active]), pos)
    n = -(-300 // P)
    for name_buf, t in full.buffers.tensors.items():
        if name_buf == "outlier":
            continue
        torch.testing.assert_close(inc.buffers[name_buf][:, :, :n], t[:, :, :n])
    lens = torch.tensor([300, 300])
    a, b = algo.select(inc, q, torch.arange(2), lens), algo.select(full, q, torch.arange(2), lens)
    if name == "quest":  # shadowkv differs only through the prefill-time outliers
        assert torch.equal(a.page_ids, b.page_ids)


def test_retroinfer_decode_pages_join_clusters():
    P = 16
    algo = create_algorithm("retroinfer", P, KV, D, PARAMS)
    keys, q = random_batch([700], 12)
    keys = keys[0]
    state = algo.new_state(1, "cpu")
    perm = algo.index_prefill(state, 0, keys[:450])
    assert perm is not None and perm.shape == (KV, 450)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(450).repeat(KV, 1))
    assert torch.equal(perm[:, 416:], torch.arange(416, 450).repeat(KV, 1))  # window: identity
    for t in range(450, 700):
        algo.index_decode(state, torch.tensor([0]), keys[t][None], torch.tensor([t]))
    pc = state.buffers["page_cluster"][0, :, : 700 // P]
    assert (pc[:, :1] == -1).all() and (pc[:, 1:] >= 0).all()  # sink page static, rest clustered
    assert (state.buffers["page_cluster"][0, :, 700 // P] == -1).all()  # partial tail page
    cpages = state.buffers["cpages"][0]
    for h in range(KV):
        counts = torch.bincount(pc[h, 1:], minlength=cpages.shape[1])
        assert torch.equal(counts, cpages[h])
        layout_keys = keys[: 700 // P * P, h][torch.cat([perm[h], torch.arange(450, 688)])]
        sums = torch.zeros(cpages.shape[1], D).index_add_(
            0, pc[h, 1:].repeat_interleave(P), layout_keys[P:]
        )
        torch.testing.assert_close(state.buffers["csum"][0, h], sums, atol=1e-4, rtol=1e-5)
        assert int(state.num_clusters[0, h]) == int((cpages[h] > 0).sum())


def test_shadowkv_group_ranks_by_each_heads_softmax():
    """A GQA group of 2 heads, budget 1 chunk: head 0 has large logits everywhere (its best
    chunk Y only 2 above the rest), head 1 points sharply at chunk X with small logits. Raw
    logits would pick Y (102 > 20); per-head probabilities pick X (~1 vs ~0.2)."""
    from spinserve.runtime.sparse.shadowkv import ShadowKVAlgorithm

    P, n, X, Y, dim = 8, 30, 10, 20, 8
    params = SparseParams(budget_tokens=P, sink_tokens=P, window_tokens=P)
    algo = ShadowKVAlgorithm(P, 1, dim, params, outlier_tokens=0)
    e0, e1 = torch.eye(dim)[0], torch.eye(dim)[1]
    chunk_keys = e0.repeat(n, 1)
    chunk_keys[Y] *= 1.02
    chunk_keys[X] += e1
    keys = chunk_keys.repeat_interleave(P, 0)[:, None, :]  # [n * P, 1, dim], equal in a chunk
    state = algo.new_state(1, "cpu")
    algo.index_prefill(state, 0, keys)
    q = torch.stack([100 * e0, 20 * e1])[None] / algo.sm_scale  # [1, 2, dim]
    sel = algo.select(state, q, torch.tensor([0]), torch.tensor([n * P]))
    ids = sel.page_ids.tolist()
    assert ids[0] == 0 and ids[1] == X and Y not in ids and min(ids[2:]) >= n - 2  # sink, X, window
