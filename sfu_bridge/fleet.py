"""Bridge workers in the cluster, the pure part: which worker owns a stream, where a new
stream goes, which workers drain on a scale-down, how many workers the streams need.

No Ray, no network: `sfu_bridge/cluster_bridge.py` runs this inside the registry actor and
the worker processes; tests drive it with plain values.

- **Ownership.** The worker that holds a stream's publisher owns the stream; every WHIP and
  WHEP request for it must land there (publisher and subscribers meet on one worker). A
  stream reported by two workers (its publisher moved while the old session was still
  winding down) belongs to the newest publisher.
- **Placement.** A stream no worker holds goes to the rendezvous-hash winner among the live
  workers that admit new streams (`deployments.affinity`, the codec replicas' hashing): any
  worker asked about it names the same one, so two requests for a new stream arriving at
  different workers meet; a worker joining or leaving moves only ~1/N of the new streams.
- **Liveness.** A worker is live while its reports keep coming (`dead_after_s`); one that
  stops reporting (hung, partitioned, or dead before Ray says so) owns nothing, so its
  publishers can republish at once and land on a survivor.
- **Draining.** A draining worker admits no new stream; its live streams (publishers and new
  subscribers of them) stay until their sessions end, then it retires.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from autoscaling.policy import ClusterSample, PolicyConfig, plan
from deployments.affinity import owner as rendezvous_owner

# Custom resource a node offers per bridge worker it may run (ray_cluster.yaml's bridge node
# type; `auralink up` gives the local head some). A worker asks for one, so the Ray
# autoscaler starts a bridge node when workers are wanted and none has room.
BRIDGE_RESOURCE = "auralink_bridge"


class SignalKind(str, enum.Enum):
    PUBLISH = "whip"
    SUBSCRIBE = "whep"


class RouteKind(str, enum.Enum):
    LOCAL = "local"  # the asking worker handles it
    REDIRECT = "redirect"  # another worker does: 307 (or forward) to its URL
    REFUSE = "refuse"  # nobody can: 503 with Retry-After, or 404 for a stream nobody holds


class RouteReason(str, enum.Enum):
    OWNER = "owner"  # the worker holding the stream's publisher
    PLACED = "placed"  # a new stream's rendezvous placement
    NO_WORKER = "no_worker"  # no live worker admits new streams (all draining / none)
    NO_PUBLISHER = "no_publisher"  # a WHEP request for a stream nobody publishes


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    reason: RouteReason
    worker_id: str | None = None
    url: str | None = None  # public base URL of the worker (clients are sent there)
    internal_url: str | None = None  # base URL inside the cluster (requests forwarded there)
    retry_after_s: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "reason": self.reason.value, "worker_id": self.worker_id,
                "url": self.url, "internal_url": self.internal_url,
                "retry_after_s": self.retry_after_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Route:
        return cls(RouteKind(d["kind"]), RouteReason(d["reason"]), d.get("worker_id"),
                   d.get("url"), d.get("internal_url"), int(d.get("retry_after_s") or 0))


@dataclass(frozen=True)
class WorkerReport:
    """What a worker tells the registry, on every change of its streams and periodically."""

    worker_id: str
    actor_name: str
    url: str  # public base URL, e.g. http://203.0.113.7:8100
    internal_url: str  # base URL on the cluster network
    node_ip: str
    pid: int
    streams: Mapping[str, float] = field(default_factory=dict)  # stream -> published at (unix s)
    sessions: int = 0  # publishers + subscribers
    draining: bool = False  # the worker's own view (the registry's is authoritative)
    seq: int = 0  # reports of one worker are numbered: an older one never overwrites a newer
    started_at: float = 0.0
    counters: Mapping[str, int] = field(default_factory=dict)  # routing decisions, refusals

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
                for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerReport:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class WorkerRecord:
    report: WorkerReport
    last_seen: float  # registry clock (monotonic) of the newest report
    draining: bool = False  # registry's decision
    drain_since: float | None = None

    @property
    def worker_id(self) -> str:
        return self.report.worker_id


class WorkerTable:
    """The registry's view of the bridge workers (one instance, in the registry actor)."""

    def __init__(self, dead_after_s: float = 3.0) -> None:
        if dead_after_s <= 0:
            raise ValueError("dead_after_s must be positive")
        self.dead_after_s = dead_after_s
        self.records: dict[str, WorkerRecord] = {}

    # -- updates -----------------------------------------------------------------------
    def report(self, rep: WorkerReport, now: float) -> WorkerRecord:
        rec = self.records.get(rep.worker_id)
        if rec is None:
            rec = self.records[rep.worker_id] = WorkerRecord(rep, now, draining=rep.draining,
                                                             drain_since=now if rep.draining else None)
        elif rep.seq >= rec.report.seq:
            rec.report = rep
            rec.last_seen = now
        return rec

    def remove(self, worker_id: str) -> WorkerRecord | None:
        return self.records.pop(worker_id, None)

    def set_draining(self, worker_id: str, draining: bool, now: float) -> bool:
        rec = self.records.get(worker_id)
        if rec is None:
            return False
        if draining and not rec.draining:
            rec.drain_since = now
        if not draining:
            rec.drain_since = None
        rec.draining = draining
        return True

    # -- views -------------------------------------------------------------------------
    def is_live(self, rec: WorkerRecord, now: float) -> bool:
        return now - rec.last_seen <= self.dead_after_s

    def live(self, now: float) -> list[WorkerRecord]:
        return [r for r in self.records.values() if self.is_live(r, now)]

    def admitting(self, now: float) -> list[WorkerRecord]:
        """Live workers that take new streams."""
        return [r for r in self.live(now) if not r.draining]

    def stale(self, now: float) -> list[WorkerRecord]:
        return [r for r in self.records.values() if not self.is_live(r, now)]

    def owner_of(self, stream: str, now: float) -> WorkerRecord | None:
        best: WorkerRecord | None = None
        for rec in self.live(now):
            since = rec.report.streams.get(stream)
            if since is not None and (best is None or since > best.report.streams[stream]):
                best = rec
        return best

    def place(self, stream: str, now: float) -> WorkerRecord | None:
        candidates = {r.worker_id: r for r in self.admitting(now)}
        winner = rendezvous_owner(stream, sorted(candidates))
        return None if winner is None else candidates[winner]

    def route(self, stream: str, kind: SignalKind, asking: str | None, now: float,
              retry_after_s: int = 2) -> Route:
        """Where a WHIP/WHEP POST for `stream` that reached worker `asking` must go."""
        rec = self.owner_of(stream, now)
        reason = RouteReason.OWNER
        if rec is None:
            if kind is SignalKind.SUBSCRIBE:
                return Route(RouteKind.REFUSE, RouteReason.NO_PUBLISHER)
            rec, reason = self.place(stream, now), RouteReason.PLACED
            if rec is None:
                return Route(RouteKind.REFUSE, RouteReason.NO_WORKER, retry_after_s=retry_after_s)
        if rec.worker_id == asking:
            return Route(RouteKind.LOCAL, reason, rec.worker_id, rec.report.url, rec.report.internal_url)
        return Route(RouteKind.REDIRECT, reason, rec.worker_id, rec.report.url, rec.report.internal_url)

    def total_streams(self, now: float) -> int:
        return len({s for r in self.live(now) for s in r.report.streams})


