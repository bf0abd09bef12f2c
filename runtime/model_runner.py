"""ModelRunner: owns the model weights, the KV page pool and the sparse planners on one device,
and runs ForwardBatches."""

from __future__ import annotations

import torch

from spinserve.configs.model import ModelConfig

from .batch import ForwardBatch
from .cuda_graph import DecodeGraphRunner
from .model import LlamaModel
from .sparse import SparseParams, create_algorithm
from .sparse.planner import SparsePlanner

DENSE = "dense"


def kv_bytes_per_slot(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    return 2 * page_size * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        page_size: int,
        num_slots: int,
        max_requests: int,
        sparse_params: SparseParams,
    ) -> None:
        self.cfg = cfg
        self.model = LlamaModel(cfg, weights)
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.page_size = page_size
        self.max_requests = max_requests
        self.sparse_params = sparse_params
        # [num_slots, 2, P, head_dim], one page of one (layer, kv_head) per slot; slot 0 = dummy
        self.kv_pool = torch.zeros(
            num_slots, 2, page_size, cfg.head_dim, dtype=self.dtype, device=self.device
        )
        self._planners: dict[str, SparsePlanner] = {}
        self.graphs: DecodeGraphRunner | None = None

    def planner(self, algorithm: str) -> SparsePlanner:
        """The planner of a sparse algorithm, created on first use (ValueError: unknown name or
        a page size the algorithm cannot use)."""
        if algorithm not in self._planners:
            algo = create_algorithm(
                algorithm,
                self.page_size,
                self.cfg.num_kv_heads,
                self.cfg.head_dim,
                self.sparse_params,
            )
            self._planners[algorithm] = SparsePlanner(
                algo, self.cfg.num_layers, self.max_requests, self.device
            )
        return self._planners[algorithm]

    @torch.inference_mode()
    def index_prefill(
        self, algorithm: str, req_slot: int, page_table: torch.Tensor, seq_len: int
    ) -> None:
        """End of a request's prefill: build its index (page_table [L, KV, n] int32 slots)."""
        planner = self.planner(algorithm)
        planner.release(req_slot)
        planner.index_prefill(self.kv_pool, req_slot, page_table, seq_len)

    @torch.inference_mode()
    def release(self, algorithm: str, req_slot: int) -> None:
        # index buffers may have been (re)allocated inside the model's inference mode
        if algorithm in self._planners:
            self._planners[algorithm].release(req_slot)

    def capture_decode_graphs(self, max_batch: int, max_context: int) -> None:
        """Capture dense decode graphs for batches up to max_batch and contexts up to
        max_context tokens (CUDA only)."""
        max_pages = -(-max_context // self.page_size)
        self.graphs = DecodeGraphRunner(
            self._eager_forward,
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            max_batch,
            max_pages,
            self.device,
        )
        self.graphs.capture()

    def _eager_forward(self, batch: ForwardBatch) -> torch.Tensor:
        planner = self.planner(batch.sparse.algorithm) if batch.sparse is not None else None
        return self.model.forward(batch, self.kv_pool, planner)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self._eager_forward(batch)
