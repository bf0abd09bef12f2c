"""Page scoring and top-k page selection in Triton (torch fallback for select) for sparse decode.

score_pages: for every page listed in a row's CSR (row = request * kv_head), a score for the
row's GQA group of queries, the maximum over the group's heads of
    QUEST:    sum_d max(q_d * min_d, q_d * max_d)  (upper bound of q . k over the page's keys)
    LANDMARK: q . (key_sum / valid_tokens)          (dot with the page's mean key)
The summaries come from append_kv's tables, looked up through `page_rows`.
select: per row, the static pages (first `num_sink_pages`, last `num_window_pages`, the
partial tail included) plus the `budget_pages` best-scored others, in token order (the tail page
stays last), as a CSR whose values are positions into the scored list, the pages' indices in
their rows, or their pool slots read from a page table (SelectOut). Its indptr depends on the
rows' lengths only (select_indptr): the capturable decode path computes it once per step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ._triton_util import lazy_jit, next_pow2, num_sms

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


class ScoreMode(enum.IntEnum):
    QUEST = 0
    LANDMARK = 1


def _score_kernel(
    q_ptr,
    indptr_ptr,
    rows_ptr,
    last_len_ptr,
    min_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    keys_ptr,
    fresh_ptr,
    num_kv_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_PROGS: tl.constexpr,
    FOLD: tl.constexpr,
):
    """Program (row, prog) scores the row's blocks prog, prog + NUM_PROGS, ... With FOLD, the
    program owning the row's last page first folds the row's new key (keys [R, D]) into that
    page's min / max (fresh [R // num_kv_heads]: restart from the key), then scores: as
    fold_page_minmax followed by score_pages, in one launch."""
    row = tl.program_id(0)
    prog = tl.program_id(1)
    start = tl.load(indptr_ptr + row)
    num_pages = tl.load(indptr_ptr + row + 1) - start
    last_len = tl.load(last_len_ptr + row).to(tl.float32)
    d = tl.arange(0, HEAD_DIM)
    if FOLD:
        if (num_pages > 0) & (((num_pages - 1) // BLOCK_P) % NUM_PROGS == prog):
            tail = tl.load(rows_ptr + start + num_pages - 1).to(tl.int64) * HEAD_DIM
            key = tl.load(keys_ptr + row.to(tl.int64) * HEAD_DIM + d)
            fresh = tl.load(fresh_ptr + row // num_kv_heads) != 0
            mn = tl.load(min_ptr + tail + d)
            mx = tl.load(max_ptr + tail + d)
            key = key.to(mn.dtype)
            tl.store(min_ptr + tail + d, tl.where(fresh, key, tl.minimum(mn, key)))
            tl.store(max_ptr + tail + d, tl.where(fresh, key, tl.maximum(mx, key)))
        tl.debug_barrier()  # the block that scores the tail page reads the folded values
    q_base = (row * GROUP).to(tl.int64) * HEAD_DIM  # q rows (b, kvh*G + g) are row*G + g
    for j0 in range(prog * BLOCK_P, num_pages, NUM_PROGS * BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        ok = j < num_pages
        srow = tl.load(rows_ptr + start + j, mask=ok, other=0).to(tl.int64) * HEAD_DIM
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        if MODE == 0:
            mn = tl.load(min_ptr + srow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            mn = mn.to(tl.float32)
            mx = tl.load(max_ptr + srow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            mx = mx.to(tl.float32)
            for g in tl.static_range(GROUP):
                qg = tl.load(q_ptr + q_base + g * HEAD_DIM + d).to(tl.float32)[None, :]
                best = tl.maximum(best, tl.sum(tl.maximum(qg * mn, qg * mx), 1))
        else:
            count = tl.where(j == num_pages - 1, last_len, PAGE * 1.0)
            mean = tl.load(sum_ptr + srow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            mean = mean.to(tl.float32) / count[:, None]
            for g in tl.static_range(GROUP):
                qg = tl.load(q_ptr + q_base + g * HEAD_DIM + d).to(tl.float32)[None, :]
                best = tl.maximum(best, tl.sum(qg * mean, 1))
        tl.store(out_ptr + start + j, best, mask=ok)


score_kernel = lazy_jit(_score_kernel)


@dataclass(frozen=True)
class ScoreConfig:
    block_pages: int  # pages scored per loop step
    programs_per_sm: int  # grid = rows x (programs_per_sm * SMs / rows), each strides its row
    num_warps: int


# best of the H100 score sweeps (perf/results/kernels_sparse*.json), within 3% of the others
DEFAULT_SCORE_CONFIG = ScoreConfig(block_pages=64, programs_per_sm=4, num_warps=8)


def score_pages_triton(
    q: torch.Tensor,
    page_indptr: torch.Tensor,
    page_rows: torch.Tensor,
    last_page_len: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    page_sum: torch.Tensor,
    page_size: int,
    mode: int,
    config: ScoreConfig | None = None,
    fold_keys: torch.Tensor | None = None,
    fold_fresh: torch.Tensor | None = None,
) -> torch.Tensor:
    """score_pages; with fold_keys [B, KV, D] and fold_fresh [B] bool, first fold each row's
    key into its last page's page_min / page_max (in place), in the same launch."""
    cfg = config or DEFAULT_SCORE_CONFIG
    B, Hq, D = q.shape
    rows = page_indptr.numel() - 1
    num_kv_heads = rows // B
    out = torch.empty(page_rows.numel(), dtype=torch.float32, device=q.device)
    if rows == 0 or page_rows.numel() == 0:
        return out
    avg_blocks = -(-page_rows.numel() // (rows * cfg.block_pages))
    nprog = max(1, min(avg_blocks, -(-cfg.programs_per_sm * num_sms(q.device) // rows)))
    nprog = next_pow2(nprog)
    score_kernel[(rows, nprog)](
        q,
        page_indptr,
        page_rows,
        last_page_len,
        page_min,
        page_max,
        page_sum,
        out,
        fold_keys if fold_keys is not None else q,
        fold_fresh if fold_fresh is not None else page_indptr,
        num_kv_heads,
        GROUP=Hq // num_kv_heads,
        HEAD_DIM=D,
        PAGE=page_size,
        MODE=int(mode),
        BLOCK_P=cfg.block_pages,
        NUM_PROGS=nprog,
        FOLD=fold_keys is not None,
        num_warps=cfg.num_warps,
    )
    return out


class SelectOut(enum.IntEnum):
    """What select writes for each selected page (the CSR's values)."""

    POSITION = 0  # absolute position in the scored list: page_indptr[r] + j
    PAGE = 1  # index j within its row: the logical page id when row r lists pages 0..n-1
    SLOT = 2  # page_table[r, j]: the page's pool slot, read from the row's table


def select_quota(sinks: int, window: int, budget: int, max_pages_per_row: int) -> int:
    """C: the most pages one row keeps (sinks + window + budget, capped by the row length)."""
    return min(sinks + window + budget, max(1, int(max_pages_per_row)))


def select_indptr(page_indptr: torch.Tensor, quota: int) -> torch.Tensor:
    """[R + 1] int32 CSR of the selection: row r keeps min(its page count, quota) pages. It
    depends on the rows' lengths only, so one step computes it once for every layer."""
    counts = (page_indptr[1:] - page_indptr[:-1]).clamp(max=quota)
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=page_indptr.device)
    out[1:] = torch.cumsum(counts, 0)
    return out


def _top_columns_torch(
    scores: torch.Tensor, page_indptr: torch.Tensor, sinks: int, window: int, budget: int, M: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [R, C] int64: selected j per row, ascending, M past the row's count;
    keep [R, C] bool: the column is a selected page)."""
    dev = scores.device
    C = select_quota(sinks, window, budget, M)
    M = max(1, int(M))
    starts = page_indptr[:-1].long()
    counts = (page_indptr[1:] - page_indptr[:-1]).long()  # [R]
    j = torch.arange(M, device=dev)
    valid = j[None, :] < counts[:, None]  # [R, M]
    flat = (starts[:, None] + j[None, :]).clamp(max=max(scores.numel() - 1, 0))
    # python scalars, not torch.tensor(...): no host-to-device copy inside graph capture
    dense = torch.where(valid, scores[flat] if scores.numel() else flat.float(), float("-inf"))
    static = valid & ((j[None, :] < sinks) | (j[None, :] >= counts[:, None] - window))
    dense = dense.masked_fill(static, float("inf"))
    # a stable descending sort, not topk: equal scores go to the lower page (as the kernel)
    top_val, top_j = dense.sort(dim=1, descending=True, stable=True)
    top_val, top_j = top_val[:, :C], top_j[:, :C]
    taken = top_val > float("-inf")
    top_j = torch.where(taken, top_j, torch.full_like(top_j, M)).sort(dim=1).values
    rank = torch.arange(C, device=dev)[None, :]
    return top_j, rank < counts.clamp(max=C)[:, None]


def select_entries_torch(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    sel_indptr: torch.Tensor,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
    out: SelectOut,
    page_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selection's values [R * C] int32 (`out` says which, SelectOut), at the positions
    sel_indptr (= select_indptr(page_indptr, C)) gives; entries past sel_indptr[R] are 0.
    Device ops only (no host sync)."""
    args = (num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    top_j, keep = _top_columns_torch(scores, page_indptr, *args)
    R, C = top_j.shape
    cols = torch.where(keep, top_j, torch.zeros_like(top_j))
    if out == SelectOut.POSITION:
        value = page_indptr[:-1].long()[:, None] + cols
    elif out == SelectOut.PAGE:
        value = cols
    else:
        value = page_table[torch.arange(R, device=cols.device)[:, None], cols]
    rank = torch.arange(C, device=scores.device)[None, :]
    dest = torch.where(keep, sel_indptr[:-1].long()[:, None] + rank, R * C)
    entries = torch.zeros(R * C + 1, dtype=torch.int32, device=scores.device)
    entries.scatter_(0, dest.reshape(-1), value.to(torch.int32).reshape(-1))
    return entries[: R * C]


def select_pages_torch(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection with static pages kept; device ops only (no host sync).

    Returns (sel_indptr [R + 1] int32, sel_pos [R * C] int32) with C = sinks + window + budget:
    row r's selected pages are sel_pos[sel_indptr[r]:sel_indptr[r + 1]], absolute positions into
    the scored CSR list, ascending; entries past sel_indptr[R] are 0 (padding).
    """
    args = (num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    sel_indptr = select_indptr(page_indptr, select_quota(*args))
    pos = select_entries_torch(scores, page_indptr, sel_indptr, *args, SelectOut.POSITION)
    return sel_indptr, pos


SELECT_MAX_BLOCK = 16384  # pages per row one select program holds; longer rows use torch


def _select_kernel(
    scores_ptr,
    indptr_ptr,
    sel_indptr_ptr,
    out_ptr,
    table_ptr,
    table_stride,
    capacity,
    SINK: tl.constexpr,
    WINDOW: tl.constexpr,
    BUDGET: tl.constexpr,
    BLOCK: tl.constexpr,
    OUT: tl.constexpr,
    PAD_BLOCK: tl.constexpr,
):
    """One program per row: the BUDGET-th largest candidate score is found by bisection over
    order-preserving int32 keys (32 counting passes over the row held in registers); pages above
    it, ties in index order, and the static pages are written in ascending order, as OUT says
    (SelectOut: position, page index, or the row's page-table entry). Program r also zeroes
    out[total + r * PAD_BLOCK:][:PAD_BLOCK] below `capacity` (total = sel_indptr[R]), so the
    padding is written without a separate fill. (A radix select with 4 tl.histogram passes
    measured slower on the H100: 101 us vs 66 us for 256 rows of 8192 pages,
    perf/results/kernels_sparse_55c18d7.json.)"""
    r = tl.program_id(0)
    start = tl.load(indptr_ptr + r)
    n = tl.load(indptr_ptr + r + 1) - start
    j = tl.arange(0, BLOCK)
    valid = j < n
    static = valid & ((j < SINK) | (j >= n - WINDOW))
    cand = valid & ~static
    s = tl.load(scores_ptr + start + j, mask=cand, other=0.0) + 0.0  # -0.0 -> +0.0: one tie
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(cand, bits ^ ((bits >> 31) & 0x7FFFFFFF), -2147483648).to(tl.int64)
    lo = tl.full([], -2147483648, tl.int64)  # invariant: count(key >= lo) >= BUDGET
    hi = tl.full([], 2147483647, tl.int64)
    num_cand = tl.sum(cand.to(tl.int32), 0)
    if num_cand > BUDGET:
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((key >= mid).to(tl.int32), 0) >= BUDGET
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        above = cand & (key > lo)
        ties = cand & (key == lo)
        need = BUDGET - tl.sum(above.to(tl.int32), 0)
        take = above | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= need))
    else:
        take = cand
    sel = static | take
    rank = tl.cumsum(sel.to(tl.int32), 0) - 1
    dst = tl.load(sel_indptr_ptr + r) + rank
    if OUT == 0:
        value = start + j
    elif OUT == 1:
        value = j
    else:
        value = tl.load(table_ptr + r.to(tl.int64) * table_stride + j, mask=sel, other=0)
    tl.store(out_ptr + dst, value, mask=sel)
    pad = tl.load(sel_indptr_ptr + tl.num_programs(0)) + r * PAD_BLOCK + tl.arange(0, PAD_BLOCK)
    tl.store(out_ptr + pad, tl.zeros([PAD_BLOCK], tl.int32), mask=pad < capacity)


select_kernel = lazy_jit(_select_kernel)


def select_entries_triton(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    sel_indptr: torch.Tensor,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
    out: SelectOut,
    page_table: torch.Tensor | None = None,
    entries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as select_entries_torch, one launch (rows up to SELECT_MAX_BLOCK pages);
    `entries` ([R * C] int32, every element written) may be given (tests poison it)."""
    R = page_indptr.numel() - 1
    args = (num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    C = select_quota(*args)
    if entries is None:
        entries = torch.empty(R * C, dtype=torch.int32, device=scores.device)
    if R == 0:
        return entries
    block = max(16, next_pow2(max_pages_per_row))
    table = page_table if page_table is not None else sel_indptr  # unread unless SLOT
    select_kernel[(R,)](
        scores,
        page_indptr,
        sel_indptr,
        entries,
        table,
        table.stride(0),
        R * C,
        SINK=num_sink_pages,
        WINDOW=num_window_pages,
        BUDGET=budget_pages,
        BLOCK=block,
        OUT=int(out),
        PAD_BLOCK=max(16, next_pow2(C)),
        num_warps=8 if block >= 4096 else 4,
    )
    return entries


def select_pages_triton(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as select_pages_torch: select_indptr + one launch."""
    args = (num_sink_pages, num_window_pages, budget_pages, max_pages_per_row)
    sel_indptr = select_indptr(page_indptr, select_quota(*args))
    pos = select_entries_triton(scores, page_indptr, sel_indptr, *args, SelectOut.POSITION)
    return sel_indptr, pos
