"""Per-packet work of a bridge worker with the Python taken out: RTP writing and Opus ingest.

- `RtpWriter`: an outbound SSRC's RTP header (with its RFC 8285 extensions) is serialised once
  per extension set by aiortc's own serializer; each packet copies that template into the
  SRTP buffer, patches marker/payload type/sequence/timestamp with `struct.pack_into`, copies
  the payload behind it and is protected in place (`aiortc_compat.FastSrtp`): no `RtpPacket`
  object, no extension map walk, no coroutine per packet. `send` does all of that and the
  `sendto` in one C call (`aiortc_compat.native_send`, sfu_bridge/_rtpsend.c) where the
  extension is built and the socket allows it; `write` is the Python path.
- `OpusIngest`: a publisher's Opus packets into 40 ms chunks, by sequence number - no 48 kHz
  stereo `AudioFrame`, no resampler, no decoder thread. Either decoded here by libopus
  straight to 24 kHz mono float (the codec's input rate: libopus decodes at 8/12/16/24/48 kHz
  natively, RFC 6716 2), or - a WebRTC bridge's default (`BridgeConfig.decode_at`) - listed as
  packets for the codec replica to decode (`models.opus.OpusChunkDecoder`). Gaps in the sequence are
  concealed (libopus PLC; listed as lost packets for the replica) at once: there is no jitter
  buffer, so a packet that arrives after its place was concealed (reordered) is a counted
  drop (`reordered`), as are duplicates and packets older than a resynchronisation (`late`).
"""

from __future__ import annotations

import enum
import struct
import time
from collections import Counter, deque
from typing import Any

from models.constants import CHUNK_RTP_TICKS, CHUNK_SAMPLES, MAX_OPUS_PACKET_BYTES
from models.opus import CHUNK_RATE, PACKET_LOST, OpusChunkDecoder, packet_samples
from sfu_bridge.aiortc_compat import BUFFER_BYTES, SRTP_MAX_TRAILER, FastSrtp, native_send

RTP_HEADER = struct.Struct("!BBHII")
CHUNK_48K = CHUNK_RTP_TICKS  # 40 ms on the 48 kHz RTP clock
INGEST_RATE = CHUNK_RATE
MAX_CONCEALED_PACKETS = 5  # a longer gap resynchronises without concealment (a new talk spurt)


class RtpWriter:
    """One outbound SSRC: sequence numbers, header templates, SRTP in place."""

    def __init__(self, ssrc: int, ext_map: Any, mid: str | None, seq0: int = 0) -> None:
        self.ssrc = ssrc
        self.ext_map = ext_map
        self.mid = mid
        self.seq = seq0 & 0xFFFF
        self._templates: dict[bool, bytes] = {}

    def template(self, with_mid: bool) -> bytes:
        t = self._templates.get(with_mid)
        if t is None:
            from aiortc.rtp import RtpPacket

            pkt = RtpPacket(payload_type=0, sequence_number=0, timestamp=0, ssrc=self.ssrc)
            pkt.extensions.mid = self.mid if with_mid else None
            t = self._templates[with_mid] = pkt.serialize(self.ext_map)
        return t

    def write(self, srtp: FastSrtp, payload_type: int, payload: bytes, timestamp: int,
              marker: bool = False, with_mid: bool = False) -> bytes:
        """The next SRTP packet of this SSRC (advances the sequence number)."""
        tmpl = self.template(with_mid)
        h = len(tmpl)
        n = h + len(payload)
        if n > BUFFER_BYTES - SRTP_MAX_TRAILER:
            raise ValueError("packet is too long")
        buf = srtp.buffer
        buf[0:h] = tmpl
        struct.pack_into("!BHI", buf, 1, (marker << 7) | payload_type, self.seq,
                         timestamp & 0xFFFFFFFF)
        buf[h:n] = payload
        data = srtp.protect_in_place(n)
        self.seq = (self.seq + 1) & 0xFFFF
        return data

    def send(self, path: tuple | None, payload_type: int, payload: bytes, timestamp: int,
             marker: bool = False, with_mid: bool = False, *, srtp: FastSrtp | None = None,
             sendto: Any = None, addr: Any = None) -> int:
        """The next packet of this SSRC out: `write` and the `sendto` in one native call on
        `path` (`aiortc_compat.native_path`), or, when `path` is None, `write` on `srtp` and
        `sendto(data, addr)` in Python. Returns the SRTP packet's length, or a negative number
        when the socket refused it (-errno on the native path; the sequence number is used
        either way, as a packet lost on the wire)."""
        if path is not None:
            tmpl = self._templates.get(with_mid) or self.template(with_mid)
            n = native_send(path, tmpl, (marker << 7) | payload_type, self.seq, timestamp, payload)
            self.seq = (self.seq + 1) & 0xFFFF
            return n
        data = self.write(srtp, payload_type, payload, timestamp, marker, with_mid)
        try:
            sendto(data, addr)
        except OSError:  # a full buffer, or the socket is closed
            return -1
        return len(data)


