"""HierarchicalKVManager: the KV pages of running requests in HBM + the pinned host pool.

It offers what the scheduler and the engine use of PagedKVManager (pages_for, extra_pages,
ensure, free, holds, free_pages, capacity_pages, request_table, batch_table, build_batch,
check_integrity) on top of the page directory (control/page_directory.py), the host page pool,
the HBM slot allocator, per-request HBM budgets (control/budgets.py) and the GPU LRU, and it
owns the decode step's HierarchicalKV (runtime/hierarchy.py, `hierarchy`). Its batch-building and
accounting half (tables, ForwardBatches, check_integrity) is control/hier_batches.py.

A request's directory row is also its sparse-index slot (`request_slot`). Its life:
  resident      from admission through its prefill (a transient HBM budget), and for its whole
                life when it is dense (`mandatory_of` gives None: all its pages are its working
                set): every (page, layer, kv_head) has an HBM slot chosen here (set_hbm).
  hierarchical  a sparse request at the end of its prefill (`finish_prefill`): its completed
                pages go to the host pool in one launch, then each sparse row (layer >=
                dense_layers, kv_head) keeps its newest `width` pages (mandatory + buffer) in
                HBM and the rest are disowned. From then on a row's HBM slots (`rows`, mirrored
                in `row_slots`) are the decode graph's: it installs misses into them (LRU
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
from spinserve.runtime.lru import PAD, BucketedLRU
from spinserve.runtime.sparse import SparseParams

from .budgets import BudgetPolicy, Observation, hit_rate, initial_buffer, resize_buffers
from .hier_batches import HeldRequest, HierarchyBatches
from .host_pool import HostPagePool
from .kv_manager import BatchItem
from .page_directory import NONE, DirectoryConfig, PageDirectory
from .slot_allocator import OutOfSlotsError, SlotAllocator

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
        self._reclaimable = 0  # _reclaimable_slots()
        self._free_rows = list(range(c.max_requests - 1, -1, -1))
        self._dirty_rows: set[int] = set()
        self._width_cap, self._select_cap = 0, 0
        # [max_requests, LH, W] int32 CPU mirror of row_slots: HBM slots each row owns, -1 = none
        self.row_slots_cpu = np.full((c.max_requests, self.LH, 0), PAD, np.int32)
        self.hierarchy: HierarchicalKV | None = None
        # sized for the default budget's widest rows up front: the device tables then never
        # move, which captured decode graphs rely on (a larger per-request budget rebuilds
        # them, and those graphs then stop matching: HierarchicalKV identity)
        m = c.mandatory_hint
        self._grow_caps(m + int(m * self.policy.max_buffer_ratio) + 1, m)

    # ---- capacity -------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def capacity_pages(self) -> int:
        """Longest request in pages: its prefill is HBM-resident, every page has host slots."""
        return min(self.host.allocator.capacity, self.hbm_slots.capacity) // self.LH

    @property
    def free_pages(self) -> int:
        hbm = self.hbm_slots.num_free + self._reclaimable_slots()
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
                self._make_room(self._hbm_need(held, extra))
                if held.hierarchical:
                    for _ in range(extra):
                        self._new_tail(held)
                else:
                    self._add_resident(held, extra)
        except OutOfSlotsError:
            if new:
                self.free(request_id)
            raise

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
        self._set_reclaimable(held, 0)
        freed = self.dir.release(held.row)
        self.lru.mark_empty(torch.from_numpy(freed).to(self.device))
        self.row_slots_cpu[held.row] = PAD
        self._dirty_rows.add(held.row)
        self._free_rows.append(held.row)

    def _add_resident(self, held: HeldRequest, extra: int) -> None:
        n = held.num_pages
        self.dir.grow([held.row], [n + extra])
        slots = self.dir.own_hbm(held.row, extra * self.LH).reshape(extra, self.LH)
        self.dir.set_hbm(np.full(extra, held.row), np.arange(n, n + extra), slots)
        held.num_pages = n + extra

    def _new_tail(self, held: HeldRequest) -> None:
        """Start page num_pages: the old tail's sparse slots join the rows (trimmed back to the
        width, oldest first), fresh slots take the new tail."""
        n = held.num_pages
        old = held.tail[self.lh0 :]
        if (old != NONE).all():
            self._hand_over(old)
            held.rows = np.concatenate([held.rows, old[:, None]], axis=1)
            self._trim(held, held.width, by_age=True)
        self.dir.grow([held.row], [n + 1])
        slots = self.dir.own_hbm(held.row, self.LH)
        self.dir.set_hbm([held.row], [n], slots[None])
        held.tail = slots.astype(np.int32)
        held.num_pages = n + 1

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
        held.tail = hbm[full] if full < held.num_pages else np.full(self.LH, NONE, np.int32)
        held.rows = np.ascontiguousarray(hbm[:full, self.lh0 :].T)  # [LHs, full] oldest first
        held.width = held.mandatory + initial_buffer(held.mandatory, self.policy)
        held.hierarchical = True
        self._grow_caps(held.width + 1, held.mandatory)
        self.lru.touch(self._t(held.rows))
        self._trim(held, held.width, by_age=False)  # drops the oldest pages
        self._hand_over(held.rows)

    def _hand_over(self, slots: np.ndarray) -> None:
        """Slots holding pages become the decode graph's (rows): the CPU forgets which page
        each holds, device tables untouched (the graph may move them from now on)."""
        self.dir.hand_over(slots)

    # ---- HBM budget -------------------------------------------------------------------------
    def _hbm_need(self, held: HeldRequest, extra: int) -> int:
        if not held.hierarchical:
            return extra * self.LH
        w = held.rows.shape[1] + int((held.tail != NONE).all())
        return extra * self.LH - max(0, w - held.width) * self.LHs  # conservative for extra > 1

    def _require_host(self, num_slots: int) -> None:
        if not self.host.allocator.can_alloc(num_slots):
            self.host.allocator.alloc(num_slots)  # raises OutOfSlotsError with the remedy

    def _reclaimable_slots(self) -> int:
        """HBM slots that shrinking every buffer to its mandatory floor would return (a running
        total: _trim updates it whenever a request's rows change, free() when it leaves)."""
        return self._reclaimable

    def _set_reclaimable(self, held: HeldRequest, pages: int) -> None:
        self._reclaimable += (pages - held.reclaimable) * self.LHs
        held.reclaimable = pages

    def _make_room(self, num_slots: int) -> None:
        """Free HBM for num_slots by shrinking buffers (BudgetPolicy: lowest gain first, down to
        the mandatory floor); OutOfSlotsError (nothing changed) when even that is short."""
        short = num_slots - self.hbm_slots.num_free
        if short <= 0:
            return
        if self.LHs == 0 or short > self._reclaimable_slots():
            self.hbm_slots.alloc(num_slots)  # raises OutOfSlotsError naming the pool
        held = [h for h in self._held.values() if h.hierarchical]
        m = np.array([h.mandatory for h in held], np.int64)
        w = np.array([h.rows.shape[1] for h in held], np.int64)
        buf = np.maximum(w - m, 0)
        unknown = np.full(len(held), np.nan)
        obs = Observation(m, buf, unknown, np.full(len(held), -1), unknown)
        units = -(-short // self.LHs)
        plan = resize_buffers(obs, int((m + buf).sum()) - units, self.policy)
        for h, mand, b in zip(held, m, plan.buffer_pages, strict=True):
            h.width = min(h.width, int(mand + b))
            self._trim(h, h.width, by_age=True)

    def rebalance(self, lookups_by_row: np.ndarray, hits_by_row: np.ndarray) -> None:
        """Every N steps: resize the hierarchical requests' buffers from their hit rates since
        the last call (resize_buffers: rising requests grow, highest gain first, into half of
        the free HBM, then from saturated ones). lookups/hits: [max_requests] cumulative
        counters per directory row. A grown row gets empty slots (LRU age max: first victims)."""
        held = [h for h in self._held.values() if h.hierarchical]
        if not held or self.LHs == 0:
            return
        rows = np.array([h.row for h in held])
        now = np.stack([np.asarray(lookups_by_row)[rows], np.asarray(hits_by_row)[rows]], 1)
        # a row's counters include earlier owners': a request's first call only starts counting
        seen = np.array([h.seen or tuple(c) for h, c in zip(held, now)], np.int64)
        d_lookups, d_hits = (now.astype(np.int64) - seen).T
        m = np.array([h.mandatory for h in held], np.int64)
        buf = np.array([h.width for h in held], np.int64) - m
        rate = hit_rate(d_hits, d_lookups)
        prev = [h.prev for h in held]
        obs = Observation(
            m, buf, rate, np.array([p[0] for p in prev]), np.array([p[1] for p in prev])
        )
        pool = int((m + buf).sum()) + self.hbm_slots.num_free // 2 // self.LHs
        plan = resize_buffers(obs, pool, self.policy)
        for i, h in enumerate(held):
            h.seen = (int(now[i, 0]), int(now[i, 1]))
            h.prev = (int(buf[i]), float(rate[i]))
            width = int(m[i] + plan.buffer_pages[i])
            if width < h.width:
                h.width = width
                self._trim(h, width, by_age=True)
            elif width > h.width:
                h.width = width
                self._grow_caps(width + 1, h.mandatory)
                self._widen(h)

    def _widen(self, held: HeldRequest) -> None:
        """Give the rows empty slots up to the width (not beyond the completed pages)."""
        add = min(held.width, held.num_pages - 1) - held.rows.shape[1]
        if add <= 0 or not self.hbm_slots.can_alloc(add * self.LHs):
            return
        slots = self.dir.own_hbm(held.row, add * self.LHs).reshape(self.LHs, add)
        self.lru.mark_empty(self._t(slots))
        held.rows = np.concatenate([held.rows, slots.astype(np.int32)], axis=1)
        self._trim(held, held.width, by_age=False)  # nothing to drop: refreshes the mirror

    def _trim(self, held: HeldRequest, width: int, by_age: bool) -> None:
        """Drop row slots beyond `width`: the oldest by LRU age (ties: lower column), or the
        first columns; disown them and refresh the device mirror."""
        rows = held.rows
        k = rows.shape[1] - width
        if k > 0:
            drop = np.zeros(rows.shape, bool)
            if by_age and k == 1:  # a new tail joined: the oldest per row (first of equals)
                oldest = np.argmax(self._ages()[rows], axis=1)
                drop[np.arange(rows.shape[0]), oldest] = True
            else:
                if by_age:
                    ages = -self._ages()[rows].astype(np.int64)
                    order = np.argsort(ages, axis=1, kind="stable")
                else:
                    order = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
                np.put_along_axis(drop, order[:, :k], True, axis=1)
            self.dir.disown_hbm(held.row, rows[drop])
            held.rows = rows[~drop].reshape(rows.shape[0], width)
        self.row_slots_cpu[held.row] = PAD
        self.row_slots_cpu[held.row, self.lh0 :, : held.rows.shape[1]] = held.rows
        self._dirty_rows.add(held.row)
        self._set_reclaimable(held, max(0, held.rows.shape[1] - held.mandatory))

    def _ages(self) -> np.ndarray:
        """[num_hbm_slots] uint8 LRU ages as of the last launch (a sync-free snapshot on CUDA),
        read once between two flushes (every trim of a step sorts by the same ages)."""
        if self._ages_cache is None:
            if self.device.type != "cuda":
                self._ages_cache = self.lru.ages().numpy()
            else:
                if self._age_event is not None:
                    self._age_event.synchronize()  # enqueued before the previous launch: done
                self._ages_cache = self._age_host.numpy().copy()
        return self._ages_cache

    # ---- device state -------------------------------------------------------------------------
    def _grow_caps(self, width: int, selected: int) -> None:
        """Size row_slots' width and the step's max selected pages for a new request; rebuilds
        the HierarchicalKV (eager: no captured graph holds it yet)."""
        if width <= self._width_cap and selected <= self._select_cap and self.hierarchy:
            return
        self._width_cap = max(width, self._width_cap, 2 * self._width_cap)
        self._select_cap = max(selected, self._select_cap)
        grown = np.full((self.config.max_requests, self.LH, self._width_cap), PAD, np.int32)
        grown[:, :, : self.row_slots_cpu.shape[2]] = self.row_slots_cpu
        self.row_slots_cpu = grown
        # [max_requests, LH, W] int32: HBM slots each (request row, layer x kv_head) owns
        self.row_slots_gpu = torch.from_numpy(grown).to(self.device, copy=True)
        d, c = self.dir, self.config
        layout = TableLayout(
            d.l2_offset, d.rev_offset, d.spare, c.segment_pages, c.num_layers,
            c.num_kv_heads, c.page_size,
        )  # fmt: skip
        tables = HierarchyTables(d.meta_gpu, d.dir_gpu, d.host_l2_gpu, self.row_slots_gpu)
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
        self._dirty_rows.clear()
        self._age_event: torch.cuda.Event | None = None
        self._ages_cache: np.ndarray | None = None  # _ages() of the current step
        # [num_hbm_slots] uint8 pinned: LRU ages copied before each launch (CUDA only)
        cuda = self.device.type == "cuda"
        self._age_host = torch.zeros(self.hbm_slots.num_slots, dtype=torch.uint8, pin_memory=cuda)
        # two pinned [max_requests * LH * W] int32 staging buffers for row uploads, used in turn
        shape = (self.config.max_requests, self.LH, self._width_cap)
        self._row_staging = [torch.empty(shape, dtype=torch.int32, pin_memory=cuda) for _ in "ab"]
        self._row_events: list[torch.cuda.Event | None] = [None, None]
        self._row_turn = 0

    def flush(self) -> None:
        """Push table and row changes to the device: call right before a launch."""
        self._ages_cache = None  # the launch ages the slots
        self.dir.flush()
        if self._dirty_rows:
            self._upload_rows()
        if self.device.type == "cuda":
            self._age_host.copy_(self.lru.ages(), non_blocking=True)
            self._age_event = torch.cuda.Event()
            self._age_event.record()

    def _upload_rows(self) -> None:
        """Dirty rows of row_slots in ONE non-blocking copy from a pinned staging buffer (two,
        used in turn; one is reused only once its previous upload has completed)."""
        idx = np.fromiter(sorted(self._dirty_rows), np.int64)
        self._dirty_rows.clear()
        turn = self._row_turn = 1 - self._row_turn
        if self._row_events[turn] is not None:
            self._row_events[turn].synchronize()  # two flushes ago: long done in practice
        staging = self._row_staging[turn][: idx.size]
        staging.numpy()[...] = self.row_slots_cpu[idx]
        rows = staging.to(self.device, non_blocking=True)
        self.row_slots_gpu.index_copy_(0, self._t(idx), rows)
        if self.device.type == "cuda":
            self._row_events[turn] = torch.cuda.Event()
            self._row_events[turn].record()

    def _t(self, a: np.ndarray) -> torch.Tensor:
        """A small host array on the device without a sync: through pinned memory on CUDA
        (torch's pinned allocator keeps the block until the copy has run)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

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
    config = HierarchyConfig(
        cfg.num_layers,
        cfg.num_kv_heads,
        P,
        max_requests,
        max_context,
        host_slots,
        dense_layers=min(runner.sparse_params.dense_layers, cfg.num_layers),
        buffer_ratio=cache.buffer_ratio,
        mandatory_hint=mandatory_pages(runner.sparse_params, runner.sparse_params.budget_tokens, P),
        fused_resolve=cache.fused_resolve and use_cuda,
    )
    return HierarchicalKVManager(config, runner.kv_pool, host, mandatory_of)
