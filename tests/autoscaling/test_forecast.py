"""Holt's linear trend on irregular samples, and the EWMA rate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoscaling.forecast import HoltParams, HoltState, ewma_rate, holt_fit, holt_update

P = HoltParams(level_tau_s=3.0, trend_tau_s=15.0)


def test_linear_ramp_trend_converges_to_slope() -> None:
    # 20 streams/s arriving, sampled every second for two minutes
    state = holt_fit(((t, 20.0 * t) for t in range(121)), P)
    assert state is not None
    assert state.trend == pytest.approx(20.0, rel=0.02)
    # level is close to the truth and the 45 s forecast extrapolates the ramp
    assert state.level == pytest.approx(2400.0, rel=0.01)
    assert state.forecast(45.0) == pytest.approx(20.0 * 165, rel=0.02)


def test_sampling_rate_does_not_change_the_estimate() -> None:
    fast = holt_fit(((t / 10, 5.0 * t / 10) for t in range(1201)), P)
    slow = holt_fit(((t * 2.0, 10.0 * t) for t in range(61)), P)
    assert fast is not None and slow is not None
    assert fast.trend == pytest.approx(slow.trend, rel=0.05)
    assert fast.level == pytest.approx(slow.level, rel=0.01)


def test_flat_series_has_no_trend_and_step_is_followed() -> None:
    state = holt_fit(((float(t), 1000.0) for t in range(60)), P)
    assert state is not None and state.trend == pytest.approx(0.0, abs=1e-9)
    # a burst of 500 joins: the level reaches it within a few level time constants (the
    # trend it learned from the jump overshoots a little), then settles with no trend
    for t in range(60, 75):
        state = holt_update(state, float(t), 1500.0, P)
    assert 1490.0 <= state.level <= 1600.0 and state.trend > 0
    for t in range(75, 240):
        state = holt_update(state, float(t), 1500.0, P)
    assert state.level == pytest.approx(1500.0, rel=0.005)
    assert abs(state.trend) < 0.5


def test_old_or_duplicate_samples_are_ignored() -> None:
    s = holt_update(None, 10.0, 100.0, P)
    assert holt_update(s, 10.0, 900.0, P) is s
    assert holt_update(s, 5.0, 900.0, P) is s


def test_forecast_never_negative_and_params_checked() -> None:
    assert HoltState(t=0.0, level=10.0, trend=-5.0).forecast(60.0) == 0.0
    with pytest.raises(ValueError, match="time constants must be positive"):
        HoltParams(level_tau_s=0.0)
    assert holt_fit([], P) is None


@given(st.lists(st.floats(0, 20000, allow_nan=False), min_size=2, max_size=50))
def test_level_stays_within_observed_range_plus_trend(values: list[float]) -> None:
    state = holt_fit(((float(i), v) for i, v in enumerate(values)), P)
    assert state is not None
    span = max(values) - min(values)
    assert min(values) - span - 1e-6 <= state.level <= max(values) + span + 1e-6


def test_ewma_rate_of_a_counter() -> None:
    joins = [(float(t), 7.0 * t) for t in range(30)]
    assert ewma_rate(joins, tau_s=5.0) == pytest.approx(7.0)
    assert ewma_rate([(0.0, 1.0)], tau_s=5.0) == 0.0


def test_damped_forecast_reach_is_bounded() -> None:
    s = HoltState(t=0.0, level=1000.0, trend=10.0)
    assert s.forecast(60.0) == pytest.approx(1600.0)
    assert s.forecast(60.0, damping_s=30.0) == pytest.approx(1000 + 10 * 30 * (1 - math.exp(-2)))
    assert s.forecast(1e6, damping_s=30.0) == pytest.approx(1300.0)
