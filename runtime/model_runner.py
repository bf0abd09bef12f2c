"""ModelRunner: owns the model weights and the KV page pool on one device, runs ForwardBatches."""

from __future__ import annotations

import torch
from spinserve.configs.model import ModelConfig

from .batch import ForwardBatch
from .model import LlamaModel


def kv_bytes_per_slot(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    return 2 * page_size * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        page_size: int,
        num_slots: int,
    ) -> None:
        self.cfg = cfg
        self.model = LlamaModel(cfg, weights)
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.page_size = page_size
        # [num_slots, 2, P, head_dim], one page of one (layer, kv_head) per slot; slot 0 = dummy
        self.kv_pool = torch.zeros(
            num_slots, 2, page_size, cfg.head_dim, dtype=self.dtype, device=self.device
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]."""
        return self.model.forward(batch, self.kv_pool)
