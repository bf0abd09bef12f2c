"""Fused residency step of the KV hierarchy: one program per selection row (request, kv head) of
one layer does what runtime/hierarchy.py's torch composition does in ~100 small kernels:

  lookup  page -> level-1 directory -> level-2 entry -> HBM slot (-1 = miss)
  touch   hits take the current LRU epoch (age 0: never a victim)
  victims among the row's owned slots: the `need` oldest (age descending, column ascending), found
          by bisection on the age cutoff (8 counting passes), compacted in column order
  assign  the j-th miss takes the j-th victim; install: the victim's old entry is cleared, the
          missed page's entry and the victim's reverse entry are set; the victim is touched
  count   lookups / hits / fetched / short into `stats`, lookups / hits of the row's request
          into `row_stats` (atomics: a request's kv heads share its row)
  output  HBM slot per selected page (dummy 0 for misses left without a victim) and one slot of
          the compact (host slot, HBM slot) gather list per installed miss (atomic offsets), read
          afterwards by copy_pages (gather_pages) with the device-side count.
Rows are independent: a row's owned slots, its page entries and the pages its victims held all
belong to that row (the control plane's ownership invariant), so programs never race.
Exact same victims and installs as the torch path (runtime.hierarchy with fused=False), which is
its reference in the tests.
"""

from __future__ import annotations

import torch

from ._triton_util import lazy_jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

NUM_AGES = tl.constexpr(256) if tl is not None else 256  # uint8 LRU epochs (a kernel constant)


