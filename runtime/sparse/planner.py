"""SparsePlanner: the runtime-side glue between a model's decode path and one sparse algorithm.

It holds the algorithm's per-layer states and does, per layer, what base.py says the runtime
must do (layers below params.dense_layers skip the algorithm and list every page): after a request's prefill, read its keys back from the pool, index them and apply the
layout permutation the algorithm may return (apply_layout); on every decode step, fold the new
keys in, select, and map the selected logical pages to pool slots through the request's page
table. The model then calls plugins.ops.paged_decode_attention with the returned CSR.

Page tables here are per layer: page_table[l] [KV, n_pages] (one request) or [B, KV, N] (a
batch) of int pool slots, entry = slot of logical page j of (request, kv_head).
"""

from __future__ import annotations

import torch

from .base import PageSelection, SparseAlgorithm, mask_to_selection, num_pages_of, valid_page_mask
from .static_select import (
    Candidates,
    candidates,
    every_page,
    select_static,
    select_static_slots,
)


def read_keys(kv_pool: torch.Tensor, page_slots: torch.Tensor, seq_len: int) -> torch.Tensor:
    """kv_pool [S, 2, P, D], page_slots [KV, n] -> the request's keys [seq_len, KV, D] in layout
    order (token order before any permutation)."""
    k = kv_pool[page_slots.long(), 0]  # [KV, n, P, D]
    KV, n, P, D = k.shape
    return k.reshape(KV, n * P, D)[:, :seq_len].transpose(0, 1)


def apply_layout(kv_pool: torch.Tensor, page_slots: torch.Tensor, perm: torch.Tensor) -> None:
    """Re-lay one layer of one request in place: layout position s of head h receives the K/V
    stored at position perm[h, s]. kv_pool [S, 2, P, D], page_slots [KV, n], perm [KV, L]."""
    slots = page_slots.long()
    pages = kv_pool[slots]  # [KV, n, 2, P, D]
    KV, n, _, P, D = pages.shape
    L = perm.shape[1]
    flat = pages.permute(0, 2, 1, 3, 4).reshape(KV, 2, n * P, D)
    index = perm.to(kv_pool.device)[:, None, :, None].expand(KV, 2, L, D)
    flat[:, :, :L] = flat[:, :, :L].gather(2, index)
    kv_pool[slots] = flat.reshape(KV, 2, n, P, D).permute(0, 2, 1, 3, 4)


def csr_to_page_table(kv_indptr: torch.Tensor, kv_slots: torch.Tensor) -> torch.Tensor:
    """A dense CSR (every page of every row) -> [rows, max_pages] slots, 0 (dummy) padded."""
    counts = (kv_indptr[1:] - kv_indptr[:-1]).long()
    n = int(counts.max()) if counts.numel() else 0
    j = torch.arange(n, device=kv_slots.device)
    has = j[None, :] < counts[:, None]
    flat = (kv_indptr[:-1].long()[:, None] + j[None, :]).clamp(max=max(kv_slots.numel() - 1, 0))
    return torch.where(has, kv_slots.long()[flat], torch.zeros_like(flat))


