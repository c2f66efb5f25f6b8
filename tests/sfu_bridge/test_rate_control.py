"""Per-subscriber rate controller on traces: a bottleneck link model, noise, RTCP arithmetic."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from sfu_bridge.rate_control import (
    Feedback,
    Layer,
    RateControlConfig,
    RateController,
    Reason,
    ReceiverReportTracker,
    ReportBlock,
    SenderReportClock,
    best_layer,
    default_layer,
    ladder,
    min_packet_ms,
    payload_bytes,
    wire_kbps,
)

OVERHEAD = RateControlConfig().overhead_bytes


@dataclass
class Link:
    """A drop-tail bottleneck (what `tc ... tbf` is): a byte queue served at `capacity_kbps`,
    at most `buffer_ms` of it; the RTT is the base RTT plus the queue's delay."""

    capacity_kbps: float
    buffer_ms: float = 300.0
    base_rtt_s: float = 0.030
    queue_bytes: float = 0.0

    def carry(self, layer: Layer, dt: float) -> tuple[int, int, float, float]:
        """Send `layer` for `dt` s -> (packets sent, packets lost, RTT, received kbit/s)."""
        size = OVERHEAD + payload_bytes(layer.n_q, layer.packet_ms)
        packets = round(dt * 1000.0 / layer.packet_ms)
        cap_bytes = self.capacity_kbps * 1000.0 / 8.0 * dt
        limit = self.capacity_kbps * 1000.0 / 8.0 * self.buffer_ms / 1000.0
        q = self.queue_bytes + packets * size
        served = min(q, cap_bytes)
        q -= served
        overflow = max(0.0, q - limit)
        lost = min(packets, round(overflow / size))
        self.queue_bytes = q - lost * size
        rtt = self.base_rtt_s + self.queue_bytes * 8.0 / (self.capacity_kbps * 1000.0)
        return packets, lost, rtt, served * 8.0 / dt / 1000.0


def drive(ctl: RateController, capacity, seconds: float, *, max_n_q: int = 16, seed: int = 1,
          random_loss: float = 0.0, rtt_noise_s: float = 0.0, t0: float = 0.0,
          link: Link | None = None, rtt_seen: bool = True):
    """Feed the controller one report per 0.5-1.5 s (RFC 3550's randomised interval) from
    a link whose capacity at time t is `capacity(t)`. Yields (t, layer, lost, sent).
    `rtt_seen=False`: the reports show the base RTT only (the sender reports that measure it
    wait in the same queue, so a filling queue shows in the RTT a report or two late)."""
    rng = random.Random(seed)
    link = link or Link(capacity(t0))
    t = t0
    layer = ctl.layer(max_n_q)
    out = []
    while t < t0 + seconds:
        dt = 0.5 + rng.random()
        link.capacity_kbps = capacity(t)
        sent, lost, rtt, recv = link.carry(layer, dt)
        if random_loss:
            extra = sum(rng.random() < random_loss for _ in range(sent - lost))
            lost += extra
            recv *= (sent - lost) / max(1, sent - lost + extra)
        t += dt
        rtt = rtt if rtt_seen else link.base_rtt_s
        fb = Feedback(at=t, loss_fraction=lost / sent if sent else 0.0, expected=sent, lost=lost,
                      rtt_s=rtt + rng.uniform(-rtt_noise_s, rtt_noise_s), received_kbps=recv,
                      sent_kbps=wire_kbps(layer.n_q, layer.packet_ms))
        layer = ctl.update(fb, max_n_q).layer
        out.append((t, layer, lost, sent))
    return out


def test_ladder_rises_in_quality_and_in_rate():
    for share in (1.0, 1.0 / 3.0):
        rungs = ladder(32, max_header_share=share)
        kbps = [k for _, k in rungs]
        assert kbps == sorted(kbps) and len(set(kbps)) == len(kbps)
        assert rungs[-1][0] == Layer(32, 40) and rungs[0][0] == Layer(2, 120)
    # at 6 kbps (8 books, 40 ms) headers are over half of the wire rate
    assert wire_kbps(8, 40) == pytest.approx((56 + 4 + 30) * 8 / 40)
    assert best_layer(12.0, max_n_q=8) == Layer(8, 120)
    assert best_layer(1.0) == Layer(2, 120)  # nothing fits: the cheapest rung
    assert best_layer(100.0, max_n_q=8) == Layer(8, 120)  # 6 kbps: 120 ms packets (policy)
    assert best_layer(100.0, max_n_q=8, max_header_share=1.0) == Layer(8, 40)
    assert best_layer(100.0, max_n_q=16) == Layer(16, 80)


