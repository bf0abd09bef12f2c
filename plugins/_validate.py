"""Input checks shared by every op: raise before any kernel launches, naming what is supported.

All checks read only shapes, dtypes, devices and strides (never tensor values), so they cost no
device sync and run unchanged inside CUDA-graph capture and on fake tensors under torch.compile.
"""

from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_PAGE_SIZES = (8, 16, 32)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPE = torch.int32


class UnsupportedInputError(ValueError):
    """An op was called with inputs its kernels do not support (the message names the remedy)."""


def _fail(op: str, msg: str) -> None:
    raise UnsupportedInputError(f"spin.{op}: {msg}")


def check_pool(op: str, kv_pool: torch.Tensor) -> tuple[int, int]:
    """kv_pool [S, 2, P, D], contiguous: returns (P, D)."""
    if kv_pool.dim() != 4 or kv_pool.shape[1] != 2:
        _fail(
            op, f"kv_pool must be [num_slots, 2, page_size, head_dim], got {tuple(kv_pool.shape)}"
        )
    page_size, head_dim = int(kv_pool.shape[2]), int(kv_pool.shape[3])
    if page_size not in SUPPORTED_PAGE_SIZES:
        _fail(op, f"page size {page_size} is not supported; use one of {SUPPORTED_PAGE_SIZES}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        _fail(op, f"head_dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if kv_pool.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"kv_pool dtype {kv_pool.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if not kv_pool.is_contiguous():
        _fail(op, "kv_pool must be contiguous (call .contiguous() or allocate it with torch.empty)")
    return page_size, head_dim


def check_float(op: str, name: str, t: torch.Tensor, dims: int, like: torch.Tensor) -> None:
    """A float operand: `dims` dims, contiguous, same dtype, device and head_dim as `like`."""
    if t.dim() != dims:
        _fail(op, f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype != like.dtype:
        _fail(
            op,
            f"{name} dtype {t.dtype} must match kv_pool dtype {like.dtype}; "
            f"supported: {SUPPORTED_DTYPES}",
        )
    if t.device != like.device:
        _fail(
            op, f"{name} is on {t.device} but kv_pool is on {like.device}; move both to one device"
        )
    if t.shape[-1] != like.shape[-1]:
        _fail(op, f"{name} head_dim {t.shape[-1]} != kv_pool head_dim {like.shape[-1]}")
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous (call .contiguous())")


def check_index(op: str, name: str, t: torch.Tensor, device: torch.device, dims: int = 1) -> None:
    """An index operand: int32, contiguous, on `device`, `dims` dims."""
    if t.dtype != INDEX_DTYPE:
        _fail(op, f"{name} must be torch.int32, got {t.dtype}")
    if t.dim() != dims:
        _fail(op, f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but the data is on {device}; move it there")
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous (call .contiguous())")


def check_csr(
    op: str,
    kv_indptr: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    num_rows: int,
    device: torch.device,
) -> None:
    """The CSR page lists of num_rows = batch * num_kv_heads rows (see reference.py)."""
    check_index(op, "kv_indptr", kv_indptr, device)
    check_index(op, "kv_slots", kv_slots, device)
    check_index(op, "kv_last_page_len", kv_last_page_len, device)
    if kv_indptr.numel() != num_rows + 1:
        _fail(
            op,
            f"kv_indptr has {kv_indptr.numel()} entries, expected batch * num_kv_heads + 1 "
            f"= {num_rows + 1}",
        )
    if kv_last_page_len.numel() != num_rows:
        _fail(op, f"kv_last_page_len has {kv_last_page_len.numel()} entries, expected {num_rows}")


def check_heads(op: str, num_q_heads: int, num_kv_heads: int) -> int:
    """GQA: q heads must be a multiple of kv heads; returns the group size."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        _fail(op, f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    group = num_q_heads // num_kv_heads
    if group > 16:
        _fail(
            op, f"GQA group {group} is not supported; groups of 1..16 query heads per kv head are"
        )
    return group


def num_kv_heads_of(op: str, kv_indptr: torch.Tensor, batch: int) -> int:
    if batch <= 0 or (kv_indptr.numel() - 1) % batch:
        _fail(
            op,
            f"kv_indptr has {kv_indptr.numel()} entries: not batch * num_kv_heads + 1 "
            f"for batch {batch}",
        )
    return (kv_indptr.numel() - 1) // batch
