"""The tick batcher: every 40 ms, ONE `FrameBatch` with every stream's chunk goes to the codec.

Per tick (`TickBatcher.tick`):
1. take at most one pending 40 ms chunk per stream; chunks beyond the backlog limit are
   answered `fallback/overload` locally, opted-out streams `fallback/opted_out` locally
   (they never reach the AI);
2. number each AI frame with its stream's (epoch, epoch_seq) - a stream whose previous frame
   fell back starts a new epoch (deployments/contract.py, the epoch rule);
3. send one batch to the codec client (any object with `async process(FrameBatch) ->
   BatchResult`: the Serve `CodecClient`, or `InProcessCodec` below), bounded by the frames'
   deadline plus a grace, so a stuck client yields `fallback/deadline` instead of a stall;
4. check the tick's hints (parse + tag + replay + model id) and count them into the limiter
   in one call; accepted hints take effect (adaptation.py): BW from the next tick, R now;
5. give every frame exactly one `FrameOutcome`, counted by outcome/reason.

Before step 2, a stream with DTX on whose talk spurt has ended (vad.py) is answered `dtx`
locally: no AI frame, no replica compute; its next AI frame opens a new epoch. Each AI
frame is quantized as deep as its stream needs (`StreamAdaptation.depth`: the deepest AIC
subscriber, capped by the publisher's requested bandwidth and the operator's cap).

Metrics (`telemetry.metrics`) are recorded here for what the bridge decides, once per tick:
frames the bridge answered itself (opted_out, unhealthy, overload, a stuck or failing codec
client, a malformed answer; frames the replica answered are counted by the replica), the
send-to-answer latency of AI frames, hints by verdict, and the streams the bridge carries.

The batcher is network-free: the media layer (media.py) pushes chunks in and sends the
outcomes to subscribers.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from deployments.contract import (
    AI_CODE,
    CHUNK_SAMPLES,
    CODEBOOK_SIZE,
    REASON_CODES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    Outcome,
    bandwidth_codebooks,
    codebooks_bandwidth,
    reason_code,
)
from sfu_bridge.adaptation import DtxDetector, HintRejected, StreamAdaptation, check_model
from telemetry import metrics

logger = logging.getLogger(__name__)

# The AI frames of one tick share one latency (send -> answer), so Ray's histogram gets this
# many copies of it per tick rather than the default sample: each costs a Ray call.
LATENCY_SAMPLE_PER_TICK = 16

# How long past the frames' deadline the bridge still waits for an answer: the replica
# should have answered `deadline` itself by then; beyond, the client is stuck.
DEADLINE_GRACE_S = 0.010


class CodecClientLike(Protocol):
    async def process(self, batch: FrameBatch) -> BatchResult: ...


@dataclass
class Chunk:
    """40 ms of one stream's audio, as the media layer hands it in."""

    stream_id: str
    pcm24: np.ndarray  # float32 [960] in [-1, 1], 24 kHz mono (codec input)
    rtp_timestamp: int = 0  # 48 kHz RTP clock, first sample of the chunk
    received_at: float = 0.0


@dataclass
class FrameOutcome:
    chunk: Chunk
    outcome: Outcome
    reason: FallbackReason | None
    epoch: int  # the epoch the frame ran in (0 = never sent to the AI)
    epoch_seq: int
    codes: np.ndarray | None = None  # int16 [n_q, 3] when outcome is ai

    @property
    def key(self) -> str:
        if self.outcome is Outcome.DTX:
            return "dtx"
        return "ai" if self.reason is None else f"fallback/{self.reason.value}"

    @property
    def n_q(self) -> int:
        """Codebooks this frame's codes hold (0 unless ai)."""
        return 0 if self.codes is None else int(self.codes.shape[0])


class HintDrop(str, enum.Enum):
    INVALID = "invalid"  # failed parse, tag, replay or stream binding
    RATE_LIMITED = "rate_limited"


