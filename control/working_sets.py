"""WorkingSets: the HBM slots that hierarchical requests keep for their sparse rows, for
HierarchicalKVManager (control/hier_kv_manager.py).

A hierarchical request's working set is, per sparse (layer >= dense_layers, kv_head) row, up to
`width` HBM slots (mandatory + buffer pages): HeldRequest.rows [LHs, w] int32. The decode graph
installs misses into them (LRU victims, ties broken by the lower column), so a row's column
order matters and is kept: a trim removes columns, the old tail's slots join as the last column
when a new tail page starts, a widening appends empty slots. This object owns:
  rows and widths  trim (by LRU age or oldest columns first), join_tails (a step's new tail
                   pages, all requests in one vectorised pass), widen, and the budget decisions
                   that move widths (make_room under HBM pressure, rebalance from hit rates);
  the mirror       `row_slots_cpu` [max_requests, LH, W] int32 (rows of dense (layer, head)
                   pairs and columns beyond a request's width are -1) and its device copy
                   `row_slots_gpu`, uploaded by `flush` (dirty request rows, one copy);
  LRU ages         from a snapshot of the epochs read once between two flushes (`epochs`):
                   every trim of a step sorts by the same ages;
  `reclaimable`    running total of HBM slots that shrinking every buffer to its mandatory floor
                   would return (admission counts them as free).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch

from spinserve.runtime.lru import PAD, BucketedLRU
from spinserve.runtime.transfer import to_device, upload

from .budgets import BudgetPolicy, Observation, hit_rate, resize_buffers
from .page_directory import NONE, PageDirectory


@numba.njit(cache=True)
def _join_row(rows, tail, epoch, now, joined, dropped, mirror):  # pragma: no cover - numba
    """rows [R, w] + tail [R] as column w -> joined [R, w + 1], or, with dropped [R] given,
    joined [R, w] without each row's oldest slot (the first of the highest LRU ages, age =
    (now - epoch[slot]) mod 256), dropped.
    mirror [R, >= w + 1]: its first columns become joined too."""
    R, w = rows.shape
    n = joined.shape[1]
    for r in range(R):
        oldest = w + 1  # none
        if dropped.size:
            first, first_age = 0, -1
            for c in range(w):
                a = (now - int(epoch[rows[r, c]])) & 255
                if a > first_age:
                    first, first_age = c, a
            oldest = w if (now - int(epoch[tail[r]])) & 255 > first_age else first
            dropped[r] = rows[r, oldest] if oldest < w else tail[r]
        k = min(oldest, w)
        joined[r, :k] = rows[r, :k]
        if oldest < w:
            joined[r, oldest : w - 1] = rows[r, oldest + 1 :]
        if oldest != w:  # the tail stays
            joined[r, n - 1] = tail[r]
        mirror[r, :n] = joined[r]


def _compile_join_row() -> None:
    """Compile _join_row for join_tails' argument types now (cache=True keeps it on disk), not
    in the first decode step that starts a page (measured 1.7 s on the H100 host)."""
    rows, joined = np.zeros((1, 1), np.int32), np.empty((1, 1), np.int32)
    _join_row(
        rows,
        np.zeros(1, np.int32),
        np.zeros(1, np.uint8),
        0,
        joined,
        np.empty(1, np.int32),
        np.empty((1, 2), np.int32),
    )


@dataclass(slots=True)
class HeldRequest:
    """One request's pages and budget; slot arrays are int32, -1 = none."""

    row: int  # directory row (= sparse-index slot)
    mandatory: int | None  # pages a sparse row may select per step; None = dense (all resident)
    num_pages: int = 0  # logical pages allocated
    width: int = 0  # row width target (mandatory + buffer) once hierarchical
    hierarchical: bool = False
    rows: np.ndarray | None = None  # [LHs, w] HBM slots of the sparse rows (LRU column order)
    tail: np.ndarray | None = None  # [LH] HBM slots of the tail page
    reclaimable: int = 0  # buffer pages per row above mandatory (HBM a shrink would return)
    columns: np.ndarray | None = None  # [n, c] cached HBM slots of the first c (layer, head)
    # columns of its first n pages, c <= the dense layers' columns (those pages never move)
    seen: tuple[int, int] | None = None  # (lookups, hits) of its row at the last rebalance
    prev: tuple[int, float] = (-1, float("nan"))  # (buffer, hit rate) at the last rebalance


