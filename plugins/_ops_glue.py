"""Custom ops for the decoder's per-layer glue (`torch.ops.spin.rms_norm`, `.add_rms_norm`,
`.rope_qkv`, `.silu_mul`): Triton kernels (triton_glue.py) on CUDA, the torch compositions below (the
references, HF's rounding order) on CPU. See ops.py for the op conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate as V
from ._triton_util import use_triton
from .triton_glue import (
    fold_page_minmax_triton,
    rms_norm_triton,
    rope_qkv_triton,
    silu_mul_triton,
)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_qkv_ref(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, D = qkv.shape[0], cos.shape[1]
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)

    def rotate(x: torch.Tensor, heads: int) -> torch.Tensor:
        x = x.view(T, heads, D)
        rotated = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    return rotate(q, num_heads), rotate(k, num_kv_heads), v.reshape(T, num_kv_heads, D).clone()


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fold_page_minmax_ref(page_min, page_max, rows, fresh, keys) -> None:
    B, KV, D = keys.shape
    r = rows.long().reshape(B, KV)
    k = keys.to(page_min.dtype)
    new = fresh.bool()[:, None, None]
    page_min[r] = torch.where(new, k, torch.minimum(page_min[r], k))
    page_max[r] = torch.where(new, k, torch.maximum(page_max[r], k))


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor, residual=None) -> None:
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in V.SUPPORTED_DTYPES:
        V._fail(op, f"x must be contiguous [T, n] of {V.SUPPORTED_DTYPES}, got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or weight.device != x.device:
        V._fail(op, f"weight must be [{x.shape[1]}] {x.dtype} on {x.device}")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous()
    ):
        V._fail(op, "residual must be contiguous and match x")


@torch.library.custom_op("spin::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm("rms_norm", x, weight)
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)[0]
    return rms_norm_ref(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check_norm("rms_norm", x, weight)
    return torch.empty_like(x)


@torch.library.custom_op("spin::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm("add_rms_norm", x, weight, residual)
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    _check_norm("add_rms_norm", x, weight, residual)
    return torch.empty_like(x), torch.empty_like(x)


def _check_rope(qkv, cos, sin, num_heads: int, num_kv_heads: int) -> None:
    op = "rope_qkv"
    if cos.dim() != 2 or cos.shape[1] not in V.SUPPORTED_HEAD_DIMS:
        V._fail(op, f"cos must be [T, D] with D in {V.SUPPORTED_HEAD_DIMS}, got {tuple(cos.shape)}")
    T, D = cos.shape
    width = (num_heads + 2 * num_kv_heads) * D
    if qkv.shape != (T, width) or not qkv.is_contiguous() or qkv.dtype not in V.SUPPORTED_DTYPES:
        V._fail(op, f"qkv must be contiguous [{T}, {width}], got {tuple(qkv.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D) or t.dtype != qkv.dtype or not t.is_contiguous():
            V._fail(op, f"{name} must be contiguous [{T}, {D}] {qkv.dtype}")


@torch.library.custom_op("spin::rope_qkv", mutates_args=())
def _rope_qkv_op(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_rope(qkv, cos, sin, num_heads, num_kv_heads)
    fn = rope_qkv_triton if use_triton(qkv) else rope_qkv_ref
    return fn(qkv, cos, sin, num_heads, num_kv_heads)


@_rope_qkv_op.register_fake
def _(qkv, cos, sin, num_heads, num_kv_heads):
    _check_rope(qkv, cos, sin, num_heads, num_kv_heads)
    T, D = cos.shape
    return (
        qkv.new_empty(T, num_heads, D),
        qkv.new_empty(T, num_kv_heads, D),
        qkv.new_empty(T, num_kv_heads, D),
    )


def _check_silu_mul(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2 or not x.is_contiguous() or x.dtype not in V.SUPPORTED_DTYPES:
        V._fail(
            "silu_mul",
            f"x must be contiguous [T, 2 * I] (gate | up) of {V.SUPPORTED_DTYPES}, "
            f"got {tuple(x.shape)} {x.dtype}",
        )


@torch.library.custom_op("spin::silu_mul", mutates_args=())
def _silu_mul_op(x: torch.Tensor) -> torch.Tensor:
    _check_silu_mul(x)
    return silu_mul_triton(x) if use_triton(x) else silu_mul_ref(x)


@_silu_mul_op.register_fake
def _(x):
    _check_silu_mul(x)
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _check_fold(page_min, page_max, rows, fresh, keys) -> None:
    op = "fold_page_minmax"
    D = keys.shape[-1] if keys.dim() == 3 else 0
    if D < 16 or D & (D - 1) or not keys.is_contiguous():  # one power-of-two block per row
        V._fail(op, "keys must be contiguous [B, KV, D] with D a power of two >= 16")
    B, KV, D = keys.shape
    for name, t in (("page_min", page_min), ("page_max", page_max)):
        if t.dim() != 2 or t.shape[1] != D or not t.is_contiguous() or t.device != keys.device:
            V._fail(op, f"{name} must be contiguous [N, {D}] on {keys.device}")
    if page_min.dtype != page_max.dtype or page_min.dtype not in V.SUPPORTED_DTYPES:
        V._fail(op, f"page_min / page_max must share a dtype of {V.SUPPORTED_DTYPES}")
    V.check_index(op, "rows", rows, keys.device)
    if rows.numel() != B * KV or fresh.shape != (B,) or fresh.dtype != torch.bool:
        V._fail(op, f"rows must be [{B * KV}] int32 and fresh [{B}] bool")


@torch.library.custom_op("spin::fold_page_minmax", mutates_args=("page_min", "page_max"))
def _fold_op(
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    rows: torch.Tensor,
    fresh: torch.Tensor,
    keys: torch.Tensor,
) -> None:
    _check_fold(page_min, page_max, rows, fresh, keys)
    fn = fold_page_minmax_triton if use_triton(keys) else fold_page_minmax_ref
    fn(page_min, page_max, rows, fresh, keys)


@_fold_op.register_fake
def _(page_min, page_max, rows, fresh, keys) -> None:
    _check_fold(page_min, page_max, rows, fresh, keys)


def fold_page_minmax(
    page_min: torch.Tensor,  # [N, D] per-page key minimum (Quest), updated in place
    page_max: torch.Tensor,  # [N, D] per-page key maximum
    rows: torch.Tensor,  # [B * KV] int32: table row of the new token's page, (b, h) order
    fresh: torch.Tensor,  # [B] bool: the token opens its page (its min/max restart)
    keys: torch.Tensor,  # [B, KV, D] the new tokens' keys
) -> None:
    """Fold one new key per (request, kv head) into its page's min/max: one launch on CUDA."""
    torch.ops.spin.fold_page_minmax(page_min, page_max, rows, fresh, keys)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, n] -> weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), one launch on CUDA."""
    return torch.ops.spin.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the norm."""
    return torch.ops.spin.add_rms_norm(x, residual, weight, eps)


def rope_qkv(
    qkv: torch.Tensor,  # [T, (H + 2 KV) * D] the fused projection's output
    cos: torch.Tensor,  # [T, D] qkv's dtype
    sin: torch.Tensor,  # [T, D]
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous (q [T, H, D], k [T, KV, D] both rotated, v [T, KV, D]), one launch on CUDA."""
    return torch.ops.spin.rope_qkv(qkv, cos, sin, num_heads, num_kv_heads)


def silu_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] gate | up -> [T, I]
    """SwiGLU's activation silu(gate) * up of the fused gate_up projection: one launch on
    CUDA (torch's rounding: silu rounded to the dtype, then the product)."""
    return torch.ops.spin.silu_mul(x)