class IngestDrop(str, enum.Enum):
    REORDERED = "reordered"  # arrived after its place in the sequence was concealed
    LATE = "late"  # older than the last packet decoded otherwise (duplicate, or before a resync)
    MALFORMED = "malformed"  # libopus refused the payload
    RESYNC = "resync"  # a gap too long to conceal: the timeline restarts


class OpusIngest:
    """A publisher's Opus RTP payloads -> 40 ms chunks, each with its RTP timestamp (48 kHz
    clock, 0 at the first chunk) and the wall time it completed.

    `decode=True`: a chunk is 24 kHz mono float PCM [960], decoded here by libopus
    (`models.opus.OpusChunkDecoder`). `decode=False`: a chunk is the tuple of the packets
    that completed it, counted by their TOC, not decoded (the codec replica decodes them;
    a lost packet the sequence shows is listed as `PACKET_LOST`, which it conceals)."""

    def __init__(self, stream_id: str, decode: bool = True) -> None:
        self.stream_id = stream_id
        self._dec = OpusChunkDecoder() if decode else None
        self._closed = False
        self._fill = 0  # packets mode: samples (24 kHz) listed but not yet chunked
        self._pending: list[bytes] = []
        self._ready: list[tuple[bytes, ...]] = []  # packets mode: chunks completed
        self._next_seq: int | None = None
        self._last_samples = INGEST_RATE // 50  # 20 ms until a packet says otherwise
        self.chunks = 0
        self.packets = 0
        self.concealed = 0
        self.drops: Counter[str] = Counter()
        # sequence numbers concealed lately: one of them arriving now was reordered
        self._concealed_seqs: deque[int] = deque(maxlen=2 * MAX_CONCEALED_PACKETS)

    @property
    def decodes(self) -> bool:
        """Whether chunks are decoded here (pcm) or listed as packets for the replica."""
        return self._dec is not None

    def packet(self, seq: int, payload: bytes) -> list[tuple[Any, int, float]]:
        """The chunks this packet completes: (chunk, RTP timestamp, wall time); the chunk is
        pcm24 float32 [960] or a tuple of packets (see the class doc). Nothing once closed
        (the publisher has left; a packet may still be on its way)."""
        if self._closed:
            return []
        nxt = self._next_seq
        if nxt is not None:
            gap = (seq - nxt) & 0xFFFF
            if gap >= 0x8000:
                why = IngestDrop.REORDERED if seq in self._concealed_seqs else IngestDrop.LATE
                self.drops[why.value] += 1
                return []
            if gap:
                if gap <= MAX_CONCEALED_PACKETS:
                    for k in range(gap):
                        self._add(None)
                        self._concealed_seqs.append((nxt + k) & 0xFFFF)
                        self.concealed += 1
                else:
                    self.drops[IngestDrop.RESYNC.value] += 1
        self._next_seq = (seq + 1) & 0xFFFF
        if not self._add(payload):
            self.drops[IngestDrop.MALFORMED.value] += 1
        self.packets += 1
        if self._dec is None:
            return self._take() if self._ready else []
        return self._take() if self._dec.fill >= CHUNK_SAMPLES else []

    def _add(self, payload: bytes | None) -> bool:
        """One packet (None: a lost one) onto the chunk being filled; False: malformed."""
        if self._dec is not None:
            return self._dec.add(payload)
        n = self._last_samples if payload is None else packet_samples(payload)
        if n <= 0 or (payload is not None and len(payload) > MAX_OPUS_PACKET_BYTES):
            return False  # malformed, or longer than a batch row may carry
        self._pending.append(PACKET_LOST if payload is None else payload)
        self._fill += n
        if payload is not None:
            self._last_samples = n
        while self._fill >= CHUNK_SAMPLES:
            # a chunk is the packets that completed it; a packet longer than what completes
            # it leaves the next ones empty (the replica's decoder holds its extra samples)
            self._ready.append(tuple(self._pending))
            self._pending = []
            self._fill -= CHUNK_SAMPLES
        return True

    def _take(self) -> list[tuple[Any, int, float]]:
        out: list[tuple[Any, int, float]] = []
        now = time.time()
        if self._dec is None:
            chunks: list[Any] = self._ready
            self._ready = []
        else:
            chunks = []
            while self._dec.fill >= CHUNK_SAMPLES:
                chunks.append(self._dec.take())
        for chunk in chunks:
            out.append((chunk, self.chunks * CHUNK_48K, now))
            self.chunks += 1
        return out

    def close(self) -> None:
        self._closed = True
        if self._dec is not None:
            self._dec.close()
