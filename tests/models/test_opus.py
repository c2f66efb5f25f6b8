"""The Opus fallback codec (real libopus through PyAV): quality, delay, bitrate, slot state."""

from __future__ import annotations

import numpy as np
import pytest

from models.opus import OpusCodec, opus_packet_duration_ms

RATES_AND_FRAMES = [(24_000, 20), (24_000, 40), (48_000, 20), (48_000, 40)]
# Impulse-measured delay (encoder lookahead, plus the 48 -> 24 kHz resampler lag at 24 kHz).
EXPECTED_DELAY = {24_000: 172, 48_000: 312}


def tone(sr: int, seconds: float = 1.0, hz: float = 1000.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def speech_like(sr: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """Voiced-speech stand-in: 120 Hz harmonics under two formants, 4 Hz syllable envelope."""
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(seed)
    sig = np.zeros_like(t)
    for k in range(1, 34):
        f = 120.0 * k
        gain = np.exp(-(((f - 700) / 400) ** 2)) + 0.5 * np.exp(-(((f - 1800) / 500) ** 2))
        sig += gain * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    sig *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def aligned_snr_db(ref: np.ndarray, out: np.ndarray, delay: int, skip: int) -> float:
    """SNR of `out` against `ref` delayed by `delay`, ignoring the first `skip` samples."""
    x = ref[: ref.size - delay][skip:]
    y = out[delay:][skip:]
    return float(10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2)))


def round_trip(codec: OpusCodec, pcm: np.ndarray, slots: list[int] | None = None) -> np.ndarray:
    slots = list(range(pcm.shape[0])) if slots is None else slots
    return codec.decode(slots, codec.encode(slots, pcm))


