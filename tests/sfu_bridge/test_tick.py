"""Tick batcher: one batch per tick, one outcome per frame, the epoch rule, hint checks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.contract import CHUNK_SAMPLES, BatchResult, FallbackReason, FrameBatch, Outcome
from sfu_bridge.hint_auth import HintSigner, HintVerifier
from sfu_bridge.hint_ext import Hint
from sfu_bridge.tick import Chunk, InProcessCodec, TickBatcher
from tests.models.equivalence import assert_codes_equivalent, quantizer_input


class CountingClient:
    """Wraps a real codec client and records the batches it was sent."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[FrameBatch] = []

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.batches.append(batch)
        return await self.inner.process(batch)


def run(coro):
    return asyncio.run(coro)


def test_every_frame_gets_exactly_one_outcome(streaming_codec, sine_chunk):
    client = CountingClient(InProcessCodec(streaming_codec))
    tb = TickBatcher(client, deadline_ms=5_000, max_backlog=2)
    tb.join("alice")
    tb.join("bob")
    tb.join("carol", opted_out=True)
    pushed = 0
    for i in range(2):
        for sid in ("alice", "bob", "carol"):
            tb.push(Chunk(sid, sine_chunk(440, i)))
            pushed += 1
    # bob floods: 5 more chunks, beyond the backlog of 2 -> the oldest are shed as overload
    for i in range(5):
        tb.push(Chunk("bob", sine_chunk(330, 10 + i)))
        pushed += 1

    async def ticks():
        out = []
        for _ in range(4):
            out.append(await tb.tick())
        return out

    reports = run(ticks())
    frames = [f for r in reports for f in r.frames]
    assert len(frames) == pushed == sum(tb.counters.values())
    # one codec request per tick with frames, never one per frame
    assert len(client.batches) == sum(1 for r in reports if r.batch_size)
    assert all(len(set(b.stream_ids)) == len(b.stream_ids) for b in client.batches)
    assert "carol" not in {s for b in client.batches for s in b.stream_ids}
    assert tb.counters["fallback/opted_out"] == 2
    assert tb.counters["fallback/overload"] == 7 - 2  # 7 bob chunks, a backlog of 2 kept
    for f in frames:
        if f.outcome is Outcome.AI:
            assert f.codes is not None and f.codes.shape == (8, 3)
            assert f.codes.min() >= 0 and f.codes.max() < 1024
        else:
            assert f.codes is None and f.reason is not None


def test_streaming_through_batcher_equals_one_pass(streaming_codec, sine_chunk):
    """Three ticks of one stream give the codes of encoding the whole signal in one call."""
    tb = TickBatcher(InProcessCodec(streaming_codec), deadline_ms=5_000)
    chunks = [sine_chunk(220, i) for i in range(3)]

    async def go():
        codes = []
        for c in chunks:
            tb.push(Chunk("s", c))
            (f,) = (await tb.tick()).frames
            assert f.outcome is Outcome.AI, f.key
            codes.append(f.codes)
        return np.concatenate(codes, axis=1)

    got = run(go())
    pcm = np.concatenate(chunks)[None, :]
    streaming_codec.reset(np.array([15]))
    want = np.asarray(streaming_codec.encode(np.array([15]), pcm))[0]
    # Equal up to quantizer near-ties: one call of 9 frames and three of 3 use other kernels.
    assert_codes_equivalent(got[None], want[None], quantizer_input(streaming_codec, pcm))


