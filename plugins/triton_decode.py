"""Paged decode attention in Triton: split-KV (flash-decoding) over CSR page lists.

Data flow: one program per (row = request * kv_head, split). It loads the row's GROUP query
heads once ([BLOCK_H, D], GQA packing), walks its share of the row's tokens BLOCK_N at a time
(pages looked up through kv_slots, so K/V tiles gather whole pages), and keeps an online
softmax. With one split it writes the output; otherwise it writes a normalised partial output
and its log-sum-exp, and `_combine_kernel` merges the splits. The split count depends only on
shapes (batch, kv heads, kv_slots capacity), never on values, so launches capture in CUDA graphs
and every program whose share of a row is empty exits after writing an empty partial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton_util import lazy_jit, next_pow2, num_sms, upcast_dots

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

LOG2E = 1.4426950408889634
# Split-KV sizing, from the H100 split sweeps (perf/results/kernels_sweep.json, _splits.json;
# Llama-3.1-8B shape): about 580 programs (4.4 per SM) was best for 8..256 rows (1 x 128K: 64
# splits; 8 x 32K: 9; 32 x 32K: 3); every grid of exactly 1024 programs ran 10-15% slow (64 x 2,
# 256 x 4, 512 x 2 splits; cause not found), so even split counts are bumped to the next odd
# one (512 rows: 3 splits reach the floor). At most 64 splits (128 made the combine slower than
# it saves), at least 128 tokens per split (1 x 4K: 32 splits 20 us, 8 splits 30 us).
TARGET_PROGRAMS_PER_SM = 4.4
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # tokens per K/V tile (a multiple of the page size)
    num_warps: int
    num_stages: int


def default_config(head_dim: int, page_size: int) -> DecodeConfig:
    # H100 sweep (perf/results/kernels_sweep.json): 32-token tiles, 4 warps, 4 stages were best
    # summed over B x ctx = 32 x 32K, 8 x 32K, 1 x 128K (d=128, P=16)
    return DecodeConfig(block_n=max(32, page_size), num_warps=4, num_stages=4)


def num_splits_for(num_rows: int, nnz_pages: int, page_size: int, device: torch.device) -> int:
    """Splits per row so that the grid fills the GPU (shapes only: graph-safe)."""
    avg_tokens = max(1, nnz_pages * page_size // max(1, num_rows))
    want = math.ceil(TARGET_PROGRAMS_PER_SM * num_sms(device) / max(1, num_rows))
    if want > 1 and want % 2 == 0:
        want += 1
    cap = max(1, avg_tokens // MIN_TOKENS_PER_SPLIT)
    return int(max(1, min(want, cap, MAX_SPLITS)))


def _decode_kernel(
    q_ptr,
    kv_ptr,
    indptr_ptr,
    slots_ptr,
    last_len_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    qk_scale,
    num_kv_heads,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // num_kv_heads
    kvh = row % num_kv_heads
    start = tl.load(indptr_ptr + row)
    num_pages = tl.load(indptr_ptr + row + 1) - start
    kv_len = (num_pages - 1) * PAGE + tl.load(last_len_ptr + row)
    per_split = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    q_rows = (b * num_kv_heads * GROUP + kvh * GROUP + h).to(tl.int64) * HEAD_DIM
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=(h < GROUP)[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for tok0 in range(lo, hi, BLOCK_N):
        tok = tok0 + n
        valid = tok < hi
        slot = tl.load(slots_ptr + start + tok // PAGE, mask=valid, other=0).to(tl.int64)
        k_off = slot * (2 * PAGE * HEAD_DIM) + (tok % PAGE) * HEAD_DIM
        k = tl.load(kv_ptr + k_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(
            kv_ptr + k_off[:, None] + PAGE * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee" if UPCAST else None) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision="ieee" if UPCAST else None
        )
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + q_rows[:, None] + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=(h < GROUP)[:, None],
        )
    else:
        part = (row * NUM_SPLITS + split).to(tl.int64) * BLOCK_H
        tl.store(part_o_ptr + (part + h)[:, None] * HEAD_DIM + d[None, :], o)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part + h, lse)


def _combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    num_kv_heads,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    part = (row * NUM_SPLITS + s).to(tl.int64) * BLOCK_H + g
    lse = tl.load(part_lse_ptr + part, mask=s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    w = tl.exp2(lse - lse_max)
    o = tl.load(
        part_o_ptr + part[:, None] * HEAD_DIM + d[None, :],
        mask=(s < NUM_SPLITS)[:, None],
        other=0.0,
    )
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    b = row // num_kv_heads
    kvh = row % num_kv_heads
    q_row = (b * num_kv_heads * GROUP + kvh * GROUP + g).to(tl.int64) * HEAD_DIM
    tl.store(out_ptr + q_row + d, o.to(out_ptr.dtype.element_ty))


decode_kernel = lazy_jit(_decode_kernel)
combine_kernel = lazy_jit(_combine_kernel)


def paged_decode_attention_triton(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the decode kernel (inputs already validated by the op). Returns [B, Hq, D]
    (`out` if given: tests pass a poisoned one)."""
    B, Hq, D = q.shape
    P = kv_pool.shape[2]
    num_kv_heads = (kv_indptr.numel() - 1) // B
    group = Hq // num_kv_heads
    rows = B * num_kv_heads
    cfg = config or default_config(D, P)
    if num_splits is None:
        num_splits = num_splits_for(rows, kv_slots.numel(), P, q.device)
    block_h = max(16, next_pow2(group))
    out = torch.empty_like(q) if out is None else out
    if rows == 0:
        return out
    if num_splits > 1:
        # [rows, splits, BLOCK_H, D] float32: each split's normalised partial output
        part_o = torch.empty(rows, num_splits, block_h, D, device=q.device, dtype=torch.float32)
        # [rows, splits, BLOCK_H] float32: each split's log2-sum-exp (-inf = empty split)
        part_lse = torch.empty(rows, num_splits, block_h, device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    decode_kernel[(rows, num_splits)](
        q,
        kv_pool,
        kv_indptr,
        kv_slots,
        kv_last_page_len,
        out,
        part_o,
        part_lse,
        sm_scale * LOG2E,
        num_kv_heads,
        GROUP=group,
        BLOCK_H=block_h,
        HEAD_DIM=D,
        PAGE=P,
        BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits,
        UPCAST=upcast_dots(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        combine_kernel[(rows, group)](
            part_o,
            part_lse,
            out,
            num_kv_heads,
            GROUP=group,
            BLOCK_H=block_h,
            HEAD_DIM=D,
            NUM_SPLITS=num_splits,
            BLOCK_S=max(2, next_pow2(num_splits)),
            num_warps=4,
        )
    return out
