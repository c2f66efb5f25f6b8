"""BridgeCore: one batch per tick, one outcome per frame, the epoch rule, hints, leave, the
supervisor link - against a real in-process CodecReplicaCore."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import SupervisorSettings
from deployments.contract import CHUNK_SAMPLES, BatchResult, FallbackReason, FrameBatch, Outcome
from deployments.supervisor import FallbackSupervisorCore
from deployments.supervisor_policy import SupervisorConfig
from sfu_bridge.core import BridgeCore, SupervisorLink
from sfu_bridge.hint_auth import HintSigner
from sfu_bridge.hint_ext import Hint
from tests.models.equivalence import assert_codes_equivalent, quantizer_input

SILENCE = np.zeros(CHUNK_SAMPLES, np.float32)


class CountingClient:
    """Wraps a real codec client and records the batches it was sent."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[FrameBatch] = []

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.batches.append(batch)
        return await self.inner.process(batch)

    async def leave(self, ids):
        return await self.inner.leave(ids)


def run(coro):
    return asyncio.run(coro)


def keys(report) -> dict[str, str]:
    return {f.stream_id: f.key for f in report.frames()}


class TwoReplicaClient(CountingClient):
    """Says which of two replicas owns each stream (as the Serve codec client does)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.handed: list[tuple] = []
        self.looked_up = 0

    def owners_version(self) -> tuple[str, ...]:
        return ("r0", "r1")

    def owner_index(self, stream_ids: list[str]) -> np.ndarray:
        self.looked_up += len(stream_ids)
        return np.array([hash(s) % 2 for s in stream_ids])

    async def process(self, batch: FrameBatch, owners=None) -> BatchResult:
        self.handed.append(owners)
        return await super().process(batch)


def test_a_batch_is_ordered_by_owning_replica(replica_core):
    client = TwoReplicaClient(replica_core())
    core = BridgeCore(client, deadline_ms=5_000, audio=False)
    ids = [f"s{i}" for i in range(12)]
    for sid in ids:
        core.join(sid)
    for _ in range(2):
        for sid in ids:
            core.push(sid, None)
        report = run(core.tick())
        assert report.counts() == {"ai": 12}
    assert client.looked_up == 12  # each stream's owner looked up once, then kept
    for batch, (version, handed) in zip(client.batches, client.handed, strict=True):
        owners = client.owner_index(batch.stream_ids)
        assert sorted(batch.stream_ids) == sorted(ids) and (np.diff(owners) >= 0).all()
        assert version == ("r0", "r1") and handed.tolist() == owners.tolist()
    run(core.close())


def test_every_frame_gets_exactly_one_outcome(replica_core, sine_chunk):
    client = CountingClient(replica_core())
    core = BridgeCore(client, deadline_ms=5_000, max_backlog=2)
    core.join("alice")
    core.join("bob")
    core.join("carol", opted_out=True)
    pushed = 0
    for i in range(2):
        for sid in ("alice", "bob", "carol"):
            core.push(sid, sine_chunk(440, i), i * 1920)
            pushed += 1
    # bob floods: 5 more chunks, beyond the backlog of 2 -> the oldest are shed as overload
    for i in range(5):
        core.push("bob", sine_chunk(330, 10 + i), (10 + i) * 1920)
        pushed += 1

    async def ticks():
        return [await core.tick() for _ in range(4)]

    reports = run(ticks())
    frames = [f for r in reports for f in r.frames()]
    assert len(frames) == pushed == int(core.counts.sum())
    # one codec request per tick with frames, never one per frame
    assert len(client.batches) == sum(1 for r in reports if r.batch_size)
    assert all(len(set(b.stream_ids)) == len(b.stream_ids) for b in client.batches)
    assert "carol" not in {s for b in client.batches for s in b.stream_ids}
    by_key = core.stats()["frames"]
    assert by_key["fallback/opted_out"] == 2
    assert by_key["fallback/overload"] == 7 - 2  # 7 bob chunks, a backlog of 2 kept
    for f in frames:
        if f.outcome is Outcome.AI:
            assert f.codes is not None and f.codes.shape == (8, 3)
            assert f.codes.min() >= 0 and f.codes.max() < 1024
        else:
            assert f.codes is None and f.reason is not None
    # a stream's frames come out in RTP order, shed ones first
    bob = [f.rtp_timestamp for f in frames if f.stream_id == "bob"]
    assert bob == sorted(bob)


def test_streaming_through_the_core_equals_one_pass(replica_core, codec_runtime, sine_chunk):
    """Three ticks of one stream give the codes of encoding the whole signal in one call."""
    core = BridgeCore(replica_core(), deadline_ms=5_000)
    core.join("s")
    chunks = [sine_chunk(220, i) for i in range(3)]

    async def go():
        codes = []
        for c in chunks:
            core.push("s", c)
            (f,) = (await core.tick()).frames()
            assert f.outcome is Outcome.AI, f.key
            codes.append(f.codes)
        return np.concatenate(codes, axis=1)

    got = run(go())
    codec = codec_runtime[0]
    spare = np.array([16])  # the replica's reserved health slot
    codec.reset_encoder(spare)
    pcm = np.concatenate(chunks)[None, :]
    want = np.asarray(codec.encode(spare, pcm))[0]
    # Equal up to quantizer near-ties: one call of 9 frames and three of 3 use other kernels.
    assert_codes_equivalent(got[None], want[None], quantizer_input(codec, pcm))


def test_fallback_bumps_the_epoch_and_a_restarted_codec_answers_reset(replica_core, sine_chunk):
    core = BridgeCore(replica_core(), deadline_ms=5_000)
    core.join("s")

    async def step(i: int):
        core.push("s", sine_chunk(440, i))
        (f,) = (await core.tick()).frames()
        return f

    async def go():
        seen = [await step(0), await step(1)]
        core.deadline_ms = 0.0  # nothing can meet a zero deadline
        seen.append(await step(2))
        core.deadline_ms = 5_000
        seen.append(await step(3))
        seen.append(await step(4))
        core.codec = replica_core("restarted")  # holds no epoch
        seen.append(await step(5))
        seen.append(await step(6))
        return seen

    f = run(go())
    assert [(x.epoch, x.epoch_seq, x.key) for x in f[:2]] == [(1, 0, "ai"), (1, 1, "ai")]
    assert f[2].reason is FallbackReason.DEADLINE and f[2].epoch == 1
    assert (f[3].epoch, f[3].epoch_seq, f[3].key) == (2, 0, "ai")  # new epoch after fallback
    assert (f[4].epoch, f[4].epoch_seq) == (2, 1)
    assert f[5].reason is FallbackReason.RESET and f[5].epoch == 2
    assert (f[6].epoch, f[6].epoch_seq, f[6].key) == (3, 0, "ai")


class RaisingClient:
    async def process(self, batch):
        raise ConnectionError("replica gone")


class StuckClient:
    async def process(self, batch):
        await asyncio.Event().wait()


@pytest.mark.parametrize(
    "client,reason",
    [(RaisingClient(), FallbackReason.ERROR), (StuckClient(), FallbackReason.DEADLINE)],
)
def test_broken_clients_become_fallbacks(client, reason, sine_chunk):
    core = BridgeCore(client, deadline_ms=5.0)
    for s in ("a", "b"):
        core.join(s)
        core.push(s, sine_chunk(100, 0))
    frames = run(core.tick()).frames()
    assert [(f.outcome, f.reason) for f in frames] == [(Outcome.FALLBACK, reason)] * 2
    assert all(core.stream(s).opens_epoch for s in ("a", "b"))


class ScriptedClient:
    """Answers with what `shape(batch)` builds: results as a faulty replica might send them."""

    def __init__(self, shape) -> None:
        self.shape = shape

    async def process(self, batch: FrameBatch) -> BatchResult:
        return self.shape(batch)


def _answer(batch: FrameBatch, order=None, codes=None, outcome=None) -> BatchResult:
    """All-AI answer; frame i's codes are all `i` unless given (8 books at 6 kbps)."""
    b = len(batch)
    order = list(range(b)) if order is None else order
    if codes is None:
        codes = np.broadcast_to(np.arange(b, dtype=np.int16)[:, None, None], (b, 8, 3)).copy()
    oc = np.zeros(b, np.uint8) if outcome is None else np.asarray(outcome, np.uint8)
    return BatchResult(
        stream_ids=[batch.stream_ids[i] for i in order], outcome_codes=oc[order],
        epochs=batch.epochs[order], queue_ms=np.zeros(len(order), np.float32),
        compute_ms=np.zeros(len(order), np.float32),
        codes=None if codes is False else codes[order], replica_id="scripted",
    )


