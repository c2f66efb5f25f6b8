"""The bridge registry: one detached named Ray actor (`auralink-bridge-registry` in the
`auralink` namespace, restarted by Ray if its process dies) that knows the cluster's bridge
workers (sfu_bridge/cluster_bridge.py), answers their routing questions, and controls the
fleet's size.

- **Table.** The `WorkerTable` of sfu_bridge/fleet.py: who is live, who owns which stream
  (workers report at once when a publisher comes or goes, and every `heartbeat_s`), who drains.
- **Routing.** `route(stream, kind, asking)`: the worker a WHIP/WHEP POST must go to.
- **Control loop** (every `control_interval_s`): the forecast planner of autoscaling/fleet.py
  says how many workers; new ones are started as detached actors that ask for one
  `auralink_bridge` resource (so the Ray autoscaler adds bridge nodes), a scale-down drains
  the workers with the fewest sessions, a draining worker with no session left is retired,
  a scale-up takes draining workers back first.
- **Deaths.** Each worker has a `wait_closed` call pending that Ray fails as soon as its
  process is gone: the worker is dropped at once, and its streams' publishers republish
  through any URL onto a survivor. A worker whose reports stop for `dead_after_s` owns
  nothing (hung or cut off), and is killed after `kill_after_s`.
- **Restarts.** A new registry process takes the running workers back (from the named
  actors, and from their next report); it starts from the settings it was created with
  (`auralink bridges up` again, or `scale`, re-applies an operator's change).

Why actors and not a Serve deployment: docs/operations.md, section 6.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import ray

from autoscaling.fleet import FleetPlanner, FleetScaling, pinned
from deployments.config import RAY_NAMESPACE
from sfu_bridge.cluster_bridge import BridgeWorker, WorkerSettings
from sfu_bridge.fleet import (
    BRIDGE_RESOURCE,
    REGISTRY_NAME,
    WORKER_PREFIX,
    SignalKind,
    WorkerRecord,
    WorkerReport,
    WorkerTable,
    choose_drain,
)

logger = logging.getLogger(__name__)


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
    # A stream's owner holding this many sessions sends its new subscribers to other workers,
    # which follow the stream from its relay (sfu_bridge/fleet.py, "Cascading"; 0: never).
    # At ~17 us of fan-out per subscriber and 40 ms tick (docs/benchmarks.md, bridge), 400
    # subscribers cost the owner about a sixth of a core.
    cascade_after_sessions: int = 400

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


@ray.remote(num_cpus=0)
class BridgeRegistry:
    """The fleet's registry and controller (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = FleetSettings.from_dict(settings)
        self.table = WorkerTable(self.settings.dead_after_s, self.settings.cascade_after_sessions)
        self.planner = FleetPlanner(self.settings.scaling)
        self.handles: dict[str, Any] = {}
        self.starting: dict[str, asyncio.Task] = {}
        self._starting_handles: dict[str, Any] = {}  # detached: killed by `shutdown` too
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
        now = time.monotonic()
        rec = self.table.report(report, now)
        # where the streams it follows are published now (a publisher that moved: follow it)
        owners = self.table.relay_owners(report.relayed, report.worker_id, now)
        return {"draining": rec.draining, "owners": owners,
                "cascade_after": self.settings.cascade_after_sessions}

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
                "relayed": dict(r.relayed),  # streams it follows -> its subscribers of them
            })
        return {
            "workers": workers,
            "starting": sorted(self.starting),
            "streams": self.table.total_streams(now),
            "scaling": asdict(self.settings.scaling),
            "cascade_after_sessions": self.settings.cascade_after_sessions,
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
        # a worker still starting is a detached actor too: left alone, it would outlive the
        # fleet (and the next registry would take it back, with this fleet's settings)
        for handle in list(self._starting_handles.values()):
            ray.kill(handle, no_restart=True)
            n += 1
        self._starting_handles.clear()
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
        # Ray starts its workers at nice 15, where anything else on the node at nice 0 takes
        # ~28x their CPU share: a worker serves real-time media, so it runs at the node's own
        # priority (Ray's job supervisor is started so too).
        env = {"RAY_worker_niceness": "0"}
        if s.secret_file:
            env["AURALINK_SECRET_FILE"] = s.secret_file
        handle = BridgeWorker.options(
            name=name, namespace=RAY_NAMESPACE, lifetime="detached", max_restarts=0,
            num_cpus=s.worker_num_cpus, resources=dict(s.worker_resources),
            runtime_env={"env_vars": env},
        ).remote(worker_id, name, asdict(s.worker))
        self._starting_handles[worker_id] = handle
        self.starting[worker_id] = asyncio.ensure_future(self._start(worker_id, handle))
        self._event("starting", worker_id)

    async def _start(self, worker_id: str, handle: Any) -> None:
        try:
            rep = await asyncio.wait_for(handle.start.remote(), self.settings.start_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed start is logged and retried by the loop
            self.starting.pop(worker_id, None)
            self._starting_handles.pop(worker_id, None)
            ray.kill(handle, no_restart=True)
            self._event("start_failed", worker_id, error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self.table.report(WorkerReport.from_dict(rep), time.monotonic())
        self.starting.pop(worker_id, None)
        self._starting_handles.pop(worker_id, None)
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
