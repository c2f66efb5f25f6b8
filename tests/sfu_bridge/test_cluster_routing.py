"""Any bridge URL works, without Ray: two real bridge workers in this process, each with the
cluster routing middleware, asking one `WorkerTable` (what the registry actor holds) where a
stream lives; real WebRTC peers from the SDK publish and subscribe through either URL."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web

from sfu_bridge.cluster_routing import FORWARDED_HEADER, ClusterRouting, RedirectMode
from sfu_bridge.fleet import Route, SignalKind, WorkerReport, WorkerTable
from sfu_bridge.hint_auth import derive_stream_key
from sfu_bridge.sdk import AicPublisher, AicSubscriber, WhipError, _redirect_target
from sfu_bridge.tokens import Scope
from tests.sfu_bridge.conftest import free_port

CONFIG = dict(deadline_ms=2_000.0, max_backlog_chunks=200)


class TableRegistry:
    """The registry's routing answer over live reports of in-process workers."""

    def __init__(self) -> None:
        self.table = WorkerTable(dead_after_s=3.0)
        self.workers: dict[str, tuple[object, str]] = {}
        self.seq = 0
        self.down = False

    def refresh(self) -> None:
        self.seq += 1
        for wid, (server, url) in self.workers.items():
            self.table.report(WorkerReport(
                worker_id=wid, actor_name=wid, url=url, internal_url=url, node_ip="127.0.0.1",
                pid=0, streams={s: 1.0 for s in server.media.publishers},
                sessions=len(server.media.sessions), seq=self.seq), time.monotonic())

    def route_fn(self, asking: str):
        async def route(stream: str, kind: SignalKind) -> Route:
            if self.down:
                raise ConnectionError("registry down")
            self.refresh()
            return self.table.route(stream, kind, asking, time.monotonic())
        return route


