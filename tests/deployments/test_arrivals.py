"""ArrivalForecast: each stream's next chunk one period after its last, presence, forgetting."""

from __future__ import annotations

import pytest

from deployments.arrivals import ArrivalForecast

P = 0.040


def test_a_periodic_stream_is_expected_one_period_after_its_last_chunk():
    f = ArrivalForecast(period_s=P, grace_s=0.002)
    f.observe("a", 1.000, 1.020)
    assert f.expected(1.030, 0.005) == []  # due at 1.040: beyond the horizon
    (e,) = f.expected(1.036, 0.005)
    assert (e.stream_id, e.arrival, e.due_by, e.weight) == ("a", pytest.approx(1.040),
                                                            pytest.approx(1.042), 1.0)
    assert e.deadline == pytest.approx(1.060)  # the same 20 ms budget as its last chunk
    # a little late is still expected (now), then the tick counts as skipped
    (late,) = f.expected(1.041, 0.005)
    assert late.arrival == 1.041
    assert f.expected(1.042, 0.005) == []
    assert f.expected(1.076, 0.005)[0].arrival == pytest.approx(1.080)  # the next tick
    assert f.expected(1.076, 0.005, exclude={"a"}) == []


def test_skipped_ticks_lower_the_presence_and_a_chunk_raises_it():
    f = ArrivalForecast(period_s=P, grace_s=0.002, alpha=0.5)
    f.observe("dtx", 0.0, 0.02)
    f.observe("dtx", 3 * P, 3 * P + 0.02)  # two ticks skipped, this one came
    (e,) = f.expected(4 * P - 0.001, 0.005)
    assert e.weight == pytest.approx(1.0 * 0.5**3 + 0.5)
    f.observe("dtx", 3 * P + 0.001, 3 * P + 0.021)  # the same tick again: no change
    assert f.expected(4 * P - 0.001, 0.005)[0].weight == pytest.approx(0.625)


def test_a_silent_stream_is_forgotten_and_a_new_chunk_replaces_its_forecast():
    f = ArrivalForecast(period_s=P, grace_s=0.002, forget_after=4)
    f.observe("a", 0.0, 0.02)
    f.observe("b", 0.0, 0.02)
    f.observe("b", P, P + 0.02)  # b's second chunk supersedes its first forecast
    assert [e.stream_id for e in f.expected(P - 0.001, 0.003)] == ["a"]
    assert len(f) == 2
    f.expected(10 * P, 0.001)  # a and b silent for many periods
    assert len(f) == 0
    with pytest.raises(ValueError):
        ArrivalForecast(period_s=0.0)


def test_a_lookup_is_bounded_and_superseded_entries_do_not_pile_up():
    f = ArrivalForecast(period_s=0.040)
    for tick in range(30):  # 500 streams, never looked up: each chunk supersedes the last
        for i in range(500):
            f.observe(f"s{i}", tick * 0.040 + i * 1e-5, tick * 0.040 + 0.1)
    assert len(f._heap) <= 4 * 500 + 64
    every = f.expected(29 * 0.040 + 0.030, 0.020)
    assert len(every) == 500
    f2 = ArrivalForecast(period_s=0.040)
    for i in range(500):
        f2.observe(f"s{i}", i * 1e-5, 0.1)
    some = f2.expected(0.030, 0.020, limit=16)
    assert [e.stream_id for e in some] == [f"s{i}" for i in range(16)]  # the earliest ones
    assert len(f2.expected(0.030, 0.020)) == 500  # the others were kept for later lookups
