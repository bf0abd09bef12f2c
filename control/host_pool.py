"""Host page pool: the second level of the KV hierarchy, in pinned, device-mapped host memory.

Every completed KV page has a copy here (DESIGN.md "The KV substrate"). The pool has the HBM
pool's layout, `[num_host_slots, 2, P, head_dim]`, and is allocated with the CUDA driver
(`cuMemHostAlloc` with DEVICEMAP | PORTABLE) so that:
  - the CPU sees it as a torch tensor over the same bytes (`pool_cpu`), and
  - GPU kernels read it directly through UVA (`pool_gpu`, a CUDA tensor over the device pointer
    from `cuMemHostGetDevicePointer`): the miss gather is one kernel, never per-page copies.
Without CUDA (CI, this repo's CPU mode) the pool is a plain CPU tensor and `pool_gpu` is None.

`MappedHostBuffer` is the raw allocation (also used for the host-slot tables of
control/page_directory.py). Every cuda-python failure (driver missing, no device, out of pinned
memory) is raised as one error type, HostPoolError, naming the CUresult.

Lifetime: `close()` (or leaving the `with` block) frees the memory with `cuMemFreeHost`; views
taken before that must not be used afterwards. A finalizer frees it if close() is never called.
"""

from __future__ import annotations

import ctypes
import enum
import weakref
from typing import Any

import numpy as np
import torch

from spinserve.control.slot_allocator import DUMMY_SLOT, SlotAllocator


class HostPoolError(RuntimeError):
    """Pinned host memory could not be set up (the message names the CUDA call and CUresult)."""


class HostMemoryKind(enum.Enum):
    MAPPED_PINNED = "mapped_pinned"  # cuMemHostAlloc(DEVICEMAP | PORTABLE), GPU reads via UVA
    PAGEABLE = "pageable"  # plain CPU tensor, no CUDA


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - cuda-python is a dependency
        raise HostPoolError(f"cuda-python is not importable ({e}); pip install cuda-python") from e
    return driver


def _call(driver: Any, fn_name: str, *args: Any) -> Any:
    """Call driver.<fn_name>(*args); return its value(s); raise HostPoolError on any failure."""
    try:
        result = getattr(driver, fn_name)(*args)
    except Exception as e:  # driver library missing or unloadable
        raise HostPoolError(
            f"{fn_name} failed: CUDA driver unavailable ({type(e).__name__}: {e}). "
            "Run on a machine with an NVIDIA driver, or create the pool with use_cuda=False."
        ) from e
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        name = getattr(err, "name", str(err))
        hint = ""
        if name == "CUDA_ERROR_OUT_OF_MEMORY":
            hint = " (out of pinned host memory: lower the host pool size)"
        raise HostPoolError(f"{fn_name}{args!r} failed with {name}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _CudaArray:
    """Minimal __cuda_array_interface__ exporter of a device pointer as `nbytes` uint8."""

    def __init__(self, dptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (dptr, False),
            "strides": None,
            "version": 3,
        }


class MappedHostBuffer:
    """`nbytes` of pinned host memory mapped into the device address space (all contexts)."""

    def __init__(self, nbytes: int, device_index: int | None = None) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        driver = _driver()
        _call(driver, "cuInit", 0)
        if device_index is None:
            device_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        dev = _call(driver, "cuDeviceGet", device_index)
        ctx = _call(driver, "cuDevicePrimaryCtxRetain", dev)
        _call(driver, "cuCtxPushCurrent", ctx)
        try:
            flags = driver.CU_MEMHOSTALLOC_DEVICEMAP | driver.CU_MEMHOSTALLOC_PORTABLE
            ptr = int(_call(driver, "cuMemHostAlloc", nbytes, flags))
            try:
                dptr = int(_call(driver, "cuMemHostGetDevicePointer", ptr, 0))
            except HostPoolError:
                _call(driver, "cuMemFreeHost", ptr)
                raise
        except HostPoolError:
            _call(driver, "cuCtxPopCurrent")
            _call(driver, "cuDevicePrimaryCtxRelease", dev)
            raise
        _call(driver, "cuCtxPopCurrent")
        self.nbytes = nbytes
        self.device_index = device_index
        self.host_ptr = ptr
        self.device_ptr = dptr
        self._finalizer = weakref.finalize(self, _free, driver, ptr, dev)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Free the memory (cuMemFreeHost). Idempotent; views taken earlier become invalid."""
        self._finalizer()

    def cpu_view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A CPU tensor over the pinned bytes (no copy)."""
        self._check_open()
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.host_ptr)
        return _shape_bytes(torch.frombuffer(raw, dtype=torch.uint8), dtype, shape)

    def gpu_view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A CUDA tensor over the same bytes through UVA (no copy; reads cross PCIe)."""
        self._check_open()
        device = torch.device("cuda", self.device_index)
        raw = torch.as_tensor(_CudaArray(self.device_ptr, self.nbytes), device=device)
        return _shape_bytes(raw, dtype, shape)

    def numpy_view(self, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array over the pinned bytes (no copy)."""
        self._check_open()
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.host_ptr)
        return np.frombuffer(raw, dtype=np.uint8).view(dtype)[: int(np.prod(shape))].reshape(shape)

    def _check_open(self) -> None:
        if self.closed:
            raise HostPoolError("the mapped host buffer was closed (cuMemFreeHost already ran)")


