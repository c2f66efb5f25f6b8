"""The exported ONNX streaming steps, run by onnxruntime, equal the torch steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.onnx_step import OnnxStreamingEncodec
from models.streaming import StreamingEncodec

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
def model(encodec_model_24k):
    """The shared random model, centred, with codebooks drawn from its own embeddings."""
    from encodec import EncodecModel

    m = EncodecModel.encodec_model_24khz(pretrained=False).eval()
    m.load_state_dict(encodec_model_24k.state_dict())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        emb = m.encoder(torch.from_numpy(_signals(4, SR)[:, None]))
        centre = emb.mean(dim=(0, 2))
        m.encoder.model[-1].conv.conv.bias.sub_(centre)
        residual = (emb - centre[:, None]).transpose(1, 2).reshape(-1, emb.shape[1])
        for layer in m.quantizer.vq.layers:
            dev = residual - residual.mean(0)
            pick = torch.randint(0, residual.shape[0], (1024,), generator=gen)
            book = residual.mean(0) + dev[pick] + 0.6 * dev.std(0) * torch.randn(
                1024, residual.shape[1], generator=gen)
            layer._codebook.embed.copy_(book)
            residual = residual - book[torch.cdist(residual, book).argmin(-1)]
    return m


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_codec(model, cache_dir):
    return OnnxStreamingEncodec(model, capacity=8, device="cpu", bandwidth_kbps=6.0,
                                cache_dir=cache_dir)


def test_onnx_steps_equal_torch_steps(model, onnx_codec):
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
        peak = max(float(np.abs(pcm_t).max()), 1e-6)
        assert np.abs(pcm_o - pcm_t).max() <= 1e-4 * peak
    # Equal up to float32 near-ties between two codebook entries (each costs a few entries).
    match = (np.concatenate(all_o, -1) == np.concatenate(all_t, -1)).mean()
    assert match >= 0.995, f"only {match:.4f} of ONNX codes equal the torch codes"
    np.testing.assert_allclose(onnx_codec.encoder_state[slots], ref.encoder_state[slots].numpy(),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_codec.decoder_state[slots], ref.decoder_state[slots].numpy(),
                               rtol=0, atol=1e-4)


def test_dynamic_batch_and_remainder_chunks(model, onnx_codec):
    ref = StreamingEncodec(model, capacity=8)
    onnx_codec.reset(list(range(8)))
    x = _signals(5, 960 + 320)  # one exported chunk plus a one-frame remainder
    for slots in ([2], [0, 3, 5, 6, 7]):
        chunk = x[: len(slots)]
        codes_o = onnx_codec.encode(torch.tensor(slots), torch.from_numpy(chunk))
        assert isinstance(codes_o, torch.Tensor) and codes_o.shape == (len(slots), 8, 4)
        codes_t = ref.encode(slots, chunk)
        # At most one frame may differ, and only through a float32 near-tie of two entries.
        assert (codes_o.numpy() != codes_t).any(axis=1).sum() <= 1


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
    assert again.cache_dir == onnx_codec.cache_dir
    assert {f: f.stat().st_mtime_ns for f in files} == stamps, "re-exported despite the cache"

