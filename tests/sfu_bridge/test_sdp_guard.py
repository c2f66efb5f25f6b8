"""sdp_guard: real offers pass (and aiortc parses them); each broken line is named and refused."""

from __future__ import annotations

import pytest
from aiortc.sdp import SessionDescription

from sfu_bridge.sdp_guard import SdpRejected, check_offer

FP256 = ":".join(["AB"] * 32)
AIORTC_OFFER = (
    "v=0\r\no=- 4005010870 4005010870 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "a=msid-semantic:WMS *\r\nm=audio 39030 UDP/TLS/RTP/SAVPF 96 9 0 8 120\r\n"
    "c=IN IP4 192.0.2.2\r\na=sendonly\r\na=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
    "a=extmap:2 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\na=extmap:10 urn:auralink:aic-hint:1\r\n"
    "a=mid:0\r\na=msid:def23e96-671e-4c03-b3c5-ba8dfae9a6e9 9e3c6a1d-bb62-473b-b4a8-e1880b780742\r\n"
    "a=rtcp:9 IN IP4 0.0.0.0\r\na=rtcp-mux\r\na=ssrc:2778491419 cname:e306cba3-f62c-42e4-8d74-df04646568f6\r\n"
    "a=rtpmap:96 opus/48000/2\r\na=rtpmap:9 G722/8000\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\na=rtpmap:120 AIC/48000\r\n"
    "a=candidate:f957a2332b1715da3b0ef8ba684454eb 1 udp 2130706431 192.0.2.2 39030 typ host\r\n"
    "a=candidate:d0bcf3d9c29a2bc887618212a1623bfa 1 udp 2130706431 fd00::2 47644 typ host\r\n"
    "a=end-of-candidates\r\na=ice-ufrag:ytya\r\na=ice-pwd:SE2NaMoA31kxqO3SCbVSNR\r\n"
    f"a=fingerprint:sha-256 {FP256}\r\na=setup:actpass\r\n"
)
# Shaped like Chromium's audio-only WHIP offer (mDNS candidate, RED, transport-cc, DTMF).
CHROMIUM_OFFER = (
    "v=0\r\no=- 5039474385923429312 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=group:BUNDLE 0\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS stream\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\nc=IN IP4 0.0.0.0\r\n"
    "a=rtcp:9 IN IP4 0.0.0.0\r\n"
    "a=candidate:3442447574 1 udp 2122260223 1f4712db-ea17-4bcf-a596-105139dfd8bf.local 54400 typ host generation 0 network-id 1\r\n"
    "a=candidate:2865299386 1 tcp 1518280447 1f4712db-ea17-4bcf-a596-105139dfd8bf.local 9 typ host tcptype active generation 0\r\n"
    "a=ice-ufrag:yxYb\r\na=ice-pwd:05iMxO9GujD2fUWXSoi0ByNd\r\na=ice-options:trickle\r\n"
    f"a=fingerprint:sha-256 {FP256}\r\na=setup:actpass\r\na=mid:0\r\n"
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n"
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=sendonly\r\na=msid:stream track\r\n"
    "a=rtcp-mux\r\na=rtcp-rsize\r\na=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 transport-cc\r\n"
    "a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\n"
    "a=rtpmap:9 G722/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:13 CN/8000\r\na=rtpmap:110 telephone-event/48000\r\na=rtpmap:126 telephone-event/8000\r\n"
    "a=ssrc:3570614608 cname:4TOk42mSjXCkVIa6\r\na=ssrc:3570614608 msid:stream track\r\n"
)
# Shaped like Firefox's (directional extmap, braces in ids, int fmtp parameters).
FIREFOX_OFFER = (
    "v=0\r\no=mozilla...THIS_IS_SDPARTA-99.0 7110029596208446329 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    f"a=fingerprint:sha-256 {FP256}\r\na=group:BUNDLE 0\r\na=ice-options:trickle\r\n"
    "a=msid-semantic:WMS *\r\nm=audio 9 UDP/TLS/RTP/SAVPF 109 9 0 8 101\r\nc=IN IP4 0.0.0.0\r\n"
    "a=sendrecv\r\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"
    "a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level\r\n"
    "a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
    "a=fmtp:109 maxplaybackrate=48000;stereo=1;useinbandfec=1\r\na=fmtp:101 0-15\r\n"
    "a=ice-pwd:7d8e1c5b0f3a2e4d6c8b9a0f1e2d3c4b\r\na=ice-ufrag:3c9d7e1f\r\na=mid:0\r\n"
    "a=msid:{5d0e7a9c-1f2b-4c3d-8e9f-0a1b2c3d4e5f} {6e1f8b0d-2a3c-4d5e-9f0a-1b2c3d4e5f60}\r\n"
    "a=rtcp-mux\r\na=rtpmap:109 opus/48000/2\r\na=rtpmap:9 G722/8000/1\r\n"
    "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000/1\r\n"
    "a=setup:actpass\r\na=ssrc:2655508255 cname:{7f2a9c1e-3b4d-5e6f-a0b1-c2d3e4f5a6b7}\r\n"
)
# Shaped like GStreamer webrtcbin's (upper-case encoding, libnice candidates, LF endings).
GSTREAMER_OFFER = (
    "v=0\no=- 1884431577426093297 0 IN IP4 0.0.0.0\ns=-\nt=0 0\na=ice-options:trickle\n"
    "a=group:BUNDLE audio0\nm=audio 9 UDP/TLS/RTP/SAVPF 96\nc=IN IP4 0.0.0.0\n"
    "a=setup:actpass\na=ice-ufrag:jH4sS0mBvUYVkUbQ4g4N1T4HQEYkUyYQ\n"
    "a=ice-pwd:zF2Nc3s1DCCMnSIMpPCHCmSTtkqAzEdh\na=rtcp-mux\na=rtcp-rsize\na=sendonly\n"
    "a=rtpmap:96 OPUS/48000/2\na=rtcp-fb:96 nack\na=rtcp-fb:96 nack pli\n"
    "a=fmtp:96 sprop-maxcapturerate=48000;sprop-stereo=0\n"
    "a=ssrc:1257428383 msid:user3460473546@host-4ba6a5e8 webrtctransceiver0\n"
    "a=ssrc:1257428383 cname:user3460473546@host-4ba6a5e8\na=mid:audio0\n"
    f"a=fingerprint:sha-256 {FP256}\n"
    "a=candidate:1 1 UDP 2015363327 127.0.0.1 45001 typ host\n"
    "a=candidate:2 1 TCP 1015021823 127.0.0.1 9 typ host tcptype active\n"
)


