from __future__ import annotations

import numpy as np
import pytest
import torch

from spinserve.control.page_directory import NONE, DirectoryConfig, PageDirectory
from spinserve.control.slot_allocator import OutOfSlotsError, SlotAllocator


def _make(num_hbm=20, num_host=60, num_segments=6, device="cpu", **kw):
    cfg = dict(max_requests=4, max_pages_per_request=10, segment_pages=4, num_layer_heads=2)
    cfg.update(kw)
    config = DirectoryConfig(num_segments=num_segments, **cfg)
    hbm = SlotAllocator(num_hbm, name="HBM KV pool")
    host = SlotAllocator(num_host, name="host KV pool", remedy="Raise num_host_slots")
    return PageDirectory(config, hbm, host, device=device)


def _state(d: PageDirectory):
    return (
        d.meta_cpu.copy(),
        d.host_l2_cpu.copy(),
        d.num_pages.copy(),
        d.hbm_owner.copy(),
        d.segments.free_mask().copy(),
        d.host_slots.free_mask().copy(),
        d.hbm_slots.free_mask().copy(),
    )


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_grow_layout_exact():
    d = _make()
    d.admit(1)
    d.admit(3)
    d.grow([1], [5])
    assert d.dir_cpu.tolist() == [[-1, -1, -1], [1, 2, -1], [-1, -1, -1], [-1, -1, -1]]
    assert d.host_entries(1, np.arange(5)).tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert d.host_l2_cpu[2, 1:].tolist() == [[NONE, NONE]] * 3  # beyond the context
    d.grow([3, 1], [1, 9])  # one batch call: request 3 starts, request 1 crosses a segment
    assert d.dir_cpu[1].tolist() == [1, 2, 4] and d.dir_cpu[3].tolist() == [3, -1, -1]
    assert d.host_entries(3, [0]).tolist() == [[11, 12]]
    assert d.host_entries(1, [5, 8]).tolist() == [[13, 14], [19, 20]]
    assert (d.hbm_entries(1, np.arange(9)) == NONE).all()
    assert d.num_pages[[1, 3]].tolist() == [9, 1]
    d.check_integrity()


def test_hbm_entries_need_ownership_and_pages():
    d = _make()
    d.admit(0)
    d.admit(2)
    d.grow([0, 2], [3, 1])
    mine = d.own_hbm(0, 2)
    theirs = d.own_hbm(2, 1)
    assert mine.tolist() == [1, 2] and theirs.tolist() == [3]
    with pytest.raises(ValueError, match="not owned by the request"):
        d.set_hbm([0], [1], [[mine[0], theirs[0]]])
    with pytest.raises(ValueError, match="page not allocated"):
        d.set_hbm([0], [3], [[mine[0], NONE]])
    d.set_hbm([0], [2], [[mine[1], mine[0]]])
    assert d.hbm_entries(0, [2]).tolist() == [[2, 1]]
    with pytest.raises(ValueError, match="would hold two pages"):
        d.set_hbm([0], [1], [[mine[0], NONE]])
    with pytest.raises(ValueError, match="would hold two pages"):
        d.set_hbm([0, 0], [0, 1], [[mine[0], NONE], [NONE, mine[0]]])
    d.set_hbm([0], [2], [[mine[0], mine[1]]])  # rewriting the same page may swap its slots
    assert d.hbm_entries(0, [2]).tolist() == [[1, 2]]
    d.set_hbm([0], [2], [[mine[0], NONE]])
    d.set_hbm([0], [1], [[NONE, mine[1]]])  # freed by the rewrite, so free to move
    assert d.hbm_entries(0, [1, 2]).tolist() == [[NONE, 2], [1, NONE]]
    d.check_integrity()
    d.disown_hbm(0, mine[:1])
    assert d.hbm_entries(0, [1, 2]).tolist() == [[NONE, 2], [NONE, NONE]]
    with pytest.raises(ValueError, match="not owned"):
        d.disown_hbm(0, mine[:1])
    d.check_integrity()


