"""Cascading between bridge workers: a stream's tick output, relayed once per tick per worker.

A stream's publisher lives on one worker (its owner); its subscribers may be on any worker.
Every tick the owner sends each other worker that has subscribers for the stream ONE batch:
the tick's frames of the stream (AI codes at the deepest layer any subscriber of THAT worker
needs, fallback frames as the owner's Opus packets, DTX marks) and the publisher's Opus packets
forwarded during the tick (legacy subscribers). The receiving worker fans out locally through
its own `MediaBridge.dispatch`, so each subscriber still gets its own layer and packet duration.

**Transport.** UDP between workers (the cluster network; what Jitsi's relays and mediasoup's
pipe transports use), one socket per worker. A batch is split into datagrams of at most
`MAX_DATAGRAM` bytes (below a 1500-byte path MTU), each self-contained: it names its tick and
its part. No retransmission: a lost datagram is a sequence gap at the subscribers, as a lost
packet on a subscriber's own link would be.

**Subscription (feedback).** A worker with subscribers of a remote stream sends the owner a
FEEDBACK datagram for its streams: the depth its deepest AIC subscriber needs (0 = Opus only),
and whether a subscriber asked for a new epoch (join, PLI). It is sent when anything changes
and every `FEEDBACK_INTERVAL_S`; a new-epoch request is sent again every
`RESTART_RETRY_S` until a relayed frame starts an epoch (feedback travels over UDP too, and a
decoder that waits for an epoch start must get one). The owner forgets a worker's subscription after
`SUBSCRIPTION_TTL_S` without one. The owner encodes each stream as deep as the deepest need,
local or remote.

**Framing** (big-endian; version 3)::

    header   magic "AL" | version u8 | type u8 | worker u16 | boot u32 | tick u32 | part u8 | parts u8 | count u16
    FRAMES   count records: sid_len u8 | sid (utf-8) | kind u8 | rtp_ts u32 | age_us u32 | body
             kind AI (1):       epoch u32 | epoch_seq u32 | max_n_q u8 | n_q u8 | n_frames u8 | codes (10-bit packed)
             kind FALLBACK (2): reason u8 | n u8 | n x (len u16 | Opus packet)
             kind DTX (3):      (empty)
             kind OPUS (4):     len u16 | the publisher's Opus packet (forwarded, untouched)
    FEEDBACK count records: sid_len u8 | sid | need_n_q u8 | flags u8 (bit 0: restart epoch)

`max_n_q` is the deepest layer the stream may be sent at on its owner (the publisher's
request under its user's cap, `BridgeCore.max_n_q`): the receiving worker caps its own
subscribers' layers by it, as the owner caps its own, whatever its default bandwidth is.
`age_us` is the time since the owner received the chunk (or packet): a relative age, as
deadlines are relative budgets, because hosts' clocks differ. With a relay key (derived from
the cluster secret, `relay_key`) every datagram ends in a 10-byte truncated HMAC-SHA256 tag
over the rest, checked before parsing: only workers of the cluster can feed a worker's
subscribers.

**Replay window.** `tick` numbers a sender's FRAMES batches (its bridge tick) and its FEEDBACK
rounds; `boot` is the sender relay's start time (Unix seconds), so a restarted sender, whose
ticks start again from 0, opens a new window instead of being taken for a replay. Per sender
(address, worker id, type) the receiver keeps the latest boot, the highest tick and the parts
seen of the last `REPLAY_WINDOW` ticks: a datagram of an older boot, of a tick below the
window, or a part already seen is dropped (`replay`), so a captured tagged datagram cannot be
fed to subscribers twice. Datagrams arriving out of order within the window are accepted.

Anything malformed, unauthenticated or replayed is a counted drop (`RelayDrop`), never an
exception out of the datagram handler.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.contract import REASON_CODES, FallbackReason, Outcome, reason_code
from models.bitpack import pack_codes, packed_size, unpack_codes
from sfu_bridge.core import FrameOutcome

logger = logging.getLogger(__name__)

MAGIC = b"AL"
VERSION = 3
HEADER = struct.Struct("!2sBBHIIBBH")  # 18 bytes
MAX_DATAGRAM = 1200
TAG_BYTES = 10
MAX_SID_BYTES = 255
MAX_N_Q = 32
MAX_FRAMES = 9  # 120 ms of EnCodec frames
FEEDBACK_INTERVAL_S = 1.0
RESTART_RETRY_S = 0.5  # a new-epoch request not yet answered by an epoch start is sent again
SUBSCRIPTION_TTL_S = 5.0
MAX_REPLAY_WINDOWS = 4096  # senders (address, worker, type) remembered
REPLAY_WINDOW = 64  # ticks (2.56 s of 40 ms ticks): reordering on a cluster network is far less


class RelayType(enum.IntEnum):
    FRAMES = 1
    FEEDBACK = 2


class RecordKind(enum.IntEnum):
    AI = 1
    FALLBACK = 2
    DTX = 3
    OPUS = 4


class RelayDrop(str, enum.Enum):
    TRUNCATED = "truncated"  # shorter than its header or a record says
    BAD_HEADER = "bad_header"  # magic, version, type, part numbering
    BAD_RECORD = "bad_record"  # unknown kind, sizes out of range, bad stream id, bad codes
    TRAILING = "trailing"  # bytes after the last record
    UNKNOWN_STREAM = "unknown_stream"  # a stream this worker has no subscribers for
    TAG = "tag"  # missing or wrong authentication tag
    REPLAY = "replay"  # seen before, from an older boot of its sender, or below the replay window


class RelayError(ValueError):
    def __init__(self, reason: RelayDrop, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class FrameRecord:
    stream_id: str
    kind: RecordKind
    rtp_timestamp: int
    age_us: int = 0
    epoch: int = 0
    epoch_seq: int = 0
    codes: np.ndarray | None = None  # int16 [n_q, n_frames] (AI)
    max_n_q: int = 0  # AI: the deepest layer the owner allows the stream (>= n_q)
    reason: FallbackReason | None = None  # FALLBACK
    opus: list[bytes] = field(default_factory=list)  # FALLBACK: its packets; OPUS: one packet


@dataclass
class FeedbackRecord:
    stream_id: str
    need_n_q: int  # 0: Opus subscribers only
    restart: bool = False


@dataclass
class RelayDatagram:
    type: RelayType
    worker: int
    tick: int
    part: int
    parts: int
    records: list[Any]
    boot: int = 0


@dataclass
class ReplayWindow:
    """One sender's window (module docstring): its boot, highest tick, parts seen per tick."""

    boot: int
    top: int
    seen: dict[int, int] = field(default_factory=dict)  # tick -> bitmask of parts seen

    def accept(self, boot: int, tick: int, part: int) -> bool:
        if boot != self.boot:
            if boot < self.boot:
                return False
            self.boot, self.top, self.seen = boot, tick, {}  # the sender restarted
        if tick <= self.top - REPLAY_WINDOW:
            return False
        bit = 1 << part
        mask = self.seen.get(tick, 0)
        if mask & bit:
            return False
        self.seen[tick] = mask | bit
        if tick > self.top:
            self.top = tick
            floor = tick - REPLAY_WINDOW
            for old in [t for t in self.seen if t <= floor]:
                del self.seen[old]
        return True


