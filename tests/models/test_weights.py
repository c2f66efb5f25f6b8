"""Weight loading: local checkpoints verified before unpickling, clear errors, random fallback.

Checkpoints here are written from a random model's state dict; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from encodec import EncodecModel

from models.weights import (
    CHECKPOINT_NAME,
    CHECKPOINT_URL,
    ENV_REPOSITORY,
    RANDOM_LABEL,
    WeightsInfo,
    WeightsKind,
    WeightsUnavailable,
    load_encodec,
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_download_and_clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fail loudly if anything tries the network; isolate from the user's env and caches."""

    def refuse(*args, **kwargs):
        raise AssertionError("weight loading tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv(ENV_REPOSITORY, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def source_model() -> EncodecModel:
    torch.manual_seed(99)  # not the loader's random seed, so the weights are distinguishable
    return EncodecModel.encodec_model_24khz(pretrained=False)


@pytest.fixture(scope="module")
def checkpoint_bytes(source_model: EncodecModel, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "state.th"
    torch.save(source_model.state_dict(), path)
    return path.read_bytes()


def write_hashed(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = hashlib.sha256(data).hexdigest()[:8]
    path = directory / f"encodec_24khz-{prefix}.th"
    path.write_bytes(data)
    return path


def assert_same_weights(a: EncodecModel, b: EncodecModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_loads_hash_named_checkpoint_from_directory(
    tmp_path: Path, checkpoint_bytes: bytes, source_model: EncodecModel
) -> None:
    path = write_hashed(tmp_path / "repo", checkpoint_bytes)
    model, info = load_encodec(tmp_path / "repo")
    assert info == WeightsInfo(WeightsKind.PRETRAINED, str(path), sha256_of(path))
    assert info.kind == "pretrained" and info.label == "pretrained"
    assert not model.training
    assert_same_weights(model, source_model)


def test_loads_from_env_var_and_from_file_path(
    tmp_path: Path,
    checkpoint_bytes: bytes,
    source_model: EncodecModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_hashed(tmp_path / "env_repo", checkpoint_bytes)
    monkeypatch.setenv(ENV_REPOSITORY, str(tmp_path / "env_repo"))
    model, info = load_encodec()
    assert info.source == str(path)
    assert_same_weights(model, source_model)
    # an explicit argument wins over the env var, and may name the file itself
    other = tmp_path / "direct" / "weights-a.th"
    other.parent.mkdir()
    shutil.copy(path, other)
    other.with_name("weights-a.th.sha256").write_text(f"{sha256_of(other)}  weights-a.th\n")
    _, info = load_encodec(other)
    assert info.source == str(other)


def test_loads_from_encodec_torch_hub_cache(
    tmp_path: Path, checkpoint_bytes: bytes, source_model: EncodecModel
) -> None:
    # TORCH_HOME points into tmp_path (autouse fixture): that is where encodec downloads to.
    path = write_hashed(tmp_path / "torch_home" / "hub" / "checkpoints", checkpoint_bytes)
    model, info = load_encodec()
    assert info.source == str(path)
    assert_same_weights(model, source_model)


def test_sidecar_checksum(tmp_path: Path, checkpoint_bytes: bytes) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    path = repo / "encodec_24khz.th"
    path.write_bytes(checkpoint_bytes)
    with pytest.raises(ValueError, match=r"cannot verify .*encodec_24khz\.th: name it"):
        load_encodec(repo)
    sidecar = repo / "encodec_24khz.th.sha256"
    sidecar.write_text(f"{sha256_of(path)}  encodec_24khz.th\n")
    _, info = load_encodec(repo)
    assert info.sha256 == sha256_of(path)
    sidecar.write_text("0" * 64 + "\n")
    with pytest.raises(ValueError, match="checksum mismatch .*encodec_24khz.th.sha256 says 0000"):
        load_encodec(repo)


def test_corrupted_checkpoint_fails_checksum_before_loading(
    tmp_path: Path, checkpoint_bytes: bytes
) -> None:
    path = write_hashed(tmp_path / "repo", checkpoint_bytes)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    prefix = path.stem.split("-")[1]
    with pytest.raises(
        ValueError, match=rf"checksum mismatch for .*: the file name says sha256 prefix {prefix}"
    ):
        load_encodec(tmp_path / "repo")


def test_canonical_name_is_checked_against_its_real_prefix(
    tmp_path: Path, checkpoint_bytes: bytes
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / CHECKPOINT_NAME).write_bytes(checkpoint_bytes)  # not the real pretrained file
    with pytest.raises(ValueError, match="file name says sha256 prefix d7cc33bc"):
        load_encodec(repo)


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch.th"
    torch.save({"encoder.x": torch.zeros(3)}, scratch)
    write_hashed(tmp_path / "wrong_keys", scratch.read_bytes())
    with pytest.raises(ValueError, match="does not fit the EnCodec 24 kHz model"):
        load_encodec(tmp_path / "wrong_keys")

    torch.save(WeightsInfo(WeightsKind.RANDOM, "x", None), scratch)  # an arbitrary pickled object
    write_hashed(tmp_path / "pickle", scratch.read_bytes())
    with pytest.raises(ValueError, match="is not a plain tensor state dict"):
        load_encodec(tmp_path / "pickle")


def test_two_candidate_checkpoints_are_ambiguous(tmp_path: Path, checkpoint_bytes: bytes) -> None:
    repo = tmp_path / "repo"
    write_hashed(repo, checkpoint_bytes)
    write_hashed(repo, checkpoint_bytes + b"x")
    with pytest.raises(ValueError, match="several EnCodec checkpoints in .*: keep one"):
        load_encodec(repo)


def test_missing_weights_raise_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsUnavailable) as err:
        load_encodec(empty)
    message = str(err.value)
    assert f"looked in {empty} (repository argument) for {CHECKPOINT_NAME}" in message
    assert CHECKPOINT_URL == "https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th"
    assert CHECKPOINT_URL in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert ENV_REPOSITORY in message and "allow_random=True" in message

    monkeypatch.setenv(ENV_REPOSITORY, str(tmp_path / "nowhere"))
    with pytest.raises(WeightsUnavailable, match=rf"nowhere \(\${ENV_REPOSITORY}\)"):
        load_encodec()


# What the random path changes in the seeded model: the codebooks (k-means) and the encoder's
# output layer (data-dependent init of its gain and bias).
_DATA_INITIALISED = ("quantizer.", "encoder.model.15.conv.conv.weight_g",
                     "encoder.model.15.conv.conv.bias")


def test_allow_random_warns_and_is_seeded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encodec_model_24k: EncodecModel
) -> None:
    rng_before = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="models.weights"):
        model, info = load_encodec(tmp_path / "empty", allow_random=True)
    assert (info.kind, info.source, info.sha256) == (WeightsKind.RANDOM, "random(seed=1234)", None)
    assert info.kind == "random"
    assert info.label == RANDOM_LABEL == "random (codebooks k-means initialised)"
    assert info.codebooks is not None and "k-means" in info.codebooks
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "RANDOM WEIGHTS: timings are real, audio is noise" in warnings[0].getMessage()
    # the caller's RNG is untouched, and the weights are the test suite's seeded model except
    # for what the codebook initialisation sets
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    seeded, got = encodec_model_24k.state_dict(), model.state_dict()
    assert seeded.keys() == got.keys()
    changed = {k for k in seeded if not torch.equal(seeded[k], got[k])}
    assert changed and all(k.startswith(_DATA_INITIALISED) for k in changed), changed
    assert "quantizer.vq.layers.31._codebook.embed" in changed
    assert not model.training


def _speech(seconds: float = 2.0) -> torch.Tensor:
    from models.codebook_init import speech_like

    return torch.from_numpy(speech_like(voices=3, seconds=seconds, seed=99))  # not the init's


def test_random_weights_give_real_codes(tmp_path: Path) -> None:
    """Codebooks are no longer all zero: codes of speech-like audio use many values in every
    codebook, down to the 32nd, and decode to audio that depends on them (not silence, and
    not one fixed waveform whatever the codes)."""
    from models.streaming import StreamingEncodec

    model, _ = load_encodec(tmp_path / "empty", allow_random=True)
    codec = StreamingEncodec(model, capacity=3, bandwidth_kbps=24.0)
    pcm = _speech()
    codes = codec.encode([0, 1, 2], pcm)  # [3, 32, 150]
    assert codes.shape == (3, 32, 150) and codes.any()
    distinct = [len(torch.unique(codes[:, q])) for q in range(32)]
    assert min(distinct) >= 50, distinct  # of 450 frames; measured >= 100
    audio = StreamingEncodec(model, capacity=3).decode([0, 1, 2], codes[:, :8])
    other = StreamingEncodec(model, capacity=3).decode([0, 1, 2], codes[[1, 2, 0], :8])
    rms = audio.pow(2).mean().sqrt()
    assert rms > 1e-3
    assert ((audio - other).pow(2).mean().sqrt() / rms) > 1e-2  # measured ~4e-2


def test_random_weights_are_deterministic_across_loads(tmp_path: Path) -> None:
    """Two loads (the second recomputing the k-means, with another torch thread count) give
    the same weights bit for bit, hence the same codes."""
    from models import weights

    first, _ = load_encodec(tmp_path / "empty", allow_random=True)
    threads = torch.get_num_threads()
    weights._random_state.cache_clear()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        second, _ = load_encodec(tmp_path / "empty", allow_random=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the init restores the caller's setting
    assert_same_weights(first, second)


def test_allow_random_still_prefers_real_weights(
    tmp_path: Path, checkpoint_bytes: bytes, source_model: EncodecModel
) -> None:
    write_hashed(tmp_path / "repo", checkpoint_bytes)
    model, info = load_encodec(tmp_path / "repo", allow_random=True)
    assert info.kind is WeightsKind.PRETRAINED
    assert_same_weights(model, source_model)
