"""Loading EnCodec 24 kHz weights: local checkpoint only, checksum first, never a download.

Where the checkpoint is looked for, first match wins:

1. the `repository` argument (a directory, or the checkpoint file itself);
2. else the directory (or file) named by the environment variable `AURALINK_ENCODEC_REPOSITORY`;
3. else the `encodec` package's own torch.hub cache, `<torch.hub.get_dir()>/checkpoints/`
   (by default `~/.cache/torch/hub/checkpoints/`, or `$TORCH_HOME/hub/checkpoints/`), where
   `EncodecModel.encodec_model_24khz(pretrained=True)` stores its download.

In a directory the file is `encodec_24khz-d7cc33bc.th` (the name `encodec` uses), or any
`encodec_24khz-<hex>.th`, or `encodec_24khz.th`. Before anything is unpickled its SHA-256 is
checked against the hex prefix in its name (as torch.hub's `check_hash` does) and against a
`<file>.sha256` sidecar (`sha256sum` format) when there is one; a checkpoint with neither is
refused. It is then read with `torch.load(weights_only=True)` (no arbitrary pickles) and
loaded strictly into `EncodecModel.encodec_model_24khz(pretrained=False)`.

Without a checkpoint, `load_encodec` raises `WeightsUnavailable` saying where to put one,
unless `allow_random=True`: then it logs a loud warning and returns random weights from a
fixed seed (the weights of `torch.manual_seed(1234)` + the reference constructor), with
`WeightsInfo.kind == "random"`. Their codebooks, all zero in a random-init model (every code
would be 0), are k-means initialised on the model's own latents of a built-in speech-like
signal, as EnCodec initialises them, after a data-dependent init of the encoder's output layer
(`models.codebook_init`), so codes, packing and decode see real values; `WeightsInfo.label`
says so. Timings with random
weights are real; the audio is noise.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from encodec import EncodecModel
from encodec.model import ROOT_URL

from models.codebook_init import CodebookInit, init_codebooks_

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
CHECKPOINT_URL = ROOT_URL + CHECKPOINT_NAME
ENV_REPOSITORY = "AURALINK_ENCODEC_REPOSITORY"
RANDOM_SEED = 1234
_STEM = "encodec_24khz"
_HASHED_NAME = re.compile(rf"^{_STEM}-([0-9a-f]{{6,64}})\.th$")
_PLAIN_NAME = f"{_STEM}.th"
# What reports print for random weights (starts with "random", so they stay plainly labelled).
RANDOM_LABEL = "random (codebooks k-means initialised)"


class WeightsKind(str, enum.Enum):
    PRETRAINED = "pretrained"
    RANDOM = "random"


@dataclass(frozen=True)
class WeightsInfo:
    """What `load_encodec` loaded: `source` is the checkpoint path (or the random seed)."""

    kind: WeightsKind
    source: str
    sha256: str | None  # full hex digest of the checkpoint file; None for random weights
    codebooks: str | None = None  # how random weights' codebooks were initialised

    @property
    def label(self) -> str:
        """`"pretrained"`, or `RANDOM_LABEL` for random weights: the value reports show."""
        return RANDOM_LABEL if self.kind is WeightsKind.RANDOM else self.kind.value


class WeightsUnavailable(RuntimeError):
    """No pretrained checkpoint where one was looked for (message says how to get one)."""


def hub_checkpoint_dir() -> Path:
    """Where `encodec`'s own download (torch.hub) puts its checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _search_location(repository: str | Path | None) -> tuple[Path, str]:
    """-> (file or directory to search, how it was chosen)."""
    if repository is not None:
        return Path(repository).expanduser(), "repository argument"
    env = os.environ.get(ENV_REPOSITORY)
    if env:
        return Path(env).expanduser(), f"${ENV_REPOSITORY}"
    return hub_checkpoint_dir(), "encodec's torch.hub cache"


def _find_checkpoint(location: Path) -> Path | None:
    if location.is_file():
        return location
    if not location.is_dir():
        return None
    canonical = location / CHECKPOINT_NAME
    if canonical.is_file():
        return canonical
    hashed = sorted(p for p in location.iterdir() if _HASHED_NAME.match(p.name) and p.is_file())
    if len(hashed) > 1:
        names = ", ".join(p.name for p in hashed)
        raise ValueError(f"several EnCodec checkpoints in {location} ({names}): keep one")
    if hashed:
        return hashed[0]
    plain = location / _PLAIN_NAME
    return plain if plain.is_file() else None


