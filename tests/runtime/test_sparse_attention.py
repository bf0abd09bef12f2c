"""End to end through the runtime contract: index_prefill (+ the layout permutation applied to
the pool), index_decode of appended tokens, select, logical page -> slot mapping, then
plugins/reference.paged_decode_attention_ref. Full budget == dense attention; a partial budget ==
attention over exactly the tokens of the selected pages."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins.reference import paged_decode_attention_ref
from spinserve.runtime.sparse import SparseParams, create_algorithm

KV, HQ, D = 2, 6, 32
ALGOS = {"dense": 16, "streaming": 16, "quest": 16, "shadowkv": 8, "retroinfer": 16}
PARAMS = SparseParams(budget_tokens=48, sink_tokens=8, window_tokens=24)
SM_SCALE = D**-0.5


class ToyRuntime:
    """What the runtime does for one layer: pages of (request, kv_head) at random pool slots,
    every slot not owned by a request poisoned with NaN (slot 0 = the dummy slot, zeros)."""

    def __init__(self, algo, seq_lens: list[int], prefill_lens: list[int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        P, B = algo.page_size, len(seq_lens)
        self.algo, self.P, self.seq_lens = algo, P, seq_lens
        self.k = [torch.randn(n, KV, D, generator=g) for n in seq_lens]  # token order
        self.v = [torch.randn(n, KV, D, generator=g) for n in seq_lens]
        n_max = -(-max(seq_lens) // P)
        num_slots = 1 + B * KV * n_max + 5
        self.pool = torch.full((num_slots, 2, P, D), float("nan"))
        self.pool[0] = 0
        perm_slots = 1 + torch.randperm(num_slots - 1, generator=g)
        self.page_table = perm_slots[: B * KV * n_max].view(B, KV, n_max)  # logical page -> slot
        # unwritten tail positions: big but finite (the reference multiplies them by weight 0)
        self.pool[self.page_table.flatten()] = 1e4
        self.layout = [torch.arange(n).repeat(KV, 1) for n in seq_lens]  # [KV, L] pos -> token
        self.state = algo.new_state(B, "cpu")
        for b, n0 in enumerate(prefill_lens):
            perm = algo.index_prefill(self.state, b, self.k[b][:n0])
            if perm is not None:
                self.layout[b][:, :n0] = perm
            self._write(b, 0, n0)
        for t in range(min(prefill_lens), max(seq_lens)):  # decode: one token per step
            rows = [b for b in range(B) if prefill_lens[b] <= t < seq_lens[b]]
            if not rows:
                continue
            for b in rows:
                self._write(b, t, t + 1)
            keys = torch.stack([self.k[b][t] for b in rows])
            pos = torch.full((len(rows),), t)
            algo.index_decode(self.state, torch.tensor(rows), keys, pos)

    def _write(self, b: int, start: int, end: int) -> None:
        """Store layout positions [start, end) of request b into their pages."""
        for h in range(KV):
            for s in range(start, end):
                tok = int(self.layout[b][h, s])
                slot = self.page_table[b, h, s // self.P]
                self.pool[slot, 0, s % self.P] = self.k[b][tok, h]
                self.pool[slot, 1, s % self.P] = self.v[b][tok, h]

    def attend(self, q: torch.Tensor, budget):
        lens = torch.tensor(self.seq_lens)
        sel = self.algo.select(self.state, q, torch.arange(len(self.seq_lens)), lens, budget)
        slots = sel.to_slots(self.page_table)
        out = paged_decode_attention_ref(
            q, self.pool, sel.kv_indptr, slots, sel.kv_last_page_len, SM_SCALE
        )
        return sel, out

    def reference(self, q: torch.Tensor, b: int, h: int, tokens: torch.Tensor) -> torch.Tensor:
        """[G, D] attention of kv head h's query group over the given token ids."""
        G = HQ // KV
        qg = q[b, h * G : (h + 1) * G]
        k, v = self.k[b][tokens, h], self.v[b][tokens, h]
        return torch.softmax(qg @ k.T * SM_SCALE, dim=-1) @ v


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("seed", [0, 1])
def test_full_budget_is_dense_attention(name, seed):
    algo = create_algorithm(name, ALGOS[name], KV, D, PARAMS)
    rt = ToyRuntime(algo, seq_lens=[203, 77, 130], prefill_lens=[190, 60, 130], seed=seed)
    q = torch.randn(3, HQ, D)
    _, out = rt.attend(q, budget=max(rt.seq_lens))
    for b, n in enumerate(rt.seq_lens):
        for h in range(KV):
            want = rt.reference(q, b, h, torch.arange(n))
            torch.testing.assert_close(out[b, h * 3 : (h + 1) * 3], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(ALGOS))
def test_partial_budget_attends_exactly_the_selected_tokens(name):
    P = ALGOS[name]
    algo = create_algorithm(name, P, KV, D, PARAMS)
    rt = ToyRuntime(algo, seq_lens=[403, 290], prefill_lens=[380, 290], seed=5)
    q = torch.randn(2, HQ, D)
    sel, out = rt.attend(q, budget=torch.tensor([48, 32]))
    assert not out.isnan().any()
    dense_pages = sum(-(-n // P) for n in rt.seq_lens) * KV
    assert sel.page_ids.numel() == dense_pages if name == "dense" else sel.page_ids.numel() < 60
    for b, n in enumerate(rt.seq_lens):
        for h in range(KV):
            r = b * KV + h
            pages = sel.page_ids[sel.kv_indptr[r] : sel.kv_indptr[r + 1]].long()
            pos = (pages[:, None] * P + torch.arange(P)).flatten()
            tokens = rt.layout[b][h, pos[pos < n]]
            want = rt.reference(q, b, h, tokens)
            torch.testing.assert_close(out[b, h * 3 : (h + 1) * 3], want, atol=1e-5, rtol=1e-5)
