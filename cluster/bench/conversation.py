"""A conversational test signal: one talker's side of a conversation, synthesised at run time.

Debian's `espeak-ng` (installed by scripts/setup.sh) speaks a fixed list of sentences; between
this talker's turns the other party talks (silence here), 1-4 s, and inside a turn espeak's
own sentence pauses remain. Nothing is downloaded; the same seed gives the same signal.
Returns 48 kHz mono float32 and, per 40 ms chunk, whether the clean signal has speech in it
(the reference a voice-activity detector is measured against).
"""

from __future__ import annotations

import random
import shutil
import subprocess

import av
import numpy as np

RATE = 48_000
CHUNK_48K = 1920  # 40 ms
SPEECH_DB = -50.0  # a clean chunk louder than this holds speech (espeak's pauses are digital zero)

SENTENCES = (
    "Hi, thanks for joining. Can you hear me all right?",
    "Great. So the plan for today is to go over the release.",
    "We moved the launch to Thursday, mostly because of the network tests.",
    "Right, the mobile numbers looked bad on the congested links.",
    "I think the adaptive bitrate fixes most of it. Let me share what we measured.",
    "Sure. The first graph is the loss before and after.",
    "Yes, exactly. And the silence costs almost nothing now.",
    "Okay. Any questions before we move on to the budget?",
    "No, that sounds good to me. Let's talk again on Monday.",
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _speak(text: str, voice: str, speed: int) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
        check=True, capture_output=True, timeout=60,
    ).stdout
    with av.open(__import__("io").BytesIO(wav), format="wav") as f:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        parts = [r.to_ndarray().reshape(-1) for frame in f.decode(audio=0) for r in resampler.resample(frame)]
        parts += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32)


def conversation(seconds: float = 60.0, seed: int = 7, voice: str = "en-us",
                 noise_dbfs: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pcm float32 [seconds*48000], speech bool [chunks]) of one talker in a conversation.

    `noise_dbfs`: add white noise at that level (None: the pauses are digital silence)."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (scripts/setup.sh installs it)")
    rng = random.Random(seed)
    total = int(seconds * RATE)
    parts: list[np.ndarray] = []
    n = 0
    i = 0
    while n < total:
        gap = np.zeros(int(rng.uniform(1.0, 4.0) * RATE), np.float32)  # the other party's turn
        turn = _speak(SENTENCES[i % len(SENTENCES)], voice, rng.choice((150, 165, 180)))
        i += 1
        for p in (gap, 0.5 * turn):
            parts.append(p)
            n += p.size
    pcm = np.concatenate(parts)[:total]
    chunks = pcm[: total - total % CHUNK_48K].reshape(-1, CHUNK_48K)
    level = 10.0 * np.log10((chunks.astype(np.float64) ** 2).mean(axis=1) + 1e-12)
    speech = level > SPEECH_DB
    if noise_dbfs is not None:
        noise = np.random.default_rng(seed).standard_normal(total).astype(np.float32)
        pcm = pcm + noise * np.float32(10.0 ** (noise_dbfs / 20.0))
    return np.clip(pcm, -1.0, 1.0).astype(np.float32), speech


def source(pcm: np.ndarray):
    """A `sfu_bridge.sdk.PcmSource` that plays `pcm` in a loop."""

    def src(start: int, n: int) -> np.ndarray:
        idx = (np.arange(start, start + n)) % pcm.size
        return pcm[idx]

    return src