# A dropped hint's reason (HintDrop, or the verifier's rejection reason) -> metrics verdict.
_HINT_VERDICT = {
    HintDrop.RATE_LIMITED.value: metrics.HintVerdict.LIMITED,
    "unknown_model": metrics.HintVerdict.UNKNOWN_MODEL,
    "tag": metrics.HintVerdict.FORGED,
    "replay": metrics.HintVerdict.REPLAYED,
}


def hint_verdict(reason: str) -> metrics.HintVerdict:
    """Anything not rate-limited, forged or replayed failed a size/format/binding check."""
    return _HINT_VERDICT.get(reason, metrics.HintVerdict.MALFORMED)


@dataclass
class TickReport:
    tick: int
    started_at: float
    frames: list[FrameOutcome]
    batch_size: int  # frames sent to the codec client
    codec_wait_ms: float  # time awaiting the codec client (not bridge cost)
    overhead_ms: float = 0.0  # bridge-side cost of the tick; media.py adds its send time
    hints_accepted: int = 0
    hints_dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class StreamState:
    stream_id: str
    opted_out: bool = False
    opted_out_locally: bool = False  # from the bridge's own config at join; never lifted remotely
    unhealthy: bool = False  # the fallback supervisor turned AI off (it retries with backoff)
    epoch: int = 0
    next_seq: int = 0
    new_epoch: bool = True  # the next AI frame opens a new epoch
    backlog: deque = field(default_factory=deque)
    hints: list[bytes] = field(default_factory=list)
    last_hint: Any = None  # the latest accepted hint (parsed), for the media layer
    adapt: StreamAdaptation | None = None  # requested bandwidth, caps, depth need, DTX


HintChecker = Callable[[str, bytes], Any]  # (stream_id, raw) -> parsed hint; raises ValueError


