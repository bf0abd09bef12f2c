from __future__ import annotations

import numpy as np
import pytest

from spinserve.control.slot_allocator import (
    DUMMY_SLOT,
    InvalidFreeError,
    OutOfSlotsError,
    SlotAllocator,
)


def test_alloc_order_and_reserved_dummy():
    a = SlotAllocator(6, name="hbm")
    assert a.capacity == 5 and a.num_free == 5
    np.testing.assert_array_equal(a.alloc(2), [1, 2])
    np.testing.assert_array_equal(a.alloc(3), [3, 4, 5])
    assert a.num_free == 0 and a.num_used == 5
    assert not a.is_free([DUMMY_SLOT])[0]
    a.free(np.array([4, 2], dtype=np.int32))
    # the last freed slot is handed out first (stack), in the order of the free call reversed
    np.testing.assert_array_equal(a.alloc(2), [4, 2])
    a.check()


def test_out_of_slots_changes_nothing_and_names_pool():
    a = SlotAllocator(4, name="host KV pool", remedy="Raise num_host_slots")
    a.alloc(2)
    before = (a.num_free, a.free_mask().copy())
    with pytest.raises(OutOfSlotsError, match=r"host KV pool: 2 slots requested, 1 free of 3"):
        a.alloc(2)
    with pytest.raises(OutOfSlotsError, match="Raise num_host_slots"):
        a.alloc(5)
    assert a.num_free == before[0]
    np.testing.assert_array_equal(a.free_mask(), before[1])
    np.testing.assert_array_equal(a.alloc(1), [3])


@pytest.mark.parametrize(
    "bad, match",
    [
        ([0], "reserved dummy"),
        ([9], "valid slots are 1..7"),
        ([-1], "valid slots"),
        ([5], "double free"),
        ([1, 1], "freed twice in one call"),
    ],
)
def test_invalid_free_changes_nothing(bad, match):
    a = SlotAllocator(8)
    a.alloc(3)  # 1, 2, 3 used; 4..7 free
    with pytest.raises(InvalidFreeError, match=match):
        a.free(bad)
    assert a.num_free == 4
    a.check()


def test_double_free_across_calls():
    a = SlotAllocator(8)
    s = a.alloc(4)
    a.free(s[:2])
    with pytest.raises(InvalidFreeError, match=r"double free of slot\(s\) \[2\]"):
        a.free(s[1:3])
    assert a.num_free == 5  # the partial call freed nothing
    a.free(s[2:])
    assert a.num_free == 7
    a.check()


def test_random_alloc_free_conserves_slots():
    rng = np.random.default_rng(1234)
    a = SlotAllocator(1000)
    held: list[np.ndarray] = []
    for _ in range(3000):
        if held and rng.random() < 0.5:
            a.free(held.pop(int(rng.integers(len(held)))))
        else:
            n = int(rng.integers(0, 40))
            if a.can_alloc(n):
                held.append(a.alloc(n))
            else:
                with pytest.raises(OutOfSlotsError):
                    a.alloc(n)
        live = np.concatenate(held) if held else np.zeros(0, dtype=np.int32)
        if live.size:
            assert np.unique(live).size == live.size
            assert live.min() >= 1 and live.max() <= 999
            assert not a.is_free(live).any()
        assert a.num_used == sum(h.size for h in held)
    a.check()
    for h in held:
        a.free(h)
    assert a.num_free == a.capacity
    a.check()


def test_check_detects_corruption():
    a = SlotAllocator(5)
    a.alloc(1)
    a._free_map[1] = True  # corrupt on purpose
    with pytest.raises(AssertionError, match="disagree"):
        a.check()
