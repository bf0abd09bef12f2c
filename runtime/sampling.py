"""Sampling parameters (validated at construction) and the batched sampler.

Greedy rows (temperature 0) take argmax; the others apply temperature, top-k then top-p and draw
with a per-request torch.Generator so a seed reproduces the same tokens whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sparse_algorithm: str | None = None  # None = engine default
    sparse_budget_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r}); 0 = greedy")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r}); 0 = off")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r}); 1 = off")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer (got {self.seed!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must be a list of non-empty strings")
        if self.sparse_budget_tokens is not None and self.sparse_budget_tokens < 1:
            problems.append("sparse budget must be >= 1 token")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class SamplerState:
    """Per-request sampling state: its generator (seeded once)."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> SamplerState:
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        return cls(params, gen)


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        drop = cum - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample_on_device(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """logits [B, vocab] float32 -> [B] int64 token ids on logits' device, with no host sync
    (greedy rows: argmax; the others draw from their filtered distribution with their own
    generator), so the next step can be launched before the tokens are read back."""
    ids = logits.argmax(-1)
    for row, st in enumerate(states):
        if not st.params.greedy:
            probs = _filtered_probs(logits[row], st.params)
            ids[row : row + 1] = torch.multinomial(probs, 1, generator=st.generator)
    return ids


def sample(logits: torch.Tensor, states: list[SamplerState]) -> list[int]:
    """logits [B, vocab] float32 -> one token id per row (read back: synchronizes)."""
    return sample_on_device(logits, states).tolist()
