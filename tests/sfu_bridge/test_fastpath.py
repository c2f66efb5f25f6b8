"""The bridge's fast per-packet path: RTP writing equals aiortc's serializer byte for byte,
and the inline Opus ingest yields the codec's 40 ms 24 kHz chunks, concealing gaps and
counting late or malformed packets."""

from __future__ import annotations

import os
import socket
import struct

import numpy as np
import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import RtpPacket
from pylibsrtp import Policy, Session

from deployments.contract import CHUNK_SAMPLES
from models.opus import OpusCodec
from sfu_bridge import aiortc_compat, rtp_ext
from sfu_bridge.aiortc_compat import FastSrtp, native_path
from sfu_bridge.fastpath import CHUNK_48K, IngestDrop, OpusIngest, RtpWriter


def _ext_map() -> rtp_ext.AicHeaderExtensionsMap:
    rtp_ext.install()
    m = rtp_ext.AicHeaderExtensionsMap()
    m.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=4, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
    ]))
    return m


def _srtp(key: bytes | None = None) -> tuple[Session, Session]:
    key = key or os.urandom(30)
    return (Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)),
            Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND)))


@pytest.mark.parametrize("with_mid", [True, False])
def test_rtp_writer_matches_aiortc_serializer(with_mid: bool) -> None:
    ext_map = _ext_map()
    tx, rx = _srtp()
    writer = RtpWriter(0xCAFEBABE, ext_map, "audio0", seq0=65534)
    fast = FastSrtp(tx)
    for i, (pt, payload, marker) in enumerate([(111, b"\x01" * 40, False), (120, b"ab", True),
                                               (111, bytes(range(200)), False)]):
        ts = (0xFFFFFF00 + i * 960) & 0xFFFFFFFF
        plain = rx.unprotect(writer.write(fast, pt, payload, ts, marker, with_mid))
        ref = RtpPacket(payload_type=pt, marker=int(marker), sequence_number=(65534 + i) & 0xFFFF,
                        timestamp=ts, ssrc=0xCAFEBABE, payload=payload)
        ref.extensions.mid = "audio0" if with_mid else None
        assert plain == ref.serialize(ext_map)
    assert writer.seq == 1  # wrapped


def test_rtp_writer_refuses_oversized_payload() -> None:
    tx, _ = _srtp()
    with pytest.raises(ValueError, match="too long"):
        RtpWriter(1, _ext_map(), None).write(FastSrtp(tx), 111, b"x" * 1400, 0)


def test_the_native_send_is_built() -> None:
    """setup.py builds sfu_bridge._rtpsend at install; the bridge falls back to the Python path
    without it (and says so), but an install here must have it."""
    assert aiortc_compat.native_send_available(), aiortc_compat.NATIVE_SEND_MISSING


def _sink(family: int = socket.AF_INET) -> socket.socket:
    sink = socket.socket(family, socket.SOCK_DGRAM)
    sink.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sink.settimeout(5)
    return sink


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("with_mid", [True, False])
def test_native_send_puts_the_python_paths_bytes_on_the_wire(family: int, with_mid: bool) -> None:
    """Two SRTP contexts on one key (SRTP is deterministic for a key, SSRC and index): the
    datagram the C path sends is the Python path's packet, byte for byte, sequence numbers
    and their wrap included."""
    key = os.urandom(30)
    (tx_py, rx), (tx_c, _) = _srtp(key), _srtp(key)
    ext_map = _ext_map()
    w_py = RtpWriter(0xCAFEBABE, ext_map, "audio0", seq0=65534)
    w_c = RtpWriter(0xCAFEBABE, ext_map, "audio0", seq0=65534)
    sink = _sink(family)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    path = native_path(FastSrtp(tx_c), sock, sink.getsockname())
    assert path is not None
    fast = FastSrtp(tx_py)
    for i, (pt, payload, marker) in enumerate([(111, b"\x01" * 40, False), (120, b"ab", True),
                                               (111, bytes(range(200)), False), (120, b"", False)]):
        ts = (0xFFFFFF00 + i * 960) & 0xFFFFFFFF
        want = w_py.write(fast, pt, payload, ts, marker, with_mid)
        n = w_c.send(path, pt, payload, ts, marker, with_mid)
        got = sink.recv(2048)
        assert got == want and n == len(want)
        plain = rx.unprotect(got)  # authentic under the receiver's key
        assert plain.endswith(payload) and plain[2:4] == ((65534 + i) & 0xFFFF).to_bytes(2, "big")
    assert w_c.seq == w_py.seq == 2  # wrapped
    sock.close()
    sink.close()


