"""The decode launch in flight: its sampled tokens stay on the device until the engine reads them.

LLMEngine.step launches decode step N+1 before it reads step N's tokens back, so the host's
control plane (scheduling, tables, batch building) runs while the GPU computes. Each request of
a launch holds a PENDING output token until `read`; the next launch takes its input ids for
those requests from `tokens` on the device (`feed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spinserve.runtime.transfer import HostCopy, to_device

from .request import PENDING, Request


@dataclass
class InFlight:
    reqs: list[Request]  # in launch order (the rows of `tokens`)
    index: list[int]  # where each request's token goes in its output_ids
    tokens: torch.Tensor  # [B] int64 sampled tokens, on the device
    host: HostCopy  # of tokens
    rows: dict[Request, int]  # request -> its row (requests hash by identity)
    # requests that ended while this launch may still read their pages: freed once it is read
    retired: list[Request] = field(default_factory=list)
    done: bool = False  # waited for: the launch has finished on the device

    @classmethod
    def start(cls, reqs: list[Request], index: list[int], tokens: torch.Tensor) -> InFlight:
        """Queue the copy of `tokens` to the host behind the launch."""
        return cls(reqs, index, tokens, HostCopy(tokens), {r: i for i, r in enumerate(reqs)})

    def read(self) -> list[int]:
        """The tokens on the host (waits for the launch to finish)."""
        self.wait()
        return self.host.host.tolist()

    def wait(self) -> None:
        """Wait for the launch to finish on the device."""
        self.host.wait()
        self.done = True

    def feed(self, reqs: list[Request], input_ids: torch.Tensor) -> torch.Tensor:
        """[B] input ids of the next launch with every request whose last token is in flight
        reading it from `tokens` (device ops only; the other rows keep input_ids')."""
        src = []
        for req in reqs:
            row = self.rows.get(req, -1)
            if row < 0 and req.output_ids and req.output_ids[-1] == PENDING:
                raise AssertionError(f"{req.request_id}: its last token is in no launch")
            src.append(row)
        if max(src) < 0:
            return input_ids
        src_t = to_device(src, torch.int64, input_ids.device)
        return torch.where(src_t >= 0, self.tokens[src_t.clamp(min=0)], input_ids)
