"""What one AIC subscriber is sent: its layer of each frame, packetised, and DTX signalling.

The bridge core encodes a stream once per chunk, as deep as its deepest subscriber needs.
`AicSender` turns those frames into one subscriber's RTP payloads:

- **layer**: the first k codebooks of each frame, k from the subscriber's rate controller
  (rate_control.py) under the stream's cap, or a pinned layer; k may change on any packet
  without an epoch change (the decoder's state does not depend on k);
- **packet duration**: 40, 80 or 120 ms of codes per packet, as the controller asks; a packet
  never spans two epochs or a gap, so a pending packet is sent early at an epoch change,
  before a fallback (Opus) frame or when DTX starts. With a `phase`, a multi-chunk packet
  ends where its stream's frame number plus the phase completes one (the first packet of an
  epoch may be shorter): a bridge gives its subscribers successive phases, so their 80 and
  120 ms packets leave on different ticks instead of all on the same one when they started
  together (a call's start, a worker's restart);
- **DTX**: when the stream's talk spurt ends, one silence descriptor (aic_payload.py, F = 0)
  and then nothing until speech returns. Opus DTX refreshes its comfort noise every 400 ms
  because its DTX frames carry the noise's shape; an AIC descriptor carries no parameters
  (the receiver makes its own comfort noise), so a repeat would only cost a packet
  (`sid_interval_ticks` turns repeats on). The first packet with codes after silence has
  the RTP marker bit (RFC 3551 section 4.1) and starts a new epoch.

Pure logic: `on_frame` returns the packets to send; media.py sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.contract import Outcome
from sfu_bridge.aic_payload import AicPayload, silence_descriptor
from sfu_bridge.rate_control import (
    CHUNK_MS,
    DEFAULT_MAX_HEADER_SHARE,
    Layer,
    RateControlConfig,
    RateController,
    ReceiverReportTracker,
    ReportBlock,
    min_packet_ms,
)

SID_INTERVAL_TICKS = 10  # 400 ms: Opus DTX's refresh, for a sender that wants repeats
EPOCH_MODULUS = 1 << 16


@dataclass
class OutPacket:
    payload: bytes
    timestamp: int  # 48 kHz RTP clock of the first sample
    marker: bool = False
    sid: bool = False
    n_q: int = 0
    chunks: int = 0


@dataclass
class AicSender:
    rate: RateController | None = field(default_factory=RateController)
    pinned: Layer | None = None  # a fixed layer (tests, benches): no rate control
    # a pinned depth in its default packet duration (min_packet_ms) instead of pinned.packet_ms
    pinned_default_ms: bool = False
    max_header_share: float = DEFAULT_MAX_HEADER_SHARE  # ...under this policy
    # silence descriptors after the first one of a silence: None = none, else every N ticks
    sid_interval_ticks: int | None = None
    tracker: ReceiverReportTracker = field(default_factory=ReceiverReportTracker)
    layer: Layer = field(default_factory=lambda: Layer(32))
    silent: bool = False
    packets: int = 0
    sids: int = 0
    bytes_by_n_q: dict[int, int] = field(default_factory=dict)  # payload bytes per depth
    wire_bytes: int = 0  # on the wire (SRTP tag, IPv4 and UDP included), cumulative
    trace: list[dict] | None = None  # when a list: one entry per receiver report (benches)
    _pending: list[Any] = field(default_factory=list)  # FrameOutcome of the packet being built
    _sid_wait: int = 0
    _last_epoch: int = 0
    _marker: bool = False
    _chosen: tuple[Any, int, bool] | None = None  # (pin, cap, default ms) `layer` was chosen for
    # multi-chunk packets end where (epoch_seq + phase) completes one (module doc); None:
    # after as many chunks as the packet holds, counted from the sender's first frame
    phase: int | None = None

    @classmethod
    def adaptive(cls, config: RateControlConfig | None = None) -> AicSender:
        return cls(rate=RateController(config or RateControlConfig()))

    @classmethod
    def fixed(cls, layer: Layer) -> AicSender:
        return cls(rate=None, pinned=layer, layer=layer)

    @classmethod
    def full_depth(cls, max_header_share: float = DEFAULT_MAX_HEADER_SHARE) -> AicSender:
        """No rate control: the stream's full depth (its cap), in that depth's default packet
        duration."""
        return cls(rate=None, pinned=Layer(32), pinned_default_ms=True, max_header_share=max_header_share)

    def choose(self, max_n_q: int) -> Layer:
        """The layer for the next frame under the stream's cap `max_n_q`."""
        if self.pinned is not None:
            pinned = self.pinned
            chosen = self._chosen
            if (chosen is not None and chosen[0] is pinned and chosen[1] == max_n_q
                    and chosen[2] == self.pinned_default_ms):
                return self.layer  # a pinned layer under an unchanged cap: chosen already
            self._chosen = (pinned, max_n_q, self.pinned_default_ms)
            if not self.pinned_default_ms and pinned.n_q <= max_n_q:
                # no new Layer per frame when the cap allows the pinned one (the common case)
                self.layer = pinned
            else:
                n_q = min(pinned.n_q, max_n_q)
                ms = (min_packet_ms(n_q, max_header_share=self.max_header_share)
                      if self.pinned_default_ms else pinned.packet_ms)
                if self.layer.n_q != n_q or self.layer.packet_ms != ms:
                    self.layer = Layer(n_q, ms)
        elif self.rate is not None:
            self.layer = self.rate.layer(max_n_q)
        return self.layer

    def one_packet(self, fo: Any, max_n_q: int, cache: dict) -> tuple[bytes, int, bool] | bool | None:
        """`on_frame` for its common case, with no objects made: an AI frame that extends
        what is pending (or starts a packet), no talk spurt starting. Returns (payload,
        timestamp, marker) of the one packet to send now, or False when the frame waits for
        the rest of a longer packet; the sender's state moves exactly as `on_frame` would
        move it. None: not that case (call `on_frame`)."""
        if self.silent or fo.outcome is not Outcome.AI or fo.codes is None:
            return None
        pending = self._pending
        if pending:
            last = pending[-1]
            if fo.epoch != last.epoch or fo.epoch_seq != last.epoch_seq + 1:
                return None  # the pending packet ends first
        layer = self.choose(max_n_q)  # on_frame's own choice
        if not pending and layer.packet_ms == CHUNK_MS:  # one frame, one packet: keep nothing
            n_q = layer.n_q
            if fo.codes.shape[0] < n_q:
                n_q = fo.codes.shape[0]
            payload = cache.get((id(fo), n_q))
            if payload is None:
                payload = self._pack([fo], n_q, cache)
            else:
                self._last_epoch = fo.epoch % EPOCH_MODULUS
            return payload, fo.rtp_timestamp, self._count(payload, n_q)
        pending.append(fo)
        if not self._ends_packet(len(pending), layer.packet_ms // CHUNK_MS, fo):
            return False
        return self._take_packet(cache)[:3]

    def _ends_packet(self, n: int, per_packet: int, fo: Any) -> bool:
        """Whether the frame `fo`, the n-th pending one, completes the packet."""
        if n >= per_packet:
            return True
        return self.phase is not None and (fo.epoch_seq + self.phase) % per_packet == per_packet - 1

    def on_frame(self, fo: Any, max_n_q: int, cache: dict | None = None) -> list[OutPacket]:
        """A tick's frame of this subscriber's stream -> the packets to send now (an Opus
        frame's own packets are the caller's; this only flushes what was pending)."""
        if fo.outcome is Outcome.AI and fo.codes is not None:
            done: list[OutPacket] | None = None  # a pending packet this frame cannot extend
            if self._pending:
                last = self._pending[-1]
                if fo.epoch != last.epoch or fo.epoch_seq != last.epoch_seq + 1:
                    done = self.flush(cache)
            if self.silent:
                self.silent, self._marker = False, True
            layer = self.choose(max_n_q)
            self._pending.append(fo)
            if self._ends_packet(len(self._pending), layer.chunks_per_packet, fo):
                packets = self.flush(cache)
                return done + packets if done else packets
            return done or []
        out = self.flush(cache)
        if fo.outcome is Outcome.DTX:
            if not self.silent:
                self.silent, self._sid_wait = True, 0
            if self._sid_wait == 0:
                out.append(OutPacket(silence_descriptor(self._last_epoch), fo.rtp_timestamp,
                                     sid=True))
                self.sids += 1
                self._sid_wait = self.sid_interval_ticks or -1  # -1: never again this silence
            self._sid_wait -= 1
        else:
            self.silent = False
        return out

    def flush(self, cache: dict | None = None) -> list[OutPacket]:
        """The pending frames as one packet. `cache` (one per tick) lets subscribers at the
        same layer and packet duration share the packing of a payload."""
        if not self._pending:
            return []
        payload, timestamp, marker, n_q, chunks = self._take_packet(cache)
        return [OutPacket(payload, timestamp, marker, n_q=n_q, chunks=chunks)]

    def _take_packet(self, cache: dict | None) -> tuple[bytes, int, bool, int, int]:
        """The pending frames (at least one) as one packet: (payload, timestamp, marker,
        depth, chunks); nothing is pending after."""
        frames, self._pending = self._pending, []
        first = frames[0]
        n_q = self.layer.n_q
        for f in frames:  # pending frames are AI frames: each has its codes
            if f.codes.shape[0] < n_q:
                n_q = f.codes.shape[0]
        # one frame per packet is the common case: no tuple of the frames' ids
        key = (id(first), n_q) if len(frames) == 1 else (tuple(map(id, frames)), n_q)
        payload = self._pack(frames, n_q, cache, key)
        return payload, first.rtp_timestamp, self._count(payload, n_q), n_q, len(frames)

    def _count(self, payload: bytes, n_q: int) -> bool:
        """A packet is made: counted; returns its marker bit (the first after silence)."""
        marker, self._marker = self._marker, False
        self.packets += 1
        self.bytes_by_n_q[n_q] = self.bytes_by_n_q.get(n_q, 0) + len(payload)
        return marker

    def _pack(self, frames: list[Any], n_q: int, cache: dict | None, key: tuple | None = None) -> bytes:
        """The payload of `frames` (one epoch, consecutive) at depth `n_q`; packed once per
        tick for every subscriber at the same depth and duration (`cache`)."""
        first = frames[0]
        epoch = first.epoch % EPOCH_MODULUS
        self._last_epoch = epoch
        if key is None:
            key = (id(first), n_q)
        payload = cache.get(key) if cache is not None else None
        if payload is None:
            codes = (first.codes[:n_q] if len(frames) == 1
                     else np.concatenate([f.codes[:n_q] for f in frames], axis=1))
            payload = bytes(AicPayload(epoch, n_q, codes, start=first.epoch_seq == 0))
            if cache is not None:
                cache[key] = payload
        return payload

    # -- feedback ----------------------------------------------------------------------------
    def sent(self, wire_bytes: int) -> None:
        self.wire_bytes += wire_bytes
        self.tracker.sent(wire_bytes)

    def on_report(self, block: ReportBlock, now: float, max_n_q: int) -> Layer | None:
        """A receiver report about our SSRC -> the new layer when it changed."""
        if self.rate is None:
            return None
        before = self.layer
        fb = self.tracker.feedback(block, now)
        decision = self.rate.update(fb, max_n_q)
        after = self.choose(max_n_q)
        if self.trace is not None and len(self.trace) < 10_000:
            loss, lost = self.rate.smoothed_loss()
            qd = self.rate.queue_delay_ms(fb.rtt_s)
            self.trace.append({
                "t": now, "expected": fb.expected, "lost": fb.lost, "loss_window": round(loss, 4),
                "rtt_ms": None if fb.rtt_s is None else round(fb.rtt_s * 1000, 1),
                "queue_ms": None if qd is None else round(qd, 1),
                "received_kbps": None if fb.received_kbps is None else round(fb.received_kbps, 2),
                "sent_kbps": None if fb.sent_kbps is None else round(fb.sent_kbps, 2),
                "reason": decision.reason.value, "target_kbps": round(decision.target_kbps, 2),
                "n_q": after.n_q, "packet_ms": after.packet_ms})
        return after if after != before else None