@contextlib.asynccontextmanager
async def fleet(secret: bytes, n: int = 2, mode: RedirectMode = RedirectMode.AUTO):
    from sfu_bridge.config import BridgeConfig
    from sfu_bridge.server import build_codec, make_server

    registry = TableRegistry()
    runners, routings = [], {}
    try:
        for i in range(n):
            wid = "ab"[i]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cfg = BridgeConfig(host="127.0.0.1", port=port, bridge_id=f"w-{wid}", public_url=url, **CONFIG)
            server = make_server(cfg, build_codec("in-process", 16, 6.0), secret, hint_secret=secret)

            def authorized(header, kind, stream, server=server):
                scope = Scope.PUBLISH if kind is SignalKind.PUBLISH else Scope.SUBSCRIBE
                try:
                    server.authority.authorize_header(header, scope, stream)
                except Exception:
                    return False
                return True

            routing = ClusterRouting(wid, registry.route_fn(wid),
                                     holds=lambda s, server=server: s in server.media.publishers,
                                     authorized=authorized, mode=mode)
            routing.install(server.app)
            runner = web.AppRunner(server.app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
            registry.workers[wid] = (server, url)
            routings[wid] = routing
        yield registry, routings
    finally:
        for runner in runners:
            await runner.cleanup()


def stream_placed_on(wid: str, workers=("a", "b")) -> str:
    from deployments.affinity import owner

    return next(f"room{i}" for i in range(100) if owner(f"room{i}", list(workers)) == wid)


def test_publish_and_subscribe_through_the_other_workers_url(secret, tokens, streaming_codec):
    stream = stream_placed_on("b")

    async def go():
        async with fleet(secret) as (reg, routing):
            url_a, url_b = reg.workers["a"][1], reg.workers["b"][1]
            pub = AicPublisher(url_a, stream, tokens.issue("alice", stream, ["publish"]),
                               hint_key=derive_stream_key(secret, stream))
            await pub.start()  # a -> 307 -> b (the placement), token kept across origins
            sub = AicSubscriber(url_a, stream, tokens.issue("bob", stream, ["subscribe"]),
                                codec=streaming_codec, slot=1)
            await sub.start()  # a -> 307 -> b (the owner)
            ok = await sub.wait_frames(n_aic=5, timeout_s=60)
            out = (ok, pub.location, sub.location, sub.stats, dict(routing["a"].counters),
                   dict(routing["b"].counters), set(reg.workers["b"][0].media.publishers))
            statuses = [await sub.stop(), await pub.stop()]
        return out, statuses, url_b

    (ok, pub_loc, sub_loc, stats, ca, cb, pubs_b), statuses, url_b = asyncio.run(go())
    assert ok, stats
    assert stats.decoded_samples > 0 and stats.bad_payloads == 0
    assert pubs_b == {stream}
    # the sessions live on b, and their URLs say so: DELETE went straight there
    assert pub_loc.startswith(url_b + "/whip/") and sub_loc.startswith(url_b + "/whep/")
    assert statuses == [200, 200]
    assert ca == {"redirected": 2} and cb == {"local": 2}


def test_browser_requests_are_forwarded_and_untokened_ones_learn_nothing(secret, tokens):
    stream = stream_placed_on("b")

    async def go():
        async with fleet(secret) as (reg, routing):
            url_a, url_b = reg.workers["a"][1], reg.workers["b"][1]
            pub = AicPublisher(url_b, stream, tokens.issue("alice", stream, ["publish"]), hints=False)
            await pub.start()
            sub = AicSubscriber(url_b, stream, tokens.issue("bob", stream, ["subscribe"]))
            await sub.pc.setLocalDescription(await (_recv_offer(sub)))
            offer = sub.pc.localDescription.sdp
            async with aiohttp.ClientSession() as http:
                hdr = {"Content-Type": "application/sdp", "Origin": "https://app.example"}
                async with http.post(f"{url_a}/whep/{stream}", data=offer, allow_redirects=False,
                                     headers=hdr) as r:  # no token: a's own 401, no Location
                    no_token = (r.status, r.headers.get("Location"), dict(routing["a"].counters))
                hdr["Authorization"] = "Bearer " + tokens.issue("bob", stream, ["subscribe"])
                async with http.post(f"{url_a}/whep/{stream}", data=offer, allow_redirects=False,
                                     headers=hdr) as r:
                    forwarded = (r.status, r.headers.get("Location"), r.headers.get("Content-Type"),
                                 r.headers.get("Access-Control-Allow-Origin"), await r.text())
                    delete_status = None
                async with http.delete(forwarded[1], headers={"Authorization": hdr["Authorization"]}) as d:
                    delete_status = d.status
                hdr.pop("Origin")
                hdr[FORWARDED_HEADER] = "a"  # already forwarded: handled where it arrives
                async with http.post(f"{url_a}/whep/{stream}", data=offer, allow_redirects=False,
                                     headers=hdr) as r:
                    marked = r.status
            await sub.pc.close()
            await pub.stop()
        return no_token, forwarded, delete_status, marked, dict(routing["a"].counters), url_b

    no_token, forwarded, delete_status, marked, counters, url_b = asyncio.run(go())
    assert no_token[0] == 401 and no_token[1] is None and no_token[2] == {"local": 1}
    status, location, ctype, acao, answer = forwarded
    assert status == 201 and location.startswith(url_b + "/whep/") and acao == "*"
    assert ctype.startswith("application/sdp") and answer.startswith("v=0")
    assert delete_status == 200
    assert marked == 404  # a holds no publisher of it: the local handler's answer
    assert counters["forwarded"] == 1


async def _recv_offer(sub: AicSubscriber):
    sub.pc.addTransceiver("audio", direction="recvonly")
    return await sub.pc.createOffer()


def test_drained_fleet_refuses_new_streams_with_retry_after(secret, tokens):
    async def go():
        async with fleet(secret) as (reg, routing):
            url_a = reg.workers["a"][1]
            reg.refresh()
            for wid in ("a", "b"):
                reg.table.set_draining(wid, True, time.monotonic())
            pub = AicPublisher(url_a, "late", tokens.issue("alice", "late", ["publish"]), hints=False)
            with pytest.raises(WhipError) as err:
                await pub.start()
            await pub.pc.close()
            async with aiohttp.ClientSession() as http:
                tok = tokens.issue("alice", "late", ["publish"])
                async with http.post(f"{url_a}/whip/late", data=b"v=0\r\n", headers={
                        "Authorization": f"Bearer {tok}", "Content-Type": "application/sdp"}) as r:
                    retry_after = r.headers.get("Retry-After")
            # registry unreachable: a draining worker still refuses new streams by itself
            reg.down = True
            routing["a"].draining = True
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url_a}/whip/late", data=b"v=0\r\n", headers={
                        "Authorization": f"Bearer {tok}", "Content-Type": "application/sdp"}) as r:
                    alone = r.status
            routing["a"].draining = False
            async with aiohttp.ClientSession() as http:  # not draining: it serves the request itself
                async with http.post(f"{url_a}/whip/late", data=b"v=0\r\n", headers={
                        "Authorization": f"Bearer {tok}", "Content-Type": "application/sdp"}) as r:
                    served = r.status
        return err.value.status, retry_after, alone, served, dict(routing["a"].counters)

    status, retry_after, alone, served, counters = asyncio.run(go())
    assert status == 503 and retry_after == "2"
    assert alone == 503 and served == 400  # 400: the local handler read the (bad) offer
    assert counters["refused/no_worker"] == 2 and counters["registry_unavailable"] == 2
    assert counters["refused/draining"] == 1