class WorkingSets:
    def __init__(
        self,
        directory: PageDirectory,
        lru: BucketedLRU,
        policy: BudgetPolicy,
        dense_columns: int,  # lh0: (layer, kv_head) columns of the dense layers
        on_realloc: Callable[[], None],  # row_slots_gpu is a new tensor: rebuild what holds it
    ) -> None:
        self.dir, self.lru, self.policy = directory, lru, policy
        self.device = directory.device
        self.max_requests = directory.config.max_requests
        self.LH = directory.config.num_layer_heads
        self.lh0, self.LHs = dense_columns, self.LH - dense_columns
        self._on_realloc = on_realloc
        _compile_join_row()
        self.reclaimable = 0
        self.width_cap = 0
        self._dirty: set[int] = set()  # request rows of row_slots_cpu changed since the upload
        self._max_cols = 0  # columns of the dirty rows that may differ on the device
        # [max_requests, LH, width_cap] int32: HBM slots of each (request, layer x head) row
        self.row_slots_cpu = np.full((self.max_requests, self.LH, 0), PAD, np.int32)
        self.row_slots_gpu = torch.from_numpy(self.row_slots_cpu).to(self.device)
        cuda = self.device.type == "cuda"
        self._epochs: tuple[np.ndarray, int] | None = None  # epochs() of the current step
        self._live = False  # _epochs[0] is the LRU's own (CPU) tensor
        self._age_event: torch.cuda.Event | None = None
        # [num_hbm_slots + 1] uint8 (pinned on CUDA): LRU epochs + the current one, copied
        # before each launch (CUDA), or on the CPU when stamp() would change a live snapshot
        self._age_host = torch.zeros(lru.epoch.shape[0] + 1, dtype=torch.uint8, pin_memory=cuda)

    # ---- widths -------------------------------------------------------------------------
    def reserve(self, width: int) -> None:
        """Make room for rows of `width` columns (at least doubling); a new device tensor."""
        if width <= self.width_cap:
            return
        self.width_cap = max(width, 2 * self.width_cap)
        grown = np.full((self.max_requests, self.LH, self.width_cap), PAD, np.int32)
        grown[:, :, : self.row_slots_cpu.shape[2]] = self.row_slots_cpu
        self.row_slots_cpu = grown
        self.row_slots_gpu = torch.from_numpy(grown).to(self.device, copy=True)
        self._dirty.clear()
        self._on_realloc()

    def start(self, held: HeldRequest, rows: np.ndarray) -> None:
        """A request turns hierarchical with `rows` [LHs, n] (its completed pages, oldest
        first): they count as touched now, the oldest columns beyond the width go, the rest
        become the decode graph's (hand_over)."""
        held.rows = rows
        self.stamp(rows, empty=False)
        self.trim(held, held.width, by_age=False)
        self.dir.hand_over(held.rows)

    def release(self, held: HeldRequest) -> None:
        """A request leaves (its slots go back with its directory row)."""
        if held.hierarchical:
            self._set_reclaimable(held, 0)
            self._mirror(held.row, held.rows[:, :0], held.rows.shape[1])

    def trim(self, held: HeldRequest, width: int, by_age: bool) -> None:
        """Drop row slots beyond `width`: the oldest by LRU age (ties: lower column), or the
        first columns; disown them and refresh the mirror."""
        rows = held.rows
        k = rows.shape[1] - width
        if k > 0:
            drop = np.zeros(rows.shape, bool)
            if by_age and k == 1:  # a new tail joined: the oldest per row (first of equals)
                oldest = np.argmax(self.ages(rows), axis=1)
                drop[np.arange(rows.shape[0]), oldest] = True
            else:
                if by_age:
                    ages = -self.ages(rows).astype(np.int64)
                    order = np.argsort(ages, axis=1, kind="stable")
                else:
                    order = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
                np.put_along_axis(drop, order[:, :k], True, axis=1)
            self.dir.disown_hbm(held.row, rows[drop])
            held.rows = rows[~drop].reshape(rows.shape[0], width)
        self._mirror(held.row, held.rows, rows.shape[1])
        self._set_reclaimable(held, max(0, held.rows.shape[1] - held.mandatory))

    def join_tails(self, helds: list[HeldRequest], old: np.ndarray) -> list[np.ndarray]:
        """New tail pages: each request's old tail slots `old` [n, LHs] join its rows as the
        last column; a row then wider than the width drops its oldest slot (trim by age: first
        of equals; rows are never wider than the width before). One pass over each request's
        rows (_join_row). Returns the slots each request dropped ([LHs] in row order, or [0]),
        still owned: the caller disowns them."""
        (epoch, now), dropped = self.epochs(), []
        for h, tail in zip(helds, old):
            w = h.rows.shape[1]
            over = h.width <= w
            rows = np.empty((self.LHs, w + 1 - over), np.int32)
            out = np.empty(self.LHs if over else 0, np.int32)
            mirror = self.row_slots_cpu[h.row, self.lh0 :]
            _join_row(h.rows, tail, epoch, now, rows, out, mirror)
            self._dirty.add(h.row)
            self._max_cols = max(self._max_cols, rows.shape[1])
            h.rows = rows
            self._set_reclaimable(h, max(0, rows.shape[1] - h.mandatory))
            dropped.append(out)
        return dropped

    def widen(self, held: HeldRequest) -> None:
        """Give the rows empty slots up to the width (not beyond the completed pages)."""
        add = min(held.width, held.num_pages - 1) - held.rows.shape[1]
        if add <= 0 or not self.dir.hbm_slots.can_alloc(add * self.LHs):
            return
        slots = self.dir.own_hbm(held.row, add * self.LHs).reshape(self.LHs, add)
        self.stamp(slots, empty=True)
        held.rows = np.concatenate([held.rows, slots.astype(np.int32)], axis=1)
        self.trim(held, held.width, by_age=False)  # nothing to drop: refreshes the mirror

    def _mirror(self, row: int, rows: np.ndarray, old_width: int) -> None:
        """row_slots_cpu[row] := rows (a request row that had `old_width` columns)."""
        mirror = self.row_slots_cpu[row]
        mirror[:] = PAD
        mirror[self.lh0 :, : rows.shape[1]] = rows
        self._max_cols = max(self._max_cols, old_width, rows.shape[1])
        self._dirty.add(row)

    def page_cost(self, held: HeldRequest, extra: int) -> tuple[int, int]:
        """(HBM slots that adding `extra` pages takes at most, reclaimable slots it adds at
        least): a hierarchical request's rows give their oldest slot per row back when at
        their width (exact for one page: ensure runs _new_tails per page) and grow below it."""
        LH, LHs = self.LH, self.LHs
        if not held.hierarchical:
            return extra * LH, 0
        joins = bool((held.tail != NONE).all())
        w, m = held.rows.shape[1], held.mandatory
        if not joins or w >= held.width:
            return extra * LH - max(0, w + joins - held.width) * LHs, 0
        return extra * LH, (max(0, w + 1 - m) - max(0, w - m)) * LHs * (extra == 1)

    def _set_reclaimable(self, held: HeldRequest, pages: int) -> None:
        self.reclaimable += (pages - held.reclaimable) * self.LHs
        held.reclaimable = pages

    # ---- budgets ------------------------------------------------------------------------
    def make_room(self, helds: list[HeldRequest], short: int) -> None:
        """Return `short` HBM slots (<= reclaimable) by shrinking the hierarchical requests'
        buffers (BudgetPolicy: lowest gain first, down to the mandatory floor)."""
        m = np.array([h.mandatory for h in helds], np.int64)
        w = np.array([h.rows.shape[1] for h in helds], np.int64)
        buf = np.maximum(w - m, 0)
        unknown = np.full(len(helds), np.nan)
        obs = Observation(m, buf, unknown, np.full(len(helds), -1), unknown)
        units = -(-short // self.LHs)
        plan = resize_buffers(obs, int((m + buf).sum()) - units, self.policy)
        for h, mand, b in zip(helds, m, plan.buffer_pages, strict=True):
            h.width = min(h.width, int(mand + b))
            self.trim(h, h.width, by_age=True)

    def rebalance(self, helds: list[HeldRequest], lookups: np.ndarray, hits: np.ndarray) -> None:
        """HierarchicalKVManager.rebalance for its hierarchical requests `helds`; lookups/hits:
        [max_requests] cumulative counters per directory row."""
        rows = np.array([h.row for h in helds])
        now = np.stack([np.asarray(lookups)[rows], np.asarray(hits)[rows]], 1)
        # a row's counters include earlier owners': a request's first call only starts counting
        seen = np.array([h.seen or tuple(c) for h, c in zip(helds, now)], np.int64)
        d_lookups, d_hits = (now.astype(np.int64) - seen).T
        m = np.array([h.mandatory for h in helds], np.int64)
        buf = np.array([h.width for h in helds], np.int64) - m
        rate = hit_rate(d_hits, d_lookups)
        prev = [h.prev for h in helds]
        obs = Observation(
            m, buf, rate, np.array([p[0] for p in prev]), np.array([p[1] for p in prev])
        )
        pool = int((m + buf).sum()) + self.dir.hbm_slots.num_free // 2 // self.LHs
        plan = resize_buffers(obs, pool, self.policy)
        for i, h in enumerate(helds):
            h.seen = (int(now[i, 0]), int(now[i, 1]))
            h.prev = (int(buf[i]), float(rate[i]))
            width = int(m[i] + plan.buffer_pages[i])
            if width < h.width:
                h.width = width
                self.trim(h, width, by_age=True)
            elif width > h.width:
                h.width = width
                self.reserve(width + 1)
                self.widen(h)

    # ---- device -------------------------------------------------------------------------
    def epochs(self) -> tuple[np.ndarray, int]:
        """([num_hbm_slots] uint8 LRU epochs, the current epoch): a snapshot as of the last
        launch (sync-free, pinned, on CUDA; on the CPU as of the first call: copied only if
        stamp() changes an epoch), read once between two flushes: every trim of a step sorts
        by the same ages."""
        if self._epochs is None:
            if self.device.type != "cuda":
                # the live epochs: stamp() copies them before the control plane changes one
                self._epochs = (self.lru.epoch.numpy(), int(self.lru.current[0]))
                self._live = True
            else:
                if self._age_event is not None:
                    self._age_event.synchronize()  # enqueued before the previous launch: done
                host = self._age_host.numpy()  # no copy: flush drops it first
                self._epochs = (host[:-1], int(host[-1]))
        return self._epochs

    def stamp(self, slots: np.ndarray, empty: bool) -> None:
        """The control plane's LRU writes: `slots` touched now, or empty (oldest). The ages
        trims read stay as they were (a live CPU snapshot is copied first)."""
        if self._live:
            host = self._age_host.numpy()
            host[:-1] = self._epochs[0]
            self._epochs, self._live = (host[:-1], self._epochs[1]), False
        t = to_device(slots, torch.int64, self.device)
        self.lru.mark_empty(t) if empty else self.lru.touch(t)

    def ages(self, slots: np.ndarray) -> np.ndarray:
        """uint8 LRU ages of `slots` (any shape) as of the last launch."""
        epoch, now = self.epochs()
        return np.uint8(now) - epoch[slots]

    def flush(self) -> None:
        """Before a launch: upload the dirty rows, snapshot the ages (the launch ages slots)."""
        self._epochs, self._live = None, False
        if self._dirty:
            self._upload()
        if self.device.type == "cuda":
            self._age_host[:-1].copy_(self.lru.epoch, non_blocking=True)
            self._age_host[-1:].copy_(self.lru.current, non_blocking=True)
            self._age_event = torch.cuda.Event()
            self._age_event.record()

    def _upload(self) -> None:
        """The dirty rows' first _max_cols columns (the rest are -1 on both sides) in ONE
        non-blocking copy through the pinned staging ring (runtime/transfer.upload)."""
        idx = np.fromiter(sorted(self._dirty), np.int64)
        cols = min(self._max_cols, self.width_cap)
        self._dirty.clear()
        self._max_cols = 0

        def fill(host: np.ndarray) -> None:
            for j, row in enumerate(idx.tolist()):  # no temporary (a gather would make one)
                host[j] = self.row_slots_cpu[row, :, :cols]

        rows = upload((idx.size, self.LH, cols), torch.int32, self.device, fill)
        self.row_slots_gpu[:, :, :cols].index_copy_(
            0, to_device(idx, torch.int64, self.device), rows
        )
