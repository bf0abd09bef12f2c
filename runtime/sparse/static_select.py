"""Capturable page selection: static shapes, device ops only, no host sync (CUDA graphs).

The eager path (SparseAlgorithm.select) sizes its tensors from the batch (the longest context,
nonzero, topk widths), which needs the host. Here every size is fixed by the graph bucket and
the engine's max context: M = max pages per row, C = the per-row page quota.

  Candidates: every page of every row r = b * KV + h as a CSR (capacity R * M), built once per
    step from seq_lens on the device;
  score: the algorithm's candidate_scores (Quest: plugins score_pages on its min/max tables);
  select: plugins select_pages keeps the quota's sink and window pages plus the best-scored
    dynamic pages, in page order (the tail last), as a CSR of capacity R * C.

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
    # table_rows / tail_rows by capacity: computed once per step, shared by every layer
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)
    _tail_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def tail_rows(self, capacity: int) -> torch.Tensor:
        """[B * KV] int32 row of each (request, kv head)'s new-token page in per-page buffers
        [rows, KV, capacity, *] flattened (the decode index update writes there)."""
        if capacity not in self._tail_rows:
            self._tail_rows[capacity] = token_page_rows(
                self.index_rows, self.positions, self.num_kv_heads, capacity, self.page_size
            )
        return self._tail_rows[capacity]

    def table_rows(self, capacity: int) -> torch.Tensor:
        """[R * M] int32 row of each candidate in per-page buffers [rows, KV, capacity, *]
        flattened to [rows * KV * capacity, *]."""
        if capacity not in self._rows:
            KV = self.num_kv_heads
            req = self.index_rows[self.row // KV]
            rows = ((req * KV + self.row % KV) * capacity + self.page).to(torch.int32)
            self._rows[capacity] = rows
        return self._rows[capacity]


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
) -> tuple[PageSelection, torch.Tensor]:
    """(selection with page_ids of capacity R * C, [R * C] int64 row of each entry)."""
    sinks, window, dynamic = algo.page_quota(budget_tokens)
    scores = algo.candidate_scores(state, query, cand)
    indptr, pos = ops.select_pages(scores, cand.indptr, sinks, window, dynamic, cand.max_pages)
    pos = pos.long()
    return PageSelection(indptr, cand.page[pos].to(torch.int32), cand.last_len), cand.row[pos]


def every_page(cand: Candidates) -> tuple[PageSelection, torch.Tensor]:
    """Dense layers: every candidate, (selection, row of each entry)."""
    return PageSelection(cand.indptr, cand.page.to(torch.int32), cand.last_len), cand.row
