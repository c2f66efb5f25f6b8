"""RTP header extensions (RFC 8285) and the AIC hint element carried in one.

RFC 8285 ("A General Mechanism for RTP Header Extensions") puts a list of elements in
the RTP header extension (RFC 3550 section 5.3.1). The block starts with a 16-bit
"defined by profile" value and a 16-bit length in 32-bit words:

- one-byte form, profile ``0xBEDE``: each element is ``ID(4) | L(4)`` then L+1 data bytes;
  ID 1..14; a zero byte is padding; ID 15 ends processing (RFC 8285 section 4.2);
- two-byte form, profile ``0x100`` + 4 "appbits": each element is ``ID(8) | L(8)`` then L
  data bytes (0..255); ID 1..255; a zero byte is padding (RFC 8285 section 4.3).

The AIC hint element is negotiated in SDP as ``a=extmap:<id> urn:auralink:aic-hint:1``
(RFC 8285 section 5) and carries 16 bytes, so it fits the one-byte form (L = 15):

```
 0                   1                   2                   3
 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
| model | BW  |R|            epoch              |   seq[23:16]  |
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
|          seq[15:0]            |                               |
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+    tag: 80 bits of             +
|                     HMAC-SHA256 (see hint_auth.py)            |
+                               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
|                               |
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
```

``model`` (4 bits) model id, ``BW`` (3 bits) bandwidth index (0 = 1.5 ... 4 = 24 kbps),
``R`` reset (start a new epoch now), ``epoch`` (16 bits), ``seq`` the low 24 bits of the
sender's 48-bit hint index (the receiver estimates the rest, RFC 3711 section 3.3.1 style).
The URI carries the version: a new layout gets a new URI.

Pure parsing; parsers raise ``ValueError`` with a precise message. The RFC 8285 block itself
is parsed and written by aiortc (``sfu_bridge.rtp_ext`` reads the hint element out of it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from models.constants import BANDWIDTHS_KBPS

HINT_URI = "urn:auralink:aic-hint:1"
HINT_BODY_BYTES = 6
HINT_TAG_BYTES = 10  # 80-bit truncated HMAC-SHA256
HINT_BYTES = HINT_BODY_BYTES + HINT_TAG_BYTES
HINT_BANDWIDTHS_KBPS = BANDWIDTHS_KBPS  # the BW field indexes the ladder
HINT_MAX_MODEL = 15
HINT_SEQ_BITS = 24
HINT_SEQ_MASK = (1 << HINT_SEQ_BITS) - 1
HINT_INDEX_BITS = 48
HINT_EPOCH_MODULUS = 1 << 16

_HINT_BODY = struct.Struct("!BHBH")  # first byte, epoch, seq high byte, seq low 16 bits


@dataclass(frozen=True)
class Hint:
    """What a publisher asks for: model, bandwidth, epoch/reset; `seq` is its 48-bit index."""

    model_id: int
    bandwidth_kbps: float
    epoch: int
    reset: bool = False
    seq: int = 0

    def validate(self) -> None:
        if not 0 <= self.model_id <= HINT_MAX_MODEL:
            raise ValueError(f"hint model id {self.model_id} out of range [0, {HINT_MAX_MODEL}]")
        if self.bandwidth_kbps not in HINT_BANDWIDTHS_KBPS:
            raise ValueError(f"hint bandwidth {self.bandwidth_kbps} kbps not in {HINT_BANDWIDTHS_KBPS}")
        if not 0 <= self.epoch < HINT_EPOCH_MODULUS:
            raise ValueError(f"hint epoch {self.epoch} out of range [0, {HINT_EPOCH_MODULUS})")
        if not 0 <= self.seq < 1 << HINT_INDEX_BITS:
            raise ValueError(f"hint seq {self.seq} out of range [0, 2**{HINT_INDEX_BITS})")


@dataclass(frozen=True)
class HintElement:
    """The 16 data bytes of the hint extension element: 6-byte body + 80-bit tag."""

    model_id: int
    bandwidth_index: int
    reset: bool
    epoch: int
    seq24: int
    tag: bytes

    @classmethod
    def from_hint(cls, hint: Hint, tag: bytes = b"\x00" * HINT_TAG_BYTES) -> HintElement:
        hint.validate()
        return cls(
            model_id=hint.model_id,
            bandwidth_index=HINT_BANDWIDTHS_KBPS.index(hint.bandwidth_kbps),
            reset=hint.reset,
            epoch=hint.epoch,
            seq24=hint.seq & HINT_SEQ_MASK,
            tag=tag,
        )

    def to_hint(self, seq: int) -> Hint:
        """The hint, with `seq` the full index the receiver estimated from `seq24`."""
        return Hint(
            model_id=self.model_id,
            bandwidth_kbps=HINT_BANDWIDTHS_KBPS[self.bandwidth_index],
            epoch=self.epoch,
            reset=self.reset,
            seq=seq,
        )

    @classmethod
    def parse(cls, data: bytes) -> HintElement:
        if len(data) < HINT_BYTES:
            raise ValueError(f"hint element is truncated: {len(data)} bytes, expected {HINT_BYTES}")
        if len(data) > HINT_BYTES:
            raise ValueError(f"hint element is oversized: {len(data)} bytes, expected {HINT_BYTES}")
        first, epoch, seq_hi, seq_lo = _HINT_BODY.unpack_from(data, 0)
        bw = (first >> 1) & 0x07
        if bw >= len(HINT_BANDWIDTHS_KBPS):
            raise ValueError(f"hint bandwidth index {bw} is invalid (0..{len(HINT_BANDWIDTHS_KBPS) - 1})")
        return cls(
            model_id=first >> 4,
            bandwidth_index=bw,
            reset=bool(first & 0x01),
            epoch=epoch,
            seq24=(seq_hi << 16) | seq_lo,
            tag=bytes(data[HINT_BODY_BYTES:]),
        )

    def body(self) -> bytes:
        """The 6 authenticated bytes before the tag."""
        if not 0 <= self.model_id <= HINT_MAX_MODEL:
            raise ValueError(f"hint model id {self.model_id} out of range [0, {HINT_MAX_MODEL}]")
        if not 0 <= self.bandwidth_index < len(HINT_BANDWIDTHS_KBPS):
            raise ValueError(f"hint bandwidth index {self.bandwidth_index} is invalid")
        if not 0 <= self.epoch < HINT_EPOCH_MODULUS:
            raise ValueError(f"hint epoch {self.epoch} out of range [0, {HINT_EPOCH_MODULUS})")
        if not 0 <= self.seq24 <= HINT_SEQ_MASK:
            raise ValueError(f"hint seq24 {self.seq24} out of range [0, 2**{HINT_SEQ_BITS})")
        first = (self.model_id << 4) | (self.bandwidth_index << 1) | int(self.reset)
        return _HINT_BODY.pack(first, self.epoch, self.seq24 >> 16, self.seq24 & 0xFFFF)

    def __bytes__(self) -> bytes:
        if len(self.tag) != HINT_TAG_BYTES:
            raise ValueError(f"hint tag is {len(self.tag)} bytes, expected {HINT_TAG_BYTES}")
        return self.body() + self.tag
