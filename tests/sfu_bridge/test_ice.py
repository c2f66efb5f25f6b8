"""ICE servers, public address and DTLS role of the bridge's peer connections (sfu_bridge/ice.py),
and what WHIP/WHEP clients see of them: Link headers, answers, CORS."""

from __future__ import annotations

import argparse
import asyncio
import socket

import aiohttp
import pytest

from sfu_bridge import ice
from sfu_bridge.ice import IceServer
from sfu_bridge.sdk import wait_connected

# ---- pure functions -----------------------------------------------------------------------

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=setup:actpass\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=setup:active\r\n"
)
ANSWER = (
    "v=0\r\no=- 2 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=audio 50000 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 10.0.0.5\r\na=mid:0\r\n"
    "a=candidate:a1 1 udp 2130706431 10.0.0.5 50000 typ host\r\n"
    "a=candidate:a2 1 udp 2130706431 172.17.0.1 50001 typ host\r\n"
    "a=candidate:a3 1 udp 2130706431 fd00::5 50002 typ host\r\n"
    "a=candidate:a4 1 udp 1694498815 198.51.100.9 61000 typ srflx raddr 10.0.0.5 rport 50000\r\n"
    "a=candidate:a5 1 udp 2130706431 f1e2d3c4.local 50003 typ host\r\n"
    "a=end-of-candidates\r\na=setup:active\r\n"
    "m=audio 50000 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 10.0.0.5\r\na=mid:1\r\na=setup:passive\r\n"
)


def test_prefer_dtls_server_answers_passive_only_where_the_offer_let_us_choose():
    out = ice.prefer_dtls_server(ANSWER, OFFER)
    sections = out.split("m=audio")
    assert "a=setup:passive" in sections[1] and "a=setup:active" not in sections[1]
    assert "a=setup:passive" in sections[2]  # the peer chose active: we stay passive
    # an offer that makes itself the DTLS server: aiortc's `active` answer stands
    passive_offer = OFFER.replace("a=setup:actpass", "a=setup:passive")
    assert "a=setup:active" in ice.prefer_dtls_server(ANSWER, passive_offer).split("m=audio")[1]
    # session-level actpass applies to m-sections without their own a=setup
    session_level = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=setup:actpass\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=setup:active\r\n"
    )
    assert "a=setup:passive" in ice.prefer_dtls_server(ANSWER, session_level).split("m=audio")[1]
    # nothing else changes
    assert out.replace("a=setup:passive", "a=setup:active", 1) == ANSWER


def test_announce_address_rewrites_host_candidates_of_its_family():
    out = ice.announce_address(ANSWER, "203.0.113.7")
    assert "10.0.0.5 50000 typ host" not in out and "172.17.0.1" not in out.split("typ srflx")[0]
    assert "a=candidate:a1 1 udp 2130706431 203.0.113.7 50000 typ host" in out
    assert "a=candidate:a2 1 udp 2130706431 203.0.113.7 50001 typ host" in out
    assert "fd00::5 50002 typ host" in out  # IPv6 host: another family, kept
    assert "198.51.100.9 61000 typ srflx raddr 10.0.0.5 rport 50000" in out  # not a host candidate
    assert "f1e2d3c4.local 50003 typ host" in out  # mDNS name, not an address
    assert out.count("c=IN IP4 203.0.113.7") == 2
    v6 = ice.announce_address(ANSWER, "2001:db8::7")
    assert "2001:db8::7 50002 typ host" in v6 and "10.0.0.5 50000 typ host" in v6
    with pytest.raises(ValueError, match="literal IPv4/IPv6 address"):
        ice.announce_address(ANSWER, "bridge.example.com")


def test_link_headers_follow_rfc9725_section_4_6():
    servers = (
        IceServer(("stun:stun.example.net:3478",)),
        IceServer(("turn:turn.example.net?transport=udp", "turns:turn.example.net:5349"),
                  username="user", credential='pa"ss\\word'),
    )
    assert ice.link_headers(servers) == [
        '<stun:stun.example.net:3478>; rel="ice-server"',
        '<turn:turn.example.net?transport=udp>; rel="ice-server"; username="user"; '
        'credential="pa\\"ss\\\\word"',
        '<turns:turn.example.net:5349>; rel="ice-server"; username="user"; '
        'credential="pa\\"ss\\\\word"',
    ]
    assert ice.link_headers(()) == []