def test_a_native_path_keeps_its_srtp_session_alive() -> None:
    """The path carries a raw srtp_t: it holds the session's owner, so dropping every other
    reference cannot free the context under it."""
    import gc
    import weakref

    key = os.urandom(30)
    sink = _sink()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = _srtp(key)[0]
    session = weakref.ref(tx)
    path = native_path(FastSrtp(tx), sock, sink.getsockname())
    del tx
    gc.collect()
    assert session() is not None  # the session (and its srtp_t) lives as long as the path
    _, rx = _srtp(key)
    writer = RtpWriter(7, _ext_map(), None)
    for i in range(3):
        assert writer.send(path, 111, b"alive", 960 * i) > 0
        assert rx.unprotect(sink.recv(2048)).endswith(b"alive")
    sock.close()
    sink.close()


def test_native_send_refusals_are_counted_and_bad_input_raises() -> None:
    from cluster.bench.bridge import LoopbackOut

    sink = _sink()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out = LoopbackOut(True, sock, sink.getsockname(), with_mid=False)
    assert out._native is not None
    assert out.send_now(120, b"codes", 960)
    assert sink.recv(2048)
    with pytest.raises(ValueError, match="too long"):
        out.send_now(120, b"x" * 1400, 1920)
    with pytest.raises(TypeError):
        aiortc_compat.native_send(out._native, b"header", 120, 0, 0, "not bytes")
    with pytest.raises(ValueError, match="sequence"):
        aiortc_compat.native_send(out._native, out.writer.template(False), 120, 70_000, 0, b"")
    sock.close()  # the socket is gone: the packet is refused and counted, not sent
    assert not out.send_now(120, b"codes", 2880)
    assert (out.packets, out.send_refused) == (1, 1)
    sink.close()


# -- the native receive (aiortc_compat.RtpIngress, _rtpsend.unprotect) -----------------------
INGRESS_SSRC, INGRESS_PT, HINT_ID = 0x5EED1234, 111, 9


def _hint_map() -> rtp_ext.AicHeaderExtensionsMap:
    from sfu_bridge.hint_ext import HINT_URI

    rtp_ext.install()
    m = rtp_ext.AicHeaderExtensionsMap()
    m.configure(RTCRtpParameters(headerExtensions=[RTCRtpHeaderExtensionParameters(id=HINT_ID, uri=HINT_URI)]))
    return m


