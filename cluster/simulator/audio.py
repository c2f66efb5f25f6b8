"""Cheap, vectorised speech-like audio: talk spurts, syllables, a voiced harmonic source.

Not speech, but it has speech's gross structure, which is what a codec load test needs:
on/off talk spurts (two-state Markov chain, mean 1.2 s talking / 0.8 s pause), a 4-6 Hz
syllable envelope, a per-speaker pitch (85-255 Hz) with slow drift, harmonics shaped by two
formant-like bumps, and a little breath noise. All streams of a tick are generated in one
set of numpy operations; per-stream state (phases, pitch, talk state) lives in columns.
"""

from __future__ import annotations

import numpy as np

from deployments.contract import CHUNK_SAMPLES, SAMPLE_RATE

N_HARMONICS = 12
MEAN_TALK_S = 1.2
MEAN_PAUSE_S = 0.8


class SpeechSource:
    """`next(rows) -> float32 [len(rows), CHUNK_SAMPLES]` for stream slots `rows`."""

    def __init__(self, n_slots: int, seed: int = 0, chunk: int = CHUNK_SAMPLES) -> None:
        self.rng = np.random.default_rng(seed)
        self.chunk = chunk
        n = n_slots
        self.f0 = self.rng.uniform(85.0, 255.0, n)
        self.phase = self.rng.uniform(0, 2 * np.pi, n)
        self.syll_rate = self.rng.uniform(4.0, 6.0, n)
        self.syll_phase = self.rng.uniform(0, 2 * np.pi, n)
        self.talking = self.rng.random(n) < MEAN_TALK_S / (MEAN_TALK_S + MEAN_PAUSE_S)
        self.formant1 = self.rng.uniform(400.0, 900.0, n)
        self.formant2 = self.rng.uniform(1100.0, 2400.0, n)
        self.level = self.rng.uniform(0.1, 0.3, n)
        self._t = np.arange(chunk, dtype=np.float64) / SAMPLE_RATE
        self._k = np.arange(1, N_HARMONICS + 1, dtype=np.float64)

    def talking_now(self, rows: np.ndarray) -> np.ndarray:
        return self.talking[rows]

    def advance(self, rows: np.ndarray) -> None:
        """Move talk state one chunk forward (also for streams whose PCM is not generated)."""
        dt = self.chunk / SAMPLE_RATE
        u = self.rng.random(rows.size)
        on = self.talking[rows]
        flip = np.where(on, u < dt / MEAN_TALK_S, u < dt / MEAN_PAUSE_S)
        self.talking[rows] = on ^ flip

    def next(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return np.zeros((0, self.chunk), np.float32)
        t = self._t
        f0 = self.f0[rows] * (1.0 + 0.03 * self.rng.standard_normal(rows.size))  # intonation
        harm_f = f0[:, None] * self._k[None, :]  # [B, K]
        # Formant shaping: harmonics near F1/F2 are loud, the rest fall off.
        amp = (
            np.exp(-(((harm_f - self.formant1[rows, None]) / 250.0) ** 2))
            + 0.6 * np.exp(-(((harm_f - self.formant2[rows, None]) / 400.0) ** 2))
            + 0.05
        ) / self._k[None, :]
        amp[harm_f > SAMPLE_RATE / 2 * 0.9] = 0.0
        ph0 = self.phase[rows]
        # sum_k a_k sin(k (phi0 + 2 pi f0 t)) as one [B, K] x [K, T] product per tick.
        base = ph0[:, None] + 2 * np.pi * f0[:, None] * t[None, :]  # [B, T]
        voiced = np.einsum("bk,bkt->bt", amp, np.sin(self._k[None, :, None] * base[:, None, :]))
        syll = 0.5 + 0.5 * np.sin(self.syll_phase[rows, None] + 2 * np.pi * self.syll_rate[rows, None] * t)
        gain = np.where(self.talking[rows], self.level[rows], 0.0)[:, None]
        noise = 0.003 * self.rng.standard_normal((rows.size, self.chunk))
        out = gain * syll * voiced / max(1e-9, np.abs(voiced).max(initial=1.0)) + noise
        self.phase[rows] = np.mod(ph0 + 2 * np.pi * f0 * self.chunk / SAMPLE_RATE, 2 * np.pi)
        self.syll_phase[rows] = np.mod(
            self.syll_phase[rows] + 2 * np.pi * self.syll_rate[rows] * self.chunk / SAMPLE_RATE,
            2 * np.pi,
        )
        self.advance(rows)
        return np.clip(out, -1.0, 1.0).astype(np.float32)
