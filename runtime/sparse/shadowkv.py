"""ShadowKV-style: chunk = page of 8 tokens, landmark = mean post-RoPE key of the chunk, select
= top-k chunks by q.landmark, plus static pages: sinks, local window and OUTLIER chunks.

GQA, as ShadowKV's reference ranks chunks: each query head's scores become a softmax over the
row's candidate chunks, and a kv_head's chunk ranks by the max of its group's probabilities. Raw
logits of different heads have different scales: a max over them lets a head with large logits
everywhere take the whole budget from a head that points sharply at one chunk (the induction
heads that copy a passkey). Measured on SmolLM2 at 8K, budget 1024 (perf/eval_recall.py): needle
attention kept 0.81 -> 0.88, mean key-digit NLL 0.88 -> 0.39 (dense 0.07).

Outliers are found once, at prefill: the full chunks whose keys are worst summarised by their
landmark (lowest min-over-tokens cosine similarity between a key and its chunk mean), up to
`outlier_tokens` per (request, kv_head), never sink chunks. They are kept every step and are
paid from the row's token budget, so every algorithm attends to the same number of tokens at a
given budget (a row whose budget cannot pay them drops them). The original's low-rank key
compression is not implemented: the runtime keeps full K/V pages.

Index data per (request slot, kv_head, page): key sum float32 [D] (landmark = sum / tokens in
page) and an outlier flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (
    NEG_INF,
    PageBuffers,
    SparseAlgorithm,
    SparseParams,
    SparseState,
    decode_page_index,
    register_algorithm,
    topk_page_mask,
    valid_page_mask,
)
from .quest import page_reduce


def group_max_probs(
    scores: torch.Tensor,  # [B, Hq, N] float32 logits of each query head per chunk
    eligible: torch.Tensor,  # [B, KV, N] bool, chunks that may be chosen
) -> torch.Tensor:  # [B, KV, N] float32, -inf where not eligible
    """Per query head softmax over its row's eligible chunks, then the max over each GQA group."""
    B, Hq, N = scores.shape
    KV = eligible.shape[1]
    s = scores.view(B, KV, Hq // KV, N).masked_fill(~eligible[:, :, None], NEG_INF)
    probs = s.softmax(-1).nan_to_num(0.0)  # a row with no eligible chunk: all zeros
    return probs.amax(2).masked_fill(~eligible, NEG_INF)


def chunk_outlier_scores(keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """keys [L, KV, D] -> [KV, L // P] float32: 1 - min cosine(key, chunk mean), full chunks."""
    L, KV, D = keys.shape
    n = L // page_size
    k = keys[: n * page_size].float().view(n, page_size, KV, D)
    mean = k.mean(1, keepdim=True)
    cos = F.cosine_similarity(k, mean.expand_as(k), dim=-1)  # [n, P, KV]
    return (1 - cos.amin(1)).transpose(0, 1)


class ShadowKVAlgorithm(SparseAlgorithm):
    name = "shadowkv"
    required_page_size = 8

    def __init__(
        self,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        params: SparseParams | None = None,
        outlier_tokens: int = 64,  # static outlier chunks per (request, kv_head), in tokens
    ) -> None:
        super().__init__(page_size, num_kv_heads, head_dim, params)
        self.outlier_pages = outlier_tokens // page_size

    def new_state(self, max_requests: int, device: torch.device | str) -> SparseState:
        buf = PageBuffers(max_requests, self.num_kv_heads, device)
        buf.add("ksum", (self.head_dim,), torch.float32, 0.0)  # [R, KV, cap, D] key sums
        buf.add("outlier", (), torch.bool, False)  # [R, KV, cap] static outlier chunk
        return SparseState(buf)

    def index_prefill(self, state: SparseState, req_slot: int, keys: torch.Tensor) -> None:
        buf, P = state.buffers, self.page_size
        ksum = page_reduce(keys, P, "sum")  # [KV, n, D]
        n = ksum.shape[1]
        buf.ensure(n)
        buf["ksum"][req_slot, :, :n] = ksum
        buf["outlier"][req_slot] = False
        scores = chunk_outlier_scores(keys, P)  # [KV, n_full]
        sink_pages = -(-self.params.sink_tokens // P)
        scores[:, :sink_pages] = float("-inf")
        k = min(self.outlier_pages, max(scores.shape[1] - sink_pages, 0))
        if k > 0:
            idx = scores.topk(k, dim=-1).indices  # [KV, k]
            buf["outlier"][req_slot].scatter_(-1, idx, True)
        return None

    def index_decode(
        self,
        state: SparseState,
        req_slots: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        buf = state.buffers
        idx, fresh = decode_page_index(buf, req_slots, positions, self.page_size)
        k = keys.float()
        buf["ksum"][idx] = torch.where(fresh, k, buf["ksum"][idx] + k)
        buf["outlier"][idx] = False

    def landmarks(
        self, state: SparseState, req_slots: torch.Tensor, seq_lens: torch.Tensor, n: int
    ) -> torch.Tensor:
        """[B, KV, N, D] float32 mean key per chunk (the partial tail over its valid tokens)."""
        P = self.page_size
        page = torch.arange(n, device=seq_lens.device)[None, :]
        count = (seq_lens[:, None] - page * P).clamp(min=1, max=P)  # [B, N]
        return state.buffers["ksum"][req_slots, :, :n] / count[:, None, :, None]

    def _dynamic_mask(
        self,
        state: SparseState,
        query: torch.Tensor,
        req_slots: torch.Tensor,
        seq_lens: torch.Tensor,
        budget_pages: torch.Tensor,
        static: torch.Tensor,
    ) -> torch.Tensor:
        B, N = static.shape
        Hq, KV = query.shape[1], self.num_kv_heads
        valid = valid_page_mask(seq_lens, self.page_size, N)[:, None, :]  # [B, 1, N]
        outlier = state.buffers["outlier"][req_slots, :, :N] & valid & ~static[:, None, :]
        outlier = outlier & (outlier.sum(-1, keepdim=True) <= budget_pages[:, None, None])
        k = budget_pages[:, None] - outlier.sum(-1)  # [B, KV], outliers paid from the budget
        eligible = valid & ~static[:, None, :] & ~outlier
        lm = self.landmarks(state, req_slots, seq_lens, N)
        q = query.float().view(B, KV, Hq // KV, -1)
        scores = torch.einsum("bkgd,bknd->bkgn", q, lm).reshape(B, Hq, N) * self.sm_scale
        top = topk_page_mask(group_max_probs(scores, eligible.expand(B, KV, N)), k)
        return top | outlier


register_algorithm("shadowkv", ShadowKVAlgorithm)
