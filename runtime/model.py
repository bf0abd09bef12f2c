"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) on the paged KV substrate.

Weights use the engine names (engines/build.py): fused qkv_proj and gate_up_proj. Every layer
appends its new K/V to the pool (plugins.ops.append_kv) and attends over pages through the CSR
lists of the ForwardBatch, so the same code serves dense and page-sparse attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spinserve.configs.model import ModelConfig
from spinserve.plugins import ops

from .batch import ForwardBatch, ForwardMode, SparseDecode
from .rope import cos_sin, inv_frequencies
from .sparse.planner import SparsePlanner
from .sparse.static_select import Candidates


def _hierarchical_plan(
    planner: SparsePlanner, layer: int, q: torch.Tensor, k: torch.Tensor, sp: SparseDecode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select LOGICAL pages with the planner's algorithm, then resolve them to HBM slots through
    the hierarchy (misses fetched from the host pool) instead of the resident page table.
    Dense layers (params.dense_layers) read every page: their pages stay HBM-resident and go
    through sp.page_table as in the resident path."""
    if planner.is_dense_layer(layer):
        return planner.plan_decode(
            layer, q, k, sp.req_slots, sp.seq_lens, sp.page_table[layer], sp.budget_tokens
        )
    sel = planner.select_logical(layer, q, k, sp.req_slots, sp.seq_lens, sp.budget_tokens)
    slots = sp.hierarchy.resolve(layer, sp.req_slots, sel.kv_indptr, sel.page_ids)
    return sel.kv_indptr, slots, sel.kv_last_page_len


def _static_plan(
    planner: SparsePlanner,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    sp: SparseDecode,
    cand: Candidates,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The capturable plan (static shapes): sparse layers resolve through the hierarchy when
    there is one, everything else maps through sp.page_table [L', B, KV, max_pages] (for
    sparse layers inside the select kernel)."""
    if sp.hierarchy is not None and not planner.is_dense_layer(layer):
        sel, _ = planner.select_static(layer, q, k, cand, sp.uniform_budget)
        slots = sp.hierarchy.resolve(layer, sp.req_slots, sel.kv_indptr, sel.page_ids)
        return sel.kv_indptr, slots, sel.kv_last_page_len
    table = sp.page_table[layer].reshape(-1, sp.page_table.shape[-1])  # [B * KV, max_pages]
    return planner.plan_static(layer, q, k, cand, sp.uniform_budget, table)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.w = weights
        self.device = weights["embed_tokens.weight"].device
        self.dtype = weights["embed_tokens.weight"].dtype
        self.inv_freq = inv_frequencies(cfg).to(self.device)  # [D/2] float32
        self.lm_head = weights.get("lm_head.weight", weights["embed_tokens.weight"])
        self.sm_scale = cfg.head_dim**-0.5

    def _attention(
        self,
        layer: int,
        x: torch.Tensor,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        planner: SparsePlanner | None,
        cand: Candidates | None,
    ) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, f"layers.{layer}."
        T = x.shape[0]
        qkv = F.linear(x, w[p + "qkv_proj.weight"], w.get(p + "qkv_proj.bias"))
        if cfg.qk_norm:  # Qwen3: per-head norms of q and k before the rotation
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            D, eps = cfg.head_dim, cfg.rms_norm_eps
            q = ops.rms_norm(q.reshape(-1, D), w[p + "q_norm.weight"], eps).view(T, -1)
            k = ops.rms_norm(k.reshape(-1, D), w[p + "k_norm.weight"], eps).view(T, -1)
            qkv = torch.cat([q, k, v], dim=-1)
        q, k, v = ops.rope_qkv(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads)
        ops.append_kv(kv_pool, k, v, batch.append_slots[layer], batch.append_offsets)
        kv_slots = batch.kv_slots[layer]
        if batch.mode is ForwardMode.DECODE:
            indptr, last_len = batch.kv_indptr, batch.kv_last_page_len
            if cand is not None:
                indptr, kv_slots, last_len = _static_plan(planner, layer, q, k, batch.sparse, cand)
            elif batch.sparse is not None and batch.sparse.hierarchy is not None:
                indptr, kv_slots, last_len = _hierarchical_plan(planner, layer, q, k, batch.sparse)
            elif batch.sparse is not None:
                sp = batch.sparse
                indptr, kv_slots, last_len = planner.plan_decode(
                    layer,
                    q,
                    k,
                    sp.req_slots,
                    sp.seq_lens,
                    sp.page_table[layer],
                    sp.budget_tokens,
                )
            o = ops.paged_decode_attention(q, kv_pool, indptr, kv_slots, last_len, self.sm_scale)
        else:
            o = ops.paged_prefill_attention(
                q,
                kv_pool,
                batch.qo_indptr,
                batch.kv_indptr,
                kv_slots,
                batch.kv_last_page_len,
                self.sm_scale,
            )
        return F.linear(o.reshape(T, cfg.q_size), w[p + "o_proj.weight"])

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"layers.{layer}."
        gate_up = F.linear(x, self.w[p + "gate_up_proj.weight"])  # [T, 2 * I]
        return F.linear(ops.silu_mul(gate_up), self.w[p + "down_proj.weight"])

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_pool: torch.Tensor, planner: SparsePlanner | None = None
    ) -> torch.Tensor:
        """Returns float32 logits [len(batch.logits_indices), vocab]. A batch with `sparse`
        inputs needs the planner of its algorithm."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        x = F.embedding(batch.input_ids, self.w["embed_tokens.weight"])
        cos, sin = cos_sin(self.inv_freq, batch.positions, self.dtype)
        sp = batch.sparse
        hier = sp.hierarchy if sp is not None else None
        if hier is not None:
            hier.begin_step(batch.append_slots)
        cand = None  # the capturable path's candidate pages, shared by every layer
        if sp is not None and sp.max_pages is not None:
            cand = planner.candidates(sp.req_slots, sp.seq_lens, sp.max_pages)
        residual = x  # the stream; x is each block's output until added in (fused in norms)
        h = ops.rms_norm(x, self.w["layers.0.input_norm.weight"], eps)
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            if i > 0:
                h, residual = ops.add_rms_norm(x, residual, self.w[p + "input_norm.weight"], eps)
            x = self._attention(i, h, batch, kv_pool, cos, sin, planner, cand)
            h, residual = ops.add_rms_norm(
                x, residual, self.w[p + "post_attention_norm.weight"], eps
            )
            x = self._mlp(i, h)
        if hier is not None:
            hier.offload_completed(batch.sparse.req_slots, batch.positions, batch.append_slots)
        idx = batch.logits_indices
        x, _ = ops.add_rms_norm(x[idx], residual[idx], self.w["norm.weight"], eps)
        return F.linear(x, self.lm_head).float()
