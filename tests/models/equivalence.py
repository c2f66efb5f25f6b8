"""What "these two codec runs are equal" means, on any CPU.

Two runs of the same encoder that differ only in kernels (batched vs single, streaming vs
offline, torch vs onnxruntime, AMD vs Intel) round the latent differently in float32. Where the
latent sits on a quantizer tie, the two runs may pick different codes, and no implementation
can avoid it. So two code tensors are *equivalent* when every code that differs is such a tie,
checked in float64 against the latent:

* In a frame whose codes differ, let ``q`` be the first differing codebook (the books before it
  agree, so both runs quantize the same residual ``r``). From ``q`` on, each run's codes must be
  near-optimal for its own residual: the chosen entry ``c`` and the best entry ``c*`` satisfy
  ``(|r - e_c|^2 - |r - e_c*|^2) / (2 |e_c - e_c*|) <= TIE_RTOL * (|latent| + |b|)``, i.e. the
  residual lies that close to the plane where ``c`` and ``c*`` tie. ``b`` is the bias of the
  encoder's last layer: the rounding error scales with what that layer computes,
  ``|latent - b|``, not with the latent (a random encoder's latent is a large constant that the
  bias cancels). Measured: batched vs single latents differ by at most 2e-6 of that scale,
  and codes that flipped between two runs were within 3e-7 of their tie plane.
* Codes after ``q`` in that frame differ legitimately (they quantize a different residual).
* Everything else must be exactly equal.

The latent may come from either run or a reference (they agree far below the tolerance).

Audio: the same codes through two decoder runs agree within AUDIO_RTOL of the peak
(`assert_audio_close`). Codes that differ at near-ties decode to audio that differs a little
more (the two tied entries are equally far from the latent, not equal): within TIE_AUDIO_RMS,
an RMS ratio (`assert_tie_audio_close`). Measured: near-tie flips 1e-3 at most; a stream
decoded from another stream's codes, or one frame late, 2e-2 to 6e-2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Largest distance from a tie plane, relative to |latent| + |b|, that float32 rounding may
# explain: 20x the worst flip measured, 2.5x the largest latent difference. (It excuses the
# runner-up of about 4% of codes: see test_tie_tolerance_excuses_only_ties.)
TIE_RTOL = 5e-6
# Same codes through two decoder runs: max |difference| relative to the peak.
AUDIO_RTOL = 1e-4
# Codes equal up to near-ties: RMS of the difference relative to the RMS of the audio.
TIE_AUDIO_RMS = 5e-3


@dataclass(frozen=True)
class QuantizerInput:
    """What a run quantized: latents [B, D, F], codebooks [books, 1024, D], and |b|."""

    latents: np.ndarray
    codebooks: np.ndarray
    bias_norm: float


@dataclass(frozen=True)
class Mismatch:
    stream: int
    frame: int
    book: int  # first codebook where the two runs differ
    codes: tuple[int, int]
    slack: float  # worst distance from a tie plane in this frame, relative to |latent| + |b|


@dataclass
class CodeComparison:
    entries: int
    differing_entries: int = 0
    near_ties: list[Mismatch] = field(default_factory=list)
    errors: list[Mismatch] = field(default_factory=list)

    def summary(self) -> str:
        worst = max((m.slack for m in self.near_ties), default=0.0)
        return (f"{self.differing_entries} of {self.entries} codes differ: "
                f"{len(self.near_ties)} frame(s) at near-ties (worst slack {worst:.2g}), "
                f"{len(self.errors)} real error(s) {self.errors[:3]}")

    def assert_equivalent(self) -> None:
        assert not self.errors, self.summary()


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # torch or numpy


def _frame_slack(latent: np.ndarray, books: np.ndarray, codes_a: np.ndarray,
                 codes_b: np.ndarray, q: int) -> float:
    """Worst tie-plane distance (absolute) of either run's codes from book q on."""
    residual = latent - sum((books[j, codes_a[j]] for j in range(q)), np.zeros_like(latent))
    worst = 0.0
    for codes in (codes_a, codes_b):
        r = residual.copy()
        for j in range(q, len(codes)):
            d = ((r[None, :] - books[j]) ** 2).sum(1)
            best, c = int(d.argmin()), int(codes[j])
            if c != best:
                gap = np.linalg.norm(books[j, c] - books[j, best])
                worst = max(worst, (d[c] - d[best]) / (2 * gap) if gap > 0 else np.inf)
            r = r - books[j, c]
    return worst


