"""Any bridge URL works: the routing step a bridge worker in the cluster puts in front of its
WHIP/WHEP handlers (an aiohttp middleware; sfu_bridge/server.py itself is unchanged).

A ``POST /whip/<stream>`` or ``POST /whep/<stream>`` that reaches a worker which does not
own the stream is sent to the owner (sfu_bridge/fleet.py says who that is):

- **307 Temporary Redirect** with ``Location: <owner URL>/whip/<stream>`` (RFC 9725 section
  4.5). The client repeats the POST there with the same method, body and Authorization
  header (sfu_bridge/sdk.py does; so do HTTP clients told to trust the cluster's hosts).
- **Forwarded** to the owner over the cluster network, its answer relayed, for browsers:
  the Fetch standard drops ``Authorization`` when a redirect crosses origins, so a browser
  that followed a 307 would arrive without its token. A request with an ``Origin`` header
  (browsers send one on every cross-origin and every POST request) is forwarded in the
  default ``auto`` mode. The answer's ``Location`` names the owner's own URL, so the
  session's DELETE goes straight there; the media flows to the owner's ICE candidates.
- **503 + Retry-After** when no live worker admits new streams (all draining, or none).
- **404** for a WHEP request of a stream nobody publishes.
- **Cascading** (sfu_bridge/fleet.py): when the registry sends a stream's new subscriber here
  although the publisher is elsewhere (the owner is full), this worker follows the stream
  from the owner's relay first; further subscribers of a stream it follows are served here
  without asking. If it cannot follow (no stream slot left), 503 + Retry-After.

The token is checked before anything is revealed about where a stream lives: a request
without a valid one goes to the local handler, which answers 401/403 as always. A request
already forwarded by another worker (``Auralink-Forwarded``; a cascaded subscriber's first
asks where to follow the stream from), a WHIP request for a stream whose publisher is here
and a WHEP request for a stream this worker follows are handled locally without asking
anyone (the owner asks about its subscribers when it can cascade). If the registry cannot
be asked, the worker serves the request itself (a draining worker refuses new streams with
503).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sfu_bridge.fleet import Route, RouteKind, RouteReason, SignalKind

logger = logging.getLogger(__name__)

FORWARDED_HEADER = "Auralink-Forwarded"
# the collection URLs only; session URLs (DELETE/PATCH) carry their worker in Location
OFFER_PATH_RE = re.compile(r"^/(whip|whep)/([A-Za-z0-9][A-Za-z0-9_.\-]{0,127})/?$")
# headers of the owner's answer a forwarded request relays to the client
RELAYED = ("Location", "Link", "Content-Type", "Retry-After", "WWW-Authenticate", "Auralink-Replaced")


class RedirectMode(str, enum.Enum):
    AUTO = "auto"  # forward browser requests (Origin header), 307 for the others
    REDIRECT = "redirect"  # always 307
    FORWARD = "forward"  # always forward


class RoutingOutcome(str, enum.Enum):
    LOCAL = "local"
    REDIRECTED = "redirected"
    FORWARDED = "forwarded"
    REFUSED_NO_WORKER = "refused/no_worker"
    REFUSED_NO_PUBLISHER = "refused/no_publisher"
    REFUSED_DRAINING = "refused/draining"
    CASCADED = "cascaded"  # served here from the owner's relay
    REFUSED_CASCADE = "refused/cascade"  # sent here to follow the stream, but no room to
    FORWARD_FAILED = "forward_failed"
    REGISTRY_UNAVAILABLE = "registry_unavailable"


RouteFn = Callable[[str, SignalKind], Awaitable[Route]]


class ClusterRouting:
    """The routing middleware of one worker.

    `route(stream, kind)` asks the registry (it raises if the registry is unreachable);
    `holds(stream)` says whether this worker holds the stream's publisher; `authorized(
    header, kind, stream)` whether the request's token would be accepted here. With a relay:
    `follows(stream)` says whether this worker follows the stream from another worker, and
    `follow(stream, relay_addr)` starts to (False: it cannot), `unfollow(stream)` stops, and
    `cascading(stream)` says whether this worker is full enough that the stream's new
    subscribers may go elsewhere (it holds the cascade threshold's sessions, or the stream its
    per-stream subscriber cap); as the stream's owner or follower it asks the registry about
    them only then.
    """

    def __init__(
        self,
        worker_id: str,
        route: RouteFn,
        holds: Callable[[str], bool],
        authorized: Callable[[str | None, SignalKind, str], bool],
        mode: RedirectMode = RedirectMode.AUTO,
        route_timeout_s: float = 2.0,
        forward_timeout_s: float = 15.0,
        retry_after_s: int = 2,
        follows: Callable[[str], bool] | None = None,
        follow: Callable[[str, tuple[str, int]], bool] | None = None,
        unfollow: Callable[[str], Awaitable[None]] | None = None,
        cascading: Callable[[str], bool] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.route = route
        self.holds = holds
        self.follows = follows
        self.follow = follow
        self.unfollow = unfollow
        self.cascading = cascading  # whether a stream's new subscriber may cascade from here
        self.authorized = authorized
        self.mode = mode
        self.route_timeout_s = route_timeout_s
        self.forward_timeout_s = forward_timeout_s
        self.retry_after_s = retry_after_s
        self.draining = False
        self.counters: Counter[str] = Counter()
        self._http: aiohttp.ClientSession | None = None

    def install(self, app: web.Application) -> None:
        """Run inside the app's error/CORS middleware (it must be called before startup)."""
        app.middlewares.append(self.middleware)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        m = OFFER_PATH_RE.match(request.path) if request.method == "POST" else None
        if m is None:
            return await handler(request)
        kind, stream = SignalKind(m.group(1)), m.group(2)
        if FORWARDED_HEADER in request.headers:
            return await self._forwarded(request, handler, kind, stream)
        if not self.authorized(request.headers.get("Authorization"), kind, stream):
            return await self._local(request, handler)
        # The owner (and a follower) asks about its stream's subscribers only when it is full
        # enough to cascade them (the registry's threshold, as the worker last heard it, or
        # the stream's per-stream subscriber cap here).
        full = kind is SignalKind.SUBSCRIBE and self.cascading is not None and self.cascading(stream)
        if kind is SignalKind.SUBSCRIBE and self.follows is not None and self.follows(stream) and not full:
            return await self._local(request, handler)
        if self.holds(stream) and (kind is SignalKind.PUBLISH or self.follow is None or not full):
            return await self._local(request, handler)
        try:
            route = await asyncio.wait_for(self.route(stream, kind), self.route_timeout_s)
        except Exception as exc:  # registry restarting or unreachable: decide alone
            self.counters[RoutingOutcome.REGISTRY_UNAVAILABLE.value] += 1
            logger.warning("bridge registry unavailable (%s): serving stream=%s here",
                           type(exc).__name__, stream)
            if self.draining and kind is SignalKind.PUBLISH:
                return self._refuse(RoutingOutcome.REFUSED_DRAINING, "this bridge worker is draining")
            await self._publishing_here(kind, stream)
            return await self._local(request, handler)
        if route.kind is RouteKind.LOCAL and route.reason is RouteReason.CASCADE:
            return await self._cascaded(request, handler, stream, route)
        if route.kind is RouteKind.LOCAL:
            if self.draining and kind is SignalKind.PUBLISH and route.reason is RouteReason.PLACED:
                return self._refuse(RoutingOutcome.REFUSED_DRAINING, "this bridge worker is draining")
            await self._publishing_here(kind, stream)
            return await self._local(request, handler)
        if route.kind is RouteKind.REFUSE:
            if route.reason is RouteReason.NO_PUBLISHER:
                self.counters[RoutingOutcome.REFUSED_NO_PUBLISHER.value] += 1
                return web.Response(status=404, text="stream has no publisher\n")
            return self._refuse(RoutingOutcome.REFUSED_NO_WORKER,
                                "no bridge worker admits new streams now", route.retry_after_s)
        assert route.url is not None
        if self.mode is RedirectMode.FORWARD or (
            self.mode is RedirectMode.AUTO and "Origin" in request.headers
        ):
            return await self._forward(request, route)
        self.counters[RoutingOutcome.REDIRECTED.value] += 1
        return web.Response(
            status=307, text="stream is served by another bridge worker\n",
            headers={"Location": route.url.rstrip("/") + request.path_qs},
        )

    async def _forwarded(self, request: web.Request, handler: Any, kind: SignalKind,
                         stream: str) -> web.StreamResponse:
        """A request another worker forwarded here is served here: a subscriber of a stream
        cascaded here (neither published nor followed here yet) makes this worker follow the
        stream first, at the relay the registry names (never one the request names); an
        authorized publisher of a stream it follows makes it let the relay go, as a publisher
        that signals here directly does."""
        if kind is SignalKind.PUBLISH and self.authorized(request.headers.get("Authorization"), kind, stream):
            await self._publishing_here(kind, stream)  # (a republish forwarded to a follower)
        if (kind is SignalKind.SUBSCRIBE and self.follow is not None and not self.holds(stream)
                and not (self.follows is not None and self.follows(stream))):
            try:
                route = await asyncio.wait_for(self.route(stream, kind), self.route_timeout_s)
            except Exception:  # noqa: BLE001 - registry restarting or slow: the client retries
                self.counters[RoutingOutcome.REGISTRY_UNAVAILABLE.value] += 1
                return self._refuse(RoutingOutcome.REFUSED_CASCADE,
                                    "bridge registry unavailable: cannot follow the stream now")
            if route.kind is RouteKind.LOCAL and route.reason is RouteReason.CASCADE:
                return await self._cascaded(request, handler, stream, route)
            if route.kind is not RouteKind.REFUSE:  # placed elsewhere since it was forwarded
                return self._refuse(RoutingOutcome.REFUSED_CASCADE,
                                    "the stream's subscribers are placed on another worker now")
        return await handler(request)  # (a refused route: no publisher anywhere, 404 here)

    async def _cascaded(self, request: web.Request, handler: Any, stream: str,
                        route: Route) -> web.StreamResponse:
        if self.follow is None or route.relay_addr is None or not self.follow(stream, route.relay_addr):
            return self._refuse(RoutingOutcome.REFUSED_CASCADE,
                                "this bridge worker has no room to follow the stream")
        self.counters[RoutingOutcome.CASCADED.value] += 1
        return await handler(request)

    async def _publishing_here(self, kind: SignalKind, stream: str) -> None:
        """A stream this worker follows is (re)published here (its owner died and it was
        placed here): the relay lets it go, its subscribers here stay for the new publisher."""
        if (kind is SignalKind.PUBLISH and self.unfollow is not None and self.follows is not None
                and self.follows(stream)):
            await self.unfollow(stream)

    async def _local(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.counters[RoutingOutcome.LOCAL.value] += 1
        return await handler(request)

    def _refuse(self, outcome: RoutingOutcome, message: str, retry_after_s: int | None = None) -> web.Response:
        self.counters[outcome.value] += 1
        return web.Response(status=503, text=message + "\n",
                            headers={"Retry-After": str(retry_after_s or self.retry_after_s)})

    async def _forward(self, request: web.Request, route: Route) -> web.Response:
        """POST the offer to the owner inside the cluster and relay its answer."""
        body = await request.read()  # the app's client_max_size applies (413 beyond)
        headers = {FORWARDED_HEADER: self.worker_id}
        for name in ("Authorization", "Content-Type"):
            if name in request.headers:
                headers[name] = request.headers[name]
        target = (route.internal_url or route.url or "").rstrip("/") + request.path_qs
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.post(
                target, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.forward_timeout_s),
            ) as resp:
                text = await resp.read()
                out = CIMultiDict()
                for name in RELAYED:
                    for value in resp.headers.getall(name, []):
                        out.add(name, value)
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("forwarding to bridge worker %s failed: %s", route.worker_id, type(exc).__name__)
            return self._refuse(RoutingOutcome.FORWARD_FAILED, "the stream's bridge worker did not answer", 1)
        self.counters[RoutingOutcome.FORWARDED.value] += 1
        return web.Response(status=status, body=text, headers=out)
