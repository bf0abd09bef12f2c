"""Capturable page selection: static shapes, device ops only, no host sync (CUDA graphs).

The eager path (SparseAlgorithm.select) sizes its tensors from the batch (the longest context,
nonzero, topk widths), which needs the host. Here every size is fixed by the graph bucket and
the engine's max context: M = max pages per row, C = the per-row page quota.

  Candidates: every page of every row r = b * KV + h as a CSR (capacity R * M), built once per
    step from seq_lens on the device;
  score: the algorithm's candidate_scores (Quest: plugins score_pages on its min/max tables);
  select: plugins select_page_ids keeps the quota's sink and window pages plus the best-scored
    dynamic pages, in page order (the tail last), as a CSR of capacity R * C; on the resident
    path select_page_slots writes their pool slots instead, read from the page table by the
    select kernel itself. The CSR's indptr depends on the lengths only: once per step.

Everything that depends only on the step (lengths, rows, the selection's indptr) is computed
once, by the first layer that needs it, and shared: a layer runs the algorithm's index update
and scoring (Quest: one fold_score_pages launch), one select launch, and attention.

The selection equals the eager one (same quota, same full-context rule: a row with no more
pages than the quota keeps them all); only exact score ties may break differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spinserve.plugins import ops

from .base import PageSelection, SparseAlgorithm, SparseState, num_pages_of, token_page_rows


@dataclass(slots=True)
class Candidates:
    """Every page of every row of a decode batch; positions past indptr[-1] are padding."""

    indptr: torch.Tensor  # [R + 1] int32, row r's candidates are positions indptr[r]:indptr[r+1]
    row: torch.Tensor  # [R * M] int64, row of each position (R - 1 past the end)
    page: torch.Tensor  # [R * M] int64, logical page of each position (0 past the end)
    last_len: torch.Tensor  # [R] int32, valid tokens of each row's tail page
    index_rows: torch.Tensor  # [B] int64, rows of the algorithm's per-page buffers
    positions: torch.Tensor  # [B] int64, position of each request's new token
    fresh: torch.Tensor  # [B] bool, the new token opens its page
    num_kv_heads: int
    page_size: int
    max_pages: int  # M
    # per-step values shared by every layer, computed by the first layer that asks:
    # (what, key) -> tensor (table_rows / tail_rows by capacity, sel_indptr by quota, ...)
    _step: dict[tuple[str, object], torch.Tensor] = field(default_factory=dict)

    def per_step(self, what: str, key: object, make) -> torch.Tensor:
        """make() once per step (this object lives one step), shared by every layer."""
        if (what, key) not in self._step:
            self._step[what, key] = make()
        return self._step[what, key]

    def tail_rows(self, capacity: int) -> torch.Tensor:
        """[B * KV] int32 row of each (request, kv head)'s new-token page in per-page buffers
        [rows, KV, capacity, *] flattened (the decode index update writes there)."""
        return self.per_step(
            "tail_rows",
            capacity,
            lambda: token_page_rows(
                self.index_rows, self.positions, self.num_kv_heads, capacity, self.page_size
            ),
        )

    def table_rows(self, capacity: int) -> torch.Tensor:
        """[R * M] int32 row of each candidate in per-page buffers [rows, KV, capacity, *]
        flattened to [rows * KV * capacity, *]."""
        KV = self.num_kv_heads

        def make() -> torch.Tensor:
            req = self.index_rows[self.row // KV]
            return ((req * KV + self.row % KV) * capacity + self.page).to(torch.int32)

        return self.per_step("table_rows", capacity, make)

    def sel_indptr(self, quota: tuple[int, int, int]) -> torch.Tensor:
        """[R + 1] int32 CSR of a selection at page quota (sinks, window, dynamic): row r keeps
        min(its pages, sinks + window + dynamic) pages, whatever the layer's scores."""
        return self.per_step(
            "sel_indptr", quota, lambda: ops.select_indptr(self.indptr, *quota, self.max_pages)
        )

    def sel_rows(self, quota: tuple[int, int, int]) -> torch.Tensor:
        """[R * C] int64 row of each entry of a selection at `quota` (0 past indptr[R])."""

        def make() -> torch.Tensor:
            indptr = self.sel_indptr(quota).long()
            C = _quota_pages(quota, self.max_pages)
            pos = torch.arange((indptr.numel() - 1) * C, device=indptr.device)
            row = torch.searchsorted(indptr[1:], pos, right=True)
            return torch.where(pos < indptr[-1], row, torch.zeros_like(row))

        return self.per_step("sel_rows", quota, make)

    def page_ids(self) -> torch.Tensor:
        """[R * M] int32 logical page of each candidate (every_page's selection)."""
        return self.per_step("page_ids", None, lambda: self.page.to(torch.int32))

    def table_slots(self, page_table: torch.Tensor) -> torch.Tensor:
        """[R * M] int32 pool slot of each candidate: page_table [R, N] (one layer's) looked up
        at every candidate (row, page); one gather per layer, its index once per step."""
        N = page_table.shape[-1]
        flat = self.per_step("table_index", N, lambda: self.row * N + self.page)
        return page_table.reshape(-1)[flat]


