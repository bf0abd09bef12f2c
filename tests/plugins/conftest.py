"""Plugin tests: CPU tests run the Triton kernels in Triton's interpreter (per test, so the flag
never leaks into other packages' tests); `gpu` tests run them compiled on CUDA."""

from __future__ import annotations

import pytest


@pytest.fixture()
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run Triton kernels on CPU tensors through TRITON_INTERPRET=1 for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
