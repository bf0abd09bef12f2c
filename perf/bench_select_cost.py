"""Selection cost per decode step: each sparse algorithm's Index update + Select (runtime/sparse:
the eager torch path, and for capturable algorithms the engine's static path replayed as a CUDA
graph) against the rest of a decode layer, on a real-shape layer with random
weights (default: Llama-3.1-8B attention/MLP shapes, batch 32, 32K context, budget 2048).

Per layer it times, with CUDA events (median of --iters): index_decode + select (+ to_slots),
paged decode attention over the selected pages, dense paged decode attention over all pages,
and the layer's weight GEMMs (qkv, o, gate_up, down at M = batch). Select share =
select / (select + sparse attention + GEMMs). Writes perf/results/bench_select_cost_<time>.json.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from spinserve.plugins import ops
from spinserve.runtime.sparse import SparseParams, create_algorithm
from spinserve.runtime.sparse.static_select import candidates, select_static_slots

from .eval_report import device_name, git_sha


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def layer_gemms_ms(a, dev, dtype, iters: int) -> float:
    H, D, KV, inter = a.hidden, a.head_dim, a.kv_heads, a.intermediate
    x = torch.randn(a.batch, H, device=dev, dtype=dtype)
    o = torch.randn(a.batch, a.heads * D, device=dev, dtype=dtype)
    w = [
        torch.randn((a.heads + 2 * KV) * D, H, device=dev, dtype=dtype) * 0.01,
        torch.randn(H, a.heads * D, device=dev, dtype=dtype) * 0.01,
        torch.randn(2 * inter, H, device=dev, dtype=dtype) * 0.01,
        torch.randn(H, inter, device=dev, dtype=dtype) * 0.01,
    ]

    def run():
        torch.nn.functional.linear(x, w[0])
        torch.nn.functional.linear(o, w[1])
        g = torch.nn.functional.linear(x, w[2])
        torch.nn.functional.linear(g[:, :inter], w[3])

    return timed(run, iters)


def bench_algorithm(name: str, a, dev, dtype, iters: int) -> dict:
    P = create_algorithm(name, 16 if name != "shadowkv" else 8, 1, 64).page_size
    B, KV, Hq, D, L = a.batch, a.kv_heads, a.heads, a.head_dim, a.context
    n = -(-L // P)
    params = SparseParams(a.budget, a.sink_tokens, a.window_tokens)
    algo = create_algorithm(name, P, KV, D, params, index_dtype=dtype)  # as the engine
    state = algo.new_state(B, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for b in range(B):  # index a random context per request
        keys = torch.randn(L - 1, KV, D, device=dev, generator=g, dtype=dtype)
        algo.index_prefill(state, b, keys)
    pool = torch.randn(1 + B * KV * n, 2, P, D, device=dev, dtype=dtype)
    table = (1 + torch.arange(B * KV * n, device=dev)).view(B, KV, n)
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    k = torch.randn(B, KV, D, device=dev, dtype=dtype)
    slots = torch.arange(B, device=dev)
    lens = torch.full((B,), L, device=dev)

    def select():
        algo.index_decode(state, slots, k, lens - 1)
        sel = algo.select(state, q, slots, lens)
        return sel, sel.to_slots(table)

    sel, kv_slots = select()
    static = static_select_ms(algo, state, q, k, lens, slots, table, a.budget, iters)
    dense_indptr = torch.arange(0, B * KV * n + 1, n, device=dev, dtype=torch.int32)
    dense_slots = table.flatten().to(torch.int32)
    last = sel.kv_last_page_len
    scale = D**-0.5
    return dict(
        algorithm=name,
        page_size=P,
        selected_pages_per_row=float(sel.page_ids.numel() / (B * KV)),
        select_ms=timed(select, iters),
        sparse_attention_ms=timed(
            lambda: ops.paged_decode_attention(q, pool, sel.kv_indptr, kv_slots, last, scale),
            iters,
        ),
        dense_attention_ms=timed(
            lambda: ops.paged_decode_attention(q, pool, dense_indptr, dense_slots, last, scale),
            iters,
        ),
        **static,
    )


def static_select_ms(algo, state, q, k, lens, slots, table, budget: int, iters: int) -> dict:
    """The engine's capturable path as SparsePlanner.plan_static runs it (runtime/sparse/
    static_select.py: the step's candidates, the index update folded into the scoring where the
    algorithm fuses them, one select launch writing the pool slots), replayed as a CUDA graph;
    {} for algorithms without it."""
    if not algo.capturable:
        return {}
    n = table.shape[-1]
    algo.reserve(state, n)
    rows = table.reshape(-1, n).to(torch.int32)  # [B * KV, n]: the engine's tables are int32

    def run():
        cand = candidates(lens, slots, algo.num_kv_heads, algo.page_size, n)
        return select_static_slots(algo, state, q, cand, budget, rows, keys=k)[1]

    fn = run
    if q.is_cuda:
        run()  # compile / autotune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        fn = graph.replay
    return {"static_select_ms": timed(fn, iters), "static_select_graph": q.is_cuda}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_select_cost", description=__doc__.split("\n")[0])
    for flag, default in [
        ("batch", 32),
        ("context", 32768),
        ("heads", 32),
        ("kv-heads", 8),
        ("head-dim", 128),
        ("hidden", 4096),
        ("intermediate", 14336),
        ("budget", 2048),
        ("sink-tokens", 16),
        ("window-tokens", 128),
        ("iters", 20),
    ]:
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--algorithms", default="quest,shadowkv,retroinfer,streaming")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gemm_ms = layer_gemms_ms(a, dev, dtype, a.iters)
    rows = []
    for name in a.algorithms.split(","):
        r = bench_algorithm(name, a, dev, dtype, a.iters)
        layer = r["select_ms"] + r["sparse_attention_ms"] + gemm_ms
        r.update(gemm_ms=gemm_ms, select_share_of_layer=r["select_ms"] / layer)
        if "static_select_ms" in r:  # the engine's graph path
            layer = r["static_select_ms"] + r["sparse_attention_ms"] + gemm_ms
            r["static_select_share_of_layer"] = r["static_select_ms"] / layer
        rows.append(r)
        print(json.dumps(r), flush=True)
    record = dict(
        bench="bench_select_cost",
        device=device_name(dev),
        git_sha=git_sha(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=vars(a) | {"out": str(a.out)},
        metrics=rows,
        floor=None,
        peer="dense paged decode attention over all pages (same run)",
    )
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"bench_select_cost_{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