class TickBatcher:
    def __init__(
        self,
        codec: CodecClientLike,
        *,
        bridge_id: str = "bridge",
        deadline_ms: float = 20.0,
        bandwidth_kbps: float = 6.0,
        max_backlog: int = 3,
        hint_checker: HintChecker | None = None,
        limiter: Any = None,
        max_hints_per_tick: int = 16,
        dtx: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        bandwidth_codebooks(bandwidth_kbps)  # validates
        self.codec = codec
        self.bridge_id = bridge_id
        self.deadline_ms = deadline_ms
        self.bandwidth_kbps = bandwidth_kbps
        self.max_backlog = max_backlog
        self.hint_checker = hint_checker
        self.limiter = limiter
        self.max_hints_per_tick = max_hints_per_tick
        self.dtx = dtx  # default for new streams (BridgeConfig.dtx); operator policy per user
        self.dtx_detector = DtxDetector()
        self.clock = clock
        self.streams: dict[str, StreamState] = {}
        self.counters: Counter[str] = Counter()  # frames by "ai" / "fallback/<reason>"
        self._decided: Counter[str] = Counter()  # frames the bridge answered, not yet recorded
        self.hint_counters: Counter[str] = Counter()  # "accepted" / "dropped/<why>"
        self.ticks = 0
        self.epoch_restarts = 0  # requested by subscribers (join, RTCP PLI)
        self.hint_resets = 0  # epochs restarted by a hint's R flag
        self.encodes = 0  # AI frames sent to the codec: one per stream per chunk
        self._started = asyncio.Event()
        self._exited = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- streams ---------------------------------------------------------------------------
    def join(self, stream_id: str, opted_out: bool = False) -> StreamState:
        st = self.streams.get(stream_id)
        if st is None:
            st = self.streams[stream_id] = StreamState(
                stream_id, opted_out=opted_out, opted_out_locally=opted_out,
                adapt=StreamAdaptation(self.bandwidth_kbps, dtx_enabled=self.dtx,
                                       spurt=self.dtx_detector.new_spurt()),
            )
        return st

    def leave(self, stream_id: str) -> list[FrameOutcome]:
        """Forget a stream; its still-pending chunks get `fallback/overload` outcomes."""
        st = self.streams.pop(stream_id, None)
        if st is None:
            return []
        out = [self._local(c, FallbackReason.OVERLOAD) for c in st.backlog]
        st.backlog.clear()
        return out

    def restart_epoch(self, stream_id: str) -> None:
        """The stream's next AI frame opens a new epoch (a decoder joined or lost sync)."""
        st = self.streams.get(stream_id)
        if st is not None and not st.new_epoch:
            st.new_epoch = True
            self.epoch_restarts += 1

    def apply_decisions(self, off: Mapping[str, str]) -> None:
        """Applies the fallback supervisor's verdicts, `{stream: "opted_out" | "unhealthy"}`;
        a stream not named is AI-on. Opt-outs known locally (at join) always stay."""
        for sid, st in self.streams.items():
            why = off.get(sid)
            st.opted_out = st.opted_out_locally or why == FallbackReason.OPTED_OUT.value
            st.unhealthy = why == FallbackReason.UNHEALTHY.value

    def apply_policies(self, by_stream: Mapping[str, Mapping[str, Any]]) -> None:
        """The operator's per-user policies, `{stream: {"max_kbps": .., "dtx": ..}}`; a
        stream not named has none: no cap, the bridge's DTX default."""
        for sid, st in self.streams.items():
            if st.adapt is None:
                continue
            pol = by_stream.get(sid, {})
            cap = pol.get("max_kbps")
            st.adapt.cap_kbps = None if cap is None else float(cap)
            st.adapt.dtx_enabled = self.dtx and bool(pol.get("dtx", True))

    def push(self, chunk: Chunk) -> None:
        if chunk.pcm24.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"chunk must hold {CHUNK_SAMPLES} samples, got {chunk.pcm24.shape}")
        self.join(chunk.stream_id).backlog.append(chunk)

    def add_hint(self, stream_id: str, raw: bytes) -> None:
        st = self.streams.get(stream_id)
        if st is None:
            return
        if len(st.hints) >= self.max_hints_per_tick:
            # a flood beyond one tick's worth is dropped before any crypto work
            self.hint_counters[f"dropped/{HintDrop.RATE_LIMITED.value}"] += 1
            metrics.record_hints(metrics.HintVerdict.LIMITED)
            return
        st.hints.append(raw)

    # -- one tick --------------------------------------------------------------------------
    def _local(self, chunk: Chunk, reason: FallbackReason) -> FrameOutcome:
        st = self.streams.get(chunk.stream_id)
        if st is not None and reason is not FallbackReason.OPTED_OUT:
            st.new_epoch = True
        fo = FrameOutcome(chunk, Outcome.FALLBACK, reason, 0, 0)
        self.counters[fo.key] += 1
        self._decided[fo.key] += 1
        return fo

    def _record_decided(self) -> None:
        """One metrics call per outcome key for what the bridge answered since the last one."""
        if self._decided:
            metrics.record_frames(Op.ENCODE.value, self._decided)
            self._decided = Counter()

    async def tick(self) -> TickReport:
        t0 = time.perf_counter()
        started_at = self.clock()
        self.ticks += 1
        frames: list[FrameOutcome] = []
        send: list[tuple[StreamState, Chunk]] = []
        for st in self.streams.values():
            while len(st.backlog) > self.max_backlog:
                frames.append(self._local(st.backlog.popleft(), FallbackReason.OVERLOAD))
            if not st.backlog:
                continue
            chunk = st.backlog.popleft()
            if st.opted_out:
                frames.append(self._local(chunk, FallbackReason.OPTED_OUT))
            elif st.unhealthy:
                frames.append(self._local(chunk, FallbackReason.UNHEALTHY))
            else:
                send.append((st, chunk))
        if send:
            send = self._drop_silence(send, frames)

        hint_task = asyncio.ensure_future(self._check_hints())
        codec_wait_ms = 0.0
        if send:
            batch = self._make_batch(send)
            t_send = time.perf_counter()
            result = await self._call_codec(batch)
            codec_wait_ms = (time.perf_counter() - t_send) * 1000.0
            ai_before = self.counters["ai"]
            frames.extend(self._apply(batch, result, send))
            n_ai = self.counters["ai"] - ai_before
            if n_ai:
                metrics.observe_frame_latency(batch.op.value, np.full(n_ai, codec_wait_ms),
                                              sample=LATENCY_SAMPLE_PER_TICK)
        accepted, dropped = await hint_task
        self._record_decided()
        metrics.set_streams_active(self.bridge_id, len(self.streams))
        overhead_ms = (time.perf_counter() - t0) * 1000.0 - codec_wait_ms
        return TickReport(
            tick=self.ticks, started_at=started_at, frames=frames, batch_size=len(send),
            codec_wait_ms=codec_wait_ms, overhead_ms=overhead_ms,
            hints_accepted=accepted, hints_dropped=dropped,
        )

    def _drop_silence(self, send: list[tuple[StreamState, Chunk]],
                      frames: list[FrameOutcome]) -> list[tuple[StreamState, Chunk]]:
        """DTX: chunks of streams whose talk spurt has ended are answered `dtx` here."""
        on = [i for i, (st, _) in enumerate(send) if st.adapt is not None and st.adapt.dtx_enabled]
        if not on:
            return send
        pcm = np.stack([send[i][1].pcm24 for i in on])
        silent = self.dtx_detector.silent([send[i][0].adapt.spurt for i in on], pcm)
        if not silent.any():
            return send
        quiet = {on[j] for j in np.flatnonzero(silent).tolist()}
        for i in sorted(quiet):
            st, chunk = send[i]
            st.new_epoch = True  # speech resumes in a new epoch: both ends reset
            fo = FrameOutcome(chunk, Outcome.DTX, None, 0, 0)
            self.counters[fo.key] += 1
            frames.append(fo)
        metrics.record_dtx_seconds(len(quiet) * CHUNK_SAMPLES / 24_000)
        return [x for i, x in enumerate(send) if i not in quiet]

    def _make_batch(self, send: list[tuple[StreamState, Chunk]]) -> FrameBatch:
        b = len(send)
        epochs: list[int] = []
        seqs: list[int] = []
        for st, _ in send:
            if st.new_epoch:
                st.epoch += 1
                st.next_seq = 0
                st.new_epoch = False
            epochs.append(st.epoch)
            seqs.append(st.next_seq)
            st.next_seq += 1
        pcm = np.stack([chunk.pcm24 for _, chunk in send]).astype(np.float32, copy=False)
        return FrameBatch(
            op=Op.ENCODE,
            bridge_id=self.bridge_id,
            stream_ids=[st.stream_id for st, _ in send],
            epochs=np.asarray(epochs, np.int64),
            epoch_seqs=np.asarray(seqs, np.int64),
            # Relative: the replica stamps it on its own clock (hosts' clocks differ).
            budgets_ms=np.full(b, self.deadline_ms),
            pcm=pcm,
            bandwidth_kbps=self.bandwidth_kbps,
            n_q=np.fromiter((st.adapt.depth() if st.adapt is not None
                             else bandwidth_codebooks(self.bandwidth_kbps) for st, _ in send),
                            np.int64, b),
        )

    async def _call_codec(self, batch: FrameBatch) -> BatchResult:
        timeout = self.deadline_ms / 1000.0 + DEADLINE_GRACE_S
        try:
            return await asyncio.wait_for(self.codec.process(batch), timeout)
        except asyncio.TimeoutError:
            self._decided[f"fallback/{FallbackReason.DEADLINE.value}"] += len(batch)
            return BatchResult.all_fallback(batch, FallbackReason.DEADLINE)
        except Exception as exc:  # the client promises not to raise; the media path must not stop
            logger.warning(
                "codec client raised %s; %d frames fall back", type(exc).__name__, len(batch)
            )
            self._decided[f"fallback/{FallbackReason.ERROR.value}"] += len(batch)
            return BatchResult.all_fallback(batch, FallbackReason.ERROR)

    def _apply(
        self, batch: FrameBatch, result: BatchResult, send: list[tuple[StreamState, Chunk]]
    ) -> list[FrameOutcome]:
        """One outcome per sent frame. The checks are array-wide (one pass over the batch,
        not one numpy call per frame): a row the result lacks, an unknown outcome code, or
        AI codes that are missing, too few or out of range all become `fallback/error`."""
        b = len(send)
        depths = batch.depths()
        n_q = int(depths.max()) if b else bandwidth_codebooks(self.bandwidth_kbps)
        err = reason_code(FallbackReason.ERROR)
        row = _result_rows(batch.stream_ids, result)  # -1 = no row for this frame
        have = row >= 0
        oc = np.full(b, err, np.int64)
        if have.any():
            oc[have] = np.asarray(result.outcome_codes)[row[have]]
        answered = oc.copy()  # what the other side said (err where it said nothing)
        oc[(oc < 0) | (oc > len(REASON_CODES))] = err
        codes = None
        ai = oc == AI_CODE
        if ai.any():
            rc = result.codes
            if rc is None or rc.ndim != 3 or rc.shape[0] != len(result.stream_ids) or rc.shape[1] < n_q:
                oc[ai] = err
            else:
                codes = rc[np.where(have, row, 0), :n_q]
                flat = codes.reshape(b, -1)
                if flat.shape[1]:
                    bad = (flat.min(axis=1) < 0) | (flat.max(axis=1) >= CODEBOOK_SIZE)
                    oc[ai & bad] = err
                codes = codes.astype(np.int16)
        reasons = _REASON_OF_CODE
        keys = _KEY_OF_CODE
        out = []
        append = out.append
        counts = np.bincount(oc, minlength=len(keys))
        for c in np.flatnonzero(counts).tolist():
            self.counters[keys[c]] += int(counts[c])
        overruled = (oc != answered) | ~have  # the bridge's own verdict: missing or bad answers
        if overruled.any():
            mine = np.bincount(oc[overruled], minlength=len(keys))
            for c in np.flatnonzero(mine).tolist():
                self._decided[keys[c]] += int(mine[c])
        epochs, seqs = batch.epochs.tolist(), batch.epoch_seqs.tolist()
        self.encodes += int(counts[AI_CODE])
        for i, (c, (st, chunk), d) in enumerate(zip(oc.tolist(), send, depths.tolist(), strict=True)):
            epoch, seq = epochs[i], seqs[i]
            if c == AI_CODE:
                # each stream's own depth: a view of the rows' first d books
                append(FrameOutcome(chunk, Outcome.AI, None, epoch, seq, codes[i, :d]))
            else:
                if st.stream_id in self.streams:
                    st.new_epoch = True  # the epoch rule: any fallback starts a new epoch
                append(FrameOutcome(chunk, Outcome.FALLBACK, reasons[c], epoch, seq))
        return out

    async def _check_hints(self) -> tuple[int, dict[str, int]]:
        dropped: Counter[str] = Counter()
        valid: dict[str, list[Any]] = {}
        for st in self.streams.values():
            if not st.hints:
                continue
            raws, st.hints = st.hints, []
            for raw in raws:
                if self.hint_checker is None:
                    dropped[HintDrop.INVALID.value] += 1
                    continue
                try:
                    hint = self.hint_checker(st.stream_id, raw)
                    check_model(hint)
                    valid.setdefault(st.stream_id, []).append(hint)
                except HintRejected as exc:  # authentic, but names no model a replica runs
                    dropped[exc.reason.value] += 1
                except ValueError as exc:  # parse, tag, replay or stream binding failed
                    why = getattr(exc, "reason", HintDrop.INVALID)
                    dropped[getattr(why, "value", str(why))] += 1
        accepted = 0
        if valid:
            ids = list(valid)
            allowed = await self._allow(ids, [len(valid[s]) for s in ids])
            for sid, n_ok in zip(ids, allowed, strict=False):
                hints = valid[sid]
                n_ok = max(0, min(int(n_ok), len(hints)))
                accepted += n_ok
                if len(hints) > n_ok:
                    dropped[HintDrop.RATE_LIMITED.value] += len(hints) - n_ok
                st = self.streams.get(sid)
                if n_ok and st is not None:
                    st.last_hint = hints[n_ok - 1]
                    reset = False
                    for h in hints[:n_ok]:  # in order: the last BW wins, any R resets
                        if st.adapt is not None:
                            reset |= st.adapt.apply_hint(h, self.ticks)
                    if reset:
                        st.new_epoch = True  # R: the stream's next AI frame opens an epoch
                        self.hint_resets += 1
        self.hint_counters["accepted"] += accepted
        metrics.record_hints(metrics.HintVerdict.ACCEPTED, accepted)
        for k, v in dropped.items():
            self.hint_counters[f"dropped/{k}"] += v
            metrics.record_hints(hint_verdict(k), v)
        return accepted, dict(dropped)

    async def _allow(self, stream_ids: list[str], counts: list[int]) -> list[int]:
        """One limiter call for all of the tick's hints; no limiter = everything allowed."""
        if self.limiter is None:
            return counts
        res = self.limiter.allow(stream_ids, counts)
        if inspect.isawaitable(res):
            res = await res
        allowed = getattr(res, "allowed", res)
        return [int(a) for a in allowed]

    # -- the periodic loop -----------------------------------------------------------------
    async def run(self, on_report: Callable[[TickReport], Any], tick_s: float = 0.040) -> None:
        """Tick every `tick_s` on a fixed schedule; a late tick is caught up, a stall is not."""
        self._started.set()
        try:
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            while True:
                report = await self.tick()
                try:
                    res = on_report(report)
                    if inspect.isawaitable(res):
                        await res
                except Exception:  # one bad tick must not stop the media path
                    self.counters["tick_errors"] += 1
                    logger.exception("tick %d: delivering outcomes failed", report.tick)
                next_at += tick_s
                now = loop.time()
                if next_at < now - self.max_backlog * tick_s:
                    # far behind (a stall): resume the schedule from now; the backlog limit
                    # already shed what could not be caught up
                    next_at = now
                # a little behind: the next tick runs at once, catching up one chunk per tick
                await asyncio.sleep(max(0.0, next_at - now))
        except asyncio.CancelledError:
            pass
        finally:
            self._exited.set()

    def start(self, on_report: Callable[[TickReport], Any], tick_s: float = 0.040) -> None:
        self._task = asyncio.ensure_future(self.run(on_report, tick_s))

    async def stop(self) -> None:
        if self._task is not None:
            await self._started.wait()
            self._task.cancel()
            await self._exited.wait()
            self._task = None


