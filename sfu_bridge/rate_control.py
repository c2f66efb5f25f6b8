"""Per-subscriber rate control: which layer (codebooks) and packet duration a subscriber gets.

EnCodec's codes are residual: the first k of a frame's codebooks are a valid stream at a lower
bitrate (k = 2, 4, 8, 16, 32 for 1.5 ... 24 kbps). The bridge encodes a stream once and sends
each AIC subscriber a prefix; this module decides, for one subscriber, how deep that prefix is
and how many 40 ms chunks go in one RTP packet (40/80/120 ms). At 1.5-6 kbps the packet
headers (IPv4+UDP 28, RTP 12, SRTP tag 16) are most of the bits, so a longer packet is the
cheaper lever before a shallower layer - libwebrtc's audio network adaptor (frame-length and
bitrate controllers) moves the same two levers.

Packet duration policy: each depth has a shortest packet duration, the shortest whose headers
are at most `max_header_share` (a third) of its wire bytes, or 120 ms when none is (1.5-6
kbps: 120 ms, 12 kbps: 80 ms, 24 kbps: 40 ms). A publisher asking for 6 kbps gets ~10 kbit/s
on the wire instead of ~18 at 40 ms, for 80 ms more packetisation delay. libwebrtc's
frame-length controller (v2) decides the same way - the shortest frame whose payload keeps a
minimum share of the bitrate after the per-packet overhead - with the network's target
bitrate where this uses the depth the stream is sent at. The controller may still choose
longer packets than the minimum under congestion.

Inputs are what the subscriber's RTCP says (RFC 3550 section 6.4): each receiver-report block
for our SSRC gives the cumulative loss and the extended highest sequence number (so the
packets received and lost since the previous report), the interarrival jitter, and LSR/DLSR,
from which the round-trip time is `now - sent(LSR) - DLSR` (section 6.4.1). `Feedback` is the
transport-neutral sample the controller consumes; `feedback_from_rr` builds it from receiver
reports. (Transport-wide congestion control feedback would build the same sample; aiortc
does not negotiate it for audio, so nothing produces one today.)

The controller keeps a target wire rate (kbit/s, headers included) and maps it to the best
layer that fits. Loss- and delay-based, with hysteresis:

- decrease when the receiver got clearly less than we sent over a report interval with
  enough packets in it (`rate_decrease_ratio`): a bottleneck's queue is filling; this is
  the earliest signal, a report or two before its delay (the sender reports that measure
  the RTT wait in the same queue) or its drops show;
- decrease when the smoothed loss is high (>= `loss_decrease` with at least `min_lost`
  packets lost in the window) or when the queueing delay (RTT above the lowest RTT seen)
  stays above `delay_decrease_ms` for two reports in a row, or is far above it once, while
  the receiver gets clearly less than we send (a bottleneck both queues and caps the rate;
  a busy event loop only delays): the target drops to `decrease_factor` x the rate the
  subscriber actually received;
- increase, one rung per report, only when loss is low AND the queueing delay is small AND
  `hold_s` has passed since the last decrease; an increase that is followed by a decrease
  within `probe_window_s` doubles the hold (up to `max_hold_s`), so a link at its limit is
  probed ever more rarely; a long quiet spell resets it;
- the rate received when the last decrease happened is the link's estimated capacity: a
  rung up to `capacity_margin` above it is tried after the hold, a rung far above it only
  after the current rung has held for `confirm_s` (a small step whose queue builds slowly
  must show itself in the delay before a big step overflows the queue);
- after a decrease, reports are not judged for `min_decrease_interval_s` plus the RTT they
  measure: the queue that caused the decrease drains meanwhile, and its delay and drops are
  not news (GCC likewise decreases at most once per 300 ms + RTT);
- in between nothing moves: noise that crosses neither threshold never flips the layer, and
  since the layer is a function of the target, which only moves on decisions, the choice
  cannot flap between two rungs.

Pure logic: no aiortc, no clock of its own (every call takes `now`), no I/O.
"""

from __future__ import annotations

import enum
import functools
import math
from collections import deque
from dataclasses import dataclass, field

from models.bitpack import packed_size

