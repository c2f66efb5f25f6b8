"""The frame-batch contract between an SFU bridge and a codec replica.

A bridge sends ONE `FrameBatch` per tick per replica carrying every frame it has for that
replica's streams; the replica answers with one `BatchResult` giving every frame exactly one
outcome: `ai` (the frame's codes) or `fallback` with a `FallbackReason`.

Arrays are numpy, column-wise (one array per field, B rows) so that a batch of thousands of
frames pickles as a handful of buffers, never one object per frame.

Each frame carries its stream's `epoch` and `epoch_seq` (0 = first frame of that epoch); what
the bridge, the replica and a decoder do with them is the epoch rule, written once in
`deployments/epochs.py` (and described in docs/protocol.md).

Deadline rule: hosts' clocks differ, so no absolute time crosses the wire. Each frame carries
its *budget*, the milliseconds left until its deadline when the batch is sent; the replica
stamps it on its own monotonic clock on arrival (deadline = arrival + budget). The sender
deducts what it knows was spent before the send (its own work since the tick, the estimated
one-way transit to the replica, see client.py), so only durations measured on one clock each
are ever combined.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from models.constants import (  # noqa: F401 - the contract's units, re-exported
    BANDWIDTHS_KBPS,
    CHUNK_FRAMES,
    CHUNK_SAMPLES,
    CODEBOOK_SIZE,
    DEFAULT_BANDWIDTH_KBPS,
    FRAME_SAMPLES,
    MAX_CHUNK_PACKETS,
    MAX_OPUS_PACKET_BYTES,
    N_Q_BY_BANDWIDTH,
    SAMPLE_RATE,
    bandwidth_codebooks,
)


class Op(str, enum.Enum):
    """What a batch asks of the replica (the metrics' `op` label). Bridges encode; decoding
    runs at the subscribers (the SDK), never on a replica."""

    ENCODE = "encode"


class Outcome(str, enum.Enum):
    AI = "ai"
    FALLBACK = "fallback"
    DTX = "dtx"  # the stream is silent (DTX): no AI frame, no model compute


class FallbackReason(str, enum.Enum):
    DEADLINE = "deadline"  # could not (or did not) finish before the frame's deadline
    OVERLOAD = "overload"  # no slot / queue full on the replica
    ERROR = "error"  # bad frame or model error
    UNHEALTHY = "unhealthy"  # supervisor turned AI off for the stream
    OPTED_OUT = "opted_out"  # the user opted out: never touches the AI
    RESET = "reset"  # the replica does not hold this epoch's state; start a new epoch
    RATE_LIMITED = "rate_limited"  # reserved for control-plane limits


# Compact wire codes for outcome arrays (uint8): 0 = ai, 1.. = fallback reasons in order.
REASON_CODES: tuple[FallbackReason, ...] = tuple(FallbackReason)
AI_CODE = 0
# A frame whose stream is silent (its talk spurt ended): answered `dtx`, by the bridge's VAD
# or, for a bridge that sends its frames' VAD state (FrameBatch.vad), by the replica's.
DTX_CODE = len(REASON_CODES) + 1
_COUNT_CODES = len(REASON_CODES) + 2


def reason_code(reason: FallbackReason) -> int:
    return REASON_CODES.index(reason) + 1


def decode_reason(code: int) -> FallbackReason | None:
    return None if code == AI_CODE else REASON_CODES[code - 1]


VALID_N_Q = N_Q_BY_BANDWIDTH  # codebooks of BANDWIDTHS_KBPS, in order
_N_Q_OK = np.isin(np.arange(max(VALID_N_Q) + 1), VALID_N_Q)  # n -> n is a valid depth

try:  # validate's value checks in one C loop where built (deployments/_columns.c)
    from deployments._columns import batch_values as _c_batch_values
except ImportError:  # pragma: no cover - no compiler at install: numpy's checks run
    _c_batch_values = None


def codebooks_bandwidth(n_q: int) -> float:
    """The bandwidth (kbps) of `n_q` codebooks; the inverse of `bandwidth_codebooks`."""
    if n_q not in VALID_N_Q:
        raise ValueError(f"{n_q} codebooks is not one of {VALID_N_Q}")
    return BANDWIDTHS_KBPS[VALID_N_Q.index(n_q)]


# Models a replica can run, by the hint's 4-bit model id (sfu_bridge/hint_ext.py). A hint
# naming an id not listed here is dropped and counted (`dropped/unknown_model`).
MODEL_REGISTRY: dict[int, str] = {0: "encodec_24khz"}


# FrameBatch.stream_refs: rows a sender's refs may name (ref >> 32), so a receiver's table of
# them stays bounded
MAX_REF_ROWS = 1 << 20


@dataclass
class FrameBatch:
    """All frames one bridge sends one replica in one tick (B rows)."""

    op: Op
    bridge_id: str
    stream_ids: list[str]  # [B], unique within a batch
    epochs: np.ndarray  # int64 [B]
    epoch_seqs: np.ndarray  # int64 [B]; 0 = first frame of the epoch
    budgets_ms: np.ndarray  # float [B]: ms left to each frame's deadline at send; NaN = default
    pcm: np.ndarray | None = None  # float32 or int16 [B, T], T % 320 == 0
    bandwidth_kbps: float = DEFAULT_BANDWIDTH_KBPS
    # encode: codebooks per stream (int [B], each in VALID_N_Q): how deep the replica
    # quantizes that row, the deepest any subscriber of the stream needs; None = every row
    # at `bandwidth_kbps`. Result rows carry codes up to their depth, zeros below it.
    n_q: np.ndarray | None = None
    # Opus in place of pcm: each row's 40 ms chunk as the publisher's Opus packets (bytes;
    # an empty one marks a packet lost from the sequence, which the replica conceals). The
    # replica decodes them (models.opus.OpusChunkDecoder, one decoder per stream) to the
    # CHUNK_SAMPLES of 24 kHz pcm it encodes; a bridge that sends them decodes nothing.
    opus: list[tuple[bytes, ...]] | None = None
    # DTX decided by the replica (a bridge that does not decode): each row's voice-activity
    # state, float [B, 3] = (noise floor dBFS - NaN: DTX off for the row -, hangover chunks
    # left, in DTX 0/1), and the detector's settings (margin_db, absolute_db, floor_rise_db,
    # hangover_chunks; models.vad.VadConfig). The replica runs the row's chunk through it
    # (models.vad.vad_step): a row now in DTX is answered `dtx` (DTX_CODE) without compute,
    # and the result carries every row's new state (BatchResult.vad).
    vad: np.ndarray | None = None
    vad_config: tuple[float, float, float, int] | None = None
    # The sender's handle of each row's stream (int64 [B], >= 0), when it keeps one: names
    # exactly one of its streams for that stream's life on it (a bridge core sends its row
    # << 32 | the row's generation, so a row's next stream gets a new one). A replica that has
    # admitted a stream under its ref finds its slot from the ref with array operations, not
    # a dictionary lookup of its id; the ids stay the identity (docs/protocol.md, section 8).
    stream_refs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.stream_ids)

    def validate(self, distinct: bool | None = None, native: bool | None = None) -> None:
        """Raises ValueError naming the first problem; a replica answers it per frame.
        `distinct`: whether the stream ids are distinct, when the caller already knows (a
        replica tells from its slot table) or leaves them to the receiver (the codec client:
        each replica checks its own rows); None: checked here. `native`: the value checks of
        the usual columns (float64 budgets, int64 depths and refs) in one C loop, where built
        (None); False: numpy's (the tests compare the two)."""
        b = len(self.stream_ids)
        if not isinstance(self.op, Op):
            raise ValueError(f"unknown op {self.op!r}; expected one of {[o.value for o in Op]}")
        if not (len(set(self.stream_ids)) == b if distinct is None else distinct):
            raise ValueError("duplicate stream id in one batch")
        for name in ("epochs", "epoch_seqs", "budgets_ms"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != (b,):
                raise ValueError(f"{name} must be an array of shape ({b},)")
        # 0: every value check below passes, 1-3: the first that fails; None: numpy checks each
        failed = self._value_check() if native is not False and _c_batch_values is not None else None
        if self.budgets_ms.dtype.kind not in "fiu" or (
                failed == 1 if failed is not None else np.isinf(self.budgets_ms).any()):
            raise ValueError("budgets_ms must be finite numbers of milliseconds (NaN = default)")
        bandwidth_codebooks(self.bandwidth_kbps)
        if self.n_q is not None:
            if not isinstance(self.n_q, np.ndarray) or self.n_q.shape != (b,):
                raise ValueError(f"n_q must be an array of shape ({b},)")
            if b and (failed == 2 if failed is not None else not (
                    self.n_q.dtype.kind in "iu" and 0 <= self.n_q.min() and self.n_q.max() < _N_Q_OK.size
                    and _N_Q_OK[self.n_q].all())):
                raise ValueError(f"n_q values must be in {VALID_N_Q}")
        if self.stream_refs is not None:
            r = self.stream_refs
            if not isinstance(r, np.ndarray) or r.shape != (b,) or r.dtype != np.int64:
                raise ValueError(f"stream_refs must be an int64 array of shape ({b},)")
            if b and (failed == 3 if failed is not None else not (
                    0 <= int(r.min()) and int(r.max()) >> 32 < MAX_REF_ROWS)):
                raise ValueError(f"stream_refs must be >= 0, with a row (ref >> 32) below {MAX_REF_ROWS}")
        if self.vad is not None:
            v = self.vad
            if not isinstance(v, np.ndarray) or v.shape != (b, 3) or v.dtype.kind != "f":
                raise ValueError(f"vad must be a float array of shape ({b}, 3)")
            on = ~np.isnan(v[:, 0])
            if not np.isfinite(v[on]).all() or (v[on, 1] < 0).any() or (v[on, 1] > 1000).any():
                raise ValueError("vad rows must be finite, with 0..1000 hangover chunks left")
            c = self.vad_config
            if not (isinstance(c, tuple) and len(c) == 4 and all(isinstance(x, (int, float)) for x in c)
                    and np.isfinite(c).all() and 0 <= c[3] <= 1000):
                raise ValueError("vad_config must be (margin_db, absolute_db, floor_rise_db, hangover_chunks)")
        if self.opus is not None:
            if self.pcm is not None:
                raise ValueError("a batch carries pcm or opus, not both")
            if not isinstance(self.opus, list) or len(self.opus) != b:
                raise ValueError(f"opus must be a list of {b} packet tuples")
            for packets in self.opus:
                if not isinstance(packets, (tuple, list)) or len(packets) > MAX_CHUNK_PACKETS:
                    raise ValueError(f"each opus row is a tuple of at most {MAX_CHUNK_PACKETS} packets")
                for p in packets:
                    if not isinstance(p, bytes) or len(p) > MAX_OPUS_PACKET_BYTES:
                        raise ValueError(f"an opus packet is bytes of at most {MAX_OPUS_PACKET_BYTES}")
            return
        pcm = self.pcm
        if not isinstance(pcm, np.ndarray) or pcm.ndim != 2 or pcm.shape[0] != b:
            raise ValueError(f"encode needs pcm of shape ({b}, T)")
        if pcm.dtype not in (np.float32, np.int16):
            raise ValueError(f"pcm dtype must be float32 or int16, got {pcm.dtype}")
        if pcm.shape[1] == 0 or pcm.shape[1] % FRAME_SAMPLES:
            raise ValueError(f"pcm length {pcm.shape[1]} is not a multiple of {FRAME_SAMPLES}")

    def _value_check(self) -> int | None:
        """`_c_batch_values` of the budgets, depths and refs when all three are of the usual
        shape and dtype (else None: numpy checks them)."""
        b = len(self.stream_ids)
        d, nq, r = self.budgets_ms, self.n_q, self.stream_refs
        if not (d.dtype == np.float64 and d.flags.c_contiguous
                and (nq is None or (isinstance(nq, np.ndarray) and nq.shape == (b,) and nq.dtype == np.int64
                                    and nq.flags.c_contiguous))
                and (r is None or (isinstance(r, np.ndarray) and r.shape == (b,) and r.dtype == np.int64
                                   and r.flags.c_contiguous))):
            return None
        return _c_batch_values(d, nq, _N_Q_OK, r, MAX_REF_ROWS)

    def depths(self) -> np.ndarray:
        """Codebooks per row: `n_q` when given, else `bandwidth_kbps`'s for every row."""
        if self.n_q is not None:
            return np.asarray(self.n_q, np.int64)
        return np.full(len(self.stream_ids), bandwidth_codebooks(self.bandwidth_kbps), np.int64)

    def deadlines(self, arrival: float) -> np.ndarray:
        """Each frame's deadline on the receiver's clock, stamped at `arrival` (same clock);
        NaN where the frame left the budget to the receiver's default."""
        return arrival + np.asarray(self.budgets_ms, np.float64) / 1000.0

    @property
    def samples(self) -> int:
        """Samples per row: pcm's length, or one chunk for Opus rows."""
        return CHUNK_SAMPLES if self.pcm is None else int(self.pcm.shape[1])

    def pcm_float(self) -> np.ndarray:
        """PCM as float32 in [-1, 1] (int16 input is scaled by 1/32768)."""
        assert self.pcm is not None
        if self.pcm.dtype == np.int16:
            return self.pcm.astype(np.float32) / 32768.0
        return self.pcm


@dataclass
class BatchResult:
    """One outcome per frame of a `FrameBatch`, in the same row order."""

    stream_ids: list[str]
    outcome_codes: np.ndarray  # uint8 [B]: 0 = ai, DTX_CODE = dtx, else reason_code(reason)
    epochs: np.ndarray  # int64 [B], echoed
    queue_ms: np.ndarray  # float32 [B]: arrival at replica -> compute start (or decision)
    compute_ms: np.ndarray  # float32 [B]: compute time of the step the frame ran in (0 if none)
    codes: np.ndarray | None = None  # int16 [B, n_q, F]; rows valid where ai
    replica_id: str = ""
    errors: dict[str, str] = field(default_factory=dict)  # stream id -> message for `error`
    compute: str = "real"  # "real" | "emulated" (load tests); merged results may say "emulated,real"
    held_ms: float = 0.0  # arrival at the replica -> its reply, on the replica's clock
    vad: np.ndarray | None = None  # float [B, 3]: each row's VAD state after it (FrameBatch.vad)

    def __len__(self) -> int:
        return len(self.stream_ids)

    def outcome(self, i: int) -> tuple[Outcome, FallbackReason | None]:
        if int(self.outcome_codes[i]) == DTX_CODE:
            return Outcome.DTX, None
        reason = decode_reason(int(self.outcome_codes[i]))
        return (Outcome.AI, None) if reason is None else (Outcome.FALLBACK, reason)

    def counts(self) -> dict[str, int]:
        """Frames by outcome key: 'ai', 'dtx' or 'fallback/<reason>'."""
        out: dict[str, int] = {}
        oc = self.outcome_codes
        if not oc.any():  # the usual result: every frame `ai` (code 0), one pass to tell
            if oc.size:
                out["ai"] = int(oc.size)
            return out
        # a count per code (a few small integers): cheaper than sorting thousands of rows
        n = np.bincount(oc, minlength=_COUNT_CODES)
        for c in n.nonzero()[0].tolist():
            if c == DTX_CODE:
                out[Outcome.DTX.value] = int(n[c])
                continue
            r = decode_reason(c)
            out["ai" if r is None else f"fallback/{r.value}"] = int(n[c])
        return out

    @classmethod
    def all_fallback(
        cls, batch: FrameBatch, reason: FallbackReason, replica_id: str = "", error: str = ""
    ) -> BatchResult:
        b = len(batch.stream_ids)
        res = cls(
            stream_ids=list(batch.stream_ids),
            outcome_codes=np.full(b, reason_code(reason), np.uint8),
            epochs=(
                np.asarray(batch.epochs, np.int64).copy()
                if len(batch.epochs) == b
                else np.zeros(b, np.int64)
            ),
            queue_ms=np.zeros(b, np.float32),
            compute_ms=np.zeros(b, np.float32),
            replica_id=replica_id,
        )
        if error:
            res.errors = {s: error for s in batch.stream_ids}
        return res
