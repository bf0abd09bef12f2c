"""Inputs of perf/bench_decode_step.py (its docstring says what they model): the runtime's
Quest planner with random index and in-step miss forcing, KV pools that alias request-sized
regions, the hierarchy's tables built with the control plane's PageDirectory, and the decode
ForwardBatch the engine would build, for one measured `Shape`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spinserve.control.budgets import BudgetPolicy, initial_buffer
from spinserve.control.hier_kv_manager import mandatory_pages
from spinserve.control.host_pool import HostPagePool
from spinserve.control.page_directory import DirectoryConfig, PageDirectory
from spinserve.control.slot_allocator import SlotAllocator
from spinserve.runtime.batch import ForwardBatch, ForwardMode, SparseDecode
from spinserve.runtime.hierarchy import HierarchicalKV, HierarchyTables, TableLayout
from spinserve.runtime.lru import PAD, BucketedLRU, page_entry_index
from spinserve.runtime.sparse import SparseParams, create_algorithm
from spinserve.runtime.sparse.planner import SparsePlanner

BF16 = torch.bfloat16
P = 16
SEG = 64  # logical pages per level-2 segment


@dataclass(frozen=True)
class Shape:
    """One measured configuration (every layer sparse)."""

    batch: int
    context: int  # tokens including the new one; (context - 1) % P != P - 1: no page completes
    budget: int  # dynamic tokens per (request, layer, kv_head) row
    buffer_ratio: float  # HBM buffer pages per mandatory page

    @property
    def pages(self) -> int:
        return -(-self.context // P)

    @property
    def params(self) -> SparseParams:
        return SparseParams(self.budget, 16, 128, dense_layers=0)

    @property
    def mandatory(self) -> int:
        """The engine's max selected pages per row (the hierarchy's K)."""
        return mandatory_pages(self.params, self.budget, P)

    @property
    def width(self) -> int:
        """HBM slots a hierarchical row owns (HierarchicalKVManager.finish_prefill)."""
        policy = BudgetPolicy(self.buffer_ratio, max_buffer_ratio=max(8.0, self.buffer_ratio))
        return self.mandatory + initial_buffer(self.mandatory, policy)


# "32k": (a), (b), (c); "256": batch256's (i) and (ii) (budget = context / 16, as 2048 of 32K)
SHAPES = {"32k": Shape(32, 32768 - 8, 2048, 4.0), "256": Shape(256, 4096 - 8, 256, 1.0)}
SMOKE_SHAPES = {"32k": Shape(2, 2048 - 8, 256, 4.0), "256": Shape(8, 512 - 8, 64, 1.0)}


class MissForcingPlanner(SparsePlanner):
    """The runtime's planner plus miss control: after select_static, a fraction `force` of the
    selected pages that are resident (never a row's tail page) is evicted from the hierarchy's
    tables inside the step (entry and reverse entry cleared, slot marked empty), so the resolve
    that follows misses them and fetches them again. Inert while `hier` is None."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.hier: HierarchicalKV | None = None
        self.force = torch.zeros(1, device=self.states[0].buffers.device)  # [1] float32

    def select_static(self, layer, query, keys, cand, budget_tokens):
        sel, rows = super().select_static(layer, query, keys, cand, budget_tokens)
        if self.hier is not None and not self.is_dense_layer(layer):
            self._evict(layer, sel, rows, cand)
        return sel, rows

    def _evict(self, layer: int, sel, rows: torch.Tensor, cand) -> None:
        h, KV = self.hier, cand.num_kv_heads
        lay, t = h.layout, h.tables
        pos = torch.arange(rows.numel(), device=rows.device)
        indptr = sel.kv_indptr.long()
        req = cand.index_rows[rows // KV]  # directory row of each entry (spare: padding row)
        keep = (pos < indptr[-1]) & (pos < indptr[rows + 1] - 1) & (req != self.spare_row)
        lh = layer * KV + rows % KV
        e = page_entry_index(
            t.directory, torch.where(keep, req, 0), sel.page_ids.long()[:, None], lh,
            lay.l2_offset, lay.segment_pages, lay.num_layer_heads, lay.spare,
        ).view(-1)  # fmt: skip
        slots = t.meta[e]
        drop = keep & (slots >= 0) & (torch.rand(slots.shape, device=slots.device) < self.force)
        spare = torch.full_like(e, lay.spare)
        none = torch.full_like(slots, PAD)
        t.meta.index_put_((torch.where(drop, e, spare),), none)
        t.meta.index_put_((torch.where(drop, lay.rev_offset + slots.long(), spare),), none)
        h.lru.mark_empty(torch.where(drop, slots, none))


def make_planner(cfg, shape, device: str, seed: int) -> MissForcingPlanner:
    """Quest (bf16 index) for shape.batch request rows, reserved for the context, with random
    per-page key min / max (max >= min) in every layer."""
    algo = create_algorithm(
        "quest", P, cfg.num_kv_heads, cfg.head_dim, shape.params, index_dtype=BF16
    )
    planner = MissForcingPlanner(algo, cfg.num_layers, shape.batch, device)
    planner.reserve(shape.pages)
    g = torch.Generator(device).manual_seed(seed)
    for state in planner.states:  # [batch + 1, KV, pages, D] bf16 each
        kmin, kmax = state.buffers["kmin"], state.buffers["kmax"]
        kmin.normal_(generator=g)
        kmax.uniform_(0, 1, generator=g).add_(kmin)
    return planner


def aliased_rows(cfg, batch: int, regions: int) -> np.ndarray:
    """[batch, L * KV] physical (layer, head) row of request b's rows in a pool of `regions`
    request-sized regions: region b % regions, layer (l + b // regions) % L."""
    L, KV = cfg.num_layers, cfg.num_kv_heads
    b = np.arange(batch)
    layer = (np.arange(L)[None, :] + (b // regions)[:, None]) % L  # [B, L]
    row = (b % regions)[:, None] * L + layer
    return (row[:, :, None] * KV + np.arange(KV)).reshape(batch, L * KV)


def resident_pool(cfg, shape, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool [1 + R * L * KV * N, 2, P, D] bf16 random, slot 0 dummy; table [L, B, KV, N]
    int32 slot of request b's logical page j of (layer, head)), R = ceil(B / L) regions."""
    L, KV, D, N, B = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, shape.pages, shape.batch
    regions = -(-B // L)
    g = torch.Generator(device).manual_seed(2)
    pool = torch.randn(1 + regions * L * KV * N, 2, P, D, generator=g, device=device, dtype=BF16)
    phys = torch.from_numpy(aliased_rows(cfg, B, regions)).to(device)  # [B, LH]
    base = 1 + phys.view(B, L, KV).permute(1, 0, 2) * N  # [L, B, KV]
    table = (base[..., None] + torch.arange(N, device=device)).int()
    return pool, table


def make_host_pool(cfg, shape, src: torch.Tensor | None, device: str) -> HostPagePool:
    """One request-sized host region [1 + L * KV * N, 2, P, D] (pinned, mapped with CUDA):
    `src`'s pages, or random ones."""
    rows = cfg.num_layers * cfg.num_kv_heads * shape.pages
    host = HostPagePool(1 + rows, P, cfg.head_dim, BF16, use_cuda=device == "cuda")
    if src is None:
        g = torch.Generator(device).manual_seed(4)
        src = torch.randn(rows, 2, P, cfg.head_dim, generator=g, device=device, dtype=BF16)
    host.pool_cpu[1:].copy_(src)
    return host


def build_hierarchy(cfg, shape, host: HostPagePool, device: str):
    """(HierarchicalKV, tail slots [L, B, KV] int32, PageDirectory): the control plane's
    directory with every page of every request allocated, host entries aliased onto `host`
    (request b's row reads row (l + b) % L), each (request, layer, head) row owning
    shape.width HBM slots plus a dedicated tail slot holding its resident tail page."""
    L, KV, D, N, B = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, shape.pages, shape.batch
    LH, W = L * KV, shape.width
    num_hbm = 1 + B * LH * (W + 1)
    nseg = -(-N // SEG)
    dcfg = DirectoryConfig(B, N, SEG, LH, num_segments=1 + B * nseg)
    d = PageDirectory(dcfg, SlotAllocator(num_hbm), SlotAllocator(1 + B * N * LH), device)
    for b in range(B):
        d.admit(b)
    d.grow(np.arange(B), np.full(B, N))
    phys = aliased_rows(cfg, B, 1)
    page = np.minimum(np.arange(nseg * SEG), N - 1).reshape(nseg, SEG)
    for b in range(B):  # [nseg, SEG, LH] host slots -> the aliased host pages
        d.host_l2_cpu[d.dir_cpu[b, :nseg]] = 1 + phys[b][None, None, :] * N + page[:, :, None]
    owned = d.own_hbm(np.arange(B), LH * (W + 1)).reshape(B, LH, W + 1)
    d.set_hbm(np.arange(B), np.full(B, N - 1), owned[:, :, W])  # tail pages resident
    d.flush()
    # [num_hbm, 2, P, D] bf16 HBM pool: the rows' slots and the tail slots
    hbm = torch.zeros(num_hbm, 2, P, D, device=device, dtype=BF16)
    row_slots = torch.from_numpy(owned[:, :, :W].copy()).to(device)  # [B, LH, W] int32
    lay = TableLayout(d.l2_offset, d.rev_offset, d.spare, SEG, L, KV, P)
    tables = HierarchyTables(d.meta_gpu, d.dir_gpu, d.host_l2_gpu, row_slots)
    lru = BucketedLRU(num_hbm, device)
    hier = HierarchicalKV(lay, tables, lru, hbm, host.pool_for_kernels, shape.mandatory)
    tail = torch.from_numpy(owned[:, :, W].copy()).to(device).view(B, L, KV).permute(1, 0, 2)
    return hier, tail.contiguous(), d


def sparse_inputs(shape, page_table, device: str, hier=None) -> SparseDecode:
    """SparseDecode as LLMEngine._decode builds it (uniform budget: the graph path)."""
    B = shape.batch
    return SparseDecode(
        "quest",
        req_slots=torch.arange(B, device=device),
        seq_lens=torch.full((B,), shape.context, device=device),
        page_table=page_table,
        budget_tokens=torch.full((B,), shape.budget, device=device),
        hierarchy=hier,
        uniform_budget=shape.budget,
    )


def make_batch(cfg, shape, append_slots, page_table, sparse) -> ForwardBatch:
    """One decode token per request at position context - 1. The CSR lists every page of
    page_table [L, B, KV, N] (dense), or only each row's tail page (sparse batches: the
    selection makes its own, as the engine's hierarchical build_batch)."""
    B, KV, L = shape.batch, cfg.num_kv_heads, cfg.num_layers
    n = 1 if page_table is None else page_table.shape[-1]
    slots = append_slots if page_table is None else page_table
    i32 = dict(dtype=torch.int32, device=append_slots.device)
    dev = append_slots.device
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=torch.randint(0, cfg.vocab_size, (B,), device=dev),
        positions=torch.full((B,), shape.context - 1, dtype=torch.int64, device=dev),
        append_slots=append_slots,
        append_offsets=torch.full((B,), (shape.context - 1) % P, **i32),
        qo_indptr=torch.arange(B + 1, **i32),
        kv_indptr=(torch.arange(B * KV + 1, device=dev) * n).int(),
        kv_slots=slots.reshape(L, -1),
        kv_last_page_len=torch.full((B * KV,), shape.context - (shape.pages - 1) * P, **i32),
        logits_indices=torch.arange(B, device=dev),
        sparse=sparse,
    )
