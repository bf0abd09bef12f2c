"""Kernel benchmarks (perf/KERNELS.md): paged decode vs SDPA, sparse vs dense decode, page gather
vs pinned copies, paged prefill vs SDPA, each against floors measured in the same run.

Run on a CUDA machine:  python -m spinserve.perf.bench_kernels --out DIR [--sections a,b]
Writes DIR/kernels_<section>.json (device, git sha, date, config, rows of metrics, peers,
ratios, floors) and prints a short table per section. Timings: median of CUDA-event times of
CUDA-graph replays after warm-up, rotating over input copies so that data never sits in L2.
"""

# ruff: noqa: B023  (closures are timed inside the iteration that made them)
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spinserve.plugins import ops
from spinserve.plugins import triton_decode as td

GiB = 1 << 30
DEV = "cuda"
BF16 = torch.bfloat16
I32 = torch.int32
HQ, KV, D = 32, 8, 128  # Llama-3.1-8B attention shape
ROTATE_BYTES = 512 << 20  # rotate inputs until this many bytes are touched (L2 is 50 MB)


# ---- timing -------------------------------------------------------------------------------
def _events(fns: list[Callable[[], object]], iters: int) -> list[float]:
    times, pairs = [], []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fns[i % len(fns)]()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in pairs]
    return times


