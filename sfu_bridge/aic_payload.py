"""AIC RTP payload: EnCodec RVQ codes of one stream for one RTP packet.

The payload follows the RTP payload-format conventions of RFC 3550 section 5.1 (one
payload per RTP packet, the RTP header carries timestamp and sequence number) and is
negotiated as a dynamic payload type (RFC 8866 ``a=rtpmap:<pt> AIC/48000``; the 48 kHz
clock matches Opus, so a stream can switch between AIC and Opus packets on one SSRC
without a timestamp jump). The layout, in network byte order:

```
 0                   1                   2                   3
 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
| V |S| BW  | R |   frames (F)  |            epoch              |
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
|      packed codes: F x n_q x 10 bits, frame-major, MSB first  |
|                       ...                     | zero padding  |
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
```

- ``V`` (2 bits): payload version, 1.
- ``S`` (1 bit): start of epoch; set on the first packet of an epoch (its first frame is
  epoch_seq 0). Decoders reset their state on any new epoch (deployments/contract.py).
- ``BW`` (3 bits): bandwidth index into ``BANDWIDTHS_KBPS`` (0 = 1.5 kbps ... 4 = 24 kbps),
  which fixes n_q = 2, 4, 8, 16, 32 codebooks; 5-7 are invalid.
- ``R`` (2 bits): reserved, zero on send, rejected if set (a newer sender needs a new V).
- ``F`` (8 bits): EnCodec frames in the packet, 1..255 (a 40 ms bridge tick is 3; a
  subscriber whose rate controller asks for 80 or 120 ms packets gets 6 or 9).
  ``F = 0`` is a silence descriptor (SID): the stream is in DTX, the payload is the 4-byte
  header alone with S = 0 and BW = 0; the next payload with codes starts a new epoch.
- ``epoch`` (16 bits): the stream's epoch modulo 2**16.
- codes: ``models.bitpack.pack_codes`` layout, ceil(F * n_q * 10 / 8) bytes, zero padded.

A parser checks lengths before touching fields and raises ``ValueError`` naming the
problem; nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from models.bitpack import pack_codes, pack_codes_batch, packed_size, unpack_codes
from models.constants import BANDWIDTHS_KBPS, N_Q_BY_BANDWIDTH, RTP_CLOCK_HZ

try:  # the bridge's C part packs a payload's codes (models.bitpack's format, checked by tests)
    from sfu_bridge._rtpsend import pack10 as _pack10
except ImportError:  # not built: models.bitpack's Python packer
    _pack10 = None

VERSION = 1
HEADER_BYTES = 4
ENCODING_NAME = "AIC"
CLOCK_RATE = RTP_CLOCK_HZ
N_Q_BY_INDEX = N_Q_BY_BANDWIDTH
MAX_FRAMES = 255
EPOCH_MODULUS = 1 << 16
# Keep one packet below a conservative path MTU (1200 B payload, like WebRTC data channels).
MAX_PAYLOAD_BYTES = 1200

_HEADER = struct.Struct("!BBH")


def payload_size(n_q: int, n_frames: int) -> int:
    """Bytes of a payload carrying [n_q, n_frames] codes, header included."""
    return HEADER_BYTES + packed_size(n_q, n_frames)


def bandwidth_index(n_q: int) -> int:
    if n_q not in N_Q_BY_INDEX:
        raise ValueError(f"n_q {n_q} is not one of {N_Q_BY_INDEX}")
    return N_Q_BY_INDEX.index(n_q)


@dataclass
class AicPayload:
    """One RTP payload of EnCodec codes: ``codes`` is int [n_q, F] with values in [0, 1024)."""

    epoch: int
    n_q: int
    codes: np.ndarray
    start: bool = False  # first packet of its epoch (S bit)

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def is_sid(self) -> bool:
        """A silence descriptor: no codes, the stream is in DTX."""
        return self.n_frames == 0

    @property
    def bandwidth_kbps(self) -> float:
        return BANDWIDTHS_KBPS[bandwidth_index(self.n_q)]

    @classmethod
    def parse(cls, data: bytes) -> AicPayload:
        if len(data) < HEADER_BYTES:
            raise ValueError(f"AIC payload is truncated: {len(data)} bytes, header needs {HEADER_BYTES}")
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"AIC payload is oversized: {len(data)} bytes > {MAX_PAYLOAD_BYTES}")
        first, n_frames, epoch = _HEADER.unpack_from(data, 0)
        version = first >> 6
        if version != VERSION:
            raise ValueError(f"AIC payload version {version} is not supported (expected {VERSION})")
        bw = (first >> 2) & 0x07
        if bw >= len(N_Q_BY_INDEX):
            raise ValueError(f"AIC payload bandwidth index {bw} is invalid (0..{len(N_Q_BY_INDEX) - 1})")
        if first & 0x03:
            raise ValueError("AIC payload reserved bits are set")
        if n_frames == 0:
            if len(data) != HEADER_BYTES or first & 0x3C:
                raise ValueError("AIC silence descriptor must be the 4-byte header with S = 0, BW = 0")
            return cls(epoch=epoch, n_q=N_Q_BY_INDEX[0], codes=np.zeros((N_Q_BY_INDEX[0], 0), np.int16))
        n_q = N_Q_BY_INDEX[bw]
        expected = payload_size(n_q, n_frames)
        if len(data) < expected:
            raise ValueError(
                f"AIC payload is truncated: {len(data)} bytes, expected {expected} "
                f"for n_q={n_q}, frames={n_frames}"
            )
        if len(data) > expected:
            raise ValueError(
                f"AIC payload is oversized: {len(data)} bytes, expected {expected} "
                f"for n_q={n_q}, frames={n_frames}"
            )
        codes = unpack_codes(data[HEADER_BYTES:], n_q, n_frames)
        return cls(epoch=epoch, n_q=n_q, codes=codes, start=bool(first & 0x20))

    def __bytes__(self) -> bytes:
        bw = bandwidth_index(self.n_q)
        if not 0 <= self.epoch < EPOCH_MODULUS:
            raise ValueError(f"epoch {self.epoch} out of range [0, {EPOCH_MODULUS})")
        codes = np.asarray(self.codes)
        if codes.ndim != 2 or codes.shape[0] != self.n_q:
            raise ValueError(f"codes must have shape [n_q={self.n_q}, F], got {codes.shape}")
        n_frames = codes.shape[1]
        if not 1 <= n_frames <= MAX_FRAMES:
            raise ValueError(f"frame count {n_frames} out of range [1, {MAX_FRAMES}]")
        size = payload_size(self.n_q, n_frames)
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"AIC payload would be oversized: {size} bytes > {MAX_PAYLOAD_BYTES}")
        # pack_codes rejects non-integer codes and values outside [0, CODEBOOK_SIZE).
        first = (VERSION << 6) | (int(self.start) << 5) | (bw << 2)
        if _pack10 is not None and codes.dtype == np.int16:  # the C packer: same bytes, 25x faster
            packed = _pack10(np.ascontiguousarray(codes.T))
        else:
            packed = pack_codes(codes)
        return _HEADER.pack(first, n_frames, self.epoch) + packed


def silence_descriptor(epoch: int) -> bytes:
    """The DTX silence descriptor (F = 0): sent when a talk spurt ends and every 400 ms of
    silence after, as Opus DTX sends its comfort-noise updates (RFC 7587 section 3.1.3)."""
    if not 0 <= epoch < EPOCH_MODULUS:
        raise ValueError(f"epoch {epoch} out of range [0, {EPOCH_MODULUS})")
    return _HEADER.pack(VERSION << 6, 0, epoch)


def pack_payloads(epochs: np.ndarray, n_q: int, codes: np.ndarray, starts: np.ndarray) -> list[bytes]:
    """B payloads at once (a tick's worth of streams): same bytes as `bytes(AicPayload(...))`.

    epochs: int [B] in [0, 2**16); codes: int [B, n_q, F]; starts: bool [B].
    """
    bw = bandwidth_index(n_q)
    codes = np.asarray(codes)
    epochs = np.asarray(epochs, np.int64)
    starts = np.asarray(starts, bool)
    if codes.ndim != 3 or codes.shape[1] != n_q:
        raise ValueError(f"codes must have shape [B, n_q={n_q}, F], got {codes.shape}")
    b, _, n_frames = codes.shape
    if epochs.shape != (b,) or starts.shape != (b,):
        raise ValueError(f"epochs and starts must have shape ({b},)")
    if not 1 <= n_frames <= MAX_FRAMES:
        raise ValueError(f"frame count {n_frames} out of range [1, {MAX_FRAMES}]")
    if payload_size(n_q, n_frames) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"AIC payload would be oversized: {payload_size(n_q, n_frames)} bytes > {MAX_PAYLOAD_BYTES}")
    if b and (int(epochs.min()) < 0 or int(epochs.max()) >= EPOCH_MODULUS):
        raise ValueError(f"epochs must be in [0, {EPOCH_MODULUS})")
    headers = np.empty((b, HEADER_BYTES), np.uint8)
    headers[:, 0] = (VERSION << 6) | (bw << 2) | (starts.astype(np.uint8) << 5)
    headers[:, 1] = n_frames
    headers[:, 2] = epochs >> 8
    headers[:, 3] = epochs & 0xFF
    return [h.tobytes() + body for h, body in zip(headers, pack_codes_batch(codes), strict=True)]
