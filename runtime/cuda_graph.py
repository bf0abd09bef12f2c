"""CUDA graphs for decode: one graph per batch bucket, captured largest first into one pool.

Static inputs (DecodeStaticInputs) are sized for the largest bucket and the longest context;
`copy_from(batch)` writes a ForwardBatch into them and pads rows up to the bucket: a padded row
reads one page, the reserved dummy slot 0, and appends its (garbage) K/V into that same slot.
The kv_slots buffer of bucket b has a fixed capacity (b * KV * max_pages), so kernel grids
depend only on the bucket, never on the step's lengths. Dense decode only: sparse selection
runs eagerly (its outputs are data-dependent in size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import ForwardBatch, ForwardMode

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
DUMMY_SLOT = 0


def buckets_up_to(max_batch: int) -> list[int]:
    out = [b for b in DEFAULT_BUCKETS if b < max_batch]
    return out + [max_batch]


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

    @classmethod
    def allocate(cls, num_layers, num_kv_heads, max_batch, max_pages, device) -> DecodeStaticInputs:
        rows = max_batch * num_kv_heads

        def z(*shape, dtype=torch.int32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            input_ids=z(max_batch, dtype=torch.int64),
            positions=z(max_batch, dtype=torch.int64),
            append_slots=z(num_layers, max_batch, num_kv_heads),
            append_offsets=z(max_batch),
            qo_indptr=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            kv_indptr=z(rows + 1),
            kv_slots=z(num_layers, rows * max_pages),
            kv_last_page_len=torch.ones(rows, dtype=torch.int32, device=device),
            logits_indices=torch.arange(max_batch, dtype=torch.int64, device=device),
            max_pages=max_pages,
        )

    def view(self, bs: int, num_kv_heads: int) -> ForwardBatch:
        """The ForwardBatch a bucket-`bs` graph is captured with (views of the buffers)."""
        rows = bs * num_kv_heads
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            append_slots=self.append_slots[:, :bs],
            append_offsets=self.append_offsets[:bs],
            qo_indptr=self.qo_indptr[: bs + 1],
            kv_indptr=self.kv_indptr[: rows + 1],
            kv_slots=self.kv_slots[:, : rows * self.max_pages],
            kv_last_page_len=self.kv_last_page_len[:rows],
            logits_indices=self.logits_indices[:bs],
        )

    def copy_from(self, batch: ForwardBatch, bs: int, num_kv_heads: int) -> None:
        """Write `batch` (B <= bs rows) into the buffers; rows B..bs-1 become dummy rows."""
        B, rows, real_rows = batch.batch_size, bs * num_kv_heads, batch.batch_size * num_kv_heads
        nnz = batch.kv_slots.shape[1]
        self.input_ids[:B].copy_(batch.input_ids, non_blocking=True)
        self.input_ids[B:bs].zero_()
        self.positions[:B].copy_(batch.positions, non_blocking=True)
        self.positions[B:bs].zero_()
        self.append_slots[:, :B].copy_(batch.append_slots, non_blocking=True)
        self.append_slots[:, B:bs].fill_(DUMMY_SLOT)
        self.append_offsets[:B].copy_(batch.append_offsets, non_blocking=True)
        self.append_offsets[B:bs].zero_()
        self.kv_indptr[: real_rows + 1].copy_(batch.kv_indptr, non_blocking=True)
        # each padded row lists one page (the dummy slot) with one valid token
        pad = torch.arange(1, rows - real_rows + 1, dtype=torch.int32, device=self.kv_indptr.device)
        self.kv_indptr[real_rows + 1 : rows + 1] = pad + nnz
        self.kv_slots[:, :nnz].copy_(batch.kv_slots, non_blocking=True)
        self.kv_slots[:, nnz : nnz + rows - real_rows].fill_(DUMMY_SLOT)
        self.kv_last_page_len[:real_rows].copy_(batch.kv_last_page_len, non_blocking=True)
        self.kv_last_page_len[real_rows:rows].fill_(1)


class DecodeGraphRunner:
    """Captures `forward(batch) -> logits` per bucket and replays it for dense decode batches."""

    def __init__(
        self,
        forward,
        num_layers: int,
        num_kv_heads: int,
        max_batch: int,
        max_pages: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.num_kv_heads = num_kv_heads
        self.buckets = buckets_up_to(max_batch)
        self.static = DecodeStaticInputs.allocate(
            num_layers, num_kv_heads, max_batch, max_pages, device
        )
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def capture(self) -> None:
        """Largest bucket first, one shared memory pool; the static inputs hold dummy rows."""
        kv = self.num_kv_heads
        for bs in sorted(self.buckets, reverse=True):
            self.static.copy_from(self._empty_batch(), bs, kv)
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

    def _empty_batch(self) -> ForwardBatch:
        s, dev = self.static, self.static.input_ids.device
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=empty,
            positions=empty,
            append_slots=s.append_slots[:, :0],
            append_offsets=s.append_offsets[:0],
            qo_indptr=s.qo_indptr[:1],
            kv_indptr=torch.zeros(1, dtype=torch.int32, device=dev),
            kv_slots=s.kv_slots[:, :0],
            kv_last_page_len=s.kv_last_page_len[:0],
            logits_indices=empty,
        )

    def _bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def can_run(self, batch: ForwardBatch) -> bool:
        """Dense decode whose pages (plus the padded rows' dummy pages) fit a bucket."""
        if batch.mode is not ForwardMode.DECODE or batch.sparse is not None:
            return False
        bs = self._bucket(batch.batch_size)
        if bs is None:
            return False
        pad_rows = (bs - batch.batch_size) * self.num_kv_heads
        return batch.kv_slots.shape[1] + pad_rows <= bs * self.num_kv_heads * self.static.max_pages

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        bs = self._bucket(batch.batch_size)
        self.static.copy_from(batch, bs, self.num_kv_heads)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[: batch.batch_size]
