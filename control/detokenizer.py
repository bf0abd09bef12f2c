"""Incremental detokenization for streams: emit only text that is final.

Text is final when it does not end in a partial UTF-8 character (the tokenizer then yields
U+FFFD) and cannot be the beginning of a stop string (held back until the next token decides).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def _stop_cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Characters at the end that could start a stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the newly final text (may be empty)."""
        self.token_ids.extend(token_ids)
        text = self._text()
        cut = self._stop_cut(text)
        if cut is not None:
            end = cut
        else:
            end = len(text) - self._held_back(text)
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta

    def finish(self, final_text: str | None = None) -> str:
        """The rest of the text once the request finished (final_text: engine's cut text)."""
        text = final_text if final_text is not None else self._text()
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta
