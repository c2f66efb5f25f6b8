"""EdfScheduler: EDF order, expiry and batch sizing from the step-time distribution (expected
on-time frames), holds for expected chunks, catch-up, stream order, overload shedding,
reconfigure, probes, and the every-frame-one-outcome invariant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.latency_model import LatencyModel
from deployments.scheduler import (
    EdfScheduler,
    PendingFrame,
    SchedulerConfig,
    ShedReason,
)

MS = 1e-3


def linear_model(fixed_ms: float = 1.0, per_frame_ms: float = 1.0) -> LatencyModel:
    """L(B) = fixed + per_frame * B, exactly (no margin), at every bucket we use."""
    prof = {b: fixed_ms + per_frame_ms * b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)}
    return LatencyModel.from_profile(prof, rel_margin=0.0)


def sched(margin_ms: float = 0.0, max_batch: int = 64, max_queue: int = 1000, **kw) -> EdfScheduler:
    cfg = SchedulerConfig(margin_ms=margin_ms, max_batch=max_batch, max_queue=max_queue, **kw)
    return EdfScheduler(linear_model(), cfg)


def frame(stream: str, deadline_ms: float, seq: int = 0, arrival_ms: float = 0.0, epoch: int = 1):
    return PendingFrame(stream, epoch, seq, deadline_ms * MS, arrival_ms * MS, ref=(stream, seq))


def test_edf_order_earliest_deadline_first():
    s = sched(max_batch=2)
    s.add(frame("a", 50))
    s.add(frame("b", 10, arrival_ms=1))
    s.add(frame("c", 30, arrival_ms=2))
    plan = s.schedule(0.0)
    assert [f.stream_id for f in plan.run] == ["b", "c"]
    assert plan.predicted_ms == 3.0
    assert [f.stream_id for f in s.schedule(3 * MS).run] == ["a"]


def test_ties_broken_by_arrival():
    s = sched(max_batch=1)
    s.add(frame("late", 20, arrival_ms=2))
    s.add(frame("early", 20, arrival_ms=1))
    assert s.schedule(0.0).run[0].stream_id == "early"


def test_expired_before_compute():
    s = sched(margin_ms=1.0)
    s.add(frame("hopeless", 2.5))  # needs L(1)=2 + margin 1 = 3 ms
    s.add(frame("ok", 20))
    plan = s.schedule(0.0)
    assert [f.stream_id for f in plan.expired] == ["hopeless"]
    assert [f.stream_id for f in plan.run] == ["ok"]
    assert s.counters["fallback/deadline"] == 1
    assert len(s) == 0


def test_batch_size_honours_latency_model_and_earliest_deadline():
    s = sched(margin_ms=1.0)
    for i in range(20):
        s.add(frame(f"s{i}", 10.0 + i))  # earliest deadline 10 ms
    plan = s.schedule(0.0)
    # 1 + B + 1 <= 10  ->  B = 8
    assert len(plan.run) == 8
    assert plan.predicted_ms + 1.0 <= min(f.deadline for f in plan.run) / MS
    assert [f.stream_id for f in plan.run] == [f"s{i}" for i in range(8)]
    assert len(s) == 12 and not plan.expired


def test_max_batch_caps_the_batch():
    s = sched(max_batch=4)
    for i in range(10):
        s.add(frame(f"s{i}", 100))
    assert len(s.schedule(0.0).run) == 4


def test_stream_frames_run_in_order_never_two_in_one_batch():
    s = sched()
    # seq 1 has an earlier deadline than seq 0 (jitter): still must wait for seq 0
    s.add(frame("a", 40, seq=0))
    s.add(frame("a", 30, seq=1))
    s.add(frame("a", 50, seq=2))
    s.add(frame("b", 45, seq=7))
    plan = s.schedule(0.0)
    assert sorted((f.stream_id, f.epoch_seq) for f in plan.run) == [("a", 0), ("b", 7)]
    plan = s.schedule(5 * MS)
    assert [(f.stream_id, f.epoch_seq) for f in plan.run] == [("a", 1)]
    plan = s.schedule(10 * MS)
    assert [(f.stream_id, f.epoch_seq) for f in plan.run] == [("a", 2)]
    assert len(s) == 0


def test_new_epoch_orders_after_old_epoch():
    s = sched()
    s.add(frame("a", 30, seq=0, epoch=2))
    s.add(frame("a", 40, seq=5, epoch=1))
    assert [(f.epoch, f.epoch_seq) for f in s.schedule(0.0).run] == [(1, 5)]


def test_overload_shed_on_arrival_and_reported_in_next_plan():
    s = sched(max_queue=2)
    assert s.add(frame("a", 50)) is None
    assert s.add(frame("b", 50)) is None
    shed = s.add(frame("c", 50))
    assert shed is not None and shed.stream_id == "c"
    plan = s.schedule(0.0)
    assert [(f.stream_id, r) for f, r in plan.shed] == [("c", ShedReason.OVERLOAD)]
    assert s.counters["fallback/overload"] == 1
    assert len(plan.run) == 2


def test_missing_deadline_uses_config_budget():
    s = sched(deadline_ms=7.0)
    f = PendingFrame("a", 1, 0, math.nan, arrival=1.0)
    s.add(f)
    assert f.deadline == 1.0 + 0.007


def test_reconfigure_changes_knobs_at_run_time():
    s = sched(max_batch=64)
    for i in range(10):
        s.add(frame(f"s{i}", 100))
    s.reconfigure(s.config.updated(max_batch=3, margin_ms=0.5, unknown_knob=1))
    assert s.config.max_batch == 3 and s.config.margin_ms == 0.5
    assert len(s.schedule(0.0).run) == 3


def test_head_skip_under_overload_trades_urgent_frames_for_a_productive_batch():
    # Heavy fixed cost: L(B) = 10 + 0.1 B. The urgent head frames only fit a step of their
    # own; serving one first (10.1 ms) would make all 50 others miss (10.1 + 15 > 20 ms).
    prof = {b: 10.0 + 0.1 * b for b in (1, 2, 4, 8, 16, 32, 64)}
    s = EdfScheduler(LatencyModel.from_profile(prof, rel_margin=0.0),
                     SchedulerConfig(margin_ms=0.0, max_batch=64))
    s.add(frame("urgent0", 10.15))
    s.add(frame("urgent1", 10.15))
    for i in range(50):
        s.add(frame(f"s{i}", 20.0))
    plan = s.schedule(0.0)
    assert len(plan.run) == 50 and all(f.stream_id.startswith("s") for f in plan.run)
    # they cannot fit a later step either -> expired now, not left to rot in the queue
    assert {f.stream_id for f in plan.expired} == {"urgent0", "urgent1"} and len(s) == 0
    # when the rest can wait a step, the head is served first and nothing is given up
    s2 = EdfScheduler(LatencyModel.from_profile(prof, rel_margin=0.0),
                      SchedulerConfig(margin_ms=0.0, max_batch=64))
    s2.add(frame("urgent0", 10.15))
    for i in range(50):
        s2.add(frame(f"s{i}", 30.0))
    p2 = s2.schedule(0.0)
    assert [f.stream_id for f in p2.run] == ["urgent0"] and not p2.expired and len(s2) == 50


def test_admission_and_expiry_follow_the_distribution_not_a_worst_case():
    # One frame takes 10 ms at the median, 16 ms at p99 (log-normal).
    model = LatencyModel.from_profile({1: {"p50": 10.0, "p99": 16.0}, 8: {"p50": 30.0, "p99": 49.0}})
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0))
    s.add(frame("likely", 14.0))  # 13 ms of slack: well above the median, below the p99
    s.add(frame("hopeless", 7.0))  # 6 ms: less than 5% of steps are that fast
    s.add(frame("missed", 0.5))  # already inside the margin: never computed
    assert model.predict(1) > 13.0  # a worst-case rule would have shed "likely" too
    plan = s.schedule(0.0)
    assert [f.stream_id for f in plan.run] == ["likely"]
    assert {f.stream_id for f in plan.expired} == {"hopeless", "missed"}
    assert 0.6 < plan.expected_on_time < 1.0
    assert plan.expected_on_time == pytest.approx(model.p_within(1, 13.0))


def test_batch_size_maximises_expected_on_time_frames():
    # B=2 costs little more than B=1: both of two frames with 17 ms of slack should share a
    # step (P ~ 0.9 each) rather than run apart (the second would wait a whole step).
    model = LatencyModel.from_profile({1: {"p50": 10.0, "p99": 16.0}, 8: {"p50": 30.0, "p99": 49.0}})
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0))
    s.add(frame("a", 18.0))
    s.add(frame("b", 18.0))
    plan = s.schedule(0.0)
    assert {f.stream_id for f in plan.run} == {"a", "b"}
    # with a slower second frame the pair would drown the head: run it alone
    s2 = EdfScheduler(LatencyModel.from_profile({1: 10.0, 2: 20.0}, rel_margin=0.0),
                      SchedulerConfig(margin_ms=1.0))
    s2.add(frame("a", 12.0))
    s2.add(frame("b", 40.0))
    assert [f.stream_id for f in s2.schedule(0.0).run] == ["a"]


def periodic(s: EdfScheduler, ticks: int, streams: dict[str, float], budget_ms: float,
             step_ms: float) -> float:
    """Feed `ticks` 40 ms ticks of chunks (stream -> phase ms), running every plan at once
    with a fixed step time; returns the time (s) after the last tick."""
    seq = 0
    for k in range(ticks):
        for sid, phase in sorted(streams.items(), key=lambda x: x[1]):
            t = (40.0 * k + phase) * MS
            s.add(frame(sid, (t / MS) + budget_ms, seq=k, arrival_ms=t / MS))
            plan = s.schedule(t)
            if plan.run:
                s.complete(plan, step_ms)
        seq += 1
    return 40.0 * ticks * MS


def test_holds_a_batch_for_a_chunk_the_forecast_expects_soon():
    # Deterministic CPU-like steps: one frame 10 ms, two 11 ms; 15 ms budgets. Stream b's
    # chunks arrive 2 ms after a's. Run apart, b waits for a's step and misses (2 + 8 + 10 >
    # 15); held 2 ms, both finish at 13 ms.
    model = LatencyModel.from_profile({1: 10.0, 2: 11.0, 8: 20.0}, rel_margin=0.0)
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0, max_hold_ms=10.0))
    t0 = periodic(s, 3, {"a": 0.0, "b": 2.0}, budget_ms=15.0, step_ms=10.0)
    s.add(frame("a", t0 / MS + 15.0, seq=3, arrival_ms=t0 / MS))
    plan = s.schedule(t0)
    assert not plan.run and not plan.expired
    assert plan.hold_until == pytest.approx(t0 + 0.002 + 0.002)  # b's expected arrival + grace
    assert s.counters["holds"] >= 1
    s.add(frame("b", t0 / MS + 17.0, seq=3, arrival_ms=t0 / MS + 2.0))
    plan = s.schedule(t0 + 0.002)
    assert {f.stream_id for f in plan.run} == {"a", "b"} and plan.hold_until is None


def test_a_hold_ends_when_the_expected_chunk_does_not_come_and_is_not_taken_if_useless():
    model = LatencyModel.from_profile({1: 10.0, 2: 11.0, 8: 20.0}, rel_margin=0.0)
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0, max_hold_ms=10.0))
    t0 = periodic(s, 3, {"a": 0.0, "b": 2.0}, budget_ms=15.0, step_ms=10.0)
    s.add(frame("a", t0 / MS + 15.0, seq=3, arrival_ms=t0 / MS))
    hold = s.schedule(t0).hold_until
    assert hold is not None
    # b skipped this tick (DTX): at hold_until its chunk is overdue, a runs alone
    plan = s.schedule(hold)
    assert [f.stream_id for f in plan.run] == ["a"] and plan.hold_until is None
    # linear costs (two frames cost two steps): holding never pays, nothing is held
    lin = EdfScheduler(LatencyModel.from_profile({1: 10.0, 2: 20.0, 8: 80.0}, rel_margin=0.0),
                       SchedulerConfig(margin_ms=1.0, max_hold_ms=10.0))
    t1 = periodic(lin, 3, {"a": 0.0, "b": 2.0}, budget_ms=15.0, step_ms=10.0)
    lin.add(frame("a", t1 / MS + 15.0, seq=3, arrival_ms=t1 / MS))
    assert [f.stream_id for f in lin.schedule(t1).run] == ["a"]
    assert lin.counters["holds"] == 0


def test_a_stream_that_fell_behind_skips_its_unlikely_head_frame():
    model = LatencyModel.from_profile({1: {"p50": 10.0, "p99": 16.0}, 8: {"p50": 30.0, "p99": 49.0}})
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0))
    s.add(frame("a", 12.0, seq=0))  # 11 ms of slack: ~60% alone
    s.add(frame("a", 52.0, seq=1, arrival_ms=1.0))  # its next chunk is already here
    s.add(frame("b", 12.0, seq=0))  # same slack, but nothing behind it: kept
    plan = s.schedule(0.0)
    assert [(f.stream_id, f.epoch_seq) for f in plan.expired] == [("a", 0)]
    assert sorted((f.stream_id, f.epoch_seq) for f in plan.run) in ([("a", 1), ("b", 0)], [("b", 0)])
    assert s.counters["caught_up"] == 1


def test_complete_feeds_the_model_and_counts_late_frames():
    s = sched()
    for i in range(4):
        s.add(frame(f"s{i}", 8))
    plan = s.schedule(0.0)
    assert len(plan.run) == 4  # 1 + 4 = 5 ms <= 8
    s.complete(plan, measured_ms=9.0)
    assert s.model.observed_steps == 1
    assert s.counters["ran_late"] == 4
    assert s.counters["steps_over_prediction"] == 1


# ----------------------------------------------------------------------------- property test
frames_strategy = st.lists(
    st.tuples(
        st.integers(0, 7),  # stream
        st.floats(0.0, 30.0),  # deadline offset after arrival (ms)
        st.floats(0.0, 6.0),  # gap to previous arrival (ms)
        st.floats(0.3, 3.0),  # measured/predicted ratio
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(frames_strategy, st.integers(1, 16), st.integers(1, 40))
def test_every_frame_gets_exactly_one_outcome(work, max_batch, max_queue):
    s = EdfScheduler(
        linear_model(0.5, 0.7),
        SchedulerConfig(margin_ms=0.5, max_batch=max_batch, max_queue=max_queue),
    )
    outcome: dict[int, str] = {}
    seqs: dict[str, int] = {}
    last_run_seq: dict[str, int] = {}
    now = 0.0
    added = []

    probes = [0]
    caught_up = [0]

    def account(plan):
        probed = s.counters["probes"] > probes[0]  # a probe runs against the model's advice
        probes[0] = s.counters["probes"]
        ids = [id(f) for f in plan.run]
        assert len({f.stream_id for f in plan.run}) == len(plan.run)  # one frame per stream
        caught = s.counters["caught_up"] - caught_up[0]
        caught_up[0] = s.counters["caught_up"]
        if plan.run and not probed:
            p = s.model.p_within_matrix([len(plan.run)], np.array(
                [(f.deadline - plan.now) / MS - 0.5 for f in plan.run]))[0]
            assert (p >= s.config.min_on_time_p).all()  # nothing computed that likely misses
            assert plan.expected_on_time == pytest.approx(p.sum())
        for f in plan.run:
            # a stream's frames run in order
            assert f.epoch_seq > last_run_seq.get(f.stream_id, -1)
            last_run_seq[f.stream_id] = f.epoch_seq
            assert f.deadline > plan.now + 0.5 * MS  # never a frame that has already missed
        # expired only if it was unlikely to finish alone now or after the chosen step, or
        # its stream skipped it to catch up
        after = (s.model.mean_ms([len(plan.run)])[0] if plan.run else 0.0) + s.model.quantile_ms(
            1, s.config.min_on_time_p) + 0.5
        unlikely = [f for f in plan.expired if f.deadline <= plan.now + after * MS + 1e-9]
        assert len(plan.expired) - len(unlikely) <= caught
        if not plan.run and len(s):
            assert plan.hold_until is not None and plan.hold_until >= plan.now  # no polling
        for key, group in (("run", ids), ("expired", [id(f) for f in plan.expired]),
                           ("shed", [id(f) for f, _ in plan.shed])):
            for i in group:
                assert i not in outcome, "frame decided twice"
                outcome[i] = key

    for stream, dl, gap, ratio in work:
        now += gap * MS
        sid = f"s{stream}"
        seq = seqs.get(sid, -1) + 1
        seqs[sid] = seq
        f = PendingFrame(sid, 1, seq, now + dl * MS, now)
        added.append(f)
        s.add(f)
        plan = s.schedule(now)
        account(plan)
        if plan.run:
            s.complete(plan, plan.predicted_ms * ratio)
            now += plan.predicted_ms * ratio * MS
    # drain
    for _ in range(2 * len(added) + 2):
        plan = s.schedule(now)
        account(plan)
        if plan.run:
            now += plan.predicted_ms * MS
        elif plan.hold_until is not None:
            now = max(now, plan.hold_until)
    assert len(s) == 0
    assert set(outcome) == {id(f) for f in added}
    c = s.counters
    assert c["ai_planned"] + c["fallback/deadline"] + c["fallback/overload"] == len(added)


def test_complete_ignores_steps_that_computed_nothing_and_uses_computed_count():
    s = sched()
    for i in range(4):
        s.add(frame(f"s{i}", 30))
    plan = s.schedule(0.0)
    s.complete(plan, 0.0)
    s.complete(plan, 5.0, computed=0)
    assert s.model.observed_steps == 0
    s.complete(plan, 2.5, computed=1)
    assert s.model.observed_steps == 1
    assert s.model.to_dict()["samples"]["1"] == 2  # seed + the one real step of 1 frame


def test_one_outlier_does_not_stop_frames_from_running():
    # One 500 ms warm-up step among 2 ms ones: the distribution puts it in its tail, so frames
    # with 19 ms of slack still run (a p95 worst case would have expired them all).
    model = LatencyModel.from_profile({1: 2.0}, rel_margin=0.0)
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0))
    for _ in range(30):
        model.observe(1, 2.0)
    model.observe(1, 500.0)
    s.add(frame("a", 20.0))
    assert [f.stream_id for f in s.schedule(0.0).run] == ["a"]
    assert s.counters["probes"] == 0


def test_probe_unsticks_a_model_poisoned_by_a_stall():
    # A stall: 200 steps of 500 ms fill the window, so every frame looks hopeless for a 20 ms
    # deadline. Without probes every frame would expire forever and the model would never
    # learn the device is fast again.
    model = LatencyModel.from_profile({1: 2.0}, rel_margin=0.0)
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0, probe_after_s=0.1))
    for _ in range(200):
        model.observe(1, 500.0)
    assert model.p_within(1, 19.0) == 0.0
    t = 0.0
    ran = 0
    for i in range(400):  # 40 ms ticks, 4 streams, 20 ms deadlines
        t = i * 0.040
        for k in range(4):
            s.add(frame(f"s{k}", (t + 0.020) / MS, seq=i, arrival_ms=t / MS))
        while len(s):
            plan = s.schedule(t)
            if plan.run:
                ran += len(plan.run)
                s.complete(plan, 2.0 + 0.5 * len(plan.run))
                t += (2.0 + 0.5 * len(plan.run)) * MS
            elif plan.hold_until is not None:
                t = max(t, plan.hold_until)
    assert s.counters["probes"] >= 1
    assert model.p_within(1, 19.0) > 0.9  # the stall has been pushed out of the window
    assert ran > 0.9 * 1600  # and frames run again
    assert s.counters["probes"] < 200  # successful probes chain: recovery takes steps, not ticks
    assert s.counters["steps"] > s.counters["probes"]


def test_no_probe_while_steps_run():
    s = sched(margin_ms=1.0)
    s.add(frame("hopeless", 2.5))
    s.add(frame("ok", 20))
    s.schedule(0.0)
    assert s.counters["probes"] == 0


def test_a_batch_certain_to_make_it_skips_the_valuation_and_decides_the_same():
    """With time to spare for every frame (each slack above the step's largest possible time),
    the decision is the whole batch at once, without valuing windows; and it is the batch
    the valuation picks."""

    def plan(fast: bool):
        s = EdfScheduler(LatencyModel.from_profile({1: {"p50": 2.0, "p99": 3.0}, 64: {"p50": 4.0, "p99": 6.0}}),
                         SchedulerConfig(max_batch=64, max_hold_ms=0.0))
        if not fast:
            s._all_on_time = lambda *a: False  # the full valuation
        keys = np.arange(40)
        s.add_many(keys, np.ones(40), np.zeros(40), np.full(40, 0.050), 0.0, keys)
        return s.schedule(0.0)

    fast, valued = plan(True), plan(False)
    assert fast.run_refs.tolist() == valued.run_refs.tolist() == list(range(40))
    assert fast.expected_on_time == pytest.approx(valued.expected_on_time) == pytest.approx(40.0)
    # not certain (a slack within the step's spread): the valuation decides
    s = EdfScheduler(LatencyModel.from_profile({1: {"p50": 2.0, "p99": 3.0}, 64: {"p50": 4.0, "p99": 6.0}}),
                     SchedulerConfig(max_batch=64, max_hold_ms=0.0))
    assert not s._all_on_time(np.full(40, 4.5), np.empty(0), np.empty(0))
    assert s._all_on_time(np.full(40, 50.0), np.empty(0), np.empty(0))
