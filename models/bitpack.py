"""Bit packing of EnCodec RVQ codes into AIC payload bytes (pure numpy).

Every code is an index into a 1024-entry codebook, so it takes exactly 10 bits on the wire.

Layout (one stream, codes of shape [n_q, F]):

- **frame-major, codebook-minor**: frame 0 codebook 0, frame 0 codebook 1, ...,
  frame 0 codebook n_q-1, frame 1 codebook 0, ... (so a receiver that only wants the first
  frames can stop early, and all books of one frame are contiguous);
- each code is written as 10 bits, **most significant bit first**, with no gap between codes;
- the last byte is **zero-padded** on its low bits, so the payload is
  ceil(n_q * F * 10 / 8) bytes. A decoder rejects nonzero padding bits.

Example: codes [[1], [2]] (n_q=2, F=1) -> bits 0000000001 0000000010 + 4 pad bits
-> bytes 00 40 20 (0b00000000 0b01000000 0b00100000).

Packing works on groups of four codes (40 bits = 5 bytes) with uint64 arithmetic, so a
bridge can pack thousands of frames per tick without a Python loop per code.
"""

from __future__ import annotations

import numpy as np

from models.constants import (  # noqa: F401 - re-exported for bit-level callers
    BANDWIDTHS_KBPS,
    CODE_BITS,
    CODEBOOK_SIZE,
    FRAME_RATE_HZ,
    bandwidth_codebooks,
)

_GROUP_CODES = 4  # 4 codes x 10 bits = 40 bits = 5 bytes
_GROUP_BYTES = 5
_CODE_SHIFTS = np.array([30, 20, 10, 0], dtype=np.uint64)
_BYTE_SHIFTS = np.array([32, 24, 16, 8, 0], dtype=np.uint64)


def codebooks_for_bandwidth(bandwidth_kbps: float) -> int:
    """RVQ codebooks used at a bandwidth: kbps * 1000 / (75 Hz * 10 bits), e.g. 6 kbps -> 8."""
    return bandwidth_codebooks(bandwidth_kbps)


def payload_bits(bandwidth_kbps: float, n_frames: int = 1) -> int:
    """Exact payload bits of `n_frames` EnCodec frames at a bandwidth: n_q * 10 * n_frames."""
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    return codebooks_for_bandwidth(bandwidth_kbps) * CODE_BITS * n_frames


def payload_bytes(bandwidth_kbps: float, n_frames: int = 1) -> int:
    """Payload bytes (bits rounded up to a whole byte), as produced by `pack_codes`."""
    return (payload_bits(bandwidth_kbps, n_frames) + 7) // 8


def packed_size(n_q: int, n_frames: int) -> int:
    """Bytes of `pack_codes` output for codes of shape [n_q, n_frames]."""
    return (n_q * n_frames * CODE_BITS + 7) // 8


