"""deployments._columns (the replica's per-step loops in C) against their numpy versions.

Equality: every column and output that is a sum, difference, comparison, floor or rounding of
the inputs is bit-for-bit the same (IEEE arithmetic is exact to specification and the C
build contracts nothing). The presence is a power (`keep ** skipped ticks`), which numpy may
compute with its own vector kernels on some CPUs: that column and the weight taken from it
agree to 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

from deployments import arrivals
from deployments.arrivals import ArrivalForecast

pytestmark = pytest.mark.skipif(arrivals._c_observe is None, reason="deployments._columns is not built")

P = 0.040


def _columns(f: ArrivalForecast) -> dict[str, np.ndarray]:
    return {name: getattr(f, name) for name in ("_known", "_last", "_budget", "_presence", "_next")}


def _same_state(c: ArrivalForecast, py: ArrivalForecast) -> None:
    a, b = _columns(c), _columns(py)
    for name in a:
        if name == "_presence":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-12, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _same_expected(ec, ep) -> None:
    np.testing.assert_array_equal(ec.keys, ep.keys)
    assert ec.keys.dtype == ep.keys.dtype == np.int64
    for name in ("arrival", "deadline", "due_by"):
        np.testing.assert_array_equal(getattr(ec, name), getattr(ep, name), err_msg=name)
    np.testing.assert_allclose(ec.weight, ep.weight, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_the_forecast_in_c_matches_numpy_over_a_churning_replica(seed: int) -> None:
    """Two bridges' requests each tick (half a tick apart, jittered) over streams that join,
    leave, go quiet for good, skip ticks (DTX), arrive twice in a tick or late; the forecast
    asked at random moments, with and without queued streams excluded."""
    rng = np.random.default_rng(seed)
    c = ArrivalForecast(period_s=P, grace_s=0.002, alpha=0.1, forget_after=8, native=True)
    py = ArrivalForecast(period_s=P, grace_s=0.002, alpha=0.1, forget_after=8, native=False)
    live = rng.permutation(300)[:120]
    t = 10.0
    for tick in range(120):
        if tick % 7 == 0:  # churn: some leave (they go quiet), new keys join, some beyond any so far
            live = np.union1d(rng.choice(live, size=live.size - 10, replace=False),
                              rng.integers(0, 300 + 10 * tick, size=12))
        for half in (0, 1):
            keys = live[live % 2 == half]
            keys = keys[rng.random(keys.size) > 0.15]  # DTX: skipped this tick
            if rng.random() < 0.1:  # a duplicate request of the same tick, a hair later
                keys = keys[: keys.size // 2]
            arrival = t + half * P / 2 + float(rng.normal(0, 0.002))
            deadlines = arrival + rng.choice([0.020, 0.020, 0.030], size=keys.size)
            keys = rng.permutation(keys)
            c.observe(keys, arrival, deadlines)
            py.observe(keys, arrival, deadlines)
            _same_state(c, py)
            for _ in range(2):
                now = arrival + float(rng.uniform(0, 0.06))
                known = py._known.nonzero()[0]
                if known.size and rng.random() < 0.4:  # on a boundary: exactly overdue, or due
                    k = int(rng.choice(known))
                    now = float(py._next[k] + py.grace_s) if rng.random() < 0.5 else float(py._next[k])
                horizon = float(rng.choice([0.0, 0.005, 0.02]))
                exclude = None
                if rng.random() < 0.5:
                    exclude = rng.random(int(rng.integers(0, 400))) < 0.3
                _same_expected(c.expected(now, horizon, exclude=exclude),
                               py.expected(now, horizon, exclude=exclude))
                _same_state(c, py)  # expected() moves overdue ticks and forgets quiet streams
        t += P if rng.random() > 0.05 else 3 * P  # now and then a stall of the whole replica
    assert len(c) == len(py) > 0


def test_the_forecast_in_c_takes_any_integer_keys_and_refuses_negative_ones() -> None:
    c = ArrivalForecast(native=True)
    c.observe(np.array([5000, 3], np.int32), 1.0, np.array([1.02, 1.02]))  # grows past 64
    assert len(c) == 2 and c._known.size >= 5001
    e = c.expected(1.04, 0.005)
    assert e.keys.tolist() == [3, 5000]  # equal times: by key, as numpy's stable sort
    with pytest.raises(ValueError, match=">= 0"):
        c.observe(np.array([-1]), 2.0, np.array([2.02]))
    assert ArrivalForecast(native=True).expected(0.0, 1.0).keys.size == 0


def test_the_forecast_in_c_orders_many_distinct_times_as_numpy() -> None:
    """The C loop counts frames into a few shared times, and sorts when there are more
    (here 60 times, ties among them): the same order as numpy's stable sort."""
    rng = np.random.default_rng(7)
    c, py = ArrivalForecast(native=True), ArrivalForecast(native=False)
    for _ in range(60):
        keys = rng.choice(400, size=5, replace=False)
        at = 1.0 + float(rng.integers(0, 45)) * 0.0005
        for f in (c, py):
            f.observe(keys, at, np.full(5, at + 0.02))
    for now in (1.03, 1.045, 1.06):
        _same_expected(c.expected(now, 0.02), py.expected(now, 0.02))
        _same_state(c, py)


