"""Quest: page = 16 tokens, index = per-channel min/max of the page's keys, select = top-k pages
by the upper bound of q.k over the page: sum_i max(q_i * min_i, q_i * max_i).

Index data per (request slot, kv_head, page): min and max keys, float32 [D] each; decode tokens
fold into their page's running min/max (a page's first token overwrites stale values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spinserve.plugins import ops

from .base import (
    PageBuffers,
    SparseAlgorithm,
    SparseState,
    group_max_scores,
    register_algorithm,
    token_page_rows,
    topk_page_mask,
    valid_page_mask,
)


def page_reduce(keys: torch.Tensor, page_size: int, how: str) -> torch.Tensor:
    """keys [L, KV, D] -> [KV, ceil(L/P), D] float32 per-page amin / amax / sum over tokens."""
    L, KV, D = keys.shape
    n = (L + page_size - 1) // page_size
    fill = {"amin": float("inf"), "amax": float("-inf"), "sum": 0.0}[how]
    k = F.pad(keys.float(), (0, 0, 0, 0, 0, n * page_size - L), value=fill)
    k = k.view(n, page_size, KV, D)
    red = {"amin": k.amin(1), "amax": k.amax(1), "sum": k.sum(1)}[how]
    return red.transpose(0, 1)


class QuestAlgorithm(SparseAlgorithm):
    name = "quest"
    required_page_size = 16
    capturable = True

    def new_state(self, max_requests: int, device: torch.device | str) -> SparseState:
        buf = PageBuffers(max_requests, self.num_kv_heads, device)
        dt = self.index_dtype
        buf.add("kmin", (self.head_dim,), dt, float("inf"))  # [R, KV, cap, D] key min per page
        buf.add("kmax", (self.head_dim,), dt, float("-inf"))  # [R, KV, cap, D] key max per page
        return SparseState(buf)

    def index_prefill(self, state: SparseState, req_slot: int, keys: torch.Tensor) -> None:
        buf, P = state.buffers, self.page_size
        kmin, kmax = page_reduce(keys, P, "amin"), page_reduce(keys, P, "amax")
        n = kmin.shape[1]
        buf.ensure(n)
        buf["kmin"][req_slot, :, :n] = kmin
        buf["kmax"][req_slot, :, :n] = kmax
        return None

    def index_decode(
        self,
        state: SparseState,
        req_slots: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        buf, D, P = state.buffers, self.head_dim, self.page_size
        buf.ensure(int(positions.max()) // P + 1)  # a host read: the eager path only
        rows = token_page_rows(req_slots, positions, self.num_kv_heads, buf.capacity, P)
        kmin, kmax = buf["kmin"].view(-1, D), buf["kmax"].view(-1, D)
        ops.fold_page_minmax(kmin, kmax, rows, positions % P == 0, keys.contiguous())

    def page_scores(
        self, state: SparseState, query: torch.Tensor, req_slots: torch.Tensor, n: int
    ) -> torch.Tensor:
        """[B, Hq, N] float32: sm_scale * upper bound of q.k over each page, per query head."""
        B, Hq, D = query.shape
        KV = self.num_kv_heads
        kmin = state.buffers["kmin"][req_slots, :, :n].float()  # [B, KV, N, D]
        kmax = state.buffers["kmax"][req_slots, :, :n].float()
        q = query.float().view(B, KV, Hq // KV, D)
        ub = torch.einsum("bkgd,bknd->bkgn", q.clamp(min=0), kmax)
        ub = ub + torch.einsum("bkgd,bknd->bkgn", q.clamp(max=0), kmin)
        return ub.reshape(B, Hq, n) * self.sm_scale

    def index_decode_static(self, state: SparseState, keys: torch.Tensor, cand) -> None:
        buf, D = state.buffers, self.head_dim
        rows = cand.tail_rows(buf.capacity)  # shared by every layer of the step
        kmin, kmax = buf["kmin"].view(-1, D), buf["kmax"].view(-1, D)
        ops.fold_page_minmax(kmin, kmax, rows, cand.fresh, keys.contiguous())

    def candidate_scores(self, state: SparseState, query: torch.Tensor, cand) -> torch.Tensor:
        """The same upper bound (group max, unscaled) from plugins score_pages: capturable."""
        buf, D = state.buffers, self.head_dim
        kmin, kmax = buf["kmin"].view(-1, D), buf["kmax"].view(-1, D)
        rows = cand.table_rows(buf.capacity)
        return ops.score_pages(
            query.contiguous(), cand.indptr, rows, cand.last_len, kmin, kmax, kmin, self.page_size
        )

    def index_score_static(self, state: SparseState, query: torch.Tensor, keys, cand):
        """The fold and the scores in one plugins launch (fold_score_pages): each row's tail
        page is its last candidate, whose table row is the tail row the fold writes."""
        buf, D = state.buffers, self.head_dim
        kmin, kmax = buf["kmin"].view(-1, D), buf["kmax"].view(-1, D)
        rows = cand.table_rows(buf.capacity)
        return ops.fold_score_pages(
            query.contiguous(), cand.indptr, rows, cand.last_len, kmin, kmax, self.page_size,
            keys.contiguous(), cand.fresh,
        )  # fmt: skip

    def _dynamic_mask(
        self,
        state: SparseState,
        query: torch.Tensor,
        req_slots: torch.Tensor,
        seq_lens: torch.Tensor,
        budget_pages: torch.Tensor,
        static: torch.Tensor,
    ) -> torch.Tensor:
        B, N = static.shape
        eligible = (valid_page_mask(seq_lens, self.page_size, N) & ~static)[:, None, :]
        eligible = eligible.expand(B, self.num_kv_heads, N)
        scores = group_max_scores(self.page_scores(state, query, req_slots, N), eligible)
        return topk_page_mask(scores, budget_pages)


register_algorithm("quest", QuestAlgorithm)
