"""Page tables of resident requests and the ForwardBatch builder (dense attention).

Each logical page (P consecutive tokens of a request) owns num_layers * num_kv_heads pool slots,
one per (layer, kv_head), allocated together when the request's context reaches the page and
freed when the request ends. A request's table is a numpy array
    [num_layers * num_kv_heads, capacity] int32, row = layer * KV + kv_head, column = logical page
of which the first `num_pages` columns are valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spinserve.runtime.batch import ForwardBatch, ForwardMode
from spinserve.runtime.transfer import to_device

from .slot_allocator import SlotAllocator, duplicates


@dataclass(slots=True)
class BatchItem:
    request_id: str
    start_pos: int  # tokens of the request already in the cache
    token_ids: list[int]  # tokens computed in this forward
    all_logits: bool = False  # return logits of every token (tests), not just the last


class PagedKVManager:
    def __init__(self, num_layers: int, num_kv_heads: int, page_size: int, num_slots: int) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.page_size = page_size
        self.slots_per_page = num_layers * num_kv_heads
        self.allocator = SlotAllocator(
            num_slots, name="KV pool", remedy="raise cache.kv_cache_tokens or lower the load"
        )
        self._tables: dict[str, np.ndarray] = {}
        self._num_pages: dict[str, int] = {}

    @property
    def capacity_pages(self) -> int:
        """Logical pages the whole pool holds."""
        return self.allocator.capacity // self.slots_per_page

    @property
    def free_pages(self) -> int:
        return self.allocator.num_free // self.slots_per_page

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def extra_pages(self, request_id: str, num_tokens: int) -> int:
        """Pages to add so that the request holds num_tokens."""
        return max(0, self.pages_for(num_tokens) - self._num_pages.get(request_id, 0))

    def ensure(self, request_id: str, num_tokens: int) -> None:
        """Grow the request's table to hold num_tokens (raises OutOfSlotsError, nothing changed)."""
        extra = self.extra_pages(request_id, num_tokens)
        table = self._tables.get(request_id, np.zeros((self.slots_per_page, 0), np.int32))
        used = self._num_pages.get(request_id, 0)
        if extra:
            new_slots = self.allocator.alloc(extra * self.slots_per_page)
            if used + extra > table.shape[1]:
                grown = np.zeros(
                    (self.slots_per_page, max(2 * table.shape[1], used + extra)), np.int32
                )
                grown[:, :used] = table[:, :used]
                table = grown
            table[:, used : used + extra] = new_slots.reshape(extra, self.slots_per_page).T
        self._tables[request_id] = table
        self._num_pages[request_id] = used + extra

    def ensure_decode(self, request_ids: list[str], num_tokens: list[int]) -> bool:
        """ensure(r, n) for each pair in order if the pool holds every page this adds (then
        nobody runs short: the scheduler preempts nobody); False, nothing changed, otherwise."""
        extra = [self.extra_pages(r, n) for r, n in zip(request_ids, num_tokens)]
        if sum(extra) * self.slots_per_page > self.allocator.num_free:
            return False
        for r, n, e in zip(request_ids, num_tokens, extra):
            if e or r not in self._tables:
                self.ensure(r, n)
        return True

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        used = self._num_pages.pop(request_id, 0)
        if table is not None and used:
            self.allocator.free(table[:, :used].ravel())

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def check_integrity(self) -> None:
        """Every slot is either free or owned by exactly one (request, page, layer, head)."""
        self.allocator.check()
        owned = [t[:, : self._num_pages[r]].ravel() for r, t in self._tables.items()]
        owned_all = np.concatenate(owned) if owned else np.zeros(0, np.int32)
        if duplicates(owned_all).size:
            raise AssertionError("a KV slot is owned twice")
        if self.allocator.is_free(owned_all).any():
            raise AssertionError("a KV slot is owned and free at once")
        if owned_all.size + self.allocator.num_free != self.allocator.capacity:
            raise AssertionError(
                f"KV slots leaked: {owned_all.size} owned + {self.allocator.num_free} free "
                f"!= {self.allocator.capacity}"
            )

    def request_table(self, request_id: str) -> np.ndarray:
        """[L, KV, num_pages] int32 pool slots of one request."""
        n = self._num_pages[request_id]
        return self._tables[request_id][:, :n].reshape(self.num_layers, self.num_kv_heads, n)

    def batch_table(self, request_ids: list[str], layers: int | None = None) -> np.ndarray:
        """[layers, B, KV, N] int32 pool slots of the first `layers` layers (None: all),
        N = most pages in the batch, 0 (dummy) padded."""
        n_max = max(self._num_pages[r] for r in request_ids)
        L = self.num_layers if layers is None else layers
        out = np.zeros((L, len(request_ids), self.num_kv_heads, n_max), np.int32)
        for b, r in enumerate(request_ids):
            out[:, b, :, : self._num_pages[r]] = self.request_table(r)[:L]
        return out

    def build_batch(self, mode: ForwardMode, items: list[BatchItem], device) -> ForwardBatch:
        """Tables -> ForwardBatch tensors (the items' pages must already be ensured)."""
        return build_forward_batch(
            mode,
            items,
            self.num_layers,
            self.num_kv_heads,
            self.page_size,
            device,
            slots_of=lambda rid, pages: self._tables[rid][:, pages],
            range_of=lambda rid, first, end: self._tables[rid][:, first:end],  # a view
        )


