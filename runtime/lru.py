"""GPU bucketed LRU over HBM slots (DESIGN.md "Locality-aware cache manager").

Each HBM slot carries a uint8 epoch: the step at which it was last touched, modulo 256. The
current epoch lives in a 1-element device tensor, so a captured CUDA graph advances it on every
replay without the host. A slot's age is `(current - epoch) mod 256`:
  - age 0   : touched in this step (a hit or a just-filled miss): never a victim;
  - age 1.. : older; ages saturate at MAX_AGE = 255 (`advance` keeps the oldest bucket from
              wrapping to 0), so 255 means "255 or more steps ago, or holding no page".

Victims are chosen per row (a row = the HBM slots one request owns for one layer, say), oldest
bucket first, without sorting and without a host round trip:
  1. a histogram of the row's ages (scatter_add into [R, 256]);
  2. a prefix sum gives, per age a, how many eligible slots are at least that old (total minus
     prefix); the cutoff bucket c is the youngest age such that the slots aged >= c cover the
     request;
  3. every slot older than c is a victim; inside bucket c the slots earliest in the row win
     (tie rule: lower column index in `row_slots` first);
  4. victims are compacted in parallel (one cumsum counting both "older" and "in bucket c") into
     a fixed [R, max_victims] output in row-column order, padded with -1.
So the eviction order is (age descending, column ascending); asking for k victims returns the
first k of that order. All shapes are static, every op is a torch op with no `.item()`: the whole
thing is CUDA-graph safe. On CPU the same code runs eagerly.
"""

from __future__ import annotations

import torch

NUM_BUCKETS = 256  # uint8 epochs
MAX_AGE = NUM_BUCKETS - 1  # saturated age: "oldest", also given to slots holding no page
PAD = -1  # padding in slot lists and victim outputs


