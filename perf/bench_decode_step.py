"""Decode step of a Llama-3.1-8B-shaped model (random bf16 weights made on the GPU at load, never
written anywhere) through spinserve's own decode path, P = 16, Quest with bf16 min/max index:
  (a) batch 32 x 32K context, budget 2048 tokens (+ 1 sink page and 9 window pages with the
      tail: 138 pages per (request, layer, kv_head) row), every page resident in HBM;
  (b) the same through the HBM/host hierarchy (runtime/hierarchy.py): each row owns the engine's
      width of HBM slots (mandatory x (1 + 4), HierarchicalKVManager's rule), at forced miss
      rates; the engine's resolve (torch ops) and the fused resolve kernel;
  (c) dense attention over all 32K tokens, all KV in HBM;
  batch256: (i) the step at batch 256 x 8K, budget 512 (the same 1/16 of the context), 1x
      buffer, through the hierarchy, no forced misses (the largest such batch whose working sets
      fit an 80 GB H100 beside weights and index); (ii) the control plane's CPU time between two
      launches at that batch (perf/decode_step_control.py: LLMEngine.step on a real scheduler
      and HierarchicalKVManager); control_share = (ii) / (i), target <= 0.10.
The path is the runtime's: LlamaModel.forward with a SparsePlanner over QuestAlgorithm (index
states filled with random min <= max), batches with SparseDecode(uniform_budget) as the engine
builds them, run by the runtime's DecodeGraphRunner (static inputs, copy_from, CUDA-graph
replay: "graph") and by the same runner with replay=False (the padded static path eagerly:
"eager"); (a) also by the engine's eager selection (host syncs: "eager_dynamic"). Every layer is
sparse (dense_layers 0: two dense layers' full KV would not fit beside (b)).

Memory: 32 x 32K of Llama-8B KV is 128 GiB, more than HBM and host RAM, so rows alias: request
b's (layer l, head h) pages are the pages of row (region b % R, layer (l + b // R) % L, head h)
of a pool of R = ceil(B / L) request-sized regions: within a layer every request reads distinct
memory (no L2 reuse). (b)'s host pool is one region (4 GiB pinned); its HBM slots are real.
Miss control in (b): the batch repeats one step (same token and position), so the selection
repeats and a warm cache hits everything; `MissForcingPlanner.select_static` evicts a fraction
f of each row's selected resident pages (never the tail) in the step, before the model resolves
them, so they miss and are fetched again. The measured miss rate is reported.

Floors, from bandwidths measured in this run: (weights read + selected KV + index bytes) / HBM
copy bandwidth, plus miss bytes / pinned host-to-device bandwidth for (b); (weights + all KV) /
HBM for (c). On an H100 80GB: ~3 min, peak ~68 GiB of HBM (during (b) and (i)), 4 GiB pinned.
Run: python -m spinserve.perf.bench_decode_step --out perf/results [--smoke: tiny, CPU, seconds]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from spinserve.configs.model import Architecture, ModelConfig
from spinserve.engines.manifest import RandomWeights
from spinserve.engines.random_engine import preset_config, random_weights
from spinserve.perf import decode_step_control
from spinserve.perf.common import record, write_record
from spinserve.perf.decode_step_parts import (
    SHAPES,
    SMOKE_SHAPES,
    P,
    Shape,
    build_hierarchy,
    make_batch,
    make_host_pool,
    make_planner,
    resident_pool,
    sparse_inputs,
)
from spinserve.runtime.cuda_graph import DecodeGraphRunner, SparseGraphSpec
from spinserve.runtime.hierarchy import FETCHED, LOOKUPS, SHORT
from spinserve.runtime.model import LlamaModel

DEV, BF16 = "cuda", torch.bfloat16
ITERS = {"graph": 15, "eager": 5}  # timed calls per measurement (3 untimed first)
RESOLVE = "fused"  # the engine default on CUDA (cache.fused_resolve); "torch" on the CPU smoke
SMOKE_ITERS = {"graph": 1, "eager": 1}


def smoke_config() -> ModelConfig:
    """A tiny model for a CPU dry run of this script's logic (--smoke)."""
    return ModelConfig(Architecture.LLAMA, 1000, 256, 512, 2, 4, 2, 64, 4096)


def events_ms(fn, iters: int) -> float:
    """Median ms of fn() over iters, timed with CUDA events (3 untimed calls first)."""
    for _ in range(3):
        fn()
    if DEV != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    pairs = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def _copy_gbps(dst: torch.Tensor, src: torch.Tensor, iters: int) -> float:
    """Bytes of src per ms of dst.copy_(src), in GB/s."""
    return src.numel() / events_ms(lambda: dst.copy_(src, non_blocking=True), iters) / 1e6


