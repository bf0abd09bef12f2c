"""Synthetic long-context workloads: request length distributions and prompts of real text.

A Workload is a pair of length distributions (prompt tokens, output tokens) modelled on a public
long-context benchmark; only the lengths are synthetic, the prompt tokens are real prose (the
King James Bible, through Debian's `bible` reader) cut at random offsets, so every prompt is
distinct text and no two requests share a prefix.

    wl = WORKLOADS["longgenbench"].fit_context(8192)      # scaled so that in + out <= 8K
    reqs = make_requests(wl, tokenizer, num_requests=64, seed=0)
    reqs[0].prompt_ids, reqs[0].prompt_len, reqs[0].output_len

Each length is lo + (hi - lo) * Beta(a, b) with a / (a + b) set so that the mean is the
benchmark's mean (a + b = CONCENTRATION), rounded to whole tokens. Scaling by a factor multiplies
lo, hi and mean alike (each kept >= 1 token). `with_fixed(input_len=, output_len=)` pins a length
(scaling and fit_context then leave it alone and fit the other one into what remains).

Prompt token ids (`prompt_ids`): "text" = the text through the engine's tokenizer (default);
"random" = uniform random ids of the vocabulary (special tokens excluded); "text-rank" = each
word of the text mapped to an id by its frequency rank (most frequent word -> the first regular
id), so any vocabulary, e.g. a random-weight engine's synthetic one, gets prompts with the
repetition statistics of real text.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

CONCENTRATION = 4.0  # a + b of the Beta: 4 gives a broad, single-humped spread
KJV_READER = "bible"  # Debian package bible-kjv (text in bible-kjv-text)
KJV_INSTALL = "apt-get install -y bible-kjv bible-kjv-text"
MIN_TEXT_CHARS = 200_000  # tokenize at least this much text: room for distinct offsets


@dataclass(frozen=True)
class LengthDist:
    """Token lengths in [lo, hi] with the given mean (lo < mean < hi, or all three equal)."""

    lo: int
    hi: int
    mean: float

    def __post_init__(self) -> None:
        if not (1 <= self.lo <= self.mean <= self.hi):
            raise ValueError(f"LengthDist needs 1 <= lo <= mean <= hi, got {self}")
        if self.lo < self.hi and not self.lo < self.mean < self.hi:
            raise ValueError(f"LengthDist mean must lie strictly inside (lo, hi): {self}")

    @property
    def beta_params(self) -> tuple[float, float]:
        """(a, b) of the Beta on [lo, hi] whose mean is `mean`."""
        frac = (self.mean - self.lo) / (self.hi - self.lo)
        return frac * CONCENTRATION, (1.0 - frac) * CONCENTRATION

    def scaled(self, factor: float) -> LengthDist:
        lo = max(1, round(self.lo * factor))
        hi = max(lo, round(self.hi * factor))
        if lo == hi:
            return LengthDist(lo, hi, float(lo))
        return LengthDist(lo, hi, min(max(self.mean * factor, lo + 0.5), hi - 0.5))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n] int64 lengths in [lo, hi]."""
        if self.lo == self.hi:
            return np.full(n, self.lo, dtype=np.int64)
        a, b = self.beta_params
        x = self.lo + (self.hi - self.lo) * rng.beta(a, b, size=n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)