def test_redirect_targets_keep_the_token_only_where_allowed():
    assert _redirect_target("http://a:1/whip/s", "http://b:2/whip/s", None) == "http://b:2/whip/s"
    assert _redirect_target("https://a/whip/s", "/whip/s?x=1", None) == "https://a/whip/s?x=1"
    with pytest.raises(WhipError, match="https to http"):
        _redirect_target("https://a/whip/s", "http://b/whip/s", None)
    with pytest.raises(WhipError, match="untrusted host"):
        _redirect_target("http://a:1/whip/s", "http://evil:2/whip/s", {"a", "b"})
    with pytest.raises(WhipError, match="non-HTTP"):
        _redirect_target("http://a:1/whip/s", "ftp://b/whip/s", None)


def serve_offers(routing: ClusterRouting, steps: list, log: list) -> list[int]:
    """The routing middleware alone in front of a stand-in offer handler (201; it appends
    ("handler", stream) to `log`): POSTs each path of `steps` (or (path, headers); a callable
    among them runs in its turn) and returns the statuses."""
    from aiohttp.test_utils import TestClient, TestServer

    async def offer(request):
        log.append(("handler", request.match_info["stream"]))
        return web.Response(status=201)

    async def go():
        app = web.Application()
        app.router.add_post("/whep/{stream}", offer)
        app.router.add_post("/whip/{stream}", offer)
        routing.install(app)
        statuses = []
        async with TestClient(TestServer(app)) as client:
            for step in steps:
                if callable(step):
                    step()
                else:
                    path, headers = step if isinstance(step, tuple) else (step, {})
                    statuses.append((await client.post(path, headers=headers, allow_redirects=False)).status)
        return statuses

    return asyncio.run(go())


def test_cascading_hooks_follow_before_serving_and_let_go_when_published_here():
    """The routing middleware alone (a stand-in handler answers the offer): a subscriber the
    registry cascades here makes the worker follow the stream at the owner's relay first
    (503 when it cannot); a publisher placed here for a stream it follows makes it let go."""
    from sfu_bridge.fleet import RouteKind, RouteReason

    calls: list[tuple] = []
    room = {"ok": True}

    async def route(stream, kind):
        if kind is SignalKind.SUBSCRIBE:
            return Route(RouteKind.LOCAL, RouteReason.CASCADE, "b", relay_addr=("10.0.0.7", 7000))
        return Route(RouteKind.LOCAL, RouteReason.PLACED, "b")

    def follow(stream, addr):
        calls.append(("follow", stream, addr))
        return room["ok"]

    async def unfollow(stream):
        calls.append(("unfollow", stream))

    routing = ClusterRouting("b", route, holds=lambda s: False, authorized=lambda h, k, s: True,
                             follows=lambda s: s == "followed", follow=follow, unfollow=unfollow)
    statuses = serve_offers(routing, ["/whep/big", lambda: room.update(ok=False), "/whep/other",
                                      "/whep/followed",  # served, no asking
                                      "/whip/followed"], calls)
    assert statuses == [201, 503, 201, 201]
    assert calls == [("follow", "big", ("10.0.0.7", 7000)), ("handler", "big"),
                     ("follow", "other", ("10.0.0.7", 7000)),
                     ("handler", "followed"),
                     ("unfollow", "followed"), ("handler", "followed")]
    assert routing.counters["cascaded"] == 1 and routing.counters["refused/cascade"] == 1


