from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from cuda.bindings import driver as real_driver

from spinserve.control import host_pool
from spinserve.control.host_pool import (
    HostMemoryKind,
    HostPagePool,
    HostPoolError,
    MappedHostBuffer,
)
from spinserve.control.slot_allocator import OutOfSlotsError

OK = real_driver.CUresult.CUDA_SUCCESS


class FakeDriver:
    """cuda.bindings.driver stand-in: real CUresult values, host memory from ctypes."""

    CUresult = real_driver.CUresult
    CU_MEMHOSTALLOC_DEVICEMAP = real_driver.CU_MEMHOSTALLOC_DEVICEMAP
    CU_MEMHOSTALLOC_PORTABLE = real_driver.CU_MEMHOSTALLOC_PORTABLE

    def __init__(self, fail: dict[str, real_driver.CUresult] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[str] = []
        self.buffers: dict[int, ctypes.Array] = {}

    def _ret(self, name, *values):
        self.calls.append(name)
        return (self.fail.get(name, OK), *values)

    def cuInit(self, flags):
        return self._ret("cuInit")

    def cuDeviceGet(self, index):
        return self._ret("cuDeviceGet", index)

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._ret("cuDevicePrimaryCtxRetain", "ctx")

    def cuDevicePrimaryCtxRelease(self, dev):
        return self._ret("cuDevicePrimaryCtxRelease")

    def cuCtxPushCurrent(self, ctx):
        return self._ret("cuCtxPushCurrent")

    def cuCtxPopCurrent(self):
        return self._ret("cuCtxPopCurrent", "ctx")

    def cuMemHostAlloc(self, nbytes, flags):
        assert flags == self.CU_MEMHOSTALLOC_DEVICEMAP | self.CU_MEMHOSTALLOC_PORTABLE
        if "cuMemHostAlloc" in self.fail:
            return self._ret("cuMemHostAlloc", 0)
        buf = (ctypes.c_uint8 * nbytes)()
        self.buffers[ctypes.addressof(buf)] = buf
        return self._ret("cuMemHostAlloc", ctypes.addressof(buf))

    def cuMemHostGetDevicePointer(self, ptr, flags):
        return self._ret("cuMemHostGetDevicePointer", ptr)

    def cuMemFreeHost(self, ptr):
        del self.buffers[ptr]
        return self._ret("cuMemFreeHost")


def test_cpu_pool_without_cuda():
    with HostPagePool(6, page_size=4, head_dim=8, dtype=torch.float16, use_cuda=False) as pool:
        assert pool.kind is HostMemoryKind.PAGEABLE and pool.pool_gpu is None
        assert pool.pool_cpu.shape == (6, 2, 4, 8) and pool.pool_cpu.dtype == torch.float16
        assert pool.pool_for_kernels is pool.pool_cpu
        assert pool.nbytes == 6 * 2 * 4 * 8 * 2
        assert not pool.pool_cpu[0].any()
        np.testing.assert_array_equal(pool.alloc_slots(3), [1, 2, 3])
        assert pool.num_free == 2
    assert pool.pool_cpu is None
    with pytest.raises(HostPoolError, match="closed"):
        pool.pool_for_kernels  # noqa: B018
    pool.close()  # idempotent


def test_out_of_host_pool_is_refused_with_remedy_and_changes_nothing():
    pool = HostPagePool(5, page_size=2, head_dim=2, dtype=torch.float32, use_cuda=False)
    held = pool.alloc_slots(3)
    with pytest.raises(
        OutOfSlotsError,
        match=r"host KV pool: 2 slots requested, 1 free of 4.*"
        r"Raise the host pool size",
    ):
        pool.alloc_slots(2)
    assert pool.num_free == 1
    pool.free_slots(held)
    assert pool.num_free == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path")
def test_no_driver_is_one_clear_error():
    with pytest.raises(HostPoolError, match=r"cuInit failed: CUDA driver unavailable"):
        MappedHostBuffer(4096)
    with pytest.raises(HostPoolError, match="use_cuda=False"):
        HostPagePool(4, 16, 64, use_cuda=True)


@pytest.mark.parametrize(
    "call, result, match",
    [
        (
            "cuMemHostAlloc",
            real_driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY,
            "cuMemHostAlloc.*CUDA_ERROR_OUT_OF_MEMORY.*out of pinned host memory",
        ),
        ("cuInit", real_driver.CUresult.CUDA_ERROR_NO_DEVICE, "cuInit.*CUDA_ERROR_NO_DEVICE"),
        (
            "cuDeviceGet",
            real_driver.CUresult.CUDA_ERROR_INVALID_DEVICE,
            "cuDeviceGet.*CUDA_ERROR_INVALID_DEVICE",
        ),
        (
            "cuMemHostGetDevicePointer",
            real_driver.CUresult.CUDA_ERROR_NOT_SUPPORTED,
            "cuMemHostGetDevicePointer.*CUDA_ERROR_NOT_SUPPORTED",
        ),
    ],
)
def test_cuda_failures_become_host_pool_error(monkeypatch, call, result, match):
    fake = FakeDriver(fail={call: result})
    monkeypatch.setattr(host_pool, "_driver", lambda: fake)
    with pytest.raises(HostPoolError, match=match):
        HostPagePool(4, 16, 64, use_cuda=True, device_index=0)
    assert fake.buffers == {}  # nothing leaked
    if "cuDevicePrimaryCtxRetain" in fake.calls:  # the context went back
        assert fake.calls.count("cuDevicePrimaryCtxRelease") == 1
        assert fake.calls.count("cuCtxPopCurrent") == 1


def test_mapped_buffer_views_share_memory_and_free_once(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(host_pool, "_driver", lambda: fake)
    buf = MappedHostBuffer(64, device_index=0)
    assert buf.device_ptr == buf.host_ptr and list(fake.buffers) == [buf.host_ptr]
    t = buf.cpu_view(torch.float32, (4, 4))
    a = buf.numpy_view(np.int32, (2, 8))
    t[1, 2] = 1.0
    assert a[0, 6] == np.float32(1.0).view(np.int32)
    a[1, 7] = 5
    assert t[3, 3].view(torch.int32).item() == 5
    buf.close()
    buf.close()
    assert fake.calls.count("cuMemFreeHost") == 1 and fake.buffers == {}
    with pytest.raises(HostPoolError, match="closed"):
        buf.cpu_view(torch.float32, (4, 4))


@pytest.mark.gpu
def test_real_mapped_pool_uva_roundtrip_and_graph():
    pool = HostPagePool(64, page_size=16, head_dim=64, dtype=torch.bfloat16, use_cuda=True)
    assert pool.kind is HostMemoryKind.MAPPED_PINNED
    assert pool.pool_gpu.is_cuda and pool.pool_gpu.shape == (64, 2, 16, 64)
    data = torch.randn(63, 2, 16, 64).to(torch.bfloat16)
    pool.pool_cpu[1:] = data
    idx = torch.tensor([5, 1, 63, 0], device="cuda")
    got = pool.pool_gpu[idx].cpu()  # a gather kernel reading host memory through UVA
    torch.testing.assert_close(got[:3], data[[4, 0, 62]], rtol=0, atol=0)
    assert not got[3].any()
    pool.pool_gpu[7] = 2.0  # a GPU write lands in host memory
    torch.cuda.synchronize()
    assert (pool.pool_cpu[7] == 2.0).all()
    static_idx = torch.tensor([9], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pool.pool_gpu[static_idx].float().sum()
    for value in (1.0, -3.0):
        pool.pool_cpu[9] = value  # host-side update between replays
        graph.replay()
        torch.cuda.synchronize()
        assert out.item() == value * 2 * 16 * 64
    pool.close()
    with pytest.raises(HostPoolError, match=r"cuMemHostAlloc.*CUDA_ERROR_"):
        MappedHostBuffer(1 << 50)  # 1 PiB of pinned memory cannot exist
