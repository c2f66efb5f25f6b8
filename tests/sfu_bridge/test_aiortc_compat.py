"""Smoke test of every aiortc/aioice internal the bridge touches (sfu_bridge/aiortc_compat.py),
on a real loopback connection: an aiortc upgrade that moves one of them fails here, by name."""

from __future__ import annotations

import asyncio

import aiortc
import pytest

from sfu_bridge import aiortc_compat, rtp_ext
from sfu_bridge.hint_ext import HINT_URI
from sfu_bridge.ice import peer_connection
from sfu_bridge.sdk import wait_connected


def test_version_check_names_the_supported_versions():
    assert aiortc_compat.check_version() == aiortc.__version__ == "1.16.0"
    with pytest.raises(aiortc_compat.AiortcVersionError, match="aiortc 1.17.0 is not supported"):
        aiortc_compat.check_version("1.17.0")


def test_installing_twice_changes_nothing():
    from aiortc import rtcrtpreceiver
    from aiortc.codecs import CODECS, HEADER_EXTENSIONS

    rtp_ext.install()
    decoder = rtcrtpreceiver.get_decoder
    rtp_ext.install()
    assert rtcrtpreceiver.get_decoder is decoder
    assert sum(rtp_ext.is_aic(c) for c in CODECS["audio"]) == 1
    assert sum(e.uri == HINT_URI for e in HEADER_EXTENSIONS["audio"]) == 1