N_Q_LADDER = (2, 4, 8, 16, 32)  # codebooks of 1.5, 3, 6, 12, 24 kbps
PACKET_MS = (40, 80, 120)  # whole 40 ms chunks per RTP packet: 1, 2 or 3
CHUNK_MS = 40
FRAMES_PER_CHUNK = 3  # EnCodec frames (13.33 ms) in one 40 ms chunk
AIC_HEADER_BYTES = 4  # sfu_bridge/aic_payload.py
# IPv4 (20) + UDP (8) + RTP fixed header (12) + SRTP tag (16: AEAD_AES_*_GCM, which aiortc
# and browsers negotiate): what every packet costs beyond its payload. The MID extension
# (8 more) is only sent until the subscriber's first receiver report (media.RtpOut).
DEFAULT_OVERHEAD_BYTES = 56
# the shortest packet duration of a depth is the shortest whose headers are at most this
# share of its wire bytes (payload at least twice the headers)
DEFAULT_MAX_HEADER_SHARE = 1.0 / 3.0
RTP_SEQ_MODULUS = 1 << 16


# The layer arithmetic below is pure and its domain tiny (5 depths x 3 durations): memoised,
# since the rate controller asks for a layer per subscriber per tick.
@functools.lru_cache(maxsize=1024)
def payload_bytes(n_q: int, packet_ms: int) -> int:
    """AIC payload bytes of one packet carrying `packet_ms` of codes at depth `n_q`."""
    frames = FRAMES_PER_CHUNK * packet_ms // CHUNK_MS
    return AIC_HEADER_BYTES + packed_size(n_q, frames)


def wire_kbps(n_q: int, packet_ms: int, overhead_bytes: int = DEFAULT_OVERHEAD_BYTES) -> float:
    """Wire rate of a layer, headers included, in kbit/s."""
    return (overhead_bytes + payload_bytes(n_q, packet_ms)) * 8.0 / packet_ms


@functools.lru_cache(maxsize=1024)
def min_packet_ms(n_q: int, overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
                  max_header_share: float = DEFAULT_MAX_HEADER_SHARE) -> int:
    """The shortest packet duration for depth `n_q` (module docstring: packet duration policy)."""
    for ms in sorted(PACKET_MS):
        if overhead_bytes <= max_header_share * (overhead_bytes + payload_bytes(n_q, ms)):
            return ms
    return max(PACKET_MS)


@dataclass(frozen=True)
class Layer:
    """What one subscriber is sent: the first `n_q` codebooks, `packet_ms` per RTP packet."""

    n_q: int
    packet_ms: int = CHUNK_MS

    @property
    def chunks_per_packet(self) -> int:
        return self.packet_ms // CHUNK_MS

    @property
    def bandwidth_kbps(self) -> float:
        return self.n_q * 0.75  # 75 Hz x 10 bits per codebook


def default_layer(n_q: int, overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
                  max_header_share: float = DEFAULT_MAX_HEADER_SHARE) -> Layer:
    """Depth `n_q` in its shortest packet duration: what a subscriber with room gets."""
    return Layer(n_q, min_packet_ms(n_q, overhead_bytes, max_header_share))


@functools.lru_cache(maxsize=1024)
def ladder(max_n_q: int = 32, overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
           max_header_share: float = DEFAULT_MAX_HEADER_SHARE) -> tuple[tuple[Layer, float], ...]:
    """The layers worth using up to `max_n_q`, worst first, with their wire rates.

    Each depth comes in its packet durations from `min_packet_ms` up (`max_header_share`
    = 1 allows every duration). Quality ranks depth first (a deeper layer beats a shallower
    one whatever its packet duration), then shorter packets (less latency). A rung that
    costs at least as much as a better one is dropped, so the ladder rises in quality AND
    in wire rate, and `best_layer` picks the highest rung that fits.
    """
    ranked = [(Layer(n_q, ms), wire_kbps(n_q, ms, overhead_bytes))
              for n_q in N_Q_LADDER if n_q <= max_n_q
              for ms in sorted(PACKET_MS, reverse=True)
              if ms >= min_packet_ms(n_q, overhead_bytes, max_header_share)]
    out: list[tuple[Layer, float]] = []
    cheapest_above = math.inf
    for layer, kbps in reversed(ranked):
        if kbps < cheapest_above:
            out.append((layer, kbps))
            cheapest_above = kbps
    return tuple(out[::-1])


