"""The exported ONNX streaming steps, run by onnxruntime, equal the torch steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.onnx_step import OnnxStreamingEncodec
from models.streaming import StreamingEncodec
from tests.models.equivalence import assert_audio_close, assert_codes_equivalent, quantizer_input

SR = 24_000


def _signals(n: int, samples: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    t = np.arange(samples) / SR
    out = []
    for i in range(n):
        f0 = rng.uniform(100, 200)
        voice = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 10))
        voice *= np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None)
        x = voice if i % 2 == 0 else rng.standard_normal(samples)
        out.append(0.3 * x / np.abs(x).max())
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    """The product's random-weight model (seed 1234, codebooks k-means initialised)."""
    from models.weights import random_encodec

    return random_encodec()[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_codec(model, cache_dir):
    return OnnxStreamingEncodec(model, capacity=8, device="cpu", bandwidth_kbps=6.0,
                                cache_dir=cache_dir)


def test_onnx_steps_equal_torch_steps(model, onnx_codec):
    """Codes equal up to near-ties, the same codes decode alike, the states agree."""
    assert "CPUExecutionProvider" in onnx_codec.providers
    x = _signals(3, 960 * 25)
    slots = [6, 1, 4]
    ref = StreamingEncodec(model, capacity=8)
    onnx_codec.reset(slots)
    all_t, all_o = [], []
    for i in range(0, x.shape[1], 960):
        chunk = x[:, i:i + 960]
        codes_t = ref.encode(slots, chunk)
        codes_o = onnx_codec.encode(slots, chunk)
        assert codes_o.dtype == np.int64 and codes_o.shape == (3, 8, 3)
        all_t.append(codes_t)
        all_o.append(codes_o)
        pcm_t = ref.decode(slots, codes_t)
        pcm_o = onnx_codec.decode(slots, codes_t)
        assert pcm_o.dtype == np.float32 and pcm_o.shape == (3, 960)
        assert_audio_close(pcm_o, pcm_t)
    # Equal up to float32 quantizer near-ties (onnxruntime's kernels round differently).
    assert_codes_equivalent(np.concatenate(all_o, -1), np.concatenate(all_t, -1),
                            quantizer_input(ref, x))
    for got, want in ((onnx_codec.encoder_state[slots], ref.encoder_state[slots]),
                      (onnx_codec.decoder_state[slots], ref.decoder_state[slots])):
        # Tolerance relative to the state's scale, not absolute: the scale is the model's.
        np.testing.assert_allclose(got, want.numpy(), rtol=0,
                                   atol=1e-4 * float(want.abs().max()))


def test_dynamic_batch_and_remainder_chunks(model, onnx_codec):
    ref = StreamingEncodec(model, capacity=8)
    onnx_codec.reset(list(range(8)))
    x = _signals(5, 960 + 320)  # one exported chunk plus a one-frame remainder
    for slots in ([2], [0, 3, 5, 6, 7]):
        chunk = x[: len(slots)]
        codes_o = onnx_codec.encode(torch.tensor(slots), torch.from_numpy(chunk))
        assert isinstance(codes_o, torch.Tensor) and codes_o.shape == (len(slots), 8, 4)
        codes_t = ref.encode(slots, chunk)
        assert_codes_equivalent(codes_o, codes_t, quantizer_input(ref, chunk))


def test_bad_input_leaves_onnx_state_untouched(onnx_codec):
    onnx_codec.encode([0, 1], _signals(2, 960))
    before = onnx_codec.encoder_state.copy(), onnx_codec.decoder_state.copy()
    with pytest.raises(ValueError, match="multiple of 320"):
        onnx_codec.encode([0, 1], np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="repeated"):
        onnx_codec.decode([1, 1], np.zeros((2, 8, 3), np.int64))
    with pytest.raises(ValueError, match="outside"):
        onnx_codec.decode([0, 1], np.full((2, 8, 3), 1024, np.int64))
    np.testing.assert_array_equal(onnx_codec.encoder_state, before[0])
    np.testing.assert_array_equal(onnx_codec.decoder_state, before[1])


def test_export_is_cached_per_weights(model, onnx_codec, cache_dir):
    files = sorted(onnx_codec.cache_dir.glob("*.onnx"))
    assert {f.name for f in files} >= {"encode-q8-f3.onnx", "decode-q8-f3.onnx"}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = OnnxStreamingEncodec(model, capacity=2, cache_dir=cache_dir)
    assert isinstance(again, OnnxStreamingEncodec)
    assert again.cache_dir == onnx_codec.cache_dir
    assert {f: f.stat().st_mtime_ns for f in files} == stamps, "re-exported despite the cache"

