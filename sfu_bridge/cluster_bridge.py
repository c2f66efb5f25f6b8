"""Bridge workers on the Ray cluster: the `BridgeWorker` actor. The registry that starts,
places, drains and retires them is cluster/bridge_registry.py.

- **BridgeWorker** (a detached Ray actor, one process): runs the `auralink bridge` worker of
  sfu_bridge/server.py (aiohttp WHIP/WHEP + aiortc media plane + codec client) on the actor's
  event loop, bound to its own HTTP port (first free one of a configured range, or any) and
  the node's UDP ports (aioice binds ephemeral ports). It puts `ClusterRouting` in front of
  its handlers (sfu_bridge/cluster_routing.py) and reports its streams to the registry on
  every change and every `heartbeat_s`.
  The worker finds the registry by its name (`REGISTRY_NAME`), asks it where a stream
  lives for each POST it does not hold, and answers `wait_closed` (a call the registry
  keeps pending: Ray fails it as soon as the worker's process is gone), `retire` and `info`.
- **Relay** (sfu_bridge/cascade.py): every worker runs one on a UDP port of its node, tagged
  with a key derived from the cluster secret, and reports its address. It relays a stream's
  ticks to the workers that follow it, and follows streams the registry cascades here (the
  owner is full; sfu_bridge/fleet.py): their subscribers are served from the relayed ticks. A
  followed stream nobody here subscribes to any more for `UNFOLLOW_AFTER_S` is dropped; one
  whose publisher moved is followed at its new owner (the registry's answer to a report).

Why actors and not a Serve deployment: docs/operations.md, section 6.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import ray

from deployments.config import RAY_NAMESPACE
from sfu_bridge.cluster_routing import ClusterRouting, RedirectMode
from sfu_bridge.fleet import REGISTRY_NAME, Route, SignalKind, WorkerReport

logger = logging.getLogger(__name__)

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
UNFOLLOW_AFTER_S = 5.0  # a followed stream without local subscribers this long is dropped


@dataclass(frozen=True)
class WorkerSettings:
    """One bridge worker's settings (all workers of a fleet share them)."""

    codec: str = "serve"  # "serve" (the CodecReplica app) or "in-process" (random weights)
    host: str = "0.0.0.0"  # HTTP bind address
    # host in the worker's public URL; "" = the node's public IP (--public-ip), else its IP.
    # A template may use {public_ip}, {public_ip_dashed} and {node_ip}, e.g. a wildcard DNS
    # name "{public_ip_dashed}.bridges.example.com" that a wildcard TLS certificate covers.
    advertise_host: str = ""
    port_min: int = 0  # HTTP port range: first free one is taken; 0 = any free port
    port_max: int = 0
    url_scheme: str = "http"  # "https" with tls_cert/tls_key (or a TLS proxy per worker)
    tls_cert: str = ""  # PEM files: the worker serves HTTPS itself
    tls_key: str = ""
    redirect_mode: str = RedirectMode.AUTO.value
    hint_limiter: bool = True  # Redis GCRA limiter ($REDIS_URL, else embedded per worker)
    heartbeat_s: float = 0.5
    # BridgeConfig fields (sfu_bridge/config.py), e.g. {"deadline_ms": 30.0}; others from env
    bridge: dict[str, Any] = field(default_factory=dict)


def _scope(kind: SignalKind) -> Any:
    from sfu_bridge.tokens import Scope

    return Scope.PUBLISH if kind is SignalKind.PUBLISH else Scope.SUBSCRIBE


