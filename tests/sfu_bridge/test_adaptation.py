"""Hints take effect, layers follow subscribers and caps, DTX stops AI frames and compute."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.contract import BatchResult, FrameBatch, Outcome
from sfu_bridge.adaptation import StreamAdaptation, cap_codebooks
from sfu_bridge.hint_auth import HintSigner, HintVerifier
from sfu_bridge.hint_ext import Hint
from sfu_bridge.supervision import SupervisorLink
from sfu_bridge.tick import Chunk, InProcessCodec, TickBatcher


class CountingClient:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[FrameBatch] = []

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.batches.append(batch)
        return await self.inner.process(batch)


def _batcher(streaming_codec, secret, ids=("a",), **kw):
    verifiers = {s: HintVerifier(secret, s) for s in ids}
    client = CountingClient(InProcessCodec(streaming_codec))
    tb = TickBatcher(client, deadline_ms=5_000, bandwidth_kbps=6.0,
                     hint_checker=lambda sid, raw: verifiers[sid].verify(sid, raw), **kw)
    for s in ids:
        tb.join(s)
    return tb, client


def _ticks(tb, pushes):
    """pushes: per tick, {stream: chunk} -> reports."""
    async def go():
        out = []
        for chunks in pushes:
            for sid, pcm in chunks.items():
                tb.push(Chunk(sid, pcm))
            out.append(await tb.tick())
        return out
    return asyncio.run(go())


def test_a_bw_hint_sets_the_depth_of_the_very_next_tick(streaming_codec, secret, sine_chunk):
    tb, client = _batcher(streaming_codec, secret)
    signer = HintSigner(secret)
    tb.push(Chunk("a", sine_chunk(300, 0)))
    tb.add_hint("a", signer.sign("a", Hint(0, 24.0, 1, seq=1)))
    first = asyncio.run(tb.tick())  # the hint is checked in this tick...
    assert first.hints_accepted == 1
    assert first.frames[0].n_q == 8  # ...while its frame was already sent at 6 kbps
    assert tb.streams["a"].adapt.hint_tick == tb.ticks
    (second,) = _ticks(tb, [{"a": sine_chunk(300, 1)}])
    assert second.frames[0].n_q == 32  # one tick from acceptance to the new bandwidth
    assert client.batches[-1].n_q.tolist() == [32]
    # down again, and a stream's epoch runs on: a depth change is not a discontinuity
    tb.add_hint("a", signer.sign("a", Hint(0, 1.5, 1, seq=2)))
    r3, r4 = _ticks(tb, [{"a": sine_chunk(300, 2)}, {"a": sine_chunk(300, 3)}])
    assert (r3.frames[0].n_q, r4.frames[0].n_q) == (32, 2)
    assert [r.frames[0].epoch for r in (first, second, r3, r4)] == [1, 1, 1, 1]
    assert [r.frames[0].epoch_seq for r in (first, second, r3, r4)] == [0, 1, 2, 3]


def test_r_starts_a_new_epoch_now(streaming_codec, secret, sine_chunk):
    tb, _ = _batcher(streaming_codec, secret)
    signer = HintSigner(secret)
    r1, = _ticks(tb, [{"a": sine_chunk(300, 0)}])
    tb.add_hint("a", signer.sign("a", Hint(0, 6.0, 1, reset=True, seq=1)))
    r2, r3 = _ticks(tb, [{"a": sine_chunk(300, 1)}, {"a": sine_chunk(300, 2)}])
    assert (r1.frames[0].epoch, r2.frames[0].epoch, r3.frames[0].epoch) == (1, 1, 2)
    assert r3.frames[0].epoch_seq == 0
    assert tb.hint_resets == 1


def test_an_unknown_model_is_rejected_and_counted(streaming_codec, secret, sine_chunk):
    tb, _ = _batcher(streaming_codec, secret)
    signer = HintSigner(secret)
    tb.add_hint("a", signer.sign("a", Hint(7, 24.0, 1, seq=1)))
    r1, r2 = _ticks(tb, [{"a": sine_chunk(300, 0)}, {"a": sine_chunk(300, 1)}])
    assert r1.hints_dropped == {"unknown_model": 1} and r1.hints_accepted == 0
    assert tb.hint_counters["dropped/unknown_model"] == 1
    assert r2.frames[0].n_q == 8  # nothing changed


def test_depth_is_the_deepest_subscriber_under_request_and_operator_cap():
    ad = StreamAdaptation(requested_kbps=24.0)
    assert ad.depth() == 32  # no subscriber: the publisher's request
    ad.need_n_q = 8
    assert ad.depth() == 8
    ad.cap_kbps = 3.0
    assert ad.max_n_q() == 4 and ad.depth() == 4
    ad.cap_kbps = 5.0  # a cap between layers allows the layer below it
    assert ad.depth() == 4
    ad.cap_kbps, ad.requested_kbps, ad.need_n_q = None, 1.5, 32
    assert ad.depth() == 2
    assert cap_codebooks(0.5) == 2  # below the lowest layer: the lowest


def test_operator_cap_reaches_the_batch(streaming_codec, secret, sine_chunk):
    tb, client = _batcher(streaming_codec, secret)
    tb.streams["a"].adapt.cap_kbps = 3.0
    r, = _ticks(tb, [{"a": sine_chunk(300, 0)}])
    assert client.batches[-1].n_q.tolist() == [4] and r.frames[0].n_q == 4


def test_dtx_stops_ai_frames_and_compute_and_speech_returns_in_a_new_epoch(
        streaming_codec, secret, sine_chunk):
    tb, client = _batcher(streaming_codec, secret, ids=("a", "b"), dtx=True)
    tb.streams["b"].adapt.dtx_enabled = False  # the operator switched DTX off for b
    silence = np.zeros(960, np.float32)
    hang = tb.dtx_detector.config.hangover_chunks
    plan = ([{"a": sine_chunk(300, i), "b": silence} for i in range(3)]
            + [{"a": silence, "b": silence} for _ in range(hang + 5)]
            + [{"a": sine_chunk(300, 50 + i), "b": silence} for i in range(2)])
    reports = _ticks(tb, plan)
    a = [next(f for f in r.frames if f.chunk.stream_id == "a") for r in reports]
    kinds = [f.outcome for f in a]
    assert kinds[: 3 + hang] == [Outcome.AI] * (3 + hang)  # the hangover keeps sending
    assert kinds[3 + hang: 3 + hang + 5] == [Outcome.DTX] * 5
    assert kinds[-2:] == [Outcome.AI, Outcome.AI]
    assert a[-2].epoch == a[0].epoch + 1 and a[-2].epoch_seq == 0  # speech: a new epoch
    sent_a = sum(b.stream_ids.count("a") for b in client.batches)
    assert sent_a == 3 + hang + 2  # no compute while silent
    assert tb.counters["dtx"] == 5
    # b had DTX switched off: all its silent chunks went to the AI
    assert sum(b.stream_ids.count("b") for b in client.batches) == len(plan)
    # one encode per stream per chunk that was sent
    assert tb.encodes == sum(len(b) for b in client.batches)


def test_dtx_frames_are_not_health_reports(streaming_codec, secret):
    tb, _ = _batcher(streaming_codec, secret, dtx=True)
    seen = []

    async def exchange(reports):
        seen.append(reports)
        return {}

    link = SupervisorLink(tb, exchange, period_s=0.0)

    async def go():
        for _ in range(12):
            tb.push(Chunk("a", np.zeros(960, np.float32)))
            link.observe(await tb.tick())
        await link.close()

    asyncio.run(go())
    assert tb.counters["dtx"] > 0
    assert all(rep.get("fallback", {}) == {} for r in seen for rep in r.values())


@pytest.mark.parametrize("dtx", [True, False])
def test_dtx_is_the_bridges_default_switch(streaming_codec, secret, dtx):
    tb, _ = _batcher(streaming_codec, secret, dtx=dtx)
    assert tb.streams["a"].adapt.dtx_enabled is dtx