def _resolve_kernel(
    indptr_ptr,  # [R + 1] int32 selection CSR
    page_ids_ptr,  # [cap] int32 logical pages
    req_ptr,  # [B] int64 directory row per request, -1 = padding
    dir_ptr,  # [max_requests, max_segments] int32
    meta_ptr,  # [spare + 1] int32 flat metadata (mutated)
    host_l2_ptr,  # [num_segments * S * LH] int32 host slot per entry
    row_slots_ptr,  # [max_requests, LH, W] int32 owned HBM slots per row
    epoch_ptr,  # [num_hbm_slots] uint8 LRU epochs (mutated)
    current_ptr,  # [1] uint8 current epoch
    out_ptr,  # [cap] int32 HBM slot per selected page (zero-initialised)
    scratch_ptr,  # [R, K_BLOCK] int32 victims of each row, column order
    gather_host_ptr,  # [R * K] int32 compact host slots of installed misses
    gather_hbm_ptr,  # [R * K] int32 their victim slots
    count_ptr,  # [1] int32 installed misses (zero-initialised; atomic)
    stats_ptr,  # [>= 4] int64 lookups, hits, fetched, short (accumulated)
    row_stats_ptr,  # [max_requests, 2] int64 lookups, hits per directory row (accumulated)
    layer,
    num_kv_heads,
    max_segments,
    l2_offset,
    rev_offset,
    num_layer_heads,
    row_width,
    max_victims,
    S: tl.constexpr,
    K_BLOCK: tl.constexpr,
    W_BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    req = tl.load(req_ptr + r // num_kv_heads).to(tl.int64)
    lh = layer * num_kv_heads + r % num_kv_heads
    start = tl.load(indptr_ptr + r)
    count = tl.load(indptr_ptr + r + 1) - start
    j = tl.arange(0, K_BLOCK)
    in_row = j < count
    valid = in_row & (req >= 0)
    page = tl.load(page_ids_ptr + start + j, mask=valid, other=0).to(tl.int64)
    seg = tl.load(dir_ptr + req * max_segments + page // S, mask=valid, other=-1).to(tl.int64)
    valid = valid & (seg >= 0)
    entry = l2_offset + (seg * S + page % S) * num_layer_heads + lh
    slot = tl.load(meta_ptr + entry, mask=valid, other=-1)
    hit = valid & (slot >= 0)
    miss = valid & (slot < 0)
    cur = tl.load(current_ptr)
    cur_k = tl.full([K_BLOCK], 0, tl.uint8) + cur
    tl.store(epoch_ptr + slot, cur_k, mask=hit)
    tl.debug_barrier()  # the hits' new epochs are visible to the whole program below
    c = tl.arange(0, W_BLOCK)
    own_ok = (c < row_width) & (req >= 0)
    own = tl.load(row_slots_ptr + (req * num_layer_heads + lh) * row_width + c, own_ok, other=-1)
    ep = tl.load(epoch_ptr + own, mask=own >= 0, other=0)
    age = (cur.to(tl.int32) - ep.to(tl.int32)) & (NUM_AGES - 1)
    age = tl.where(own >= 0, age, 0)  # padding: age 0, never a victim
    n_miss = tl.sum(miss.to(tl.int32), 0)
    eligible = tl.sum((age > 0).to(tl.int32), 0)
    need = tl.minimum(tl.minimum(n_miss, eligible), max_victims)
    # cutoff = the largest age a in 1..255 with #(age >= a) >= need (bisection, 8 passes)
    lo = tl.zeros_like(n_miss) + 1
    hi = tl.zeros_like(n_miss) + (NUM_AGES - 1)
    for _ in tl.static_range(8):
        mid = (lo + hi + 1) // 2
        ok_mid = tl.sum((age >= mid).to(tl.int32), 0) >= need
        lo = tl.where(ok_mid, mid, lo)
        hi = tl.where(ok_mid, hi, mid - 1)
    cutoff = lo
    above = tl.sum((age > cutoff).to(tl.int32), 0)
    take = need - above
    in_cut = (age == cutoff).to(tl.int32)
    victim = (age > cutoff) | ((in_cut != 0) & (tl.cumsum(in_cut, 0) <= take))
    rank = tl.cumsum(victim.to(tl.int32), 0) - 1
    tl.store(scratch_ptr + r * K_BLOCK + rank, own, mask=victim & (rank < K_BLOCK))
    tl.debug_barrier()  # the victim list is visible to every miss below
    mrank = tl.cumsum(miss.to(tl.int32), 0) - 1
    ok = miss & (mrank < need)
    dest = tl.load(scratch_ptr + r * K_BLOCK + mrank, mask=ok, other=-1)
    old = tl.load(meta_ptr + rev_offset + dest, mask=ok, other=-1)
    tl.store(meta_ptr + old, tl.full([K_BLOCK], -1, tl.int32), mask=ok & (old >= 0))
    tl.store(meta_ptr + entry, dest, mask=ok)
    tl.store(meta_ptr + rev_offset + dest, entry.to(tl.int32), mask=ok)
    tl.store(epoch_ptr + dest, cur_k, mask=ok)
    final = tl.where(hit, slot, tl.where(ok, dest, 0))
    tl.store(out_ptr + start + j, final, mask=in_row)
    n_ok = tl.sum(ok.to(tl.int32), 0)
    base = tl.atomic_add(count_ptr, n_ok)
    pos = base + tl.cumsum(ok.to(tl.int32), 0) - 1
    host = tl.load(host_l2_ptr + entry - l2_offset, mask=ok, other=0)
    tl.store(gather_host_ptr + pos, host, mask=ok)
    tl.store(gather_hbm_ptr + pos, dest, mask=ok)
    tl.atomic_add(stats_ptr, tl.sum(valid.to(tl.int64), 0))
    tl.atomic_add(stats_ptr + 1, tl.sum(hit.to(tl.int64), 0))
    tl.atomic_add(stats_ptr + 2, n_ok.to(tl.int64))
    tl.atomic_add(stats_ptr + 3, (n_miss - n_ok).to(tl.int64))
    # per directory row: the heads of one request add into the same row (padding: adds nothing)
    row = tl.maximum(req, 0) * 2
    tl.atomic_add(row_stats_ptr + row, tl.sum(valid.to(tl.int64), 0), mask=req >= 0)
    tl.atomic_add(row_stats_ptr + row + 1, tl.sum(hit.to(tl.int64), 0), mask=req >= 0)


resolve_kernel = lazy_jit(_resolve_kernel)


def resolve_pages_triton(
    kv_indptr, page_ids, req_slots, directory, meta, host_l2, row_slots, epoch, current,
    out_slots, gather_host, gather_hbm, gather_count, stats, row_stats,
    layer: int, num_kv_heads: int, l2_offset: int, rev_offset: int, segment_pages: int,
    max_victims: int,
) -> None:  # fmt: skip
    rows = kv_indptr.numel() - 1
    if rows == 0:
        return
    k_block = max(16, next_pow2(max_victims))
    w_block = max(16, next_pow2(row_slots.shape[-1]))
    scratch = torch.empty(rows * k_block, dtype=torch.int32, device=meta.device)
    resolve_kernel[(rows,)](
        kv_indptr, page_ids, req_slots, directory, meta, host_l2, row_slots, epoch, current,
        out_slots, scratch, gather_host, gather_hbm, gather_count, stats, row_stats,
        layer, num_kv_heads, directory.shape[1], l2_offset, rev_offset, row_slots.shape[1],
        row_slots.shape[2], max_victims,
        S=segment_pages, K_BLOCK=k_block, W_BLOCK=w_block, num_warps=4,
    )  # fmt: skip
