"""Online model L(B) of a codec step's time (ms) as a function of batch size, on this device.

The scheduler sizes a batch so that it finishes before the earliest deadline in it, so the
model must be *conservative*: it predicts a high quantile of recent step times, not their mean,
and adds a relative margin. It must also track the device it runs on (a replica's GPU, a busy
CPU), so it learns from every measured step.

How it works (Clockwork-style predictability, kept small):
- Batch sizes fall into geometric buckets (1, 2, 3, 4, 6, 8, 12, 16, 24, ...). A step of size
  B is recorded in the largest bucket <= B, so a bucket's samples never understate its own
  size's cost (a step of 5 frames costs at least what 4 cost).
- Each bucket keeps the last `window` samples; its estimate is their `quantile` (p95 by
  default). A profile (e.g. `auralink bench codec`'s `latency_profile_ms`) seeds a bucket with
  one sample, which real observations push out of the window.
- Between buckets the estimate is interpolated linearly; below the first it is the first
  bucket's value; above the last it is extrapolated with the steeper of the last segment's
  slope and the average per-frame cost (through the origin), so an unseen large batch is never
  predicted cheap. The envelope is made non-decreasing in B with a suffix minimum (cost grows
  with B, so a larger bucket's estimate bounds a smaller one's: an outlier in a small bucket
  cannot inflate every prediction), which lets `max_batch_within` binary-search.

Pure Python, no Ray, no clock: the caller passes measured milliseconds.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_QUANTILE = 0.95
DEFAULT_WINDOW = 128
DEFAULT_REL_MARGIN = 0.05
# With nothing measured yet, assume a slow device: 10 ms per frame, linear. The scheduler then
# runs small batches until real steps teach it better.
UNSEEDED_MS_PER_FRAME = 10.0


def bucket_sizes(limit: int = 1 << 16) -> list[int]:
    """Geometric bucket grid 1, 2, 3, 4, 6, 8, 12, 16, ... up to `limit`."""
    out = [1, 2]
    p = 2
    while True:
        for b in (3 * p // 2, 2 * p):
            if b > limit:
                return out
            out.append(b)
        p *= 2


_BUCKETS = bucket_sizes()


def bucket_of(batch: int) -> int:
    """The largest grid bucket <= batch (batch >= 1)."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    return _BUCKETS[bisect.bisect_right(_BUCKETS, batch) - 1]


def _quantile(samples: Iterable[float], q: float) -> float:
    """Nearest-rank-above quantile (conservative: never interpolates below a sample)."""
    xs = sorted(samples)
    k = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[k]


@dataclass(frozen=True)
class _Envelope:
    sizes: list[int]  # bucket sizes with data, increasing
    ms: list[float]  # non-decreasing estimates at those sizes
    tail_slope: float  # ms per extra frame beyond the last size


