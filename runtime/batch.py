"""ForwardBatch: everything one model forward needs, built by the control plane.

A forward is either PREFILL (chunks of one or more requests' prompts, causal) or DECODE (one new
token per request). K/V of the batch's tokens are appended to their pages first; attention then
reads each request's pages through the CSR lists (plugins/reference.py describes the layout).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .hierarchy import HierarchicalKV


class ForwardMode(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class SparseDecode:
    """Inputs of page-sparse decode: the algorithm selects each row's pages per layer."""

    algorithm: str  # registry name (runtime/sparse), one per forward
    req_slots: torch.Tensor  # [B] int64, the requests' rows in the algorithm's index state
    seq_lens: torch.Tensor  # [B] int64, context length including the new token
    page_table: torch.Tensor  # [L, B, KV, N] int32, pool slot of logical page j (0 = padding)
    budget_tokens: torch.Tensor  # [B] int64, dynamic-page budget of each request
    # set: logical pages of sparse layers resolve through the HBM/host hierarchy
    # (runtime/hierarchy.py) instead of page_table (still read for the planner's dense layers);
    # req_slots are then also the page directory's rows
    hierarchy: HierarchicalKV | None = None
    # the budget every request of the batch has (None: they differ); graphs need one
    uniform_budget: int | None = None
    # set: the capturable path (runtime/sparse/static_select.py, CUDA graphs): every row has at
    # most max_pages pages, budget = uniform_budget; padding rows have req_slots -1, seq_lens 1
    max_pages: int | None = None


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, tokens of all requests concatenated
    positions: torch.Tensor  # [T] int64, position of each token in its request
    append_slots: torch.Tensor  # [L, T, KV] int32, pool slot receiving token t of layer l, head h
    append_offsets: torch.Tensor  # [T] int32, position % page_size
    qo_indptr: torch.Tensor  # [B + 1] int32, request b owns tokens qo_indptr[b]:qo_indptr[b+1]
    kv_indptr: torch.Tensor  # [B * KV + 1] int32, CSR rows r = b * KV + h (same for all layers)
    kv_slots: torch.Tensor  # [L, nnz] int32, pool slots of each row's pages, per layer
    kv_last_page_len: torch.Tensor  # [B * KV] int32, valid tokens in each row's last page
    logits_indices: torch.Tensor  # [N] int64, tokens whose logits are returned
    sparse: SparseDecode | None = None  # DECODE only: select pages instead of reading all

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def batch_size(self) -> int:
        return self.qo_indptr.numel() - 1
