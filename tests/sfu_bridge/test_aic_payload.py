"""AIC RTP payload: byte-exact fixtures, round trips, and every rejection message."""

from __future__ import annotations

import numpy as np
import pytest

from sfu_bridge.aic_payload import (
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    AicPayload,
    pack_payloads,
    payload_size,
)

# epoch 0x1234, n_q 2 (1.5 kbps, BW 0), one frame, start of epoch; codes [[1], [2]]
# header 0b01_1_000_00 = 0x60, F=1, epoch 12 34; codes 0000000001 0000000010 + 4 pad bits
FIXTURE_START = bytes.fromhex("60011234" "004020")
# header 0b01_0_010_00 = 0x48: epoch 7, n_q 8 (6 kbps, BW 2), 3 frames, codes 0..23 in wire order: four 10-bit codes per
# 5 bytes, e.g. 0, 1, 2, 3 -> 00 00 10 08 03
FIXTURE_6K = bytes.fromhex(
    "48030007" "0000100803" "0100501807" "020090280b" "0300d0380f" "0401104813" "0501505817"
)


def test_fixture_start_round_trip():
    p = AicPayload.parse(FIXTURE_START)
    assert (p.epoch, p.n_q, p.start, p.n_frames, p.bandwidth_kbps) == (0x1234, 2, True, 1, 1.5)
    assert p.codes.tolist() == [[1], [2]]
    assert bytes(AicPayload(0x1234, 2, np.array([[1], [2]]), start=True)) == FIXTURE_START


def test_fixture_6kbps_round_trip():
    codes = np.arange(24).reshape(3, 8).T  # codes[q, f] = 8 f + q -> wire order 0, 1, 2, ...
    built = bytes(AicPayload(7, 8, codes))
    assert len(built) == payload_size(8, 3) == HEADER_BYTES + 30
    assert built == FIXTURE_6K
    parsed = AicPayload.parse(FIXTURE_6K)
    assert parsed.start is False and parsed.epoch == 7
    np.testing.assert_array_equal(parsed.codes, codes)


@pytest.mark.parametrize("n_q", [2, 4, 8, 16, 32])
def test_round_trip_every_bandwidth(n_q):
    rng = np.random.default_rng(n_q)
    codes = rng.integers(0, 1024, size=(n_q, 3))
    data = bytes(AicPayload(65535, n_q, codes))
    back = AicPayload.parse(data)
    np.testing.assert_array_equal(back.codes, codes)
    assert back.epoch == 65535 and bytes(back) == data


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x60\x01\x12", "AIC payload is truncated: 3 bytes, header needs 4"),
        (b"\x00\x01\x00\x00\x00\x40\x20", "AIC payload version 0 is not supported (expected 1)"),
        (b"\x64" + FIXTURE_START[1:], None),  # BW 1 (n_q 4) -> wrong length, see below
        (b"\x58\x01\x00\x00\x00\x40\x20", "AIC payload bandwidth index 6 is invalid (0..4)"),
        (b"\x61\x01\x00\x00\x00\x40\x20", "AIC payload reserved bits are set"),
        (b"\x60\x00\x00\x00", "AIC silence descriptor must be the 4-byte header with S = 0, BW = 0"),
        (b"\x44\x00\x00\x00", "AIC silence descriptor must be the 4-byte header with S = 0, BW = 0"),
        (b"\x40\x00\x00\x00\x00", "AIC silence descriptor must be the 4-byte header with S = 0, BW = 0"),
        (FIXTURE_START[:-1], "AIC payload is truncated: 6 bytes, expected 7 for n_q=2, frames=1"),
        (FIXTURE_START + b"\x00", "AIC payload is oversized: 8 bytes, expected 7 for n_q=2, frames=1"),
        (b"\x60\x01\x12\x34\x00\x40\x21", "nonzero padding bits in the last 4 bits of the payload"),
        (b"\x40" + b"\x00" * MAX_PAYLOAD_BYTES, f"AIC payload is oversized: {MAX_PAYLOAD_BYTES + 1} bytes > {MAX_PAYLOAD_BYTES}"),
    ],
)
def test_parse_rejections(data, message):
    if message is None:
        message = "AIC payload is truncated: 7 bytes, expected 9 for n_q=4, frames=1"
    with pytest.raises(ValueError) as err:
        AicPayload.parse(data)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "payload, message",
    [
        (AicPayload(0, 2, np.array([[1], [1024]])), "code value 1024 out of range [0, 1024)"),
        (AicPayload(0, 2, np.array([[-1], [0]])), "code value -1 out of range [0, 1024)"),
        (AicPayload(0, 3, np.zeros((3, 1), int)), "n_q 3 is not one of (2, 4, 8, 16, 32)"),
        (AicPayload(0, 8, np.zeros((4, 1), int)), "codes must have shape [n_q=8, F], got (4, 1)"),
        (AicPayload(65536, 2, np.zeros((2, 1), int)), "epoch 65536 out of range [0, 65536)"),
        (AicPayload(0, 2, np.zeros((2, 0), int)), "frame count 0 out of range [1, 255]"),
        (AicPayload(0, 32, np.zeros((32, 30), int)), "AIC payload would be oversized: 1204 bytes > 1200"),
        (AicPayload(0, 2, np.zeros((2, 1), float)), "codes must be integers, got dtype float64"),
    ],
)
def test_build_rejections(payload, message):
    with pytest.raises(ValueError) as err:
        bytes(payload)
    assert str(err.value) == message


