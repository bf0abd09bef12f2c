"""In-graph hierarchical KV step (DESIGN.md "Locality-aware cache manager", "Execution").

A sparse algorithm selects LOGICAL pages per row r = b * KV + h of a layer. This module turns
them into HBM slots for plugins.ops.paged_decode_attention, fetching what is not resident:

  selection (CSR of logical pages)
    -> residency lookup in the two-level tables (dir -> hbm_l2 entry -> HBM slot, -1 = miss)
    -> hits are touched in the LRU (age 0: never a victim in this step)
    -> victims per row among the HBM slots that row owns (`row_slots`), oldest buckets first
    -> table updates on the device (the victim's old page loses its entry; the missed page and
       the victim's reverse entry are set: runtime/lru.install_pages)
    -> ONE gather_pages launch host pool -> HBM victims (grid = worst case, idle programs exit)
    -> CSR of HBM slots, same indptr as the selection.
Offload: pages completed by this step's tokens are written to the host pool (ONE scatter_pages
launch per step, `offload_completed`).
Counters accumulate on the device, never read in a step: `stats` [5] (LOOKUPS, HITS, FETCHED,
SHORT, OFFLOADED) and `row_stats` [max_requests, 2] (lookups, hits per directory row: the hit
rates the control plane resizes buffers from, HierarchicalKVManager.rebalance).

Everything is a torch op or a custom op on device tensors with static shapes (padding: -1 in
page lists, the dummy slot 0 in slot lists): no host sync, so it captures into a CUDA graph and
replays. On CPU the same code runs eagerly (gather/scatter fall back to the torch reference).

Tables come from the control plane (control/page_directory.py) as tensors plus integer offsets
(`TableLayout`); this module never imports control. The control plane must guarantee:
  - every row owns at least as many slots as it can select in one step (`row_slots` width and
    contents); otherwise the pages left without a victim read the dummy slot and are counted in
    `stats[SHORT]` (a budget bug, never silent to a test);
  - the tail page being appended to is resident, and its slot is not in `row_slots` (or is
    protected anyway: `begin_step` touches every append slot before any victim is chosen);
  - request slots (directory rows) equal the `req_slots` of the batch; padding rows use -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spinserve.plugins import ops
from spinserve.plugins._triton_util import use_triton

from .lru import PAD, BucketedLRU, assign_victims, install_pages, page_entry_index

DUMMY_SLOT = 0
# indices into HierarchicalKV.stats (cumulative counters, int64 on the device)
LOOKUPS, HITS, FETCHED, SHORT, OFFLOADED = range(5)


@dataclass(frozen=True, slots=True)
class TableLayout:
    """Integer layout of the flat page metadata (PageDirectory's offsets) and of the model."""

    l2_offset: int  # meta[l2_offset + (seg * S + p % S) * LH + lh] = HBM slot of a page
    rev_offset: int  # meta[rev_offset + slot] = meta index of the entry the slot holds
    spare: int  # meta[spare] == -1: padding lookups and writes land here
    segment_pages: int  # S
    num_layers: int  # L
    num_kv_heads: int  # KV; LH = L * KV
    page_size: int  # P

    @property
    def num_layer_heads(self) -> int:
        return self.num_layers * self.num_kv_heads


@dataclass(slots=True)
class HierarchyTables:
    """Device tensors shared with the control plane (it mutates them between launches)."""

    meta: torch.Tensor  # [spare + 1] int32: dir | hbm_l2 | slot_entry | spare (PageDirectory)
    directory: torch.Tensor  # [max_requests, max_segments] int32 view of meta: segment ids
    host_l2: torch.Tensor  # [num_segments, S, LH] int32: host slot per page (mapped pinned)
    row_slots: torch.Tensor  # [max_requests, LH, W] int32: HBM slots each row owns, -1 = none


class HierarchicalKV:
    """Resolves selected logical pages to HBM slots inside the decode step (module docstring).

    hbm_pool [S_hbm, 2, P, D] and host_pool [S_host, 2, P, D] (the view kernels read: UVA with
    CUDA) share dtype and page shape. `max_selected_pages` (K) bounds the pages one row selects
    in a step: it sizes the padded work arrays and the gather grid (rows * K)."""

    def __init__(
        self,
        layout: TableLayout,
        tables: HierarchyTables,
        lru: BucketedLRU,
        hbm_pool: torch.Tensor,
        host_pool: torch.Tensor,
        max_selected_pages: int,
        fused: bool = False,
    ) -> None:
        if max_selected_pages < 1:
            raise ValueError(f"max_selected_pages must be >= 1, got {max_selected_pages}")
        self.layout, self.tables, self.lru = layout, tables, lru
        self.hbm_pool, self.host_pool = hbm_pool, host_pool
        self.max_selected_pages = max_selected_pages
        self.device = hbm_pool.device
        # True: one fused kernel per layer (plugins resolve_pages; needs Triton: CUDA or the
        # interpreter). False: torch ops (the reference; the path measured on the H100 so far)
        if fused and not use_triton(hbm_pool):
            raise ValueError("fused resolve needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
        self.fused = fused
        # [num_segments * S * LH] int32: host_l2 flattened (index = meta index - l2_offset)
        self.host_flat = tables.host_l2.reshape(-1)
        # [5] int64 cumulative: selected pages looked up, hits, pages fetched, misses left
        # without a victim (read the dummy slot), pages offloaded to the host pool
        self.stats = torch.zeros(5, dtype=torch.int64, device=self.device)
        # [max_requests, 2] int64 cumulative per directory row (request slot): selected pages
        # looked up, hits. The control plane diffs them between rebalances (a row's counters
        # include earlier owners of the row)
        self.row_stats = torch.zeros(
            tables.directory.shape[0], 2, dtype=torch.int64, device=self.device
        )

    # ---- per step -------------------------------------------------------------------------------
    def begin_step(self, append_slots: torch.Tensor) -> None:
        """Once per decode step, before layer 0: advance the LRU epoch and protect the tail pages
        being written (append_slots [L, B, KV] int32 HBM slots)."""
        self.lru.advance()
        self.lru.touch(append_slots)

    def resolve(
        self,
        layer: int,
        req_slots: torch.Tensor,  # [B] int: directory row of each request, -1 = padding row
        kv_indptr: torch.Tensor,  # [B * KV + 1] int32: the selection's CSR
        page_ids: torch.Tensor,  # [cap] int32: logical pages, ascending per row
    ) -> torch.Tensor:  # [cap] int32: HBM slot of each selected page (dummy past indptr[-1])
        """Residency lookup, victims, install, ONE gather of the misses; see the module doc."""
        if self.fused:
            return self._resolve_fused(layer, req_slots, kv_indptr, page_ids)
        L = self.layout
        B, KV = req_slots.shape[0], L.num_kv_heads
        req = req_slots.long()[:, None].expand(B, KV).reshape(-1)  # [R] directory row per row
        lh = (layer * KV + torch.arange(KV, device=self.device)).repeat(B)  # [R]
        pages, where_, valid = _padded(kv_indptr, page_ids, self.max_selected_pages, req >= 0)
        entries = page_entry_index(
            self.tables.directory,
            req.clamp_min(0),
            pages,
            lh,
            L.l2_offset,
            L.segment_pages,
            L.num_layer_heads,
            L.spare,
        )  # [R, K] int64 meta index of each page's HBM entry (padding -> spare)
        valid = valid & (entries != L.spare)  # a page past the request's directory: none
        slots = self.tables.meta[entries]  # [R, K] int32, -1 = not resident
        hit = valid & (slots >= 0)
        miss = valid & ~hit
        self.lru.touch(torch.where(hit, slots, torch.full_like(slots, PAD)))
        owned = self.tables.row_slots[req.clamp_min(0), lh]  # [R, W]
        owned = torch.where((req >= 0)[:, None], owned, torch.full_like(owned, PAD))
        victims, found = self.lru.select_victims(owned, miss.sum(1), self.max_selected_pages)
        dest = assign_victims(miss, victims, found)  # [R, K] int32, -1 = hit / padding / short
        install_pages(self.tables.meta, entries, dest, L.rev_offset, L.spare)
        fetched = self._gather(entries, dest)
        self.lru.touch(dest)
        final = torch.where(hit, slots, torch.where(dest >= 0, dest, torch.zeros_like(dest)))
        counts = [valid.sum(), hit.sum(), fetched, (miss & (dest < 0)).sum()]
        self.stats[: SHORT + 1] += torch.stack(counts)
        # padding rows have no valid page: they add zeros to row 0
        per_row = torch.stack([valid.sum(1), hit.sum(1)], 1)  # [R, 2] int64
        self.row_stats.index_add_(0, req.clamp_min(0), per_row)
        out = torch.zeros(page_ids.numel() + 1, dtype=torch.int32, device=self.device)
        out.scatter_(0, where_.reshape(-1), final.reshape(-1))
        return out[: page_ids.numel()]

    def _resolve_fused(self, layer, req_slots, kv_indptr, page_ids) -> torch.Tensor:
        """The same step as one resolve_pages kernel (one program per row) + one gather."""
        L, K = self.layout, self.max_selected_pages
        rows = kv_indptr.numel() - 1
        out = torch.zeros_like(page_ids)  # [cap] int32
        # [rows * K] int32 compact (host slot, HBM slot) list of installed misses + its count
        gather_host = torch.zeros(rows * K, dtype=torch.int32, device=self.device)
        gather_hbm = torch.zeros_like(gather_host)
        count = torch.zeros(1, dtype=torch.int32, device=self.device)
        ops.resolve_pages(
            kv_indptr, page_ids, req_slots.long(), self.tables.directory, self.tables.meta,
            self.host_flat, self.tables.row_slots, self.lru.epoch, self.lru.current, out,
            gather_host, gather_hbm, count, self.stats, self.row_stats,
            layer, L.num_kv_heads, L.l2_offset, L.rev_offset, L.segment_pages, K,
        )  # fmt: skip
        ops.gather_pages(self.host_pool, self.hbm_pool, gather_host, gather_hbm, count)
        return out

    def _gather(self, entries: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """ONE gather_pages launch: host copy of each installed miss -> its victim slot.
        Returns the number of pages moved ([] int64 on the device)."""
        ok = (dest >= 0).reshape(-1)
        l2 = torch.where(ok, entries.reshape(-1) - self.layout.l2_offset, 0)
        host_slots = self.host_flat[_compact(ok, l2)]  # [R*K] int32, dummy past the count
        hbm_slots = _compact(ok, dest.reshape(-1)).to(torch.int32)
        num = ok.sum()
        ops.gather_pages(self.host_pool, self.hbm_pool, host_slots, hbm_slots, _count(num))
        return num

    def offload_completed(
        self,
        req_slots: torch.Tensor,  # [B] int, -1 = padding row
        positions: torch.Tensor,  # [B] int: position of the token appended this step
        append_slots: torch.Tensor,  # [L, B, KV] int32: HBM slot of each row's tail page
    ) -> None:
        """Write every tail page this step completed (position % P == P - 1) to its host slot:
        ONE scatter_pages launch over B * L * KV candidates. Call after the last layer."""
        L = self.layout
        B, LH = req_slots.shape[0], L.num_layer_heads
        done = (positions.long() % L.page_size == L.page_size - 1) & (req_slots >= 0)  # [B]
        page = torch.where(done, positions.long() // L.page_size, -1)
        req = req_slots.long().clamp_min(0)[:, None].expand(B, LH).reshape(-1)  # [B * LH]
        lh = torch.arange(LH, device=self.device).repeat(B)
        pages = page[:, None].expand(B, LH).reshape(-1, 1)  # [B * LH, 1], -1 = not complete
        entries = page_entry_index(
            self.tables.directory,
            req,
            pages,
            lh,
            L.l2_offset,
            L.segment_pages,
            LH,
            L.spare,
        ).reshape(-1)
        ok = pages.reshape(-1) >= 0
        host_slots = self.host_flat[_compact(ok, torch.where(ok, entries - L.l2_offset, 0))]
        hbm = append_slots.permute(1, 0, 2).reshape(-1)  # [B * LH] in (b, l, h) order
        hbm_slots = _compact(ok, hbm.long()).to(torch.int32)
        num = ok.sum()
        ops.scatter_pages(self.hbm_pool, self.host_pool, hbm_slots, host_slots, _count(num))
        self.stats[OFFLOADED] += num

    def offload_pages(self, hbm_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Eager helper for the end of a prefill: host_pool[host_slots] = hbm_pool[hbm_slots]
        ([n] int32 each, on the device) in one launch; counted in stats[OFFLOADED]."""
        if hbm_slots.numel() != host_slots.numel():
            raise ValueError("offload_pages: hbm_slots and host_slots differ in length")
        n = torch.tensor([hbm_slots.numel()], dtype=torch.int32, device=self.device)
        ops.scatter_pages(
            self.hbm_pool,
            self.host_pool,
            hbm_slots.int().contiguous(),
            host_slots.int().contiguous(),
            n,
        )
        self.stats[OFFLOADED] += hbm_slots.numel()


def _padded(
    kv_indptr: torch.Tensor, page_ids: torch.Tensor, k: int, row_ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR -> (pages [R, K] int64, -1 padded; position of each in page_ids [R, K] int64, padding
    -> cap (a spare output column); valid [R, K] bool). Rows with row_ok False are all padding."""
    start = kv_indptr[:-1].long()[:, None]
    count = (kv_indptr[1:].long() - kv_indptr[:-1].long())[:, None]
    j = torch.arange(k, device=kv_indptr.device)[None, :]
    cap = page_ids.numel()
    valid = (j < count) & row_ok[:, None]
    pos = (start + j).clamp(0, max(cap - 1, 0))
    pages = torch.where(valid, page_ids.long()[pos] if cap else pos, -1)
    return pages, torch.where(valid, pos, cap), valid


def _compact(ok: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values[ok] moved to the front of a same-length int64 tensor (order kept), 0 after."""
    n = ok.numel()
    dst = torch.where(ok, ok.long().cumsum(0) - 1, n)
    out = torch.zeros(n + 1, dtype=torch.int64, device=ok.device)
    out.scatter_(0, dst, values.long())
    return out[:n]


def _count(num: torch.Tensor) -> torch.Tensor:
    return num.to(torch.int32).reshape(1)
