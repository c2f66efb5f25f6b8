"""SupervisorPolicy (state in columns, a report judged with numpy over its rows) against the
plain reference kept in supervisor_reference.py (a StreamHealth object per stream, a loop
per report): on large mixed reports from two bridges - healthy streams, scattered misses,
failing streams, errors, a shared stall, a replica that stops answering, moves between
replicas, streams without one, new users, opt-outs and opt-ins, probes, forgets, sweeps,
bursts of reports within one window, a restart from a snapshot - both must give the same
verdicts and hold the same state, call by call."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.supervisor_policy import (
    OUTCOME_COLUMNS,
    StreamReports,
    SupervisorConfig,
    SupervisorPolicy,
)
from tests.deployments.supervisor_reference import ReferencePolicy

COL = {c: i for i, c in enumerate(OUTCOME_COLUMNS)}
REPLICAS = 6


def bridge_reports(rng: np.random.Generator, ids: list[str], t: int, new: set[str]) -> StreamReports:
    n = len(ids)
    num = np.array([int(s.split("-s")[1]) for s in ids])
    # mostly a fixed replica; some streams move (to another, or to one of their own that is
    # left empty when they move on), some are reported without one (-1)
    rep = np.where(num % 53 == 0, -1, (num + np.where(num % 11 == 0, t // 7, 0)) % REPLICAS)
    rep = np.where(num % 13 == 0, REPLICAS + (t // 3) % 4, rep)
    o = np.zeros((n, len(OUTCOME_COLUMNS)), np.int64)
    o[:, 0] = 25
    miss = rng.random(n) < 0.03  # scattered misses
    o[miss, COL["deadline"]] = rng.integers(1, 3, int(miss.sum()))
    failing = num % 97 == 5  # a few streams failing on their own
    o[failing, COL["deadline"]] = rng.integers(0, 6, int(failing.sum()))
    o[num % 151 == 7, COL["error"]] = 1
    o[rng.random(n) < 0.02, COL["overload"]] += 1
    o[num % 89 == 3, COL["unhealthy"]] = 25  # never tried: counts neither way
    if 8 <= t < 10:  # replica r1 stalls: most of its streams miss together
        on1 = rep == 1
        o[on1, COL["deadline"]], o[on1, 0] = 12, 13
    if 14 <= t < 19:  # replica r2 stops answering: every frame misses
        on2 = rep == 2
        o[on2, COL["deadline"]], o[on2, 0] = 25, 0
    o[rng.random(n) < 0.002] = -1  # a negative count is no count
    keep = rng.random(n) >= 0.05  # DTX: a silent stream has nothing to report
    sids = [s for s, k in zip(ids, keep, strict=True) if k]
    replicas = [None if r < 0 else f"r{r}" for r in rep[keep].tolist()]
    if 15 <= t < 17:  # the streams of their own replica stop answering too
        mine = rep >= REPLICAS
        o[mine & keep, COL["deadline"]], o[mine & keep, 0] = 25, 0
    users = {s: f"u{k % 700}" for s, k in zip(sids, num[keep].tolist(), strict=True) if s in new}
    users.update({s: f"u{int(s.split('-s')[1]) % 700}" for s in ids[:2]})  # named again
    users["b9-s0"] = "u1"  # a stream not in this report: ignored
    return StreamReports(sids, o[keep], users, replicas)


def assert_same(new: SupervisorPolicy, ref: ReferencePolicy, now: float, sample: list[str]) -> None:
    assert new.snapshot() == ref.snapshot()
    assert new.snapshot_json() == json.dumps(new.snapshot()).encode()  # what the actor stores
    assert new.replica_status(now) == ref.replica_status(now)
    assert dict(new.counters) == dict(ref.counters)
    for sid in sample:
        assert new.stream_status(sid, now) == ref.stream_status(sid, now)


@pytest.mark.parametrize("seed", [1, 2])
def test_columnar_policy_decides_as_the_reference_on_large_mixed_reports(seed: int) -> None:
    rng = np.random.default_rng(seed)
    new, ref = SupervisorPolicy(), ReferencePolicy()
    per_bridge = 900
    ids = [[f"b{b}-s{i}" for i in range(per_bridge)] for b in range(2)]
    nxt = [per_bridge] * 2
    registered: set[str] = set()
    off_total = 0
    for t in range(30):
        for b in range(2):
            now = 100.0 + t + 0.4 * b
            if t and t % 4 == 0:  # churn: some streams end, some start
                for _ in range(15):
                    gone = ids[b].pop(int(rng.integers(0, len(ids[b]))))
                    if rng.random() < 0.5:
                        new.forget(gone)
                        ref.forget(gone)
                    ids[b].append(f"b{b}-s{nxt[b]}")
                    nxt[b] += 1
            fresh = set(ids[b]) - registered
            registered |= fresh
            batch = bridge_reports(rng, ids[b], t, fresh)
            assert new.off_streams(batch.stream_ids, now) == [
                s for s in batch.stream_ids if not ref.decision(s, now)]
            off = new.report_columns(batch, now)
            assert off == ref.report_columns(batch, now)
            assert list(off) == [s for s in batch.stream_ids if s in off]
            off_total += len(off)
        if t == 5:
            for p in (new, ref):
                p.opt_out(user_id="u17")
                p.opt_out(stream_id="b1-s40")
                p.opt_out(stream_id="never-reported")
                p.opt_out(stream_id=f"b0-s{per_bridge + 20}")  # before its first report
                p.register("b0-s3", "u17")
        if t == 12:
            for p in (new, ref):
                p.opt_in(user_id="u17")
                p.opt_out(user_id="u18")
                p.quality_probe_failed("b0-s8", now)
                p.quality_probe_failed("b1-s9", now)
        if t == 20:  # a burst: one stream reported many times within its window
            burst = StreamReports(["b0-s1"], np.array([[5] + [0] * (len(OUTCOME_COLUMNS) - 1)]))
            for k in range(12):
                assert new.report_columns(burst, now + 0.01 * k) == ref.report_columns(burst, now + 0.01 * k)
        if t % 6 == 5:
            assert new.sweep(now, idle_s=3.0) == ref.sweep(now, idle_s=3.0)
            assert_same(new, ref, now, ["b0-s1", "b0-s3", "b0-s8", "b1-s40", "b0-s5", "nope"])
        if t == 22:  # a restart: both continue from the columnar policy's snapshot
            snap = new.snapshot()
            new, ref = SupervisorPolicy.restore(snap), ReferencePolicy.restore(snap)
            assert_same(new, ref, now, ["b0-s1", "b0-s8"])
    assert_same(new, ref, 130.0, ["b0-s1", "b0-s8"])
    assert new._width == 4  # the burst's wide windows were narrowed again
    # the run exercised what it is meant to
    c = new.counters
    assert c["off/bad_rate"] > 20 and c["excused/deadline"] > 100 and c["replica_no_ai"] >= 1
    assert c["off/quality_probe"] >= 1 and c["retries"] > 10 and off_total > 100


def test_a_small_config_and_reports_out_of_order_decide_as_the_reference() -> None:
    """Other settings (judged on one bad frame, short windows) and a clock that steps back."""
    cfg = SupervisorConfig(window_s=0.5, min_bad=1, correlation_s=0.3, replica_failure_s=0.6,
                           backoff_initial_s=0.2, healthy_reset_s=1.0)
    new, ref = SupervisorPolicy(cfg), ReferencePolicy(cfg)
    rng = np.random.default_rng(5)
    ids = [f"s{i}" for i in range(40)]
    for k in range(80):
        now = 10.0 + 0.13 * k - (0.3 if k % 9 == 4 else 0.0)
        part = [s for s in ids if rng.random() < 0.6]  # the others' last intervals age
        o = np.zeros((len(part), len(OUTCOME_COLUMNS)), np.int64)
        o[:, 0] = rng.integers(0, 8, len(part))
        o[:, COL["deadline"]] = rng.random(len(part)) < (0.6 if k % 10 < 3 else 0.1)
        o[:, COL["error"]] = rng.random(len(part)) < 0.03
        replicas = [f"r{int(s[1:]) % 3}" if int(s[1:]) % 7 else None for s in part]
        batch = StreamReports(part, o, replicas=replicas)
        assert new.report_columns(batch, now) == ref.report_columns(batch, now)
    assert_same(new, ref, 20.0, ids[:5])
    assert new.counters["off/bad_rate"] > 5 and new.counters["excused/deadline"] > 5


def test_the_stored_snapshot_is_json_dumps_of_the_snapshot_byte_for_byte() -> None:
    """`snapshot_json` formats columns instead of building a dict per stream; the bytes must
    be json.dumps's: escaped and non-ASCII ids, every window length, off and opted-out
    streams, and json's own spelling where a time is not finite."""
    p = SupervisorPolicy()
    assert p.snapshot_json() == json.dumps(p.snapshot()).encode()
    ids = ['plain', 'quo"te', "back\\slash", "tab\tnl\n", "caf\u00e9-\U0001f600", "ctl\x01"]
    p.opt_out(user_id='u"1')
    p.opt_out(stream_id="caf\u00e9-\U0001f600")
    for k in range(9):
        o = np.zeros((len(ids), len(OUTCOME_COLUMNS)), np.int64)
        o[:, 0] = 20 + k
        o[1, COL["deadline"]] = 5 if k == 3 else 0
        m = 2 + k % 5
        users = {s: f'u"{i}' if i % 2 else "\u00fc" for i, s in enumerate(ids)}
        batch = StreamReports(ids[:m], o[:m], users, replicas=['r"1'] * m)
        p.report_columns(batch, 0.3 * k + 1e-7 * k)
        p.register("only-registered", None)
        assert p.snapshot_json() == json.dumps(p.snapshot()).encode()
    zero = SupervisorPolicy()  # -0.0 and 0.0 are equal, but json writes them apart
    for sid, now in (("z1", -0.0), ("z2", 0.0), ("z3", -0.0)):
        zero.report_columns(StreamReports([sid], np.ones((1, len(OUTCOME_COLUMNS)), np.int64)), now)
        assert zero.snapshot_json() == json.dumps(zero.snapshot()).encode()
    p.quality_probe_failed("plain", 1e300)
    assert p.snapshot_json() == json.dumps(p.snapshot()).encode()
    p.report_columns(StreamReports(["plain"], np.ones((1, len(OUTCOME_COLUMNS)), np.int64)), float("inf"))
    assert p.snapshot_json() == json.dumps(p.snapshot()).encode()
    assert SupervisorPolicy.restore(json.loads(p.snapshot_json())).snapshot() == p.snapshot()
