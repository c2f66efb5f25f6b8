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
