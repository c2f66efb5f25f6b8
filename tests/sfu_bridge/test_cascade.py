"""Cascading between bridge workers: the relay framing (round trips, fuzzing, counted drops)
and two workers over real loopback UDP delivering every frame exactly once, each subscriber
at its own layer."""

from __future__ import annotations

import asyncio
import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.contract import FallbackReason
from sfu_bridge.cascade import (
    HEADER,
    MAX_DATAGRAM,
    CascadeRelay,
    FeedbackRecord,
    FrameRecord,
    RecordKind,
    RelayDrop,
    RelayError,
    RelayType,
    parse,
    relay_key,
    serialise,
)


def _ai(sid: str = "s", n_q: int = 8, frames: int = 3, seed: int = 0) -> FrameRecord:
    codes = np.random.default_rng(seed).integers(0, 1024, (n_q, frames)).astype(np.int16)
    return FrameRecord(sid, RecordKind.AI, 1920 * 7, 1234, epoch=3, epoch_seq=5, codes=codes, max_n_q=32)


def _same(a: FrameRecord | FeedbackRecord, b: FrameRecord | FeedbackRecord) -> bool:
    if isinstance(a, FeedbackRecord):
        return a == b
    assert isinstance(b, FrameRecord)
    codes_equal = (a.codes is None and b.codes is None) or np.array_equal(a.codes, b.codes)
    return (codes_equal and a.stream_id == b.stream_id and a.kind == b.kind and a.opus == b.opus
            and (a.rtp_timestamp, a.age_us, a.epoch, a.epoch_seq, a.reason, a.max_n_q)
            == (b.rtp_timestamp, b.age_us, b.epoch, b.epoch_seq, b.reason, b.max_n_q))


def test_frames_round_trip_byte_exact() -> None:
    records = [
        _ai(), _ai("b", 32, 1, 1),
        FrameRecord("s", RecordKind.FALLBACK, 1920, 10, reason=FallbackReason.DEADLINE,
                    opus=[b"\x78" * 60, b"\x79" * 61]),
        FrameRecord("s", RecordKind.DTX, 3840, 0),
        FrameRecord("s", RecordKind.OPUS, 960, 99, opus=[b"\xfc\x01\x02"]),
    ]
    (dgram,) = serialise(RelayType.FRAMES, 7, 42, records, boot=0x01020304)
    d = parse(dgram)
    assert (d.type, d.worker, d.boot, d.tick, d.part, d.parts) == (RelayType.FRAMES, 7, 0x01020304, 42, 0, 1)
    assert all(_same(a, b) for a, b in zip(records, d.records, strict=True))
    assert serialise(RelayType.FRAMES, 7, 42, d.records, boot=d.boot) == [dgram]
    # a fixture: header bytes as specified
    assert dgram[:HEADER.size] == (b"AL\x03\x01\x00\x07\x01\x02\x03\x04\x00\x00\x00\x2a"
                                   b"\x00\x01\x00\x05")


def test_tagged_datagrams_authenticate() -> None:
    key, other = relay_key(b"k" * 32), relay_key(b"x" * 32)
    (dgram,) = serialise(RelayType.FRAMES, 1, 2, [_ai()], key=key)
    assert _same(parse(dgram, key).records[0], _ai())
    for bad, k in ((dgram, other), (dgram[:-1] + bytes([dgram[-1] ^ 1]), key),
                   (serialise(RelayType.FRAMES, 1, 2, [_ai()])[0], key)):
        with pytest.raises(RelayError, match="tag") as err:
            parse(bad, k)
        assert err.value.reason is RelayDrop.TAG
    big = serialise(RelayType.FRAMES, 1, 2, [_ai(f"s{i}", 32, 3, i) for i in range(40)], key=key)
    assert all(len(g) <= MAX_DATAGRAM for g in big)


def test_feedback_round_trip() -> None:
    records = [FeedbackRecord("room-1", 16, True), FeedbackRecord("é", 0, False)]
    (dgram,) = serialise(RelayType.FEEDBACK, 1, 0, records)
    assert parse(dgram).records == records


def test_large_batch_splits_into_self_contained_datagrams() -> None:
    records = [_ai(f"stream-{i}", 32, 3, i) for i in range(40)]  # ~130 bytes each
    dgrams = serialise(RelayType.FRAMES, 1, 9, records)
    assert len(dgrams) > 1 and all(len(g) <= MAX_DATAGRAM for g in dgrams)
    parsed = [parse(g) for g in dgrams]
    assert [p.part for p in parsed] == list(range(len(dgrams)))
    assert {p.parts for p in parsed} == {len(dgrams)}
    out = [r for p in parsed for r in p.records]
    assert all(_same(a, b) for a, b in zip(records, out, strict=True))


