"""WHIP/WHEP session lifecycle: connect deadline, silent peers, replace, caps, ownership, logs."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from sfu_bridge.sessions import (
    EndReason,
    Refusal,
    SessionKind,
    SessionLimits,
    SessionRefused,
    SessionRegistry,
)

# ---- the books, on a fake clock -----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_overdue_counts_from_the_answer_and_spares_connected_sessions():
    clock = FakeClock()
    reg = SessionRegistry(SessionLimits(connect_timeout_s=30.0), clock=clock)
    reg.open("a", SessionKind.PUBLISHER, "s1", "alice", "tok-a")
    reg.open("b", SessionKind.SUBSCRIBER, "s1", "bob", "tok-b")
    reg.open("c", SessionKind.SUBSCRIBER, "s1", "carol", "tok-c")  # still negotiating
    reg.answered("a")
    reg.answered("b")
    clock.t += 29.0
    reg.connected("b")
    assert reg.overdue() == []
    clock.t += 1.0
    assert reg.overdue() == ["a"]  # c has no answer yet: negotiation time is not the peer's
    assert reg.close("a", EndReason.CONNECT_TIMEOUT) is not None
    assert reg.close("a", EndReason.CONNECT_TIMEOUT) is None  # counted once
    assert reg.stats()["ended"]["connect_timeout"] == 1
    assert reg.discard("c") is not None and reg.stats()["ended"]["connect_timeout"] == 1


def test_caps_per_stream_and_per_token_are_counted():
    reg = SessionRegistry(SessionLimits(max_subscribers_per_stream=3, max_subscribers_per_token=2))
    for i, tok in enumerate(["t1", "t1", "t2"]):
        reg.admit_subscriber("s1", tok)
        reg.open(f"x{i}", SessionKind.SUBSCRIBER, "s1", "u", tok)
    with pytest.raises(SessionRefused) as info:
        reg.admit_subscriber("s2", "t1")
    assert info.value.status == 429 and info.value.reason is Refusal.TOKEN_CAP
    with pytest.raises(SessionRefused) as info:
        reg.admit_subscriber("s1", "t3")
    assert info.value.status == 503 and "maximum of 3 subscribers" in str(info.value)
    reg.admit_subscriber("s2", "t3")  # another stream, another token: fine
    # what a fleet reads: the stream's subscribers here (negotiating ones too) and its cap
    assert (reg.subscribers("s1"), reg.stream_full("s1"), reg.subscribers("s2"), reg.stream_full("s2")) == (
        3, True, 0, False)
    assert reg.full_streams() == ["s1"]
    assert reg.stats()["refused"] == {"stream_cap": 1, "token_cap": 1, "worker_full": 0, "stream_taken": 0}
    unlimited = SessionRegistry(SessionLimits(max_subscribers_per_stream=0, max_subscribers_per_token=0))
    for i in range(50):
        unlimited.admit_subscriber("s1", "t1")
        unlimited.open(str(i), SessionKind.SUBSCRIBER, "s1", "u", "t1")
    assert not unlimited.stream_full("s1") and unlimited.full_streams() == []


def test_books_hold_a_digest_not_the_token():
    reg = SessionRegistry()
    rec = reg.open("a", SessionKind.SUBSCRIBER, "s1", "alice", "al1.secret-bearer.sig")
    assert "secret-bearer" not in repr(rec) and len(rec.token_key) == 32


# ---- a running bridge ---------------------------------------------------------------------


def no_ice_config() -> RTCConfiguration:
    return RTCConfiguration(iceServers=[])  # host candidates only: nothing leaves the machine


async def offer_pc(direction: str) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(no_ice_config())
    pc.addTransceiver("audio", direction=direction)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}


async def post(http, url: str, token: str, sdp: str) -> tuple[int, str, Any]:
    async with http.post(url, data=sdp, headers=headers(token)) as r:
        return r.status, await r.text(), r.headers


async def ghost(http, base: str, kind: str, stream: str, token: str) -> tuple[int, str, Any]:
    """POST an offer from a peer that is gone before the answer: it never does ICE."""
    pc, sdp = await offer_pc("sendonly" if kind == "whip" else "recvonly")
    await pc.close()
    return await post(http, f"{base}/{kind}/{stream}", token, sdp)


async def until(predicate, timeout_s: float, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def bridge(running_bridge, replica_core):
    """bridge(body, **config): runs `body(http, base, server)` against a fresh bridge."""

    def run(body, **config):
        async def go():
            async with running_bridge(replica_core(), **config) as (server, base):
                async with aiohttp.ClientSession() as http:
                    return await body(http, base, server)

        return asyncio.run(go())

    return run


def test_sessions_that_never_connect_are_reaped_and_free_their_slot(bridge, tokens):
    token = tokens.issue("alice", "*", ["publish", "subscribe"])

    async def body(http, base, server):
        assert (await ghost(http, base, "whip", "r1", token))[0] == 201
        assert (await ghost(http, base, "whep", "r1", token))[0] == 201
        assert (await ghost(http, base, "whip", "r2", token))[0] == 201
        status, text, _ = await ghost(http, base, "whip", "r3", token)
        assert status == 503 and "full" in text  # two ghosts hold the worker's two slots
        await until(lambda: not server.media.sessions, 6.0, "ghost sessions closed")
        assert len(server.media._free_slots) == 2 and not server.media.publishers
        async with http.get(f"{base}/health") as r:
            stats = (await r.json())["sessions"]
        assert stats["ended"]["connect_timeout"] == 3
        assert stats["refused"]["worker_full"] == 1
        assert stats["open"] == {"publisher": 0, "subscriber": 0}
        assert (await ghost(http, base, "whip", "r3", token))[0] == 201  # the slot is back

    bridge(body, max_streams=2, connect_timeout_s=1.0)


def _silence(pc: RTCPeerConnection) -> None:
    """The peer vanishes without a word (a crash, a pulled cable): its sockets just close."""
    for t in pc.getTransceivers():
        for proto in t.receiver.transport.transport._connection._protocols:
            proto.transport.close()


def test_a_peer_that_goes_silent_is_reaped_on_consent_expiry(bridge, tokens, monkeypatch):
    import aioice.ice

    # RFC 7675 consent checks every 5 s, six misses: shortened so the test takes seconds
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)
    token = tokens.issue("alice", "r1", ["publish"])

    async def body(http, base, server):
        pc, sdp = await offer_pc("sendonly")
        status, answer, _ = await post(http, f"{base}/whip/r1", token, sdp)
        assert status == 201, answer
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await until(lambda: any(r.connected for r in server.sessions.records.values()), 10.0,
                    "publisher connected")
        _silence(pc)
        await until(lambda: not server.media.publishers, 15.0, "silent publisher closed")
        assert server.sessions.ended[EndReason.PEER_GONE] == 1
        assert server.sessions.ended[EndReason.CONNECT_TIMEOUT] == 0
        await pc.close()

    bridge(body, connect_timeout_s=30.0)


def test_same_user_replaces_a_stale_publisher_at_once(bridge, tokens, caplog):
    first = tokens.issue("alice", "r1", ["publish"])
    second = tokens.issue("alice", "r1", ["publish"])  # a restarted client's fresh token
    other = tokens.issue("bob", "r1", ["publish"])
    operator = tokens.issue("ops", "*", ["operator", "publish"])
    viewer = tokens.issue("carol", "r1", ["subscribe"])
    caplog.set_level(logging.INFO, logger="sfu_bridge.server")

    async def body(http, base, server):
        s1, _, h1 = await ghost(http, base, "whip", "r1", first)
        assert s1 == 201 and "Auralink-Replaced" not in h1
        assert (await ghost(http, base, "whep", "r1", viewer))[0] == 201
        s2, _, h2 = await ghost(http, base, "whip", "r1", second)
        assert s2 == 201 and h2["Auralink-Replaced"] == "publisher"
        assert h2["Location"] != h1["Location"]
        async with http.delete(base + h1["Location"], headers=headers(first)) as r:
            assert r.status == 404  # the replaced session is gone
        s3, text, _ = await ghost(http, base, "whip", "r1", other)
        assert s3 == 409 and "another user" in text
        s4, _, h4 = await ghost(http, base, "whip", "r1", operator)
        assert s4 == 201 and h4["Auralink-Replaced"] == "publisher"
        assert list(server.media.publishers) == ["r1"] and len(server.media.sessions) == 2
        assert len(server.media.subscribers["r1"]) == 1  # the viewer stays through replacements
        assert server.sessions.ended[EndReason.REPLACED] == 2
        assert server.sessions.refused[Refusal.STREAM_TAKEN] == 1

    bridge(body)
    assert "publisher replaced stream=r1" in caplog.text


def test_subscriber_caps_per_stream_and_per_token(bridge, tokens):
    pub = tokens.issue("alice", "r1", ["publish"])
    carol = tokens.issue("carol", "r1", ["subscribe"])
    dave = tokens.issue("dave", "r1", ["subscribe"])
    erin = tokens.issue("erin", "r1", ["subscribe"])

    async def body(http, base, server):
        assert (await ghost(http, base, "whip", "r1", pub))[0] == 201
        locations = []
        for _ in range(2):
            status, _, h = await ghost(http, base, "whep", "r1", carol)
            assert status == 201
            locations.append(h["Location"])
        status, text, _ = await ghost(http, base, "whep", "r1", carol)
        assert status == 429 and "already holds 2 subscriber sessions" in text
        assert (await ghost(http, base, "whep", "r1", dave))[0] == 201
        status, text, _ = await ghost(http, base, "whep", "r1", erin)
        assert status == 503 and "maximum of 3 subscribers" in text
        async with http.delete(base + locations[0], headers=headers(carol)) as r:
            assert r.status == 200
        assert (await ghost(http, base, "whep", "r1", carol))[0] == 201  # room again
        async with http.get(f"{base}/health") as r:
            stats = (await r.json())["sessions"]
        assert stats["refused"]["token_cap"] == 1 and stats["refused"]["stream_cap"] == 1
        assert stats["open"]["subscriber"] == 3

    bridge(body, max_subscribers_per_stream=3, max_subscribers_per_token=2)


def test_only_the_owner_or_an_operator_ends_a_session(bridge, tokens):
    alice = tokens.issue("alice", "r1", ["publish"])
    alice_again = tokens.issue("alice", "r1", ["publish"])
    bob_pub = tokens.issue("bob", "r1", ["publish"])
    carol = tokens.issue("carol", "r1", ["subscribe"])
    dave = tokens.issue("dave", "r1", ["subscribe"])
    operator = tokens.issue("ops", "*", ["operator"])

    async def body(http, base, server):
        _, _, hp = await ghost(http, base, "whip", "r1", alice)
        _, _, hs = await ghost(http, base, "whep", "r1", carol)
        _, _, hs2 = await ghost(http, base, "whep", "r1", carol)

        async def delete(location, token):
            async with http.delete(base + location, headers=headers(token)) as r:
                return r.status, await r.text()

        status, text = await delete(hp["Location"], bob_pub)
        assert status == 403 and "belongs to another user" in text
        status, _ = await delete(hs["Location"], dave)
        assert status == 403
        status, text = await delete(hs["Location"], alice)  # a publish token: wrong scope
        assert status == 403 and "lacks the 'subscribe' scope" in text
        assert len(server.media.sessions) == 3  # nothing ended so far
        assert (await delete(hs["Location"], carol))[0] == 200
        assert (await delete(hs2["Location"], operator))[0] == 200
        assert (await delete(hp["Location"], alice_again))[0] == 200  # same user, other token
        assert server.media.sessions == {} and server.sessions.ended[EndReason.DELETED] == 3

    bridge(body)


def test_access_log_never_holds_a_full_session_url(bridge, tokens, caplog):
    token = tokens.issue("alice", "r1", ["publish"])
    caplog.set_level(logging.DEBUG)

    async def body(http, base, server):
        status, _, h = await ghost(http, base, "whip", "r1", token)
        assert status == 201
        location = h["Location"]
        async with http.patch(base + location, headers=headers(token)) as r:
            assert r.status == 405
        async with http.delete(base + location, headers=headers(token)) as r:
            assert r.status == 200
        return location.rsplit("/", 1)[1]

    session_id = bridge(body)
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(f"DELETE /whip/r1/{session_id[:8]}..." in line for line in access), access
    assert session_id not in caplog.text  # neither the access log nor any other log line


def test_session_paths_are_redacted_for_publishers_and_subscribers():
    from sfu_bridge.server import redact_path

    sid = "141a2a134b68431fbcc5a7d80ce13c23"
    for kind in ("whip", "whep"):
        assert redact_path(f"/{kind}/room/{sid}") == f"/{kind}/room/{sid[:8]}..."
        assert redact_path(f"/{kind}/room/{sid}?x=1") == f"/{kind}/room/{sid[:8]}...?x=1"
    assert redact_path("/whie/room/" + sid) == "/whie/room/" + sid  # not a session URL
    assert redact_path("/whep/room") == "/whep/room"