@pytest.mark.parametrize(("sr", "frame_ms"), RATES_AND_FRAMES)
def test_impulse_delay_matches_delay_samples(sr: int, frame_ms: int) -> None:
    codec = OpusCodec(2, sample_rate=sr, frame_ms=frame_ms)
    assert codec.delay_samples == EXPECTED_DELAY[sr]
    pcm = np.zeros((1, sr * 2 // 5), np.float32)  # 0.4 s: whole 20 and 40 ms frames
    pcm[0, 5000] = 0.9
    out = round_trip(codec, pcm)
    assert abs(int(np.argmax(np.abs(out[0]))) - 5000 - codec.delay_samples) <= 1


@pytest.mark.parametrize(("sr", "frame_ms"), RATES_AND_FRAMES)
def test_round_trip_quality_length_and_bitrate(sr: int, frame_ms: int) -> None:
    codec = OpusCodec(2, sample_rate=sr, frame_ms=frame_ms, bitrate=32_000)
    pcm = np.stack([tone(sr), speech_like(sr)])
    packets = codec.encode([0, 1], pcm)
    assert [len(p) for p in packets] == [1000 // frame_ms] * 2
    out = codec.decode([0, 1], packets)
    assert out.shape == pcm.shape and out.dtype == np.float32

    # libopus adapts over its first few hundred ms: judge the second half second.
    d, skip = codec.delay_samples, sr // 2
    tone_snr = aligned_snr_db(pcm[0], out[0], d, skip)
    speech_snr = aligned_snr_db(pcm[1], out[1], d, skip)
    # Measured: tone ~21 dB, speech-like ~16 dB (voip mode, 32 kbit/s, constrained VBR).
    assert tone_snr > 15.0
    assert speech_snr > 10.0
    # The delay is real: misaligning by 1/4 period of the tone destroys the match.
    assert aligned_snr_db(pcm[0], out[0], d + sr // 4000, skip) < 3.0

    for stream in packets:
        kbps = sum(len(p) for p in stream) * 8 / 1000  # one second of audio
        assert 26.0 < kbps < 36.0, kbps


def test_lower_bitrate_spends_fewer_bytes() -> None:
    pcm = speech_like(24_000)[None]
    sizes = {}
    for bitrate in (12_000, 32_000):
        packets = OpusCodec(1, sample_rate=24_000, bitrate=bitrate).encode([0], pcm)[0]
        sizes[bitrate] = sum(len(p) for p in packets) * 8
    # constrained VBR may undershoot on quiet stretches, never overshoot much (measured ~9.1k)
    assert 0.6 * 12_000 < sizes[12_000] < 1.1 * 12_000
    assert sizes[12_000] < 0.5 * sizes[32_000]


def test_batch_equals_separate_calls_and_slots_are_independent() -> None:
    sr = 24_000
    a, b = speech_like(sr, 0.4, seed=1), speech_like(sr, 0.4, seed=2)
    batch = OpusCodec(4, sample_rate=sr)
    got = batch.encode([3, 0], np.stack([a, b]))
    assert got[0] == OpusCodec(1, sample_rate=sr).encode([0], a[None])[0]
    assert got[1] == OpusCodec(1, sample_rate=sr).encode([0], b[None])[0]

    pcm = batch.decode([3, 0], got)
    np.testing.assert_array_equal(pcm[0], OpusCodec(1, sample_rate=sr).decode([0], [got[0]])[0])


def test_reset_starts_fresh_and_leaves_other_slots_alone() -> None:
    sr, n = 24_000, 480
    first, second = speech_like(sr, 0.2, seed=3), speech_like(sr, 0.2, seed=4)
    other = speech_like(sr, 0.4, seed=5)
    codec = OpusCodec(2, sample_rate=sr)
    reference_other = OpusCodec(1, sample_rate=sr)

    half = other.size // 2
    p0 = codec.encode([0, 1], np.stack([first, other[:half]]))
    ref_p0 = reference_other.encode([0], other[None, :half])
    assert p0[1] == ref_p0[0]
    codec.decode([0, 1], p0)
    reference_other.decode([0], ref_p0)

    codec.reset([0])
    assert codec.active_slots() == [1]
    p1 = codec.encode([0, 1], np.stack([second, other[half:]]))
    # slot 0 now equals a brand-new stream; slot 1 continued as if nothing happened
    assert p1[0] == OpusCodec(1, sample_rate=sr).encode([0], second[None])[0]
    ref_p1 = reference_other.encode([0], other[None, half:])
    assert p1[1] == ref_p1[0]
    out = codec.decode([0, 1], p1)
    np.testing.assert_array_equal(out[0], OpusCodec(1, sample_rate=sr).decode([0], [p1[0]])[0])
    np.testing.assert_array_equal(out[1], reference_other.decode([0], ref_p1)[0])
    assert out.shape == (2, second.size) and second.size % n == 0


def test_int16_input_matches_float() -> None:
    pcm16 = (speech_like(24_000, 0.2) * 32767).astype(np.int16)
    got = OpusCodec(1, sample_rate=24_000).encode([0], pcm16[None])
    want = OpusCodec(1, sample_rate=24_000).encode([0], (pcm16.astype(np.float32) / 32768)[None])
    assert got == want


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c: c.encode([0], np.zeros((1, 500), np.float32)),
            "pcm length 500 is not a multiple of the frame size 480 \\(20 ms at 24000 Hz\\)",
        ),
        (
            lambda c: c.encode([0], np.zeros((2, 480), np.float32)),
            r"pcm must have shape \(1, T\), got \(2, 480\)",
        ),
        (
            lambda c: c.encode([0], np.zeros((1, 480), np.float64)),
            "pcm dtype must be float32 or int16, got float64",
        ),
        (
            lambda c: c.encode([0], np.full((1, 480), np.nan, np.float32)),
            "pcm contains NaN or infinite samples",
        ),
        (lambda c: c.encode([2], np.zeros((1, 480), np.float32)), r"slot 2 out of range \[0, 2\)"),
        (lambda c: c.encode([1, 1], np.zeros((2, 480), np.float32)), "duplicate slot in one call"),
        (
            lambda c: c.encode([0.5], np.zeros((1, 480), np.float32)),
            "slots must be integers, got dtype float64",
        ),
        (lambda c: c.decode([0, 1], [[b"\x08\x00"]]), "got packets for 1 streams, expected 2"),
        (
            lambda c: c.decode([0], [[b""]]),
            r"stream 0 packet 0: malformed Opus packet: empty packet \(R1",
        ),
        (lambda c: c.decode([0], [["x"]]), "stream 0 packet 0: expected bytes, got str"),
        (
            lambda c: c.decode([0], [[b"\x00\x00"]]),
            "stream 0 packet 0: packet holds 10 ms of audio, codec frame is 20 ms",
        ),
        (
            lambda c: c.decode([0, 1], [[], [b"\x08"]]),
            r"streams have different packet counts \[0, 1\]",
        ),
    ],
)
def test_bad_input_raises_and_leaves_state_untouched(call, message: str) -> None:
    sr = 24_000
    pcm = speech_like(sr, 0.2, seed=6)[None]
    codec, reference = OpusCodec(2, sample_rate=sr), OpusCodec(2, sample_rate=sr)
    warmup = codec.encode([0], pcm[:, :960])
    assert warmup == reference.encode([0], pcm[:, :960])
    active = codec.active_slots()
    with pytest.raises(ValueError, match=message):
        call(codec)
    assert codec.active_slots() == active
    assert codec.encode([0], pcm[:, 960:]) == reference.encode([0], pcm[:, 960:])


def test_packets_of_another_frame_size_are_rejected() -> None:
    packets = OpusCodec(1, sample_rate=24_000, frame_ms=20).encode([0], tone(24_000, 0.04)[None])
    with pytest.raises(ValueError, match="packet holds 20 ms of audio, codec frame is 40 ms"):
        OpusCodec(1, sample_rate=24_000, frame_ms=40).decode([0], packets)


@pytest.mark.parametrize(
    ("packet", "ms"),
    [
        (bytes([0x08]) + b"\x01" * 10, 20.0),  # config 1 (SILK NB 20 ms), code 0
        (bytes([0xF8]) + b"\x01" * 10, 20.0),  # config 31 (CELT FB 20 ms), code 0
        (bytes([0xE0]), 2.5),  # config 28 (CELT FB 2.5 ms), code 0
        (bytes([0x19]) + b"\x01" * 4, 120.0),  # config 3 (SILK 60 ms), code 1: 2 frames
        (bytes([0x0A, 0x02]) + b"\x01" * 5, 40.0),  # code 2: first frame 2 bytes, second 3
        (bytes([0x0B, 0x03]) + b"\x01" * 6, 60.0),  # code 3 CBR: 3 x 20 ms, 2 bytes each
        (bytes([0x0B, 0x82, 0x01]) + b"\x01" * 3, 40.0),  # code 3 VBR: 2 frames, 1 + 2 bytes
        (bytes([0x0B, 0x41, 0x02]) + b"\x01" * 3, 20.0),  # code 3 with 2 padding bytes
    ],
)
def test_packet_duration(packet: bytes, ms: float) -> None:
    assert opus_packet_duration_ms(packet) == ms


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"", r"empty packet \(R1"),
        (bytes([0x09]) + b"\x01" * 3, r"odd payload length \(R3\)"),
        (bytes([0x0A, 0x09, 0x01]), r"first frame longer than the packet \(R4\)"),
        (bytes([0x0A]), "truncated frame length"),
        (bytes([0x0B]), r"without a frame count byte \(R6\)"),
        (bytes([0x0B, 0x00]), r"zero frames \(R5\)"),
        (bytes([0x0B, 0x07]), r"code 3 packet of 140 ms exceeds 120 ms \(R5\)"),
        (bytes([0x0B, 0x02, 0x01, 0x01, 0x01]), r"CBR payload not a multiple of the frame count"),
        (bytes([0x0B, 0x41, 0x09, 0x01]), r"padding longer than the packet"),
        (bytes([0x0B, 0x82, 0x05, 0x01]), r"VBR frame lengths do not fit the packet \(R7\)"),
    ],
)
def test_packet_framing_errors(packet: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        opus_packet_duration_ms(packet)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity must be >= 1, got 0"),
        ({"capacity": 1, "sample_rate": 16_000}, r"sample_rate 16000 not in \(24000, 48000\)"),
        ({"capacity": 1, "frame_ms": 30}, r"frame_ms 30 not in \(10, 20, 40, 60\)"),
        ({"capacity": 1, "bitrate": 1000}, "bitrate 1000 outside Opus range"),
        ({"capacity": 1, "application": "music"}, "'music' is not a valid OpusApplication"),
    ],
)
def test_constructor_rejects_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpusCodec(**kwargs)


def test_dtx_turns_silence_into_toc_only_frames_and_speech_stays():
    from models.opus import OpusCodec, is_dtx_frame

    codec = OpusCodec(1, sample_rate=48_000, frame_ms=20, bitrate=32_000, dtx=True)
    t = np.arange(960 * 25) / 48_000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    loud = codec.encode([0], tone[None])[0]
    quiet = codec.encode([0], np.zeros((1, 960 * 50), np.float32))[0]
    assert not any(is_dtx_frame(p) for p in loud)
    dtx = [is_dtx_frame(p) for p in quiet]
    assert sum(dtx) >= 30  # most of 1 s of silence is TOC-only frames
    assert not all(dtx)  # ...and libopus still refreshes comfort noise now and then
    plain = OpusCodec(1, sample_rate=48_000, frame_ms=20, bitrate=32_000)
    assert not any(is_dtx_frame(p) for p in plain.encode([0], np.zeros((1, 960 * 50), np.float32))[0])