def time_ms(fns: list[Callable[[], object]], iters: int = 30, graph: bool = True) -> float:
    """Median ms of one call, rotating over fns; CUDA graphs unless graph=False."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    if graph:
        graphs = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graphs.append(g)
        fns = [g.replay for g in graphs]
    _events(fns, max(3, len(fns)))
    return statistics.median(_events(fns, max(iters, len(fns))))


def floors() -> dict[str, float]:
    """Copy bandwidths and matmul rate of this device, measured now."""
    a = torch.empty(GiB, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = time_ms([lambda: b.copy_(a)], iters=10, graph=False)
    out = {"hbm_copy_gbps": 2 * GiB / ms / 1e6}
    a = b = None
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    out["pinned_h2d_gbps"] = (
        (256 << 20)
        / time_ms([lambda: dev.copy_(host, non_blocking=True)], iters=10, graph=False)
        / 1e6
    )
    out["pinned_d2h_gbps"] = (
        (256 << 20)
        / time_ms([lambda: host.copy_(dev, non_blocking=True)], iters=10, graph=False)
        / 1e6
    )
    x = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    out["bf16_matmul_tflops"] = 2 * 8192**3 / time_ms([lambda: x @ x], iters=10, graph=False) / 1e9
    return out


# ---- paged layouts ---------------------------------------------------------------------------
def paged_lists(batch: int, ctx: int, page: int, num_slots: int, copies: int):
    """`copies` disjoint random page lists of batch x KV rows of ctx tokens over one pool."""
    npg = ctx // page
    rows = batch * KV
    perm = torch.randperm(num_slots - 1, device=DEV)[: copies * rows * npg] + 1
    indptr = (torch.arange(rows + 1, device=DEV) * npg).to(I32)
    last = torch.full((rows,), page, dtype=I32, device=DEV)
    return [
        (indptr, perm[c * rows * npg : (c + 1) * rows * npg].to(I32).contiguous(), last)
        for c in range(copies)
    ]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sdpa_decode(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def bench_decode_row(batch: int, ctx: int, fl: dict, cfg: td.DecodeConfig | None) -> dict:
    page = 16
    kv_bytes = batch * ctx * KV * D * 2 * 2
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
    num_slots = copies * batch * KV * ctx // page + 1
    pool = torch.randn(num_slots, 2, page, D, device=DEV, dtype=BF16)
    lists = paged_lists(batch, ctx, page, num_slots, copies)
    qs = [torch.randn(batch, HQ, D, device=DEV, dtype=BF16) for _ in lists]
    scale = D**-0.5
    fns = [
        lambda q=q, L=L: td.paged_decode_attention_triton(q, pool, *L, scale, config=cfg)
        for q, L in zip(qs, lists)
    ]
    ms = time_ms(fns)
    row = {
        "batch": batch,
        "ctx": ctx,
        "kv_bytes": kv_bytes,
        "paged_ms": ms,
        "paged_gbps": kv_bytes / ms / 1e6,
        "floor_ms": kv_bytes / fl["hbm_copy_gbps"] / 1e6,
        "splits": td.num_splits_for(batch * KV, lists[0][1].numel(), page, pool.device),
    }
    row["frac_of_copy_bw"] = row["paged_gbps"] / fl["hbm_copy_gbps"]
    if 2 * kv_bytes > 40 * GiB:  # no room for pool + contiguous copy: time SDPA on fresh K/V
        out = None
        pool = fns = None
        torch.cuda.empty_cache()
        k = torch.randn(batch, KV, ctx, D, device=DEV, dtype=BF16)
        v = torch.randn_like(k)
        row["sdpa_note"] = "K/V not copied from the pool (memory): no rel_diff"
    else:
        out = ops.paged_decode_attention(qs[0], pool, *lists[0], scale)
        slots0 = lists[0][1].long().reshape(batch, KV, ctx // page)
        pages = pool[slots0]  # [B, KV, npg, 2, P, D]
        pool = fns = None
        k = pages[:, :, :, 0].reshape(batch, KV, ctx, D)
        v = pages[:, :, :, 1].reshape(batch, KV, ctx, D)
        del pages
    ks = [k] + [torch.randn_like(k) for _ in range(copies - 1)]
    vs = [v] + [torch.randn_like(v) for _ in range(copies - 1)]
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            q4 = [q[:, :, None] for q in qs]
            ref = sdpa_decode(q4[0], k, v, backend)[:, :, 0]
            if out is not None:
                row[f"sdpa_{name}_rel_diff"] = rel(out, ref)
            row[f"sdpa_{name}_ms"] = time_ms(
                [lambda i=i: sdpa_decode(q4[i], ks[i], vs[i], backend) for i in range(copies)]
            )
        except Exception as exc:  # a backend that refuses the shape is reported, not fatal
            row[f"sdpa_{name}_error"] = repr(exc)[:200]
            try:  # capture may be what failed: time it eagerly then
                row[f"sdpa_{name}_eager_ms"] = time_ms(
                    [lambda i=i: sdpa_decode(q4[i], ks[i], vs[i], backend) for i in range(copies)],
                    graph=False,
                )
            except Exception as exc2:
                row[f"sdpa_{name}_eager_error"] = repr(exc2)[:200]
    best = [row[k] for k in ("sdpa_cudnn_ms", "sdpa_flash_ms") if k in row]
    if best:
        row["paged_over_best_sdpa"] = ms / min(best)
    return row


def section_decode(fl: dict, quick: bool) -> dict:
    cfg = best_decode_config_
    rows = []
    for ctx in (4096, 32768, 131072):
        for batch in (1, 8, 32, 64):
            if quick and batch * ctx > 32 * 32768:
                continue
            rows.append(bench_decode_row(batch, ctx, fl, cfg))
            torch.cuda.empty_cache()
            _print_row(
                rows[-1],
                (
                    "batch",
                    "ctx",
                    "paged_ms",
                    "frac_of_copy_bw",
                    "sdpa_cudnn_ms",
                    "sdpa_flash_ms",
                    "paged_over_best_sdpa",
                ),
            )
    return {
        "config": {
            "heads": [HQ, KV, D],
            "page": 16,
            "dtype": "bf16",
            "kernel_config": cfg.__dict__ if cfg else "default",
        },
        "targets": {"frac_of_copy_bw (batch>=8, ctx>=32K)": 0.9, "paged_over_best_sdpa": 1.1},
        "rows": rows,
    }


best_decode_config_: td.DecodeConfig | None = None


def _paged_setup(batch: int, ctx: int, page: int = 16):
    kv_bytes = batch * ctx * KV * D * 4
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
    num_slots = copies * batch * KV * ctx // page + 1
    pool = torch.randn(num_slots, 2, page, D, device=DEV, dtype=BF16)
    lists = paged_lists(batch, ctx, page, num_slots, copies)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
    return kv_bytes, pool, lists, q


def _paged_only(setup, fl: dict, cfg: td.DecodeConfig | None, splits: int | None = None) -> dict:
    kv_bytes, pool, lists, q = setup
    ms = time_ms(
        [
            lambda L=L: td.paged_decode_attention_triton(q, pool, *L, D**-0.5, splits, cfg)
            for L in lists
        ]
    )
    return {"paged_ms": ms, "frac_of_copy_bw": kv_bytes / ms / 1e6 / fl["hbm_copy_gbps"]}


SPLIT_SWEEP = (  # (batch, ctx, forced split counts) measured with the best tile config
    (1, 4096, (1, 2, 4, 8, 16, 32)),
    (8, 4096, (1, 2, 4, 8)),
    (1, 32768, (16, 32, 64, 128)),
    (64, 32768, (1, 2, 3, 4, 6, 8, 12)),
    (64, 4096, (1, 2, 3, 4)),
    (1, 131072, (32, 64, 128)),
)


def section_splits(fl: dict, quick: bool) -> dict:
    """Forced split counts vs the heuristic, with the default tile config."""
    cfg = td.default_config(D, 16)
    rows = []
    for batch, ctx, split_list in SPLIT_CHECK:
        setup = _paged_setup(batch, ctx)
        heuristic = td.num_splits_for(batch * KV, setup[2][0][1].numel(), 16, setup[1].device)
        for splits in sorted({*split_list, heuristic}):
            r = _paged_only(setup, fl, cfg, splits)
            r.update(batch=batch, ctx=ctx, forced_splits=splits, heuristic_splits=heuristic)
            rows.append(r)
            _print_row(
                r,
                (
                    "batch",
                    "ctx",
                    "forced_splits",
                    "heuristic_splits",
                    "paged_ms",
                    "frac_of_copy_bw",
                ),
            )
        setup = None
        torch.cuda.empty_cache()
    return {"config": {"tile": cfg.__dict__, "page": 16, "dtype": "bf16"}, "rows": rows}


SPLIT_CHECK = (  # shapes where the split heuristic changed without a measurement
    (1, 4096, (16, 32)),
    (8, 4096, (8, 9)),
    (8, 32768, (9, 10)),
    (8, 131072, (9, 10)),
)


def section_sweep(fl: dict, quick: bool) -> dict:
    """Decode tile configs and split counts at three shapes; the best config feeds `decode`."""
    global best_decode_config_
    shapes = ((32, 32768), (8, 32768), (1, 131072))
    configs = [
        td.DecodeConfig(bn, w, s)
        for bn in (32, 64, 128)
        for w, s in ((4, 2), (4, 3), (4, 4), (8, 3))
    ]
    rows, score = [], {}
    for batch, ctx in shapes:
        setup = _paged_setup(batch, ctx)
        for cfg in configs:
            try:
                r = _paged_only(setup, fl, cfg)
                score.setdefault(cfg, []).append(r["frac_of_copy_bw"])
            except Exception as exc:
                r = {"error": repr(exc)[:200]}
            r.update(batch=batch, ctx=ctx, cfg=cfg.__dict__)
            rows.append(r)
            _print_row(r, ("batch", "ctx", "cfg", "paged_ms", "frac_of_copy_bw", "error"))
        setup = None
        torch.cuda.empty_cache()
    best = max((c for c in score if len(score[c]) == len(shapes)), key=lambda c: sum(score[c]))
    best_decode_config_ = best
    for batch, ctx, split_list in SPLIT_SWEEP:
        setup = _paged_setup(batch, ctx)
        heuristic = td.num_splits_for(batch * KV, setup[2][0][1].numel(), 16, setup[1].device)
        for splits in split_list:
            r = _paged_only(setup, fl, best, splits)
            r.update(
                batch=batch,
                ctx=ctx,
                cfg=best.__dict__,
                forced_splits=splits,
                heuristic_splits=heuristic,
            )
            rows.append(r)
            _print_row(
                r,
                (
                    "batch",
                    "ctx",
                    "forced_splits",
                    "heuristic_splits",
                    "paged_ms",
                    "frac_of_copy_bw",
                ),
            )
        setup = None
        torch.cuda.empty_cache()
    return {
        "config": {"shapes": shapes, "page": 16, "dtype": "bf16"},
        "best": best.__dict__,
        "default": td.default_config(D, 16).__dict__,
        "rows": rows,
    }


def _print_row(row: dict, keys: tuple[str, ...]) -> None:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    print("  " + "  ".join(f"{k}={fmt(row[k])}" for k in keys if k in row), flush=True)


def _git_sha() -> str:
    if os.environ.get("SPIN_GIT_SHA"):
        return os.environ["SPIN_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    import triton

    from spinserve.perf import bench_kernels_paging as more

    sections = {
        "sweep": section_sweep,
        "splits": section_splits,
        "decode": section_decode,
        "sparse": more.section_sparse,
        "gather": more.section_gather,
        "prefill": more.section_prefill,
    }
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="perf/results")
    ap.add_argument("--sections", default=",".join(sections))
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fl = floors()
    print("floors:", {k: round(v, 1) for k, v in fl.items()}, flush=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    for name in args.sections.split(","):
        print(f"== {name}", flush=True)
        try:
            res = sections[name](fl, args.quick)
        except Exception:
            res = {"error": traceback.format_exc()[-3000:]}
            print(res["error"], flush=True)
        doc = {"bench": f"kernels_{name}", **meta, "floor": fl, **res}
        (out / f"kernels_{name}.json").write_text(json.dumps(doc, indent=1, default=str))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
