"""Kernel benchmark sections for sparse decode, page gather / scatter and paged prefill (run
through perf/bench_kernels.py, which owns timing, floors and the JSON records)."""

# ruff: noqa: B023  (closures are timed inside the iteration that made them)
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spinserve.perf.bench_kernels import (
    BF16,
    DEV,
    HQ,
    I32,
    KV,
    D,
    _print_row,
    paged_lists,
    rel,
    time_ms,
)
from spinserve.plugins import ops
from spinserve.plugins import triton_decode as td
from spinserve.plugins import triton_prefill as tp
from spinserve.plugins import triton_select as tsel

MiB = 1 << 20


SCORE_SWEEP = [
    tsel.ScoreConfig(*c)
    for c in ((32, 2, 4), (32, 8, 4), (64, 4, 4), (64, 4, 8), (16, 8, 4), (128, 4, 8), (64, 16, 4))
]


# ---- sparse decode --------------------------------------------------------------------------
def section_sparse(fl: dict, quick: bool) -> dict:
    batch, ctx, page = (8 if quick else 32), 131072, 16
    budget_pages, sink_pages, window_pages = 2048 // page, 1, 4
    num_slots = batch * KV * ctx // page + 1
    pool = torch.randn(num_slots, 2, page, D, device=DEV, dtype=BF16)
    indptr, slots, last = paged_lists(batch, ctx, page, num_slots, 1)[0]
    q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
    scale = D**-0.5
    rows, sweeps = [], []
    dense_ms = time_ms(
        [lambda: td.paged_decode_attention_triton(q, pool, indptr, slots, last, scale)]
    )
    kv_bytes = batch * ctx * KV * D * 4
    logical_rows = torch.arange(slots.numel(), dtype=I32, device=DEV)
    for table_dtype, layout in ((BF16, "logical"), (BF16, "slot"), (torch.float32, "logical")):
        # random Quest tables (speed does not depend on how they were built). Summary row of a
        # page: "logical" = its CSR position (tables laid out per request/head in page order, as
        # append_kv's summary_rows allow); "slot" = its random HBM slot (scattered 256 B reads)
        page_rows = logical_rows if layout == "logical" else slots
        mn = torch.randn(num_slots, D, device=DEV).to(table_dtype)
        mx = (mn.float() + torch.rand(num_slots, D, device=DEV)).to(table_dtype)

        sweep = []
        for cfg in SCORE_SWEEP:
            ms = time_ms(
                [
                    lambda: tsel.score_pages_triton(
                        q, indptr, page_rows, last, mn, mx, mn, page, 0, cfg
                    )
                ]
            )
            sweep.append(
                {
                    "table_dtype": str(table_dtype),
                    "layout": layout,
                    "cfg": cfg.__dict__,
                    "score_ms": ms,
                }
            )
            _print_row(sweep[-1], ("table_dtype", "layout", "cfg", "score_ms"))
        sweeps += sweep
        best = tsel.ScoreConfig(**min(sweep, key=lambda r: r["score_ms"])["cfg"])

        def score():
            return tsel.score_pages_triton(q, indptr, page_rows, last, mn, mx, mn, page, 0, best)

        scores = score()

        def select():
            ip, pos = ops.select_pages(
                scores, indptr, sink_pages, window_pages, budget_pages, ctx // page
            )
            return ip, slots[pos.long()]

        ip, sel = select()

        def attend():
            return ops.sparse_decode_attention(q, pool, ip, sel, last, scale)

        def step():
            s = score()  # Triton launcher with the sweep's best config (the op: default)
            ip2, pos = ops.select_pages(
                s, indptr, sink_pages, window_pages, budget_pages, ctx // page
            )
            return ops.sparse_decode_attention(q, pool, ip2, slots[pos.long()], last, scale)

        t_ip, t_pos = tsel.select_pages_torch(
            scores, indptr, sink_pages, window_pages, budget_pages, ctx // page
        )
        ip_k, pos_k = ops.select_pages(
            scores, indptr, sink_pages, window_pages, budget_pages, ctx // page
        )
        select_matches_torch = bool(torch.equal(t_ip, ip_k) and torch.equal(t_pos, pos_k))
        sel_pages = budget_pages + sink_pages + window_pages
        table_bytes = 2 * slots.numel() * D * mn.element_size()
        sel_bytes = batch * KV * sel_pages * page * D * 4
        r = {
            "score_cfg": best.__dict__,
            "summary_rows": layout,
            "select_matches_torch_topk": select_matches_torch,
            "table_dtype": str(table_dtype).replace("torch.", ""),
            "batch": batch,
            "ctx": ctx,
            "dense_ms": dense_ms,
            "dense_floor_ms": kv_bytes / fl["hbm_copy_gbps"] / 1e6,
            "sparse_step_ms": time_ms([step]),
            "score_ms": time_ms([score]),
            "select_ms": time_ms([select]),
            "sparse_attention_ms": time_ms([attend]),
            "sparse_floor_ms": (table_bytes + sel_bytes) / fl["hbm_copy_gbps"] / 1e6,
            "table_bytes": table_bytes,
            "selected_kv_bytes": sel_bytes,
        }
        r["dense_over_sparse"] = dense_ms / r["sparse_step_ms"]
        rows.append(r)
        _print_row(
            r,
            (
                "table_dtype",
                "summary_rows",
                "dense_ms",
                "sparse_step_ms",
                "score_ms",
                "select_ms",
                "sparse_attention_ms",
                "sparse_floor_ms",
                "dense_over_sparse",
            ),
        )
        mn = mx = None
    return {
        "config": {
            "heads": [HQ, KV, D],
            "page": page,
            "budget_tokens": 2048,
            "sink_pages": sink_pages,
            "window_pages": window_pages,
            "score": "quest",
        },
        "targets": {"dense_over_sparse (batch 32)": 10.0},
        "peers_not_run": {"flex_attention": "not measured in this run"},
        "rows": rows,
        "score_sweep": sweeps,
    }


