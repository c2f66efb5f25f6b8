"""The bridge's media path on aiortc.

publisher track (aiortc decodes Opus to 48 kHz PCM)
  -> `Chunker`: 24 kHz mono float, 40 ms chunks (codec input, and Opus input on fallback)
  -> `BridgeCore` (core.py, network-free; the simulator drives the same object): one
     FrameBatch per tick, hints, the supervisor link, one outcome per frame
  -> `MediaBridge.dispatch`: AIC subscribers get an AIC RTP payload for each `ai` frame, and
     Opus (encoded from the 24 kHz chunk at 32 kbps, 20 ms packets) for each fallback frame.

This module is the thin aiortc adapter around the core: sessions, tracks, RTP out.

Legacy (Opus-only) subscribers never wait for a tick: the publisher's own Opus packets are
forwarded to them as they arrive (`MediaBridge.forward`), as a selective forwarding unit
does - no transcoding, no added latency.

Outbound RTP is written by `RtpOut` straight onto the connection's DTLS transport: aiortc's
own sender sends one codec from one track, while a subscriber here switches between AIC and
Opus packet by packet on one SSRC (both use a 48 kHz RTP clock, so timestamps run on). The
transceiver's aiortc sender stays trackless: it owns the SSRC announced in SDP and RTCP.

`UdpMeter` counts the bytes that cross a peer connection's UDP sockets (RTP, RTCP, STUN),
which is what the wire-bitrate figures report. The payload bytes sent to subscribers, by codec
path, go to the metrics (`auralink_wire_bytes`) once per tick.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpParameters
from aiortc.rtp import RtpPacket
from aiortc.utils import random16, random32

from deployments.contract import Outcome
from models.constants import (
    CHUNK_RTP_TICKS,
    CHUNK_SAMPLES,
    OPUS_FRAME_RTP_TICKS,
    RTP_CLOCK_HZ,
    SAMPLE_RATE,
    TICK_S,
)
from models.opus import OpusCodec, packet_samples
from sfu_bridge import aiortc_compat, rtcp_tap, rtp_ext
from sfu_bridge.aic_sender import AicSender
from sfu_bridge.aiortc_compat import DatagramPath, RtpIngress
from sfu_bridge.core import BridgeCore, FrameOutcome, TickReport
from sfu_bridge.fastpath import OpusIngest, RtpWriter
from sfu_bridge.rate_control import (
    DEFAULT_MAX_HEADER_SHARE,
    Layer,
    RateControlConfig,
    ReportBlock,
    wire_kbps,
)
from telemetry import metrics

logger = logging.getLogger(__name__)

IP_UDP_HEADER_BYTES = 28  # IPv4 (20) + UDP (8), added to UDP payload bytes for wire rates
# SRTP authentication tag: AEAD_AES_256_GCM / AEAD_AES_128_GCM, the profiles aiortc prefers
# and browsers negotiate (SRTP_AES128_CM_HMAC_SHA1_80's tag would be 10)
SRTP_TAG_BYTES = 16
CHUNK_TIMES = 8  # chunk completion times kept per publisher (a tick takes one or two)


class Chunker:
    """aiortc audio frames (any rate/layout) -> 40 ms chunks of 24 kHz mono float PCM.

    One resampler per stream: the codec takes 24 kHz, and Opus for fallback frames is encoded
    from the same 24 kHz PCM (RFC 7587 keeps the RTP clock at 48 kHz whatever the input rate).
    """

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self._r24 = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._b24: list[np.ndarray] = []
        self._n24 = 0
        self.chunks = 0

    def add(self, frame: av.AudioFrame) -> list[tuple[np.ndarray, int]]:
        """The chunks `frame` completes: (pcm24 float32 [960], RTP timestamp at 48 kHz)."""
        for f in self._r24.resample(frame):
            a = f.to_ndarray().reshape(-1)
            self._b24.append(a)
            self._n24 += a.size
        out = []
        while self._n24 >= CHUNK_SAMPLES:
            pcm24 = self._take(self._b24, CHUNK_SAMPLES)
            self._n24 -= CHUNK_SAMPLES
            out.append((pcm24, self.chunks * CHUNK_RTP_TICKS))
            self.chunks += 1
        return out

    @staticmethod
    def _take(buf: list[np.ndarray], n: int) -> np.ndarray:
        joined = np.concatenate(buf) if len(buf) > 1 else buf[0]
        buf.clear()
        if joined.size > n:
            buf.append(joined[n:])
        return np.ascontiguousarray(joined[:n], dtype=np.float32)


class RtpOut:
    """Writes one outbound audio stream (one SSRC) onto a negotiated transceiver's transport."""

    def __init__(self, transceiver: Any) -> None:
        self.transceiver = transceiver
        self.ssrc: int = aiortc_compat.sender_ssrc(transceiver)
        self.mid: str | None = transceiver.mid
        codecs = aiortc_compat.negotiated_codecs(transceiver)
        self.opus_pt = next((c.payloadType for c in codecs if c.name.lower() == "opus"), None)
        self.aic_pt = next((c.payloadType for c in codecs if rtp_ext.is_aic(c)), None)
        self.ext_map = rtp_ext.AicHeaderExtensionsMap()
        self.ext_map.configure(RTCRtpParameters(
            headerExtensions=aiortc_compat.negotiated_header_extensions(transceiver)))
        # lower half of the sequence space: avoids an early wrap, like aiortc
        self.writer = RtpWriter(self.ssrc, self.ext_map, self.mid, random16() % 32768)
        self.path = DatagramPath(transceiver.sender.transport)
        self._ts0 = random32()
        self.packets = 0
        self.send_refused = 0  # packets the socket refused (full buffer, closed): not sent
        self.payload_bytes = 0
        self.last_timestamp = self._ts0  # RTP timestamp of the latest packet (sender reports)
        self.last_wire_bytes = 0  # the latest packet on the wire: SRTP tag, IPv4 and UDP included
        # Once the receiver has reported on this SSRC it demuxes by SSRC: the MID extension
        # (RFC 8843) is left off from then on, 8 bytes a packet, as libwebrtc's senders do.
        self.mid_acked = False

    @property
    def aic(self) -> bool:
        return self.aic_pt is not None

    async def send(
        self, payload_type: int, payload: bytes, timestamp: int, hint: bytes | None = None,
        marker: bool = False,
    ) -> bool:
        if hint is None:
            return self.send_now(payload_type, payload, timestamp, marker)
        # a hint extension (SDK publishers): aiortc's serializer and send path
        pkt = RtpPacket(
            payload_type=payload_type,
            marker=int(marker),
            sequence_number=self.writer.seq,
            timestamp=(self._ts0 + timestamp) & 0xFFFFFFFF,
            ssrc=self.ssrc,
            payload=payload,
        )
        pkt.extensions.mid = None if self.mid_acked else self.mid
        pkt.extensions.aic_hint = hint
        self.writer.seq = (self.writer.seq + 1) & 0xFFFF
        data = pkt.serialize(self.ext_map)
        try:
            await aiortc_compat.send_rtp(self.transceiver, data)
        except ConnectionError:
            return False
        self._sent(len(payload), pkt.timestamp, len(data) + SRTP_TAG_BYTES)
        return True

    def send_now(self, payload_type: int, payload: bytes, timestamp: int, marker: bool = False) -> bool:
        """The fast path (fastpath.py): header template + SRTP in place + the socket's sendto,
        no coroutine. False when the connection is not (or no longer) up, or when the socket
        refused the packet (counted in `send_refused`)."""
        path = self.path
        if not path.ready():
            return False
        ts = (self._ts0 + timestamp) & 0xFFFFFFFF
        # one C call where the path has one (aiortc_compat.native_send), else Python
        n = self.writer.send(path.native, payload_type, payload, ts, marker, not self.mid_acked,
                             srtp=path.srtp, sendto=path.sendto, addr=path.addr)
        if n < 0:
            self.send_refused += 1
            return False
        self._sent(len(payload), ts, n)
        return True

    def _sent(self, payload_bytes: int, timestamp: int, srtp_bytes: int) -> None:
        self.packets += 1
        self.payload_bytes += payload_bytes
        self.last_timestamp = timestamp
        self.last_wire_bytes = srtp_bytes + IP_UDP_HEADER_BYTES


