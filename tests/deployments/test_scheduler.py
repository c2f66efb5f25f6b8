"""EdfScheduler: EDF order, expiry before compute, batch sizing from L(B), stream order,
overload shedding, reconfigure, and the every-frame-one-outcome invariant."""

from __future__ import annotations

import math

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
    # Heavy fixed cost: L(B) = 10 + 0.1 B. The head frames only fit B=1; skipping them buys
    # a batch of 50 in the same step. They cannot fit a later step either -> expired.
    prof = {b: 10.0 + 0.1 * b for b in (1, 2, 4, 8, 16, 32, 64)}
    s = EdfScheduler(LatencyModel.from_profile(prof, rel_margin=0.0),
                     SchedulerConfig(margin_ms=0.0, max_batch=64))
    s.add(frame("urgent0", 10.15))
    s.add(frame("urgent1", 10.15))
    for i in range(50):
        s.add(frame(f"s{i}", 30.0))
    plan = s.schedule(0.0)
    assert len(plan.run) == 50
    assert {f.stream_id for f in plan.expired} == {"urgent0", "urgent1"}
    # without overload pressure the head is served, nothing is skipped
    s2 = EdfScheduler(LatencyModel.from_profile(prof, rel_margin=0.0),
                      SchedulerConfig(margin_ms=0.0, max_batch=64))
    s2.add(frame("urgent0", 10.15))
    s2.add(frame("s0", 30.0))
    p2 = s2.schedule(0.0)
    assert [f.stream_id for f in p2.run] == ["urgent0"] and not p2.expired


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

    def account(plan):
        probed = s.counters["probes"] > probes[0]  # a probe runs against the model's advice
        probes[0] = s.counters["probes"]
        ids = [id(f) for f in plan.run]
        assert len({f.stream_id for f in plan.run}) == len(plan.run)  # one frame per stream
        for f in plan.run:
            # a stream's frames run in order
            assert f.epoch_seq > last_run_seq.get(f.stream_id, -1)
            last_run_seq[f.stream_id] = f.epoch_seq
            # predicted to finish before every deadline in the batch
            assert probed or plan.now + plan.predicted_ms * MS + 0.5 * MS <= f.deadline + 1e-12
        for f in plan.expired:
            # expired only if it could not finish alone now, or after the chosen batch
            assert plan.now + (plan.predicted_ms + s.model.predict(1) + 0.5) * MS > f.deadline
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
    for _ in range(len(added) + 2):
        plan = s.schedule(now)
        account(plan)
        if plan.run:
            now += plan.predicted_ms * MS
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


def test_probe_unsticks_a_model_poisoned_by_one_outlier():
    # One 500 ms warm-up step makes L(1) look hopeless for a 20 ms deadline: without probes
    # every frame would expire forever and the model would never learn the device is fast.
    model = LatencyModel.from_profile({1: 2.0}, rel_margin=0.0)  # only B=1 seen so far
    s = EdfScheduler(model, SchedulerConfig(margin_ms=1.0, probe_after_s=0.1))
    for _ in range(3):
        model.observe(1, 2.0)
    model.observe(1, 500.0)
    assert model.predict(1) == 500.0 and model.typical(1) == 2.0
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
    assert s.counters["probes"] >= 1
    assert model.predict(1) < 10.0  # the outlier has been pushed out of the quantile
    assert ran > 0.9 * 1600  # and frames run again
    assert s.counters["probes"] < 40  # successful probes chain: recovery takes a few steps
    assert s.counters["steps"] > s.counters["probes"]


def test_no_probe_while_steps_run():
    s = sched(margin_ms=1.0)
    s.add(frame("hopeless", 2.5))
    s.add(frame("ok", 20))
    s.schedule(0.0)
    assert s.counters["probes"] == 0