# ---- gather / scatter -----------------------------------------------------------------------
def _per_page_memcpy_ms(hbm, host, dst, src, page_bytes: int, n: int) -> tuple[float, str]:
    """n pages, one cudaMemcpyAsync each, issued from Python; returns (ms for n pages, how)."""
    try:
        import cupy

        stream = torch.cuda.current_stream().cuda_stream

        def copy():
            for i in range(n):
                cupy.cuda.runtime.memcpyAsync(
                    hbm.data_ptr() + dst[i] * page_bytes,
                    host.data_ptr() + src[i] * page_bytes,
                    page_bytes,
                    1,
                    stream,
                )

        how = "cupy.cuda.runtime.memcpyAsync per page"
    except ImportError:

        def copy():
            for i in range(n):
                hbm[dst[i]].copy_(host[src[i]], non_blocking=True)

        how = "torch copy_ per page"
    return time_ms([copy], iters=5, graph=False), how


def section_gather(fl: dict, quick: bool) -> dict:
    rows = []
    host_bytes, move_bytes = 1 << 30, 64 * MiB
    host_raw = torch.empty(host_bytes, dtype=torch.uint8).pin_memory()
    chunk = torch.randint(0, 255, (256 * MiB,), dtype=torch.uint8, device=DEV)
    for i in range(4):
        host_raw[i * 256 * MiB : (i + 1) * 256 * MiB].copy_(chunk)
    big_dev = torch.empty(move_bytes, dtype=torch.uint8, device=DEV)
    big_h2d = time_ms([lambda: big_dev.copy_(host_raw[:move_bytes], non_blocking=True)], 10, False)
    big_d2h = time_ms([lambda: host_raw[:move_bytes].copy_(big_dev, non_blocking=True)], 10, False)
    for page in (8, 16, 32):
        page_bytes = 2 * page * D * 2
        host = host_raw.view(BF16).view(-1, 2, page, D)
        n = move_bytes // page_bytes
        hbm = torch.empty(2 * n, 2, page, D, device=DEV, dtype=BF16)
        src = torch.randperm(host.shape[0], device=DEV)[:n].to(I32)
        dst = torch.randperm(2 * n, device=DEV)[:n].to(I32)
        cnt = torch.tensor([n], dtype=I32, device=DEV)
        gather_ms = time_ms([lambda: ops.gather_pages(host, hbm, src, dst, cnt)], 20)
        scatter_ms = time_ms([lambda: ops.scatter_pages(hbm, host, dst, src, cnt)], 20)
        n_memcpy = 1024
        memcpy_ms, how = _per_page_memcpy_ms(
            hbm, host, dst.tolist(), src.tolist(), page_bytes, n_memcpy
        )
        hbm.fill_(0)
        ops.gather_pages(host, hbm, src, dst, cnt)
        ok = torch.equal(  # compare bits: random bytes include NaN patterns
            hbm[dst.long()].view(torch.int16).cpu(), host[src.long().cpu()].view(torch.int16)
        )
        r = {
            "page_kib": page_bytes // 1024,
            "pages": n,
            "bytes": move_bytes,
            "gather_ms": gather_ms,
            "gather_gbps": move_bytes / gather_ms / 1e6,
            "big_pinned_h2d_ms": big_h2d,
            "big_pinned_h2d_gbps": move_bytes / big_h2d / 1e6,
            "scatter_ms": scatter_ms,
            "scatter_gbps": move_bytes / scatter_ms / 1e6,
            "big_pinned_d2h_gbps": move_bytes / big_d2h / 1e6,
            "per_page_memcpy_gbps": n_memcpy * page_bytes / memcpy_ms / 1e6,
            "per_page_memcpy_how": how,
            "gather_checked_equal": ok,
        }
        r["gather_over_big_copy"] = r["gather_gbps"] / r["big_pinned_h2d_gbps"]
        r["scatter_over_big_copy"] = r["scatter_gbps"] / r["big_pinned_d2h_gbps"]
        r["gather_over_per_page_memcpy"] = r["gather_gbps"] / r["per_page_memcpy_gbps"]
        rows.append(r)
        _print_row(
            r,
            (
                "page_kib",
                "gather_gbps",
                "big_pinned_h2d_gbps",
                "gather_over_big_copy",
                "scatter_gbps",
                "scatter_over_big_copy",
                "per_page_memcpy_gbps",
                "gather_checked_equal",
            ),
        )
        hbm = None
    return {
        "config": {
            "move_bytes": move_bytes,
            "host_pool": "torch pinned (UVA)",
            "dtype": "bf16",
            "head_dim": D,
        },
        "targets": {"gather_over_big_copy": 0.85},
        "rows": rows,
    }


