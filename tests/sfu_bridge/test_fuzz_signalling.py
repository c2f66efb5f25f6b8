"""Hypothesis fuzzing of the whole WHIP/WHEP signalling path on a running bridge.

Mutated SDP bodies (structure-aware: real offers with lines deleted, duplicated, swapped,
replaced by generated m-/rtpmap/fmtp/extmap/candidate/... lines with hostile values, then
truncated or salted with unicode and raw bytes) and mutated requests (Content-Type,
Authorization with odd bytes, Content-Length and Transfer-Encoding games) go to a live
server over plain sockets. Whatever they are, the answer is never 5xx and the server keeps
answering. Generated candidates only name loopback addresses, so ICE never leaves the machine.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sfu_bridge.test_sdp_guard import CHROMIUM_OFFER, FIREFOX_OFFER, GSTREAMER_OFFER

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HOST = "127.0.0.1"


# ---- the bridge under test, on its own event loop ------------------------------------------


@pytest.fixture(scope="module")
def live(running_bridge, replica_core, tokens):
    """A bridge served from a thread; a publisher of `fuzz-sub` so WHEP offers get negotiated."""
    state: dict = {}
    ready = threading.Event()

    async def serve() -> None:
        async with running_bridge(replica_core(), connect_timeout_s=600.0,
                                  max_body_bytes=16_384) as (server, base):
            state.update(server=server, port=int(base.rsplit(":", 1)[1]),
                         loop=asyncio.get_running_loop(), stop=asyncio.Event())
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(60), "bridge did not start"
    state["pub"] = tokens.issue("fuzzer", "fuzz-pub", ["publish"])
    state["sub"] = tokens.issue("fuzzer", "fuzz-sub", ["subscribe"])
    state["offers"] = _base_offers()
    owner = tokens.issue("owner", "fuzz-sub", ["publish"])
    status, _ = request(state["port"], "POST", "/whip/fuzz-sub", state["offers"]["whip"][0], owner)
    assert status == 201
    yield state
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(60)


def _base_offers() -> dict[str, list[bytes]]:
    """Real offers per endpoint: a WHEP offer must receive audio."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    async def aiortc_offer() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return pc.localDescription.sdp

    # loopback candidates only: an mDNS name would be resolved on the LAN
    chromium = CHROMIUM_OFFER.replace("1f4712db-ea17-4bcf-a596-105139dfd8bf.local", "127.0.0.1")
    offers = [asyncio.run(aiortc_offer()), chromium, FIREFOX_OFFER, GSTREAMER_OFFER]
    return {
        "whip": [o.encode() for o in offers],
        "whep": [o.replace("a=sendonly", "a=recvonly").encode() for o in offers],
    }


