"""Streaming EnCodec equals the reference package's offline pass, stream by stream.

The reference is `encodec`'s own `model.encode`/`model.decode` over the whole signal with
every SConv1d set to pad with zeros (`pad_mode="constant"`), which is what a stream that
starts from silence sees. The model is the product's random-weight model (fixed seed, codebooks
k-means initialised on its own latents), so codes are diverse. Codes are compared with
`tests.models.equivalence`: equal, except at float32 quantizer near-ties.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.streaming import BANDWIDTH_CODEBOOKS, StreamingEncodec
from tests.models.equivalence import (
    AUDIO_RTOL,
    TIE_RTOL,
    QuantizerInput,
    assert_audio_close,
    assert_codes_equivalent,
    assert_tie_audio_close,
    audio_error,
    compare_codes,
    quantizer_input,
)

SR = 24_000
SECONDS = 3.0
N_SIGNALS = 8
BANDWIDTH = 6.0


# --------------------------------------------------------------------------- setup


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of small streaming steps run faster on one thread than two (no OpenMP
    hand-off per op); restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- signals


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Harmonic voice with a gliding pitch, formant-like AM of the partials, syllable bursts."""
    n = int(SR * seconds)
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = rng.uniform([300, 900, 2200], [800, 1800, 3200])
    voice = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0.mean()
        if fk > 8000:
            break
        gain = sum(np.exp(-((fk - f) / 180.0) ** 2) for f in formants) + 0.02
        am = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi))
        voice += gain * am * np.sin(k * phase) / k
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None) ** 0.5
    breath = 0.01 * rng.standard_normal(n)
    x = voice * syllables + breath
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def noise_like(rng: np.random.Generator, seconds: float, kind: int) -> np.ndarray:
    n = int(SR * seconds)
    white = rng.standard_normal(n)
    if kind == 0:
        x = white
    elif kind == 1:  # brown-ish: integrated, high-passed
        x = np.cumsum(white)
        x = x - np.convolve(x, np.ones(400) / 400, mode="same")
    elif kind == 2:  # bursts
        x = white * (rng.uniform(size=n // 2400 + 1).repeat(2400)[:n] > 0.5)
    else:  # pink-ish: sum of octave-smoothed noises
        x = sum(np.convolve(rng.standard_normal(n), np.ones(w) / w, mode="same")
                for w in (1, 2, 4, 8, 16, 32))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def signals() -> np.ndarray:
    rng = np.random.default_rng(2024)
    sig = [speech_like(rng, SECONDS) for _ in range(N_SIGNALS // 2)]
    sig += [noise_like(rng, SECONDS, k) for k in range(N_SIGNALS - len(sig))]
    return np.stack(sig)


# --------------------------------------------------------------------------- models


def _fresh_24k():
    from encodec import EncodecModel

    return EncodecModel.encodec_model_24khz(pretrained=False).eval()


@pytest.fixture(scope="module")
def model():
    """The product's random-weight model (seed 1234, codebooks k-means initialised)."""
    from models.weights import random_encodec

    return random_encodec()[0]


@pytest.fixture(scope="module")
def quantized(model, signals) -> QuantizerInput:
    """What the encoder quantizes for the whole signals: the tie checks' reference."""
    return quantizer_input(StreamingEncodec(model, capacity=N_SIGNALS), signals)


def reference_copy(model):
    """A copy of `model` whose convolutions pad with zeros, as a fresh stream sees."""
    from encodec.modules import SConv1d

    ref = _fresh_24k()
    ref.load_state_dict(model.state_dict())
    for mod in ref.modules():
        if isinstance(mod, SConv1d):
            mod.pad_mode = "constant"
    return ref


@pytest.fixture(scope="module")
def reference(model, signals):
    """Offline codes [N, n_q, F] and decoded audio [N, T] of the whole signals."""
    ref = reference_copy(model)
    ref.set_target_bandwidth(BANDWIDTH)
    with torch.no_grad():
        x = torch.from_numpy(signals[:, None, :])
        codes = ref.encode(x)[0][0]
        audio = ref.decode([(codes, None)])[:, 0]
    return codes.numpy(), audio.numpy()


def stream_encode(codec, slots, pcm: np.ndarray, chunk: int) -> np.ndarray:
    out = [codec.encode(slots, pcm[:, i:i + chunk]) for i in range(0, pcm.shape[1], chunk)]
    return np.concatenate(out, axis=-1)


def stream_decode(codec, slots, codes: np.ndarray, frames: int) -> np.ndarray:
    out = [codec.decode(slots, codes[:, :, i:i + frames])
           for i in range(0, codes.shape[-1], frames)]
    return np.concatenate(out, axis=-1)


# --------------------------------------------------------------------------- equivalence


def test_reference_codes_are_diverse(reference):
    codes, _ = reference
    # Guards the test's own power: degenerate codebooks would make code equality trivial.
    assert len(np.unique(codes[:, 0])) > 50
    assert len(np.unique(codes)) > 500


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("chunk", [320, 960, 1920])
def test_streaming_equals_offline_reference(model, signals, reference, quantized, chunk, batch):
    """All signals stream through, `batch` streams per call, `chunk` samples per step: the
    codes equal the reference's offline codes up to quantizer near-ties, and decoding the
    reference codes in chunks gives the reference audio."""
    ref_codes, ref_audio = reference
    codec = StreamingEncodec(model, capacity=16, device="cpu", bandwidth_kbps=BANDWIDTH)
    codes = np.zeros_like(ref_codes)
    for group in range(0, N_SIGNALS, batch):
        rows = list(range(group, min(group + batch, N_SIGNALS)))
        # Slots in an arbitrary, non-contiguous order: mapping must not depend on position.
        slots = [15 - 2 * (r - group) - (group // batch) % 2 for r in rows]
        codes[rows] = stream_encode(codec, slots, signals[rows], chunk)
        if group == 0:  # one batch of `batch` streams is enough for decode
            audio = stream_decode(codec, slots, ref_codes[rows], chunk // 320)
            assert audio.dtype == np.float32 and audio.shape == ref_audio[rows].shape
            for j, r in enumerate(rows):
                assert_audio_close(audio[j], ref_audio[r])
        codec.reset(slots)
    assert_codes_equivalent(codes, ref_codes, quantized)


def _batch_and_alone(model, pcm, chunk=960):
    batched = StreamingEncodec(model, capacity=4)
    slots = list(range(pcm.shape[0]))
    codes_b = stream_encode(batched, slots, pcm, chunk)
    audio_b = stream_decode(batched, slots, codes_b, 3)
    alone = []
    for i in slots:
        solo = StreamingEncodec(model, capacity=4)
        codes_1 = stream_encode(solo, [i], pcm[i:i + 1], chunk)
        alone.append((codes_1[0], stream_decode(solo, [i], codes_b[i:i + 1], 3)[0],
                      stream_decode(StreamingEncodec(model, capacity=4), [i], codes_1, 3)[0]))
    return codes_b, audio_b, alone


def test_batch_equals_single_streams(model, signals, quantized):
    """A batch of streams gives each stream's codes and audio as if it ran alone: codes equal
    up to near-ties; the same codes decode to the same audio (AUDIO_RTOL of the peak); and a
    stream's own codes, near-ties included, decode to audio within TIE_AUDIO_RMS."""
    rows = [0, 4, 1]
    codes_b, audio_b, alone = _batch_and_alone(model, signals[rows, : SR * 2])
    q = QuantizerInput(quantized.latents[rows, :, : codes_b.shape[-1]], quantized.codebooks,
                       quantized.bias_norm)
    assert_codes_equivalent(np.stack([a[0] for a in alone]), codes_b, q)
    for i in range(len(rows)):
        assert_audio_close(alone[i][1], audio_b[i])
        assert_tie_audio_close(alone[i][2], audio_b[i])


def test_batch_check_fails_when_batching_is_wrong(model, signals, quantized):
    """The equivalence check has teeth: a batch whose streams were swapped, or one of whose
    slots had its state disturbed mid-stream, is reported as real errors, not near-ties."""
    rows = [0, 4, 1]
    pcm = signals[rows, : SR]
    q = QuantizerInput(quantized.latents[rows, :, : SR // 320], quantized.codebooks,
                       quantized.bias_norm)
    codes_b, audio_b, alone = _batch_and_alone(model, pcm)
    codes_1 = np.stack([a[0] for a in alone])
    swapped = compare_codes(codes_1, codes_b[[1, 0, 2]], q)
    assert len(swapped.errors) > 0.9 * 2 * codes_b.shape[-1], swapped.summary()

    corrupt = StreamingEncodec(model, capacity=4)
    half = 960 * 12
    first = stream_encode(corrupt, [0, 1, 2], pcm[:, :half], 960)
    # One slot's state is overwritten by another's, as a slot-mapping bug would do.
    corrupt.encoder_state[2] = corrupt.encoder_state[0]
    second = stream_encode(corrupt, [0, 1, 2], pcm[:, half:], 960)
    result = compare_codes(codes_1, np.concatenate([first, second], -1), q)
    assert {m.stream for m in result.errors} == {2}, result.summary()
    assert min(m.frame for m in result.errors) >= half // 320
    # The decoder side likewise: a slot decoding on another slot's state is far from close.
    frames = codes_b.shape[-1] // 2
    dec = StreamingEncodec(model, capacity=4)
    head = stream_decode(dec, [0, 1, 2], codes_b[:, :, :frames], 3)
    dec.decoder_state[2] = dec.decoder_state[0]
    tail = stream_decode(dec, [0, 1, 2], codes_b[:, :, frames:], 3)
    audio = np.concatenate([head, tail], -1)
    assert_audio_close(audio[:2], audio_b[:2])
    assert audio_error(audio[2], audio_b[2]) > 100 * AUDIO_RTOL


def test_tie_tolerance_excuses_only_ties(quantized):
    """The tolerance is far below a typical code's distance from its runner-up, so it cannot
    pass off a wrong code as a tie: fewer than 10% of first-book codes have a runner-up that
    close (measured 4.4%)."""
    lat = quantized.latents.transpose(0, 2, 1).reshape(-1, quantized.latents.shape[1])
    lat = lat.astype(np.float64)
    books = quantized.codebooks[0].astype(np.float64)
    d = (lat ** 2).sum(1)[:, None] - 2 * lat @ books.T + (books ** 2).sum(1)[None]
    two = np.argsort(d, axis=1)[:, :2]
    rows = np.arange(len(lat))
    gap = np.linalg.norm(books[two[:, 0]] - books[two[:, 1]], axis=1)
    slack = (d[rows, two[:, 1]] - d[rows, two[:, 0]]) / (2 * gap)
    rel = slack / (np.linalg.norm(lat, axis=1) + quantized.bias_norm)
    assert (rel <= TIE_RTOL).mean() < 0.10


def test_interleaved_streams_match_running_alone(model, signals, quantized):
    rng = np.random.default_rng(5)
    n, chunk = 4, 960
    pcm = signals[[0, 4, 1, 5], : SR]
    n_chunks = pcm.shape[1] // chunk
    alone = []
    for i in range(n):
        solo = StreamingEncodec(model, capacity=1)
        codes = stream_encode(solo, [0], pcm[i:i + 1], chunk)
        alone.append((codes[0], stream_decode(solo, [0], codes, 3)[0]))

    codec = StreamingEncodec(model, capacity=8)
    slot_of = {0: 6, 1: 2, 2: 7, 3: 0}
    progress = [0] * n
    got_codes: list[list[np.ndarray]] = [[] for _ in range(n)]
    got_audio: list[list[np.ndarray]] = [[] for _ in range(n)]
    while min(progress) < n_chunks:
        # Each tick a random subset of the unfinished streams, in random order.
        live = [i for i in range(n) if progress[i] < n_chunks]
        tick = [i for i in rng.permutation(live) if rng.uniform() < 0.7] or live[:1]
        x = np.stack([pcm[i, progress[i] * chunk:(progress[i] + 1) * chunk] for i in tick])
        slots = [slot_of[i] for i in tick]
        codes = codec.encode(slots, x)
        # Decode the codes each stream got alone, so that its audio must match exactly.
        own = np.stack([alone[i][0][:, progress[i] * 3:(progress[i] + 1) * 3] for i in tick])
        audio = codec.decode(np.array(slots[::-1]), own[::-1].copy())[::-1]
        for j, i in enumerate(tick):
            got_codes[i].append(codes[j])
            got_audio[i].append(audio[j])
            progress[i] += 1
    rows = [0, 4, 1, 5]
    q = QuantizerInput(quantized.latents[rows, :, : SR // 320], quantized.codebooks,
                       quantized.bias_norm)
    codes = np.stack([np.concatenate(got_codes[i], axis=-1) for i in range(n)])
    assert_codes_equivalent(codes, np.stack([a[0] for a in alone]), q)
    for i in range(n):
        assert_audio_close(np.concatenate(got_audio[i], axis=-1), alone[i][1])


def test_reset_slot_behaves_like_fresh(model, signals):
    pcm = signals[:2, : 960 * 12]
    codec = StreamingEncodec(model, capacity=4)
    stream_decode(codec, [1, 3], stream_encode(codec, [1, 3], pcm, 960), 3)
    assert codec.encoder_state[1].abs().sum() > 0 and codec.decoder_state[1].abs().sum() > 0
    other_enc = codec.encoder_state[3].clone()
    codec.reset([1])
    assert codec.encoder_state[1].abs().sum() == 0 and codec.decoder_state[1].abs().sum() == 0
    assert torch.equal(codec.encoder_state[3], other_enc), "reset touched another slot"

    fresh = StreamingEncodec(model, capacity=4)
    x = signals[4:5, : 960 * 12]
    codes_a = stream_encode(codec, [1], x, 960)
    codes_b = stream_encode(fresh, [1], x, 960)
    np.testing.assert_array_equal(codes_a, codes_b)
    np.testing.assert_array_equal(stream_decode(codec, [1], codes_a, 3),
                                  stream_decode(fresh, [1], codes_b, 3))


def test_reset_encoder_and_decoder_separately(model, signals):
    codec = StreamingEncodec(model, capacity=2)
    codes = codec.encode([0], signals[:1, :960])
    codec.decode([0], codes)
    codec.reset_encoder([0])
    assert codec.encoder_state[0].abs().sum() == 0 and codec.decoder_state[0].abs().sum() > 0
    codec.encode([0], signals[:1, :960])
    codec.reset_decoder([0])
    assert codec.encoder_state[0].abs().sum() > 0 and codec.decoder_state[0].abs().sum() == 0


# --------------------------------------------------------------------------- API surface


def test_attributes_and_bandwidth_override(model, signals):
    codec = StreamingEncodec(model, capacity=3, bandwidth_kbps=6.0)
    assert (codec.capacity, codec.sample_rate, codec.frame_samples) == (3, 24000, 320)
    assert codec.bandwidth_kbps == 6.0 and codec.n_q == 8
    x = signals[:2, :1920]
    full = StreamingEncodec(model, capacity=3).encode([0, 1], x, bandwidth_kbps=24)
    assert full.shape == (2, 32, 6)
    for kbps, n_q in BANDWIDTH_CODEBOOKS.items():
        fresh = StreamingEncodec(model, capacity=3)
        codes = fresh.encode([0, 1], x, bandwidth_kbps=kbps)
        assert codes.shape == (2, n_q, 6)
        # Residual VQ: fewer books are a prefix of more books.
        np.testing.assert_array_equal(codes, full[:, :n_q])
        assert fresh.decode([0, 1], codes).shape == (2, 1920)


def test_numpy_in_numpy_out_torch_in_torch_out(model, signals):
    codec = StreamingEncodec(model, capacity=4)
    codes_np = codec.encode(np.array([0, 1]), signals[:2, :960])
    assert isinstance(codes_np, np.ndarray) and codes_np.shape == (2, 8, 3)
    assert codes_np.min() >= 0 and codes_np.max() < 1024
    codes_t = codec.encode(torch.tensor([2, 3]), torch.from_numpy(signals[:2, :960]))
    assert isinstance(codes_t, torch.Tensor) and not codes_t.dtype.is_floating_point
    np.testing.assert_array_equal(codes_t.numpy(), codes_np)
    pcm_np = codec.decode([0, 1], codes_np.astype(np.int16))
    pcm_t = codec.decode([2, 3], codes_t.to(torch.int32))
    assert isinstance(pcm_np, np.ndarray) and pcm_np.dtype == np.float32
    assert isinstance(pcm_t, torch.Tensor) and pcm_t.dtype == torch.float32
    np.testing.assert_array_equal(pcm_t.numpy(), pcm_np)


def test_callers_model_is_not_modified(encodec_model_24k):
    before = {k: v.clone() for k, v in encodec_model_24k.state_dict().items()}
    codec = StreamingEncodec(encodec_model_24k, capacity=2)
    codec.encode([0], np.zeros((1, 960), np.float32))
    after = encodec_model_24k.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in encodec_model_24k.parameters())


def test_public_import_path():
    """`from models import StreamingEncodec` (the documented contract) from the repo root."""
    root = Path(__file__).resolve().parents[2]
    code = ("import models, models.streaming as s; from models import StreamingEncodec; "
            "assert StreamingEncodec is s.StreamingEncodec")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# --------------------------------------------------------------------------- bad input

GOOD_PCM = np.zeros((2, 960), np.float32)
GOOD_CODES = np.zeros((2, 8, 3), np.int64)


def _nan_pcm() -> np.ndarray:
    x = GOOD_PCM.copy()
    x[1, 5] = np.nan
    return x


def _inf_pcm() -> np.ndarray:
    x = GOOD_PCM.copy()
    x[0, 0] = np.inf
    return x


BAD_CALLS = [
    ("encode", ([0, 1], GOOD_PCM.astype(np.float64)), "float32"),
    ("encode", ([0, 1], torch.zeros(2, 960, dtype=torch.float16)), "float32"),
    ("encode", ([0, 1], np.zeros((2, 1, 960), np.float32)), "shape"),
    ("encode", ([0, 1], np.zeros((2, 1000), np.float32)), "multiple of 320"),
    ("encode", ([0, 1], np.zeros((2, 0), np.float32)), "multiple of 320"),
    ("encode", ([0, 1], _nan_pcm()), "NaN"),
    ("encode", ([0, 1], _inf_pcm()), "inf"),
    ("encode", ([0, 4], GOOD_PCM), "out of range"),
    ("encode", ([-1, 0], GOOD_PCM), "out of range"),
    ("encode", ([1, 1], GOOD_PCM), "repeated"),
    ("encode", ([0], GOOD_PCM), "slots"),
    ("encode", ([0.0, 1.0], GOOD_PCM), "integers"),
    ("encode", (np.array([[0, 1]]), GOOD_PCM), "1-D"),
    ("encode", ([0, 1], GOOD_PCM.tolist()), "numpy array or torch tensor"),
    ("encode", ([0, 1], GOOD_PCM, 5.0), "bandwidth"),
    ("decode", ([0, 1], GOOD_CODES + 1024), "outside [0, 1024)"),
    ("decode", ([0, 1], GOOD_CODES - 1), "outside [0, 1024)"),
    ("decode", ([0, 1], np.zeros((2, 7, 3), np.int64)), "codebooks"),
    ("decode", ([0, 1], np.zeros((2, 64, 3), np.int64)), "codebooks"),
    ("decode", ([0, 1], GOOD_CODES.astype(np.float32)), "integers"),
    ("decode", ([0, 1], np.zeros((2, 8), np.int64)), "shape"),
    ("decode", ([0, 1], np.zeros((2, 8, 0), np.int64)), "no frames"),
    ("decode", ([2, 2], GOOD_CODES), "repeated"),
    ("decode", ([0, 9], GOOD_CODES), "out of range"),
    ("reset", ([0, 7],), "out of range"),
    ("reset", ([3, 3],), "repeated"),
]


@pytest.fixture(scope="module")
def busy_codec(model, signals):
    """A codec whose four slots all hold non-zero state."""
    codec = StreamingEncodec(model, capacity=4)
    codes = codec.encode([0, 1, 2, 3], signals[:4, :1920])
    codec.decode([0, 1, 2, 3], codes)
    return codec


@pytest.mark.parametrize(("method", "args", "message"), BAD_CALLS,
                         ids=[f"{m}-{msg}-{i}" for i, (m, _, msg) in enumerate(BAD_CALLS)])
def test_bad_input_raises_and_leaves_state_untouched(busy_codec, method, args, message):
    enc = busy_codec.encoder_state.clone()
    dec = busy_codec.decoder_state.clone()
    assert enc.abs().sum() > 0 and dec.abs().sum() > 0
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        getattr(busy_codec, method)(*args)
    assert torch.equal(busy_codec.encoder_state, enc)
    assert torch.equal(busy_codec.decoder_state, dec)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"capacity": 0}, "capacity"),
    ({"bandwidth_kbps": 7.0}, "bandwidth"),
])
def test_bad_construction(encodec_model_24k, kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamingEncodec(encodec_model_24k, **kwargs)


def test_decoding_a_changing_depth_equals_decoding_each_frames_prefix(encodec_model_24k):
    """A subscriber's depth (codebooks) may change on any packet without an epoch change:
    the streaming decoder fed the first k_t books of chunk t equals the offline reference
    decoder run once over the whole signal on each frame's k_t-book embedding. (Random codes
    on random codebooks whose books all weigh alike, so every depth changes the audio.)"""
    model = _fresh_24k()
    model.load_state_dict(encodec_model_24k.state_dict())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.copy_(torch.randn(layer._codebook.embed.shape, generator=gen))
    frames, n_chunks = 3, 40
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 1024, (2, 32, frames * n_chunks))
    depths, k = [], 32
    while len(depths) < n_chunks:  # a new depth every 1-3 chunks
        k = int(rng.choice([d for d in (2, 4, 8, 16, 32) if d != k]))
        depths += [k] * int(rng.integers(1, 4))
    depths = depths[:n_chunks]
    codec = StreamingEncodec(model, capacity=2)
    got = np.concatenate(
        [codec.decode([0, 1], codes[:, : depths[t], t * frames:(t + 1) * frames])
         for t in range(n_chunks)], axis=-1)

    ref = reference_copy(model)
    with torch.no_grad():
        emb = torch.cat([
            ref.quantizer.decode(torch.from_numpy(
                codes[:, : depths[t], t * frames:(t + 1) * frames]).transpose(0, 1))
            for t in range(n_chunks)], dim=-1)
        want = ref.decoder(emb)[:, 0].numpy()
    assert len(set(depths)) >= 4
    for i in range(2):
        peak = np.abs(want[i]).max()
        assert np.abs(got[i] - want[i]).max() <= 1e-4 * peak
    # ...and differs from decoding one fixed depth throughout by far more than that tolerance
    fixed = StreamingEncodec(model, capacity=1)
    for depth in (2, 32):
        other = stream_decode(fixed, [0], codes[:1, :depth], frames)
        fixed.reset([0])
        assert np.abs(other[0] - want[0]).max() > 1e-2 * np.abs(want[0]).max()