def test_flush_uploads_deltas_only_and_keeps_device_side_changes():
    d = _make()
    d.admit(0)
    d.grow([0], [2])
    slots = d.own_hbm(0, 3)
    assert d.flush() == 4 * 2 + 1  # one fresh segment (S x LH entries) + one directory entry
    np.testing.assert_array_equal(d.meta_gpu.numpy(), d.meta_cpu)
    # the decode graph installs a miss on the device: page 1, lh 0 -> slots[2]
    seg = int(d.dir_cpu[0, 0])
    entry = d.l2_offset + (seg * 4 + 1) * 2 + 0
    d.meta_gpu[entry] = int(slots[2])
    d.slot_entry_gpu[slots[2]] = entry
    assert d.hbm_entries(0, [1]).tolist() == [[NONE, NONE]]  # the CPU copy is separate
    d.set_hbm([0], [0], [[slots[0], slots[1]]])
    assert d.flush() == 4  # two entries + the two slots' reverse entries
    assert d.hbm_l2_gpu[seg, :2].tolist() == [[slots[0], slots[1]], [slots[2], NONE]]
    assert d.slot_entry_gpu[slots].tolist() == [entry - 2, entry - 1, entry]
    assert d.flush() == 0
    d.check_integrity(on_device=True)
    d.disown_hbm(0, slots[2:])  # the device copy forgets it although the CPU never saw it
    d.flush()
    assert d.hbm_l2_gpu[seg, 1].tolist() == [NONE, NONE]
    assert d.slot_entry_gpu[slots].tolist() == [entry - 2, entry - 1, NONE]
    d.check_integrity(on_device=True)
    d.release(0)
    d.flush()
    np.testing.assert_array_equal(d.dir_gpu.numpy(), np.full((4, 3), NONE))
    assert (d.slot_entry_gpu == NONE).all() and (d.hbm_l2_gpu[1:] == NONE).all()
    d.check_integrity(on_device=True)


