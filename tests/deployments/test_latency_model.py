"""LatencyModel: the step-time distribution and its conservative estimate; monotone, learns
from measured steps, round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.latency_model import LatencyModel, bucket_of, bucket_sizes


def test_bucket_grid_is_geometric_and_floor():
    assert bucket_sizes(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert bucket_of(1) == 1
    assert bucket_of(5) == 4  # a step of 5 is recorded where it over- (never under-) states cost
    assert bucket_of(16) == 16
    assert bucket_of(100) == 96
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        bucket_of(0)


def test_profile_seeds_a_log_normal_through_p50_and_p99_and_margin_applies():
    m = LatencyModel.from_profile({"1": {"p50": 2.0, "p99": 3.0}, "8": {"p50": 6.0, "p99": 8.0}},
                                  rel_margin=0.1)
    # the distribution goes through the profile's quantiles (32 seeds: the top one is p98.4)
    assert m.quantile_ms(1, 0.5) == pytest.approx(2.0, rel=0.01)
    assert m.quantile_ms(1, 0.9) == pytest.approx(2.0 * 1.5 ** (1.2816 / 2.3263), rel=0.02)
    assert 0.98 <= m.p_within(1, 3.0) and m.p_within(1, 2.5) < 0.95
    assert m.quantile_ms(8, 0.5) == pytest.approx(6.0, rel=0.01)
    # the conservative estimate is the seeds' p95, between p50 and p99; margin on top
    assert 2.0 < m.estimate(1) < 3.0
    assert m.predict(1) == pytest.approx(1.1 * m.estimate(1))
    # bare numbers seed one sample each: estimate = the number, a deterministic step
    d = LatencyModel.from_profile({1: 3.0, 8: 8.0}, rel_margin=0.0)
    assert d.estimate(1) == 3.0 and d.estimate(8) == 8.0
    assert d.estimate(4) == pytest.approx(3.0 + 5.0 * 3 / 7)
    assert d.p_within(1, 3.0) == 1.0 and d.p_within(1, 2.999) == 0.0


def test_on_time_probability_follows_the_distribution_not_a_worst_case():
    m = LatencyModel.from_profile({1: {"p50": 10.0, "p99": 16.0}, 8: {"p50": 30.0, "p99": 49.0}})
    # a budget between the median and the p99 of one frame is likely, not hopeless
    assert 0.5 < m.p_within(1, 13.0) < 0.99
    assert m.p_within(1, 10.0) == pytest.approx(0.5, abs=0.02)
    assert m.p_within(1, 5.0) == 0.0 and m.p_within(1, 100.0) == 1.0
    # monotone: more time helps, more frames cost
    budgets = [5.0, 9.0, 11.0, 14.0, 20.0, 35.0, 60.0]
    grid = m.p_within_matrix([1, 2, 4, 8, 16], np.array(budgets))
    assert (np.diff(grid, axis=1) >= 0).all() and (np.diff(grid, axis=0) <= 0).all()
    assert grid[0] == pytest.approx([m.p_within(1, b) for b in budgets])
    # a matrix of budgets, one row per size, reads each row against its own size
    rows = m.p_within_matrix([1, 8], np.array([[12.0, 13.0], [31.0, 40.0]]))
    assert rows[1, 1] == pytest.approx(m.p_within(8, 40.0))


def test_a_bucket_first_measured_at_run_time_starts_from_the_interpolated_prior():
    m = LatencyModel.from_profile({1: {"p50": 10.0, "p99": 16.0}, 8: {"p50": 30.0, "p99": 49.0}})
    before = m.p_within(2, 15.0)
    assert 0.3 < before < 1.0
    m.observe(2, 25.0)  # one slow step of 2 frames
    # one sample does not make "25 ms" the only possible outcome at B=2
    assert m.p_within(2, 15.0) > 0.5 * before
    assert m.to_dict()["samples"]["2"] == 33  # the 32-level prior + the measurement
    for _ in range(200):
        m.observe(2, 25.0)  # ... but a bucket that keeps measuring 25 ms learns it
    assert m.p_within(2, 15.0) == 0.0 and m.quantile_ms(2, 0.5) == pytest.approx(25.0)


def test_extrapolation_is_never_cheaper_than_per_frame_average():
    m = LatencyModel.from_profile({1: 5.0, 2: 5.5}, rel_margin=0.0)
    # last segment slope is 0.5 ms/frame but average per frame at B=2 is 2.75 ms
    assert m.estimate(10) == pytest.approx(5.5 + 8 * 2.75)


def test_unseeded_model_is_pessimistic_and_linear():
    m = LatencyModel(rel_margin=0.0)
    assert m.estimate(1) == 10.0
    assert m.estimate(3) == 30.0


def test_prediction_is_monotone_even_with_noisy_buckets():
    m = LatencyModel.from_profile({1: 4.0, 2: 3.0, 4: 6.0, 8: 5.0}, rel_margin=0.0)
    preds = [m.estimate(b) for b in range(1, 40)]
    assert all(a <= b for a, b in zip(preds, preds[1:], strict=False))


def test_observations_replace_the_seed_and_track_a_high_quantile():
    m = LatencyModel.from_profile({4: 20.0}, quantile=0.9, window=50, rel_margin=0.0)
    for i in range(100):
        m.observe(4, 5.0 + (i % 10) * 0.1)  # 5.0 .. 5.9, seed long pushed out
    assert 5.7 <= m.estimate(4) <= 5.9
    # a slower device: measurements above the estimate lift it at once
    m.observe(4, 30.0)
    m2 = LatencyModel.from_profile({4: 5.0}, quantile=1.0, rel_margin=0.0)
    m2.observe(4, 30.0)
    assert m2.estimate(4) == 30.0
    assert m.observed_steps == 101


def test_bad_measurements_are_ignored():
    m = LatencyModel.from_profile({1: 2.0}, rel_margin=0.0)
    m.observe(0, 5.0)
    m.observe(1, float("nan"))
    m.observe(1, -1.0)
    assert m.estimate(1) == 2.0 and m.observed_steps == 0
    with pytest.raises(ValueError, match="positive number"):
        LatencyModel.from_profile({1: 0.0})


def test_max_batch_within():
    m = LatencyModel.from_profile({1: 2.0, 16: 17.0}, rel_margin=0.0)  # 1 ms/frame + 1 ms
    assert m.max_batch_within(1.5) == 0
    assert m.max_batch_within(2.0) == 1
    assert m.max_batch_within(10.0) == 9
    assert m.max_batch_within(1000.0, limit=64) == 64
    for budget in (2.0, 7.3, 12.0, 30.0):
        b = m.max_batch_within(budget)
        assert m.predict(b) <= budget < m.predict(b + 1)


def test_to_dict_round_trip_is_json_and_equal():
    m = LatencyModel.from_profile({1: 2.0, 8: 9.0, 32: 30.0}, quantile=0.9, rel_margin=0.2)
    for _ in range(5):
        m.observe(8, 8.5)
    d = json.loads(json.dumps(m.to_dict()))
    m2 = LatencyModel.from_profile(d)
    assert m2.quantile == 0.9 and m2.rel_margin == 0.2
    for b in (1, 3, 8, 20, 32, 100):
        assert m2.predict(b) == pytest.approx(m.predict(b), rel=1e-6)


def test_one_outlier_in_a_small_bucket_does_not_inflate_larger_batches():
    m = LatencyModel.from_profile({1: 2.0, 4: 4.0, 16: 10.0}, quantile=0.95, rel_margin=0.0)
    m.observe(1, 500.0)  # a warm-up step
    assert m.estimate(16) == 10.0
    assert m.estimate(4) == 4.0
    # a step of 1 costs no more than one of 4: the larger bucket bounds it
    assert m.estimate(1) == 4.0


def test_measured_steps_are_applied_every_refresh_every_steps():
    """A rebuild per step would cost more than the decisions it serves: steps are applied in
    groups of `refresh_every`, at once for a bucket's first step, and all before to_dict."""
    m = LatencyModel.from_profile({4: 5.0}, quantile=1.0, rel_margin=0.0, refresh_every=4)
    assert m.estimate(4) == 5.0
    v = m.version
    for _ in range(3):
        m.observe(4, 9.0)
    assert m.estimate(4) == 5.0 and m.version == v  # not applied yet
    m.observe(4, 9.0)
    assert m.estimate(4) == 9.0 and m.version == v + 1
    m.observe(4, 12.0)
    assert m.to_dict()["profile_ms"]["4"] == 12.0  # to_dict applies what is waiting
    v = m.version
    m.observe(16, 30.0)  # a new bucket (with its prior): applied at once
    m.estimate(16)
    assert m.version > v and not m._dirty