def candidates(
    seq_lens: torch.Tensor,  # [B] int64, context length including the new token (>= 1)
    index_rows: torch.Tensor,  # [B] int64, rows of the algorithm's buffers (padding: a spare)
    num_kv_heads: int,
    page_size: int,
    max_pages: int,  # M >= every row's page count
) -> Candidates:
    KV, M = num_kv_heads, max_pages
    R = seq_lens.numel() * KV
    n = num_pages_of(seq_lens.long(), page_size).repeat_interleave(KV)  # [R]
    indptr = torch.zeros(R + 1, dtype=torch.int64, device=seq_lens.device)
    indptr[1:] = n.cumsum(0)
    pos = torch.arange(R * M, device=seq_lens.device)
    row = torch.searchsorted(indptr[1:], pos, right=True).clamp(max=R - 1)
    page = (pos - indptr[row]).clamp(0, M - 1)
    page = torch.where(pos < indptr[-1], page, torch.zeros_like(page))
    last = seq_lens.long() - (num_pages_of(seq_lens.long(), page_size) - 1) * page_size
    positions = seq_lens.long() - 1
    return Candidates(
        indptr.to(torch.int32),
        row,
        page,
        last.repeat_interleave(KV).to(torch.int32),
        index_rows.long(),
        positions,
        positions % page_size == 0,
        KV,
        page_size,
        M,
    )


def select_static(
    algo: SparseAlgorithm,
    state: SparseState,
    query: torch.Tensor,  # [B, Hq, D] post-RoPE
    cand: Candidates,
    budget_tokens: int,
    keys: torch.Tensor | None = None,  # [B, KV, D] new keys: index them first (else indexed)
) -> tuple[PageSelection, torch.Tensor]:
    """(selection with page_ids of capacity R * C, [R * C] int64 row of each entry): ONE select
    launch writes the logical page ids; indptr and rows are the step's (computed once)."""
    quota = algo.page_quota(budget_tokens)
    scores = _scores(algo, state, query, cand, keys)
    indptr = cand.sel_indptr(quota)
    page_ids = ops.select_page_ids(scores, cand.indptr, indptr, *quota, cand.max_pages)
    return PageSelection(indptr, page_ids, cand.last_len), cand.sel_rows(quota)


def select_static_slots(
    algo: SparseAlgorithm,
    state: SparseState,
    query: torch.Tensor,  # [B, Hq, D] post-RoPE
    cand: Candidates,
    budget_tokens: int,
    page_table: torch.Tensor,  # [R, N] int32 this layer's pool slot of row r's page j
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_static through a resident page table, the slots written by the select kernel:
    (kv_indptr [R + 1], kv_slots [R * C] (0 = dummy past indptr[R]), kv_last_page_len [R])."""
    quota = algo.page_quota(budget_tokens)
    scores = _scores(algo, state, query, cand, keys)
    indptr = cand.sel_indptr(quota)
    slots = ops.select_page_slots(scores, cand.indptr, indptr, page_table, *quota, cand.max_pages)
    return indptr, slots, cand.last_len


def _scores(algo, state, query, cand, keys) -> torch.Tensor:
    """The candidates' scores, after folding `keys` into the index when they are given."""
    if keys is None:
        return algo.candidate_scores(state, query, cand)
    return algo.index_score_static(state, query, keys, cand)


def every_page(cand: Candidates) -> tuple[PageSelection, torch.Tensor]:
    """Dense layers: every candidate, (selection, row of each entry)."""
    return PageSelection(cand.indptr, cand.page_ids(), cand.last_len), cand.row


def _quota_pages(quota: tuple[int, int, int], max_pages: int) -> int:
    """C: the capacity per row of a selection at quota (sinks, window, dynamic)."""
    return min(sum(quota), max(1, max_pages))
