"""Data-initialised RVQ codebooks for a random-weight EnCodec model.

A random-init `encodec` model has all-zero codebooks: EnCodec fills them by k-means on its
first training batch. Left at zero every code is 0, so packing, bitrates and decode never see
real values. `init_codebooks_` does what EnCodec's own initialisation does, on the model's own
latents of a built-in speech-like signal: codebook ``i`` is k-means (1024 centres) over the
residual left after codebooks ``< i``. Two things differ, both because a few seconds of audio
give only about as many latent frames as a codebook has entries:

* The residual passed to the next codebook is the *held-out* residual (a frame minus its
  centre computed without it; a frame alone in its cluster minus the next-nearest centre).
  With plain residuals every frame would be its own centre after one or two codebooks, the
  residual would be exactly zero and every deeper codebook degenerate.
* The encoder's output layer is first given a data-dependent init (Salimans & Kingma's for
  weight-normed layers: per channel, gain and bias set so that its output has zero mean and unit
  variance on the signal). A random encoder's latent is a large constant plus input-driven
  changes about 1% of its size, and the random decoder, initialised for inputs of unit scale,
  would barely hear them: decoding any codes would give nearly the same waveform.

Everything is deterministic: a fixed signal, fixed generator seeds, and the computation runs on
one thread (so the result does not depend on the caller's torch thread count). It takes a few
seconds on a CPU and writes nothing to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 24_000
CODEBOOK_SIZE = 1024
FRAMES_PER_SECOND = 75  # 24 kHz / 320-sample hop
SIGNAL_SEED = 2026
KMEANS_SEED = 7
VOICES = 7
SECONDS_PER_VOICE = 2.0  # 7 x 2 s = 1050 latent frames, just over one per codebook entry
KMEANS_ITERS = 4


@dataclass(frozen=True)
class CodebookInit:
    """How the codebooks were initialised (for reports)."""

    frames: int
    seconds: float
    iters: int
    signal_seed: int
    kmeans_seed: int

    def describe(self) -> str:
        return (f"codebooks k-means initialised on {self.seconds:g} s of built-in speech-like "
                f"signal ({self.frames} latent frames, signal seed {self.signal_seed}, "
                f"k-means seed {self.kmeans_seed}, {self.iters} iterations), encoder output "
                f"layer normalised on the same signal")


def speech_like(voices: int = VOICES, seconds: float = SECONDS_PER_VOICE,
                seed: int = SIGNAL_SEED) -> np.ndarray:
    """float32 [voices, seconds * 24 kHz] in [-1, 1]: voiced harmonics with gliding pitch,
    two formant-like bumps, a 4-6 Hz syllable envelope, talk/pause gating and breath noise."""
    rng = np.random.default_rng(seed)
    n = int(round(SAMPLE_RATE * seconds))
    t = np.arange(n) / SAMPLE_RATE
    out = np.empty((voices, n), np.float32)
    for v in range(voices):
        glide = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t + rng.uniform(0, 2 * np.pi))
        f0 = rng.uniform(85.0, 255.0) * glide
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        f1, f2 = rng.uniform(400.0, 900.0), rng.uniform(1100.0, 2400.0)
        voiced = np.zeros(n)
        for k in range(1, 25):
            fk = k * f0
            gain = (np.exp(-(((fk - f1) / 250.0) ** 2))
                    + 0.6 * np.exp(-(((fk - f2) / 400.0) ** 2)) + 0.05) / k
            voiced += np.where(fk < 0.45 * SAMPLE_RATE, gain, 0.0) * np.sin(k * phase)
        syllables = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4.0, 6.0) * t
                                       + rng.uniform(0, 2 * np.pi))
        talking = np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * t + rng.uniform(0, 2 * np.pi)) > -0.3
        level = rng.uniform(0.1, 0.3)
        x = level * syllables * talking * voiced / np.abs(voiced).max()
        out[v] = np.clip(x + 0.003 * rng.standard_normal(n), -1.0, 1.0)
    return out


def _sq_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)[None]


def kmeans(points: torch.Tensor, k: int, iters: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means as `encodec.quantization.core_vq.kmeans` (centres start at distinct
    points drawn at random; an empty cluster keeps its centre).

    Returns (centres [k, D], cluster sizes [k], held-out residual [N, D]).
    """
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means over {n} points cannot place {k} distinct centres")
    centres = points[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = _sq_distances(points, centres).argmin(1)
        sizes = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        centres = torch.where((sizes == 0)[:, None], centres,
                              sums / sizes.clamp(min=1)[:, None].to(points.dtype))
    nearest = _sq_distances(points, centres).topk(2, dim=1, largest=False).indices
    assign = nearest[:, 0]
    sizes = torch.bincount(assign, minlength=k)
    n_c = sizes[assign].to(points.dtype)[:, None]
    # x - (mean without x) = (x - mean) * n / (n - 1); alone in its cluster: the next centre.
    held_out = torch.where(n_c > 1, (points - centres[assign]) * n_c / (n_c - 1).clamp(min=1),
                           points - centres[nearest[:, 1]])
    return centres, sizes, held_out


def _separate_duplicates(centres: torch.Tensor, spread: torch.Tensor,
                         generator: torch.Generator) -> torch.Tensor:
    """Two equal entries would be an exact tie for every frame near them: move the repeats."""
    _, inverse = torch.unique(centres, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), centres.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(centres.shape[0]), reduce="amin")
    repeat = torch.arange(centres.shape[0]) != first[inverse]
    if bool(repeat.any()):
        noise = torch.randn(int(repeat.sum()), centres.shape[1], generator=generator)
        centres = centres.clone()
        centres[repeat] += 0.1 * spread * noise.to(centres.dtype)
    return centres


