"""Layer prefixes on the replica: each row is quantized as deep as its `n_q` asks, once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import ReplicaSettings
from deployments.contract import CHUNK_SAMPLES, FrameBatch, Op
from deployments.replica import CodecReplicaCore

SETTINGS = ReplicaSettings(capacity=4, allow_random_weights=True, torch_threads=1,
                           max_bandwidth_kbps=24.0, max_batch=8)


@pytest.fixture(scope="module")
def codec_runtime():
    from deployments.replica import _load_codec

    return _load_codec(SETTINGS)


def _core(runtime) -> CodecReplicaCore:
    c = CodecReplicaCore(SETTINGS, "layers", build=False)
    c._codec, c.weights_kind = runtime
    c._codec.reset(np.arange(SETTINGS.capacity + 1))
    return c


def _batch(ids: list[str], pcm: np.ndarray, n_q: list[int] | None, seq: int) -> FrameBatch:
    b = len(ids)
    return FrameBatch(
        op=Op.ENCODE, bridge_id="b", stream_ids=ids, epochs=np.ones(b, np.int64),
        epoch_seqs=np.full(b, seq, np.int64), budgets_ms=np.full(b, 30_000.0),
        pcm=pcm, n_q=None if n_q is None else np.asarray(n_q, np.int64),
    )


def test_each_row_gets_the_prefix_of_its_depth_in_one_model_call(codec_runtime, monkeypatch):
    rng = np.random.default_rng(0)
    chunks = [(0.1 * rng.standard_normal((3, CHUNK_SAMPLES))).astype(np.float32) for _ in range(3)]
    core = _core(codec_runtime)
    calls: list[int] = []
    encode = core._codec.encode

    def counting(slots, pcm, bandwidth_kbps=None):
        calls.append(len(slots))
        return encode(slots, pcm, bandwidth_kbps)

    monkeypatch.setattr(core._codec, "encode", counting)
    depths = [2, 8, 32]

    async def mixed():
        try:
            return [await core.process(_batch(["a", "b", "c"], chunks[t], depths, t)) for t in range(3)]
        finally:
            await core.stop()

    got = asyncio.run(mixed())
    assert calls == [3, 3, 3]  # one encode of all three rows per chunk, whatever their depths
    monkeypatch.undo()

    ref_core = _core(codec_runtime)

    async def full():
        try:
            return [await ref_core.process(_batch(["a", "b", "c"], chunks[t], [32, 32, 32], t))
                    for t in range(3)]
        finally:
            await ref_core.stop()

    ref = asyncio.run(full())
    for t in range(3):
        assert got[t].outcome_codes.tolist() == [0, 0, 0]
        assert got[t].codes.shape[1] == 32
        for row, d in enumerate(depths):
            # residual VQ: the first d books of a deeper quantization ARE the d-book stream
            np.testing.assert_array_equal(got[t].codes[row, :d], ref[t].codes[row, :d])
            assert not got[t].codes[row, d:].any()


def test_a_bad_depth_is_a_clear_error():
    b = _batch(["a"], np.zeros((1, CHUNK_SAMPLES), np.float32), [5], 0)
    with pytest.raises(ValueError, match="n_q values must be in"):
        b.validate()
    b = _batch(["a", "b"], np.zeros((2, CHUNK_SAMPLES), np.float32), [8], 0)
    with pytest.raises(ValueError, match=r"n_q must be an array of shape \(2,\)"):
        b.validate()
