"""ArrivalForecast: each stream's next chunk one period after its last, presence, forgetting
(keys are state slots: small integers)."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.arrivals import ArrivalForecast

P = 0.040
A, B, DTX = 0, 1, 2


def observe(f: ArrivalForecast, key: int, arrival: float, deadline: float) -> None:
    f.observe(np.array([key]), arrival, np.array([deadline]))


def test_a_periodic_stream_is_expected_one_period_after_its_last_chunk():
    f = ArrivalForecast(period_s=P, grace_s=0.002)
    observe(f, A, 1.000, 1.020)
    assert len(f.expected(1.030, 0.005)) == 0  # due at 1.040: beyond the horizon
    e = f.expected(1.036, 0.005)
    assert len(e) == 1
    assert (int(e.keys[0]), e.arrival[0], e.due_by[0], e.weight[0]) == (
        A, pytest.approx(1.040), pytest.approx(1.042), 1.0)
    assert e.deadline[0] == pytest.approx(1.060)  # the same 20 ms budget as its last chunk
    # a little late is still expected (now), then the tick counts as skipped
    assert f.expected(1.041, 0.005).arrival.tolist() == [1.041]
    assert len(f.expected(1.042, 0.005)) == 0
    assert f.expected(1.076, 0.005).arrival[0] == pytest.approx(1.080)  # the next tick
    exclude = np.zeros(4, bool)
    exclude[A] = True
    assert len(f.expected(1.076, 0.005, exclude=exclude)) == 0


def test_skipped_ticks_lower_the_presence_and_a_chunk_raises_it():
    f = ArrivalForecast(period_s=P, grace_s=0.002, alpha=0.5)
    observe(f, DTX, 0.0, 0.02)
    observe(f, DTX, 3 * P, 3 * P + 0.02)  # two ticks skipped, this one came
    e = f.expected(4 * P - 0.001, 0.005)
    assert e.weight.tolist() == [pytest.approx(1.0 * 0.5**3 + 0.5)]
    observe(f, DTX, 3 * P + 0.001, 3 * P + 0.021)  # the same tick again: no change
    assert f.expected(4 * P - 0.001, 0.005).weight[0] == pytest.approx(0.625)


def test_a_silent_stream_is_forgotten_and_a_new_chunk_replaces_its_forecast():
    f = ArrivalForecast(period_s=P, grace_s=0.002, forget_after=4)
    f.observe(np.array([A, B]), 0.0, np.array([0.02, 0.02]))
    observe(f, B, P, P + 0.02)  # b's second chunk supersedes its first forecast
    assert f.expected(P - 0.001, 0.003).keys.tolist() == [A]
    assert len(f) == 2
    f.expected(10 * P, 0.001)  # a and b silent for many periods
    assert len(f) == 0
    with pytest.raises(ValueError):
        ArrivalForecast(period_s=0.0)


def test_a_request_of_many_streams_is_observed_and_listed_column_by_column():
    f = ArrivalForecast(period_s=P, grace_s=0.002)
    keys = np.arange(1000)
    f.observe(keys, 0.0, np.full(1000, 0.02))
    f.observe(keys[::2], P, np.full(500, P + 0.02))  # half of them sent the next tick too
    e = f.expected(P + 0.0005, 0.05)
    # the others' tick-1 chunk is a little late (still expected, now), earliest first; the
    # first half's next chunk is due at tick 2
    assert e.keys.tolist() == [*range(1, 1000, 2), *range(0, 1000, 2)]
    assert e.arrival[:500].tolist() == [P + 0.0005] * 500
    assert np.allclose(e.arrival[500:], 2 * P) and np.allclose(e.deadline[500:], 2 * P + 0.02)


def test_a_tick_exactly_due_counts_as_skipped_whatever_the_rounding():
    # 0.02140625 + 0.04 + 0.002 rounds so that (now - grace - next) / period is a hair below
    # zero: the tick must still count as skipped (a scheduler holding for it would wait for
    # a chunk that is never due again).
    f = ArrivalForecast(period_s=0.04, grace_s=0.002)
    observe(f, B, 0.02140625, 0.04)
    due = 0.02140625 + 0.04 + 0.002
    assert len(f.expected(due, 0.02)) == 0
    assert f.expected(due + 0.001, 0.05).arrival[0] == pytest.approx(0.02140625 + 0.08)


def test_many_observations_do_not_pile_up_and_a_lookup_lists_every_stream_earliest_first():
    f = ArrivalForecast(period_s=0.040)
    keys = np.arange(500)
    for tick in range(30):  # 500 streams, never looked up: each chunk replaces the last
        f.observe(keys, tick * 0.040, np.full(500, tick * 0.040 + 0.1))
    assert len(f) == 500 and f._next.size <= 2 * 512  # one entry per stream key, however many chunks
    every = f.expected(29 * 0.040 + 0.030, 0.020)
    assert sorted(every.keys.tolist()) == keys.tolist()
    assert (np.diff(every.arrival) >= 0).all()