def compare_codes(codes_a, codes_b, quantizer: QuantizerInput,
                  rtol: float = TIE_RTOL) -> CodeComparison:
    """Classify where two code tensors [B, n_q, F] (any int type) differ."""
    a, b = _np(codes_a).astype(np.int64), _np(codes_b).astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"code shapes differ: {a.shape} vs {b.shape}")
    lat = quantizer.latents.astype(np.float64)
    books = quantizer.codebooks.astype(np.float64)
    if lat.shape[0] != a.shape[0] or lat.shape[2] != a.shape[2]:
        raise ValueError(f"latents {lat.shape} do not match codes {a.shape}")
    out = CodeComparison(entries=a.size, differing_entries=int((a != b).sum()))
    for s, f in zip(*np.nonzero((a != b).any(axis=1)), strict=True):
        q = int(np.argmax(a[s, :, f] != b[s, :, f]))
        latent = lat[s, :, f]
        slack = _frame_slack(latent, books, a[s, :, f], b[s, :, f], q)
        rel = slack / (float(np.linalg.norm(latent)) + quantizer.bias_norm)
        m = Mismatch(int(s), int(f), q, (int(a[s, q, f]), int(b[s, q, f])), rel)
        (out.near_ties if rel <= rtol else out.errors).append(m)
    return out


def assert_codes_equivalent(codes_a, codes_b, quantizer: QuantizerInput,
                            rtol: float = TIE_RTOL) -> CodeComparison:
    result = compare_codes(codes_a, codes_b, quantizer, rtol)
    result.assert_equivalent()
    return result


def quantizer_input(codec, pcm) -> QuantizerInput:
    """What a torch slot codec (`StreamingEncodec`) quantizes for `pcm` [B, T] from fresh
    state: its latents from one offline pass through its streaming layers, its codebooks."""
    import torch

    core = codec.encoder_core
    x = torch.as_tensor(_np(pcm), dtype=torch.float32).unsqueeze(1)
    state = torch.zeros(x.shape[0], core.state_size)
    with torch.inference_mode():
        for layer in core.layers:
            x = layer(x, state, [])
    bias = core.layers[-1].bias
    return QuantizerInput(x.numpy(), core.codebooks.detach().cpu().numpy(),
                          float(bias.norm()) if bias is not None else 0.0)


def audio_error(got, want) -> float:
    """max |got - want| relative to the peak of `want`."""
    g, w = _np(got).astype(np.float64), _np(want).astype(np.float64)
    assert g.shape == w.shape, (g.shape, w.shape)
    return float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12))


def assert_audio_close(got, want, rtol: float = AUDIO_RTOL) -> None:
    err = audio_error(got, want)
    assert err <= rtol, f"audio differs by {err:.3g} of its peak (allowed {rtol:g})"


def audio_rms_error(got, want) -> float:
    """RMS of `got - want` relative to the RMS of `want`."""
    g, w = _np(got).astype(np.float64), _np(want).astype(np.float64)
    assert g.shape == w.shape, (g.shape, w.shape)
    return float(np.sqrt(((g - w) ** 2).mean() / max((w ** 2).mean(), 1e-30)))


def assert_tie_audio_close(got, want, rms: float = TIE_AUDIO_RMS) -> None:
    err = audio_rms_error(got, want)
    assert err <= rms, f"audio differs by {err:.3g} RMS (allowed {rms:g})"
