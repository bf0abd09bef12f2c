"""Dense: every page of the request (the reference every sparse algorithm must reproduce when
its budget covers the context)."""

from __future__ import annotations

import torch

from .base import SparseAlgorithm, SparseState, register_algorithm


class DenseAlgorithm(SparseAlgorithm):
    name = "dense"

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
        return torch.ones(B, self.num_kv_heads, N, dtype=torch.bool, device=static.device)


register_algorithm("dense", DenseAlgorithm)
