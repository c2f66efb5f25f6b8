"""`auralink simulate` end to end at a tiny size, against the real components: load
generators on Ray actors driving the bridge core (hint verification included), the Redis
limiter, Serve codec replicas and the supervisor."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from cluster.simulator.faults import Fault, FaultKind, FaultPlan
from cluster.simulator.report import (
    Accounting,
    fallback_amplification,
    percentile_from_hist,
    recovery_time,
)
from cluster.simulator.traces import StreamKind, StreamPopulation, TraceConfig

REQUIRED_KEYS = (
    "streams", "duration_s", "compute", "weights", "frames_total", "frames_ai", "frames_fallback",
    "frames_unaccounted", "fallback_by_reason", "p50_ms", "p99_ms", "hints_sent", "hints_limited",
    "hints_rejected_forged", "hints_rejected_replay", "wire_kbps_ai", "wire_kbps_native",
    "control_plane_cpu", "flooder_allowed_hints_per_s", "fault_recovery_s", "time_dilation",
    "fallback_amplification", "control_plane_us_per_stream_tick", "transport_and_runtime_cpu",
    "late_ticks", "max_lag_ms", "fell_behind", "pace_note", "bridge_runs",
)


# ----------------------------------------------------------------------------- pure parts
def test_population_keeps_the_expected_number_live_and_abusers_stay():
    pop = StreamPopulation(TraceConfig(streams=2000, mean_session_s=20, mean_gap_s=2, flooders=5,
                                       forgers=3, replayers=2, seed=3))
    abusers = np.flatnonzero(pop.kind != StreamKind.NORMAL)
    counts = []
    for k in range(1, 301):
        ch = pop.step(k * 0.1)
        assert not set(ch.left.tolist()) & set(abusers.tolist())
        counts.append(int(pop.active.sum()))
    assert abs(np.mean(counts) - 2000) < 100
    assert pop.joins > 0 and pop.leaves > 0
    # A rejoining user gets a fresh stream id, the user id stays.
    again = np.flatnonzero(pop.sessions > 1)
    assert again.size and pop.stream_ids[again[0]].startswith(pop.user_ids[again[0]] + "-")


def test_fault_parsing_names_the_accepted_forms():
    assert FaultPlan.parse(["kill-replica@20", "stop-redis@5"], 60).faults[0] == Fault(FaultKind.STOP_REDIS, 5.0)
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        Fault.parse("explode@3")
    with pytest.raises(ValueError, match="KIND@SECONDS"):
        Fault.parse("kill-replica")
    with pytest.raises(ValueError, match="after the end"):
        FaultPlan.parse(["kill-replica@70"], 60)


def test_accounting_and_recovery():
    acc = Accounting()
    acc.produced(5)
    acc.outcomes(0.0, np.array([0, 0, 1, 0, 6], np.uint8), latency_ms=10.0)
    assert (acc.frames_ai, acc.frames_fallback, acc.frames_unaccounted) == (3, 2, 0)
    assert acc.fallback_by_reason() == {"deadline": 1, "reset": 1}
    assert percentile_from_hist(acc.latency_hist, 50) == pytest.approx(10.025)
    t = np.arange(0, 10, 0.04)
    fb = np.where((t >= 5) & (t < 6.5), 50, 0)
    rec = recovery_time(t, np.full(t.size, 100), fb, fault_t=5.0)
    assert rec["recovered_after_s"] == pytest.approx(1.5, abs=0.05)
    assert rec["peak_fallback_rate"] == 0.5
    # Saturated before the fault: no recovery is claimed.
    sat = recovery_time(t, np.full(t.size, 100), np.full(t.size, 95), fault_t=5.0, baseline=0.95)
    assert sat["recovered_after_s"] is None and "not measurable" in sat["note"]


def test_fallback_amplification_counts_the_miss_and_what_the_supervisor_added():
    # 25 misses, then every stream off for a while: 250 frames `unhealthy` -> 11 per miss.
    amp = fallback_amplification({"deadline": 25, "unhealthy": 250, "reset": 3, "opted_out": 40})
    assert amp["value"] == 11.0 and (amp["deadline"], amp["error"], amp["unhealthy"]) == (25, 0, 250)
    # EDF answered the misses and nobody was switched off: 1, no amplification.
    assert fallback_amplification({"deadline": 30, "overload": 9})["value"] == 1.0
    assert fallback_amplification({"deadline": 3, "error": 1, "unhealthy": 2})["value"] == 1.5
    assert fallback_amplification({"reset": 5})["value"] is None

def _health(down_s: float = 0.0, policy: str = "fail-open", calls: int = 0) -> dict:
    return {"policy": policy, "available": down_s == 0, "unavailable_s": down_s,
            "calls_without_redis": calls, "hints_fail_open": 40 * calls, "hints_fail_closed": 0,
            "errors": 3 if calls else 0}


def test_flooder_summary_says_held_only_when_the_limit_was_enforced():
    """'held' is computed from the measured rate vs the limit AND limiter availability."""
    from cluster.simulate import limiter_text
    from cluster.simulator.report import flooder_limit

    # 20 s runs: the ceiling is 100 * 1.02 + 10 / 20 = 102.5 hints/s.
    ok = flooder_limit({"f1": 100.08, "f2": 100.1}, 100.0, 10, 20.0, _health())
    assert ok["held"] is True and ok["summary"] == "flooders: 2 held to 100.08-100.1 hints/s (limit 100)"
    assert flooder_limit({"f1": 102.4}, 100.0, 10, 20.0, _health())["held"] is True
    over = flooder_limit({"f1": 103.0}, 100.0, 10, 20.0, _health())
    assert over["held"] is False
    assert over["summary"] == "flooders: 1 NOT held (+3.0% over the limit): 103 hints/s (limit 100)"
    # Redis went away: the limit was not enforced, whatever the measured rate.
    outage = flooder_limit({"f1": 178.9}, 100.0, 10, 45.0, _health(12.3, calls=300))
    assert outage["held"] is False and outage["limiter_unavailable_s"] == 12.3
    assert outage["summary"] == (
        "flooders: 1 NOT held (limiter unavailable 12.3 s, fail-open): 178.9 hints/s (limit 100)")
    short = flooder_limit({"f1": 100.0}, 100.0, 10, 20.0, _health(0.4, calls=2))
    assert short["held"] is False and "held to" not in short["summary"]
    closed = flooder_limit({"f1": 60.0}, 100.0, 10, 20.0, _health(8.0, "fail-closed", calls=9))
    assert closed["held"] is False and closed["summary"] == (
        "flooders: 1 NOT rate limited for 8.0 s (limiter unavailable, fail-closed: their hints "
        "were dropped): 60 hints/s (limit 100)")
    none = flooder_limit({}, 100.0, 10, 20.0, None, flooders=2)
    assert none["held"] is False and none["summary"] == "flooders: 2 NOT held (no hint limiter) (limit 100)"
    assert flooder_limit({}, 100.0, 10, 20.0, _health())["summary"] is None
    # The limiter line: only when it ran without Redis, with what that cost.
    assert limiter_text(_health()) is None
    assert limiter_text(_health(12.3, calls=300)) == (
        "hint limiter: Redis unavailable 12.3 s, still down at the end (fail-open: 12,000 hints "
        "let through unchecked; 300 limiter calls decided without Redis, 3 Redis errors)")


def test_ramp_population_is_an_event_floor_trickle_burst_and_nobody_leaves():
    from cluster.simulator.traces import Ramp

    ramp = Ramp(60.0, floor_frac=0.1, burst_at_frac=0.5, burst_frac=0.2, burst_s=2.0)
    pop = StreamPopulation(TraceConfig(streams=1000, flooders=4, forgers=3, replayers=3, seed=5, ramp=ramp))
    assert pop.n_slots == 1000
    assert int(pop.active.sum()) == 10 + round(990 * 0.1)  # abusers + the floor
    live = {}
    for k in range(1, 1501):
        t = k * 0.04
        pop.step(t)
        live[round(t, 2)] = int(pop.active.sum())
    assert pop.leaves == 0 and live[60.0] == 1000
    # 20% of the honest streams join within the 2 s burst at half-time.
    assert live[32.0] - live[30.0] >= round(990 * 0.2)
    # Before the burst, arrivals trickle in at a steady rate.
    assert abs((live[20.0] - live[10.0]) - (live[30.0] - live[20.0])) < 60
    with pytest.raises(ValueError, match="sum to at most 1"):
        Ramp(60.0, floor_frac=0.9, burst_frac=0.2)


def test_autoscaling_config_scales_every_serve_duration_by_the_dilation():
    from cluster.simulator.driver import SimConfig
    from cluster.simulator.environment import autoscaling_config

    cfg = SimConfig(streams=100, trace="ramp", autoscale="forecast", max_replicas=6)
    fc = autoscaling_config(cfg, per=10, dilation=4.0)
    assert (fc["initial_replicas"], fc["max_replicas"], fc["upscale_delay_s"]) == (1, 6, 0.0)
    kw = fc["policy"]["policy_kwargs"]
    assert fc["policy"]["policy_function"] == "autoscaling.policy:StreamForecastPolicy"
    assert kw["streams_per_replica"] == 10 and kw["warmup_s"] == 8.0 and kw["trend_tau_s"] == 120.0
    ql = autoscaling_config(SimConfig(streams=100, autoscale="queue-length"), per=10, dilation=4.0)
    assert "policy" not in ql and ql["initial_replicas"] == 6  # steady trace: sized for all
    assert (ql["target_ongoing_requests"], ql["upscale_delay_s"], ql["downscale_delay_s"]) == (2.0, 120.0, 2400.0)
    with pytest.raises(ValueError, match="unknown autoscale policy"):
        autoscaling_config(SimConfig(autoscale="magic"), per=10, dilation=1.0)


def test_capacity_plan_says_whether_the_profile_holds_the_load():
    from cluster.simulator.environment import capacity_plan

    profile = {1: 5.0, 8: 10.0, 64: 16.0}
    # Budget 20 - 2 margin - 4 transport = 14 ms: B = 45 fits (10 + 37 * 6/56 = 13.96 ms),
    # less 20% headroom = 36 streams per replica.
    plan = capacity_plan(profile, "dev", 1000, 20.0, 2.0, 6)
    assert plan["streams_per_replica"] == 36 and plan["replicas_needed"] == 28
    assert not plan["holds"] and "need 28 replicas of 'dev'" in plan["verdict"]
    assert capacity_plan(profile, "dev", 1000, 20.0, 2.0, 28)["holds"]


def test_generators_split_the_run_and_tick_staggered():
    from cluster.simulator.driver import SimConfig, generator_specs

    cfg = SimConfig(streams=10_001, flooders=7, forgers=3, replayers=2, bridges=3)
    specs = generator_specs(cfg, dilation=6.0, redis_url=None, native_frame_bytes=80.0)
    assert [s.streams for s in specs] == [3334, 3334, 3333]
    assert [s.flooders for s in specs] == [3, 2, 2] and sum(s.forgers for s in specs) == 3
    assert [s.phase for s in specs] == [0.0, 1 / 3, 2 / 3]
    # users numbered after the previous generators': no two generators share a user
    assert specs[0].user_offset == 0 < specs[1].user_offset < specs[2].user_offset
    assert len({s.bridge_id for s in specs}) == 3 and {s.dilation for s in specs} == {6.0}


def test_replica_cpu_is_counted_from_each_replicas_own_start():
    from cluster.simulator.driver import _replica_delta, merge_limiter_health

    start = {"replicas": {"a": (1.0, 10.0), "gone": (2.0, 5.0)}}
    end = {"replicas": {"a": (4.0, 30.0), "new": (0.5, 3.0), "lost": (None, None)}}
    # a: 3 s of bookkeeping; new (started during the run): all of its 0.5 s; gone: counted as lost
    assert _replica_delta(start, end, 0) == (3.5, 3, 1)
    assert _replica_delta(start, end, 1) == (23.0, 3, 1)
    merged = merge_limiter_health([_health(), _health(2.0, calls=4), None])
    assert merged["available"] is False and merged["calls_without_redis"] == 4
    assert merged["unavailable_s"] == 2.0 and merge_limiter_health([None]) is None


# ----------------------------------------------------------------------------- end to end
def _run(tmp_path: Path, **kw) -> dict:
    from cluster.simulate import simulate
    from cluster.simulator.driver import SimConfig

    cfg = SimConfig(out=tmp_path / "sim", progress=False, **kw)
    report = asyncio.run(simulate(cfg))
    on_disk = json.loads((tmp_path / "sim" / "report.json").read_text())
    assert on_disk["frames_total"] == report["frames_total"]
    return report


@pytest.mark.ray
def test_simulate_emulated_with_abusers_and_a_killed_replica(tmp_path):
    rep = _run(tmp_path, streams=20, duration_s=4.0, compute="emulated", replicas=2, flooders=1,
               forgers=1, replayers=1, faults=["kill-replica@1.5"], seed=1, time_dilation=3.0)
    for k in REQUIRED_KEYS:
        assert k in rep, k
    assert rep["compute"] == "emulated" and "emulated" in rep["compute_label"]
    # The default profile is the codec benchmark's measurement, and the report says so.
    assert rep["profile"] == "measured" and rep["profile_parameters"] is None
    assert rep["latency_profile_measured"] is True
    # Emulated replicas run no model; the label is that of the model the profile timed.
    assert rep["weights"] == json.loads(Path("docs/bench/codec.json").read_text())["weights"]
    plan = rep["capacity_plan"]
    assert plan["replicas_run"] == 2 and plan["streams_per_replica"] >= 1
    assert plan["holds"] == (plan["replicas_needed"] <= 2)
    assert rep["frames_total"] > 20 * 4 / 0.04 * 0.8
    assert rep["frames_unaccounted"] == 0
    assert rep["frames_ai"] + rep["frames_fallback"] == rep["frames_total"]
    # AI frames by the layer the streams' bandwidth hints chose, every one counted once
    assert sum(v["frames"] for v in rep["ai_layers"].values()) == rep["frames_ai"]
    # Every forged and every replayed hint was rejected; the flooder was held to its limit.
    kinds = rep["hints_sent_by_kind"]
    assert kinds["forged"] > 0 and rep["hints_rejected_forged"] == kinds["forged"]
    assert kinds["replay"] > 0 and rep["hints_rejected_replay"] == kinds["replay"]
    assert rep["hints_limited"] > 0
    fl = rep["flooder_allowed_hints_per_s"]
    assert fl["count"] == 1
    # 100/s plus the limiter's burst (10) spread over the run.
    assert fl["max_per_s"] <= 100 + 10 / 4.0 + 5
    assert fl["min_per_s"] >= 100 - 5
    assert rep["limiter_health"]["available"] and rep["limiter_health"]["calls_without_redis"] == 0
    assert rep["flooder_limit"]["held"] == (fl["max_per_s"] <= rep["flooder_limit"]["held_ceiling_per_s"])
    # The fault fired and is reported.
    assert [f["fault"] for f in rep["faults"]] == ["kill-replica@1.5"]
    assert "killed" in rep["faults"][0]["detail"]
    for name in ("latency_cdf", "outcomes", "replicas", "bandwidth"):
        assert Path(rep["plots"][name]).stat().st_size > 5000


@pytest.mark.ray
def test_simulate_with_a_modelled_profile_labels_the_report(tmp_path):
    from cluster.simulator.environment import load_profile_file

    modelled = load_profile_file(Path("docs/bench/profile-h100-modelled.json"))
    rep = _run(tmp_path, streams=20, duration_s=3.0, compute="emulated", replicas=1, flooders=0,
               forgers=0, replayers=0, time_dilation=3.0, latency_profile=modelled.ms,
               profile_device=modelled.device, profile_weights=modelled.weights,
               profile_kind=modelled.kind, profile_parameters=modelled.parameters)
    assert rep["profile"] == "modelled (not measured)"
    assert rep["profile_parameters"] == modelled.parameters
    assert rep["latency_profile_measured"] is False
    assert "modelled (not measured)" in rep["compute_label"]
    assert rep["capacity_plan"]["holds"] and rep["capacity_plan"]["streams_per_replica"] > 1000
    assert rep["frames_unaccounted"] == 0 and rep["frames_ai"] > 0
    # the warm-up ticks before t = 0 are reported, and none of their frames is in a figure
    from cluster.simulator.generator import WARMUP_TICKS

    assert rep["warmup_ticks"] == WARMUP_TICKS
    assert rep["frames_total"] == rep["frames_ai"] + rep["frames_fallback"]
    assert rep["frames_total"] <= 20 * 2 * int(3.0 / 0.040)  # the measured ticks' frames only


@pytest.mark.ray
def test_simulate_reports_a_redis_outage_truthfully(tmp_path):
    """Redis stops mid-run: the media keeps flowing, the limiter fails open, and the report
    counts it and does not claim the flooder was held."""
    rep = _run(tmp_path, streams=8, duration_s=4.0, compute="emulated", replicas=1, flooders=1,
               forgers=0, replayers=0, faults=["stop-redis@1.5"], seed=2, time_dilation=3.0)
    assert rep["frames_unaccounted"] == 0 and rep["frames_ai"] > 0
    h = rep["limiter_health"]
    assert h["policy"] == "fail-open" and not h["available"] and h["outages"] == 1
    assert h["errors"] >= 1 and h["calls_without_redis"] > 0 and h["hints_fail_open"] > 0
    # Down from its first failed call (just after 1.5 s) to the end (4 s), in simulated time.
    assert 1.5 <= h["unavailable_s"] <= 2.5 + 0.5, h
    fl = rep["flooder_limit"]
    assert fl["held"] is False and not fl["limiter_available_whole_run"]
    assert fl["summary"].startswith(f"flooders: 1 NOT held (limiter unavailable {h['unavailable_s']:.1f} s, fail-open): ")
    assert rep["flooder_allowed_hints_per_s"]["max_per_s"] > 110  # 250/s offered, unchecked for 2.5 s


@pytest.mark.ray
def test_simulate_real_compute_few_streams(tmp_path):
    from cluster.simulate import CPU_REAL_DEADLINE_MS

    rep = _run(tmp_path, streams=3, duration_s=3.0, compute="real", replicas=1, flooders=0,
               forgers=0, replayers=0, time_dilation=1.0, deadline_ms=CPU_REAL_DEADLINE_MS)
    assert rep["compute"] == "real" and rep["compute_label"].startswith("real")
    assert rep["weights"] == "random (codebooks k-means initialised)"
    assert rep["frames_unaccounted"] == 0
    assert rep["frames_total"] >= 3 * 3 / 0.04 * 0.8
    assert rep["compact_frames"] is False
    assert rep["frames_ai"] > 0  # the real model answered within the CPU deadline


@pytest.mark.ray
def test_simulate_autoscales_a_ramp_with_the_forecast_policy(tmp_path):
    """The real Serve controller runs StreamForecastPolicy on the replicas' stats while the
    event's streams arrive: it starts more replicas, and every frame still has an outcome."""
    rep = _run(tmp_path, streams=12, duration_s=12.0, compute="emulated", trace="ramp",
               autoscale="forecast", max_replicas=3, deadline_ms=30.0, flooders=0, forgers=0,
               replayers=0, time_dilation=3.0)
    auto = rep["autoscaling"]
    assert rep["trace"] == "ramp" and auto["policy"] == "forecast"
    assert auto["serve_autoscaling_config"]["policy"]["policy_kwargs"]["warmup_s"] == 6.0
    # Serve starts the deployment at one replica; the policy adds more as the ramp arrives
    # (possibly during the uncounted warm-up ticks, so the first counted tick may see 2)
    assert auto["serve_autoscaling_config"]["initial_replicas"] == 1
    assert auto["replicas_start"] <= 2 and auto["replicas_max"] >= 2
    assert auto["replica_seconds"] > 12.0
    assert rep["frames_unaccounted"] == 0 and rep["streams_peak"] == 12


def test_honest_hints_ask_for_the_encodec_layers_and_verify():
    from cluster.simulator.abusers import HintKind, HintRates, HintTraffic
    from sfu_bridge.hint_auth import HintVerifier

    secret = b"k" * 32
    pop = StreamPopulation(TraceConfig(streams=50, mean_session_s=1e9, mean_gap_s=1, flooders=0,
                                       forgers=0, replayers=0, seed=5))
    pop.step(0.0)
    traffic = HintTraffic(pop, secret, HintRates(normal_rate=5.0))
    verifiers: dict[str, HintVerifier] = {}
    asked = []
    for _ in range(50):
        for sid, raw, kind in traffic.tick(pop.live(), 0.04):
            assert kind is HintKind.HONEST
            verifier = verifiers.setdefault(sid, HintVerifier(cluster_secret=secret, stream_id=sid))
            asked.append(verifier.verify(sid, raw).bandwidth_kbps)
    # about 500 hints, every layer asked for, each about a fifth of the time
    assert len(asked) > 300 and set(asked) == {1.5, 3.0, 6.0, 12.0, 24.0}
    assert max(asked.count(b) for b in set(asked)) < 0.35 * len(asked)
