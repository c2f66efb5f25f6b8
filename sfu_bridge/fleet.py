"""Bridge workers in the cluster, the pure part: which worker owns a stream, where a new
stream goes, which workers drain on a scale-down.

No Ray, no network: the registry actor (cluster/bridge_registry.py) and the worker processes
(sfu_bridge/cluster_bridge.py) run it; tests drive it with plain values.

- **Ownership.** The worker that holds a stream's publisher owns the stream; every WHIP
  request for it, and WHEP requests until the owner is full (Cascading, below), land there. A
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
- **Cascading.** A stream's subscribers meet its publisher on the owner until the owner holds
  `cascade_after` sessions (0: never cascade). From then on a new subscriber goes to the
  asking worker, if it admits streams, runs a relay and holds fewer sessions than that, else
  to the admitting relay worker holding the fewest sessions (when it holds fewer than the
  owner). That worker follows the stream from the owner's relay (sfu_bridge/cascade.py: one
  batch per tick per worker) and fans it out locally. The sessions a worker is counted with
  are its last report's plus the subscribers routed to it since, so a burst of subscribers
  between two reports spreads too. A worker that follows a stream reports it under
  `relayed`, never as a stream it owns.

How many workers the streams need is autoscaling/fleet.py's business.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from deployments.affinity import owner as rendezvous_owner

# Custom resource a node offers per bridge worker it may run (ray_cluster.yaml's bridge node
# type; `auralink up` gives the local head some). A worker asks for one, so the Ray
# autoscaler starts a bridge node when workers are wanted and none has room.
BRIDGE_RESOURCE = "auralink_bridge"
# The registry actor (cluster/bridge_registry.py) and the workers' actor names, in the
# `auralink` namespace: workers find the registry by name, nothing here imports it.
REGISTRY_NAME = "auralink-bridge-registry"
WORKER_PREFIX = "auralink-bridge-"


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
    CASCADE = "cascade"  # the owner is full: another worker serves it from the owner's relay


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    reason: RouteReason
    worker_id: str | None = None
    url: str | None = None  # public base URL of the worker (clients are sent there)
    internal_url: str | None = None  # base URL inside the cluster (requests forwarded there)
    retry_after_s: int = 0
    # CASCADE: the owner's relay (host, port), which the serving worker follows the stream from
    relay_addr: tuple[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "reason": self.reason.value, "worker_id": self.worker_id,
                "url": self.url, "internal_url": self.internal_url,
                "retry_after_s": self.retry_after_s,
                "relay_addr": list(self.relay_addr) if self.relay_addr else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Route:
        relay = d.get("relay_addr")
        return cls(RouteKind(d["kind"]), RouteReason(d["reason"]), d.get("worker_id"),
                   d.get("url"), d.get("internal_url"), int(d.get("retry_after_s") or 0),
                   (str(relay[0]), int(relay[1])) if relay else None)


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
    relay_addr: tuple[str, int] | list | None = None  # its cascade relay (UDP), if it runs one
    relayed: Mapping[str, int] = field(default_factory=dict)  # followed stream -> its subscribers here
    full: list[str] = field(default_factory=list)  # streams at its per-stream subscriber cap

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
    routed: int = 0  # subscribers cascaded to it since its last report

    @property
    def load(self) -> int:
        """Sessions it holds or will soon: its report's plus those routed to it since."""
        return self.report.sessions + self.routed

    @property
    def worker_id(self) -> str:
        return self.report.worker_id


class WorkerTable:
    """The registry's view of the bridge workers (one instance, in the registry actor)."""

    def __init__(self, dead_after_s: float = 3.0, cascade_after: int = 0) -> None:
        if dead_after_s <= 0:
            raise ValueError("dead_after_s must be positive")
        if cascade_after < 0:
            raise ValueError("cascade_after must be >= 0 (0: never cascade)")
        self.dead_after_s = dead_after_s
        self.cascade_after = cascade_after
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
            rec.routed = 0
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
        if kind is SignalKind.SUBSCRIBE and reason is RouteReason.OWNER:
            to = self._cascade_to(rec, stream, asking, now)
            if to is not None:
                local = to.worker_id == asking
                if local or stream in to.report.relayed:
                    to.routed += 1  # (a worker redirected to asks again unless it follows already)
                relay = rec.report.relay_addr
                assert relay is not None
                return Route(RouteKind.LOCAL if local else RouteKind.REDIRECT, RouteReason.CASCADE,
                             to.worker_id, to.report.url, to.report.internal_url,
                             relay_addr=(str(relay[0]), int(relay[1])))
            rec.routed += 1  # the owner serves it without asking again
        if rec.worker_id == asking:
            return Route(RouteKind.LOCAL, reason, rec.worker_id, rec.report.url, rec.report.internal_url)
        return Route(RouteKind.REDIRECT, reason, rec.worker_id, rec.report.url, rec.report.internal_url)

    def relay_owners(self, streams: Iterable[str], asking: str, now: float) -> dict[str, list]:
        """For the streams worker `asking` follows: the relay address of each one's owner now
        (a publisher that moved is followed at its new owner; none while nobody publishes it)."""
        out: dict[str, list] = {}
        for stream in streams:
            owner = self.owner_of(stream, now)
            if owner is not None and owner.worker_id != asking and owner.report.relay_addr:
                out[stream] = list(owner.report.relay_addr)
        return out

    def _cascade_to(self, owner: WorkerRecord, stream: str, asking: str | None,
                    now: float) -> WorkerRecord | None:
        """The worker a new subscriber of `owner`'s stream cascades to, or None (the owner
        serves it: it has room, runs no relay, or no other worker is less loaded). The owner
        has no room when it holds `cascade_after` sessions or the stream holds the worker's
        per-stream subscriber cap there (`WorkerReport.full`); a worker at that cap for the
        stream is never chosen. The asking worker keeps it while it has room or is the least
        loaded (so a redirected request is not sent on again); else a worker already following
        the stream with room; else the least loaded one."""
        owner_full = stream in owner.report.full  # it would refuse the subscriber (503)
        if (not self.cascade_after or not owner.report.relay_addr
                or (owner.load < self.cascade_after and not owner_full)):
            return None
        others = [r for r in self.admitting(now)
                  if r.worker_id != owner.worker_id and r.report.relay_addr and stream not in r.report.full]
        if not others:
            return None

        def better(r: WorkerRecord) -> bool:
            return owner_full or r.load < owner.load

        best = min(others, key=lambda r: (r.load, r.worker_id))
        here = next((r for r in others if r.worker_id == asking), None)
        if here is not None and (here.load < self.cascade_after or (here is best and better(here))):
            return here
        following = [r for r in others if stream in r.report.relayed and r.load < self.cascade_after]
        if following:
            return min(following, key=lambda r: (r.load, r.worker_id))
        return best if better(best) else None

    def total_streams(self, now: float) -> int:
        return len({s for r in self.live(now) for s in r.report.streams})


def choose_drain(records: Iterable[WorkerRecord], n: int) -> list[str]:
    """The `n` workers to drain: fewest sessions first (they retire soonest and move the
    fewest calls' worth of load), then the youngest."""
    if n <= 0:
        return []
    ranked = sorted(records, key=lambda r: (r.report.sessions, -r.report.started_at, r.worker_id))
    return [r.worker_id for r in ranked[:n]]
