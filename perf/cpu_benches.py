"""CPU-measurable benchmarks for the CI regression gate, each a ratio to a reference in-run.

A shared 2-core CI box runs 2-5x slower or faster from one minute to the next, so no absolute
time is compared. Each bench times its subject and a fixed reference kernel of the same kind
(Python loop over small numpy ops / vectorised numpy / torch CPU ops / offline generate) in
alternating rounds; the metric is the median over rounds of subject_time / reference_time. A
slower machine slows both; a slower subject moves the ratio.

  control_step_b256    PagedKVManager.build_batch of a 256-request decode batch (SmolLM2 shape,
                       30 layers x 3 KV heads, P = 16, contexts 1K-4K)   / ref: python+numpy loop
  metadata_step_b256   PageDirectory decode-step bookkeeping at batch 256 (Llama-3.1-8B shape,
                       32 x 8 KV heads): grow, tail pages, one flush      / ref: vectorised numpy
  hier_decode_step_b256  LLMEngine.step() of 256 hierarchical Quest requests, no GPU work
                       (decode_step_control: schedule, batched ensure, build_batch, graph
                       inputs, sampling, read-back), SmolLM2 shape, ~1K tokens / ref: loop
  lru_step_b256        BucketedLRU advance + touch + select_victims, 256 rows x 512 slots
                                                                          / ref: torch CPU ops
  budget_resize_b256   resize_buffers over 256 requests            / ref: numpy on 256-arrays
  http_overhead        SSE /v1/completions through uvicorn (subprocess) vs offline generate,
                       same tiny engine, same prompts: wall(http) / wall(offline)
Run with torch on one thread (set here) so that the other tenant's load moves both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

BATCH = 256
SMOL_LAYERS, SMOL_KV_HEADS = 30, 3  # SmolLM2-135M
LLAMA_LH = 32 * 8  # Llama-3.1-8B layers x KV heads
PAGE = 16
SEGMENT_PAGES = 64


def paired_ratio(
    subject: Callable[[], None], reference: Callable[[], None], rounds: int, calls: int
) -> dict:
    """Median over rounds of time(subject x calls) / time(reference x calls)."""
    subject(), reference()  # warm caches, numba, allocator
    ratios, subj, ref = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            reference()
        t1 = time.perf_counter()
        for _ in range(calls):
            subject()
        t2 = time.perf_counter()
        ref.append((t1 - t0) / calls)
        subj.append((t2 - t1) / calls)
        ratios.append(subj[-1] / ref[-1])
    return {
        "ratio": statistics.median(ratios),
        "subject_us": statistics.median(subj) * 1e6,
        "reference_us": statistics.median(ref) * 1e6,
    }


# ---- references: fixed kernels, never changed (changing one invalidates the baselines) ----
def make_ref_loop(rng: np.random.Generator) -> Callable[[], None]:
    """A Python loop of small numpy ops over 256 items (like per-request batch building)."""
    tables = [rng.integers(0, 1 << 20, size=(90, 256), dtype=np.int32) for _ in range(BATCH)]
    lens = rng.integers(16, 256, size=BATCH)

    def ref() -> None:
        parts, pos = [], []
        for t, n in zip(tables, lens):
            p = np.arange(n - 1, n)
            pos.append(p)
            parts.append(t[:, : n // 8].reshape(30, -1))
        np.concatenate(parts, axis=1)
        torch.as_tensor(np.concatenate(pos))

    return ref


def make_ref_vector(rng: np.random.Generator) -> Callable[[], None]:
    """Vectorised numpy: unique of scattered indices, gathers and scatters (~20K entries)."""
    table = np.zeros(1 << 22, dtype=np.int32)
    idx = rng.integers(0, table.size, size=16_384)
    vals = rng.integers(0, 1 << 20, size=16_384, dtype=np.int32)

    def ref() -> None:
        u = np.unique(np.concatenate([idx, idx[:4096] + 1]))
        table[u[: vals.size]] = vals[: u.size]
        np.cumsum(table[idx])

    return ref


def make_ref_torch(rng: np.random.Generator) -> Callable[[], None]:
    """torch CPU ops on [256, 512]: gather, scatter_add into histograms, cumsum, where."""
    src = torch.from_numpy(rng.integers(0, 256, size=(BATCH, 512)))
    flat = torch.zeros(1 << 18, dtype=torch.uint8)

    def ref() -> None:
        g = flat[src.reshape(-1)].reshape(BATCH, 512).long()
        h = torch.zeros(BATCH, 257, dtype=torch.int64).scatter_add_(1, g, torch.ones_like(g))
        c = h.flip(1).cumsum(1).flip(1)
        torch.where(g > 0, c.gather(1, g), torch.zeros_like(g)).cumsum(1)

    return ref


def make_ref_small(rng: np.random.Generator) -> Callable[[], None]:
    """Vectorised numpy on 256-element arrays: argsort, cumsum, clip, where (call-bound)."""
    a = rng.random(BATCH)
    b = rng.integers(0, 1 << 12, size=BATCH)

    def ref() -> None:
        order = np.argsort(-a, kind="stable")
        c = np.cumsum(b[order])
        np.where(c > c[-1] // 2, np.clip(b[order], 0, 1024), 0).sum()
        np.minimum(b, 2048)[order] - c

    return ref


# ---- subjects --------------------------------------------------------------------------------
def make_control_step(rng: np.random.Generator) -> Callable[[], None]:
    from spinserve.control.kv_manager import BatchItem, PagedKVManager
    from spinserve.runtime.batch import ForwardMode

    ctx = rng.integers(1024, 4096, size=BATCH)
    pages = int((-(-ctx // PAGE)).sum()) + BATCH
    kv = PagedKVManager(SMOL_LAYERS, SMOL_KV_HEADS, PAGE, pages * SMOL_LAYERS * SMOL_KV_HEADS + 1)
    items = []
    for i, n in enumerate(ctx):
        kv.ensure(f"r{i}", int(n) + 1)
        items.append(BatchItem(f"r{i}", int(n), [int(rng.integers(0, 1000))]))

    def step() -> None:
        kv.build_batch(ForwardMode.DECODE, items, "cpu")

    return step


def make_metadata_step(rng: np.random.Generator) -> Callable[[], None]:
    from spinserve.control.page_directory import DirectoryConfig, PageDirectory
    from spinserve.control.slot_allocator import SlotAllocator

    budget = 4  # HBM pages (x LH slots) per request besides its tail page
    ctx = rng.integers(2048, 6144, size=BATCH)
    max_pages = 8192 // PAGE
    cfg = DirectoryConfig(
        BATCH,
        131072 // PAGE,
        SEGMENT_PAGES,
        LLAMA_LH,
        num_segments=BATCH * (max_pages // SEGMENT_PAGES + 2) + 1,
    )
    hbm = SlotAllocator(BATCH * (budget + 2) * LLAMA_LH + 1, "hbm")
    host = SlotAllocator(BATCH * (max_pages + 2) * LLAMA_LH + 1, "host")
    d = PageDirectory(cfg, hbm, host, device="cpu", use_cuda=False)
    reqs = np.arange(BATCH, dtype=np.int64)
    for r in reqs:
        d.admit(int(r))
    d.grow(reqs, -(-ctx // PAGE))
    d.own_hbm(reqs, budget * LLAMA_LH)

    def install_tails(rs: np.ndarray) -> None:
        slots = d.own_hbm(rs, LLAMA_LH).reshape(rs.size, LLAMA_LH)
        d.set_hbm(rs, d.num_pages[rs] - 1, slots)

    install_tails(reqs)
    d.flush()
    state = {"ctx": ctx.copy()}

    def step() -> None:
        state["ctx"] += PAGE // 4  # a quarter of the batch crosses a page boundary per step
        new_pages = -(-state["ctx"] // PAGE)
        crossing = reqs[new_pages > d.num_pages[reqs]]
        if crossing.size and (new_pages[crossing] > max_pages).any():  # start over, same sizes
            for r in crossing:
                d.release(int(r))
                d.admit(int(r))
            state["ctx"][crossing] = 2048
            d.grow(crossing, np.full(crossing.size, 2048 // PAGE))
            d.own_hbm(crossing, budget * LLAMA_LH)
            install_tails(crossing)
        elif crossing.size:
            old = d.hbm_entries(crossing, d.num_pages[crossing] - 1)
            d.grow(crossing, new_pages[crossing])
            install_tails(crossing)
            d.disown_hbm(np.repeat(crossing, LLAMA_LH), old.ravel())
        d.flush()

    return step


def make_hier_decode_step(rng: np.random.Generator) -> Callable[[], None]:
    """LLMEngine.step() of 256 hierarchical Quest requests with no GPU work (perf/
    decode_step_control.py: scheduler + batched decode ensure, batch building, graph inputs,
    sampling, token read-back), SmolLM2 shape at ~1K tokens; a small vocabulary so that the
    CPU argmax over the logits stays out of the measurement. rng: unused (the requests'
    lengths are staggered deterministically)."""
    from spinserve.configs.model import Architecture, ModelConfig

    from .decode_step_control import build
    from .decode_step_parts import Shape

    cfg = ModelConfig(Architecture.LLAMA, 1024, 576, 1536, SMOL_LAYERS, 9, SMOL_KV_HEADS, 64, 8192)
    eng = build(cfg, Shape(BATCH, 1024 - 8, 64, 1.0), "cpu", 4096)
    eng.step()  # the first step only launches

    def step() -> None:
        eng.step()

    return step


def make_lru_step(rng: np.random.Generator) -> Callable[[], None]:
    from spinserve.runtime.lru import BucketedLRU

    slots = BATCH * 512 + 1
    lru = BucketedLRU(slots, "cpu")
    row_slots = torch.from_numpy(1 + rng.permutation(slots - 1)[: BATCH * 512]).reshape(BATCH, 512)
    row_slots = row_slots.to(torch.int32)
    need = torch.from_numpy(rng.integers(0, 64, size=BATCH))
    state = {"k": 0}

    def step() -> None:
        lru.advance()
        k = state["k"] = (state["k"] + 37) % 448
        lru.touch(row_slots[:, k : k + 64])
        lru.select_victims(row_slots, need, 64)

    return step


def make_budget_resize(rng: np.random.Generator) -> Callable[[], None]:
    from spinserve.control.budgets import BudgetPolicy, Observation, resize_buffers

    m = rng.integers(64, 256, size=BATCH) * 16
    obs = Observation(m, 4 * m, rng.random(BATCH), 2 * m, rng.random(BATCH))
    policy = BudgetPolicy()

    def step() -> None:
        resize_buffers(obs, pool_pages=int(4.5 * m.sum()), policy=policy)

    return step


MICRO_BENCHES = {
    "control_step_b256": (make_control_step, make_ref_loop, 5),
    "metadata_step_b256": (make_metadata_step, make_ref_vector, 5),
    "hier_decode_step_b256": (make_hier_decode_step, make_ref_loop, 5),
    "lru_step_b256": (make_lru_step, make_ref_torch, 10),
    "budget_resize_b256": (make_budget_resize, make_ref_small, 200),
}


def run_micro(rounds: int = 15, seed: int = 0, only: list[str] | None = None) -> dict:
    """{name: {"ratio", "subject_us", "reference_us"}} for the in-process benches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, (subject, reference, calls) in MICRO_BENCHES.items():
            if only and name not in only:
                continue
            rng = np.random.default_rng(seed)
            out[name] = paired_ratio(subject(rng), reference(rng), rounds, calls)
        return out
    finally:
        torch.set_num_threads(threads)