class LatencyModel:
    """Conservative online estimate of step time (ms) by batch size."""

    def __init__(
        self,
        quantile: float = DEFAULT_QUANTILE,
        window: int = DEFAULT_WINDOW,
        rel_margin: float = DEFAULT_REL_MARGIN,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if rel_margin < 0:
            raise ValueError(f"rel_margin must be >= 0, got {rel_margin}")
        self.quantile = quantile
        self.window = window
        self.rel_margin = rel_margin
        self._samples: dict[int, deque[float]] = {}
        self._observed = 0
        self._env: _Envelope | None = None

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_profile(cls, profile: Mapping[Any, Any], **kwargs: Any) -> LatencyModel:
        """Seed from `{batch: ms}`, `{batch: {"p50": .., "p99": ..}}` (the codec benchmark's
        `latency_profile_ms`; the p99 is used, being the conservative one), or a `to_dict()`.
        Keys may be strings (JSON)."""
        if "profile_ms" in profile:  # a to_dict() round trip
            for k in ("quantile", "window", "rel_margin"):
                if k in profile:
                    kwargs.setdefault(k, profile[k])
            profile = profile["profile_ms"]
        model = cls(**kwargs)
        for key, value in profile.items():
            b = int(key)
            if isinstance(value, Mapping):
                ms = value.get("p99", value.get("p95", value.get("p50")))
                if ms is None:
                    raise ValueError(f"profile entry for batch {b} has no p99/p95/p50: {value!r}")
            else:
                ms = value
            model._seed(b, float(ms))
        return model

    def _seed(self, batch: int, ms: float) -> None:
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"profile time for batch {batch} must be a positive number, got {ms}")
        self._record(batch, ms)

    def to_dict(self) -> dict[str, Any]:
        """Current estimates (without the margin) per bucket; `from_profile` reads it back."""
        env = self._envelope()
        return {
            "quantile": self.quantile,
            "window": self.window,
            "rel_margin": self.rel_margin,
            "observed_steps": self._observed,
            "profile_ms": {str(b): round(ms, 4) for b, ms in zip(env.sizes, env.ms, strict=True)},
            "samples": {str(b): len(d) for b, d in sorted(self._samples.items())},
        }

    # ----------------------------------------------------------------------------- learning
    def observe(self, batch: int, ms: float) -> None:
        """Record one measured step of `batch` frames that took `ms` milliseconds."""
        if batch < 1 or not (math.isfinite(ms) and ms >= 0):
            return  # a bogus measurement must not poison the model (or crash the replica)
        self._observed += 1
        self._record(batch, ms)

    def _record(self, batch: int, ms: float) -> None:
        b = bucket_of(batch)
        d = self._samples.get(b)
        if d is None:
            d = self._samples[b] = deque(maxlen=self.window)
        d.append(ms)
        self._env = None

    @property
    def observed_steps(self) -> int:
        return self._observed

    # ----------------------------------------------------------------------------- predicting
    def _envelope(self) -> _Envelope:
        if self._env is not None:
            return self._env
        if not self._samples:
            env = _Envelope([1], [UNSEEDED_MS_PER_FRAME], UNSEEDED_MS_PER_FRAME)
        else:
            sizes = sorted(self._samples)
            ms = [_quantile(self._samples[b], self.quantile) for b in sizes]
            # Non-decreasing in B via a suffix minimum: a step of B frames costs no more than
            # one of B' > B, so a larger bucket's estimate also bounds a smaller one. (A prefix
            # maximum would let one outlier in a small bucket inflate every batch size.)
            for i in range(len(ms) - 2, -1, -1):
                ms[i] = min(ms[i], ms[i + 1])
            per_frame = ms[-1] / sizes[-1]
            seg = (ms[-1] - ms[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else per_frame
            env = _Envelope(sizes, ms, max(seg, per_frame))
        self._env = env
        return env

    def estimate(self, batch: int) -> float:
        """The quantile estimate for `batch` frames, without the margin."""
        if batch <= 0:
            return 0.0
        env = self._envelope()
        sizes, ms = env.sizes, env.ms
        if batch <= sizes[0]:
            return ms[0]
        if batch >= sizes[-1]:
            return ms[-1] + (batch - sizes[-1]) * env.tail_slope
        i = bisect.bisect_right(sizes, batch)
        b0, b1, m0, m1 = sizes[i - 1], sizes[i], ms[i - 1], ms[i]
        return m0 + (m1 - m0) * (batch - b0) / (b1 - b0)

    def typical(self, batch: int) -> float:
        """Median of the recorded steps in `batch`'s bucket (or the nearest one below, else
        the first): an optimistic estimate, for probing a model that may be stale."""
        if not self._samples:
            return self.estimate(batch)
        b = bucket_of(max(1, batch))
        below = [k for k in self._samples if k <= b]
        key = max(below) if below else min(self._samples)
        return _quantile(self._samples[key], 0.5)

    def predict(self, batch: int) -> float:
        """Conservative step time (ms) for `batch` frames: quantile estimate x (1 + margin)."""
        return self.estimate(batch) * (1.0 + self.rel_margin)

    def max_batch_within(self, budget_ms: float, limit: int = 1 << 16) -> int:
        """Largest B <= limit with predict(B) <= budget_ms; 0 if not even one frame fits."""
        if limit < 1 or self.predict(1) > budget_ms:
            return 0
        if self.predict(limit) <= budget_ms:
            return limit
        lo, hi = 1, limit  # predict(lo) fits, predict(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predict(mid) <= budget_ms:
                lo = mid
            else:
                hi = mid
        return lo

    def __repr__(self) -> str:
        env = self._envelope()
        pts = ", ".join(f"{b}:{m:.2f}" for b, m in zip(env.sizes, env.ms, strict=True))
        return f"LatencyModel(q={self.quantile}, margin={self.rel_margin}, ms={{{pts}}})"