def _codes_with(row: int, value: int) -> np.ndarray:
    c = np.zeros((4, 8, 3), np.int16)
    c[row, 2, 1] = value
    return c


@pytest.mark.parametrize(
    "shape,want",
    [
        # Rows in another order: matched by stream id, each frame gets its own codes.
        (lambda b: _answer(b, order=[3, 1, 0, 2]), ["ai"] * 4),
        # A row the result lacks, an outcome code no reason has.
        (lambda b: _answer(b, order=[0, 2, 3]), ["ai", "fallback/error", "ai", "ai"]),
        (lambda b: _answer(b, outcome=[0, 250, 0, 0]), ["ai", "fallback/error", "ai", "ai"]),
        # AI codes out of range (per row), missing, or with too few codebooks.
        (lambda b: _answer(b, codes=_codes_with(2, 1024)), ["ai", "ai", "fallback/error", "ai"]),
        (lambda b: _answer(b, codes=_codes_with(0, -1)), ["fallback/error", "ai", "ai", "ai"]),
        (lambda b: _answer(b, codes=False), ["fallback/error"] * 4),
        (lambda b: _answer(b, codes=np.zeros((4, 2, 3), np.int16)), ["fallback/error"] * 4),
        # Outcome codes and stream ids of different lengths: nothing in it can be trusted.
        (lambda b: BatchResult(stream_ids=list(b.stream_ids), outcome_codes=np.zeros(2, np.uint8),
                               epochs=b.epochs, queue_ms=np.zeros(4, np.float32),
                               compute_ms=np.zeros(4, np.float32), codes=None),
         ["fallback/error"] * 4),
    ],
)
def test_faulty_results_give_each_frame_one_checked_outcome(shape, want, sine_chunk):
    core = BridgeCore(ScriptedClient(shape), deadline_ms=500.0)
    ids = ["s0", "s1", "s2", "s3"]
    for sid in ids:
        core.join(sid)
        core.push(sid, sine_chunk(100, 0))
    frames = run(core.tick()).frames()
    assert [f.stream_id for f in frames] == ids and [f.key for f in frames] == want
    for f in frames:
        if f.key == "ai":
            assert f.codes.dtype == np.int16 and f.codes.shape == (8, 3)
        else:
            assert f.codes is None and core.stream(f.stream_id).opens_epoch
    assert int(core.counts.sum()) == 4 and int(core.counts[0]) == want.count("ai")


