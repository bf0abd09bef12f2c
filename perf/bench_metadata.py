"""Two-level page metadata: table bytes vs a flat table, and control-plane CPU time per step.

  python -m spinserve.perf.bench_metadata [--device cpu|cuda] [--out perf/results/metadata_cpu.json]

Section "bytes": max 256 requests x 128K context, Llama-3.1-8B shape (32 layers x 8 KV heads,
P = 16), 16 live requests of 8K tokens; target: two-level bytes <= 1/10 of a flat table.
Section "step": the metadata update between two decode launches at batch 256: every request
gains a token; those that cross a page boundary grow (host slots, a segment now and then), get
a fresh tail page (LH HBM slots + entries) and give back their previous tail page's HBM slots
(budget kept constant); then ONE flush to the device mirror. Also timed: one budget resize at
batch 256, releasing a finished request, admitting a 4K-token prompt.
Section "lru": one layer's victim choice for batch 32 (Llama-3.1-8B, budget 2048 tokens: 1024
mandatory pages per request and layer, 4x buffer = 5120 owned slots per row, 256 misses per row):
touch hits + select_victims + assign_victims, as a CUDA graph replay (GPU) or eagerly (CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numba
import numpy as np
import torch

from spinserve.control.budgets import BudgetPolicy, Observation, resize_buffers
from spinserve.control.page_directory import DirectoryConfig, PageDirectory
from spinserve.control.slot_allocator import SlotAllocator
from spinserve.runtime.lru import BucketedLRU, assign_victims

PAGE_SIZE = 16
LAYERS, KV_HEADS = 32, 8  # Llama-3.1-8B
LH = LAYERS * KV_HEADS
SEGMENT_PAGES = 64  # 1024 tokens per level-2 segment
MAX_REQUESTS = 256
MAX_CONTEXT = 128 * 1024


def _pages(tokens: np.ndarray | int) -> np.ndarray:
    return -(-np.asarray(tokens, dtype=np.int64) // PAGE_SIZE)


def section_bytes(device: str) -> dict:
    live, live_tokens = 16, 8192
    live_segments = live * int(_pages(live_tokens)) // SEGMENT_PAGES
    config = DirectoryConfig(
        max_requests=MAX_REQUESTS,
        max_pages_per_request=int(_pages(MAX_CONTEXT)),
        segment_pages=SEGMENT_PAGES,
        num_layer_heads=LH,
        num_segments=2 * live_segments + 1,  # segment pool sized for twice the live context
    )
    host = SlotAllocator(live * int(_pages(live_tokens)) * LH + 1, "host")
    d = PageDirectory(config, SlotAllocator(2, "hbm"), host, device=device)
    for req in range(live):
        d.admit(req * 16)  # spread over the request slots
    d.grow(np.arange(live) * 16, np.full(live, _pages(live_tokens)))
    d.flush()
    d.check_integrity()
    b = d.table_bytes()
    return {
        "config": {
            "max_requests": MAX_REQUESTS,
            "max_context": MAX_CONTEXT,
            "page_size": PAGE_SIZE,
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "segment_pages": SEGMENT_PAGES,
            "live_requests": live,
            "live_tokens": live_tokens,
            "num_segments": config.num_segments,
        },
        "metrics": {
            **{f"{k}_bytes": v for k, v in b.items()},
            "ratio_live_to_flat": b["two_level_live"] / b["flat"],
            "ratio_reserved_to_flat": b["two_level_reserved"] / b["flat"],
        },
        "target": "two-level <= 0.1 x flat",
        "pass": b["two_level_reserved"] <= 0.1 * b["flat"],
    }


class StepBench:
    """Batch-256 decode bookkeeping on a PageDirectory (see the module docstring)."""

    def __init__(self, device: str, batch: int, budget_pages: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.batch, self.budget_pages = batch, budget_pages
        self.ctx = self.rng.integers(2048, 6144, size=batch)  # tokens per request
        max_pages = int(_pages(8192))
        segs_per_req = -(-max_pages // SEGMENT_PAGES) + 1
        config = DirectoryConfig(
            MAX_REQUESTS,
            int(_pages(MAX_CONTEXT)),
            SEGMENT_PAGES,
            LH,
            num_segments=batch * segs_per_req + 1,
        )
        hbm = SlotAllocator(batch * (budget_pages + 2) * LH + 1, "hbm")
        host = SlotAllocator(batch * (max_pages + 2) * LH + 1, "host")
        self.d = PageDirectory(config, hbm, host, device=device)
        self.reqs = np.arange(batch, dtype=np.int64)
        for r in self.reqs:
            self.d.admit(int(r))
        self.d.grow(self.reqs, _pages(self.ctx))
        self.d.own_hbm(self.reqs, budget_pages * LH)
        self._install_tails(self.reqs)
        self.d.flush()

    def _install_tails(self, reqs: np.ndarray) -> None:
        """Point each request's last page at LH of its own HBM slots (fresh ones)."""
        slots = self.d.own_hbm(reqs, LH).reshape(reqs.size, LH)
        self.d.set_hbm(reqs, self.d.num_pages[reqs] - 1, slots)

    def step(self, times: dict[str, list[float]]) -> None:
        d, t0 = self.d, time.perf_counter()
        self.ctx += 1
        new_pages = _pages(self.ctx)
        crossing = self.reqs[new_pages > d.num_pages[self.reqs]]
        if crossing.size:
            old_tails = d.hbm_entries(crossing, d.num_pages[crossing] - 1)
            d.grow(crossing, new_pages[crossing])
        t1 = time.perf_counter()
        if crossing.size:
            self._install_tails(crossing)
            d.disown_hbm(np.repeat(crossing, LH), old_tails.ravel())
        t2 = time.perf_counter()
        d.flush()
        t3 = time.perf_counter()
        for key, dt in (
            ("grow", t1 - t0),
            ("tail_pages", t2 - t1),
            ("flush", t3 - t2),
            ("total", t3 - t0),
        ):
            times[key].append(dt * 1e6)


