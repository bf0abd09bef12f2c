"""Paging kernels in Triton: append K/V into pages, page summaries, page gather/scatter.

- append_kv: one program per new token writes its [KV, D] keys and values into
  kv_pool[slot, 0|1, offset] (padded tokens carry the dummy slot 0 and write there).
- page_summaries: after append, the last new token of each touched (page, kv head) recomputes
  that page's per-channel key min, max and sum over its valid tokens (0..offset) into the
  summary tables at `summary_rows` (a page's summary row is the caller's: a logical page id,
  since summaries outlive HBM residency). Recomputing from the page keeps no atomics and is
  exact for full and partial pages.
- copy_pages (gather / scatter): pages are moved as 32-bit words, 16 bytes per access, one
  program per (page, chunk); the grid is sized for the worst case (capacity of the slot lists)
  and programs past the device-side page count exit. The host pool is pinned, mapped memory that
  the GPU reads through UVA: a CPU tensor whose data_ptr is valid on the device.
"""

from __future__ import annotations

import torch

from ._triton_util import lazy_jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

COPY_CHUNK_WORDS = 1024  # 32-bit words per program: 4 KiB, 8 x 16-byte accesses per thread


def _append_kv_kernel(
    kv_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    offsets_ptr,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_KV: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_KV)
    d = tl.arange(0, HEAD_DIM)
    h_ok = h < num_kv_heads
    slot = tl.load(slots_ptr + t * num_kv_heads + h, mask=h_ok, other=0).to(tl.int64)
    off = tl.load(offsets_ptr + t).to(tl.int64)
    src = (t * num_kv_heads + h).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    dst = (slot * (2 * PAGE) + off)[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_ptr + src, mask=h_ok[:, None])
    v = tl.load(v_ptr + src, mask=h_ok[:, None])
    tl.store(kv_ptr + dst, k.to(kv_ptr.dtype.element_ty), mask=h_ok[:, None])
    tl.store(kv_ptr + dst + PAGE * HEAD_DIM, v.to(kv_ptr.dtype.element_ty), mask=h_ok[:, None])


def _page_summaries_kernel(
    kv_ptr,
    slots_ptr,
    offsets_ptr,
    rows_ptr,
    min_ptr,
    max_ptr,
    sum_ptr,
    num_tokens,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t * num_kv_heads + h)
    next_t = tl.minimum(t + 1, num_tokens - 1)
    next_slot = tl.load(slots_ptr + next_t * num_kv_heads + h)
    if (t == num_tokens - 1) | (next_slot != slot):
        off = tl.load(offsets_ptr + t)
        p = tl.arange(0, PAGE)
        d = tl.arange(0, HEAD_DIM)
        ok = (p <= off)[:, None]
        keys = tl.load(
            kv_ptr + slot.to(tl.int64) * (2 * PAGE * HEAD_DIM) + p[:, None] * HEAD_DIM + d[None, :],
            mask=ok,
            other=0.0,
        ).to(tl.float32)
        row = tl.load(rows_ptr + t * num_kv_heads + h).to(tl.int64) * HEAD_DIM
        tl.store(
            min_ptr + row + d,
            tl.min(tl.where(ok, keys, float("inf")), 0).to(min_ptr.dtype.element_ty),
        )
        tl.store(
            max_ptr + row + d,
            tl.max(tl.where(ok, keys, float("-inf")), 0).to(max_ptr.dtype.element_ty),
        )
        tl.store(sum_ptr + row + d, tl.sum(keys, 0).to(sum_ptr.dtype.element_ty))


def _copy_pages_kernel(
    src_ptr,
    dst_ptr,
    src_slots_ptr,
    dst_slots_ptr,
    num_pages_ptr,
    PAGE_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    i = tl.program_id(0)
    if i < tl.load(num_pages_ptr):
        c = tl.program_id(1)
        s = tl.load(src_slots_ptr + i).to(tl.int64)
        t = tl.load(dst_slots_ptr + i).to(tl.int64)
        w = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(src_ptr + s * PAGE_WORDS + w)
        tl.store(dst_ptr + t * PAGE_WORDS + w, x)


append_kv_kernel = lazy_jit(_append_kv_kernel)
page_summaries_kernel = lazy_jit(_page_summaries_kernel)
copy_pages_kernel = lazy_jit(_copy_pages_kernel)


def append_kv_triton(
    kv_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    T, KV, D = k.shape
    if T == 0:
        return
    append_kv_kernel[(T,)](
        kv_pool,
        k,
        v,
        slots,
        offsets,
        KV,
        HEAD_DIM=D,
        PAGE=kv_pool.shape[2],
        BLOCK_KV=next_pow2(KV),
        num_warps=4,
    )


def page_summaries_triton(
    kv_pool: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    summary_rows: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    page_sum: torch.Tensor,
) -> None:
    T, KV = slots.shape
    if T == 0:
        return
    page_summaries_kernel[(T, KV)](
        kv_pool,
        slots,
        offsets,
        summary_rows,
        page_min,
        page_max,
        page_sum,
        T,
        KV,
        HEAD_DIM=kv_pool.shape[3],
        PAGE=kv_pool.shape[2],
        num_warps=4,
    )


def copy_pages_triton(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    num_pages: torch.Tensor,
) -> None:
    """dst_pool[dst_slots[i]] = src_pool[src_slots[i]] for i < num_pages[0] (one launch)."""
    capacity = src_slots.numel()
    page_words = src_pool[0].numel() * src_pool.element_size() // 4
    chunk = min(COPY_CHUNK_WORDS, page_words)
    if capacity == 0:
        return
    copy_pages_kernel[(capacity, page_words // chunk)](
        src_pool.view(torch.int32),
        dst_pool.view(torch.int32),
        src_slots,
        dst_slots,
        num_pages,
        PAGE_WORDS=page_words,
        CHUNK=chunk,
        num_warps=4,
    )