def test_reordered_result_rows_are_matched_by_stream(sine_chunk):
    core = BridgeCore(ScriptedClient(lambda b: _answer(b, order=[3, 1, 0, 2])), deadline_ms=500.0)
    for sid in ("s0", "s1", "s2", "s3"):
        core.join(sid)
        core.push(sid, sine_chunk(100, 0))
    frames = run(core.tick()).frames()
    assert all((f.codes == i).all() for i, f in enumerate(frames))  # frame i's codes are all i


def test_hints_verified_and_counted_once_per_tick(replica_core, secret):
    signer = HintSigner(secret)

    class Limiter:  # counts calls; grants at most 2 hints per stream per call
        calls = 0

        def allow(self, ids, counts):
            Limiter.calls += 1
            return [min(c, 2) for c in counts]

    core = BridgeCore(replica_core(), deadline_ms=5_000, hint_secret=secret, limiter=Limiter())
    core.join("a")
    core.join("b")
    good = [signer.sign("a", Hint(0, 6.0, 1, seq=i)) for i in range(1, 5)]
    for raw in good:
        core.add_hint("a", raw)
    core.add_hint("a", good[0])  # replay
    core.add_hint("b", signer.sign("a", Hint(0, 6.0, 1, seq=1)))  # signed for another stream
    core.add_hint("b", b"\x00" * 3)  # garbage
    core.add_hint("nobody", good[1])  # not a stream here: ignored
    report = run(core.tick())
    assert Limiter.calls == 1
    assert report.hints_accepted == 2
    assert report.hints_dropped == {"rate_limited": 2, "replay": 1, "tag": 1, "size": 1}
    assert core.stream("a").last_hint.seq == 2


def test_a_redis_limiter_limits_the_ticks_verified_hints_in_one_call(replica_core, secret, tmp_path):
    from sfu_bridge.limiter import HintLimiter
    from sfu_bridge.redis_store import EmbeddedRedis

    server = EmbeddedRedis(tmp_path).start()
    try:
        limiter = HintLimiter(server.client(), rate_per_s=1, burst=2, bridge_id="core", clock=lambda: 1000.0)
        signer = HintSigner(secret)
        core = BridgeCore(replica_core(), deadline_ms=5_000, hint_secret=secret, limiter=limiter)
        core.join("a")
        core.join("b")
        for i in range(1, 5):
            core.add_hint("a", signer.sign("a", Hint(0, 6.0, 1, seq=i)))
        core.add_hint("b", signer.sign("b", Hint(0, 6.0, 1, seq=1)))
        core.add_hint("b", signer.sign("a", Hint(0, 6.0, 1, seq=9)))  # signed for another stream
        report = run(core.tick())
        assert limiter.counters.calls == 1 and limiter.counters.errors == 0
        assert not limiter._own_lock.locked()  # its answer read at the end of the tick
        assert report.hints_accepted == 3 and report.hints_dropped == {"rate_limited": 2, "tag": 1}
        assert core.stream("a").last_hint.seq == 2 and core.stream("b").last_hint.seq == 1
        core.add_hint("b", signer.sign("b", Hint(0, 6.0, 1, seq=2)))
        core.add_hint("b", signer.sign("b", Hint(0, 6.0, 1, seq=3)))
        assert run(core.tick()).hints_dropped == {"rate_limited": 1}  # b had one of its burst left
    finally:
        server.stop()


