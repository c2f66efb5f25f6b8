"""Evaluate autoscaling policies on a stream-count trace: replica-seconds vs frames lost.

    auralink bench autoscaling --json docs/bench/autoscaling.json   # cluster/bench/autoscaling.py

Steps, second by second, a trace of concurrent streams (a ramp to 10,000 with a joining
burst, a hold, a ramp down) through a model of a codec deployment and compares:

* `forecast` - this package's `StreamForecastPolicy` logic (`autoscaling.policy.plan`) fed
  the replica stats it gets in production (slots in use, miss rate, deadline slack);
* `queue_length` - Serve's default policy, run through Ray's own functions
  (`_core_replica_queue_length_policy`, `_apply_scaling_factors`, `_apply_delay_logic`),
  once with Serve's default delays/look-back and once with this project's serve_config
  delays.

Both see the same world: a replica serves `capacity` streams within the deadline; a new
replica is ready `start_latency_s` after it is asked for (and costs from that moment);
metrics reach the controller every `metrics_interval_s`. A stream beyond the ready capacity
falls back to the native codec for that second: `frames_fallback` counts those 40 ms frames.

The queue-length model is the default policy's best case: its signal (ongoing requests per
replica) is taken to be exactly proportional to load, scaled so that `target_ongoing_requests`
means the same target occupancy as the forecast policy's, and it saturates at
`queue_saturation` times that under overload (an overloaded codec replica sheds frames at
their deadline instead of queueing them). Its real signal also depends on how many bridges
send to a replica, which makes it worse, not better.

Pure Python (plus Ray's pure policy helpers); a full evaluation takes well under a second.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from autoscaling.policy import ClusterSample, PolicyConfig, plan

CHUNKS_PER_S = 25  # one frame (chunk) per stream every 40 ms
REPO = Path(__file__).resolve().parents[1]
CODEC_BENCH_JSON = REPO / "docs" / "bench" / "codec.json"
TRANSPORT_ALLOWANCE_MS = 4.0  # bridge -> replica -> bridge per tick, on top of the step


@dataclass(frozen=True)
class EventTrace:
    """Concurrent streams over time for a large event."""

    peak_streams: int = 10_000
    burst_streams: int = 2_000  # join within `burst_s` when the event starts
    ramp_s: float = 600.0  # floor -> peak - burst, people trickling in
    burst_s: float = 10.0
    hold_s: float = 600.0
    ramp_down_s: float = 300.0
    floor_streams: int = 500  # connected before the event and after it
    tail_s: float = 300.0

    @property
    def burst_at_s(self) -> float:
        return self.ramp_s

    @property
    def duration_s(self) -> float:
        return self.ramp_s + self.burst_s + self.hold_s + self.ramp_down_s + self.tail_s

    def streams(self, t: float) -> float:
        # the service is already running with `floor_streams` when the event ramp begins
        base = self.peak_streams - self.burst_streams
        if t < self.ramp_s:
            return self.floor_streams + (base - self.floor_streams) * t / self.ramp_s
        t -= self.ramp_s
        if t < self.burst_s:
            return base + self.burst_streams * t / self.burst_s
        t -= self.burst_s
        if t < self.hold_s:
            return float(self.peak_streams)
        t -= self.hold_s
        if t < self.ramp_down_s:
            return self.peak_streams + (self.floor_streams - self.peak_streams) * t / self.ramp_down_s
        return float(self.floor_streams)


    def describe(self) -> str:
        return (
            f"{self.floor_streams:,} to {self.peak_streams - self.burst_streams:,} streams over "
            f"{self.ramp_s:g} s, then {self.burst_streams:,} join within {self.burst_s:g} s "
            f"(peak {self.peak_streams:,}), hold {self.hold_s:g} s, down to "
            f"{self.floor_streams:,} over {self.ramp_down_s:g} s, {self.tail_s:g} s tail"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration_s": self.duration_s, "burst_at_s": self.burst_at_s}


@dataclass(frozen=True)
class ArrayTrace:
    """Any stream-count series, one value per `dt` seconds (e.g. from the simulator)."""

    values: tuple[float, ...]
    dt: float = 1.0
    burst_at_s: float = 0.0  # where to start measuring burst recovery

    @property
    def duration_s(self) -> float:
        return len(self.values) * self.dt

    @property
    def peak_streams(self) -> int:
        return int(max(self.values, default=0))

    def streams(self, t: float) -> float:
        return float(self.values[min(int(t / self.dt), len(self.values) - 1)])

    def describe(self) -> str:
        return (f"{len(self.values)} samples every {self.dt:g} s, {self.values[0]:,.0f} to peak "
                f"{self.peak_streams:,} streams, burst measured from {self.burst_at_s:g} s")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "array", "samples": len(self.values), "dt": self.dt,
                "peak_streams": self.peak_streams, "duration_s": self.duration_s,
                "burst_at_s": self.burst_at_s}


Trace = EventTrace | ArrayTrace


@dataclass(frozen=True)
class WorldConfig:
    capacity: float  # streams one replica serves within the deadline
    slots: int = 256  # streams one replica can hold state for
    start_latency_s: float = 60.0  # asked -> ready (node start, image, model load, warm-up)
    metrics_interval_s: float = 1.0  # replica stats push interval
    deadline_ms: float = 20.0
    dt: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 1000

    @property
    def served_per_replica(self) -> float:
        return min(self.capacity, float(self.slots))


@dataclass(frozen=True)
class ServeKnobs:
    """The autoscaling_config fields Serve applies around any policy."""

    upscale_delay_s: float
    downscale_delay_s: float
    look_back_period_s: float = 30.0
    target_ongoing_requests: float = 2.0
    queue_saturation: float = 1.25  # queue-length model only, see module docstring

    def serve_config(self, world: WorldConfig) -> Any:
        from ray.serve.config import AutoscalingConfig

        return AutoscalingConfig(
            min_replicas=world.min_replicas, max_replicas=world.max_replicas,
            upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s,
            look_back_period_s=self.look_back_period_s,
            target_ongoing_requests=self.target_ongoing_requests,
        )


@dataclass
class Observation:
    """What the replicas report at one metrics push."""

    t: float
    streams: float
    ready: int
    util: float  # load / capacity per ready replica
    sample: ClusterSample


@dataclass
class RunResult:
    policy: str
    knobs: dict[str, Any]
    replica_seconds: float = 0.0
    frames_total: float = 0.0
    frames_fallback: float = 0.0
    frames_fallback_from_burst: float = 0.0  # from the burst's start to the end
    peak_replicas: int = 0
    burst_recovery_s: float | None = None  # burst start -> no capacity fallback for 30 s
    timeline: list[tuple[float, float, int, int, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "knobs": self.knobs,
            "replica_seconds": round(self.replica_seconds),
            "replica_hours": round(self.replica_seconds / 3600, 2),
            "frames_total": round(self.frames_total),
            "frames_fallback_capacity": round(self.frames_fallback),
            "fallback_pct": round(100 * self.frames_fallback / max(self.frames_total, 1), 3),
            "frames_fallback_from_burst": round(self.frames_fallback_from_burst),
            "peak_replicas": self.peak_replicas,
            "burst_recovery_s": self.burst_recovery_s,
        }


Controller = Callable[[float, Observation | None, int, int], int]  # (t, obs, ready, target)


def observe(t: float, streams: float, ready: int, world: WorldConfig) -> Observation:
    per_replica_cap = world.served_per_replica * max(ready, 1)
    util = streams / per_replica_cap if per_replica_cap else math.inf
    missed = max(0.0, streams - per_replica_cap)
    sample = ClusterSample(
        t=t,
        streams=min(streams, world.slots * max(ready, 1)),
        replicas=max(ready, 1),
        slot_capacity=float(world.slots),
        miss_rate=missed / streams if streams > 0 else 0.0,
        # a linear queueing stand-in: p10 slack shrinks as the replica fills, 0 when full
        min_slack_ms=world.deadline_ms * max(0.0, 1.0 - util),
    )
    return Observation(t, streams, ready, util, sample)


def forecast_controller(world: WorldConfig, config: PolicyConfig, knobs: ServeKnobs) -> Controller:
    from ray.serve.autoscaling_policy import _apply_delay_logic, _apply_scaling_factors

    serve_cfg = knobs.serve_config(world)
    window: list[ClusterSample] = []
    state: dict[str, Any] = {}
    cfg = replace(config, min_replicas=world.min_replicas, max_replicas=world.max_replicas)

    def decide(t: float, obs: Observation | None, ready: int, target: int) -> int:
        nonlocal state
        if obs is not None:
            window.append(obs.sample)
            while window and window[0].t < t - cfg.window_s:
                window.pop(0)
        desired = plan(window, target, cfg).replicas
        desired = _apply_scaling_factors(desired, ready, serve_cfg) if ready else desired
        decided, state = _apply_delay_logic(desired, target, serve_cfg, state, _now=t)
        return max(world.min_replicas, min(world.max_replicas, decided))

    return decide


def queue_length_controller(world: WorldConfig, knobs: ServeKnobs, target_occupancy: float) -> Controller:
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import (
        _apply_delay_logic,
        _apply_scaling_factors,
        _core_replica_queue_length_policy,
    )
    from ray.serve.config import AutoscalingContext

    serve_cfg = knobs.serve_config(world)
    history: list[tuple[float, float]] = []  # (t, total ongoing requests)
    state: dict[str, Any] = {}
    dep = DeploymentID(name="CodecReplica", app_name="auralink")

    def decide(t: float, obs: Observation | None, ready: int, target: int) -> int:
        nonlocal state
        if obs is not None:
            per_replica = knobs.target_ongoing_requests * min(obs.util, knobs.queue_saturation) / target_occupancy
            history.append((t, per_replica * obs.ready))
        while history and history[0][0] < t - knobs.look_back_period_s:
            history.pop(0)
        if not history or ready == 0:
            return target
        total = sum(v for _, v in history) / len(history)  # Serve's MEAN aggregation
        ctx = AutoscalingContext(
            deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name,
            current_num_replicas=ready, target_num_replicas=target, running_replicas=[],
            total_num_requests=total, total_queued_requests=0.0, aggregated_metrics={},
            raw_metrics={}, capacity_adjusted_min_replicas=world.min_replicas,
            capacity_adjusted_max_replicas=world.max_replicas, policy_state=state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=t, config=serve_cfg,
        )
        desired, _ = _core_replica_queue_length_policy(ctx)
        desired = _apply_scaling_factors(desired, ready, serve_cfg)
        decided, state = _apply_delay_logic(desired, target, serve_cfg, state, _now=t)
        return max(world.min_replicas, min(world.max_replicas, decided))

    return decide


def simulate(trace: Trace, world: WorldConfig, name: str, knobs: dict[str, Any],
             controller: Controller, initial_replicas: int | None = None) -> RunResult:
    res = RunResult(policy=name, knobs=knobs)
    ready = target = max(world.min_replicas, initial_replicas or 0)
    starting: list[float] = []  # ready-at times
    next_push = 0.0
    clear_since: float | None = None
    steps = int(trace.duration_s / world.dt)
    for i in range(steps):
        t = i * world.dt
        starting.sort()
        while starting and starting[0] <= t:
            starting.pop(0)
            ready += 1
        streams = trace.streams(t)
        obs = None
        if t >= next_push:
            obs = observe(t, streams, ready, world)
            next_push = t + world.metrics_interval_s
        target = controller(t, obs, ready, target)
        have = ready + len(starting)
        if target > have:
            starting += [t + world.start_latency_s] * (target - have)
        elif target < have:
            drop = have - target
            cancel = min(drop, len(starting))
            starting = sorted(starting)[: len(starting) - cancel]  # cancel the latest first
            ready -= drop - cancel
        served = min(streams, ready * world.served_per_replica)
        lost = streams - served
        res.frames_total += streams * CHUNKS_PER_S * world.dt
        res.frames_fallback += lost * CHUNKS_PER_S * world.dt
        if t >= trace.burst_at_s:
            res.frames_fallback_from_burst += lost * CHUNKS_PER_S * world.dt
        res.replica_seconds += (ready + len(starting)) * world.dt
        res.peak_replicas = max(res.peak_replicas, ready + len(starting))
        if t >= trace.burst_at_s and res.burst_recovery_s is None:
            if lost < 0.5:
                clear_since = t if clear_since is None else clear_since
                if t - clear_since >= 30.0:
                    res.burst_recovery_s = round(clear_since - trace.burst_at_s, 1)
            else:
                clear_since = None
        if i % 10 == 0:
            res.timeline.append((t, round(streams), ready, len(starting), round(lost)))
    return res


def oracle(trace: Trace, world: WorldConfig, target_occupancy: float) -> dict[str, Any]:
    """Lower bound: replicas appear instantly, exactly enough at the target occupancy."""
    steps = int(trace.duration_s / world.dt)
    rs = sum(
        max(world.min_replicas, math.ceil(trace.streams(i * world.dt) / (world.served_per_replica * target_occupancy)))
        for i in range(steps)
    ) * world.dt
    return {"policy": "oracle (instant replicas, no fallback)", "replica_seconds": round(rs),
            "replica_hours": round(rs / 3600, 2), "frames_fallback_capacity": 0}


def capacity_from_profile(profile: dict[int, float], deadline_ms: float, margin_ms: float) -> int:
    """Largest batch whose step fits deadline - margin - transport allowance."""
    from deployments.config import profile_ms

    budget = deadline_ms - margin_ms - TRANSPORT_ALLOWANCE_MS
    if profile_ms(profile, 1) > budget:
        return 1
    lo, hi = 1, 2  # step time grows with the batch: double, then bisect
    while hi <= 1 << 20 and profile_ms(profile, hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if profile_ms(profile, mid) <= budget else (lo, mid)
    return lo


def resolve_capacity(args: argparse.Namespace) -> tuple[float, str]:
    if args.capacity is not None:
        return args.capacity, args.capacity_source or "given on the command line"
    path = Path(args.profile_json) if args.profile_json else CODEC_BENCH_JSON
    try:
        doc = json.loads(path.read_text())
        prof = {int(b): float(v["p50"] if isinstance(v, dict) else v)
                for b, v in doc["latency_profile_ms"].items()}
        device = doc.get("device") or doc.get("machine") or "unknown device"
    except (OSError, ValueError, KeyError, TypeError):
        if args.profile_json:
            raise SystemExit(f"no latency_profile_ms in {path}") from None
        return 256.0, ("assumed: the slot capacity in serve_config.yaml (256 streams per "
                       "replica), not a measured GPU rate")
    cap = capacity_from_profile(prof, args.deadline_ms, args.margin_ms)
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return float(cap), f"{rel} latency profile on {device} ({args.deadline_ms:g} ms deadline)"


def evaluate(capacity: float, capacity_source: str, start_latency_s: float = 60.0,
             trace: Trace | None = None, slots: int = 256,
             misconfigured_factor: float | None = 1.25) -> dict[str, Any]:
    """Every policy on one trace; `misconfigured_factor` adds a forecast run whose
    `streams_per_replica` is that much higher than what replicas really serve."""
    trace = trace or EventTrace()
    served = min(capacity, float(max(slots, math.ceil(capacity))))
    world = WorldConfig(capacity=capacity, slots=max(slots, int(math.ceil(capacity))),
                        start_latency_s=start_latency_s,
                        max_replicas=max(1000, math.ceil(2 * trace.peak_streams / served)))
    policy_cfg = PolicyConfig(streams_per_replica=world.served_per_replica, warmup_s=start_latency_s)
    occ = policy_cfg.target_occupancy
    runs: list[tuple[str, ServeKnobs, Controller]] = []
    # look_back_period_s does not matter to the forecast policy (it reads the newest stats)
    ours = ServeKnobs(upscale_delay_s=0.0, downscale_delay_s=120.0, look_back_period_s=30.0)
    runs.append(("forecast (StreamForecastPolicy)", ours, forecast_controller(world, policy_cfg, ours)))
    serve_default = ServeKnobs(upscale_delay_s=30.0, downscale_delay_s=600.0, look_back_period_s=30.0)
    runs.append(("queue_length (Serve default policy, default delays)", serve_default,
                 queue_length_controller(world, serve_default, occ)))
    tuned = ServeKnobs(upscale_delay_s=10.0, downscale_delay_s=120.0, look_back_period_s=30.0)
    runs.append(("queue_length (Serve default policy, serve_config delays)", tuned,
                 queue_length_controller(world, tuned, occ)))
    matched = ServeKnobs(upscale_delay_s=10.0, downscale_delay_s=120.0, look_back_period_s=30.0)
    runs.append(("queue_length (Serve default policy, serve_config delays, same headroom as forecast)",
                 matched, queue_length_controller(world, matched, occ / (1.0 + policy_cfg.headroom))))
    if misconfigured_factor:
        wrong = replace(policy_cfg, streams_per_replica=policy_cfg.streams_per_replica * misconfigured_factor)
        runs.append((f"forecast, streams_per_replica set {misconfigured_factor:g}x too high "
                     "(pressure path)", ours, forecast_controller(world, wrong, ours)))
    # every policy starts from the replicas the pre-event load needs at the target occupancy
    initial = math.ceil(trace.streams(0.0) / (world.served_per_replica * occ))
    results = [simulate(trace, world, name, asdict(k), c, initial) for name, k, c in runs]
    return {
        "label": f"policy evaluation on a trace, capacity per replica from {capacity_source}",
        "capacity_per_replica": capacity,
        "capacity_source": capacity_source,
        "world": asdict(world),
        "trace": trace.to_dict(),
        "trace_description": trace.describe(),
        "forecast_policy_config": asdict(policy_cfg),
        "results": [r.summary() for r in results],
        "oracle": oracle(trace, world, occ),
        "timelines": {r.policy: r.timeline for r in results},
    }


def markdown(report: dict[str, Any], command: str) -> str:
    w = report["world"]
    lines = [
        "## autoscaling",
        "",
        f"`{command}`",
        "",
        f"**{report['label']}.** Emulated world, no model runs: a replica serves "
        f"{report['capacity_per_replica']:g} streams within the deadline and holds {w['slots']} "
        f"stream slots; a replica asked for is ready {w['start_latency_s']:g} s later and "
        f"costs from the moment it is asked for; replica stats reach the controller every "
        f"{w['metrics_interval_s']:g} s. Trace: {report['trace_description']}; every "
        "policy starts with the replicas the first streams need. A frame (40 ms) falls back "
        "when its stream finds no ready capacity.",
        "",
        "| policy | replica-hours | frames fell back (capacity) | fallback % | of which from the burst on | peak replicas | burst recovered after (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        rec = "never" if r["burst_recovery_s"] is None else f"{r['burst_recovery_s']:g}"
        lines.append(
            f"| {r['policy']} | {r['replica_hours']:.2f} | {r['frames_fallback_capacity']:,} | "
            f"{r['fallback_pct']:.3f} | {r['frames_fallback_from_burst']:,} | {r['peak_replicas']} | {rec} |"
        )
    o = report["oracle"]
    lines.append(f"| {o['policy']} | {o['replica_hours']:.2f} | 0 | 0.000 | 0 | - | - |")
    lines += [
        "",
        "Serve knobs per row (upscale delay / downscale delay / look-back, s): "
        + "; ".join(
            f"{r['policy'].split(' (')[0]} {r['knobs']['upscale_delay_s']:g}/"
            f"{r['knobs']['downscale_delay_s']:g}/{r['knobs']['look_back_period_s']:g}"
            for r in report["results"]
        )
        + ". The queue-length rows are that policy's best case (its signal taken as exactly "
        "proportional to load, see `autoscaling/evaluate.py`).",
    ]
    return "\n".join(lines)
