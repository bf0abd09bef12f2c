"""The unified partition abstraction: the sparse-algorithm interface, its shared helpers and the
registry (DESIGN.md "Unified partition abstraction").

An algorithm owns Index and Select for ONE layer at a time; the runtime owns the pages. Per layer
the runtime holds one state object (`algo.new_state`) and calls:

    perm = algo.index_prefill(state, req_slot, keys)      # end of a request's prefill
    algo.index_decode(state, req_slots, keys, positions)  # every decode step, after append_kv
    sel = algo.select(state, query, req_slots, seq_lens, budget_tokens)
    kv_slots = sel.to_slots(page_table)                    # logical page id -> pool slot

Everything inside an algorithm is in LOGICAL page ids: page j of (request, kv_head) holds the
tokens at layout positions [j * P, (j + 1) * P). The layout is the identity (position = token
index) unless `index_prefill` returns a permutation (clustered algorithms), which the runtime
applies once to the request's prefill K/V of that layer. Select returns, per (request, kv_head)
row, the selected logical pages in ascending order: the partial tail page is the highest id, so
it comes last and `kv_last_page_len` is the tail's fill, as plugins/reference.py requires.

Budget (`page_quota`): every row keeps its static pages, the ceil(sink_tokens / P) first (sinks)
and the window_tokens // P + 1 last (local window: the tail page and the full pages before it,
so at least window_tokens + 1 tokens), plus floor(budget_tokens / P) dynamic pages. A row with
no more pages than that quota selects every page, so it reproduces dense attention exactly.
Counting the window in pages (not tokens) gives every row the same static shape, which is what
the capturable path (static_select.py, CUDA graphs) and plugins select_pages need.

GQA: a kv_head's partitions are scored with every query head of its group and the group takes
the MAX of the per-head scores: a partition is kept if any head of the group rates it highly
(Quest scores per head; we select per kv_head, and for Quest the max of per-head upper bounds is
an upper bound of every head's q.k, so no head's best page is ranked below its true score).
This is also what plugins/triton_select.score_pages computes on the GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .static_select import Candidates

NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SparseParams:
    """Engine-wide defaults of a sparse algorithm; budgets can differ per request at select."""

    budget_tokens: int = 2048  # dynamic pages per (request, layer, kv_head), in tokens
    sink_tokens: int = 16  # first tokens always kept (page-aligned up)
    window_tokens: int = 128  # last tokens always kept (page-aligned: whole pages)
    dense_layers: int = 2  # the first layers attend densely (Quest: their attention is not sparse)

    def __post_init__(self) -> None:
        for name in ("budget_tokens", "sink_tokens", "window_tokens", "dense_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"SparseParams.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(slots=True)
class PageSelection:
    """Selected logical pages of ONE layer, CSR over rows r = b * num_kv_heads + h."""

    kv_indptr: torch.Tensor  # [B * KV + 1] int32, row r's pages are page_ids[indptr[r]:indptr[r+1]]
    page_ids: torch.Tensor  # [nnz] int32, logical page ids, ascending per row (tail page last)
    kv_last_page_len: torch.Tensor  # [B * KV] int32, valid tokens of each row's last page (1..P)

    def rows(self) -> torch.Tensor:
        """[nnz] int64: the row of every selected page."""
        counts = (self.kv_indptr[1:] - self.kv_indptr[:-1]).long()
        rows = torch.arange(counts.numel(), device=counts.device)
        return torch.repeat_interleave(rows, counts)

    def to_slots(self, page_table: torch.Tensor) -> torch.Tensor:
        """Map logical page ids to pool slots: page_table [B * KV, N] (or [B, KV, N]) integer,
        entry (r, j) = pool slot of row r's logical page j. Returns kv_slots [nnz] int32."""
        table = page_table.reshape(-1, page_table.shape[-1])
        return table[self.rows(), self.page_ids.long()].to(torch.int32)


class SparseState:
    """Per-layer index storage of an algorithm. Stateless algorithms use it empty; indexing ones
    keep their per-page (per-partition) tensors in `buffers`."""

    def __init__(self, buffers: PageBuffers | None = None) -> None:
        self.buffers = buffers