def choose_drain(records: Iterable[WorkerRecord], n: int) -> list[str]:
    """The `n` workers to drain: fewest sessions first (they retire soonest and move the
    fewest calls' worth of load), then the youngest."""
    if n <= 0:
        return []
    ranked = sorted(records, key=lambda r: (r.report.sessions, -r.report.started_at, r.worker_id))
    return [r.worker_id for r in ranked[:n]]


# ---- scaling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetScaling:
    """How many bridge workers: the codec replicas' forecast policy (autoscaling.policy.plan)
    run on published streams, with a worker as the replica. `min_workers == max_workers`
    pins the size."""

    min_workers: int = 1
    max_workers: int = 8
    streams_per_worker: float = 200.0  # what one worker holds (auralink bench bridge)
    target_occupancy: float = 0.8
    headroom: float = 0.1
    warmup_s: float = 10.0  # decision -> worker serving (actor start; a new node: minutes)
    downscale_delay_s: float = 60.0  # a lower need must hold this long before a drain
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError("need 0 <= min_workers <= max_workers")
        if self.streams_per_worker <= 0 or self.downscale_delay_s < 0:
            raise ValueError("streams_per_worker must be positive, downscale_delay_s >= 0")

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            streams_per_replica=self.streams_per_worker, target_occupancy=self.target_occupancy,
            headroom=self.headroom, warmup_s=self.warmup_s, window_s=self.window_s,
            sample_interval_s=0.5, min_replicas=self.min_workers, max_replicas=self.max_workers,
        )

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> FleetScaling:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown bridge scaling option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


class FleetPlanner:
    """Desired worker count over time: the forecast policy's answer, applied at once upward
    and only after `downscale_delay_s` of a lower answer downward (a worker start is cheap,
    but a drain holds a worker until its last call ends)."""

    def __init__(self, scaling: FleetScaling) -> None:
        self.scaling = scaling
        self.window: list[ClusterSample] = []
        self._lower_since: float | None = None

    def reconfigure(self, scaling: FleetScaling) -> None:
        self.scaling = scaling
        self._lower_since = None

    def desired(self, now: float, streams: int, active: int) -> int:
        s = self.scaling
        sample = ClusterSample(t=now, streams=float(streams), replicas=max(active, 1))
        if not self.window or now >= self.window[-1].t + 0.5:
            self.window.append(sample)
        self.window = [x for x in self.window if x.t >= now - s.window_s]
        want = plan(self.window, active, s.policy()).replicas
        want = max(s.min_workers, min(s.max_workers, want))
        if want >= active:
            self._lower_since = None
            return want
        if self._lower_since is None:
            self._lower_since = now
        if now - self._lower_since >= s.downscale_delay_s:
            return want
        return active


def pinned(scaling: FleetScaling, n: int) -> FleetScaling:
    """`scaling` held at exactly `n` workers (operator's `auralink bridges scale N`)."""
    n = max(0, int(n))
    return replace(scaling, min_workers=n, max_workers=n, downscale_delay_s=0.0)