def _free(driver: Any, ptr: int, dev: Any) -> None:
    _call(driver, "cuMemFreeHost", ptr)
    _call(driver, "cuDevicePrimaryCtxRelease", dev)


def _shape_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape))
    return raw[: numel * itemsize].view(dtype).view(shape)


class HostPagePool:
    """The host KV pool `[num_host_slots, 2, P, head_dim]` plus its slot allocator.

    Slot 0 is the reserved dummy (zeroed; padding rows read it). `alloc_slots` raises
    OutOfSlotsError with a remedy when the pool is exhausted, changing nothing.
    """

    def __init__(
        self,
        num_host_slots: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        use_cuda: bool | None = None,
        device_index: int | None = None,
    ) -> None:
        if use_cuda is None:
            use_cuda = torch.cuda.is_available()
        self.shape = (num_host_slots, 2, page_size, head_dim)
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = int(np.prod(self.shape)) * itemsize
        self._buffer: MappedHostBuffer | None = None
        # [num_host_slots, 2, P, head_dim] dtype: host copy of every completed page (0 = K, 1 = V)
        self.pool_cpu: torch.Tensor | None
        # same bytes as pool_cpu seen from the GPU through UVA; None without CUDA
        self.pool_gpu: torch.Tensor | None = None
        if use_cuda:
            self.kind = HostMemoryKind.MAPPED_PINNED
            self._buffer = MappedHostBuffer(self.nbytes, device_index)
            self.pool_cpu = self._buffer.cpu_view(dtype, self.shape)
            self.pool_gpu = self._buffer.gpu_view(dtype, self.shape)
        else:
            self.kind = HostMemoryKind.PAGEABLE
            self.pool_cpu = torch.zeros(self.shape, dtype=dtype)
        self.pool_cpu[DUMMY_SLOT].zero_()
        self.allocator = SlotAllocator(
            num_host_slots,
            name="host KV pool",
            remedy="Raise the host pool size (num_host_slots), or let new requests wait until "
            "running ones finish",
        )

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def alloc_slots(self, num: int) -> np.ndarray:
        return self.allocator.alloc(num)

    def free_slots(self, slots: np.ndarray) -> None:
        self.allocator.free(slots)

    @property
    def pool_for_kernels(self) -> torch.Tensor:
        """The view kernels read: the UVA view with CUDA, else the CPU tensor."""
        if self.pool_cpu is None:
            raise HostPoolError("the host pool was closed")
        return self.pool_gpu if self.pool_gpu is not None else self.pool_cpu

    def close(self) -> None:
        """Release the memory (cuMemFreeHost with CUDA). Idempotent."""
        self.pool_cpu = None
        self.pool_gpu = None
        if self._buffer is not None:
            self._buffer.close()

    def __enter__(self) -> HostPagePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
