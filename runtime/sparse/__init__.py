"""Sparse attention algorithms on the unified partition abstraction (base.py has the contract).

Importing the package registers the built-in algorithms: dense, streaming, quest, shadowkv,
retroinfer. A new algorithm is one module that subclasses SparseAlgorithm and calls
register_algorithm(name, cls).
"""

from __future__ import annotations

from . import dense, quest, retroinfer, shadowkv, streaming  # noqa: F401  (registration)
from .base import (
    PageSelection,
    SparseAlgorithm,
    SparseParams,
    SparseState,
    available_algorithms,
    create_algorithm,
    get_algorithm,
    register_algorithm,
)

__all__ = [
    "PageSelection",
    "SparseAlgorithm",
    "SparseParams",
    "SparseState",
    "available_algorithms",
    "create_algorithm",
    "get_algorithm",
    "register_algorithm",
]