def test_native_is_the_default_where_built() -> None:
    assert ArrivalForecast().native


@pytest.mark.parametrize("seed", range(4))
def test_the_scheduler_in_c_plans_what_numpy_plans(seed: int) -> None:
    """Two schedulers, one adding frames in C and one in numpy, fed the same requests (two
    bridges half a tick apart, some frames without a deadline, a queue small enough to shed behind a replica that now and then decides late,
    streams that join and leave) and asked at the same moments: the same plans, queue and
    counters, step after step."""
    from deployments.latency_model import LatencyModel
    from deployments.scheduler import EdfScheduler, SchedulerConfig

    def scheduler(native: bool) -> EdfScheduler:
        model = LatencyModel.from_profile({1: {"p50": 2.0, "p99": 3.0}, 256: {"p50": 9.0, "p99": 14.0}})
        return EdfScheduler(model, SchedulerConfig(max_batch=256, max_queue=150, max_hold_ms=4.0), native=native)

    rng = np.random.default_rng(seed)
    c, py = scheduler(True), scheduler(False)
    assert c._forecast.native and not py._forecast.native
    live = np.arange(200)
    rid, t = 0, 5.0
    for tick in range(60):
        if tick % 5 == 0:
            live = np.union1d(rng.choice(live, size=live.size - 8, replace=False),
                              rng.integers(0, 400 + tick, size=8))
        for half in (0, 1):
            keys = rng.permutation(live[live % 2 == half])
            keys = keys[rng.random(keys.size) > 0.1]
            arrival = t + half * 0.02 + float(rng.normal(0, 0.001))
            deadlines = arrival + rng.choice([0.02, 0.03, np.nan], size=keys.size, p=[0.6, 0.3, 0.1])
            refs = (rid << 20) | np.arange(keys.size, dtype=np.int64)
            rid += 1
            seqs = np.full(keys.size, tick, np.int64)
            shed_c = c.add_many(keys, np.ones(keys.size, np.int64), seqs, deadlines, arrival, refs)
            shed_p = py.add_many(keys, np.ones(keys.size, np.int64), seqs, deadlines, arrival, refs)
            np.testing.assert_array_equal(shed_c, shed_p)
            asks = 0 if rng.random() < 0.2 else 2  # now and then a busy replica asks late
            for now in sorted(arrival + rng.uniform(0, 0.015, size=asks)):
                pc, pp = c.schedule(float(now)), py.schedule(float(now))
                for name in ("run_refs", "run_deadlines", "expired_refs", "shed_refs"):
                    np.testing.assert_array_equal(getattr(pc, name), getattr(pp, name), err_msg=name)
                assert (pc.hold_until, pc.predicted_ms, pc.probe) == (pp.hold_until, pp.predicted_ms, pp.probe)
                assert pc.expected_on_time == pytest.approx(pp.expected_on_time, rel=1e-9)
                ms = float(rng.uniform(1.0, 12.0))
                c.complete(pc, ms)
                py.complete(pp, ms)
        t += 0.04
        assert c.counters == py.counters
        assert c._budget_ms == pytest.approx(py._budget_ms, rel=1e-12)
        n = c._n
        assert n == py._n and c._live_n == py._live_n
        for name in ("_dl", "_arr", "_key", "_ep", "_sq", "_ref", "_live"):
            np.testing.assert_array_equal(getattr(c, name)[:n], getattr(py, name)[:n], err_msg=name)
        np.testing.assert_array_equal(c._kq[: py._kq.size], py._kq)
    assert c.counters["fallback/overload"] > 0 and c.counters["added"] > 5_000


