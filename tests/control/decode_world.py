"""A small serving world for comparing KV managers step by step: the real Scheduler over a
HierarchicalKVManager (or PagedKVManager), requests arriving, prefilling in chunks, decoding,
finishing and being preempted, buffers rebalanced, and the decode graph's LRU effect emulated
(every step ages all slots and touches the tails and a random part of every row). `run` returns
one snapshot of every CPU and device table per step, so two runs compare exactly.

The manager and scheduler classes are parameters, so the same world drives other versions of
them (e.g. the per-request decode path against the batched one)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from spinserve.configs.settings import EngineSettings
from spinserve.control.host_pool import HostPagePool
from spinserve.control.request import Request
from spinserve.runtime.sampling import SamplerState, SamplingParams

P, L, KV = 8, 2, 2
LH = L * KV
MAX_REQUESTS = 10
MAX_CONTEXT = 320  # tokens


@dataclass(frozen=True)
class World:
    hbm_pages: int = 60
    host_pages: int = 150
    dense_layers: int = 1
    steps: int = 160
    hierarchy: bool = True  # False: PagedKVManager with hbm_pages


def make_kv(world: World, manager_cls, config_cls, mandatory_of):
    if not world.hierarchy:
        return manager_cls(L, KV, P, world.hbm_pages * LH + 1)
    host_slots = world.host_pages * LH + 1
    cfg = config_cls(
        L, KV, P, MAX_REQUESTS, MAX_CONTEXT, host_slots, world.dense_layers, 1.0,
        segment_pages=2, mandatory_hint=2,
    )  # fmt: skip
    # [S, 2, P, 64] float32 HBM pool (payload unused: the world checks tables, not contents)
    hbm = torch.zeros(world.hbm_pages * LH + 1, 2, P, 64)
    host = HostPagePool(host_slots, P, 64, torch.float32, use_cuda=False)
    return manager_cls(cfg, hbm, host, mandatory_of)


def _allocator(a) -> tuple:
    return (a._stack[: a._top].copy(), a._free_map.copy())


def snapshot(kv, rows_of) -> dict:
    """Every table of the manager (after a flush: device copies too)."""
    if not hasattr(kv, "dir"):
        tables = {r: kv._tables[r][:, : kv._num_pages[r]].copy() for r in kv._tables}
        return {"tables": tables, "pool": _allocator(kv.allocator)}
    d = kv.dir
    held = {
        rid: (h.row, h.num_pages, h.width, h.hierarchical, h.reclaimable)
        + ((h.rows.copy(), h.tail.copy()) if h.hierarchical else ())
        for rid, h in kv._held.items()
    }
    cpu_rows, gpu_rows = rows_of(kv)
    # the mirror's allocated width is an implementation detail: compare what rows can use
    width = 1 + max((h.width for h in kv._held.values() if h.hierarchical), default=0)
    assert (cpu_rows[:, :, width:] == -1).all()
    return {
        "meta": d.meta_cpu.copy(),
        "meta_gpu": d.meta_gpu.numpy().copy(),
        "host_l2": d.host_l2_cpu.copy(),
        "owner": d.hbm_owner.copy(),
        "pools": [_allocator(a) for a in (d.hbm_slots, d.host_slots, d.segments)],
        "rows": cpu_rows[:, :, :width].copy(),
        "rows_gpu": gpu_rows[:, :, :width].numpy().copy(),
        "held": held,
    }


def pending(kv) -> tuple:
    """The next flush's content as sets (dirty meta indices, moved HBM slots)."""
    if not hasattr(kv, "dir"):
        return ()
    d = kv.dir
    return tuple(np.unique(np.concatenate(x)) if x else None for x in (d.log.dirty, d.log.moved))


def _age(kv, decoding: list[Request], rng: random.Random) -> None:
    """The decode graph's LRU effect: all slots age, tails and a random part of rows are hit."""
    if not hasattr(kv, "lru"):
        return
    kv.lru.advance()
    touched = []
    for req in decoding:
        h = kv._held.get(req.request_id)
        if h is None or not h.hierarchical:
            continue
        touched.append(h.tail[h.tail >= 0])
        if h.rows.size:
            mask = np.array([rng.random() < 0.3 for _ in range(h.rows.size)])
            touched.append(h.rows.ravel()[mask])
    if touched:
        kv.lru.touch(torch.from_numpy(np.concatenate(touched).astype(np.int64)))


def run(world: World, seed: int, manager_cls, config_cls, scheduler_cls, rows_of) -> list:
    """Step the world; one (scheduled ids, pending flush, snapshot) per step."""
    rng = random.Random(seed)
    mandatory: dict[str, int | None] = {}
    kv = make_kv(world, manager_cls, config_cls, mandatory.__getitem__)
    settings = EngineSettings(
        max_running_requests=MAX_REQUESTS, max_batched_tokens=256, prefill_chunk_tokens=96
    )
    sched = scheduler_cls(settings, kv)
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    limit: dict[str, int] = {}
    lookups, hits = np.zeros(MAX_REQUESTS, np.int64), np.zeros(MAX_REQUESTS, np.int64)
    out_log = []
    for step in range(world.steps):
        # bursts every P steps (their pages then start in the same steps), a few stragglers
        arrivals = rng.randrange(4) if step % P == 0 else int(rng.random() < 0.1)
        for i in range(arrivals):
            rid = f"r{step}.{i}"
            mandatory[rid] = rng.choice([None, 2, 2, 2, 3])
            prompt = [1] * (P * rng.randrange(1, 12) - rng.choice([0, 0, 0, 1, 3]))
            limit[rid] = rng.randrange(len(prompt) + 2, MAX_CONTEXT)
            sampler = SamplerState.create(params, torch.device("cpu"))
            sched.add(Request(rid, prompt, params, sampler, step))
        out = sched.schedule()
        for req, n in out.prefill:
            req.num_cached_tokens += n
            if not req.in_prefill:
                if world.hierarchy:
                    kv.finish_prefill(req.request_id, req.num_cached_tokens)
                if not req.output_ids:
                    req.output_ids.append(1)
        ids = ([r.request_id for r, _ in out.prefill], [r.request_id for r in out.decode])
        ids += ([r.request_id for r in out.preempted],)
        flush = pending(kv)
        if world.hierarchy:
            kv.flush()
        out_log.append((ids, flush, snapshot(kv, rows_of)))
        for req in out.decode:
            req.num_cached_tokens = req.num_tokens
            req.output_ids.append(1)
        _age(kv, out.decode, rng)
        for req in list(sched.running):
            if req.num_tokens >= limit[req.request_id] or rng.random() < 0.005:
                sched.remove(req)
        if world.hierarchy and step % 7 == 6:
            more = np.array([rng.randrange(1, 50) for _ in range(MAX_REQUESTS)])
            lookups += more
            hits += np.array([rng.randrange(0, int(n) + 1) for n in more])
            kv.rebalance(lookups, hits)
        kv.check_integrity()
    return out_log


def assert_same(a: list, b: list) -> None:
    """Two runs' logs are equal step by step (arrays exactly)."""
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        _equal(x, y, f"step {step}")


def _equal(x, y, where: str) -> None:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), where
        assert x.dtype == y.dtype and np.array_equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and sorted(x) == sorted(y), where
        for k in x:
            _equal(x[k], y[k], f"{where} {k}")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _equal(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x} != {y}"
