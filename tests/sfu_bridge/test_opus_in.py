"""Publishers' Opus decoded by the codec replica, not the bridge (BridgeCore(opus_in=True)).

The bridge gathers each stream's packets into 40 ms chunks by their TOC (fastpath.OpusIngest,
decode=False), the batch carries them (FrameBatch.opus), the replica decodes them
(deployments.replica.OpusIntake, models.opus.OpusChunkDecoder) and fallback frames go out as
the publisher's own packets. Equality here is bit-exact only between two decodes on the same
machine and library (libopus is deterministic for one build); nothing is compared with stored
audio.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.contract import FrameBatch, Op
from models.opus import PACKET_LOST, OpusChunkDecoder, OpusCodec, packet_samples
from sfu_bridge.fastpath import CHUNK_48K, OpusIngest

from .test_sdk import CONFIG, SeenStreams


def _packets(n: int, seed: int = 3, frame_ms: int = 20) -> list[bytes]:
    rng = np.random.default_rng(seed)
    t = np.arange(n * 48 * frame_ms) / 48_000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    (packets,) = OpusCodec(1, 48_000, frame_ms, 32_000).encode([0], pcm[None, :])
    return packets


def test_packet_samples_reads_the_toc_and_refuses_bad_framing():
    assert packet_samples(_packets(1)[0]) == 480  # 20 ms at 24 kHz
    assert packet_samples(_packets(1, frame_ms=40)[0]) == 960
    assert packet_samples(_packets(1)[0], 48_000) == 960
    assert packet_samples(b"") == 0
    assert packet_samples(bytes([0x03])) == 0  # code 3 without its frame count byte


def test_chunks_of_packets_decode_to_what_the_bridge_would_have_decoded():
    packets = _packets(40)
    lost = {7, 8, 21}  # concealed by both
    seqs = [s for s in range(40) if s not in lost] + [8]  # 8 arrives after its place was concealed
    on_bridge, for_replica = OpusIngest("s", decode=True), OpusIngest("s", decode=False)
    pcm_chunks, opus_chunks = [], []
    for s in seqs:
        pcm_chunks += on_bridge.packet(s, packets[s])
        opus_chunks += for_replica.packet(s, packets[s])
    # same chunks, timestamps, drops and concealment on both sides
    assert len(pcm_chunks) == len(opus_chunks) == 20
    assert [c[1] for c in pcm_chunks] == [c[1] for c in opus_chunks] == [k * CHUNK_48K for k in range(20)]
    assert on_bridge.drops == for_replica.drops == {"reordered": 1}
    assert on_bridge.concealed == for_replica.concealed == 3
    # a chunk is the packets that made it, a lost one marked where it was
    assert opus_chunks[0][0] == (packets[0], packets[1])
    assert opus_chunks[3][0] == (packets[6], PACKET_LOST)
    assert opus_chunks[10][0] == (packets[20], PACKET_LOST)
    assert opus_chunks[4][0] == (PACKET_LOST, packets[9])
    # the replica's decoder turns them into the same audio, sample for sample
    dec = OpusChunkDecoder()
    for (pcm, _, _), (chunk, _, _) in zip(pcm_chunks, opus_chunks, strict=True):
        np.testing.assert_array_equal(dec.chunk(chunk), pcm)
    assert dec.malformed == 0


def test_long_packets_leave_empty_chunks_and_the_replica_keeps_the_timeline():
    packets = _packets(6, frame_ms=60)  # 60 ms packets: 1.5 chunks each
    ingest = OpusIngest("s", decode=False)
    chunks = [c for s, p in enumerate(packets) for c, _, _ in ingest.packet(s, p)]
    assert len(chunks) == 9  # 360 ms
    assert sum(len(c) for c in chunks) == 6 and () in chunks
    dec = OpusChunkDecoder()
    out = [dec.chunk(c) for c in chunks]
    assert all(o.shape == (960,) and np.isfinite(o).all() for o in out)
    # a frame the replica never saw (shed on the bridge) is concealed, not skipped
    assert dec.chunk(()).shape == (960,) and dec.concealed >= 1


def test_malformed_and_random_payloads_are_concealed_and_counted():
    rng = np.random.default_rng(11)
    dec = OpusChunkDecoder()
    for _ in range(200):
        rows = tuple(bytes(rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8))
                     for _ in range(int(rng.integers(0, 4))))
        out = dec.chunk(rows)
        assert out.shape == (960,) and out.dtype == np.float32 and np.isfinite(out).all()
    assert dec.malformed > 0
    ingest = OpusIngest("s", decode=False)
    assert ingest.packet(0, bytes([0x03])) == [] and ingest.drops == {"malformed": 1}
    # a valid code 3 packet longer than a batch row may carry (one such row would make the
    # replica refuse the whole batch): dropped here, counted as malformed
    big = bytes([0xFB, 0x83]) + bytes([200, 200]) + b"\x00" * 1600  # 3 CELT 20 ms frames, VBR
    assert packet_samples(big) == 1440
    assert ingest.packet(1, big) == [] and ingest.drops == {"malformed": 2}


@pytest.mark.parametrize("bad, why", [
    ([(b"x",)], "list of 2"),
    ([(b"x",), "nope"], "tuple of at most"),
    ([(b"x",), (1, 2)], "bytes of at most"),
    ([(b"x",), (b"y" * 2000,)], "bytes of at most"),
    ([(b"x",), (b"y",) * 17], "tuple of at most"),
    ({"vad": np.zeros((2, 2))}, "vad must be a float array of shape"),
    ({"vad": np.array([[-40.0, 3.0, 0.0], [np.nan, 0.0, 0.0]])}, "vad_config must be"),
    ({"vad": np.array([[np.inf, 3.0, 0.0], [np.nan, 0.0, 0.0]]), "vad_config": (9.0, -55.0, 0.25, 8)},
     "vad rows must be finite"),
])
def test_a_malformed_opus_batch_is_answered_not_raised(replica_core, bad, why):
    fields = bad if isinstance(bad, dict) else {"opus": bad}
    if "opus" not in fields:
        fields["opus"] = [(b"x",), (b"y",)]
    batch = FrameBatch(op=Op.ENCODE, bridge_id="b", stream_ids=["a", "b"], epochs=np.ones(2, np.int64),
                       epoch_seqs=np.zeros(2, np.int64), budgets_ms=np.full(2, 1000.0), **fields)
    with pytest.raises(ValueError, match=why):
        batch.validate()
    res = asyncio.run(replica_core().process(batch))
    assert res.counts() == {"fallback/error": 2}
    both = FrameBatch(op=Op.ENCODE, bridge_id="b", stream_ids=["a"], epochs=np.ones(1, np.int64),
                      epoch_seqs=np.zeros(1, np.int64), budgets_ms=np.full(1, 1000.0),
                      pcm=np.zeros((1, 960), np.float32), opus=[(b"x",)])
    with pytest.raises(ValueError, match="not both"):
        both.validate()


def test_the_replica_encodes_opus_rows_as_it_encodes_their_audio(replica_core):
    """Two replicas, one fed the packets and one the audio the bridge would have decoded:
    the same codes, frame for frame."""
    packets = _packets(12)
    chunks = [tuple(packets[k:k + 2]) for k in range(0, 12, 2)]
    ref = OpusChunkDecoder()
    pcm = [ref.chunk(c) for c in chunks]

    def batch(k: int, **audio) -> FrameBatch:
        return FrameBatch(op=Op.ENCODE, bridge_id="b", stream_ids=["s"], epochs=np.ones(1, np.int64),
                          epoch_seqs=np.full(1, k, np.int64), budgets_ms=np.full(1, 5_000.0), **audio)

    async def run(audio_of, together: bool = False) -> tuple[list[np.ndarray], dict]:
        rep = replica_core()
        try:
            if together:  # a bridge's next ticks in flight at once: decoded and admitted in order
                results = await asyncio.gather(*(rep.process(batch(k, **audio_of(k))) for k in range(len(chunks))))
            else:
                results = [await rep.process(batch(k, **audio_of(k))) for k in range(len(chunks))]
            assert [r.counts() for r in results] == [{"ai": 1}] * len(chunks)
            return [r.codes[0].copy() for r in results], rep.info()["opus_intake"]
        finally:
            await rep.stop()

    # one after the other: the session's model is shared, and a first frame resets its slot
    from_opus, intake = asyncio.run(run(lambda k: {"opus": [chunks[k]]}))
    from_pcm, none = asyncio.run(run(lambda k: {"pcm": pcm[k][None, :]}))
    at_once, _ = asyncio.run(run(lambda k: {"opus": [chunks[k]]}, together=True))
    for a, b, c in zip(from_opus, from_pcm, at_once, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)
    assert intake["rows"] == 6 and intake["streams"] == 1 and intake["malformed_packets"] == 0
    assert none["rows"] == 0


def test_core_batches_packets_and_a_fallback_frame_keeps_them(replica_core):
    from sfu_bridge.core import BridgeCore, Outcome

    codec = SeenBatches(replica_core())
    core = BridgeCore(codec, opus_in=True, opted_out_users=frozenset({"dave"}), deadline_ms=5_000.0)
    core.join("on", "alice")
    core.join("off", "dave")
    packets = _packets(4)
    with pytest.raises(ValueError, match="tuple of packets"):
        core.push("on", np.zeros(960, np.float32))

    async def go():
        reports = []
        for k in range(2):
            core.push("on", tuple(packets[2 * k:2 * k + 2]), k * CHUNK_48K)
            core.push("off", tuple(packets[2 * k:2 * k + 2]), k * CHUNK_48K)
            reports.append(await core.tick())
        await codec.inner.stop()
        return reports

    reports = asyncio.run(go())
    assert [b.opus for b in codec.batches] == [[(packets[0], packets[1])], [(packets[2], packets[3])]]
    assert all(b.pcm is None for b in codec.batches)
    frames = {fo.stream_id: fo for fo in reports[1].frames()}
    assert frames["on"].outcome is Outcome.AI and frames["on"].codes is not None
    assert frames["off"].outcome is Outcome.FALLBACK and frames["off"].opus == (packets[2], packets[3])
    assert reports[1].pcm is None


def test_chunks_spilled_shed_or_left_behind_keep_their_packets(replica_core):
    """Frames answered locally (a backlog over its limit, a row that overflows, a stream that
    left with chunks queued) carry their packets, so fallback can forward them."""
    from sfu_bridge.core import BridgeCore

    core = BridgeCore(replica_core(), opus_in=True, max_backlog=2, deadline_ms=5_000.0)
    packets = _packets(12)
    chunks = [(packets[2 * k], packets[2 * k + 1]) for k in range(6)]
    core.join("a", "alice")
    core.join("b", "bob")
    for k in range(5):  # 5 chunks into a queue of 3: the two oldest spill
        core.push("a", chunks[k], k * CHUNK_48K)
    core.push("b", chunks[5], 0)
    core.leave("b")

    async def go():
        reports = [await core.tick(), await core.tick()]
        await core.codec.stop()
        return reports

    frames = [fo for report in asyncio.run(go()) for fo in report.frames()]
    by = {(fo.stream_id, fo.rtp_timestamp): fo for fo in frames}
    assert len(frames) == len(by) == 6  # every chunk, exactly one outcome
    assert by[("b", 0)].opus == chunks[5] and by[("b", 0)].reason.value == "overload"
    for k in range(5):
        assert by[("a", k * CHUNK_48K)].opus == chunks[k]
    # two spilled, one shed over the backlog, the one that left; the last two reach the AI
    assert [fo.key for fo in frames].count("fallback/overload") == 4
    assert [by[("a", k * CHUNK_48K)].key for k in (3, 4)] == ["ai", "ai"]


def _talk_and_pause_packets(seconds: float = 4.0) -> list[bytes]:
    """Opus packets (20 ms, 48 kHz) of 0.6 s of tone, 1 s of silence, repeating."""
    t = np.arange(int(seconds * 48_000))
    on = (t % 76_800) < 28_800
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t / 48_000) * on).astype(np.float32)
    (packets,) = OpusCodec(1, 48_000, 20, 32_000).encode([0], pcm[None, :])
    return packets


def test_dtx_decided_by_the_replica_matches_the_bridges_own(replica_core):
    """DTX on a bridge that decodes nothing: the batch carries each stream's VAD state, the
    replica runs the same detector on the audio it decoded and answers `dtx` without
    compute. Frame for frame, the outcomes are the ones a bridge decoding the same packets
    itself decides, and the streams' DTX state and talk spurts agree."""
    from sfu_bridge.core import BridgeCore

    packets = _talk_and_pause_packets()
    chunks = [tuple(packets[k:k + 2]) for k in range(0, len(packets) - 1, 2)]
    ref = OpusChunkDecoder()
    pcm = [ref.chunk(c) for c in chunks]

    def run(opus_in: bool) -> tuple[list[str], BridgeCore, dict]:
        codec = SeenBatches(replica_core())
        core = BridgeCore(codec, opus_in=opus_in, dtx=True, deadline_ms=5_000.0)
        core.join("s", "alice")

        async def go() -> list[str]:
            keys = []
            for k, chunk in enumerate(chunks):
                core.push("s", chunk if opus_in else pcm[k], k * CHUNK_48K)
                keys += [fo.key for fo in (await core.tick()).frames()]
            info = codec.inner.info()
            await codec.inner.stop()
            return keys, info

        keys, info = asyncio.run(go())
        return keys, core, {"info": info, "batches": codec.batches}

    on_bridge, bridge_core, _ = run(False)
    on_replica, replica_side, seen = run(True)
    assert on_replica == on_bridge
    assert on_bridge.count("dtx") >= 20 and on_bridge.count("ai") >= 20
    assert replica_side.dtx_spurts == bridge_core.dtx_spurts >= 1
    assert replica_side.stream("s").dtx_silent == bridge_core.stream("s").dtx_silent
    # the replica saw every frame (to decode it) and answered the silent ones itself
    assert len(seen["batches"]) == len(chunks) and all(b.vad is not None for b in seen["batches"])
    assert seen["info"]["counters"]["dtx_frames"] == on_replica.count("dtx")


