"""Predictive Serve autoscaling policy for codec replicas.

Serve's default policy scales on ongoing requests per replica. For a codec replica that signal
is weak: a bridge sends one request per tick whatever the number of streams in it, and an
overloaded replica sheds frames (fallback) instead of queueing them, so the request count
saturates exactly when more replicas are needed. And a GPU replica needs tens of seconds to
become ready, far longer than a 40 ms frame; capacity must be asked for before the streams
arrive. This policy therefore scales on what the replicas report about streams
(`record_autoscaling_stats`, keys in `ReplicaMetric`):

* **forecast** - Holt's linear trend over the stream count (`autoscaling.forecast`), read one
  replica warm-up ahead: replicas for `max(now, level + trend * warmup_s)` streams at
  `target_occupancy`, plus `headroom`;
* **pressure** - a replica whose deadline miss rate or deadline slack crosses its threshold
  shows that its real capacity is below the configured one (a slower GPU, noisy neighbour):
  the policy plans with what was observed under pressure (times `pressure_backoff`), which
  always asks for more replicas than are reporting; the estimate recovers after
  `pressure_memory_s` without pressure;
* **slots** - never fewer replicas than needed to hold every stream's state;
* downscaling only when the forecast fits with `downscale_hysteresis` to spare (Serve's
  `downscale_delay_s` then applies on top).

`plan(window, current, config)` / `desired_replicas(...)` are pure; `StreamForecastPolicy`
is the thin class Serve instantiates from `serve_config.yaml`:

    autoscaling_config:
      policy:
        policy_function: autoscaling.policy:StreamForecastPolicy
        policy_kwargs: {streams_per_replica: 256, warmup_s: 45}
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from autoscaling.forecast import HoltParams, holt_fit


class ReplicaMetric(str, enum.Enum):
    """Keys a codec replica returns from `record_autoscaling_stats()` (all floats).

    `deployments/replica.py` reports these; `slot_capacity` is optional (derived from
    `slots_in_use / slot_occupancy` when absent).
    """

    STREAMS = "slots_in_use"  # streams holding state on this replica
    SLOT_OCCUPANCY = "slot_occupancy"  # slots_in_use / slot capacity
    SLOT_CAPACITY = "slot_capacity"  # stream slots this replica has
    MISS_RATE = "miss_rate"  # share of recent frames that missed their deadline
    DEADLINE_SLACK_MS = "deadline_slack_p10_ms"  # p10 of (deadline - completion), met frames


class DecisionReason(str, enum.Enum):
    NO_DATA = "no_data"  # nothing reported yet: keep the current target
    FORECAST = "forecast"  # replicas for the forecast stream count
    PRESSURE = "pressure"  # misses / low slack lowered the capacity estimate
    SLOTS = "slots"  # slot capacity is the binding limit
    HOLD = "hold"  # inside the downscale hysteresis band


@dataclass(frozen=True)
class ClusterSample:
    """One observation of the whole deployment, built from the replicas' latest reports."""

    t: float  # wall-clock seconds of the newest report
    streams: float  # total over reporting replicas
    replicas: int  # replicas that reported
    slot_capacity: float = 0.0  # slots per replica (smallest reported); 0 = unknown
    miss_rate: float = 0.0  # stream-weighted mean over replicas
    min_slack_ms: float = math.inf  # smallest reported slack; inf = unknown


MetricsWindow = Sequence[ClusterSample]  # oldest first


