"""Streaming (StreamingLLM-style attention sinks + local window): no index, static selection.

The token budget buys a longer window: a row keeps its sink pages and its last
(window_tokens + budget_tokens) // P + 1 pages, so at equal budget it attends to as many tokens as
the dynamic algorithms do."""

from __future__ import annotations

import torch

from .base import SparseAlgorithm, SparseState, register_algorithm


class StreamingAlgorithm(SparseAlgorithm):
    name = "streaming"
    capturable = True

    def page_quota(self, budget_tokens):
        """The budget lengthens the window: (sinks, (window + budget) // P + 1, 0 dynamic)."""
        P, p = self.page_size, self.params
        return -(-p.sink_tokens // P), (p.window_tokens + budget_tokens) // P + 1, 0 * budget_tokens

    def candidate_scores(self, state, query, cand):
        """No dynamic pages, no scores: one -inf buffer per step, shared by every layer."""
        return cand.per_step(
            "no_scores",
            None,
            lambda: torch.full(cand.page.shape, float("-inf"), device=query.device),
        )

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