def test_a_tick_cancelled_at_the_codec_drops_its_unread_limiter_call(secret, tmp_path):
    """A synchronous limiter's call goes out with the tick's hints and is read after the
    codec's answer; a tick cancelled before that leaves no call holding the limiter's
    connection, and hints of a stream that left meanwhile take no effect on its row's next
    stream."""
    from sfu_bridge.limiter import HintLimiter
    from sfu_bridge.redis_store import EmbeddedRedis

    gate = asyncio.Event()

    class Slow:
        async def process(self, batch):
            await gate.wait()
            return BatchResult.all_fallback(batch, FallbackReason.ERROR)

    server = EmbeddedRedis(tmp_path).start()
    try:
        limiter = HintLimiter(server.client(), rate_per_s=1, burst=2, bridge_id="core", clock=lambda: 1000.0)
        signer = HintSigner(secret)
        core = BridgeCore(Slow(), deadline_ms=5_000, hint_secret=secret, limiter=limiter)

        async def go():
            core.join("a")
            core.push("a", np.zeros(960, np.int16))
            core.add_hint("a", signer.sign("a", Hint(0, 24.0, 1, seq=1)))
            tick = asyncio.ensure_future(core.tick())
            await asyncio.sleep(0.05)
            assert limiter._own_lock.locked()  # sent, not read: the codec has not answered
            tick.cancel()
            with pytest.raises(asyncio.CancelledError):
                await tick
            await asyncio.sleep(0)
            assert not limiter._own_lock.locked()
            # a stream whose hints are at the limiter when it leaves
            core.push("a", np.zeros(960, np.int16))
            core.add_hint("a", signer.sign("a", Hint(0, 1.5, 1, seq=2)))
            tick = asyncio.ensure_future(core.tick())
            await asyncio.sleep(0.05)
            assert limiter._own_lock.locked()
            core.leave("a")
            row = core.join("b")
            before = int(core.req_n_q[row])
            gate.set()
            report = await tick
            return report, row, before

        report, row, before = run(go())
        assert report.hints_accepted == 1 and core.stream("b").last_hint is None
        assert int(core.req_n_q[row]) == before  # a's 1.5 kbps hint is not b's
        assert not limiter._own_lock.locked() and limiter.allow(["x"], [1]).tolist() == [1]
    finally:
        server.stop()


def test_a_flood_beyond_one_ticks_budget_is_dropped_before_any_crypto(secret):
    core = BridgeCore(RaisingClient(), hint_secret=secret, max_hints_per_tick=4)
    core.join("f")
    for _ in range(10):
        core.add_hint("f", b"\x01" * 16)
    report = run(core.tick())
    assert report.hints_dropped == {"tag": 4}  # the 4 that were checked failed the tag
    assert core.hint_counters["dropped/rate_limited"] == 6


def test_without_a_hint_key_every_hint_is_dropped_and_counted(replica_core):
    core = BridgeCore(replica_core(), deadline_ms=5_000)
    core.join("a")
    core.add_hint("a", b"\x00" * 16)
    assert run(core.tick()).hints_dropped == {"invalid": 1}


def test_leave_answers_pending_chunks_frees_the_codec_slot_and_the_row(replica_core, sine_chunk):
    replica = replica_core()
    client = CountingClient(replica)
    core = BridgeCore(client, deadline_ms=5_000, max_backlog=3)

    async def go():
        core.join("x")
        core.push("x", sine_chunk(200, 0))
        first = await core.tick()
        assert keys(first) == {"x": "ai"} and replica.pool.streams() == ["x"]
        core.push("x", sine_chunk(200, 1))
        core.push("x", sine_chunk(200, 2))
        assert core.leave("x") and not core.leave("x")
        core.join("y")  # takes x's row
        core.push("y", sine_chunk(300, 0))
        second = await core.tick()
        await core.close()  # the batched codec leave runs in the background
        return second

    second = run(go())
    assert [(f.stream_id, f.key) for f in second.frames()] == [
        ("x", "fallback/overload"), ("x", "fallback/overload"), ("y", "ai")]
    assert second.rows[:2].tolist() == [-1, -1]  # x is gone: its frames belong to no row
    assert replica.pool.streams() == ["y"]  # x's slot was freed
    assert (core.stream("y").epoch, core.stream("y").next_seq) == (1, 1)
    # the same row, the same batch shape: the batch names its new stream
    assert [b.stream_ids for b in client.batches] == [["x"], ["y"]]


def test_a_stream_leaving_during_the_codec_call_does_not_touch_its_rows_next_owner(sine_chunk):
    """The row of a stream that leaves while its frame is at the codec goes to a new
    stream; the late fallback of the old frame must not open an epoch for the new one."""
    gate = asyncio.Event()

    class SlowFailing:
        async def process(self, batch):
            await gate.wait()
            return BatchResult.all_fallback(batch, FallbackReason.ERROR)

    core = BridgeCore(SlowFailing(), deadline_ms=5_000)

    async def go():
        core.join("old")
        core.push("old", sine_chunk(100, 0))
        tick = asyncio.ensure_future(core.tick())
        await asyncio.sleep(0.01)
        core.leave("old")
        row = core.join("new")
        core.epochs.fresh[row] = False  # as if "new" were mid-epoch
        gate.set()
        report = await tick
        return report, row

    report, row = run(go())
    assert keys(report) == {"old": "fallback/error"} and report.rows.tolist() == [-1]
    assert not core.epochs.fresh[row]
    assert int(core.tally[row].sum()) == 0


