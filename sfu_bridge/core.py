"""`BridgeCore`: the media plane of one bridge worker, without a network.

Everything a bridge decides lives here, in one place, and both the WebRTC bridge
(`sfu_bridge.media.MediaBridge`, an aiortc adapter that feeds chunks in and sends what comes
out) and the load simulator (`cluster.simulator`, emulated publishers) drive this object:

- the **stream table**: one row per published stream, numpy columns indexed by row - its
  epoch (the bridge half of the epoch rule, `deployments.epochs.BridgeEpochs`), whether its
  AI is off and why (the one opt-out table: the bridge's own config, pinned, and the fallback
  supervisor's verdicts), its backlog of chunks, its hint budget, its outcome tallies;
- **audio**: a chunk is 40 ms of 24 kHz PCM, or (`opus_in`, a WebRTC bridge's default) the
  publisher's Opus packets that make it up, which the codec replica decodes
  (`FrameBatch.opus`) and which fallback frames forward as they are: the bridge decodes
  nothing, and DTX's voice-activity detector runs on the replica, on each stream's state
  sent with its frames (`FrameBatch.vad`; the replica answers a silent frame `dtx`);
- **join / leave**: a leaving stream's pending chunks are answered `fallback/overload` in the
  next tick, its codec slot is freed and the supervisor forgets it, in one batched call each;
- the **tick** (every 40 ms): at most one chunk per stream; chunks beyond the backlog limit
  are answered `fallback/overload`, streams with AI off `fallback/<why>`, locally; the rest go
  to the codec in ONE `FrameBatch` (the Serve `CodecClient` splits it by replica), bounded by
  the frames' deadline plus a grace, so a stuck client yields `fallback/deadline`, not a stall;
- **hints**: checked (size, tag, replay: `sfu_bridge.hint_auth`, per-stream keys derived on
  first use; a model id no replica runs is dropped `unknown_model`) and counted into the
  limiter in one call per tick, concurrently with the codec (a blocking limiter's answer is
  read after the codec's: `HintLimiter.send`); accepted hints take effect: BW
  from the next tick, R opens a new epoch with the stream's next AI frame;
- **adaptation** (columns of the table): each AI frame is quantized as deep as its stream
  needs - the deepest AIC subscriber's layer (`set_need`, from the media adapter's rate
  controllers), capped by the publisher's requested bandwidth and the operator's per-user cap
  (`apply_policies`) - and a stream with DTX on whose talk spurt has ended (`models.vad`)
  is answered `dtx` (locally, or by the replica's detector with `opus_in`): no AI frame, no
  model compute, and its next AI frame opens a new epoch;
- **outcomes**: every frame gets exactly one, counted by outcome code and tallied per stream;
  the tallies go to the fallback supervisor once per `period_s` in one background call whose
  verdicts switch streams' AI off and on (a slow supervisor delays decisions, never a tick);
  the same exchange fetches the operator's policies (cap, DTX switch) of the streams' users.
  DTX frames are not tallied: silence says nothing about the AI path's health.

Per-tick work is array operations over the stream table, not a Python step per stream: a
tick of thousands of streams costs a fraction of a microsecond of CPU per stream, and that
CPU is counted (`cpu_s`) so the load test can report it. The only per-item Python is per
hint (each one is an HMAC) and per stream whose state changes (join, leave, a verdict).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Protocol

import numpy as np

from deployments.contract import (
    AI_CODE,
    CHUNK_SAMPLES,
    CODEBOOK_SIZE,
    DEFAULT_BANDWIDTH_KBPS,
    DTX_CODE,
    FRAME_SAMPLES,
    MAX_REF_ROWS,
    MODEL_REGISTRY,
    REASON_CODES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    Outcome,
    bandwidth_codebooks,
    codebooks_bandwidth,
    decode_reason,
    reason_code,
)
from deployments.cpu_meter import CpuMeter
from deployments.epochs import BridgeEpochs
from deployments.supervisor_policy import StreamReports
from models.constants import DEFAULT_DEADLINE_MS, N_Q_BY_BANDWIDTH, TICK_S
from models.vad import EnergyVad, VadConfig, chunk_levels_db, talk_spurts
from sfu_bridge import adaptation
from sfu_bridge.hint_auth import HINT_ACCEPTED, HINT_CODES, HintTable
from sfu_bridge.hint_ext import HINT_BYTES, Hint, HintElement
from sfu_bridge.limiter import (
    DEFAULT_BURST,
    DEFAULT_RATE_PER_S,
    GcraParams,
    PendingAllow,
    gcra_allow,
)
from telemetry import metrics

try:  # per-tick loops in C (sfu_bridge/_tick.c); else numpy, the same results
    from sfu_bridge._tick import by_owner as _c_by_owner
    from sfu_bridge._tick import group_ranks as _c_group_ranks
    from sfu_bridge._tick import ring_pop as _c_ring_pop
    from sfu_bridge._tick import ring_push as _c_ring_push
    from sfu_bridge._tick import ring_rows as _c_ring_rows
    from sfu_bridge._tick import tally_frames as _c_tally_frames
except ImportError:
    _c_by_owner = _c_group_ranks = _c_ring_pop = _c_ring_push = _c_ring_rows = _c_tally_frames = None

logger = logging.getLogger(__name__)

# How long past the frames' deadline the bridge still waits for an answer: the replica
# should have answered `deadline` itself by then; beyond, the client is stuck.
DEADLINE_GRACE_MS = 10.0
N_CODES = len(REASON_CODES) + 1  # outcome codes: 0 = ai, 1.. = fallback reasons
# A frame of a silent stream (DTX; the contract's code, which a replica answers when the
# bridge sends its frames' VAD state): never in a supervisor report (its columns are the
# N_CODES above).
assert DTX_CODE == N_CODES
N_KEYS = N_CODES + 1
_OVERLOAD = reason_code(FallbackReason.OVERLOAD)
_ERROR = reason_code(FallbackReason.ERROR)
_DEADLINE = reason_code(FallbackReason.DEADLINE)
_OPTED_OUT = reason_code(FallbackReason.OPTED_OUT)
_UNHEALTHY = reason_code(FallbackReason.UNHEALTHY)
_KEY_OF_CODE = ["ai", *(f"fallback/{r.value}" for r in REASON_CODES), Outcome.DTX.value]
_N_Q_OF_BW = np.asarray(N_Q_BY_BANDWIDTH, np.int64)  # a hint's BW index -> codebooks
_MAX_N_Q = int(N_Q_BY_BANDWIDTH[-1])
_KNOWN_MODEL = np.isin(np.arange(16), list(MODEL_REGISTRY))  # by a hint's 4-bit model id
_EMPTY_I = np.empty(0, np.int64)
# The AI frames of one tick share one latency (send -> answer), so Ray's histogram gets this
# many copies of it per tick rather than the default sample: each costs a Ray call (~15 us),
# and 4 a tick still give Prometheus 100 a second per bridge. Every frame is counted locally.
LATENCY_SAMPLE_PER_TICK = 4


class CodecClientLike(Protocol):
    """What the core sends batches to: the Serve `CodecClient`, or a `CodecReplicaCore`.

    One that splits a batch by replica may also have `owners_version()` (its replica set, or
    None while there is one) and `owner_index(stream_ids)` (each stream's owning replica as a
    small integer), and take `process(batch, owners=(version, owner per row))`: the core then
    keeps each stream's owner in its table until the replica set changes, orders each tick's
    batch by it (every replica's frames one contiguous range of the batch) and hands the
    owners over, so neither side looks a stream up per tick."""

    async def process(self, batch: FrameBatch) -> BatchResult: ...


class HintDrop(str, enum.Enum):
    """Why a hint was dropped other than by the verifier (whose reasons are
    `sfu_bridge.hint_auth.HintRejection`)."""

    INVALID = "invalid"  # no hint key configured on this bridge
    RATE_LIMITED = "rate_limited"
    UNKNOWN_MODEL = "unknown_model"  # authentic, but names no model a replica runs (MODEL_REGISTRY)


# A dropped hint's reason (HintDrop, or the verifier's rejection reason) -> metrics verdict.
_HINT_VERDICT = {
    HintDrop.RATE_LIMITED.value: metrics.HintVerdict.LIMITED,
    HintDrop.UNKNOWN_MODEL.value: metrics.HintVerdict.UNKNOWN_MODEL,
    "tag": metrics.HintVerdict.FORGED,
    "replay": metrics.HintVerdict.REPLAYED,
}


def hint_verdict(reason: str) -> metrics.HintVerdict:
    """Anything not rate-limited, forged or replayed failed a size/format/binding check."""
    return _HINT_VERDICT.get(reason, metrics.HintVerdict.MALFORMED)


@dataclass
class SupervisorLink:
    """The fallback supervisor as the core sees it: `report` gets each stream's outcome
    counts since the last call (`StreamReports`: one row per stream, a column per outcome
    code, its user the first time, its replica when known) and returns the streams whose AI
    is off (`{stream: "opted_out" | "unhealthy"}`); `forget` is told which streams ended.
    `owners` (the codec client's, when it knows them) names the replica each stream is routed
    to, so the supervisor can tell misses a replica's streams share (a stall: kept on AI) from
    a stream's own. `policies` (user ids -> `{user: {"max_kbps": float | None, "dtx": bool}}`
    for the users with a policy) is asked on the same period for the streams' users."""

    report: Callable[[StreamReports], Awaitable[Mapping[str, str]]]
    forget: Callable[[list[str]], Awaitable[Any]] | None = None
    period_s: float = 1.0
    owners: Callable[[list[str]], Mapping[str, str]] | None = None
    policies: Callable[[list[str]], Awaitable[Mapping[str, Mapping[str, Any]]]] | None = None


def ray_supervisor_link(actor: Any, period_s: float = 1.0,
                        owners: Callable[[list[str]], Mapping[str, str]] | None = None,
                        clock: Callable[[], float] | None = None,
                        policies: bool = True) -> SupervisorLink:
    """`SupervisorLink` over the `FallbackSupervisor` actor (deployments.supervisor).
    `clock`: the time the supervisor judges reports at (default: its own wall clock; a
    dilated load test passes its simulated one, so windows and back-offs stay in simulated
    seconds)."""

    async def report(reports: StreamReports) -> Mapping[str, str]:
        if clock is None:
            return await actor.report.remote(reports)
        return await actor.report.remote(reports, clock())

    async def forget(stream_ids: list[str]) -> None:
        await actor.forget.remote(stream_ids)

    async def user_policies(user_ids: list[str]) -> Mapping[str, Mapping[str, Any]]:
        return await actor.user_policies.remote(user_ids)

    return SupervisorLink(report, forget, period_s, owners, user_policies if policies else None)


@dataclass
class FrameOutcome:
    """One frame's outcome, as an object (adapters and tests; the report is columnar)."""

    stream_id: str
    outcome: Outcome
    reason: FallbackReason | None
    epoch: int  # the epoch the frame ran in (0 = never sent to the AI)
    epoch_seq: int
    rtp_timestamp: int
    pcm24: np.ndarray | None  # the chunk (None when publishers push no audio)
    codes: np.ndarray | None = None  # int16 [n_q, F] when outcome is ai (its stream's depth)
    opus: tuple[bytes, ...] | None = None  # the chunk's Opus packets (BridgeCore(opus_in=True))

    @property
    def key(self) -> str:
        if self.outcome is Outcome.DTX:
            return Outcome.DTX.value
        return "ai" if self.reason is None else f"fallback/{self.reason.value}"

    @property
    def n_q(self) -> int:
        """Codebooks this frame's codes hold (0 unless ai)."""
        return 0 if self.codes is None else int(self.codes.shape[0])


@dataclass
class TickReport:
    """Every frame decided in one tick, column by column (one entry per frame)."""

    tick: int
    started_at: float
    stream_ids: list[str]
    rows: np.ndarray  # int64: the stream's row (-1: the stream had left)
    codes: np.ndarray  # uint8 outcome codes: 0 = ai, DTX_CODE = dtx, else reason_code(reason)
    epochs: np.ndarray  # int64 (0 = never sent to the AI)
    epoch_seqs: np.ndarray  # int64
    rtp_ts: np.ndarray  # int64, 48 kHz clock, first sample of the chunk
    pcm: np.ndarray | None  # float32 [n, 960]; None when publishers push no audio
    ai_codes: np.ndarray | None  # int16 [n, n_q, F], rows valid where codes == 0
    batch_size: int  # frames sent to the codec client
    codec_wait_ms: float  # awaiting the codec client (not bridge cost)
    overhead_ms: float = 0.0  # wall time of the tick minus the codec wait; media.py adds its send time
    cpu_ms: float = 0.0  # CPU time of the tick's bridge work
    replica_ms: np.ndarray | None = None  # float32 [batch]: replica queue + compute of sent frames
    hints_accepted: int = 0
    hints_dropped: dict[str, int] = field(default_factory=dict)
    opus: np.ndarray | None = None  # object [n]: each frame's Opus packets (BridgeCore(opus_in=True))
    n_q: np.ndarray | None = None  # int64 per frame: codebooks of its AI codes (0 unless ai)

    def __len__(self) -> int:
        return len(self.stream_ids)

    def counts(self) -> dict[str, int]:
        """Frames by outcome key: 'ai', 'dtx' or 'fallback/<reason>'."""
        n = np.bincount(self.codes, minlength=N_KEYS)
        return {_KEY_OF_CODE[c]: int(n[c]) for c in n.nonzero()[0].tolist()}

    def frames(self) -> list[FrameOutcome]:
        return [self.frame(i) for i in range(len(self.stream_ids))]

    def frame(self, i: int) -> FrameOutcome:
        """Frame i as an object (the media adapter builds them for frames it sends only)."""
        c = int(self.codes[i])
        if c == DTX_CODE:
            outcome, reason = Outcome.DTX, None
        else:
            reason = decode_reason(c)
            outcome = Outcome.AI if reason is None else Outcome.FALLBACK
        codes = None
        if outcome is Outcome.AI and self.ai_codes is not None:
            d = int(self.n_q[i]) if self.n_q is not None else self.ai_codes.shape[1]
            codes = self.ai_codes[i, :d]  # its stream's own depth: a view
        return FrameOutcome(
            self.stream_ids[i], outcome, reason, int(self.epochs[i]), int(self.epoch_seqs[i]),
            int(self.rtp_ts[i]), None if self.pcm is None else self.pcm[i], codes,
            None if self.opus is None else self.opus[i],
        )


@dataclass(frozen=True)
class StreamView:
    """One stream's state, read from the table (dashboards, tests)."""

    stream_id: str
    row: int
    user: str | None
    epoch: int
    next_seq: int
    opens_epoch: bool  # the next AI frame opens a new epoch
    ai_off: FallbackReason | None  # None: AI on
    pinned_off: bool  # opted out in the bridge's own config (never lifted remotely)
    pending: int  # chunks waiting for a tick
    last_hint: Hint | None  # the latest accepted hint
    requested_kbps: float  # the publisher's BW hint (the bridge's default until one)
    cap_kbps: float | None  # the operator's cap for its user (None: none)
    need_n_q: int | None  # the deepest layer its AIC subscribers ask for (None: none)
    depth_n_q: int  # codebooks its AI frames are quantized at
    model_id: int  # from its latest accepted hint
    hint_tick: int | None  # the tick that accepted its latest bandwidth change
    dtx_enabled: bool  # the bridge's DTX default and its user's switch
    dtx_silent: bool  # in DTX now (its talk spurt ended)


@dataclass
class _HintCheck:
    """A tick's verified hints (`BridgeCore._check_hints`), waiting for the limiter's answer."""

    dropped: Counter[str]  # by reason, so far
    v_rows: np.ndarray  # the verified hints' rows, in arrival order
    v_gens: np.ndarray  # those rows' generations when checked
    v_hints: list[tuple[int, bytes]]  # (index, element) of each
    v_first: np.ndarray  # each one's first byte (model, BW, R)
    uniq: np.ndarray = field(default_factory=lambda: _EMPTY_I)  # `_ranks` of v_rows
    inv: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    counts: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    rank: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    allowed: Any = None  # per uniq stream: an array, or a `PendingAllow` to read
    verdicts: tuple[int, dict[str, int]] | None = None  # `_hint_verdicts`, once applied


def _drop_hint_check(task: asyncio.Task) -> None:
    """A tick that ended without reading its limiter answer: the call is cancelled, so the
    limiter's connection is free for the next."""
    if task.cancelled() or task.exception() is not None:
        return
    chk = task.result()
    if chk is not None and isinstance(chk.allowed, PendingAllow):
        chk.allowed.cancel()


@dataclass
class _Taken:
    """A tick's frames before the codec answers: the locally answered parts (stream ids,
    rows, codes, rtp timestamps, pcm) and the batch sent, with its rows."""

    parts: list[tuple]
    rows: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    generation: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    ts: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    batch: FrameBatch | None = None
    owners: tuple[Any, np.ndarray] | None = None  # (replica set, owner of each batch row)
    chunks: np.ndarray | None = None  # the batch rows' chunks (pcm, or Opus packet tuples)


@dataclass
class _Spilled:
    """Chunks answered `overload` outside a row's backlog (it overflowed, or its stream left)."""

    stream_ids: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)

    def add(self, sid: str, row: int, ts: int, pcm: np.ndarray | None) -> None:
        self.stream_ids.append(sid)
        self.rows.append(row)
        self.ts.append(ts)
        if pcm is not None:
            self.pcm.append(pcm)