@pytest.mark.parametrize(
    "text,message",
    [
        ("http://stun.example.net", "malformed uri: invalid scheme"),
        ("stun:stun.example.net:3478?transport=udp", "must not contain transport"),
        ("turn:turn.example.net", "needs a username and a credential"),
        ("stun:a>b", "not allowed"),
        ('[{"urls": ["stun:a:1"], "username": "x\\r\\nSet-Cookie: y"}]', "control characters"),
        ('[{"url": "stun:a:1"}]', 'each entry needs "urls"'),
        ("[not json", "is not valid JSON"),
    ],
)
def test_bad_ice_server_settings_are_refused_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        ice.parse_ice_servers(text)


def test_ice_servers_from_env_and_cli(monkeypatch):
    from sfu_bridge.config import BridgeConfig
    from sfu_bridge.server import add_arguments, ice_overrides

    assert ice.parse_ice_servers("stun:a.example:3478, stun:b.example:3479") == (
        IceServer(("stun:a.example:3478",)), IceServer(("stun:b.example:3479",)),
    )
    monkeypatch.setenv(
        "AURALINK_ICE_SERVERS",
        '[{"urls": "turn:t.example:3478", "username": "u", "credential": "c"}]',
    )
    monkeypatch.setenv("AURALINK_PUBLIC_IP", "203.0.113.7")
    cfg = BridgeConfig.from_env()
    assert cfg.ice_servers == (IceServer(("turn:t.example:3478",), "u", "c"),)
    assert cfg.public_ip == "203.0.113.7"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--ice-server", "stun:s1.example:3478", "--ice-server", "stun:s2.example", "--public-ip", "198.51.100.1"]
    )
    cfg = BridgeConfig.from_env(**ice_overrides(args))
    assert cfg.ice_servers == (IceServer(("stun:s1.example:3478",)), IceServer(("stun:s2.example",)))
    assert cfg.public_ip == "198.51.100.1"
    # without flags, the environment's servers stand
    assert BridgeConfig.from_env(**ice_overrides(parser.parse_args([]))).ice_servers[0].username == "u"
    with pytest.raises(SystemExit):
        parser.parse_args(["--public-ip", "not-an-ip"])


# ---- real aiortc peer connections --------------------------------------------------------


def ice_connection(pc):
    """aioice.Connection behind a peer connection's first transceiver."""
    return pc.getTransceivers()[0].receiver.transport.transport.iceGatherer._connection


def test_peer_connection_without_servers_gathers_host_candidates_only():
    async def go():
        pc = ice.peer_connection()
        pc.addTransceiver("audio", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        conn = ice_connection(pc)
        try:
            return conn.stun_server, conn.turn_server, pc.localDescription.sdp
        finally:
            await pc.close()

    stun, turn, sdp = asyncio.run(go())
    assert stun is None and turn is None
    candidates = [ln for ln in sdp.splitlines() if ln.startswith("a=candidate:")]
    assert candidates and all(" typ host" in ln for ln in candidates), candidates


@pytest.fixture(scope="module")
def bridge(running_bridge, streaming_codec, replica_core):
    """bridge(body, **config): runs `body(http, base, server)` against a fresh bridge."""

    def run(body, **config):
        async def go():
            async with running_bridge(replica_core(), **config) as (server, base):
                async with aiohttp.ClientSession() as http:
                    return await body(http, base, server)

        return asyncio.run(go())

    return run


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}


