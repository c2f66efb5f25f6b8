"""Short-term forecast of concurrent streams: Holt's linear trend on irregular samples.

A new GPU replica takes tens of seconds to be ready (node start, model load, warm-up), so
the autoscaling policy must ask for capacity for the streams that will exist one warm-up
from now, not for those that exist now. Holt's method tracks a level (streams now) and a
trend (net arrivals per second); the forecast is `level + trend * horizon`.

Samples arrive at irregular times (metrics pushes, control-loop ticks), so the smoothing
weights come from time constants: a sample `dt` seconds after the previous one gets weight
`1 - exp(-dt / tau)`. The result then does not depend on how often the policy runs.

Pure functions, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class HoltParams:
    level_tau_s: float = 3.0  # how fast the level follows the observed stream count
    trend_tau_s: float = 15.0  # how long a join/leave rate is remembered

    def __post_init__(self) -> None:
        if self.level_tau_s <= 0 or self.trend_tau_s <= 0:
            raise ValueError("time constants must be positive")


@dataclass(frozen=True)
class HoltState:
    t: float  # time of the last sample (s)
    level: float  # smoothed stream count at `t`
    trend: float  # smoothed net arrivals (streams / s)

    def forecast(self, horizon_s: float, damping_s: float | None = None) -> float:
        """Expected streams `horizon_s` seconds after `t` (never below zero).

        With `damping_s` the trend fades with that time constant (Gardner's damped trend):
        the extrapolation reaches at most `trend * damping_s`, so a short burst of joins is
        not projected a whole replica start-up ahead, while a sustained ramp still is, in part.
        """
        reach = horizon_s
        if damping_s is not None:
            reach = damping_s * (1.0 - math.exp(-horizon_s / damping_s))
        return max(0.0, self.level + self.trend * reach)


def holt_update(state: HoltState | None, t: float, value: float, params: HoltParams) -> HoltState:
    """Fold one sample (time `t`, observed streams `value`) into the state."""
    if state is None:
        return HoltState(t=t, level=float(value), trend=0.0)
    dt = t - state.t
    if dt <= 0:  # same or older sample: nothing new to learn
        return state
    a = 1.0 - math.exp(-dt / params.level_tau_s)
    b = 1.0 - math.exp(-dt / params.trend_tau_s)
    predicted = state.level + state.trend * dt
    level = a * value + (1.0 - a) * predicted
    trend = b * (level - state.level) / dt + (1.0 - b) * state.trend
    return HoltState(t=t, level=level, trend=trend)


def holt_fit(samples: Iterable[tuple[float, float]], params: HoltParams) -> HoltState | None:
    """Run the filter over `(t, streams)` samples in time order; None if there are none."""
    state: HoltState | None = None
    for t, v in samples:
        state = holt_update(state, t, v, params)
    return state


def ewma_rate(samples: Iterable[tuple[float, float]], tau_s: float) -> float:
    """Time-weighted EWMA of the rate of change of a series (e.g. gross joins counter)."""
    rate: float | None = None
    prev: tuple[float, float] | None = None
    for t, v in samples:
        if prev is not None and t > prev[0]:
            r = (v - prev[1]) / (t - prev[0])
            w = 1.0 - math.exp(-(t - prev[0]) / tau_s)
            rate = r if rate is None else w * r + (1.0 - w) * rate
        prev = (t, v)
    return 0.0 if rate is None else rate
