"""SupervisorPolicy: each rule with an explicit clock."""

from __future__ import annotations

import json

import pytest

from deployments.contract import FallbackReason
from deployments.supervisor_policy import (
    SupervisorConfig,
    SupervisorPolicy,
    wilson_lower_bound,
)


def feed(p: SupervisorPolicy, sid: str, t0: float, seconds: int, ai: int, **fallback: int) -> float:
    """One report per second, like a bridge; returns the time after the last report."""
    t = t0
    for _ in range(seconds):
        p.report(sid, ai, fallback, t)
        t += 1.0
    return t


def test_healthy_stream_stays_on():
    p = SupervisorPolicy()
    feed(p, "s", 0.0, 10, ai=25)
    assert p.decision("s", 10.0) is True
    assert p.decision("unknown", 10.0) is True


def test_deadline_misses_over_one_percent_turn_ai_off():
    p = SupervisorPolicy()
    p.report("s", 24, {"deadline": 1}, 0.0)
    assert p.decision("s", 0.0)  # one miss is not evidence
    p.report("s", 24, {"deadline": 1}, 1.0)  # 2 of 50 in 2 s = 4%, lower bound ~1.3%
    assert p.decision("s", 1.0) is False
    assert p.reason("s", 1.0) is FallbackReason.UNHEALTHY
    assert p.stream_status("s", 1.0)["off_cause"] == "bad_rate"


def test_errors_count_overload_does_not():
    p = SupervisorPolicy()
    p.report("s", 20, {"overload": 5, "reset": 3}, 0.0)
    p.report("s", 20, {"overload": 5}, 1.0)
    assert p.decision("s", 1.0)
    p.report("s", 20, {FallbackReason.ERROR: 3}, 2.0)
    assert not p.decision("s", 2.0)


def test_old_misses_slide_out_of_the_window():
    p = SupervisorPolicy()
    p.report("s", 24, {"deadline": 1}, 0.0)
    p.report("s", 25, {}, 1.0)
    p.report("s", 24, {"deadline": 1}, 2.5)  # first miss is older than 2 s now
    assert p.decision("s", 2.5)


def test_small_sample_new_stream():
    # one miss in the first 10 frames keeps AI on; two in 10 turn it off
    p = SupervisorPolicy()
    p.report("new", 9, {"deadline": 1}, 0.0)
    assert p.decision("new", 0.0)
    p2 = SupervisorPolicy()
    p2.report("new", 8, {"deadline": 2}, 0.0)
    assert not p2.decision("new", 0.0)
    # a steady 1% is not "exceeding" 1%
    p3 = SupervisorPolicy()
    p3.report("busy", 198, {"deadline": 2}, 0.0)
    assert p3.decision("busy", 0.0)


def test_wilson_bound_values():
    assert wilson_lower_bound(0, 50, 1.645) == 0.0
    assert 0.004 < wilson_lower_bound(1, 50, 1.645) < 0.005
    assert 0.013 < wilson_lower_bound(2, 50, 1.645) < 0.014
    assert wilson_lower_bound(5, 0, 1.645) == 0.0


def test_quality_probe_failure_turns_off():
    p = SupervisorPolicy()
    feed(p, "s", 0.0, 3, ai=25)
    p.quality_probe_failed("s", 3.0)
    assert not p.decision("s", 3.0)
    assert p.stream_status("s", 3.0)["off_cause"] == "quality_probe"


def test_backoff_is_exponential_capped_and_resets_after_healthy_period():
    cfg = SupervisorConfig(backoff_initial_s=1.0, backoff_max_s=8.0, healthy_reset_s=10.0)
    p = SupervisorPolicy(cfg)
    now = 0.0
    waits = []
    for _ in range(6):
        p.quality_probe_failed("s", now)
        assert not p.decision("s", now)
        off_until = p.stream_status("s", now)["off_until"]
        waits.append(off_until - now)
        assert not p.decision("s", off_until - 1e-6)
        now = off_until
        assert p.decision("s", now)  # retried after the backoff
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    # healthy for 10 s after coming back -> next trip starts at 1 s again
    now = feed(p, "s", now, 10, ai=25)
    p.quality_probe_failed("s", now)
    assert p.stream_status("s", now)["off_until"] - now == 1.0
    assert p.counters["retries"] == 6


def test_retry_starts_with_a_clean_window():
    p = SupervisorPolicy()
    p.report("s", 10, {"deadline": 10}, 0.0)
    assert not p.decision("s", 0.5)
    assert p.decision("s", 1.0)
    p.report("s", 25, {}, 1.1)  # old misses must not re-trip it
    assert p.decision("s", 1.1)