def relay_key(cluster_secret: bytes) -> bytes:
    """The key relay datagrams are tagged with: the cluster secret, bound to this use."""
    return hmac.new(cluster_secret, b"auralink cascade relay v1", hashlib.sha256).digest()


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:TAG_BYTES]


# -- serialise -----------------------------------------------------------------------------
def _sid(stream_id: str) -> bytes:
    b = stream_id.encode()
    if not 1 <= len(b) <= MAX_SID_BYTES:
        raise ValueError(f"stream id must be 1..{MAX_SID_BYTES} bytes, got {len(b)}")
    return bytes([len(b)]) + b


def encode_record(r: FrameRecord | FeedbackRecord) -> bytes:
    if isinstance(r, FeedbackRecord):
        if not 0 <= r.need_n_q <= MAX_N_Q:
            raise ValueError(f"need_n_q {r.need_n_q} out of range [0, {MAX_N_Q}]")
        return _sid(r.stream_id) + bytes([r.need_n_q, int(r.restart)])
    head = _sid(r.stream_id) + struct.pack("!BII", r.kind, r.rtp_timestamp & 0xFFFFFFFF,
                                           min(max(r.age_us, 0), 0xFFFFFFFF))
    if r.kind is RecordKind.AI:
        assert r.codes is not None
        n_q, n_frames = r.codes.shape
        if not 1 <= n_q <= MAX_N_Q or not 1 <= n_frames <= MAX_FRAMES:
            raise ValueError(f"codes shape {r.codes.shape} out of range")
        if not n_q <= r.max_n_q <= MAX_N_Q:
            raise ValueError(f"max_n_q {r.max_n_q} out of range [{n_q}, {MAX_N_Q}]")
        return head + struct.pack("!IIBBB", r.epoch & 0xFFFFFFFF, r.epoch_seq & 0xFFFFFFFF,
                                  r.max_n_q, n_q, n_frames) + pack_codes(r.codes)
    if r.kind is RecordKind.FALLBACK:
        assert r.reason is not None
        body = struct.pack("!BB", reason_code(r.reason), len(r.opus))
        return head + body + b"".join(struct.pack("!H", len(p)) + p for p in r.opus)
    if r.kind is RecordKind.DTX:
        return head
    (p,) = r.opus
    return head + struct.pack("!H", len(p)) + p