def test_packet_duration_policy_keeps_headers_within_a_third_of_the_wire_bytes():
    assert {n_q: min_packet_ms(n_q) for n_q in (2, 4, 8, 16, 32)} == {
        2: 120, 4: 120, 8: 120, 16: 80, 32: 40}
    for n_q in (16, 32):
        ms = min_packet_ms(n_q)
        assert OVERHEAD <= (OVERHEAD + payload_bytes(n_q, ms)) / 3  # this one fits the bound
        if ms > 40:  # ...and the next shorter one does not
            assert OVERHEAD > (OVERHEAD + payload_bytes(n_q, ms - 40)) / 3
    assert default_layer(8) == Layer(8, 120)
    # 6 kbps: about 10 kbit/s on the wire instead of 18 (for 80 ms more packetisation delay)
    assert wire_kbps(8, 120) == pytest.approx((56 + 4 + 90) * 8 / 120)
    assert all(min_packet_ms(n_q, max_header_share=1.0) == 40 for n_q in (2, 4, 8, 16, 32))


def test_congestion_onset_steps_down_within_three_reports_and_then_loses_little():
    ctl = RateController()
    ample = drive(ctl, lambda t: 100.0, 10.0)
    assert ample[-1][1] == Layer(16, 80)
    trace = drive(ctl, lambda t: 12.0, 40.0, t0=10.0, link=Link(12.0))
    first_fit = next(i for i, (_, layer, _, _) in enumerate(trace) if wire_kbps(layer.n_q, layer.packet_ms) <= 12.0)
    assert first_fit < 3, trace[:5]
    settled = [r for r in trace if r[0] > 15.0]
    lost = sum(r[2] for r in settled)
    sent = sum(r[3] for r in settled)
    assert lost / sent < 0.02, (lost, sent)
    # it uses the link (no collapse to the bottom rung) and probes above it rarely: the next
    # rung (16 books) is a third above the link, and failed probes back off to one per
    # `max_hold_s`, each judged on its first report
    rates = [wire_kbps(r[1].n_q, r[1].packet_ms) for r in settled]
    assert sum(rates) / len(rates) >= 0.75 * 12.0
    probes = sum(1 for a, b in zip(rates, rates[1:], strict=False) if a <= 12.0 < b)
    assert probes <= (settled[-1][0] - settled[0][0]) / RateControlConfig().max_hold_s
    assert sum(1 for k in rates if k > 13.0) <= 0.15 * len(rates)


def test_a_filling_queue_steps_down_on_the_rate_shortfall_before_its_delay_shows():
    """The bench's tbf link: a queue of ~1.5 s that drops only when full, and RTTs that show
    the queue late. The receiver getting ~2/3 of what is sent is the first sign."""
    for seed in (1, 2, 3):
        ctl = RateController()
        drive(ctl, lambda t: 100.0, 10.0, seed=seed)
        link = Link(12.0, buffer_ms=1500.0)
        trace = drive(ctl, lambda t: 12.0, 30.0, t0=10.0, link=link, rtt_seen=False, seed=seed)
        first_fit = next(i for i, (_, layer, _, _) in enumerate(trace)
                         if wire_kbps(layer.n_q, layer.packet_ms) <= 12.0)
        assert first_fit <= 1, trace[:4]
        lost = sum(r[2] for r in trace)
        assert lost / sum(r[3] for r in trace) < 0.02, trace