def _entry(d: PageDirectory, req: int, page: int, lh: int) -> int:
    S, LH = d.config.segment_pages, d.config.num_layer_heads
    return d.l2_offset + (int(d.dir_cpu[req, page // S]) * S + page % S) * LH + lh


def _graph_install(d: PageDirectory, entry: int, victim: int) -> None:
    """What the decode graph does on the device: the victim's page loses its entry, the missed
    page's entry and the victim's reverse entry are set."""
    old = int(d.slot_entry_gpu[victim])
    if old >= 0:
        d.meta_gpu[old] = NONE
    d.meta_gpu[entry] = victim
    d.slot_entry_gpu[victim] = entry


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hand_over_cpu_forgets_device_untouched(device):
    d = _make(device=device)
    d.admit(0)
    d.admit(1)
    d.grow([0, 1], [5, 2])
    slots = d.own_hbm(0, 6).reshape(3, 2)
    other = d.own_hbm(1, 2)
    d.set_hbm([0, 0, 0], [0, 1, 4], slots)
    d.set_hbm([1], [1], other[None])
    d.flush()
    new = d.own_hbm(0, 2)
    d.set_hbm([0], [3], new[None])  # pending: hand_over flushes it first
    before = d.meta_cpu.copy()
    owner = d.hbm_owner.copy()
    handed = np.concatenate([slots[:2].ravel(), new])  # pages 0, 1, 3 of request 0
    d.hand_over(handed)
    np.testing.assert_array_equal(d.meta_gpu.cpu().numpy(), before)  # flushed, then untouched
    assert d.hbm_entries(0, [0, 1, 3]).tolist() == [[NONE, NONE]] * 3
    assert d.hbm_entries(0, [4]).tolist() == [slots[2].tolist()]  # not handed over: known
    assert d.hbm_entries(1, [1]).tolist() == [other.tolist()]
    assert (d.slot_entry_cpu[handed] == NONE).all()
    np.testing.assert_array_equal(d.slot_entry_cpu[slots[2]], before[d.rev_offset + slots[2]])
    np.testing.assert_array_equal(d.hbm_owner, owner)  # still request 0's
    assert d.flush() == 0  # nothing left to upload: the device keeps the graph's view
    d.check_integrity()
    d.check_integrity(on_device=True)
    # the graph moves pages: page 2 (lh 0) into page 0's slot, then page 0 into page 1's slot
    a, b = int(slots[0, 0]), int(slots[1, 0])
    _graph_install(d, _entry(d, 0, 2, 0), a)
    _graph_install(d, _entry(d, 0, 0, 0), b)
    d.check_integrity(on_device=True)
    d.disown_hbm(0, [a])  # the CPU's old belief (a holds page 0) must not reach the device
    d.flush()
    meta = d.meta_gpu.cpu().numpy()
    assert meta[_entry(d, 0, 0, 0)] == b and meta[d.rev_offset + b] == _entry(d, 0, 0, 0)
    assert meta[_entry(d, 0, 2, 0)] == NONE and meta[d.rev_offset + a] == NONE
    d.check_integrity(on_device=True)
    with pytest.raises(ValueError, match="owned by no request"):
        d.hand_over(np.array([a]))  # disowned: free again
    with pytest.raises(ValueError, match="out of range"):
        d.hand_over(np.array([-1]))
    d.release(0)
    d.release(1)
    d.flush()
    d.check_integrity(on_device=True)
    assert d.hbm_slots.num_used == d.segments.num_used == 0


def test_out_of_host_pool_refused_and_nothing_changed():
    d = _make(num_host=11)  # 10 usable host slots = 5 pages x 2 heads
    d.admit(0)
    d.admit(1)
    d.grow([0], [3])
    before = _state(d)
    with pytest.raises(OutOfSlotsError, match=r"host KV pool: 6 slots requested, 4 free.*Raise"):
        d.grow([0, 1], [4, 2])
    _assert_same(before, _state(d))
    d.check_integrity()
    d.grow([1], [2])  # what fits still works
    d.check_integrity()


def test_out_of_segments_refused_and_nothing_changed():
    d = _make(num_segments=3)  # two usable segments
    d.admit(0)
    d.admit(1)
    d.grow([0], [5])
    before = _state(d)
    with pytest.raises(OutOfSlotsError, match="page-table segments: 1 slots requested, 0 free"):
        d.grow([1], [1])
    _assert_same(before, _state(d))


def test_grow_argument_errors():
    d = _make()
    d.admit(0)
    d.grow([0], [3])
    with pytest.raises(ValueError, match="not admitted"):
        d.grow([1], [1])
    with pytest.raises(ValueError, match="must not shrink"):
        d.grow([0], [2])
    with pytest.raises(ValueError, match=r"<= 10 \(max context\)"):
        d.grow([0], [11])
    with pytest.raises(ValueError, match="appears twice"):
        d.grow([0, 0], [4, 5])
    with pytest.raises(ValueError, match="already in use"):
        d.admit(0)


def test_table_bytes_exact():
    d = _make()
    d.admit(0)
    d.grow([0], [5])  # two segments live
    b = d.table_bytes()
    per_segment = 4 * 2 * 4 * 2  # S * LH * int32 * (hbm + host)
    assert b["directory"] == 4 * 3 * 4
    assert b["segments_live"] == 2 * per_segment
    assert b["segments_reserved"] == 6 * per_segment
    assert b["two_level_live"] == 48 + 2 * per_segment
    assert b["flat"] == 4 * 10 * 2 * 4 * 2


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: d.host_l2_cpu.__setitem__((1, 1, 0), 1), "host slot is not owned once"),
        (lambda d: d.hbm_l2_cpu.__setitem__((1, 0, 0), 19), "does not own"),
        (lambda d: d.segments.alloc(1), "segment is neither free nor owned"),
        (lambda d: d.hbm_slots.alloc(1), "HBM slot is neither free nor owned"),
        (lambda d: d.hbm_l2_cpu.__setitem__((1, 3, 0), 1), "beyond a request's context"),
        (lambda d: d.hbm_l2_cpu.__setitem__((1, 1, 1), 2), "reverse map"),
        (lambda d: d.slot_entry_cpu.__setitem__(1, 5), "reverse map"),
    ],
)
def test_check_integrity_catches_corruption(corrupt, match):
    d = _make()
    d.admit(0)
    d.grow([0], [2])
    d.own_hbm(0, 2)
    d.check_integrity()
    corrupt(d)
    with pytest.raises(AssertionError, match=match):
        d.check_integrity()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_admit_step_finish_cancel(seed):
    rng = np.random.default_rng(seed)
    d = _make(
        num_hbm=120,
        num_host=400,
        num_segments=40,
        max_requests=8,
        max_pages_per_request=40,
        segment_pages=4,
        num_layer_heads=3,
    )
    refused = 0
    for op in range(3000):
        refused += _random_op(d, rng)
        if op % 97 == 0:
            d.flush()
            d.check_integrity()
            d.check_integrity(on_device=True)
    assert refused > 0  # the pools were small enough to run out at times
    for req in np.flatnonzero(d.active):
        d.release(int(req))
    d.flush()
    d.check_integrity()
    assert d.segments.num_used == d.host_slots.num_used == d.hbm_slots.num_used == 0
    np.testing.assert_array_equal(d.meta_gpu.numpy(), d.meta_cpu)
    assert (d.dir_cpu == NONE).all()


