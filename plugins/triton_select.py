"""Page scoring and top-k page selection in Triton (torch fallback for select) for sparse decode.

score_pages: for every page listed in a row's CSR (row = request * kv_head), a score for the
row's GQA group of queries, the maximum over the group's heads of
    QUEST:    sum_d max(q_d * min_d, q_d * max_d)  (upper bound of q . k over the page's keys)
    LANDMARK: q . (key_sum / valid_tokens)          (dot with the page's mean key)
The summaries come from append_kv's tables, looked up through `page_rows`.
select_pages: per row, the static pages (first `num_sink_pages`, last `num_window_pages`, the
partial tail included) plus the `budget_pages` best-scored others, returned as a CSR of
positions into the scored list, in token order, so the tail page stays last.
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
    num_kv_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_PROGS: tl.constexpr,
):
    row = tl.program_id(0)
    prog = tl.program_id(1)
    start = tl.load(indptr_ptr + row)
    num_pages = tl.load(indptr_ptr + row + 1) - start
    last_len = tl.load(last_len_ptr + row).to(tl.float32)
    d = tl.arange(0, HEAD_DIM)
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
) -> torch.Tensor:
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
        num_kv_heads,
        GROUP=Hq // num_kv_heads,
        HEAD_DIM=D,
        PAGE=page_size,
        MODE=int(mode),
        BLOCK_P=cfg.block_pages,
        NUM_PROGS=nprog,
        num_warps=cfg.num_warps,
    )
    return out


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
    dev = scores.device
    R = page_indptr.numel() - 1
    M = max(1, int(max_pages_per_row))
    C = min(num_sink_pages + num_window_pages + budget_pages, M)
    starts = page_indptr[:-1].long()
    counts = (page_indptr[1:] - page_indptr[:-1]).long()  # [R]
    j = torch.arange(M, device=dev)
    valid = j[None, :] < counts[:, None]  # [R, M]
    flat = (starts[:, None] + j[None, :]).clamp(max=max(scores.numel() - 1, 0))
    # python scalars, not torch.tensor(...): no host-to-device copy inside graph capture
    dense = torch.where(valid, scores[flat] if scores.numel() else flat.float(), float("-inf"))
    static = valid & (
        (j[None, :] < num_sink_pages) | (j[None, :] >= counts[:, None] - num_window_pages)
    )
    dense = dense.masked_fill(static, float("inf"))
    # a stable descending sort, not topk: equal scores go to the lower page (as the kernel)
    top_val, top_j = dense.sort(dim=1, descending=True, stable=True)
    top_val, top_j = top_val[:, :C], top_j[:, :C]
    taken = top_val > float("-inf")
    top_j = torch.where(taken, top_j, torch.full_like(top_j, M)).sort(dim=1).values
    sel_count = counts.clamp(max=C)  # [R]
    sel_indptr = torch.zeros(R + 1, dtype=torch.int64, device=dev)
    sel_indptr[1:] = torch.cumsum(sel_count, 0)
    rank = torch.arange(C, device=dev)[None, :]
    keep = rank < sel_count[:, None]
    dest = torch.where(keep, sel_indptr[:-1, None] + rank, torch.full_like(rank, R * C))
    sel_pos = torch.zeros(R * C + 1, dtype=torch.int32, device=dev)
    sel_pos.scatter_(0, dest.reshape(-1), (starts[:, None] + top_j).to(torch.int32).reshape(-1))
    return sel_indptr.to(torch.int32), sel_pos[: R * C]


SELECT_MAX_BLOCK = 16384  # pages per row one select program holds; longer rows use torch


def _select_kernel(
    scores_ptr,
    indptr_ptr,
    out_indptr_ptr,
    sel_pos_ptr,
    SINK: tl.constexpr,
    WINDOW: tl.constexpr,
    BUDGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: the BUDGET-th largest candidate score is found by bisection over
    order-preserving int32 keys (32 counting passes over the row held in registers); pages above
    it, ties in index order, and the static pages are written in ascending order. (A radix
    select with 4 tl.histogram passes measured slower on the H100: 101 us vs 66 us for 256 rows
    of 8192 pages, perf/results/kernels_sparse_55c18d7.json.)"""
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
    out = tl.load(out_indptr_ptr + r) + rank
    tl.store(sel_pos_ptr + out, start + j, mask=sel)


select_kernel = lazy_jit(_select_kernel)


def select_pages_triton(
    scores: torch.Tensor,
    page_indptr: torch.Tensor,
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
    max_pages_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as select_pages_torch, one launch (rows up to SELECT_MAX_BLOCK pages)."""
    R = page_indptr.numel() - 1
    C = min(num_sink_pages + num_window_pages + budget_pages, max(1, max_pages_per_row))
    counts = (page_indptr[1:] - page_indptr[:-1]).clamp(max=C)
    sel_indptr = torch.zeros(R + 1, dtype=torch.int32, device=scores.device)
    sel_indptr[1:] = torch.cumsum(counts, 0)
    sel_pos = torch.zeros(R * C, dtype=torch.int32, device=scores.device)
    if R == 0:
        return sel_indptr, sel_pos
    block = max(16, next_pow2(max_pages_per_row))
    select_kernel[(R,)](
        scores,
        page_indptr,
        sel_indptr,
        sel_pos,
        SINK=num_sink_pages,
        WINDOW=num_window_pages,
        BUDGET=budget_pages,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return sel_indptr, sel_pos
