"""The predictive codec autoscaling policy: pure planning, and the Serve glue on real Serve types."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from autoscaling.policy import (
    ClusterSample,
    DecisionReason,
    PolicyConfig,
    ReplicaMetric,
    StreamForecastPolicy,
    desired_replicas,
    effective_capacity,
    plan,
    sample_from_metrics,
)

CFG = PolicyConfig(streams_per_replica=100, target_occupancy=0.8, headroom=0.1, warmup_s=30)


def flat(streams: float, replicas: int, n: int = 30, **kw) -> list[ClusterSample]:
    return [ClusterSample(float(t), streams, replicas, **kw) for t in range(n)]


def test_steady_load_plans_for_target_occupancy() -> None:
    # 1000 streams * 1.1 headroom / (100 * 0.8) = 13.75 -> 14
    d = plan(flat(1000, 14), 14, CFG)
    assert (d.replicas, d.reason) == (14, DecisionReason.FORECAST)
    assert d.forecast_streams == pytest.approx(1000)


def test_ramp_scales_ahead_of_arrivals() -> None:
    # 10 streams/s arriving: undamped, the plan covers the streams one warm-up (30 s) later
    window = [ClusterSample(float(t), 10.0 * t, 10) for t in range(181)]
    undamped = replace(CFG, trend_damping_s=None)
    d = plan(window, 10, undamped)
    assert d.forecast_streams == pytest.approx(1800 + 300, rel=0.03)
    reactive = math.ceil(1800 * 1.1 / 80)
    assert d.replicas >= math.ceil(2050 * 1.1 / 80) > reactive
    # damped (default): the trend is followed for at most trend_damping_s
    damped = plan(window, 10, CFG)
    reach = CFG.trend_damping_s * (1 - math.exp(-CFG.warmup_s / CFG.trend_damping_s))
    assert damped.forecast_streams == pytest.approx(1800 + 10 * reach, rel=0.03)
    assert reactive < damped.replicas < d.replicas


def test_short_burst_is_not_projected_a_whole_warmup_ahead() -> None:
    # 500 streams join within 5 s on a flat load: the damped forecast stays well under what
    # an undamped trend would project over a 60 s warm-up
    cfg = replace(CFG, warmup_s=60)
    window = [ClusterSample(float(t), 1000.0, 14) for t in range(60)]
    window += [ClusterSample(60.0 + t, 1000.0 + 100 * (t + 1), 14) for t in range(5)]
    damped = plan(window, 14, cfg).forecast_streams
    undamped = plan(window, 14, replace(cfg, trend_damping_s=None)).forecast_streams
    assert 1500 <= damped < undamped


def test_departures_are_not_anticipated() -> None:
    window = [ClusterSample(float(t), 3000.0 - 10.0 * t, 40) for t in range(121)]
    d = plan(window, 40, CFG)
    assert d.forecast_streams == pytest.approx(1800)  # the count now, not the forecast
    # 40 replicas are more than the 15% downscale band allows: straight down to the need
    assert d.replicas == math.ceil(1800 * 1.1 / 80) == 25


def test_pressure_lowers_capacity_and_adds_a_replica() -> None:
    # replicas hold only 60 streams each before missing deadlines (a slower GPU)
    window = flat(600, 10, miss_rate=0.05)
    cap = effective_capacity(window, CFG)
    assert cap == pytest.approx(60 * 0.85 / 0.8)
    d = plan(window, 10, CFG)
    assert (d.replicas, d.reason) == (math.ceil(600 * 1.1 / (60 * 0.85)), DecisionReason.PRESSURE)
    assert d.replicas == 13
    # low slack alone is pressure too: more replicas than are reporting, whatever the
    # configured capacity says
    d2 = plan(flat(100, 10, min_slack_ms=0.5), 10, PolicyConfig(streams_per_replica=1000))
    assert (d2.replicas, d2.reason) == (13, DecisionReason.PRESSURE)


def test_pressure_answer_does_not_grow_with_the_target() -> None:
    # while new replicas start, the running ones stay under pressure for many 0.1 s ticks;
    # the answer must not ratchet up with each tick's target
    window = flat(600, 10, miss_rate=0.05)
    first = desired_replicas(window, 10, CFG)
    assert desired_replicas(window, first, CFG) == first


def test_pressure_is_forgotten_after_its_memory() -> None:
    old = [ClusterSample(0.0, 600, 10, miss_rate=0.2)]
    recent = [ClusterSample(float(t), 600, 10) for t in range(1, 200)]
    assert effective_capacity(old + recent, CFG) == CFG.streams_per_replica
    assert effective_capacity(old + recent[:100], CFG) < CFG.streams_per_replica


def test_slots_bind_when_fewer_than_compute_capacity() -> None:
    d = plan(flat(1000, 20, slot_capacity=32), 20, CFG)
    assert (d.replicas, d.reason) == (math.ceil(1100 / 32), DecisionReason.SLOTS)


def test_downscale_needs_hysteresis_margin() -> None:
    # need = 1000*1.1/80 = 13.75 -> 14; band top 13.75*1.15 = 15.8 -> 16: 15 and 16 hold,
    # 17 and above drop to 14
    assert plan(flat(1000, 16), 16, CFG).reason is DecisionReason.HOLD
    assert desired_replicas(flat(1000, 16), 16, CFG) == 16
    assert desired_replicas(flat(1000, 17), 17, CFG) == 14
    assert desired_replicas(flat(1000, 20), 20, CFG) == 14


def test_bounds_and_no_data() -> None:
    cfg = PolicyConfig(streams_per_replica=100, min_replicas=2, max_replicas=5)
    assert desired_replicas(flat(10_000, 5), 5, cfg) == 5
    assert desired_replicas(flat(0, 5), 5, cfg) == 2
    d = plan([], 3, cfg)
    assert (d.replicas, d.reason) == (3, DecisionReason.NO_DATA)


def test_config_rejects_unknown_and_bad_options() -> None:
    with pytest.raises(ValueError, match=r"unknown autoscaling policy option\(s\) \['streams'\]"):
        PolicyConfig.from_kwargs({"streams": 3})
    with pytest.raises(ValueError, match="target_occupancy must be in"):
        PolicyConfig(target_occupancy=1.5)


# ---- Serve glue, on Serve's own context and config types ---------------------------------

DEP = DeploymentID(name="CodecReplica", app_name="auralink")


def _ctx(replicas: list[ReplicaID], raw: dict, target: int, state: dict, config) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name,
        current_num_replicas=len(replicas), target_num_replicas=target,
        running_replicas=replicas, total_num_requests=float(len(replicas)),
        total_queued_requests=0.0, aggregated_metrics=None, raw_metrics=raw,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state=state,
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config,
    )


def _raw(replicas: list[ReplicaID], t: float, streams_each: float, miss: float = 0.0) -> dict:
    def series(v: float) -> dict:
        return {r: [TimeStampedValue(t - 1, v), TimeStampedValue(t, v)] for r in replicas}

    return {
        # the keys deployments/replica.py reports; slot capacity comes from the occupancy
        "slots_in_use": series(streams_each),
        "slot_occupancy": series(streams_each / 512.0),
        "queue_len": series(0.0),
        "miss_rate": series(miss),
        "deadline_slack_p10_ms": series(8.0),
    }


def test_sample_from_serve_metrics() -> None:
    reps = [ReplicaID(f"r{i}", DEP) for i in range(3)]
    raw = _raw(reps, 100.0, 50.0, miss=0.1)
    s = sample_from_metrics(raw, reps)
    assert s == ClusterSample(100.0, 150.0, 3, 512.0, pytest.approx(0.1), 8.0)
    assert sample_from_metrics({}, reps) is None
    # an explicit slot_capacity wins over the derived one
    raw[ReplicaMetric.SLOT_CAPACITY.value] = {r: [TimeStampedValue(100.0, 300.0)] for r in reps}
    assert sample_from_metrics(raw, reps).slot_capacity == 300.0
    assert sample_from_metrics(raw, [ReplicaID("gone", DEP)]) is None


def test_policy_loads_from_import_path_and_scales_a_ramp() -> None:
    config = AutoscalingConfig(
        min_replicas=1, max_replicas=100, upscale_delay_s=0, downscale_delay_s=60,
        policy=AutoscalingPolicy(
            policy_function="autoscaling.policy:StreamForecastPolicy",
            policy_kwargs={"streams_per_replica": 100, "warmup_s": 30},
        ),
    )
    raw_policy = config.policy.get_policy()  # the cloudpickled class, as the controller sees it
    policy = _apply_autoscaling_config(raw_policy(**config.policy.policy_kwargs))
    reps = [ReplicaID(f"r{i}", DEP) for i in range(4)]
    state: dict = {}
    target = 4
    for t in range(0, 91, 3):  # 10 streams/s joining, spread over the running replicas
        ctx = _ctx(reps, _raw(reps, 1000.0 + t, 10.0 * t / len(reps)), target, state, config)
        target, state = policy(ctx)
    # 900 streams now and 10/s arriving: more than the 13 replicas 900 streams need now,
    # less than an undamped 30 s extrapolation (1200 streams -> 17)
    assert 14 <= target <= 17
    assert state["auralink_last_decision"]["reason"] == "forecast"
    assert len(state["auralink_window"]) == 31
    # reports arriving more often than sample_interval_s do not grow the window
    ctx = _ctx(reps, _raw(reps, 1000.0 + 90.2, 225.0), target, state, config)
    _, state2 = policy(ctx)
    assert len(state2["auralink_window"]) == 31


def test_policy_without_custom_metrics_falls_back_to_queue_length() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=1,
                               upscale_delay_s=0)
    reps = [ReplicaID(f"r{i}", DEP) for i in range(2)]
    policy = StreamForecastPolicy(streams_per_replica=100)
    ctx = _ctx(reps, {}, 2, {}, config)
    ctx._total_num_requests_value = 6.0
    desired, _ = policy(ctx)
    assert desired == 6
