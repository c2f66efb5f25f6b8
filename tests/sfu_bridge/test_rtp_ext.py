"""aiortc glue: the hint extension and AIC payload type are negotiated, and bytes round-trip."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import rtp
from aiortc.codecs import CODECS, HEADER_EXTENSIONS
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

from sfu_bridge import rtp_ext
from sfu_bridge.hint_ext import HINT_URI
from sfu_bridge.ice import peer_connection
from sfu_bridge.media import RtpOut
from sfu_bridge.sdk import wait_connected

HINT = bytes(range(0xA0, 0xB0))  # 16 bytes, like a signed hint element


def test_install_is_idempotent_and_extends_the_closed_lists():
    rtp_ext.install()
    rtp_ext.install()
    assert [e.uri for e in HEADER_EXTENSIONS["audio"]].count(HINT_URI) == 1
    assert sum(rtp_ext.is_aic(c) for c in CODECS["audio"]) == 1
    assert CODECS["audio"][0].mimeType.lower() == "audio/opus"  # plain senders still pick Opus
    assert rtp.HeaderExtensionsMap is rtp_ext.AicHeaderExtensionsMap


def _map(ext_id: int = 7) -> rtp_ext.AicHeaderExtensionsMap:
    m = rtp_ext.AicHeaderExtensionsMap()
    m.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        RTCRtpHeaderExtensionParameters(id=ext_id, uri=HINT_URI),
    ]))
    return m


@pytest.mark.parametrize("mid", [None, "0"])
def test_hint_bytes_round_trip_through_rtp_packets(mid):
    m = _map()
    seen: list[bytes] = []
    m.hint_sink = seen.append
    pkt = rtp.RtpPacket(payload_type=111, sequence_number=7, timestamp=960, ssrc=1234, payload=b"x")
    pkt.extensions.mid = mid
    pkt.extensions.aic_hint = HINT
    data = pkt.serialize(m)
    back = rtp.RtpPacket.parse(data, m)
    assert back.extensions.aic_hint == HINT and back.extensions.mid == mid
    assert back.payload == b"x" and seen == [HINT]
    # a receiver that did not negotiate the extension ignores the element
    plain = rtp_ext.AicHeaderExtensionsMap()
    assert rtp.RtpPacket.parse(data, plain).extensions.aic_hint is None


def test_no_hint_means_no_extension_bytes():
    m = _map()
    data = rtp.RtpPacket(payload_type=111, ssrc=1).serialize(m)
    assert len(data) == 12 and not data[0] & 0x10  # X bit clear


def test_truncated_extension_is_a_parse_error_not_a_crash():
    m = _map()
    pkt = rtp.RtpPacket(payload_type=111, ssrc=1, payload=b"")
    pkt.extensions.aic_hint = HINT
    data = pkt.serialize(m)
    with pytest.raises(ValueError, match="truncated"):
        rtp.RtpPacket.parse(data[:-4], m)  # aiortc's transport drops such packets


def test_sdp_negotiates_hint_uri_and_aic_payload_type():
    async def go():
        offerer, answerer = peer_connection(), peer_connection()
        offerer.addTransceiver("audio", direction="recvonly")
        answerer.addTransceiver("audio", direction="sendonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        offer = offerer.localDescription.sdp
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        answer = answerer.localDescription.sdp
        await offerer.close()
        await answerer.close()
        return offer, answer

    offer, answer = asyncio.run(go())
    for sdp in (offer, answer):
        assert f"a=extmap:{rtp_ext.HINT_EXT_ID} {HINT_URI}" in sdp
        assert f"a=rtpmap:{rtp_ext.AIC_PAYLOAD_TYPE} AIC/48000" in sdp


def test_hint_and_aic_payload_cross_a_real_connection():
    """Sender writes Opus-PT packets with a hint and AIC-PT packets; the receiving transport's
    map hands the hint bytes to its sink, and AIC frames reach the track undecoded."""

    async def go():
        a, b = peer_connection(), peer_connection()
        ta = a.addTransceiver("audio", direction="sendonly")
        tb = b.addTransceiver("audio", direction="recvonly")
        got_track: asyncio.Future = asyncio.get_running_loop().create_future()
        b.on("track", lambda t: got_track.set_result(t))
        await b.setLocalDescription(await b.createOffer())
        await a.setRemoteDescription(b.localDescription)
        await a.setLocalDescription(await a.createAnswer())
        await b.setRemoteDescription(a.localDescription)
        hints: list[bytes] = []
        rtp_ext.hint_map(tb).hint_sink = hints.append
        await wait_connected(a)
        await wait_connected(b)
        out = RtpOut(ta)
        assert out.aic_pt is not None and out.opus_pt is not None
        for i in range(8):
            await out.send(out.aic_pt, b"AIC" + bytes([i]), i * 1920, hint=HINT)
        track = await asyncio.wait_for(got_track, 10)
        frame = await asyncio.wait_for(track.recv(), 10)
        await a.close()
        await b.close()
        return hints, frame

    hints, frame = asyncio.run(go())
    assert hints and all(h == HINT for h in hints)
    assert isinstance(frame, rtp_ext.AicFrame) and frame.data.startswith(b"AIC")