class SparsePlanner:
    def __init__(
        self,
        algo: SparseAlgorithm,
        num_layers: int,
        max_requests: int,
        device: torch.device | str,
    ) -> None:
        self.algo = algo
        # one spare row past the requests' slots: padding rows of a captured batch index there
        self.spare_row = max_requests
        self.states = [algo.new_state(max_requests + 1, device) for _ in range(num_layers)]

    @property
    def capturable(self) -> bool:
        return self.algo.capturable

    def reserve(self, max_pages: int) -> None:
        """Size every layer's index for max_pages pages per row now (before a graph capture:
        buffers never move afterwards)."""
        for layer, state in enumerate(self.states):
            if not self.is_dense_layer(layer):  # dense layers never index
                self.algo.reserve(state, max_pages)

    def candidates(
        self, req_slots: torch.Tensor, seq_lens: torch.Tensor, max_pages: int
    ) -> Candidates:
        """The step's candidate pages for select_static (req_slots < 0: padding rows)."""
        rows = torch.where(req_slots >= 0, req_slots, self.spare_row)
        return candidates(seq_lens, rows, self.algo.num_kv_heads, self.algo.page_size, max_pages)

    def select_static(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, D] post-RoPE
        keys: torch.Tensor,  # [B, KV, D] the new tokens' keys (already appended)
        cand: Candidates,  # the step's candidates (lengths, positions, index rows)
        budget_tokens: int,
    ) -> tuple[PageSelection, torch.Tensor]:
        """select_logical with static shapes (capturable): (selection, [cap] row of each entry)."""
        if self.is_dense_layer(layer):
            return every_page(cand)
        return select_static(self.algo, self.states[layer], query, cand, budget_tokens, keys)

    def plan_static(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, D] post-RoPE
        keys: torch.Tensor,  # [B, KV, D] the new tokens' keys (already appended)
        cand: Candidates,
        budget_tokens: int,
        page_table: torch.Tensor,  # [B * KV, N] int32 this layer's pool slot of page j
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """select_static mapped through a resident page table (capturable), as plan_decode:
        (kv_indptr, kv_slots, kv_last_page_len) int32; the select kernel writes the slots."""
        if self.is_dense_layer(layer):
            return cand.indptr, cand.table_slots(page_table), cand.last_len
        state = self.states[layer]
        return select_static_slots(self.algo, state, query, cand, budget_tokens, page_table, keys)

    def index_prefill(
        self,
        kv_pool: torch.Tensor,  # [S, 2, P, D]
        req_slot: int,
        page_table: torch.Tensor,  # [num_layers, KV, n_pages] pool slots of the request
        seq_len: int,  # prompt tokens now in the cache
    ) -> None:
        """End of the request's prefill: index every layer, re-lay the pages if asked to."""
        for layer, state in enumerate(self.states):
            if layer < self.algo.params.dense_layers:
                continue
            keys = read_keys(kv_pool, page_table[layer], seq_len)
            perm = self.algo.index_prefill(state, req_slot, keys)
            if perm is not None:
                apply_layout(kv_pool, page_table[layer], perm)

    def is_dense_layer(self, layer: int) -> bool:
        """Layers kept dense (params.dense_layers, as Quest): every page, always resident."""
        return layer < self.algo.params.dense_layers

    def select_logical(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, D] post-RoPE
        keys: torch.Tensor,  # [B, KV, D] post-RoPE keys of the new tokens (already appended)
        req_slots: torch.Tensor,  # [B] int64
        seq_lens: torch.Tensor,  # [B] int64, including the new token
        budget_tokens: int | torch.Tensor | None = None,
    ) -> PageSelection:
        """Fold the new keys into this layer's index and select logical pages per row."""
        if self.is_dense_layer(layer):  # every page of every row
            n = int(num_pages_of(seq_lens, self.algo.page_size).max())
            valid = valid_page_mask(seq_lens, self.algo.page_size, n)
            mask = valid[:, None, :].expand(-1, self.algo.num_kv_heads, -1)
            return mask_to_selection(mask, seq_lens, self.algo.page_size)
        state = self.states[layer]
        self.algo.index_decode(state, req_slots, keys, seq_lens - 1)
        return self.algo.select(state, query, req_slots, seq_lens, budget_tokens)

    def plan_decode(
        self,
        layer: int,
        query: torch.Tensor,
        keys: torch.Tensor,
        req_slots: torch.Tensor,
        seq_lens: torch.Tensor,
        page_table: torch.Tensor,  # [B, KV, N] pool slots of this layer's logical pages
        budget_tokens: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """select_logical mapped through a resident page table -> (kv_indptr [B*KV+1],
        kv_slots [nnz], kv_last_page_len [B*KV]) int32 for plugins.ops.paged_decode_attention."""
        sel = self.select_logical(layer, query, keys, req_slots, seq_lens, budget_tokens)
        return sel.kv_indptr, sel.to_slots(page_table), sel.kv_last_page_len

    def release(self, req_slot: int) -> None:
        for state in self.states:
            self.algo.release(state, req_slot)
