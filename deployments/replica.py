"""`CodecReplica`: the Ray Serve deployment that runs streaming EnCodec for many streams.

One replica owns a `StreamingEncodec` with a fixed pool of per-stream state slots. A bridge
sends it one `FrameBatch` per tick; the replica validates it, applies the epoch rule
(contract.py), queues every frame in the EDF scheduler (scheduler.py), and one background step
loop turns scheduler plans into model calls: frames that cannot make their deadline are
answered `fallback/deadline` before any compute, the batch runs in an executor thread (the
event loop never waits on the model), the measured time feeds the online latency model, and
every frame is answered exactly once.

Compute modes: `real` runs the model; `emulated` (load tests only) spends exactly the latency
profile's L(B) - measured from the real model on the device named in the settings - in an
`asyncio.sleep`, and answers zero codes. Every reply says which mode produced it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.client import malformed_result
from deployments.config import (
    Backend,
    ComputeMode,
    ReplicaSettings,
    profile_ms,
)
from deployments.contract import (
    CODEBOOK_SIZE,
    FRAME_SAMPLES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    bandwidth_codebooks,
    codebooks_bandwidth,
    reason_code,
)
from deployments.latency_model import LatencyModel
from deployments.scheduler import EdfScheduler, PendingFrame, Plan, SchedulerConfig
from telemetry import metrics

logger = logging.getLogger(__name__)

IDLE_SWEEP_S = 1.0
STATS_WINDOW = 2048  # recent frames kept for the autoscaling miss rate / slack


# ----------------------------------------------------------------------------- slot pool
@dataclass
class _OpEpoch:
    """Where one direction (encode or decode) of a stream stands.

    `admitted` is what the replica has accepted into its queue; `ran` is what its model state
    holds. A frame continues an epoch only if it is the next one in both."""

    admitted_epoch: int | None = None
    admitted_next: int = 0
    ran_epoch: int | None = None
    ran_next: int = 0

    def break_epoch(self) -> None:
        self.admitted_epoch = None
        self.ran_epoch = None


@dataclass
class StreamSlot:
    stream_id: str
    index: int
    last_seen: float
    ops: dict[Op, _OpEpoch] = field(default_factory=lambda: {Op.ENCODE: _OpEpoch(), Op.DECODE: _OpEpoch()})


class SlotPool:
    """Stream id -> state slot index, for `capacity` slots. Pure bookkeeping."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: deque[int] = deque(range(capacity))
        self._by_stream: dict[str, StreamSlot] = {}

    def __len__(self) -> int:
        return len(self._by_stream)

    def get(self, stream_id: str) -> StreamSlot | None:
        return self._by_stream.get(stream_id)

    def acquire(self, stream_id: str, now: float) -> StreamSlot | None:
        """The stream's slot, assigning a free one if needed; None if the pool is full."""
        slot = self._by_stream.get(stream_id)
        if slot is not None:
            return slot
        if not self._free:
            return None
        slot = StreamSlot(stream_id, self._free.popleft(), now)
        self._by_stream[stream_id] = slot
        return slot

    def release(self, stream_id: str) -> StreamSlot | None:
        slot = self._by_stream.pop(stream_id, None)
        if slot is not None:
            self._free.append(slot.index)
        return slot

    def idle(self, now: float, timeout_s: float) -> list[str]:
        return [s for s, slot in self._by_stream.items() if now - slot.last_seen > timeout_s]

    def streams(self) -> list[str]:
        return list(self._by_stream)


