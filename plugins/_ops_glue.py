"""Custom ops for the decoder's per-layer glue (`torch.ops.spin.rms_norm`, `.add_rms_norm`,
`.rope_qkv`): Triton kernels (triton_glue.py) on CUDA, the torch compositions below (the
references, HF's rounding order) on CPU. See ops.py for the op conventions."""

from __future__ import annotations

import torch

from . import _validate as V
from ._triton_util import use_triton
from .triton_glue import rms_norm_triton, rope_qkv_triton


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