@pytest.mark.parametrize("data, reason, message", [
    (b"AL\x01", RelayDrop.TRUNCATED, "shorter than the header"),
    (b"XX" + bytes(16), RelayDrop.BAD_HEADER, "magic"),
    (b"AL\x01\x01" + bytes(14), RelayDrop.BAD_HEADER, "version 1"),
    (b"AL\x02\x01" + bytes(14), RelayDrop.BAD_HEADER, "version 2"),
    (b"AL\x03\x07" + bytes(14), RelayDrop.BAD_HEADER, "type 7"),
    (HEADER.pack(b"AL", 3, 1, 0, 0, 0, 1, 1, 0), RelayDrop.BAD_HEADER, "part 1 of 1"),
    (HEADER.pack(b"AL", 3, 1, 0, 0, 0, 0, 1, 1) + b"\x01s" + struct.pack("!BII", 9, 0, 0),
     RelayDrop.BAD_RECORD, "kind 9"),
    (HEADER.pack(b"AL", 3, 1, 0, 0, 0, 0, 1, 1) + b"\x00", RelayDrop.BAD_RECORD, "empty stream id"),
    (HEADER.pack(b"AL", 3, 1, 0, 0, 0, 0, 1, 0) + b"x", RelayDrop.TRAILING, "1 bytes after"),
    (HEADER.pack(b"AL", 3, 1, 0, 0, 0, 0, 1, 1) + b"\x01s" + struct.pack("!BII", 1, 0, 0)
     + struct.pack("!IIBBB", 0, 0, 32, 33, 1), RelayDrop.BAD_RECORD, "out of range"),
    (HEADER.pack(b"AL", 3, 1, 0, 0, 0, 0, 1, 1) + b"\x01s" + struct.pack("!BII", 1, 0, 0)
     + struct.pack("!IIBBB", 0, 0, 4, 8, 1), RelayDrop.BAD_RECORD, "max_n_q 4"),
    (HEADER.pack(b"AL", 3, 2, 0, 0, 0, 0, 1, 1) + b"\x01s\x08\x02", RelayDrop.BAD_RECORD, "flags"),
])
def test_bad_input_is_a_relay_error_with_a_reason(data: bytes, reason: RelayDrop, message: str) -> None:
    with pytest.raises(RelayError, match=message) as err:
        parse(data)
    assert err.value.reason is reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_parse_or_raise_relay_error(data: bytes) -> None:
    try:
        parse(data)
    except RelayError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_datagrams(cut: int, pos: int, junk: bytes) -> None:
    (dgram,) = serialise(RelayType.FRAMES, 1, 1, [_ai(), FrameRecord("s", RecordKind.OPUS, 0, 0, opus=[b"ab"])])
    for mutated in (dgram[:len(dgram) - cut - 1], dgram[:pos] + junk + dgram[pos + len(junk):]):
        try:
            parse(mutated)
        except RelayError:
            pass


def test_relay_counts_bad_datagrams_as_drops() -> None:
    from cluster.bench.bridge import EmulatedCodec
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    relay = CascadeRelay(1, MediaBridge(BridgeCore(EmulatedCodec()), max_streams=2))
    relay.datagram_received(b"garbage-garbage-garbage", ("127.0.0.1", 1))
    relay.datagram_received(serialise(RelayType.FRAMES, 0, 1, [_ai("nobody")])[0], ("127.0.0.1", 1))
    assert relay.drops == {RelayDrop.BAD_HEADER.value: 1, RelayDrop.UNKNOWN_STREAM.value: 1}


def test_replayed_datagrams_are_dropped_and_a_restarted_sender_is_not() -> None:
    from cluster.bench.bridge import EmulatedCodec
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    key = relay_key(b"cluster secret")
    relay = CascadeRelay(1, MediaBridge(BridgeCore(EmulatedCodec()), max_streams=2), key)
    relay.follow("s", ("127.0.0.1", 9))
    owner = ("127.0.0.1", 9)

    def tick(t: int, boot: int = 100, parts: int = 1) -> list[bytes]:
        records = [FrameRecord("s", RecordKind.DTX, 1920 * t, 0)] * parts
        return serialise(RelayType.FRAMES, 0, t, records, max_datagram=45, key=key, boot=boot)

    def feed(dgrams: list[bytes]) -> int:
        before = relay.received["datagrams"]
        for d in dgrams:
            relay.datagram_received(d, owner)
        return relay.received["datagrams"] - before

    two = tick(5, parts=2)
    assert len(two) == 2 and feed(two) == 2  # one tick in two parts: both accepted
    assert feed(two) == 0  # the same again: replayed
    assert feed(tick(7)) == 1 and feed(tick(6)) == 1  # out of order within the window
    assert feed(tick(6)) == 0
    assert feed(tick(7 + 64)) == 1 and feed(tick(7)) == 0  # below the window now
    assert feed(tick(0, boot=99)) == 0  # an older boot of the sender
    assert feed(tick(0, boot=101)) == 1  # the sender restarted: its ticks start again
    assert relay.drops == {RelayDrop.REPLAY.value: 5}


