"""ModelRunner: owns the model weights, the KV page pool and the sparse planners on one device,
and runs ForwardBatches."""

from __future__ import annotations

import torch

from spinserve.configs.model import ModelConfig

from .batch import ForwardBatch
from .cuda_graph import DecodeGraphRunner, SparseGraphSpec
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
        self.graph_runners: list[DecodeGraphRunner] = []  # dense and/or sparse decode graphs

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
                index_dtype=self.dtype,
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

    def capture_decode_graphs(
        self, max_batch: int, max_context: int, sparse: SparseGraphSpec | None = None
    ) -> None:
        """Capture decode graphs for batches up to max_batch and contexts up to max_context
        tokens (CUDA only): dense ones, or with `sparse` those of one capturable algorithm
        (its index is reserved for max_context first; it never reallocates afterwards)."""
        runner = self._graph_runner(max_batch, max_context, sparse, replay=True)
        runner.capture()

    def _graph_runner(self, max_batch, max_context, sparse, replay: bool) -> DecodeGraphRunner:
        max_pages = -(-max_context // self.page_size)
        if sparse is not None:
            planner = self.planner(sparse.algorithm)
            if not planner.capturable:
                raise ValueError(f"sparse algorithm {sparse.algorithm!r} is not capturable")
            with torch.inference_mode():
                planner.reserve(max_pages)
        runner = DecodeGraphRunner(
            self._eager_forward,
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            max_batch,
            max_pages,
            self.device,
            sparse,
            replay,
        )
        self.graph_runners.append(runner)
        return runner

    def static_decode(self, max_batch: int, max_context: int, sparse: SparseGraphSpec) -> None:
        """Run sparse decode batches through the padded static path WITHOUT graphs (the
        graphs' exact inputs and selection, eagerly): CPU tests and debugging."""
        self._graph_runner(max_batch, max_context, sparse, replay=False)

    def _eager_forward(self, batch: ForwardBatch) -> torch.Tensor:
        planner = self.planner(batch.sparse.algorithm) if batch.sparse is not None else None
        return self.model.forward(batch, self.kv_pool, planner)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]."""
        for graphs in self.graph_runners:
            if graphs.can_run(batch):
                return graphs.run(batch)
        return self._eager_forward(batch)
