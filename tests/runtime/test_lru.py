from __future__ import annotations

import numpy as np
import pytest
import torch

from spinserve.control.page_directory import DirectoryConfig, PageDirectory
from spinserve.control.slot_allocator import SlotAllocator
from spinserve.runtime.lru import (
    MAX_AGE,
    PAD,
    BucketedLRU,
    LRUReference,
    assign_victims,
    install_pages,
    page_entry_index,
    select_victims_reference,
)


def _t(x, dtype=torch.int32, device="cpu"):
    return torch.tensor(x, dtype=dtype, device=device)


def _aged_lru():
    """Slots 1..8 with ages: 1:3, 2:3, 3:2, 4:1, 5:0, 6:255 (never touched), 7:2, 8:1."""
    lru = BucketedLRU(10)
    lru.advance()
    lru.touch(_t([1, 2]))
    lru.advance()
    lru.touch(_t([3, 7]))
    lru.advance()
    lru.touch(_t([4, 8]))
    lru.advance()
    lru.touch(_t([5, -1]))
    return lru


def test_ages_after_touches():
    lru = _aged_lru()
    assert lru.ages().tolist() == [0, 3, 3, 2, 1, 0, 255, 2, 1, 255]  # slot 0 took the padding


def test_exact_eviction_order():
    lru = _aged_lru()
    # columns:         0  1  2  3  4  5  6  7   8
    row = _t([[8, 7, 6, 5, 4, 3, 2, 1, -1]])
    # order: age 255 (6), age 3 by column (2 then 1), age 2 by column (7 then 3),
    # age 1 by column (8 then 4); slot 5 (age 0) and the padding never go
    order = [6, 2, 1, 7, 3, 8, 4]
    for k in range(0, 10):
        victims, found = lru.select_victims(row, _t([k]), max_victims=8)
        chosen = set(order[: min(k, 7)])
        expect = [s for s in [8, 7, 6, 5, 4, 3, 2, 1] if s in chosen]  # column order
        assert victims[0].tolist() == expect + [PAD] * (8 - len(expect)), k
        assert found.tolist() == [min(k, 7)]


def test_rows_are_independent_and_capped_by_max_victims():
    lru = _aged_lru()
    rows = _t([[1, 3, 5, -1], [4, 8, 2, 6], [5, -1, -1, -1]])
    victims, found = lru.select_victims(rows, _t([1, 3, 2]), max_victims=2)
    assert victims.tolist() == [[1, PAD], [2, 6], [PAD, PAD]]
    assert found.tolist() == [1, 2, 0]


def test_mark_empty_goes_first_and_touch_protects():
    lru = _aged_lru()
    lru.mark_empty(_t([4]))
    lru.touch(_t([6]))
    victims, found = lru.select_victims(_t([[6, 4, 1, 3]]), _t([2]), max_victims=3)
    assert victims.tolist() == [[4, 1, PAD]]
    assert found.tolist() == [2]


def test_epoch_wraparound_saturates():
    lru = BucketedLRU(6)
    ref = LRUReference(6)
    for step in range(700):
        lru.advance()
        ref.advance()
        touched = [5] if step % 2 else [4]
        if step == 3:
            touched.append(1)  # then never again: must stay the oldest
        if step == 500:
            touched.append(2)  # 199 steps before the end
        lru.touch(_t(touched))
        ref.touch(touched)
    ages = lru.ages().tolist()
    assert ages == ref.ages()
    assert ages[1] == MAX_AGE and ages[2] == 199 and ages[3] == MAX_AGE
    victims, _ = lru.select_victims(_t([[2, 1, 4, 5]]), _t([2]), max_victims=2)
    assert victims.tolist() == [[2, 1]]