class PageBuffers:
    """Named per-page buffers [max_requests, KV, capacity, *tail] that grow (doubling) with the
    longest context seen; row = request slot. Slicing `[:, :, :N]` gives pages 0..N-1."""

    def __init__(self, max_requests: int, num_kv_heads: int, device: torch.device | str) -> None:
        self.max_requests = max_requests
        self.num_kv_heads = num_kv_heads
        self.device = torch.device(device)
        self.capacity = 0
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype, float]] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tail: tuple[int, ...], dtype: torch.dtype, fill: float = 0) -> None:
        self._specs[name] = (tail, dtype, fill)
        self.tensors[name] = self._alloc(name, self.capacity)

    def _alloc(self, name: str, capacity: int) -> torch.Tensor:
        tail, dtype, fill = self._specs[name]
        shape = (self.max_requests, self.num_kv_heads, capacity, *tail)
        return torch.full(shape, fill, dtype=dtype, device=self.device)

    def ensure(self, num_pages: int) -> None:
        if num_pages <= self.capacity:
            return
        new_cap = max(num_pages, 2 * self.capacity, 16)
        for name, old in self.tensors.items():
            new = self._alloc(name, new_cap)
            new[:, :, : self.capacity] = old
            self.tensors[name] = new
        self.capacity = new_cap

    def reset(self, req_slot: int) -> None:
        for name, t in self.tensors.items():
            t[req_slot] = self._specs[name][2]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def num_pages_of(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    return (seq_lens + page_size - 1) // page_size


def token_page_rows(
    index_rows: torch.Tensor,  # [B] int64 request rows of per-page buffers
    positions: torch.Tensor,  # [B] int64 one token's position per request
    num_kv_heads: int,
    capacity: int,  # pages per row of the buffers
    page_size: int,
) -> torch.Tensor:  # [B * KV] int32, (b, h) order
    """Row of each (request, kv head)'s token page in per-page buffers [rows, KV, capacity, *]
    flattened to [rows * KV * capacity, *]."""
    heads = torch.arange(num_kv_heads, device=positions.device)
    page = (positions.long() // page_size)[:, None]
    rows = (index_rows.long()[:, None] * num_kv_heads + heads) * capacity + page
    return rows.reshape(-1).to(torch.int32)


def decode_page_index(
    buffers: PageBuffers, req_slots: torch.Tensor, positions: torch.Tensor, page_size: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Address one new token per request in per-page buffers: (index tuple selecting
    [B, KV, *tail] entries of its page, fresh [B, 1, 1] bool = the token opens a new page).
    Grows the buffers to hold the page."""
    page = positions.long() // page_size
    buffers.ensure(int(page.max()) + 1)  # a host read: the eager path only
    heads = torch.arange(buffers.num_kv_heads, device=positions.device)
    idx = (req_slots.long()[:, None], heads[None, :], page[:, None])
    fresh = (positions.long() % page_size == 0)[:, None, None]
    return idx, fresh


def static_page_mask(
    seq_lens: torch.Tensor,  # [B] int64, tokens in each request (>= 1)
    page_size: int,
    num_pages: int,  # N, mask width
    sink_pages: int,
    window_pages: int | torch.Tensor,  # int or [B]: last pages kept, the tail included (>= 1)
) -> torch.Tensor:  # [B, N] bool
    """The first sink_pages and the last window_pages pages of each row (the tail always)."""
    page = torch.arange(num_pages, device=seq_lens.device)[None, :]
    n = num_pages_of(seq_lens, page_size)[:, None]
    window = torch.as_tensor(window_pages, device=seq_lens.device).clamp(min=1).reshape(-1, 1)
    return (page < n) & ((page < sink_pages) | (page >= n - window))


def valid_page_mask(seq_lens: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    page = torch.arange(num_pages, device=seq_lens.device)[None, :]
    return page < num_pages_of(seq_lens, page_size)[:, None]  # [B, N] bool


def group_max_scores(
    scores: torch.Tensor,  # [B, Hq, N] float32 score of each query head per partition
    eligible: torch.Tensor,  # [B, KV, N] bool, partitions that may be chosen
) -> torch.Tensor:  # [B, KV, N] float32, -inf where not eligible
    """Max over each GQA group of the per-head scores; ineligible partitions get -inf."""
    B, Hq, N = scores.shape
    KV = eligible.shape[1]
    s = scores.view(B, KV, Hq // KV, N).amax(dim=2)
    return s.masked_fill(~eligible, NEG_INF)


def topk_page_mask(
    scores: torch.Tensor,  # [B, KV, N] float32, -inf = not a candidate
    k: torch.Tensor,  # [B, KV] or [B] int64, pages to keep per row
) -> torch.Tensor:  # [B, KV, N] bool
    B, KV, N = scores.shape
    k = k.expand(B, KV) if k.dim() == 2 else k[:, None].expand(B, KV)
    k_max = min(int(k.max()), N) if k.numel() else 0
    mask = torch.zeros(B, KV, N, dtype=torch.bool, device=scores.device)
    if k_max <= 0:
        return mask
    vals, idx = scores.topk(k_max, dim=-1)
    rank = torch.arange(k_max, device=scores.device)
    keep = (rank[None, None, :] < k[:, :, None]) & (vals > NEG_INF)
    return mask.scatter(-1, idx, keep)


def mask_to_selection(
    mask: torch.Tensor,  # [B, KV, N] bool, selected logical pages (tail page included)
    seq_lens: torch.Tensor,  # [B] int64
    page_size: int,
) -> PageSelection:
    B, KV, N = mask.shape
    flat = mask.reshape(B * KV, N)
    counts = flat.sum(-1)
    indptr = torch.zeros(B * KV + 1, dtype=torch.int32, device=mask.device)
    indptr[1:] = counts.cumsum(0).to(torch.int32)
    page_ids = flat.nonzero()[:, 1].to(torch.int32)  # row-major: ascending page ids per row
    last = seq_lens - (num_pages_of(seq_lens, page_size) - 1) * page_size  # [B]
    last_page_len = last.repeat_interleave(KV).to(torch.int32)
    return PageSelection(indptr, page_ids, last_page_len)


class SparseAlgorithm(ABC):
    """Index + Select for one layer at a time; instances are engine-wide (one per algorithm and
    model), states are per layer. Subclasses implement `_dynamic_mask` and, if they index keys,
    `new_state` / `index_prefill` / `index_decode`.

    Shapes: B requests in the batch, Hq query heads, KV kv heads, D head_dim, N = max pages in
    the batch, P = page_size. Keys are post-RoPE, as stored in the KV pool."""

    name: ClassVar[str] = "?"
    required_page_size: ClassVar[int | None] = None  # e.g. quest 16, shadowkv 8; None = any

    capturable: ClassVar[bool] = False  # candidate_scores exists: CUDA-graph selection

    def __init__(
        self,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        params: SparseParams | None = None,
    ) -> None:
        need = self.required_page_size
        if need is not None and page_size != need:
            raise ValueError(
                f"sparse algorithm {self.name!r} needs page size {need}, the engine has "
                f"{page_size}: rebuild the engine with page_size={need} or pick another algorithm"
            )
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.params = params or SparseParams()
        self.index_dtype = torch.float32  # per-page summaries (create_algorithm: bf16 halves them)
        self.sm_scale = head_dim**-0.5

    # ---- Index -------------------------------------------------------------------------------
    def new_state(self, max_requests: int, device: torch.device | str) -> SparseState:
        """One per layer; sized for `max_requests` request slots, grows with the context."""
        return SparseState()

    def index_prefill(
        self,
        state: SparseState,
        req_slot: int,
        keys: torch.Tensor,  # [L, KV, D] post-RoPE keys of ALL L prompt tokens, token order
    ) -> torch.Tensor | None:
        """Build the request's summaries at the end of its prefill (overwrites the slot).
        Returns None (identity layout) or perm [KV, L] int64: layout position s of head h must
        hold token perm[h, s]; the runtime moves this layer's prefill K/V accordingly once."""
        return None

    def index_decode(
        self,
        state: SparseState,
        req_slots: torch.Tensor,  # [B] int64
        keys: torch.Tensor,  # [B, KV, D] the new token's post-RoPE key
        positions: torch.Tensor,  # [B] int64, the new token's position (= its layout position)
    ) -> None:
        """Fold one decode token per request into the summaries (its page completes when
        positions % P == P - 1)."""
        return None

    def index_decode_static(self, state: SparseState, keys: torch.Tensor, cand: Candidates):
        """index_decode on the capturable path (buffers reserved, no host reads): a capturable
        algorithm that indexes keys overrides it with device ops on `cand`'s precomputed
        addressing (tail_rows, fresh), as Quest does; this default suits index-free ones."""
        self.index_decode(state, cand.index_rows, keys, cand.positions)

    def index_score_static(
        self,
        state: SparseState,
        query: torch.Tensor,  # [B, Hq, D]
        keys: torch.Tensor,  # [B, KV, D] the new tokens' keys (already appended)
        cand: Candidates,
    ) -> torch.Tensor:  # [R * M] float32, as candidate_scores
        """index_decode_static then candidate_scores, one layer of a capturable decode step;
        an algorithm may fuse the two (Quest: one launch)."""
        self.index_decode_static(state, keys, cand)
        return self.candidate_scores(state, query, cand)

    def release(self, state: SparseState, req_slot: int) -> None:
        """The request slot is free again (optional: index_prefill overwrites anyway)."""
        if state.buffers is not None:
            state.buffers.reset(req_slot)

    def reserve(self, state: SparseState, num_pages: int) -> None:
        """Grow the state to hold `num_pages` logical pages per row now (outside a CUDA graph),
        so index/select never reallocate inside one."""
        if state is not None and state.buffers is not None:
            state.buffers.ensure(num_pages)

    # ---- Select ------------------------------------------------------------------------------
    @abstractmethod
    def _dynamic_mask(
        self,
        state: SparseState,
        query: torch.Tensor,  # [B, Hq, D]
        req_slots: torch.Tensor,  # [B] int64
        seq_lens: torch.Tensor,  # [B] int64
        budget_pages: torch.Tensor,  # [B] int64
        static: torch.Tensor,  # [B, N] bool, sinks + window + tail
    ) -> torch.Tensor:  # [B, KV, N] bool, pages chosen on top of the static ones
        ...

    def page_quota(self, budget_tokens: int | torch.Tensor) -> tuple[int, object, object]:
        """(sink pages, window pages with the tail, dynamic pages) a row keeps at this budget
        (ints, or [B] tensors for a tensor budget); see the module docstring."""
        P, p = self.page_size, self.params
        return -(-p.sink_tokens // P), p.window_tokens // P + 1, budget_tokens // P

    def static_mask(self, seq_lens: torch.Tensor, budget_tokens: torch.Tensor, n: int):
        sinks, window, _ = self.page_quota(budget_tokens)
        return static_page_mask(seq_lens, self.page_size, n, sinks, window)

    def candidate_scores(
        self,
        state: SparseState,
        query: torch.Tensor,  # [B, Hq, D]
        cand: Candidates,  # every page of every row, static capacity (static_select.py)
    ) -> torch.Tensor:  # [R * M] float32 score per candidate (-inf: never dynamic)
        """Capturable scoring for select_static: static shapes, no host sync (capturable
        algorithms only)."""
        raise NotImplementedError(f"sparse algorithm {self.name!r} has no capturable selection")

    def select(
        self,
        state: SparseState,
        query: torch.Tensor,  # [B, Hq, D] the current decode query (post-RoPE)
        req_slots: torch.Tensor,  # [B] int64
        seq_lens: torch.Tensor,  # [B] int64, context length INCLUDING the current token
        budget_tokens: int | torch.Tensor | None = None,  # per request [B] or one int
    ) -> PageSelection:
        B, P = query.shape[0], self.page_size
        seq_lens = seq_lens.long()
        budget = self.params.budget_tokens if budget_tokens is None else budget_tokens
        budget = torch.as_tensor(budget, dtype=torch.long, device=seq_lens.device).expand(B)
        n = int(num_pages_of(seq_lens, P).max())
        self.reserve(state, n)  # slices [:, :, :n] of the buffers must exist
        valid = valid_page_mask(seq_lens, P, n)
        static = self.static_mask(seq_lens, budget, n)
        dyn = self._dynamic_mask(state, query, req_slots.long(), seq_lens, budget // P, static)
        mask = (dyn & valid[:, None, :]) | static[:, None, :]
        sinks, window, dynamic = self.page_quota(budget)
        full = (num_pages_of(seq_lens, P) <= sinks + window + dynamic)[:, None, None]
        mask = torch.where(full, valid[:, None, :], mask)  # the quota covers the context: dense
        return mask_to_selection(mask, seq_lens, P)


_REGISTRY: dict[str, type[SparseAlgorithm]] = {}


def register_algorithm(name: str, cls: type[SparseAlgorithm]) -> None:
    """Make `cls` selectable by `name` (engine default or per-request `parameters.algorithm`)."""
    if not (isinstance(cls, type) and issubclass(cls, SparseAlgorithm)):
        raise TypeError(f"{cls!r} is not a SparseAlgorithm subclass")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"sparse algorithm {name!r} is already registered ({_REGISTRY[name]})")
    _REGISTRY[name] = cls


def get_algorithm(name: str) -> type[SparseAlgorithm]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown sparse algorithm {name!r}; known: {known}") from None


def available_algorithms() -> list[str]:
    return sorted(_REGISTRY)


def create_algorithm(
    name: str,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    params: SparseParams | None = None,
    index_dtype: torch.dtype = torch.float32,
) -> SparseAlgorithm:
    algo = get_algorithm(name)(page_size, num_kv_heads, head_dim, params)
    algo.index_dtype = index_dtype
    return algo
