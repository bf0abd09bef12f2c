"""EvalSession: a batch of prompts driven through an engine's model with a chosen sparse algorithm.

Data flow: prefill every prompt (dense, chunked, the engine's own path; several requests per
forward) -> snapshot of the KV pool -> per algorithm (`index`): restore the pool, index every
request with a fresh SparsePlanner (may re-lay pages), snapshot the indexed pool and the planner's
states -> per budget (`run`): restore them, then decode steps of the WHOLE batch at once (one
token per request per forward, as the engine's continuous batching decodes), whose ForwardBatch
carries SparseDecode inputs, so the model's attention goes through the planner's selection.
Dense runs the engine's plain decode path. Each request holds its pages for `max_tokens` tokens
from the start, so decode never allocates and the page table is fixed for a run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from spinserve.control.engine import LLMEngine
from spinserve.control.kv_manager import BatchItem
from spinserve.runtime.batch import ForwardBatch, ForwardMode, SparseDecode
from spinserve.runtime.sparse import SparseAlgorithm, SparseParams, create_algorithm
from spinserve.runtime.sparse.planner import SparsePlanner

DENSE = "dense"
PlannerFactory = Callable[[SparseAlgorithm, int, int, torch.device], SparsePlanner]


def decode_batch(
    table: torch.Tensor,  # [L, B, KV, N] int32 pool slots of every request's pages
    positions: torch.Tensor,  # [B] int64, position of each request's new token
    token_ids: torch.Tensor,  # [B] int64
    page_size: int,
) -> ForwardBatch:
    """The engine's dense decode ForwardBatch (kv_manager.build_forward_batch), built on the
    device from a fixed page table: no host work per step."""
    L, B, KV, N = table.shape
    P, dev = page_size, table.device
    b = torch.arange(B, device=dev)
    append = table.permute(1, 3, 0, 2)[b, positions // P].transpose(0, 1)  # [L, B, KV]
    n_pages = positions // P + 1  # [B]
    has = torch.arange(N, device=dev)[None, :] < n_pages[:, None]  # [B, N]
    kv_slots = table[:, has[:, None, :].expand(B, KV, N)]  # [L, nnz], rows b * KV + h
    counts = n_pages.repeat_interleave(KV)
    kv_indptr = torch.zeros(B * KV + 1, dtype=torch.int32, device=dev)
    kv_indptr[1:] = counts.cumsum(0)
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=token_ids,
        positions=positions,
        append_slots=append.to(torch.int32).contiguous(),
        append_offsets=(positions % P).to(torch.int32),
        qo_indptr=torch.arange(B + 1, dtype=torch.int32, device=dev),
        kv_indptr=kv_indptr,
        kv_slots=kv_slots.to(torch.int32),
        kv_last_page_len=(positions % P + 1).repeat_interleave(KV).to(torch.int32),
        logits_indices=b,
    )


class EvalSession:
    """One engine at one page size holding up to `max_requests` requests of `max_tokens` each."""

    def __init__(
        self, engine_dir: Path, page_size: int, max_requests: int, max_tokens: int, device: str
    ) -> None:
        pages = -(-max_tokens // page_size)
        self.engine = LLMEngine.from_engine_dir(
            engine_dir,
            device=device,
            page_size=page_size,
            **{
                "cache.kv_cache_tokens": max_requests * pages * page_size,
                "engine.max_context": None,
                "engine.max_running_requests": max_requests,
                "engine.cuda_graphs": False,
            },
        )
        self.cfg = self.engine.model_config
        self.device = torch.device(self.engine.device)
        self.page_size = page_size
        self.model = self.engine.runner.model
        self.pool = self.engine.runner.kv_pool  # [S, 2, P, D], shared with the engine
        self.kv = self.engine.kv
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.context_lens: list[int] = []
        self._context: torch.Tensor | None = None  # pool after prefill
        # (algorithm, planner, its states after indexing, pool after indexing) runs start from
        self._indexed: tuple[str, SparsePlanner | None, list, torch.Tensor] | None = None
        self._table: torch.Tensor | None = None  # [L, B, KV, N] int32 slots (N: max_tokens)

    @property
    def rids(self) -> list[str]:
        return [f"eval{b}" for b in range(len(self.context_lens))]

    def _hold(self, lens: list[int]) -> None:
        """Free the old batch; hold pages for max_tokens per request so decode never allocates."""
        if len(lens) > self.max_requests or max(lens) >= self.max_tokens:
            raise ValueError(
                f"{len(lens)} prompts of up to {max(lens)} tokens do not fit the session "
                f"({self.max_requests} requests of < {self.max_tokens} tokens)"
            )
        for rid in self.rids:
            self.kv.free(rid)
        self.context_lens = list(lens)
        for rid in self.rids:
            self.kv.ensure(rid, self.max_tokens)
        self._table = torch.as_tensor(self.kv.batch_table(self.rids)).to(self.device)
        self._indexed = None

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], chunk_tokens: int = 8192) -> None:
        """Dense chunked prefill of every prompt; forwards of up to chunk_tokens tokens hold
        several requests (never two chunks of one). The pool is snapshotted afterwards."""
        self._hold([len(p) for p in prompts])
        chunks = [
            [BatchItem(rid, s, ids[s : s + chunk_tokens]) for s in range(0, len(ids), chunk_tokens)]
            for rid, ids in zip(self.rids, prompts)
        ]
        for step in range(max(len(c) for c in chunks)):
            items = [c[step] for c in chunks if step < len(c)]
            group, size = [], 0
            for it in items + [None]:
                if group and (it is None or size + len(it.token_ids) > chunk_tokens):
                    batch = self.kv.build_batch(ForwardMode.PREFILL, group, self.device)
                    self.model.forward(batch, self.pool)
                    group, size = [], 0
                if it is not None:
                    group.append(it)
                    size += len(it.token_ids)
        self._context = self.pool.clone()

    @torch.inference_mode()
    def copy_context_from(self, other: EvalSession) -> None:
        """Re-page other's prefilled batch into this session (no second prefill)."""
        self._hold(other.context_lens)
        L, P = self.cfg.num_layers, self.page_size
        for b, n in enumerate(self.context_lens):
            src, dst = other._table[:, b].long(), self._table[:, b].long()  # [L, KV, N]
            for layer in range(L):
                kv = other.pool[src[layer]].permute(0, 2, 1, 3, 4)  # [KV, 2, N_src, P_src, D]
                KV, _, _, _, D = kv.shape
                flat = kv.reshape(KV, 2, -1, D)[:, :, :n]
                m = -(-n // P)
                flat = F.pad(flat, (0, 0, 0, m * P - n)).reshape(KV, 2, m, P, D)
                self.pool[dst[layer, :, :m]] = flat.permute(0, 2, 1, 3, 4).to(self.pool.dtype)
        self._context = self.pool.clone()

    def page_table(self, b: int) -> torch.Tensor:
        """[L, KV, n] pool slots of request b's context pages."""
        n = -(-self.context_lens[b] // self.page_size)
        return self._table[:, b, :, :n]

    @torch.inference_mode()
    def index(
        self, algorithm: str, params: SparseParams, factory: PlannerFactory = SparsePlanner
    ) -> SparsePlanner | None:
        """Restore the prefilled pool, index every request for `algorithm` (applying its layout)
        and snapshot the result, which every following `run` starts from."""
        self.pool.copy_(self._context)
        planner = None
        if algorithm != DENSE:
            cfg = self.cfg
            algo = create_algorithm(
                algorithm, self.page_size, cfg.num_kv_heads, cfg.head_dim, params
            )
            planner = factory(algo, cfg.num_layers, len(self.context_lens), self.device)
            for b, n in enumerate(self.context_lens):
                planner.index_prefill(self.pool, b, self.page_table(b), n)
            states = copy.deepcopy(planner.states)
            self._indexed = (algorithm, planner, states, self.pool.clone())
        else:  # dense: runs start from the prefilled pool itself
            self._indexed = (algorithm, None, [], self._context)
        return planner

    def _restore(self) -> tuple[str, SparsePlanner | None]:
        if self._indexed is None:
            raise RuntimeError("EvalSession.run before index(): index the algorithm first")
        algorithm, planner, states, pool = self._indexed
        self.pool.copy_(pool)
        if planner is not None:
            planner.states = copy.deepcopy(states)
        return algorithm, planner

    def _step(self, planner, budget: int, pos: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        batch = decode_batch(self._table, pos, toks, self.page_size)
        if planner is None:
            return self.model.forward(batch, self.pool)
        B = pos.numel()
        batch.sparse = SparseDecode(
            algorithm=planner.algo.name,
            req_slots=torch.arange(B, device=self.device),
            seq_lens=pos + 1,
            page_table=self._table,
            budget_tokens=torch.full((B,), budget, dtype=torch.long, device=self.device),
        )
        return self.model.forward(batch, self.pool, planner)

    @torch.inference_mode()
    def run(
        self, budget_tokens: int, forced: list[list[int]], num_generate: int | list[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """From the indexed snapshot, feed each request b its forced[b] tokens as decode steps
        (teacher forcing, whole batch per step), then greedily generate num_generate (one count,
        or one per request) tokens; the batch steps until every request is done.
        Returns (generated ids [B][num_generate[b]], NLL of each of forced[b][1:] given
        everything before it)."""
        algorithm, planner = self._restore()
        B = len(self.context_lens)
        gen = [num_generate] * B if isinstance(num_generate, int) else list(num_generate)
        lens = [len(f) for f in forced]
        if len(forced) != B or len(gen) != B or min(lens) < 1:
            raise ValueError(f"forced tokens for {len(forced)} requests, the batch has {B}")
        steps = max(n + g - 1 for n, g in zip(lens, gen))
        if max(self.context_lens) + steps >= self.max_tokens:
            raise ValueError(f"{steps} decode steps overflow the session's {self.max_tokens}")
        width = max(lens) + 1
        table = torch.tensor([f + [-1] * (width - len(f)) for f in forced], device=self.device)
        pos = torch.tensor(self.context_lens, device=self.device)
        toks = table[:, 0].clone()
        out, nll = [], []
        b = torch.arange(B, device=self.device)
        for i in range(steps):
            logits = self._step(planner, budget_tokens, pos, toks)  # [B, V] float32
            nxt = table[:, min(i + 1, width - 1)]
            forced_next = nxt >= 0
            nll.append(-torch.log_softmax(logits, -1)[b, nxt.clamp(min=0)])
            greedy = logits.argmax(-1)
            toks = torch.where(forced_next, nxt, greedy)
            out.append(torch.where(forced_next, -1, greedy))
            pos = pos + 1
        nll_rows = torch.stack(nll, 1).tolist() if nll else [[] for _ in range(B)]
        out_rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
        nlls = [row[: lens[r] - 1] for r, row in enumerate(nll_rows)]
        gens = [[t for t in row if t >= 0][: gen[r]] for r, row in enumerate(out_rows)]
        return gens, nlls
