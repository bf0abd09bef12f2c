"""Layout and accounting of the two-level page metadata (control/page_directory.py): its
configuration and sizes (DirectoryConfig), table bytes and the integrity checker.

`table_bytes` sizes the tables against a flat one (DESIGN.md "Two-level metadata").
`check_directory` verifies what PageDirectory's docstring promises: every segment, host slot and
HBM slot is free or owned exactly once, directory rows match the request sizes, host entries
cover exactly the live context, HBM entries point at slots their request owns, and the reverse
map (slot_entry) matches the forward entries. It reads the tables only (on_device: copies the
device metadata to the host, a sync), so tests run it after every operation and the engine can
run it while idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from spinserve.control.slot_allocator import DUMMY_SLOT, SlotAllocator, duplicates

if TYPE_CHECKING:
    from spinserve.control.page_directory import PageDirectory

NONE = -1  # page_directory.NONE (that module imports this one)
ENTRY_BYTES = 4  # int32 table entries


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    max_requests: int  # request slots = level-1 rows
    max_pages_per_request: int  # ceil(max_context / P)
    segment_pages: int  # S: logical pages per level-2 segment
    num_layer_heads: int  # LH = num_layers * num_kv_heads
    num_segments: int  # level-2 pool size, including the dummy segment 0

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_pages_per_request", "segment_pages", "num_layer_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DirectoryConfig.{name} must be >= 1")
        if self.num_segments < 2:
            raise ValueError("DirectoryConfig.num_segments must be >= 2 (segment 0 is the dummy)")
        if self.dir_size + self.l2_size >= 2**30:
            raise ValueError("page tables exceed int32 indexing: use fewer/smaller segments")

    @property
    def max_segments(self) -> int:
        return -(-self.max_pages_per_request // self.segment_pages)

    @property
    def dir_size(self) -> int:
        return self.max_requests * self.max_segments

    @property
    def segment_entries(self) -> int:
        return self.segment_pages * self.num_layer_heads

    @property
    def l2_size(self) -> int:
        return self.num_segments * self.segment_entries


def table_bytes(c: DirectoryConfig, live_segments: int) -> dict[str, int]:
    """Bytes of the two-level tables (HBM-entry + host-entry tables, `live_segments` in use) vs
    a flat table of max_requests x max_pages_per_request x LH entries (both tables)."""
    per_segment = c.segment_entries * ENTRY_BYTES * 2
    flat = c.max_requests * c.max_pages_per_request * c.num_layer_heads * ENTRY_BYTES * 2
    return {
        "directory": c.dir_size * ENTRY_BYTES,
        "segments_live": live_segments * per_segment,
        "segments_reserved": c.num_segments * per_segment,
        "two_level_live": c.dir_size * ENTRY_BYTES + live_segments * per_segment,
        "two_level_reserved": c.dir_size * ENTRY_BYTES + c.num_segments * per_segment,
        "flat": flat,
    }


def check_directory(d: PageDirectory, on_device: bool = False) -> None:
    """PageDirectory.check_integrity (module docstring): AssertionError naming what is broken.
    on_device: check the device copy of hbm_l2 and slot_entry (synchronizes; call while idle)."""
    c, S = d.config, d.config.segment_pages
    meta = d.meta_gpu.cpu().numpy() if on_device else d.meta_cpu
    l2, rev = meta[d.l2_offset : d.rev_offset], meta[d.rev_offset : d.spare]
    hbm_l2 = l2.reshape(d.hbm_l2_cpu.shape)
    for allocator in (d.segments, d.host_slots, d.hbm_slots):
        allocator.check()
    _require(not d.num_pages[~d.active].any(), "an idle request slot has pages")
    need = -(-d.num_pages // S)
    in_use = np.arange(c.max_segments)[None, :] < need[:, None]
    _require(np.array_equal(d.dir_cpu != NONE, in_use), "directory rows != request sizes")
    req_of, col_of = np.nonzero(in_use)
    segs = d.dir_cpu[req_of, col_of]
    _require(_owned_once(segs, d.segments), "a segment is neither free nor owned once")
    # [n, S] bool: page of the live segment lies inside its request's context
    valid = (col_of[:, None] * S + np.arange(S)) < d.num_pages[req_of][:, None]
    host = d.host_l2_cpu[segs]
    _require((host[valid] != NONE).all() and (host[~valid] == NONE).all(), "host entries")
    _require(_owned_once(host[valid].ravel(), d.host_slots), "a host slot is not owned once")
    owned = d.hbm_owner != NONE
    expect = ~d.hbm_slots.free_mask()
    expect[DUMMY_SLOT] = False
    _require(np.array_equal(owned, expect), "an HBM slot is neither free nor owned")
    _require(d.active[d.hbm_owner[owned]].all(), "an HBM slot owned by an idle slot")
    hbm = hbm_l2[segs]
    _require((hbm[~valid] == NONE).all(), "HBM entry beyond a request's context")
    owner_req = np.broadcast_to(req_of[:, None, None], hbm.shape)[valid]
    live = hbm[valid]
    _require(
        (d.hbm_owner[live[live != NONE]] == owner_req[live != NONE]).all(),
        "an HBM entry points at a slot its request does not own",
    )
    where = np.flatnonzero(l2[c.segment_entries :] != NONE) + c.segment_entries
    _require(not duplicates(l2[where]).size, "two page entries share one HBM slot")
    _require(
        np.array_equal(rev[l2[where]], d.l2_offset + where) and (rev != NONE).sum() == where.size,
        "HBM reverse map (slot_entry) is stale",
    )
    _require(
        (hbm_l2[0] == DUMMY_SLOT).all() and (d.host_l2_cpu[0] == DUMMY_SLOT).all(),
        "the dummy segment was overwritten",
    )


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"page directory integrity: {what}")


def _owned_once(ids: np.ndarray, allocator: SlotAllocator) -> bool:
    """Every used slot of `allocator` appears exactly once in `ids`, no free slot appears."""
    counts = np.bincount(ids.astype(np.int64), minlength=allocator.num_slots)
    used = ~allocator.free_mask()
    used[DUMMY_SLOT] = False
    return counts.max(initial=0) <= 1 and np.array_equal(counts > 0, used)