def test_a_dtx_state_that_gets_no_verdict_is_kept(replica_core):
    """A batch that times out (or a result without VAD states) leaves the streams' DTX state
    as it was; a `dtx` answer for a row that sent no state is the replica's error."""
    from deployments.contract import DTX_CODE, BatchResult
    from sfu_bridge.core import BridgeCore

    class Answers:
        def __init__(self, code: int, with_vad: bool) -> None:
            self.code, self.with_vad = code, with_vad

        async def process(self, batch):
            b = len(batch)
            return BatchResult(list(batch.stream_ids), np.full(b, self.code, np.uint8), batch.epochs.copy(),
                               np.zeros(b, np.float32), np.zeros(b, np.float32),
                               vad=np.array([[-40.0, 0.0, 1.0]] * b) if self.with_vad else None)

    packets = _packets(2)
    core = BridgeCore(Answers(DTX_CODE, False), opus_in=True, dtx=True)
    core.join("s", "alice")
    core.push("s", (packets[0], packets[1]), 0)
    report = asyncio.run(core.tick())
    assert [fo.key for fo in report.frames()] == ["dtx"]
    assert not core.stream("s").dtx_silent  # no state came back: unchanged
    core.codec = Answers(DTX_CODE, True)
    core.push("s", (packets[0], packets[1]), CHUNK_48K)
    asyncio.run(core.tick())
    assert core.stream("s").dtx_silent
    plain = BridgeCore(Answers(DTX_CODE, True), opus_in=True, dtx=False)  # DTX off: no state sent
    plain.join("s", "alice")
    plain.push("s", (packets[0], packets[1]), 0)
    assert [fo.key for fo in asyncio.run(plain.tick()).frames()] == ["fallback/error"]


