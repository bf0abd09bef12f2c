"""Errors a user can cause while building or loading an engine (shown without a traceback)."""

from __future__ import annotations


class EngineError(Exception):
    """A checkpoint or engine folder that cannot be used; the message names the remedy."""