def test_a_shortfall_needs_enough_packets_and_a_clear_gap():
    ctl = RateController(start_kbps=18.0)
    fb = dict(loss_fraction=0.0, lost=0, rtt_s=0.03, sent_kbps=18.0)
    # a receiver hiccup moves packets between two intervals: -25 % then +25 %
    for i in range(7):
        d = ctl.update(Feedback(at=float(i), expected=25, received_kbps=13.5 if i % 2 else 22.5, **fb), 16)
        assert d.reason is Reason.STEADY and d.layer == Layer(16, 80)
    # DTX: a few packets (the end of a talk spurt) say little about the link
    d = ctl.update(Feedback(at=7.0, loss_fraction=0.0, lost=0, rtt_s=0.03, expected=5,
                            received_kbps=2.0, sent_kbps=4.0), 16)
    assert d.reason is Reason.STEADY
    d = ctl.update(Feedback(at=8.0, expected=20, received_kbps=9.6, **fb), 16)
    assert d.reason is Reason.RATE and d.target_kbps == pytest.approx(0.85 * 9.6)
    assert d.layer == Layer(4, 120)


def test_recovers_to_the_requested_layer_after_the_limit_lifts():
    ctl = RateController()
    drive(ctl, lambda t: 12.0, 30.0, link=Link(12.0))
    assert ctl.layer(16) != Layer(16, 80)
    trace = drive(ctl, lambda t: 1000.0, 20.0, t0=30.0, link=Link(1000.0))
    back = next(t for t, layer, _, _ in trace if layer == Layer(16, 80))
    assert back - 30.0 <= 10.0


def test_noise_below_the_thresholds_never_switches_the_layer():
    ctl = RateController()
    trace = drive(ctl, lambda t: 200.0, 300.0, random_loss=0.01, rtt_noise_s=0.03,
                  link=Link(200.0))
    assert {layer for _, layer, _, _ in trace} == {Layer(16, 80)}
    assert ctl.switches == 0


def test_failed_probes_back_off():
    ctl = RateController()
    drive(ctl, lambda t: 11.0, 120.0, link=Link(11.0))
    trace = drive(ctl, lambda t: 11.0, 120.0, t0=120.0, link=Link(11.0), seed=3)
    probes = sum(1 for a, b in zip(trace, trace[1:], strict=False) if wire_kbps(b[1].n_q, b[1].packet_ms) > 11.0
                 and wire_kbps(a[1].n_q, a[1].packet_ms) <= 11.0)
    # the hold doubles to `max_hold_s` (5 s): at most one probe per ~5 s plus its recovery
    assert probes <= 120.0 / 6.0
    lost = sum(r[2] for r in trace)
    assert lost / sum(r[3] for r in trace) < 0.02


def test_the_cap_applies_at_once_and_leaves_the_target_alone():
    ctl = RateController()
    assert ctl.layer(32) == Layer(32, 40)
    assert ctl.layer(4) == Layer(4, 120)
    assert ctl.layer(32) == Layer(32, 40)
    assert ctl.switches == 2


def test_delay_rise_alone_steps_down_before_any_loss():
    ctl = RateController(start_kbps=18.0)
    for i in range(5):
        ctl.update(Feedback(at=float(i), loss_fraction=0.0, expected=25, lost=0, rtt_s=0.03,
                            received_kbps=18.0), 16)
    d1 = ctl.update(Feedback(at=5.0, loss_fraction=0.0, expected=25, lost=0, rtt_s=0.20,
                             received_kbps=14.0), 16)
    assert d1.reason is Reason.STEADY  # one high sample is not yet congestion
    # the receiver gets 78 % of what is sent: short, but not short enough on its own
    d2 = ctl.update(Feedback(at=6.0, loss_fraction=0.0, expected=25, lost=0, rtt_s=0.25,
                             received_kbps=14.0, sent_kbps=18.0), 16)
    assert d2.reason is Reason.DELAY
    assert d2.target_kbps == pytest.approx(0.85 * 14.0)
    assert d2.layer == Layer(8, 120)


def test_delay_without_a_rate_shortfall_is_not_congestion():
    """A slow event loop delays reports; a bottleneck also caps what arrives."""
    ctl = RateController(start_kbps=18.0)
    for i in range(3):
        ctl.update(Feedback(at=float(i), loss_fraction=0.0, expected=25, lost=0, rtt_s=0.03,
                            received_kbps=17.6, sent_kbps=18.0), 16)
    for i in range(3, 8):
        d = ctl.update(Feedback(at=float(i), loss_fraction=0.0, expected=25, lost=0, rtt_s=0.45,
                                received_kbps=17.8, sent_kbps=18.0), 16)
        assert d.reason is Reason.STEADY and d.layer == Layer(16, 80)


