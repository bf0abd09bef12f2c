"""Continuous batching: which requests prefill (in chunks) and which decode this step.

Policy, one step:
1. Every running request past its prefill decodes one token (its page for that token is
   allocated now; when the pool is short, the most recently admitted request is preempted:
   its pages are freed and it goes back to the head of the queue to be recomputed).
2. The remaining token budget goes to prefill chunks: first requests already mid-prefill, then
   waiting requests in arrival order (strict FCFS: a request that cannot be admitted blocks the
   ones behind it, so nobody starves). Admission needs pages for the request's whole prefill.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from spinserve.configs.settings import EngineSettings

from .kv_manager import PagedKVManager
from .request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, chunk tokens)
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, settings: EngineSettings, kv: PagedKVManager) -> None:
        self.settings = settings
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        # called before a preemption frees pages: the engine waits there for the decode launch
        # in flight (it may still read them: host-slot tables are read by the GPU in place)
        self.fence: Callable[[], None] = lambda: None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request, free_pages: bool = True) -> None:
        """Drop a request wherever it is and free its pages (free_pages=False: the caller frees
        them later with kv.free, once no launch in flight reads them)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if free_pages:
            self.kv.free(req.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt_last(self, out: SchedulerOutput) -> Request:
        self.fence()
        victim = self.running.pop()
        self.kv.free(victim.request_id)
        victim.num_cached_tokens = 0
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        return victim

    def _schedule_decode(self, out: SchedulerOutput) -> None:
        decoding = [r for r in self.running if not r.in_prefill]
        ids = [r.request_id for r in decoding]
        if self.kv.ensure_decode(ids, [r.num_tokens for r in decoding]):  # room for everyone
            out.decode += decoding
            return
        preempted: set[str] = set()  # request ids preempted by this call
        for req in list(self.running):
            if req.in_prefill or req.request_id in preempted:
                continue
            extra = self.kv.extra_pages(req.request_id, req.num_tokens)
            while extra and extra > self.kv.free_pages:  # free_pages is not free to compute
                victim = self._preempt_last(out)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            if req.request_id not in preempted:
                self.kv.ensure(req.request_id, req.num_tokens)
                out.decode.append(req)

    def _chunk(self, req: Request, budget: int) -> int:
        return min(
            req.prefill_target - req.num_cached_tokens, self.settings.prefill_chunk_tokens, budget
        )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._schedule_decode(out)
        budget = self.settings.max_batched_tokens - len(out.decode)
        for req in self.running:
            if req.in_prefill and budget > 0:
                n = self._chunk(req, budget)
                out.prefill.append((req, n))
                budget -= n
        while (
            self.waiting and budget > 0 and len(self.running) < self.settings.max_running_requests
        ):
            req = self.waiting[0]
            if self.kv.extra_pages(req.request_id, req.prefill_target) > self.kv.free_pages:
                break
            self.waiting.popleft()
            self.kv.ensure(req.request_id, req.prefill_target)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = self._chunk(req, budget)
            out.prefill.append((req, n))
            budget -= n
        return out
