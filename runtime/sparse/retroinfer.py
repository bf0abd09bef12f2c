"""RetroInfer-style: partitions are k-means clusters of keys per (layer, kv_head), laid out
page-aligned; select = whole clusters by estimated attention mass, within the budget.

Prefill (index_prefill, all L prompt keys of one layer):
  * regions, in positions: sinks [0, S) | clustered [S, C) | recent [C, L), where S = the sink
    pages' tokens and C = the page-aligned start of the local window (C >= S). Sinks and recent
    tokens keep the identity layout.
  * the clustered region is cut into segments of `segment_tokens` (page-aligned) and each
    segment runs k-means (L2, at most `kmeans_iters` Lloyd iterations, deterministic init on
    evenly spaced keys) with ~`cluster_pages` pages per cluster: bounded time per segment.
  * LAYOUT (page_aligned_order): within a segment each cluster keeps its floor(size / P) * P
    tokens nearest its centroid, contiguous, on pages of its own; the remainders (< P per
    cluster: its least typical tokens) are packed after them, sorted by cluster, and each such
    residual page is a partition of its own. So every partition is exactly a set of whole pages
    and no query-relevant core of a cluster shares a page with another cluster. Centroids are
    the mean of the keys on the partition's pages, so q.centroid = mean of q.k over it.
  * returns perm [KV, L] int64: layout position s of kv_head h holds token perm[h, s]; identity
    outside [S, C). THE RUNTIME MUST APPLY IT once, after this layer's prefill attention and
    before any decode reads the pages: for each h, the K/V at layout positions [0, L) become the
    K/V of tokens perm[h, :] (a gather within the request's own pages of (layer, h); page j keeps
    layout positions [jP, (j+1)P), the partial tail page stays last and keeps L % P tokens).
    Decode tokens are appended at layout position = token position, as for every algorithm.
  * full pages of the recent region are assigned to the nearest centroid (below).
Decode: a token lives in the local window (identity layout, static) until its page completes;
the complete page then joins the nearest cluster (L2 between its mean key and the centroid)
unless that cluster already owns `max_cluster_pages` pages, else it starts a new cluster.

Select: cluster logit = sm_scale * q.centroid + log(tokens in cluster) (estimated log attention
mass), max over the GQA group; clusters are taken greedily in descending order while they fit
the budget (fit_in_order); sinks, window and the tail page are static.

Index data per (request slot, kv_head): page -> cluster id [cap] int64, per-cluster key sum
[cap, D] float32 and page count [cap] int64 (cluster ids < pages, so page capacity bounds them),
the running key sum of the tail page [D] and the number of clusters.
"""

from __future__ import annotations

import torch

from .base import (
    PageBuffers,
    SparseAlgorithm,
    SparseParams,
    SparseState,
    group_max_scores,
    register_algorithm,
)
from .quest import page_reduce


def fit_in_order(
    pages: torch.Tensor,  # [B, KV, C] int64 pages of each cluster, in preference order
    live: torch.Tensor,  # [B, KV, C] bool, real clusters
    budget_pages: torch.Tensor,  # [B] int64
    rounds: int = 3,
) -> torch.Tensor:  # [B, KV, C] bool, clusters kept
    """Greedy knapsack in preference order, vectorised: each round keeps the longest prefix of
    the still-fitting clusters within the remaining budget, so a large cluster that does not fit
    no longer blocks the smaller ones after it (exact greedy needs one pass per cluster)."""
    keep = torch.zeros_like(live)
    left = budget_pages[:, None, None].expand(live.shape[:2] + (1,))
    for _ in range(rounds):
        cand = live & ~keep & (pages <= left)
        add = cand & ((pages * cand).cumsum(-1) <= left)
        keep |= add
        left = left - (pages * add).sum(-1, keepdim=True)
    return keep