def serialise(type_: RelayType, worker: int, tick: int, records: list[Any],
              max_datagram: int = MAX_DATAGRAM, key: bytes | None = None, boot: int = 0) -> list[bytes]:
    """One tick's records (or records already encoded, `bytes`) -> datagrams of at most
    `max_datagram` bytes (a record larger than that goes alone in its datagram), each tagged
    when a key is given; `boot`: the sender's start time (the replay window's)."""
    bodies = [r if isinstance(r, bytes) else encode_record(r) for r in records]
    groups: list[list[bytes]] = [[]]
    if key is not None:
        max_datagram -= TAG_BYTES
    size = HEADER.size
    for b in bodies:
        if groups[-1] and size + len(b) > max_datagram:
            groups.append([])
            size = HEADER.size
        groups[-1].append(b)
        size += len(b)
    if len(groups) > 255:
        raise ValueError("a tick's relay batch needs more than 255 datagrams")
    out = [HEADER.pack(MAGIC, VERSION, type_, worker & 0xFFFF, boot & 0xFFFFFFFF, tick & 0xFFFFFFFF,
                       i, len(groups), len(g))
           + b"".join(g) for i, g in enumerate(groups)]
    return out if key is None else [d + _tag(key, d) for d in out]


# -- parse ---------------------------------------------------------------------------------
def _take(data: bytes, pos: int, n: int) -> int:
    if pos + n > len(data):
        raise RelayError(RelayDrop.TRUNCATED, f"record truncated at byte {pos} (needs {n} more)")
    return pos + n


