"""How many bridge workers the streams need: the codec replicas' forecast policy
(`autoscaling.policy.plan`: Holt trend over the stream count, a warm-up ahead, headroom,
downscale hysteresis) with a bridge worker as the replica, applied by the bridge registry
(cluster/bridge_registry.py). Pure, no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from autoscaling.policy import ClusterSample, PolicyConfig, plan


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