_REASON_OF_CODE: list[FallbackReason | None] = [None, *REASON_CODES]
_KEY_OF_CODE = ["ai", *(f"fallback/{r.value}" for r in REASON_CODES)]


def _result_rows(stream_ids: list[str], result: BatchResult | None) -> np.ndarray:
    """For each sent frame, its row in `result` (-1 where the result has none). Results
    come back in the batch's order, so that case costs one list comparison."""
    b = len(stream_ids)
    if result is None or len(result.outcome_codes) != len(result.stream_ids):
        return np.full(b, -1, np.int64)  # a malformed result answers nothing
    if result.stream_ids == stream_ids:
        return np.arange(b, dtype=np.int64)
    where = {sid: j for j, sid in enumerate(result.stream_ids)}
    return np.fromiter((where.get(sid, -1) for sid in stream_ids), np.int64, b)


class InProcessCodec:
    """The codec-client contract served in-process by `models.StreamingEncodec` (tests, bench).

    Same per-frame rules as a replica: a stream holds a state slot; `epoch_seq == 0` resets
    it; a frame continuing an epoch this codec does not hold is answered `reset`; no free
    slot is `overload`; a frame computed after its deadline is `deadline`.
    """

    def __init__(self, codec: Any, replica_id: str = "in-process") -> None:
        self.codec = codec  # models.streaming.StreamingEncodec
        self.replica_id = replica_id
        self._slots: dict[str, int] = {}
        self._epochs: dict[str, int] = {}
        self._free = list(range(codec.capacity - 1, -1, -1))
        # One worker thread: requests run in arrival order, so a request the bridge gave up
        # on (deadline) still finishes before the next one touches the same slots.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")

    async def process(self, batch: FrameBatch) -> BatchResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.process_sync, batch)

    async def leave(self, stream_ids: list[str]) -> None:
        for s in stream_ids:
            self._release(s)

    def _release(self, stream_id: str) -> None:
        self._epochs.pop(stream_id, None)
        slot = self._slots.pop(stream_id, None)
        if slot is not None:
            self._free.append(slot)

    def process_sync(self, batch: FrameBatch) -> BatchResult:
        t_arrive = time.monotonic()
        try:
            batch.validate()
        except ValueError as exc:
            return BatchResult.all_fallback(batch, FallbackReason.ERROR, self.replica_id, str(exc))
        b = len(batch)
        outcome = np.zeros(b, np.uint8)
        # A frame the model cannot take (NaN/inf) is that frame's `error`, not its batch's.
        outcome[~np.isfinite(batch.pcm).all(axis=1)] = reason_code(FallbackReason.ERROR)
        run, fresh = [], []
        for i, sid in enumerate(batch.stream_ids):
            if outcome[i]:
                continue
            ep, seq = int(batch.epochs[i]), int(batch.epoch_seqs[i])
            if seq == 0:
                if sid not in self._slots:
                    if not self._free:
                        outcome[i] = reason_code(FallbackReason.OVERLOAD)
                        continue
                    self._slots[sid] = self._free.pop()
                self._epochs[sid] = ep
                fresh.append(self._slots[sid])
                run.append(i)
            elif self._epochs.get(sid) == ep:
                run.append(i)
            else:
                outcome[i] = reason_code(FallbackReason.RESET)
        depths = batch.depths()
        n_q = int(depths.max()) if b else bandwidth_codebooks(batch.bandwidth_kbps)
        codes = np.zeros((b, n_q, batch.pcm.shape[1] // 320), np.int16)
        t0 = time.monotonic()
        compute_ms = 0.0
        if run:
            idx = np.asarray(run)
            slots = np.asarray([self._slots[batch.stream_ids[i]] for i in run], np.int64)
            if fresh:
                self.codec.reset_encoder(np.asarray(fresh, np.int64))
            # one encode at the deepest row's depth; each row keeps its own prefix
            out = np.asarray(self.codec.encode(slots, batch.pcm_float()[idx],
                                               codebooks_bandwidth(n_q)), np.int16)
            for j, i in enumerate(run):
                codes[i, : depths[i]] = out[j, : depths[i]]
            t1 = time.monotonic()
            compute_ms = (t1 - t0) * 1000.0
            late = idx[batch.deadlines(t_arrive)[idx] < t1]
            outcome[late] = reason_code(FallbackReason.DEADLINE)
        for i in np.flatnonzero(outcome).tolist():
            sid = batch.stream_ids[i]
            if self._epochs.get(sid) == int(batch.epochs[i]):
                del self._epochs[sid]  # the epoch is abandoned on fallback
        return BatchResult(
            stream_ids=list(batch.stream_ids),
            outcome_codes=outcome,
            epochs=batch.epochs.copy(),
            queue_ms=np.full(b, (t0 - t_arrive) * 1000.0, np.float32),
            compute_ms=np.full(b, compute_ms, np.float32),
            codes=codes,
            replica_id=self.replica_id,
        )


def random_streaming_codec(capacity: int, bandwidth_kbps: float = 6.0) -> Any:
    """`models.StreamingEncodec` over the 24 kHz EnCodec with random weights (seed 1234,
    codebooks k-means initialised: real codes, noise audio; nothing is downloaded)."""
    from models.streaming import StreamingEncodec
    from models.weights import random_encodec

    model, _ = random_encodec()
    return StreamingEncodec(model, capacity=capacity, bandwidth_kbps=bandwidth_kbps)