class BucketedLRU:
    """Epochs of `num_hbm_slots` HBM slots on `device`. Slot 0 (the dummy) absorbs padding."""

    def __init__(self, num_hbm_slots: int, device: torch.device | str = "cpu") -> None:
        # [num_hbm_slots] uint8: epoch of each slot's last touch; all start at age MAX_AGE
        self.epoch = torch.ones(num_hbm_slots, dtype=torch.uint8, device=device)
        # [1] uint8: the current epoch; advance() adds 1 (wrapping mod 256)
        self.current = torch.zeros(1, dtype=torch.uint8, device=device)

    def advance(self) -> None:
        """Start a new step: every age grows by one, saturating at MAX_AGE (once per step)."""
        saturated = (self.current - self.epoch) == MAX_AGE  # uint8 math wraps mod 256
        self.epoch.add_(saturated.to(torch.uint8))
        self.current.add_(1)

    def ages(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 ages of `slots` (any shape, no padding) or of every slot."""
        if slots is None:
            return self.current - self.epoch
        epoch = self.epoch.index_select(0, slots.reshape(-1).long()).view(slots.shape)
        return self.current - epoch

    def touch(self, slots: torch.Tensor) -> None:
        """Stamp `slots` (any shape, int, -1 = none) with the current epoch (age 0)."""
        idx = slots.reshape(-1).long().clamp_min(0)  # padding lands on the dummy slot 0
        self.epoch.scatter_(0, idx, self.current.expand(idx.numel()))

    def mark_empty(self, slots: torch.Tensor) -> None:
        """Give `slots` (-1 = none) age MAX_AGE: slots holding no page are evicted first."""
        idx = slots.reshape(-1).long().clamp_min(0)
        oldest = self.current + 1  # (current - (current + 1)) mod 256 == 255
        self.epoch.scatter_(0, idx, oldest.expand(idx.numel()))

    def select_victims(
        self,
        row_slots: torch.Tensor,  # [R, N] int32: HBM slots of each row, -1 = padding
        num_needed: torch.Tensor,  # [R] int: victims wanted per row (e.g. its misses)
        max_victims: int,  # static width of the output (worst case of num_needed)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose victims: ([R, max_victims] int32 slots in column order, -1 padded;
        [R] int32 victims found = min(num_needed, eligible slots, max_victims)).
        Slots of age 0 (touched this step) and padding are never chosen."""
        num_rows, device = row_slots.shape[0], row_slots.device
        age = self.ages(row_slots.clamp_min(0)).long()  # [R, N] in 0..255
        bucket = age * (row_slots >= 0)  # padding joins bucket 0 (age 0): never a victim
        hist = torch.zeros(num_rows, NUM_BUCKETS, dtype=torch.int64, device=device)
        hist.scatter_add_(1, bucket, torch.ones_like(bucket))
        prefix = hist.cumsum(1)  # prefix[r, a] = slots of age <= a
        # at_least[r, a - 1] = eligible slots of row r aged >= a, for a in 1..255
        at_least = prefix[:, -1:] - prefix[:, : NUM_BUCKETS - 1]
        need = torch.minimum(num_needed.long(), at_least[:, 0]).clamp(0, max_victims)
        # cutoff bucket: the largest age a >= 1 with at_least(a) >= need (255 when need == 0)
        cutoff = (at_least >= need[:, None]).sum(1, keepdim=True)  # [R, 1] in 1..255
        above = prefix[:, -1:] - prefix.gather(1, cutoff)  # [R, 1] slots older than the cutoff
        take = need[:, None] - above  # victims to take from the cutoff bucket, column order
        older, in_cut = bucket > cutoff, bucket == cutoff
        # one scan counts both: high 32 bits = older slots so far, low 32 bits = in_cut so far
        counts = ((older.long() << 32) | in_cut.long()).cumsum(1)
        seen_cut = counts & 0xFFFFFFFF
        victim = older | (in_cut & (seen_cut <= take))
        pos = (counts >> 32) + torch.minimum(seen_cut, take) - 1  # rank among the victims
        dump = torch.full_like(pos, max_victims)  # non-victims write into a spare column
        out = torch.full((num_rows, max_victims + 1), PAD, dtype=torch.int32, device=device)
        out.scatter_(1, torch.where(victim, pos, dump), row_slots.to(torch.int32))
        return out[:, :max_victims].clone(), need.to(torch.int32)


def assign_victims(
    miss: torch.Tensor,  # [R, M] bool: which requested pages of the row missed
    victims: torch.Tensor,  # [R, V] int32: select_victims output, -1 padded
    num_victims: torch.Tensor,  # [R] int32: valid victims per row
) -> torch.Tensor:
    """[R, M] int32 destination HBM slot for each miss (the j-th miss takes the j-th victim);
    -1 for hits and for misses beyond the victims found. Static shapes, no host sync."""
    rank = miss.long().cumsum(1) - 1
    ok = miss & (rank < num_victims[:, None].long())
    idx = rank.clamp(0, max(victims.shape[1] - 1, 0))
    picked = victims.gather(1, idx)
    return torch.where(ok, picked, torch.full_like(picked, PAD))


def page_entry_index(
    dir_gpu: torch.Tensor,  # [max_requests, max_segments] int32: level-1 directory
    req_slots: torch.Tensor,  # [R] int: request slot of each row
    pages: torch.Tensor,  # [R, K] int: logical pages, -1 = padding
    lh: torch.Tensor,  # [R] int: layer * num_kv_heads + kv_head of each row
    l2_offset: int,  # PageDirectory.l2_offset
    segment_pages: int,  # S
    num_layer_heads: int,  # LH
    spare: int,  # PageDirectory.spare: where padding points (reads -1)
) -> torch.Tensor:
    """[R, K] int64 index into the flat page metadata (PageDirectory.meta_gpu) of each page's
    HBM entry; `meta[index]` is then the page's HBM slot (-1 = miss). No host sync."""
    p = pages.long().clamp_min(0)
    seg = dir_gpu[req_slots.long()[:, None], p // segment_pages].long()
    entry = l2_offset + (seg * segment_pages + p % segment_pages) * num_layer_heads
    entry = entry + lh.long()[:, None]
    return torch.where((pages >= 0) & (seg >= 0), entry, torch.full_like(entry, spare))


def install_pages(
    meta: torch.Tensor,  # [spare + 1] int32: PageDirectory.meta_gpu, changed in place
    entries: torch.Tensor,  # [R, M] int64: meta index of each missed page's entry
    dest: torch.Tensor,  # [R, M] int32: assign_victims output (HBM slot per miss, -1 = none)
    rev_offset: int,  # PageDirectory.rev_offset
    spare: int,  # PageDirectory.spare
) -> None:
    """Record in the metadata that victim slot `dest` now holds page `entries` (the gather kernel
    fills the slot): the page the victim held loses its entry, the missed page's entry and the
    victim's reverse entry (slot_entry) are set. Padding writes -1 into the spare element, which
    therefore keeps reading as "no slot"."""
    ok = dest >= 0
    victim = torch.where(ok, dest, torch.zeros_like(dest)).long()
    spare_t = torch.full_like(victim, spare)
    old = meta.index_select(0, (rev_offset + victim).reshape(-1)).view(victim.shape).long()
    meta.index_put_((torch.where(ok & (old >= 0), old, spare_t),), torch.full_like(dest, PAD))
    meta.index_put_((torch.where(ok, entries.long(), spare_t),), dest)
    back = torch.where(ok, entries, torch.full_like(entries, PAD)).to(meta.dtype)
    meta.index_put_((torch.where(ok, rev_offset + victim, spare_t),), back)


def select_victims_reference(
    ages: list[int],  # age per HBM slot (already saturated at MAX_AGE)
    row_slots: list[list[int]],  # per row, slot ids, -1 = padding
    num_needed: list[int],
    max_victims: int,
) -> tuple[list[list[int]], list[int]]:
    """Pure-Python reference of BucketedLRU.select_victims (sort-based, same tie rule)."""
    out, found = [], []
    for slots, k in zip(row_slots, num_needed, strict=True):
        cand = [(-ages[s], col) for col, s in enumerate(slots) if s >= 0 and ages[s] > 0]
        chosen = sorted(cols for _, cols in sorted(cand)[: max(0, min(k, max_victims))])
        row = [slots[c] for c in chosen]
        found.append(len(row))
        out.append(row + [PAD] * (max_victims - len(row)))
    return out, found


class LRUReference:
    """Step-counting model of BucketedLRU (true ages, saturated at MAX_AGE) for tests."""

    def __init__(self, num_hbm_slots: int) -> None:
        self.step = 0
        self.last_touch = [None] * num_hbm_slots  # None = never touched / emptied

    def advance(self) -> None:
        self.step += 1

    def touch(self, slots: list[int]) -> None:
        for s in slots:
            self.last_touch[max(s, 0)] = self.step

    def mark_empty(self, slots: list[int]) -> None:
        for s in slots:
            self.last_touch[max(s, 0)] = None

    def ages(self) -> list[int]:
        return [MAX_AGE if t is None else min(self.step - t, MAX_AGE) for t in self.last_touch]