def test_bridge_answers_with_host_candidates_only_and_dtls_passive(bridge, tokens):
    """No configured ICE server: the bridge's connection has no STUN/TURN server, gathers no
    server-reflexive candidate, announces no Link, answers `actpass` with `passive`, and an
    aiortc publisher still connects (DTLS client)."""
    token = tokens.issue("alice", "room1", ["publish"])

    async def body(http, base, server):
        client = ice.peer_connection()
        client.addTransceiver("audio", direction="sendonly")
        await client.setLocalDescription(await client.createOffer())
        assert "a=setup:actpass" in client.localDescription.sdp
        async with http.post(f"{base}/whip/room1", data=client.localDescription.sdp,
                             headers=auth(token)) as r:
            assert r.status == 201, await r.text()
            links = r.headers.getall("Link", [])
            answer = await r.text()
        conn = ice_connection(server.media.publishers["room1"].pc)
        from aiortc import RTCSessionDescription

        await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(client)
        await client.close()
        return links, answer, conn.stun_server, conn.turn_server

    links, answer, stun, turn = bridge(body)
    assert stun is None and turn is None
    assert links == []
    assert "typ srflx" not in answer and "typ relay" not in answer and " typ host" in answer
    assert "a=setup:passive" in answer and "a=setup:active" not in answer


class StunResponder(asyncio.DatagramProtocol):
    """A minimal STUN server on loopback (RFC 5389 Binding): proves which server is asked."""

    def __init__(self) -> None:
        self.requests = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        from aioice import stun

        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(
            message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr[:2]
        self.transport.sendto(bytes(response), addr)


def test_configured_stun_server_is_used_and_announced_in_link_headers(bridge, tokens):
    token = tokens.issue("alice", "room1", ["publish"])

    async def body(http, base, server):
        loop = asyncio.get_running_loop()
        transport, responder = await loop.create_datagram_endpoint(
            StunResponder, local_addr=("127.0.0.1", 0), family=socket.AF_INET
        )
        port = transport.get_extra_info("sockname")[1]
        server.config.ice_servers = (IceServer((f"stun:127.0.0.1:{port}",)),)
        client = ice.peer_connection()
        client.addTransceiver("audio", direction="sendonly")
        await client.setLocalDescription(await client.createOffer())
        try:
            async with http.post(f"{base}/whip/room1", data=client.localDescription.sdp,
                                 headers=auth(token)) as r:
                assert r.status == 201, await r.text()
                links = r.headers.getall("Link", [])
            conn = ice_connection(server.media.publishers["room1"].pc)
            return port, links, conn.stun_server, responder.requests
        finally:
            await client.close()
            transport.close()

    port, links, stun, requests = bridge(body)
    assert stun == ("127.0.0.1", port)
    assert requests >= 1  # the bridge asked our server, and only it
    assert links == [f'<stun:127.0.0.1:{port}>; rel="ice-server"']


def test_public_ip_replaces_host_addresses_in_the_answer(bridge, tokens):
    token = tokens.issue("alice", "room1", ["publish"])

    async def body(http, base, server):
        client = ice.peer_connection()
        client.addTransceiver("audio", direction="sendonly")
        await client.setLocalDescription(await client.createOffer())
        try:
            async with http.post(f"{base}/whip/room1", data=client.localDescription.sdp,
                                 headers=auth(token)) as r:
                assert r.status == 201, await r.text()
                return await r.text()
        finally:
            await client.close()

    answer = bridge(body, public_ip="203.0.113.7")
    hosts = [ln.split(" ")[4] for ln in answer.splitlines()
             if ln.startswith("a=candidate:") and " typ host" in ln]
    v4 = [h for h in hosts if ":" not in h and not h.endswith(".local")]
    assert v4 and set(v4) == {"203.0.113.7"}, hosts
    assert "c=IN IP4 203.0.113.7" in answer


def test_cors_preflight_allows_every_method_a_browser_sends(bridge):
    """A browser on another origin must see the 405 of PATCH (no trickle ICE), not a CORS
    error, and may read Location and Link."""

    async def body(http, base, server):
        async with http.options(
            f"{base}/whip/room1/0123abcd",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH"},
        ) as r:
            preflight = r.status, dict(r.headers)
        async with http.patch(f"{base}/whip/room1/0123abcd") as r:
            patch = r.status, dict(r.headers)
        return preflight, patch

    (status, headers), (patch_status, patch_headers) = bridge(body)
    assert status == 204
    methods = {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
    assert {"POST", "DELETE", "PATCH", "OPTIONS"} <= methods
    assert {"Location", "Link"} <= {h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert patch_status == 405 and patch_headers["Access-Control-Allow-Origin"] == "*"
