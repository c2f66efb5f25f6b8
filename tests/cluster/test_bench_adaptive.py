"""`bench adaptive`'s constrained-link figures from a subscriber's counters and the layers."""

from __future__ import annotations

from cluster.bench.adaptive import _constrained_figures, _window
from sfu_bridge.rate_control import Layer, default_layer


def _samples(rate_pps, loss_at, t_end=40.0, size=90):
    """Cumulative counters every 0.25 s; `loss_at(t)` = fraction lost in that slice."""
    out, pk, exp, by, t = [], 0, 0, 0, 0.0
    while t <= t_end:
        n = rate_pps(t) * 0.25
        exp += n
        got = n * (1 - loss_at(t))
        pk += got
        by += got * size
        out.append({"t": t, "packets": pk, "bytes": by, "expected": exp})
        t += 0.25
    return out


def test_window_rate_and_loss():
    s = _samples(lambda t: 25, lambda t: 0.1)
    kbps, loss = _window(s, 1.0, 5.0)
    assert abs(loss - 0.1) < 1e-9
    assert abs(kbps - 25 * 0.9 * 90 * 8 / 1000) < 1e-6


def test_converge_loss_after_and_recover():
    t_limit, t_lift = 10.0, 30.0
    # everything lost while the bridge still sends too much (first 2 s of the limit), then none
    s = _samples(lambda t: 25, lambda t: 1.0 if t_limit <= t < t_limit + 2.0 else 0.0)
    layers = [(0.0, 8, 40, 18.4), (t_limit + 1.5, 8, 120, 10.1), (t_lift + 3.0, 8, 80, 12.2),
              (t_lift + 4.0, 8, 40, 18.4)]
    f = _constrained_figures(s, layers, t_limit, t_lift, 12, Layer(8, 40))
    # the layer fits from 1.5 s (before it: 18.4 > 12); from then on the last 0.25 s of total
    # loss is 1.4% of what the subscriber expects until the lift: < 2%
    assert f["converge_s"] == 1.5
    assert 0.0 < f["loss_after"] < 0.02
    assert f["recover_s"] == 4.0
    assert f["layer_changes"][1] == (1.5, 8, 120)
    # 6 kbps's default is 120 ms packets: back at 8 books in 120 ms packets is recovered
    sampled = layers[:2] + [(t_lift + 0.1, 8, 120, 10.1)] + layers[2:]
    assert default_layer(8) == Layer(8, 120)
    assert _constrained_figures(s, sampled, t_limit, t_lift, 12, default_layer(8))["recover_s"] == 0.1
    assert _constrained_figures(s, sampled, t_limit, t_lift, 12, Layer(8, 40))["recover_s"] == 4.0


def test_never_converging_says_so():
    s = _samples(lambda t: 25, lambda t: 0.35 if t >= 10.0 else 0.0)
    f = _constrained_figures(s, [(0.0, 8, 40, 18.4)], 10.0, 30.0, 12, Layer(8, 40))
    assert f["converge_s"] is None and f["loss_after"] is None
    assert f["loss_limited"] > 0.3
