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

Pure parsing; parsers raise ``ValueError`` with a precise message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

HINT_URI = "urn:auralink:aic-hint:1"
ONE_BYTE_PROFILE = 0xBEDE
TWO_BYTE_PROFILE = 0x1000  # low 4 bits are "appbits"
TWO_BYTE_PROFILE_MASK = 0xFFF0
ONE_BYTE_MAX_ID = 14
ONE_BYTE_STOP_ID = 15
ONE_BYTE_MAX_LEN = 16
TWO_BYTE_MAX_ID = 255
TWO_BYTE_MAX_LEN = 255
BLOCK_HEADER_BYTES = 4
MAX_BLOCK_WORDS = 0xFFFF

HINT_BODY_BYTES = 6
HINT_TAG_BYTES = 10  # 80-bit truncated HMAC-SHA256
HINT_BYTES = HINT_BODY_BYTES + HINT_TAG_BYTES
HINT_BANDWIDTHS_KBPS = (1.5, 3.0, 6.0, 12.0, 24.0)
HINT_MAX_MODEL = 15
HINT_SEQ_BITS = 24
HINT_SEQ_MASK = (1 << HINT_SEQ_BITS) - 1
HINT_INDEX_BITS = 48
HINT_EPOCH_MODULUS = 1 << 16

_BLOCK_HEADER = struct.Struct("!HH")
_HINT_BODY = struct.Struct("!BHBH")  # first byte, epoch, seq high byte, seq low 16 bits


def _padding(n: int) -> int:
    return -n % 4


@dataclass
class HeaderExtensionBlock:
    """An RFC 8285 extension block: its elements as (id, data), in order."""

    elements: list[tuple[int, bytes]] = field(default_factory=list)
    two_byte: bool = False
    appbits: int = 0  # two-byte form only

    def get(self, ext_id: int) -> bytes | None:
        """Data of the first element with this id, or None."""
        for i, data in self.elements:
            if i == ext_id:
                return data
        return None

    @classmethod
    def parse(cls, data: bytes) -> HeaderExtensionBlock:
        """Parse a whole block: profile (16) | length in words (16) | elements."""
        if len(data) < BLOCK_HEADER_BYTES:
            raise ValueError(
                f"header extension is truncated: {len(data)} bytes, header needs {BLOCK_HEADER_BYTES}"
            )
        profile, words = _BLOCK_HEADER.unpack_from(data, 0)
        expected = BLOCK_HEADER_BYTES + 4 * words
        if len(data) < expected:
            raise ValueError(
                f"header extension is truncated: {len(data)} bytes, length field says {expected}"
            )
        if len(data) > expected:
            raise ValueError(
                f"header extension is oversized: {len(data)} bytes, length field says {expected}"
            )
        return cls.from_profile(profile, bytes(data[BLOCK_HEADER_BYTES:]))

    @classmethod
    def from_profile(cls, profile: int, value: bytes) -> HeaderExtensionBlock:
        """Parse elements given the profile and the element bytes (RTP parsers split them)."""
        if profile == ONE_BYTE_PROFILE:
            return cls(elements=_parse_one_byte(value))
        if profile & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:
            return cls(elements=_parse_two_byte(value), two_byte=True, appbits=profile & 0x0F)
        raise ValueError(f"header extension profile 0x{profile:04X} is not an RFC 8285 profile")

    @property
    def profile(self) -> int:
        return TWO_BYTE_PROFILE | self.appbits if self.two_byte else ONE_BYTE_PROFILE

    def element_bytes(self) -> bytes:
        """Elements, then zero padding to a 32-bit boundary (the block without its header)."""
        out = bytearray()
        if self.two_byte:
            if not 0 <= self.appbits <= 0x0F:
                raise ValueError(f"appbits {self.appbits} out of range [0, 15]")
            for ext_id, data in self.elements:
                if not 1 <= ext_id <= TWO_BYTE_MAX_ID:
                    raise ValueError(f"two-byte extension id {ext_id} out of range [1, {TWO_BYTE_MAX_ID}]")
                if len(data) > TWO_BYTE_MAX_LEN:
                    raise ValueError(f"two-byte extension element is {len(data)} bytes > {TWO_BYTE_MAX_LEN}")
                out += bytes((ext_id, len(data))) + data
        else:
            for ext_id, data in self.elements:
                if not 1 <= ext_id <= ONE_BYTE_MAX_ID:
                    raise ValueError(f"one-byte extension id {ext_id} out of range [1, {ONE_BYTE_MAX_ID}]")
                if not 1 <= len(data) <= ONE_BYTE_MAX_LEN:
                    raise ValueError(
                        f"one-byte extension element is {len(data)} bytes, must be 1..{ONE_BYTE_MAX_LEN}"
                    )
                out += bytes(((ext_id << 4) | (len(data) - 1),)) + data
        out += b"\x00" * _padding(len(out))
        if len(out) // 4 > MAX_BLOCK_WORDS:
            raise ValueError(f"header extension is oversized: {len(out)} bytes")
        return bytes(out)

    def __bytes__(self) -> bytes:
        value = self.element_bytes()
        return _BLOCK_HEADER.pack(self.profile, len(value) // 4) + value

    @classmethod
    def for_elements(cls, elements: list[tuple[int, bytes]]) -> HeaderExtensionBlock:
        """The one-byte form when every element fits it, else the two-byte form."""
        one_byte = all(
            1 <= i <= ONE_BYTE_MAX_ID and 1 <= len(d) <= ONE_BYTE_MAX_LEN for i, d in elements
        )
        return cls(elements=list(elements), two_byte=not one_byte)


def _parse_one_byte(value: bytes) -> list[tuple[int, bytes]]:
    elements: list[tuple[int, bytes]] = []
    pos, n = 0, len(value)
    while pos < n:
        head = value[pos]
        if head == 0:  # padding
            pos += 1
            continue
        ext_id, length = head >> 4, (head & 0x0F) + 1
        if ext_id == ONE_BYTE_STOP_ID:
            break  # RFC 8285 4.2: stop; keep the elements before it
        if ext_id == 0:
            raise ValueError(f"one-byte extension element at offset {pos} has reserved id 0 with data")
        pos += 1
        if pos + length > n:
            raise ValueError(
                f"one-byte extension element id {ext_id} is truncated: needs {length} bytes, "
                f"{n - pos} left"
            )
        elements.append((ext_id, value[pos : pos + length]))
        pos += length
    return elements


def _parse_two_byte(value: bytes) -> list[tuple[int, bytes]]:
    elements: list[tuple[int, bytes]] = []
    pos, n = 0, len(value)
    while pos < n:
        ext_id = value[pos]
        if ext_id == 0:  # padding
            pos += 1
            continue
        if pos + 2 > n:
            raise ValueError(f"two-byte extension element id {ext_id} is truncated: no length byte")
        length = value[pos + 1]
        pos += 2
        if pos + length > n:
            raise ValueError(
                f"two-byte extension element id {ext_id} is truncated: needs {length} bytes, "
                f"{n - pos} left"
            )
        elements.append((ext_id, value[pos : pos + length]))
        pos += length
    return elements


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