class RetroState(SparseState):
    def __init__(self, buffers: PageBuffers, max_requests: int, head_dim: int) -> None:
        super().__init__(buffers)
        kv, dev = buffers.num_kv_heads, buffers.device
        self.tail_sum = torch.zeros(max_requests, kv, head_dim, device=dev)  # [R, KV, D] f32
        self.num_clusters = torch.zeros(max_requests, kv, dtype=torch.long, device=dev)  # [R, KV]


def _distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [KV, n, D], c [KV, C, D] -> [KV, n, C] squared L2 distances (up to |x|^2 per row)."""
    return (c * c).sum(-1)[:, None, :] - 2 * torch.bmm(x, c.transpose(1, 2))


def kmeans(x: torch.Tensor, num_clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [KV, n, D] float32 -> (labels [KV, n] int64, distance rank key [KV, n] float32);
    Lloyd iterations batched over kv heads, init on evenly spaced points, an empty cluster keeps
    its centroid."""
    KV, n, D = x.shape
    init = torch.linspace(0, n - 1, num_clusters, device=x.device).long()
    c = x[:, init].clone()  # [KV, C, D]
    for _ in range(iters):
        labels = _distances(x, c).argmin(-1)
        sums = torch.zeros_like(c).scatter_add_(1, labels[..., None].expand(-1, -1, D), x)
        ones = torch.ones_like(labels, dtype=x.dtype)
        cnt = torch.zeros(KV, num_clusters, device=x.device).scatter_add_(1, labels, ones)
        c = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1)[..., None], c)
    dist, labels = _distances(x, c).min(-1)
    return _relabel_by_principal_axis(c).gather(1, labels), dist


def _relabel_by_principal_axis(c: torch.Tensor) -> torch.Tensor:
    """c [KV, C, D] -> new label [KV, C]: clusters ranked by their centroid's projection on the
    centroids' first principal axis, so similar clusters get adjacent labels (their residual
    tokens then share pages, see page_aligned_order)."""
    centred = c - c.mean(1, keepdim=True)
    axis = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # [KV, D]
    proj = torch.einsum("kcd,kd->kc", centred, axis)
    return proj.argsort(dim=1).argsort(dim=1)