LENGTHS = ("input_len", "output_len")


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: LengthDist
    output_len: LengthDist
    scale: float = 1.0  # factor applied to the published lengths (of the lengths not pinned)
    pinned: frozenset[str] = frozenset()  # of LENGTHS: fixed lengths that scaling leaves alone

    @property
    def max_total_tokens(self) -> int:
        return self.input_len.hi + self.output_len.hi

    def with_fixed(self, input_len: int | None = None, output_len: int | None = None) -> Workload:
        """Every request gets exactly these lengths (None: keep the distribution)."""
        wl = self
        for name, n in zip(LENGTHS, (input_len, output_len)):
            if n is not None:
                if n < 1:
                    raise ValueError(f"a fixed {name} must be >= 1 token, got {n}")
                wl = replace(wl, **{name: LengthDist(n, n, float(n))}, pinned=wl.pinned | {name})
        return wl

    def scaled(self, factor: float) -> Workload:
        if factor <= 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        new = {n: getattr(self, n).scaled(factor) for n in LENGTHS if n not in self.pinned}
        return replace(self, **new, scale=self.scale * factor)

    def fit_context(self, max_context: int) -> Workload:
        """Scaled down (never up) so that the longest prompt + longest output fit max_context;
        pinned lengths stay as they are and the others share what they leave."""
        fixed = sum(getattr(self, n).hi for n in LENGTHS if n in self.pinned)
        free = self.max_total_tokens - fixed
        room = max_context - fixed
        if room < len(LENGTHS) - len(self.pinned):  # an unpinned length needs >= 1 token
            raise ValueError(
                f"the fixed lengths ({fixed} tokens) leave no room in a {max_context}-token "
                "context: shorten them or raise the context"
            )
        if free == 0:
            return self
        factor = min(1.0, room / free)
        wl = self.scaled(factor)
        while wl.max_total_tokens > max_context:  # rounding can overshoot by a token or two
            factor *= 1 - 1 / max_context
            wl = self.scaled(factor)
        return wl

    def describe(self) -> dict:
        d: dict = {"workload": self.name, "scale": self.scale}
        for name in LENGTHS:
            dist = getattr(self, name)
            d[name] = {"lo": dist.lo, "hi": dist.hi, "mean": dist.mean}
            if name in self.pinned:
                d[name]["fixed"] = True
        return d


WORKLOADS: dict[str, Workload] = {
    # LongBench-v2 (Bai et al., 2024): contexts of 32K-120K tokens, mean ~55K;
    # long-form answers 500-15K tokens, mean ~5K
    "longbench-v2": Workload(
        "longbench-v2", LengthDist(32_000, 120_000, 55_000), LengthDist(500, 15_000, 5_000)
    ),
    # LongGenBench (Wu et al., 2024): 16K-19K prompts (mean 18K) asking for 7K-32K of output
    # (mean 12K): a long-generation, decode-heavy load
    "longgenbench": Workload(
        "longgenbench", LengthDist(16_000, 19_000, 18_000), LengthDist(7_000, 32_000, 12_000)
    ),
}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}: choose one of {sorted(WORKLOADS)}") from None


@dataclass(frozen=True)
class SampleRequest:
    prompt_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


# ---- real text -------------------------------------------------------------------------------
def _clean_kjv(raw: str) -> str:
    """`bible` output -> prose: drop "Book N" headings and verse numbers, join lines."""
    lines = [
        ln for ln in raw.splitlines() if ln.strip() and not re.fullmatch(r"\S+ \d+", ln.strip())
    ]
    text = " ".join(re.sub(r"^\s*\d+ ", "", ln).strip() for ln in lines)
    return re.sub(r"\s+", " ", text)