def test_reports_while_off_do_not_count():
    p = SupervisorPolicy()
    p.quality_probe_failed("s", 0.0)
    p.report("s", 0, {"unhealthy": 25}, 0.5)
    assert p.stream_status("s", 0.5)["window_frames"] == 0


def test_opt_outs_always_win():
    p = SupervisorPolicy()
    p.register("s1", "alice")
    p.report("s2", 25, {}, 0.0, user_id="alice")
    p.report("s3", 25, {}, 0.0, user_id="bob")
    p.opt_out(user_id="alice")
    p.opt_out(stream_id="s3")
    assert p.reason("s1", 0.0) is FallbackReason.OPTED_OUT
    assert p.reason("s2", 0.0) is FallbackReason.OPTED_OUT
    assert p.reason("s3", 0.0) is FallbackReason.OPTED_OUT
    # opted out beats "back on after backoff"
    p.quality_probe_failed("s1", 0.0)
    assert p.reason("s1", 100.0) is FallbackReason.OPTED_OUT
    p.opt_in(user_id="alice")
    assert p.decision("s2", 100.0) and p.decision("s1", 100.0)
    with pytest.raises(ValueError, match="needs a user_id or a stream_id"):
        p.opt_out()


def test_snapshot_restore_keeps_opt_outs_and_backoff():
    p = SupervisorPolicy()
    p.register("s1", "alice")
    p.opt_out(user_id="alice")
    p.opt_out(stream_id="lonely")
    p.quality_probe_failed("s2", 10.0)
    p.quality_probe_failed("s2", 10.5)  # still off: no second trip
    snap = json.loads(json.dumps(p.snapshot()))
    q = SupervisorPolicy.restore(snap)
    assert q.reason("s1", 50.0) is FallbackReason.OPTED_OUT
    assert q.reason("lonely", 50.0) is FallbackReason.OPTED_OUT
    assert not q.decision("s2", 10.5)
    assert q.decision("s2", 11.0)
    # a new stream of an opted-out user registered after restart is still off
    q.register("s9", "alice")
    assert not q.decision("s9", 60.0)
    with pytest.raises(ValueError, match="unsupported supervisor snapshot version"):
        SupervisorPolicy.restore({"version": 99})


def test_forget_drops_health_but_not_stream_opt_out():
    p = SupervisorPolicy()
    p.opt_out(stream_id="s")
    p.quality_probe_failed("t", 0.0)
    p.forget("s")
    p.forget("t")
    assert not p.decision("s", 0.0)
    assert p.decision("t", 0.0)


def test_sweep_forgets_idle_streams_but_not_backoffs_or_opt_outs():
    p = SupervisorPolicy()
    p.report("idle", 25, {}, 0.0)
    p.report("active", 25, {}, 0.0)
    p.report("active", 25, {}, 59.0)
    p.quality_probe_failed("backoff", 59.5)  # off until 60.5: still in its backoff at 60
    p.register("u", "carol")
    p.opt_out(user_id="carol")
    assert p.sweep(60.0, idle_s=60.0) == 1 + 1  # "idle" and the never-reporting "u"
    assert p.stream_status("active", 60.0)["window_frames"] == 25
    assert set(p.snapshot()["streams"]) == {"active", "backoff"}
    assert not p.decision("backoff", 60.0)
    assert p.snapshot()["opted_out_users"] == ["carol"]


# ----------------------------------------------------------------------------- shared stalls
STREAMS = [f"s{i}" for i in range(8)]


def bridge_report(p: SupervisorPolicy, t: float, per_stream: dict[str, tuple[int, dict[str, int]]],
                  replica_of: dict[str, str] | None = None) -> dict[str, bool]:
    """One bridge's once-a-second report: {stream: (ai, fallback)}; all on replica r1 unless
    `replica_of` says otherwise."""
    reports = {
        sid: {"ai": ai, "fallback": fb, "replica": (replica_of or {}).get(sid, "r1")}
        for sid, (ai, fb) in per_stream.items()
    }
    return p.report_many(reports, t)


def run_trace(p: SupervisorPolicy, trace: list[dict[str, tuple[int, dict[str, int]]]],
              t0: float = 0.0, replica_of: dict[str, str] | None = None) -> list[dict[str, bool]]:
    """Feeds one report per second; returns each second's decisions, taken the way a bridge
    applies them (a stream switched off falls back `unhealthy` locally: no attempts)."""
    out = []
    for k, second in enumerate(trace):
        t = t0 + k + 1.0
        seen = {sid: (0, {"unhealthy": 25}) if not p.decision(sid, t) else v for sid, v in second.items()}
        out.append(bridge_report(p, t, seen, replica_of))
    return out


