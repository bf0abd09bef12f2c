"""Two-level page metadata (DESIGN.md "Two-level metadata").

A flat table would reserve max_requests x max_pages x LH entries (LH = num_layers x num_kv_heads),
more than the KV itself at long contexts. Here:
  level 1  `dir`     [max_requests, max_segments] int32: segment id per (request slot, segment
                      index), -1 = none. Small and static.
  level 2  `hbm_l2`  [num_segments, S, LH] int32: HBM slot of (logical page, layer x kv_head), -1 =
                      not resident in HBM.
           `host_l2` [num_segments, S, LH] int32: host-pool slot of the same page (every page has
                      one from its allocation on; the offload kernel writes there when the page
                      completes). Lives in pinned, device-mapped memory with CUDA: the gather
                      kernel reads it through UVA on a miss, so it needs no upload.
  Entry of (request r, logical page p, lh) = l2[dir[r, p // S], p % S, lh].
Segments come from a pool (segment 0 = the dummy segment, all entries 0 = the dummy slots) as a
request's context grows and go back when it ends, so table bytes follow the live context.

  reverse  `slot_entry` [num_hbm_slots] int32: flat index (into meta) of the hbm_l2 entry each
                      HBM slot holds, -1 = none. The decode graph needs it to evict a victim.
All three int32 tables form one flat array `meta` = [dir | hbm_l2 | slot_entry | spare], kept on
the CPU (`meta_cpu`) and mirrored on the device (`meta_gpu`).

Data flow per step: the control plane mutates `meta_cpu` (numpy, numba for ragged loops) and
logs the indices it touched and the HBM slots it re-pointed or took back (`log`,
control/table_upload.py); `flush()` uploads them in ONE non-blocking copy, clears on the device
the entries those slots held there, then scatters the values. The decode graph also
changes the device copy (installs a miss of entry e into victim v: meta[slot_entry[v]] = -1,
meta[e] = v, slot_entry[v] = e); the control plane only writes entries of pages it creates, of
fresh segments and of slots it re-points, so neither side clobbers the other.

Ownership (checked by `check_integrity`): each HBM slot in use is owned by one request
(`hbm_owner`); each host slot in use is referenced by exactly one host entry of a live request;
each segment in use sits in exactly one directory row.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from spinserve.control.host_pool import MappedHostBuffer
from spinserve.control.page_accounting import (
    ENTRY_BYTES,
    DirectoryConfig,
    check_directory,
    table_bytes,
)
from spinserve.control.slot_allocator import DUMMY_SLOT, SlotAllocator, duplicates
from spinserve.control.table_upload import TableUpload

NONE = -1  # "no segment" / "no slot" in every table
__all__ = ["NONE", "DirectoryConfig", "PageDirectory"]


@numba.njit(cache=True)
def _fill_directory(dir_tab, reqs, old_segs, new_segs, seg_ids):  # pragma: no cover - numba
    """Write new segment ids into directory rows; returns the flat indices written."""
    written = np.empty(seg_ids.size, dtype=np.int64)
    k = 0
    for i in range(reqs.size):
        for j in range(old_segs[i], new_segs[i]):
            dir_tab[reqs[i], j] = seg_ids[k]
            written[k] = reqs[i] * dir_tab.shape[1] + j
            k += 1
    return written


@numba.njit(cache=True)
def _fill_host_pages(dir_tab, host_l2, reqs, old_pages, new_pages, host_slots, seg_pages):
    k = 0  # pragma: no cover - numba
    for i in range(reqs.size):
        for p in range(old_pages[i], new_pages[i]):
            seg = dir_tab[reqs[i], p // seg_pages]
            host_l2[seg, p % seg_pages, :] = host_slots[k]
            k += 1


class PageDirectory:
    """Level-1 directory + level-2 segments, with CPU copies and a device mirror."""

    def __init__(
        self,
        config: DirectoryConfig,
        hbm_slots: SlotAllocator,
        host_slots: SlotAllocator,
        device: torch.device | str = "cpu",
        use_cuda: bool | None = None,
    ) -> None:
        c = self.config = config
        self.hbm_slots, self.host_slots = hbm_slots, host_slots
        self.device = torch.device(device)
        self.segments = SlotAllocator(
            c.num_segments,
            name="page-table segments",
            remedy="Raise num_segments (level-2 pool) or admit fewer/shorter requests",
        )
        self.l2_offset = c.dir_size  # hbm_l2 entry (seg, s, lh) is meta[l2_offset + ...]
        self.rev_offset = c.dir_size + c.l2_size  # slot_entry[slot] is meta[rev_offset + slot]
        self.spare = self.rev_offset + hbm_slots.num_slots  # a write target for padding
        # [spare + 1] int32: dir | hbm_l2 | slot_entry | spare (layout in the module docstring)
        self.meta_cpu = np.full(self.spare + 1, NONE, dtype=np.int32)
        # [max_requests, max_segments] int32: segment id, -1 = none
        self.dir_cpu = self.meta_cpu[: c.dir_size].reshape(c.max_requests, c.max_segments)
        # [num_segments, S, LH] int32: HBM slot per page entry, -1 = not resident
        self.hbm_l2_cpu = self.meta_cpu[c.dir_size : c.dir_size + c.l2_size].reshape(
            c.num_segments, c.segment_pages, c.num_layer_heads
        )
        self.hbm_l2_cpu[0] = DUMMY_SLOT
        # [max_requests] int32: logical pages allocated per request slot
        self.num_pages = np.zeros(c.max_requests, dtype=np.int32)
        # [max_requests] bool: request slot admitted
        self.active = np.zeros(c.max_requests, dtype=bool)
        # [hbm_slots.num_slots] int32: request slot owning each HBM slot, -1 = none
        self.hbm_owner = np.full(hbm_slots.num_slots, NONE, dtype=np.int32)
        # [hbm_slots.num_slots] int32: meta index of the hbm_l2 entry holding each slot, -1 = none
        self.slot_entry_cpu = self.meta_cpu[self.rev_offset : self.spare]
        self._init_host_table(use_cuda)
        # [spare + 1] int32 on device: mirror of meta_cpu (same layout)
        self.meta_gpu = torch.from_numpy(self.meta_cpu).to(self.device, copy=True)
        self.dir_gpu = self.meta_gpu[: c.dir_size].view(c.max_requests, c.max_segments)
        self.hbm_l2_gpu = self.meta_gpu[c.dir_size : c.dir_size + c.l2_size].view(
            c.num_segments, c.segment_pages, c.num_layer_heads
        )
        self.slot_entry_gpu = self.meta_gpu[self.rev_offset : self.spare]
        self.log = TableUpload(self.meta_gpu, self.slot_entry_gpu, self.spare)  # changes
        num_hbm = self.hbm_owner.size
        self._fresh: list[np.ndarray] = []  # HBM slots given entries (set_hbm) since then
        self._handed: list[np.ndarray] = []  # hand_over slots the next flush forgets
        self._handed_mask = np.zeros(num_hbm, bool)  # [num_hbm_slots] still to be forgotten

    def _init_host_table(self, use_cuda: bool | None) -> None:
        c = self.config
        shape = (c.num_segments, c.segment_pages, c.num_layer_heads)
        if use_cuda is None:
            use_cuda = self.device.type == "cuda"
        self._host_buffer: MappedHostBuffer | None = None
        if use_cuda:
            self._host_buffer = MappedHostBuffer(c.l2_size * ENTRY_BYTES, self.device.index)
            self.host_l2_cpu = self._host_buffer.numpy_view(np.int32, shape)
            self.host_l2_gpu = self._host_buffer.gpu_view(torch.int32, shape)
        else:
            self.host_l2_cpu = np.empty(shape, dtype=np.int32)
            self.host_l2_gpu = torch.from_numpy(self.host_l2_cpu)  # same memory
        # [num_segments, S, LH] int32: host slot per page entry, -1 = none
        self.host_l2_cpu[...] = NONE
        self.host_l2_cpu[0] = DUMMY_SLOT

    def close(self) -> None:
        if self._host_buffer is not None:
            self.host_l2_cpu = self.host_l2_gpu = None  # type: ignore[assignment]
            self._host_buffer.close()

    # ---- request lifetime -------------------------------------------------------------------
    def admit(self, req: int) -> None:
        if self.active[req]:
            raise ValueError(f"request slot {req} is already in use")
        self.active[req] = True
        self.num_pages[req] = 0

    def grow(self, reqs: np.ndarray, new_num_pages: np.ndarray) -> None:
        """Extend requests to `new_num_pages` logical pages each: new segments as needed and a
        host slot for every new (page, lh). All or nothing: OutOfSlotsError changes nothing."""
        reqs = np.asarray(reqs, dtype=np.int64).ravel()
        new = np.asarray(new_num_pages, dtype=np.int64).ravel()
        old = self.num_pages[reqs].astype(np.int64)
        self._check_grow(reqs, old, new)
        c = self.config
        old_segs, new_segs = -(-old // c.segment_pages), -(-new // c.segment_pages)
        num_segs = int((new_segs - old_segs).sum())
        num_host = int((new - old).sum()) * c.num_layer_heads
        if not self.segments.can_alloc(num_segs):
            self.segments.alloc(num_segs)  # raises OutOfSlotsError naming the pool
        if not self.host_slots.can_alloc(num_host):
            self.host_slots.alloc(num_host)
        segs = self.segments.alloc(num_segs)
        host = self.host_slots.alloc(num_host).reshape(-1, c.num_layer_heads)
        self.hbm_l2_cpu[segs] = NONE
        self.host_l2_cpu[segs] = NONE
        self.log.dirty.append(_fill_directory(self.dir_cpu, reqs, old_segs, new_segs, segs))
        _fill_host_pages(self.dir_cpu, self.host_l2_cpu, reqs, old, new, host, c.segment_pages)
        self.num_pages[reqs] = new
        self._mark_segments_dirty(segs)

    def _check_grow(self, reqs: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        if reqs.size != new.size:
            raise ValueError("grow: reqs and new_num_pages differ in length")
        if not self.active[reqs].all():
            idle = reqs[~self.active[reqs]].tolist()
            raise ValueError(f"grow: request slot(s) {idle} not admitted")
        if duplicates(reqs).size:
            raise ValueError("grow: a request slot appears twice")
        if (new < old).any() or (new > self.config.max_pages_per_request).any():
            raise ValueError(
                f"grow: page counts must not shrink and must be <= "
                f"{self.config.max_pages_per_request} (max context)"
            )

    def release(self, req: int) -> np.ndarray:
        """End a request (finish or cancel): free its host slots, segments and HBM slots.
        Returns the HBM slots it owned (the caller marks them empty in the LRU)."""
        if not self.active[req]:
            raise ValueError(f"release: request slot {req} is not in use")
        row = self.dir_cpu[req]
        segs = row[row != NONE]
        host = self.host_l2_cpu[segs].ravel()
        self.host_slots.free(host[host != NONE])
        self.segments.free(segs)
        self.host_l2_cpu[segs] = NONE
        self.hbm_l2_cpu[segs] = NONE
        hbm = np.flatnonzero(self.hbm_owner == req).astype(np.int32)
        self.hbm_owner[hbm] = NONE
        self.slot_entry_cpu[hbm] = NONE
        self.hbm_slots.free(hbm)
        self._cancel_handed(hbm)
        self.log.moved.append(hbm)
        self.log.dirty.append(self.rev_offset + hbm.astype(np.int64))
        row[:] = NONE
        self.log.dirty.append(req * self.config.max_segments + np.arange(self.config.max_segments))
        self.active[req] = False
        self.num_pages[req] = 0
        return hbm

    # ---- HBM ownership and entries ------------------------------------------------------
    def own_hbm(
        self, reqs: int | np.ndarray, nums: int | np.ndarray, slots: np.ndarray | None = None
    ) -> np.ndarray:
        """Give each request in `reqs` `nums` fresh HBM slots (its budget grows): the slots,
        grouped by request in order. OutOfSlotsError (nothing changed) if the pool is short.
        slots: [sum(nums)] slots to own instead, out of the pool and owned by no request (taken
        with hbm_slots.alloc or kept by disown_hbm(keep=True))."""
        reqs = np.atleast_1d(np.asarray(reqs, dtype=np.int64))
        nums = np.broadcast_to(np.asarray(nums, dtype=np.int64), reqs.shape)
        if not self.active[reqs].all():
            raise ValueError(f"own_hbm: request slot(s) {reqs[~self.active[reqs]]} not in use")
        if slots is None:
            slots = self.hbm_slots.alloc(int(nums.sum()))
        elif (
            slots.size != nums.sum()
            or (self.hbm_owner[slots] != NONE).any()
            or self.hbm_slots.is_free(slots).any()
        ):
            raise ValueError("own_hbm: given slots are owned, free, or not one per request slot")
        self.hbm_owner[slots] = np.repeat(reqs, nums)
        return slots

    def disown_hbm(self, reqs: int | np.ndarray, slots: np.ndarray, keep: bool = False) -> None:
        """Take HBM slots back (budgets shrink); `reqs` = owner of each slot (or one for all).
        Entries pointing at them are cleared here and, at the next flush, on the device.
        keep: the slots stay out of the pool, for the caller to own_hbm(slots=) right away."""
        slots = np.asarray(slots, dtype=np.int64).ravel()
        if (self.hbm_owner[slots] != np.broadcast_to(reqs, slots.shape)).any():
            raise ValueError(f"disown_hbm: slot(s) not owned by request slot(s) {reqs}")
        entries = self.slot_entry_cpu[slots]
        entries = entries[entries != NONE]
        self.meta_cpu[entries] = NONE
        self.slot_entry_cpu[slots] = NONE
        self.log.dirty += [entries, self.rev_offset + slots]
        self.hbm_owner[slots] = NONE
        if not keep:
            self.hbm_slots.free(slots)
        self._cancel_handed(slots)
        self.log.moved.append(slots)

    def hand_over(self, slots: np.ndarray) -> None:
        """HBM slots holding pages become the decode graph's (its LRU rows): the CPU tables
        forget which page each holds (its hbm_l2 entry and slot_entry go to -1 in meta_cpu)
        without touching the device tables, where the graph may move them from now on. The
        device must know these pages first: slots given entries since the last flush flush now,
        the others are forgotten by the next flush (after it reads the values it uploads);
        ownership (hbm_owner) is unchanged. Without this, a later disown_hbm or set_hbm would
        write the CPU's stale belief over the graph's entries."""
        s = np.asarray(slots, dtype=np.int64).ravel()
        if ((s < 0) | (s >= self.hbm_owner.size)).any() or (self.hbm_owner[s] == NONE).any():
            raise ValueError("hand_over: slot out of range or owned by no request")
        fresh = np.concatenate(self._fresh) if self._fresh else s[:0]
        if np.isin(s, fresh).any():  # their entries are not on the device yet: push now
            self.flush()
            self._forget(s)
        else:  # deferred to the next flush (one per step): same result, no extra upload
            self._handed.append(s)
            self._handed_mask[s] = True

    def _cancel_handed(self, freed: np.ndarray) -> None:
        """Freed slots leave the deferred hand-overs (a new owner's entries are not theirs)."""
        if self._handed:
            self._handed_mask[np.asarray(freed, np.int64)] = False

    def _forget(self, slots: np.ndarray) -> None:
        """The CPU-side half of hand_over, for the slots still owned."""
        s = slots[self.hbm_owner[slots] != NONE]
        entries = self.slot_entry_cpu[s]
        self.meta_cpu[entries[entries != NONE]] = NONE
        self.slot_entry_cpu[s] = NONE

    def set_hbm(self, reqs: np.ndarray, pages: np.ndarray, slots: np.ndarray) -> None:
        """HBM entries of pages: slots [n, LH] int32, -1 = not resident. Each slot must be owned
        by its request and hold no other page. Meant for pages the decode graph has not touched
        yet (fresh tail pages, prefill pages): after that the graph owns their residency."""
        lh = self.config.num_layer_heads
        reqs = np.asarray(reqs, dtype=np.int64).ravel()
        pages = np.asarray(pages, dtype=np.int64).ravel()
        slots = np.asarray(slots, dtype=np.int32).reshape(reqs.size, lh)
        if reqs.size == 0:
            return
        if (pages >= self.num_pages[reqs]).any() or (pages < 0).any():
            raise ValueError("set_hbm: page not allocated (grow the request first)")
        resident = slots != NONE
        if (
            self.hbm_owner[slots[resident]] != np.broadcast_to(reqs[:, None], slots.shape)[resident]
        ).any():
            raise ValueError("set_hbm: HBM slot not owned by the request (own_hbm first)")
        S = self.config.segment_pages
        segs = self.dir_cpu[reqs, pages // S].astype(np.int64)
        flat = self.config.dir_size + ((segs * S + pages % S) * lh)[:, None] + np.arange(lh)
        # a slot may already hold a page only if that page is one rewritten here
        held = self.slot_entry_cpu[slots[resident]]
        held_row = held[held != NONE] - (held[held != NONE] - self.l2_offset) % lh
        rows = np.sort(flat[:, 0])
        clash = (rows[np.minimum(np.searchsorted(rows, held_row), rows.size - 1)] != held_row).any()
        if clash or duplicates(slots[resident]).size or duplicates(flat[:, 0]).size:
            raise ValueError("set_hbm: an HBM slot would hold two pages, or a page is listed twice")
        old = self.meta_cpu[flat]
        old = old[old != NONE].astype(np.int64)
        new = slots[resident].astype(np.int64)
        self.slot_entry_cpu[old] = NONE
        self.meta_cpu[flat] = slots
        self.slot_entry_cpu[new] = flat[resident]
        self.log.dirty += [flat.ravel(), self.rev_offset + old, self.rev_offset + new]
        self.log.moved += [old, new]
        self._fresh.append(new)

    def hbm_entries(
        self, req: int | np.ndarray, pages: np.ndarray, columns: int | None = None
    ) -> np.ndarray:
        """[n, LH] int32 CPU-side HBM entries of pages (`req`: one, or one per page), or only
        their first `columns` (layer, kv_head) columns (gathers just those)."""
        return self.hbm_l2_cpu[:, :, :columns][self._locate(req, pages)]

    def host_entries(self, req: int | np.ndarray, pages: np.ndarray) -> np.ndarray:
        """[n, LH] int32 host slots of pages (`req`: one, or one per page)."""
        return self.host_l2_cpu[self._locate(req, pages)]

    def _locate(self, req: int | np.ndarray, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pages = np.asarray(pages, dtype=np.int64)
        S = self.config.segment_pages
        return self.dir_cpu[req, pages // S], pages % S

    def _mark_segments_dirty(self, segs: np.ndarray) -> None:
        if segs.size:
            n = self.config.segment_entries
            base = self.config.dir_size + segs.astype(np.int64) * n
            self.log.dirty.append((base[:, None] + np.arange(n)).ravel())

    # ---- device sync ----------------------------------------------------------------------
    def flush(self) -> int:
        """Push the changes since the last flush to `meta_gpu` (TableUpload: ONE non-blocking
        copy; on the device the entries moved slots hold are cleared, then the values
        scattered), then forget the deferred hand-overs. Returns the number of values written."""
        idx, moved = self.log.take()
        values = self.meta_cpu[idx]  # read before the deferred hand-overs forget entries:
        for slots in self._handed:  # the device gets the state they were handed over in
            self._forget(slots[self._handed_mask[slots]])
            self._handed_mask[slots] = False
        self._fresh = []
        self._handed = []
        return self.log.push(idx, values, moved)

    # ---- accounting ---------------------------------------------------------------------------
    def table_bytes(self) -> dict[str, int]:
        """Bytes of the two-level tables (HBM-entry + host-entry tables) vs a flat table."""
        return table_bytes(self.config, self.segments.num_used)

    def check_integrity(self, on_device: bool = False) -> None:
        """Raise AssertionError unless every segment, host slot and HBM slot is free or owned
        exactly once and the reverse map matches. on_device: check the device copy of hbm_l2
        and slot_entry (synchronizes; call while idle). control/page_accounting.py."""
        check_directory(self, on_device)