def test_the_distribution_is_rebuilt_every_refresh_every_steps_and_at_once_for_a_new_bucket():
    m = LatencyModel.from_profile({4: {"p50": 10.0, "p99": 14.0}}, refresh_every=8)
    before, version = m.p_within(4, 12.0), m.version
    for _ in range(7):
        m.observe(4, 40.0)
    assert m.p_within(4, 12.0) == before and m.version == version  # not yet applied
    m.observe(4, 40.0)
    assert m.p_within(4, 12.0) < before and m.version > version
    m.observe(16, 30.0)  # a new bucket: applied at once, with its prior
    assert m.to_dict()["samples"]["16"] == 33 and m.quantile_ms(16, 0.99) >= 30.0
    with pytest.raises(ValueError, match="refresh_every"):
        LatencyModel(refresh_every=0)


def test_mean_step_times_are_the_means_of_the_rows():
    """mean_ms reads the means off the buckets (rows are linear in B): the same as averaging
    each size's quantile row, between buckets, below the first and beyond the last."""
    import numpy as np

    m = LatencyModel.from_profile({1: {"p50": 2.0, "p99": 3.0}, 8: {"p50": 4.0, "p99": 6.0},
                                   64: {"p50": 9.0, "p99": 14.0}})
    for i in range(50):
        m.observe(20, 5.0 + i % 3)
    k = np.arange(1, 300)
    assert np.allclose(m.mean_ms(k), m.dist_rows(k)[:, 1:-1].mean(axis=1), rtol=1e-12, atol=1e-12)
    assert np.allclose(m.max_ms(k), m.dist_rows(k)[:, -1], rtol=1e-12, atol=1e-12)


