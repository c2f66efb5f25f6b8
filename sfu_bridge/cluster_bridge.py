"""Bridge workers on the Ray cluster: `BridgeWorker` actors and the `BridgeRegistry` that
knows them, places streams on them and scales them.

- **BridgeWorker** (a detached Ray actor, one process): runs the `auralink bridge` worker of
  sfu_bridge/server.py (aiohttp WHIP/WHEP + aiortc media plane + codec client) on the actor's
  event loop, bound to its own HTTP port (first free one of a configured range, or any) and
  the node's UDP ports (aioice binds ephemeral ports). It puts `ClusterRouting` in front of
  its handlers (sfu_bridge/cluster_routing.py) and reports its streams to the registry on
  every change and every `heartbeat_s`.
- **BridgeRegistry** (a detached named actor, `auralink-bridge-registry` in the `auralink`
  namespace, restarted by Ray if its process dies): the `WorkerTable` of sfu_bridge/fleet.py
  (who is live, who owns which stream, who drains), answering each worker's routing question
  for a POST, and a control loop that starts workers, drains them on a scale-down, retires
  a draining worker once its last session has ended, and drops dead ones.

Death is noticed two ways: each worker has a call pending on it (`wait_closed`) that Ray
fails as soon as the actor's process is gone (ActorDiedError), and a worker whose reports
stop for `dead_after_s` owns nothing any more. Either way its publishers' republish, through
any worker's URL, is placed on a survivor.

Why actors and not a Serve deployment: docs/operations.md, section 6.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import ray

from deployments.config import RAY_NAMESPACE
from sfu_bridge.cluster_routing import ClusterRouting, RedirectMode
from sfu_bridge.fleet import (
    BRIDGE_RESOURCE,
    FleetPlanner,
    FleetScaling,
    Route,
    RouteKind,
    SignalKind,
    WorkerRecord,
    WorkerReport,
    WorkerTable,
    choose_drain,
    pinned,
)

logger = logging.getLogger(__name__)

REGISTRY_NAME = "auralink-bridge-registry"
WORKER_PREFIX = "auralink-bridge-"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


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


@dataclass(frozen=True)
class FleetSettings:
    scaling: FleetScaling = field(default_factory=FleetScaling)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    worker_resources: dict[str, float] = field(default_factory=lambda: {BRIDGE_RESOURCE: 1})
    worker_num_cpus: float = 0.0
    secret_file: str = ""  # AURALINK_SECRET_FILE for the workers (a path, never the secret)
    dead_after_s: float = 3.0  # no report for this long: the worker owns nothing
    kill_after_s: float = 30.0  # no report for this long: the worker is killed and dropped
    control_interval_s: float = 0.5
    start_timeout_s: float = 600.0  # a new bridge node may have to boot first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FleetSettings:
        d = dict(d)
        scaling = FleetScaling.from_kwargs(d.pop("scaling", {}) or {})
        wd = dict(d.pop("worker", {}) or {})
        known = {f.name for f in fields(WorkerSettings)}
        unknown = sorted(set(wd) - known) + sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown bridge fleet option(s) {unknown}")
        return cls(scaling=scaling, worker=WorkerSettings(**wd), **d)


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
        self.routing = ClusterRouting(
            self.worker_id, self._route, holds=lambda stream: stream in server.media.publishers,
            authorized=self._authorized, mode=RedirectMode(s.redirect_mode),
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
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.runner.cleanup()
        logger.info("bridge worker %s retired", self.worker_id)
        assert self._closed is not None
        self._closed.set()
        return True

    # -- routing and reports ---------------------------------------------------------------
    async def _route(self, stream: str, kind: SignalKind) -> Route:
        return Route.from_dict(await self._registry.route.remote(stream, kind.value, self.worker_id))

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
        for stream, pub in media.publishers.items():
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
                    if self.routing is not None:
                        self.routing.draining = self.draining
                    last_pubs, last_sent, failing = pubs, now, False
                except Exception as exc:  # noqa: BLE001 - the registry may be restarting
                    if not failing:
                        logger.warning("bridge registry unreachable: %s", type(exc).__name__)
                    failing, last_sent = True, now
            await asyncio.sleep(0.05)

    # -- introspection -----------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        """The report plus media counters (no media content): `auralink status`, tests."""
        media = self.server.media
        out = self._report().to_dict()
        out["media"] = media.stats()
        out["chunks"] = {s: p.chunker.chunks for s, p in media.publishers.items()}
        out["subscribers"] = {s: len(subs) for s, subs in media.subscribers.items() if subs}
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


@ray.remote(num_cpus=0)
class BridgeRegistry:
    """The fleet's registry and controller (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = FleetSettings.from_dict(settings)
        self.table = WorkerTable(self.settings.dead_after_s)
        self.planner = FleetPlanner(self.settings.scaling)
        self.handles: dict[str, Any] = {}
        self.starting: dict[str, asyncio.Task] = {}
        self.retiring: set[str] = set()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.counters: collections.Counter[str] = collections.Counter()
        self.stopped = False
        self._loop: asyncio.Task | None = None

    def _ensure_loop(self) -> None:
        # Async actors have no running loop in __init__: start on the first call.
        if self._loop is None and not self.stopped:
            self._loop = asyncio.ensure_future(self._control_loop())

    def _event(self, kind: str, worker_id: str, **extra: Any) -> None:
        self.counters[kind] += 1
        self.events.append({"t": time.time(), "event": kind, "worker_id": worker_id, **extra})
        logger.info("bridge worker %s: %s %s", worker_id, kind, extra or "")

    # -- calls from workers ------------------------------------------------------------------
    async def report(self, rep: dict[str, Any]) -> dict[str, Any]:
        self._ensure_loop()
        report = WorkerReport.from_dict(rep)
        known = report.worker_id in self.table.records
        if not known and report.worker_id not in self.starting:
            if self.stopped or report.worker_id in self.retiring:
                return {"draining": True}
            # a worker of an earlier registry process (this one restarted): adopt it
            try:
                handle = ray.get_actor(report.actor_name, namespace=RAY_NAMESPACE)
            except ValueError:
                return {"draining": True}
            self._adopt(report.worker_id, handle)
            self._event("adopted", report.worker_id, url=report.url)
        rec = self.table.report(report, time.monotonic())
        return {"draining": rec.draining}

    async def route(self, stream: str, kind: str, asking: str | None = None) -> dict[str, Any]:
        self._ensure_loop()
        route = self.table.route(stream, SignalKind(kind), asking, time.monotonic())
        self.counters[f"route/{route.kind.value}/{route.reason.value}"] += 1
        return route.to_dict()

    # -- operator / CLI calls ---------------------------------------------------------------
    async def ping(self) -> bool:
        self._ensure_loop()
        return True

    async def configure(self, scaling: dict[str, Any] | None = None, workers: int | None = None,
                        worker: dict[str, Any] | None = None) -> dict[str, Any]:
        """New scaling knobs (`scaling`), or a pinned size (`workers`); new worker settings
        apply to workers started from now on."""
        self._ensure_loop()
        s = self.settings
        if scaling is not None:
            s = replace(s, scaling=FleetScaling.from_kwargs({**asdict(s.scaling), **scaling}))
        if workers is not None:
            s = replace(s, scaling=pinned(s.scaling, workers))
        if worker is not None:
            s = replace(s, worker=WorkerSettings(**{**asdict(s.worker), **worker}))
        self.settings = s
        self.planner.reconfigure(s.scaling)
        await self._control_step()
        return asdict(s.scaling)

    async def drain(self, worker_id: str, draining: bool = True) -> bool:
        """Drain one worker by hand (or take it back). The scaler may start a replacement."""
        self._ensure_loop()
        ok = self.table.set_draining(worker_id, draining, time.monotonic())
        if ok:
            self._event("drain" if draining else "undrain", worker_id)
        return ok

    async def status(self) -> dict[str, Any]:
        self._ensure_loop()
        now = time.monotonic()
        workers = []
        for rec in sorted(self.table.records.values(), key=lambda r: r.report.started_at):
            r = rec.report
            state = ("unresponsive" if not self.table.is_live(rec, now)
                     else "draining" if rec.draining else "active")
            workers.append({
                "worker_id": r.worker_id, "state": state, "url": r.url,
                "internal_url": r.internal_url, "node_ip": r.node_ip, "pid": r.pid,
                "streams": sorted(r.streams), "sessions": r.sessions,
                "last_report_s_ago": round(now - rec.last_seen, 2),
                "routing": dict(r.counters),
            })
        return {
            "workers": workers,
            "starting": sorted(self.starting),
            "streams": self.table.total_streams(now),
            "scaling": asdict(self.settings.scaling),
            "counters": dict(self.counters),
            "events": list(self.events)[-20:],
        }

    async def shutdown(self) -> int:
        """Stop the control loop and kill every worker (`auralink bridges down`)."""
        self.stopped = True
        if self._loop is not None:
            self._loop.cancel()
        for task in self.starting.values():
            task.cancel()
        n = 0
        for wid, handle in list(self.handles.items()):
            ray.kill(handle, no_restart=True)
            self.table.remove(wid)
            n += 1
        self.handles.clear()
        return n

    # -- control loop ------------------------------------------------------------------------
    async def _control_loop(self) -> None:
        await self._adopt_existing()
        while not self.stopped:
            try:
                await self._control_step()
            except Exception:  # one bad step must not end the fleet's control
                logger.exception("bridge registry control step failed")
            await asyncio.sleep(self.settings.control_interval_s)

    async def _adopt_existing(self) -> None:
        """After a registry restart: the detached workers are still there; take them back."""
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry.get("name", "") if isinstance(entry, dict) else entry
            ns = entry.get("namespace") if isinstance(entry, dict) else RAY_NAMESPACE
            if ns != RAY_NAMESPACE or not name.startswith(WORKER_PREFIX):
                continue
            wid = name[len(WORKER_PREFIX):]
            if wid in self.handles:
                continue
            try:
                handle = ray.get_actor(name, namespace=RAY_NAMESPACE)
                rep = await asyncio.wait_for(handle.info.remote(), 10.0)
            except Exception:  # noqa: BLE001 - gone or not started: nothing to adopt
                continue
            self.table.report(WorkerReport.from_dict(rep), time.monotonic())
            self._adopt(wid, handle)
            self._event("adopted", wid, url=rep.get("url"))

    def _adopt(self, worker_id: str, handle: Any) -> None:
        self.handles[worker_id] = handle
        asyncio.ensure_future(self._watch(worker_id, handle))

    async def _watch(self, worker_id: str, handle: Any) -> None:
        try:
            await handle.wait_closed.remote()
            self._forget(worker_id, "retired")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ActorDiedError and kin: the process is gone
            self._forget(worker_id, "retired" if worker_id in self.retiring else "died",
                         error=type(exc).__name__)

    def _forget(self, worker_id: str, kind: str, **extra: Any) -> None:
        if worker_id not in self.handles and worker_id not in self.table.records:
            return  # already forgotten (a retired worker's watch ends after it)
        rec = self.table.remove(worker_id)
        self.handles.pop(worker_id, None)
        self.retiring.discard(worker_id)
        self._event(kind, worker_id, streams=len(rec.report.streams) if rec else 0, **extra)

    async def _control_step(self) -> None:
        now = time.monotonic()
        for rec in self.table.stale(now):
            if now - rec.last_seen > self.settings.kill_after_s and rec.worker_id in self.handles:
                # hung for long: free its node slot; its streams have moved on long ago
                ray.kill(self.handles[rec.worker_id], no_restart=True)
                self._forget(rec.worker_id, "killed_unresponsive")
        for rec in list(self.table.records.values()):
            if (rec.draining and rec.report.sessions == 0 and self.table.is_live(rec, now)
                    and rec.worker_id not in self.retiring):
                asyncio.ensure_future(self._retire(rec))
        if self.stopped:
            return
        active = self.table.admitting(now)
        n_active = len(active) + len(self.starting)
        want = self.planner.desired(now, self.table.total_streams(now), n_active)
        if want > n_active:
            self._grow(want - n_active, now)
        elif want < n_active and len(active) > 0:
            for wid in choose_drain(active, min(len(active), n_active - want)):
                self.table.set_draining(wid, True, now)
                self._event("drain", wid, reason="scale_down")

    def _grow(self, n: int, now: float) -> None:
        # a draining worker is taken back first: it is warm and still holds calls
        draining = sorted((r for r in self.table.live(now) if r.draining and r.worker_id not in self.retiring),
                          key=lambda r: -r.report.sessions)
        for rec in draining[:n]:
            self.table.set_draining(rec.worker_id, False, now)
            self._event("undrain", rec.worker_id, reason="scale_up")
            n -= 1
        for _ in range(n):
            self._spawn()

    def _spawn(self) -> None:
        s = self.settings
        worker_id = uuid.uuid4().hex[:10]
        name = WORKER_PREFIX + worker_id
        env = {"AURALINK_SECRET_FILE": s.secret_file} if s.secret_file else {}
        handle = BridgeWorker.options(
            name=name, namespace=RAY_NAMESPACE, lifetime="detached", max_restarts=0,
            num_cpus=s.worker_num_cpus, resources=dict(s.worker_resources),
            runtime_env={"env_vars": env} if env else None,
        ).remote(worker_id, name, asdict(s.worker))
        self.starting[worker_id] = asyncio.ensure_future(self._start(worker_id, handle))
        self._event("starting", worker_id)

    async def _start(self, worker_id: str, handle: Any) -> None:
        try:
            rep = await asyncio.wait_for(handle.start.remote(), self.settings.start_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed start is logged and retried by the loop
            self.starting.pop(worker_id, None)
            ray.kill(handle, no_restart=True)
            self._event("start_failed", worker_id, error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self.table.report(WorkerReport.from_dict(rep), time.monotonic())
        self.starting.pop(worker_id, None)
        self._adopt(worker_id, handle)
        self._event("joined", worker_id, url=rep["url"])

    async def _retire(self, rec: WorkerRecord) -> None:
        handle = self.handles.get(rec.worker_id)
        if handle is None:
            return
        self.retiring.add(rec.worker_id)
        try:
            done = await asyncio.wait_for(handle.retire.remote(), 30.0)
        except Exception:  # noqa: BLE001 - dead already: the watch forgets it
            done = True
        if not done:  # a session arrived meanwhile: keep draining
            self.retiring.discard(rec.worker_id)
            return
        self._forget(rec.worker_id, "retired")
        ray.kill(handle, no_restart=True)


# ---- driver-side helpers (CLI, tests) ---------------------------------------------------


def get_or_create_registry(settings: FleetSettings | None = None) -> Any:
    """The cluster's registry: detached, named, restarted by Ray if its process dies. On the
    head node where there is one (`node:__internal_head__`): it must outlive worker nodes."""
    s = settings or FleetSettings()
    return BridgeRegistry.options(
        name=REGISTRY_NAME, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=3, max_concurrency=1000,
    ).remote(s.to_dict())


def get_registry() -> Any:
    return ray.get_actor(REGISTRY_NAME, namespace=RAY_NAMESPACE)


async def wait_for_workers(registry: Any, n: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """Until `n` workers are active (serving, not draining); their status then."""
    end = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < end:
        status = await registry.status.remote()
        if sum(w["state"] == "active" for w in status["workers"]) >= n and not status["starting"]:
            return status
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{n} bridge workers not active after {timeout_s:.0f} s: {status}")


__all__ = [
    "BRIDGE_RESOURCE", "REGISTRY_NAME", "BridgeRegistry", "BridgeWorker", "FleetSettings",
    "RouteKind", "WorkerSettings", "get_or_create_registry", "get_registry", "wait_for_workers",
]