# -- two workers ---------------------------------------------------------------------------------
class _Sink:
    """A subscriber's UDP socket; packets are checked in the clear after SRTP (see `_Out`)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(2048))
            except BlockingIOError:
                return out


async def _two_workers(chunks: int, layers: tuple[list, list], kbps: tuple[float, float] = (24.0, 24.0)):
    """An owner and a peer worker (each a MediaBridge with an emulated codec and a relay) on
    loopback; subscribers pinned at `layers` (None: Opus) on each; the publisher's `chunks`
    40 ms chunks ticked on the owner. Returns each subscriber's packets in the clear and
    the two relays."""
    from aiortc.rtp import RtpPacket

    from cluster.bench.bridge import (
        EmulatedCodec,
        LoopbackOut,
        PublisherFeed,
        _opus_loop,
        _srtp_pair,
    )
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge
    from sfu_bridge.rate_control import Layer

    owner = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=kbps[0]), max_streams=2)
    peer = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=kbps[1]), max_streams=2)
    key = relay_key(b"cluster secret")
    r0, r1 = CascadeRelay(0, owner, key), CascadeRelay(1, peer, key)
    owner.cascade, peer.cascade = r0, r1
    a0 = await r0.open("127.0.0.1", 0)
    await r1.open("127.0.0.1", 0)
    owner.add_publisher("s", "pub", None).opus_pt = 111
    r1.follow("s", a0)
    send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    subs = []  # (worker, layer or None for Opus, sink, srtp rx)
    for media, w in ((owner, 0), (peer, 1)):
        for layer in layers[w]:
            sink = _Sink()
            tx, rx = _srtp_pair()
            out = LoopbackOut(layer is not None, send, sink.addr, with_mid=False, srtp_tx=tx)
            sub = media.add_subscriber("s", "u", None, out)
            if layer is not None:
                media.pin_layer(sub.session_id, Layer(layer))
            subs.append((w, layer, sink, rx))
    for _ in range(20):  # the peer's feedback subscribes it at the owner
        r1.feedback()
        await asyncio.sleep(0.01)
        if r0.subscriptions.get("s"):
            break
    feed = PublisherFeed(_opus_loop())
    for _ in range(chunks):
        for data in feed.next_wire(2):
            owner.forward("s", RtpPacket.parse(feed.rx.unprotect(data)))
        report = await owner.core.tick()
        owner.dispatch_now(report)
        await asyncio.sleep(0.01)  # the relay datagram reaches the peer
        owner._update_needs()
    await asyncio.sleep(0.05)
    got = [(w, layer, [RtpPacket.parse(rx.unprotect(p)) for p in sink.drain()]) for w, layer, sink, rx in subs]
    r0.close()
    r1.close()
    return got, r0, r1


def test_two_workers_every_frame_exactly_once_at_each_layer() -> None:
    from sfu_bridge.aic_payload import AicPayload

    chunks = 12
    got, r0, r1 = asyncio.run(_two_workers(chunks, ([4, None], [2, 8, None])))
    assert r0.subscriptions["s"] and not r1.drops and not r0.drops
    # the owner relayed each tick's frame once, at the peer's deepest layer (8), never 32
    assert r0.sent["datagrams"] >= chunks and r1.received["datagrams"] == r0.sent["datagrams"]
    assert r1.received["codebooks"] == 8 * chunks
    for w, layer, packets in got:
        seqs = [p.sequence_number for p in packets]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (w, layer)  # no gap, no duplicate
        if layer is None:  # Opus: both 20 ms packets of every chunk, each once
            ts = [p.timestamp for p in packets]
            assert len(ts) == 2 * chunks and len(set(ts)) == len(ts), (w, ts)
        else:
            payloads = [AicPayload.parse(p.payload) for p in packets]
            assert len(payloads) == chunks, (w, layer, len(payloads))
            assert {p.n_q for p in payloads} == {layer}, (w, layer)
            ts = [p.timestamp for p in packets]
            assert [t - ts[0] for t in ts] == [1920 * k for k in range(chunks)]  # every frame once, in order


@pytest.mark.parametrize("kbps, peer_layer, expect", [
    ((24.0, 6.0), 16, 16),  # a follower at a lower default: the owner's maximum (32) holds
    ((6.0, 24.0), 16, 8),  # a follower at a higher default: the owner's maximum (8) holds
])
def test_a_follower_caps_its_subscribers_by_the_owners_maximum_not_its_own(kbps, peer_layer, expect) -> None:
    """Each worker has its own default bandwidth (its default depth until the publisher's hints
    say otherwise); a followed stream's subscribers get the layers the owner allows the
    stream, as the owner's own subscribers do."""
    from sfu_bridge.aic_payload import AicPayload

    chunks = 12
    got, r0, r1 = asyncio.run(_two_workers(chunks, ([peer_layer], [peer_layer]), kbps))
    assert not r0.drops and not r1.drops
    by_worker = {w: [AicPayload.parse(p.payload).n_q for p in packets] for w, _, packets in got}
    assert by_worker[0] == [expect] * chunks  # the owner's own subscriber
    # the follower's: the owner's maximum from the first relayed frame on (one tick for its
    # feedback to reach the owner), every frame once
    assert len(by_worker[1]) == chunks and by_worker[1][2:] == [expect] * (chunks - 2), by_worker


