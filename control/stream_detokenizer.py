"""Incremental detokenization for streamed output: text that is final, never half a character.

Decodes a sliding window (the previous chunk + the new tokens) per push, so the cost per token
does not grow with the output's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Token ids in, text out, never splitting a UTF-8 character, cutting at stop strings.

    Decodes a sliding window (the previous chunk + new tokens) and releases text only when the
    window does not end in U+FFFD (an incomplete multi-byte character). With stop strings, the
    last (longest stop - 1) characters are held back until they cannot start a stop string, so
    streamed text always equals the final text.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start (token index)
        self._read_offset = 0  # tokens before this are in self.text
        self._stop = tuple(s for s in stop if s)
        self._hold_chars = max((len(s) for s in self._stop), default=1) - 1
        self._released = 0  # characters of self.text already returned
        self.text = ""
        self.stopped = False  # a stop string was found; self.text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; returns the newly releasable text (maybe empty)."""
        if self.stopped or not token_ids:
            return ""
        self._ids.extend(token_ids)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The request finished: release everything, incomplete characters included."""
        if not self.stopped:
            self._advance(final=True)
        return self._release(final=True)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(prefix) and not final:
            return
        if window.endswith(REPLACEMENT_CHAR) and not final:
            return
        self._append(window[len(prefix) :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def _append(self, new_text: str) -> None:
        search_from = max(len(self.text) - self._hold_chars, 0)
        self.text += new_text
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._hold_chars
        if end <= self._released:
            return ""
        out = self.text[self._released : end]
        self._released = end
        return out
