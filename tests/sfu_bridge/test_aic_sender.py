"""One AIC subscriber's packets: its layer of each frame, 40/80/120 ms packets, DTX signalling."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.contract import FallbackReason, Outcome
from sfu_bridge.aic_payload import AicPayload
from sfu_bridge.aic_sender import SID_INTERVAL_TICKS, AicSender
from sfu_bridge.core import FrameOutcome
from sfu_bridge.rate_control import Layer, RateControlConfig


def _ai(epoch: int, seq: int, n_q: int = 32, t: int = 0) -> FrameOutcome:
    codes = (np.arange(n_q * 3, dtype=np.int16).reshape(n_q, 3) + 7 * seq) % 1024
    return FrameOutcome("s", Outcome.AI, None, epoch, seq, t * 1920, np.zeros(960, np.float32), codes)


def _other(outcome: Outcome, t: int) -> FrameOutcome:
    reason = FallbackReason.DEADLINE if outcome is Outcome.FALLBACK else None
    return FrameOutcome("s", outcome, reason, 0, 0, t * 1920, np.zeros(960, np.float32))


def test_each_packet_carries_the_subscribers_prefix():
    tx = AicSender.fixed(Layer(4))
    frames = [_ai(1, i, t=i) for i in range(3)]
    packets = [p for f in frames for p in tx.on_frame(f, max_n_q=32)]
    assert len(packets) == 3
    for f, p in zip(frames, packets, strict=True):
        parsed = AicPayload.parse(p.payload)
        assert parsed.n_q == 4 and parsed.epoch == 1
        np.testing.assert_array_equal(parsed.codes, f.codes[:4])
    assert AicPayload.parse(packets[0].payload).start and not AicPayload.parse(packets[1].payload).start
    # the stream's cap (publisher's request / operator) bounds a pinned layer too
    p = tx.on_frame(_ai(1, 3, t=3), max_n_q=2)[0]
    assert AicPayload.parse(p.payload).n_q == 2


def test_longer_packets_aggregate_and_never_span_an_epoch():
    tx = AicSender.fixed(Layer(8, 120))
    out = []
    for i in range(4):
        out += tx.on_frame(_ai(1, i, t=i), 32)
    assert len(out) == 1 and out[0].chunks == 3  # 120 ms: three chunks in one packet
    p = AicPayload.parse(out[0].payload)
    assert p.n_frames == 9 and p.start and out[0].timestamp == 0
    np.testing.assert_array_equal(p.codes[:, 3:6], _ai(1, 1).codes[:8])
    # a new epoch starts: the pending chunk goes out alone first
    out = tx.on_frame(_ai(2, 0, t=4), 32)
    assert [AicPayload.parse(x.payload).n_frames for x in out] == [3]
    assert AicPayload.parse(out[0].payload).epoch == 1
    # a fallback frame flushes too (its Opus packets are sent by the caller after these)
    out = tx.on_frame(_other(Outcome.FALLBACK, 5), 32)
    assert len(out) == 1 and AicPayload.parse(out[0].payload).start


def test_phased_senders_send_their_long_packets_on_different_ticks():
    """Three subscribers that start together at 120 ms packets, with the phases a bridge
    gives them: each tick one of them sends, every packet after its first holds three chunks,
    all frames reach each one in order, and the fast path agrees with `on_frame`."""
    senders = [AicSender.fixed(Layer(8, 120)) for _ in range(3)]
    quick = [AicSender.fixed(Layer(8, 120)) for _ in range(3)]
    for k, (a, b) in enumerate(zip(senders, quick, strict=True)):
        a.phase = b.phase = k
    sent: list[list[int]] = [[] for _ in range(3)]  # ticks each one sent on
    frames_sent = [0, 0, 0]
    for t in range(12):
        fo = _ai(1, t, t=t)
        for k in range(3):
            out = senders[k].on_frame(fo, 32)
            q = quick[k].one_packet(fo, 32, {})
            assert (q is False) == (out == [])
            if out:
                assert q[0] == out[0].payload and q[1] == out[0].timestamp
                sent[k].append(t)
                frames_sent[k] += out[0].chunks
                assert out[0].chunks == 3 or len(sent[k]) == 1  # only the first is shorter
    assert sent == [[2, 5, 8, 11], [1, 4, 7, 10], [0, 3, 6, 9]]
    assert [len({t % 3 for t in s}) for s in sent] == [1, 1, 1]
    assert frames_sent == [12, 11, 10]  # the rest wait for their packet


def test_a_frame_shallower_than_the_layer_sends_what_it_has():
    tx = AicSender.fixed(Layer(32, 80))
    out = tx.on_frame(_ai(1, 0, n_q=32), 32) + tx.on_frame(_ai(1, 1, n_q=8, t=1), 32)
    assert AicPayload.parse(out[0].payload).n_q == 8


def test_dtx_sends_one_silence_descriptor_then_nothing_and_marks_the_next_talk_spurt():
    tx = AicSender.fixed(Layer(8))
    tx.on_frame(_ai(3, 0), 32)
    sids = []
    for t in range(1, 60):
        sids += tx.on_frame(_other(Outcome.DTX, t), 32)
    assert len(sids) == 1 and sids[0].sid and sids[0].timestamp == 1920
    assert AicPayload.parse(sids[0].payload).is_sid and AicPayload.parse(sids[0].payload).epoch == 3
    (back,) = tx.on_frame(_ai(4, 0, t=60), 32)
    assert back.marker and AicPayload.parse(back.payload).start
    # the next silence gets its descriptor again
    assert len(tx.on_frame(_other(Outcome.DTX, 61), 32)) == 1


def test_dtx_can_repeat_the_silence_descriptor_every_400_ms():
    tx = AicSender.fixed(Layer(8))
    tx.sid_interval_ticks = SID_INTERVAL_TICKS
    tx.on_frame(_ai(3, 0), 32)
    sids = []
    for t in range(1, 1 + 2 * SID_INTERVAL_TICKS + 1):
        sids += tx.on_frame(_other(Outcome.DTX, t), 32)
    assert len(sids) == 3 and all(p.sid for p in sids)
    assert [p.timestamp // 1920 for p in sids] == [1, 1 + SID_INTERVAL_TICKS, 1 + 2 * SID_INTERVAL_TICKS]
    assert all(AicPayload.parse(p.payload).is_sid and AicPayload.parse(p.payload).epoch == 3 for p in sids)
    (back,) = tx.on_frame(_ai(4, 0, t=40), 32)
    assert back.marker and AicPayload.parse(back.payload).start
    (next_,) = tx.on_frame(_ai(4, 1, t=41), 32)
    assert not next_.marker


def test_without_rate_control_the_full_depth_goes_in_its_default_packet_duration():
    tx = AicSender.full_depth()
    out = [p for i in range(3) for p in tx.on_frame(_ai(1, i, t=i), max_n_q=8)]
    assert tx.layer == Layer(8, 120)  # 6 kbps: 120 ms packets (rate_control.min_packet_ms)
    assert len(out) == 1 and AicPayload.parse(out[0].payload).n_frames == 9
    out = tx.on_frame(_ai(1, 3, t=3), max_n_q=32)
    assert tx.layer == Layer(32, 40) and len(out) == 1
    # a pinned layer keeps its own packet duration
    assert AicSender.fixed(Layer(8, 40)).choose(8) == Layer(8, 40)


def test_the_packet_policy_is_an_operator_setting(monkeypatch):
    """AURALINK_MAX_HEADER_SHARE=1: 40 ms packets whenever the link allows (lowest latency)."""
    from sfu_bridge.config import BridgeConfig
    from sfu_bridge.rate_control import DEFAULT_MAX_HEADER_SHARE

    assert BridgeConfig.from_env().max_header_share == DEFAULT_MAX_HEADER_SHARE
    monkeypatch.setenv("AURALINK_MAX_HEADER_SHARE", "1")
    share = BridgeConfig.from_env().max_header_share
    assert share == 1.0
    assert AicSender.full_depth(share).choose(8) == Layer(8, 40)
    assert AicSender.adaptive(RateControlConfig(max_header_share=share)).choose(8) == Layer(8, 40)
    assert AicSender.adaptive().choose(8) == Layer(8, 120)
    monkeypatch.setenv("AURALINK_MAX_HEADER_SHARE", "0")
    with pytest.raises(ValueError, match=r"AURALINK_MAX_HEADER_SHARE must be in \(0, 1\]"):
        BridgeConfig.from_env()


def test_a_new_pin_or_cap_takes_effect_on_the_next_frame():
    """`choose` remembers its choice for an unchanged pin and cap, and only for those."""
    tx = AicSender.fixed(Layer(8, 40))
    assert tx.on_frame(_ai(1, 0), 32)[0].n_q == 8
    tx.pinned = Layer(4, 40)  # what MediaBridge.pin_layer does
    assert tx.on_frame(_ai(1, 1, t=1), 32)[0].n_q == 4
    assert tx.on_frame(_ai(1, 2, t=2), 2)[0].n_q == 2 and tx.layer == Layer(2, 40)
    assert tx.on_frame(_ai(1, 3, t=3), 32)[0].n_q == 4 and tx.layer == Layer(4, 40)



def _sent(tx: AicSender, fo: FrameOutcome, cap: int, cache: dict) -> list[tuple]:
    return [(p.payload, p.timestamp, p.marker) for p in tx.on_frame(fo, cap, cache)]


def _sent_quick(tx: AicSender, fo: FrameOutcome, cap: int, cache: dict, taken: dict) -> list[tuple]:
    """media.py's way: `one_packet` for the common packet, `on_frame` for the rest."""
    one = tx.one_packet(fo, cap, cache)
    taken[one is not None] += 1
    if one is None:
        return _sent(tx, fo, cap, cache)
    return [] if one is False else [one]