def test_kept_means_and_maxima_follow_the_model_as_it_learns():
    """mean_of / max_of (kept per size until the model changes) equal mean_ms / max_ms
    exactly at every step of learning: after each observation, at rebuilds every
    `refresh_every` steps and when a bucket appears."""
    import random

    rng = random.Random(5)
    m = LatencyModel.from_profile({1: 2.0, 16: 3.0, 256: 6.0}, refresh_every=3)
    sizes = [1, 5, 16, 100, 256, 700, 4000]
    for step in range(60):
        for k in sizes:
            assert m.mean_of(k) == float(m.mean_ms([k])[0])
            assert m.max_of(k) == float(m.max_ms([k])[0])
        m.observe(rng.choice([3, 40, 300, 2000]) if step % 7 else 9000 + step, rng.uniform(1.0, 30.0))


@pytest.mark.parametrize(("refresh_every", "small_share"), [(1, 0.9), (3, 0.9), (1, 0.0), (3, 0.0)])
def test_rebuilding_only_the_sizes_whose_buckets_moved_matches_a_full_rebuild(refresh_every, small_share):
    prof = {1: {"p50": 10.0, "p99": 16.0}, 8: {"p50": 30.0, "p99": 49.0}, 32: {"p50": 73.0, "p99": 89.0}}
    rng = np.random.default_rng(3)
    # Step time grows with the batch, so a measured step moves its own bucket's row only;
    # with mostly small batches the last buckets (and the extrapolation beyond) mostly stay.
    steps = []
    for _ in range(400):
        b = int(rng.integers(1, 8)) if rng.random() < small_share else int(rng.integers(1, 60))
        steps.append((b, (8.0 + 2.0 * b) * float(rng.lognormal(0.0, 0.15))))
    sizes, budgets = np.arange(1, 200), np.linspace(-5.0, 400.0, 97)
    live = LatencyModel.from_profile(prof, refresh_every=refresh_every)
    for i, (b, ms) in enumerate(steps):
        live.observe(b, ms)
        if i % 5 == 0:  # reads in between: rows rebuilt piecewise as buckets move
            live.p_within_matrix(sizes, budgets)
    batch = LatencyModel.from_profile(prof, refresh_every=refresh_every)
    for b, ms in steps:
        batch.observe(b, ms)
    live.to_dict(), batch.to_dict()  # both apply every step
    assert np.array_equal(live.dist_rows(sizes), batch.dist_rows(sizes))
    # (the CDF axis may be laid out with other offsets: equal up to rounding)
    assert np.allclose(live.p_within_matrix(sizes, budgets), batch.p_within_matrix(sizes, budgets),
                       rtol=0.0, atol=1e-9)
    assert np.array_equal(live.mean_ms(sizes), batch.mean_ms(sizes))