def datagram_kind(data: bytes) -> str:
    """Classify a UDP datagram of a WebRTC connection (RFC 7983 demux): 'rtp/<pt>', 'rtcp',
    'dtls' or 'stun'. SRTP leaves the RTP header in the clear, so the payload type is
    readable on the wire."""
    if len(data) >= 2 and 128 <= data[0] <= 191:
        pt = data[1] & 0x7F
        return "rtcp" if 64 <= pt <= 95 else f"rtp/{pt}"
    if data and 20 <= data[0] <= 63:
        return "dtls"
    return "stun"


class UdpMeter:
    """Counts datagrams and bytes on a peer connection's UDP sockets, by kind (`datagram_kind`)."""

    def __init__(self) -> None:
        self.rx: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind -> [datagrams, bytes]
        self.tx: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._t0 = time.monotonic()

    def attach(self, pc: RTCPeerConnection) -> UdpMeter:
        for proto in aiortc_compat.ice_datagram_protocols(pc):
            self._wrap(proto)
        return self

    def _wrap(self, proto: Any) -> None:
        recv, transport = proto.datagram_received, proto.transport
        send = transport.sendto

        def datagram_received(data: bytes, addr: Any) -> None:
            c = self.rx[datagram_kind(data)]
            c[0] += 1
            c[1] += len(data)
            recv(data, addr)

        def sendto(data: bytes, addr: Any = None) -> None:
            c = self.tx[datagram_kind(data)]
            c[0] += 1
            c[1] += len(data)
            send(data, addr)

        proto.datagram_received = datagram_received
        transport.sendto = sendto

    def reset(self) -> None:
        self.rx.clear()
        self.tx.clear()
        self._t0 = time.monotonic()

    def totals(self, direction: str = "rx", kinds: tuple[str, ...] | None = None) -> tuple[int, int]:
        """(datagrams, bytes incl. IPv4+UDP headers) of the given kinds (None = all)."""
        table = self.rx if direction == "rx" else self.tx
        n = b = 0
        for kind, (dn, db) in table.items():
            if kinds is None or kind in kinds:
                n += dn
                b += db + dn * IP_UDP_HEADER_BYTES
        return n, b

    def kbps(self, direction: str = "rx", kinds: tuple[str, ...] | None = None) -> float:
        """Average wire rate since attach/reset in kbit/s, IPv4+UDP headers included."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        return self.totals(direction, kinds)[1] * 8 / elapsed / 1000.0

    def bytes_per_datagram(self, direction: str, kind: str) -> float:
        n, b = self.totals(direction, (kind,))
        return b / n if n else 0.0


@dataclass
class Subscriber:
    session_id: str
    stream_id: str
    user: str
    pc: RTCPeerConnection | None
    out: RtpOut
    sent_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    aic_sender: AicSender | None = None  # AIC subscribers: layer, packets, DTX, rate control

    @property
    def aic(self) -> bool:
        return self.out.aic


@dataclass
class Publisher:
    session_id: str
    stream_id: str
    user: str
    pc: RTCPeerConnection | None
    opus_slot: int
    chunker: Chunker
    task: asyncio.Task | None = None
    opus_pt: int | None = None  # the publisher's negotiated Opus payload type
    ts_base: int | None = None  # first RTP timestamp seen (forwarded timestamps start at 0)
    ingest: OpusIngest | None = None  # fast receive path: Opus RTP -> 24 kHz chunks, inline
    # its Opus packets unprotected and parsed natively once the first was consumed (server.py)
    ingress: RtpIngress | None = None
    relayed: bool = False  # published on another worker, followed here (cascade.py)
    # (rtp timestamp, wall time) of its latest chunks: when each was complete
    chunk_times: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=CHUNK_TIMES))

    @property
    def chunks(self) -> int:
        """40 ms chunks of its audio decoded so far, by whichever receive path it is on."""
        return self.chunker.chunks + (self.ingest.chunks if self.ingest is not None else 0)


class MediaBridge:
    """One worker's aiortc side: publishers' tracks into the core, the core's outcomes out
    to the subscribers (the tick loop, batching, hints and supervisor link are the core's)."""

    def __init__(
        self,
        core: BridgeCore,
        *,
        max_streams: int = 2_000,
        opus_bitrate: int = 32_000,
        tick_s: float = TICK_S,
        adaptive: bool = True,
        max_header_share: float = DEFAULT_MAX_HEADER_SHARE,
        fast_ingest: bool = True,
        native_receive: bool = True,
    ) -> None:
        rtp_ext.install()
        if aiortc_compat.NATIVE_SEND_MISSING is not None:
            logger.warning("%s: every RTP packet goes out and comes in through the Python path, which "
                           "costs more CPU a packet (docs/benchmarks.md); reinstall with a C compiler "
                           "(pip install -e .)", aiortc_compat.NATIVE_SEND_MISSING)
        self.core = core
        # decode publishers' Opus inline at 24 kHz (fastpath.OpusIngest) instead of aiortc's
        # jitter buffer, decoder thread, 48 kHz frames and resampler
        self.fast_ingest = fast_ingest
        # publishers' Opus packets unprotected and parsed by one C call each once the first
        # was consumed on aiortc's path (server.py, aiortc_compat.fast_ingress); needs both
        self.native_receive = native_receive and fast_ingest and aiortc_compat.native_send_available()
        # where publishers' Opus is decoded: on the codec replica when the core takes Opus
        # chunks (BridgeCore(opus_in=True): the bridge forwards and batches packets, decodes
        # nothing, and fallback frames go out as the publisher's own packets), else here
        if core.opus_in and not fast_ingest:
            raise ValueError("a core that takes Opus chunks needs the fast ingest (aiortc's decoder yields pcm)")
        self.decode_at = "replica" if core.opus_in else "bridge"
        # per-subscriber rate control from RTCP; off: every AIC subscriber gets the stream's
        # full depth in that depth's default packet duration (the bench's contrast)
        self.adaptive = adaptive
        self.max_header_share = max_header_share  # the packet duration policy
        self.layer_switches = 0
        self._refused_ended = 0  # `send_refused` of subscribers gone
        self.tick_s = tick_s
        self.opus = OpusCodec(max_streams, sample_rate=SAMPLE_RATE, frame_ms=20, bitrate=opus_bitrate)
        self._free_slots = list(range(max_streams - 1, -1, -1))
        self.publishers: dict[str, Publisher] = {}  # by stream id
        self.subscribers: dict[str, dict[str, Subscriber]] = defaultdict(dict)  # stream -> sid -> sub
        self._needs: dict[str, tuple[int, int | None, list[AicSender]]] = {}  # _need_group
        # stream -> (AIC subscribers, legacy Opus ones), kept until one joins or leaves
        self._split_subs: dict[str, tuple[list[Subscriber], list[Subscriber]]] = {}
        self.sessions: dict[str, Publisher | Subscriber] = {}
        self._phases = itertools.count()  # AicSender.phase of each new AIC subscriber
        self.packets_by_kind: dict[str, int] = defaultdict(int)  # "aic" / "opus"
        self._unrecorded_bytes: dict[str, int] = defaultdict(int)  # payload bytes since last tick
        self.bytes_by_kind: dict[str, int] = defaultdict(int)  # payload bytes sent, "aic" / "opus"
        self.overheads_ms: list[float] = []
        self.cascade: Any = None  # sfu_bridge.cascade.CascadeRelay, when workers cascade

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.core.start(self.dispatch, self.tick_s)

    async def stop(self) -> None:
        await self.core.stop()
        for sid in list(self.sessions):
            await self.end_session(sid)
        await self.core.close()

    @property
    def full(self) -> bool:
        return not self._free_slots

    # -- publishers ------------------------------------------------------------------------
    def add_publisher(
        self, stream_id: str, user: str, pc: RTCPeerConnection | None, opted_out: bool = False,
        session_id: str | None = None, relayed: bool = False,
    ) -> Publisher:
        """`relayed`: the stream is published on another worker and arrives over its relay
        (cascade.py): nothing is decoded here and the core leaves its codec slot and
        supervisor state to the owner (`BridgeCore.join`)."""
        if stream_id in self.publishers:
            raise KeyError(f"stream {stream_id!r} already has a publisher")
        if not self._free_slots:
            raise OverflowError("this worker holds its maximum number of streams")
        pub = Publisher(
            session_id or uuid.uuid4().hex, stream_id, user, pc, self._free_slots.pop(), Chunker(stream_id),
            relayed=relayed,
        )
        if self.fast_ingest and not relayed:
            pub.ingest = OpusIngest(stream_id, decode=not self.core.opus_in)
        self.core.join(stream_id, user, opted_out=opted_out, relayed=relayed)
        self.publishers[stream_id] = pub
        self.sessions[pub.session_id] = pub
        return pub

    def attach_track(self, pub: Publisher, track: Any) -> None:
        pub.task = asyncio.ensure_future(self._pump(pub, track))

    async def _pump(self, pub: Publisher, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                if self.core.opus_in:  # chunks are Opus packets (forward_payload); not this audio
                    continue
                for pcm24, ts in pub.chunker.add(frame):
                    self.core.push(pub.stream_id, pcm24, ts)
                    pub.chunk_times.append((ts, time.time()))
        except (MediaStreamError, asyncio.CancelledError):
            pass

    def push_audio(self, stream_id: str, frame: av.AudioFrame) -> None:
        """Feed a publisher's decoded audio directly (bench, tools)."""
        for pcm24, ts in self.publishers[stream_id].chunker.add(frame):
            self.core.push(stream_id, pcm24, ts)

    def forward(self, stream_id: str, packet: RtpPacket) -> bool:
        """A publisher's Opus packet -> every legacy subscriber of the stream, untouched.
        With the fast ingest the packet is also decoded here, and True says it is consumed;
        False: it goes on to aiortc's decoder (the AIC path)."""
        return self.forward_payload(stream_id, packet.payload_type, packet.sequence_number,
                                    packet.timestamp, packet.payload)

    def forward_payload(self, stream_id: str, payload_type: int, seq: int, timestamp: int,
                        payload: bytes) -> bool:
        """`forward` from a packet's fields (the native receive, aiortc_compat.RtpIngress)."""
        pub = self.publishers.get(stream_id)
        if pub is None or payload_type != pub.opus_pt or not payload:
            return False
        if pub.ts_base is None:
            pub.ts_base = timestamp
        ts = (timestamp - pub.ts_base) & 0xFFFFFFFF
        legacy = self._split(stream_id)[1]
        if legacy:
            payloads = [payload]
            for sub in legacy:
                self._send(sub, "opus", sub.out.opus_pt, payloads, ts)
        if self.cascade is not None:  # legacy subscribers on other workers (cascade.py)
            self.cascade.on_forward(stream_id, ts, payload)
        if pub.ingest is None:
            return False
        for pcm24, ts, at in pub.ingest.packet(seq, payload):
            self.core.push(stream_id, pcm24, ts)
            pub.chunk_times.append((ts, at))
        return True

    def payload_sink(self, pub: Publisher, payload_type: int) -> Any:
        """Where the native receive (aiortc_compat.RtpIngress) hands a publisher's packets:
        `forward_payload`, only while `pub` holds its stream (a replacing publisher may have
        taken it while the old connection closes)."""
        stream_id, publishers, forward = pub.stream_id, self.publishers, self.forward_payload

        def on_payload(seq: int, timestamp: int, payload: bytes) -> None:
            if publishers.get(stream_id) is pub:
                forward(stream_id, payload_type, seq, timestamp, payload)

        return on_payload

    def chunk_received_at(self, stream_id: str, rtp_timestamp: int) -> float | None:
        """The wall time a recent chunk of the stream was complete (fan-out latency, the
        relay's record age); None when not known."""
        pub = self.publishers.get(stream_id)
        if pub is not None:
            for ts, at in reversed(pub.chunk_times):
                if ts == rtp_timestamp:
                    return at
        return None

    # -- subscribers -----------------------------------------------------------------------
    def add_subscriber(
        self, stream_id: str, user: str, pc: RTCPeerConnection | None, out: RtpOut,
        session_id: str | None = None,
    ) -> Subscriber:
        sub = Subscriber(session_id or uuid.uuid4().hex, stream_id, user, pc, out)
        if out.aic:
            # rate control needs the subscriber's RTCP; without it (or with adaptation off)
            # the subscriber gets its stream's full depth, packets as long as that depth's
            # default duration (rate_control.min_packet_ms)
            if self.adaptive and pc is not None:
                sub.aic_sender = AicSender.adaptive(RateControlConfig(max_header_share=self.max_header_share))
                self._tap_rtcp(sub)
            else:
                sub.aic_sender = AicSender.full_depth(self.max_header_share)
            # successive subscribers' long packets leave on successive ticks (aic_sender.py)
            sub.aic_sender.phase = next(self._phases)
        self.subscribers[stream_id][sub.session_id] = sub
        self.sessions[sub.session_id] = sub
        self._needs.pop(stream_id, None)
        self._split_subs.pop(stream_id, None)
        return sub

    def _tap_rtcp(self, sub: Subscriber) -> None:
        out, sender = sub.out, sub.aic_sender
        assert sender is not None

        def counters() -> tuple[int, int, int]:
            return out.packets, out.payload_bytes, out.last_timestamp

        def on_report(block: ReportBlock, now: float) -> None:
            out.mid_acked = True
            before = sender.layer
            changed = sender.on_report(block, now, self.core.stream_max_n_q(sub.stream_id))
            if changed is not None:
                self._count_switch(before, changed)

        rtcp_tap.attach(out.transceiver.sender, counters, sender.tracker.clock, on_report)

    def pin_layer(self, session_id: str, layer: Layer) -> None:
        """Hold an AIC subscriber at one layer (no rate control): tests and benches."""
        sub = self.sessions[session_id]
        assert isinstance(sub, Subscriber) and sub.aic_sender is not None
        sub.aic_sender.rate, sub.aic_sender.pinned = None, layer
        sub.aic_sender.pinned_default_ms = False
        self._needs.pop(sub.stream_id, None)

    def _count_switch(self, before: Layer, after: Layer) -> None:
        up = wire_kbps(after.n_q, after.packet_ms) > wire_kbps(before.n_q, before.packet_ms)
        self.layer_switches += 1
        metrics.record_layer_switches("up" if up else "down")

    # -- sessions --------------------------------------------------------------------------
    async def end_session(self, session_id: str) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        if isinstance(s, Publisher):
            self.publishers.pop(s.stream_id, None)
            if self.cascade is not None and not s.relayed:
                self.cascade.stream_ended(s.stream_id)
            # its pending chunks are answered in the next tick; its codec slot is freed
            self.core.leave(s.stream_id)
            self.opus.reset([s.opus_slot])
            self._free_slots.append(s.opus_slot)
            if s.task is not None:
                s.task.cancel()
            if s.ingest is not None:
                s.ingest.close()
        else:
            self.subscribers[s.stream_id].pop(session_id, None)
            self._needs.pop(s.stream_id, None)
            self._split_subs.pop(s.stream_id, None)
            self._refused_ended += getattr(s.out, "send_refused", 0)
            if not self.subscribers[s.stream_id]:
                del self.subscribers[s.stream_id]
        if s.pc is not None:
            await s.pc.close()
        return True

    # -- fan-out ---------------------------------------------------------------------------
    async def dispatch(self, report: TickReport) -> None:
        self.dispatch_now(report)

    def dispatch_now(self, report: TickReport) -> None:
        """Send a tick's outcomes to AIC subscribers: codes for `ai` frames, else Opus."""
        t0 = time.perf_counter()
        relayed = self.cascade.subscriptions if self.cascade is not None else {}
        subscribers, publishers = self.subscribers, self.publishers
        # frames of streams with AIC subscribers here or on other workers (legacy ones are
        # served by `forward`); a frame becomes an object only when it is sent
        todo: list[tuple[FrameOutcome, list[Subscriber]]] = []
        for i, sid in enumerate(report.stream_ids):
            aic = self._split(sid)[0] if sid in subscribers else []
            if (aic or sid in relayed) and sid in publishers:
                todo.append((report.frame(i), aic))
        self._fan_out(todo, relay_tick=report.tick)
        report.overhead_ms += (time.perf_counter() - t0) * 1000.0
        self.overheads_ms.append(report.overhead_ms)
        if len(self.overheads_ms) > 10_000:
            del self.overheads_ms[:5_000]

    def dispatch_frames(self, tick: int, frames: list[FrameOutcome]) -> None:
        """Frames decided elsewhere (another worker's tick, cascade.py) -> this worker's AIC
        subscribers, exactly as `dispatch_now` sends its own tick's."""
        todo = []
        for fo in frames:
            if fo.stream_id in self.subscribers and fo.stream_id in self.publishers:
                aic = self._split(fo.stream_id)[0]
                if aic:
                    todo.append((fo, aic))
        self._fan_out(todo)  # never relayed on: only a stream's owner relays it

    def _split(self, stream_id: str) -> tuple[list[Subscriber], list[Subscriber]]:
        """The stream's subscribers as (AIC, legacy Opus): sorted once per join or leave, not
        once per packet (a big call's legacy subscribers are a few among thousands)."""
        split = self._split_subs.get(stream_id)
        if split is None:
            subs = self.subscribers.get(stream_id)
            if not subs:
                return [], []
            # `out.aic_pt` for `sub.aic`: no two property calls a subscriber
            split = ([s for s in subs.values() if s.out.aic_pt is not None],
                     [s for s in subs.values() if s.out.aic_pt is None and s.out.opus_pt is not None])
            self._split_subs[stream_id] = split
        return split

    def _fan_out(self, todo: list[tuple[FrameOutcome, list[Subscriber]]],
                 relay_tick: int | None = None) -> None:
        """`relay_tick`: this worker's own tick, whose output goes to the other workers too."""
        opus_packets = self._encode_opus([fo for fo, _ in todo if fo.outcome is Outcome.FALLBACK])
        if self.cascade is not None and relay_tick is not None:  # cascade.py: once to each other worker
            self.cascade.on_tick(relay_tick, [fo for fo, _ in todo], opus_packets)
        cache: dict = {}  # subscribers at the same layer share a payload's packing
        # plain calls: a send only hands a datagram to the socket (fastpath.py), no coroutine;
        # an AI frame that extends or ends a packet makes no object (`one_packet`)
        sent = sent_bytes = 0
        for fo, subs in todo:
            if not subs:
                continue
            max_n_q = self.core.stream_max_n_q(fo.stream_id)
            fallback = opus_packets.get(id(fo)) if fo.outcome is Outcome.FALLBACK else None
            ts = fo.rtp_timestamp
            for sub in subs:
                sender = sub.aic_sender
                assert sender is not None
                out = sub.out
                before = sender.layer
                quick = sender.one_packet(fo, max_n_q, cache)
                if quick is False:  # the frame waits in a longer packet
                    pass
                elif quick is not None:
                    payload, pts, marker = quick
                    if out.send_now(out.aic_pt, payload, pts, marker):
                        sender.sent(out.last_wire_bytes)
                        sub.sent_by_kind["aic"] += 1
                        sent += 1
                        sent_bytes += len(payload)
                else:
                    for p in sender.on_frame(fo, max_n_q, cache):
                        if out.send_now(out.aic_pt, p.payload, p.timestamp, p.marker):
                            sender.sent(out.last_wire_bytes)
                            kind = "aic_sid" if p.sid else "aic"
                            sub.sent_by_kind[kind] += 1
                            self.packets_by_kind[kind] += 1
                            self._unrecorded_bytes["aic"] += len(p.payload)
                if sender.layer is not before and sender.layer != before:
                    self._count_switch(before, sender.layer)
                if fallback is not None and out.opus_pt is not None:
                    self._send(sub, "opus", out.opus_pt, fallback, ts)
        if sent:
            self.packets_by_kind["aic"] += sent
            self._unrecorded_bytes["aic"] += sent_bytes
        self._update_needs()
        self._record_wire_bytes()

    def _update_needs(self) -> None:
        """Each stream is encoded as deep as its deepest AIC subscriber's layer (next tick),
        here or on another worker (cascade.py)."""
        now = time.monotonic()
        streams: Any = self.subscribers
        if self.cascade is not None and self.cascade.subscriptions:
            streams = set(self.subscribers) | set(self.cascade.subscriptions)
        for stream_id in streams:
            if stream_id not in self.core:
                continue
            top = self.core.stream_max_n_q(stream_id)  # once per stream: the loop is per subscriber
            group = self._needs.get(stream_id)
            if group is None or group[0] != top:
                group = self._need_group(stream_id, top)
            need, adaptive = group[1], group[2]
            for sender in adaptive:
                if sender.rate is not None and sender.rate.check_timeout(now) is not None:
                    sender.choose(top)
                layer = sender.choose(top) if sender.pinned is not None else sender.layer
                need = layer.n_q if need is None else max(need, layer.n_q)
            if self.cascade is not None:
                remote = self.cascade.remote_need(stream_id)
                if remote is not None:
                    need = remote if need is None else max(need, remote)
            self.core.set_need(stream_id, need)

    def _need_group(self, stream_id: str, top: int) -> tuple[int, int | None, list[AicSender]]:
        """A stream's subscribers for `_update_needs`: (cap, deepest fixed layer under it,
        rate-controlled senders). A fixed sender's layer is a function of its pin and the cap,
        so it is chosen here, once per cap, membership and pin (the group is dropped when one
        changes); only rate-controlled senders are looked at every tick."""
        fixed: int | None = None
        adaptive: list[AicSender] = []
        for sub in self.subscribers.get(stream_id, {}).values():
            sender = sub.aic_sender
            if sender is None:
                continue
            if sender.rate is not None:
                adaptive.append(sender)
                continue
            layer = sender.choose(top)
            fixed = layer.n_q if fixed is None else max(fixed, layer.n_q)
        group = (top, fixed, adaptive)
        if stream_id in self.subscribers:
            self._needs[stream_id] = group
        return group

    def _encode_opus(self, rows: list[FrameOutcome]) -> dict[int, list[bytes]]:
        """Opus packets per frame; one encoder call per round (a stream's k-th frame of the
        tick in round k: a stream with a shed backlog has several frames, in order)."""
        out: dict[int, list[bytes]] = {}
        rounds: list[list[FrameOutcome]] = []
        seen: dict[str, int] = defaultdict(int)
        for fo in rows:
            # the publisher's own packets (opus_in) or, cascade.RelayedFrame, the owner's
            packets = fo.opus
            if packets is not None:
                out[id(fo)] = list(packets)
                continue
            if fo.pcm24 is None:
                continue
            k = seen[fo.stream_id]
            seen[fo.stream_id] += 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(fo)
        for batch in rounds:
            slots = [self.publishers[fo.stream_id].opus_slot for fo in batch]
            pcm = np.stack([fo.pcm24 for fo in batch])
            for fo, packets in zip(batch, self.opus.encode(slots, pcm), strict=True):
                out[id(fo)] = packets
        return out

    def _send(self, sub: Subscriber, kind: str, pt: int, payloads: list[bytes], ts: int) -> None:
        """Opus packets in order from `ts`, each after its predecessor's duration (an empty
        one, `PACKET_LOST`, is a 20 ms gap the subscriber's decoder conceals)."""
        for k, payload in enumerate(payloads):
            if k:
                prev = payloads[k - 1]
                ts += (packet_samples(prev, RTP_CLOCK_HZ) if prev else 0) or OPUS_FRAME_RTP_TICKS
            if payload and sub.out.send_now(pt, payload, ts):
                sub.sent_by_kind[kind] += 1
                self.packets_by_kind[kind] += 1
                self._unrecorded_bytes[kind] += len(payload)

    def _record_wire_bytes(self) -> None:
        """One metrics call per codec path per tick (legacy forwarding included)."""
        for kind, n in self._unrecorded_bytes.items():
            self.bytes_by_kind[kind] += n
            metrics.record_wire_bytes(metrics.WirePath.AI if kind == "aic" else metrics.WirePath.NATIVE, n)
        self._unrecorded_bytes.clear()

    def stream_stats(self) -> dict[str, Any]:
        """Per stream: the publisher's requested bandwidth, the depth encoded, DTX, and each
        AIC subscriber's current layer (the dashboard's bitrate view)."""
        out: dict[str, Any] = {}
        for stream_id in list(self.publishers):
            ad = self.core.stream(stream_id)
            if ad is None:
                continue
            subs = {}
            for sid, sub in self.subscribers.get(stream_id, {}).items():
                if sub.aic_sender is None:
                    continue
                layer = sub.aic_sender.layer
                subs[sid] = {"n_q": layer.n_q, "kbps": layer.bandwidth_kbps,
                             "packet_ms": layer.packet_ms,
                             "wire_kbps": round(wire_kbps(layer.n_q, layer.packet_ms), 2),
                             "adaptive": sub.aic_sender.rate is not None}
            out[stream_id] = {"requested_kbps": ad.requested_kbps, "cap_kbps": ad.cap_kbps,
                              "depth_n_q": ad.depth_n_q, "dtx": "silent" if ad.dtx_silent else "active",
                              "dtx_enabled": ad.dtx_enabled, "subscribers": subs}
        return out

    def ingest_drops(self) -> dict[str, int]:
        """Publishers' packets the fast receive path dropped, by reason (fastpath.IngestDrop)."""
        out: Counter[str] = Counter()
        for pub in self.publishers.values():
            if pub.ingest is not None:
                out.update(pub.ingest.drops)
            if pub.ingress is not None:  # SRTP refused or not RTP (aiortc_compat.RtpIngress)
                out.update(pub.ingress.drops)
        return dict(out)

    def stats(self) -> dict[str, Any]:
        ov = np.asarray(self.overheads_ms[-1500:]) if self.overheads_ms else np.zeros(1)
        core = self.core.stats()
        return {
            "publishers": sum(not p.relayed for p in self.publishers.values()),
            "relayed_streams": core["relayed_streams"],
            "subscribers": sum(len(v) for v in self.subscribers.values()),
            "frames": core["frames"],
            "hints": core["hints"],
            "packets": dict(self.packets_by_kind),
            "ticks": core["ticks"],
            "encodes": core["encodes"],
            "layer_switches": self.layer_switches,
            # packets the subscribers' sockets refused (full buffer): counted, not sent
            "send_refused": self._refused_ended + sum(
                getattr(sub.out, "send_refused", 0) for subs in self.subscribers.values()
                for sub in subs.values()),
            "ingest_drops": self.ingest_drops(),
            "decode_at": self.decode_at,  # where publishers' Opus is decoded: replica or bridge
            # publishers whose packets take the native receive, and the packets it took
            "native_receive": {
                "publishers": sum(p.ingress is not None for p in self.publishers.values()),
                "packets": sum(p.ingress.packets for p in self.publishers.values() if p.ingress is not None),
            },
            "streams": self.stream_stats(),
            "tick_overhead_ms_p50": float(np.percentile(ov, 50)),
            "tick_overhead_ms_p99": float(np.percentile(ov, 99)),
        }