def build_forward_batch(
    mode: ForwardMode,
    items: list[BatchItem],
    num_layers: int,
    num_kv_heads: int,
    page_size: int,
    device,
    slots_of: Callable[[str, np.ndarray], np.ndarray],
    range_of: Callable[[str, int, int], np.ndarray],
    first_page_of: Callable[[str, int], int] = lambda rid, num_pages: 0,
) -> ForwardBatch:
    """Assemble a ForwardBatch from the page-slot lookups of a KV manager.

    slots_of(request_id, logical pages [n]) -> [L * KV, n] int32 pool slots (appended tokens);
    range_of(request_id, first, end) -> the same for pages first..end-1 (the CSR rows; a view
    where the manager can: this runs for every page of every request each step);
    first_page_of(request_id, num_pages) -> first logical page the dense CSR lists (a
    hierarchical request lists only its tail page: the decode step resolves the rest)."""
    L, KV, P = num_layers, num_kv_heads, page_size
    ids, pos, append, kv_slots, pages_per_req, last_len, logit_idx = [], [], [], [], [], [], []
    offset = 0
    for it in items:
        n = len(it.token_ids)
        p = np.arange(it.start_pos, it.start_pos + n)
        ids.extend(it.token_ids)
        pos.append(p)
        append.append(slots_of(it.request_id, p // P).reshape(L, KV, n).transpose(0, 2, 1))
        total = it.start_pos + n
        num_pages = -(-total // P)
        first = first_page_of(it.request_id, num_pages)
        kv_slots.append(
            range_of(it.request_id, first, num_pages).reshape(L, KV * (num_pages - first))
        )
        pages_per_req.append(num_pages - first)
        last_len.append((total - 1) % P + 1)
        logit_idx.extend(range(offset, offset + n) if it.all_logits else [offset + n - 1])
        offset += n
    positions = np.concatenate(pos)
    qo_indptr = np.concatenate([[0], np.cumsum([len(it.token_ids) for it in items])])
    kv_indptr = np.concatenate([[0], np.cumsum(np.repeat(pages_per_req, KV))])

    def t(a, dtype):
        return to_device(a, dtype, device)  # no host sync: a launch may be in flight

    return ForwardBatch(
        mode=mode,
        input_ids=t(ids, torch.int64),
        positions=t(positions, torch.int64),
        append_slots=t(np.concatenate(append, axis=1), torch.int32),
        append_offsets=t(positions % P, torch.int32),
        qo_indptr=t(qo_indptr, torch.int32),
        kv_indptr=t(kv_indptr, torch.int32),
        kv_slots=t(np.concatenate(kv_slots, axis=1), torch.int32),
        kv_last_page_len=t(np.repeat(last_len, KV), torch.int32),
        logits_indices=t(logit_idx, torch.int64),
    )
