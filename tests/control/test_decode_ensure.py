"""ensure_decode (the scheduler's batched decode path) against the per-request path: the real
Scheduler over a small serving world (tests/control/decode_world.py) gives, step by step, the
same scheduled and preempted requests, the same pending flush (as sets), the same directory,
host and HBM tables, pools' free stacks, rows, tails and device copies, whether the manager
takes a decode step's new tail pages together or one request at a time with the algorithm the
manager used before batching (PerRequest below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from decode_world import World, assert_same, run, snapshot

from spinserve.control.hier_kv_manager import HierarchicalKVManager, HierarchyConfig
from spinserve.control.host_pool import HostPagePool
from spinserve.control.kv_manager import PagedKVManager
from spinserve.control.page_directory import NONE
from spinserve.control.scheduler import Scheduler
from spinserve.control.working_sets import _join_row

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class PerRequest(HierarchicalKVManager):
    """The manager before batching: the scheduler goes request by request (ensure_decode
    declines), each new tail page by itself: hand over the old tail, join it to the rows, trim
    the oldest by age, then grow, own fresh slots from the pool, set the entries."""

    def ensure_decode(self, request_ids, num_tokens) -> bool:
        return False

    def _new_tails(self, helds) -> None:
        for held in helds:
            n = held.num_pages
            old = held.tail[self.lh0 :]
            if (old != NONE).all():
                self.dir.hand_over(old)
                held.rows = np.concatenate([held.rows, old[:, None]], axis=1)
                self.sets.trim(held, held.width, by_age=True)
            self.dir.grow([held.row], [n + 1])
            slots = self.dir.own_hbm(held.row, self.LH)
            self.dir.set_hbm([held.row], [n], slots[None])
            held.tail[:] = slots  # a view of the manager's tails_cpu row
            held.num_pages = n + 1


class Counting(HierarchicalKVManager):
    """The real manager, counting how its batched path was used and its buffer shrinks."""

    runs: list[int] = []
    declined = shrinks = 0

    def ensure_decode(self, request_ids, num_tokens) -> bool:
        ok = super().ensure_decode(request_ids, num_tokens)
        Counting.declined += not ok
        return ok

    def _new_tails(self, helds) -> None:
        Counting.runs.append(len(helds))
        super()._new_tails(helds)

    def _make_room(self, num_slots: int) -> None:
        Counting.shrinks += num_slots > self.hbm_slots.num_free
        super()._make_room(num_slots)


class Watching(Scheduler):
    """Counts the steps where ensure_decode declined but the per-request loop then neither
    preempted nor shrank a buffer (the batched path would have been exact)."""

    needless = 0

    def _schedule_decode(self, out) -> None:
        before = (Counting.declined, Counting.shrinks, len(out.preempted))
        super()._schedule_decode(out)
        declined = Counting.declined > before[0]
        needed = Counting.shrinks > before[1] or len(out.preempted) > before[2]
        Watching.needless += declined and not needed


def _rows(kv):
    return kv.sets.row_slots_cpu, kv.sets.row_slots_gpu


WORLDS = {
    "roomy": World(),
    "all_sparse": World(dense_layers=0),
    "hbm_short": World(hbm_pages=24, host_pages=60),
    "both_short": World(hbm_pages=30, host_pages=40, dense_layers=0),
}


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_batched_new_tails_equal_the_per_request_path(name):
    world = WORLDS[name]
    Counting.runs, Counting.declined, Watching.needless = [], 0, 0
    for seed in range(2):
        ref = run(world, seed, PerRequest, HierarchyConfig, Scheduler, _rows)
        got = run(world, seed, Counting, HierarchyConfig, Watching, _rows)
        assert_same(ref, got)
        assert sum(len(ids[1]) for ids, _, _ in got) > 300  # decode items
    runs = np.array(Counting.runs)
    assert (runs >= 2).sum() >= 2 and runs.max() >= 3  # several new tails in one pass
    assert Counting.declined > 0  # pools short at times: request by request, with preemption
    assert Watching.needless == 0  # ... and only then


class PagedPerRequest(PagedKVManager):
    def ensure_decode(self, request_ids, num_tokens) -> bool:
        return False


def test_paged_manager_ensure_decode_equals_the_per_request_path():
    world = World(hierarchy=False, hbm_pages=30)
    for seed in range(3):
        ref = run(world, seed, PagedPerRequest, None, Scheduler, None)
        got = run(world, seed, PagedKVManager, None, Scheduler, None)
        assert_same(ref, got)
        assert sum(len(ids[2]) for ids, _, _ in got) > 0  # it preempted on the way


def test_ensure_decode_declines_without_room_and_changes_nothing():
    cfg = HierarchyConfig(2, 2, 8, 4, 256, 12 * 4 + 1, 1, 1.0, segment_pages=2, mandatory_hint=2)
    hbm = torch.zeros(12 * 4 + 1, 2, 8, 64)
    host = HostPagePool(cfg.num_host_slots, 8, 64, torch.float32, use_cuda=False)
    kv = HierarchicalKVManager(cfg, hbm, host, lambda rid: 2)
    for rid in ("a", "b"):
        kv.ensure(rid, 40)  # 5 pages each: 10 of the 12 host pages
        kv.finish_prefill(rid, 40)
    kv.flush()
    assert (kv.hbm_slots.num_free, kv.host.allocator.num_free) == (12, 8)
    before = snapshot(kv, _rows)
    # 12 HBM slots (3 pages) and 8 host slots (2 pages) free: 3 pages do not fit, nothing moves
    assert not kv.ensure_decode(["a", "b"], [41, 49])
    assert not kv.ensure_decode(["a", "x"], [40, 1])  # x is not held
    assert_same([before], [snapshot(kv, _rows)])
    assert kv.ensure_decode(["a", "b"], [40, 40])  # nothing to add
    assert kv.ensure_decode(["a"], [41])  # one page fits
    assert kv._held["a"].num_pages == 6 and kv._held["b"].num_pages == 5
    kv.check_integrity(on_device=True)


def test_join_row_drops_the_first_oldest_and_keeps_column_order():
    ages = np.array([0, 9, 3, 9, 1, 7, 2, 0, 5], np.uint8)  # slot -> LRU age
    now = 3  # epochs = now - age, wrapping: the ages as the LRU's uint8 epochs hold them
    epoch = (now - ages.astype(np.int64)) % 256
    rows = np.array([[1, 2, 3], [4, 5, 6], [7, 6, 4]], np.int32)
    tail = np.array([8, 7, 5], np.int32)
    joined = np.full((3, 3), -9, np.int32)
    dropped = np.full(3, -9, np.int32)
    mirror = np.full((3, 5), -1, np.int32)
    _join_row(rows, tail, epoch.astype(np.uint8), now, joined, dropped, mirror)
    # row 0: ages 9, 3, 9, tail 5 -> slot 1 (first of the 9s); row 1: 1, 7, 2, tail 0 -> 5;
    # row 2: 0, 2, 1, tail 7 -> the tail itself
    assert dropped.tolist() == [1, 5, 5]
    assert joined.tolist() == [[2, 3, 8], [4, 6, 7], [7, 6, 4]]
    assert np.array_equal(mirror[:, :3], joined) and (mirror[:, 3:] == -1).all()
    grown = np.full((3, 4), -9, np.int32)  # within the width: nothing dropped, tail appended
    _join_row(rows, tail, epoch.astype(np.uint8), now, grown, np.zeros(0, np.int32), mirror)
    assert grown.tolist() == [[1, 2, 3, 8], [4, 5, 6, 7], [7, 6, 4, 5]]
    assert np.array_equal(mirror[:, :4], grown)
