"""runtime/transfer.py: the pinned staging ring's reuse rule and values (CPU: plain memory and
recorded fake events stand in for pinned memory and CUDA events), and to_device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spinserve.runtime.transfer import (
    ALIGN,
    RING_BYTES,
    HostCopy,
    StagingRing,
    to_device,
    upload,
)


class FakeEvent:
    log: list[int] = []
    count = 0

    def __init__(self) -> None:
        FakeEvent.count += 1
        self.id = FakeEvent.count

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        FakeEvent.log.append(self.id)


def stage(ring: StagingRing, x: np.ndarray) -> torch.Tensor:
    """x's values in the ring's next region, its copy registered (as upload does)."""
    v = ring.region(x.shape, torch.from_numpy(x).dtype)
    v.numpy()[...] = x
    ring.copied()
    return v


def test_ring_reuses_a_region_only_after_its_copy_and_keeps_values():
    FakeEvent.log, FakeEvent.count = [], 0
    ring = StagingRing(16 * ALIGN, False, FakeEvent)  # 16 blocks, arrays up to 4 staged
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 1000, (3, 20), dtype=np.int32),  # 240 B: block 0
        rng.integers(-(2**40), 2**40, 64, dtype=np.int64),  # 512 B: blocks 1-2
        rng.integers(0, 1000, ALIGN // 4, dtype=np.int32),  # 256 B: block 3
    ]
    views = [stage(ring, x) for x in arrays]
    for v, x in zip(views, arrays):
        assert v.dtype == torch.from_numpy(x).dtype and v.shape == x.shape
        np.testing.assert_array_equal(v.numpy(), x)
    for _ in range(3):  # blocks 4-7, 8-11, 12-15: the ring is full, nothing waited for
        stage(ring, rng.integers(0, 9, ALIGN, dtype=np.int32))
    assert FakeEvent.log == [] and ring.head == 16 * ALIGN
    # 2 blocks: wrap to 0, wait for the copies of blocks 0 and 1-2 (events 1, 2) only
    x = rng.integers(0, 9, 2 * ALIGN // 4, dtype=np.int32)
    v = stage(ring, x)
    assert FakeEvent.log == [1, 2] and ring.head == 2 * ALIGN
    np.testing.assert_array_equal(v.numpy(), x)
    np.testing.assert_array_equal(views[2].numpy(), arrays[2])  # block 3 untouched
    ring.region((2 * ALIGN,), torch.int8)  # blocks 2-3: event 3 (block 3) now
    assert FakeEvent.log == [1, 2, 3]
    assert ring.region((4 * ALIGN + 1,), torch.uint8) is None  # over a quarter: not staged


def test_to_device_upload_and_host_copy_on_cpu():
    out = to_device([3, 1, 2], torch.int32, "cpu")
    assert out.dtype == torch.int32 and out.tolist() == [3, 1, 2]
    filled = upload((2, 3), torch.int64, "cpu", lambda h: h.__setitem__(..., [[1, 2, 3]]))
    assert filled.dtype == torch.int64 and filled.tolist() == [[1, 2, 3], [1, 2, 3]]
    src = torch.arange(5)
    snap = HostCopy(src)
    src.zero_()
    assert snap.wait().tolist() == [0, 1, 2, 3, 4]  # a snapshot


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_through_the_ring_while_the_gpu_is_busy():
    """Many more staged bytes than the ring holds, queued behind a long kernel: every copy
    still lands with its own values (a region is reused only after its copy ran)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # the copies below queue behind ~tens of ms of GPU work
    rng = np.random.default_rng(1)
    sent, got = [], []
    for _ in range(40):  # ~5x the ring in int64 arrays of up to a quarter of it
        n = int(rng.integers(1, RING_BYTES // 4 // 8))
        x = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
        sent.append(x.copy())
        got.append(to_device(x, torch.int64, "cuda"))
        x[:] = 0  # the caller may reuse its array at once
    torch.cuda.synchronize()
    for x, t in zip(sent, got):
        np.testing.assert_array_equal(t.cpu().numpy(), x)