# ---- prefill --------------------------------------------------------------------------------
PREFILL_SWEEP = [
    tp.PrefillConfig(*c)
    for c in (
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 8, 2),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (128, 64, 4, 3),
        (64, 128, 4, 2),
        (128, 128, 8, 2),
    )
]


def _prefill_case(L: int, page: int = 16):
    num_slots = KV * L // page + 1
    pool = torch.randn(num_slots, 2, page, D, device=DEV, dtype=BF16)
    indptr, slots, last = paged_lists(1, L, page, num_slots, 1)[0]
    q = torch.randn(L, HQ, D, device=DEV, dtype=BF16)
    qo = torch.tensor([0, L], dtype=I32, device=DEV)
    return q, pool, qo, indptr, slots, last


def section_prefill(fl: dict, quick: bool) -> dict:
    scale = D**-0.5
    sweep = []
    args = _prefill_case(8192)
    flops8k = 4 * HQ * D * 8192 * 8193 / 2
    for cfg in PREFILL_SWEEP:
        try:
            ms = time_ms(
                [lambda: tp.paged_prefill_attention_triton(*args, scale, config=cfg)],
                10,
                graph=False,
            )
            sweep.append({"cfg": cfg.__dict__, "ms": ms, "tflops": flops8k / ms / 1e9})
        except Exception as exc:
            sweep.append({"cfg": cfg.__dict__, "error": repr(exc)[:200]})
        _print_row(sweep[-1], ("cfg", "ms", "tflops", "error"))
    best = max((s for s in sweep if "ms" in s), key=lambda s: s["tflops"])
    cfg = tp.PrefillConfig(**best["cfg"])
    rows = []
    for L in (8192,) if quick else (8192, 32768):
        q, pool, qo, indptr, slots, last = _prefill_case(L)
        flops = 4 * HQ * D * L * (L + 1) / 2
        iters = 10 if L <= 8192 else 5
        ms = time_ms(
            [
                lambda: tp.paged_prefill_attention_triton(
                    q, pool, qo, indptr, slots, last, scale, config=cfg
                )
            ],
            iters,
            False,
        )
        out = tp.paged_prefill_attention_triton(q, pool, qo, indptr, slots, last, scale, config=cfg)
        pages = pool[slots.long()]  # [L / P, 2, P, D] for the 8 heads in order
        kv = pages.reshape(KV, L // 16, 2, 16, D).permute(2, 0, 1, 3, 4).reshape(2, 1, KV, L, D)
        k, v = kv[0].contiguous(), kv[1].contiguous()
        q4 = q.transpose(0, 1)[None].contiguous()
        r = {
            "prompt": L,
            "paged_ms": ms,
            "paged_tflops": flops / ms / 1e9,
            "floor_ms": flops / fl["bf16_matmul_tflops"] / 1e9,
            "cfg": cfg.__dict__,
        }
        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=True)

            try:
                ref = run()[0].transpose(0, 1)
                r[f"sdpa_{name}_rel_diff"] = rel(out, ref)
                sms = time_ms([run], iters, False)
                r[f"sdpa_{name}_ms"] = sms
                r[f"sdpa_{name}_tflops"] = flops / sms / 1e9
                r[f"paged_over_sdpa_{name}_tflops"] = r["paged_tflops"] / r[f"sdpa_{name}_tflops"]
            except Exception as exc:
                r[f"sdpa_{name}_error"] = repr(exc)[:200]
        rows.append(r)
        _print_row(
            r,
            (
                "prompt",
                "paged_ms",
                "paged_tflops",
                "sdpa_flash_tflops",
                "sdpa_cudnn_tflops",
                "paged_over_sdpa_flash_tflops",
                "sdpa_flash_rel_diff",
            ),
        )
    return {
        "config": {"heads": [HQ, KV, D], "page": 16, "dtype": "bf16", "batch": 1, "causal": True},
        "targets": {"paged_over_sdpa_flash_tflops": 0.8},
        "sweep_8k": sweep,
        "rows": rows,
    }
