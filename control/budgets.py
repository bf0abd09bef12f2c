"""Per-request HBM budgets (DESIGN.md "Locality-aware cache manager").

A request's HBM budget = mandatory pages (what its Select may pick in one step) + buffer pages
(recently used pages kept for locality). The buffer starts at `buffer_ratio` x mandatory (SPIN
found hit rates saturate near 4x). Between steps the control plane resizes buffers within the
global pool from each request's observed hit rate:
  - gain = change in hit rate per mandatory-worth of buffer, measured between the last two
    resizes; a request with no measurement yet counts as rising while it still misses;
  - rising requests (gain > gain_threshold) ask for `step_ratio` x mandatory more; grants go to
    the highest gain first, from free pool pages, then from saturated requests' buffers
    (lowest gain first);
  - under pressure (budgets exceed the pool) buffers shrink, lowest gain first, down to
    `min_buffer_ratio` x mandatory, before any preemption; only what is still missing then is
    reported as `pages_short` (the scheduler preempts, `choose_preemptions`).
Everything is a pure function of arrays (one entry per running request); units are pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    buffer_ratio: float = 4.0  # initial buffer = buffer_ratio x mandatory
    min_buffer_ratio: float = 0.0  # floor under pressure (0: mandatory pages only)
    max_buffer_ratio: float = 8.0  # ceiling when growing
    step_ratio: float = 0.5  # one resize moves a buffer by step_ratio x mandatory
    gain_threshold: float = 0.01  # hit-rate gain per mandatory-worth of buffer worth growing for

    def __post_init__(self) -> None:
        if not 0 <= self.min_buffer_ratio <= self.buffer_ratio <= self.max_buffer_ratio:
            raise ValueError(
                "BudgetPolicy needs 0 <= min_buffer_ratio <= buffer_ratio <= max_buffer_ratio, "
                f"got {self.min_buffer_ratio}, {self.buffer_ratio}, {self.max_buffer_ratio}"
            )
        if self.step_ratio <= 0:
            raise ValueError(f"BudgetPolicy.step_ratio must be > 0, got {self.step_ratio}")


@dataclass(frozen=True, slots=True)
class Observation:
    """Per-request arrays ([n] each) the resize reads; hit rates in [0, 1], NaN = unknown."""

    mandatory_pages: np.ndarray
    buffer_pages: np.ndarray  # current buffer
    hit_rate: np.ndarray  # observed with the current buffer
    prev_buffer_pages: np.ndarray  # buffer at the previous resize (-1 = none)
    prev_hit_rate: np.ndarray  # observed with it


@dataclass(frozen=True, slots=True)
class BudgetPlan:
    buffer_pages: np.ndarray  # [n] int64: new buffer per request
    pages_short: int  # > 0: pool still short with every buffer at its floor: preempt


def buffer_bounds(mandatory: np.ndarray, policy: BudgetPolicy) -> tuple[np.ndarray, np.ndarray]:
    """([n] floor, [n] ceiling) of each request's buffer, in pages."""
    m = np.asarray(mandatory, dtype=np.int64)
    lo = np.floor(m * policy.min_buffer_ratio).astype(np.int64)
    hi = np.floor(m * policy.max_buffer_ratio).astype(np.int64)
    return lo, hi


def initial_buffer(mandatory: int, policy: BudgetPolicy) -> int:
    return int(mandatory * policy.buffer_ratio)


def hit_rate(hits: np.ndarray, lookups: np.ndarray) -> np.ndarray:
    """[n] float64 hits / lookups, NaN where nothing was looked up."""
    hits, lookups = np.asarray(hits, np.float64), np.asarray(lookups, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lookups > 0, hits / lookups, np.nan)


def hit_rate_gain(obs: Observation) -> np.ndarray:
    """[n] hit-rate change per mandatory-worth of buffer between the last two resizes.
    Unknown (no previous buffer, same buffer, or NaN rates): +inf while the request still misses
    (explore), else 0."""
    m = np.maximum(np.asarray(obs.mandatory_pages, np.float64), 1.0)
    db = (np.asarray(obs.buffer_pages, np.float64) - obs.prev_buffer_pages) / m
    dh = np.asarray(obs.hit_rate, np.float64) - obs.prev_hit_rate
    known = (np.asarray(obs.prev_buffer_pages) >= 0) & (db != 0) & np.isfinite(dh)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(known, dh / np.where(db == 0, 1.0, db), 0.0)
    missing = ~(np.asarray(obs.hit_rate) >= 1.0)  # NaN counts as missing
    return np.where(known, gain, np.where(missing, np.inf, 0.0))


def resize_buffers(obs: Observation, pool_pages: int, policy: BudgetPolicy) -> BudgetPlan:
    """New buffers for the running requests so that sum(mandatory + buffer) <= pool_pages when
    possible. See the module docstring for the rule."""
    m = np.asarray(obs.mandatory_pages, dtype=np.int64)
    buf = np.asarray(obs.buffer_pages, dtype=np.int64)
    lo, hi = buffer_bounds(m, policy)
    buf = np.clip(buf, lo, hi)
    gain = hit_rate_gain(obs)
    free = pool_pages - int(m.sum() + buf.sum())
    if free < 0:
        buf, free = _shrink(buf, lo, gain, -free)
        return BudgetPlan(buf, max(0, -free))
    step = np.maximum(1, np.round(m * policy.step_ratio)).astype(np.int64)
    rising = gain > policy.gain_threshold
    want = np.where(rising, np.minimum(step, hi - buf), 0)
    # donors: saturated requests, lowest gain first, each giving at most one step
    give = np.where(rising, 0, np.minimum(step, buf - lo))
    available = free + int(give.sum())
    grant = _take_in_order(want, -gain, available)  # highest gain first
    taken = max(0, int(grant.sum()) - free)
    donated = _take_in_order(give, gain, taken)  # lowest gain first
    return BudgetPlan(buf + grant - donated, 0)


def _shrink(
    buf: np.ndarray, lo: np.ndarray, gain: np.ndarray, excess: int
) -> tuple[np.ndarray, int]:
    """Cut `excess` pages from buffers, lowest gain first, none below its floor.
    Returns (new buffers, pages still missing as a negative free count, or >= 0)."""
    cut = _take_in_order(buf - lo, gain, excess)
    return buf - cut, int(cut.sum()) - excess


def _take_in_order(amount: np.ndarray, key: np.ndarray, total: int) -> np.ndarray:
    """Take up to amount[i] from each entry in ascending `key` order (ties: lower index first)
    until `total` is reached: [n] int64 taken per entry."""
    amount = np.maximum(np.asarray(amount, dtype=np.int64), 0)
    order = np.lexsort((np.arange(amount.size), key))
    before = np.concatenate([[0], np.cumsum(amount[order])[:-1]])
    taken = np.zeros_like(amount)
    taken[order] = np.clip(total - before, 0, amount[order])
    return taken


def choose_preemptions(
    mandatory: np.ndarray, floor_buffer: np.ndarray, arrival_order: np.ndarray, pages_short: int
) -> np.ndarray:
    """Indices of requests to preempt, latest arrival first, until their budgets at the floor
    (mandatory + floor buffer) cover `pages_short`."""
    if pages_short <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-np.asarray(arrival_order), kind="stable")
    freed = np.cumsum((np.asarray(mandatory) + np.asarray(floor_buffer))[order])
    count = int(np.searchsorted(freed, pages_short) + 1)
    return order[: min(count, order.size)]