def test_relay_state_ends_with_its_stream_and_a_silent_workers_need_expires() -> None:
    from cluster.bench.bridge import EmulatedCodec
    from sfu_bridge.cascade import _Subscription
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    clock = [100.0]
    media = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=24.0), max_streams=4)
    relay = CascadeRelay(0, media, clock=lambda: clock[0])
    media.cascade = relay
    pub = media.add_publisher("s", "pub", None)
    # owner side: a worker that went quiet (last feedback at 96 s) asked for 32 codebooks
    relay.subscriptions["s"] = {("10.0.0.2", 1): _Subscription(16, 100.0), ("10.0.0.3", 1): _Subscription(32, 96.0)}
    clock[0] = 101.5
    assert relay.remote_need("s") == 16  # the silent one's need has expired
    clock[0] = 106.0
    assert relay.remote_need("s") is None
    relay._opus["s"] = [(0, 100.0, b"x")]
    asyncio.run(media.end_session(pub.session_id))
    assert "s" not in relay.subscriptions and "s" not in relay._opus  # the publisher left
    # follower side: letting a stream go forgets what was fed back about it
    relay.follow("f", ("10.0.0.9", 7000))
    relay._fed_back["f"] = (8, False)
    assert relay.unfollow("f") and "f" not in relay.owners and "f" not in relay._fed_back
    assert not relay.unfollow("f")
    # a worker asking this one for a stream it only follows is refused: never relayed on
    relay.follow("g", ("10.0.0.9", 7000))
    (dgram,) = serialise(RelayType.FEEDBACK, 5, 1, [FeedbackRecord("g", 8)])
    relay._feedback_in(parse(dgram), ("10.0.0.5", 1))
    assert "g" not in relay.subscriptions and relay.drops[RelayDrop.UNKNOWN_STREAM.value] == 1


def test_a_new_epoch_request_is_sent_again_until_an_epoch_start_arrives() -> None:
    """Feedback travels over UDP: a lost request must not leave a joining decoder waiting for
    an epoch start that never comes."""
    from cluster.bench.bridge import EmulatedCodec, LoopbackOut
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    class Wire:
        def __init__(self) -> None:
            self.sent: list[FeedbackRecord] = []

        def sendto(self, data: bytes, addr) -> None:
            self.sent.extend(parse(data).records)

    clock = [10.0]
    media = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=24.0), max_streams=2)
    relay = CascadeRelay(1, media, clock=lambda: clock[0])
    relay.transport = wire = Wire()
    relay.follow("s", ("10.0.0.9", 7000))
    send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.add_subscriber("s", "u", None, LoopbackOut(True, send, ("127.0.0.1", 9), with_mid=False))

    def restarts_after(dt: float) -> list[bool]:
        clock[0] += dt
        wire.sent.clear()
        relay.feedback()
        return [r.restart for r in wire.sent]

    media.core.restart_epoch("s")  # a subscriber joined (or sent PLI)
    assert restarts_after(0.0) == [True]
    assert restarts_after(0.1) == [False]  # asked once: not again at once
    assert restarts_after(0.5) == [True]  # no epoch start yet: asked again
    codes = np.zeros((8, 1), np.int16)
    (dgram,) = serialise(RelayType.FRAMES, 0, 1, [FrameRecord("s", RecordKind.AI, 0, 0, 7, 0, codes, max_n_q=32)])
    relay._frames_in(parse(dgram))  # the owner's epoch 7 starts (its feedback: no restart)
    assert restarts_after(0.6) in ([], [False])
    send.close()