def _stats(us: list[float]) -> dict:
    a = np.asarray(us)
    return {
        "median_us": float(np.median(a)),
        "p90_us": float(np.percentile(a, 90)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
        "max_us": float(a.max()),
    }


def section_step(device: str, steps: int) -> dict:
    batch, budget_pages = 256, 16
    b = StepBench(device, batch, budget_pages, seed=0)
    times: dict[str, list[float]] = {k: [] for k in ("grow", "tail_pages", "flush", "total")}
    for _ in range(20):
        b.step({k: [] for k in times})
    for _ in range(steps):
        b.step(times)
    if device == "cuda":
        torch.cuda.synchronize()
    b.d.check_integrity()
    resize_us = _time_resize(batch)
    release_us, admit_us = _time_churn(b, reps=10)
    return {
        "config": {
            "batch": batch,
            "contexts_tokens": "uniform [2048, 6144) + steps",
            "hbm_budget_pages_per_request": budget_pages * LH,
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "page_size": PAGE_SIZE,
            "segment_pages": SEGMENT_PAGES,
            "steps": steps,
            "mirror_device": device,
        },
        "metrics": {
            **{f"{k}": _stats(v) for k, v in times.items()},
            "budget_resize_batch256": _stats(resize_us),
            "release_request": _stats(release_us),
            "admit_4k_prompt": _stats(admit_us),
        },
        "target": "control-plane time <= 10% of the decode step time (step time measured on the "
        "GPU by the decode benchmark, not here)",
    }


def _time_resize(batch: int) -> list[float]:
    rng = np.random.default_rng(1)
    m = np.full(batch, 128 * LH)
    obs = Observation(m, 4 * m, rng.random(batch), 2 * m, rng.random(batch))
    out = []
    for _ in range(200):
        t0 = time.perf_counter()
        resize_buffers(obs, pool_pages=int(4.5 * m.sum()), policy=BudgetPolicy())
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _time_churn(b: StepBench, reps: int) -> tuple[list[float], list[float]]:
    release, admit = [], []
    for i in range(reps):
        req = int(i * 7 % b.batch)
        t0 = time.perf_counter()
        b.d.release(req)
        b.d.flush()
        t1 = time.perf_counter()
        b.d.admit(req)
        b.d.grow([req], [int(_pages(4096))])
        b.d.own_hbm(req, b.budget_pages * LH)
        b.d.flush()
        t2 = time.perf_counter()
        release.append((t1 - t0) * 1e6)
        admit.append((t2 - t1) * 1e6)
        b.ctx[req] = 4096
        b._install_tails(np.array([req]))
    return release, admit


def section_lru(device: str, reps: int) -> dict:
    rows, mandatory, misses = 32, 1024, 256
    width = 5 * mandatory
    lru = BucketedLRU(rows * width + 1, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # [rows, width] int32 owned slots per row (disjoint), [rows, mandatory] selected pages' slots
    row_slots = (1 + torch.randperm(rows * width, generator=gen)).view(rows, width).int()
    row_slots = row_slots.to(device)
    cols = torch.rand(rows, width, generator=gen).argsort(1)[:, : mandatory - misses].to(device)
    hits = row_slots.gather(1, cols)
    miss = torch.zeros(rows, mandatory, dtype=torch.bool, device=device)
    miss[:, :misses] = True
    need = torch.full((rows,), misses, dtype=torch.int32, device=device)
    for step in range(300):  # spread the ages over the buckets
        lru.advance()
        lru.touch(row_slots[:, (step * 17) % width :: 97])

    def one_layer() -> torch.Tensor:
        lru.touch(hits)
        victims, found = lru.select_victims(row_slots, need, max_victims=mandatory)
        dest = assign_victims(miss, victims, found)
        lru.touch(dest)
        return dest

    metrics = {}
    if device == "cuda":
        _, ms = _time_graph(one_layer, reps)
        metrics["compiled_per_layer_us"] = _compiled_us(lru, row_slots, need, mandatory, reps)
        mode = "cuda_graph_replay"
    else:
        ms, mode = _time_eager(one_layer, reps), "eager_cpu"
    metrics.update(per_layer_us=ms * 1e3, per_step_32_layers_us=ms * 1e3 * 32)
    config = {
        "rows": rows,
        "owned_slots_per_row": width,
        "mandatory": mandatory,
        "misses_per_row": misses,
        "mode": mode,
    }
    return {"config": config, "metrics": metrics}


def _compiled_us(lru: BucketedLRU, row_slots, need, max_victims: int, reps: int) -> float:
    """select_victims alone under torch.compile (fused kernels), checked against eager."""
    compiled = torch.compile(lru.select_victims, dynamic=False)
    eager = lru.select_victims(row_slots, need, max_victims)
    got = compiled(row_slots, need, max_victims)
    if not all(torch.equal(a, b) for a, b in zip(eager, got, strict=True)):
        raise AssertionError("compiled select_victims differs from eager")
    _, eager_ms = _time_graph(lambda: lru.select_victims(row_slots, need, max_victims), reps)
    _, ms = _time_graph(lambda: compiled(row_slots, need, max_victims), reps)
    print(f"select_victims alone: eager graph {eager_ms * 1e3:.1f} us, compiled {ms * 1e3:.1f} us")
    return ms * 1e3


def _time_graph(fn, reps: int) -> tuple[torch.cuda.CUDAGraph, float]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return graph, start.elapsed_time(end) / reps


def _time_eager(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SPIN_GIT_SHA", "unknown")


def _host_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus_visible": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="perf/results/metadata_cpu.json")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    doc = {
        "bench": "metadata",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "host": _host_info(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "bytes": section_bytes(args.device),
        "step": section_step(args.device, args.steps),
        "lru": section_lru(args.device, reps=200 if args.device == "cuda" else 5),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    summary = {k: doc[k]["metrics"] for k in ("bytes", "lru")}
    summary["step_total"] = doc["step"]["metrics"]["total"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
