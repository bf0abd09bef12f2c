"""Custom ops for sparse selection and page movement: score_pages, select_pages (and its
step-planned form select_page_ids / select_page_slots), gather_pages / scatter_pages
(`torch.ops.spin.score_pages`, `.select_pages`, `.select_entries`, `.copy_pages`). See ops.py.

The host pool: pinned memory mapped for the GPU (UVA), passed as a CPU tensor [S_host, 2, P, D]
whose data_ptr() the GPU can dereference: `torch.empty(..., pin_memory=True)`, or a tensor view
of a cuMemHostAlloc(DEVICEMAP | PORTABLE) allocation (e.g. torch.frombuffer over the mapped
buffer, or torch.from_numpy of a ctypes array at that address). Under UVA the device address of
such memory equals its host address, which is what the kernel dereferences.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import reference as ref
from ._triton_util import next_pow2, use_triton
from .triton_paging import copy_pages_triton
from .triton_select import (
    SELECT_MAX_BLOCK,
    ScoreMode,
    SelectOut,
    score_pages_triton,
    select_entries_torch,
    select_entries_triton,
    select_pages_torch,
    select_pages_triton,
    select_quota,
)
from .triton_select import select_indptr as _select_indptr


def _check_score(
    q,
    page_indptr,
    page_rows,
    last_page_len,
    page_min,
    page_max,
    page_sum,
    page_size: int,
    mode: int,
) -> None:
    op = "score_pages"
    if q.dim() != 3 or q.shape[-1] not in V.SUPPORTED_HEAD_DIMS:
        V._fail(op, f"q must be [B, Hq, D] with D in {V.SUPPORTED_HEAD_DIMS}, got {tuple(q.shape)}")
    if q.dtype not in V.SUPPORTED_DTYPES or not q.is_contiguous():
        V._fail(op, f"q must be contiguous, dtype one of {V.SUPPORTED_DTYPES}")
    if page_size not in V.SUPPORTED_PAGE_SIZES:
        V._fail(op, f"page size {page_size} is not supported; use one of {V.SUPPORTED_PAGE_SIZES}")
    if mode not in tuple(ScoreMode):
        V._fail(op, f"mode {mode} is not one of {[m.name for m in ScoreMode]}")
    num_kv_heads = V.num_kv_heads_of(op, page_indptr, q.shape[0])
    V.check_heads(op, q.shape[1], num_kv_heads)
    V.check_csr(op, page_indptr, page_rows, last_page_len, q.shape[0] * num_kv_heads, q.device)
    for name, t in (("page_min", page_min), ("page_max", page_max), ("page_sum", page_sum)):
        if t.dtype not in V.SUPPORTED_DTYPES or t.dim() != 2 or t.shape[1] != q.shape[2]:
            V._fail(op, f"{name} must be [N, head_dim] of {V.SUPPORTED_DTYPES}, got {t.dtype}")
        if t.device != q.device or not t.is_contiguous():
            V._fail(op, f"{name} must be contiguous on {q.device}")


@torch.library.custom_op("spin::score_pages", mutates_args=())
def _score_op(
    q: torch.Tensor,
    page_indptr: torch.Tensor,
    page_rows: torch.Tensor,
    last_page_len: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    page_sum: torch.Tensor,
    page_size: int,
    mode: int,
) -> torch.Tensor:
    args = (q, page_indptr, page_rows, last_page_len, page_min, page_max, page_sum, page_size, mode)
    _check_score(*args)
    return (score_pages_triton if use_triton(q) else ref.score_pages_ref)(*args)


@_score_op.register_fake
def _(q, page_indptr, page_rows, last_page_len, page_min, page_max, page_sum, page_size, mode):
    _check_score(
        q, page_indptr, page_rows, last_page_len, page_min, page_max, page_sum, page_size, mode
    )
    return q.new_empty(page_rows.shape, dtype=torch.float32)


def score_pages(
    q: torch.Tensor,  # [B, Hq, D]
    page_indptr: torch.Tensor,  # [B * KV + 1] int32: candidate pages per (request, kv head)
    page_rows: torch.Tensor,  # [nnz] int32: summary-table row of each candidate page
    last_page_len: torch.Tensor,  # [B * KV] int32: valid tokens of each row's last page
    page_min: torch.Tensor,  # [N, D] float32 / bf16 / fp16 (append_kv's tables)
    page_max: torch.Tensor,  # [N, D] float32
    page_sum: torch.Tensor,  # [N, D] float32
    page_size: int,
    mode: ScoreMode = ScoreMode.QUEST,
) -> torch.Tensor:  # [nnz] float32: score of each candidate for its row's GQA group
    """Quest upper bound or landmark (mean-key) score of every candidate page."""
    return torch.ops.spin.score_pages(
        q, page_indptr, page_rows, last_page_len, page_min, page_max, page_sum, page_size, int(mode)
    )


def _check_fold_score(
    q, page_indptr, page_rows, last_page_len, page_min, page_max, page_size: int, keys, fresh
) -> None:
    args = (q, page_indptr, page_rows, last_page_len, page_min, page_max, page_min, page_size)
    _check_score(*args, int(ScoreMode.QUEST))
    op = "fold_score_pages"
    R = page_indptr.numel() - 1
    if keys.dim() != 3 or keys.shape[0] * keys.shape[1] != R or keys.shape[2] != q.shape[2]:
        V._fail(op, f"keys must be [B, KV, D] with B * KV = {R} rows, got {tuple(keys.shape)}")
    if keys.dtype not in V.SUPPORTED_DTYPES or not keys.is_contiguous() or keys.device != q.device:
        V._fail(op, f"keys must be contiguous on {q.device}, dtype one of {V.SUPPORTED_DTYPES}")
    if fresh.shape != (keys.shape[0],) or fresh.dtype != torch.bool or fresh.device != q.device:
        V._fail(op, f"fresh must be [{keys.shape[0]}] bool on {q.device}")
    if page_min.dtype != page_max.dtype:
        V._fail(op, "page_min and page_max must share a dtype")


@torch.library.custom_op("spin::fold_score_pages", mutates_args=("page_min", "page_max"))
def _fold_score_op(
    q: torch.Tensor,
    page_indptr: torch.Tensor,
    page_rows: torch.Tensor,
    last_page_len: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    page_size: int,
    keys: torch.Tensor,
    fresh: torch.Tensor,
) -> torch.Tensor:
    args = (q, page_indptr, page_rows, last_page_len, page_min, page_max, page_size, keys, fresh)
    _check_fold_score(*args)
    if not use_triton(q):
        return ref.fold_score_pages_ref(*args)
    score_args = (q, page_indptr, page_rows, last_page_len, page_min, page_max, page_min)
    mode = int(ScoreMode.QUEST)
    return score_pages_triton(*score_args, page_size, mode, None, keys, fresh)


@_fold_score_op.register_fake
def _(q, page_indptr, page_rows, last_page_len, page_min, page_max, page_size, keys, fresh):
    _check_fold_score(
        q, page_indptr, page_rows, last_page_len, page_min, page_max, page_size, keys, fresh
    )
    return q.new_empty(page_rows.shape, dtype=torch.float32)


def fold_score_pages(
    q: torch.Tensor,  # [B, Hq, D]
    page_indptr: torch.Tensor,  # [B * KV + 1] int32: candidate pages per (request, kv head)
    page_rows: torch.Tensor,  # [nnz] int32: min / max table row of each candidate page
    last_page_len: torch.Tensor,  # [B * KV] int32
    page_min: torch.Tensor,  # [N, D] Quest key minimum per page: the tail pages updated
    page_max: torch.Tensor,  # [N, D] Quest key maximum per page: the tail pages updated
    page_size: int,
    keys: torch.Tensor,  # [B, KV, D] the new token's key of each row, appended to its LAST page
    fresh: torch.Tensor,  # [B] bool: the token opens its page (its min / max restart)
) -> torch.Tensor:  # [nnz] float32: Quest scores after the fold
    """fold_page_minmax (into each row's last listed page) then score_pages (Quest) in ONE
    launch on CUDA: the decode step's index update and scoring of one layer."""
    return torch.ops.spin.fold_score_pages(
        q, page_indptr, page_rows, last_page_len, page_min, page_max, page_size, keys, fresh
    )


@torch.library.custom_op("spin::select_pages", mutates_args=())
def _select_op(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (scores, page_indptr, num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    if use_triton(scores) and next_pow2(max_pages_per_row) <= SELECT_MAX_BLOCK:
        return select_pages_triton(*args)
    return select_pages_torch(*args)


@_select_op.register_fake
def _(scores, page_indptr, num_sink_pages, num_window_pages, budget_pages, max_pages_per_row):
    rows = page_indptr.shape[0] - 1
    cap = min(num_sink_pages + num_window_pages + budget_pages, max(1, max_pages_per_row))
    return (page_indptr.new_empty(rows + 1), page_indptr.new_empty(rows * cap))


def select_pages(
    scores: torch.Tensor,  # [nnz] float32: score_pages' output
    page_indptr: torch.Tensor,  # [R + 1] int32: the scored CSR
    num_sink_pages: int,  # first pages of each row, always kept
    num_window_pages: int,  # last pages of each row (the partial tail included), always kept
    budget_pages: int,  # best-scored other pages kept per row
    max_pages_per_row: int,  # static bound on any row's page count (sizes the top-k)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k pages per row within the budget plus static pages, in token order, as a CSR of
    positions into the scored list: (sel_indptr [R + 1] int32, sel_pos [R * C] int32), with
    C = min(sinks + window + budget, max_pages_per_row). kv_slots for sparse_decode_attention
    are then page_slots[sel_pos]; the last page length stays the row's. No host sync."""
    if num_window_pages < 1:
        V._fail("select_pages", "num_window_pages must be >= 1 (the partial tail page)")
    if scores.dtype != torch.float32 or scores.device != page_indptr.device:
        V._fail("select_pages", "scores must be float32 on the page_indptr device")
    V.check_index("select_pages", "page_indptr", page_indptr, scores.device)
    return torch.ops.spin.select_pages(
        scores, page_indptr, num_sink_pages, num_window_pages, budget_pages, max_pages_per_row
    )


def select_indptr(
    page_indptr: torch.Tensor,  # [R + 1] int32: the scored CSR
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> torch.Tensor:  # [R + 1] int32
    """The CSR select_page_ids / select_page_slots fill: row r keeps min(its pages, C) pages,
    C = min(sinks + window + budget, max_pages_per_row). It depends on the rows' lengths only:
    compute it once per decode step and pass it to every layer's select (a few torch ops)."""
    V.check_index("select_indptr", "page_indptr", page_indptr, page_indptr.device)
    quota = select_quota(num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    return _select_indptr(page_indptr, quota)


def _check_entries(scores, page_indptr, sel_indptr, page_table, num_window_pages: int) -> None:
    op = "select_entries"
    if num_window_pages < 1:
        V._fail(op, "num_window_pages must be >= 1 (the partial tail page)")
    if scores.dtype != torch.float32 or scores.device != page_indptr.device:
        V._fail(op, "scores must be float32 on the page_indptr device")
    V.check_index(op, "page_indptr", page_indptr, scores.device)
    V.check_index(op, "sel_indptr", sel_indptr, scores.device)
    if sel_indptr.shape != page_indptr.shape:
        V._fail(op, "sel_indptr must be select_indptr(page_indptr, ...): [R + 1] int32")
    if page_table is not None:
        V.check_index(op, "page_table", page_table, scores.device, dims=2)
        if page_table.shape[0] != page_indptr.numel() - 1:
            V._fail(op, f"page_table must be [R, N] with R = {page_indptr.numel() - 1} rows")


@torch.library.custom_op("spin::select_entries", mutates_args=())
def _select_entries_op(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    sel_indptr: torch.Tensor,
    page_table: torch.Tensor | None,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
    out: int,
) -> torch.Tensor:
    _check_entries(scores, page_indptr, sel_indptr, page_table, num_window_pages)
    args = (num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    if use_triton(scores) and next_pow2(max_pages_per_row) <= SELECT_MAX_BLOCK:
        fn = select_entries_triton
    else:
        fn = select_entries_torch
    return fn(scores, page_indptr, sel_indptr, *args, SelectOut(out), page_table)


@_select_entries_op.register_fake
def _(scores, page_indptr, sel_indptr, page_table, sinks, window, budget, max_pages, out):
    _check_entries(scores, page_indptr, sel_indptr, page_table, window)
    cap = select_quota(sinks, window, budget, max_pages)
    return page_indptr.new_empty((page_indptr.shape[0] - 1) * cap)


def select_page_ids(
    scores: torch.Tensor,  # [nnz] float32: score_pages' output
    page_indptr: torch.Tensor,  # [R + 1] int32: the scored CSR, row r = pages 0..n_r - 1
    sel_indptr: torch.Tensor,  # [R + 1] int32: select_indptr(page_indptr, ...) (same args)
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> torch.Tensor:  # [R * C] int32
    """select_pages' choice written as page indices within each row (the logical page ids when
    row r scores its pages 0..n_r - 1 in order) at sel_indptr's positions, ascending per row;
    entries past sel_indptr[R] are 0. One launch on CUDA, no host sync."""
    return torch.ops.spin.select_entries(
        scores, page_indptr, sel_indptr, None, num_sink_pages, num_window_pages, budget_pages,
        max_pages_per_row, int(SelectOut.PAGE),
    )  # fmt: skip


def select_page_slots(
    scores: torch.Tensor,  # [nnz] float32: score_pages' output
    page_indptr: torch.Tensor,  # [R + 1] int32: the scored CSR, row r = pages 0..n_r - 1
    sel_indptr: torch.Tensor,  # [R + 1] int32: select_indptr(page_indptr, ...) (same args)
    page_table: torch.Tensor,  # [R, N >= n_r] int32: pool slot of row r's page j
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> torch.Tensor:  # [R * C] int32: kv_slots for sparse_decode_attention (indptr: sel_indptr)
    """select_page_ids mapped through the page table by the select kernel itself: the pool
    slots of the selected pages; entries past sel_indptr[R] are 0 (the dummy slot)."""
    return torch.ops.spin.select_entries(
        scores, page_indptr, sel_indptr, page_table, num_sink_pages, num_window_pages,
        budget_pages, max_pages_per_row, int(SelectOut.SLOT),
    )  # fmt: skip


def _check_copy(src, dst, src_slots, dst_slots, num_pages, real: bool) -> None:
    op = "gather_pages/scatter_pages"
    V.check_pool(op, src)
    V.check_pool(op, dst)
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        V._fail(
            op,
            f"pools differ: {src.dtype} {tuple(src.shape)} vs {dst.dtype} "
            f"{tuple(dst.shape)}; both must be [S, 2, P, D] of one dtype",
        )
    dev = dst.device if dst.is_cuda else src.device
    for name, t in (("src_slots", src_slots), ("dst_slots", dst_slots), ("num_pages", num_pages)):
        V.check_index(op, name, t, dev)
    if src_slots.numel() != dst_slots.numel():
        V._fail(op, "src_slots and dst_slots must have the same capacity")
    if real and dev.type == "cuda":
        for name, t in (("src", src), ("dst", dst)):
            if not t.is_cuda and not t.is_pinned():
                V._fail(
                    op,
                    f"{name} pool is pageable CPU memory; the GPU reads only CUDA tensors "
                    "or pinned, mapped host memory (pin_memory=True / cuMemHostAlloc)",
                )


@torch.library.custom_op("spin::copy_pages", mutates_args=("dst",))
def _copy_op(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    num_pages: torch.Tensor,
) -> None:
    _check_copy(src, dst, src_slots, dst_slots, num_pages, real=True)
    if src.is_cuda or dst.is_cuda or use_triton(dst):
        copy_pages_triton(src, dst, src_slots, dst_slots, num_pages)
    else:
        ref.copy_pages_ref(src, dst, src_slots, dst_slots, num_pages)


@_copy_op.register_fake
def _(src, dst, src_slots, dst_slots, num_pages) -> None:
    _check_copy(src, dst, src_slots, dst_slots, num_pages, real=False)


def gather_pages(
    host_pool: torch.Tensor,  # [S_host, 2, P, D]: pinned, mapped host memory (module doc)
    hbm_pool: torch.Tensor,  # [S_hbm, 2, P, D] CUDA: written in place
    host_slots: torch.Tensor,  # [capacity] int32 (on hbm_pool's device)
    hbm_slots: torch.Tensor,  # [capacity] int32
    num_pages: torch.Tensor,  # [1] int32: pages to move now; the grid covers the capacity
) -> None:
    """hbm_pool[hbm_slots[i]] = host_pool[host_slots[i]] for i < num_pages: one launch."""
    torch.ops.spin.copy_pages(host_pool, hbm_pool, host_slots, hbm_slots, num_pages)


def scatter_pages(
    hbm_pool: torch.Tensor,  # [S_hbm, 2, P, D] CUDA
    host_pool: torch.Tensor,  # [S_host, 2, P, D]: pinned, mapped host memory, written in place
    hbm_slots: torch.Tensor,  # [capacity] int32
    host_slots: torch.Tensor,  # [capacity] int32
    num_pages: torch.Tensor,  # [1] int32
) -> None:
    """host_pool[host_slots[i]] = hbm_pool[hbm_slots[i]] for i < num_pages: one launch."""
    torch.ops.spin.copy_pages(hbm_pool, host_pool, hbm_slots, host_slots, num_pages)
