"""The bridge's fast per-packet path: RTP writing equals aiortc's serializer byte for byte,
and the inline Opus ingest yields the codec's 40 ms 24 kHz chunks, concealing gaps and
counting late or malformed packets."""

from __future__ import annotations

import os

import numpy as np
import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import RtpPacket
from pylibsrtp import Policy, Session

from deployments.contract import CHUNK_SAMPLES
from models.opus import OpusCodec
from sfu_bridge import rtp_ext
from sfu_bridge.aiortc_compat import FastSrtp
from sfu_bridge.fastpath import CHUNK_48K, IngestDrop, OpusIngest, RtpWriter


def _ext_map() -> rtp_ext.AicHeaderExtensionsMap:
    rtp_ext.install()
    m = rtp_ext.AicHeaderExtensionsMap()
    m.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=4, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
    ]))
    return m


def _srtp() -> tuple[Session, Session]:
    key = os.urandom(30)
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