def _raw_rtp(rng: np.random.Generator, seq: int, malformed: str | None = None) -> bytes:
    """An RTP packet as a browser or a broken sender might write it: CSRCs, one- or two-byte
    (or unknown-profile) extensions with padding bytes and the hint among other elements, RTP
    padding; `malformed`: a truncated element or a bad padding count."""
    cc = int(rng.integers(0, 4))
    out = bytearray(struct.pack("!BBHII", 0x80 | cc, INGRESS_PT, seq & 0xFFFF,
                                int(rng.integers(0, 2**32)), INGRESS_SSRC))
    out += rng.integers(0, 256, 4 * cc, dtype=np.uint8).tobytes()
    profile = rng.choice([None, 0xBEDE, 0x1000, 0x1234])
    if profile is not None or malformed == "element":
        profile = 0xBEDE if profile is None else int(profile)
        block = bytearray()
        ids = [int(i) for i in rng.choice(np.arange(1, 15), int(rng.integers(0, 4)), replace=False)]
        if rng.random() < 0.6:
            ids.insert(int(rng.integers(0, len(ids) + 1)), HINT_ID)
        for x_id in ids:
            block += b"\0" * int(rng.integers(0, 2))  # padding between elements
            value = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
            block += bytes([(x_id << 4) | (len(value) - 1)]) if profile == 0xBEDE else bytes([x_id, len(value)])
            block += value
        if malformed == "element":  # an element claiming more bytes than the block holds
            block += bytes([(3 << 4) | 15]) if profile == 0xBEDE else bytes([3, 40])
        block += b"\0" * (-len(block) % 4)
        out += struct.pack("!HH", profile, len(block) // 4) + block
        out[0] |= 0x10
    out += rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    if malformed == "padding" or rng.random() < 0.2:
        k = int(rng.integers(1, 9))
        out += b"\0" * (k - 1) + bytes([255 if malformed == "padding" else k])
        out[0] |= 0x20
    return bytes(out)


def _aiortc_view(plain: bytes, ext_map: rtp_ext.AicHeaderExtensionsMap) -> tuple | None:
    """What aiortc's receive path makes of a packet: (seq, ts, payload, hint), or None when
    `RtpPacket.parse` refuses it."""
    try:
        pkt = RtpPacket.parse(plain, ext_map)
    except ValueError:
        return None
    return pkt.sequence_number, pkt.timestamp, pkt.payload, pkt.extensions.aic_hint


def _ingress(session, got: list, hints: list, stats=None) -> aiortc_compat.RtpIngress:
    return aiortc_compat.RtpIngress(lambda: session, INGRESS_SSRC, INGRESS_PT,
                                    lambda seq, ts, payload: got.append((seq, ts, payload)),
                                    hint_id=HINT_ID, hint_sink=hints.append, stats=stats)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_receive_reads_every_packet_as_aiortc_does(seed: int) -> None:
    """Same session key, two receive sessions: aiortc's unprotect + `RtpPacket.parse` and the
    native one must agree on every packet - payload, sequence, timestamp, hint, and which
    packets are refused (counted, never raised)."""
    from aiortc.rtcrtpreceiver import StreamStatistics

    rng = np.random.default_rng(seed)
    key = os.urandom(30)
    tx, rx_aiortc = _srtp(key)
    rx_native = _srtp(key)[1]
    got, hints = [], []
    stats = StreamStatistics(48_000)
    ingress = _ingress(rx_native, got, hints, stats)
    ext_map = _hint_map()
    expected, malformed = [], 0
    for i in range(400):  # across a sequence wrap
        kind = rng.choice([None, None, None, "element", "padding"])
        srtp = tx.protect(_raw_rtp(rng, 65_400 + i, kind))
        view = _aiortc_view(rx_aiortc.unprotect(srtp), ext_map)
        if view is None:
            malformed += 1
        else:
            expected.append(view)
        assert ingress.take(srtp) is True
    assert malformed > 50 and len(expected) > 250  # both kinds were exercised
    assert got == [v[:3] for v in expected]
    assert hints == [v[3] for v in expected if v[3] is not None] and len(hints) > 50
    assert ingress.packets == len(expected)
    assert ingress.drops == {"rtp_malformed": malformed}
    # counted for the receiver reports as aiortc counts: every packet it parsed, in order
    assert stats.packets_received == len(expected) and stats.max_seq == expected[-1][0]


def test_native_receive_fuzz_agrees_with_aiortc_on_random_plaintexts() -> None:
    """Random bytes behind a valid first byte, payload type and SSRC (any CSRC count,
    extension and padding bits, extension lengths and element bytes), authenticated by
    libsrtp: the native parse and aiortc's agree on every one, refusals included."""
    from pylibsrtp import Error as SrtpError

    rng = np.random.default_rng(11)
    key = os.urandom(30)
    tx, rx_aiortc = _srtp(key)
    rx_native = _srtp(key)[1]
    got, hints = [], []
    ingress = _ingress(rx_native, got, hints)
    ext_map = _hint_map()
    expected, protected = [], 0
    for i in range(3000):
        raw = bytearray(rng.integers(0, 256, int(rng.integers(12, 300)), dtype=np.uint8).tobytes())
        raw[0] = 0x80 | (raw[0] & 0x3F)
        raw[1], raw[2:4], raw[8:12] = INGRESS_PT, struct.pack("!H", i), struct.pack("!I", INGRESS_SSRC)
        if raw[0] & 0x10 and rng.random() < 0.5:  # a plausible extension header, random elements
            at = 12 + 4 * (raw[0] & 0x0F)
            if len(raw) >= at + 4:
                raw[at:at + 2] = struct.pack("!H", int(rng.choice([0xBEDE, 0x1000])))
                raw[at + 2:at + 4] = struct.pack("!H", int(rng.integers(0, 8)))
        try:
            srtp = tx.protect(bytes(raw))
        except SrtpError:  # libsrtp will not protect a header it cannot parse: nor unprotect it
            continue
        protected += 1
        view = _aiortc_view(rx_aiortc.unprotect(srtp), ext_map)
        if view is not None:
            expected.append(view)
        assert ingress.take(srtp) is True
    assert protected > 1000 and 100 < len(expected) < protected
    assert got == [v[:3] for v in expected]
    assert hints == [v[3] for v in expected if v[3] is not None]
    assert ingress.drops == {"rtp_malformed": protected - len(expected)}


def test_native_receive_drops_forged_and_replayed_packets_and_passes_on_the_rest() -> None:
    rng = np.random.default_rng(5)
    key = os.urandom(30)
    tx, rx = _srtp(key)
    got, hints = [], []
    session = {"now": rx}
    ingress = aiortc_compat.RtpIngress(lambda: session["now"], INGRESS_SSRC, INGRESS_PT,
                                       lambda *a: got.append(a), hint_id=HINT_ID, hint_sink=hints.append)
    good = tx.protect(_raw_rtp(rng, 1))
    assert ingress.take(good) and len(got) == 1
    assert ingress.take(good) and ingress.drops == {"srtp": 1}  # a replay
    forged = bytearray(tx.protect(_raw_rtp(rng, 2)))
    forged[-12] ^= 1  # a payload bit: the tag no longer matches
    assert ingress.take(bytes(forged)) and ingress.drops == {"srtp": 2}
    for _ in range(300):  # noise with this SSRC and payload type: refused by libsrtp, counted
        noise = bytearray(rng.integers(0, 256, int(rng.integers(12, 1500)), dtype=np.uint8).tobytes())
        noise[0] = 0x80 | (noise[0] & 0x3F)
        noise[1], noise[8:12] = INGRESS_PT, struct.pack("!I", INGRESS_SSRC)
        assert ingress.take(bytes(noise))
    assert ingress.drops["srtp"] == 302 and len(got) == 1 and ingress.packets == 1
    # not this ingress's: STUN, DTLS, RTCP, another SSRC or payload type, a runt
    other_ssrc = bytearray(tx.protect(_raw_rtp(rng, 3)))
    other_ssrc[8] ^= 0xFF
    rtcp = bytes([0x81, 200]) + bytes(26)
    for data in (b"\0\1" + bytes(18), bytes([22, 254, 253]) + bytes(10), rtcp, bytes(other_ssrc),
                 bytes([0x80, 0x78]) + bytes(20), b"\x80\x6f"):
        assert not ingress.take(data)
    session["now"] = None  # not connected: aiortc's path (which drops it)
    assert not ingress.take(tx.protect(_raw_rtp(rng, 4)))
    # a new DTLS session (new keys): its own srtp_t from the next packet on
    tx2, rx2 = _srtp()
    session["now"] = rx2
    assert ingress.take(tx2.protect(_raw_rtp(rng, 5))) and len(got) == 2
    with pytest.raises(TypeError):
        ingress.take(bytearray(good))  # datagrams are bytes
    assert sum(ingress.drops.values()) == 302


def _opus_packets(n: int) -> list[bytes]:
    t = np.arange(n * 960) / 48_000
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    (packets,) = OpusCodec(1, 48_000, 20, 32_000).encode([0], pcm[None, :])
    return packets


def test_opus_ingest_chunks_in_order() -> None:
    packets = _opus_packets(20)
    ing = OpusIngest("s")
    chunks = [c for i, p in enumerate(packets) for c in ing.packet(i, p)]
    assert len(chunks) == 10  # two 20 ms packets per 40 ms chunk
    assert all(pcm.shape == (CHUNK_SAMPLES,) and pcm.dtype == np.float32 for pcm, _, _ in chunks)
    assert [ts for _, ts, _ in chunks] == [k * CHUNK_48K for k in range(10)]
    assert all(at > 0 for _, _, at in chunks)  # when each chunk was complete
    assert float(np.abs(chunks[-1][0]).max()) > 0.1  # audio, not silence
    assert not ing.drops and ing.concealed == 0


def test_opus_ingest_conceals_gaps_and_counts_drops() -> None:
    packets = _opus_packets(12)
    ing = OpusIngest("s")
    out = []
    for seq in (65533, 65534, 65535, 2, 3):  # a wrap, with seq 0 and 1 lost
        out += ing.packet(seq, packets[seq % 12])
    assert ing.concealed == 2
    assert len(out) == 3  # 7 packets' worth of 20 ms (5 received, 2 concealed) -> 3 chunks
    out += ing.packet(1, packets[1])  # arrives after 3, its place concealed: reordered
    out += ing.packet(3, packets[3])  # duplicate
    out += ing.packet(65530, packets[0])  # older than anything here: late
    assert ing.drops[IngestDrop.REORDERED.value] == 1
    assert ing.drops[IngestDrop.LATE.value] == 2
    ing.packet(4, b"\xff\xff\xff")  # not an Opus packet libopus accepts
    assert ing.drops[IngestDrop.MALFORMED.value] == 1
    ing.packet(400, packets[0])  # a long gap: not concealed, the timeline goes on
    assert ing.drops[IngestDrop.RESYNC.value] == 1 and ing.concealed == 2
    decoded = ing.packets
    ing.close()  # the publisher left: a packet still on its way is not decoded (no freed decoder)
    assert ing.packet(401, packets[1]) == [] and ing.packets == decoded


def test_bridge_reports_reordered_publisher_packets() -> None:
    from aiortc.rtp import RtpPacket

    from cluster.bench.bridge import EmulatedCodec
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    packets = _opus_packets(6)
    media = MediaBridge(BridgeCore(EmulatedCodec()), max_streams=2)
    media.add_publisher("s", "u", None).opus_pt = 111
    for seq in (0, 1, 3, 2, 4):  # 2 arrives after 3: its place was concealed
        media.forward("s", RtpPacket(payload_type=111, sequence_number=seq, timestamp=960 * seq,
                                     payload=packets[seq]))
    assert media.stats()["ingest_drops"] == {IngestDrop.REORDERED.value: 1}
    assert len(media.core) == 1 and media.core.stream("s").pending == 2  # 5 x 20 ms: two chunks


def test_a_replaced_publishers_packets_do_not_reach_the_new_one() -> None:
    """The native receive's sink (`MediaBridge.payload_sink`) forwards only while its publisher
    holds the stream: the old connection of a replaced publisher may still deliver packets."""
    import asyncio

    from cluster.bench.bridge import EmulatedCodec
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    packets = _opus_packets(4)
    media = MediaBridge(BridgeCore(EmulatedCodec()), max_streams=2)
    old = media.add_publisher("s", "u", None)
    old.opus_pt = 111
    sink = media.payload_sink(old, 111)
    sink(0, 0, packets[0])
    assert old.ingest.packets == 1
    asyncio.run(media.end_session(old.session_id))
    new = media.add_publisher("s", "u", None)
    new.opus_pt = 111
    sink(1, 960, packets[1])  # the old connection's packet, still on its way
    assert new.ingest.packets == 0 and old.ingest.packets == 1
    media.payload_sink(new, 111)(0, 0, packets[2])
    assert new.ingest.packets == 1