def _random_op(d: PageDirectory, rng) -> int:
    """One random operation; returns 1 when a pool refused it (and checks nothing changed)."""
    live = np.flatnonzero(d.active)
    kinds = ["admit", "step", "step", "own", "disown", "tail", "tail", "graph", "graph", "finish"]
    kind = rng.choice(kinds)
    before = _state(d)
    try:
        if kind == "admit" and live.size < d.config.max_requests:
            req = int(rng.choice(np.flatnonzero(~d.active)))
            d.admit(req)
            d.grow([req], [int(rng.integers(1, 20))])
        elif kind == "step" and live.size:
            reqs = rng.permutation(live)[: int(rng.integers(1, live.size + 1))]
            room = d.config.max_pages_per_request - d.num_pages[reqs]
            d.grow(reqs, d.num_pages[reqs] + np.minimum(rng.integers(0, 3, reqs.size), room))
        elif kind == "own" and live.size:
            d.own_hbm(int(rng.choice(live)), int(rng.integers(1, 8)))
        elif kind == "disown" and live.size:
            req = int(rng.choice(live))
            owned = np.flatnonzero(d.hbm_owner == req)
            d.disown_hbm(req, rng.permutation(owned)[: int(rng.integers(0, owned.size + 1))])
        elif kind == "tail" and live.size:
            _random_tail(d, rng, int(rng.choice(live)))
        elif kind == "graph" and live.size:
            d.flush()  # a decode step: the control plane flushes, then the graph runs
            _graph_installs_a_miss(d, rng, int(rng.choice(live)))
        elif kind == "finish" and live.size:
            d.release(int(rng.choice(live)))  # finish and cancel free the same way
    except OutOfSlotsError:
        if kind == "admit":  # the admitted slot stays empty: release it, as the engine would
            d.release(int(np.flatnonzero(d.active & (d.num_pages == 0))[0]))
            return 1
        _assert_same(before, _state(d))
        return 1
    return 0