@pytest.mark.parametrize("seed", range(4))
def test_the_one_packet_shortcut_sends_and_moves_state_exactly_as_on_frame(seed):
    """On random frame sequences (talk spurts, DTX, fallbacks, epoch changes, caps, 40-120 ms
    layers) a sender driven the way media.py drives it sends the same packets as one driven
    by `on_frame` alone, and ends in the same state."""
    rng = np.random.default_rng(seed)
    layers = [Layer(4), Layer(8), Layer(2, 80), Layer(2, 120), Layer(32)]
    plain, quick = AicSender.fixed(Layer(8)), AicSender.fixed(Layer(8))
    plain.sid_interval_ticks = quick.sid_interval_ticks = 3
    sent_plain: list[tuple] = []
    sent_quick: list[tuple] = []
    taken = {True: 0, False: 0}  # shortcut taken / not
    epoch, seq = 1, 0
    for t in range(400):
        if rng.random() < 0.05:
            plain.pinned = quick.pinned = layers[rng.integers(len(layers))]
        cap = int(rng.choice([32, 32, 32, 4, 2]))
        r = rng.random()
        if r < 0.7:
            if rng.random() < 0.05:
                epoch, seq = epoch + 1, 0
            fo = _ai(epoch, seq, n_q=int(rng.choice([32, 32, 16, 2])), t=t)
            seq += 1
        else:
            fo = _other(Outcome.DTX if r < 0.85 else Outcome.FALLBACK, t)
        cache: dict = {}  # one tick's packing cache, shared: the first sender packs, the other finds it
        if t % 2:
            sent_plain += _sent(plain, fo, cap, cache)
            sent_quick += _sent_quick(quick, fo, cap, cache, taken)
        else:
            sent_quick += _sent_quick(quick, fo, cap, cache, taken)
            sent_plain += _sent(plain, fo, cap, cache)
    assert taken[True] > 50 and taken[False] > 50  # both paths were taken
    assert sent_quick == sent_plain
    for attr in ("packets", "sids", "bytes_by_n_q", "layer", "silent", "_last_epoch", "_marker", "_sid_wait"):
        assert getattr(quick, attr) == getattr(plain, attr), attr
