"""`auralink bench batching` building blocks: @serve.batch formation, trace, a tiny emulated run."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.bench.batching import (
    AI_LATE,
    AI_ON_TIME,
    UNANSWERED,
    BenchConfig,
    CapacityBasis,
    Profile,
    decision_cost,
    make_trace,
    markdown_run,
    run_bench,
    serve_batches,
    single_step_capacity,
    steady_capacity,
    targets,
)


def flat_profile() -> Profile:
    return Profile({1: 4.0, 8: 6.0, 16: 9.0}, {1: 5.0, 8: 7.5, 16: 11.0}, "test profile", "test")


def batches(arr, max_batch_size, wait_s):
    return [(round(c, 9), i, j) for c, i, j in serve_batches(arr, max_batch_size, wait_s)]


def test_serve_batch_formation_follows_its_documented_semantics():
    arr = np.array([0.000, 0.001, 0.002, 0.010, 0.0105, 0.030])
    # timeout 5 ms from the first item, max 10: [0, 1, 2] closes at 5 ms; next opens at 10 ms
    assert batches(arr, 10, 0.005) == [(0.005, 0, 3), (0.015, 3, 5), (0.035, 5, 6)]
    # full batch closes when the max-th item arrives
    assert batches(arr, 2, 0.005) == [(0.001, 0, 2), (0.007, 2, 3), (0.0105, 3, 5), (0.035, 5, 6)]
    # timeout 0: takes what is there when it opens
    same = np.array([0.0, 0.0, 0.0, 0.004])
    assert batches(same, 8, 0.0) == [(0.0, 0, 3), (0.004, 3, 4)]


def test_trace_hits_the_offered_rate_and_orders_arrivals():
    tr = make_trace(250.0, 4.0, bridges=3, jitter_ms=2.0, deadline_ms=20.0, seed=1)
    assert tr.n_streams == 10
    assert tr.offered_fps == pytest.approx(250.0)
    assert np.all(np.diff(tr.arrival) >= 0)
    assert np.all(tr.arrival >= tr.send) and np.all(tr.arrival - tr.send <= 0.002)
    assert np.allclose(tr.deadline - tr.send, 0.020)


@pytest.mark.parametrize("streams", [3.16, 3.76, 4.75, 0.4, 7.0])
def test_offered_load_is_exact_with_a_fractional_stream(streams):
    # 3.16 and 3.76 streams used to be offered as 4 streams each (random presence): now three
    # full streams and one that sends on 16% / 76% of the ticks, spread evenly.
    duration = 10.0
    tr = make_trace(streams / 0.040, duration, bridges=8, jitter_ms=2.0, deadline_ms=20.0, seed=0)
    ticks = int(duration / 0.040)
    assert tr.n_streams == int(np.ceil(streams))
    assert abs(len(tr.send) - streams * ticks) <= 1  # within one chunk over the run
    per_stream = np.bincount(tr.stream, minlength=tr.n_streams)
    full = int(np.floor(streams))
    assert (per_stream[:full] == ticks).all()
    if streams > full:
        frac = tr.send[tr.stream == full]
        gaps = np.round(np.diff(frac) / 0.040).astype(int)
        assert gaps.max() - gaps.min() <= 1 if len(gaps) else True  # evenly spread, no bursts
def linear_profile(fixed_ms: float, per_frame_ms: float) -> Profile:
    """Deterministic steps (p50 = p99 = mean): T(B) = fixed + per_frame x B."""
    t = {b: fixed_ms + per_frame_ms * b for b in (1, 64)}
    return Profile(t, dict(t), "linear", "test")


def test_capacity_lets_every_frame_wait_for_one_running_step():
    # T(B) = 6 + 3B ms, 40 ms deadline, 2 ms jitter, 1 ms margin: a frame that arrives just
    # after a step of B started is answered 2 + 2 (6 + 3B) + 1 ms after its send at worst:
    # B = 3 (2 + 30 + 1 = 33 ms) fits, B = 4 (2 + 36 + 1 = 39 ms) fits, B = 5 (45 ms) does not.
    p = linear_profile(6.0, 3.0)
    cap = steady_capacity(p, deadline_ms=40.0, margin_ms=1.0, jitter_ms=2.0, max_batch=64)
    assert cap.basis is CapacityBasis.WAIT_ONE_STEP and cap.batch == 4
    assert cap.fps == pytest.approx(4 / 18.0 * 1000) and cap.step_ms == pytest.approx(18.0)
    assert cap.streams == pytest.approx(cap.fps * 0.040)
    # the single-step bound (a frame never waits) claims more than a replica can sustain
    single_fps, single_b = single_step_capacity(p, 40.0, 1.0, 2.0, 64)
    assert single_b == 10 and single_fps > cap.fps  # 2 + 36 + 1 <= 40
    # the batch is capped by max_batch
    assert steady_capacity(p, 40.0, 1.0, 2.0, max_batch=2).batch == 2


def test_capacity_needs_a_step_within_a_tick_when_the_deadline_is_long():
    # 100 ms: the deadline allows B = 14 (2 + 2 x 48 + 1 = 99 ms), but a step of B frames
    # takes B streams' chunks and streams send every 40 ms: mean T(B) <= 40 -> B = 11.
    cap = steady_capacity(linear_profile(6.0, 3.0), 100.0, 1.0, 2.0, 64)
    assert cap.batch == 11 and cap.step_ms == pytest.approx(39.0)


def test_capacity_falls_back_to_the_single_step_bound_and_says_so():
    # 20 ms: even B = 1 cannot wait a whole step (2 + 2 x 9 + 1 = 21 > 20); one step fits.
    p = linear_profile(6.0, 3.0)
    cap = steady_capacity(p, 20.0, 1.0, 2.0, 64)
    assert cap.basis is CapacityBasis.SINGLE_STEP
    assert (cap.fps, cap.batch) == single_step_capacity(p, 20.0, 1.0, 2.0, 64) and cap.batch == 3
    assert steady_capacity(p, 5.0, 1.0, 2.0, 64).fps == 0.0  # nothing fits at all


def test_capacity_of_the_committed_cpu_profile():
    p = Profile({1: 9.86, 8: 30.59, 32: 73.33, 128: 265.96}, {1: 16.62, 8: 49.32, 32: 89.04, 128: 304.82},
                "cpu", "docs/bench/codec.json")
    at = {d: steady_capacity(p, d, 1.0, 2.0, 128) for d in (20.0, 40.0, 100.0)}
    assert at[20.0].basis is CapacityBasis.SINGLE_STEP
    assert at[40.0].batch == 3 and at[40.0].streams == pytest.approx(7.43, abs=0.01)  # below 8
    assert at[100.0].batch == 12 and at[100.0].streams == pytest.approx(12.55, abs=0.01)


def test_targets_apply_with_room_for_batching_only():
    rows = [{"scheduler": "edf", "load": 0.95, "miss_rate": 0.004, "goodput_fps": 1.0,
             "per_seed": [{"miss_rate": 0.003, "goodput_fps": 1.0}, {"miss_rate": 0.012, "goodput_fps": 1.0}]}]
    p = linear_profile(6.0, 3.0)
    small = steady_capacity(p, 40.0, 1.0, 2.0, 64)  # 8.9 streams, wait-one-step: applies
    t = targets(rows, small, 40.0)
    assert t["apply"] and t["edf_miss_at_95_le_1pct"] and not t["edf_miss_at_95_le_1pct_every_seed"]
    assert t["edf_miss_rate_at_95_max_seed"] == 0.012
    assert not targets(rows, steady_capacity(p, 20.0, 1.0, 2.0, 64), 20.0)["apply"]  # single step
    assert targets(rows, steady_capacity(p, 20.0, 1.0, 2.0, 64), 100.0)["apply"]  # 100 ms always


def test_tiny_emulated_run_gives_every_frame_one_outcome_and_edf_wins_under_overload():
    cfg = BenchConfig(loads=(0.5, 1.2), duration_s=1.0, max_batch=16, deadlines_ms=(20.0,),
                      serve_wait_fractions=(0.0, 0.25), seeds=(0,), decision_streams=())
    data = run_bench(cfg, flat_profile(), None)
    assert data["compute"] == "emulated"
    (sec,) = data["deadlines"]
    assert sec["deadline_ms"] == 20.0 and sec["capacity_fps"] > 0
    rows = {(r["scheduler"], r["load"]): r for r in sec["results"]}
    assert set(rows) == {(s, load) for s in ("edf", "serve_batch", "none") for load in (0.5, 1.2)}
    for r in rows.values():
        outcomes = r["ai_on_time"] + r["ai_late"] + r["fallback_deadline"] + r["fallback_overload"] + r["unanswered"]
        assert outcomes == r["frames"]
        assert 0.0 <= r["miss_rate"] <= 1.0
    assert rows[("edf", 0.5)]["miss_rate"] == 0.0
    over = rows[("edf", 1.2)]
    assert over["goodput_fps"] > rows[("serve_batch", 1.2)]["goodput_fps"]
    assert over["goodput_fps"] > 0.85 * sec["capacity_fps"]
    assert sec["edf_dominates"] == all(
        rows[("edf", load)]["goodput_fps"] >= rows[("serve_batch", load)]["goodput_fps"] for load in (0.5, 1.2))
    assert (AI_ON_TIME, AI_LATE, UNANSWERED) == (0, 1, 4)


def test_every_deadline_gets_its_results_its_verdict_and_its_own_table():
    cfg = BenchConfig(loads=(0.8, 1.2), duration_s=0.5, max_batch=16, deadlines_ms=(20.0, 100.0),
                      serve_wait_fractions=(0.0,), seeds=(0, 1), decision_streams=(8,), decision_seconds=0.2)
    data = run_bench(cfg, flat_profile(), None)
    secs = data["deadlines"]
    assert [d["deadline_ms"] for d in secs] == [20.0, 100.0]
    for sec in secs:
        assert isinstance(sec["edf_dominates"], bool)
        assert {r["load"] for r in sec["results"]} == {0.8, 1.2}
        room = sec["capacity_basis"] == "wait_one_step" and sec["capacity_streams"] >= 8
        assert sec["targets"]["apply"] == (room or sec["deadline_ms"] >= 100)
        assert isinstance(sec["edf_dominates_every_seed"], bool)
        for r in sec["results"]:
            assert r["offered_streams"] == pytest.approx(r["load"] * sec["capacity_fps"] * 0.040, abs=1e-3)
            # one run per seed, pooled: the row's frames are the seeds' frames
            assert [x["seed"] for x in r["per_seed"]] == [0, 1]
        edf = [r for r in sec["results"] if r["scheduler"] == "edf"]
        assert all(r["decisions"] > 0 and r["decision_us_p99"] >= r["decision_us_p50"] > 0 for r in edf)
    (row,) = data["decision_cost"]["rows"]
    assert row["streams"] == 8 and row["decisions"] > 0 and row["queue_max"] >= 1
    assert data["edf_dominates_everywhere"] == all(d["edf_dominates"] for d in secs)
    data["command"] = "auralink bench batching"
    md = markdown_run(data)
    assert md.count("#### deadline ") == 2 and md.count("| load | scheduler |") == 2
    assert "#### decision cost" in md
    assert "calibrated from the profile measured on test profile" in md
    # a results file from before per-deadline runs still renders (one table)
    legacy = {k: v for k, v in data.items() if k != "deadlines"}
    legacy.update(secs[0])
    legacy["config"] = {**data["config"], "deadline_ms": 20.0}
    assert markdown_run(legacy).count("| load | scheduler |") == 1


def test_serve_batch_with_two_chunks_of_one_stream_runs_them_as_sub_steps():
    from cluster.bench.batching import Trace, run_fifo_batches

    n = 3
    tr = Trace(send=np.zeros(n), arrival=np.zeros(n), deadline=np.full(n, 1.0),
               stream=np.array([7, 7, 8]), seq=np.array([0, 1, 0]), duration_s=1.0,
               n_streams=2, offered_fps=3.0)
    sizes = []

    def step(b):
        sizes.append(b)
        return 10.0

    rl = run_fifo_batches(tr, step, [(0.0, 0, 3)], deadline_ms=20.0)
    assert sizes == [2, 1]  # (7#0, 8#0) then 7#1
    assert [s[2] for s in rl.steps] == [2, 1]
    assert rl.answer.tolist() == pytest.approx([0.010, 0.020, 0.010])


def test_profile_loads_codec_bench_json_and_samples_around_its_quantiles(tmp_path):
    import json

    path = tmp_path / "codec.json"
    path.write_text(json.dumps({"device": "cuda: test", "weights": "random",
                                "latency_profile_ms": {"1": {"p50": 2.0, "p99": 4.0}, "8": 6.0}}))
    p = Profile.load(path)
    assert p.device == "cuda: test" and p.p99_ms(8) == 6.0 and p.p50_ms(4) == pytest.approx(2.0 + 4 * 3 / 7)
    rng = np.random.default_rng(0)
    xs = np.array([p.sample_ms(1, rng) for _ in range(20000)])
    assert np.percentile(xs, 50) == pytest.approx(2.0, rel=0.03)
    assert np.percentile(xs, 99) == pytest.approx(4.0, rel=0.08)


def test_pooled_rows_count_every_seed_and_decision_cost_reports_per_queue_length():
    import numpy as np

    from cluster.bench.batching import make_trace, run_edf, summarize_runs
    from deployments.scheduler import SchedulerConfig

    p = flat_profile()
    cfg = SchedulerConfig(deadline_ms=20.0, max_batch=16, margin_ms=1.0)
    runs = []
    for seed in (0, 1):
        tr = make_trace(300.0, 0.5, 4, 2.0, 20.0, seed)
        rng = np.random.default_rng(seed)
        runs.append((run_edf(tr, lambda b, rng=rng: p.sample_ms(b, rng), p, cfg, add_overhead=False), tr))
    pooled = summarize_runs(runs)
    alone = [summarize_runs([r]) for r in runs]
    assert pooled["frames"] == sum(a["frames"] for a in alone)
    assert pooled["ai_on_time"] == sum(a["ai_on_time"] for a in alone)
    assert pooled["goodput_fps"] == pytest.approx(sum(a["goodput_fps"] for a in alone) / 2, abs=0.02)
    assert pooled["decisions"] == sum(a["decisions"] for a in alone)
    row = decision_cost(p, 20.0, 16, streams=50, seconds=0.3, seed=0)
    assert row["decisions"] > 0 and row["queue_p50"] > 0 and row["add_us_mean"] > 0
    assert row["decision_us_per_queued_frame_p50"] > 0