HEALTHY = (25, {})


def test_shared_stall_keeps_every_stream_on():
    """All 8 streams of one replica miss together for 3 s (most frames, then every frame for
    one second, shorter than `replica_failure_s`): EDF answered those frames one by one, and
    nobody is switched off."""
    p = SupervisorPolicy()
    stall = [(10, {"deadline": 15})] * 2 + [(0, {"deadline": 25})] + [(12, {"deadline": 13})]
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 5
    trace += [dict.fromkeys(STREAMS, s) for s in stall]
    trace += [dict.fromkeys(STREAMS, HEALTHY)] * 5
    decisions = run_trace(p, trace)
    assert all(all(d.values()) for d in decisions)
    assert p.counters["excused/deadline"] == 8 * (15 + 15 + 25 + 13)
    assert p.counters.get("off/bad_rate", 0) == 0
    assert p.replica_status(11.0)["r1"]["shared_stall_at"] == 9.0


def test_a_stall_that_hits_most_but_not_all_streams_is_still_shared():
    p = SupervisorPolicy()
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 3
    hit = {sid: (20, {"deadline": 5}) if i < 5 else HEALTHY for i, sid in enumerate(STREAMS)}
    trace += [hit] * 3
    assert all(all(d.values()) for d in run_trace(p, trace))


def test_single_failing_stream_is_switched_off_within_its_window():
    """s3 misses while the other 7 on its replica are fine: its own failure, off as before."""
    p = SupervisorPolicy()
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 3
    trace += [{**dict.fromkeys(STREAMS, HEALTHY), "s3": (22, {"deadline": 3})}] * 3
    decisions = run_trace(p, trace)
    first_off = next(k for k, d in enumerate(decisions) if not d["s3"])
    assert first_off - 3 <= 1  # by the second report of misses, i.e. within window_s
    assert all(d[sid] for d in decisions for sid in STREAMS if sid != "s3")
    assert p.counters["excused/deadline"] == 0


def test_stream_errors_are_never_excused_by_a_concurrent_stall():
    p = SupervisorPolicy()
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 3
    trace += [{**dict.fromkeys(STREAMS, (15, {"deadline": 10})), "s0": (13, {"deadline": 10, "error": 2})}]
    decisions = run_trace(p, trace)
    assert not decisions[-1]["s0"]
    assert all(decisions[-1][sid] for sid in STREAMS[1:])


def test_replica_failing_every_step_with_errors_switches_its_streams_off():
    p = SupervisorPolicy()
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 3 + [dict.fromkeys(STREAMS, (0, {"error": 25}))] * 2
    decisions = run_trace(p, trace)
    assert not any(decisions[3].values())  # the first report of the failure


def test_replica_missing_every_frame_is_a_failure_after_replica_failure_s():
    """100% misses: a stall at first, a failing replica once it lasts `replica_failure_s`
    (2 s from the start of the first report without an AI answer): every stream is off by
    then, and still off while it lasts."""
    p = SupervisorPolicy()
    cfg = p.config
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 3 + [dict.fromkeys(STREAMS, (0, {"deadline": 25}))] * 6
    decisions = run_trace(p, trace)
    failure_start = 3.0  # reports at 4.0, 5.0 ... cover [3, 4], [4, 5] ...
    off_at = next(k + 1.0 for k, d in enumerate(decisions) if not any(d.values()))
    assert off_at - failure_start <= cfg.replica_failure_s
    assert all(not any(d.values()) for d in decisions[int(off_at):])
    assert p.replica_status(off_at)["r1"]["failing"]


def test_replica_back_after_a_failure_clears_it():
    p = SupervisorPolicy()
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 2 + [dict.fromkeys(STREAMS, (0, {"deadline": 25}))] * 3
    run_trace(p, trace)
    assert p.replica_status(5.0)["r1"]["failing"]
    # Backoff over (1 s): the streams retry on a working replica and stay on.
    later = run_trace(p, [dict.fromkeys(STREAMS, HEALTHY)] * 3, t0=10.0)
    assert all(later[-1].values())
    assert not p.replica_status(13.0)["r1"]["failing"]


