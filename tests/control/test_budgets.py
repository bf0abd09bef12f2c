from __future__ import annotations

import numpy as np
import pytest

from spinserve.control.budgets import (
    BudgetPolicy,
    Observation,
    buffer_bounds,
    choose_preemptions,
    hit_rate,
    hit_rate_gain,
    initial_buffer,
    resize_buffers,
)

NAN = float("nan")


def _obs(m, buf, h, prev_buf, prev_h):
    a = np.asarray
    return Observation(a(m), a(buf), a(h, float), a(prev_buf), a(prev_h, float))


# request 0: hit rate rose 0.8 -> 0.9 when its buffer went 20 -> 40 (gain 0.05 per mandatory)
# request 1: buffer 20 -> 40 changed nothing (saturated, gain 0)
TWO = dict(m=[10, 10], buf=[40, 40], h=[0.9, 0.7], prev_buf=[20, 20], prev_h=[0.8, 0.7])


def test_policy_validation_and_defaults():
    assert initial_buffer(10, BudgetPolicy()) == 40
    with pytest.raises(ValueError, match="min_buffer_ratio <= buffer_ratio"):
        BudgetPolicy(buffer_ratio=9.0)
    with pytest.raises(ValueError, match="step_ratio"):
        BudgetPolicy(step_ratio=0)
    lo, hi = buffer_bounds(np.array([10, 3]), BudgetPolicy(min_buffer_ratio=0.5))
    assert lo.tolist() == [5, 1] and hi.tolist() == [80, 24]


def test_hit_rate_and_gain_exact():
    assert np.isnan(hit_rate([3, 0], [4, 0])[1]) and hit_rate([3], [4])[0] == 0.75
    obs = _obs(
        m=[10, 10, 10, 10, 10],
        buf=[40, 40, 40, 40, 20],
        h=[0.9, 0.5, 0.7, 1.0, 1.0],
        prev_buf=[20, -1, 40, 20, -1],
        prev_h=[0.8, NAN, 0.7, 1.0, NAN],
    )
    gain = hit_rate_gain(obs)
    assert gain[0] == pytest.approx(0.05)
    assert gain[1] == np.inf and gain[2] == np.inf  # unknown and still missing: explore
    assert gain[3] == 0.0 and gain[4] == 0.0  # flat, or unknown but never missing


def test_rising_request_grows_from_free_pages():
    plan = resize_buffers(_obs(**TWO), pool_pages=1000, policy=BudgetPolicy())
    assert plan.buffer_pages.tolist() == [45, 40] and plan.pages_short == 0


def test_full_pool_moves_pages_from_saturated_to_rising():
    plan = resize_buffers(_obs(**TWO), pool_pages=100, policy=BudgetPolicy())
    assert plan.buffer_pages.tolist() == [45, 35] and plan.pages_short == 0


def test_pressure_shrinks_lowest_gain_first_without_preemption():
    plan = resize_buffers(_obs(**TWO), pool_pages=70, policy=BudgetPolicy())
    assert plan.buffer_pages.tolist() == [40, 10] and plan.pages_short == 0
    plan = resize_buffers(_obs(**TWO), pool_pages=45, policy=BudgetPolicy())
    assert plan.buffer_pages.tolist() == [25, 0] and plan.pages_short == 0


def test_pressure_beyond_floors_reports_shortage():
    plan = resize_buffers(_obs(**TWO), pool_pages=15, policy=BudgetPolicy())
    assert plan.buffer_pages.tolist() == [0, 0] and plan.pages_short == 5
    policy = BudgetPolicy(min_buffer_ratio=1.0)
    plan = resize_buffers(_obs(**TWO), pool_pages=50, policy=policy)
    assert plan.buffer_pages.tolist() == [20, 10] and plan.pages_short == 0
    plan = resize_buffers(_obs(**TWO), pool_pages=30, policy=policy)
    assert plan.buffer_pages.tolist() == [10, 10] and plan.pages_short == 10


def test_growth_capped_by_max_ratio():
    obs = _obs(m=[10], buf=[78], h=[0.5], prev_buf=[70], prev_h=[0.4])
    plan = resize_buffers(obs, pool_pages=10_000, policy=BudgetPolicy())
    assert plan.buffer_pages.tolist() == [80]


def test_choose_preemptions_latest_first():
    picked = choose_preemptions(
        np.array([10, 10, 10]), np.array([0, 0, 5]), np.array([0, 2, 1]), 12
    )
    assert picked.tolist() == [1, 2]
    assert choose_preemptions(np.array([10]), np.array([0]), np.array([0]), 0).tolist() == []
    assert choose_preemptions(
        np.array([4, 4]), np.array([0, 0]), np.array([0, 1]), 99
    ).tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(5))
def test_random_resizes_keep_invariants(seed):
    rng = np.random.default_rng(seed)
    policy = BudgetPolicy(min_buffer_ratio=float(rng.choice([0.0, 0.5, 1.0])))
    for _ in range(300):
        n = int(rng.integers(1, 12))
        m = rng.integers(1, 50, n)
        buf = rng.integers(0, 9 * m + 1)
        prev = np.where(rng.random(n) < 0.3, -1, rng.integers(0, 9 * m + 1))
        h = np.where(rng.random(n) < 0.1, NAN, rng.random(n))
        ph = np.where(rng.random(n) < 0.1, NAN, rng.random(n))
        obs = _obs(m, buf, h, prev, ph)
        pool = int(rng.integers(0, int(m.sum() * 8)))
        plan = resize_buffers(obs, pool, policy)
        lo, hi = buffer_bounds(m, policy)
        new = plan.buffer_pages
        assert ((new >= lo) & (new <= hi)).all()
        floor_total = int(m.sum() + lo.sum())
        if floor_total <= pool:
            assert plan.pages_short == 0 and int(m.sum() + new.sum()) <= pool
        else:
            assert plan.pages_short == floor_total - pool
            np.testing.assert_array_equal(new, lo)
        if int(m.sum() + np.clip(buf, lo, hi).sum()) > pool:  # pressure: only shrinking,
            gain = hit_rate_gain(obs)  # and a higher-gain buffer is cut only after lower ones
            cut = np.clip(buf, lo, hi) - new
            assert (cut >= 0).all()
            for i in np.flatnonzero(cut > 0):
                assert (new[gain < gain[i]] == lo[gain < gain[i]]).all()