@ray.remote(num_cpus=0)
class BridgeWorker:
    """One bridge worker process (see the module docstring)."""

    def __init__(self, worker_id: str, actor_name: str, settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.worker_id = worker_id
        self.actor_name = actor_name
        self.settings = WorkerSettings(**settings)
        self.server: Any = None
        self.routing: ClusterRouting | None = None
        self.runner: Any = None
        self.url = self.internal_url = ""
        self.node_ip = ""
        self.started_at = time.time()
        self.seq = 0
        self.draining = False
        self._since: dict[str, tuple[str, float]] = {}  # stream -> (publisher session, since)
        self._closed: asyncio.Event | None = None
        self._heartbeat: asyncio.Task | None = None
        self._registry: Any = None
        self.relay: Any = None  # sfu_bridge.cascade.CascadeRelay
        self.relay_addr: tuple[str, int] | None = None
        self._feedback: asyncio.Task | None = None
        self._unsubscribed: dict[str, float] = {}  # followed stream -> since when nobody here listens
        self.cascade_after = 0  # the registry's threshold (its reply to our reports); 0: never

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Build the worker, bind its port, start reporting; returns its first report."""
        from aiohttp import web

        from auth.secret import load_secret
        from sfu_bridge import server as server_mod
        from sfu_bridge.config import BridgeConfig

        s = self.settings
        self._closed = asyncio.Event()
        config = BridgeConfig.from_env(host=s.host, bridge_id=self.worker_id, **s.bridge)
        codec = server_mod.build_codec(s.codec, config.max_streams, config.bandwidth_kbps)
        if s.codec == "serve":
            await codec.ready(60.0)
        secret = load_secret()
        limiter = server_mod.make_limiter(config) if s.hint_limiter else None
        self.server = server = server_mod.make_server(config, codec, secret, hint_secret=secret,
                                                      limiter=limiter)
        if s.codec == "serve":
            server_mod.link_supervisor(server.media)
            server_mod.link_dashboard(server)
        from sfu_bridge.cascade import CascadeRelay, relay_key

        self.relay = CascadeRelay(zlib.crc32(self.worker_id.encode()) & 0xFFFF, server.media,
                                  key=relay_key(secret))
        server.media.cascade = self.relay
        self.routing = ClusterRouting(
            self.worker_id, self._route, holds=self._holds, authorized=self._authorized,
            mode=RedirectMode(s.redirect_mode), follows=lambda stream: stream in self.relay.owners,
            follow=self._follow, unfollow=self._unfollow,
            cascading=self._cascading,
        )
        self.routing.install(server.app)
        # Session URLs are capabilities: a redacting access log where the server has one.
        access_log_class = getattr(server_mod, "RedactingAccessLogger", None)
        self.runner = (web.AppRunner(server.app, access_log_class=access_log_class)
                       if access_log_class else web.AppRunner(server.app, access_log=None))
        await self.runner.setup()
        port = await self._bind(web)
        self.node_ip = ray.util.get_node_ip_address()
        public_host = advertised_host(s.advertise_host, config.public_ip, self.node_ip, s.host)
        internal_host = self.node_ip if s.host in WILDCARD_HOSTS else s.host
        self.url = f"{s.url_scheme}://{_url_host(public_host)}:{port}"
        self.internal_url = f"{s.url_scheme}://{_url_host(internal_host)}:{port}"
        _, relay_port = await self.relay.open(s.host or "0.0.0.0", 0)
        self.relay_addr = (internal_host, int(relay_port))
        self._feedback = asyncio.ensure_future(self.relay.run_feedback(0.1))
        config.public_url = self.url  # absolute Location headers: a session's DELETE comes here
        self._registry = ray.get_actor(REGISTRY_NAME, namespace=RAY_NAMESPACE)
        self._heartbeat = asyncio.ensure_future(self._report_loop())
        logger.info("bridge worker %s serving at %s (internal %s)", self.worker_id, self.url,
                    self.internal_url)
        return self._report().to_dict()

    async def _bind(self, web: Any) -> int:
        s = self.settings
        ssl_context = None
        if s.tls_cert:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(s.tls_cert, s.tls_key or None)
        ports = [0] if s.port_min <= 0 else list(range(s.port_min, max(s.port_min, s.port_max) + 1))
        for port in ports:
            site = web.TCPSite(self.runner, s.host, port, ssl_context=ssl_context)
            try:
                await site.start()
            except OSError:
                continue  # taken by another worker on this node
            return int(self.runner.addresses[-1][1])
        raise RuntimeError(f"no free HTTP port in {s.port_min}-{s.port_max} on this node")

    async def wait_closed(self) -> str:
        """Returns when the worker has retired; Ray fails this call if the worker dies."""
        assert self._closed is not None
        await self._closed.wait()
        return self.worker_id

    async def retire(self) -> bool:
        """Stop serving, if no session is left (False otherwise: the drain goes on)."""
        if self.server is None or self.server.media.sessions:
            return False
        for task in (self._heartbeat, self._feedback):
            if task is not None:
                task.cancel()
        if self.relay is not None:
            self.relay.close()
        await self.runner.cleanup()
        logger.info("bridge worker %s retired", self.worker_id)
        assert self._closed is not None
        self._closed.set()
        return True

    # -- routing and reports ---------------------------------------------------------------
    async def _route(self, stream: str, kind: SignalKind) -> Route:
        return Route.from_dict(await self._registry.route.remote(stream, kind.value, self.worker_id))

    def _cascading(self, stream: str) -> bool:
        """Whether a new subscriber of `stream` (published or followed here) may belong on
        another worker: this one holds the registry's threshold of sessions, or the stream
        its per-stream subscriber cap."""
        return 0 < self.cascade_after and (self.cascade_after <= len(self.server.media.sessions)
                                           or self.server.sessions.stream_full(stream))

    def _holds(self, stream: str) -> bool:
        """The stream's publisher is here (not a stream followed from another worker)."""
        return stream in self.server.media.publishers and stream not in self.relay.owners

    def _follow(self, stream: str, relay_addr: tuple[str, int]) -> bool:
        """Serve `stream` here from its owner's relay (False: no stream slot left)."""
        media = self.server.media
        if stream in media.publishers and stream not in self.relay.owners:
            return True  # published here meanwhile: served as the owner
        if stream not in media.publishers and media.full:
            return False
        self.relay.follow(stream, tuple(relay_addr))
        self._unsubscribed.pop(stream, None)
        logger.info("bridge worker %s follows stream=%s from %s:%d", self.worker_id, stream, *relay_addr)
        return True

    async def _unfollow_idle(self) -> None:
        """Drop followed streams nobody here has subscribed to for `UNFOLLOW_AFTER_S`."""
        media, now = self.server.media, time.monotonic()
        for stream in list(self.relay.owners):
            # (a subscriber still negotiating has a session but is not among media's yet)
            if media.subscribers.get(stream) or self.server.sessions.subscribers(stream):
                self._unsubscribed.pop(stream, None)
                continue
            since = self._unsubscribed.setdefault(stream, now)
            if now - since < UNFOLLOW_AFTER_S:
                continue
            await self._unfollow(stream)

    async def _unfollow(self, stream: str) -> None:
        """Stop following `stream`: the relayed publisher goes (local subscribers stay)."""
        if not self.relay.unfollow(stream):
            return
        self._unsubscribed.pop(stream, None)
        pub = self.server.media.publishers.get(stream)
        if pub is not None:
            await self.server.media.end_session(pub.session_id)
        logger.info("bridge worker %s stopped following stream=%s", self.worker_id, stream)

    def _authorized(self, header: str | None, kind: SignalKind, stream: str) -> bool:
        try:
            self.server.authority.authorize_header(header, _scope(kind), stream)
        except Exception:  # noqa: BLE001 - the local handler answers with the precise 4xx
            return False
        return True

    def _report(self) -> WorkerReport:
        media = self.server.media
        now = time.time()
        since = {}
        followed = self.relay.owners if self.relay is not None else {}
        for stream, pub in media.publishers.items():
            if stream in followed:
                continue
            prev = self._since.get(stream)
            since[stream] = prev if prev is not None and prev[0] == pub.session_id else (pub.session_id, now)
        self._since = since
        self.seq += 1
        return WorkerReport(
            worker_id=self.worker_id, actor_name=self.actor_name, url=self.url,
            internal_url=self.internal_url, node_ip=self.node_ip, pid=os.getpid(),
            streams={s: t for s, (_, t) in since.items()}, sessions=len(media.sessions),
            draining=self.draining, seq=self.seq, started_at=self.started_at,
            counters=dict(self.routing.counters) if self.routing else {},
            relay_addr=list(self.relay_addr) if self.relay_addr else None,
            relayed={s: len(media.subscribers.get(s, {})) for s in followed},
            full=[s for s in self.server.sessions.full_streams() if s in media.publishers],
        )

    def _publisher_sessions(self) -> dict[str, str]:
        return {s: p.session_id for s, p in self.server.media.publishers.items()}

    async def _report_loop(self) -> None:
        """Report at once when a publisher comes or goes, else every `heartbeat_s`."""
        last_sent, last_pubs, failing = 0.0, None, False
        while True:
            pubs = self._publisher_sessions()
            now = time.monotonic()
            if pubs != last_pubs or now - last_sent >= self.settings.heartbeat_s:
                try:
                    reply = await asyncio.wait_for(
                        self._registry.report.remote(self._report().to_dict()), 5.0)
                    self.draining = bool(reply.get("draining"))
                    self.cascade_after = int(reply.get("cascade_after") or 0)
                    for stream, addr in (reply.get("owners") or {}).items():
                        if stream in self.relay.owners and tuple(addr) != self.relay.owners[stream]:
                            self.relay.follow(stream, (str(addr[0]), int(addr[1])))  # it moved
                    if self.routing is not None:
                        self.routing.draining = self.draining
                    last_pubs, last_sent, failing = pubs, now, False
                except Exception as exc:  # noqa: BLE001 - the registry may be restarting
                    if not failing:
                        logger.warning("bridge registry unreachable: %s", type(exc).__name__)
                    failing, last_sent = True, now
            await self._unfollow_idle()
            await asyncio.sleep(0.05)

    # -- introspection -----------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        """The report plus media counters (no media content): `auralink status`, tests."""
        media = self.server.media
        out = self._report().to_dict()
        out["media"] = media.stats()
        out["chunks"] = {s: p.chunks for s, p in media.publishers.items()}
        out["subscribers"] = {s: len(subs) for s, subs in media.subscribers.items() if subs}
        relay = self.relay
        out["relay"] = {"sent": dict(relay.sent), "received": dict(relay.received),
                        "drops": dict(relay.drops),
                        "subscriptions": {s: len(p) for s, p in relay.subscriptions.items()}}
        return out


def advertised_host(template: str, public_ip: str, node_ip: str, bind_host: str) -> str:
    """The host clients reach a worker at (see `WorkerSettings.advertise_host`)."""
    fallback = public_ip or (node_ip if bind_host in WILDCARD_HOSTS else bind_host)
    if not template:
        return fallback
    return template.format(public_ip=fallback, public_ip_dashed=fallback.replace(".", "-").replace(":", "-"),
                           node_ip=node_ip)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
