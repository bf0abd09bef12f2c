"""Public entry points of the paged-KV ops, registered as torch custom ops `torch.ops.spin.*`.

Every op: a torch.library custom op (so it runs eagerly, under torch.compile and inside captured
CUDA graphs), a fake impl for tracing, a Triton kernel on CUDA, and its pure-torch reference
(reference.py) on CPU. Under TRITON_INTERPRET=1 CPU tensors run the Triton kernels in Triton's
interpreter (the CI tests). Inputs are validated (_validate.py) before any kernel launches.
Layout and CSR conventions: reference.py. Supported: head_dim 64 / 128, page size 8 / 16 / 32,
bf16 / fp16 / fp32, GQA groups 1..16, int32 index tensors, contiguous tensors on one device.

Example (one decode step for B requests):
    out = ops.paged_decode_attention(q, kv_pool, kv_indptr, kv_slots, kv_last_page_len, D**-0.5)
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import reference as ref
from ._ops_glue import add_rms_norm, fold_page_minmax, rms_norm, rope_qkv, silu_mul
from ._ops_hierarchy import resolve_pages
from ._ops_sparse import (
    fold_score_pages,
    gather_pages,
    scatter_pages,
    score_pages,
    select_indptr,
    select_page_ids,
    select_page_slots,
    select_pages,
)
from ._triton_util import use_triton
from .triton_decode import paged_decode_attention_triton
from .triton_paging import append_kv_triton, page_summaries_triton
from .triton_prefill import paged_prefill_attention_triton
from .triton_select import ScoreMode

__all__ = [
    "ScoreMode",
    "add_rms_norm",
    "append_kv",
    "fold_page_minmax",
    "fold_score_pages",
    "gather_pages",
    "paged_decode_attention",
    "paged_prefill_attention",
    "resolve_pages",
    "rms_norm",
    "rope_qkv",
    "scatter_pages",
    "score_pages",
    "select_indptr",
    "select_page_ids",
    "select_page_slots",
    "select_pages",
    "silu_mul",
    "sparse_decode_attention",
]


# ---- append_kv (+ page summaries) ---------------------------------------------------------
def _check_append(
    kv_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    V.check_pool("append_kv", kv_pool)
    V.check_float("append_kv", "k", k, 3, kv_pool)
    V.check_float("append_kv", "v", v, 3, kv_pool)
    V.check_index("append_kv", "slots", slots, kv_pool.device, dims=2)
    V.check_index("append_kv", "offsets", offsets, kv_pool.device)
    if (
        v.shape != k.shape
        or tuple(slots.shape) != tuple(k.shape[:2])
        or offsets.numel() != k.shape[0]
    ):
        V._fail(
            "append_kv",
            f"shapes disagree: k {tuple(k.shape)}, v {tuple(v.shape)}, slots "
            f"{tuple(slots.shape)} (want [T, KV]), offsets {tuple(offsets.shape)} (want [T])",
        )


@torch.library.custom_op("spin::append_kv", mutates_args=("kv_pool",))
def _append_kv_op(
    kv_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    _check_append(kv_pool, k, v, slots, offsets)
    if use_triton(kv_pool):
        append_kv_triton(kv_pool, k, v, slots, offsets)
    else:
        ref.append_kv_ref(kv_pool, k, v, slots, offsets)


@_append_kv_op.register_fake
def _(kv_pool, k, v, slots, offsets) -> None:
    _check_append(kv_pool, k, v, slots, offsets)


def _check_summaries(kv_pool, slots, offsets, summary_rows, page_min, page_max, page_sum) -> None:
    for name, t in (("page_min", page_min), ("page_max", page_max), ("page_sum", page_sum)):
        if t.dtype not in V.SUPPORTED_DTYPES or t.dim() != 2 or t.shape[1] != kv_pool.shape[3]:
            V._fail(
                "append_kv",
                f"{name} must be [num_pages, head_dim] of {V.SUPPORTED_DTYPES}, got {t.dtype} {tuple(t.shape)}",
            )
        if t.device != kv_pool.device or not t.is_contiguous():
            V._fail("append_kv", f"{name} must be contiguous on {kv_pool.device}")
    V.check_index("append_kv", "summary_rows", summary_rows, kv_pool.device, dims=2)
    if summary_rows.shape != slots.shape:
        V._fail(
            "append_kv",
            f"summary_rows {tuple(summary_rows.shape)} must match slots {tuple(slots.shape)}",
        )


@torch.library.custom_op("spin::page_summaries", mutates_args=("page_min", "page_max", "page_sum"))
def _page_summaries_op(
    kv_pool: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    summary_rows: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    page_sum: torch.Tensor,
) -> None:
    _check_summaries(kv_pool, slots, offsets, summary_rows, page_min, page_max, page_sum)
    fn = page_summaries_triton if use_triton(kv_pool) else ref.page_summaries_ref
    fn(kv_pool, slots, offsets, summary_rows, page_min, page_max, page_sum)


@_page_summaries_op.register_fake
def _(kv_pool, slots, offsets, summary_rows, page_min, page_max, page_sum) -> None:
    _check_summaries(kv_pool, slots, offsets, summary_rows, page_min, page_max, page_sum)


def append_kv(
    kv_pool: torch.Tensor,  # [S, 2, P, D]: updated in place
    k: torch.Tensor,  # [T, KV, D], kv_pool's dtype
    v: torch.Tensor,  # [T, KV, D]
    slots: torch.Tensor,  # [T, KV] int32: pool slot of token t's page for kv head h (pad: 0)
    offsets: torch.Tensor,  # [T] int32: position % P
    summary_rows: torch.Tensor | None = None,  # [T, KV] int32: summary row of that page
    page_min: torch.Tensor
    | None = None,  # [N, D] float32 (or bf16/fp16, half the bytes): per-channel key min per page
    page_max: torch.Tensor
    | None = None,  # [N, D] float32 (or bf16/fp16, half the bytes): per-channel key max per page
    page_sum: torch.Tensor
    | None = None,  # [N, D] float32 (or bf16/fp16, half the bytes): per-channel key sum per page
) -> None:
    """Write new tokens' K/V into their pages; with summary tables given, also recompute the
    min / max / sum of every touched page's valid keys (tokens of one page must be consecutive
    in T, as they are for one request)."""
    torch.ops.spin.append_kv(kv_pool, k, v, slots, offsets)
    tables = (page_min, page_max, page_sum)
    if any(t is not None for t in tables):
        if any(t is None for t in tables):
            V._fail("append_kv", "pass page_min, page_max and page_sum together")
        rows = slots if summary_rows is None else summary_rows
        torch.ops.spin.page_summaries(kv_pool, slots, offsets, rows, page_min, page_max, page_sum)


# ---- attention ------------------------------------------------------------------------------
def _check_decode(q, kv_pool, kv_indptr, kv_slots, kv_last_page_len) -> None:
    V.check_pool("paged_decode_attention", kv_pool)
    V.check_float("paged_decode_attention", "q", q, 3, kv_pool)
    num_kv_heads = V.num_kv_heads_of("paged_decode_attention", kv_indptr, q.shape[0])
    V.check_heads("paged_decode_attention", q.shape[1], num_kv_heads)
    V.check_csr(
        "paged_decode_attention",
        kv_indptr,
        kv_slots,
        kv_last_page_len,
        q.shape[0] * num_kv_heads,
        kv_pool.device,
    )


@torch.library.custom_op("spin::paged_decode_attention", mutates_args=())
def _decode_op(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    _check_decode(q, kv_pool, kv_indptr, kv_slots, kv_last_page_len)
    fn = paged_decode_attention_triton if use_triton(q) else ref.paged_decode_attention_ref
    return fn(q, kv_pool, kv_indptr, kv_slots, kv_last_page_len, sm_scale)


@_decode_op.register_fake
def _(q, kv_pool, kv_indptr, kv_slots, kv_last_page_len, sm_scale):
    _check_decode(q, kv_pool, kv_indptr, kv_slots, kv_last_page_len)
    return torch.empty_like(q)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    kv_pool: torch.Tensor,  # [S, 2, P, D]
    kv_indptr: torch.Tensor,  # [B * KV + 1] int32
    kv_slots: torch.Tensor,  # [nnz] int32 (capacity may exceed kv_indptr[-1])
    kv_last_page_len: torch.Tensor,  # [B * KV] int32, 1..P
    sm_scale: float,
) -> torch.Tensor:  # [B, Hq, D], q.dtype
    """One query token per request over its rows' pages (every row needs >= 1 page). Split-KV:
    the number of splits follows from shapes only, so the call is CUDA-graph safe."""
    return torch.ops.spin.paged_decode_attention(
        q, kv_pool, kv_indptr, kv_slots, kv_last_page_len, sm_scale
    )


def sparse_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    kv_pool: torch.Tensor,  # [S, 2, P, D]
    sel_indptr: torch.Tensor,  # [B * KV + 1] int32: selected pages per (request, kv head)
    sel_slots: torch.Tensor,  # [capacity] int32: their HBM slots, token order, tail page last
    kv_last_page_len: torch.Tensor,  # [B * KV] int32: valid tokens of each row's tail page
    sm_scale: float,
) -> torch.Tensor:
    """Decode over selected pages (static pages included): the decode kernel on a sparse CSR.
    Every selected page but the last is full; select_pages keeps the partial tail last."""
    return torch.ops.spin.paged_decode_attention(
        q, kv_pool, sel_indptr, sel_slots, kv_last_page_len, sm_scale
    )


def _check_prefill(q, kv_pool, qo_indptr, kv_indptr, kv_slots, kv_last_page_len) -> None:
    V.check_pool("paged_prefill_attention", kv_pool)
    V.check_float("paged_prefill_attention", "q", q, 3, kv_pool)
    V.check_index("paged_prefill_attention", "qo_indptr", qo_indptr, kv_pool.device)
    batch = qo_indptr.numel() - 1
    num_kv_heads = V.num_kv_heads_of("paged_prefill_attention", kv_indptr, batch)
    V.check_heads("paged_prefill_attention", q.shape[1], num_kv_heads)
    V.check_csr(
        "paged_prefill_attention",
        kv_indptr,
        kv_slots,
        kv_last_page_len,
        batch * num_kv_heads,
        kv_pool.device,
    )


@torch.library.custom_op("spin::paged_prefill_attention", mutates_args=())
def _prefill_op(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    _check_prefill(q, kv_pool, qo_indptr, kv_indptr, kv_slots, kv_last_page_len)
    fn = paged_prefill_attention_triton if use_triton(q) else ref.paged_prefill_attention_ref
    return fn(q, kv_pool, qo_indptr, kv_indptr, kv_slots, kv_last_page_len, sm_scale)


@_prefill_op.register_fake
def _(q, kv_pool, qo_indptr, kv_indptr, kv_slots, kv_last_page_len, sm_scale):
    _check_prefill(q, kv_pool, qo_indptr, kv_indptr, kv_slots, kv_last_page_len)
    return torch.empty_like(q)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]: chunk tokens of B requests, concatenated
    kv_pool: torch.Tensor,  # [S, 2, P, D]: the chunk's own K/V already appended
    qo_indptr: torch.Tensor,  # [B + 1] int32
    kv_indptr: torch.Tensor,  # [B * KV + 1] int32
    kv_slots: torch.Tensor,  # [nnz] int32
    kv_last_page_len: torch.Tensor,  # [B * KV] int32
    sm_scale: float,
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Causal attention of a chunk to its request's pages (earlier chunks plus itself)."""
    return torch.ops.spin.paged_prefill_attention(
        q, kv_pool, qo_indptr, kv_indptr, kv_slots, kv_last_page_len, sm_scale
    )
