"""The native fallback codec: Opus (RFC 6716) via PyAV's libopus, in the slot/step shape of
the streaming EnCodec codec.

`OpusCodec(capacity)` holds up to `capacity` independent streams in fixed slots. Each slot
owns its own libopus encoder and decoder (created lazily on first use, dropped by `reset`),
so a batch of B streams equals B separate calls and streams never share codec state.

- `encode(slots, pcm[B, T]) -> list[list[bytes]]`: one Opus packet per `frame_ms` per stream.
- `decode(slots, packets) -> float32 [B, T]`: exactly `frame_samples` per packet.
- `reset(slots)`: the next call on those slots starts a fresh encoder/decoder.

Delay. The decoded signal equals the input delayed by `delay_samples`: the encoder's
lookahead (the OpusHead pre-skip, 6.5 ms for `voip`/`audio`, 2.5 ms for `lowdelay`) plus,
at 24 kHz, the 48 -> 24 kHz resampler's lag (libopus decodes at 48 kHz here; see below).
Measured with an impulse: 24 kHz -> 172 samples (156 + 16), 48 kHz -> 312 samples, for
20 and 40 ms frames alike. The decoder keeps the stream length exact (T in, T out) by
emitting that start-up lag as leading zeros instead of trimming the pre-skip.

Rate control defaults to constrained VBR: unconstrained libopus VBR spends about 1.5x the
target on tonal input at 20 ms frames, which a bandwidth-planned fallback cannot afford.

Input is validated in full before any state changes; bad input raises ValueError naming the
problem. A packet that passes the RFC 6716 framing checks but still fails to decode raises
ValueError too; streams earlier in that batch have then advanced.
"""

from __future__ import annotations

import enum
import fractions
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from models.constants import MAX_CHUNK_PACKETS

SAMPLE_RATES = (24_000, 48_000)
FRAME_MS = (10, 20, 40, 60)
DECODER_RATE = 48_000  # ffmpeg's libopus decoder always outputs 48 kHz
MAX_FRAME_BYTES = 1275  # RFC 6716 3.2.1 (R2)
MAX_PACKET_MS = 120.0  # RFC 6716 3.2.5 (R5)


class OpusApplication(str, enum.Enum):
    """libopus `application`: voip tunes for speech, lowdelay is CELT-only (2.5 ms lookahead)."""

    VOIP = "voip"
    AUDIO = "audio"
    LOWDELAY = "lowdelay"


class OpusVbr(str, enum.Enum):
    OFF = "off"  # CBR
    ON = "on"
    CONSTRAINED = "constrained"


# Frame duration (ms) per TOC configuration number, RFC 6716 3.1 table 2.
_SILK_MS = (10.0, 20.0, 40.0, 60.0)
_HYBRID_MS = (10.0, 20.0)
_CELT_MS = (2.5, 5.0, 10.0, 20.0)


def _toc_frame_ms(toc: int) -> float:
    config = toc >> 3
    if config < 12:
        return _SILK_MS[config % 4]
    if config < 16:
        return _HYBRID_MS[config % 2]
    return _CELT_MS[config % 4]


def _frame_length(data: bytes, pos: int) -> tuple[int, int]:
    """One RFC 6716 3.2.1 frame length field at `pos` -> (length, bytes used)."""
    if pos >= len(data):
        raise ValueError("truncated frame length")
    first = data[pos]
    if first < 252:
        return first, 1
    if pos + 1 >= len(data):
        raise ValueError("truncated two-byte frame length")
    return first + 4 * data[pos + 1], 2


DTX_FRAME_MAX_BYTES = 2  # libopus under DTX: a TOC-only frame (libwebrtc's test, too)


def is_dtx_frame(packet: bytes) -> bool:
    """A frame libopus emitted for silence under DTX. A sender transmits the first of a run
    and no more (libopus itself emits a comfort-noise update every 400 ms, RFC 7587 3.1.3)."""
    return len(packet) <= DTX_FRAME_MAX_BYTES


