"""EvalSession: one request driven through an engine's model with a chosen sparse algorithm.

Data flow: prefill (dense, chunked, the engine's own path) -> snapshot of the KV pool -> for each
(algorithm, budget): restore the pool, SparsePlanner.index_prefill (may re-lay pages), then
decode steps whose ForwardBatch carries SparseDecode inputs, so the model's attention goes
through the planner's selection. Dense runs the engine's plain decode path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from spinserve.control.engine import LLMEngine
from spinserve.control.kv_manager import BatchItem
from spinserve.runtime.batch import ForwardMode, SparseDecode
from spinserve.runtime.sparse import SparseParams, create_algorithm
from spinserve.runtime.sparse.planner import SparsePlanner

DENSE = "dense"
REQ = "eval"


class EvalSession:
    """One engine at one page size holding one request of up to `max_tokens` tokens."""

    def __init__(self, engine_dir: Path, page_size: int, max_tokens: int, device: str) -> None:
        self.engine = LLMEngine.from_engine_dir(
            engine_dir,
            device=device,
            page_size=page_size,
            **{"cache.kv_cache_tokens": max_tokens + page_size, "engine.max_context": None},
        )
        self.cfg = self.engine.model_config
        self.device = self.engine.device
        self.page_size = page_size
        self.model = self.engine.runner.model
        self.pool = self.engine.runner.kv_pool
        self.kv = self.engine.kv
        self.max_tokens = max_tokens
        self._snapshot: torch.Tensor | None = None
        self.context_len = 0

    def _forward(self, mode: ForwardMode, start: int, ids: list[int], sparse=None) -> torch.Tensor:
        """sparse: None (dense) or (planner, budget_tokens). Returns [1, vocab] float32."""
        batch = self.kv.build_batch(mode, [BatchItem(REQ, start, ids)], self.device)
        if sparse is None:
            return self.model.forward(batch, self.pool)
        planner, budget = sparse
        batch.sparse = SparseDecode(
            algorithm=planner.algo.name,
            req_slots=torch.zeros(1, dtype=torch.long, device=self.device),
            seq_lens=torch.tensor([start + 1], device=self.device),
            page_table=self._table,
            budget_tokens=torch.tensor([budget], device=self.device),
        )
        return self.model.forward(batch, self.pool, planner)

    def prefill(self, ids: list[int], chunk: int = 512) -> None:
        """Dense chunked prefill of the shared context; the pool is snapshotted afterwards."""
        if len(ids) >= self.max_tokens:
            raise ValueError(f"context of {len(ids)} tokens >= session size {self.max_tokens}")
        self._reset_request()
        for s in range(0, len(ids), chunk):
            self._forward(ForwardMode.PREFILL, s, ids[s : s + chunk])
        self.context_len = len(ids)
        self._snapshot = self.pool.clone()
        self._table = self._batch_table()

    def _reset_request(self) -> None:
        """Hold pages for max_tokens up front, so decode steps never allocate."""
        self.kv.free(REQ)
        self.kv.ensure(REQ, self.max_tokens)

    def _batch_table(self) -> torch.Tensor:
        """[L, 1, KV, N] int32 slots of every page held (N covers max_tokens)."""
        return torch.as_tensor(self.kv.batch_table([REQ])).to(self.device)

    def page_table(self, num_tokens: int) -> torch.Tensor:
        """[num_layers, KV, n_pages] pool slots of the request's first num_tokens tokens."""
        batch = self.kv.build_batch(
            ForwardMode.DECODE, [BatchItem(REQ, num_tokens - 1, [0])], "cpu"
        )
        L, KV = self.cfg.num_layers, self.cfg.num_kv_heads
        return batch.kv_slots.view(L, KV, -1).to(self.device)

    def copy_context_from(self, other: EvalSession) -> None:
        """Re-page other's prefilled context into this session (no second prefill)."""
        n = other.context_len
        self._reset_request()
        src, dst = other.page_table(n), self.page_table(n)
        for layer in range(self.cfg.num_layers):
            kv = other.pool[src[layer].long()].permute(0, 2, 1, 3, 4)  # [KV, 2, n_src, P, D]
            KV, _, _, _, D = kv.shape
            flat = kv.reshape(KV, 2, -1, D)[:, :, :n]
            m = dst.shape[-1] * self.page_size
            flat = F.pad(flat, (0, 0, 0, m - n))
            pages = flat.reshape(KV, 2, -1, self.page_size, D).permute(0, 2, 1, 3, 4)
            self.pool[dst[layer].long()] = pages.to(self.pool.dtype)
        self.context_len = n
        self._snapshot = self.pool.clone()
        self._table = self._batch_table()

    def run(
        self,
        algorithm: str,
        budget_tokens: int,
        params: SparseParams,
        forced_ids: list[int],
        num_generate: int,
    ) -> tuple[list[int], list[float]]:
        """Restore the context, feed `forced_ids` as decode steps (teacher forcing) through the
        algorithm's selection, then greedily generate `num_generate` tokens.
        Returns (generated ids, NLL of each of forced_ids[1:] given everything before it)."""
        self.pool.copy_(self._snapshot)
        sparse = None
        if algorithm != DENSE:
            sparse = (self._planner(algorithm, params), budget_tokens)
        pos, nlls, out = self.context_len, [], []
        tok = forced_ids[0]
        for i in range(len(forced_ids) + num_generate - 1):
            logits = self._forward(ForwardMode.DECODE, pos, [tok], sparse)[0]
            pos += 1
            if i + 1 < len(forced_ids):
                tok = forced_ids[i + 1]
                nlls.append(float(-torch.log_softmax(logits, -1)[tok]))
            else:
                tok = int(logits.argmax())
                out.append(tok)
        return out, nlls

    def _planner(self, algorithm: str, params: SparseParams) -> SparsePlanner:
        """A fresh planner indexed on the restored context (its layout applied to the pool)."""
        cfg = self.cfg
        algo = create_algorithm(algorithm, self.page_size, cfg.num_kv_heads, cfg.head_dim, params)
        planner = SparsePlanner(algo, cfg.num_layers, 1, self.device)
        planner.index_prefill(self.pool, 0, self.page_table(self.context_len), self.context_len)
        return planner