def _random_tail(d: PageDirectory, rng, req: int) -> None:
    """Point a page's entries at free slots the request owns (as a fresh tail page would)."""
    lh = d.config.num_layer_heads
    if d.num_pages[req] == 0:
        return
    owned = np.flatnonzero(d.hbm_owner == req)
    segs = d.dir_cpu[req][d.dir_cpu[req] != NONE]
    unused = np.setdiff1d(owned, d.hbm_l2_cpu[segs].ravel())
    if unused.size < lh:
        return
    page = int(rng.integers(0, d.num_pages[req])) // 2 * 2  # even pages: the CPU's (see below)
    slots = rng.permutation(unused)[:lh].astype(np.int32)
    slots[rng.random(lh) < 0.3] = NONE
    d.set_hbm([req], [page], slots[None, :])
    assert d.hbm_entries(req, [page]).ravel().tolist() == slots.tolist()


def _graph_installs_a_miss(d: PageDirectory, rng, req: int) -> None:
    """What the decode graph does on the device copy: put an odd page's entry into one of the
    request's slots (its victim), unmapping whatever that slot and that entry held."""
    owned = np.flatnonzero(d.hbm_owner == req)
    if d.num_pages[req] < 2 or owned.size == 0:
        return
    page = int(rng.integers(0, d.num_pages[req] // 2)) * 2 + 1
    seg = int(d.dir_cpu[req, page // d.config.segment_pages])
    lh = int(rng.integers(0, d.config.num_layer_heads))
    entry = (
        d.l2_offset
        + (seg * d.config.segment_pages + page % d.config.segment_pages)
        * (d.config.num_layer_heads)
        + lh
    )
    victim = int(rng.choice(owned))
    meta, rev = d.meta_gpu, d.slot_entry_gpu
    if rev[victim] >= 0:
        meta[int(rev[victim])] = NONE
    if meta[entry] >= 0:
        rev[int(meta[entry])] = NONE
    meta[entry] = victim
    rev[victim] = entry


@pytest.mark.gpu
def test_cuda_tables_mirror_and_mapped_host_table():
    d = _make(device="cuda")
    d.admit(2)
    d.grow([2], [6])
    slots = d.own_hbm(2, 2)
    d.set_hbm([2], [5], [slots])
    d.flush()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(d.meta_gpu.cpu().numpy(), d.meta_cpu)
    assert d.host_l2_gpu.is_cuda
    np.testing.assert_array_equal(d.host_l2_gpu.cpu().numpy(), d.host_l2_cpu)  # through UVA
    d.host_l2_cpu[0, 0, 0] = 0  # still the dummy
    d.release(2)
    d.flush()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(d.meta_gpu.cpu().numpy(), d.meta_cpu)
    d.check_integrity(on_device=True)
    d.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hand_over_of_flushed_slots_waits_for_the_next_flush(device):
    """Slots whose entries the device already has are handed over at the next flush (no extra
    upload); a slot freed and re-owned in between keeps its new owner's entry."""
    d = _make(device=device)
    d.admit(0)
    d.admit(1)
    d.grow([0, 1], [3, 2])
    slots = d.own_hbm(0, 6).reshape(3, 2)
    d.set_hbm([0, 0, 0], [0, 1, 2], slots)
    d.flush()
    flushes = d.log.flushes
    d.hand_over(slots[:2].ravel())  # pages 0 and 1
    assert d.log.flushes == flushes  # deferred: no upload
    assert d.hbm_entries(0, [0]).tolist() == [slots[0].tolist()]  # the CPU still knows them
    d.disown_hbm(0, slots[1])  # page 1's slots go back ...
    again = d.own_hbm(1, 2)  # ... and may serve another request's page at once
    assert sorted(again.tolist()) == sorted(slots[1].tolist())
    d.set_hbm([1], [0], again[None])
    d.flush()
    assert d.hbm_entries(0, [0, 1]).tolist() == [[NONE, NONE]] * 2  # forgotten / disowned
    assert d.hbm_entries(1, [0]).tolist() == [again.tolist()]  # the new owner's, intact
    assert d.hbm_entries(0, [2]).tolist() == [slots[2].tolist()]
    meta = d.meta_gpu.cpu().numpy()
    assert meta[_entry(d, 0, 0, 0)] == slots[0, 0]  # the device keeps the handed-over page
    d.check_integrity(on_device=True)
