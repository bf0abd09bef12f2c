"""Triton plumbing shared by the kernels: lazy JIT (interpreter or compiled), device facts.

Kernels are defined as plain functions and compiled on first launch by `LazyKernel`, so the
choice between Triton's CPU interpreter (TRITON_INTERPRET=1) and real compilation is made at
launch time, not at import time: a test process may import the plugins before it sets the flag.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:  # triton is absent on some CPU-only installs; the references still work there
    import triton
    from triton import knobs

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    knobs = None
    HAS_TRITON = False


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and bool(knobs.runtime.interpret)


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors under the interpreter (tests)."""
    return HAS_TRITON and (t.is_cuda or interpret_mode())


class LazyKernel:
    """`kernel[grid](...)` like a @triton.jit function, compiled for the current mode."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._by_mode: dict[bool, Any] = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: Any) -> Any:
        mode = interpret_mode()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            if mode:
                _fix_interpreter_index()
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        launch = kernel[grid]
        if not mode:
            return launch

        def interpreted_launch(*args: Any, **kwargs: Any) -> Any:
            with _library_calls_interpreted():
                return launch(*args, **kwargs)

        return interpreted_launch


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element numpy array) into a Python int with
    int(array), which numpy >= 2.4 refuses for arrays of one dimension; loops with run-time
    bounds then fail. Patch the conversion to take the single element."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "spin_fixed", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.spin_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_INTERPRETED: dict[Any, Any] = {}


@contextlib.contextmanager
def _library_calls_interpreted() -> Iterator[None]:
    """triton.language's own @jit helpers (tl.sum, tl.max, tl.cdiv, ...) were compiled-mode
    objects if triton was imported before TRITON_INTERPRET=1 was set; while an interpreted kernel
    runs, route their calls through the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        fn = _INTERPRETED.get(id(self))
        if fn is None:
            fn = _INTERPRETED[id(self)] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    return LazyKernel(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a nominal 132 for CPU / interpreter runs)."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 dots wrongly: there every dot runs on float32 operands."""
    return interpret_mode() or dtype == torch.float32
