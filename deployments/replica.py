"""`CodecReplica`: the Ray Serve deployment that runs streaming EnCodec for many streams.

One replica owns a `StreamingEncodec` with a fixed pool of per-stream state slots. A bridge
sends it one `FrameBatch` per tick; the replica validates it, applies the epoch rule
(deployments/epochs.py), queues every frame in the EDF scheduler (scheduler.py), and one
background step loop turns scheduler plans into model calls: frames that cannot make their
deadline are answered `fallback/deadline` before any compute, the batch runs in an executor
thread (the event loop never waits on the model), the measured time feeds the online latency
model, and every frame is answered exactly once.

The bookkeeping is columnar: a request's frames are admitted, queued, checked against the
state slots and answered with array operations over the request's rows and the slot table
(a Python step per request, never per frame), and its CPU time is counted
(`info()["bookkeeping_cpu_s"]`) so load tests can report what the control plane costs.

Compute modes: `real` runs the model; `emulated` (load tests only) spends exactly the latency
profile's L(B) - measured from the real model on the device named in the settings - in an
`asyncio.sleep`, and answers zero codes. Every reply says which mode produced it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from deployments.arrivals import use_c_loops
from deployments.client import malformed_result
from deployments.config import (
    Backend,
    ComputeMode,
    ReplicaSettings,
    profile_ms,
)
from deployments.contract import (
    CHUNK_SAMPLES,
    CODEBOOK_SIZE,
    DTX_CODE,
    FRAME_SAMPLES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    bandwidth_codebooks,
    codebooks_bandwidth,
    reason_code,
)
from deployments.cpu_meter import CpuMeter, GcWatch
from deployments.epochs import ReplicaEpochs
from deployments.latency_model import LatencyModel
from deployments.scheduler import EdfScheduler, Plan, SchedulerConfig
from telemetry import metrics

try:  # loops of the replica's bookkeeping in C (deployments/_columns.c); else numpy, the same result
    from deployments._columns import ref_lookup as _c_ref_lookup
    from deployments._columns import slots_distinct as _c_slots_distinct
    from deployments._columns import step_slack as _c_step_slack
except ImportError:
    _c_ref_lookup = _c_slots_distinct = _c_step_slack = None

logger = logging.getLogger(__name__)

IDLE_SWEEP_S = 1.0
STATS_WINDOW = 2048  # recent frames kept for the autoscaling miss rate / slack
# Deadline slacks of one step exported to Ray: each is a call of tens of us, and at a few
# steps per tick an even sample of 4 per step still gives Prometheus ~100 a second per replica.
SLACK_SAMPLE_PER_STEP = 4
# Stream refs (FrameBatch.stream_refs): streams found by ref whose ids are compared with
# their slot's per request, and senders whose refs a replica keeps a table of
REF_SAMPLE = 8
MAX_REF_SENDERS = 256
_ROW_BITS = 32  # a scheduler ref is (request id << 32) | row
_ROW_MASK = (1 << _ROW_BITS) - 1
_ERROR = reason_code(FallbackReason.ERROR)
_DEADLINE = reason_code(FallbackReason.DEADLINE)
_OVERLOAD = reason_code(FallbackReason.OVERLOAD)
_RESET = reason_code(FallbackReason.RESET)


# ----------------------------------------------------------------------------- slot pool
class _RefTable:
    """One sender's stream refs (FrameBatch.stream_refs) by their row (ref >> 32): the ref
    last admitted on the row, its stream's slot and the slot's generation then (a slot
    that changed hands since no longer matches)."""

    def __init__(self) -> None:
        self.ref = np.full(0, -1, np.int64)
        self.slot = np.zeros(0, np.int64)
        self.slot_gen = np.zeros(0, np.int64)
        self.used = True  # heard from since the last idle sweep

    def grow(self, rows: int) -> None:
        if rows <= self.ref.size:
            return
        n = max(rows, 2 * self.ref.size, 64)
        for name, fill in (("ref", -1), ("slot", 0), ("slot_gen", -1)):
            old = getattr(self, name)
            new = np.full(n, fill, np.int64)
            new[: old.size] = old
            setattr(self, name, new)


class SlotPool:
    """Stream id -> state slot, for `capacity` slots, plus per-slot columns: when the stream
    was last seen, a generation (bumped whenever the slot changes hands, so a queued frame
    can tell its slot was given away) and the replica half of the epoch rule."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # a stack: freed slots are reused first
        self._slot_of: dict[str, int] = {}
        self._sid = np.full(capacity, None, object)  # slot -> its stream id (None: free)
        self.last_seen = np.zeros(capacity, np.float64)
        self.generation = np.zeros(capacity, np.int64)
        self.epochs = ReplicaEpochs(capacity)
        self._refs: dict[str | None, _RefTable] = {}  # per sender: its stream refs -> slots
        # how `lookup` found streams (GET /v1/replica: stream_lookup): by ref, by id, and the
        # senders whose refs named another stream (their tables dropped)
        self.by_ref = self.by_id = self.refs_dropped = 0
        self.native = use_c_loops(None)  # refs and distinct streams in C (tests compare with numpy)
        self._mark = np.zeros(capacity, np.int64)  # `distinct` in C: a slot's last stamp
        self._stamp = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def free(self) -> int:
        """Slots no stream holds."""
        return len(self._free)

    def get(self, stream_id: str) -> int | None:
        return self._slot_of.get(stream_id)

    def lookup(self, stream_ids: list[str], sender: str | None = None,
               refs: np.ndarray | None = None) -> np.ndarray:
        """Slot of each stream, -1 where it holds none. With the sender's refs of the streams
        (FrameBatch.stream_refs), those `remember`ed for a slot still held are found from
        them (array operations); only the others are looked up by id."""
        return self.lookup_refs(stream_ids, sender, refs)[0]

    def lookup_refs(self, stream_ids: list[str], sender: str | None = None,
                    refs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """`lookup`, and which streams their refs found (None: none did). Those need no
        `remember` again while they keep their slots."""
        t = self._refs.get(sender) if refs is not None else None
        if t is None:
            return self._by_id(stream_ids, np.arange(len(stream_ids))), None
        t.used = True
        if self.native:  # the lines below in one C loop (slots already -1 where not found)
            n = len(stream_ids)
            slots, hit, found = np.empty(n, np.int64), np.empty(n, bool), np.empty(n, np.int64)
            found = found[: _c_ref_lookup(np.ascontiguousarray(refs, np.int64), t.ref, t.slot, t.slot_gen,
                                          self.generation, slots, hit, found)]
        else:
            rows = refs >> 32
            at = np.minimum(rows, t.ref.size - 1)
            slots = t.slot[at]
            hit = (rows < t.ref.size) & (t.ref[at] == refs) & (self.generation[slots] == t.slot_gen[at])
            found = hit.nonzero()[0]
        # A sample of the streams found by ref must be the streams named: a sender whose refs
        # do not name one stream each (a bug, two senders under one id) loses its table.
        for i in found[:: max(1, found.size // REF_SAMPLE)][:REF_SAMPLE].tolist():
            if self._sid[slots[i]] != stream_ids[i]:
                logger.warning("sender %r: a stream ref named another stream; its refs are dropped", sender)
                del self._refs[sender]
                self.refs_dropped += 1
                return self._by_id(stream_ids, np.arange(len(stream_ids))), None
        self.by_ref += int(found.size)
        if found.size < len(stream_ids):
            slots = np.where(hit, slots, -1)
            miss = (~hit).nonzero()[0]
            slots[miss] = self._by_id(stream_ids, miss)
        return slots, hit

    @property
    def ref_senders(self) -> int:
        """Senders whose stream refs this pool keeps."""
        return len(self._refs)

    def _by_id(self, stream_ids: list[str], rows: np.ndarray) -> np.ndarray:
        self.by_id += int(rows.size)
        get = self._slot_of.get
        if rows.size == len(stream_ids):
            return np.fromiter(map(get, stream_ids, itertools.repeat(-1)), np.int64, rows.size)
        return np.fromiter((get(stream_ids[i], -1) for i in rows.tolist()), np.int64, rows.size)

    def remember(self, sender: str, refs: np.ndarray, slots: np.ndarray) -> None:
        """The streams in `slots` (held now) go by `refs` (FrameBatch.stream_refs) at `sender`."""
        if not refs.size:
            return
        t = self._refs.get(sender)
        if t is None:
            if len(self._refs) >= MAX_REF_SENDERS:
                return  # more senders than tables: the others are looked up by id
            t = self._refs[sender] = _RefTable()
        t.used = True
        rows = refs >> 32
        t.grow(int(rows.max()) + 1)
        t.ref[rows] = refs
        t.slot[rows] = slots
        t.slot_gen[rows] = self.generation[slots]

    def forget_idle_senders(self) -> None:
        """Drops the ref tables of senders not heard from since the last call."""
        for sender in [k for k, t in self._refs.items() if not t.used]:
            del self._refs[sender]
        for t in self._refs.values():
            t.used = False

    def distinct(self, stream_ids: list[str], slots: np.ndarray) -> bool:
        """Whether the streams (with their `lookup` slots) are distinct: two rows of one known
        stream share its slot (integer counts); only the unknown ones are compared by id."""
        if self.native:  # the slot counts in one C loop, the ids below only if any is unknown
            self._stamp += 1
            n_unknown = _c_slots_distinct(np.ascontiguousarray(slots, np.int64), self._mark, self._stamp)
            if n_unknown <= 0:
                return n_unknown == 0
            known = slots >= 0
        else:
            known = slots >= 0
            if known.all():
                return len(slots) == 0 or int(np.bincount(slots).max()) <= 1
            if known.any() and int(np.bincount(slots[known]).max()) > 1:
                return False
        unknown = (~known).nonzero()[0].tolist()
        return len({stream_ids[i] for i in unknown}) == len(unknown)

    def acquire(self, stream_id: str, now: float) -> int | None:
        """The stream's slot, assigning a free one if needed; None if the pool is full."""
        slot = self._slot_of.get(stream_id)
        if slot is not None:
            return slot
        if not self._free:
            return None
        slot = self._free.pop()
        self._slot_of[stream_id] = slot
        self._sid[slot] = stream_id
        self.generation[slot] += 1
        self.last_seen[slot] = now
        self.epochs.end(np.array([slot]))
        return slot

    def acquire_new(self, stream_ids: list[str], now: float) -> np.ndarray:
        """`acquire` for streams (distinct) that hold no slot yet, all at once: their new
        slots, in order, -1 for those the pool had no free slot left for."""
        out = np.full(len(stream_ids), -1, np.int64)
        k = min(len(stream_ids), len(self._free))
        if k:
            top = len(self._free) - k
            slots = self._free[top:][::-1]  # popped off the stack's top, as `acquire` does
            del self._free[top:]
            self._slot_of.update(zip(stream_ids[:k], slots, strict=True))
            got = np.asarray(slots, np.int64)
            self._sid[got] = stream_ids[:k]
            self.generation[got] += 1
            self.last_seen[got] = now
            self.epochs.end(got)
            out[:k] = got
        return out

    def release(self, stream_id: str) -> int | None:
        slot = self._slot_of.pop(stream_id, None)
        if slot is not None:
            self._sid[slot] = None
            self.generation[slot] += 1
            self.epochs.end(np.array([slot]))
            self._free.append(slot)
        return slot

    def idle(self, now: float, timeout_s: float) -> list[str]:
        """Streams with no frame for longer than `timeout_s`."""
        gone = ((now - self.last_seen > timeout_s) & (self._sid != None)).nonzero()[0]  # noqa: E711
        return self._sid[gone].tolist()

    def streams(self) -> list[str]:
        return list(self._slot_of)


# (slots of a request's streams, -1 for none; which of them the sender's refs found)
_Found = tuple[np.ndarray, "np.ndarray | None"]


# ----------------------------------------------------------------------------- requests
class _Request:
    """One `process` call: its frames' columns, the result arrays filled as frames are
    answered, and the future the call awaits."""

    def __init__(self, rid: int, batch: FrameBatch, arrival: float, replica_id: str,
                 compute: str, n_q: int, loop: asyncio.AbstractEventLoop) -> None:
        b = len(batch)
        self.rid = rid
        self.batch = batch
        self.depths = batch.depths()  # codebooks per row (encode)
        self.n_q = n_q  # the deepest of them
        self.arrival = arrival
        self.slots = np.empty(b, np.int64)
        self.slots.fill(-1)
        self.generation = np.zeros(b, np.int64)  # of each frame's slot when it was admitted
        # The frames' relative budgets stamped on this replica's clock (the deadline rule).
        self.deadlines = batch.deadlines(arrival)
        self.result = BatchResult(
            stream_ids=list(batch.stream_ids),
            outcome_codes=np.zeros(b, np.uint8),
            epochs=np.asarray(batch.epochs, np.int64).copy(),
            queue_ms=np.zeros(b, np.float32),
            compute_ms=np.zeros(b, np.float32),
            codes=np.zeros((b, n_q, batch.samples // FRAME_SAMPLES), np.int16),
            replica_id=replica_id,
            compute=compute,  # the reply names its compute mode: emulated is never mistaken
        )
        self._answered = np.zeros(b, bool)
        self.remaining = b
        self.future: asyncio.Future[BatchResult] = loop.create_future()
        if b == 0:
            self.future.set_result(self.result)

    def answer(self, rows: np.ndarray, code: int | np.ndarray, queue_ms: float | np.ndarray = 0.0,
               compute_ms: float = 0.0, error: str = "") -> None:
        """Gives frames `rows` their one outcome (code 0 = ai); a second answer is a bug."""
        if not rows.size:
            return
        res = self.result
        if (rows.size == self.remaining == self._answered.size and isinstance(code, int)
                and isinstance(queue_ms, float)):
            # Every frame of the request at once (`rows` names each one once, in any order):
            # whole columns, no indexing.
            self._answered[:] = True
            res.outcome_codes[:] = code
            res.queue_ms[:] = queue_ms
            res.compute_ms[:] = compute_ms
        else:
            assert not self._answered[rows].any(), "a frame answered twice"
            self._answered[rows] = True
            res.outcome_codes[rows] = code
            res.queue_ms[rows] = queue_ms
            res.compute_ms[rows] = compute_ms
        if error:
            for r in rows.tolist():
                res.errors[res.stream_ids[r]] = error
        self.remaining -= int(rows.size)
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(res)

    def unanswered(self, rows: np.ndarray) -> np.ndarray:
        return rows[~self._answered[rows]]


# ----------------------------------------------------------------------------- codec runtime
class EmulatedRuntime:
    """The runtime of `emulated` compute: no model, no torch. The replica spends the latency
    profile's L(B) instead of a model call and answers zero codes; the health check still
    runs a step through it. Keeps an emulated replica process small (no ~1 GB model)."""

    def __init__(self, capacity: int, bandwidth_kbps: float) -> None:
        self.capacity = capacity
        self.n_q = bandwidth_codebooks(bandwidth_kbps)

    def reset_encoder(self, slots: np.ndarray) -> None:
        self._check(slots)

    def encode(self, slots: np.ndarray, pcm: np.ndarray, bandwidth_kbps: float | None = None) -> np.ndarray:
        self._check(slots)
        n_q = self.n_q if bandwidth_kbps is None else bandwidth_codebooks(bandwidth_kbps)
        return np.zeros((len(slots), n_q, pcm.shape[1] // FRAME_SAMPLES), np.int64)

    def _check(self, slots: np.ndarray) -> None:
        if len(slots) and (int(np.min(slots)) < 0 or int(np.max(slots)) >= self.capacity):
            raise ValueError(f"slot outside [0, {self.capacity})")


EMULATED_WEIGHTS = "none (emulated compute)"


class OpusIntake:
    """The replica's Opus decoders, one per stream: `FrameBatch.opus` rows -> the 24 kHz pcm
    the model encodes (models.opus.OpusChunkDecoder; a stream's frames arrive in order, as
    its EnCodec state needs them). A decoder lives while its stream holds a slot here.

    `decode_async` runs on one thread of its own, off the event loop (libopus releases the
    GIL, so it overlaps the model's step thread and the loop's bookkeeping): requests are
    decoded in arrival order, so a stream's frames reach admission in order, and decoders
    are created and closed only on that thread. One thread decodes 550-780 streams' 40 ms
    chunks in real time (docs/operations.md)."""

    def __init__(self) -> None:
        self.decoders: dict[str, Any] = {}
        self.rows = 0
        self.malformed = 0  # packets libopus refused (concealed instead)
        self.cpu_s = 0.0  # decoding (not bookkeeping: it is the codec's input stage)
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    async def decode_async(self, stream_ids: list[str], rows: list[tuple[bytes, ...]]) -> np.ndarray:
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="opus-decode")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.decode, stream_ids, rows)

    def decode(self, stream_ids: list[str], rows: list[tuple[bytes, ...]]) -> np.ndarray:
        from models.opus import OpusChunkDecoder

        c0 = time.thread_time()
        out = np.empty((len(rows), CHUNK_SAMPLES), np.float32)
        decoders = self.decoders
        for i, (sid, packets) in enumerate(zip(stream_ids, rows, strict=True)):
            d = decoders.get(sid)
            if d is None:
                d = decoders[sid] = OpusChunkDecoder()
            bad = d.malformed
            out[i] = d.chunk(packets)
            self.malformed += d.malformed - bad
        self.rows += len(rows)
        self.cpu_s += time.thread_time() - c0
        return out

    def info(self) -> dict[str, Any]:
        return {"streams": len(self.decoders), "rows": self.rows, "malformed_packets": self.malformed,
                "cpu_s": round(self.cpu_s, 6),
                "us_per_row": round(self.cpu_s * 1e6 / self.rows, 2) if self.rows else None}

    def forget(self, stream_ids: list[str]) -> None:
        """Closes the streams' decoders (on the decode thread, after what is queued there)."""
        if self._thread is None:
            self._forget(stream_ids)
        else:
            self._thread.submit(self._forget, list(stream_ids))

    def _forget(self, stream_ids: list[str]) -> None:
        for sid in stream_ids:
            d = self.decoders.pop(sid, None)
            if d is not None:
                d.close()

    def keep(self, pool: SlotPool) -> None:
        """Drops the decoders of streams that hold no slot (left, idled out, never admitted)."""
        gone = [sid for sid in list(self.decoders) if pool.get(sid) is None]
        if gone:
            self.forget(gone)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.submit(self._forget, list(self.decoders))
            self._thread.shutdown(wait=False)
            self._thread = None


def _load_codec(settings: ReplicaSettings):
    """(StreamingEncodec-like runtime with one extra health slot, weights kind)."""
    if settings.compute is ComputeMode.EMULATED:
        return EmulatedRuntime(settings.capacity + 1, settings.max_bandwidth_kbps), EMULATED_WEIGHTS
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
                                     bandwidth_kbps=settings.max_bandwidth_kbps,
                                     threads=settings.torch_threads or None)
    else:
        from models.streaming import StreamingEncodec

        codec = StreamingEncodec(model, capacity, device=settings.device,
                                 bandwidth_kbps=settings.max_bandwidth_kbps)
    return codec, kind


@dataclass
class _Part:
    """The frames of one request in one step."""

    req: _Request
    rows: np.ndarray  # the request's rows, in plan order


@dataclass
class _Group:
    """Frames of one step that share a model call (same chunk length). The group quantizes
    as deep as its deepest row (`n_q`): the SEANet encoder, most of the cost, runs once for
    all rows, and each row keeps the prefix its stream needs."""

    n_q: int
    parts: list[_Part]
    slots: np.ndarray  # one per frame, in the parts' order
    opens: np.ndarray  # bool: the frame opens a new epoch (its state is zeroed first)

    @property
    def size(self) -> int:
        return int(self.slots.size)

    @property
    def bandwidth_kbps(self) -> float:
        return codebooks_bandwidth(self.n_q)


def _run_groups(codec, groups: list[_Group]) -> tuple[list[np.ndarray | Exception], float]:
    """Runs in the executor thread: one model call per group. Returns outputs and total ms."""
    t0 = time.perf_counter()
    outs: list[np.ndarray | Exception] = []
    for g in groups:
        try:
            if g.opens.any():
                codec.reset_encoder(g.slots[g.opens])
            pcm = np.concatenate([p.req.batch.pcm_float()[p.rows] for p in g.parts])
            outs.append(np.asarray(codec.encode(g.slots, pcm, g.bandwidth_kbps)))
        except Exception as exc:  # noqa: BLE001 - a model error answers its frames, never the loop
            outs.append(exc)
    return outs, (time.perf_counter() - t0) * 1000.0


# ----------------------------------------------------------------------------- the replica
class CodecReplicaCore:
    """Everything the Serve deployment does, without Serve: constructible in a plain test,
    and the in-process codec of the bridge tests and tools (`process(batch)`, `leave(ids)`).

    Bound to the event loop it first runs on; `stop()` ends the step loop deterministically.
    Every time it keeps is on `clock` (monotonic by default): frames arrive with relative
    budgets, stamped on this clock at arrival, so no other host's clock is ever compared.
    """

    def __init__(self, settings: ReplicaSettings | None = None, replica_id: str = "local",
                 build: bool = True, clock: Callable[[], float] = time.monotonic,
                 native: bool | None = None) -> None:
        self.settings = settings or ReplicaSettings()
        self.replica_id = replica_id
        self.clock = clock
        # the bookkeeping's loops in C (deployments/_columns.c) where built (None: if so;
        # False: all numpy, as the tests compare them; the same answers either way)
        self.native = use_c_loops(native)
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
        self._rids = itertools.count(1)
        # recent frames for the autoscaling stats: (missed, slack ms) in a ring
        self._recent_missed = np.zeros(STATS_WINDOW, bool)
        self._recent_slack = np.zeros(STATS_WINDOW, np.float64)
        self._recent_n = 0
        self._recent_at = 0
        self.cpu = CpuMeter()  # bookkeeping: intake, planning, answering (not the model)
        self.gc_watch = GcWatch()  # the collector's pauses in this process (load tests read them)
        self.frames_in = 0
        self.counters: dict[str, int] = {}

    # -- configuration
    def _fresh_state(self, settings: ReplicaSettings) -> None:
        if getattr(self, "opus", None) is not None:
            self.opus.close()
        self.opus = OpusIntake()
        self.pool = SlotPool(settings.capacity)
        self.pool.native = self.native
        self.latency = LatencyModel.from_profile(settings.latency_profile)
        self.scheduler = EdfScheduler(self.latency, self._scheduler_config(settings), native=self.native)
        self._requests: dict[int, _Request] = {}

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
    def _check(self, batch: Any) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Validates a request; returns its codebook count, its streams' slots (-1: none)
        and which of them its refs found (`SlotPool.lookup_refs`) (ValueError names the
        problem)."""
        if not isinstance(batch, FrameBatch):
            raise ValueError(f"expected a FrameBatch, got {type(batch).__name__}")
        batch.validate(distinct=True)  # all but duplicate ids: found from the slots below
        # Streams by their sender's refs where known, else one dictionary lookup a stream
        # (the transport delivers new string objects each request, so each costs a hash).
        slots, by_ref = self.pool.lookup_refs(batch.stream_ids, batch.bridge_id, batch.stream_refs)
        if not self.pool.distinct(batch.stream_ids, slots):
            raise ValueError("duplicate stream id in one batch")
        if batch.bandwidth_kbps > self.settings.max_bandwidth_kbps:
            raise ValueError(f"bandwidth {batch.bandwidth_kbps} kbps is above this replica's "
                             f"max_bandwidth_kbps {self.settings.max_bandwidth_kbps}")
        depths = batch.depths()
        if not len(depths):
            return bandwidth_codebooks(batch.bandwidth_kbps), slots, by_ref
        n_q = int(depths.max())
        if n_q > bandwidth_codebooks(self.settings.max_bandwidth_kbps):
            raise ValueError(f"{n_q} codebooks is above this replica's max_bandwidth_kbps "
                             f"{self.settings.max_bandwidth_kbps}")
        return n_q, slots, by_ref

    async def process(self, batch: FrameBatch) -> BatchResult:
        arrival = self.clock()
        pool = self.pool
        req = None
        with self.cpu:
            try:
                n_q, slots, by_ref = self._check(batch)
            except ValueError as exc:
                error = str(exc)
            else:
                error = None
                if self._codec is not None and batch.opus is None and batch.vad is None:
                    # the usual request: intake in the same section, no await in between
                    self._ensure_loop()
                    req = self._intake(batch, arrival, n_q, (slots, by_ref), None, None)
        if error is not None:
            self._count("malformed_batches")
            res = malformed_result(batch, error)
            res.replica_id = self.replica_id
            res.compute = self.settings.compute.value
            metrics.record_frames(Op.ENCODE.value, res.counts())
            return res
        if req is None:
            if batch.opus is not None:  # the bridge sent its publishers' Opus: decoded here, off the loop
                batch = replace(batch, pcm=await self.opus.decode_async(batch.stream_ids, batch.opus), opus=None)
                pool = None  # slots may have moved while it decoded: looked up again at admission
            silent = vad = None
            if batch.vad is not None:  # the bridge's DTX, decided here on the decoded audio
                silent, vad = self._vad(batch)
            await self.ensure_built()
            self._ensure_loop()
            with self.cpu:
                # (a rebuild while this request waited for the runtime made a new slot pool)
                req = self._intake(batch, arrival, n_q, (slots, by_ref) if self.pool is pool else None,
                                   silent, vad)
        res = await req.future
        metrics.record_frames(Op.ENCODE.value, res.counts())
        res.held_ms = (self.clock() - arrival) * 1000.0  # lets the sender measure the transit
        return res

    def _intake(self, batch: FrameBatch, arrival: float, n_q: int, found: _Found | None,
                silent: np.ndarray | None, vad: np.ndarray | None) -> _Request:
        """A checked request's frames into the queue (or answered now); wakes the step loop."""
        req = _Request(next(self._rids), batch, arrival, self.replica_id,
                       self.settings.compute.value, n_q, asyncio.get_running_loop())
        if silent is not None:
            req.result.vad = vad
            req.answer(silent.nonzero()[0], DTX_CODE)
        if self._admit(req, found, silent) and self._wake is not None:
            self._wake.set()
        return req

    def _vad(self, batch: FrameBatch) -> tuple[np.ndarray, np.ndarray]:
        """Each DTX row's chunk through the voice-activity detector with its stream's state
        (FrameBatch.vad): (in DTX now, the new states)."""
        from models.vad import VadConfig, vad_step

        silent, vad = vad_step(batch.pcm_float(), batch.vad, VadConfig.from_wire(batch.vad_config))
        self._count("dtx_frames", int(np.count_nonzero(silent)))
        return silent, vad

    def _admit(self, req: _Request, found: _Found | None = None, skip: np.ndarray | None = None) -> int:
        """Intake half of the epoch rule and the queue, for all of a request's frames at
        once; frames refused here are answered now. `found`: the streams' `lookup_refs`,
        when known; `skip`: frames already answered (bool per row, `dtx`). Returns how many
        were queued."""
        batch, now = req.batch, req.arrival
        b = len(batch)
        self.frames_in += b
        epochs = np.asarray(batch.epochs, np.int64)
        seqs = np.asarray(batch.epoch_seqs, np.int64)
        deadlines = req.deadlines
        slots, by_ref = found or self.pool.lookup_refs(batch.stream_ids, batch.bridge_id, batch.stream_refs)
        usual = ((skip is None or not skip.any())
                 and (batch.pcm.dtype != np.float32 or np.isfinite(batch.pcm).all())
                 and not (deadlines <= now).any()
                 and int(seqs.min(initial=0)) >= 0 and int(epochs.min(initial=0)) >= 0)
        if usual and int(slots.min(initial=0)) < 0:
            # Streams new here, each with its epoch's first frame, and free slots for all of
            # them: they take their slots as the full path below would (under churn, most
            # requests bring a stream or two).
            new = (slots < 0).nonzero()[0]
            usual = new.size <= self.pool.free and not seqs[new].any()
            if usual:
                ids = batch.stream_ids
                slots[new] = self.pool.acquire_new([ids[r] for r in new.tolist()], now)
        if usual:
            # The usual request: known streams, budgets left, nothing malformed. Only the
            # epoch rule can refuse a frame (the full path below does the same, check by check).
            ok = self.pool.epochs.admit(slots, epochs, seqs)
            if ok.all():
                return self._queue(req, np.arange(b), slots, epochs, seqs, deadlines, now, by_ref)
            req.answer((~ok).nonzero()[0], _RESET)
            rows = ok.nonzero()[0]
            return self._queue(req, rows, slots[rows], epochs[rows], seqs[rows], deadlines[rows], now,
                               None if by_ref is None else by_ref[rows])
        todo = np.ones(b, bool) if skip is None else ~skip
        # A frame the model cannot take (NaN/inf) is that frame's `error`, not its batch's.
        bad = ~np.isfinite(batch.pcm).all(axis=1) if batch.pcm.dtype == np.float32 else np.zeros(b, bool)
        bad &= todo
        late = todo & ~bad & (deadlines <= now)  # NaN: no deadline of its own, never late here
        ended = (bad | late) & (slots >= 0)
        self.pool.epochs.end(slots[ended])
        req.answer(bad.nonzero()[0], _ERROR, error="pcm has NaN or infinite samples")
        req.answer(late.nonzero()[0], _DEADLINE)
        todo &= ~(bad | late)
        negative = todo & ((seqs < 0) | (epochs < 0))
        req.answer(negative.nonzero()[0], _ERROR, error="epoch and epoch_seq must be >= 0")
        todo &= ~negative
        # A stream's first frame of an epoch takes a slot (a new stream: a free one, if any).
        need = (todo & (seqs == 0) & (slots < 0)).nonzero()[0]
        if need.size:
            ids = batch.stream_ids
            got = self.pool.acquire_new([ids[r] for r in need.tolist()], now)
            slots[need] = got
            full_rows = need[got < 0]
            req.answer(full_rows, _OVERLOAD)
            todo[full_rows] = False
        # Continuing an epoch this replica does not hold (moved, restarted, or a gap).
        orphan = todo & (slots < 0)
        req.answer(orphan.nonzero()[0], _RESET)
        todo &= ~orphan
        rows = todo.nonzero()[0]
        ok = self.pool.epochs.admit(slots[rows], epochs[rows], seqs[rows])
        req.answer(rows[~ok], _RESET)
        rows = rows[ok]
        return self._queue(req, rows, slots[rows], epochs[rows], seqs[rows], deadlines[rows], now,
                           None if by_ref is None else by_ref[rows])

    def _queue(self, req: _Request, rows: np.ndarray, slots: np.ndarray, epochs: np.ndarray,
               seqs: np.ndarray, deadlines: np.ndarray, now: float, by_ref: np.ndarray | None = None) -> int:
        """Queues the admitted frames (`rows` of the request, with their slots, epochs,
        seqs and deadlines; `by_ref`: which of them their refs found); returns how many."""
        if not rows.size:
            return 0
        req.slots[rows] = slots
        req.generation[rows] = self.pool.generation[slots]
        sender_refs = req.batch.stream_refs
        if sender_refs is not None:
            # the sender's refs of the streams not found by them (those found keep theirs)
            if by_ref is None:
                self.pool.remember(req.batch.bridge_id, sender_refs[rows], slots)
            elif not by_ref.all():
                new = (~by_ref).nonzero()[0]
                self.pool.remember(req.batch.bridge_id, sender_refs[rows[new]], slots[new])
        self.pool.last_seen[slots] = now
        self._requests[req.rid] = req
        refs = (req.rid << _ROW_BITS) | rows
        self.scheduler.add_many(slots, epochs, seqs, deadlines, now, refs)
        return int(rows.size)

    async def leave(self, stream_ids: list[str]) -> int:
        """Frees the streams' slots now. Their queued frames are answered `reset` when they
        come up (their slot no longer belongs to them)."""
        freed = 0
        for sid in stream_ids:
            if self.pool.release(sid) is not None:
                freed += 1
        self.opus.forget(stream_ids)
        self._update_slot_gauge()
        return freed

    # -- the step loop
    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._loop_task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        if task is not None and task.done() and not self._stopping and task.get_loop() is loop:
            exc = task.exception() if not task.cancelled() else None
            logger.error("step loop had exited (%r); restarting it", exc)
        # (a loop of an earlier event loop - an in-process codec reused across
        # asyncio.run calls - is simply started again on this one)
        self._stopping = False
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        self._exited = asyncio.Event()
        self._loop_task = loop.create_task(self._step_loop())

    async def stop(self) -> None:
        """Stops the step loop; frames still queued are answered `reset`."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._loop_task is not None:
            await self._exited.wait()
        self._drain(FallbackReason.RESET, "replica stopping")
        self._executor.shutdown(wait=False)
        self.opus.close()

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
                    plan = None
                    try:
                        if self.scheduler.pending:
                            with self.cpu:  # the decision and the step's intake half: one section
                                plan = self.scheduler.schedule(self.clock())
                                groups = self._step_groups(plan) if plan else None
                            if groups is not None:
                                await self._execute(plan, groups)
                        else:  # nothing queued: no decision to make (or to meter)
                            plan = Plan(now=self.clock())
                    except Exception:  # noqa: BLE001 - a bug must not strand frames or the loop
                        if plan is None:
                            raise  # the decision itself failed: nothing planned to answer
                        logger.exception("codec step failed; its frames are answered `error`")
                        self._fail_plan(plan)
                if not plan.run_refs.size:
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

    def _parts(self, refs: np.ndarray) -> list[_Part]:
        """Frames of a plan list grouped by request (a few requests per step: one per bridge)."""
        if not refs.size:
            return []
        rids = refs >> _ROW_BITS
        rows = refs & _ROW_MASK
        if (rids == rids[0]).all():
            req = self._requests.get(int(rids[0]))
            return [] if req is None else [_Part(req, rows)]
        out = []
        for rid in np.unique(rids).tolist():
            req = self._requests.get(rid)
            if req is not None:
                out.append(_Part(req, rows[rids == rid]))
        return out

    def _end_epochs(self, part: _Part, rows: np.ndarray) -> None:
        """The frames fell back: their slots' epochs end, unless a slot changed hands."""
        slots = part.req.slots[rows]
        mine = self.pool.generation[slots] == part.req.generation[rows]
        self.pool.epochs.end(slots[mine])

    def _fallback(self, refs: np.ndarray, code: int, now: float) -> None:
        for p in self._parts(refs):
            self._end_epochs(p, p.rows)
            if code == _DEADLINE:
                self._record_recent(np.ones(p.rows.size, bool), np.zeros(p.rows.size))
            p.req.answer(p.rows, code, (now - p.req.arrival) * 1000.0)
            self._retire(p.req)

    def _retire(self, req: _Request) -> None:
        if req.remaining == 0:
            self._requests.pop(req.rid, None)

    def _step_groups(self, plan: Plan) -> list[_Group] | None:
        """A plan's frames that fell back answered; those to run grouped into model calls
        (None: nothing to run). The caller meters it."""
        self._fallback(plan.expired_refs, _DEADLINE, plan.now)
        self._fallback(plan.shed_refs, _OVERLOAD, plan.now)
        if not plan.run_refs.size:
            return None
        groups = self._group(self._parts(plan.run_refs), plan.now)
        if not groups:
            self.scheduler.complete(plan, 0.0, computed=0)
            return None
        return groups

    async def _execute(self, plan: Plan, groups: list[_Group]) -> None:
        n = sum(g.size for g in groups)
        start = self.clock()
        if self.settings.compute is ComputeMode.EMULATED:
            await asyncio.sleep(profile_ms(self.settings.latency_profile, n) / 1000.0)
            outs: list[np.ndarray | Exception | None] = [None] * len(groups)
            step_ms = (self.clock() - start) * 1000.0
        else:
            loop = asyncio.get_running_loop()
            outs, step_ms = await loop.run_in_executor(self._executor, _run_groups, self._codec, groups)
        end = self.clock()
        with self.cpu:
            # The model learns the cost of the frames computed, not of the plan's: frames
            # answered `reset` above took no compute.
            self.scheduler.complete(plan, step_ms, computed=n)
            slacks = []
            for g, out in zip(groups, outs, strict=True):
                at = 0
                for p in g.parts:
                    k = p.rows.size
                    slacks.append(self._answer_step(p, out, at, start, end, step_ms))
                    at += k
            slack = slacks[0] if len(slacks) == 1 else np.concatenate(slacks)
            # every frame's slack locally; an even sample of a step's for Ray's histogram
            metrics.observe_step(Op.ENCODE.value, step_ms, n, self.settings.device, slack,
                                 slack_sample=SLACK_SAMPLE_PER_STEP)

    def _answer_step(self, p: _Part, out: np.ndarray | Exception | None, at: int, start: float,
                     end: float, step_ms: float) -> np.ndarray:
        """Answers one request's frames of a finished step; returns the slack (ms) of those
        that met their deadline."""
        req, rows = p.req, p.rows
        queue_ms = (start - req.arrival) * 1000.0
        if isinstance(out, Exception):
            self._end_epochs(p, rows)
            req.answer(rows, _ERROR, queue_ms, step_ms,
                       error=f"model error: {type(out).__name__}: {out}"[:300])
            self._retire(req)
            return np.empty(0)
        if out is not None:  # emulated: zero codes, already zero-filled
            n_q = min(req.result.codes.shape[1], out.shape[1])
            block = out[at : at + rows.size, :n_q].astype(np.int16)
            depth = req.depths[rows]
            if (depth < n_q).any():  # each row keeps its stream's prefix, zeros below it
                block[np.arange(n_q)[None, :] >= depth[:, None]] = 0
            req.result.codes[rows, :n_q] = block
        if self.native:  # the two lines below and `_record_recent` in one C loop
            slack = np.empty(rows.size, np.float64)
            n_late = _c_step_slack(req.deadlines, np.ascontiguousarray(rows, np.int64), end,
                                   self._recent_missed, self._recent_slack, self._recent_at, slack)
            self._advance_recent(rows.size)
            late = slack < 0 if n_late else None
        else:
            slack = (req.deadlines[rows] - end) * 1000.0
            late = slack < 0
            self._record_recent(late, slack)
        if late is None or not late.any():
            req.answer(rows, 0, queue_ms, step_ms)
            self._retire(req)
            return slack
        # Finished, but after the call moved on: the bridge has sent the native codec for
        # it, so the stream starts a new epoch.
        self._end_epochs(p, rows[late])
        req.answer(rows[late], _DEADLINE, queue_ms, step_ms)
        req.answer(rows[~late], 0, queue_ms, step_ms)
        self._retire(req)
        return slack[~late]

    def _record_recent(self, missed: np.ndarray, slack_ms: np.ndarray) -> None:
        n = missed.size
        if n >= STATS_WINDOW:
            missed, slack_ms, n = missed[-STATS_WINDOW:], slack_ms[-STATS_WINDOW:], STATS_WINDOW
        # into the ring from `_recent_at` on, wrapping at its end: two slices
        at = self._recent_at
        first = min(n, STATS_WINDOW - at)
        self._recent_missed[at : at + first] = missed[:first]
        self._recent_slack[at : at + first] = slack_ms[:first]
        self._recent_missed[: n - first] = missed[first:]
        self._recent_slack[: n - first] = slack_ms[first:]
        self._advance_recent(n)

    def _advance_recent(self, n: int) -> None:
        """The ring of recent frames took n more (the last STATS_WINDOW of them)."""
        n = min(n, STATS_WINDOW)
        self._recent_at = (self._recent_at + n) % STATS_WINDOW
        self._recent_n = min(STATS_WINDOW, self._recent_n + n)

    def _fail_plan(self, plan: Plan) -> None:
        for refs in (plan.run_refs, plan.expired_refs, plan.shed_refs):
            for p in self._parts(refs):
                self._end_epochs(p, p.rows)
                p.req.answer(p.req.unanswered(p.rows), _ERROR, error="replica step failed")
                self._retire(p.req)

    def _group(self, parts: list[_Part], now: float) -> list[_Group]:
        """Run-time half of the epoch rule, then frames grouped into shared model calls."""
        groups: dict[tuple[int, float], tuple[list[_Part], list[np.ndarray], list[np.ndarray]]] = {}
        for p in parts:
            req, rows = p.req, p.rows
            slots = req.slots[rows]
            # The stream left (or idled out) while this frame waited: its slot is not its own.
            mine = self.pool.generation[slots] == req.generation[rows]
            if not mine.all():
                req.answer(rows[~mine], _RESET, (now - req.arrival) * 1000.0)
                rows, slots = rows[mine], slots[mine]
            seqs = np.asarray(req.batch.epoch_seqs, np.int64)[rows]
            ok = self.pool.epochs.run_check(slots, np.asarray(req.batch.epochs, np.int64)[rows], seqs)
            if not ok.all():
                req.answer(rows[~ok], _RESET, (now - req.arrival) * 1000.0)
                rows, slots, seqs = rows[ok], slots[ok], seqs[ok]
            self._retire(req)
            if not rows.size:
                continue
            key = req.batch.pcm.shape[1]
            g = groups.setdefault(key, (2, [], [], []))
            depth = req.n_q if rows.size == req.depths.size else int(req.depths[rows].max())
            if depth > g[0]:
                g = groups[key] = (depth, *g[1:])
            g[1].append(_Part(req, rows))
            g[2].append(slots)
            g[3].append(seqs == 0)
        return [_Group(n_q, ps, ss[0] if len(ss) == 1 else np.concatenate(ss),
                       os_[0] if len(os_) == 1 else np.concatenate(os_))
                for n_q, ps, ss, os_ in groups.values()]

    def _drain(self, reason: FallbackReason, message: str) -> None:
        """Answers every queued frame (used when the runtime goes away)."""
        code = reason_code(reason)
        error = message if reason is FallbackReason.ERROR else ""
        for req in self._requests.values():  # queued frames, and those shed but not planned
            req.answer(req.unanswered(np.arange(len(req.batch))), code, error=error)
        self._requests.clear()
        self.scheduler = EdfScheduler(self.latency, self._scheduler_config(self.settings))

    def _sweep_idle(self, now: float) -> None:
        self._last_sweep = now
        self.pool.forget_idle_senders()
        for sid in self.pool.idle(now, self.settings.idle_timeout_s):
            self.pool.release(sid)
            self._count("slots_idle_freed")
        self.opus.keep(self.pool)
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
            codec.reset_encoder(np.asarray([health]))
            codes = np.asarray(codec.encode(np.asarray([health]), np.zeros((1, FRAME_SAMPLES), np.float32)))
            if codes.shape[0] != 1 or codes.shape[2] != 1 or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
                raise RuntimeError(f"health step returned codes of shape {codes.shape}")

        await asyncio.get_running_loop().run_in_executor(self._executor, step)

    def autoscaling_stats(self) -> dict[str, float]:
        n = self._recent_n
        missed = self._recent_missed[:n] if n < STATS_WINDOW else self._recent_missed
        slack = (self._recent_slack[:n] if n < STATS_WINDOW else self._recent_slack)[~missed]
        return {
            "slot_occupancy": len(self.pool) / self.pool.capacity,
            "slots_in_use": float(len(self.pool)),
            "slot_capacity": float(self.pool.capacity),
            "queue_len": float(len(self.scheduler)),
            "miss_rate": float(missed.mean()) if n else 0.0,
            "deadline_slack_p10_ms": (float(np.sort(slack)[slack.size // 10]) if slack.size
                                      else float(self.settings.deadline_ms)),
        }

    def info(self) -> dict[str, Any]:
        t = os.times()
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
            # what the control-plane figures of a load test count for the replica
            "frames_in": self.frames_in,
            "bookkeeping_cpu_s": round(self.cpu.seconds, 6),
            "opus_intake": self.opus.info(),  # decoding the bridges' Opus rows
            # streams found by their sender's ref (FrameBatch.stream_refs) or by id
            "stream_lookup": {"by_ref": self.pool.by_ref, "by_id": self.pool.by_id,
                              "ref_senders": self.pool.ref_senders, "refs_dropped": self.pool.refs_dropped},
            "process_cpu_s": round(t.user + t.system, 3),
            "gc": self.gc_watch.snapshot(),
            "settings": {k: v for k, v in self.settings.to_dict().items() if k != "latency_profile"},
        }


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
        self._core.gc_watch.start()
        self._frozen = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self._core.reconfigure(user_config)
        if not self._frozen:
            # Everything alive now (Ray, Serve, the runtime just built) lives as long as the
            # replica: moved out of the collector's generations, a full collection no longer
            # walks it, so none stops a step or an intake for tens of ms under load.
            gc.collect()
            gc.freeze()
            self._frozen = True

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
