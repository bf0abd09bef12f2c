"""A tiny hierarchical-KV world for the hierarchy tests: page directory, host pool filled with
random pages, HBM pool, per-row owned slots, LRU and HierarchicalKV over them."""

from __future__ import annotations

import numpy as np
import torch

from spinserve.control.host_pool import HostPagePool
from spinserve.control.page_directory import DirectoryConfig, PageDirectory
from spinserve.control.slot_allocator import SlotAllocator
from spinserve.plugins import ops
from spinserve.runtime.hierarchy import HierarchicalKV, HierarchyTables, TableLayout
from spinserve.runtime.lru import PAD, BucketedLRU

P, D = 16, 64


class World:
    def __init__(
        self,
        num_layers: int = 2,
        num_kv_heads: int = 2,
        max_requests: int = 3,
        max_pages: int = 8,
        row_width: int = 8,
        max_selected: int = 4,
        num_hbm: int = 200,
        num_host: int = 200,
        device: str = "cpu",
        seed: int = 0,
        fused: bool = False,
    ) -> None:
        self.L, self.KV, self.device = num_layers, num_kv_heads, torch.device(device)
        self.LH = num_layers * num_kv_heads
        self.W, self.K = row_width, max_selected
        self.gen = torch.Generator().manual_seed(seed)
        cfg = DirectoryConfig(max_requests, max_pages, 4, self.LH, num_segments=3 * max_requests)
        use_cuda = self.device.type == "cuda"
        self.host = HostPagePool(num_host, P, D, torch.float32, use_cuda=use_cuda)
        self.host.pool_cpu.copy_(torch.randn(self.host.shape, generator=self.gen))
        self.host.pool_cpu[0].zero_()
        self.dir = PageDirectory(cfg, SlotAllocator(num_hbm), self.host.allocator, device)
        # [num_hbm, 2, P, D] float32 HBM pool, poisoned
        self.hbm = torch.full((num_hbm, 2, P, D), float("nan"), device=device)
        self.hbm[0] = 0
        # [max_requests, LH, W] int32 owned HBM slots per row, -1 = none
        self.row_slots = torch.full((max_requests, self.LH, row_width), PAD, dtype=torch.int32)
        self.row_slots_gpu = self.row_slots.to(device)
        self.lru = BucketedLRU(num_hbm, device)
        d = self.dir
        layout = TableLayout(d.l2_offset, d.rev_offset, d.spare, 4, num_layers, num_kv_heads, P)
        tables = HierarchyTables(d.meta_gpu, d.dir_gpu, d.host_l2_gpu, self.row_slots_gpu)
        self.hier = HierarchicalKV(
            layout, tables, self.lru, self.hbm, self.host.pool_for_kernels, max_selected, fused
        )

    def admit(self, req: int, num_pages: int, width: int | None = None) -> None:
        """Admit, grow to num_pages (host slots hold random pages), give each row `width` slots."""
        width = self.W if width is None else width
        self.dir.admit(req)
        self.dir.grow([req], [num_pages])
        slots = self.dir.own_hbm(req, self.LH * width).reshape(self.LH, width)
        self.row_slots[req] = PAD
        self.row_slots[req, :, :width] = torch.from_numpy(slots)
        self.sync()

    def release(self, req: int) -> None:
        freed = self.dir.release(req)
        self.lru.mark_empty(torch.from_numpy(freed).to(self.device))
        self.row_slots[req] = PAD
        self.sync()

    def sync(self) -> None:
        self.dir.flush()
        self.row_slots_gpu.copy_(self.row_slots)

    def host_slots(self, req: int, layer: int, head: int, pages: list[int]) -> list[int]:
        return self.dir.host_entries(req, np.array(pages))[:, layer * self.KV + head].tolist()

    def resident(self, req: int, layer: int, head: int, num_pages: int) -> list[int]:
        """HBM slot of pages 0..num_pages-1 of a row, read from the DEVICE tables."""
        meta = self.dir.meta_gpu.cpu().numpy()
        segs = self.dir.dir_cpu[req, np.arange(num_pages) // 4]
        lh = layer * self.KV + head
        idx = self.dir.l2_offset + (segs * 4 + np.arange(num_pages) % 4) * self.LH + lh
        return meta[idx].tolist()


def csr(rows: list[list[int]], cap: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Page lists per row -> (indptr [R + 1] int32, page_ids [cap] int32, 0 padded)."""
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    ids = np.zeros(cap, dtype=np.int32)
    flat = [p for r in rows for p in r]
    ids[: len(flat)] = flat
    return torch.from_numpy(indptr).to(device), torch.from_numpy(ids).to(device)


def reference_attention(world: World, q, reqs, layer, rows, last_len, cap: int) -> torch.Tensor:
    """Attention over the host copies of the selected pages (the truth), with the same kernel on
    the same device and the same slot-list capacity (the split count depends on it) as the
    hierarchical call, so the outputs must match bit for bit."""
    host_rows = [
        world.host_slots(reqs[r // world.KV], layer, r % world.KV, pages) if pages else []
        for r, pages in enumerate(rows)
    ]
    dev = world.device
    indptr, slots = csr(host_rows, cap, dev)
    pool = world.host.pool_cpu.to(dev)
    out = ops.paged_decode_attention(q.to(dev), pool, indptr, slots, last_len.to(dev), D**-0.5)
    return out.cpu()


def random_rows(rng, num_pages: list[int], heads: int, max_selected: int) -> list[list[int]]:
    """Rows r = b * heads + h: 0..max_selected distinct ascending pages below num_pages[b]."""
    return [
        sorted(rng.choice(n, size=int(rng.integers(max_selected + 1)), replace=False).tolist())
        for n in num_pages
        for _ in range(heads)
    ]


def assert_same_state(a: World, b: World) -> None:
    """Two worlds after the same steps: same device tables, LRU epochs and counters."""
    for x, y, what in (
        (a.dir.meta_gpu, b.dir.meta_gpu, "page metadata"),
        (a.lru.epoch, b.lru.epoch, "LRU epochs"),
        (a.lru.current, b.lru.current, "LRU current epoch"),
        (a.hier.stats, b.hier.stats, "stats"),
        (a.hier.row_stats, b.hier.row_stats, "row_stats"),
    ):
        assert torch.equal(x, y), what
