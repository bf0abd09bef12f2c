"""Custom op `torch.ops.spin.resolve_pages`: the fused residency step of the KV hierarchy
(triton_hierarchy.py). Its reference is the torch composition in runtime/hierarchy.py
(HierarchicalKV with fused=False), which runs wherever Triton does not (CPU without the
interpreter); tests compare the two exactly."""

from __future__ import annotations

import torch

from . import _validate as V
from .triton_hierarchy import resolve_pages_triton

_INT32 = ("kv_indptr", "page_ids", "directory", "meta", "host_l2", "row_slots", "out_slots")


def _check(args: dict[str, torch.Tensor]) -> None:
    op, dev = "resolve_pages", args["meta"].device
    for name in (*_INT32, "gather_host", "gather_hbm", "gather_count"):
        t = args[name]
        if t.dtype != torch.int32 or not t.is_contiguous() or t.device != dev:
            V._fail(op, f"{name} must be contiguous int32 on {dev}")
    for name, dtype in (("epoch", torch.uint8), ("current", torch.uint8), ("stats", torch.int64)):
        if args[name].dtype != dtype or args[name].device != dev:
            V._fail(op, f"{name} must be {dtype} on {dev}")
    if args["req_slots"].dtype != torch.int64 or args["row_slots"].dim() != 3:
        V._fail(op, "req_slots must be int64 and row_slots [max_requests, LH, W]")
    if args["out_slots"].numel() != args["page_ids"].numel():
        V._fail(op, "out_slots must have page_ids' capacity")
    rs = args["row_stats"]
    if (
        rs.dtype != torch.int64
        or rs.device != dev
        or not rs.is_contiguous()
        or tuple(rs.shape) != (args["directory"].shape[0], 2)
    ):
        V._fail(op, f"row_stats must be contiguous int64 [max_requests, 2] on {dev}")


@torch.library.custom_op(
    "spin::resolve_pages",
    mutates_args=(
        "meta",
        "epoch",
        "out_slots",
        "gather_host",
        "gather_hbm",
        "gather_count",
        "stats",
        "row_stats",
    ),
)
def _resolve_op(
    kv_indptr: torch.Tensor,
    page_ids: torch.Tensor,
    req_slots: torch.Tensor,
    directory: torch.Tensor,
    meta: torch.Tensor,
    host_l2: torch.Tensor,
    row_slots: torch.Tensor,
    epoch: torch.Tensor,
    current: torch.Tensor,
    out_slots: torch.Tensor,
    gather_host: torch.Tensor,
    gather_hbm: torch.Tensor,
    gather_count: torch.Tensor,
    stats: torch.Tensor,
    row_stats: torch.Tensor,
    layer: int,
    num_kv_heads: int,
    l2_offset: int,
    rev_offset: int,
    segment_pages: int,
    max_victims: int,
) -> None:
    args = dict(locals())
    _check(args)
    resolve_pages_triton(**args)


@_resolve_op.register_fake
def _(kv_indptr, page_ids, req_slots, directory, meta, host_l2, row_slots, epoch, current,
      out_slots, gather_host, gather_hbm, gather_count, stats, row_stats, layer, num_kv_heads,
      l2_offset, rev_offset, segment_pages, max_victims) -> None:  # fmt: skip
    _check(dict(locals()))


def resolve_pages(
    kv_indptr: torch.Tensor,  # [R + 1] int32: selection CSR, rows r = b * KV + h of one layer
    page_ids: torch.Tensor,  # [cap] int32: logical pages, ascending per row
    req_slots: torch.Tensor,  # [B] int64: page-directory row per request, -1 = padding
    directory: torch.Tensor,  # [max_requests, max_segments] int32 (view of meta)
    meta: torch.Tensor,  # [spare + 1] int32: flat page metadata, updated in place
    host_l2: torch.Tensor,  # [num_segments * S * LH] int32: host slot per entry (UVA ok)
    row_slots: torch.Tensor,  # [max_requests, LH, W] int32: HBM slots each row owns, -1 pad
    epoch: torch.Tensor,  # [num_hbm_slots] uint8: LRU epochs, updated in place
    current: torch.Tensor,  # [1] uint8: current epoch
    out_slots: torch.Tensor,  # [cap] int32, zeros: receives the HBM slot of each page
    gather_host: torch.Tensor,  # [R * K] int32: receives host slots of installed misses
    gather_hbm: torch.Tensor,  # [R * K] int32: receives their HBM (victim) slots
    gather_count: torch.Tensor,  # [1] int32, zero: receives the number of installed misses
    stats: torch.Tensor,  # [>= 4] int64: += lookups, hits, fetched, misses without a victim
    row_stats: torch.Tensor,  # [max_requests, 2] int64: += lookups, hits per directory row
    layer: int,
    num_kv_heads: int,
    l2_offset: int,  # meta index of hbm_l2[0, 0, 0]
    rev_offset: int,  # meta index of slot_entry[0]
    segment_pages: int,  # S
    max_victims: int,  # K: static bound on pages selected per row
) -> None:
    """Residency lookup + LRU victims + install for one layer in one launch (module doc of
    triton_hierarchy.py); then gather_pages(host, hbm, gather_host, gather_hbm, gather_count)."""
    torch.ops.spin.resolve_pages(
        kv_indptr, page_ids, req_slots, directory, meta, host_l2, row_slots, epoch, current,
        out_slots, gather_host, gather_hbm, gather_count, stats, row_stats,
        layer, num_kv_heads, l2_offset, rev_offset, segment_pages, max_victims,
    )  # fmt: skip
