"""Hints take effect, layers follow subscribers and caps, DTX stops AI frames and compute
(BridgeCore against a real in-process CodecReplicaCore)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.contract import BatchResult, FrameBatch, Outcome
from models.vad import DtxState, TalkSpurt, talk_spurts
from sfu_bridge import adaptation
from sfu_bridge.core import BridgeCore, SupervisorLink
from sfu_bridge.hint_auth import HintSigner
from sfu_bridge.hint_ext import Hint

SILENCE = np.zeros(960, np.float32)


class CountingClient:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[FrameBatch] = []

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.batches.append(batch)
        return await self.inner.process(batch)


def _core(replica_core, secret, ids=("a",), **kw):
    client = CountingClient(replica_core(max_bandwidth_kbps=24.0))
    core = BridgeCore(client, deadline_ms=5_000, bandwidth_kbps=6.0, hint_secret=secret, **kw)
    for s in ids:
        core.join(s)
    return core, client


def _ticks(core, pushes):
    """pushes: per tick, {stream: chunk} -> reports."""
    async def go():
        out = []
        for chunks in pushes:
            for sid, pcm in chunks.items():
                core.push(sid, pcm)
            out.append(await core.tick())
        await core.close()
        return out
    return asyncio.run(go())


def _frame(report, sid):
    return next(f for f in report.frames() if f.stream_id == sid)


def test_a_bw_hint_sets_the_depth_of_the_very_next_tick(replica_core, secret, sine_chunk):
    core, client = _core(replica_core, secret)
    signer = HintSigner(secret)
    core.add_hint("a", signer.sign("a", Hint(0, 24.0, 1, seq=1)))
    (first,) = _ticks(core, [{"a": sine_chunk(300, 0)}])  # the hint is checked in this tick...
    assert first.hints_accepted == 1
    assert _frame(first, "a").n_q == 8  # ...while its frame was already sent at 6 kbps
    assert core.stream("a").hint_tick == core.ticks
    (second,) = _ticks(core, [{"a": sine_chunk(300, 1)}])
    assert _frame(second, "a").n_q == 32  # one tick from acceptance to the new bandwidth
    assert client.batches[-1].n_q.tolist() == [32]
    # down again, and a stream's epoch runs on: a depth change is not a discontinuity
    core.add_hint("a", signer.sign("a", Hint(0, 1.5, 1, seq=2)))
    r3, r4 = _ticks(core, [{"a": sine_chunk(300, 2)}, {"a": sine_chunk(300, 3)}])
    frames = [_frame(r, "a") for r in (first, second, r3, r4)]
    assert (frames[2].n_q, frames[3].n_q) == (32, 2)
    assert [f.epoch for f in frames] == [1, 1, 1, 1]
    assert [f.epoch_seq for f in frames] == [0, 1, 2, 3]


def test_r_starts_a_new_epoch_now(replica_core, secret, sine_chunk):
    core, _ = _core(replica_core, secret)
    signer = HintSigner(secret)
    (r1,) = _ticks(core, [{"a": sine_chunk(300, 0)}])
    core.add_hint("a", signer.sign("a", Hint(0, 6.0, 1, reset=True, seq=1)))
    r2, r3 = _ticks(core, [{"a": sine_chunk(300, 1)}, {"a": sine_chunk(300, 2)}])
    assert [_frame(r, "a").epoch for r in (r1, r2, r3)] == [1, 1, 2]
    assert _frame(r3, "a").epoch_seq == 0
    assert core.hint_resets == 1


def test_an_unknown_model_is_rejected_and_counted(replica_core, secret, sine_chunk):
    core, _ = _core(replica_core, secret)
    signer = HintSigner(secret)
    core.add_hint("a", signer.sign("a", Hint(7, 24.0, 1, seq=1)))
    r1, r2 = _ticks(core, [{"a": sine_chunk(300, 0)}, {"a": sine_chunk(300, 1)}])
    assert r1.hints_dropped == {"unknown_model": 1} and r1.hints_accepted == 0
    assert core.hint_counters["dropped/unknown_model"] == 1
    assert _frame(r2, "a").n_q == 8  # nothing changed


def test_depth_is_the_deepest_subscriber_under_request_and_operator_cap():
    def depth(requested, cap=32, need=adaptation.NO_NEED):
        return int(adaptation.depth(np.array([requested]), np.array([cap]), np.array([need]))[0])

    assert depth(32) == 32  # no subscriber: the publisher's request
    assert depth(32, need=8) == 8
    assert depth(32, cap=adaptation.cap_codebooks(3.0), need=8) == 4
    assert adaptation.cap_codebooks(5.0) == 4  # a cap between layers allows the layer below it
    assert depth(2, need=32) == 2
    assert adaptation.cap_codebooks(0.5) == 2  # below the lowest layer: the lowest
    # one stream's maximum on scalars (media.py, per frame) is the columns' rule
    layers = [2, 4, 8, 16, 32]
    req, cap = np.meshgrid(layers, layers)
    want = adaptation.max_depth(req.ravel(), cap.ravel())
    got = [adaptation.max_depth_of(int(r), int(c)) for r, c in zip(req.ravel(), cap.ravel(), strict=True)]
    assert got == want.tolist()


def test_depth_follows_the_subscribers_need_next_tick(replica_core, secret, sine_chunk):
    core, client = _core(replica_core, secret)
    core.add_hint("a", HintSigner(secret).sign("a", Hint(0, 24.0, 1, seq=1)))
    _ticks(core, [{"a": sine_chunk(300, 0)}])
    core.set_need("a", 4)
    (r,) = _ticks(core, [{"a": sine_chunk(300, 1)}])
    assert client.batches[-1].n_q.tolist() == [4] and _frame(r, "a").n_q == 4
    core.set_need("a", None)  # no AIC subscriber left: the publisher's request
    (r,) = _ticks(core, [{"a": sine_chunk(300, 2)}])
    assert _frame(r, "a").n_q == 32


def test_operator_cap_reaches_the_batch(replica_core, secret, sine_chunk):
    core, client = _core(replica_core, secret)
    core.set_policy("a", max_kbps=3.0)
    (r,) = _ticks(core, [{"a": sine_chunk(300, 0)}])
    assert client.batches[-1].n_q.tolist() == [4] and _frame(r, "a").n_q == 4
    assert core.stream("a").cap_kbps == 3.0


def test_dtx_stops_ai_frames_and_compute_and_speech_returns_in_a_new_epoch(
        replica_core, secret, sine_chunk):
    core, client = _core(replica_core, secret, ids=("a", "b"), dtx=True)
    core.set_policy("b", dtx=False)  # the operator switched DTX off for b
    hang = core.vad_config.hangover_chunks
    plan = ([{"a": sine_chunk(300, i), "b": SILENCE} for i in range(3)]
            + [{"a": SILENCE, "b": SILENCE} for _ in range(hang + 5)]
            + [{"a": sine_chunk(300, 50 + i), "b": SILENCE} for i in range(2)])
    reports = _ticks(core, plan)
    a = [_frame(r, "a") for r in reports]
    kinds = [f.outcome for f in a]
    assert kinds[: 3 + hang] == [Outcome.AI] * (3 + hang)  # the hangover keeps sending
    assert kinds[3 + hang: 3 + hang + 5] == [Outcome.DTX] * 5
    assert kinds[-2:] == [Outcome.AI, Outcome.AI]
    assert a[-2].epoch == a[0].epoch + 1 and a[-2].epoch_seq == 0  # speech: a new epoch
    sent_a = sum(b.stream_ids.count("a") for b in client.batches)
    assert sent_a == 3 + hang + 2  # no compute while silent
    assert core.stats()["frames"]["dtx"] == 5 and core.dtx_spurts == 1
    # b had DTX switched off: all its silent chunks went to the AI
    assert sum(b.stream_ids.count("b") for b in client.batches) == len(plan)
    # one encode per stream per chunk that was sent
    assert core.encodes == sum(len(b) for b in client.batches)


def test_dtx_frames_are_not_health_reports(replica_core, secret):
    core, _ = _core(replica_core, secret, dtx=True)
    seen = []

    async def report(reports):
        seen.append(reports)
        return {}

    core.supervisor = SupervisorLink(report, period_s=0.0)
    _ticks(core, [{"a": SILENCE}] * 12)
    assert core.stats()["frames"]["dtx"] > 0
    assert seen and all(int(r.outcomes[:, 1:].sum()) == 0 for r in seen)  # no fallback counted


@pytest.mark.parametrize("dtx", [True, False])
def test_dtx_is_the_bridges_default_switch(replica_core, secret, dtx):
    core, _ = _core(replica_core, secret, dtx=dtx)
    assert core.stream("a").dtx_enabled is dtx


def test_talk_spurts_of_many_streams_step_as_one_stream_does():
    rng = np.random.default_rng(5)
    speech = rng.random((200, 16)) < 0.3
    one = [TalkSpurt(hangover_chunks=3) for _ in range(16)]
    silent, left = np.zeros(16, bool), np.zeros(16, np.int64)
    for row in speech:
        silent, left = talk_spurts(row, silent, left, 3)
        assert silent.tolist() == [t.step(bool(s)) is DtxState.SILENT for t, s in zip(one, row, strict=True)]
        assert left.tolist() == [t.remaining for t in one]
