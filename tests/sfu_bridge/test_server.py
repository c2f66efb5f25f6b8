"""WHIP/WHEP signaling: status codes and messages for good and bad requests."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from sfu_bridge.ice import peer_connection


async def aiortc_offer(direction: str = "sendonly") -> tuple[RTCPeerConnection, str]:
    pc = peer_connection()
    pc.addTransceiver("audio", direction=direction)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


@pytest.fixture(scope="module")
def scenario(running_bridge, tokens, streaming_codec, replica_core):
    """Runs `body(http, base, server)` against a fresh bridge."""

    def run(body):
        async def go():
            async with running_bridge(replica_core(), max_body_bytes=16_384) as (
                server, base,
            ):
                async with aiohttp.ClientSession() as http:
                    return await body(http, base, server)

        return asyncio.run(go())

    return run


def auth(token: str, ctype: str = "application/sdp") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": ctype}


def test_whip_publish_and_delete(scenario, tokens):
    token = tokens.issue("alice", "room1", ["publish"])
    other_user = tokens.issue("bob", "room1", ["publish"])

    async def body(http, base, server):
        pc, offer = await aiortc_offer()
        async with http.post(f"{base}/whip/room1", data=offer, headers=auth(token)) as r:
            assert r.status == 201, await r.text()
            assert r.content_type == "application/sdp"
            location = r.headers["Location"]
            answer = await r.text()
        assert location.startswith("/whip/room1/")
        assert answer.startswith("v=0") and "a=recvonly" in answer
        assert "room1" in server.media.publishers
        async with http.post(f"{base}/whip/room1", data=offer, headers=auth(other_user)) as r:
            assert r.status == 409 and "already has a publisher" in await r.text()
        async with http.patch(base + location, headers=auth(token)) as r:
            assert r.status == 405
        async with http.delete(base + location, headers=auth(token)) as r:
            assert r.status == 200
        async with http.delete(base + location, headers=auth(token)) as r:
            assert r.status == 404 and "no such session" in await r.text()
        assert "room1" not in server.media.publishers
        await pc.close()

    scenario(body)


@pytest.mark.parametrize(
    "case,status,message",
    [
        ("missing", 401, "missing Authorization"),
        ("not-bearer", 401, "not 'Bearer <token>'"),
        ("forged", 401, "signature does not verify"),
        ("expired", 401, "expired"),
        ("wrong-scope", 403, "lacks the 'publish' scope"),
        ("wrong-stream", 403, "another stream"),
    ],
)
def test_whip_token_errors(scenario, tokens, case, status, message):
    good = tokens.issue("alice", "room1", ["publish"])
    headers = {
        "missing": {"Content-Type": "application/sdp"},
        "not-bearer": {"Authorization": "Basic abc", "Content-Type": "application/sdp"},
        "forged": auth(good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")),
        "expired": auth(tokens.issue("alice", "room1", ["publish"], ttl_s=1, now=1_000)),
        "wrong-scope": auth(tokens.issue("alice", "room1", ["subscribe"])),
        "wrong-stream": auth(tokens.issue("alice", "room2", ["publish"])),
    }[case]

    async def body(http, base, server):
        async with http.post(f"{base}/whip/room1", data="v=0\r\n", headers=headers) as r:
            text = await r.text()
            assert r.status == status, text
            assert message in text
            if status == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert server.http_errors[status] >= 1

    scenario(body)


def test_whip_bad_requests(scenario, tokens):
    token = tokens.issue("alice", "*", ["publish", "subscribe"])

    async def body(http, base, server):
        async def post(path, data, ctype="application/sdp"):
            async with http.post(base + path, data=data, headers=auth(token, ctype)) as r:
                return r.status, await r.text()

        _, offer = await aiortc_offer()
        assert await post("/whip/room1", offer, "text/plain") == (
            415, "Content-Type must be application/sdp\n"
        )
        status, text = await post("/whip/room1", b"\xff\xfe garbage")
        assert status == 400 and "malformed SDP: body is not UTF-8" in text
        status, text = await post("/whip/room1", "hello, I am not SDP")
        assert status == 400 and "starts with 'v=0'" in text
        status, text = await post("/whip/room1", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
        assert status == 400 and "no audio m-line" in text
        no_ice = "\r\n".join(ln for ln in offer.split("\r\n") if not ln.startswith("a=ice-ufrag"))
        status, text = await post("/whip/room1", no_ice)
        assert status == 400 and "ICE credentials" in text
        status, text = await post("/whip/room1", "v=0\r\n" + "a=x\r\n" * 10_000)
        assert status == 413 and "exceeds 16384 bytes" in text
        status, text = await post("/whip/bad%20id!", offer)
        assert status == 400 and "bad stream id" in text
        status, text = await post("/whep/nobody-here", offer)
        assert status == 404 and "no publisher" in text
        async with http.delete(f"{base}/whip/room1/0123abcd", headers=auth(token)) as r:
            assert r.status == 404
        async with http.options(f"{base}/whip/room1") as r:
            assert r.status == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]
        async with http.get(f"{base}/health") as r:
            health = await r.json()
        assert health["status"] == "ok" and health["http_errors"]["400"] >= 4
        assert server.media.publishers == {}  # nothing half-created by the bad requests

    scenario(body)


def test_whep_answers_aic_only_to_offers_that_list_it(scenario, tokens):
    from aiortc import RTCRtpSender

    pub_token = tokens.issue("alice", "room1", ["publish"])
    sub_token = tokens.issue("bob", "room1", ["subscribe"])

    async def body(http, base, server):
        pub, offer = await aiortc_offer()
        async with http.post(f"{base}/whip/room1", data=offer, headers=auth(pub_token)) as r:
            assert r.status == 201
        answers = {}
        for aic in (True, False):
            pc = peer_connection()
            t = pc.addTransceiver("audio", direction="recvonly")
            if not aic:
                caps = RTCRtpSender.getCapabilities("audio").codecs
                t.setCodecPreferences([c for c in caps if c.mimeType.lower() == "audio/opus"])
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(
                f"{base}/whep/room1", data=pc.localDescription.sdp, headers=auth(sub_token)
            ) as r:
                assert r.status == 201, await r.text()
                assert r.headers["Location"].startswith("/whep/room1/")
                answers[aic] = await r.text()
            await pc.close()
        await pub.close()
        subs = list(server.media.subscribers["room1"].values())
        assert sorted(s.aic for s in subs) == [False, True]
        return answers

    answers = scenario(body)
    assert "AIC/48000" in answers[True] and "a=sendonly" in answers[True]
    assert "AIC/48000" not in answers[False] and "opus/48000" in answers[False]


def _offer_with(offer: str, old: str, new: str) -> str:
    assert old in offer, old
    return offer.replace(old, new)


# Each of these answered 500 (an aiortc assert, a payload type out of the 7-bit range, an
# a=fmtp for a payload type without a=rtpmap) before the SDP guard.
BAD_SDP = {
    "m-line port": (lambda o: _offer_with(o, o.split("m=audio", 1)[1].split("\r\n", 1)[0], " x"),
                    "m-line is not"),
    "payload type 200": (lambda o: o.replace(" 96 ", " 200 ").replace("a=rtpmap:96 ", "a=rtpmap:200 "),
                         "payload type 200 is outside 0-127"),
    "fmtp unknown pt": (lambda o: _offer_with(o, "a=rtpmap:96 ", "a=fmtp:99 a=1\r\na=rtpmap:96 "),
                        "a=fmtp payload type 99 is not listed"),
}


@pytest.mark.parametrize("kind", ["whip", "whep"])
@pytest.mark.parametrize("case", list(BAD_SDP))
def test_bad_sdp_is_400_never_500(scenario, tokens, kind, case):
    token = tokens.issue("alice", "*", ["publish", "subscribe"])
    mutate, message = BAD_SDP[case]

    async def body(http, base, server):
        pc, offer = await aiortc_offer("sendonly" if kind == "whip" else "recvonly")
        await pc.close()
        assert " 96 " in offer  # aiortc's Opus payload type, which the mutations rely on
        async with http.post(f"{base}/{kind}/room1", data=mutate(offer), headers=auth(token)) as r:
            text = await r.text()
        assert r.status == 400, text
        assert text.startswith("malformed SDP: line ") and message in text
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
        assert server.media.sessions == {} and server.sessions.records == {}

    scenario(body)


@pytest.mark.parametrize("method", ["post", "delete"])
def test_token_with_non_ascii_bytes_is_401(scenario, tokens, method):
    good = tokens.issue("alice", "room1", ["publish"])
    claims = good.split(".")[1]
    hostile = f"al1.{claims[:5]}\u00e9\u00ff{claims[5:]}.abc"

    async def body(http, base, server):
        _, offer = await aiortc_offer()
        url = f"{base}/whip/room1" + ("/0123abcd" if method == "delete" else "")
        async with http.request(method.upper(), url, data=offer, headers=auth(hostile)) as r:
            text = await r.text()
        assert r.status == 401, text
        assert "malformed token" in text

    scenario(body)


def test_client_leaving_mid_body_is_a_counted_400_not_a_crash(scenario, tokens, caplog):
    token = tokens.issue("alice", "room1", ["publish"])
    caplog.set_level(logging.ERROR, logger="aiohttp.server")

    async def body(http, base, server):
        host, port = base.rsplit("/", 1)[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /whip/room1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 500\r\n\r\nv=0\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the server now waits for the rest of the body
        writer.close()
        for _ in range(100):
            if server.http_errors.get(400):
                break
            await asyncio.sleep(0.05)
        assert server.http_errors.get(400) == 1

    scenario(body)
    assert not [r for r in caplog.records if r.name == "aiohttp.server"], caplog.text
