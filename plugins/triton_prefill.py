"""Paged prefill attention in Triton: a chunk of queries attends causally to its request's pages.

Data flow: the grid is (query blocks, kv heads). A block holds BLOCK_M rows = BLOCK_M / G_PAD
tokens x G_PAD query heads of one kv head (GQA packing: K/V tiles are loaded once for the group).
Blocks are numbered across requests through `block_indptr` (prefix sums of ceil(q_len / tokens
per block), computed on the device); the grid is sized for the worst case, cdiv(T, tokens) + B,
and surplus programs exit. Query i of request b sits at position kv_len - q_len + i. Each block
first walks the K/V tiles that every row sees in full (no masks), then the tiles that cross the
causal diagonal (masked). 128K-token prompts run chunk by chunk: each chunk's K/V is appended,
then the chunk attends to all pages listed for its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_util import lazy_jit, next_pow2, upcast_dots

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # rows per program: tokens x padded group
    block_n: int  # kv tokens per tile (a multiple of the page size)
    num_warps: int
    num_stages: int


def default_config(head_dim: int, page_size: int) -> PrefillConfig:
    if head_dim == 128:  # best of the H100 sweep at 8K (perf/results/kernels_prefill.json)
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)


def _prefill_kernel(
    q_ptr,
    kv_ptr,
    qo_indptr_ptr,
    block_indptr_ptr,
    indptr_ptr,
    slots_ptr,
    last_len_ptr,
    out_ptr,
    qk_scale,
    batch,
    num_kv_heads,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    bi = tl.arange(0, BLOCK_B)
    ends = tl.load(block_indptr_ptr + 1 + bi, mask=bi < batch, other=2147483647)
    b = tl.sum((ends <= pid).to(tl.int32), 0)
    if b < batch:
        TOKENS: tl.constexpr = BLOCK_M // G_PAD
        q_start = tl.load(qo_indptr_ptr + b)
        q_len = tl.load(qo_indptr_ptr + b + 1) - q_start
        qblk = pid - tl.load(block_indptr_ptr + b)
        row = b * num_kv_heads + kvh
        kv_start = tl.load(indptr_ptr + row)
        kv_len = (tl.load(indptr_ptr + row + 1) - kv_start - 1) * PAGE + tl.load(last_len_ptr + row)

        m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        i = qblk * TOKENS + m // G_PAD
        g = m % G_PAD
        row_ok = (i < q_len) & (g < GROUP)
        q_pos = kv_len - q_len + i
        q_off = ((q_start + i).to(tl.int64) * num_kv_heads * GROUP + kvh * GROUP + g) * HEAD_DIM
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        first_pos = kv_len - q_len + qblk * TOKENS
        last_pos = tl.minimum(first_pos + TOKENS - 1, kv_len - 1)
        full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # tiles every row sees in full
        n = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for tok0 in range(0, full_hi, BLOCK_N):
            tok = tok0 + n
            slot = tl.load(slots_ptr + kv_start + tok // PAGE).to(tl.int64)
            kv_off = slot * (2 * PAGE * HEAD_DIM) + (tok % PAGE) * HEAD_DIM
            k = tl.load(kv_ptr + kv_off[:, None] + d[None, :])
            v = tl.load(kv_ptr + kv_off[:, None] + PAGE * HEAD_DIM + d[None, :])
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee" if UPCAST else None) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(v.dtype), v, input_precision="ieee" if UPCAST else None
            )
            m_i = m_new
        for tok0 in range(full_hi, last_pos + 1, BLOCK_N):
            tok = tok0 + n
            tok_ok = tok < kv_len
            slot = tl.load(slots_ptr + kv_start + tok // PAGE, mask=tok_ok, other=0).to(tl.int64)
            kv_off = slot * (2 * PAGE * HEAD_DIM) + (tok % PAGE) * HEAD_DIM
            k = tl.load(kv_ptr + kv_off[:, None] + d[None, :], mask=tok_ok[:, None], other=0.0)
            v = tl.load(
                kv_ptr + kv_off[:, None] + PAGE * HEAD_DIM + d[None, :],
                mask=tok_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee" if UPCAST else None) * qk_scale
            seen = tok_ok[None, :] & (tok[None, :] <= q_pos[:, None])
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(v.dtype), v, input_precision="ieee" if UPCAST else None
            )
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_off[:, None] + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )


prefill_kernel = lazy_jit(_prefill_kernel)


def paged_prefill_attention_triton(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the prefill kernel (inputs already validated by the op). Returns [T, Hq, D]."""
    T, Hq, D = q.shape
    P = kv_pool.shape[2]
    B = qo_indptr.numel() - 1
    num_kv_heads = (kv_indptr.numel() - 1) // B
    group = Hq // num_kv_heads
    g_pad = next_pow2(group)
    cfg = config or default_config(D, P)
    block_m = max(cfg.block_m, g_pad)
    tokens = block_m // g_pad
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    q_lens = (qo_indptr[1:] - qo_indptr[:-1]).to(torch.int32)
    # [B + 1] int32: first query block of each request (prefix sum of its block count)
    block_indptr = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    block_indptr[1:] = torch.cumsum((q_lens + tokens - 1) // tokens, 0)
    grid = (-(-T // tokens) + B, num_kv_heads)
    prefill_kernel[grid](
        q,
        kv_pool,
        qo_indptr,
        block_indptr,
        kv_indptr,
        kv_slots,
        kv_last_page_len,
        out,
        sm_scale * LOG2E,
        B,
        num_kv_heads,
        GROUP=group,
        G_PAD=g_pad,
        HEAD_DIM=D,
        PAGE=P,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_B=max(2, next_pow2(B)),
        UPCAST=upcast_dots(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