@dataclass(frozen=True)
class PolicyConfig:
    streams_per_replica: float = 256.0  # streams one replica serves within the deadline
    target_occupancy: float = 0.8  # fraction of that capacity to plan for
    headroom: float = 0.1  # extra capacity on top of the forecast
    warmup_s: float = 45.0  # decision -> replica ready (node start, model load, warm-up)
    level_tau_s: float = 3.0  # Holt level time constant
    trend_tau_s: float = 30.0  # Holt trend time constant: longer = a burst moves it less
    trend_damping_s: float | None = 45.0  # extrapolate at most trend * this (None: undamped)
    max_miss_rate: float = 0.005  # above this share of missed frames a replica is under pressure
    min_slack_ms: float = 2.0  # below this p10 deadline slack a replica is under pressure
    pressure_backoff: float = 0.85  # capacity estimate = observed per-replica load * backoff
    pressure_memory_s: float = 120.0  # how long a pressure observation lowers capacity
    downscale_hysteresis: float = 0.15  # scale down only if the forecast fits with this margin
    window_s: float = 300.0  # history kept between calls
    sample_interval_s: float = 0.5  # keep at most one sample per this interval (many replicas
    # push at different moments; the control loop runs every 0.1 s)
    min_replicas: int = 1
    max_replicas: int = 1000

    def __post_init__(self) -> None:
        if self.streams_per_replica <= 0:
            raise ValueError("streams_per_replica must be positive")
        if not 0 < self.target_occupancy <= 1:
            raise ValueError("target_occupancy must be in (0, 1]")
        if not 0 < self.pressure_backoff <= 1:
            raise ValueError("pressure_backoff must be in (0, 1]")
        if self.headroom < 0 or self.warmup_s < 0 or self.downscale_hysteresis < 0:
            raise ValueError("headroom, warmup_s and downscale_hysteresis must be >= 0")
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> PolicyConfig:
        """Build from `policy_kwargs`; unknown keys are an error (typos must not be silent)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown autoscaling policy option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


@dataclass(frozen=True)
class Decision:
    replicas: int
    forecast_streams: float
    capacity_per_replica: float
    reason: DecisionReason


def under_pressure(s: ClusterSample, config: PolicyConfig) -> bool:
    return s.miss_rate > config.max_miss_rate or s.min_slack_ms < config.min_slack_ms


def effective_capacity(window: MetricsWindow, config: PolicyConfig) -> float:
    """Streams per replica to plan with: configured, lowered by recent pressure observations."""
    cap = config.streams_per_replica
    if not window:
        return cap
    now = window[-1].t
    for s in window:
        if now - s.t <= config.pressure_memory_s and s.replicas > 0 and under_pressure(s, config):
            observed = s.streams / s.replicas
            if observed > 0:
                # planned load is cap * target_occupancy; keep what was seen under pressure
                # at or above that line, so the plan stays below the observed limit
                cap = min(cap, observed * config.pressure_backoff / config.target_occupancy)
    return max(cap, 1.0)


def plan(window: MetricsWindow, current: int, config: PolicyConfig) -> Decision:
    """Replicas wanted now, given the recent samples and the current target."""

    def clamp(n: int) -> int:
        return max(config.min_replicas, min(config.max_replicas, n))

    if not window:
        return Decision(clamp(current), 0.0, config.streams_per_replica, DecisionReason.NO_DATA)
    last = window[-1]
    holt = holt_fit(((s.t, s.streams) for s in window), HoltParams(config.level_tau_s, config.trend_tau_s))
    assert holt is not None
    # Departures are not anticipated: a stream that leaves early costs nothing, one that
    # arrives without capacity falls back.
    forecast = max(last.streams, holt.forecast(config.warmup_s, config.trend_damping_s))
    cap = effective_capacity(window, config)
    need = forecast * (1.0 + config.headroom) / (cap * config.target_occupancy)
    desired = math.ceil(need - 1e-9)
    # No "+1 while under pressure" rule: the control loop runs every 0.1 s and pressure lasts
    # until new replicas are ready, so such a rule would add a replica per tick. Lowering the
    # capacity estimate gives a bounded answer that does not depend on the current target.
    reason = DecisionReason.PRESSURE if cap < config.streams_per_replica else DecisionReason.FORECAST
    if last.slot_capacity > 0:
        by_slots = math.ceil(forecast * (1.0 + config.headroom) / last.slot_capacity - 1e-9)
        if by_slots > desired:
            desired, reason = by_slots, DecisionReason.SLOTS
    if desired < current:
        # Band [need, need * (1 + hysteresis)]: inside it, keep the current target; below
        # it, go straight to `need` (not to the band's top, which would keep the margin
        # as permanent over-provisioning).
        with_margin = math.ceil(need * (1.0 + config.downscale_hysteresis) - 1e-9)
        if with_margin >= current:
            desired, reason = current, DecisionReason.HOLD
    return Decision(clamp(desired), forecast, cap, reason)


def desired_replicas(window: MetricsWindow, current: int, config: PolicyConfig) -> int:
    return plan(window, current, config).replicas


# ---- Serve glue ---------------------------------------------------------------------------

_STATE_KEY = "auralink_window"


def _latest(series: Any) -> tuple[float, float] | None:
    """Newest (timestamp, value) of a Serve TimeSeries (list of TimeStampedValue)."""
    if not series:
        return None
    newest = max(series, key=lambda p: p.timestamp)
    return float(newest.timestamp), float(newest.value)


def sample_from_metrics(
    raw: Mapping[str, Mapping[Any, Any]] | None, replicas: Sequence[Any]
) -> ClusterSample | None:
    """Aggregate the replicas' newest custom metrics into one `ClusterSample`."""
    if not raw or ReplicaMetric.STREAMS.value not in raw:
        return None
    per_metric = {m: raw.get(m.value, {}) for m in ReplicaMetric}
    t_max, streams, n, slots, weighted_miss, slack = -math.inf, 0.0, 0, math.inf, 0.0, math.inf
    for rid in replicas:
        latest = _latest(per_metric[ReplicaMetric.STREAMS].get(rid))
        if latest is None:
            continue
        t, s = latest
        t_max, streams, n = max(t_max, t), streams + s, n + 1
        if (v := _latest(per_metric[ReplicaMetric.SLOT_CAPACITY].get(rid))) is not None:
            slots = min(slots, v[1])
        elif (v := _latest(per_metric[ReplicaMetric.SLOT_OCCUPANCY].get(rid))) is not None and v[1] > 0:
            slots = min(slots, round(s / v[1]))
        if (v := _latest(per_metric[ReplicaMetric.MISS_RATE].get(rid))) is not None:
            weighted_miss += v[1] * s
        if (v := _latest(per_metric[ReplicaMetric.DEADLINE_SLACK_MS].get(rid))) is not None:
            slack = min(slack, v[1])
    if n == 0:
        return None
    return ClusterSample(
        t=t_max,
        streams=streams,
        replicas=n,
        slot_capacity=0.0 if math.isinf(slots) else slots,
        miss_rate=weighted_miss / streams if streams > 0 else 0.0,
        min_slack_ms=slack,
    )


