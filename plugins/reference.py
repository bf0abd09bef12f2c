"""Pure-torch references for the paged-KV ops (the contract every Triton kernel must meet).

KV layout (DESIGN.md "The KV substrate"): one pool of pages shared by every layer,
`kv_pool[slot] = [2, P, head_dim]` (0 = K, 1 = V) holding P tokens of ONE (layer, kv_head).
A request's pages for one kv_head form a row of a CSR structure:
    row r = b * num_kv_heads + h            (b = request in the batch, h = kv head)
    kv_slots[kv_indptr[r] : kv_indptr[r + 1]]  pool slots in token order
    kv_last_page_len[r]                       valid tokens in the row's LAST page (1..P);
                                              every other listed page is full.
Dense attention lists all of a request's pages; sparse attention lists the selected ones with
the partial tail page last. All math runs in float32; outputs take q's dtype.
"""

from __future__ import annotations

import torch


def append_kv_ref(
    kv_pool: torch.Tensor,  # [S, 2, P, D]
    k: torch.Tensor,  # [T, KV, D]
    v: torch.Tensor,  # [T, KV, D]
    slots: torch.Tensor,  # [T, KV] int32: pool slot of the page holding token t for kv head h
    offsets: torch.Tensor,  # [T] int32: token position within its page (position % P)
) -> None:
    """Write new tokens' K/V into their pages (in place)."""
    slots_l = slots.long()
    offs = offsets.long()[:, None].expand_as(slots_l)
    kv_pool[slots_l, 0, offs] = k.to(kv_pool.dtype)
    kv_pool[slots_l, 1, offs] = v.to(kv_pool.dtype)