def best_layer(target_kbps: float, max_n_q: int = 32,
               overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
               max_header_share: float = DEFAULT_MAX_HEADER_SHARE) -> Layer:
    """The best rung whose wire rate fits `target_kbps` (the lowest rung if none does)."""
    rungs = ladder(max_n_q, overhead_bytes, max_header_share)
    for layer, kbps in reversed(rungs):
        if kbps <= target_kbps + 1e-9:
            return layer
    return rungs[0][0]


class Reason(str, enum.Enum):
    """Why the target moved (or did not) on a feedback sample."""

    RATE = "rate"  # the receiver got clearly less than was sent
    LOSS = "loss"
    DELAY = "delay"
    INCREASE = "increase"
    SETTLING = "settling"  # just after a decrease: its queue drains, nothing is judged
    HOLD = "hold"  # low loss and delay, but inside the hold after a decrease
    STEADY = "steady"  # between thresholds, or already at the top
    TIMEOUT = "timeout"  # no feedback for `feedback_timeout_s` while sending


@dataclass(frozen=True)
class Feedback:
    """One congestion-feedback sample about our stream, however it was reported.

    `expected` / `lost`: packets the receiver expected and lost since the previous sample
    (None on the first one); `rtt_s`: a round-trip time measured with this sample (None when
    the report did not echo a sender report we know); `received_kbps`: the rate the receiver
    got over the interval (None when unknown)."""

    at: float
    loss_fraction: float
    expected: int | None = None
    lost: int | None = None
    rtt_s: float | None = None
    jitter_s: float = 0.0
    received_kbps: float | None = None
    sent_kbps: float | None = None  # what we sent over the same interval


@dataclass
class RateControlConfig:
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES
    max_header_share: float = DEFAULT_MAX_HEADER_SHARE  # packet duration policy (docstring)
    # received < this x sent over one report interval of at least `rate_min_packets`
    # packets: congestion (a receiver or event-loop hiccup of a few hundred ms shifts
    # packets between two intervals by less; DTX intervals have too few packets to count)
    rate_decrease_ratio: float = 0.7
    rate_decrease_ratio_2: float = 0.85  # ...or this over two reports in a row
    rate_min_packets: int = 8
    # after a decrease, nothing is judged for this long plus the RTT now measured
    min_decrease_interval_s: float = 1.0
    loss_window_s: float = 2.5  # loss is smoothed over the reports of this window
    loss_decrease: float = 0.10  # GCC's "high loss" bound
    min_lost: int = 3  # ...and at least this many packets lost in the window
    loss_increase: float = 0.02  # at or below: "low loss"
    delay_decrease_ms: float = 150.0  # queueing delay that, twice in a row, means congestion
    delay_spike_ms: float = 300.0  # ...or once, this much
    # below: the queue is empty enough to probe upward (RTTs measured by an event loop on a
    # busy host wobble by tens of ms; a standing queue on a narrow link is hundreds)
    delay_increase_ms: float = 80.0
    # ...and a delay rise counts as congestion only while the receiver gets less than this
    # share of what we send (a bottleneck queues; a slow event loop delays without losing rate)
    delay_rate_ratio: float = 0.95
    min_rtt_window_s: float = 30.0
    decrease_factor: float = 0.85  # new target = this x the received rate
    blind_decrease_factor: float = 0.7  # ...or this x the old target when that rate is unknown
    increase_factor: float = 1.25  # at least one rung per increase
    hold_s: float = 2.0
    max_hold_s: float = 5.0
    probe_window_s: float = 4.0  # a decrease this soon after an increase: the probe failed
    capacity_margin: float = 1.1
    confirm_s: float = 2.5
    quiet_reset_s: float = 15.0  # no decrease for this long: the hold returns to `hold_s`
    feedback_timeout_s: float = 5.0


@dataclass
class Decision:
    layer: Layer
    target_kbps: float
    reason: Reason


