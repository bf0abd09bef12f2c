"""LlamaModel decode through the hierarchy (batch.sparse.hierarchy): greedy tokens and logits are
identical with an unlimited HBM budget and with a mandatory-only one where most steps miss;
completed pages reach the host pool in the step that completes them (the engine-side calls the
control plane must make are spelled out in `_Engine`)."""

from __future__ import annotations

import numpy as np
import torch

from spinserve.configs.model import Architecture, ModelConfig
from spinserve.control.host_pool import HostPagePool
from spinserve.control.page_directory import DirectoryConfig, PageDirectory
from spinserve.control.slot_allocator import SlotAllocator
from spinserve.runtime.batch import ForwardBatch, ForwardMode, SparseDecode
from spinserve.runtime.hierarchy import (
    FETCHED,
    LOOKUPS,
    OFFLOADED,
    SHORT,
    HierarchicalKV,
    HierarchyTables,
    TableLayout,
)
from spinserve.runtime.lru import PAD, BucketedLRU
from spinserve.runtime.model import LlamaModel
from spinserve.runtime.sparse import SparseParams, create_algorithm
from spinserve.runtime.sparse.planner import SparsePlanner

P, D, L, KV, MAX_PAGES, SEG = 16, 64, 2, 1, 32, 4
PROMPT, STEPS, BUDGET = 395, 40, 32
K = 1 + BUDGET // P + 2  # sink page + budget pages + window (16 tokens: up to 2 pages)


def _config() -> ModelConfig:
    return ModelConfig(Architecture.LLAMA, 64, 128, 128, L, 2, KV, D, 4096)


def _weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = cfg.hidden_size

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    w = {"embed_tokens.weight": rnd(cfg.vocab_size, h), "norm.weight": torch.ones(h)}
    for i in range(L):
        p = f"layers.{i}."
        w[p + "input_norm.weight"] = w[p + "post_attention_norm.weight"] = torch.ones(h)
        w[p + "qkv_proj.weight"] = rnd((cfg.num_heads + 2 * KV) * D, h)
        w[p + "o_proj.weight"] = rnd(h, cfg.num_heads * D)
        w[p + "gate_up_proj.weight"] = rnd(2 * cfg.intermediate_size, h)
        w[p + "down_proj.weight"] = rnd(h, cfg.intermediate_size)
    return w