def test_pack_payloads_equals_one_at_a_time():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 1024, size=(6, 8, 3))
    epochs = np.array([0, 1, 255, 256, 4660, 65535])
    starts = np.array([True, False, True, False, False, True])
    batch = pack_payloads(epochs, 8, codes, starts)
    assert batch == [bytes(AicPayload(int(e), 8, c, bool(s))) for e, c, s in zip(epochs, codes, starts, strict=True)]
    assert pack_payloads(np.zeros(0, int), 8, np.zeros((0, 8, 3), int), np.zeros(0, bool)) == []
    with pytest.raises(ValueError, match="epochs must be in"):
        pack_payloads(np.array([65536]), 8, codes[:1], starts[:1])
    with pytest.raises(ValueError, match=r"codes must have shape \[B, n_q=4, F\]"):
        pack_payloads(epochs, 4, codes, starts)


def test_silence_descriptor_round_trip():
    from sfu_bridge.aic_payload import silence_descriptor

    sid = silence_descriptor(0x1234)
    assert sid == b"\x40\x00\x12\x34"
    p = AicPayload.parse(sid)
    assert p.is_sid and p.epoch == 0x1234 and not p.start and p.n_frames == 0
    with pytest.raises(ValueError, match="epoch 65536 out of range"):
        silence_descriptor(65536)


def test_the_c_packer_writes_what_the_python_packer_writes():
    """int16 codes (what replicas return) are packed by the bridge's C part when it is
    built; every layer and packet length, and the fixture, give the same bytes."""
    from models.bitpack import pack_codes
    from sfu_bridge.aiortc_compat import NATIVE_SEND_MISSING

    if NATIVE_SEND_MISSING is not None:
        pytest.skip(NATIVE_SEND_MISSING)
    from sfu_bridge._rtpsend import pack10

    rng = np.random.default_rng(17)
    for n_q in (2, 4, 8, 16, 32):
        for frames in (1, 2, 3, 6, 9, 30):
            codes = rng.integers(0, 1024, size=(n_q, frames)).astype(np.int16)
            codes[0, 0], codes[-1, -1] = 1023, 0
            assert pack10(np.ascontiguousarray(codes.T)) == pack_codes(codes)
    fixture = np.arange(24, dtype=np.int16).reshape(3, 8).T  # codes 0..23 in wire order
    assert bytes(AicPayload(7, 8, fixture)) == FIXTURE_6K
    for bad in (-1, 1024):
        codes = np.zeros((2, 3), np.int16)
        codes[1, 2] = bad
        with pytest.raises(ValueError, match=f"code value {bad} out of range"):
            bytes(AicPayload(0, 2, codes))
    with pytest.raises(TypeError):
        pack10(np.zeros(4, np.int32))