def page_aligned_order(
    labels: torch.Tensor, dist: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay a segment's tokens out page-aligned. labels, dist [KV, n] (n % P == 0).

    Each cluster keeps its floor(size / P) * P tokens nearest its centroid on pages of its own;
    the remainders (< P per cluster, the cluster's least typical tokens) follow, sorted by
    cluster (labels are ranked along the principal axis, so neighbours in key space are
    neighbours here), and every residual page is a partition of its own. Returns (order [KV, n]: layout
    position -> token index in the segment, partition key per page [KV, n / P] int64)."""
    KV, n = labels.shape
    num_c = int(labels.max()) + 1
    order = dist.argsort(dim=1)
    order = order.gather(1, labels.gather(1, order).sort(dim=1, stable=True).indices)
    lab_sorted = labels.gather(1, order)  # clusters contiguous, nearest first
    size = torch.zeros(KV, num_c, dtype=torch.long, device=labels.device)
    size.scatter_add_(1, labels, torch.ones_like(labels))
    first = size.cumsum(1) - size  # [KV, C] start of each cluster in the sorted order
    rank = torch.arange(n, device=labels.device)[None, :] - first.gather(1, lab_sorted)
    residual = rank >= (size // page_size * page_size).gather(1, lab_sorted)
    by_part = residual.long().sort(dim=1, stable=True).indices  # kept pages first
    order = order.gather(1, by_part)
    first_tok = torch.arange(0, n, page_size, device=labels.device)
    page_label = lab_sorted.gather(1, by_part)[:, first_tok]  # [KV, n / P]
    page_resid = residual.gather(1, by_part)[:, first_tok]
    page_index = torch.arange(n // page_size, device=labels.device)[None, :]
    return order, torch.where(page_resid, num_c + page_index, page_label)


class RetroInferAlgorithm(SparseAlgorithm):
    name = "retroinfer"

    def __init__(
        self,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        params: SparseParams | None = None,
        cluster_pages: int = 2,  # target mean pages per k-means cluster
        kmeans_iters: int = 8,  # Lloyd iterations per segment (bounded prefill time)
        segment_tokens: int = 8192,  # k-means runs per segment of this many tokens
        max_cluster_pages: int = 8,  # a decode page never joins a cluster this large
    ) -> None:
        super().__init__(page_size, num_kv_heads, head_dim, params)
        self.cluster_pages = cluster_pages
        self.kmeans_iters = kmeans_iters
        self.segment_tokens = max(page_size, segment_tokens // page_size * page_size)
        self.max_cluster_pages = max_cluster_pages

    def new_state(self, max_requests: int, device: torch.device | str) -> RetroState:
        buf = PageBuffers(max_requests, self.num_kv_heads, device)
        buf.add("page_cluster", (), torch.long, -1)  # [R, KV, cap] owning cluster, -1 = static
        buf.add("csum", (self.head_dim,), torch.float32, 0.0)  # [R, KV, cap, D] cluster key sum
        buf.add("cpages", (), torch.long, 0)  # [R, KV, cap] pages owned by cluster
        return RetroState(buf, max_requests, self.head_dim)

    def release(self, state: RetroState, req_slot: int) -> None:
        state.buffers.reset(req_slot)
        state.tail_sum[req_slot] = 0
        state.num_clusters[req_slot] = 0

    def _regions(self, seq_len: int) -> tuple[int, int, int]:
        """(S, C, L_full) in positions: sinks end, clustered region end, last full page end."""
        P = self.page_size
        full = seq_len // P * P
        sinks = min(-(-self.params.sink_tokens // P) * P, full)
        window_start = max(seq_len - self.params.window_tokens, 0) // P * P
        return sinks, max(sinks, min(window_start, full)), full

    def index_prefill(
        self, state: RetroState, req_slot: int, keys: torch.Tensor
    ) -> torch.Tensor | None:
        L, KV, _ = keys.shape
        P = self.page_size
        self.release(state, req_slot)
        state.buffers.ensure(-(-L // P))
        S, C, full = self._regions(L)
        perm = torch.arange(L, device=keys.device).repeat(KV, 1)  # [KV, L]
        for start in range(S, C, self.segment_tokens):
            end = min(C, start + self.segment_tokens)
            perm[:, start:end] = start + self._cluster_segment(state, req_slot, keys, start, end)
        page_sums = page_reduce(keys[C:full], P, "sum")  # [KV, m, D] recent full pages
        slot = torch.tensor([req_slot], device=keys.device)
        for i in range(page_sums.shape[1]):
            page = torch.tensor([C // P + i], device=keys.device)
            self._assign(state, slot, page, page_sums[None, :, i])
        state.tail_sum[req_slot] = keys[full:L].float().sum(0)
        return perm if C > S else None

    def _cluster_segment(
        self, state: RetroState, req_slot: int, keys: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """k-means one segment, write its pages' clusters; returns the segment's order [KV, n]."""
        P, buf = self.page_size, state.buffers
        x = keys[start:end].float().transpose(0, 1).contiguous()  # [KV, n, D]
        KV, n, D = x.shape
        labels, dist = kmeans(x, max(1, n // (P * self.cluster_pages)), self.kmeans_iters)
        order, part = page_aligned_order(labels, dist, P)  # [KV, n], [KV, pages]
        page_sums = x.gather(1, order[..., None].expand(-1, -1, D)).view(KV, n // P, P, D).sum(2)
        owned = torch.zeros(KV, int(part.max()) + 1, dtype=torch.long, device=x.device)
        owned.scatter_(1, part, 1)
        new_id = state.num_clusters[req_slot][:, None] + owned.cumsum(1) - 1  # [KV, parts]
        ids = new_id.gather(1, part)  # [KV, pages]
        buf["page_cluster"][req_slot, :, start // P : end // P] = ids
        buf["csum"][req_slot].scatter_add_(1, ids[..., None].expand(-1, -1, D), page_sums)
        buf["cpages"][req_slot].scatter_add_(1, ids, torch.ones_like(ids))
        state.num_clusters[req_slot] += owned.sum(1)
        return order

    def _assign(
        self,
        state: RetroState,
        slots: torch.Tensor,  # [A] int64, distinct request slots
        page: torch.Tensor,  # [A] int64, the completed page of each
        page_sum: torch.Tensor,  # [A, KV, D] float32 key sum of that page
    ) -> None:
        """Each completed page joins its nearest non-full cluster, else starts a new one."""
        buf, P = state.buffers, self.page_size
        heads = torch.arange(self.num_kv_heads, device=slots.device)[None, :]
        cpages, csum = buf["cpages"][slots], buf["csum"][slots]  # [A, KV, cap(, D)]
        nc = state.num_clusters[slots]  # [A, KV]
        cid = torch.arange(cpages.shape[-1], device=slots.device)
        usable = (cid < nc[..., None]) & (cpages < self.max_cluster_pages)
        cent = csum / (cpages * P).clamp(min=1)[..., None]
        dist = ((cent - page_sum[:, :, None] / P) ** 2).sum(-1).masked_fill(~usable, float("inf"))
        has = usable.any(-1)
        target = torch.where(has, dist.argmin(-1), nc)  # [A, KV]
        rows = slots[:, None]
        buf["csum"][rows, heads, target] += page_sum
        buf["cpages"][rows, heads, target] += 1
        buf["page_cluster"][rows, heads, page[:, None]] = target
        state.num_clusters[slots] += (~has).long()

    def index_decode(
        self,
        state: RetroState,
        req_slots: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        P = self.page_size
        slots, pos = req_slots.long(), positions.long()
        fresh = (pos % P == 0)[:, None, None]
        state.tail_sum[slots] = torch.where(fresh, keys.float(), state.tail_sum[slots] + keys)
        sink_pages = -(-self.params.sink_tokens // P)
        done = ((pos % P == P - 1) & (pos // P >= sink_pages)).nonzero().squeeze(1)
        if done.numel():
            state.buffers.ensure(int(pos.max()) // P + 1)
            self._assign(state, slots[done], pos[done] // P, state.tail_sum[slots[done]])

    def _dynamic_mask(
        self,
        state: RetroState,
        query: torch.Tensor,
        req_slots: torch.Tensor,
        seq_lens: torch.Tensor,
        budget_pages: torch.Tensor,
        static: torch.Tensor,
    ) -> torch.Tensor:
        B, N = static.shape
        Hq, KV, P = query.shape[1], self.num_kv_heads, self.page_size
        buf = state.buffers
        page_cluster = buf["page_cluster"][req_slots, :, :N]  # [B, KV, N]; ids < N
        cpages = buf["cpages"][req_slots, :, :N]  # [B, KV, N] indexed by cluster id
        cent = buf["csum"][req_slots, :, :N] / (cpages * P).clamp(min=1)[..., None]
        q = query.float().view(B, KV, Hq // KV, -1)
        logits = torch.einsum("bkgd,bknd->bkgn", q, cent) * self.sm_scale
        logits = logits + (cpages * P).clamp(min=1).float().log()[:, :, None, :]
        scores = group_max_scores(logits.reshape(B, Hq, N), cpages > 0)
        order = scores.argsort(dim=-1, descending=True)
        keep = fit_in_order(
            cpages.gather(-1, order), scores.gather(-1, order) > float("-inf"), budget_pages
        )
        chosen = torch.zeros_like(keep).scatter(-1, order, keep)  # [B, KV, N] by cluster id
        in_cluster = page_cluster >= 0
        picked = in_cluster & chosen.gather(-1, page_cluster.clamp(min=0))
        n_pages = (seq_lens + P - 1) // P
        unassigned = ~in_cluster & (torch.arange(N, device=static.device) < n_pages[:, None, None])
        return picked | unassigned


register_algorithm("retroinfer", RetroInferAlgorithm)