@pytest.mark.parametrize("offer", [AIORTC_OFFER, CHROMIUM_OFFER, FIREFOX_OFFER, GSTREAMER_OFFER],
                         ids=["aiortc", "chromium", "firefox", "gstreamer"])
def test_real_offers_pass_and_aiortc_parses_them(offer):
    check_offer(offer)
    desc = SessionDescription.parse(offer)
    assert desc.media[0].kind == "audio" and desc.media[0].rtp.codecs


def _swap(old: str, new: str, offer: str = AIORTC_OFFER) -> str:
    assert old in offer
    return offer.replace(old, new, 1)


# (broken offer, message fragment); the first three gave HTTP 500 before the guard
BROKEN = [
    (_swap("m=audio 39030 UDP/TLS/RTP/SAVPF 96 9 0 8 120", "m=audio x"), "line 7: m-line is not"),
    (_swap("SAVPF 96 9", "SAVPF 200 9"), "payload type 200 is outside 0-127"),
    (_swap("a=rtpmap:96", "a=fmtp:99 minptime=10\r\na=rtpmap:96"), "payload type 99 is not listed"),
    (_swap("SAVPF 96 9", "SAVPF 96 99 9").replace("a=rtpmap:96", "a=fmtp:99 a=1\r\na=rtpmap:96"),
     "a=fmtp for payload type 99, which has no a=rtpmap"),
    (_swap("SAVPF 96 9", "SAVPF 96 74 9"), "payload type 74 collides with RTCP"),
    (_swap("SAVPF 96 9", "SAVPF 96 96 9"), "payload type 96 is listed twice"),
    (_swap("m=audio 39030", "m=audio 70000"), "port 70000 is outside 0-65535"),
    (_swap("m=audio 39030", "m=audio \u0663\u0663"), "m-line is not"),
    (_swap("opus/48000/2", "opus/\u0664\u0668000/2"), "clock rate '\u0664\u0668000' is not a decimal"),
    (_swap("a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/48000/2\r\na=rtpmap:96 opus/48000/2"),
     "a=rtpmap for payload type 96 appears twice"),
    (_swap("opus/48000/2", "opus/1_000/2"), "clock rate '1_000' is not a decimal number"),
    (_swap("opus/48000/2", "opus/9999999"), "clock rate 9999999 is outside"),
    (_swap("opus/48000/2", "opus/" + "9" * 4000), "is not a decimal number"),
    (_swap("opus/48000/2", "opus"), "a=rtpmap is not"),
    (_swap("a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/48000/2\r\na=fmtp:96 minptime=ten"),
     "a=fmtp parameter minptime 'ten' is not a decimal number"),
    (_swap("a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/48000/2\r\na=rtcp-fb:96"), "a=rtcp-fb is not"),
    (_swap("a=extmap:1 urn", "a=extmap:0 urn"), "a=extmap id 0 is outside 1-255"),
    (_swap("a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid", "a=extmap:1 urn:x attr"),
     "no extension attributes"),
    (_swap("a=setup:actpass", "a=setup:holdconn"), "a=setup:holdconn is not"),
    (_swap("a=setup:actpass", "a=setup"), "a=setup needs a value"),
    (_swap("a=ice-ufrag:ytya", "a=ice-ufrag:y\u00e9ya"), "a=ice-ufrag must be"),
    (_swap("a=ice-pwd:SE2NaMoA31kxqO3SCbVSNR", "a=ice-pwd:short"), "a=ice-pwd must be"),
    (_swap("a=fingerprint:sha-256 EE", "a=fingerprint:sha-256 ZZ", AIORTC_OFFER.replace(FP256, "EE:" + FP256[3:])),
     "a=fingerprint is not"),
    (_swap("a=mid:0", "a=mid:" + "m" * 17), "a=mid must be a token"),
    (_swap("a=ssrc:2778491419", "a=ssrc:4294967296"), "a=ssrc id 4294967296 is outside"),
    (_swap("a=ssrc:2778491419 cname:e306", "a=ssrc:2778491419 cnamee306"), "a=ssrc is not"),
    (_swap("192.0.2.2 39030 typ host", "192.0.2.2 39030 host"), "a=candidate is not"),
    (_swap("192.0.2.2 39030 typ host", "example.com 39030 typ host"), "neither an IP address nor"),
    (_swap("192.0.2.2 39030 typ host", "192.0.2.2 99999 typ host"), "candidate port 99999"),
    (_swap("192.0.2.2 39030 typ host", "192.0.2.2 39030 typ bogus"), "candidate type 'bogus'"),
    (_swap("1 udp 2130706431 192.0.2.2", "1 sctp 2130706431 192.0.2.2"), "candidate transport 'sctp'"),
    (_swap("c=IN IP4 192.0.2.2", "c=IN IP5 192.0.2.2"), "c= is not"),
    (_swap("a=rtcp:9 IN", "a=rtcp:x IN"), "a=rtcp port 'x'"),
    (_swap("a=sendonly", "a=send\x00only"), "control character U+0000"),
    (_swap("a=sendonly", "a=send\u2028only"), "control character U+2028"),
    (_swap("a=sendonly", "a=send\ronly"), "a bare CR inside a line"),
    (_swap("a=sendonly", "sendonly"), "not '<type letter>=<value>'"),
    (_swap("a=sendonly", "a=" + "x" * 5000), "longer than 4096"),
    (_swap("s=-", "v=0"), "only its first line is v="),
    ("v=1\r\n", "starts with 'v=0'"),
    ("\r\n\r\n", "empty SDP"),
    (AIORTC_OFFER + "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n" * 16, "more than 16 m-sections"),
    (_swap("a=sendonly\r\n", ""), "line 7: the m-section has no a=sendrecv"),  # found by the fuzzer
    (_swap("SAVPF 96 9 0 8 120", "SAVPF " + " ".join(str(i) for i in range(65))), "at most 64"),
]


@pytest.mark.parametrize("offer,message", BROKEN, ids=[m for _, m in BROKEN])
def test_broken_lines_are_named(offer, message):
    with pytest.raises(SdpRejected) as info:
        check_offer(offer)
    assert message in str(info.value)
    assert str(info.value).startswith(("line ", "control character", "empty SDP"))


def test_rejection_is_a_value_error():
    assert issubclass(SdpRejected, ValueError)


def test_lenient_where_aiortc_is():
    """Blank lines, LF-only endings, unknown attributes and non-RTP m-lines are fine."""
    check_offer(AIORTC_OFFER.replace("\r\n", "\n"))
    check_offer(AIORTC_OFFER + "\r\n\r\n")
    check_offer(_swap("a=sendonly", "a=sendonly\r\na=x-vendor-thing:\u00e9t\u00e9 42"))
    check_offer(AIORTC_OFFER + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n")