def test_the_slot_pool_finds_streams_by_ref_in_c_as_in_numpy() -> None:
    """SlotPool.lookup_refs, C and numpy, on one pool: refs remembered, slots that changed
    hands since (generation), refs beyond the sender's table, rows reused by new streams."""
    from deployments.replica import SlotPool

    rng = np.random.default_rng(11)
    pool = SlotPool(400)
    ids = [f"s{i}" for i in range(300)]
    slots = pool.acquire_new(ids, 0.0)
    refs = (np.arange(300, dtype=np.int64) << 32) | 1
    pool.remember("bridge-a", refs[:250], slots[:250])
    for sid in rng.choice(ids[:250], size=20, replace=False).tolist():  # slots change hands
        pool.release(sid)
        pool.acquire(sid + "-new", 1.0)
    for _ in range(20):
        pick = rng.choice(300, size=int(rng.integers(1, 300)), replace=False)
        r = refs[pick].copy()
        r[rng.random(r.size) < 0.1] += 1  # a row's newer stream (another generation of the ref)
        names = [ids[i] for i in pick.tolist()]
        pool.native = True
        got = pool.lookup_refs(names, "bridge-a", r)
        pool.native = False
        want = pool.lookup_refs(names, "bridge-a", r)
        assert got[0].tolist() == want[0].tolist()
        assert got[1].dtype == want[1].dtype == bool and got[1].tolist() == want[1].tolist()
        assert 0 < int(got[1].sum()) < r.size


def test_the_slot_pool_tells_distinct_streams_in_c_as_in_numpy() -> None:
    """SlotPool.distinct, C and numpy: known streams repeated (adjacent or far apart),
    unknown ones repeated or not, both kinds mixed, empty requests, many calls on one pool
    (the C loop's marks are never cleared)."""
    from deployments.replica import SlotPool

    rng = np.random.default_rng(12)
    pool = SlotPool(64)
    ids = [f"s{i}" for i in range(80)]
    slots_of = dict(zip(ids[:60], pool.acquire_new(ids[:60], 0.0).tolist(), strict=True))
    seen: set[bool] = set()
    for _ in range(300):
        names = list(rng.choice(ids, size=int(rng.integers(0, 30)), replace=False))
        if names and rng.random() < 0.4:
            names.insert(int(rng.integers(len(names) + 1)), names[int(rng.integers(len(names)))])
        slots = np.array([slots_of.get(n, -1) for n in names], np.int64)
        pool.native = True
        got = pool.distinct(names, slots)
        pool.native = False
        assert got == pool.distinct(names, slots) == (len(set(names)) == len(names))
        seen.add(got)
    assert seen == {True, False}
    with pytest.raises(IndexError):
        pool.native = True
        pool.distinct(["x"], np.array([64], np.int64))


