"""Slot allocator for a page pool (HBM pool, host pool, level-2 segment pool).

A pool of `num_slots` equal slots; slot 0 is the reserved dummy slot (padding rows of a batch
point at it), so it is never handed out and never freed. Free slots sit on a numpy stack:
`alloc(n)` pops n slots and `free(slots)` pushes them back, both vectorised (no Python loop
over slots). A boolean map makes double frees and frees of never-allocated slots detectable.

Invariants: every slot in [1, num_slots) is either on the free stack exactly once (and
`_free_map[slot]` is True) or handed out exactly once. A failed call changes nothing.
"""

from __future__ import annotations

import numpy as np

DUMMY_SLOT = 0  # reserved in every pool: padding rows point at it


class SlotAllocatorError(ValueError):
    """Base class of allocator errors (a caller bug or an exhausted pool)."""


class OutOfSlotsError(SlotAllocatorError):
    """The pool has fewer free slots than asked for; nothing was allocated."""


class InvalidFreeError(SlotAllocatorError):
    """Double free, free of the dummy slot, or a slot out of range; nothing was freed."""


class SlotAllocator:
    """Hands out slot ids of one pool. `name` and `remedy` go into error messages."""

    def __init__(self, num_slots: int, name: str = "pool", remedy: str = "") -> None:
        if num_slots < 2:
            raise ValueError(
                f"{name}: num_slots must be >= 2 (slot 0 is reserved), got {num_slots}"
            )
        self.num_slots = num_slots
        self.name = name
        self.remedy = remedy
        # [num_slots - 1] int32, free slot ids; _stack[:_top] are free, the top is popped first
        self._stack = np.arange(num_slots - 1, 0, -1, dtype=np.int32)
        self._top = num_slots - 1
        # [num_slots] bool, True = slot is free; the dummy slot is never free
        self._free_map = np.ones(num_slots, dtype=bool)
        self._free_map[DUMMY_SLOT] = False

    @property
    def capacity(self) -> int:
        """Slots that can ever be handed out (all but the dummy)."""
        return self.num_slots - 1

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.capacity - self._top

    def can_alloc(self, num: int) -> bool:
        return 0 <= num <= self._top

    def alloc(self, num: int) -> np.ndarray:
        """Pop `num` slots: [num] int32. Raises OutOfSlotsError (nothing changed) if short."""
        if num < 0:
            raise ValueError(f"{self.name}: cannot allocate a negative number of slots ({num})")
        if num > self._top:
            msg = f"{self.name}: {num} slots requested, {self._top} free of {self.capacity}"
            raise OutOfSlotsError(f"{msg}. {self.remedy}".rstrip(". ") + ".")
        out = self._stack[self._top - num : self._top][::-1].copy()
        self._top -= num
        self._free_map[out] = False
        return out

    def free(self, slots: np.ndarray | list[int]) -> None:
        """Push slots back. Raises InvalidFreeError (nothing changed) on a bad or repeated slot."""
        slots = np.asarray(slots, dtype=np.int64).ravel()
        if slots.size == 0:
            return
        self._check_freeable(slots)
        n = slots.size
        self._stack[self._top : self._top + n] = slots[::-1]
        self._top += n
        self._free_map[slots] = True

    def _check_freeable(self, slots: np.ndarray) -> None:
        bad_range = (slots <= DUMMY_SLOT) | (slots >= self.num_slots)
        if bad_range.any():
            raise InvalidFreeError(
                f"{self.name}: cannot free slot(s) {slots[bad_range][:8].tolist()}: valid slots "
                f"are 1..{self.num_slots - 1} (slot 0 is the reserved dummy)"
            )
        already = self._free_map[slots]
        if already.any():
            raise InvalidFreeError(
                f"{self.name}: double free of slot(s) {slots[already][:8].tolist()}"
            )
        repeated = duplicates(slots)
        if repeated.size:
            raise InvalidFreeError(
                f"{self.name}: slot(s) {repeated[:8].tolist()} freed twice in one call"
            )

    def is_free(self, slots: np.ndarray | list[int]) -> np.ndarray:
        """[n] bool: which of the given slots are free."""
        return self._free_map[np.asarray(slots, dtype=np.int64)]

    def free_mask(self) -> np.ndarray:
        """[num_slots] bool, True = free (a read-only view; slot 0 is never free)."""
        view = self._free_map.view()
        view.flags.writeable = False
        return view

    def check(self) -> None:
        """Assert the stack and the map agree (each free slot on the stack exactly once)."""
        on_stack = self._stack[: self._top]
        counts = np.bincount(on_stack, minlength=self.num_slots)
        if counts.max(initial=0) > 1 or not np.array_equal(counts > 0, self._free_map):
            raise AssertionError(f"{self.name}: free stack and free map disagree")


def duplicates(values: np.ndarray) -> np.ndarray:
    """Values occurring more than once (sorted, a value may repeat). Sort-based: np.unique's hash
    path is slow on sparse ids."""
    s = np.sort(np.asarray(values).ravel())
    return s[1:][s[1:] == s[:-1]]
