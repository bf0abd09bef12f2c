"""TableUpload: the changes the control plane made to PageDirectory's flat int32 table `meta`
(control/page_directory.py) since the last flush, and the upload that replays them on the
device copy.

Two kinds of change are logged:
  dirty  flat indices whose CPU value the device must get (values are read at flush time, so an
         index may be logged twice: every copy carries the same value);
  moved  HBM slots re-pointed or taken back: the decode graph may have installed them anywhere,
         so the device first clears the entry each one holds there (its own reverse map), then
         takes the dirty values.
`push` packs [indices | values | moved] into one pinned staging buffer (two, used in turn; one is
reused only once its upload has completed), makes ONE non-blocking copy and applies it with
three indexed ops on the device: no sync, no per-page copies.
"""

from __future__ import annotations

import numpy as np
import torch

NONE = -1


class TableUpload:
    def __init__(self, table_gpu: torch.Tensor, reverse_gpu: torch.Tensor, spare: int) -> None:
        self.table_gpu = table_gpu  # [spare + 1] int32 device table (meta_gpu)
        self.reverse_gpu = reverse_gpu  # [num_hbm_slots] int32 view of it: index each slot holds
        self.spare = spare  # a write target for slots holding nothing
        self.device = table_gpu.device
        self.dirty: list[np.ndarray] = []  # table indices changed since the last flush
        self.moved: list[np.ndarray] = []  # HBM slots re-pointed or taken back since then
        # two pinned int32 upload buffers, used in turn: [idx | values | moved HBM slots]
        self._staging = [torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self.flushes = 0

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The logged (dirty indices, moved slots) as int32 arrays; the log starts over."""
        empty = np.zeros(0, dtype=np.int32)
        idx = np.concatenate(self.dirty).astype(np.int32) if self.dirty else empty
        moved = np.concatenate(self.moved).astype(np.int32) if self.moved else empty
        self.dirty, self.moved = [], []
        return idx, moved

    def push(self, idx: np.ndarray, values: np.ndarray, moved: np.ndarray) -> int:
        """On the device: clear the entries `moved` slots hold, then table[idx] = values.
        Returns the number of values written."""
        n, f = idx.size, moved.size
        if n + f == 0:
            return 0
        staging = self._staging_buffer(2 * n + f)
        host = staging.numpy()
        host[:n] = idx
        host[n : 2 * n] = values
        host[2 * n : 2 * n + f] = moved
        upload = staging[: 2 * n + f].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._events[self.flushes % 2] = torch.cuda.Event()
            self._events[self.flushes % 2].record()
        self.flushes += 1
        if f:  # the graph may have installed these slots anywhere: follow the device reverse map
            held = self.reverse_gpu.index_select(0, upload[2 * n :].long()).long()
            self.table_gpu.index_fill_(0, torch.where(held >= 0, held, self.spare), NONE)
        if n:
            self.table_gpu.index_copy_(0, upload[:n].long(), upload[n : 2 * n])
        return n

    def _staging_buffer(self, size: int) -> torch.Tensor:
        """One of two pinned int32 buffers (used in turn), reused only once its upload is done."""
        turn = self.flushes % 2  # push() advances flushes after recording the event
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # two flushes ago: long done in practice
        if self._staging[turn].numel() < size:
            cap = max(size, 2 * self._staging[turn].numel(), 1024)
            pin = self.device.type == "cuda"
            self._staging[turn] = torch.empty(cap, dtype=torch.int32, pin_memory=pin)
        return self._staging[turn]