def test_fallback_bumps_the_epoch_and_a_restarted_codec_answers_reset(streaming_codec, sine_chunk):
    tb = TickBatcher(InProcessCodec(streaming_codec), deadline_ms=5_000)

    async def step(i: int):
        tb.push(Chunk("s", sine_chunk(440, i)))
        (f,) = (await tb.tick()).frames
        return f

    async def go():
        seen = [await step(0), await step(1)]
        tb.deadline_ms = 0.0  # nothing can meet a zero deadline
        seen.append(await step(2))
        tb.deadline_ms = 5_000
        seen.append(await step(3))
        seen.append(await step(4))
        tb.codec = InProcessCodec(streaming_codec, replica_id="restarted")  # holds no epoch
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
    tb = TickBatcher(client, deadline_ms=5.0)
    for s in ("a", "b"):
        tb.push(Chunk(s, sine_chunk(100, 0)))
    frames = run(tb.tick()).frames
    assert [(f.outcome, f.reason) for f in frames] == [(Outcome.FALLBACK, reason)] * 2


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
    tb = TickBatcher(ScriptedClient(shape), deadline_ms=500.0)
    ids = ["s0", "s1", "s2", "s3"]
    for sid in ids:
        tb.push(Chunk(sid, sine_chunk(100, 0)))
    frames = run(tb.tick()).frames
    assert [f.chunk.stream_id for f in frames] == ids and [f.key for f in frames] == want
    for f in frames:
        if f.key == "ai":
            assert f.codes.dtype == np.int16 and f.codes.shape == (8, 3)
        else:
            assert f.codes is None and tb.streams[f.chunk.stream_id].new_epoch
    assert sum(tb.counters.values()) == 4
    assert tb.counters["ai"] == want.count("ai")


def test_reordered_result_rows_are_matched_by_stream(sine_chunk):
    tb = TickBatcher(ScriptedClient(lambda b: _answer(b, order=[3, 1, 0, 2])), deadline_ms=500.0)
    for sid in ("s0", "s1", "s2", "s3"):
        tb.push(Chunk(sid, sine_chunk(100, 0)))
    frames = run(tb.tick()).frames
    assert [int(f.codes[0, 0]) for f in frames] == [0, 1, 2, 3]  # frame i's codes are all i
    assert all((f.codes == i).all() for i, f in enumerate(frames))


def test_hints_verified_and_counted_once_per_tick(streaming_codec, secret):
    verifiers = {s: HintVerifier(secret, s) for s in ("a", "b")}
    signer = HintSigner(secret)

    class Limiter:  # counts calls; grants at most 2 hints per stream per call
        calls = 0

        def allow(self, ids, counts):
            Limiter.calls += 1
            return [min(c, 2) for c in counts]

    tb = TickBatcher(
        InProcessCodec(streaming_codec), deadline_ms=5_000,
        hint_checker=lambda sid, raw: verifiers[sid].verify(sid, raw), limiter=Limiter(),
    )
    tb.join("a")
    tb.join("b")
    hint = Hint(model_id=0, bandwidth_kbps=6.0, epoch=1, seq=1)
    good = [signer.sign("a", Hint(0, 6.0, 1, seq=i)) for i in range(1, 5)]
    for raw in good:
        tb.add_hint("a", raw)
    tb.add_hint("a", good[0])  # replay
    tb.add_hint("b", signer.sign("a", hint))  # signed for another stream
    tb.add_hint("b", b"\x00" * 3)  # garbage
    report = run(tb.tick())
    assert Limiter.calls == 1
    assert report.hints_accepted == 2
    assert report.hints_dropped == {"rate_limited": 2, "replay": 1, "tag": 1, "size": 1}
    assert tb.streams["a"].last_hint.seq == 2


def test_chunker_turns_48k_stereo_frames_into_40ms_24k_chunks():
    import av

    from sfu_bridge.media import Chunker

    ch = Chunker("s")
    chunks = []
    t = np.arange(960 * 12) / 48_000
    tone = (0.5 * np.sin(2 * np.pi * 1_000 * t) * 32767).astype(np.int16)
    for i in range(12):  # 240 ms of aiortc decoder output: 20 ms, s16, stereo, 48 kHz
        part = tone[i * 960:(i + 1) * 960]
        frame = av.AudioFrame.from_ndarray(np.repeat(part, 2)[None, :], format="s16", layout="stereo")
        frame.sample_rate = 48_000
        frame.pts = i * 960
        chunks.extend(ch.add(frame))
    assert 5 <= len(chunks) <= 6  # 240 ms minus the resampler's delay
    assert [c.rtp_timestamp for c in chunks] == [1920 * i for i in range(len(chunks))]
    for c in chunks:
        assert c.pcm24.shape == (960,) and c.pcm24.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(chunks[-1].pcm24))
    assert abs(np.argmax(spectrum) * 24_000 / 960 - 1_000) <= 25  # still the 1 kHz tone