def _normalise_output_layer_(model: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """Scale and shift the encoder's last conv so that `latent` [B, D, F] would come out with
    zero mean and unit variance per channel; returns that normalised latent."""
    last = model.encoder.model[-1]
    conv = getattr(getattr(last, "conv", None), "conv", None)
    if not isinstance(conv, nn.Conv1d) or conv.bias is None:
        raise ValueError("expected EnCodec's encoder to end in a biased SConv1d")
    mean = latent.mean(dim=(0, 2))
    std = latent.std(dim=(0, 2)).clamp(min=1e-12)
    if hasattr(conv, "weight_g"):  # torch.nn.utils.weight_norm, as encodec builds it
        gain = conv.weight_g
    elif hasattr(conv, "parametrizations"):  # torch.nn.utils.parametrizations.weight_norm
        gain = conv.parametrizations.weight.original0
    else:
        gain = conv.weight
    gain.div_(std.reshape(-1, *([1] * (gain.dim() - 1))))
    conv.bias.sub_(mean).div_(std)
    return (latent - mean[:, None]) / std[:, None]


def init_codebooks_(model: nn.Module, *, voices: int = VOICES,
                    seconds_per_voice: float = SECONDS_PER_VOICE, signal_seed: int = SIGNAL_SEED,
                    kmeans_seed: int = KMEANS_SEED, iters: int = KMEANS_ITERS) -> CodebookInit:
    """Normalise `model`'s latent and k-means-initialise its RVQ codebooks, in place (see the
    module docstring). The model should be on the CPU; returns what was done."""
    layers = model.quantizer.vq.layers
    pcm = torch.from_numpy(speech_like(voices, seconds_per_voice, signal_seed))[:, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            latent = model.encoder(pcm)  # [voices, D, F]
            if latent.shape[0] * latent.shape[2] < CODEBOOK_SIZE:
                raise ValueError(f"{latent.shape[0] * latent.shape[2]} latent frames are fewer "
                                 f"than the {CODEBOOK_SIZE} entries of a codebook: use more signal")
            latent = _normalise_output_layer_(model, latent)
            points = latent.transpose(1, 2).reshape(-1, latent.shape[1])
            residual = points
            generator = torch.Generator().manual_seed(kmeans_seed)
            for layer in layers:
                book = layer._codebook
                centres, sizes, held_out = kmeans(residual, book.embed.shape[0], iters, generator)
                centres = _separate_duplicates(centres, residual.std(0), generator)
                book.embed.copy_(centres)
                book.embed_avg.copy_(centres)
                book.cluster_size.copy_(sizes.to(book.cluster_size.dtype))
                book.inited.fill_(1.0)  # as after EnCodec's own k-means: never re-initialised
                residual = held_out
    finally:
        torch.set_num_threads(threads)
    return CodebookInit(points.shape[0], voices * seconds_per_voice, iters, signal_seed,
                        kmeans_seed)