def test_a_stall_on_one_replica_does_not_excuse_a_stream_on_another():
    """r1's four streams stall together (kept on); r2's one failing stream among healthy
    ones is still switched off."""
    p = SupervisorPolicy()
    replica_of = {sid: ("r1" if i < 4 else "r2") for i, sid in enumerate(STREAMS)}
    stalled = {sid: (10, {"deadline": 15}) if replica_of[sid] == "r1" else HEALTHY for sid in STREAMS}
    stalled["s5"] = (20, {"deadline": 5})
    trace = [dict.fromkeys(STREAMS, HEALTHY)] * 2 + [stalled] * 2
    d = run_trace(p, trace, replica_of=replica_of)[-1]
    assert all(d[sid] for sid in STREAMS[:4])
    assert not d["s5"]
    assert all(d[sid] for sid in ("s4", "s6", "s7"))


def test_a_stream_alone_or_without_a_replica_is_judged_on_its_own():
    for replica in ("lonely", None):
        p = SupervisorPolicy()
        p.report("s", 25, {}, 0.0, replica=replica)
        p.report("s", 22, {"deadline": 3}, 1.0, replica=replica)
        assert not p.decision("s", 1.0)


def test_other_bridges_reports_on_the_same_replica_count():
    """Two bridges, four streams each on r1, reporting half a second apart: each sees the
    other's misses within `correlation_s`."""
    p = SupervisorPolicy()
    a, b = STREAMS[:4], STREAMS[4:]
    for k in range(3):
        bridge_report(p, k + 1.0, dict.fromkeys(a, HEALTHY))
        bridge_report(p, k + 1.5, dict.fromkeys(b, HEALTHY))
    for k in range(3, 6):
        assert all(bridge_report(p, k + 1.0, dict.fromkeys(a, (12, {"deadline": 13}))).values())
        assert all(bridge_report(p, k + 1.5, dict.fromkeys(b, (12, {"deadline": 13}))).values())


def test_forget_and_moves_keep_the_replica_groups_exact():
    p = SupervisorPolicy()
    bridge_report(p, 1.0, dict.fromkeys(STREAMS, HEALTHY))
    bridge_report(p, 2.0, {"s0": HEALTHY}, {"s0": "r2"})
    p.forget("s1")
    status = p.replica_status(2.0)
    assert status["r1"]["streams"] == 6 and status["r2"]["streams"] == 1
    p.forget("s0")
    assert "r2" not in p.replica_status(2.0)


def test_a_columnar_report_decides_as_the_mapping_does():
    """Bridges send `StreamReports` (a column per outcome code); the policy judges it exactly
    as the `{stream: {...}}` form: same verdicts, same state, same counters."""
    import numpy as np

    from deployments.supervisor_policy import OUTCOME_COLUMNS, StreamReports

    rng = np.random.default_rng(3)
    by_map, by_cols = SupervisorPolicy(), SupervisorPolicy()
    by_map.opt_out(user_id="u3")
    by_cols.opt_out(user_id="u3")
    for t in range(12):
        reports = {}
        for i in range(30):
            fb = {"deadline": int(rng.integers(0, 3)) * (i % 4 == 0), "error": int(i == 7 and t > 4),
                  "overload": int(rng.integers(0, 2)), "unhealthy": int(i == 9) * 25}
            rep = {"ai": int(rng.integers(15, 26)), "fallback": {k: v for k, v in fb.items() if v},
                   "replica": f"r{i % 3}" if i != 5 else None}
            if t == 0:
                rep["user_id"] = f"u{i}"
            reports[f"s{i}"] = rep
        cols = StreamReports.from_mapping(reports)
        assert cols.outcomes.shape == (30, len(OUTCOME_COLUMNS))
        decisions = by_map.report_many(reports, float(t))
        off = by_cols.report_columns(cols, float(t))
        assert {s for s, on in decisions.items() if not on} == set(off)
        assert all(off[s] is by_map.reason(s, float(t)) for s in off)
    assert by_map.snapshot() == by_cols.snapshot()
    assert by_map.replica_status(12.0) == by_cols.replica_status(12.0)
    assert by_map.counters["off/bad_rate"] > 0 and "s3" in off  # opted out: always off


def test_a_malformed_columnar_report_is_refused():
    import numpy as np

    from deployments.supervisor_policy import OUTCOME_COLUMNS, StreamReports

    ok = np.zeros((2, len(OUTCOME_COLUMNS)), np.int64)
    StreamReports(["a", "b"], ok).validate()
    for bad in (StreamReports(["a", "a"], ok), StreamReports(["a"], ok),
                StreamReports(["a", "b"], ok.astype(float)),
                StreamReports(["a", "b"], ok, replicas=["r1"])):
        with pytest.raises(ValueError):
            bad.validate()