# ----------------------------------------------------------------------------- requests
class _Request:
    """One `process` call: its result arrays, filled row by row, and the future it awaits."""

    def __init__(self, batch: FrameBatch, arrival: float, replica_id: str, compute: str,
                 n_q: int, loop: asyncio.AbstractEventLoop) -> None:
        b = len(batch)
        self.batch = batch
        self.depths = batch.depths()  # codebooks per row (encode)
        self.arrival = arrival
        # The frames' relative budgets stamped on this replica's clock (the deadline rule).
        self.deadlines = batch.deadlines(arrival)
        self.result = BatchResult(
            stream_ids=list(batch.stream_ids),
            outcome_codes=np.zeros(b, np.uint8),
            epochs=np.asarray(batch.epochs, np.int64).copy(),
            queue_ms=np.zeros(b, np.float32),
            compute_ms=np.zeros(b, np.float32),
            replica_id=replica_id,
        )
        _label(self.result, compute)
        if batch.op is Op.ENCODE:
            assert batch.pcm is not None
            frames = batch.pcm.shape[1] // FRAME_SAMPLES
            self.result.codes = np.zeros((b, n_q, frames), np.int16)
        else:
            assert batch.codes is not None
            self.result.pcm = np.zeros((b, batch.codes.shape[2] * FRAME_SAMPLES), np.float32)
        self._answered = np.zeros(b, bool)
        self._remaining = b
        self.future: asyncio.Future[BatchResult] = loop.create_future()
        if b == 0:
            self.future.set_result(self.result)

    def answered(self, row: int) -> bool:
        return bool(self._answered[row])

    def answer(self, row: int, reason: FallbackReason | None, queue_ms: float = 0.0,
               compute_ms: float = 0.0, error: str = "") -> None:
        """Gives frame `row` its one outcome (None = ai); a second answer is a bug."""
        assert not self._answered[row], f"frame {row} answered twice"
        self._answered[row] = True
        res = self.result
        res.outcome_codes[row] = 0 if reason is None else reason_code(reason)
        res.queue_ms[row] = queue_ms
        res.compute_ms[row] = compute_ms
        if error:
            res.errors[res.stream_ids[row]] = error
        self._remaining -= 1
        if self._remaining == 0 and not self.future.done():
            self.future.set_result(res)


@dataclass(eq=False)
class _FrameRef:
    req: _Request
    row: int
    op: Op
    slot: StreamSlot


def _label(result: BatchResult, compute: str) -> None:
    # The reply names the compute mode that produced it, so an emulated number is never
    # mistaken for a real one downstream.
    result.compute = compute