def parse(data: bytes, key: bytes | None = None) -> RelayDatagram:
    """One relay datagram; raises `RelayError` (a `ValueError` with a `reason`) on bad input."""
    if key is not None:
        if len(data) < HEADER.size + TAG_BYTES:
            raise RelayError(RelayDrop.TRUNCATED, f"datagram of {len(data)} bytes is shorter than the header")
        data, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(tag, _tag(key, data)):
            raise RelayError(RelayDrop.TAG, "authentication tag does not match")
    if len(data) < HEADER.size:
        raise RelayError(RelayDrop.TRUNCATED, f"datagram of {len(data)} bytes is shorter than the header")
    magic, version, type_, worker, boot, tick, part, parts, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RelayError(RelayDrop.BAD_HEADER, "not a relay datagram (magic)")
    if version != VERSION:
        raise RelayError(RelayDrop.BAD_HEADER, f"relay version {version} is not supported")
    if type_ not in (RelayType.FRAMES, RelayType.FEEDBACK):
        raise RelayError(RelayDrop.BAD_HEADER, f"relay datagram type {type_} is unknown")
    if not part < parts:
        raise RelayError(RelayDrop.BAD_HEADER, f"part {part} of {parts}")
    pos = HEADER.size
    records: list[Any] = []
    for _ in range(count):
        end = _take(data, pos, 1)
        n = data[pos]
        sid_end = _take(data, end, n)
        if n == 0:
            raise RelayError(RelayDrop.BAD_RECORD, "empty stream id")
        try:
            sid = data[end:sid_end].decode()
        except UnicodeDecodeError:
            raise RelayError(RelayDrop.BAD_RECORD, "stream id is not utf-8") from None
        pos = sid_end
        if type_ == RelayType.FEEDBACK:
            end = _take(data, pos, 2)
            need, flags = data[pos], data[pos + 1]
            if need > MAX_N_Q or flags & 0xFE:
                raise RelayError(RelayDrop.BAD_RECORD, f"feedback need {need} / flags {flags:#x} invalid")
            records.append(FeedbackRecord(sid, need, bool(flags & 1)))
            pos = end
            continue
        end = _take(data, pos, 9)
        kind, ts, age = struct.unpack_from("!BII", data, pos)
        pos = end
        if kind == RecordKind.AI:
            end = _take(data, pos, 11)
            epoch, seq, max_n_q, n_q, n_frames = struct.unpack_from("!IIBBB", data, pos)
            if not 1 <= n_q <= MAX_N_Q or not 1 <= n_frames <= MAX_FRAMES:
                raise RelayError(RelayDrop.BAD_RECORD, f"codes shape ({n_q}, {n_frames}) out of range")
            if not n_q <= max_n_q <= MAX_N_Q:
                raise RelayError(RelayDrop.BAD_RECORD, f"max_n_q {max_n_q} out of range [{n_q}, {MAX_N_Q}]")
            size = packed_size(n_q, n_frames)
            pos = _take(data, end, size)
            try:
                codes = unpack_codes(data[end:pos], n_q, n_frames)
            except ValueError as exc:
                raise RelayError(RelayDrop.BAD_RECORD, f"codes: {exc}") from None
            records.append(FrameRecord(sid, RecordKind.AI, ts, age, epoch, seq, codes, max_n_q=max_n_q))
        elif kind == RecordKind.FALLBACK:
            end = _take(data, pos, 2)
            code, n_packets = data[pos], data[pos + 1]
            if not 1 <= code <= len(REASON_CODES):
                raise RelayError(RelayDrop.BAD_RECORD, f"fallback reason code {code} is unknown")
            pos = end
            packets = []
            for _ in range(n_packets):
                end = _take(data, pos, 2)
                (ln,) = struct.unpack_from("!H", data, pos)
                pos = _take(data, end, ln)
                packets.append(data[end:pos])
            records.append(FrameRecord(sid, RecordKind.FALLBACK, ts, age,
                                       reason=REASON_CODES[code - 1], opus=packets))
        elif kind == RecordKind.DTX:
            records.append(FrameRecord(sid, RecordKind.DTX, ts, age))
        elif kind == RecordKind.OPUS:
            end = _take(data, pos, 2)
            (ln,) = struct.unpack_from("!H", data, pos)
            pos = _take(data, end, ln)
            if ln == 0:
                raise RelayError(RelayDrop.BAD_RECORD, "empty Opus packet")
            records.append(FrameRecord(sid, RecordKind.OPUS, ts, age, opus=[data[end:pos]]))
        else:
            raise RelayError(RelayDrop.BAD_RECORD, f"record kind {kind} is unknown")
    if pos != len(data):
        raise RelayError(RelayDrop.TRAILING, f"{len(data) - pos} bytes after the last record")
    return RelayDatagram(RelayType(type_), worker, tick, part, parts, records, boot)


# -- the owner's side ----------------------------------------------------------------------
@dataclass
class _Subscription:
    need_n_q: int
    seen_at: float


class RelayedFrame(FrameOutcome):
    """A frame that came over the relay: no PCM; a fallback frame carries the owner's Opus,
    and `received_at` is when the owner had the chunk, on this host's clock."""

    def __init__(self, stream_id: str, outcome: Outcome, reason: FallbackReason | None,
                 epoch: int, epoch_seq: int, rtp_timestamp: int, codes: np.ndarray | None,
                 opus: list[bytes] | None, received_at: float) -> None:
        super().__init__(stream_id, outcome, reason, epoch, epoch_seq, rtp_timestamp, None, codes)
        self.opus = opus
        self.received_at = received_at