def test_a_republish_forwarded_to_a_follower_lets_the_relay_go_if_authorized():
    calls: list[tuple] = []

    async def route(stream, kind):
        raise AssertionError("a forwarded request is served where it arrives")

    async def unfollow(stream):
        calls.append(("unfollow", stream))

    routing = ClusterRouting("b", route, holds=lambda s: False,
                             authorized=lambda h, k, s: h == "Bearer ok",
                             follows=lambda s: s == "room", follow=lambda s, a: True, unfollow=unfollow)
    fwd = {FORWARDED_HEADER: "a"}
    statuses = serve_offers(routing, [("/whip/room", {**fwd, "Authorization": "Bearer forged"}),
                                      ("/whip/room", {**fwd, "Authorization": "Bearer ok"})], calls)
    assert statuses == [201, 201]  # (the stand-in handler; the real one refuses the forged token)
    assert calls == [("handler", "room"), ("unfollow", "room"), ("handler", "room")]


def test_a_forwarded_subscriber_the_registry_cannot_place_here_now_is_told_to_retry():
    from sfu_bridge.fleet import RouteKind, RouteReason

    answers = iter([ConnectionError("registry restarting"),
                    Route(RouteKind.REDIRECT, RouteReason.CASCADE, "c", "http://c:8100"),
                    Route(RouteKind.REFUSE, RouteReason.NO_PUBLISHER)])

    async def route(stream, kind):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    log: list[tuple] = []
    routing = ClusterRouting("b", route, holds=lambda s: False, authorized=lambda h, k, s: True,
                             follows=lambda s: False, follow=lambda s, a: True)
    fwd = ("/whep/room", {FORWARDED_HEADER: "a"})
    # registry down, then placed elsewhere meanwhile: 503 + Retry-After (the client retries
    # through its URL); no publisher anywhere: the handler's own answer (404 in the server)
    assert serve_offers(routing, [fwd, fwd, fwd], log) == [503, 503, 201]
    assert log == [("handler", "room")]
    assert routing.counters["refused/cascade"] == 2 and routing.counters["registry_unavailable"] == 1


def test_an_owner_asks_about_its_subscribers_only_when_full_enough_to_cascade():
    from sfu_bridge.fleet import RouteKind, RouteReason

    asked: list[str] = []
    full = {"now": False}

    async def route(stream, kind):
        asked.append(stream)
        return Route(RouteKind.LOCAL, RouteReason.OWNER, "a")

    routing = ClusterRouting("a", route, holds=lambda s: True, authorized=lambda h, k, s: True,
                             follows=lambda s: False, follow=lambda s, a: True,
                             cascading=lambda s: full["now"])
    statuses = serve_offers(routing, ["/whep/mine", lambda: full.update(now=True), "/whep/mine", "/whip/mine"],
                            [])
    assert statuses == [201, 201, 201]
    assert asked == ["mine"]  # only the subscriber that arrived once the owner was full


def test_a_follower_at_the_streams_subscriber_cap_asks_where_the_next_subscriber_goes():
    from sfu_bridge.fleet import RouteKind, RouteReason

    asked: list[str] = []
    capped: set[str] = set()

    async def route(stream, kind):
        asked.append(stream)
        return Route(RouteKind.REDIRECT, RouteReason.CASCADE, "c", "http://c:8100", "http://c:8100",
                     relay_addr=("10.0.0.7", 7000))

    routing = ClusterRouting("b", route, holds=lambda s: False, authorized=lambda h, k, s: True,
                             follows=lambda s: True, follow=lambda s, a: True,
                             cascading=lambda s: s in capped)
    statuses = serve_offers(routing, ["/whep/room", lambda: capped.add("room"), "/whep/room", "/whep/other"], [])
    assert statuses == [201, 307, 201]  # served here while it has room, then sent on
    assert asked == ["room"]