@dataclass
class RateController:
    """One subscriber's controller. `update(feedback, now)` on each sample; `layer(max_n_q)`
    on every send (the cap - the publisher's requested bandwidth, the operator's cap - can
    change at any tick without touching the target)."""

    config: RateControlConfig = field(default_factory=RateControlConfig)
    start_kbps: float | None = None  # None: start at the top of the ladder (optimistic)
    target_kbps: float = 0.0
    switches: int = 0  # layer changes decided here (for metrics)
    last_reason: Reason = Reason.STEADY
    _losses: deque = field(default_factory=deque)  # (at, expected, lost)
    _rtts: deque = field(default_factory=deque)  # (at, rtt_s)
    _delay_high: int = 0
    _last_decrease: float = -math.inf
    _last_increase: float = -math.inf
    _hold_s: float = 0.0
    _last_feedback: float | None = None
    _last_layer: Layer | None = None
    _capacity_kbps: float | None = None  # received rate at the last decrease
    _rung: Layer | None = None  # the target's rung, and since when
    _rung_since: float = 0.0
    _prev_rates: tuple[float, float, int] | None = None  # last report: received, sent kbit/s, expected

    def __post_init__(self) -> None:
        top = self._ladder(32)[-1][1]
        self.target_kbps = top if self.start_kbps is None else float(self.start_kbps)
        self._hold_s = self.config.hold_s

    def _ladder(self, max_n_q: int) -> tuple[tuple[Layer, float], ...]:
        return ladder(max_n_q, self.config.overhead_bytes, self.config.max_header_share)

    def _best(self, max_n_q: int) -> Layer:
        return best_layer(self.target_kbps, max_n_q, self.config.overhead_bytes,
                          self.config.max_header_share)

    # -- derived signals ---------------------------------------------------------------------
    def smoothed_loss(self) -> tuple[float, int]:
        """(loss fraction, packets lost) over the loss window."""
        expected = sum(e for _, e, _ in self._losses)
        lost = sum(n for _, _, n in self._losses)
        return (lost / expected if expected > 0 else 0.0), lost

    def min_rtt(self) -> float | None:
        return min((r for _, r in self._rtts), default=None)

    def queue_delay_ms(self, rtt_s: float | None) -> float | None:
        base = self.min_rtt()
        if rtt_s is None or base is None:
            return None
        return max(0.0, (rtt_s - base) * 1000.0)

    # -- decisions ---------------------------------------------------------------------------
    def update(self, fb: Feedback, max_n_q: int = 32) -> Decision:
        cfg = self.config
        now = fb.at
        self._last_feedback = now
        if fb.expected is not None and fb.lost is not None and fb.expected > 0:
            self._losses.append((now, fb.expected, max(0, fb.lost)))
        elif fb.expected is None and fb.loss_fraction > 0:
            # first report: only the receiver's 8-bit fraction; count it as ~10 packets
            self._losses.append((now, 10, round(10 * fb.loss_fraction)))
        while self._losses and self._losses[0][0] < now - cfg.loss_window_s:
            self._losses.popleft()
        if fb.rtt_s is not None and fb.rtt_s >= 0:
            self._rtts.append((now, fb.rtt_s))
        while self._rtts and self._rtts[0][0] < now - cfg.min_rtt_window_s:
            self._rtts.popleft()

        loss, lost = self.smoothed_loss()
        qd = self.queue_delay_ms(fb.rtt_s)
        if qd is not None and qd > cfg.delay_decrease_ms:
            self._delay_high += 1
        elif qd is not None:
            self._delay_high = 0

        top = self._ladder(max_n_q)[-1][1]
        if self._settling(now, fb.rtt_s):
            # the queue that caused the last decrease is still draining: what this report shows
            # is that queue's, not the new rate's (GCC: one decrease per 300 ms + RTT)
            self._prev_rates = None
            self._losses.clear()
            self._delay_high = 0
            reason = Reason.SETTLING
        elif self._rate_shortfall(fb):
            self._decrease(fb, now)
            # the drops and delay that follow are that same queue's: judge the new rate afresh
            self._losses.clear()
            self._delay_high = 0
            self._prev_rates = None
            reason = Reason.RATE
        elif loss >= cfg.loss_decrease and lost >= cfg.min_lost:
            self._decrease(fb, now)
            self._losses.clear()  # the next decision sees the new rate's loss only
            reason = Reason.LOSS
        elif (qd is not None and self._rate_short(fb)
              and (self._delay_high >= 2 or qd > cfg.delay_spike_ms
                   or (self._delay_high and self._probing(now)))):
            self._decrease(fb, now)
            self._delay_high = 0
            reason = Reason.DELAY
        elif loss <= cfg.loss_increase and (qd is None or qd < cfg.delay_increase_ms):
            if now - self._last_decrease < self._hold_s:
                reason = Reason.HOLD
            elif self.target_kbps >= top:
                reason = Reason.STEADY
            elif not self._may_climb(now, max_n_q):
                reason = Reason.HOLD
            else:
                self._increase(now, max_n_q)
                reason = Reason.INCREASE
        else:
            reason = Reason.STEADY
        if now - self._last_decrease >= cfg.quiet_reset_s:
            self._hold_s = cfg.hold_s
        self.target_kbps = min(self.target_kbps, top)
        rung = self._best(max_n_q)
        if rung != self._rung:
            self._rung, self._rung_since = rung, now
        elif (self._capacity_kbps is not None
              and reason not in (Reason.RATE, Reason.LOSS, Reason.DELAY) and now - self._rung_since >= cfg.confirm_s
              and wire_kbps(rung.n_q, rung.packet_ms, cfg.overhead_bytes)
              > self._capacity_kbps * cfg.capacity_margin):
            # a rung well above the old estimate held: that estimate is stale (the link grew)
            self._capacity_kbps = None
        self.last_reason = reason
        return Decision(self.layer(max_n_q), self.target_kbps, reason)

    def _rate_shortfall(self, fb: Feedback) -> bool:
        """The receiver got clearly less than we sent: over this report's interval, or a
        little less over this one and the previous one together (a hiccup that moves packets
        from one interval to the next cancels out over the two; a queue that fills does not)."""
        cfg = self.config
        prev, self._prev_rates = self._prev_rates, None
        if fb.received_kbps is None or not fb.sent_kbps or not fb.expected:
            return False
        self._prev_rates = (fb.received_kbps, fb.sent_kbps, fb.expected)
        if (fb.expected >= cfg.rate_min_packets
                and fb.received_kbps < cfg.rate_decrease_ratio * fb.sent_kbps):
            return True
        if prev is None or fb.expected + prev[2] < cfg.rate_min_packets:
            return False
        # each interval's received share, weighted by its packets
        share = ((fb.expected * fb.received_kbps / fb.sent_kbps + prev[2] * prev[0] / prev[1])
                 / (fb.expected + prev[2]))
        return share < cfg.rate_decrease_ratio_2

    def _settling(self, now: float, rtt_s: float | None) -> bool:
        return now - self._last_decrease < self.config.min_decrease_interval_s + (rtt_s or 0.0)

    def _probing(self, now: float) -> bool:
        """Just after an increase the new rung is on trial: one high delay sample ends it
        (before the queue it builds overflows) where a steady rung needs two."""
        return now - self._last_increase <= self.config.probe_window_s and self._last_increase > self._last_decrease

    def _rate_short(self, fb: Feedback) -> bool:
        if fb.received_kbps is None or not fb.sent_kbps:
            return True  # no rates to compare: the delay alone decides
        return fb.received_kbps < self.config.delay_rate_ratio * fb.sent_kbps

    def _decrease(self, fb: Feedback, now: float) -> None:
        cfg = self.config
        if fb.received_kbps is not None and fb.received_kbps > 0:
            new = cfg.decrease_factor * fb.received_kbps
        else:
            new = cfg.blind_decrease_factor * self.target_kbps
        self.target_kbps = min(self.target_kbps, new)
        if fb.received_kbps is not None and fb.received_kbps > 0:
            self._capacity_kbps = fb.received_kbps
        if now - self._last_increase <= cfg.probe_window_s:
            self._hold_s = min(cfg.max_hold_s, self._hold_s * 2.0)
        self._last_decrease = now

    def _next_rung_kbps(self, max_n_q: int) -> float:
        rungs = self._ladder(max_n_q)
        current = self._best(max_n_q)
        rank = next(i for i, (layer, _) in enumerate(rungs) if layer == current)
        return rungs[rank + 1][1] if rank + 1 < len(rungs) else rungs[-1][1]

    def _may_climb(self, now: float, max_n_q: int) -> bool:
        cap = self._capacity_kbps
        if cap is None or self._next_rung_kbps(max_n_q) <= cap * self.config.capacity_margin:
            return True
        return now - self._rung_since >= self.config.confirm_s

    def _increase(self, now: float, max_n_q: int) -> None:
        cfg = self.config
        next_rung = self._next_rung_kbps(max_n_q)
        self.target_kbps = max(self.target_kbps * cfg.increase_factor, next_rung)
        self._last_increase = now

    def check_timeout(self, now: float) -> Decision | None:
        """No feedback for `feedback_timeout_s` while sending: the reverse path or the link
        is gone; back off once per timeout period (libwebrtc does the same)."""
        if self._last_feedback is None:
            self._last_feedback = now
            return None
        if now - self._last_feedback < self.config.feedback_timeout_s:
            return None
        self._last_feedback = now
        self.target_kbps *= self.config.blind_decrease_factor
        self._last_decrease = now
        self.last_reason = Reason.TIMEOUT
        return Decision(self.layer(), self.target_kbps, Reason.TIMEOUT)

    def layer(self, max_n_q: int = 32) -> Layer:
        """The layer to send now under the cap `max_n_q`; counts a switch when it changes."""
        chosen = self._best(max_n_q)
        if self._last_layer is not None and chosen != self._last_layer:
            self.switches += 1
        self._last_layer = chosen
        return chosen


