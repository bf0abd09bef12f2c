"""LLMEngine: tokenizer + scheduler + KV manager + model runner, stepped by its owner.

One step: schedule -> one prefill forward (chunks of several requests) -> one decode forward
(one token per running request) -> sample on the device -> read back the PREVIOUS step's decode
tokens -> stop checks -> outputs (control/inflight.py: the host prepares a step while the GPU
runs the one before). The engine is not thread-safe: exactly one thread (the CLI, or the
server's engine loop) calls it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from spinserve.configs.settings import DType, Settings, load_settings, resolve_device
from spinserve.engines.errors import EngineError
from spinserve.engines.loader import load_tokenizer, load_weights
from spinserve.engines.manifest import Manifest, read_manifest
from spinserve.runtime.batch import ForwardMode, SparseDecode
from spinserve.runtime.cuda_graph import SparseGraphSpec
from spinserve.runtime.model_runner import DENSE, ModelRunner, kv_bytes_per_slot
from spinserve.runtime.sampling import SamplerState, SamplingParams, sample, sample_on_device
from spinserve.runtime.sparse import SparseParams
from spinserve.runtime.transfer import HostCopy, to_device

from . import offline
from .admission import RequestError, check_prompt
from .hier_kv_manager import HierarchicalKVManager, manager_for_runner, mandatory_pages
from .index_rows import IndexRows
from .inflight import InFlight
from .kv_manager import BatchItem, PagedKVManager
from .offline import GenerationOutput
from .request import PENDING, FinishReason, Request, RequestStatus
from .scheduler import Scheduler
from .stream_detokenizer import IncrementalDetokenizer

REBALANCE_STEPS = 32  # hierarchical decode steps between HBM buffer resizes

_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
}


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    output_text: str | None = None  # full text once finished (stop strings cut off)
    num_prompt_tokens: int = 0


def _num_slots(manifest: Manifest, settings: Settings, device: str, dtype, page_size: int) -> int:
    cfg = manifest.model
    slot_bytes = kv_bytes_per_slot(cfg, page_size, dtype)
    per_page = cfg.num_layers * cfg.num_kv_heads
    if settings.cache.kv_cache_tokens is not None:
        return -(-settings.cache.kv_cache_tokens // page_size) * per_page + 1
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        budget = free * settings.cache.kv_memory_fraction
    else:
        budget = settings.cache.cpu_kv_memory_gib * 2**30
    return max(int(budget // (slot_bytes * per_page)), 2) * per_page + 1


class LLMEngine:
    def __init__(self, engine_dir: Path, settings: Settings | None = None) -> None:
        self.settings = settings = settings or load_settings()
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest = read_manifest(self.engine_dir)
        self.model_config = cfg = manifest.model
        self.device = resolve_device(settings.engine.device)
        if self.device == "cpu" and settings.engine.cpu_threads is not None:
            torch.set_num_threads(settings.engine.cpu_threads)
        dtype = settings.engine.dtype
        if dtype is DType.AUTO:
            dtype = DType.BFLOAT16 if self.device == "cuda" else DType.FLOAT32
        self.dtype = _DTYPES[dtype]
        self.page_size = settings.cache.page_size or manifest.page_size
        self.max_context = min(manifest.max_context, settings.engine.max_context or 1 << 62)
        self.tokenizer = load_tokenizer(self.engine_dir)
        weights = load_weights(self.engine_dir, manifest, self.device, self.dtype)
        num_slots = _num_slots(manifest, settings, self.device, self.dtype, self.page_size)
        max_requests = settings.engine.max_running_requests
        sp = settings.sparse
        sparse = SparseParams(sp.budget_tokens, sp.sink_tokens, sp.window_tokens, sp.dense_layers)
        self.runner = ModelRunner(cfg, weights, self.page_size, num_slots, max_requests, sparse)
        self.default_algorithm = settings.sparse.algorithm
        self.algorithm_for(self.default_algorithm)  # unknown name / wrong page size: fail now
        # hierarchy: sparse requests keep their working set in HBM, every page in the host pool
        self.hierarchy = settings.cache.hierarchy
        self.kv: PagedKVManager | HierarchicalKVManager
        if self.hierarchy:
            self.kv = manager_for_runner(
                self.runner, settings.cache, max_requests, self.max_context, self._mandatory_of
            )
        else:
            self.kv = PagedKVManager(cfg.num_layers, cfg.num_kv_heads, self.page_size, num_slots)
        self.index_rows = IndexRows(self.runner, self.kv, self.hierarchy, max_requests)
        if self.device == "cuda" and settings.engine.cuda_graphs:
            self.runner.capture_decode_graphs(max_requests, self.max_context)
            sparse_graphs = self.sparse_graph_spec()
            if sparse_graphs is not None:
                self.runner.capture_decode_graphs(max_requests, self.max_context, sparse_graphs)
        self._decode_steps = 0
        self._row_stats: HostCopy | None = None  # hierarchy counters on their way to the host
        self.scheduler = Scheduler(settings.engine, self.kv)
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._requests: dict[str, Request] = {}
        self._arrival = itertools.count()
        self._num_preemptions = 0
        self._inflight: InFlight | None = None  # the decode launch whose tokens are not read
        self.scheduler.fence = self._fence

    def sparse_graph_spec(self) -> SparseGraphSpec | None:
        """What the sparse decode graphs are captured for: the default algorithm at the default
        budget (requests with other ones decode eagerly), through the hierarchy when it is on;
        None when the default is dense or its selection is not capturable."""
        name = self.default_algorithm
        if name == DENSE or not self.runner.planner(name).capturable:
            return None
        return SparseGraphSpec(
            name,
            self.settings.sparse.budget_tokens,
            self.kv.config.dense_layers if self.hierarchy else self.model_config.num_layers,
            self.kv.hierarchy if self.hierarchy else None,
        )

    @classmethod
    def from_engine_dir(cls, path: Path, **overrides) -> LLMEngine:
        """overrides: "section.field" settings, or the shorthands device/dtype/page_size."""
        short = {"device": "engine.device", "dtype": "engine.dtype", "page_size": "cache.page_size"}
        return cls(path, load_settings(**{short.get(k, k): v for k, v in overrides.items()}))

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        check_prompt(
            prompt_ids, self.max_context, self.model_config.vocab_size, self.kv, self.hierarchy
        )
        self.algorithm_for(params.sparse_algorithm or self.default_algorithm)
        sampler = SamplerState.create(params, torch.device(self.device))
        req = Request(request_id, list(prompt_ids), params, sampler, next(self._arrival))
        if params.stop:
            req.stop_detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        self._requests[request_id] = req
        self.scheduler.add(req)

    def algorithm_for(self, name: str) -> str:
        """Check that a sparse algorithm exists and suits this engine (RequestError if not)."""
        if name != DENSE:
            try:
                self.runner.planner(name)
            except ValueError as e:
                raise RequestError(str(e)) from None
        return name

    def _algorithm(self, req: Request) -> str:
        return req.params.sparse_algorithm or self.default_algorithm

    def _mandatory_of(self, request_id: str) -> int | None:
        """Pages a sparse request's row selects per step at most (None: dense, all pages)."""
        req = self._requests[request_id]
        if self._algorithm(req) == DENSE:
            return None
        budget = req.params.sparse_budget_tokens or self.settings.sparse.budget_tokens
        return mandatory_pages(self.runner.sparse_params, budget, self.page_size)

    def _release_index(self, req: Request) -> None:
        self.index_rows.release(req, self._algorithm(req))

    def _index_prefill(self, req: Request) -> None:
        """A request finished its prefill: index its keys for its sparse algorithm."""
        algorithm = self._algorithm(req)
        if algorithm != DENSE:
            self.index_rows.index_prefill(req, algorithm, self.device)
            if self.hierarchy:  # offload the prefill, keep the working set
                self.kv.finish_prefill(req.request_id, req.num_cached_tokens)

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._retire(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
        return True

    def _retire(self, req: Request) -> None:
        """Take an ended request out of the scheduler; free its pages and index row now, or,
        when the launch in flight decodes it, once that launch has been read back (its kernels
        read the host-slot tables in place: freed entries must not change under them)."""
        launch = self._inflight
        if launch is not None and req in launch.rows:
            self.scheduler.remove(req, free_pages=False)
            launch.retired.append(req)
        else:
            self.scheduler.remove(req)
            self._release_index(req)

    def _fence(self) -> None:
        """Wait for the launch in flight (the scheduler is about to free a request's pages)."""
        if self._inflight is not None:
            self._inflight.wait()

    def _free_retired(self, launch: InFlight) -> None:
        for req in launch.retired:
            self.kv.free(req.request_id)
            self._release_index(req)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or self._inflight is not None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        live = {r.request_id for r in self.scheduler.running}
        if any(not self.kv.holds(r) for r in live):
            raise AssertionError("a running request holds no pages")

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_pages_total": self.kv.capacity_pages,
            "kv_pages_used": self.kv.capacity_pages - self.kv.free_pages,
            # every page of this KV manager is resident in the device pool
            "hbm_pages_total": self.kv.capacity_pages,
            "hbm_pages_used": self.kv.capacity_pages - self.kv.free_pages,
            "num_preemptions": self._num_preemptions,
        } | (self.kv.metrics() if self.hierarchy else {})  # two tiers: HBM/host pages, hits

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, launch, and return the tokens of the previous decode launch: a decode's
        sampled tokens stay on the device (the next launch reads its input ids there), so the
        host prepares step N+1 while the GPU runs step N. Prefill chunks and preemptions read
        output tokens on the host, so a step with either first waits for the launch in flight."""
        sched = self.scheduler.schedule()
        self._num_preemptions += len(sched.preempted)
        for req in sched.preempted:
            self._release_index(req)
        outputs: list[RequestOutput] = []
        if sched.prefill or sched.preempted:
            outputs = self._resolve()  # may finish requests this schedule included
            live = RequestStatus.RUNNING
            sched.decode = [r for r in sched.decode if r.status is live]
            outputs += self._prefill([(r, n) for r, n in sched.prefill if r.status is live])
        previous, self._inflight = self._inflight, self._launch(sched.decode)
        outputs += self._read(previous)
        return outputs

    def _prefill(self, chunks: list[tuple[Request, int]]) -> list[RequestOutput]:
        """One prefill forward; requests whose prompt is now cached sample their first token."""
        if not chunks:
            return []
        items = [
            BatchItem(r.request_id, r.num_cached_tokens, r.all_ids[r.num_cached_tokens :][:n])
            for r, n in chunks
        ]
        logits = self._forward(ForwardMode.PREFILL, items)
        done = []
        for row, (req, n) in enumerate(chunks):
            req.num_cached_tokens += n
            if not req.in_prefill:
                self._index_prefill(req)
                if not req.output_ids:
                    done.append((row, req))
        if not done:
            return []
        ids = sample(logits[[row for row, _ in done]], [r.sampler for _, r in done])
        outputs = []
        for (_, req), token in zip(done, ids):
            req.output_ids.append(token)
            outputs.append(self._emit(req, token, len(req.output_ids)))
        return outputs

    def _launch(self, reqs: list[Request]) -> InFlight | None:
        """Decode one token for each request (one forward per sparse algorithm) and leave the
        sampled tokens on the device: each request gets a PENDING output token."""
        if not reqs:
            return None
        groups: dict[str, list[Request]] = {}
        for req in reqs:
            groups.setdefault(self._algorithm(req), []).append(req)
        ordered: list[Request] = []
        tokens = []
        for algorithm, group in groups.items():
            tokens.append(self._decode(algorithm, group))
            ordered += group
        index = []
        for req in ordered:
            req.num_cached_tokens = req.num_tokens
            index.append(len(req.output_ids))
            req.output_ids.append(PENDING)
        launch = InFlight.start(
            ordered, index, tokens[0] if len(tokens) == 1 else torch.cat(tokens)
        )
        for req in ordered:
            if self._ends_by_length(req, len(req.output_ids)):
                # finishes with this token whatever it is: out of the scheduler now, its pages
                # free once this launch is read back
                self.scheduler.remove(req, free_pages=False)
                launch.retired.append(req)
        return launch

    def _resolve(self) -> list[RequestOutput]:
        """Read back the launch in flight (waits for it) and process its tokens."""
        launched, self._inflight = self._inflight, None
        return self._read(launched)

    def _read(self, launched: InFlight | None) -> list[RequestOutput]:
        """Wait for `launched`, free what ended in it, process its tokens (requests that end
        and are also in self._inflight, the newer launch, are freed after that one)."""
        if launched is None:
            return []
        tokens = launched.read()
        self._free_retired(launched)
        outputs = []
        for req, i, token in zip(launched.reqs, launched.index, tokens):
            if req.status is RequestStatus.FINISHED:  # aborted, or stopped one step earlier
                continue
            req.output_ids[i] = token
            outputs.append(self._emit(req, token, i + 1))
        return outputs

    def _decode(self, algorithm: str, reqs: list[Request]) -> torch.Tensor:
        """Launch one decode forward; [B] int64 sampled tokens on the device."""
        if self.hierarchy and algorithm != DENSE:
            self._maybe_rebalance()  # before build_batch: its flush carries the new rows
        items = [BatchItem(r.request_id, r.num_tokens - 1, [max(r.last_token, 0)]) for r in reqs]
        batch = self.kv.build_batch(ForwardMode.DECODE, items, self.device)
        if self._inflight is not None:  # tokens still on the device: gather them there
            batch.input_ids = self._inflight.feed(reqs, batch.input_ids)
        if algorithm != DENSE:
            default = self.settings.sparse.budget_tokens
            budgets = [r.params.sparse_budget_tokens or default for r in reqs]
            ids = [r.request_id for r in reqs]
            # with the hierarchy only the dense layers' pages are resident and listed
            layers = self.kv.config.dense_layers if self.hierarchy else None
            batch.sparse = SparseDecode(
                algorithm=algorithm,
                req_slots=self._tensor([self.index_rows.of[r.request_id] for r in reqs]),
                seq_lens=self._tensor([r.num_tokens for r in reqs]),
                page_table=to_device(self.kv.batch_table(ids, layers), torch.int32, self.device),
                budget_tokens=self._tensor(budgets),
                uniform_budget=budgets[0] if len(set(budgets)) == 1 else None,
            )
            if self.hierarchy:
                self.kv.attach(batch.sparse, ids)
        logits = self.runner.forward(batch)
        return sample_on_device(logits, [r.sampler for r in reqs])

    def _maybe_rebalance(self) -> None:
        """Every REBALANCE_STEPS hierarchical decode steps: resize the requests' HBM buffers
        from their hit rates. The per-request counters are copied to the host one step ahead,
        so reading them never waits for the launch in flight."""
        self._decode_steps += 1
        phase = self._decode_steps % REBALANCE_STEPS
        if phase == REBALANCE_STEPS - 1:
            self._row_stats = HostCopy(self.kv.hierarchy.row_stats)
        elif phase == 0 and self._row_stats is not None:
            lookups, hits = self._row_stats.wait().numpy().T
            self._row_stats = None
            self.kv.rebalance(lookups, hits)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return to_device(values, torch.int64, self.device)

    def _forward(self, mode: ForwardMode, items: list[BatchItem]) -> torch.Tensor:
        batch = self.kv.build_batch(mode, items, self.device)
        return self.runner.forward(batch)

    def _emit(self, req: Request, token: int, num_out: int) -> RequestOutput:
        """The request's output token number `num_out` (already in output_ids) is `token`: stop
        checks, finishing (output_ids cut back to num_out), and its RequestOutput."""
        reason = self._finish_reason(req, token, num_out)
        if reason is not None:
            del req.output_ids[num_out:]  # tokens launched after this one are dropped
            self._finish(req, reason)
        return RequestOutput(
            req.request_id,
            [token],
            reason is not None,
            reason.value if reason else None,
            req.output_text if reason else None,
            len(req.prompt_ids),
        )

    def _ends_by_length(self, req: Request, num_out: int) -> bool:
        return num_out >= req.params.max_tokens or len(req.prompt_ids) + num_out >= self.max_context

    def _finish_reason(self, req: Request, token: int, num_out: int) -> FinishReason | None:
        p = req.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if req.stop_detokenizer is not None:
            req.stop_detokenizer.push([token])
            if req.stop_detokenizer.stopped:
                return FinishReason.STOP
        if self._ends_by_length(req, num_out):
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        detok = req.stop_detokenizer
        if detok is not None and detok.stopped:
            req.output_text = detok.text  # cut before the stop string
        else:
            req.output_text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        self._retire(req)
        del self._requests[req.request_id]

    # ---- offline --------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return offline.encode(self.tokenizer, prompt, chat)

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[GenerationOutput]:
        """Run prompts (text or token ids) to completion; results in prompt order."""
        return offline.generate(self, prompts, params or SamplingParams())


__all__ = ["EngineError", "GenerationOutput", "LLMEngine", "RequestError", "RequestOutput"]
