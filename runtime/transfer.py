"""Host-to-device copies that do not stall the host.

A plain `tensor.to("cuda")` from pageable memory synchronizes the stream, so a control plane
that prepares step N+1 while step N runs on the GPU would wait for step N at every copy.
`to_device` stages through pinned memory and copies non-blocking instead: torch's pinned
allocator keeps the staging block until the copy has run, so the source may change right after.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (a numpy array or a list) as a new tensor on `device`, without a host sync."""
    host = torch.as_tensor(np.ascontiguousarray(values), dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's values copied to the host behind the work queued so far, read later
    without stalling the launches in between (a snapshot: later writes to the source do not
    show)."""

    def __init__(self, source: torch.Tensor) -> None:
        self.done: torch.cuda.Event | None = None
        if source.is_cuda:
            self.host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self.host.copy_(source, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = source.clone()

    def wait(self) -> torch.Tensor:
        """The host copy (waits for the copy, hence for the work queued before it)."""
        if self.done is not None:
            self.done.synchronize()
        return self.host