def test_chunks_beyond_the_ring_between_ticks_spill_as_overload(sine_chunk):
    core = BridgeCore(RaisingClient(), max_backlog=2)
    core.join("s")
    for i in range(7):  # the ring holds max_backlog + 1 = 3
        core.push("s", sine_chunk(100, i), i * 1920)
    frames = run(core.tick()).frames()
    # 4 spilled on push, 1 shed to the backlog limit, 1 sent; the newest waits a tick
    assert [f.key for f in frames] == ["fallback/overload"] * 5 + ["fallback/error"]
    assert [f.rtp_timestamp for f in frames] == [i * 1920 for i in range(6)]
    assert np.allclose(frames[-1].pcm24, sine_chunk(100, 5))
    assert core.stream("s").pending == 1



def test_one_chunk_pushes_queue_exactly_as_row_pushes(sine_chunk):
    """`push` (a publisher's chunk, scalar indexing) and `push_rows` (the simulator's, arrays)
    leave the same rings, spills included, and the same tick."""
    rng = np.random.default_rng(3)
    one, rows = BridgeCore(RaisingClient(), max_backlog=2), BridgeCore(RaisingClient(), max_backlog=2)
    for core in (one, rows):
        for sid in ("a", "b", "c"):
            core.join(sid)
    spilled = 0
    for t in range(60):
        sid = ["a", "b", "c"][rng.integers(3)]
        chunk, ts = sine_chunk(100 + t, t), t * 1920
        one.push(sid, chunk, ts)
        rows.push_rows(np.array([rows.stream(sid).row]), chunk[None, :], np.array([ts], np.int64))
        if t % 9 == 8:
            a, b = run(one.tick()).frames(), run(rows.tick()).frames()
            assert [(f.stream_id, f.key, f.rtp_timestamp) for f in a] == \
                [(f.stream_id, f.key, f.rtp_timestamp) for f in b]
            spilled += sum(f.key == "fallback/overload" for f in a)
    for name in ("q_n", "q_head", "q_ts", "q_pcm"):
        assert np.array_equal(getattr(one, name), getattr(rows, name)), name
    assert spilled > 0  # rings overflowed: both paths spilled

def test_tick_loop_delivers_reports_and_stops_deterministically(replica_core, sine_chunk):
    async def go():
        core = BridgeCore(replica_core(), deadline_ms=5_000)
        reports = []
        got3 = asyncio.Event()

        def on_report(r):
            reports.append(r)
            if len(reports) >= 3:
                got3.set()

        core.join("s")
        core.push("s", sine_chunk(300, 0))
        core.start(on_report, tick_s=0.01)
        await asyncio.wait_for(got3.wait(), 60)
        await core.stop()
        assert core._exited.is_set() and core._task is None  # the loop has exited, not paused
        return reports

    reports = run(go())
    n = len(reports)
    assert n >= 3
    assert [r.tick for r in reports] == list(range(1, n + 1))
    assert sum(len(r) for r in reports) == 1


def test_supervisor_decisions_switch_streams_off_and_back_on(replica_core):
    """AI-off verdicts are answered locally (never reach the codec); a lifted verdict turns AI
    back on with a new epoch; an opt-out pinned by the bridge's config is never lifted, and a
    user the supervisor reports opted out starts their next stream with AI off."""
    core = BridgeCore(replica_core(), deadline_ms=60_000.0, opted_out_users=frozenset({"uc"}))
    for sid in ("a", "b", "c"):
        core.join(sid, user="u" + sid)

    def tick(off):
        core.apply_decisions(off)
        for sid in list(core._row_of):
            core.push(sid, SILENCE)
        return keys(asyncio.run(core.tick()))

    assert tick({}) == {"a": "ai", "b": "ai", "c": "fallback/opted_out"}
    first_epoch = core.stream("a").epoch
    assert tick({"a": "unhealthy", "b": "opted_out"}) == {
        "a": "fallback/unhealthy", "b": "fallback/opted_out", "c": "fallback/opted_out",
    }
    core.leave("b")
    core.join("b2", user="ub")  # the same user's next stream: still opted out
    assert core.stream("b2").ai_off is FallbackReason.OPTED_OUT
    assert tick({}) == {"a": "ai", "b2": "ai", "c": "fallback/opted_out"}  # opted back in
    assert core.stream("a").epoch > first_epoch  # the gap started a new epoch


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def supervised(period_s: float):
    """A real supervisor core in process: (clock, supervisor, ids it was told to forget, a
    function making a bridge core's link to it)."""
    clock = Clock()
    kv: dict[bytes, bytes] = {}
    sup = FallbackSupervisorCore(SupervisorSettings(), SupervisorConfig(), kv.__setitem__, kv.get)
    forgotten: list[str] = []

    async def report(reports):
        return sup.report(reports, now=clock.t)

    async def forget(ids):
        forgotten.extend(ids)

    return clock, sup, forgotten, lambda: SupervisorLink(report, forget, period_s=period_s)