def test_tick_loop_delivers_reports_and_stops_deterministically(streaming_codec, sine_chunk):
    async def go():
        tb = TickBatcher(InProcessCodec(streaming_codec), deadline_ms=5_000)
        reports = []
        got3 = asyncio.Event()

        def on_report(r):
            reports.append(r)
            if len(reports) >= 3:
                got3.set()

        tb.push(Chunk("s", sine_chunk(300, 0)))
        tb.start(on_report, tick_s=0.01)
        await asyncio.wait_for(got3.wait(), 60)
        await tb.stop()
        assert tb._exited.is_set() and tb._task is None  # the loop has exited, not just paused
        return reports

    reports = run(go())
    n = len(reports)
    assert n >= 3
    assert [r.tick for r in reports] == list(range(1, n + 1))
    assert sum(len(r.frames) for r in reports) == 1


def test_supervisor_decisions_switch_streams_off_and_back_on(streaming_codec):
    """AI-off verdicts are answered locally (never reach the codec); a lifted verdict turns AI
    back on with a new epoch; a local opt-out is never lifted by the supervisor."""
    tb = TickBatcher(InProcessCodec(streaming_codec), deadline_ms=60_000.0)
    for sid in ("a", "b"):
        tb.join(sid)
    tb.join("c", opted_out=True)

    def tick(off):
        tb.apply_decisions(off)
        for sid in ("a", "b", "c"):
            tb.push(Chunk(sid, np.zeros(CHUNK_SAMPLES, np.float32), 0))
        report = asyncio.run(tb.tick())
        return {f.chunk.stream_id: f.key for f in report.frames}

    assert tick({}) == {"a": "ai", "b": "ai", "c": "fallback/opted_out"}
    first_epoch = tb.streams["a"].epoch
    assert tick({"a": "unhealthy", "b": "opted_out"}) == {
        "a": "fallback/unhealthy", "b": "fallback/opted_out", "c": "fallback/opted_out",
    }
    assert tick({}) == {"a": "ai", "b": "ai", "c": "fallback/opted_out"}
    assert tb.streams["a"].epoch > first_epoch  # the gap started a new epoch


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

    verifiers = {s: HintVerifier(secret, s) for s in ("on", "busy")}
    signer = HintSigner(secret)
    tb = TickBatcher(
        ScriptedClient(_answer), bridge_id="metrics-bridge", deadline_ms=500.0, max_backlog=1,
        hint_checker=lambda sid, raw: verifiers[sid].verify(sid, raw),
        limiter=type("OnePerStream", (), {"allow": lambda self, ids, counts: [1] * len(ids)})(),
        max_hints_per_tick=4,
    )
    tb.join("opt", opted_out=True)
    for sid in ("on", "sick", "busy"):
        tb.join(sid)
    tb.apply_decisions({"sick": "unhealthy"})
    for sid in ("on", "opt", "sick"):
        tb.push(Chunk(sid, sine_chunk(100, 0)))
    for i in range(3):  # two beyond the backlog limit: shed as overload
        tb.push(Chunk("busy", sine_chunk(100, i)))
    good = [signer.sign("on", Hint(0, 6.0, 1, seq=i)) for i in range(1, 4)]
    for raw in good[:2]:
        tb.add_hint("on", raw)  # the limiter lets one through: 1 accepted, 1 limited
    tb.add_hint("on", good[0])  # replayed
    tb.add_hint("busy", good[2])  # signed for another stream: forged
    tb.add_hint("busy", b"\x00" * 3)  # malformed
    for _ in range(3):  # forged (right size, no valid tag); the one beyond
        tb.add_hint("busy", b"\x01" * 16)  # max_hints_per_tick is limited before any check
    report = run(tb.tick())
    assert sorted(f.key for f in report.frames) == sorted(
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
    tb.codec, tb.deadline_ms = StuckClient(), 5.0
    tb.push(Chunk("on", sine_chunk(100, 1)))
    run(tb.tick())
    assert frames(reason="deadline") - before["deadline"] == 1
    tb.codec, tb.deadline_ms = ScriptedClient(lambda b: _answer(b, outcome=[250])), 500.0
    tb.push(Chunk("on", sine_chunk(100, 2)))
    run(tb.tick())
    assert frames(reason="error") - before["error"] == 1
    tb.leave("sick")
    run(tb.tick())
    assert reg.gauge(m.STREAMS_ACTIVE, bridge="metrics-bridge") == 3
