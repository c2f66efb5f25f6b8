"""The numbers of the media format, in one place: every layer imports them from here.

The codec side (EnCodec 24 kHz), the wire side (RTP clocks of Opus and the AIC payload, the
hint extension's bandwidth field), the bridge's tick and the replica's scheduler all read
these; a second copy anywhere else is a bug waiting for the first one to change.
"""

from __future__ import annotations

# -- EnCodec 24 kHz: codec input and output
SAMPLE_RATE = 24_000
FRAME_SAMPLES = 320  # one EnCodec frame (encoder hop, strides 2*4*5*8) = 13.33 ms
FRAME_RATE_HZ = SAMPLE_RATE // FRAME_SAMPLES  # 75
CODE_BITS = 10
CODEBOOK_SIZE = 1 << CODE_BITS  # 1024 entries per RVQ codebook
# Bandwidth ladder (kbps) and its codebook counts: kbps * 1000 / (75 Hz * 10 bits).
BANDWIDTHS_KBPS: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
N_Q_BY_BANDWIDTH: tuple[int, ...] = (2, 4, 8, 16, 32)
MAX_BANDWIDTH_KBPS = BANDWIDTHS_KBPS[-1]
# What AIC subscribers get unless configured otherwise ($AURALINK_BANDWIDTH_KBPS).
DEFAULT_BANDWIDTH_KBPS = 6.0

# -- the bridge's tick: one chunk per stream per tick
CHUNK_SAMPLES = 960  # 40 ms at 24 kHz = 3 EnCodec frames
CHUNK_FRAMES = CHUNK_SAMPLES // FRAME_SAMPLES
TICK_S = CHUNK_SAMPLES / SAMPLE_RATE  # 0.040

# -- RTP: Opus and the AIC payload share the 48 kHz clock (RFC 7587), so one SSRC can switch
# between them packet by packet without a timestamp jump.
RTP_CLOCK_HZ = 48_000
CHUNK_RTP_TICKS = CHUNK_SAMPLES * RTP_CLOCK_HZ // SAMPLE_RATE  # 1920
OPUS_FRAME_RTP_TICKS = 960  # 20 ms Opus packets, as WebRTC sends them
# A 40 ms chunk as Opus packets (a bridge without DTX sends them to the replica undecoded):
# at most 16 packets (2.5 ms frames), each at most 1500 bytes - a valid code 3 packet may be
# longer (RFC 6716 3.2.5), but no WebRTC sender makes one; the bridge drops it as malformed.
MAX_CHUNK_PACKETS = 16
MAX_OPUS_PACKET_BYTES = 1500

# -- deadlines and the replica scheduler's knobs (defaults of both the replica settings and
# the pure scheduler, so a scheduler built in a test behaves like a deployed one)
DEFAULT_DEADLINE_MS = 20.0  # bridge send -> codes back
DEFAULT_MAX_BATCH = 64
DEFAULT_MARGIN_MS = 2.0  # kept between the predicted end of a step and a deadline
DEFAULT_MAX_QUEUE = 4096  # frames waiting on a replica before new ones are shed
DEFAULT_MAX_HOLD_MS = 20.0  # the longest a batch is held for a frame the forecast expects
DEFAULT_FRAME_PERIOD_MS = 1000.0 * TICK_S  # a stream's chunk period, as replicas forecast it


def bandwidth_codebooks(bandwidth_kbps: float) -> int:
    """RVQ codebooks at a bandwidth of the ladder: 1.5 kbps = 2 books ... 24 kbps = 32."""
    try:
        return N_Q_BY_BANDWIDTH[BANDWIDTHS_KBPS.index(bandwidth_kbps)]
    except ValueError:
        raise ValueError(f"bandwidth {bandwidth_kbps} kbps not in {BANDWIDTHS_KBPS}") from None
