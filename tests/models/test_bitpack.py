"""Bit packing of RVQ codes: exact sizes, byte-exact layout, round trips, precise errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.bitpack import (
    pack_codes,
    pack_codes_batch,
    packed_size,
    payload_bits,
    payload_bytes,
    unpack_codes,
    unpack_codes_batch,
)


@pytest.mark.parametrize(
    ("kbps", "n_frames", "bits", "nbytes"),
    [
        (1.5, 1, 20, 3),
        (1.5, 3, 60, 8),  # 60 bits -> 4 padding bits
        (3.0, 3, 120, 15),
        (6.0, 1, 80, 10),
        (6.0, 3, 240, 30),
        (12.0, 3, 480, 60),
        (24.0, 3, 960, 120),
        (6.0, 0, 0, 0),
    ],
)
def test_payload_sizes_per_bandwidth(kbps: float, n_frames: int, bits: int, nbytes: int) -> None:
    assert payload_bits(kbps, n_frames) == bits
    assert payload_bytes(kbps, n_frames) == nbytes
    n_q = bits // 10 // n_frames if n_frames else 8
    codes = np.zeros((n_q, n_frames), dtype=np.int64)
    assert len(pack_codes(codes)) == nbytes


def test_payload_bits_rejects_unknown_bandwidth() -> None:
    with pytest.raises(ValueError, match=r"bandwidth 5\.0 kbps not in \(1\.5, 3\.0, 6\.0"):
        payload_bits(5.0)
    with pytest.raises(ValueError, match="n_frames must be >= 0, got -1"):
        payload_bits(6.0, -1)


def test_byte_exact_layout_frame_major_msb_first() -> None:
    # frame 0: book0=1, book1=2; frame 1: book0=1023, book1=0
    codes = np.array([[1, 1023], [2, 0]])
    bits = "0000000001" + "0000000010" + "1111111111" + "0000000000"
    expected = int(bits, 2).to_bytes(5, "big")
    assert pack_codes(codes) == expected
    # odd number of codes: 2 x 1 -> 20 bits + 4 zero padding bits
    assert pack_codes(np.array([[1], [2]])) == bytes([0x00, 0x40, 0x20])


@settings(max_examples=150, deadline=None)
@given(
    arrays(
        np.int64,
        st.tuples(st.integers(0, 32), st.integers(0, 9)),
        elements=st.integers(0, 1023),
    )
)
def test_round_trip(codes: np.ndarray) -> None:
    data = pack_codes(codes)
    assert len(data) == packed_size(*codes.shape)
    back = unpack_codes(data, *codes.shape)
    assert back.dtype == np.int16
    assert back.shape == codes.shape
    np.testing.assert_array_equal(back, codes)


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.int16,
        st.tuples(st.integers(0, 6), st.integers(1, 8), st.integers(1, 4)),
        elements=st.integers(0, 1023),
    )
)
def test_batch_equals_single_and_round_trips(codes: np.ndarray) -> None:
    payloads = pack_codes_batch(codes)
    assert payloads == [pack_codes(c) for c in codes]
    np.testing.assert_array_equal(unpack_codes_batch(payloads, *codes.shape[1:]), codes)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (np.array([[0, 1024]]), r"code value 1024 out of range \[0, 1024\)"),
        (np.array([[-1, 5]]), r"code value -1 out of range \[0, 1024\)"),
        (np.zeros((2, 3), dtype=np.float32), "codes must be integers, got dtype float32"),
        (np.zeros(3, dtype=np.int64), r"codes must have shape \[n_q, F\], got shape \(3,\)"),
    ],
)
def test_pack_rejects_bad_codes(codes: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_codes(codes)


def test_pack_batch_rejects_wrong_rank() -> None:
    with pytest.raises(
        ValueError, match=r"codes must have shape \[B, n_q, F\], got shape \(2, 3\)"
    ):
        pack_codes_batch(np.zeros((2, 3), dtype=np.int64))


def test_unpack_rejects_wrong_length() -> None:
    data = pack_codes(np.zeros((8, 3), dtype=np.int64))
    with pytest.raises(
        ValueError, match=r"^payload is 29 bytes, expected 30 for n_q=8, n_frames=3$"
    ):
        unpack_codes(data[:-1], 8, 3)
    with pytest.raises(
        ValueError, match=r"^payload is 31 bytes, expected 30 for n_q=8, n_frames=3$"
    ):
        unpack_codes(data + b"\x00", 8, 3)


def test_unpack_rejects_nonzero_padding() -> None:
    data = bytearray(pack_codes(np.array([[1], [2]])))  # 20 bits + 4 padding bits
    data[-1] |= 0x01
    with pytest.raises(
        ValueError, match=r"^nonzero padding bits in the last 4 bits of the payload$"
    ):
        unpack_codes(bytes(data), 2, 1)
    good = pack_codes(np.array([[7], [9]]))
    with pytest.raises(ValueError, match=r"^payload 1: nonzero padding bits in the last 4 bits"):
        unpack_codes_batch([good, bytes(data)], 2, 1)
    with pytest.raises(ValueError, match=r"^payload 0: payload is 2 bytes, expected 3"):
        unpack_codes_batch([good[:2], good], 2, 1)


def test_unpack_rejects_negative_dims() -> None:
    with pytest.raises(ValueError, match="n_q and n_frames must be >= 0, got n_q=-1, n_frames=3"):
        unpack_codes(b"", -1, 3)


def test_no_torch_import() -> None:
    import subprocess
    import sys

    code = "import sys, models.bitpack; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