class _Engine:
    """What the engine does around the graph for ONE request (slot 0), KV = 1 so lh = layer:
    host pool + directory; layer 0 is the planner's dense layer: one resident HBM slot per page
    (`dense`, read through page_table); layer 1 resolves through the hierarchy with
    `row_width` owned slots (victim candidates) and a dedicated tail slot."""

    def __init__(self, row_width: int, prompt_kv: torch.Tensor) -> None:
        self.host = HostPagePool(128, P, D, torch.float32, use_cuda=False)
        cfg = DirectoryConfig(2, MAX_PAGES, SEG, L * KV, num_segments=10)
        self.dir = d = PageDirectory(cfg, SlotAllocator(128), self.host.allocator)
        d.admit(0)
        n = -(-PROMPT // P)
        d.grow([0], [n])
        # end of prefill: every prompt page has its host copy (offload), [n, LH] host slots
        host = torch.from_numpy(d.host_entries(0, np.arange(n))).long()
        self.host.pool_cpu[host] = prompt_kv
        # poisoned HBM pool: finite garbage (attention weights 0 x NaN of a partial page's
        # unwritten tokens would be NaN, so NaN cannot mark "never written" here)
        self.hbm = torch.randn(128, 2, P, D, generator=torch.Generator().manual_seed(9)) * 100
        self.hbm[0] = 0
        self.dense = d.own_hbm(0, MAX_PAGES)  # [MAX_PAGES] layer-0 slot of each page
        self.hbm[torch.from_numpy(self.dense[:n]).long()] = self.host.pool_cpu[host[:, 0]]
        # [L, 1, KV, MAX_PAGES] int32 resident page table (layer 0 only)
        self.page_table = torch.zeros(L, 1, KV, MAX_PAGES, dtype=torch.int32)
        self.page_table[0, 0, 0] = torch.from_numpy(self.dense)
        self.row_slots = torch.full((2, L * KV, row_width), PAD, dtype=torch.int32)
        self.row_slots[0, 1] = torch.from_numpy(d.own_hbm(0, row_width))
        self.lru = BucketedLRU(128)
        lay = TableLayout(d.l2_offset, d.rev_offset, d.spare, SEG, L, KV, P)
        tables = HierarchyTables(d.meta_gpu, d.dir_gpu, d.host_l2_gpu, self.row_slots)
        self.hier = HierarchicalKV(lay, tables, self.lru, self.hbm, self.host.pool_cpu, K)
        entries = np.stack([self.dense[:n], np.full(n, PAD)], 1).astype(np.int32)
        d.set_hbm(np.zeros(n), np.arange(n), entries)
        self.tail = 0
        self._new_tail(n - 1, host[n - 1, 1])

    def _new_tail(self, page: int, host_copy: torch.Tensor | None = None) -> None:
        """Point layer 1's `page` at a fresh dedicated HBM slot (the old tail page, already
        offloaded, leaves HBM: it is fetched again on its next selection)."""
        d = self.dir
        if self.tail:
            d.disown_hbm(0, np.array([self.tail]))
            self.lru.mark_empty(torch.tensor([self.tail]))
        self.tail = int(d.own_hbm(0, 1)[0])
        d.set_hbm([0], [page], np.array([[self.dense[page], self.tail]]))
        if host_copy is not None:  # the prompt's partial tail page
            self.hbm[self.tail] = self.host.pool_cpu[host_copy]
        d.flush()

    def before_step(self, pos: int) -> torch.Tensor:
        """Grow by one page when the new token starts one; returns append_slots [L, 1, KV]."""
        if pos % P == 0:
            self.dir.grow([0], [pos // P + 1])
            self._new_tail(pos // P)
        return torch.tensor([self.dense[pos // P], self.tail], dtype=torch.int32).view(L, 1, KV)


def _decode(row_width: int, prompt_kv, cfg, weights):
    eng = _Engine(row_width, prompt_kv)
    algo = create_algorithm("quest", P, KV, D, SparseParams(BUDGET, 16, 16, dense_layers=1))
    planner = SparsePlanner(algo, L, 2, "cpu")
    n = -(-PROMPT // P)
    host = torch.from_numpy(eng.dir.host_entries(0, np.arange(n))).T.reshape(L, KV, n)
    planner.index_prefill(eng.host.pool_cpu, 0, host, PROMPT)
    model, tok, logits = LlamaModel(cfg, weights), 5, []
    for t in range(STEPS):
        pos = PROMPT + t
        append = eng.before_step(pos)
        i32 = dict(dtype=torch.int32)
        sparse = SparseDecode(
            "quest", torch.tensor([0]), torch.tensor([pos + 1]), eng.page_table,
            torch.tensor([BUDGET]), hierarchy=eng.hier,
        )  # fmt: skip
        batch = ForwardBatch(
            ForwardMode.DECODE, torch.tensor([tok]), torch.tensor([pos]), append,
            torch.tensor([pos % P], **i32), torch.tensor([0, 1], **i32),
            torch.tensor([0, 1], **i32), torch.zeros(L, 1, **i32), torch.ones(1, **i32),
            torch.tensor([0]), sparse,
        )  # fmt: skip
        out = model.forward(batch, eng.hbm, planner)
        eng.dir.check_integrity(on_device=True)
        if pos % P == P - 1:  # this step completed the tail page: its host copy is written
            host = torch.from_numpy(eng.dir.host_entries(0, np.array([pos // P]))[0]).long()
            tail = eng.hbm[torch.from_numpy(append.ravel().numpy()).long()]
            assert torch.equal(eng.host.pool_cpu[host], tail)
        logits.append(out)
        tok = int(out.argmax())
    return torch.cat(logits), eng


def test_model_decode_small_budget_equals_unlimited():
    cfg, weights = _config(), _weights(_config())
    g = torch.Generator().manual_seed(3)
    n = -(-PROMPT // P)
    prompt_kv = torch.randn(n, L * KV, 2, P, D, generator=g)
    big_logits, big = _decode(MAX_PAGES, prompt_kv, cfg, weights)
    small_logits, small = _decode(K, prompt_kv, cfg, weights)
    assert torch.isfinite(big_logits).all()
    assert torch.equal(small_logits, big_logits)
    s, b = small.hier.stats.tolist(), big.hier.stats.tolist()
    assert s[SHORT] == b[SHORT] == 0 and s[LOOKUPS] == b[LOOKUPS] > 0
    assert s[FETCHED] > 2 * b[FETCHED]  # the small budget keeps missing
    completed = (PROMPT + STEPS) // P - PROMPT // P  # pages completed by decode tokens
    assert s[OFFLOADED] == b[OFFLOADED] == completed * L * KV