class SeenBatches:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[FrameBatch] = []

    async def process(self, batch):
        self.batches.append(batch)
        return await self.inner.process(batch)


def test_sdk_publishers_are_decoded_by_the_replica(running_bridge, tokens, streaming_codec,
                                                             replica_core):
    """A WebRTC bridge as configured by default (DTX on): the worker decodes nothing, AIC
    subscribers decode the replica's codes, and an opted-out stream's AIC subscriber gets the
    publisher's own Opus packets."""
    from sfu_bridge.sdk import AicPublisher, AicSubscriber

    replica = replica_core()
    codec = SeenStreams(replica)

    async def go():
        async with running_bridge(codec, **CONFIG) as (server, base):
            assert server.media.decode_at == "replica" and server.media.core.opus_in
            pub = AicPublisher(base, "r1", tokens.issue("alice", "r1", ["publish"]))
            out_pub = AicPublisher(base, "r2", tokens.issue("dave", "r2", ["publish"]))
            sent: list[bytes] = []
            encode = out_pub.opus.encode

            def recording(slots, pcm):  # what the opted-out publisher put on the wire
                packets = encode(slots, pcm)
                sent.extend(packets[0])
                return packets

            out_pub.opus.encode = recording
            await pub.start()
            await out_pub.start()
            aic = AicSubscriber(base, "r1", tokens.issue("bob", "r1", ["subscribe"]), codec=streaming_codec, slot=4)
            fb = AicSubscriber(base, "r2", tokens.issue("bob", "r2", ["subscribe"]), codec=None)
            got: list[bytes] = []
            on_opus = fb._on_opus

            def recording_rx(payload: bytes) -> None:
                got.append(payload)
                on_opus(payload)

            fb._on_opus = recording_rx
            await aic.start()
            await fb.start()
            ok = await aic.wait_frames(n_aic=8, timeout_s=90) and await fb.wait_frames(n_opus=20, timeout_s=90)
            stats = server.media.stats()
            ingests = [server.media.publishers[s].ingest for s in ("r1", "r2")]
            for x in (aic, fb, pub, out_pub):
                await x.stop()
        return ok, aic, fb, stats, ingests, sent, got, replica.info()["opus_intake"]

    ok, aic, fb, stats, ingests, sent, got, intake = asyncio.run(go())
    assert ok, (aic.stats, fb.stats)
    assert stats["decode_at"] == "replica" and all(not i.decodes for i in ingests)
    assert stats["ingest_drops"] == {}
    # the replica decoded r1's chunks; r2 is opted out and never reached it
    assert intake["rows"] >= 8 and intake["malformed_packets"] == 0 and "r2" not in codec.seen
    assert aic.stats.bad_payloads == 0 and aic.stats.decoded_samples > 0
    assert all(np.isfinite(p).all() for p in aic.pcm)
    # fallback frames: the publisher's own packets, byte for byte, none made up on the bridge
    assert len(got) >= 20 and set(got) <= set(sent)
    assert stats["frames"].get("fallback/opted_out", 0) > 0



def test_decode_at_is_configured_from_the_environment(monkeypatch):
    from sfu_bridge.config import BridgeConfig

    assert BridgeConfig.from_env().decode_at == "replica"
    monkeypatch.setenv("AURALINK_DECODE_AT", "Bridge")
    assert BridgeConfig.from_env().decode_at == "bridge"
    monkeypatch.setenv("AURALINK_DECODE_AT", "gpu")
    with pytest.raises(ValueError, match="AURALINK_DECODE_AT must be 'replica' or 'bridge'"):
        BridgeConfig.from_env()