def test_supervisor_link_turns_a_failing_stream_off_and_back_on(replica_core):
    clock, sup, forgotten, link = supervised(1.0)
    core = BridgeCore(replica_core(), deadline_ms=60_000.0, period_clock=clock, supervisor=link())
    for sid in ("bad", "good"):
        core.join(sid, user="u-" + sid)

    async def run_ticks(n: int, fail_bad: bool) -> list[dict[str, str]]:
        seen = []
        for _ in range(n):
            # the real failure path: a frame that cannot be computed (NaN) is `error`
            core.push("bad", np.full(CHUNK_SAMPLES, np.nan if fail_bad else 0.0, np.float32))
            core.push("good", SILENCE)
            seen.append(keys(await core.tick()))
            clock.t += 0.04
        await core.close()
        return seen

    async def scenario():
        await run_ticks(30, fail_bad=True)  # > 1 s of errors on "bad"
        return await run_ticks(30, fail_bad=False)

    after = asyncio.run(scenario())
    assert core.exchanges >= 1 and core.exchange_failures == 0
    assert all(s["good"] == "ai" for s in after)
    assert any(s["bad"] == "fallback/unhealthy" for s in after)
    assert sup.policy.snapshot()["streams"]["bad"]["user_id"] == "u-bad"

    # After the backoff the supervisor lets the stream retry, and healthy frames keep it on.
    clock.t += 60.0
    later = asyncio.run(run_ticks(60, fail_bad=False))
    assert later[-1] == {"bad": "ai", "good": "ai"}

    async def leave_bad():
        core.leave("bad")
        await core.tick()
        await core.close()

    asyncio.run(leave_bad())
    assert forgotten == ["bad"]


def test_a_relayed_stream_leaves_the_owners_codec_slot_and_supervisor_state_alone(replica_core):
    """A worker that only fans out a stream another worker owns (cascading) holds a row for
    it; when it stops following, the owner's codec slot, epoch and supervisor state stay."""
    clock, sup, forgotten, link = supervised(0.0)
    replica = replica_core()
    owner = BridgeCore(replica, deadline_ms=60_000.0, period_clock=clock, supervisor=link())
    follower = BridgeCore(replica, deadline_ms=60_000.0, period_clock=clock, supervisor=link())
    owner.join("call", user="u-call")
    follower.join("call", user="relay", relayed=True)
    assert "call" in follower and follower.stats()["streams"] == 0
    assert follower.stats()["relayed_streams"] == 1

    async def owner_tick() -> str:
        owner.push("call", SILENCE)
        key = keys(await owner.tick())["call"]
        clock.t += 0.04
        return key

    async def scenario():
        assert [await owner_tick() for _ in range(3)] == ["ai"] * 3
        epoch = owner.stream("call").epoch
        for _ in range(3):  # the follower's ticks: exchanges with the supervisor included
            await follower.tick()
            await asyncio.sleep(0)
        assert follower.leave("call")
        for _ in range(2):  # its housekeeping (codec leave, supervisor forget) runs here
            await follower.tick()
            await asyncio.sleep(0.05)
        after = [await owner_tick() for _ in range(3)]
        await owner.close()
        await follower.close()
        return epoch, after

    epoch, after = asyncio.run(scenario())
    assert after == ["ai"] * 3 and owner.stream("call").epoch == epoch  # no reset, same epoch
    assert replica.pool.get("call") is not None
    assert forgotten == []
    assert sup.policy.snapshot()["streams"]["call"]["user_id"] == "u-call"
    assert follower.stats()["relayed_streams"] == 0


def test_a_failing_exchange_keeps_media_flowing(replica_core):
    async def broken(reports):
        raise ConnectionError("supervisor restarting")

    clock = Clock()
    core = BridgeCore(replica_core(), deadline_ms=60_000.0, period_clock=clock,
                      supervisor=SupervisorLink(broken, period_s=0.0))
    core.join("s")

    async def scenario():
        for _ in range(3):
            core.push("s", SILENCE)
            await core.tick()
            await asyncio.sleep(0)
        await core.close()

    asyncio.run(scenario())
    assert core.exchange_failures >= 1 and int(core.counts[0]) == 3