def test_assign_victims():
    miss = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    victims = _t([[7, 9, PAD], [3, PAD, PAD]])
    dest = assign_victims(miss, victims, _t([2, 1]))
    assert dest.tolist() == [[PAD, 7, 9, PAD, PAD], [3, PAD, PAD, PAD, PAD]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_misses_install_into_victims_and_metadata_stays_consistent(device):
    """One row (request 0, lh 1) over three decode steps, on the PageDirectory's device mirror:
    lookup -> victims -> install, with exact victims and entries; integrity holds throughout.
    On CUDA the step is one captured graph, replayed with host syncs forbidden."""
    config = DirectoryConfig(2, 8, segment_pages=4, num_layer_heads=2, num_segments=4)
    d = PageDirectory(config, SlotAllocator(10), SlotAllocator(40), device=device)
    d.admit(0)
    d.grow([0], [6])
    row_slots = torch.from_numpy(d.own_hbm(0, 3))[None, :].int().to(device)  # [[1, 2, 3]]
    d.flush()
    lru = BucketedLRU(10, device)
    req, lh = torch.tensor([0], device=device), torch.tensor([1], device=device)
    pages = torch.full((1, 3), PAD, dtype=torch.int64, device=device)  # static input

    def one_step() -> torch.Tensor:
        lru.advance()
        entries = page_entry_index(d.dir_gpu, req, pages, lh, d.l2_offset, 4, 2, d.spare)
        slots = d.meta_gpu[entries]
        miss = (pages >= 0) & (slots < 0)
        lru.touch(torch.where(miss, torch.full_like(slots, PAD), slots))
        victims, found = lru.select_victims(row_slots, miss.sum(1), max_victims=3)
        dest = assign_victims(miss, victims, found)
        install_pages(d.meta_gpu, entries, dest, d.rev_offset, d.spare)
        lru.touch(dest)
        return dest

    run = one_step
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: nothing runs yet
            out = one_step()

        def run() -> torch.Tensor:
            torch.cuda.set_sync_debug_mode("error")
            try:
                graph.replay()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            return out

    def step(p: list[int]) -> list[int]:
        pages.copy_(torch.tensor([p]))
        dest = run()[0].tolist()
        d.check_integrity(on_device=True)
        return dest

    def resident() -> list[int]:  # HBM slot of pages 0..5 for lh 1 on the device
        all_pages = torch.arange(6, device=device)[None]
        e = page_entry_index(d.dir_gpu, req, all_pages, lh, d.l2_offset, 4, 2, d.spare)
        return d.meta_gpu[e][0].tolist()

    assert step([0, 3, PAD]) == [1, 2, PAD]  # all empty (age 255): column order
    assert resident() == [1, PAD, PAD, 2, PAD, PAD]
    assert step([3, 5, 1]) == [PAD, 1, 3]  # page 3 hits; slot 2 is protected, 1 and 3 go
    assert resident() == [PAD, 3, PAD, 2, PAD, 1]  # page 0 lost slot 1
    assert step([0, PAD, PAD]) == [1, PAD, PAD]  # all aged 1: lowest column first
    assert resident() == [1, 3, PAD, 2, PAD, PAD]
    assert d.meta_gpu[d.spare] == PAD  # padding reads stay misses
    lru.mark_empty(torch.from_numpy(d.release(0)).to(device))
    d.flush()
    d.check_integrity(on_device=True)
    assert (d.slot_entry_gpu == PAD).all() and d.hbm_slots.num_used == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_against_reference(seed):
    rng = np.random.default_rng(seed)
    num_slots = int(rng.integers(8, 64))
    lru, ref = BucketedLRU(num_slots), LRUReference(num_slots)
    for _ in range(int(rng.integers(200, 400))):
        lru.advance()
        ref.advance()
        n = int(rng.integers(0, num_slots // 2))
        touched = rng.integers(-1, num_slots, size=n).tolist()
        lru.touch(_t(touched))
        ref.touch(touched)
        if rng.random() < 0.05:
            empty = rng.integers(1, num_slots, size=2).tolist()
            lru.mark_empty(_t(empty))
            ref.mark_empty(empty)
        if rng.random() < 0.2:
            _compare_victims(lru, ref, rng, num_slots)
    assert lru.ages().tolist() == ref.ages()


def _compare_victims(lru, ref, rng, num_slots):
    rows, width, max_victims = int(rng.integers(1, 6)), int(rng.integers(1, 20)), 8
    row_slots = rng.integers(1, num_slots, size=(rows, width))
    row_slots[rng.random((rows, width)) < 0.2] = PAD
    # a request owns distinct slots: drop repeats within a row
    for r in range(rows):
        _, first = np.unique(row_slots[r], return_index=True)
        dup = np.ones(width, dtype=bool)
        dup[first] = False
        row_slots[r][dup] = PAD
    need = rng.integers(0, width + 3, size=rows)
    victims, found = lru.select_victims(_t(row_slots), _t(need), max_victims)
    exp_v, exp_f = select_victims_reference(ref.ages(), row_slots.tolist(), need.tolist(), 8)
    assert victims.tolist() == exp_v
    assert found.tolist() == exp_f


@pytest.mark.gpu
def test_cuda_graph_replay_without_host_sync():
    dev = "cuda"
    num_slots, rows, width, max_victims = 512, 8, 64, 16
    lru = BucketedLRU(num_slots, dev)
    ref = LRUReference(num_slots)
    # static inputs: [rows, width] int32 slots, [rows] int32 needs, [T] int32 touches
    row_slots = torch.full((rows, width), PAD, dtype=torch.int32, device=dev)
    need = torch.zeros(rows, dtype=torch.int32, device=dev)
    touched = torch.full((32,), PAD, dtype=torch.int32, device=dev)

    def step():
        lru.advance()
        lru.touch(touched)
        return lru.select_victims(row_slots, need, max_victims)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up, also advances once
    torch.cuda.current_stream().wait_stream(s)
    ref.advance()
    ref.touch([PAD] * 32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_victims, out_found = step()
    # capture records the ops without running them: the reference is in lockstep already
    rng = np.random.default_rng(7)
    for _ in range(300):
        t = rng.integers(-1, num_slots, size=32)
        slots = np.stack([rng.permutation(np.arange(1, num_slots))[:width] for _ in range(rows)])
        slots[rng.random(slots.shape) < 0.1] = PAD
        n = rng.integers(0, width, size=rows)
        touched.copy_(torch.from_numpy(t).to(torch.int32))
        row_slots.copy_(torch.from_numpy(slots).to(torch.int32))
        need.copy_(torch.from_numpy(n).to(torch.int32))
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.advance()
        ref.touch(t.tolist())
        exp_v, exp_f = select_victims_reference(ref.ages(), slots.tolist(), n.tolist(), max_victims)
        assert out_victims.tolist() == exp_v
        assert out_found.tolist() == exp_f
