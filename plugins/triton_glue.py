"""Fused per-layer glue of the decoder, in Triton: each replaces a chain of small torch ops that
cost a launch apiece (at decode batch sizes the launches, not the bytes, are the time).

rms_norm_kernel: out = weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), with an optional residual
    add first (x = x + residual, written back as the new residual): HF's rounding order.
rope_qkv_kernel: split a fused qkv row into contiguous q [T, H, D], k [T, KV, D], v [T, KV, D],
    rotating q and k (HF "rotate_half" layout) with the step's cos/sin [T, D].
silu_mul_kernel: the SwiGLU activation silu(gate) * up of a fused gate_up row [T, 2 I] -> [T, I]
    (torch's rounding: silu rounded to the dtype, then the product).
"""

from __future__ import annotations

import torch

from ._triton_util import lazy_jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (x32 * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + row * n_cols + cols, y.to(dtype), mask=ok)


rms_norm_kernel = lazy_jit(_rms_norm_kernel)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    if rows:
        rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out if res_out is not None else out,
            n,
            eps,
            HAS_RES=residual is not None,
            BLOCK=next_pow2(n),
            num_warps=4 if n <= 2048 else 8,
        )
    return out, res_out


def _rope_qkv_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    NUM_HEADS: tl.constexpr,
    NUM_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One program per (token, head of q | k | v): head j < H is a query head, then KV key
    heads, then KV value heads (copied unrotated)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    width = (NUM_HEADS + 2 * NUM_KV) * HEAD_DIM
    d = tl.arange(0, HALF)
    src = qkv_ptr + t * width + j * HEAD_DIM
    lo = tl.load(src + d)
    hi = tl.load(src + HALF + d)
    if j < NUM_HEADS + NUM_KV:
        dtype = lo.dtype
        c_lo = tl.load(cos_ptr + t * HEAD_DIM + d).to(tl.float32)
        c_hi = tl.load(cos_ptr + t * HEAD_DIM + HALF + d).to(tl.float32)
        s_lo = tl.load(sin_ptr + t * HEAD_DIM + d).to(tl.float32)
        s_hi = tl.load(sin_ptr + t * HEAD_DIM + HALF + d).to(tl.float32)
        lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
        # HF: x * cos + rotate_half(x) * sin, each product rounded to the dtype, then summed
        new_lo = (lo32 * c_lo).to(dtype).to(tl.float32) + (-hi32 * s_lo).to(dtype).to(tl.float32)
        new_hi = (hi32 * c_hi).to(dtype).to(tl.float32) + (lo32 * s_hi).to(dtype).to(tl.float32)
        if j < NUM_HEADS:
            dst = q_ptr + (t * NUM_HEADS + j) * HEAD_DIM
        else:
            dst = k_ptr + (t * NUM_KV + j - NUM_HEADS) * HEAD_DIM
        tl.store(dst + d, new_lo.to(dtype))
        tl.store(dst + HALF + d, new_hi.to(dtype))
    else:
        dst = v_ptr + (t * NUM_KV + j - NUM_HEADS - NUM_KV) * HEAD_DIM
        tl.store(dst + d, lo)
        tl.store(dst + HALF + d, hi)


rope_qkv_kernel = lazy_jit(_rope_qkv_kernel)


def rope_qkv_triton(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = qkv.shape[0]
    D = cos.shape[1]
    q = qkv.new_empty(T, num_heads, D)
    k = qkv.new_empty(T, num_kv_heads, D)
    v = qkv.new_empty(T, num_kv_heads, D)
    if T:
        grid = (T, num_heads + 2 * num_kv_heads)
        rope_qkv_kernel[grid](
            qkv, cos, sin, q, k, v, NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=D
        )
    return q, k, v


def _fold_minmax_kernel(
    min_ptr, max_ptr, rows_ptr, fresh_ptr, keys_ptr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """One program per (request, kv head): fold its new key into its page's running min/max
    (a fresh page starts from the key)."""
    r = tl.program_id(0)
    d = tl.arange(0, HEAD_DIM)
    row = tl.load(rows_ptr + r).to(tl.int64) * HEAD_DIM
    k = tl.load(keys_ptr + r.to(tl.int64) * HEAD_DIM + d)
    fresh = tl.load(fresh_ptr + r // NUM_KV) != 0
    mn = tl.load(min_ptr + row + d)
    mx = tl.load(max_ptr + row + d)
    k = k.to(mn.dtype)
    tl.store(min_ptr + row + d, tl.where(fresh, k, tl.minimum(mn, k)))
    tl.store(max_ptr + row + d, tl.where(fresh, k, tl.maximum(mx, k)))


fold_minmax_kernel = lazy_jit(_fold_minmax_kernel)


def fold_page_minmax_triton(page_min, page_max, rows, fresh, keys) -> None:
    B, KV, D = keys.shape
    if B:
        fold_minmax_kernel[(B * KV,)](page_min, page_max, rows, fresh, keys, NUM_KV=KV, HEAD_DIM=D)


def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    """Program (t, c): columns [c * BLOCK, (c + 1) * BLOCK) of token t; x row = gate | up."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + t * 2 * n_cols + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + t * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
    g32 = gate.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)  # F.silu, rounded to the dtype
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + t * n_cols + cols, out.to(gate.dtype), mask=ok)


silu_mul_kernel = lazy_jit(_silu_mul_kernel)

SILU_MUL_BLOCK = 1024  # columns per program


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    T, n = x.shape[0], x.shape[1] // 2
    out = x.new_empty(T, n)
    if T and n:
        grid = (T, -(-n // SILU_MUL_BLOCK))
        silu_mul_kernel[grid](x, out, n, BLOCK=SILU_MUL_BLOCK, num_warps=4)
    return out
