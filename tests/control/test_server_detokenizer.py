"""IncrementalDetokenizer: streamed text equals the offline decode, never splits a UTF-8
character, and stops at stop strings without ever streaming part of one."""

from __future__ import annotations

import random

import pytest
from tiny_models import make_tokenizer

from spinserve.control.stream_detokenizer import IncrementalDetokenizer

# multi-byte characters (2-3 UTF-8 bytes) whose every byte the tiny tokenizer's vocabulary holds
ALPHABET = list("abc xyz.,!\n") + ["é", "ü", "ñ", "文", "€", "あ", "—", "→", "♥"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out.append(ids[i : i + n])
        i += n
    return out


def _stream(tok, ids: list[int], rng: random.Random, stop=()) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, stop)
    pieces = [detok.push(c) for c in _chunks(ids, rng)]
    pieces.append(detok.flush())
    return pieces, detok.text


@pytest.mark.parametrize("seed", range(6))
def test_valid_text_streams_whole_characters(tok, seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(20, 60)))
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level: one token per byte, so characters split
    assert len(ids) > len(text)  # the multi-byte characters span several tokens
    pieces, final = _stream(tok, ids, rng)
    assert "".join(pieces) == text == final
    assert all("\ufffd" not in p for p in pieces)  # no piece holds half a character


@pytest.mark.parametrize("seed", range(6))
def test_random_tokens_match_offline_decode(tok, seed):
    """A random model emits arbitrary bytes (invalid UTF-8 included): the concatenated stream
    must still equal decoding all tokens at once, as offline generate does."""
    rng = random.Random(100 + seed)
    ids = [rng.randrange(0, 253) for _ in range(rng.randint(10, 80))]
    pieces, _ = _stream(tok, ids, rng)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tok):
    ids = tok.encode("ab", add_special_tokens=False) + [tok.eos_token_id]
    pieces, _ = _stream(tok, ids, random.Random(0))
    assert "".join(pieces) == "ab"


@pytest.mark.parametrize("seed", range(4))
def test_stop_string_cuts_and_is_never_streamed(tok, seed):
    rng = random.Random(200 + seed)
    head = "".join(rng.choice(ALPHABET[:11] + ["é", "文"]) for _ in range(rng.randint(5, 30)))
    stop = "STOP€"
    text = head + stop + " tail after the stop"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, ["never", stop])
    pieces = []
    for chunk in _chunks(ids, rng):
        pieces.append(detok.push(chunk))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    assert detok.stopped
    assert "".join(pieces) == head == detok.text
    assert all("S" not in p for p in pieces)  # the stop string's first letter never leaked


def test_stop_string_prefix_is_released_when_it_does_not_complete(tok):
    detok = IncrementalDetokenizer(tok, ["END"])
    first = detok.push(tok.encode("abcEN", add_special_tokens=False))
    assert first == "abc"  # "EN" held back: it may begin "END"
    second = detok.push(tok.encode("x", add_special_tokens=False))
    assert first + second + detok.flush() == "abcENx"
    assert not detok.stopped