def _check_codes(codes: np.ndarray, ndim: int, shape_name: str) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim != ndim:
        raise ValueError(f"codes must have shape {shape_name}, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= CODEBOOK_SIZE:
            bad = lo if lo < 0 else hi
            raise ValueError(f"code value {bad} out of range [0, {CODEBOOK_SIZE})")
    return arr


def _pack_rows(flat: np.ndarray, nbytes: int) -> np.ndarray:
    """flat: [B, n] codes in wire order -> uint8 [B, nbytes]."""
    b, n = flat.shape
    groups = -(-n // _GROUP_CODES)
    padded = np.zeros((b, groups * _GROUP_CODES), dtype=np.uint64)
    padded[:, :n] = flat
    words = (padded.reshape(b, groups, _GROUP_CODES) << _CODE_SHIFTS).sum(axis=2, dtype=np.uint64)
    out = ((words[:, :, None] >> _BYTE_SHIFTS) & np.uint64(0xFF)).astype(np.uint8)
    return out.reshape(b, groups * _GROUP_BYTES)[:, :nbytes]


# Up to this many codes (a 40 ms packet at 24 kbps), one Python integer packs faster than the
# vectorised path: a bridge packs one payload per subscriber layer per frame.
_SMALL_PACK_CODES = 96


def _pack_small(arr: np.ndarray) -> bytes:
    """pack_codes for a few codes: shift them into one integer, MSB first, zero-padded."""
    flat = arr.T.ravel().tolist()
    if min(flat) < 0 or max(flat) >= CODEBOOK_SIZE:
        bad = min(flat) if min(flat) < 0 else max(flat)
        raise ValueError(f"code value {bad} out of range [0, {CODEBOOK_SIZE})")
    acc = 0
    for c in flat:
        acc = (acc << CODE_BITS) | c
    nbits = len(flat) * CODE_BITS
    pad = -nbits % 8
    return (acc << pad).to_bytes((nbits + pad) // 8, "big")


def pack_codes(codes: np.ndarray) -> bytes:
    """Pack one stream's codes [n_q, F] (values in [0, 1024)) into bytes; see module doc."""
    if (isinstance(codes, np.ndarray) and codes.ndim == 2 and codes.dtype.kind in "iu"
            and 0 < codes.size <= _SMALL_PACK_CODES):
        return _pack_small(codes)
    arr = _check_codes(codes, 2, "[n_q, F]")
    n_q, n_frames = arr.shape
    flat = arr.T.reshape(1, n_q * n_frames)  # frame-major, codebook-minor
    return _pack_rows(flat, packed_size(n_q, n_frames))[0].tobytes()


def pack_codes_batch(codes: np.ndarray) -> list[bytes]:
    """Pack B streams' codes [B, n_q, F] in one vectorised pass; one `bytes` per stream."""
    arr = _check_codes(codes, 3, "[B, n_q, F]")
    b, n_q, n_frames = arr.shape
    flat = arr.transpose(0, 2, 1).reshape(b, n_q * n_frames)
    packed = _pack_rows(flat, packed_size(n_q, n_frames))
    return [row.tobytes() for row in packed]


def _unpack_rows(raw_rows: np.ndarray, n: int) -> np.ndarray:
    """raw_rows: uint8 [B, nbytes] -> int16 [B, n] codes in wire order."""
    b, nbytes = raw_rows.shape
    groups = -(-n // _GROUP_CODES)
    raw = np.zeros((b, groups * _GROUP_BYTES), dtype=np.uint64)
    raw[:, :nbytes] = raw_rows
    words = (raw.reshape(b, groups, _GROUP_BYTES) << _BYTE_SHIFTS).sum(axis=2, dtype=np.uint64)
    codes = (words[:, :, None] >> _CODE_SHIFTS) & np.uint64(CODEBOOK_SIZE - 1)
    return codes.reshape(b, groups * _GROUP_CODES)[:, :n].astype(np.int16)


def _check_dims(n_q: int, n_frames: int) -> tuple[int, int, int]:
    """-> (codes, bytes, padding bits) for a payload of [n_q, n_frames] codes."""
    if n_q < 0 or n_frames < 0:
        raise ValueError(f"n_q and n_frames must be >= 0, got n_q={n_q}, n_frames={n_frames}")
    n = n_q * n_frames
    nbytes = packed_size(n_q, n_frames)
    return n, nbytes, nbytes * 8 - n * CODE_BITS


def _length_error(got: int, nbytes: int, n_q: int, n_frames: int) -> ValueError:
    return ValueError(
        f"payload is {got} bytes, expected {nbytes} for n_q={n_q}, n_frames={n_frames}"
    )


def _padding_error(pad_bits: int) -> ValueError:
    return ValueError(f"nonzero padding bits in the last {pad_bits} bits of the payload")


def unpack_codes(data: bytes, n_q: int, n_frames: int) -> np.ndarray:
    """Inverse of `pack_codes`: bytes -> int16 codes [n_q, n_frames].

    Raises ValueError if the length is not exactly ceil(n_q * n_frames * 10 / 8) bytes or if
    any padding bit of the last byte is set.
    """
    n, nbytes, pad_bits = _check_dims(n_q, n_frames)
    if len(data) != nbytes:
        raise _length_error(len(data), nbytes, n_q, n_frames)
    if pad_bits and data[-1] & ((1 << pad_bits) - 1):
        raise _padding_error(pad_bits)
    rows = np.frombuffer(bytes(data), dtype=np.uint8).reshape(1, nbytes)
    return _unpack_rows(rows, n)[0].reshape(n_frames, n_q).T.copy()


def unpack_codes_batch(payloads: list[bytes], n_q: int, n_frames: int) -> np.ndarray:
    """Inverse of `pack_codes_batch`: B payloads -> int16 codes [B, n_q, n_frames].

    Raises ValueError naming the first bad payload (its index) and its problem.
    """
    n, nbytes, pad_bits = _check_dims(n_q, n_frames)
    for i, data in enumerate(payloads):
        if len(data) != nbytes:
            raise ValueError(f"payload {i}: {_length_error(len(data), nbytes, n_q, n_frames)}")
    b = len(payloads)
    rows = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(b, nbytes)
    if pad_bits and b:
        bad = np.flatnonzero(rows[:, -1] & np.uint8((1 << pad_bits) - 1))
        if bad.size:
            raise ValueError(f"payload {int(bad[0])}: {_padding_error(pad_bits)}")
    codes = _unpack_rows(rows, n).reshape(b, n_frames, n_q)
    return np.ascontiguousarray(codes.transpose(0, 2, 1))