def test_without_audio_a_batch_carries_one_silent_frame_per_stream():
    seen = []

    class Recorder:
        async def process(self, batch):
            seen.append(batch)
            return BatchResult.all_fallback(batch, FallbackReason.OVERLOAD)

    core = BridgeCore(Recorder(), audio=False)
    rows = np.array([core.join(f"s{i}") for i in range(3)])
    core.push_rows(rows)
    report = run(core.tick())
    (batch,) = seen
    assert batch.pcm.shape == (3, 320) and batch.pcm.dtype == np.int16 and not batch.pcm.any()
    assert report.pcm is None and report.counts() == {"fallback/overload": 3}
    assert core.cpu.seconds > 0


class StallingCodec:
    """The in-process codec behind a replica that can be stalled: while `stalled`, a call
    sleeps past the bridge's deadline, as a stopped replica process does."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.stalled = False

    async def process(self, batch):
        if self.stalled:
            await asyncio.sleep(0.05)
        return await self.codec.process(batch)


def _one_replica(ids: list[str]) -> dict[str, str]:
    return dict.fromkeys(ids, "replica-1")


@pytest.mark.parametrize("names_replica", [True, False])
def test_a_shared_stall_keeps_streams_on_when_the_link_names_their_replica(replica_core, names_replica):
    """Four streams on one replica miss every frame for 1.2 s together. Reported with their
    replica, the supervisor sees a shared stall and keeps them on AI (the frames after it
    are `ai`); reported without, it cannot tell and switches each of them off."""
    clock = Clock()
    kv: dict[bytes, bytes] = {}
    sup = FallbackSupervisorCore(SupervisorSettings(), SupervisorConfig(), kv.__setitem__, kv.get)

    async def report(reports):
        return sup.report(reports, now=clock.t)

    codec = StallingCodec(replica_core())
    link = SupervisorLink(report, period_s=1.0, owners=_one_replica if names_replica else None)
    core = BridgeCore(codec, deadline_ms=60_000.0, period_clock=clock, supervisor=link)
    streams = ["a", "b", "c", "d"]
    for sid in streams:
        core.join(sid)

    async def run_ticks(n: int) -> list[dict[str, str]]:
        seen = []
        for _ in range(n):
            for sid in streams:
                core.push(sid, SILENCE)
            seen.append(keys(await core.tick()))
            await asyncio.sleep(0)  # let a due exchange run, as the media loop would
            clock.t += 0.04
        return seen

    async def scenario():
        await run_ticks(30)
        codec.stalled, core.deadline_ms = True, 20.0
        stall = await run_ticks(30)
        codec.stalled, core.deadline_ms = False, 60_000.0
        after = await run_ticks(30)
        await core.close()
        return stall, after

    stall, after = asyncio.run(scenario())
    missed = sum(s.get(sid) == "fallback/deadline" for s in stall for sid in streams)
    unhealthy = sum(s.get(sid) == "fallback/unhealthy" for s in stall + after for sid in streams)
    if names_replica:
        assert missed == 4 * 30  # EDF's answer, frame by frame, and nothing more
        assert unhealthy == 0 and after[-1] == dict.fromkeys(streams, "ai")
        assert sup.policy.counters["excused/deadline"] >= 4 * 25
    else:
        assert unhealthy >= 4 * 10  # each stream off for its 1 s back-off at least


@pytest.mark.parametrize("failure", ["errors", "stalled"])
def test_a_replica_failing_every_step_has_its_streams_switched_off_within_the_window(
    replica_core, failure
):
    """All four streams of one replica fail every step: with `error` (frames the model cannot
    compute), each is switched off within `window_s`; with `deadline` on every frame (a
    stopped replica), once reports have shown no AI answer for `replica_failure_s`: within
    that plus the one report interval that still held the last AI answers."""
    clock = Clock()
    kv: dict[bytes, bytes] = {}
    cfg = SupervisorConfig()
    sup = FallbackSupervisorCore(SupervisorSettings(), cfg, kv.__setitem__, kv.get)

    async def report(reports):
        return sup.report(reports, now=clock.t)

    codec = StallingCodec(replica_core())
    link = SupervisorLink(report, period_s=1.0, owners=_one_replica)
    core = BridgeCore(codec, deadline_ms=60_000.0, period_clock=clock, supervisor=link)
    streams = ["a", "b", "c", "d"]
    for sid in streams:
        core.join(sid)
    first_off: dict[str, float] = {}
    nan = np.full(CHUNK_SAMPLES, np.nan, np.float32)

    async def run_ticks(n: int, failing: bool) -> None:
        for _ in range(n):
            for sid in streams:
                core.push(sid, nan if failing and failure == "errors" else SILENCE)
            for sid, key in keys(await core.tick()).items():
                if key == "fallback/unhealthy":
                    first_off.setdefault(sid, clock.t)
            await asyncio.sleep(0)
            clock.t += 0.04

    async def scenario() -> float:
        await run_ticks(30, failing=False)
        start = clock.t
        if failure == "stalled":
            codec.stalled, core.deadline_ms = True, 20.0
        await run_ticks(int(3.2 / 0.04), failing=True)
        await core.close()
        return start

    start = asyncio.run(scenario())
    assert set(first_off) == set(streams)
    window = cfg.window_s if failure == "errors" else cfg.replica_failure_s + link.period_s
    assert max(first_off.values()) - start <= window + 0.1  # + the tick that applies it


def test_bridge_decisions_reach_the_metrics(secret, sine_chunk):
    """What the bridge decides is recorded where it decides it, once per tick: its own
    fallbacks (opted_out, unhealthy, overload, a stuck client, a bad answer) but not the
    frames a replica answered (the replica counts those), AI frames' latency, hints by
    verdict, and the streams it carries."""
    from telemetry import metrics as m

    reg = m.local_registry()

    def frames(**tags):
        return reg.counter(m.FRAMES, op="encode", **tags)

    before = {r: frames(reason=r) for r in ("opted_out", "unhealthy", "overload", "deadline", "error")}
    ai_before = frames(outcome="ai")
    lat_before = reg.histogram_count(m.FRAME_LATENCY, op="encode")
    hints_before = {v: reg.counter(m.HINTS, verdict=v.value) for v in m.HintVerdict}

    signer = HintSigner(secret)
    core = BridgeCore(
        ScriptedClient(_answer), bridge_id="metrics-bridge", deadline_ms=500.0, max_backlog=1,
        hint_secret=secret,
        limiter=type("OnePerStream", (), {"allow": lambda self, ids, counts: [1] * len(ids)})(),
        max_hints_per_tick=4,
    )
    core.join("opt", opted_out=True)
    for sid in ("on", "sick", "busy"):
        core.join(sid)
    core.apply_decisions({"sick": "unhealthy"})
    for sid in ("on", "opt", "sick"):
        core.push(sid, sine_chunk(100, 0))
    for i in range(3):  # two beyond the backlog limit: shed as overload
        core.push("busy", sine_chunk(100, i))
    good = [signer.sign("on", Hint(0, 6.0, 1, seq=i)) for i in range(1, 4)]
    for raw in good[:2]:
        core.add_hint("on", raw)  # the limiter lets one through: 1 accepted, 1 limited
    core.add_hint("on", good[0])  # replayed
    core.add_hint("busy", good[2])  # signed for another stream: forged
    core.add_hint("busy", b"\x00" * 3)  # malformed
    for _ in range(3):  # forged (right size, no valid tag); the one beyond
        core.add_hint("busy", b"\x01" * 16)  # max_hints_per_tick is limited before any check
    report = run(core.tick())
    assert sorted(f.key for f in report.frames()) == sorted(
        ["ai", "ai", "fallback/opted_out", "fallback/unhealthy", "fallback/overload", "fallback/overload"])
    assert frames(reason="opted_out") - before["opted_out"] == 1
    assert frames(reason="unhealthy") - before["unhealthy"] == 1
    assert frames(reason="overload") - before["overload"] == 2
    assert frames(outcome="ai") == ai_before  # answered by the replica, counted there
    assert reg.histogram_count(m.FRAME_LATENCY, op="encode") - lat_before == 2
    assert reg.gauge(m.STREAMS_ACTIVE, bridge="metrics-bridge") == 4
    got = {v: reg.counter(m.HINTS, verdict=v.value) - hints_before[v] for v in m.HintVerdict}
    assert got == {m.HintVerdict.ACCEPTED: 1, m.HintVerdict.LIMITED: 2, m.HintVerdict.REPLAYED: 1,
                   m.HintVerdict.FORGED: 3, m.HintVerdict.MALFORMED: 1,
                   m.HintVerdict.UNKNOWN_MODEL: 0}

    # A client that never answers (the bridge gives up: deadline), then a replica answering
    # with an outcome code no reason has (the bridge overrules it: error).
    core.codec, core.deadline_ms = StuckClient(), 5.0
    core.push("on", sine_chunk(100, 1))
    run(core.tick())
    assert frames(reason="deadline") - before["deadline"] == 1
    core.codec, core.deadline_ms = ScriptedClient(lambda b: _answer(b, outcome=[250])), 500.0
    core.push("on", sine_chunk(100, 2))
    run(core.tick())
    assert frames(reason="error") - before["error"] == 1
    core.leave("sick")
    run(core.tick())
    assert reg.gauge(m.STREAMS_ACTIVE, bridge="metrics-bridge") == 3


def test_ranks_match_a_unique_based_reference():
    """`_ranks` (one stable sort) against np.unique: distinct rows, inverse, counts, and
    each entry's place among its row's entries in arrival order."""
    from sfu_bridge.core import _ranks

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 365):
        rows = rng.integers(0, max(2, n // 3), n)
        uniq, inv, counts = np.unique(rows, return_inverse=True, return_counts=True)
        rank = np.array([int(np.count_nonzero(rows[:i] == rows[i])) for i in range(n)])
        got = _ranks(rows)
        for a, b in zip(got, (uniq, inv, counts, rank), strict=True):
            assert np.array_equal(a, b)
