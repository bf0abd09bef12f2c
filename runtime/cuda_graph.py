"""CUDA graphs for decode: one graph per batch bucket, captured largest first into one pool.

Static inputs (DecodeStaticInputs) are sized for the largest bucket and the longest context;
`copy_from(batch)` writes a ForwardBatch into them and pads rows up to the bucket: a padded row
reads one page, the reserved dummy slot 0, and appends its (garbage) K/V into that same slot.
The kv_slots buffer of bucket b has a fixed capacity (b * KV * max_pages), so kernel grids
depend only on the bucket, never on the step's lengths.

Sparse decode graphs (`SparseGraphSpec`: one algorithm at one uniform budget, optionally through
the HBM/host hierarchy) run the capturable selection (runtime/sparse/static_select.py): their
static inputs add the requests' index rows, lengths and a page table of max_pages columns;
padded rows have req_slots -1 (the index's spare row, no hierarchy lookups) and length 1.
`replay=False` runs the same padded static batch eagerly instead of replaying: CPU tests of
the static path, and debugging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .batch import ForwardBatch, ForwardMode, SparseDecode

if TYPE_CHECKING:
    from .hierarchy import HierarchicalKV

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
DUMMY_SLOT = 0


def buckets_up_to(max_batch: int) -> list[int]:
    out = [b for b in DEFAULT_BUCKETS if b < max_batch]
    return out + [max_batch]


@dataclass(frozen=True)
class SparseGraphSpec:
    """What a sparse decode graph is captured for."""

    algorithm: str  # registry name; the planner must be capturable
    budget_tokens: int  # every request of a replayed batch has this budget
    table_layers: int  # layers of the page table copied per step (all, or the dense ones)
    hierarchy: HierarchicalKV | None = None  # sparse layers resolve through it


@dataclass
class DecodeStaticInputs:
    input_ids: torch.Tensor  # [max_B] int64
    positions: torch.Tensor  # [max_B] int64
    append_slots: torch.Tensor  # [L, max_B, KV] int32, padded rows -> dummy slot
    append_offsets: torch.Tensor  # [max_B] int32
    qo_indptr: torch.Tensor  # [max_B + 1] int32, = arange (one token per row)
    kv_indptr: torch.Tensor  # [max_B * KV + 1] int32
    kv_slots: torch.Tensor  # [L, max_B * KV * max_pages] int32, 0 = dummy slot
    kv_last_page_len: torch.Tensor  # [max_B * KV] int32
    logits_indices: torch.Tensor  # [max_B] int64, = arange
    max_pages: int  # pages per (request, kv_head) a graph can read
    sparse: SparseGraphSpec | None = None
    req_slots: torch.Tensor | None = None  # [max_B] int64 sparse index/directory rows, -1 = pad
    seq_lens: torch.Tensor | None = None  # [max_B] int64 context incl. the new token, pad 1
    page_table: torch.Tensor | None = None  # [L', max_B, KV, max_pages] int32 slots, 0 = dummy

    @classmethod
    def allocate(
        cls, num_layers, num_kv_heads, max_batch, max_pages, device, sparse=None
    ) -> DecodeStaticInputs:
        rows = max_batch * num_kv_heads

        def z(*shape, dtype=torch.int32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        if sparse is not None:  # dense CSR unused (selection builds its own): minimal buffers
            kv_slots = z(num_layers, rows)
            extra = {
                "sparse": sparse,
                "req_slots": torch.full((max_batch,), -1, dtype=torch.int64, device=device),
                "seq_lens": torch.ones(max_batch, dtype=torch.int64, device=device),
                "page_table": z(sparse.table_layers, max_batch, num_kv_heads, max_pages),
            }
        else:
            kv_slots, extra = z(num_layers, rows * max_pages), {}
        return cls(
            input_ids=z(max_batch, dtype=torch.int64),
            positions=z(max_batch, dtype=torch.int64),
            append_slots=z(num_layers, max_batch, num_kv_heads),
            append_offsets=z(max_batch),
            qo_indptr=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            kv_indptr=z(rows + 1),
            kv_slots=kv_slots,
            kv_last_page_len=torch.ones(rows, dtype=torch.int32, device=device),
            logits_indices=torch.arange(max_batch, dtype=torch.int64, device=device),
            max_pages=max_pages,
            **extra,
        )

    def view(self, bs: int, num_kv_heads: int) -> ForwardBatch:
        """The ForwardBatch a bucket-`bs` graph is captured with (views of the buffers)."""
        rows = bs * num_kv_heads
        sp = self.sparse
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            append_slots=self.append_slots[:, :bs],
            append_offsets=self.append_offsets[:bs],
            qo_indptr=self.qo_indptr[: bs + 1],
            kv_indptr=self.kv_indptr[: rows + 1],
            kv_slots=self.kv_slots[:, : rows * (1 if sp else self.max_pages)],
            kv_last_page_len=self.kv_last_page_len[:rows],
            logits_indices=self.logits_indices[:bs],
            sparse=None
            if sp is None
            else SparseDecode(
                algorithm=sp.algorithm,
                req_slots=self.req_slots[:bs],
                seq_lens=self.seq_lens[:bs],
                page_table=self.page_table[:, :bs],
                budget_tokens=self.seq_lens[:bs],  # unused: uniform_budget below
                hierarchy=sp.hierarchy,
                max_pages=self.max_pages,
                uniform_budget=sp.budget_tokens,
            ),
        )

    def copy_from(self, batch: ForwardBatch, bs: int, num_kv_heads: int) -> None:
        """Write `batch` (B <= bs rows) into the buffers; rows B..bs-1 become dummy rows."""
        B, real_rows = batch.batch_size, batch.batch_size * num_kv_heads
        self.input_ids[:B].copy_(batch.input_ids, non_blocking=True)
        self.positions[:B].copy_(batch.positions, non_blocking=True)
        self.append_slots[:, :B].copy_(batch.append_slots, non_blocking=True)
        self.append_offsets[:B].copy_(batch.append_offsets, non_blocking=True)
        nnz = 0
        if self.sparse is None:
            nnz = batch.kv_slots.shape[1]
            self.kv_indptr[: real_rows + 1].copy_(batch.kv_indptr, non_blocking=True)
            self.kv_slots[:, :nnz].copy_(batch.kv_slots, non_blocking=True)
            self.kv_last_page_len[:real_rows].copy_(batch.kv_last_page_len, non_blocking=True)
        else:
            sp = batch.sparse
            self.req_slots[:B].copy_(sp.req_slots, non_blocking=True)
            self.seq_lens[:B].copy_(sp.seq_lens, non_blocking=True)
            # columns past a row's pages keep stale slots: the selection never lists them
            n = sp.page_table.shape[-1]
            self.page_table[:, :B, :, :n].copy_(sp.page_table, non_blocking=True)
        self.pad(B, bs, num_kv_heads, nnz)

    def pad(self, B: int, bs: int, num_kv_heads: int, nnz: int = 0) -> None:
        """Rows B..bs-1 become dummy rows: token 0 at position 0 appended into the dummy slot,
        attending to the dummy slot only (dense: one page each after the nnz real pages)."""
        self.input_ids[B:bs].zero_()
        self.positions[B:bs].zero_()
        self.append_slots[:, B:bs].fill_(DUMMY_SLOT)
        self.append_offsets[B:bs].zero_()
        if self.sparse is None:
            rows, real_rows = bs * num_kv_heads, B * num_kv_heads
            dev = self.kv_indptr.device
            pad = torch.arange(1, rows - real_rows + 1, dtype=torch.int32, device=dev)
            self.kv_indptr[real_rows + 1 : rows + 1] = pad + nnz
            self.kv_slots[:, nnz : nnz + rows - real_rows].fill_(DUMMY_SLOT)
            self.kv_last_page_len[real_rows:rows].fill_(1)
        else:
            self.req_slots[B:bs].fill_(-1)
            self.seq_lens[B:bs].fill_(1)
            self.page_table[:, B:bs, :, 0].fill_(DUMMY_SLOT)


class DecodeGraphRunner:
    """Captures `forward(batch) -> logits` per bucket and replays it for the decode batches it
    suits: dense ones, or (with `sparse`) those of one algorithm at one uniform budget."""

    def __init__(
        self,
        forward,
        num_layers: int,
        num_kv_heads: int,
        max_batch: int,
        max_pages: int,
        device: torch.device,
        sparse: SparseGraphSpec | None = None,
        replay: bool = True,
    ) -> None:
        self.forward = forward
        self.num_kv_heads = num_kv_heads
        self.buckets = buckets_up_to(max_batch)
        self.static = DecodeStaticInputs.allocate(
            num_layers, num_kv_heads, max_batch, max_pages, device, sparse
        )
        self.replay = replay
        self.runs = 0  # batches run (replayed, or eagerly with replay=False)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def capture(self) -> None:
        """Largest bucket first, one shared memory pool; the static inputs hold dummy rows.
        With replay=False nothing is captured: run() calls forward on the padded batch."""
        if not self.replay:
            return
        kv = self.num_kv_heads
        for bs in sorted(self.buckets, reverse=True):
            self.static.pad(0, bs, kv)
            batch = self.static.view(bs, kv)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(batch)  # warm-up: Triton compiles/autotunes outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()

    def _bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode batch of this runner's kind whose pages fit a bucket."""
        bs = self._bucket(batch.batch_size)
        if batch.mode is not ForwardMode.DECODE or bs is None:
            return False
        spec, sp, M = self.static.sparse, batch.sparse, self.static.max_pages
        if spec is None:
            pad_rows = (bs - batch.batch_size) * self.num_kv_heads
            return sp is None and batch.kv_slots.shape[1] + pad_rows <= bs * self.num_kv_heads * M
        return (
            sp is not None
            and sp.algorithm == spec.algorithm
            and sp.uniform_budget == spec.budget_tokens
            and sp.hierarchy is spec.hierarchy
            and sp.page_table.shape[0] == spec.table_layers
            and sp.page_table.shape[-1] <= M
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        bs = self._bucket(batch.batch_size)
        self.static.copy_from(batch, bs, self.num_kv_heads)
        self.runs += 1
        if not self.replay:
            return self.forward(self.static.view(bs, self.num_kv_heads))[: batch.batch_size]
        graph, out = self.graphs[bs]
        graph.replay()
        return out[: batch.batch_size]