@lru_cache(maxsize=1)
def kjv_text() -> str:
    """The whole King James Bible as one line of prose (~4.3 MB)."""
    exe = shutil.which(KJV_READER)
    if exe is None:
        raise FileNotFoundError(
            f"no prompt text: the KJV reader `{KJV_READER}` is not installed. Run `{KJV_INSTALL}` "
            "(packages bible-kjv and bible-kjv-text), or pass --text-file PATH"
        )
    try:
        raw = subprocess.run(
            [exe, "gen1:1-rev22:21"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise FileNotFoundError(
            f"no prompt text: `{KJV_READER}` failed ({e}). Reinstall with `{KJV_INSTALL}` "
            "(packages bible-kjv and bible-kjv-text), or pass --text-file PATH"
        ) from None
    text = _clean_kjv(raw)
    if len(text) < MIN_TEXT_CHARS:
        raise FileNotFoundError(
            f"`{KJV_READER}` returned only {len(text)} characters: reinstall bible-kjv-text "
            f"(`{KJV_INSTALL}`) or pass --text-file PATH"
        )
    return text


def load_text(text_file: Path | None = None) -> str:
    if text_file is None:
        return kjv_text()
    text = re.sub(r"\s+", " ", Path(text_file).read_text(errors="replace")).strip()
    if not text:
        raise ValueError(f"text file {text_file} is empty")
    return text


def text_token_ids(tokenizer, text: str, min_tokens: int) -> np.ndarray:
    """[>= min_tokens] int64 token ids of `text` (the text repeats if it is too short)."""
    chars = min(len(text), max(MIN_TEXT_CHARS, 8 * min_tokens))
    ids = np.asarray(tokenizer.encode(text[:chars], add_special_tokens=False), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the prompt text encodes to no tokens")
    while ids.size < min_tokens:
        ids = np.concatenate([ids, ids])
    return ids


PROMPT_IDS = ("text", "random", "text-rank")


def regular_token_ids(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """[n] int64 ids of [0, vocab_size) that are not special tokens (vocab_size defaults to the
    tokenizer's size)."""
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    ids = np.setdiff1d(np.arange(vocab, dtype=np.int64), list(tokenizer.all_special_ids))
    if ids.size == 0:
        raise ValueError("the vocabulary has no regular (non-special) tokens")
    return ids


def text_rank_ids(text: str, regular: np.ndarray, min_tokens: int) -> np.ndarray:
    """[>= min_tokens] int64: the text's words as ids by frequency rank (rank r -> regular[r %
    len]; ties in first-appearance order); the text repeats if it is too short."""
    chars = min(len(text), max(MIN_TEXT_CHARS, 8 * min_tokens))
    words = np.asarray(text[:chars].split())
    if words.size == 0:
        raise ValueError("the prompt text has no words")
    _, first, inverse, counts = np.unique(
        words, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))  # most frequent first
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ids = regular[rank[inverse] % regular.size]
    while ids.size < min_tokens:
        ids = np.concatenate([ids, ids])
    return ids


def make_requests(
    workload: Workload,
    tokenizer,
    num_requests: int,
    seed: int = 0,
    text: str | None = None,
    prompt_ids: str = "text",
    vocab_size: int | None = None,
) -> list[SampleRequest]:
    """num_requests prompts with the workload's lengths (deterministic in seed); prompt_ids as
    the module docstring says (vocab_size: the model's, for "random" and "text-rank")."""
    if prompt_ids not in PROMPT_IDS:
        raise ValueError(f"unknown prompt ids {prompt_ids!r}: choose one of {PROMPT_IDS}")
    rng = np.random.default_rng(seed)
    in_lens = workload.input_len.sample(rng, num_requests)
    out_lens = workload.output_len.sample(rng, num_requests)
    if prompt_ids == "random":
        regular = regular_token_ids(tokenizer, vocab_size)
        return [
            SampleRequest(rng.choice(regular, int(n)).tolist(), int(o))
            for n, o in zip(in_lens, out_lens)
        ]
    text = text if text is not None else kjv_text()
    if prompt_ids == "text-rank":
        ids = text_rank_ids(text, regular_token_ids(tokenizer, vocab_size), int(in_lens.max()))
    else:
        ids = text_token_ids(tokenizer, text, int(in_lens.max()))
    starts = rng.integers(0, ids.size, size=num_requests)
    ring = np.concatenate([ids, ids])  # a window may wrap around the end of the text
    return [
        SampleRequest(ring[s : s + n].tolist(), int(o))
        for s, n, o in zip(starts, in_lens, out_lens)
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m spinserve.perf.workloads --dump-text PATH`: the cleaned KJV prose into a file
    (for machines without `bible`: pass it there as --text-file)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--dump-text", type=Path, required=True)
    args = p.parse_args(argv)
    args.dump_text.parent.mkdir(parents=True, exist_ok=True)
    args.dump_text.write_text(kjv_text())
    print(f"written {args.dump_text} ({args.dump_text.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