# -- RTCP receiver reports -> Feedback -------------------------------------------------------

RTP_CLOCK = 48_000


@dataclass(frozen=True)
class ReportBlock:
    """The fields of one RTCP report block (RFC 3550 section 6.4.1) about our SSRC."""

    fraction_lost: int  # 8 bits: lost / expected since the previous report, x 256
    packets_lost: int  # cumulative, 24-bit signed
    highest_sequence: int  # extended highest sequence number received
    jitter: int  # interarrival jitter, RTP timestamp units
    lsr: int  # middle 32 bits of the NTP timestamp of the last SR received (0: none)
    dlsr: int  # delay since that SR, 1/65536 s


class SenderReportClock:
    """Remembers when each of our sender reports left, to turn LSR/DLSR into an RTT."""

    def __init__(self, keep: int = 16) -> None:
        self._sent: deque[tuple[int, float]] = deque(maxlen=keep)

    @staticmethod
    def lsr_of(ntp_timestamp: int) -> int:
        """The middle 32 bits of a 64-bit NTP timestamp: what a report echoes as LSR."""
        return (ntp_timestamp >> 16) & 0xFFFFFFFF

    def sent(self, ntp_timestamp: int, at: float) -> None:
        self._sent.append((self.lsr_of(ntp_timestamp), at))

    def rtt(self, lsr: int, dlsr: int, now: float) -> float | None:
        """RFC 3550 6.4.1: RTT = arrival - LSR - DLSR, when LSR is one of ours."""
        if lsr == 0:
            return None
        for sent_lsr, at in reversed(self._sent):
            if sent_lsr == lsr:
                rtt = now - at - dlsr / 65536.0
                return rtt if rtt >= 0 else 0.0
        return None