# ----------------------------------------------------------------------------- codec runtime
class EmulatedRuntime:
    """The runtime of `emulated` compute: no model, no torch. The replica spends the latency
    profile's L(B) instead of a model call and answers zero codes; the health check still
    runs a step through it. Keeps an emulated replica process small (no ~1 GB model)."""

    def __init__(self, capacity: int, bandwidth_kbps: float) -> None:
        self.capacity = capacity
        self.n_q = bandwidth_codebooks(bandwidth_kbps)

    def reset(self, slots: np.ndarray) -> None:
        self._check(slots)

    reset_encoder = reset_decoder = reset

    def encode(self, slots: np.ndarray, pcm: np.ndarray, bandwidth_kbps: float | None = None) -> np.ndarray:
        self._check(slots)
        n_q = self.n_q if bandwidth_kbps is None else bandwidth_codebooks(bandwidth_kbps)
        return np.zeros((len(slots), n_q, pcm.shape[1] // FRAME_SAMPLES), np.int64)

    def _check(self, slots: np.ndarray) -> None:
        if len(slots) and (int(np.min(slots)) < 0 or int(np.max(slots)) >= self.capacity):
            raise ValueError(f"slot outside [0, {self.capacity})")


EMULATED_WEIGHTS = "none (emulated compute)"


def _load_codec(settings: ReplicaSettings):
    """(StreamingEncodec-like runtime with one extra health slot, weights kind)."""
    if settings.compute is ComputeMode.EMULATED:
        return EmulatedRuntime(settings.capacity + 1, settings.bandwidth_kbps), EMULATED_WEIGHTS
    import torch

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    from models.weights import load_encodec

    model, info = load_encodec(settings.weights_dir, allow_random=settings.allow_random_weights,
                               device=settings.device)
    kind = info.label  # "pretrained" or "random (codebooks k-means initialised)"
    if kind != "pretrained":
        logger.warning(
            "CodecReplica is running RANDOM EnCodec weights (%s): timings are real, audio is "
            "noise. Set weights_dir to a checkpoint for real audio.", info
        )
    capacity = settings.capacity + 1  # the last slot is reserved for health checks
    if settings.backend is Backend.ONNX:
        from models.onnx_step import OnnxStreamingEncodec

        codec = OnnxStreamingEncodec(model, capacity, device=settings.device,
                                     bandwidth_kbps=settings.bandwidth_kbps,
                                     threads=settings.torch_threads or None)
    else:
        from models.streaming import StreamingEncodec

        codec = StreamingEncodec(model, capacity, device=settings.device,
                                 bandwidth_kbps=settings.bandwidth_kbps)
    return codec, kind


@dataclass
class _Group:
    """Frames of one step that share a model call (same op and shape). An encode group
    quantizes as deep as its deepest row (`n_q`): the SEANet encoder, most of the cost,
    runs once for all rows, and each row keeps the prefix its stream needs."""

    op: Op
    n_q: int
    refs: list[_FrameRef]
    reset_rows: list[int]  # rows that open a new epoch (state zeroed before the call)

    @property
    def bandwidth_kbps(self) -> float:
        return codebooks_bandwidth(self.n_q)


def _run_groups(codec, groups: list[_Group]) -> tuple[list[np.ndarray | Exception], float]:
    """Runs in the executor thread: one model call per group. Returns outputs and total ms."""
    t0 = time.perf_counter()
    outs: list[np.ndarray | Exception] = []
    for g in groups:
        slots = np.asarray([r.slot.index for r in g.refs], np.int64)
        try:
            if g.reset_rows:
                reset = slots[g.reset_rows]
                (codec.reset_encoder if g.op is Op.ENCODE else codec.reset_decoder)(reset)
            if g.op is Op.ENCODE:
                pcm = np.stack([_pcm_row(r) for r in g.refs])
                outs.append(np.asarray(codec.encode(slots, pcm, g.bandwidth_kbps)))
            else:
                codes = np.stack([r.req.batch.codes[r.row] for r in g.refs]).astype(np.int64)
                outs.append(np.asarray(codec.decode(slots, codes)))
        except Exception as exc:  # noqa: BLE001 - a model error answers its frames, never the loop
            outs.append(exc)
    return outs, (time.perf_counter() - t0) * 1000.0


def _pcm_row(ref: _FrameRef) -> np.ndarray:
    pcm = ref.req.batch.pcm
    assert pcm is not None
    row = pcm[ref.row]
    return row.astype(np.float32) / 32768.0 if row.dtype == np.int16 else row.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- the replica
class CodecReplicaCore:
    """Everything the Serve deployment does, without Serve: constructible in a plain test.

    Bound to the event loop it first runs on; `stop()` ends the step loop deterministically.
    Every time it keeps is on `clock` (monotonic by default): frames arrive with relative
    budgets, stamped on this clock at arrival, so no other host's clock is ever compared.
    """

    def __init__(self, settings: ReplicaSettings | None = None, replica_id: str = "local",
                 build: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or ReplicaSettings()
        self.replica_id = replica_id
        self.clock = clock
        self.weights_kind = "none"
        self._codec = None
        self._fresh_state(self.settings)
        if build:
            self._codec, self.weights_kind = _load_codec(self.settings)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="codec-step")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._started = asyncio.Event()
        self._exited = asyncio.Event()
        self._stopping = False
        self._step_lock = asyncio.Lock()  # a rebuild never swaps the codec under a running step
        self._last_sweep = self.clock()
        self._recent: deque[tuple[bool, float]] = deque(maxlen=STATS_WINDOW)  # (missed, slack_ms)
        self.counters: dict[str, int] = {}

    # -- configuration
    def _fresh_state(self, settings: ReplicaSettings) -> None:
        self.pool = SlotPool(settings.capacity)
        self.latency = LatencyModel.from_profile(settings.latency_profile)
        self.scheduler = EdfScheduler(self.latency, self._scheduler_config(settings))

    @staticmethod
    def _scheduler_config(s: ReplicaSettings) -> SchedulerConfig:
        return SchedulerConfig(deadline_ms=s.deadline_ms, max_batch=s.max_batch,
                               margin_ms=s.margin_ms, max_queue=s.max_queue,
                               max_hold_ms=s.max_hold_ms, frame_period_ms=s.frame_period_ms)

    async def _rebuild(self, settings: ReplicaSettings) -> None:
        """Loads the model runtime in the executor (the loop keeps answering); caller holds
        the step lock."""
        loop = asyncio.get_running_loop()
        codec, kind = await loop.run_in_executor(self._executor, _load_codec, settings)
        self._codec, self.weights_kind = codec, kind
        self._fresh_state(settings)

    async def ensure_built(self) -> None:
        """The runtime is built by the first `reconfigure` (Serve applies `user_config`
        before the replica takes traffic) or, without one, on first use."""
        if self._codec is None:
            async with self._step_lock:
                if self._codec is None:
                    await self._rebuild(self.settings)

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        new = ReplicaSettings.from_dict(user_config, base=self.settings)
        async with self._step_lock:
            if self._codec is None or new.needs_rebuild(self.settings):
                # Queued frames are answered `reset` and every stream starts a new epoch on
                # the new runtime: no state crosses a backend or capacity change.
                self._drain(FallbackReason.RESET, "replica runtime reconfigured")
                await self._rebuild(new)
            elif new.latency_profile != self.settings.latency_profile:
                self.latency = LatencyModel.from_profile(new.latency_profile)
                self.scheduler.model = self.latency
            self.scheduler.reconfigure(self._scheduler_config(new))
            self.settings = new
        if new.compute is ComputeMode.EMULATED and not new.profile_is_measured:
            logger.warning("EMULATED compute on the unmeasured seed latency profile: step times "
                           "are guesses; pass latency_profile from `auralink bench codec`")
        logger.info("replica settings: %s", {k: v for k, v in new.to_dict().items() if k != "latency_profile"})

    # -- intake
    async def process(self, batch: FrameBatch) -> BatchResult:
        arrival = self.clock()
        try:
            if not isinstance(batch, FrameBatch):
                raise ValueError(f"expected a FrameBatch, got {type(batch).__name__}")
            batch.validate()
            depths = batch.depths()
            n_q = int(depths.max()) if len(depths) else bandwidth_codebooks(batch.bandwidth_kbps)
            if batch.op is Op.DECODE and batch.codes is not None and batch.codes.shape[1] not in (2, 4, 8, 16, 32):
                raise ValueError(f"codes have {batch.codes.shape[1]} codebooks; expected 2, 4, 8, 16 or 32")
        except ValueError as exc:
            self._count("malformed_batches")
            res = malformed_result(batch, str(exc))
            res.replica_id = self.replica_id
            _label(res, self.settings.compute.value)
            metrics.record_frames(getattr(getattr(batch, "op", None), "value", "unknown"), res.counts())
            return res
        await self.ensure_built()
        self._ensure_loop()
        loop = asyncio.get_running_loop()
        req = _Request(batch, arrival, self.replica_id, self.settings.compute.value, n_q, loop)
        bad_rows = _bad_rows(batch)
        queued = 0
        for row, sid in enumerate(batch.stream_ids):
            reason, error = self._admit(batch, row, sid, arrival, float(req.deadlines[row]), bad_rows)
            if reason is not None:
                req.answer(row, reason, error=error)
                continue
            slot = self.pool.get(sid)
            assert slot is not None
            self.scheduler.add(PendingFrame(
                stream_id=f"{sid}\x1f{batch.op.value}",
                epoch=int(batch.epochs[row]),
                epoch_seq=int(batch.epoch_seqs[row]),
                deadline=float(req.deadlines[row]),
                arrival=arrival,
                ref=_FrameRef(req, row, batch.op, slot),
            ))
            queued += 1
        if queued and self._wake is not None:
            self._wake.set()
        res = await req.future
        metrics.record_frames(batch.op.value, res.counts())
        res.held_ms = (self.clock() - arrival) * 1000.0  # lets the sender measure the transit
        return res

    def _admit(self, batch: FrameBatch, row: int, sid: str, now: float, deadline: float,
               bad_rows: dict[int, str]) -> tuple[FallbackReason | None, str]:
        """Admission half of the epoch rule; returns a fallback reason or None to queue."""
        if row in bad_rows:
            self._break(sid, batch.op)
            return FallbackReason.ERROR, bad_rows[row]
        if not math.isnan(deadline) and deadline <= now:
            self._break(sid, batch.op)
            return FallbackReason.DEADLINE, ""
        epoch, seq = int(batch.epochs[row]), int(batch.epoch_seqs[row])
        if seq < 0:
            return FallbackReason.ERROR, f"epoch_seq {seq} is negative"
        if seq == 0:
            slot = self.pool.acquire(sid, now)
            if slot is None:
                return FallbackReason.OVERLOAD, ""
            st = slot.ops[batch.op]
            st.admitted_epoch, st.admitted_next = epoch, 1
        else:
            slot = self.pool.get(sid)
            st = slot.ops[batch.op] if slot is not None else None
            if st is None or st.admitted_epoch != epoch or st.admitted_next != seq:
                # Continuing an epoch this replica does not hold (moved, restarted, or a gap).
                # A gap inside the current epoch ends it; a stale frame of an older epoch is
                # refused without touching the current one.
                if st is not None and (st.admitted_epoch is None or epoch >= st.admitted_epoch):
                    st.break_epoch()
                return FallbackReason.RESET, ""
            st.admitted_next += 1
        slot.last_seen = now
        return None, ""

    def _break(self, sid: str, op: Op) -> None:
        slot = self.pool.get(sid)
        if slot is not None:
            slot.ops[op].break_epoch()

    async def leave(self, stream_ids: list[str]) -> int:
        """Frees the streams' slots now. Their queued frames are answered `reset` when they
        come up (their slot no longer belongs to them)."""
        freed = 0
        for sid in stream_ids:
            if self.pool.release(sid) is not None:
                freed += 1
        self._update_slot_gauge()
        return freed

    # -- the step loop
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            if self._loop_task is not None and self._loop_task.done() and not self._stopping:
                exc = self._loop_task.exception() if not self._loop_task.cancelled() else None
                logger.error("step loop had exited (%r); restarting it", exc)
            self._stopping = False
            self._wake = asyncio.Event()
            self._started.clear()
            self._exited.clear()
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())

    async def stop(self) -> None:
        """Stops the step loop; frames still queued are answered `reset`."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._loop_task is not None:
            await self._exited.wait()
        self._drain(FallbackReason.RESET, "replica stopping")
        self._executor.shutdown(wait=False)

    async def _step_loop(self) -> None:
        self._started.set()
        assert self._wake is not None
        try:
            while not self._stopping:
                now = self.clock()
                if now - self._last_sweep >= IDLE_SWEEP_S:
                    self._sweep_idle(now)
                # Cleared before deciding: a frame queued from here on sets it again, so the
                # wait after a decision that ran nothing cannot miss an arrival.
                self._wake.clear()
                async with self._step_lock:
                    plan = self.scheduler.schedule(self.clock())
                    if plan:
                        try:
                            await self._execute(plan)
                        except Exception:  # noqa: BLE001 - a bug must not strand frames or the loop
                            logger.exception("codec step failed; its frames are answered `error`")
                            self._fail_plan(plan)
                if not plan.run:
                    await self._idle_after_decision(plan)
        finally:
            self._exited.set()

    async def _idle_after_decision(self, plan: Plan) -> None:
        """Nothing ran: sleep until a frame arrives (the wake event) or until the scheduler
        must decide again (`plan.hold_until`: frames held for an expected arrival, or the
        moment a queued frame expires). With nothing queued the scheduler names no time: sleep
        until an arrival or the idle sweep. Never a poll: an idle replica costs no CPU."""
        assert self._wake is not None
        timeout = IDLE_SWEEP_S
        if plan.hold_until is not None:
            timeout = min(IDLE_SWEEP_S, max(0.0, plan.hold_until - self.clock()))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _execute(self, plan: Plan) -> None:
        for f in plan.expired:
            self._answer_fallback(f.ref, FallbackReason.DEADLINE, plan.now)
        for f, why in plan.shed:
            self._answer_fallback(f.ref, why.fallback, plan.now)
        if not plan.run:
            return
        groups, resets = self._group(plan.run)
        for ref in resets:
            self._answer_fallback(ref, FallbackReason.RESET, plan.now)
        if not groups:
            self.scheduler.complete(plan, 0.0, computed=0)
            return
        n = sum(len(g.refs) for g in groups)
        start = self.clock()
        if self.settings.compute is ComputeMode.EMULATED:
            step_ms = profile_ms(self.settings.latency_profile, n)
            await asyncio.sleep(step_ms / 1000.0)
            outs: list[np.ndarray | Exception] = [None] * len(groups)  # type: ignore[list-item]
            step_ms = (self.clock() - start) * 1000.0
        else:
            loop = asyncio.get_running_loop()
            outs, step_ms = await loop.run_in_executor(self._executor, _run_groups, self._codec, groups)
        end = self.clock()
        # The model learns the cost of the n frames computed, not of the plan's: frames
        # answered `reset` above took no compute.
        self.scheduler.complete(plan, step_ms, computed=n)
        op_name = groups[0].op.value
        metrics.observe_step_latency(op_name, step_ms, self.settings.device)
        metrics.observe_batch_size(op_name, n)
        slacks = []
        for g, out in zip(groups, outs, strict=True):
            for i, ref in enumerate(g.refs):
                queue_ms = (start - ref.req.arrival) * 1000.0
                deadline = float(ref.req.deadlines[ref.row])
                if isinstance(out, Exception):
                    ref.slot.ops[g.op].break_epoch()
                    ref.req.answer(ref.row, FallbackReason.ERROR, queue_ms, step_ms,
                                   error=f"model error: {type(out).__name__}: {out}"[:300])
                    continue
                self._write_output(ref, g, out, i)
                if end > deadline:
                    # Finished, but after the call moved on: the bridge has sent the native
                    # codec for it, so the stream starts a new epoch.
                    ref.slot.ops[g.op].break_epoch()
                    self._recent.append((True, (deadline - end) * 1000.0))
                    ref.req.answer(ref.row, FallbackReason.DEADLINE, queue_ms, step_ms)
                else:
                    slack = (deadline - end) * 1000.0
                    slacks.append(slack)
                    self._recent.append((False, slack))
                    ref.req.answer(ref.row, None, queue_ms, step_ms)
        if slacks:
            metrics.observe_deadline_slack(op_name, slacks[:64])

    def _fail_plan(self, plan: Plan) -> None:
        frames = [*plan.run, *plan.expired, *(f for f, _ in plan.shed)]
        for f in frames:
            ref: _FrameRef = f.ref
            ref.slot.ops[ref.op].break_epoch()
            if not ref.req.answered(ref.row):
                ref.req.answer(ref.row, FallbackReason.ERROR, error="replica step failed")

    def _group(self, run: list[PendingFrame]) -> tuple[list[_Group], list[_FrameRef]]:
        """Run-time half of the epoch rule, then frames grouped into shared model calls."""
        groups: dict[tuple, _Group] = {}
        resets: list[_FrameRef] = []
        for f in run:
            ref: _FrameRef = f.ref
            slot = ref.slot
            if self.pool.get(slot.stream_id) is not slot:
                resets.append(ref)  # the stream left (or idled out) while this frame waited
                continue
            st = slot.ops[ref.op]
            new_epoch = f.epoch_seq == 0
            if new_epoch:
                st.ran_epoch, st.ran_next = f.epoch, 1
            elif st.ran_epoch == f.epoch and st.ran_next == f.epoch_seq:
                st.ran_next += 1
            else:
                st.break_epoch()
                resets.append(ref)
                continue
            batch = ref.req.batch
            shape = batch.pcm.shape[1] if ref.op is Op.ENCODE else batch.codes.shape[1:]
            key = (ref.op, shape)
            depth = int(ref.req.depths[ref.row]) if ref.op is Op.ENCODE else int(batch.codes.shape[1])
            g = groups.get(key)
            if g is None:
                g = groups[key] = _Group(ref.op, depth, [], [])
            g.n_q = max(g.n_q, depth)
            if new_epoch:
                g.reset_rows.append(len(g.refs))
            g.refs.append(ref)
        return list(groups.values()), resets

    def _write_output(self, ref: _FrameRef, g: _Group, out: np.ndarray | None, i: int) -> None:
        res = ref.req.result
        if out is None:  # emulated: zero codes / silence, already zero-filled
            return
        if g.op is Op.ENCODE:
            assert res.codes is not None
            depth = int(ref.req.depths[ref.row])
            res.codes[ref.row, :depth] = out[i, :depth].astype(np.int16)
        else:
            assert res.pcm is not None
            res.pcm[ref.row] = out[i]

    def _answer_fallback(self, ref: _FrameRef, reason: FallbackReason, now: float) -> None:
        ref.slot.ops[ref.op].break_epoch()
        if reason is FallbackReason.DEADLINE:
            self._recent.append((True, 0.0))
        ref.req.answer(ref.row, reason, (now - ref.req.arrival) * 1000.0)

    def _drain(self, reason: FallbackReason, message: str) -> None:
        """Answers every queued frame (used when the runtime goes away)."""
        for f in self.scheduler.queued():
            ref: _FrameRef = f.ref
            if not ref.req.answered(ref.row):
                ref.req.answer(ref.row, reason, error=message if reason is FallbackReason.ERROR else "")
        self.scheduler = EdfScheduler(self.latency, self._scheduler_config(self.settings))

    def _sweep_idle(self, now: float) -> None:
        self._last_sweep = now
        for sid in self.pool.idle(now, self.settings.idle_timeout_s):
            self.pool.release(sid)
            self._count("slots_idle_freed")
        self._update_slot_gauge()

    def _update_slot_gauge(self) -> None:
        metrics.set_slots(self.replica_id, len(self.pool), self.pool.capacity)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # -- health and stats
    async def check_health(self) -> None:
        """Runs one real 320-sample encode on the reserved health slot; raises if it fails."""
        if self._loop_task is not None and self._loop_task.done() and not self._stopping:
            raise RuntimeError("codec step loop is not running")
        await self.ensure_built()
        health = self.settings.capacity  # reserved slot index
        codec = self._codec

        def step() -> None:
            codec.reset(np.asarray([health]))
            codes = np.asarray(codec.encode(np.asarray([health]), np.zeros((1, FRAME_SAMPLES), np.float32)))
            if codes.shape[0] != 1 or codes.shape[2] != 1 or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
                raise RuntimeError(f"health step returned codes of shape {codes.shape}")

        await asyncio.get_running_loop().run_in_executor(self._executor, step)

    def autoscaling_stats(self) -> dict[str, float]:
        recent = list(self._recent)
        missed = sum(1 for m, _ in recent if m)
        slack = sorted(s for m, s in recent if not m)
        return {
            "slot_occupancy": len(self.pool) / self.pool.capacity,
            "slots_in_use": float(len(self.pool)),
            "slot_capacity": float(self.pool.capacity),
            "queue_len": float(len(self.scheduler)),
            "miss_rate": missed / len(recent) if recent else 0.0,
            "deadline_slack_p10_ms": slack[len(slack) // 10] if slack else float(self.settings.deadline_ms),
        }

    def info(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "compute": self.settings.compute.value,
            "backend": self.settings.backend.value,
            "device": self.settings.device,
            "weights": self.weights_kind,
            "latency_profile_device": self.settings.latency_profile_device,
            "capacity": self.pool.capacity,
            "slots_in_use": len(self.pool),
            "streams": self.pool.streams(),
            "queue_len": len(self.scheduler),
            "scheduler": self.scheduler.snapshot_counters(),
            "counters": dict(self.counters),
            "settings": {k: v for k, v in self.settings.to_dict().items() if k != "latency_profile"},
        }


def _bad_rows(batch: FrameBatch) -> dict[int, str]:
    """Rows whose payload cannot be trusted: non-finite PCM, codes out of range."""
    bad: dict[int, str] = {}
    if batch.op is Op.ENCODE and batch.pcm is not None and batch.pcm.dtype == np.float32:
        rows = np.flatnonzero(~np.isfinite(batch.pcm).all(axis=1))
        for r in rows.tolist():
            bad[r] = "pcm has NaN or infinite samples"
    elif batch.op is Op.DECODE and batch.codes is not None:
        c = batch.codes.reshape(len(batch), -1)
        rows = np.flatnonzero((c < 0).any(axis=1) | (c >= CODEBOOK_SIZE).any(axis=1))
        for r in rows.tolist():
            bad[r] = f"codes outside [0, {CODEBOOK_SIZE})"
    return bad


# ----------------------------------------------------------------------------- Serve
from ray import serve  # noqa: E402 - the Serve face below; the core above does not use Serve
from ray.serve.config import RequestRouterConfig  # noqa: E402

from deployments.config import REPLICA_DEPLOYMENT  # noqa: E402
from deployments.router import ROUTER_PATH  # noqa: E402


@serve.deployment(
    name=REPLICA_DEPLOYMENT,
    # One request per bridge per tick, each waiting for its frames' step: many at once.
    max_ongoing_requests=512,
    request_router_config=RequestRouterConfig(request_router_class=ROUTER_PATH),
    health_check_period_s=5.0,
    health_check_timeout_s=30.0,
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
)
class CodecReplica:
    """Serve face of `CodecReplicaCore`. Settings: `AURALINK_*` env, then the init dict, then
    `user_config` (which Serve applies through `reconfigure` at start and on every change)."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        base = ReplicaSettings.from_env()
        try:
            replica_id = serve.get_replica_context().replica_id.unique_id
        except RuntimeError:
            replica_id = "local"
        # The model is loaded by the first reconfigure(user_config), which Serve runs before
        # the replica takes traffic, so init-time defaults never load the wrong runtime.
        self._core = CodecReplicaCore(ReplicaSettings.from_dict(settings, base), replica_id,
                                      build=False)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self._core.reconfigure(user_config)

    async def process(self, batch: FrameBatch) -> BatchResult:
        return await self._core.process(batch)

    async def leave(self, stream_ids: list[str]) -> int:
        return await self._core.leave(list(stream_ids))

    async def ping(self) -> str:
        return self._core.replica_id

    async def info(self) -> dict[str, Any]:
        await self._core.ensure_built()
        return self._core.info()

    async def check_health(self) -> None:
        await self._core.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self._core.autoscaling_stats()

    async def stop(self) -> None:
        await self._core.stop()