def _encode(window: Sequence[ClusterSample]) -> list[list[float]]:
    # policy_state lives in the Serve controller: plain lists of floats, no custom types
    return [[s.t, s.streams, s.replicas, s.slot_capacity, s.miss_rate, s.min_slack_ms] for s in window]


def _decode(rows: Any) -> list[ClusterSample]:
    return [ClusterSample(r[0], r[1], int(r[2]), r[3], r[4], r[5]) for r in rows or []]


class StreamForecastPolicy:
    """Serve custom autoscaling policy (class form, instantiated once with `policy_kwargs`)."""

    def __init__(self, **kwargs: Any) -> None:
        self.config = PolicyConfig.from_kwargs(kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        window = _decode(state.get(_STATE_KEY))
        sample = sample_from_metrics(ctx.raw_metrics, ctx.running_replicas)
        if sample is None and not window:
            # Replicas without `record_autoscaling_stats`: behave like Serve's default.
            from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

            return replica_queue_length_autoscaling_policy(ctx)
        if sample is not None and (not window or sample.t >= window[-1].t + self.config.sample_interval_s):
            window.append(sample)
        horizon = window[-1].t - self.config.window_s
        window = [s for s in window if s.t >= horizon]
        config = replace(
            self.config,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=max(ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas),
        )
        decision = plan(window, ctx.target_num_replicas, config)
        state[_STATE_KEY] = _encode(window)
        state["auralink_last_decision"] = {k: (v.value if isinstance(v, enum.Enum) else v)
                                           for k, v in asdict(decision).items()}
        _record(ctx.deployment_name, decision)
        return decision.replicas, state


def _record(deployment: str, decision: Decision) -> None:
    from telemetry.metrics import set_autoscale_decision

    set_autoscale_decision(deployment, decision.forecast_streams, decision.replicas)