class CascadeRelay:
    """A worker's relay endpoint: owner side (send tick batches to subscribed workers) and
    subscriber side (fan relayed frames out locally, send feedback to the owners)."""

    def __init__(self, worker: int, media: Any, key: bytes | None = None,
                 clock: Any = time.monotonic) -> None:
        self.worker = worker
        self.key = key  # `relay_key(cluster secret)`; None: untagged (tests, a closed network)
        self.media = media  # sfu_bridge.media.MediaBridge
        self.clock = clock
        self.transport: Any = None  # asyncio DatagramTransport (`open`), or anything with sendto
        # owner side: stream -> peer address -> subscription
        self.subscriptions: dict[str, dict[Any, _Subscription]] = {}
        self._opus: dict[str, list[tuple[int, float, bytes]]] = {}
        # subscriber side: stream -> owner address
        self.owners: dict[str, Any] = {}
        self._fed_back: dict[str, tuple[int, bool]] = {}
        self._restarts: dict[str, float] = {}  # stream -> when a new epoch was last asked for
        self._fed_back_at = 0.0
        self.drops: Counter[str] = Counter()
        self.sent = Counter()  # datagrams / bytes / records
        self.received = Counter()
        self.send_cpu_s = 0.0  # CPU time spent building and sending relay batches
        self.send_cpu_us: deque[float] = deque(maxlen=1000)  # per tick with frames (benches)
        self.boot = int(time.time())  # this relay's start: the replay window's (module docstring)
        self._feedback_rounds = 0  # FEEDBACK datagrams' tick
        self._windows: dict[tuple[Any, int, int], ReplayWindow] = {}  # (addr, worker, type) -> window

    async def open(self, host: str, port: int) -> tuple[str, int]:
        import asyncio

        loop = asyncio.get_running_loop()
        relay = self

        class _Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.datagram_received(data, addr)

        self.transport, _ = await loop.create_datagram_endpoint(_Protocol, local_addr=(host, port))
        sock = self.transport.get_extra_info("socket")
        import socket

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 23)
        return self.transport.get_extra_info("sockname")[:2]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # owner side ------------------------------------------------------------------------------
    def remote_need(self, stream_id: str) -> int | None:
        subs = self.subscriptions.get(stream_id)
        if not subs:
            return None
        now = self.clock()
        need = max((s.need_n_q for s in subs.values() if now - s.seen_at <= SUBSCRIPTION_TTL_S), default=0)
        return need or None

    def stream_ended(self, stream_id: str) -> None:
        """The stream's publisher left this worker: its subscriptions and queued packets go
        (a follower still feeding back is answered with counted drops until it lets go)."""
        self.subscriptions.pop(stream_id, None)
        self._opus.pop(stream_id, None)

    def on_forward(self, stream_id: str, rtp_timestamp: int, payload: bytes) -> None:
        """A publisher's Opus packet (forwarded untouched): relayed with the next tick."""
        if stream_id in self.subscriptions:
            self._opus.setdefault(stream_id, []).append((rtp_timestamp, self.clock(), payload))

    def on_tick(self, tick: int, frames: list[FrameOutcome], opus_packets: dict[int, list[bytes]]) -> None:
        """A tick's frames (those of streams with subscribers anywhere) -> one batch per
        subscribed worker (the media layer's hook)."""
        if not self.subscriptions or self.transport is None:
            return
        c0 = time.thread_time()
        now = self.clock()
        wall = time.time()
        by_peer: dict[Any, list[bytes]] = {}
        encoded: dict[tuple[int, int], bytes] = {}  # a frame at one depth is encoded once
        for fo in frames:
            subs = self.subscriptions.get(fo.stream_id)
            if not subs:
                continue
            at = self.media.chunk_received_at(fo.stream_id, fo.rtp_timestamp)
            age = int((wall - at) * 1e6) if at else 0
            for addr, sub in list(subs.items()):
                if now - sub.seen_at > SUBSCRIPTION_TTL_S:
                    del subs[addr]
                    continue
                key = (id(fo), sub.need_n_q)
                body = encoded.get(key)
                if body is None:
                    body = encoded[key] = encode_record(self._record(fo, sub.need_n_q, age, opus_packets,
                                                                     self.media.core.stream_max_n_q))
                by_peer.setdefault(addr, []).append(body)
        for sid, packets in self._opus.items():
            peers = self.subscriptions.get(sid, {})
            if peers:
                bodies = [encode_record(FrameRecord(sid, RecordKind.OPUS, ts, int((now - at) * 1e6), opus=[p]))
                          for ts, at, p in packets]
                for addr in peers:
                    by_peer.setdefault(addr, []).extend(bodies)
        self._opus.clear()
        for addr, records in by_peer.items():
            for dgram in serialise(RelayType.FRAMES, self.worker, tick, records, key=self.key,
                                   boot=self.boot):
                self.transport.sendto(dgram, addr)
                self.sent["datagrams"] += 1
                self.sent["bytes"] += len(dgram)
            self.sent["records"] += len(records)
        dt = time.thread_time() - c0
        self.send_cpu_s += dt
        if encoded:  # ticks that carried frames (not only forwarded Opus)
            self.send_cpu_us.append(dt * 1e6)

    @staticmethod
    def _record(fo: FrameOutcome, need: int, age: int, opus_packets: dict[int, list[bytes]],
                max_n_q: Callable[[str], int]) -> FrameRecord:
        sid, ts = fo.stream_id, fo.rtp_timestamp
        if fo.outcome is Outcome.AI and fo.codes is not None and need > 0:
            n_q = min(need, fo.n_q)
            # (a hint since the tick may have lowered the stream's maximum below its codes)
            return FrameRecord(sid, RecordKind.AI, ts, age, fo.epoch, fo.epoch_seq,
                               fo.codes[:n_q], max_n_q=max(n_q, max_n_q(sid)))
        if fo.outcome is Outcome.FALLBACK:
            opus = opus_packets.get(id(fo)) or getattr(fo, "opus", None) or []
            return FrameRecord(sid, RecordKind.FALLBACK, ts, age, reason=fo.reason or FallbackReason.ERROR,
                               opus=list(opus))
        return FrameRecord(sid, RecordKind.DTX, ts, age)  # DTX (or AI a worker without AIC needs)

    def _feedback_in(self, d: RelayDatagram, addr: Any) -> None:
        now = self.clock()
        for r in d.records:
            # only a stream's owner relays it: a followed one is not this worker's to relay on
            if r.stream_id not in self.media.publishers or r.stream_id in self.owners:
                self.drops[RelayDrop.UNKNOWN_STREAM.value] += 1
                continue
            self.subscriptions.setdefault(r.stream_id, {})[addr] = _Subscription(r.need_n_q, now)
            if r.restart:
                self.media.core.restart_epoch(r.stream_id)

    # subscriber side -------------------------------------------------------------------------
    def follow(self, stream_id: str, owner_addr: Any, user: str = "relay") -> None:
        """Serve `stream_id` (published on the worker at `owner_addr`) to local subscribers."""
        self.owners[stream_id] = owner_addr
        if stream_id not in self.media.publishers:
            pub = self.media.add_publisher(stream_id, user, None, relayed=True)
            pub.opus_pt = RELAY_OPUS_PT

    def unfollow(self, stream_id: str) -> bool:
        """Stop following `stream_id` (its relayed publisher is the caller's to end)."""
        self._fed_back.pop(stream_id, None)
        self._restarts.pop(stream_id, None)
        return self.owners.pop(stream_id, None) is not None

    def feedback(self, force: bool = False) -> None:
        """Tell each owner what this worker's subscribers need (on change, and periodically)."""
        if self.transport is None or not self.owners:
            return
        now = self.clock()
        periodic = now - self._fed_back_at >= FEEDBACK_INTERVAL_S
        by_owner: dict[Any, list[FeedbackRecord]] = {}
        core = self.media.core
        for sid, owner in self.owners.items():
            st = core.stream(sid)
            subs = self.media.subscribers.get(sid, {})
            if st is None or not subs:
                continue
            if st.need_n_q is None and any(s.aic for s in subs.values()):
                self.media._update_needs()  # AIC subscribers before their first relayed tick
                st = core.stream(sid)
                assert st is not None
            need = st.need_n_q or 0
            # the owner opens the epoch; this worker numbers nothing
            restart = core.take_epoch_request(sid)
            asked = self._restarts.get(sid)
            if restart or (asked is not None and now - asked >= RESTART_RETRY_S):
                restart, self._restarts[sid] = True, now  # (until an epoch start arrives)
            state = (need, restart)
            if force or periodic or restart or self._fed_back.get(sid) != state:
                self._fed_back[sid] = state
                by_owner.setdefault(owner, []).append(FeedbackRecord(sid, need, restart))
        if by_owner:
            self._feedback_rounds += 1
        for owner, records in by_owner.items():
            for dgram in serialise(RelayType.FEEDBACK, self.worker, self._feedback_rounds, records,
                                   key=self.key, boot=self.boot):
                self.transport.sendto(dgram, owner)
        if periodic:
            self._fed_back_at = now

    async def run_feedback(self, interval_s: float = 0.1) -> None:
        """Subscriber side: feedback on a timer too (before the first batch, and when a
        relayed stream goes quiet)."""
        import asyncio

        while True:
            self.feedback()
            await asyncio.sleep(interval_s)

    def _frames_in(self, d: RelayDatagram) -> None:
        now_wall = time.time()
        frames: list[FrameOutcome] = []
        media = self.media
        for r in d.records:
            pub = media.publishers.get(r.stream_id)
            if pub is None or r.stream_id not in self.owners:
                self.drops[RelayDrop.UNKNOWN_STREAM.value] += 1
                continue
            if r.kind is RecordKind.OPUS:
                media.forward(r.stream_id, _RelayedRtp(r.rtp_timestamp, r.opus[0]))
                continue
            at = now_wall - r.age_us / 1e6
            if r.kind is RecordKind.AI:
                if r.epoch_seq == 0:
                    self._restarts.pop(r.stream_id, None)  # the epoch asked for has started
                self.received["codebooks"] += len(r.codes)  # the depth relayed (tests, benches)
                media.core.set_relayed_max(r.stream_id, r.max_n_q)
                frames.append(RelayedFrame(r.stream_id, Outcome.AI, None, r.epoch, r.epoch_seq,
                                           r.rtp_timestamp, r.codes, None, at))
            elif r.kind is RecordKind.FALLBACK:
                frames.append(RelayedFrame(r.stream_id, Outcome.FALLBACK, r.reason, r.epoch,
                                           r.epoch_seq, r.rtp_timestamp, None, r.opus, at))
            else:
                frames.append(RelayedFrame(r.stream_id, Outcome.DTX, None, 0, 0, r.rtp_timestamp,
                                           None, None, at))
        if frames:
            media.dispatch_frames(d.tick, frames)
        self.feedback()

    # both ------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            d = parse(data, self.key)
        except RelayError as exc:
            self.drops[exc.reason.value] += 1
            return
        if not self._fresh(d, addr):
            self.drops[RelayDrop.REPLAY.value] += 1
            return
        self.received["datagrams"] += 1
        self.received["records"] += len(d.records)
        try:
            if d.type is RelayType.FEEDBACK:
                self._feedback_in(d, addr)
            else:
                self._frames_in(d)
        except Exception as exc:  # a bad batch must not stop the worker's media path
            self.drops["error"] += 1
            logger.warning("relay datagram failed: %s", type(exc).__name__)


    def _fresh(self, d: RelayDatagram, addr: Any) -> bool:
        """The replay window (module docstring); a sender's first datagram opens its window."""
        key = (addr, d.worker, int(d.type))
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= MAX_REPLAY_WINDOWS:  # bounded: forget the oldest sender
                del self._windows[next(iter(self._windows))]
            self._windows[key] = ReplayWindow(d.boot, d.tick, {d.tick: 1 << d.part})
            return True
        return w.accept(d.boot, d.tick, d.part)


# a relayed stream's Opus payload type inside this worker (its subscribers' own PTs go on the wire)
RELAY_OPUS_PT = 111


class _RelayedRtp:
    """What `MediaBridge.forward` reads of a packet: payload type, timestamp, payload."""

    __slots__ = ("payload", "payload_type", "sequence_number", "timestamp")

    def __init__(self, timestamp: int, payload: bytes) -> None:
        self.payload_type = RELAY_OPUS_PT
        self.timestamp = timestamp
        self.payload = payload
        self.sequence_number = 0

