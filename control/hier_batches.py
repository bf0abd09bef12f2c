"""The batch-building and accounting half of HierarchicalKVManager (control/hier_kv_manager.py,
split off for size): HBM slot lookups for ForwardBatches and sparse page tables, the vectorised
hierarchical decode batch, counters (stats, metrics) and check_integrity. It reads the
manager's state (`_held`, `dir`, `sets`, `LH`, `lh0`, ...) and is not used on its own."""

from __future__ import annotations

import numpy as np
import torch

from spinserve.runtime.batch import ForwardBatch, ForwardMode, SparseDecode
from spinserve.runtime.lru import PAD
from spinserve.runtime.transfer import to_device

from .kv_manager import BatchItem, build_forward_batch
from .page_directory import NONE
from .working_sets import HeldRequest


class HierarchyBatches:
    """Mixin of HierarchicalKVManager: tables, batches and accounting."""

    # ---- tables and batches ---------------------------------------------------------------
    def _resident(
        self, held: HeldRequest, pages: np.ndarray, columns: int | None = None
    ) -> np.ndarray:
        """[n, LH] int32 HBM slots of pages the control plane placed (resident requests, tail
        pages, dense layers), or their first `columns` (layer, kv_head) columns; AssertionError
        if one is not resident."""
        slots = self.dir.hbm_entries(held.row, pages, columns)
        if held.hierarchical:
            slots = slots.copy()
            slots[:, self.lh0 :][pages < held.num_pages - 1] = 0  # rows: the graph's business
        if (slots == NONE).any():
            raise AssertionError("a page the batch reads from HBM is not resident")
        return slots

    def request_table(self, request_id: str) -> np.ndarray:
        """[L, KV, num_pages] int32 HBM slots of a resident request (index building)."""
        held = self._held[request_id]
        n = held.num_pages
        return self._resident(held, np.arange(n)).T.reshape(self.num_layers, self.num_kv_heads, n)

    def batch_table(self, request_ids: list[str], layers: int | None = None) -> np.ndarray:
        """[layers, B, KV, N] int32 HBM slots of the first `layers` layers (None: all), 0
        padded. For hierarchical requests only the dense layers and the tail page are
        meaningful (sparse rows resolve in the decode step): ask for the dense layers."""
        n_max = max(self._held[r].num_pages for r in request_ids)
        L, KV = self.num_layers if layers is None else layers, self.num_kv_heads
        out = np.zeros((L, len(request_ids), KV, n_max), np.int32)
        for b, r in enumerate(request_ids if L else ()):
            n = self._held[r].num_pages
            slots = self._columns(self._held[r], L * KV)
            out[:, b, :, :n] = slots.T.reshape(L, KV, n)
        return out

    def _columns(self, held: HeldRequest, columns: int) -> np.ndarray:
        """[num_pages, columns] HBM slots (_resident); the dense layers' columns are cached per
        request and extended by the pages added since (every step reads them)."""
        if columns > self.lh0:
            return self._resident(held, np.arange(held.num_pages), columns)
        cache = held.columns
        if cache is None or cache.shape[1] != columns:
            cache = np.zeros((0, columns), np.int32)
        if cache.shape[0] < held.num_pages:
            new = self._resident(held, np.arange(cache.shape[0], held.num_pages), columns)
            cache = held.columns = np.concatenate([cache, new])
        return cache[: held.num_pages]

    def build_batch(self, mode: ForwardMode, items: list[BatchItem], device) -> ForwardBatch:
        """Tables -> ForwardBatch (pages ensured), then flush. Hierarchical requests list only
        their tail page in the dense CSR: their attention pages come from the decode step
        (_decode_batch, the only way a hierarchical request reaches a forward)."""
        self.flush()
        helds = [self._held[it.request_id] for it in items]
        if mode is ForwardMode.DECODE and all(h.hierarchical for h in helds):
            return self._decode_batch(items, helds, device)
        return build_forward_batch(
            mode,
            items,
            self.num_layers,
            self.num_kv_heads,
            self.page_size,
            device,
            slots_of=lambda rid, pages: self._resident(self._held[rid], pages).T,
            range_of=lambda rid, a, b: self._resident(self._held[rid], np.arange(a, b)).T,
            first_page_of=lambda rid, n: n - 1 if self._held[rid].hierarchical else 0,
        )

    def _decode_batch(
        self, items: list[BatchItem], helds: list[HeldRequest], device
    ) -> ForwardBatch:
        """build_forward_batch for one token per hierarchical request, vectorised: every slot
        it needs is the request's tail page's (appended to, and the only page listed)."""
        B, L, KV, P = len(items), self.num_layers, self.num_kv_heads, self.page_size
        if any(len(it.token_ids) != 1 or it.all_logits for it in items):
            raise AssertionError("a decode item carries one token and its logits only")
        tails = self.tails_cpu[np.fromiter((h.row for h in helds), np.int64, B)]  # [B, LH]
        if (tails == NONE).any():
            raise AssertionError("a hierarchical request's tail page has no HBM slots")
        pos = np.fromiter((it.start_pos for it in items), np.int64, B)
        if (pos // P != np.fromiter((h.num_pages for h in helds), np.int64, B) - 1).any():
            raise AssertionError("a decode token is not on its request's tail page")
        per_layer = np.ascontiguousarray(tails.reshape(B, L, KV).transpose(1, 0, 2))  # [L, B, KV]

        def t(a, dtype):
            return to_device(a, dtype, device)  # no host sync: a launch may be in flight

        rows = np.arange(B * KV + 1)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=t([it.token_ids[0] for it in items], torch.int64),
            positions=t(pos, torch.int64),
            append_slots=t(per_layer, torch.int32),
            append_offsets=t(pos % P, torch.int32),
            qo_indptr=t(np.arange(B + 1), torch.int32),
            kv_indptr=t(rows, torch.int32),
            kv_slots=t(per_layer.reshape(L, B * KV), torch.int32),
            kv_last_page_len=t(np.repeat(pos % P + 1, KV), torch.int32),
            logits_indices=t(np.arange(B), torch.int64),
        )

    def attach(self, sparse: SparseDecode, request_ids: list[str]) -> None:
        """Route a sparse decode batch through the hierarchy (every request hierarchical)."""
        if not all(self._held[r].hierarchical for r in request_ids):
            raise AssertionError("a sparse decode request is still resident (no finish_prefill)")
        sparse.hierarchy = self.hierarchy

    # ---- accounting -------------------------------------------------------------------------
    @property
    def stats(self) -> torch.Tensor:
        """[5] int64 cumulative counters (runtime.hierarchy LOOKUPS, HITS, FETCHED, ...)."""
        return self.hierarchy.stats

    def metrics(self) -> dict[str, float]:
        """engine.stats() keys of control/metrics.py (reads the device counters: one sync, so
        call it from a periodic snapshot, not per step). hit_rate covers the calls' interval."""
        lookups, hits, fetched, _, offloaded = self.stats.tolist()
        last = getattr(self, "_last_counts", (0, 0))
        self._last_counts = (lookups, hits)
        window = lookups - last[0]
        slot_bytes = self.hbm_pool[0].numel() * self.hbm_pool.element_size()
        return {
            "hbm_pages_used": self.hbm_slots.num_used // self.LH,
            "hbm_pages_total": self.hbm_slots.capacity // self.LH,
            "host_pages_used": self.host.allocator.num_used // self.LH,
            "host_pages_total": self.host.allocator.capacity // self.LH,
            "hit_rate": (hits - last[1]) / window if window else 1.0,
            "page_hits": hits,
            "page_lookups": lookups,
            "pcie_bytes_fetched": fetched * slot_bytes,
            "pcie_bytes_offloaded": offloaded * slot_bytes,
        }

    def check_integrity(self, on_device: bool = False) -> None:
        """Directory invariants, plus: each request owns exactly its resident slots, rows and
        tail; the device row_slots mirror the CPU ones; idle rows own nothing.
        on_device: flush, then also check the device tables (synchronizes: call while idle)."""
        if on_device:
            self.flush()
        self.dir.check_integrity(on_device=on_device)
        held_rows = sorted(h.row for h in self._held.values())
        if sorted(held_rows + self._free_rows) != list(range(self.config.max_requests)):
            raise AssertionError("request rows leaked or held twice")
        for rid, h in self._held.items():
            owned = np.flatnonzero(self.dir.hbm_owner == h.row)
            static = self.dir.hbm_entries(h.row, np.arange(h.num_pages))
            if h.hierarchical:
                tail = h.tail[self.lh0 :]  # the dense layers' tail is among their static pages
                parts = [static[:, : self.lh0].ravel(), tail[tail != NONE], h.rows.ravel()]
                expect = np.concatenate(parts)
                if h.rows.shape[1] > h.width:
                    raise AssertionError(f"{rid}: {h.rows.shape[1]} row slots > width {h.width}")
            else:
                expect = static.ravel()
            if expect.size != owned.size or not np.array_equal(np.sort(expect), owned):
                raise AssertionError(f"{rid}: owned HBM slots != resident + rows + tail")
        self._check_rows(on_device)

    def _check_rows(self, on_device: bool) -> None:
        """row_slots_cpu lists exactly each hierarchical request's rows (-1 elsewhere), the
        device copy equals it (on_device), the reclaimable total is right."""
        sets, hier = self.sets, [h for h in self._held.values() if h.hierarchical]
        reclaimable = sum(max(0, h.rows.shape[1] - h.mandatory) * self.LHs for h in hier)
        if reclaimable != sets.reclaimable:
            raise AssertionError(f"reclaimable HBM {sets.reclaimable} != {reclaimable}")
        expect = np.full_like(sets.row_slots_cpu, PAD)
        for h in hier:
            expect[h.row, self.lh0 :, : h.rows.shape[1]] = h.rows
        if not np.array_equal(sets.row_slots_cpu, expect):
            raise AssertionError("row_slots_cpu differs from the requests' rows")
        if on_device and not np.array_equal(sets.row_slots_gpu.cpu().numpy(), expect):
            raise AssertionError("device row_slots differ from the CPU mirror (flush missing?)")
