"""Streaming (StreamingLLM-style attention sinks + local window): no index, static selection.

The token budget buys a longer window: a row keeps its sink pages and the pages holding its last
window_tokens + budget_tokens tokens, so at equal budget it attends to as many tokens as the
dynamic algorithms do."""

from __future__ import annotations

import torch

from .base import SparseAlgorithm, SparseState, register_algorithm, static_page_mask


class StreamingAlgorithm(SparseAlgorithm):
    name = "streaming"

    def static_mask(self, seq_lens: torch.Tensor, budget_tokens: torch.Tensor, n: int):
        p, P = self.params, self.page_size
        page = torch.arange(n, device=seq_lens.device)[None, :]
        window = (p.window_tokens + budget_tokens)[:, None]  # [B, 1] tokens
        first_window = (seq_lens[:, None] - window).clamp(min=0) // P
        base = static_page_mask(seq_lens, P, n, p.sink_tokens, p.window_tokens)
        n_pages = ((seq_lens + P - 1) // P)[:, None]
        return base | ((page >= first_window) & (page < n_pages))

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
        return torch.zeros(B, self.num_kv_heads, N, dtype=torch.bool, device=static.device)


register_algorithm("streaming", StreamingAlgorithm)