def bandwidths() -> dict[str, float]:
    """HBM device-to-device copy (read + written bytes) and pinned host-to-device copy."""
    n = (2 << 30) if DEV == "cuda" else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    out = {"hbm_copy_gbps": 2 * _copy_gbps(torch.empty_like(src), src, 10)}
    host = torch.empty(n // 2, dtype=torch.uint8, pin_memory=DEV == "cuda")
    out["pinned_h2d_gbps"] = _copy_gbps(src[: n // 2], host, 8)
    return out


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    _sync()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def runners(model, pool, planner, cfg, shape: Shape, spec) -> tuple:
    """(graph, eager) DecodeGraphRunners of the measured bucket only (capture time, memory).
    Without CUDA both run the padded static path eagerly."""
    out = []
    for replay in (DEV == "cuda", False):
        r = DecodeGraphRunner(
            lambda b: model.forward(b, pool, planner), cfg.num_layers, cfg.num_kv_heads,
            shape.batch, shape.pages, torch.device(DEV), spec, replay,
        )  # fmt: skip
        r.buckets = [shape.batch]
        r.capture()
        out.append(r)
    return tuple(out)


def time_modes(graph, eager, batch) -> dict[str, float]:
    assert graph.can_run(batch) and eager.can_run(batch), "the batch would not take the graph"
    return {
        "graph_ms": events_ms(lambda: graph.run(batch), ITERS["graph"]),
        "eager_ms": events_ms(lambda: eager.run(batch), ITERS["eager"]),
    }


def floors(cfg, shape: Shape, planner, fl) -> dict[str, float]:
    """Bytes one step must read and its HBM floor (ms) for sparse attention."""
    L, KV, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    page = 2 * P * D * 2
    sinks, window, dynamic = planner.algo.page_quota(shape.budget)
    C = min(sinks + window + dynamic, shape.pages)
    sel = shape.batch * L * KV * C * page
    index = 2 * L * shape.batch * KV * shape.pages * D * 2  # min + max of every page, bf16
    return {
        "selected_pages_per_row": C,
        "page_bytes": page,
        "selected_kv": sel,
        "index": index,
        "floor_ms": (fl["weights"] + sel + index) / fl["hbm"],
    }


def run_resident(cfg, model, shape: Shape, fl) -> tuple[dict, torch.Tensor]:
    """(a) sparse, every page resident, and (c) dense, over one aliased pool (returned)."""
    L, KV, N, B = cfg.num_layers, cfg.num_kv_heads, shape.pages, shape.batch
    planner = make_planner(cfg, shape, DEV, seed=1)
    pool, table = resident_pool(cfg, shape, DEV)
    append = table[..., N - 1].contiguous()
    batch = make_batch(cfg, shape, append, None, sparse_inputs(shape, table, DEV))
    spec = SparseGraphSpec("quest", shape.budget, L)
    a = time_modes(*runners(model, pool, planner, cfg, shape, spec), batch)
    a["eager_dynamic_ms"] = events_ms(lambda: model.forward(batch, pool, planner), ITERS["eager"])
    f = floors(cfg, shape, planner, fl)
    a["floor_ms"] = f["floor_ms"]
    a["bytes"] = {"selected_kv": f["selected_kv"], "index": f["index"]}
    _free()
    dense = make_batch(cfg, shape, append, table, None)
    c = time_modes(*runners(model, pool, None, cfg, shape, None), dense)
    kv_bytes = B * L * KV * N * f["page_bytes"]
    c["floor_ms"] = (fl["weights"] + kv_bytes) / fl["hbm"]
    c["bytes"] = {"kv": kv_bytes}
    for r in (a, c):
        r["graph_over_floor"] = r["graph_ms"] / r["floor_ms"]
    _free()
    return {"a_resident": a, "c_dense": c}, pool


def run_hierarchy(cfg, model, shape: Shape, fl, host, fractions, paths) -> dict:
    """Sparse through the hierarchy: cold start, then per resolve path a graph and an eager
    runner at every forced miss fraction."""
    planner = make_planner(cfg, shape, DEV, seed=3)
    hier, tail, directory = build_hierarchy(cfg, shape, host, DEV)
    planner.hier = hier
    empty = torch.zeros(0, shape.batch, cfg.num_kv_heads, 1, dtype=torch.int32, device=DEV)
    batch = make_batch(cfg, shape, tail, None, sparse_inputs(shape, empty, DEV, hier))
    f = floors(cfg, shape, planner, fl)
    out: dict = {"selected_pages_per_row": f["selected_pages_per_row"]}
    for path in paths:
        hier.fused = path == "fused"
        spec = SparseGraphSpec("quest", shape.budget, 0, hier)
        graph, eager = runners(model, hier.hbm_pool, planner, cfg, shape, spec)
        if "cold_fetched_pages" not in out:  # every selected page but the tail misses once
            before = int(hier.stats[FETCHED])
            graph.run(batch)
            _sync()
            out["cold_fetched_pages"] = int(hier.stats[FETCHED]) - before
            graph.run(batch)
        key = "rows" if path == "torch" else f"{path}_resolve_rows"
        out[key] = _hierarchy_rows(graph, eager, batch, planner, hier, f, fl, fractions)
        del graph, eager
        _free()
    out["offload_completed_ms"] = offload_ms(hier, cfg, shape)
    directory.close()
    return out


def _hierarchy_rows(graph, eager, batch, planner, hier, f, fl, fractions) -> list[dict]:
    rows = []
    for frac in fractions:
        planner.force.fill_(frac)
        row = {"forced_fraction": frac}
        for name, runner in (("graph", graph), ("eager", eager)):
            before = hier.stats.clone()
            row[f"{name}_ms"] = events_ms(lambda r=runner: r.run(batch), ITERS[name])
            delta = (hier.stats - before).tolist()
            row[f"{name}_miss_rate"] = delta[FETCHED] / max(delta[LOOKUPS], 1)
            row[f"{name}_fetched_pages_per_step"] = delta[FETCHED] / (ITERS[name] + 3)
            assert delta[SHORT] == 0, "a row ran out of victims: budget bug"
        row["pcie_bytes_per_step"] = row["graph_fetched_pages_per_step"] * f["page_bytes"]
        row["floor_ms"] = f["floor_ms"] + row["pcie_bytes_per_step"] / fl["pcie"]
        row["graph_over_floor"] = row["graph_ms"] / row["floor_ms"]
        rows.append(row)
        print(row, flush=True)
    planner.force.fill_(0)
    return rows


def offload_ms(hier, cfg, shape: Shape) -> float:
    """One step's offload when every row completes a page (B * L * KV pages to the host)."""
    B = shape.batch
    req = torch.arange(B, device=DEV)
    pos = torch.full((B,), shape.pages * P - 1, device=DEV)
    tail = torch.ones(cfg.num_layers, B, cfg.num_kv_heads, dtype=torch.int32, device=DEV)
    return events_ms(lambda: hier.offload_completed(req, pos, tail), 10)


def run_batch256(cfg, model, shape: Shape, fl, steps: int) -> dict:
    """(i) the GPU step at batch 256 (engine's resolve, no forced misses), (ii) the CPU time
    between two launches, and their ratio."""
    host = make_host_pool(cfg, shape, None, DEV)
    path = RESOLVE if DEV == "cuda" else "torch"
    step = run_hierarchy(cfg, model, shape, fl, host, [0.0], [path])
    step["resolve"] = path
    host.close()
    _free()
    control = decode_step_control.measure(cfg, shape, DEV, steps)
    gpu_ms = (step.get("rows") or step["fused_resolve_rows"])[0]["graph_ms"]
    out = {
        "step": step,
        "control_plane": control,
        "gpu_step_ms": gpu_ms,
        "control_share": control["step_ms"]["median_ms"] / gpu_ms,
        "control_share_mean": control["step_ms"]["mean_ms"] / gpu_ms,
    }
    if DEV == "cuda":  # the same control plane overlapped with a GPU step of gpu_ms
        out["overlap"] = decode_step_control.measure_overlap(cfg, shape, gpu_ms, steps)
    return out


def table(metrics: dict, shape256: Shape) -> str:
    lines = [f"{'case':<34}{'graph ms':>10}{'eager ms':>10}{'floor ms':>10}{'x floor':>9}"]

    def add(name, r):
        cells = f"{r['graph_ms']:>10.2f}{r['eager_ms']:>10.2f}{r['floor_ms']:>10.2f}"
        lines.append(f"{name:<34}{cells}{r['graph_over_floor']:>9.2f}")

    if "a_resident" in metrics:
        add("(a) sparse, resident", metrics["a_resident"])
        add("(c) dense", metrics["c_dense"])
    b = metrics.get("b_hierarchy", {})
    for key in ("rows", "fused_resolve_rows"):
        for r in b.get(key, []):
            tag = "torch" if key == "rows" else "fused"
            add(f"(b) {tag} f={r['forced_fraction']} miss={r['graph_miss_rate']:.3f}", r)
    if "batch256" in metrics:
        m = metrics["batch256"]
        row = (m["step"].get("rows") or m["step"]["fused_resolve_rows"])[0]
        add(f"(i) batch {shape256.batch} x {shape256.context}, hier.", row)
        cp = m["control_plane"]["step_ms"]
        lines.append(
            f"(ii) control plane CPU per step: median {cp['median_ms']:.2f} ms, mean "
            f"{cp['mean_ms']:.2f} ms = {m['control_share']:.3f} of the GPU step"
        )
        if "overlap" in m:
            o = m["overlap"]
            lines.append(
                f"(iii) overlapped: wall {o['wall_median_ms']:.2f} ms per step over a "
                f"{o['gpu_step_ms']:.2f} ms GPU step -> GPU waits {o['exposed_ms']:.2f} ms = "
                f"{o['exposed_share']:.3f} (target <= 0.10); syncing calls per step: "
                f"{len(o['syncing_calls_per_step'])}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("perf/results"))
    ap.add_argument("--name", default="decode_step_h100")
    ap.add_argument("--fractions", default="0,0.02,0.1,0.3")
    ap.add_argument("--control-steps", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: logic only")
    ap.add_argument("--parts", default="abc,256", help="abc (batch 32 x 32K) and/or 256")
    args = ap.parse_args(argv)
    global DEV
    DEV = "cpu" if args.smoke else "cuda"
    ITERS.update(SMOKE_ITERS if args.smoke else {"graph": 15, "eager": 5})
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    cfg = smoke_config() if args.smoke else preset_config("llama-3.1-8b")
    bw = bandwidths()
    print(bw, flush=True)
    weights = random_weights(cfg, RandomWeights("bench", 0, 0.02), DEV, BF16)
    w_bytes = sum(t.numel() * t.element_size() for k, t in weights.items() if "embed" not in k)
    fl = {"weights": w_bytes, "hbm": bw["hbm_copy_gbps"] * 1e6, "pcie": bw["pinned_h2d_gbps"] * 1e6}
    model = LlamaModel(cfg, weights)
    config = {
        "model": "Llama-3.1-8B shape, random bf16 weights made at load" if not args.smoke
        else "smoke: tiny model", "page_size": P, "algorithm": "quest (bf16 min/max index)",
        "sink_tokens": 16, "window_tokens": 128, "dense_layers": 0,
        "shapes": {k: {**asdict(s), "mandatory": s.mandatory, "row_width": s.width}
                   for k, s in shapes.items()},
        "cuda_graphs": DEV == "cuda", "torch": torch.__version__,
        "kv_aliasing": "request b's (layer l, head h) row reads row (region b % R, layer "
        "(l + b // R) % L, h) of R = ceil(B / L) request-sized regions",
    }  # fmt: skip
    # backwards-compatible keys of the 32K records
    s32 = shapes["32k"]
    config.update(batch=s32.batch, context_tokens=s32.context, budget_tokens=s32.budget)
    floor = {**bw, "weight_bytes_read": w_bytes}
    targets = {"a_graph_over_floor": 1.3, "control_share": 0.10}

    def save(metrics, partial=None):
        extra = {"partial": partial} if partial else {}
        rec = record("decode_step", config, metrics, floor=floor, targets=targets, **extra)
        return rec, write_record(rec, args.out, args.name)

    res = {}
    if "abc" in args.parts:
        res, pool = run_resident(cfg, model, s32, fl)
        print(res, flush=True)
        save(res, "a and c only")
        region = cfg.num_layers * cfg.num_kv_heads * s32.pages
        host = make_host_pool(cfg, s32, pool[1 : 1 + region], DEV)
        del pool
        _free()
        fractions = [float(x) for x in args.fractions.split(",")]
        paths = ["torch", "fused"] if DEV == "cuda" else ["torch"]
        res["b_hierarchy"] = run_hierarchy(cfg, model, s32, fl, host, fractions, paths)
        host.close()
        _free()
        save(res, "a, b and c only")
    if "256" in args.parts:
        res["batch256"] = run_batch256(cfg, model, shapes["256"], fl, args.control_steps)
    rec, path = save(res)
    print(path)
    print(table(res, shapes["256"]), flush=True)
    return rec


if __name__ == "__main__":
    main()