def _run(coro, loop_kind: str):
    """asyncio's own loop, or uvloop's (the loop Ray runs the cluster's bridge workers on)."""
    if loop_kind == "asyncio":
        return asyncio.run(coro)
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_every_accessor_on_a_live_connection(loop_kind: str):
    async def go():
        a, b = peer_connection(), peer_connection()
        try:  # closed whatever fails: a live connection left open keeps the process alive
            return await on(a, b)
        finally:
            await a.close()
            await b.close()

    async def on(a, b):
        ta = a.addTransceiver("audio", direction="sendonly")
        tb = b.addTransceiver("audio", direction="recvonly")
        await b.setLocalDescription(await b.createOffer())
        await a.setRemoteDescription(b.localDescription)
        await a.setLocalDescription(await a.createAnswer())
        await b.setRemoteDescription(a.localDescription)
        answer = a.localDescription.sdp
        seen: asyncio.Queue = asyncio.Queue()
        aiortc_compat.tap_receiver(tb.receiver, lambda pkt: seen.put_nowait(pkt) or True)
        pli = asyncio.Event()
        aiortc_compat.on_keyframe_request(ta, pli.set)
        await wait_connected(a)
        await wait_connected(b)

        ssrc = aiortc_compat.sender_ssrc(ta)
        codecs = aiortc_compat.negotiated_codecs(ta)
        exts = aiortc_compat.negotiated_header_extensions(ta)
        protocols = aiortc_compat.ice_datagram_protocols(a)
        ext_map = aiortc_compat.receive_extensions_map(tb)

        from aiortc.rtp import RtpPacket

        aic_pt = next(c.payloadType for c in codecs if rtp_ext.is_aic(c))
        pkt = RtpPacket(payload_type=aic_pt, sequence_number=1, timestamp=0, ssrc=ssrc, payload=b"x")
        await aiortc_compat.send_rtp(ta, pkt.serialize())
        got = await asyncio.wait_for(seen.get(), 10)
        # the fast send path: SRTP in place, the nominated pair's socket
        path = aiortc_compat.DatagramPath(ta.sender.transport)
        assert path.ready() and path.srtp is not None
        header = RtpPacket(payload_type=aic_pt, sequence_number=2, timestamp=960, ssrc=ssrc).serialize()
        path.sendto(path.srtp.protect(header, b"fast"), path.addr)
        fast = await asyncio.wait_for(seen.get(), 10)
        # the native send: the same packet by one C call on the pair's socket
        assert path.native is not None
        n = aiortc_compat.native_send(path.native, header, aic_pt, 3, 1920, b"native")
        native = await asyncio.wait_for(seen.get(), 10)
        assert n > len(header) + len(b"native")  # the SRTP packet's length, tag included
        # a metered socket (media.UdpMeter wraps sendto) keeps the Python path: the meter
        # sees every datagram
        from sfu_bridge.media import UdpMeter

        if loop_kind == "asyncio":  # uvloop's transports cannot be wrapped
            UdpMeter().attach(a)
            metered = aiortc_compat.DatagramPath(ta.sender.transport)
            assert metered.ready() and metered.native is None
        # the native receive: this SSRC's AIC packets unprotected and parsed by one C call in
        # front of the receiving side's sockets, hints to the map's sink, aiortc's statistics
        # counted; anything else still reaches aiortc's path (the tap)
        received, hints = [], []
        ingress = aiortc_compat.fast_ingress(tb.receiver, ssrc, aic_pt,
                                             lambda *a: received.append(a),
                                             hint_id=ext_map.hint_id, hint_sink=hints.append)
        stats = tb.receiver._RTCRtpReceiver__remote_streams[ssrc]
        counted = stats.packets_received
        send_map = rtp_ext.AicHeaderExtensionsMap()
        send_map.configure(aiortc.RTCRtpParameters(headerExtensions=exts))
        for seq in (4, 5):
            hinted = RtpPacket(payload_type=aic_pt, sequence_number=seq, timestamp=960 * seq, ssrc=ssrc,
                               payload=b"in%d" % seq)
            hinted.extensions.aic_hint = b"hint%d" % seq
            await aiortc_compat.send_rtp(ta, hinted.serialize(send_map))
        opus_pt = next(c.payloadType for c in codecs if c.mimeType.lower() == "audio/opus")
        await aiortc_compat.send_rtp(ta, RtpPacket(payload_type=opus_pt, sequence_number=6, timestamp=0,
                                                   ssrc=ssrc, payload=b"opus").serialize())
        other = await asyncio.wait_for(seen.get(), 10)  # the Opus packet: aiortc's path
        natively = (list(received), list(hints), stats.packets_received - counted, ingress.packets,
                    dict(ingress.drops))
        if loop_kind == "asyncio":  # a metered receiving side keeps aiortc's path
            UdpMeter().attach(b)
            assert aiortc_compat.fast_ingress(tb.receiver, ssrc, aic_pt, print) is None
        await aiortc_compat.send_pli(tb.receiver, ssrc)
        await asyncio.wait_for(pli.wait(), 10)
        assert seen.empty()  # nothing else reached the tap
        return answer, ssrc, codecs, exts, protocols, ext_map, got, fast, native, natively, other

    answer, ssrc, codecs, exts, protocols, ext_map, got, fast, native, natively, other = _run(go(), loop_kind)
    assert f"a=ssrc:{ssrc} " in answer  # the SSRC the sender announced
    assert {c.mimeType.lower() for c in codecs} >= {"audio/opus", "audio/aic"}
    assert any(e.uri == HINT_URI for e in exts)
    assert protocols and all(hasattr(p, "datagram_received") and hasattr(p.transport, "sendto")
                             for p in protocols)
    assert isinstance(ext_map, rtp_ext.AicHeaderExtensionsMap)
    assert (got.ssrc, got.payload) == (ssrc, b"x")  # tapped before the jitter buffer
    assert (fast.ssrc, fast.sequence_number, fast.payload) == (ssrc, 2, b"fast")
    assert (native.ssrc, native.sequence_number, native.timestamp, native.payload) == (ssrc, 3, 1920, b"native")
    assert natively == ([(4, 3840, b"in4"), (5, 4800, b"in5")], [b"hint4", b"hint5"], 3, 2, {})
    assert (other.sequence_number, other.payload) == (6, b"opus")