def request(port: int, method: str, path: str, body: bytes | None = None, token: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    h = {"Content-Type": "application/sdp"} if body is not None else {}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout_s: float) -> int | None:
    """Send raw bytes, return the first response's status (None: no answer within the
    timeout, or the connection closed). No half-close: aiohttp drops half-closed requests."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as s:
        buf = b""
        try:
            s.sendall(data)
            while b"\r\n" not in buf and len(buf) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except (TimeoutError, ConnectionError):
            return None
    if not buf.startswith(b"HTTP/1."):
        return None
    return int(buf.split(b" ", 2)[1])


def assert_still_serving(live) -> None:
    status, _ = request(live["port"], "GET", "/health")
    assert status == 200


@pytest.fixture
def no_server_errors(caplog):
    """No handler may crash: aiohttp logs each crash it answers with a 500."""
    caplog.set_level(logging.ERROR, logger="aiohttp.server")
    yield
    crashes = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.ERROR]
    assert not crashes, crashes[0].getMessage()


# ---- SDP mutations -------------------------------------------------------------------------

ODD_VALUES = [
    "", " ", "-1", "0", "1", "72", "127", "128", "255", "256", "65535", "65536", "4294967296",
    "99999999999999999999999", "1_0", "0x10", "1e3", "+5", "\u0663", "NaN", "*", "%s", "\x00",
    "\u2028", "\u00ff", "\U0001f3a7", "a" * 300, "9" * 5000, "IN IP4", "/", ":", ";", "=",
]
odd = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12),
)
small_int = st.one_of(st.integers(0, 130).map(str), odd)
LOOPBACK = ["127.0.0.1", "::1", "not-an-ip", "999.1.1.1", ""]

sdp_line = st.one_of(
    st.builds(lambda k, p, pr, f: f"m={k} {p} {pr} {' '.join(f)}",
              st.sampled_from(["audio", "video", "application", "x"]), small_int,
              st.sampled_from(["UDP/TLS/RTP/SAVPF", "RTP/AVP", "UDP/DTLS/SCTP", "x"]),
              st.lists(small_int, max_size=6)),
    st.builds(lambda pt, n, c, ch: f"a=rtpmap:{pt} {n}/{c}{ch}", small_int,
              st.sampled_from(["opus", "AIC", "PCMU", "telephone-event", "red", "rtx"]) | odd,
              small_int, st.sampled_from(["", "/2", "/0", "/x"]) | odd.map(lambda v: "/" + v)),
    st.builds(lambda pt, kv: f"a=fmtp:{pt} {';'.join(kv)}", small_int,
              st.lists(st.builds(lambda k, v: f"{k}={v}",
                                 st.sampled_from(["minptime", "apt", "useinbandfec", "stereo",
                                                  "maxplaybackrate", "max-fr", "profile-level-id",
                                                  "x"]), small_int), max_size=4)),
    st.builds(lambda pt, t: f"a=rtcp-fb:{pt} {t}", small_int | st.just("*"),
              st.sampled_from(["nack", "nack pli", "transport-cc", ""]) | odd),
    st.builds(lambda i, d, u: f"a=extmap:{i}{d} {u}", small_int, st.sampled_from(["", "/sendonly", "/x"]),
              st.sampled_from(["urn:ietf:params:rtp-hdrext:sdes:mid", "urn:auralink:aic-hint:1"]) | odd),
    st.builds(lambda f, c, t, pr, a, p, ty: f"a=candidate:{f} {c} {t} {pr} {a} {p} typ {ty}",
              odd, small_int, st.sampled_from(["udp", "tcp", "x"]), small_int,
              st.sampled_from(LOOPBACK), small_int, st.sampled_from(["host", "relay", "x"])),
    st.builds(lambda k, v: f"a={k}:{v}",
              st.sampled_from(["setup", "mid", "ice-ufrag", "ice-pwd", "fingerprint", "group",
                               "msid", "rtcp", "ssrc", "ssrc-group", "sctp-port",
                               "max-message-size", "msid-semantic", "ice-options", "sctpmap"]), odd),
    st.builds(lambda k: f"a={k}", st.sampled_from(["sendrecv", "recvonly", "sendonly", "inactive",
                                                   "rtcp-mux", "end-of-candidates", "setup", "rtpmap",
                                                   "fmtp", "candidate", "ssrc"])),
    st.builds(lambda v: f"c=IN IP4 {v}", odd),
    st.builds(lambda t, v: f"{t}={v}", st.sampled_from(list("vostcbmak")), odd),
    st.text(max_size=40),
)


@st.composite
def mutated_offer(draw, offers: list[bytes]) -> bytes:
    lines = draw(st.sampled_from(offers)).decode().replace("\r\n", "\n").split("\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert", "token"]))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "replace":
            lines[i] = draw(sdp_line)
        elif op == "insert":
            lines.insert(i, draw(sdp_line))
        elif op == "token":
            parts = lines[i].split(" ")
            k = draw(st.integers(0, len(parts) - 1))
            head, sep, tail = parts[k].rpartition(":")
            parts[k] = head + sep + draw(odd) if sep and draw(st.booleans()) else draw(odd)
            lines[i] = " ".join(parts)
    text = draw(st.sampled_from(["\r\n", "\n"])).join(lines)
    if draw(st.integers(0, 9)) < 3:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=20)) + text[at:]
    data = text.encode("utf-8", "surrogatepass")
    tail = draw(st.sampled_from(["none", "none", "none", "truncate", "bytes", "random"]))
    if tail == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif tail == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    elif tail == "random":
        data = draw(st.binary(max_size=300))
    return data


@pytest.fixture(scope="module")
def offers(live) -> dict[str, list[bytes]]:
    return live["offers"]


def _post_offer(live, kind: str, body: bytes) -> int:
    stream, token = ("fuzz-pub", live["pub"]) if kind == "whip" else ("fuzz-sub", live["sub"])
    status, resp = request(live["port"], "POST", f"/{kind}/{stream}", body, token)
    if status == 201:  # end it: sessions must not pile up across examples
        location = resp.getheader("Location")
        assert request(live["port"], "DELETE", location, token=token)[0] == 200
    return status


def test_base_offers_are_accepted(live, offers, no_server_errors):
    """The mutations start from offers the bridge accepts (else the fuzz only tests 400s)."""
    for kind in ("whip", "whep"):
        for body in offers[kind]:
            assert _post_offer(live, kind, body) == 201, body[:80]


def test_mutated_sdp_never_5xx(live, offers, no_server_errors):
    seen: dict[int, int] = {}

    @settings(max_examples=500, **SETTINGS)
    @given(st.sampled_from(["whip", "whep"]).flatmap(
        lambda kind: st.tuples(st.just(kind), mutated_offer(offers[kind]))))
    def run(case: tuple[str, bytes]) -> None:
        kind, body = case
        status = _post_offer(live, kind, body)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, body[:2000])
        assert_still_serving(live)

    run()
    assert set(seen) <= {201, 400, 413}, seen
    assert seen.get(400, 0) > 0 and seen.get(201, 0) > 0  # both paths were exercised
    assert live["server"].media.sessions.keys() == {
        p.session_id for p in live["server"].media.publishers.values()
    }  # every created subscriber was deleted, the fuzz-sub publisher remains


# ---- header mutations ----------------------------------------------------------------------

header_value = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=30).map(lambda t: t.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")),
)


@st.composite
def mutated_request(draw, token: str, offer: bytes) -> tuple[bytes, bool]:
    """(request bytes, complete): an incomplete one leaves the server waiting for its body."""
    body = offer if draw(st.booleans()) else draw(mutated_offer([offer]))
    path = draw(st.sampled_from([b"/whip/fuzz-pub", b"/whep/fuzz-sub", b"/whip/fuzz-pub/0123abcd",
                                 b"/whip/%FF%00", b"/whip/" + b"a" * 300, b"/health"]))
    method = draw(st.sampled_from([b"POST", b"POST", b"DELETE", b"PATCH", b"OPTIONS", b"PUT"]))
    headers: list[tuple[bytes, bytes]] = []
    ctype = draw(st.sampled_from([b"application/sdp", b"application/sdp; charset=utf-8",
                                  b"APPLICATION/SDP", b"text/plain", None]) | header_value)
    if ctype is not None:
        headers.append((b"Content-Type", ctype))
    good = f"Bearer {token}".encode()
    auth = draw(st.sampled_from([good, good.lower(), b"Bearer", b"Basic abc", b"Bearer  " + token.encode(),
                                 good[:-3] + b"\xc3\xa9\xff", good.replace(b".", b"\xe9", 1),
                                 good.replace(b"al1.", b"al1.\xc3\xa9", 1),
                                 b"Bearer " + b"A" * 10_000, None])
                | header_value.map(lambda v: b"Bearer " + v))
    if auth is not None:
        headers.append((b"Authorization", auth))
    length = draw(st.sampled_from(["exact", "omit", "short", "long", "negative", "text", "huge",
                                   "twice", "chunked", "chunked+length", "bad-chunked"]))
    if length == "exact":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif length == "short":
        headers.append((b"Content-Length", str(draw(st.integers(0, len(body)))).encode()))
    elif length == "long":
        headers.append((b"Content-Length", str(len(body) + draw(st.integers(1, 100))).encode()))
    elif length == "negative":
        headers.append((b"Content-Length", b"-1"))
    elif length == "text":
        headers.append((b"Content-Length", b"12abc"))
    elif length == "huge":
        headers.append((b"Content-Length", b"99999999999999999999999"))
    elif length == "twice":
        headers += [(b"Content-Length", str(len(body)).encode()), (b"Content-Length", b"3")]
    elif length in ("chunked", "chunked+length"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        if length == "chunked+length":
            headers.append((b"Content-Length", str(len(body)).encode()))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif length == "bad-chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"zz\r\n" + body
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, HOST.encode())
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + body, length != "long"


def test_mutated_requests_never_5xx(live, offers, no_server_errors):
    seen: dict[int | None, int] = {}

    @settings(max_examples=500, **SETTINGS)
    @given(data=st.data())
    def run(data) -> None:
        raw, complete = data.draw(mutated_request(live["pub"], offers["whip"][0]))
        # a body shorter than its Content-Length: the client gives up and closes
        status = raw_exchange(live["port"], raw, timeout_s=30.0 if complete else 0.3)
        if not complete:
            assert status is None or status < 500
        seen[status] = seen.get(status, 0) + 1
        assert status is None or status < 500, (status, raw[:600])
        assert_still_serving(live)

    run()
    assert any(s is not None and 400 <= s < 500 for s in seen), seen
    # a publish that got through was replaced by the next one: never more than one publisher
    assert len(live["server"].media.publishers) <= 2
