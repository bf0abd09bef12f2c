"""Rows of the sparse algorithms' index states, one per sparse request from the end of its
prefill until it ends or is preempted. Without the hierarchy they come from a free list; with it
a request's row is its page-directory row (the decode graphs address both with one number)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spinserve.runtime.transfer import to_device

if TYPE_CHECKING:
    from spinserve.runtime.model_runner import ModelRunner

    from .hier_kv_manager import HierarchicalKVManager
    from .kv_manager import PagedKVManager
    from .request import Request


class IndexRows:
    def __init__(
        self,
        runner: ModelRunner,
        kv: PagedKVManager | HierarchicalKVManager,
        hierarchy: bool,
        max_requests: int,
    ) -> None:
        self.runner, self.kv, self.hierarchy = runner, kv, hierarchy
        self.free = list(range(max_requests - 1, -1, -1))  # rows not held (no hierarchy)
        self.of: dict[str, int] = {}  # request id -> its row

    def index_prefill(self, req: Request, algorithm: str, device: str) -> None:
        """Index the request's cached keys for `algorithm` in its row (taken now if it has
        none: a chunked prefill indexes once, at its end)."""
        rid = req.request_id
        row = self.of.get(rid)
        if row is None:
            row = self.of[rid] = self.kv.request_slot(rid) if self.hierarchy else self.free.pop()
        table = to_device(self.kv.request_table(rid), torch.int32, device)
        self.runner.index_prefill(algorithm, row, table, req.num_cached_tokens)

    def release(self, req: Request, algorithm: str) -> None:
        """The request ended or was preempted: its row is cleared and free again."""
        row = self.of.pop(req.request_id, None)
        if row is not None:
            self.runner.release(algorithm, row)
            if not self.hierarchy:  # with the hierarchy the row goes with the directory row
                self.free.append(row)