def verify_checkpoint(path: Path) -> str:
    """Check `path` against the sha256 prefix in its name and/or its `.sha256` sidecar.

    Returns the full hex digest; raises ValueError on a mismatch or when neither exists.
    """
    actual = file_sha256(path)
    checked = False
    match = _HASHED_NAME.match(path.name) or re.match(r"^.+-([0-9a-f]{6,64})\.th$", path.name)
    if match:
        expected = match.group(1)
        if not actual.startswith(expected):
            raise ValueError(
                f"checksum mismatch for {path}: the file name says sha256 prefix {expected}, "
                f"the file hashes to {actual[: len(expected)]} (corrupt or truncated download?)"
            )
        checked = True
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        fields = sidecar.read_text().split()
        expected = fields[0].lower() if fields else ""
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise ValueError(f"{sidecar} does not start with a 64-digit hex sha256")
        if expected != actual:
            raise ValueError(
                f"checksum mismatch for {path}: {sidecar.name} says {expected}, "
                f"the file hashes to {actual}"
            )
        checked = True
    if not checked:
        raise ValueError(
            f"cannot verify {path}: name it {_STEM}-<sha256 prefix>.th or add a "
            f"{path.name}.sha256 sidecar"
        )
    return actual


def _unavailable_message(location: Path, how: str) -> str:
    return (
        f"EnCodec 24 kHz weights not found: looked in {location} ({how}) for {CHECKPOINT_NAME}. "
        f"To use pretrained weights, get {CHECKPOINT_URL} (the file the `encodec` package "
        f"downloads, sha256 prefix d7cc33bc) and either put it in {hub_checkpoint_dir()} "
        f"(encodec's torch.hub cache, also filled by "
        f"`EncodecModel.encodec_model_24khz(pretrained=True)` on a machine with internet), "
        f"or in a directory named by ${ENV_REPOSITORY} or the repository argument. "
        f"To run without them (timings real, audio is noise) pass allow_random=True."
    )


def _seeded_model() -> EncodecModel:
    # Fork the RNG so that the seed gives fixed weights without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return EncodecModel.encodec_model_24khz(pretrained=False)


@functools.cache
def _random_state() -> tuple[dict[str, torch.Tensor], CodebookInit]:
    # Computed once per process (a few seconds): every later load copies it.
    model = _seeded_model().eval()
    how = init_codebooks_(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, how


def random_encodec() -> tuple[EncodecModel, CodebookInit]:
    """The seeded random model with data-initialised codebooks (eval mode, CPU, a fresh copy)."""
    state, how = _random_state()
    model = _seeded_model()
    model.load_state_dict(state, strict=True)
    return model.eval(), how


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a plain tensor state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_encodec(
    repository: str | Path | None = None,
    *,
    allow_random: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[EncodecModel, WeightsInfo]:
    """The causal 24 kHz EnCodec model in eval mode on `device`, and what weights it has.

    Raises WeightsUnavailable when no checkpoint is found (unless `allow_random`), and
    ValueError when a checkpoint is found but fails its checksum or does not fit the model.
    Never downloads anything.
    """
    location, how = _search_location(repository)
    path = _find_checkpoint(location)
    if path is None:
        message = _unavailable_message(location, how)
        if not allow_random:
            raise WeightsUnavailable(message)
        log.warning(
            "RANDOM WEIGHTS: timings are real, audio is noise (seed %d). %s", RANDOM_SEED, message
        )
        model, how = random_encodec()
        info = WeightsInfo(WeightsKind.RANDOM, f"random(seed={RANDOM_SEED})", None,
                           codebooks=how.describe())
    else:
        digest = verify_checkpoint(path)
        state = _load_state_dict(path)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not fit the EnCodec 24 kHz model: {exc}") from exc
        model.name = _STEM  # what encodec names its pretrained 24 kHz model
        info = WeightsInfo(WeightsKind.PRETRAINED, str(path), digest)
        log.info("EnCodec 24 kHz weights loaded from %s (sha256 %s)", path, digest[:12])
    model.to(device)
    model.eval()
    return model, info
