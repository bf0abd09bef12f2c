"""Per-request state held by the scheduler and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from spinserve.runtime.sampling import SamplerState, SamplingParams

PENDING = -1  # an output token sampled on the device and not read back yet (engine._resolve)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the engine's max context
    ABORT = "abort"


@dataclass(slots=True, eq=False)  # identity: the scheduler's lists compare requests often
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SamplerState
    arrival: int  # admission order, for FCFS
    output_ids: list[int] = field(default_factory=list)  # PENDING where still on the device
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = 0  # tokens whose K/V are in the pool
    finish_reason: FinishReason | None = None
    output_text: str = ""  # set when finished (stop strings cut off)
    stop_detokenizer: Any = None  # IncrementalDetokenizer watching for stop strings, if any

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens to have cached before decoding: the prompt, or after a recompute-preemption
        everything but the newest token (which the next decode step feeds)."""
        return self.num_tokens - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached_tokens < self.prefill_target
