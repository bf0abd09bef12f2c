"""TableUpload: the changes the control plane made to PageDirectory's flat int32 table `meta`
(control/page_directory.py) since the last flush, and the upload that replays them on the
device copy.

Two kinds of change are logged:
  dirty  flat indices whose CPU value the device must get (values are read at flush time, so an
         index may be logged twice: every copy carries the same value);
  moved  HBM slots re-pointed or taken back: the decode graph may have installed them anywhere,
         so the device first clears the entry each one holds there (its own reverse map), then
         takes the dirty values.
`push` packs [indices | values | moved] into one region of the pinned staging ring
(runtime/transfer.upload), makes ONE non-blocking copy and applies it with three indexed ops on
the device: no sync, no per-page copies.
"""

from __future__ import annotations

import numpy as np
import torch

from spinserve.runtime.transfer import upload

NONE = -1


class TableUpload:
    def __init__(self, table_gpu: torch.Tensor, reverse_gpu: torch.Tensor, spare: int) -> None:
        self.table_gpu = table_gpu  # [spare + 1] int32 device table (meta_gpu)
        self.reverse_gpu = reverse_gpu  # [num_hbm_slots] int32 view of it: index each slot holds
        self.spare = spare  # a write target for slots holding nothing
        self.device = table_gpu.device
        self.dirty: list[np.ndarray] = []  # table indices changed since the last flush
        self.moved: list[np.ndarray] = []  # HBM slots re-pointed or taken back since then
        self.flushes = 0  # uploads so far

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

        def fill(host: np.ndarray) -> None:  # [idx | values | moved HBM slots]
            host[:n], host[n : 2 * n], host[2 * n :] = idx, values, moved

        sent = upload((2 * n + f,), torch.int32, self.device, fill)
        self.flushes += 1
        if f:  # the graph may have installed these slots anywhere: follow the device reverse map
            held = self.reverse_gpu.index_select(0, sent[2 * n :].long()).long()
            self.table_gpu.index_fill_(0, torch.where(held >= 0, held, self.spare), NONE)
        if n:
            self.table_gpu.index_copy_(0, sent[:n].long(), sent[n : 2 * n])
        return n
