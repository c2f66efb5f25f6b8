"""Voice activity per 40 ms chunk and the DTX decision (discontinuous transmission).

A stream talks in spurts. While it is silent, the bridge sends its AIC subscribers no codes
and the codec replicas spend no compute on it; it only sends a silence descriptor now and
then (docs/protocol.md, "DTX"), as Opus DTX sends a comfort-noise update every 400 ms.
When speech returns, the stream's next AI frame opens a new epoch, so encoder and decoder
start again from the same (reset) state.

`EnergyVad` is the detector: the loudest 10 ms sub-frame of a chunk against a noise floor
tracked per stream (minimum statistics: the floor follows any drop at once and rises slowly,
so a talker never becomes "noise", while a steady background does), plus an absolute floor
under which nothing is speech. It was chosen by measurement against WebRTC's GMM detector
(`webrtcvad`): `auralink bench adaptive` reports both on synthesised speech with pauses
under noise (docs/benchmarks.md). It has no dependency and runs on a whole tick's chunks in
one numpy pass.

`TalkSpurt` turns per-chunk decisions into the DTX state with a hangover: the stream keeps
sending for `hangover_chunks` after the last speech chunk (the unvoiced tail of a word and
short gaps inside a sentence stay on the wire), and starts again on the first speech chunk.

Pure logic, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

SUBFRAMES = 4  # 10 ms sub-frames of a 40 ms chunk
DETECTOR = "energy"


@dataclass
class VadConfig:
    margin_db: float = 9.0  # a chunk is speech when its loudest sub-frame is this far above the floor
    absolute_db: float = -55.0  # ...and above this level (dBFS): quieter is never speech
    floor_rise_db: float = 0.25  # per chunk: how fast the noise floor creeps up (6 dB/s)
    initial_floor_db: float = -70.0
    hangover_chunks: int = 8  # 320 ms of tail after the last speech chunk

    def wire(self) -> tuple[float, float, float, int]:
        """The detector's settings as a bridge sends them with its frames (FrameBatch.vad_config)."""
        return (self.margin_db, self.absolute_db, self.floor_rise_db, self.hangover_chunks)

    @classmethod
    def from_wire(cls, wire: tuple[float, float, float, int]) -> VadConfig:
        margin, absolute, rise, hangover = wire
        return cls(margin_db=float(margin), absolute_db=float(absolute), floor_rise_db=float(rise),
                   hangover_chunks=int(hangover))


def chunk_levels_db(pcm: np.ndarray) -> np.ndarray:
    """float [B, T] chunks -> the level (dBFS, mean square) of each chunk's loudest sub-frame."""
    pcm = np.asarray(pcm, np.float32)
    b, t = pcm.shape
    sub = pcm[:, : t - t % SUBFRAMES].reshape(b, SUBFRAMES, -1)
    power = np.einsum("bsn,bsn->bs", sub, sub) / sub.shape[2]
    return 10.0 * np.log10(power.max(axis=1) + 1e-12)


class EnergyVad:
    """Speech / not speech per chunk for many streams; each stream's floor lives in `floors`."""

    name = DETECTOR

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()

    def decide(self, levels_db: np.ndarray, floors_db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(levels [B], floors [B]) -> (speech bool [B], new floors [B])."""
        cfg = self.config
        speech = (levels_db > floors_db + cfg.margin_db) & (levels_db > cfg.absolute_db)
        floors = np.minimum(levels_db, floors_db + cfg.floor_rise_db)
        return speech, floors


class DtxState(str, enum.Enum):
    ACTIVE = "active"  # sending AI frames
    SILENT = "silent"  # in DTX: no AI frames, no replica compute


@dataclass
class TalkSpurt:
    """One stream's DTX state machine: hangover after speech, immediate restart on speech."""

    hangover_chunks: int = VadConfig.hangover_chunks
    floor_db: float = VadConfig.initial_floor_db
    remaining: int = 0  # chunks the current spurt still sends without speech
    state: DtxState = DtxState.ACTIVE
    silent_chunks: int = 0  # chunks spent in DTX (for metrics)
    spurts: int = 0

    def step(self, speech: bool) -> DtxState:
        if speech:
            if self.state is DtxState.SILENT:
                self.spurts += 1
            self.remaining = self.hangover_chunks
            self.state = DtxState.ACTIVE
        elif self.remaining > 0:
            self.remaining -= 1
        else:
            self.state = DtxState.SILENT
        if self.state is DtxState.SILENT:
            self.silent_chunks += 1
        return self.state


def talk_spurts(speech: np.ndarray, silent: np.ndarray, left: np.ndarray,
                hangover_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """`TalkSpurt.step` for many streams at once: (speech, in DTX, chunks of hangover left)
    per stream -> (in DTX now, hangover left now)."""
    now_silent = np.where(speech, False, np.where(left > 0, silent, True))
    return now_silent, np.where(speech, hangover_chunks, np.maximum(left - 1, 0))


def vad_step(pcm: np.ndarray, state: np.ndarray, config: VadConfig) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of each row through the detector and its talk spurt, with each row's state
    carried in `state` (float [B, 3]: noise floor dBFS - NaN: DTX off for the row, which
    keeps its state -, hangover chunks left, in DTX 0/1): what a replica decides for a
    bridge that sends the state with its frames (FrameBatch.vad). Returns (in DTX now bool
    [B], the new state [B, 3])."""
    state = np.asarray(state, np.float64)
    out = state.copy()
    silent = np.zeros(state.shape[0], bool)
    on = np.flatnonzero(~np.isnan(state[:, 0]))
    if on.size:
        speech, floors = EnergyVad(config).decide(chunk_levels_db(pcm[on]), state[on, 0])
        now, left = talk_spurts(speech, state[on, 2] > 0, state[on, 1].astype(np.int64),
                                config.hangover_chunks)
        out[on, 0], out[on, 1], out[on, 2] = floors, left, now
        silent[on] = now
    return silent, out