def _gather_rows(
    kv_pool: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    rows: torch.Tensor,  # [R] int64 row ids to gather
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad the rows' pages to the longest: K, V [R, N*P, D] float32 and a valid mask [R, N*P]."""
    P, D = kv_pool.shape[2], kv_pool.shape[3]
    indptr = kv_indptr.long()
    starts, ends = indptr[rows], indptr[rows + 1]
    num_pages = ends - starts  # [R]
    max_pages = int(num_pages.max()) if rows.numel() else 0
    page_idx = torch.arange(max_pages, device=kv_pool.device)
    has_page = page_idx[None, :] < num_pages[:, None]  # [R, N]
    flat = (starts[:, None] + page_idx[None, :]).clamp(max=max(kv_slots.numel() - 1, 0))
    slot = torch.where(has_page, kv_slots.long()[flat], torch.zeros_like(flat))
    pages = kv_pool[slot].float()  # [R, N, 2, P, D]
    num_tokens = (num_pages - 1) * P + kv_last_page_len.long()[rows]  # [R]
    valid = torch.arange(max_pages * P, device=kv_pool.device)[None, :] < num_tokens[:, None]
    k = pages[:, :, 0].reshape(len(rows), max_pages * P, D)
    v = pages[:, :, 1].reshape(len(rows), max_pages * P, D)
    return k, v, valid


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    kv_pool: torch.Tensor,  # [S, 2, P, D]
    kv_indptr: torch.Tensor,  # [B * KV + 1] int32
    kv_slots: torch.Tensor,  # [nnz] int32
    kv_last_page_len: torch.Tensor,  # [B * KV] int32
    sm_scale: float,
) -> torch.Tensor:  # [B, Hq, D], q.dtype
    """One query token per request attends to every token its rows list (no mask needed)."""
    B, Hq, D = q.shape
    num_kv_heads = (kv_indptr.numel() - 1) // B
    group = Hq // num_kv_heads
    rows = torch.arange(B * num_kv_heads, device=q.device)
    k, v, valid = _gather_rows(kv_pool, kv_indptr, kv_slots, kv_last_page_len, rows)
    qg = q.float().reshape(B * num_kv_heads, group, D)  # rows match (b, h) order
    scores = torch.einsum("rgd,rnd->rgn", qg, k) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out = torch.einsum("rgn,rnd->rgd", scores.softmax(-1), v)
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]: the chunk tokens of B requests, concatenated
    kv_pool: torch.Tensor,  # [S, 2, P, D]: the chunk's own K/V already appended
    qo_indptr: torch.Tensor,  # [B + 1] int32: request b's queries are q[qo_indptr[b]:qo_indptr[b+1]]
    kv_indptr: torch.Tensor,  # [B * KV + 1] int32
    kv_slots: torch.Tensor,  # [nnz] int32
    kv_last_page_len: torch.Tensor,  # [B * KV] int32
    sm_scale: float,
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Causal attention of a chunk to its request's pages: query i of request b sits at position
    kv_len(b) - q_len(b) + i and sees tokens at positions <= its own."""
    T, Hq, D = q.shape
    B = qo_indptr.numel() - 1
    num_kv_heads = (kv_indptr.numel() - 1) // B
    group = Hq // num_kv_heads
    P = kv_pool.shape[2]
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    qo = qo_indptr.tolist()
    for b in range(B):
        q_len = qo[b + 1] - qo[b]
        if q_len == 0:
            continue
        rows = torch.arange(b * num_kv_heads, (b + 1) * num_kv_heads, device=q.device)
        k, v, valid = _gather_rows(kv_pool, kv_indptr, kv_slots, kv_last_page_len, rows)
        num_pages = (kv_indptr[rows + 1] - kv_indptr[rows]).long()
        kv_len = (num_pages - 1) * P + kv_last_page_len[rows].long()  # [KV]
        q_pos = (kv_len[:, None] - q_len) + torch.arange(q_len, device=q.device)[None, :]
        k_pos = torch.arange(k.shape[1], device=q.device)
        mask = valid[:, None, :] & (k_pos[None, None, :] <= q_pos[:, :, None])  # [KV, q_len, N]
        qb = q[qo[b] : qo[b + 1]].float().reshape(q_len, num_kv_heads, group, D)
        scores = torch.einsum("tkgd,knd->ktgn", qb, k) * sm_scale
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        ob = torch.einsum("ktgn,knd->tkgd", scores.softmax(-1), v)
        out[qo[b] : qo[b + 1]] = ob.reshape(q_len, Hq, D).to(q.dtype)
    return out


def page_summaries_ref(
    kv_pool: torch.Tensor,  # [S, 2, P, D]: the new tokens already appended
    slots: torch.Tensor,  # [T, KV] int32: as for append_kv
    offsets: torch.Tensor,  # [T] int32: as for append_kv
    summary_rows: torch.Tensor,  # [T, KV] int32: summary-table row of the page of (t, h)
    page_min: torch.Tensor,  # [N, D] float32: per-channel min of the page's valid keys
    page_max: torch.Tensor,  # [N, D] float32: per-channel max
    page_sum: torch.Tensor,  # [N, D] float32: per-channel sum (mean = sum / valid tokens)
) -> None:
    """Recompute the summaries of every page touched by the new tokens, over the page's valid
    tokens 0..offset of its last new token (in place). Full and partial pages alike."""
    T = slots.shape[0]
    for t in range(T):
        for h in range(slots.shape[1]):
            slot = int(slots[t, h])
            if t + 1 < T and int(slots[t + 1, h]) == slot:
                continue  # not the page's last new token
            keys = kv_pool[slot, 0, : int(offsets[t]) + 1].float()
            row = int(summary_rows[t, h])
            page_min[row] = keys.amin(0).to(page_min.dtype)
            page_max[row] = keys.amax(0).to(page_max.dtype)
            page_sum[row] = keys.sum(0).to(page_sum.dtype)


def score_pages_ref(
    q: torch.Tensor,  # [B, Hq, D]
    page_indptr: torch.Tensor,  # [B * KV + 1] int32: CSR rows as for attention
    page_rows: torch.Tensor,  # [nnz] int32: summary-table row of each listed page
    last_page_len: torch.Tensor,  # [B * KV] int32: valid tokens of each row's last page
    page_min: torch.Tensor,  # [N, D] float32
    page_max: torch.Tensor,  # [N, D] float32
    page_sum: torch.Tensor,  # [N, D] float32
    page_size: int,
    mode: int,  # 0 = Quest upper bound, 1 = landmark (mean key) dot product
) -> torch.Tensor:  # [nnz] float32: max over the row's GQA group of the per-head score
    B, Hq, D = q.shape
    R = page_indptr.numel() - 1
    group = Hq // (R // B)
    qg = q.float().reshape(R, group, D)
    out = torch.empty(page_rows.numel(), dtype=torch.float32, device=q.device)
    ip = page_indptr.tolist()
    for r in range(R):
        rows = page_rows[ip[r] : ip[r + 1]].long()
        if mode == 0:
            mn, mx = page_min[rows].float(), page_max[rows].float()  # [n, D]
            s = torch.maximum(qg[r][:, None] * mn[None], qg[r][:, None] * mx[None]).sum(-1)
        else:
            count = torch.full((len(rows),), float(page_size), device=q.device)
            count[-1:] = float(last_page_len[r])
            s = qg[r] @ (page_sum[rows].float() / count[:, None]).T  # [G, n]
        out[ip[r] : ip[r + 1]] = s.amax(0)
    return out


def fold_score_pages_ref(
    q: torch.Tensor,  # [B, Hq, D]
    page_indptr: torch.Tensor,  # [B * KV + 1] int32
    page_rows: torch.Tensor,  # [nnz] int32
    last_page_len: torch.Tensor,  # [B * KV] int32
    page_min: torch.Tensor,  # [N, D]: updated in place
    page_max: torch.Tensor,  # [N, D]: updated in place
    page_size: int,
    keys: torch.Tensor,  # [B, KV, D] one new key per row
    fresh: torch.Tensor,  # [B] bool: the key opens its page (min / max restart from it)
) -> torch.Tensor:  # [nnz] float32: Quest scores after the fold
    """Fold row r's key into the min / max of its LAST listed page (the tail page the key was
    appended to), then score_pages_ref in Quest mode. Rows listing no page fold nothing."""
    B, KV, D = keys.shape
    has = (page_indptr[1:] - page_indptr[:-1]) > 0  # [R]
    if page_rows.numel():
        tail = page_rows[(page_indptr[1:].long() - 1).clamp(min=0)].long()[has]
        k = keys.reshape(B * KV, D)[has].to(page_min.dtype)
        new = fresh.bool().repeat_interleave(KV)[has][:, None]
        page_min[tail] = torch.where(new, k, torch.minimum(page_min[tail], k))
        page_max[tail] = torch.where(new, k, torch.maximum(page_max[tail], k))
    args = (q, page_indptr, page_rows, last_page_len, page_min, page_max, page_min)
    return score_pages_ref(*args, page_size, 0)


def select_pages_ref(
    scores: torch.Tensor,  # [nnz] float32: from score_pages
    page_indptr: torch.Tensor,  # [R + 1] int32
    num_sink_pages: int,
    num_window_pages: int,
    budget_pages: int,
) -> list[list[int]]:
    """Per row: absolute positions of the selected pages, ascending: the first num_sink_pages
    and last num_window_pages always, plus the budget_pages best-scored others."""
    ip = page_indptr.tolist()
    out = []
    for r in range(len(ip) - 1):
        n = ip[r + 1] - ip[r]
        static = {j for j in range(n) if j < num_sink_pages or j >= n - num_window_pages}
        rest = sorted(
            (j for j in range(n) if j not in static), key=lambda j: -float(scores[ip[r] + j])
        )
        chosen = sorted(static | set(rest[:budget_pages]))
        out.append([ip[r] + j for j in chosen])
    return out


def copy_pages_ref(
    src_pool: torch.Tensor,  # [S_src, 2, P, D]
    dst_pool: torch.Tensor,  # [S_dst, 2, P, D]
    src_slots: torch.Tensor,  # [capacity] int32
    dst_slots: torch.Tensor,  # [capacity] int32
    num_pages: torch.Tensor,  # [1] int32: pages to copy this time (<= capacity)
) -> None:
    """dst_pool[dst_slots[i]] = src_pool[src_slots[i]] for i < num_pages (gather: host -> HBM;
    scatter: HBM -> host)."""
    n = int(num_pages.reshape(-1)[0])
    src = src_slots[:n].long().to(src_pool.device)
    dst = dst_slots[:n].long().to(dst_pool.device)
    dst_pool[dst] = src_pool[src].to(dst_pool.device)