def test_feedback_timeout_backs_off():
    ctl = RateController()
    assert ctl.check_timeout(0.0) is None
    assert ctl.check_timeout(4.0) is None
    d = ctl.check_timeout(5.5)
    assert d is not None and d.reason is Reason.TIMEOUT
    assert d.target_kbps == pytest.approx(0.7 * wire_kbps(32, 40))


def test_receiver_reports_become_feedback():
    clock = SenderReportClock()
    ntp = (3_900_000_000 << 32) | 0x4000_0000
    clock.sent(ntp, at=100.0)
    tr = ReceiverReportTracker(clock)
    lsr = SenderReportClock.lsr_of(ntp)
    first = tr.feedback(ReportBlock(fraction_lost=0, packets_lost=0, highest_sequence=70_000,
                                    jitter=480, lsr=lsr, dlsr=65536 // 2), now=100.6)
    assert first.expected is None
    assert first.rtt_s == pytest.approx(0.1)
    assert first.jitter_s == pytest.approx(0.010)
    for _ in range(25):
        tr.sent(92)
    fb = tr.feedback(ReportBlock(fraction_lost=26, packets_lost=5, highest_sequence=70_025,
                                 jitter=0, lsr=0x1234_5678, dlsr=0), now=101.6)
    assert (fb.expected, fb.lost) == (25, 5)
    assert fb.loss_fraction == pytest.approx(0.2)
    assert fb.rtt_s is None  # an LSR we never sent gives no RTT
    assert fb.received_kbps == pytest.approx(20 * 92 * 8 / 1.0 / 1000.0)
    # a report with no SR echoed (LSR 0) gives no RTT either
    assert clock.rtt(0, 0, 200.0) is None


# Receiver reports from `auralink bench adaptive`'s constrained link (12 kbit/s tbf, the
# publisher asking for 12 kbps): (s after the limit, expected, lost, RTT ms, received kbit/s,
# sent kbit/s). The sender reports wait in the same queue, so the RTT shows the queue a
# report after the rate does.
BENCH_LIMIT_TRACE = [
    (-3.77, 15, 0, 7.2, 17.33, 17.33), (-2.5, 16, 0, 1.5, 18.13, 18.13),
    (-1.31, 15, 0, 0.9, 18.14, 18.14), (0.03, 17, 0, 1.1, 18.35, 18.35),
    (0.83, 10, 0, 0.9, 17.93, 17.93), (1.46, 7, 0, 0.9, 16.13, 18.43),
    (2.94, 11, 0, 46.0, 10.7, 17.52), (4.13, 9, 0, 898.0, 6.35, 7.05),
    (5.4, 13, 0, 890.8, 6.79, 5.23), (6.64, 17, 0, 264.6, 9.08, 5.87),
    (7.26, 5, 0, 264.3, 5.38, 5.38),
]


def test_one_decrease_per_congestion_event_on_a_bench_trace():
    ctl = RateController()
    decisions = [ctl.update(Feedback(at=t, loss_fraction=lost / exp, expected=exp, lost=lost,
                                     rtt_s=rtt / 1000.0, received_kbps=rx, sent_kbps=tx), 16)
                 for t, exp, lost, rtt, rx, tx in BENCH_LIMIT_TRACE]
    reasons = [d.reason for d in decisions]
    assert reasons[:6] == [Reason.STEADY] * 6
    # the first report whose rate falls short steps down, to 0.85 x what arrived...
    assert reasons[6] is Reason.RATE and decisions[6].target_kbps == pytest.approx(0.85 * 10.7)
    assert decisions[6].layer == Layer(4, 120)
    # ...and the old queue's delay, seen a report later, is not a second congestion event
    assert reasons[7] is Reason.SETTLING
    assert Reason.DELAY not in reasons and Reason.LOSS not in reasons
    assert {d.layer for d in decisions[6:]} == {Layer(4, 120)}