def test_the_replica_in_c_answers_every_frame_as_numpy() -> None:
    """Two emulated replicas, one with its bookkeeping's C loops and one all numpy, on one
    deterministic clock each, answer the same requests (two bridges, streams joining, stale
    refs, budgets that run out before, during and after the step) the same way, frame by
    frame, and keep the same record of recent frames."""
    import asyncio
    import itertools

    from deployments.config import ComputeMode, ReplicaSettings
    from deployments.contract import FrameBatch, Op
    from deployments.replica import CodecReplicaCore

    async def run(native: bool) -> tuple:
        rng = np.random.default_rng(21)
        ticks = itertools.count()
        core = CodecReplicaCore(ReplicaSettings(compute=ComputeMode.EMULATED, capacity=600, max_batch=600,
                                                latency_profile={1: 0.2, 600: 0.6}),
                                "columns", clock=lambda: next(ticks) * 0.004, native=native)
        answers = []
        for tick in range(14):
            for bridge in ("a", "b"):
                n = 150 + 10 * tick
                ids = [f"{bridge}{i}" for i in range(n)]
                refs = (np.arange(n, dtype=np.int64) << 32) | (1 + (rng.random(n) < 0.05))
                budgets = rng.choice([4.0, 8.0, 12.0, 16.0, 1e4], size=n, p=[0.05, 0.1, 0.1, 0.1, 0.65])
                batch = FrameBatch(Op.ENCODE, bridge, ids, np.zeros(n, np.int64),
                                   np.where(np.arange(n) >= n - 10, 0, tick).astype(np.int64), budgets,
                                   np.zeros((n, 320), np.int16), 6.0, np.full(n, 8, np.int64), stream_refs=refs)
                res = await core.process(batch)
                answers.append((res.outcome_codes.tolist(), res.epochs.tolist(), res.queue_ms.tolist()))
        counters = dict(core.scheduler.counters)  # (stop() resets them)
        await core.stop()
        return (answers, core._recent_missed.tolist(), core._recent_slack.tolist(), core._recent_at,
                core._recent_n, core.pool.by_ref, core.pool.by_id, counters)

    c, py = asyncio.run(run(True)), asyncio.run(run(False))
    assert c == py
    codes = [code for a in c[0] for code in a[0]]
    assert 0 in codes and len(set(codes)) > 2 and any(c[1])  # AI, fallbacks, missed deadlines
    assert c[7].get("ran_late", 0) > 0  # frames that ran and finished after their deadline


def test_batch_validation_in_c_rejects_what_numpy_rejects() -> None:
    """FrameBatch.validate's value checks in C (budgets, depths, refs) raise the message the
    numpy checks raise, or none, for batches with each kind of bad value (alone and together,
    at any row) and for other dtypes, which the numpy checks take."""
    from deployments.contract import MAX_REF_ROWS, VALID_N_Q, FrameBatch, Op

    rng = np.random.default_rng(11)
    kinds: set[str] = set()
    for case in range(400):
        b = int(rng.integers(0, 40))
        batch = FrameBatch(
            op=Op.ENCODE, bridge_id="b", stream_ids=[f"s{i}" for i in range(b)],
            epochs=np.ones(b, np.int64), epoch_seqs=np.zeros(b, np.int64),
            budgets_ms=rng.uniform(1.0, 40.0, b), pcm=np.zeros((b, 960), np.float32),
            n_q=rng.choice(VALID_N_Q, b).astype(np.int64) if case % 5 else None,
            stream_refs=rng.integers(0, MAX_REF_ROWS << 32, b, dtype=np.int64) if case % 3 else None,
        )
        if b:
            at = int(rng.integers(b))
            roll = rng.random()
            if roll < 0.15:
                batch.budgets_ms[at] = rng.choice([np.inf, -np.inf])
            elif roll < 0.2:
                batch.budgets_ms[at] = np.nan  # the receiver's default: allowed
            if rng.random() < 0.2 and batch.n_q is not None:
                batch.n_q[int(rng.integers(b))] = rng.choice([-1, 0, 3, 7, 100, max(VALID_N_Q) + 1])
            if rng.random() < 0.2 and batch.stream_refs is not None:
                batch.stream_refs[int(rng.integers(b))] = rng.choice([-1, MAX_REF_ROWS << 32, (MAX_REF_ROWS << 32) - 1])
            if rng.random() < 0.1:  # other dtypes: numpy's checks either way
                batch.budgets_ms = batch.budgets_ms.astype(np.float32)
            if rng.random() < 0.1 and batch.n_q is not None:
                batch.n_q = batch.n_q.astype(np.int32)
        if rng.random() < 0.05:
            batch.bandwidth_kbps = 5.0  # not a valid bandwidth: raised between budgets and depths

        def outcome(native: bool, batch: FrameBatch = batch) -> str:
            try:
                batch.validate(distinct=True, native=native)
            except ValueError as exc:
                return str(exc)
            return "ok"

        got = outcome(True)
        assert got == outcome(False), case
        kinds.add(got.split(" ")[0])
    assert {"ok", "budgets_ms", "n_q", "stream_refs"} <= kinds, kinds
