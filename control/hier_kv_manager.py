"""HierarchicalKVManager: the KV pages of running requests in HBM + the pinned host pool.

It offers what the scheduler and the engine use of PagedKVManager (pages_for, extra_pages,
ensure, ensure_decode, free, holds, free_pages, capacity_pages, request_table, batch_table,
build_batch, check_integrity) on top of the page directory (control/page_directory.py), the host
page pool, the HBM slot allocator, the working sets (control/working_sets.py: rows, widths,
trims, per-request HBM budgets) and the GPU LRU, and it owns the decode step's HierarchicalKV
(runtime/hierarchy.py, `hierarchy`). Its batch-building and accounting half (tables,
ForwardBatches, check_integrity) is control/hier_batches.py.

A request's directory row is also its sparse-index slot (`request_slot`). Its life:
  resident      from admission through its prefill (a transient HBM budget), and for its whole
                life when it is dense (`mandatory_of` gives None: all its pages are its working
                set): every (page, layer, kv_head) has an HBM slot chosen here (set_hbm).
  hierarchical  a sparse request at the end of its prefill (`finish_prefill`): its completed
                pages go to the host pool in one launch, then each sparse row (layer >=
                dense_layers, kv_head) keeps its newest `width` pages (mandatory + buffer) in
                HBM and the rest are disowned. From then on a row's HBM slots (`rows`, mirrored
                in `sets.row_slots_cpu`) are the decode graph's: it installs misses into them (LRU
                victims), so the control plane never trusts its own entries for them. The page
                being written (the tail) has its own slots outside the rows, never a victim;
                when a step starts a new page, the old tail's slots join the rows (the step that
                completed the page offloaded it) and the rows drop their oldest slots back to
                `width`. Dense layers (< dense_layers) keep every page resident.
Every page has host slots from its allocation (grow). Admission (`free_pages`) counts host pages
and HBM pages, the latter including buffer pages that shrinking buffers to the mandatory floor
would return (done in `ensure` before any preemption is needed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from spinserve.runtime.hierarchy import HierarchicalKV, HierarchyTables, TableLayout
from spinserve.runtime.lru import BucketedLRU
from spinserve.runtime.sparse import SparseParams
from spinserve.runtime.transfer import to_device

from .budgets import BudgetPolicy, initial_buffer
from .hier_batches import HierarchyBatches
from .host_pool import HostPagePool
from .kv_manager import BatchItem
from .page_directory import NONE, DirectoryConfig, PageDirectory
from .slot_allocator import OutOfSlotsError, SlotAllocator
from .working_sets import HeldRequest, WorkingSets

if TYPE_CHECKING:
    from spinserve.configs.settings import CacheSettings
    from spinserve.runtime.model_runner import ModelRunner

__all__ = ["BatchItem", "HierarchicalKVManager", "HierarchyConfig", "mandatory_pages"]


def mandatory_pages(params: SparseParams, budget_tokens: int, page_size: int) -> int:
    """Upper bound of the pages one (request, layer, kv_head) row selects in a step: sinks,
    window (+1 for alignment), the tail, the dynamic budget, +1 slack (a full-budget row's
    ceil((budget + sinks + window) / P) pages also fit)."""
    P = page_size
    sinks, window = -(-params.sink_tokens // P), -(-params.window_tokens // P)
    return sinks + window + 1 + budget_tokens // P + 2


@dataclass(frozen=True, slots=True)
class HierarchyConfig:
    num_layers: int
    num_kv_heads: int
    page_size: int
    max_requests: int  # directory rows = sparse-index slots
    max_context: int  # tokens
    num_host_slots: int  # host pool slots including the dummy
    dense_layers: int = 0  # layers kept fully resident (the planner lists all their pages)
    buffer_ratio: float = 4.0  # buffer = buffer_ratio x mandatory (initial)
    segment_pages: int = 16  # S of the page directory
    mandatory_hint: int = 1  # mandatory pages of the default budget: sizes the device buffers
    fused_resolve: bool = False  # HierarchicalKV's fused Triton resolve (CUDA)

    @property
    def num_layer_heads(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def num_segments(self) -> int:
        """Enough for every host page, plus one partial segment per request, plus the dummy."""
        host_pages = (self.num_host_slots - 1) // self.num_layer_heads
        return host_pages // self.segment_pages + self.max_requests + 1


class HierarchicalKVManager(HierarchyBatches):
    def __init__(
        self,
        config: HierarchyConfig,
        hbm_pool: torch.Tensor,  # [num_hbm_slots, 2, P, D] the runner's KV pool (slot 0 dummy)
        host: HostPagePool,
        mandatory_of: Callable[[str], int | None],  # request id -> mandatory pages (None: dense)
    ) -> None:
        c = self.config = config
        self.page_size = c.page_size
        self.num_layers, self.num_kv_heads = c.num_layers, c.num_kv_heads
        self.LH = c.num_layer_heads
        self.lh0 = c.dense_layers * c.num_kv_heads  # first sparse (layer, kv_head) row
        self.LHs = self.LH - self.lh0
        self.hbm_pool, self.host, self.device = hbm_pool, host, hbm_pool.device
        self._mandatory_of = mandatory_of
        self.hbm_slots = SlotAllocator(
            hbm_pool.shape[0], "HBM KV pool", "raise cache.kv_cache_tokens or lower the load"
        )
        max_pages = -(-c.max_context // c.page_size)
        dcfg = DirectoryConfig(c.max_requests, max_pages, c.segment_pages, self.LH, c.num_segments)
        self.dir = PageDirectory(dcfg, self.hbm_slots, host.allocator, self.device)
        self.lru = BucketedLRU(hbm_pool.shape[0], self.device)
        self.policy = BudgetPolicy(
            buffer_ratio=c.buffer_ratio, max_buffer_ratio=max(8.0, c.buffer_ratio)
        )
        self._held: dict[str, HeldRequest] = {}
        # [max_requests, LH] int32: HBM slots of each hierarchical request's tail page, -1 =
        # none (HeldRequest.tail is a view of its row)
        self.tails_cpu = np.full((c.max_requests, self.LH), NONE, np.int32)
        self._free_rows = list(range(c.max_requests - 1, -1, -1))
        self.hierarchy: HierarchicalKV | None = None
        # sized for the default budget's widest rows up front: the device tables then never
        # move, which captured decode graphs rely on (a larger per-request budget rebuilds
        # them, and those graphs then stop matching: HierarchicalKV identity)
        m = self._select_cap = c.mandatory_hint
        self.sets = WorkingSets(self.dir, self.lru, self.policy, self.lh0, self._rebuild)
        self.sets.reserve(m + int(m * self.policy.max_buffer_ratio) + 1)

    # ---- capacity -------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def capacity_pages(self) -> int:
        """Longest request in pages: its prefill is HBM-resident, every page has host slots."""
        return min(self.host.allocator.capacity, self.hbm_slots.capacity) // self.LH

    @property
    def free_pages(self) -> int:
        hbm = self.hbm_slots.num_free + self.sets.reclaimable
        return min(self.host.allocator.num_free, hbm) // self.LH

    @property
    def host_capacity_pages(self) -> int:
        return self.host.allocator.capacity // self.LH

    def extra_pages(self, request_id: str, num_tokens: int) -> int:
        held = self._held.get(request_id)
        return max(0, self.pages_for(num_tokens) - (held.num_pages if held else 0))

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def request_slot(self, request_id: str) -> int:
        return self._held[request_id].row

    def is_hierarchical(self, request_id: str) -> bool:
        return self._held[request_id].hierarchical

    # ---- lifetime -------------------------------------------------------------------------
    def ensure(self, request_id: str, num_tokens: int) -> None:
        """Grow the request to hold num_tokens (OutOfSlotsError: nothing changed, except that
        other requests' buffers may have shrunk)."""
        held = self._held.get(request_id)
        new = held is None
        if new:
            held = self._admit(request_id)
        try:
            extra = self.extra_pages(request_id, num_tokens)
            if extra:
                self._require_host(extra * self.LH)
                self._make_room(self.sets.page_cost(held, extra)[0])
                if held.hierarchical:
                    for _ in range(extra):
                        self._new_tails([held])
                else:
                    self._add_resident(held, extra)
        except OutOfSlotsError:
            if new:
                self.free(request_id)
            raise

    def ensure_decode(self, request_ids: list[str], num_tokens: list[int]) -> bool:
        """ensure(r, n) for each pair in order, if doing them one by one would preempt nobody
        and shrink no buffer (_room_for); False, with nothing changed, if it might, or if a
        request is not held (the scheduler then goes request by request). Consecutive
        hierarchical requests that start one page each (a decode step's usual work) get their
        new tails in one vectorised pass, with the same result."""
        try:
            helds = [self._held[r] for r in request_ids]
        except KeyError:
            return False
        P = self.page_size
        extra = [-(-n // P) - h.num_pages for h, n in zip(helds, num_tokens)]
        starts = [i for i, e in enumerate(extra) if e > 0]
        if not self._room_for([helds[i] for i in starts], [extra[i] for i in starts]):
            return False
        run: list[HeldRequest] = []
        for i in starts:
            if extra[i] == 1 and helds[i].hierarchical:
                run.append(helds[i])
                continue
            if run:
                self._new_tails(run)
                run = []
            self.ensure(request_ids[i], num_tokens[i])
        if run:
            self._new_tails(run)
        return True

    def _room_for(self, helds: list[HeldRequest], extra: list[int]) -> bool:
        """Whether ensuring `extra` pages for each request in order passes the scheduler's
        check (extra <= free_pages) every time, with no buffer shrink (HBM need <= free HBM)
        and segments to spare: free counts before each request are bounded below by the
        counts at the start minus the needs before it (reclaimable only grows: a request's
        rows that join a tail below their width)."""
        if not helds:
            return True
        LH, e = self.LH, np.array(extra, np.int64)
        need, gain = np.array([self.sets.page_cost(h, x) for h, x in zip(helds, extra)]).T
        host = self.host.allocator.num_free - LH * (np.cumsum(e) - e)
        hbm = self.hbm_slots.num_free - (np.cumsum(need) - need)
        reclaimable = self.sets.reclaimable + np.cumsum(gain) - gain
        fits = (e <= np.minimum(host, hbm + reclaimable) // LH) & (need <= hbm)
        return bool(fits.all()) and self.dir.segments.can_alloc(int(e.sum()))

    def _admit(self, request_id: str) -> HeldRequest:
        if not self._free_rows:
            raise OutOfSlotsError(
                f"request rows: all {self.config.max_requests} in use; raise "
                "engine.max_running_requests"
            )
        held = HeldRequest(self._free_rows.pop(), self._mandatory_of(request_id))
        self.dir.admit(held.row)
        self._held[request_id] = held
        return held

    def free(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is None:
            return
        self.sets.release(held)
        freed = self.dir.release(held.row)
        self.sets.stamp(freed, empty=True)
        self._free_rows.append(held.row)

    def _add_resident(self, held: HeldRequest, extra: int) -> None:
        n = held.num_pages
        self.dir.grow([held.row], [n + extra])
        slots = self.dir.own_hbm(held.row, extra * self.LH).reshape(extra, self.LH)
        self.dir.set_hbm(np.full(extra, held.row), np.arange(n, n + extra), slots)
        held.num_pages = n + extra

    def _new_tails(self, helds: list[HeldRequest]) -> None:
        """Start page num_pages of each (hierarchical) request: the old tail's sparse slots join
        the rows (trimmed back to the width, oldest first), fresh slots take the new tail.
        Vectorised over the requests, with the slots, rows and tables that one request after
        the other gives: the pool's free stack hands a request's just-dropped row slots back
        first (so they are its first new tail slots), the rest come off the stack in order."""
        LH, n = self.LH, len(helds)
        reqs = np.fromiter((h.row for h in helds), np.int64, n)
        pages = np.fromiter((h.num_pages for h in helds), np.int64, n)
        self.dir.grow(reqs, pages + 1)  # first: all or nothing (OutOfSlotsError)
        old = self.tails_cpu[reqs, self.lh0 :]  # [n, LHs] (a copy)
        join = np.flatnonzero((old != NONE).all(1))  # no old tail right after a full prefill
        dropped = [old[0, :0]] * n
        if join.size:
            self.dir.hand_over(old[join])
            joined = self.sets.join_tails([helds[i] for i in join], old[join])
            for i, d in zip(join, joined):
                dropped[i] = d
        counts = np.fromiter((d.size for d in dropped), np.int64, n)
        reused = np.concatenate(dropped)
        self.dir.disown_hbm(np.repeat(reqs, counts), reused, keep=True)
        first = np.arange(LH) < counts[:, None]  # [n, LH] the request's reused slots
        slots = np.empty((n, LH), np.int32)
        slots[first] = reused
        slots[~first] = self.hbm_slots.alloc(n * LH - reused.size)
        self.dir.own_hbm(reqs, LH, slots=slots.ravel())
        self.dir.set_hbm(reqs, pages, slots)
        self.tails_cpu[reqs] = slots  # the helds' tails (views)
        for h in helds:
            h.num_pages += 1

    def finish_prefill(self, request_id: str, num_tokens: int) -> None:
        """End of a sparse request's prefill (after its index is built, which may re-lay pages):
        offload its completed pages in one launch, keep the working set. No-op for dense ones."""
        held = self._held[request_id]
        if held.mandatory is None or held.hierarchical:
            return
        pages = np.arange(held.num_pages)
        hbm = self.dir.hbm_entries(held.row, pages)  # [n, LH]
        full = num_tokens // self.page_size
        if full:
            host = self.dir.host_entries(held.row, pages[:full])
            self.hierarchy.offload_pages(self._t(hbm[:full].ravel()), self._t(host.ravel()))
        self.tails_cpu[held.row] = hbm[full] if full < held.num_pages else NONE
        held.tail = self.tails_cpu[held.row]
        held.width = held.mandatory + initial_buffer(held.mandatory, self.policy)
        held.hierarchical = True
        self._grow_caps(held.width + 1, held.mandatory)
        # rows [LHs, full] oldest first: the oldest beyond the width go
        self.sets.start(held, np.ascontiguousarray(hbm[:full, self.lh0 :].T))

    # ---- HBM budget -------------------------------------------------------------------------
    def _require_host(self, num_slots: int) -> None:
        if not self.host.allocator.can_alloc(num_slots):
            self.host.allocator.alloc(num_slots)  # raises OutOfSlotsError with the remedy

    def _make_room(self, num_slots: int) -> None:
        """Free HBM for num_slots by shrinking buffers (WorkingSets.make_room); OutOfSlotsError
        (nothing changed) when even that is short."""
        short = num_slots - self.hbm_slots.num_free
        if short <= 0:
            return
        if self.LHs == 0 or short > self.sets.reclaimable:
            self.hbm_slots.alloc(num_slots)  # raises OutOfSlotsError naming the pool
        self.sets.make_room([h for h in self._held.values() if h.hierarchical], short)

    def rebalance(self, lookups_by_row: np.ndarray, hits_by_row: np.ndarray) -> None:
        """Every N steps: resize the hierarchical requests' buffers from their hit rates since
        the last call (resize_buffers: rising requests grow, highest gain first, into half of
        the free HBM, then from saturated ones). lookups/hits: [max_requests] cumulative
        counters per directory row. A grown row gets empty slots (LRU age max: first victims)."""
        held = [h for h in self._held.values() if h.hierarchical]
        if held and self.LHs:
            self.sets.rebalance(held, lookups_by_row, hits_by_row)

    # ---- device state -------------------------------------------------------------------------
    def _grow_caps(self, width: int, selected: int) -> None:
        """Size row_slots' width and the step's max selected pages for a new request; rebuilds
        the HierarchicalKV (eager: no captured graph holds it yet)."""
        rebuild = selected > self._select_cap
        self._select_cap = max(selected, self._select_cap)
        if width > self.sets.width_cap:
            self.sets.reserve(width)  # rebuilds
        elif rebuild:
            self._rebuild()

    def _rebuild(self) -> None:
        """A new HierarchicalKV over the current tables (counters carried over)."""
        d, c = self.dir, self.config
        layout = TableLayout(
            d.l2_offset, d.rev_offset, d.spare, c.segment_pages, c.num_layers,
            c.num_kv_heads, c.page_size,
        )  # fmt: skip
        tables = HierarchyTables(d.meta_gpu, d.dir_gpu, d.host_l2_gpu, self.sets.row_slots_gpu)
        old = self.hierarchy
        self.hierarchy = HierarchicalKV(
            layout,
            tables,
            self.lru,
            self.hbm_pool,
            self.host.pool_for_kernels,
            self._select_cap,
            fused=self.config.fused_resolve,
        )
        if old is not None:
            self.hierarchy.stats.copy_(old.stats)
            self.hierarchy.row_stats.copy_(old.row_stats)

    def flush(self) -> None:
        """Push table and row changes to the device: call right before a launch."""
        self.dir.flush()
        self.sets.flush()

    def _t(self, a: np.ndarray) -> torch.Tensor:
        """[n] int32 on the device without a host sync (runtime/transfer.py)."""
        return to_device(a, torch.int32, self.device)


def manager_for_runner(
    runner: ModelRunner,
    cache: CacheSettings,
    max_requests: int,
    max_context: int,
    mandatory_of: Callable[[str], int | None],
) -> HierarchicalKVManager:
    """The engine's manager: HBM = the runner's KV pool, host pool from cache.host_pool_tokens
    (None: 2x the HBM pool's tokens), dense layers as the runner's sparse params say."""
    cfg, P = runner.cfg, runner.page_size
    LH = cfg.num_layers * cfg.num_kv_heads
    hbm_pages = (runner.kv_pool.shape[0] - 1) // LH
    host_tokens = cache.host_pool_tokens or 2 * hbm_pages * P
    host_slots = -(-host_tokens // P) * LH + 1
    use_cuda = runner.device.type == "cuda"
    host = HostPagePool(host_slots, P, cfg.head_dim, runner.dtype, use_cuda=use_cuda)
    sparse = runner.sparse_params
    config = HierarchyConfig(
        cfg.num_layers, cfg.num_kv_heads, P, max_requests, max_context, host_slots,
        dense_layers=min(sparse.dense_layers, cfg.num_layers),
        buffer_ratio=cache.buffer_ratio,
        mandatory_hint=mandatory_pages(sparse, sparse.budget_tokens, P),
        fused_resolve=cache.fused_resolve and use_cuda,
    )  # fmt: skip
    return HierarchicalKVManager(config, runner.kv_pool, host, mandatory_of)