class BridgeCore:
    def __init__(
        self,
        codec: CodecClientLike,
        *,
        bridge_id: str = "bridge",
        deadline_ms: float = DEFAULT_DEADLINE_MS,
        deadline_grace_ms: float = DEADLINE_GRACE_MS,
        bandwidth_kbps: float = DEFAULT_BANDWIDTH_KBPS,
        max_backlog: int = 3,
        hint_secret: bytes | None = None,
        limiter: Any = None,
        max_hints_per_tick: int = 16,
        hint_guard_per_s: float = 1.25 * DEFAULT_RATE_PER_S,
        supervisor: SupervisorLink | None = None,
        opted_out_users: frozenset[str] = frozenset(),
        audio: bool = True,
        opus_in: bool = False,
        dtx: bool = False,
        vad: VadConfig | None = None,
        capacity: int = 256,
        clock: Callable[[], float] = time.time,
        period_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.n_q = bandwidth_codebooks(bandwidth_kbps)  # validates
        if max_backlog < 1:
            raise ValueError("max_backlog must be >= 1")
        self.codec = codec
        self.bridge_id = bridge_id
        self.deadline_ms = deadline_ms
        self.deadline_grace_ms = deadline_grace_ms
        self.bandwidth_kbps = bandwidth_kbps
        self.max_backlog = max_backlog
        self.limiter = limiter
        self.max_hints_per_tick = max_hints_per_tick
        # a bound on the HMACs a flood costs: above the limiter's own rate and burst, so it
        # only drops what the limiter would (period_clock seconds: simulated in a load test)
        self._guard_params = GcraParams.from_rate(hint_guard_per_s, DEFAULT_BURST)
        self.supervisor = supervisor
        self.opted_out_users = frozenset(opted_out_users)  # this bridge's own config: pinned
        # DTX: the default for new streams (BridgeConfig.dtx); the operator's policy per user
        self.dtx = dtx
        self.vad_config = vad or VadConfig()
        self.vad = EnergyVad(self.vad_config)
        # Without audio (load generators against emulated replicas, which never read PCM) a
        # batch carries one EnCodec frame of int16 silence per row: same rows, epochs and
        # deadlines, a sixth of the bytes of 960 float samples.
        self.audio = audio
        # Opus in: a chunk is the tuple of its publisher's Opus packets (fastpath.OpusIngest,
        # decode=False) and batches carry them for the replica to decode (FrameBatch.opus);
        # the bridge never holds PCM, so DTX's detector runs there too (FrameBatch.vad).
        if opus_in and not audio:
            raise ValueError("opus_in needs audio")
        self.opus_in = opus_in
        self._zeros = np.zeros((0, FRAME_SAMPLES), np.int16)
        self.clock = clock
        self.period_clock = period_clock
        self.cpu = CpuMeter()
        # -- the stream table
        self._cap = 0
        self._depth = max_backlog + 1  # chunks a row holds between ticks before spilling
        self.ids = np.empty(0, object)
        self._row_of: dict[str, int] = {}
        self._free: list[int] = []
        self._top = 0  # rows ever used
        self._joined = 0  # streams that joined so far (a row's id changes only then)
        self._ids_of_rows: tuple[int, np.ndarray, list[str]] | None = None  # see _stream_ids
        self.live = np.zeros(0, bool)
        self.generation = np.zeros(0, np.int64)  # bumped on join and leave
        self.users: list[str | None] = []
        self.epochs = BridgeEpochs()
        self.ai_off = np.zeros(0, np.uint8)  # 0 = AI on, else the reason code
        self.pinned = np.zeros(0, bool)
        self.q_n = np.zeros(0, np.int64)
        self.q_head = np.zeros(0, np.int64)
        self.q_ts = np.zeros((0, self._depth), np.int64)
        self.native_loops = _c_ring_push is not None  # (tests compare it with numpy's)
        # each queued chunk: pcm float32 [960], or (opus_in) a tuple of Opus packets
        self.q_pcm: np.ndarray | None = None
        if audio:
            self.q_pcm = (np.empty((0, self._depth), object) if opus_in
                          else np.zeros((0, self._depth, CHUNK_SAMPLES), np.float32))
        self.hint_n = np.zeros(0, np.int64)
        self._guard_tat = np.zeros(0, np.int64)
        # each row's hint key and replay window (None: no secret, every hint is dropped)
        self._hints = HintTable(hint_secret) if hint_secret is not None else None
        self._gauged: tuple[int, int] | None = None  # (active, relayed) streams last set
        self.last_hint: list[Any] = []
        self.tally = np.zeros((0, N_CODES), np.int64)  # outcomes since the last supervisor report
        self._registered = np.zeros(0, bool)  # its user id went to the supervisor
        self._owner = np.zeros(0, np.int64)  # its codec replica (owner_index), -1 = not known
        self._owners_version: Any = None  # the replica set `_owner` holds owners for
        # -- adaptation (sfu_bridge/adaptation.py's rules, column by column)
        self.req_n_q = np.zeros(0, np.int64)  # the publisher's requested depth (BW hint)
        self.cap_kbps = np.zeros(0, np.float64)  # the operator's cap (NaN: none)
        self.cap_n_q = np.zeros(0, np.int64)  # ... as codebooks (_MAX_N_Q: none)
        self.need_n_q = np.zeros(0, np.int64)  # the deepest AIC subscriber's layer (0: none)
        self.model_id = np.zeros(0, np.int64)
        self.hint_tick = np.zeros(0, np.int64)  # the tick that accepted the last BW change (-1)
        self.dtx_on = np.zeros(0, bool)
        self.vad_floor = np.zeros(0, np.float64)  # the VAD's noise floor (dBFS)
        self.vad_left = np.zeros(0, np.int64)  # chunks the talk spurt still sends without speech
        self.dtx_silent = np.zeros(0, bool)
        self._grow(capacity)
        # -- per-tick buffers
        self._spilled = _Spilled()
        self._hint_rows: list[int] = []
        self._hint_gens: list[int] = []
        self._hint_raws: list[bytes] = []
        self._leaving: list[str] = []
        self._forgetting: list[str] = []
        self._relayed: set[str] = set()  # streams other workers own, fanned out here (`join`)
        self._remote_opted_users: set[str] = set()
        # -- counters
        self.counts = np.zeros(N_KEYS, np.int64)  # frames by outcome code (DTX_CODE included)
        # frames the bridge answered itself this tick (the replica counts what it answers)
        self._decided = np.zeros(N_CODES, np.int64)
        self._hints_dropped_early = 0  # beyond max_hints_per_tick, since the last tick
        self.hint_counters: Counter[str] = Counter()  # "accepted" / "dropped/<why>"
        self.ticks = 0
        self.epoch_restarts = 0  # requested by subscribers (join, RTCP PLI)
        self.hint_resets = 0  # epochs restarted by a hint's R flag
        self.encodes = 0  # AI frames computed by the codec: one per stream per chunk sent
        self.dtx_spurts = 0  # talk spurts that ended a DTX silence
        self.tick_errors = 0
        self.exchanges = 0
        self.exchange_failures = 0
        self._last_exchange = period_clock()
        self._inflight: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._started = asyncio.Event()
        self._exited = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------------ the table
    def _grow(self, capacity: int) -> None:
        if capacity <= self._cap:
            return
        cap = max(capacity, 2 * self._cap)

        def grow(a: np.ndarray, fill: Any = 0) -> np.ndarray:
            out = np.full((cap,) + a.shape[1:], fill, a.dtype)
            out[: a.shape[0]] = a
            return out

        self.ids = grow(self.ids, None)
        self.live = grow(self.live, False)
        self.generation = grow(self.generation)
        self.ai_off = grow(self.ai_off)
        self.pinned = grow(self.pinned, False)
        self.q_n = grow(self.q_n)
        self.q_head = grow(self.q_head)
        self.q_ts = grow(self.q_ts)
        if self.q_pcm is not None:
            self.q_pcm = grow(self.q_pcm)
        self.hint_n = grow(self.hint_n)
        self._guard_tat = grow(self._guard_tat)
        self.tally = grow(self.tally)
        self._registered = grow(self._registered, False)
        self._owner = grow(self._owner, -1)
        self.req_n_q = grow(self.req_n_q, self.n_q)
        self.cap_kbps = grow(self.cap_kbps, np.nan)
        self.cap_n_q = grow(self.cap_n_q, _MAX_N_Q)
        self.need_n_q = grow(self.need_n_q)
        self.model_id = grow(self.model_id)
        self.hint_tick = grow(self.hint_tick, -1)
        self.dtx_on = grow(self.dtx_on, False)
        self.vad_floor = grow(self.vad_floor, self.vad_config.initial_floor_db)
        self.vad_left = grow(self.vad_left)
        self.dtx_silent = grow(self.dtx_silent, False)
        self.epochs.ensure(cap)
        extra = cap - self._cap
        self.users.extend([None] * extra)
        if self._hints is not None:
            self._hints.grow(cap)
        self.last_hint.extend([None] * extra)
        self._cap = cap

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._row_of

    def row(self, stream_id: str) -> int | None:
        return self._row_of.get(stream_id)

    def join(self, stream_id: str, user: str | None = None, opted_out: bool = False,
             relayed: bool = False) -> int:
        """Adds a stream (idempotent); returns its row. `opted_out`: this bridge's own,
        pinned opt-out (as the users it was configured with). `relayed`: a stream another
        worker owns and this one only fans out (cascade.py): it is never pushed here, and
        its codec slot, supervisor state and report belong to the owner, so leaving frees
        neither and the supervisor never hears of it from this bridge."""
        with self.cpu:
            row = self._row_of.get(stream_id)
            if row is not None:
                return row
            if self._free:
                row = self._free.pop()
            else:
                if self._top == self._cap:
                    self._grow(self._cap + 1)
                row = self._top
                self._top += 1
            self._row_of[stream_id] = row
            self.ids[row] = stream_id
            self._joined += 1
            self.live[row] = True
            self.generation[row] += 1
            self.users[row] = user
            self.epochs.join(row)
            pinned = opted_out or (user is not None and user in self.opted_out_users)
            self.pinned[row] = pinned
            remote = user is not None and user in self._remote_opted_users
            self.ai_off[row] = _OPTED_OUT if pinned or remote else 0
            self.q_n[row] = 0
            self.q_head[row] = 0
            self.hint_n[row] = 0
            self._guard_tat[row] = 0
            self.tally[row] = 0
            self._registered[row] = False
            self._owner[row] = -1
            if self._hints is not None:
                self._hints.close(row)
            self.last_hint[row] = None
            self.req_n_q[row] = self.n_q
            self.cap_kbps[row] = np.nan
            self.cap_n_q[row] = _MAX_N_Q
            self.need_n_q[row] = 0
            self.model_id[row] = 0
            self.hint_tick[row] = -1
            self.dtx_on[row] = self.dtx
            self.vad_floor[row] = self.vad_config.initial_floor_db
            self.vad_left[row] = 0
            self.dtx_silent[row] = False
            if relayed:
                self._relayed.add(stream_id)
                self._registered[row] = True  # the owner reports it (and its user)
            return row

    def leave(self, stream_id: str) -> bool:
        """Forgets a stream: its pending chunks are answered `fallback/overload` in the next
        tick; its codec slot is freed and the supervisor forgets it (batched, in the
        background)."""
        with self.cpu:
            row = self._row_of.pop(stream_id, None)
            if row is None:
                return False
            relayed = stream_id in self._relayed
            self._relayed.discard(stream_id)
            for k in range(int(self.q_n[row])):
                j = (int(self.q_head[row]) + k) % self._depth
                self._spilled.add(stream_id, -1, int(self.q_ts[row, j]), self._chunk_at(row, j))
            self.q_n[row] = 0
            self.live[row] = False
            self.generation[row] += 1
            self.ids[row] = None
            self.users[row] = None
            if self._hints is not None:
                self._hints.close(row)
            self.last_hint[row] = None
            self.tally[row] = 0
            self.ai_off[row] = 0
            self._free.append(row)
            if relayed:  # the owner's codec slot and supervisor state: not this bridge's to end
                return True
            self._leaving.append(stream_id)
            if self.supervisor is not None and self.supervisor.forget is not None:
                self._forgetting.append(stream_id)
            return True

    def restart_epoch(self, stream_id: str) -> None:
        """The stream's next AI frame opens a new epoch (a decoder joined or lost sync)."""
        row = self._row_of.get(stream_id)
        if row is not None and self.epochs.restart(row):
            self.epoch_restarts += 1

    def take_epoch_request(self, stream_id: str) -> bool:
        """Whether the stream's next AI frame was to open a new epoch, and clears that: a
        stream this worker only relays (sfu_bridge/cascade.py) is numbered by its owner,
        which is asked instead."""
        row = self._row_of.get(stream_id)
        if row is None or not self.epochs.fresh[row]:
            return False
        self.epochs.fresh[row] = False
        return True

    def stream(self, stream_id: str) -> StreamView | None:
        row = self._row_of.get(stream_id)
        if row is None:
            return None
        off = int(self.ai_off[row])
        cap = float(self.cap_kbps[row])
        need = int(self.need_n_q[row])
        tick = int(self.hint_tick[row])
        return StreamView(
            stream_id, row, self.users[row], int(self.epochs.epoch[row]),
            int(self.epochs.next_seq[row]), bool(self.epochs.fresh[row]),
            decode_reason(off) if off else None, bool(self.pinned[row]), int(self.q_n[row]),
            _parse_hint(self.last_hint[row]),
            requested_kbps=codebooks_bandwidth(int(self.req_n_q[row])),
            cap_kbps=None if np.isnan(cap) else cap, need_n_q=need or None,
            depth_n_q=int(self.depths(np.array([row]))[0]), model_id=int(self.model_id[row]),
            hint_tick=None if tick < 0 else tick, dtx_enabled=bool(self.dtx_on[row]),
            dtx_silent=bool(self.dtx_silent[row]),
        )

    # ------------------------------------------------------------------------ adaptation
    def max_n_q(self, rows: np.ndarray) -> np.ndarray:
        """The deepest layer each row may be sent at: its publisher's request under its
        user's cap."""
        return adaptation.max_depth(self.req_n_q[rows], self.cap_n_q[rows])

    def depths(self, rows: np.ndarray) -> np.ndarray:
        """Codebooks the replica computes for each row: its deepest AIC subscriber's need
        (when it has one) under `max_n_q`."""
        return adaptation.depth(self.req_n_q[rows], self.cap_n_q[rows], self.need_n_q[rows])

    def stream_max_n_q(self, stream_id: str) -> int:
        """`max_n_q` of one stream, on scalars (media.py asks once per frame and stream)."""
        row = self._row_of.get(stream_id)
        if row is None:
            return self.n_q
        return adaptation.max_depth_of(int(self.req_n_q[row]), int(self.cap_n_q[row]))

    def set_relayed_max(self, stream_id: str, n_q: int) -> None:
        """A followed stream's deepest layer on its owner (the relay says it with each AI
        frame): this worker's subscribers are capped by it as the owner's are. The owner's
        maximum already holds its user's cap, so none applies here."""
        row = self._row_of.get(stream_id)
        if row is not None and stream_id in self._relayed:
            self.req_n_q[row] = n_q

    def set_need(self, stream_id: str, n_q: int | None) -> None:
        """The deepest layer the stream's AIC subscribers ask for (None: it has none); its
        AI frames are quantized that deep from the next tick."""
        row = self._row_of.get(stream_id)
        if row is not None:
            self.need_n_q[row] = 0 if n_q is None else int(n_q)

    def set_policy(self, stream_id: str, max_kbps: float | None = None, dtx: bool = True) -> None:
        """The operator's policy for the stream's user: a bitrate cap (None: none) and the
        DTX switch (in effect only where the bridge's DTX is on)."""
        row = self._row_of.get(stream_id)
        if row is None:
            return
        with self.cpu:
            self._set_policy(row, max_kbps, dtx)

    def _set_policy(self, row: int, max_kbps: float | None, dtx: bool) -> None:
        if max_kbps is None:
            self.cap_kbps[row], self.cap_n_q[row] = np.nan, _MAX_N_Q
        else:
            self.cap_kbps[row] = float(max_kbps)
            self.cap_n_q[row] = adaptation.cap_codebooks(float(max_kbps))
        self.dtx_on[row] = self.dtx and bool(dtx)

    def apply_policies(self, by_stream: Mapping[str, Mapping[str, Any]]) -> None:
        """The operator's per-user policies, `{stream: {"max_kbps": .., "dtx": ..}}`; a
        stream not named has none: no cap, the bridge's DTX default."""
        with self.cpu:
            n = self._top
            self.cap_kbps[:n] = np.nan
            self.cap_n_q[:n] = _MAX_N_Q
            self.dtx_on[:n] = self.live[:n] & self.dtx
            for sid, pol in by_stream.items():
                row = self._row_of.get(sid)
                if row is not None and sid not in self._relayed:  # (its owner applies its user's)
                    cap = pol.get("max_kbps")
                    self._set_policy(row, None if cap is None else float(cap), bool(pol.get("dtx", True)))

    def _replica_vad(self, rows: np.ndarray, still: np.ndarray, batch: FrameBatch,
                     result: BatchResult | None, oc: np.ndarray) -> None:
        """The replica's DTX verdicts on a batch that carried VAD state (`opus_in`): its
        `dtx` frames are counted as the bridge's own are, and each row's new state is kept.
        Without a verdict (the batch timed out, or the result lacks it) the rows keep
        theirs."""
        n_dtx = int(np.count_nonzero((oc == DTX_CODE) & still))
        if n_dtx:
            metrics.record_dtx_seconds(n_dtx * TICK_S)
        v = None if result is None else result.vad
        if (v is None or not isinstance(v, np.ndarray) or v.shape != batch.vad.shape
                or result.stream_ids != batch.stream_ids):
            return
        on = ~np.isnan(batch.vad[:, 0]) & still & np.isfinite(v).all(axis=1)
        r, nv = rows[on], v[on]
        now = nv[:, 2] > 0
        self.dtx_spurts += int(np.count_nonzero(self.dtx_silent[r] & ~now))
        self.vad_floor[r] = nv[:, 0]
        self.vad_left[r] = np.clip(nv[:, 1], 0, self.vad_config.hangover_chunks).astype(np.int64)
        self.dtx_silent[r] = now

    def _dtx_silent(self, rows: np.ndarray, pcm: np.ndarray) -> np.ndarray:
        """Voice activity of these rows' chunks in one pass, then each row's talk spurt
        (models/vad.py's `TalkSpurt`, column by column): bool, in DTX now."""
        speech, self.vad_floor[rows] = self.vad.decide(chunk_levels_db(pcm), self.vad_floor[rows])
        was = self.dtx_silent[rows]
        self.dtx_spurts += int(np.count_nonzero(speech & was))
        silent, self.vad_left[rows] = talk_spurts(speech, was, self.vad_left[rows],
                                                  self.vad_config.hangover_chunks)
        self.dtx_silent[rows] = silent
        return silent

    def apply_decisions(self, off: Mapping[str, str]) -> None:
        """The fallback supervisor's verdicts, `{stream: "opted_out" | "unhealthy"}`; a stream
        not named is AI-on. Opt-outs pinned by this bridge's config always stay; a user the
        supervisor reports opted out stays off on the streams it starts later too."""
        with self.cpu:
            n = self._top
            self.ai_off[:n] = np.where(self.pinned[:n], _OPTED_OUT, 0)
            remote: set[str] = set()
            for sid, why in off.items():
                row = self._row_of.get(sid)
                if row is None:
                    continue
                if why == FallbackReason.OPTED_OUT.value:
                    self.ai_off[row] = _OPTED_OUT
                    if self.users[row] is not None:
                        remote.add(self.users[row])
                elif why == FallbackReason.UNHEALTHY.value and not self.pinned[row]:
                    self.ai_off[row] = _UNHEALTHY
            self._remote_opted_users = remote

    # ------------------------------------------------------------------------ intake
    def push(self, stream_id: str, pcm24: Any, rtp_timestamp: int = 0) -> None:
        """One 40 ms chunk of a stream: 24 kHz mono float32 [960]; with `opus_in` the tuple of
        its Opus packets (fastpath.OpusIngest); None without audio."""
        row = self._row_of.get(stream_id)
        if row is None:
            raise KeyError(f"stream {stream_id!r} has not joined")
        if self.opus_in:
            if not isinstance(pcm24, tuple):
                raise ValueError(f"an Opus chunk is a tuple of packets, got {type(pcm24).__name__}")
            pcm24 = _objects([pcm24])
        elif self.audio:
            if pcm24 is None or pcm24.shape != (CHUNK_SAMPLES,):
                raise ValueError(f"chunk must hold {CHUNK_SAMPLES} samples, got "
                                 f"{None if pcm24 is None else pcm24.shape}")
        with self.cpu:
            n = int(self.q_n[row])
            if n >= self._depth:  # the row overflows: `_push` spills its oldest chunk
                self._push(np.array([row]), None if pcm24 is None else pcm24 if self.opus_in else pcm24[None, :],
                           np.array([rtp_timestamp], np.int64))
                return
            # `_push` for one row with room, on scalars (a publisher's chunk at a time: the
            # WebRTC adapter's usual call, where 1-row array indexing cost 5x more)
            slot = (int(self.q_head[row]) + n) % self._depth
            self.q_ts[row, slot] = rtp_timestamp
            if self.q_pcm is not None and pcm24 is not None:
                self.q_pcm[row, slot] = pcm24[0] if self.opus_in else pcm24
            self.q_n[row] = n + 1

    def push_rows(self, rows: np.ndarray, pcm: np.ndarray | None = None,
                  rtp_ts: np.ndarray | None = None) -> None:
        """One chunk for each of `rows` (distinct, joined): the simulator's publishers."""
        with self.cpu:
            rows = np.ascontiguousarray(rows, np.int64)
            if rtp_ts is None:
                rtp_ts = np.zeros(rows.size, np.int64)
            self._push(rows, pcm, np.ascontiguousarray(rtp_ts, np.int64))

    def _push(self, rows: np.ndarray, pcm: np.ndarray | None, ts: np.ndarray) -> None:
        if self.native_loops and (pcm is None or self.q_pcm is None):
            # (-1: a row is full; the lines below spill its oldest chunk first)
            if _c_ring_push(rows, ts, self.q_n, self.q_head, self.q_ts, self._depth) == 0:
                return
        full = self.q_n[rows] >= self._depth
        if full.any():  # a row that overflows between ticks spills its oldest chunk
            for r in rows[full].tolist():
                j = int(self.q_head[r])
                self._spilled.add(str(self.ids[r]), r, int(self.q_ts[r, j]), self._chunk_at(r, j))
                self.q_head[r] = (j + 1) % self._depth
                self.q_n[r] -= 1
        slot = (self.q_head[rows] + self.q_n[rows]) % self._depth
        self.q_ts[rows, slot] = ts
        if self.q_pcm is not None and pcm is not None:
            self.q_pcm[rows, slot] = pcm
        self.q_n[rows] += 1

    def _chunk_at(self, row: int, j: int) -> Any:
        """A queued chunk taken out of the queue: a copy of its pcm (the slot is reused), or
        its Opus packets (an immutable tuple); None without audio."""
        if self.q_pcm is None:
            return None
        chunk = self.q_pcm[row, j]
        return chunk if self.opus_in else chunk.copy()

    def add_hint(self, stream_id: str, raw: bytes) -> None:
        """A hint element seen on the stream's packets; checked and limited at the next tick."""
        row = self._row_of.get(stream_id)
        if row is None:
            return
        with self.cpu:
            self._add_hint(row, raw)

    def add_hints(self, stream_ids: list[str], raws: list[bytes]) -> None:
        """`add_hint` for many at once (the simulator's publishers, once per tick)."""
        if len(stream_ids) != len(raws):
            raise ValueError("one hint element per stream id")
        with self.cpu:
            n = len(stream_ids)
            rows = np.fromiter(map(self._row_of.get, stream_ids, repeat(-1)), np.int64, n)
            known = (rows >= 0).nonzero()[0]
            if not known.size:
                return
            r = rows[known]
            uniq, inv, counts, rank = _ranks(r, self.native_loops)
            # a flood beyond one tick's worth is dropped before any crypto work
            ok = self.hint_n[r] + rank < self.max_hints_per_tick
            self.hint_n[uniq] = np.minimum(self.hint_n[uniq] + counts, self.max_hints_per_tick)
            over = int(known.size - np.count_nonzero(ok))
            if over:
                self.hint_counters[f"dropped/{HintDrop.RATE_LIMITED.value}"] += over
                self._hints_dropped_early += over
                known, r = known[ok], r[ok]
            self._hint_rows.extend(r.tolist())
            self._hint_gens.extend(self.generation[r].tolist())
            self._hint_raws.extend([raws[i] for i in known.tolist()])

    def _add_hint(self, row: int, raw: bytes) -> None:
        if self.hint_n[row] >= self.max_hints_per_tick:
            # a flood beyond one tick's worth is dropped before any crypto work
            self.hint_counters[f"dropped/{HintDrop.RATE_LIMITED.value}"] += 1
            self._hints_dropped_early += 1
            return
        self.hint_n[row] += 1
        self._hint_rows.append(row)
        self._hint_gens.append(int(self.generation[row]))
        self._hint_raws.append(raw)

    # ------------------------------------------------------------------------ one tick
    async def tick(self) -> TickReport:
        t0 = time.perf_counter()
        c0 = self.cpu.seconds
        with self.cpu:
            self.ticks += 1
            started_at = self.clock()
            taken = self._take()
            hint_task = asyncio.ensure_future(self._check_hints())
        codec_wait_ms = 0.0
        result: BatchResult | None = None
        if taken.batch is not None:
            t_send = time.perf_counter()
            try:
                result = await self._call_codec(taken.batch, taken.owners)
            except BaseException:  # cancelled: a limiter call sent meanwhile is not read
                hint_task.add_done_callback(_drop_hint_check)
                raise
            codec_wait_ms = (time.perf_counter() - t_send) * 1000.0
        hints = await hint_task
        with self.cpu:
            # a synchronous limiter's answer is read here, after the codec's: it has arrived
            accepted, dropped = self._hint_verdicts(hints)
            report = self._finish(taken, result, started_at)
            report.codec_wait_ms = codec_wait_ms
            report.hints_accepted, report.hints_dropped = accepted, dropped
            self._record_metrics(report)
            self._housekeeping()
        report.overhead_ms = (time.perf_counter() - t0) * 1000.0 - codec_wait_ms
        # the core's CPU while this tick ran (its hint checks included)
        report.cpu_ms = (self.cpu.seconds - c0) * 1000.0
        return report

    def _take(self) -> _Taken:
        """This tick's frames: spilled ones, one chunk per stream with a backlog (the rest
        shed), AI-off ones answered locally; the others in one batch."""
        parts: list[tuple] = []  # (stream ids, rows, codes, ts, pcm) of locally answered frames
        sp, self._spilled = self._spilled, _Spilled()
        if sp.stream_ids:
            self._decided[_OVERLOAD] += len(sp.stream_ids)
            parts.append((sp.stream_ids, np.asarray(sp.rows, np.int64),
                          np.full(len(sp.rows), _OVERLOAD, np.uint8), np.asarray(sp.ts, np.int64),
                          (_objects(sp.pcm) if self.opus_in else np.stack(sp.pcm)) if sp.pcm else None))
        n = self._top
        if self.native_loops:
            rows = np.empty(n, np.int64)
            m, beyond = _c_ring_rows(self.q_n, n, self.max_backlog, rows)
            rows = rows[:m]
            over = rows[self.q_n[rows] > self.max_backlog] if beyond else _EMPTY_I
        else:
            rows = self.q_n[:n].nonzero()[0]
            over = rows[self.q_n[rows] > self.max_backlog]
        if over.size:  # the oldest chunks beyond the backlog limit: answered, not sent
            shed_rows = np.repeat(over, self.q_n[over] - self.max_backlog)
            self._decided[_OVERLOAD] += shed_rows.size
            k = np.concatenate([np.arange(m) for m in (self.q_n[over] - self.max_backlog).tolist()])
            j = (self.q_head[shed_rows] + k) % self._depth
            parts.append((self.ids[shed_rows].tolist(), shed_rows,
                          np.full(shed_rows.size, _OVERLOAD, np.uint8), self.q_ts[shed_rows, j],
                          self.q_pcm[shed_rows, j] if self.q_pcm is not None else None))
            drop = self.q_n[over] - self.max_backlog
            self.q_head[over] = (self.q_head[over] + drop) % self._depth
            self.q_n[over] -= drop
        if not rows.size:
            return _Taken(parts)
        version = self._owners_now()
        ordered = None
        if version is not None and self.native_loops:
            # the lines below in one C pass, when every row's owner is known
            ordered = np.empty(rows.size, np.int64)
            if _c_by_owner(np.ascontiguousarray(rows), self._owner, ordered) == 0:
                rows = ordered
            else:
                ordered = None
        if version is not None and ordered is None:  # grouped by replica: the client splits it without copies
            owners = self._owner[rows]
            unknown = owners < 0
            if unknown.any():
                new = rows[unknown]
                owners[unknown] = self._owner[new] = self.codec.owner_index(self.ids[new].tolist())
            if not (owners[1:] >= owners[:-1]).all():
                rows = rows[owners.argsort(kind="stable")]
        if self.native_loops:
            head, ts = np.empty(rows.size, np.int64), np.empty(rows.size, np.int64)
            _c_ring_pop(np.ascontiguousarray(rows), self.q_n, self.q_head, self.q_ts, self._depth, head, ts)
        else:
            head = self.q_head[rows]
            ts = self.q_ts[rows, head]
            self.q_head[rows] = (head + 1) % self._depth
            self.q_n[rows] -= 1
        pcm = self.q_pcm[rows, head] if self.q_pcm is not None else None
        off = self.ai_off[rows]
        local = off != 0
        if local.any():
            lr = rows[local]
            self.epochs.fell_back(lr)  # the epoch rule: any fallback opens a new epoch
            self._decided += np.bincount(off[local], minlength=N_CODES)
            parts.append((self.ids[lr].tolist(), lr, off[local], ts[local],
                          pcm[local] if pcm is not None else None))
            keep = ~local
            rows, ts = rows[keep], ts[keep]
            pcm = pcm[keep] if pcm is not None else None
        if pcm is not None and rows.size and not self.opus_in:
            on = self.dtx_on[rows]
            if on.any():  # DTX: chunks of streams whose talk spurt has ended are answered here
                at = on.nonzero()[0]
                quiet = at[self._dtx_silent(rows[at], pcm[at])]
                if quiet.size:
                    qr = rows[quiet]
                    self.epochs.fell_back(qr)  # speech resumes in a new epoch: both ends reset
                    parts.append((self.ids[qr].tolist(), qr, np.full(quiet.size, DTX_CODE, np.uint8),
                                  ts[quiet], pcm[quiet]))
                    metrics.record_dtx_seconds(quiet.size * TICK_S)
                    keep = np.ones(rows.size, bool)
                    keep[quiet] = False
                    rows, ts, pcm = rows[keep], ts[keep], pcm[keep]
        if not rows.size:
            return _Taken(parts)
        epochs, seqs = self.epochs.number(rows)
        b = rows.size
        batch = FrameBatch(
            op=Op.ENCODE,
            bridge_id=self.bridge_id,
            stream_ids=self._stream_ids(rows),
            epochs=epochs,
            epoch_seqs=seqs,
            # Relative: the replica stamps it on its own clock (hosts' clocks differ).
            budgets_ms=_filled(b, float(self.deadline_ms)),
            pcm=None if self.opus_in else pcm if pcm is not None else self._silence(b),
            opus=list(pcm) if self.opus_in else None,
            bandwidth_kbps=self.bandwidth_kbps,
            n_q=self.depths(rows),
            # the row and its generation name the stream to the replica (FrameBatch.stream_refs)
            stream_refs=((rows << 32) | (self.generation[rows] & 0xFFFFFFFF)) if self._cap <= MAX_REF_ROWS else None,
        )
        if self.opus_in and self.dtx:
            on = self.dtx_on[rows]
            if on.any():  # DTX without the audio here: the replica's VAD, on this state
                batch.vad = np.column_stack((np.where(on, self.vad_floor[rows], np.nan),
                                             self.vad_left[rows], self.dtx_silent[rows])).astype(np.float64)
                batch.vad_config = self.vad_config.wire()
        owners = None if version is None else (version, self._owner[rows])
        return _Taken(parts, rows, self.generation[rows].copy(), ts, batch, owners, pcm)

    def _stream_ids(self, rows: np.ndarray) -> list[str]:
        """The ids of `rows` as a list: last tick's list again when the rows are the same and
        no stream joined since (rows keep their ids until then), as from tick to tick they
        mostly are. Nothing changes a batch's id list after it is built."""
        cached = self._ids_of_rows
        if (cached is not None and cached[0] == self._joined and cached[1].size == rows.size
                and (cached[1] == rows).all()):
            return cached[2]
        ids = self.ids[rows].tolist()
        self._ids_of_rows = (self._joined, rows.copy(), ids)
        return ids

    def _owners_now(self) -> Any:
        """The codec client's replica set if it splits batches by owner (None: it does not,
        or there is one replica); a new set forgets every stream's owner."""
        owners_version = getattr(self.codec, "owners_version", None)
        version = owners_version() if owners_version is not None else None
        if version != self._owners_version:
            self._owners_version = version
            self._owner[:] = -1
        return version

    def _silence(self, b: int) -> np.ndarray:
        """b rows of one EnCodec frame of int16 silence (a batch without audio): a view of
        one zero block, not b rows allocated every tick."""
        if self._zeros.shape[0] < b:
            self._zeros = np.zeros((max(b, 2 * self._zeros.shape[0]), FRAME_SAMPLES), np.int16)
            self._zeros.flags.writeable = False
        return self._zeros[:b]

    async def _call_codec(self, batch: FrameBatch, owners: tuple[Any, np.ndarray] | None) -> BatchResult:
        timeout = (self.deadline_ms + self.deadline_grace_ms) / 1000.0
        call = self.codec.process(batch) if owners is None else self.codec.process(batch, owners=owners)
        try:
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            self._decided[_DEADLINE] += len(batch)
            return BatchResult.all_fallback(batch, FallbackReason.DEADLINE)
        except Exception as exc:  # the client promises not to raise; the media path must not stop
            logger.warning(
                "codec client raised %s; %d frames fall back", type(exc).__name__, len(batch)
            )
            self._decided[_ERROR] += len(batch)
            return BatchResult.all_fallback(batch, FallbackReason.ERROR)

    def _finish(self, taken: _Taken, result: BatchResult | None, started_at: float) -> TickReport:
        """One outcome per frame, tallied; the epoch rule applied to what fell back."""
        parts, rows, batch = taken.parts, taken.rows, taken.batch
        ai_codes = None
        replica_ms = None
        if batch is not None:
            oc, ai_codes = self._check_result(batch, result)
            self.encodes += int(np.count_nonzero(oc == AI_CODE))
            replica_ms = self._replica_ms(batch, result)
            ids = batch.stream_ids
            still = self.generation[rows] == taken.generation  # a stream that left meanwhile
            fb = rows[(oc != AI_CODE) & still]
            self.epochs.fell_back(fb)  # a `dtx` answer too: speech resumes in a new epoch
            if batch.vad is not None:
                self._replica_vad(rows, still, batch, result, oc)
            rows_out = np.where(still, rows, -1)
            parts.append((ids, rows_out, oc, taken.ts, taken.chunks if self.audio else None))
            epochs, seqs = batch.epochs, batch.epoch_seqs
        n_local = sum(len(p[0]) for p in parts) - (len(batch) if batch is not None else 0)
        if len(parts) == 1:
            sids, rr, codes, ts, pcm = parts[0]
        elif parts:
            sids = list(parts[0][0])  # joined by list.extend: a nested comprehension costs ~5x
            for p in parts[1:]:
                sids.extend(p[0])
            rr = np.concatenate([p[1] for p in parts])
            codes = np.concatenate([p[2] for p in parts]).astype(np.uint8)
            ts = np.concatenate([p[3] for p in parts])
            pcm = np.concatenate([p[4] for p in parts]) if self.audio and all(
                p[4] is not None for p in parts) else None
        else:
            sids, rr, codes, ts, pcm = [], _EMPTY_I, np.empty(0, np.uint8), _EMPTY_I, None
        codes = np.asarray(codes, np.uint8)
        ep = np.zeros(len(sids), np.int64)
        sq = np.zeros(len(sids), np.int64)
        nq = np.zeros(len(sids), np.int64)
        if batch is not None:
            ep[n_local:] = epochs
            sq[n_local:] = seqs
            nq[n_local:] = np.where(codes[n_local:] == AI_CODE, batch.n_q, 0)
            if ai_codes is not None and n_local:
                full = np.zeros((len(sids),) + ai_codes.shape[1:], np.int16)
                full[n_local:] = ai_codes
                ai_codes = full
        _tally(self.counts, self.tally, rr, codes, self.native_loops)
        return TickReport(
            tick=self.ticks, started_at=started_at, stream_ids=sids, rows=rr, codes=codes,
            epochs=ep, epoch_seqs=sq, rtp_ts=ts, pcm=pcm if self.audio and not self.opus_in else None,
            opus=pcm if self.opus_in else None,
            ai_codes=ai_codes, batch_size=len(batch) if batch is not None else 0,
            codec_wait_ms=0.0, replica_ms=replica_ms, n_q=nq,
        )

    def _check_result(self, batch: FrameBatch, result: BatchResult | None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """The result's outcome code per sent frame, checked array-wide: a row the result
        lacks, an unknown outcome code, or AI codes that are missing, too few or out of
        range all become `fallback/error`. Also the AI frames' codes (int16 [b, n_q, F], n_q
        the batch's deepest row; each row valid up to its own depth)."""
        b = len(batch)
        n_q = int(batch.n_q.max()) if batch.n_q is not None and b else self.n_q
        row = _result_rows(batch.stream_ids, result)  # -1 = no row for this frame; None: in order
        if row is None:  # the usual answer: every frame, in the batch's order
            have = None
            oc = np.asarray(result.outcome_codes).astype(np.int64)
        else:
            have = row >= 0
            oc = _filled(b, _ERROR, np.int64)
            if have.any():
                oc[have] = np.asarray(result.outcome_codes)[row[have]]
        answered = oc.copy()  # what the other side said (error where it said nothing)
        # `dtx` only for a row whose VAD state was sent (the replica's DTX)
        dtx_ok = np.zeros(b, bool) if batch.vad is None else ~np.isnan(batch.vad[:, 0])
        oc[(oc < 0) | (oc > DTX_CODE) | ((oc == DTX_CODE) & ~dtx_ok)] = _ERROR
        codes = None
        ai = oc == AI_CODE
        if ai.any():
            rc = result.codes
            if rc is None or rc.ndim != 3 or rc.shape[0] != len(result.stream_ids) or rc.shape[1] < n_q:
                oc[ai] = _ERROR
            else:
                codes = rc[:, :n_q] if row is None else rc[np.where(have, row, 0), :n_q]
                codes = codes.astype(np.int16, copy=False)
                # in range: 0 <= code < CODEBOOK_SIZE; as uint16 a negative one is >= 32768, so
                # one max over every code finds both (the rows only when there is one)
                flat = codes.reshape(b, -1).view(np.uint16)
                if flat.size and int(flat.max()) >= CODEBOOK_SIZE:
                    oc[ai & (flat >= CODEBOOK_SIZE).any(axis=1)] = _ERROR
        overruled = oc != answered  # the bridge's own verdict: missing or bad answers
        if have is not None:
            overruled |= ~have
        if overruled.any():
            self._decided += np.bincount(oc[overruled], minlength=N_CODES)
        return oc.astype(np.uint8), codes

    @staticmethod
    def _replica_ms(batch: FrameBatch, result: BatchResult | None) -> np.ndarray | None:
        """Replica-side time (queue + compute, ms) of each sent frame, when the result is in
        the batch's order (load tests report it)."""
        b = len(batch)
        if (result is None or result.stream_ids != batch.stream_ids
                or np.shape(result.queue_ms) != (b,) or np.shape(result.compute_ms) != (b,)):
            return None
        return np.asarray(result.queue_ms, np.float32) + np.asarray(result.compute_ms, np.float32)

    # ------------------------------------------------------------------------ hints
    async def _check_hints(self) -> _HintCheck | None:
        """Verify the tick's hints, then one limiter call for all of them (None: no hints);
        `_hint_verdicts` applies the limiter's answer. Before any crypto work, a per-stream
        GCRA guard at `hint_guard_per_s` (above the limiter's rate) drops what the limiter
        would refuse anyway, so a flood costs its bridge a bounded number of HMACs per stream;
        what passes the guard and verifies is what the limiter decides on. An asyncio
        limiter's answer is awaited and applied here; a synchronous one's call is sent here
        (`HintLimiter.send`) and its answer read and applied by the tick, after the codec's."""
        with self.cpu:
            rows, gens, raws = self._hint_rows, self._hint_gens, self._hint_raws
            self._hint_rows, self._hint_gens, self._hint_raws = [], [], []
            if not rows:
                return None
            dropped: Counter[str] = Counter()
            rows_a = np.asarray(rows, np.int64)
            self.hint_n[rows_a] = 0
            # the stream left this tick: its hints go with it
            keep = self.generation[rows_a] == np.asarray(gens, np.int64)
            keep &= self._guard(rows_a, dropped)
            # the hints that verified, in arrival order: their rows, indexes and elements
            v_rows = _EMPTY_I
            v_hints: list[tuple[int, bytes]] = []  # (index, element)
            v_first = _EMPTY_I  # their first bytes (model, BW, R)
            if self._hints is None:
                dropped[HintDrop.INVALID.value] += int(np.count_nonzero(keep))
            else:
                kept = keep.nonzero()[0]
                k_rows = rows_a[kept]
                k_raws = [raws[j] for j in kept.tolist()]
                index, code = self._hints.accept_many(k_rows, self.ids[k_rows].tolist(), k_raws)
                verdicts = np.bincount(code, minlength=len(HINT_CODES))
                for c in verdicts.nonzero()[0].tolist():
                    if c != HINT_ACCEPTED:
                        dropped[HINT_CODES[c].value] += int(verdicts[c])  # size, tag, field or replay
                good = (code == HINT_ACCEPTED).nonzero()[0].tolist()
                # authentic, but no replica runs its model (an accepted element is 16 bytes)
                v_first = np.frombuffer(b"".join([k_raws[j] for j in good]), np.uint8)[::HINT_BYTES]
                known = _KNOWN_MODEL[v_first >> 4]
                if not known.all():
                    dropped[HintDrop.UNKNOWN_MODEL.value] += int(np.count_nonzero(~known))
                    good = np.asarray(good, np.int64)[known].tolist()
                    v_first = v_first[known]
                v_rows = k_rows[good]
                v_hints = [(i, k_raws[j]) for i, j in zip(index[good].tolist(), good, strict=True)]
            chk = _HintCheck(dropped, v_rows, self.generation[v_rows], v_hints, v_first.astype(np.int64))
            if v_rows.size:
                chk.uniq, chk.inv, chk.counts, chk.rank = _ranks(v_rows, self.native_loops)
                # One limiter call for the tick: sent now, answered by `_hint_verdicts`.
                lim = self.limiter
                if lim is None:
                    chk.allowed = chk.counts
                else:
                    ids, counts = self.ids[chk.uniq].tolist(), chk.counts.tolist()
                    send = getattr(lim, "send", None)
                    chk.allowed = send(ids, counts) if send is not None else lim.allow(ids, counts)
        if inspect.isawaitable(chk.allowed):
            chk.allowed = await chk.allowed
            with self.cpu:  # applied as the answer comes, as the limiter counted it
                self._hint_verdicts(chk)
        return chk

    def _hint_verdicts(self, chk: _HintCheck | None) -> tuple[int, dict[str, int]]:
        """The limiter's answer to a tick's `_check_hints` applied: (hints accepted, dropped by
        reason). The caller meters it."""
        if chk is None:
            return 0, {}
        if chk.verdicts is not None:  # applied already
            return chk.verdicts
        dropped, v_rows = chk.dropped, chk.v_rows
        accepted = 0
        if v_rows.size:
            allowed = chk.allowed
            if isinstance(allowed, PendingAllow):
                allowed = allowed.result()
            got = np.asarray(getattr(allowed, "allowed", allowed), np.int64).ravel()
            # an answer short of streams allows none of the rest
            n_ok = np.zeros(chk.uniq.size, np.int64)
            k = min(got.size, chk.uniq.size)
            n_ok[:k] = got[:k]
            n_ok = np.minimum(np.maximum(n_ok, 0), chk.counts)
            accepted = int(n_ok.sum())
            if accepted < v_rows.size:
                dropped[HintDrop.RATE_LIMITED.value] += int(v_rows.size) - accepted
            # Streams still on their rows: one that left since the check (its row perhaps
            # taken by a newer stream) takes no effect.
            mine = self.live[v_rows] & (self.generation[v_rows] == chk.v_gens)
            ok = chk.rank < n_ok[chk.inv]
            # each stream's latest allowed hint: (index, raw), parsed when read
            last = ((chk.rank == n_ok[chk.inv] - 1) & mine).nonzero()[0]
            v_hints = chk.v_hints
            for j, row in zip(last.tolist(), v_rows[last].tolist(), strict=True):
                self.last_hint[row] = v_hints[j]
            self._hint_effects(v_rows, chk.v_first, ok & mine, last)
        self.hint_counters["accepted"] += accepted
        for k, v in dropped.items():
            self.hint_counters[f"dropped/{k}"] += v
        chk.verdicts = accepted, dict(dropped)
        return chk.verdicts

    def _hint_effects(self, rows: np.ndarray, first: np.ndarray, allowed: np.ndarray,
                      last: np.ndarray) -> None:
        """Accepted hints take effect (docs/protocol.md, "Hint semantics"): the latest one's
        BW and model (this tick's batch has gone: from the next tick), and any R opens a new
        epoch with the stream's next AI frame. `first`: each verified hint's first byte
        (model, BW, R); `allowed`: the hints allowed, of streams still on their rows; `last`:
        each such stream's latest allowed hint."""
        r, fb = rows[last], first[last]
        if r.size:
            req = _N_Q_OF_BW[(fb >> 1) & 0x07]
            changed = req != self.req_n_q[r]
            self.hint_tick[r[changed]] = self.ticks
            self.req_n_q[r] = req
            self.model_id[r] = fb >> 4
        reset = allowed & (first & 0x01 == 1)
        if reset.any():
            rr = np.unique(rows[reset])
            rr = rr[~self.epochs.fresh[rr]]
            self.epochs.fell_back(rr)
            self.hint_resets += int(rr.size)

    def _guard(self, rows: np.ndarray, dropped: Counter[str]) -> np.ndarray:
        """True for the hints (in arrival order) the pre-crypto guard lets through."""
        uniq, inv, counts, rank = _ranks(rows, self.native_loops)
        now_us = int(round(self.period_clock() * 1_000_000))
        allowed, tat = gcra_allow(self._guard_tat[uniq], now_us, counts, self._guard_params)
        self._guard_tat[uniq] = tat
        ok = rank < allowed[inv]
        n_dropped = int(rows.size - np.count_nonzero(ok))
        if n_dropped:
            dropped[HintDrop.RATE_LIMITED.value] += n_dropped
        return ok

    # ------------------------------------------------------------------------ background
    def _record_metrics(self, report: TickReport) -> None:
        """What the bridge decided this tick, recorded where it decided it, once per tick:
        the frames it answered itself (the replica counts those it answered), the send ->
        answer latency of AI frames, hints by verdict, and the streams it carries."""
        decided, self._decided = self._decided, np.zeros(N_CODES, np.int64)
        if decided.any():
            metrics.record_frames(Op.ENCODE.value, {_KEY_OF_CODE[c]: int(decided[c])
                                                    for c in decided.nonzero()[0].tolist()})
        n_ai = int(np.count_nonzero(report.codes == AI_CODE))
        if n_ai:
            metrics.observe_frame_latency_repeated(Op.ENCODE.value, report.codec_wait_ms, n_ai,
                                                   sample=LATENCY_SAMPLE_PER_TICK)
        if report.hints_accepted:
            metrics.record_hints(metrics.HintVerdict.ACCEPTED, report.hints_accepted)
        early, self._hints_dropped_early = self._hints_dropped_early, 0
        if early:
            metrics.record_hints(metrics.HintVerdict.LIMITED, early)
        for k, v in report.hints_dropped.items():
            metrics.record_hints(hint_verdict(k), v)
        carried = (len(self._row_of) - len(self._relayed), len(self._relayed))
        if carried != self._gauged:  # gauges hold their value: set when it changes
            self._gauged = carried
            metrics.set_streams_active(self.bridge_id, carried[0])
            metrics.set_streams_relayed(self.bridge_id, carried[1])

    def _housekeeping(self) -> None:
        """Per tick, after the outcomes: the batched codec leave, supervisor forget, and the
        supervisor report when one is due (all in the background)."""
        if self._leaving:
            ids, self._leaving = self._leaving, []
            leave = getattr(self.codec, "leave", None)
            if leave is not None:
                self._spawn(self._codec_leave(leave, ids))
        if self._forgetting and self.supervisor is not None and self.supervisor.forget is not None:
            ids, self._forgetting = self._forgetting, []
            self._spawn(self._forget(self.supervisor.forget, ids))
        if (self.supervisor is not None
                and self.period_clock() - self._last_exchange >= self.supervisor.period_s
                and (self._inflight is None or self._inflight.done())):
            self._inflight = asyncio.ensure_future(self.exchange())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _codec_leave(leave: Callable, ids: list[str]) -> None:
        try:
            res = leave(ids)
            if inspect.isawaitable(res):
                await res
        except Exception as exc:  # noqa: BLE001 - a departing stream must not break the others
            logger.warning("codec leave for %d streams failed: %s", len(ids), type(exc).__name__)

    async def _forget(self, forget: Callable, ids: list[str]) -> None:
        try:
            await forget(ids)
        except Exception as exc:  # noqa: BLE001 - the supervisor sweeps streams it never hears of
            logger.info("supervisor forget for %d streams failed: %s", len(ids), type(exc).__name__)

    def take_reports(self) -> StreamReports:
        """Each live stream's outcomes since the last call (and its user, the first time),
        in the columns the supervisor's `report` takes; the tallies start over."""
        with self.cpu:
            n = self._top
            rows = (self.live[:n] & (self.tally[:n].any(axis=1) | ~self._registered[:n])).nonzero()[0]
            outcomes = self.tally[rows]  # [rows, N_CODES]: column c = outcome code c
            self.tally[rows] = 0
            ids = self.ids[rows].tolist()
            users = {self.ids[r]: self.users[r] for r in rows[~self._registered[rows]].tolist()
                     if self.users[r] is not None}
            replicas = None
            owners = self.supervisor.owners if self.supervisor is not None else None
            if owners is not None and ids:
                known = owners(ids)
                if known:
                    replicas = [known.get(sid) for sid in ids]
            self._registered[rows] = True
            self._last_exchange = self.period_clock()
            return StreamReports(ids, outcomes, users, replicas)

    def discard_tallies(self) -> None:
        """Forget the outcomes not yet reported (a load test's warm-up ticks)."""
        self.tally[: self._top] = 0

    async def exchange(self) -> None:
        """One report to the supervisor; its verdicts are applied when they come back. A
        failed exchange keeps the last decisions (counted)."""
        assert self.supervisor is not None
        reports = self.take_reports()
        await self._refresh_policies()
        if not reports:
            return
        try:
            off = await self.supervisor.report(reports)
        except Exception as exc:  # noqa: BLE001 - any supervisor failure keeps media flowing
            self.exchange_failures += 1
            logger.warning("supervisor exchange failed (%s); keeping the last decisions", exc)
            return
        self.exchanges += 1
        self.apply_decisions(off)

    async def _refresh_policies(self) -> None:
        """Every stream's user policy, on the exchange's period (a silent stream in DTX
        reports nothing, but its policy still applies). A failed fetch keeps the last ones."""
        fetch = self.supervisor.policies if self.supervisor is not None else None
        if fetch is None:
            return
        with self.cpu:
            users = {self.ids[r]: u for r in self.live[: self._top].nonzero()[0].tolist()
                     if (u := self.users[r]) is not None}
        if not users:
            return
        try:
            by_user = await fetch(sorted(set(users.values())))
        except Exception as exc:  # noqa: BLE001 - keep the last policies, like decisions
            self.exchange_failures += 1
            logger.warning("operator policy fetch failed (%s); keeping the last policies", exc)
            return
        self.apply_policies({sid: by_user[u] for sid, u in users.items() if u in by_user})

    # ------------------------------------------------------------------------ the loop
    async def run(self, on_report: Callable[[TickReport], Any], tick_s: float = TICK_S) -> None:
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
                    self.tick_errors += 1
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

    def start(self, on_report: Callable[[TickReport], Any], tick_s: float = TICK_S) -> None:
        self._task = asyncio.ensure_future(self.run(on_report, tick_s))

    async def stop(self) -> None:
        if self._task is not None:
            await self._started.wait()
            self._task.cancel()
            await self._exited.wait()
            self._task = None
        await self.close()

    async def close(self) -> None:
        """Waits for the background work (supervisor exchange, leave and forget calls)."""
        pending = [t for t in (self._inflight, *self._background) if t is not None and not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self._row_of) - len(self._relayed),
            "relayed_streams": len(self._relayed),
            "frames": {_KEY_OF_CODE[c]: int(self.counts[c]) for c in self.counts.nonzero()[0].tolist()},
            "hints": dict(self.hint_counters),
            "ticks": self.ticks,
            "epoch_restarts": self.epoch_restarts,
            "hint_resets": self.hint_resets,
            "encodes": self.encodes,
            "dtx_spurts": self.dtx_spurts,
            "supervisor_exchanges": self.exchanges,
            "supervisor_failures": self.exchange_failures,
            "cpu_s": round(self.cpu.seconds, 6),
        }


def _objects(items: list[Any]) -> np.ndarray:
    """An object array of `items` (tuples stay elements)."""
    out = np.empty(len(items), object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def _filled(n: int, value: float, dtype: Any = np.float64) -> np.ndarray:
    """`np.full(n, value, dtype)` without its Python layer (this runs every tick)."""
    out = np.empty(n, dtype)
    out.fill(value)
    return out


def _tally(counts: np.ndarray, tally: np.ndarray, rows: np.ndarray, codes: np.ndarray, native: bool) -> None:
    """A tick's outcomes counted: `counts` by code, `tally` by row and code (the supervisor's
    report), except frames of streams that left (row -1) and DTX frames (silence says
    nothing about the AI path). One C loop where built (`native`)."""
    if native and _c_tally_frames is not None:
        _c_tally_frames(np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(codes, np.uint8),
                        counts, tally, DTX_CODE)
        return
    counts += np.bincount(codes, minlength=N_KEYS)
    mine = (rows >= 0) & (codes != DTX_CODE)
    t_rows, t_codes = (rows, codes) if mine.all() else (rows[mine], codes[mine])
    if t_rows.size:  # tally[row, code] += 1 per frame (a row may have several a tick)
        top = int(t_rows.max()) + 1
        tally[:top] += np.bincount(t_rows * N_CODES + t_codes, minlength=top * N_CODES).reshape(top, N_CODES)


def _ranks(rows: np.ndarray, native: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distinct rows, each entry's index into them, their counts, each entry's place among
    the entries of its row in array order). One stable sort: a tick's few hundred hints.
    One C loop where built (`native`: the tests compare both)."""
    n = rows.size
    if native and _c_group_ranks is not None:
        rows = np.ascontiguousarray(rows, np.int64)
        scratch, out = np.empty(2 * n, np.int64), np.empty((4, n), np.int64)
        g = _c_group_ranks(rows, scratch, out[0], out[1], out[2], out[3])
        return out[0, :g], out[1], out[2, :g], out[3]
    order = rows.argsort(kind="stable")
    srt = rows[order]
    new = np.empty(n, bool)
    new[:1] = True
    np.not_equal(srt[1:], srt[:-1], out=new[1:])
    starts = new.nonzero()[0]
    gid = new.cumsum() - 1
    inv = np.empty(n, np.int64)
    inv[order] = gid
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - starts[gid]
    counts = np.empty(starts.size, np.int64)
    counts[:-1] = starts[1:] - starts[:-1]
    counts[-1:] = n - starts[-1:]
    return srt[starts], inv, counts, rank


def _parse_hint(kept: tuple[int, bytes] | None) -> Hint | None:
    return None if kept is None else HintElement.parse(kept[1]).to_hint(kept[0])


def _result_rows(stream_ids: list[str], result: BatchResult | None) -> np.ndarray | None:
    """For each sent frame, its row in `result` (-1 where the result has none); None when
    the result answers every frame in the batch's order, as results come back (one list
    comparison)."""
    b = len(stream_ids)
    if result is None or len(result.outcome_codes) != len(result.stream_ids):
        return np.full(b, -1, np.int64)  # a malformed result answers nothing
    if result.stream_ids is stream_ids or result.stream_ids == stream_ids:
        return None
    where = {sid: j for j, sid in enumerate(result.stream_ids)}
    return np.fromiter((where.get(sid, -1) for sid in stream_ids), np.int64, b)
