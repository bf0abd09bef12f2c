"""Control-plane CPU time between two decode launches (issue 4: "at batch 256, target <= 10% of
the step time"), measured on the engine's own code: `LLMEngine.step()` over the real Scheduler
and a real HierarchicalKVManager holding `batch` hierarchical Quest requests, Llama-3.1-8B
shape (32 layers x 8 KV heads, P = 16). One step is everything the engine does between two
decode launches except the GPU's work:
  schedule: kv.ensure for every request's next token (a new tail page every P tokens: the old
    tail's slots join the rows, rows trimmed back to their width by LRU age, one flush each);
  _decode: every REBALANCE_STEPS steps the buffer rebalance (row_stats read back); build_batch
    (flush of tables and rows, the ForwardBatch tensors); batch_table of the dense layers; the
    SparseDecode tensors; attach;
  runner: ModelRunner.forward's graph path, DecodeGraphRunner.can_run + run, whose copy_from
    fills the static inputs; the runner has replay=False and a forward that returns a logits
    buffer, so nothing is replayed and the GPU stays idle;
  sample (greedy argmax on the device) and the read-back of the previous launch's tokens with
    their appends and stop checks.
`measure` times this with the GPU idle (the control plane's CPU cost). The engine launches step
N+1 before it reads step N's tokens (control/inflight.py), so on a GPU this runs while the
previous step computes: `measure_overlap` gives every launch a GPU step of a known duration
(torch.cuda._sleep, calibrated in the run) and reports the wall time per step over it, i.e. the
control-plane time the GPU actually waits for, and the syncing CUDA calls of a steady step.

Not real, and why it does not matter: page payloads. The manager's pools have the slot counts
of the configuration but 32-byte pages (dtype uint8, head_dim 1): the control plane never
touches page contents, and 256 requests x 8K tokens of Llama-8B KV (256 GiB) fit neither HBM nor
the host. The one kernel that would read them, the end-of-prefill offload in finish_prefill, is
skipped while setting up. HBM slots are what the configuration needs (every request's rows and
tail) plus two prefills' pages: the batch-256 shape of bench_decode_step fits an 80 GB H100.
`bare_engine` builds the LLMEngine without its constructor (no weights, tokenizer or KV pool):
it sets the attributes step() reads, so a renamed attribute fails loudly here.
"""

from __future__ import annotations

import itertools
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from spinserve.configs.model import ModelConfig
from spinserve.configs.settings import CacheSettings, EngineSettings, Settings, SparseSettings
from spinserve.control.engine import REBALANCE_STEPS, LLMEngine
from spinserve.control.hier_kv_manager import HierarchicalKVManager, HierarchyConfig
from spinserve.control.host_pool import HostPagePool
from spinserve.control.index_rows import IndexRows
from spinserve.control.request import Request, RequestStatus
from spinserve.control.scheduler import Scheduler
from spinserve.perf.bench_metadata import _host_info, _stats
from spinserve.runtime.cuda_graph import DecodeGraphRunner, SparseGraphSpec
from spinserve.runtime.sampling import SamplerState, SamplingParams

P = 16
# (object attribute of LLMEngine, method) pairs whose time is reported separately
PROBES = (("scheduler", "schedule"), ("kv", "build_batch"), ("kv", "batch_table"),
          ("runner", "forward"), ("kv", "rebalance"))  # fmt: skip
TIMED = tuple(f"{o}.{m}" for o, m in PROBES)


class LaunchlessRunner:
    """ModelRunner.forward's decode path minus the GPU work (module docstring)."""

    def __init__(self, graph_runner: DecodeGraphRunner, sparse_params) -> None:
        self.graph_runners = [graph_runner]
        self.sparse_params = sparse_params

    def forward(self, batch):
        for graphs in self.graph_runners:
            if graphs.can_run(batch):
                return graphs.run(batch)
        raise AssertionError("the batch fits no decode graph: it would decode eagerly")