class LibopusDtxEncoder:
    """One libopus encoder with DTX on, through ctypes on the libopus that PyAV ships (or the
    system's): PyAV's encoder does not expose OPUS_SET_DTX."""

    _APPLICATION = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
    _SET_BITRATE, _SET_VBR, _SET_VBR_CONSTRAINT, _SET_DTX = 4002, 4006, 4020, 4016
    _lib: Any = None

    @classmethod
    def _load(cls) -> Any:
        if cls._lib is None:
            import ctypes
            import ctypes.util
            import glob
            import os

            libs = os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libopus*.so*")
            path = next(iter(sorted(glob.glob(libs))), None) or ctypes.util.find_library("opus")
            if path is None:
                raise RuntimeError("libopus not found (PyAV's av.libs or the system's)")
            lib = ctypes.CDLL(path)
            lib.opus_encoder_create.restype = ctypes.c_void_p
            lib.opus_encoder_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                ctypes.POINTER(ctypes.c_int)]
            lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                              ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
            cls._lib = lib
        return cls._lib

    def __init__(self, sample_rate: int, bitrate: int, application: OpusApplication,
                 vbr: OpusVbr) -> None:
        import ctypes

        self._ctypes = ctypes
        lib = self._load()
        err = ctypes.c_int()
        self._enc = lib.opus_encoder_create(sample_rate, 1, self._APPLICATION[application.value],
                                            ctypes.byref(err))
        if err.value != 0 or not self._enc:
            raise RuntimeError(f"opus_encoder_create failed ({err.value})")
        lib.opus_encoder_ctl(self._enc, self._SET_BITRATE, bitrate)
        lib.opus_encoder_ctl(self._enc, self._SET_VBR, int(vbr is not OpusVbr.OFF))
        lib.opus_encoder_ctl(self._enc, self._SET_VBR_CONSTRAINT, int(vbr is OpusVbr.CONSTRAINED))
        lib.opus_encoder_ctl(self._enc, self._SET_DTX, 1)
        self._buf = ctypes.create_string_buffer(MAX_FRAME_BYTES)

    def encode(self, pcm: np.ndarray) -> bytes:
        x = np.ascontiguousarray(pcm, np.float32)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        ptr = x.ctypes.data_as(self._ctypes.POINTER(self._ctypes.c_float))
        n = self._lib.opus_encode_float(self._enc, ptr, x.size, self._buf, MAX_FRAME_BYTES)
        if n < 0:
            raise RuntimeError(f"opus_encode_float failed ({n})")
        return self._buf.raw[:n]

    def __del__(self) -> None:
        if getattr(self, "_enc", None):
            self._lib.opus_encoder_destroy(self._enc)
            self._enc = None


def opus_packet_duration_ms(packet: bytes) -> float:
    """Audio duration of one Opus packet, after checking its framing (RFC 6716 3.2, R1-R7).

    Raises ValueError naming the violated rule.
    """
    n = len(packet)
    if n < 1:
        raise ValueError("empty packet (R1: at least one byte)")
    toc = packet[0]
    frame_ms = _toc_frame_ms(toc)
    code = toc & 0x3
    if code == 0:
        if n - 1 > MAX_FRAME_BYTES:
            raise ValueError(f"frame of {n - 1} bytes exceeds {MAX_FRAME_BYTES} (R2)")
        return frame_ms
    if code == 1:
        if (n - 1) % 2:
            raise ValueError("code 1 packet with an odd payload length (R3)")
        if (n - 1) // 2 > MAX_FRAME_BYTES:
            raise ValueError(f"frame exceeds {MAX_FRAME_BYTES} bytes (R2)")
        return 2 * frame_ms
    if code == 2:
        first, used = _frame_length(packet, 1)
        if first > n - 1 - used:
            raise ValueError("code 2 first frame longer than the packet (R4)")
        if n - 1 - used - first > MAX_FRAME_BYTES:
            raise ValueError(f"frame exceeds {MAX_FRAME_BYTES} bytes (R2)")
        return 2 * frame_ms
    # code 3: frame count byte, optional padding, CBR or VBR frames
    if n < 2:
        raise ValueError("code 3 packet without a frame count byte (R6)")
    count_byte = packet[1]
    m = count_byte & 0x3F
    if m == 0:
        raise ValueError("code 3 packet with zero frames (R5)")
    if m * frame_ms > MAX_PACKET_MS:
        raise ValueError(f"code 3 packet of {m * frame_ms:g} ms exceeds {MAX_PACKET_MS:g} ms (R5)")
    pos, padding = 2, 0
    if count_byte & 0x40:
        while True:
            if pos >= n:
                raise ValueError("truncated padding length (R6)")
            value = packet[pos]
            pos += 1
            padding += 254 if value == 255 else value
            if value != 255:
                break
    remaining = n - pos - padding
    if remaining < 0:
        raise ValueError("padding longer than the packet (R6/R7)")
    if count_byte & 0x80:  # VBR: M-1 length fields, the last frame takes the rest
        total = 0
        for _ in range(m - 1):
            length, used = _frame_length(packet, pos)
            pos += used
            remaining -= used
            total += length
            if length > MAX_FRAME_BYTES:
                raise ValueError(f"frame exceeds {MAX_FRAME_BYTES} bytes (R2)")
        if remaining < total or remaining - total > MAX_FRAME_BYTES:
            raise ValueError("code 3 VBR frame lengths do not fit the packet (R7)")
    elif remaining % m or remaining // m > MAX_FRAME_BYTES:
        raise ValueError("code 3 CBR payload not a multiple of the frame count (R6)")
    return m * frame_ms