class ReceiverReportTracker:
    """Turns one subscriber's successive report blocks (and what we sent) into `Feedback`."""

    def __init__(self, clock: SenderReportClock | None = None) -> None:
        self.clock = clock or SenderReportClock()
        self._prev: tuple[float, int, int] | None = None  # (at, highest, cumulative lost)
        self._wire_bytes = 0  # bytes sent since the previous report, headers included
        self._packets = 0
        self.reports = 0

    def sent(self, wire_bytes: int, packets: int = 1) -> None:
        self._wire_bytes += wire_bytes
        self._packets += packets

    def feedback(self, block: ReportBlock, now: float) -> Feedback:
        self.reports += 1
        rtt = self.clock.rtt(block.lsr, block.dlsr, now)
        jitter_s = block.jitter / RTP_CLOCK
        frac = block.fraction_lost / 256.0
        prev, self._prev = self._prev, (now, block.highest_sequence, block.packets_lost)
        per_packet = self._wire_bytes / self._packets if self._packets else 0.0
        sent_bytes = self._wire_bytes
        self._wire_bytes = self._packets = 0
        if prev is None:
            return Feedback(now, frac, rtt_s=rtt, jitter_s=jitter_s)
        at0, high0, lost0 = prev
        expected = block.highest_sequence - high0
        if expected < 0:  # a reordered or stale report: no interval
            return Feedback(now, frac, rtt_s=rtt, jitter_s=jitter_s)
        lost = max(0, min(expected, block.packets_lost - lost0))
        received = expected - lost
        dt = now - at0
        kbps = received * per_packet * 8.0 / dt / 1000.0 if dt > 0 and per_packet else None
        sent = sent_bytes * 8.0 / dt / 1000.0 if dt > 0 else None
        loss = lost / expected if expected else frac
        return Feedback(now, loss, expected, lost, rtt, jitter_s, kbps, sent)
