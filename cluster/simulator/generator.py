"""A load generator: one simulated bridge worker, its share of the publishers, on a Ray actor.

Each generator owns a `sfu_bridge.core.BridgeCore` - the same object a WebRTC bridge worker
runs - and drives it with emulated publishers instead of aiortc: its share of the stream
population (Poisson joins and leaves, abusers), speech-like audio in `real` compute (none in
`emulated`: the replicas never read it), and hint traffic. The core sends its batches to the
Serve codec replicas through a real `CodecClient`, counts hints into the real Redis limiter,
and reports to the real `FallbackSupervisor` actor; the generator only pushes chunks and
hints in, ticks on the run's shared schedule, and accounts every outcome.

Generators run as Ray actors (`LoadGeneratorActor`), so a run spreads over a cluster's CPU
nodes (`--address`) and here over this machine's cores, and the driver merges what they
return (cluster/simulator/driver.py). A generator whose ticks start late counts it
(`late_ticks`, `max_lag_s`): a run that fell behind says so.

CPU is accounted where it is spent: the core's own work and the codec client's batch
splitting and merging (`control`) apart from the emulated publishers (`simulator`), both as
thread CPU time of the generator's event loop, plus the whole process (`process`), so the
report can name the transport and runtime cost that is neither.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cluster.simulator.abusers import HintRates, HintTraffic
from cluster.simulator.audio import SpeechSource
from cluster.simulator.report import Accounting, TickRecord
from cluster.simulator.traces import Ramp, StreamKind, StreamPopulation, TraceConfig
from deployments.contract import FallbackReason, codebooks_bandwidth, reason_code
from deployments.cpu_meter import GcWatch
from models.constants import CHUNK_FRAMES, TICK_S
from models.constants import N_Q_BY_BANDWIDTH as _N_Q_LAYERS
from sfu_bridge.aic_payload import payload_size

MAX_N_Q = max(_N_Q_LAYERS)
# bytes of one AI frame (a 40 ms AIC payload, header included) by its codebooks
_AI_FRAME_BYTES = np.array([payload_size(q, CHUNK_FRAMES) if q in _N_Q_LAYERS else 0
                            for q in range(MAX_N_Q + 1)], np.int64)

logger = logging.getLogger(__name__)

HINT_LIMIT_PER_S = 100.0
PUBLISH_EVERY_S = 1.0  # dashboard snapshots, wall seconds
# Paced ticks of every stream before the measured run (one simulated second), not counted:
# a cold path (Ray's object store, the Serve router, the replicas' step loops) takes several
# times the steady round trip for its first ticks, which would time out and fall back.
WARMUP_TICKS = 25
_UNHEALTHY = reason_code(FallbackReason.UNHEALTHY)


@dataclass(frozen=True)
class GeneratorSpec:
    """What one generator drives (its share of the run), all times simulated unless named."""

    index: int
    bridge_id: str
    streams: int  # expected live streams of this generator
    flooders: int
    forgers: int
    replayers: int
    user_offset: int
    duration_s: float
    dilation: float
    compute: str
    deadline_ms: float  # simulated; the core gets deadline_ms x dilation
    bandwidth_kbps: float
    seed: int
    trace: str
    ramp_floor_frac: float
    mean_session_s: float
    normal_hint_rate: float
    flood_rate: float
    abuse_rate: float
    redis_url: str | None
    ai_frame_bytes: int
    native_frame_bytes: float
    publish_stats: bool = True
    # This generator's ticks start this fraction of a tick after the run's schedule: bridges
    # are not synchronised, and on a few shared cores staggered ticks do not all compete for
    # the CPU at the same instant.
    phase: float = 0.0
    app_name: str = "auralink"
    replica_deployment: str = "CodecReplica"


class LoadGenerator:
    """One generator; `prepare()` once, then `run(t0)` drives every tick and returns what the
    driver merges. Plain Python: the Ray actor below is a thin shell."""

    def __init__(self, spec: GeneratorSpec) -> None:
        self.spec = spec
        f, g, r = spec.flooders, spec.forgers, spec.replayers
        ramp = Ramp(spec.duration_s, floor_frac=spec.ramp_floor_frac) if spec.trace == "ramp" else None
        seed = spec.seed + 7_919 * spec.index
        self.pop = StreamPopulation(
            TraceConfig(streams=spec.streams, mean_session_s=spec.mean_session_s, flooders=f,
                        forgers=g, replayers=r, seed=seed, ramp=ramp),
            user_offset=spec.user_offset,
        )
        self.speech = SpeechSource(self.pop.n_slots, seed=seed) if spec.compute == "real" else None
        self.acc = Accounting()
        self.row_of_slot = np.full(self.pop.n_slots, -1, np.int64)
        flooders = np.flatnonzero(self.pop.kind == StreamKind.FLOODER)
        self.flooder_ids = {self.pop.stream_ids[i] for i in flooders.tolist()}
        self.flooder_allowed: dict[str, int] = dict.fromkeys(self.flooder_ids, 0)
        self.core: Any = None
        self.client: Any = None
        self.limiter: Any = None
        self.hints: HintTraffic | None = None
        self.t_sim = 0.0
        self.k = 0
        self.n_ticks = int(round(spec.duration_s / TICK_S))
        self.late_ticks = 0
        self.max_lag_s = 0.0
        self.stream_ticks = 0
        self.sim_cpu_s = 0.0
        self.ai_off_max = 0
        # AI frames by the codebooks they were quantized at (index n_q): the layers' share
        self.ai_frames_by_n_q = np.zeros(MAX_N_Q + 1, np.int64)
        self.wall_s = 0.0
        self._last_publish = 0.0
        self._second_counts = np.zeros(self.acc.by_code.size, np.int64)
        self._board: Any = None
        self._t0_wall = time.time()  # the run's start: simulated time 0 as a wall-clock time
        self.warmup_cpu_s = (0.0, 0.0)  # (bridge core, codec client) CPU of the warm-up ticks
        # Why a tick ran long: its codec call hit the bridge's timeout, or its own work, or
        # the collector (the run's pace figures name the cause, not only the lag).
        self.gc_watch = GcWatch()
        self.codec_timeouts = 0  # ticks whose codec call ended at the bridge's timeout
        self.long_ticks = 0  # ticks that took longer than one wall tick, codec wait included
        self.tick_wall_max_s = 0.0
        self.codec_wait_max_ms = 0.0

    def sim_clock(self) -> float:
        """Simulated time as a wall-clock-like reading (the run's start + simulated seconds)."""
        return self._t0_wall + self.t_sim

    # ------------------------------------------------------------------------ setup
    async def prepare(self) -> dict[str, Any]:
        """Connects to the cluster's app, Redis and supervisor; joins the initial streams."""
        from ray import serve

        from auth.secret import load_secret
        from deployments.client import CodecClient
        from deployments.supervisor import get_or_create_supervisor
        from sfu_bridge.core import ray_supervisor_link

        spec = self.spec
        handle = serve.get_deployment_handle(spec.replica_deployment, spec.app_name)
        client = CodecClient(handle)
        if not await client.ready(timeout_s=120):
            raise RuntimeError("codec replicas did not become ready within 120 s")
        # The supervisor judges on the run's simulated clock (its windows, back-offs and
        # snapshot interval are simulated seconds, as every other time constant here).
        link = ray_supervisor_link(get_or_create_supervisor(), period_s=1.0,
                                   owners=client.owners, clock=self.sim_clock)
        await self.start(load_secret(), client, link)
        return {"bridge_id": spec.bridge_id, "streams": int(self.pop.active.sum()),
                "slots": self.pop.n_slots, "pid": os.getpid()}

    async def start(self, secret: bytes, client: Any, link: Any) -> None:
        """This generator's bridge core over `client` (the codec) and `link` (the supervisor),
        its hint traffic signed with `secret` and the hint limiter; the initial streams join
        and warm up."""
        from sfu_bridge.core import DEADLINE_GRACE_MS, BridgeCore

        spec = self.spec
        self.hints = HintTraffic(self.pop, secret, HintRates(
            normal_rate=spec.normal_hint_rate, flood_rate=spec.flood_rate,
            abuse_rate=spec.abuse_rate), seed=spec.seed + 31 * spec.index)
        self.client = client
        self.limiter = self._limiter()
        self.core = BridgeCore(
            self.client, bridge_id=spec.bridge_id,
            deadline_ms=spec.deadline_ms * spec.dilation,
            deadline_grace_ms=DEADLINE_GRACE_MS * spec.dilation, bandwidth_kbps=spec.bandwidth_kbps,
            hint_secret=secret, limiter=_CountingLimiter(self.limiter, self.flooder_allowed)
            if self.limiter is not None else None,
            supervisor=link, audio=spec.compute == "real", capacity=max(64, self.pop.n_slots),
            period_clock=lambda: self.t_sim,
        )
        self._join(self.pop.live())
        await self._warm_up()

    def _limiter(self) -> Any:
        try:
            from sfu_bridge import redis_store
            from sfu_bridge.limiter import HintLimiter
        except ImportError as exc:  # the limiter is optional in a bridge
            logger.warning("hint limiter not installed (%s): hints are not rate limited", exc)
            return None
        client = redis_store.connect(self.spec.redis_url)
        # 100 hints per simulated second, on the simulated clock: ticks that run late (the
        # run fell behind its dilation) must not stretch the limiter's seconds, or flooders
        # would get more than the limit per simulated second
        return HintLimiter(client, rate_per_s=HINT_LIMIT_PER_S, bridge_id=self.spec.bridge_id,
                           clock=self.sim_clock, clock_rate=1.0 / self.spec.dilation)

    async def _warm_up(self) -> None:
        """WARMUP_TICKS paced ticks of every joined stream before the run: their outcomes are
        not counted anywhere (not in the report, not in the supervisor's tallies), their CPU is
        not in the control-plane figure, and they carry no hints. The replicas' latency models
        and arrival forecasts start the run with what they learned, as in a running cluster."""
        core, client = self.core, self.client
        c0, k0 = core.cpu.seconds, client.cpu.seconds
        loop = asyncio.get_running_loop()
        wall_tick = TICK_S * self.spec.dilation
        live = self.pop.live()
        rows = self.row_of_slot[live]
        at = loop.time()
        for _ in range(WARMUP_TICKS):
            core.push_rows(rows, self.speech.next(live) if self.speech is not None else None)
            await core.tick()
            at += wall_tick
            await asyncio.sleep(max(0.0, at - loop.time()))
        core.discard_tallies()
        self.warmup_cpu_s = (core.cpu.seconds - c0, client.cpu.seconds - k0)

    # ------------------------------------------------------------------------ population
    def _join(self, slots: np.ndarray) -> None:
        sids, users = self.pop.stream_ids, self.pop.user_ids
        for i in slots.tolist():
            self.row_of_slot[i] = self.core.join(sids[i], users[i])

    def _leave(self, slots: np.ndarray, ids: list[str]) -> None:
        for sid in ids:
            self.core.leave(sid)
        self.row_of_slot[slots] = -1
        self.hints.forget(ids)

    # ------------------------------------------------------------------------ the run
    async def run(self, t0_wall: float) -> dict[str, Any]:
        """Every tick on the shared schedule (tick k at `t0_wall + (k + phase) * 40 ms *
        dilation`), then the queued chunks are answered and every stream leaves."""
        loop = asyncio.get_running_loop()
        self._t0_wall = t0_wall
        wall_tick = TICK_S * self.spec.dilation
        start = loop.time() + (t0_wall - time.time()) + self.spec.phase * wall_tick
        # Thousands of small objects per tick would make the cyclic GC walk every long-lived
        # object again and again: freeze what exists now, collect young objects less often.
        gc.collect()
        gc.freeze()
        old_threshold = gc.get_threshold()
        gc.set_threshold(50_000, 20, 1000)
        p0 = _process_cpu()
        w0 = time.time()
        self.gc_watch.start()
        try:
            for k in range(self.n_ticks):
                target = start + k * wall_tick
                delay = target - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    lag = -delay
                    self.max_lag_s = max(self.max_lag_s, lag)
                    if lag > wall_tick:
                        self.late_ticks += 1
                self.k = k
                self.t_sim = k * TICK_S
                t_tick = loop.time()
                await self._tick(self.t_sim)
                took = loop.time() - t_tick
                self.tick_wall_max_s = max(self.tick_wall_max_s, took)
                if took > wall_tick:
                    self.long_ticks += 1
            await self._drain(self.n_ticks * TICK_S)
        finally:
            self.gc_watch.stop()
            gc.set_threshold(*old_threshold)
            gc.unfreeze()
            self.wall_s = time.time() - w0
        return self.result(_process_cpu() - p0)

    async def _tick(self, t_sim: float) -> None:
        core, pop = self.core, self.pop
        c0 = time.thread_time()
        core0, client0 = core.cpu.seconds, self.client.cpu.seconds
        change = pop.step(t_sim)
        if change.left.size:
            self._leave(change.left, change.left_ids)
        if change.joined.size:
            self._join(change.joined)
        live = pop.live()
        pcm = self.speech.next(live) if self.speech is not None else None
        core.push_rows(self.row_of_slot[live], pcm)
        self.acc.produced(int(live.size))
        self.stream_ticks += int(live.size)
        sent = self.hints.tick(live, TICK_S)
        if sent:
            core.add_hints([h[0] for h in sent], [h[1] for h in sent])
        report = await core.tick()
        self._note_codec_wait(report.codec_wait_ms)
        self._account(report, t_sim, int(live.size))
        c1 = time.thread_time()
        # the simulator's own CPU: the tick's thread time less the bridge's and the client's
        self.sim_cpu_s += (c1 - c0) - (core.cpu.seconds - core0) - (self.client.cpu.seconds - client0)
        if time.monotonic() - self._last_publish >= PUBLISH_EVERY_S:
            self._publish(t_sim)

    def _note_codec_wait(self, wait_ms: float) -> None:
        self.codec_wait_max_ms = max(self.codec_wait_max_ms, wait_ms)
        if wait_ms >= self.core.deadline_ms + self.core.deadline_grace_ms - 1.0:
            self.codec_timeouts += 1

    def _account(self, report: Any, t_sim: float, produced: int) -> None:
        d = self.spec.dilation
        n_ai, n_fb = self.acc.outcomes(t_sim, report.codes, report.codec_wait_ms / d)
        if n_ai and report.n_q is not None:
            by_n_q = np.bincount(report.n_q[report.codes == 0], minlength=MAX_N_Q + 1)
            self.ai_frames_by_n_q += by_n_q
            ai_bytes = int(by_n_q @ _AI_FRAME_BYTES)
        else:
            ai_bytes = n_ai * self.spec.ai_frame_bytes
        if report.replica_ms is not None and report.batch_size:
            sent = report.codes[len(report) - report.batch_size:]
            ai = sent == 0
            if ai.any():
                self.acc._hist(self.acc.replica_latency_hist, report.replica_ms[ai].astype(np.float64) / d)
        self._second_counts += np.bincount(report.codes, minlength=self._second_counts.size)
        n = self.core._top
        self.ai_off_max = max(self.ai_off_max, int(np.count_nonzero(self.core.ai_off[:n] == _UNHEALTHY)))
        self.acc.ticks.append(TickRecord(
            t=t_sim, frames=produced, ai=n_ai, fallback=n_fb, unaccounted=produced - n_ai - n_fb,
            live=produced, replicas=self._replicas(),
            ai_bytes=ai_bytes,
            native_bytes=int(n_fb * self.spec.native_frame_bytes),
            native_all_bytes=int(produced * self.spec.native_frame_bytes),
        ))

    def _replicas(self) -> int:
        from deployments.affinity import local_view

        view = local_view(self.spec.app_name, self.spec.replica_deployment)
        return len(view.replica_uids()) if view is not None else 0

    async def _drain(self, t_sim: float) -> None:
        """After the last tick: answer what is still queued, then every stream leaves (their
        last chunks are answered in one more tick)."""
        core = self.core
        for _ in range(8):
            if not core.q_n[: core._top].any():
                break
            self._account_drain(await core.tick(), t_sim)
        live = self.pop.live()
        self._leave(live, self.pop.ids(live))
        self._account_drain(await core.tick(), t_sim)
        await core.close()

    def _account_drain(self, report: Any, t_sim: float) -> None:
        self.acc.outcomes(t_sim, report.codes, report.codec_wait_ms / self.spec.dilation)

    # ------------------------------------------------------------------------ reporting
    def _publish(self, t_sim: float) -> None:
        """The dashboard's data source: this bridge's snapshot to the `StatsBoard` actor."""
        now = time.monotonic()
        span = max(1e-3, now - self._last_publish) if self._last_publish else PUBLISH_EVERY_S
        self._last_publish = now
        sec, self._second_counts = self._second_counts, np.zeros_like(self._second_counts)
        if not self.spec.publish_stats:
            return
        total, ai = int(sec.sum()), int(sec[0])
        fb = total - ai
        per_s = self.spec.dilation / span  # simulated seconds per wall second
        native = self.spec.native_frame_bytes
        from deployments.contract import decode_reason

        snapshot = {
            "source": "simulator",
            "at": time.time(),
            "sim_t": round(t_sim, 3),
            "compute": self.spec.compute,
            "time_dilation": self.spec.dilation,
            "streams_live": int(self.pop.active.sum()),
            "replicas": self._replicas(),
            "frames_last_s": total,
            "fallback_rate": (fb / total) if total else 0.0,
            "fallback_by_reason": {decode_reason(c).value: int(sec[c])
                                   for c in range(1, sec.size) if sec[c]},
            "kbps_ai": round(ai * self.spec.ai_frame_bytes * 8 / 1000 * per_s, 1),
            "kbps_native": round(fb * native * 8 / 1000 * per_s, 1),
            "kbps_all_native": round(total * native * 8 / 1000 * per_s, 1),
            "frames_total": self.acc.frames_total,
            "frames_ai": self.acc.frames_ai,
            "frames_fallback": self.acc.frames_fallback,
            "limiter_health": self.limiter_health(),
            "users": self._user_rows(),
        }
        try:
            if self._board is None:
                from deployments.dashboard import get_or_create_board

                self._board = get_or_create_board()
            self._board.publish.remote(self.spec.bridge_id, snapshot)
        except Exception as exc:  # noqa: BLE001 - the dashboard must never stop a run
            logger.info("stats publish failed: %s", type(exc).__name__)

    def _user_rows(self, limit: int = 40) -> list[dict[str, Any]]:
        """The first live users (by id) plus every opted-out one, for the dashboard's list."""
        opted = sorted(self.core._remote_opted_users)
        slots = self.pop.live()[:limit].tolist()
        slots += [s for s in (self.pop.slot_of_user(u) for u in opted) if s is not None]
        rows, seen = [], set()
        for slot in slots:
            if slot in seen:
                continue
            seen.add(slot)
            user = self.pop.user_ids[slot]
            sid = self.pop.stream_ids[slot] if self.pop.active[slot] else None
            st = self.core.stream(sid) if sid else None
            rows.append({
                "user": user,
                "stream": sid,
                "live": st is not None,
                "ai_enabled": user not in opted,
                "bridge_opted_out": (st.ai_off is FallbackReason.OPTED_OUT) if st is not None else None,
                # What the bridge applies now (the dashboard shows the supervisor's decision,
                # this when the supervisor cannot be asked).
                "bridge_state": None if st is None else (st.ai_off.value if st.ai_off else "on"),
                "kind": StreamKind(int(self.pop.kind[slot])).name.lower(),
            })
        return rows

    def limiter_health(self) -> dict[str, Any] | None:
        """The hint limiter's `health()` with its seconds in simulated time (None: no limiter)."""
        lim = self.limiter
        if lim is None or not hasattr(lim, "health"):
            return None
        h = lim.health()
        h["unavailable_wall_s"] = h["unavailable_s"]
        h["unavailable_s"] = round(h["unavailable_s"] / self.spec.dilation, 3)
        return h

    async def progress(self) -> dict[str, Any]:
        fb = self.acc.frames_fallback
        return {"tick": self.k, "ticks": self.n_ticks, "live": int(self.pop.active.sum()),
                "fallback_rate": fb / max(1, self.acc.frames_total)}

    def result(self, process_cpu_s: float) -> dict[str, Any]:
        core, acc = self.core, self.acc
        cols = acc.tick_arrays()
        health = self.limiter_health()
        return {
            "bridge_id": self.spec.bridge_id,
            "spec": asdict(self.spec),
            "frames_total": acc.frames_total,
            "by_code": acc.by_code,
            "latency_hist": acc.latency_hist,
            "replica_latency_hist": acc.replica_latency_hist,
            "ticks": cols,
            "per_second_reasons": {k: dict(v) for k, v in acc.per_second_reasons.items()},
            "hints_sent": self.hints.sent.copy(),
            "hint_counters": dict(core.hint_counters),
            "flooder_allowed": dict(core.limiter.tally() if isinstance(core.limiter, _CountingLimiter)
                                    else self.flooder_allowed),
            "limiter_calls": getattr(core.limiter, "calls", 0),
            "limiter_health": health,
            "opted_out_users": sorted(core._remote_opted_users),
            "supervisor_calls": core.exchanges,
            "supervisor_failures": core.exchange_failures,
            "ai_off_max": self.ai_off_max,
            "ai_frames_by_kbps": {codebooks_bandwidth(q): int(n) for q, n in enumerate(self.ai_frames_by_n_q.tolist()) if n},
            "joins": self.pop.joins,
            "leaves": self.pop.leaves,
            "stream_ticks": self.stream_ticks,
            "warmup_ticks": WARMUP_TICKS,
            "late_ticks": self.late_ticks,
            "max_lag_s": round(self.max_lag_s, 4),
            "long_ticks": self.long_ticks,
            "tick_wall_max_ms": round(self.tick_wall_max_s * 1000.0, 1),
            "codec_timeouts": self.codec_timeouts,
            "codec_wait_max_ms": round(self.codec_wait_max_ms, 1),
            "gc": self.gc_watch.snapshot(),
            "wall_s": round(self.wall_s, 3),
            "cpu": {
                "bridge_core_s": round(core.cpu.seconds - self.warmup_cpu_s[0], 4),
                "codec_client_s": round(self.client.cpu.seconds - self.warmup_cpu_s[1], 4),
                "simulator_s": round(self.sim_cpu_s, 4),
                "process_s": round(process_cpu_s, 4),
            },
        }


class _CountingLimiter:
    """The real limiter, with what it allowed each flooder kept for the report."""

    def __init__(self, limiter: Any, allowed: dict[str, int]) -> None:
        self.limiter = limiter
        self.allowed = allowed
        self.calls = 0
        # (stream ids, allowed) of each call, tallied when read: the bridge core meters its
        # limiter call, and the simulator's bookkeeping is not the bridge's work
        self._answers: list[tuple[list[str], Any]] = []

    def allow(self, stream_ids: list[str], counts: list[int]) -> Any:
        self.calls += 1
        res = self.limiter.allow(stream_ids, counts)
        allowed = getattr(res, "allowed", res)
        self._answers.append((stream_ids, allowed))
        return allowed

    def tally(self) -> dict[str, int]:
        """What each watched stream (the flooders) was allowed so far."""
        answers, self._answers = self._answers, []
        watch = self.allowed
        for ids, allowed in answers:
            for sid, a in zip(ids, np.asarray(allowed).tolist(), strict=True):
                if sid in watch:
                    watch[sid] += int(a)
        return watch


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def actor_class() -> Any:
    """`LoadGeneratorActor`: a `LoadGenerator` on a Ray async actor."""
    import ray

    @ray.remote
    class LoadGeneratorActor:
        def __init__(self, spec: GeneratorSpec) -> None:
            logging.basicConfig(level=logging.WARNING)
            self.gen = LoadGenerator(spec)

        async def prepare(self) -> dict[str, Any]:
            return await self.gen.prepare()

        async def run(self, t0_wall: float) -> dict[str, Any]:
            return await self.gen.run(t0_wall)

        async def progress(self) -> dict[str, Any]:
            return await self.gen.progress()

    return LoadGeneratorActor