@dataclass
class _SlotState:
    encoder: av.CodecContext | None = None
    decoder: av.CodecContext | None = None
    resampler: av.AudioResampler | None = None
    encoded_samples: int = 0  # pts of the next input frame
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    decoder_started: bool = False


class OpusCodec:
    """Per-stream Opus encoders/decoders in `capacity` fixed slots (mono)."""

    def __init__(
        self,
        capacity: int,
        sample_rate: int = 48_000,
        frame_ms: int = 20,
        bitrate: int = 32_000,
        *,
        application: OpusApplication | str = OpusApplication.VOIP,
        vbr: OpusVbr | str = OpusVbr.CONSTRAINED,
        dtx: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate {sample_rate} not in {SAMPLE_RATES}")
        if frame_ms not in FRAME_MS:
            raise ValueError(f"frame_ms {frame_ms} not in {FRAME_MS}")
        if not 6_000 <= bitrate <= 510_000:
            raise ValueError(f"bitrate {bitrate} outside Opus range [6000, 510000] bit/s")
        self.capacity = capacity
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.bitrate = bitrate
        self.application = OpusApplication(application)
        self.vbr = OpusVbr(vbr)
        # libopus DTX (OPUS_SET_DTX): PyAV's encoder has no such option, so a DTX slot
        # encodes through libopus directly (`LibopusDtxEncoder`); decoding is unchanged.
        self.dtx = dtx
        self.frame_samples = sample_rate * frame_ms // 1000
        self._slots: list[_SlotState] = [_SlotState() for _ in range(capacity)]
        self._resampler_lag = self._measure_resampler_lag()
        self.delay_samples = self._lookahead_samples() + self._resampler_lag

    # ---- public API ------------------------------------------------------------------

    def encode(self, slots: Sequence[int] | np.ndarray, pcm: np.ndarray) -> list[list[bytes]]:
        """Encode PCM [B, T] (float32 in [-1, 1], or int16) of B streams; T % frame_samples == 0.

        Returns, per stream, T / frame_samples Opus packets in order.
        """
        idx = self._check_slots(slots)
        pcm = self._check_pcm(pcm, len(idx))
        out: list[list[bytes]] = []
        n = self.frame_samples
        for row, slot in enumerate(idx):
            state = self._slots[slot]
            if self.dtx:
                if state.encoder is None:
                    state.encoder = LibopusDtxEncoder(self.sample_rate, self.bitrate, self.application,
                                                      self.vbr)
                out.append([state.encoder.encode(pcm[row, s:s + n])
                            for s in range(0, pcm.shape[1], n)])
                continue
            if state.encoder is None:
                state.encoder = self._new_encoder()
            packets: list[bytes] = []
            for start in range(0, pcm.shape[1], n):
                frame = av.AudioFrame.from_ndarray(
                    pcm[row : row + 1, start : start + n], format="flt", layout="mono"
                )
                frame.sample_rate = self.sample_rate
                frame.pts = state.encoded_samples
                state.encoded_samples += n
                encoded = state.encoder.encode(frame)
                if len(encoded) != 1:
                    # libopus emits one packet per input frame; anything else breaks framing.
                    raise RuntimeError(f"libopus returned {len(encoded)} packets for one frame")
                packets.append(bytes(encoded[0]))
            out.append(packets)
        return out

    def decode(
        self, slots: Sequence[int] | np.ndarray, packets: Sequence[Sequence[bytes]]
    ) -> np.ndarray:
        """Decode B streams' packets (the same count K per stream) -> float32 [B, K * frame_samples].

        The output is the encoder input delayed by `delay_samples` (see module doc).
        """
        idx = self._check_slots(slots)
        if len(packets) != len(idx):
            raise ValueError(f"got packets for {len(packets)} streams, expected {len(idx)}")
        counts = {len(p) for p in packets}
        if len(counts) > 1:
            raise ValueError(f"streams have different packet counts {sorted(counts)}")
        k = counts.pop() if counts else 0
        for row, stream_packets in enumerate(packets):
            for j, packet in enumerate(stream_packets):
                self._check_packet(packet, row, j)
        n = self.frame_samples
        out = np.zeros((len(idx), k * n), dtype=np.float32)
        for row, slot in enumerate(idx):
            state = self._slots[slot]
            if state.decoder is None:
                state.decoder, state.resampler = self._new_decoder()
            chunks = [state.pending]
            for j, packet in enumerate(packets[row]):
                try:
                    frames = state.decoder.decode(av.Packet(packet))
                except av.FFmpegError as exc:
                    raise ValueError(
                        f"stream {row} packet {j}: libopus cannot decode: {exc}"
                    ) from exc
                for frame in frames:
                    chunks.extend(self._to_output_rate(state, frame))
            samples = np.concatenate(chunks)
            if not state.decoder_started and k:
                # The resampler holds back its filter lag on the first packet: emit it as
                # leading zeros so that T packets' worth in gives exactly T samples out.
                state.decoder_started = True
                samples = np.concatenate(
                    [np.zeros(max(0, k * n - samples.size), np.float32), samples]
                )
            if samples.size < k * n:
                raise RuntimeError(f"decoder produced {samples.size} samples, expected {k * n}")
            out[row] = samples[: k * n]
            state.pending = samples[k * n :].copy()
        return out

    def reset(self, slots: Sequence[int] | np.ndarray) -> None:
        """Forget the streams in `slots`; their next encode/decode starts fresh codec state."""
        for slot in self._check_slots(slots):
            self._slots[slot] = _SlotState()

    def active_slots(self) -> list[int]:
        """Slots that currently hold an encoder or a decoder."""
        return [
            i for i, s in enumerate(self._slots) if s.encoder is not None or s.decoder is not None
        ]

    # ---- validation --------------------------------------------------------------------

    def _check_slots(self, slots: Sequence[int] | np.ndarray) -> list[int]:
        arr = np.asarray(slots)
        if arr.ndim != 1:
            raise ValueError(f"slots must be a 1-d sequence of ints, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"slots must be integers, got dtype {arr.dtype}")
        idx = [int(s) for s in arr]
        for s in idx:
            if not 0 <= s < self.capacity:
                raise ValueError(f"slot {s} out of range [0, {self.capacity})")
        if len(set(idx)) != len(idx):
            raise ValueError("duplicate slot in one call")
        return idx

    def _check_pcm(self, pcm: np.ndarray, b: int) -> np.ndarray:
        if not isinstance(pcm, np.ndarray) or pcm.ndim != 2 or pcm.shape[0] != b:
            shape = getattr(pcm, "shape", None)
            raise ValueError(f"pcm must have shape ({b}, T), got {shape}")
        if pcm.dtype == np.int16:
            pcm = pcm.astype(np.float32) / 32768.0
        elif pcm.dtype != np.float32:
            raise ValueError(f"pcm dtype must be float32 or int16, got {pcm.dtype}")
        if pcm.shape[1] % self.frame_samples:
            raise ValueError(
                f"pcm length {pcm.shape[1]} is not a multiple of the frame size "
                f"{self.frame_samples} ({self.frame_ms} ms at {self.sample_rate} Hz)"
            )
        if not np.isfinite(pcm).all():
            raise ValueError("pcm contains NaN or infinite samples")
        return np.ascontiguousarray(pcm)

    def _check_packet(self, packet: bytes, row: int, j: int) -> None:
        if not isinstance(packet, bytes | bytearray | memoryview):
            raise ValueError(
                f"stream {row} packet {j}: expected bytes, got {type(packet).__name__}"
            )
        try:
            duration = opus_packet_duration_ms(bytes(packet))
        except ValueError as exc:
            raise ValueError(f"stream {row} packet {j}: malformed Opus packet: {exc}") from exc
        if duration != self.frame_ms:
            raise ValueError(
                f"stream {row} packet {j}: packet holds {duration:g} ms of audio, "
                f"codec frame is {self.frame_ms} ms"
            )

    # ---- codec contexts ----------------------------------------------------------------

    def _new_encoder(self) -> av.CodecContext:
        enc = av.CodecContext.create("libopus", "w")
        enc.sample_rate = self.sample_rate
        enc.layout = "mono"
        enc.format = "flt"
        enc.bit_rate = self.bitrate
        enc.time_base = fractions.Fraction(1, self.sample_rate)
        options = {
            "frame_duration": str(self.frame_ms),
            "application": self.application.value,
            "vbr": self.vbr.value,
        }
        enc.options = options
        enc.open()
        return enc

    def _new_decoder(self) -> tuple[av.CodecContext, av.AudioResampler | None]:
        dec = av.CodecContext.create("libopus", "r")
        dec.sample_rate = DECODER_RATE
        dec.layout = "mono"
        dec.options = {"request_sample_fmt": "flt"}  # else libopus decodes to s16
        dec.open()
        resampler = None
        if self.sample_rate != DECODER_RATE:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
        return dec, resampler

    @staticmethod
    def _to_output_rate(state: _SlotState, frame: av.AudioFrame) -> list[np.ndarray]:
        frames = state.resampler.resample(frame) if state.resampler is not None else [frame]
        out = []
        for f in frames:
            if f.format.name != "flt" or f.layout.nb_channels != 1:
                raise RuntimeError(f"unexpected decoder output {f.format.name}/{f.layout.name}")
            out.append(f.to_ndarray().reshape(-1).astype(np.float32, copy=True))
        return out

    def _lookahead_samples(self) -> int:
        # OpusHead (RFC 7845 5.1) pre-skip, bytes 10-11 little endian, in 48 kHz samples.
        head = bytes(self._new_encoder().extradata or b"")
        if len(head) < 12 or head[:8] != b"OpusHead":
            raise RuntimeError("libopus encoder did not expose an OpusHead")
        pre_skip = int.from_bytes(head[10:12], "little")
        return pre_skip * self.sample_rate // DECODER_RATE

    def _measure_resampler_lag(self) -> int:
        """Samples the 48 kHz -> output-rate resampler holds back on its first frame."""
        if self.sample_rate == DECODER_RATE:
            return 0
        resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, DECODER_RATE * self.frame_ms // 1000), np.float32),
            format="flt",
            layout="mono",
        )
        frame.sample_rate = DECODER_RATE
        frame.pts = 0
        produced = sum(f.samples for f in resampler.resample(frame))
        return self.frame_samples - produced


# ----------------------------------------------------------------------------- chunk decoding
CHUNK_RATE = 24_000  # the codec's input rate: libopus decodes at 8/12/16/24/48 kHz natively
MAX_PACKET_SAMPLES = CHUNK_RATE * 120 // 1000  # an Opus packet holds at most 120 ms
PACKET_LOST = b""  # in a chunk's packet list: one packet lost from the sequence (concealed)


# samples at CHUNK_RATE of a code 0 packet (one frame) by TOC byte; codes 1 and 2 hold two
_CODE0_SAMPLES = tuple(int(_toc_frame_ms(toc) * CHUNK_RATE // 1000) for toc in range(256))


def packet_samples(packet: bytes, rate: int = CHUNK_RATE) -> int:
    """Samples one Opus packet decodes to at `rate`; 0 when its framing is invalid."""
    n = len(packet)
    if rate == CHUNK_RATE and 1 < n <= MAX_FRAME_BYTES + 1 and not packet[0] & 3:
        return _CODE0_SAMPLES[packet[0]]  # the usual WebRTC packet: one frame, R1/R2 hold
    try:
        return int(round(opus_packet_duration_ms(packet) * rate / 1000.0))
    except ValueError:
        return 0


def libopus_decoder_api() -> Any:
    """libopus (PyAV's or the system's, as `LibopusDtxEncoder`) with the decoder's
    functions typed: create, decode_float, destroy."""
    import ctypes

    lib = LibopusDtxEncoder._load()
    if getattr(lib, "_auralink_decoder_typed", False):
        return lib
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decode_float.restype = ctypes.c_int
    lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib._auralink_decoder_typed = True
    return lib


class OpusChunkDecoder:
    """One stream's Opus packets -> 24 kHz mono float32, in 40 ms chunks (`CHUNK_SAMPLES`).

    `add(packet)` decodes one packet (`None` or `PACKET_LOST`: conceals one packet's worth,
    libopus PLC); `take()` returns the next full chunk, if any. `chunk(packets)` is the
    replica's call for a bridge's frame of packets: it always returns exactly one chunk,
    concealing when the packets fall short (the stream's earlier frames were shed, or it came
    from another replica) and dropping backlog beyond one chunk of lead, so a stream's
    timeline never drifts. A payload libopus refuses is concealed and counted (`malformed`).
    """

    def __init__(self) -> None:
        import ctypes

        from models.constants import CHUNK_SAMPLES

        self._chunk = CHUNK_SAMPLES
        self._lib = libopus_decoder_api()
        err = ctypes.c_int()
        self._dec = self._lib.opus_decoder_create(CHUNK_RATE, 1, ctypes.byref(err))
        if err.value != 0 or not self._dec:
            raise RuntimeError(f"opus_decoder_create failed ({err.value})")
        # one chunk of lead, a full packet and concealment headroom
        self._buf = np.zeros(3 * CHUNK_SAMPLES + MAX_PACKET_SAMPLES * (MAX_CHUNK_PACKETS + 1), np.float32)
        self._ptr = self._buf.ctypes.data
        self.fill = 0
        self._last_samples = CHUNK_RATE // 50  # 20 ms until a packet says otherwise
        self.malformed = 0
        self.concealed = 0

    def add(self, packet: bytes | None) -> bool:
        """Decodes one packet onto the buffer; False when libopus refused it (nothing added)."""
        if self._dec is None:
            return False
        if not packet:
            return self._conceal(self._last_samples)
        room = (self._buf.size - self.fill)
        n = self._lib.opus_decode_float(self._dec, packet, len(packet), self._ptr + 4 * self.fill,
                                        min(MAX_PACKET_SAMPLES, room), 0)
        if n <= 0:
            return False
        self.fill += n
        self._last_samples = n
        return True

    def _conceal(self, samples: int) -> bool:
        samples = min(samples, self._buf.size - self.fill)
        n = self._lib.opus_decode_float(self._dec, None, 0, self._ptr + 4 * self.fill, samples, 0)
        if n <= 0:
            return False
        self.fill += n
        self.concealed += 1
        return True

    def take(self) -> np.ndarray | None:
        """The next full chunk (a copy), or None."""
        c = self._chunk
        if self.fill < c:
            return None
        out = self._buf[:c].copy()
        rest = self.fill - c
        if rest:
            self._buf[:rest] = self._buf[c:self.fill]
        self.fill = rest
        return out

    def chunk(self, packets: Sequence[bytes]) -> np.ndarray:
        """Exactly one chunk from a frame's packets (see the class doc)."""
        for p in packets:
            if not self.add(p):
                self.malformed += 1
                self._conceal(self._last_samples)
        while self.fill < self._chunk:
            # short: conceal in steps libopus accepts (multiples of 2.5 ms, at most 120 ms)
            if not self._conceal(min(MAX_PACKET_SAMPLES, -(-(self._chunk - self.fill) // 60) * 60)):
                self._buf[self.fill:self._chunk] = 0.0
                self.fill = self._chunk
        if self.fill > 2 * self._chunk:  # more than one chunk of lead: the oldest goes
            drop = self.fill - 2 * self._chunk
            self._buf[: self.fill - drop] = self._buf[drop:self.fill]
            self.fill -= drop
        out = self.take()
        assert out is not None
        return out

    def close(self) -> None:
        if self._dec:
            self._lib.opus_decoder_destroy(self._dec)
            self._dec = None

    def __del__(self) -> None:
        self.close()