def bare_engine(settings: Settings, kv, runner, device: str, max_context: int) -> LLMEngine:
    """An LLMEngine with the attributes step() reads, built without loading anything."""
    eng = LLMEngine.__new__(LLMEngine)
    eng.settings, eng.kv, eng.runner, eng.device = settings, kv, runner, device
    eng.hierarchy, eng.default_algorithm, eng.max_context = True, "quest", max_context
    eng.scheduler = Scheduler(settings.engine, kv)
    eng.scheduler.fence = eng._fence
    eng.eos_ids = set()
    eng._requests = {}
    eng.index_rows = IndexRows(runner, kv, True, settings.engine.max_running_requests)
    eng._decode_steps = eng._num_preemptions = 0
    eng._inflight = eng._row_stats = None
    eng._arrival = itertools.count()
    return eng


def _manager(cfg: ModelConfig, shape, device: str, max_context: int) -> HierarchicalKVManager:
    """The manager with payload-free pools sized for `shape` (module docstring): HBM for every
    request's rows and tail plus two prefills' pages, host slots for every page."""
    LH, B, m = cfg.num_layers * cfg.num_kv_heads, shape.batch, shape.mandatory
    max_pages = -(-max_context // P)
    host_slots = 1 + B * max_pages * LH
    hbm_slots = 1 + B * LH * (shape.width + 1) + 2 * max_pages * LH
    # [hbm_slots, 2, P, 1] uint8: slot count of the configuration, no payload (never read)
    hbm_pool = torch.empty(hbm_slots, 2, P, 1, dtype=torch.uint8, device=device)
    host = HostPagePool(host_slots, P, 1, torch.uint8, use_cuda=False)
    config = HierarchyConfig(
        cfg.num_layers, cfg.num_kv_heads, P, B, max_context, host_slots,
        dense_layers=0, buffer_ratio=shape.buffer_ratio, mandatory_hint=m,
    )  # fmt: skip
    return HierarchicalKVManager(config, hbm_pool, host, lambda _rid: m)


def _admit_prefilled(eng: LLMEngine, shape) -> None:
    """`batch` requests as they stand after their prefill and first token: prompt lengths
    context - 1 - (i % P) (staggered, so 1/P of them start a page each step), hierarchical."""
    kv, dev = eng.kv, torch.device(eng.device)
    params = SamplingParams(max_tokens=1 << 30, ignore_eos=True)
    for i in range(shape.batch):
        rid, n = f"r{i}", shape.context - 1 - (i % P)
        req = Request(rid, [1] * n, params, SamplerState.create(params, dev), next(eng._arrival))
        kv.ensure(rid, n)
        hier = kv.hierarchy
        hier.offload_pages = lambda hbm, host: None  # payload-free pools: nothing to copy
        kv.finish_prefill(rid, n)
        del hier.offload_pages
        req.num_cached_tokens, req.status = n, RequestStatus.RUNNING
        req.output_ids.append(1)
        eng.scheduler.running.append(req)
        eng._requests[rid], eng.index_rows.of[rid] = req, kv.request_slot(rid)


def _timed(obj, name: str, acc: dict[str, float], key: str) -> None:
    """Accumulate the wall time of obj.name() calls into acc[key] (an instance attribute
    shadows the method)."""
    fn = getattr(obj, name)

    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            acc[key] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def build(cfg: ModelConfig, shape, device: str, max_context: int, gpu_cycles: int = 0) -> LLMEngine:
    """The bare engine running `shape.batch` hierarchical requests (module docstring); each
    launch keeps the GPU busy for `gpu_cycles` clock cycles (torch.cuda._sleep) when > 0."""
    kv = _manager(cfg, shape, device, max_context)
    settings = Settings(
        engine=EngineSettings(max_running_requests=shape.batch),
        cache=CacheSettings(hierarchy=True, buffer_ratio=shape.buffer_ratio),
        sparse=SparseSettings(algorithm="quest", budget_tokens=shape.budget, dense_layers=0),
    )
    # [batch, vocab] float32: the "logits" every step samples from
    logits = torch.randn(shape.batch, cfg.vocab_size, device=device)
    spec = SparseGraphSpec("quest", shape.budget, 0, kv.hierarchy)

    def forward(batch):
        if gpu_cycles:
            torch.cuda._sleep(gpu_cycles)
        return logits[: batch.batch_size]

    graphs = DecodeGraphRunner(
        forward, cfg.num_layers, cfg.num_kv_heads,
        shape.batch, -(-max_context // P), torch.device(device), spec, replay=False,
    )  # fmt: skip
    eng = bare_engine(settings, kv, LaunchlessRunner(graphs, shape.params), device, max_context)
    _admit_prefilled(eng, shape)
    return eng


def measure(cfg: ModelConfig, shape, device: str, steps: int, warmup: int = 10) -> dict:
    """Wall time of `steps` engine steps (after `warmup`), with the GPU idle at each start."""
    t0 = time.perf_counter()
    eng = build(cfg, shape, device, shape.context + warmup + steps + 2 * P)
    setup_s = time.perf_counter() - t0
    acc: dict[str, float] = defaultdict(float)
    for (owner, name), key in zip(PROBES, TIMED):
        _timed(getattr(eng, owner), name, acc, key)
    parts: dict[str, list[float]] = {k: [] for k in ("step", "rest", *TIMED)}
    pages_before = int(eng.kv.dir.num_pages.sum())
    for i in range(warmup + steps):
        if i == warmup:
            pages_before = int(eng.kv.dir.num_pages.sum())
        if device == "cuda":
            torch.cuda.synchronize()
        acc.clear()
        t = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t
        assert len(outs) == (shape.batch if i else 0)  # step 0 only launches
        assert all(len(o.new_token_ids) == 1 for o in outs)
        if i >= warmup:
            parts["step"].append(dt * 1e6)
            parts["rest"].append((dt - sum(acc[k] for k in TIMED)) * 1e6)
            for k in TIMED:
                parts[k].append(acc[k] * 1e6)
    eng.kv.check_integrity(on_device=True)
    step = _stats(parts["step"])
    return {
        "steps": steps,
        "setup_s": setup_s,
        "rebalance_every_steps": REBALANCE_STEPS,
        "pages_started": int(eng.kv.dir.num_pages.sum()) - pages_before,
        "step_ms": {k.replace("_us", "_ms"): v / 1e3 for k, v in step.items()},
        "parts_mean_us": {k: float(np.mean(v)) for k, v in parts.items()},
        "parts_median_us": {k: float(np.median(v)) for k, v in parts.items()},
        "host": _host_info(),
    }


def sleep_cycles_per_ms() -> float:
    """torch.cuda._sleep's clock cycles per millisecond on this GPU (CUDA events)."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def _syncing_calls(eng: LLMEngine) -> list[str]:
    """Where (our frames, innermost first) each syncing CUDA call of one engine step is."""
    found: list[str] = []

    def record(message, *args, **kw):
        frames = [
            f
            for f in traceback.extract_stack()
            if "site-packages" not in f.filename and "/lib/python" not in f.filename
        ]
        found.append(
            f"{message} @ "
            + " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])
        )

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored by catch_warnings
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return found


def measure_overlap(
    cfg: ModelConfig, shape, gpu_step_ms: float, steps: int, warmup: int = 10
) -> dict:
    """Steady-state wall time per engine step when every launch keeps the GPU busy for
    gpu_step_ms (CUDA only): the GPU waits (wall - gpu_step_ms) per step for the control plane."""
    per_ms = sleep_cycles_per_ms()
    eng = build(
        cfg, shape, "cuda", shape.context + warmup + steps + 4 * P, int(gpu_step_ms * per_ms)
    )
    for _ in range(warmup):
        eng.step()
    syncs = _syncing_calls(eng)
    torch.cuda.synchronize()
    walls = []
    t_prev = time.perf_counter()
    for _ in range(steps):
        eng.step()
        t = time.perf_counter()
        walls.append((t - t_prev) * 1e3)
        t_prev = t
    eng._resolve()
    wall = float(np.median(walls))
    return {
        "steps": steps,
        "gpu_step_ms": gpu_step_ms,
        "sleep_cycles_per_ms": per_ms,
        "wall_ms": {
            k.replace("_us", "_ms"): v / 1e3 for k, v in _stats([w * 1e3 for w in walls]).items()
        },
        "wall_median_ms": wall,
        "exposed_ms": wall - gpu_step_ms,
        "exposed_share": (wall - gpu_step_ms) / gpu_step_ms,
        "syncing_calls_per_step": syncs,
    }
