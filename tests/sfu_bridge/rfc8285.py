"""An RFC 8285 header-extension block parser and writer (RFC 3550 section 5.3.1 framing).

Test equipment: the bridge reads and writes extension blocks through aiortc
(sfu_bridge/rtp_ext.py); this independent implementation builds and checks the exact bytes
the tests put on the wire.

- one-byte form, profile ``0xBEDE``: each element is ``ID(4) | L(4)`` then L+1 data bytes;
  ID 1..14; a zero byte is padding; ID 15 ends processing (RFC 8285 section 4.2);
- two-byte form, profile ``0x100`` + 4 "appbits": each element is ``ID(8) | L(8)`` then L
  data bytes (0..255); ID 1..255; a zero byte is padding (RFC 8285 section 4.3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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

_BLOCK_HEADER = struct.Struct("!HH")


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
