"""Online model of a codec step's time (ms) as a function of batch size B, on this device.

Two views of the same recent samples:
- the *distribution* of T(B): `p_within(B, budget)` = P(T(B) <= budget), `quantile_ms(B, p)`,
  `mean_ms(B)`. The scheduler decides admission and expiry from it (expected on-time frames),
  not from a worst case;
- a *conservative* point estimate `predict(B)`: a high quantile (p95) with a relative margin,
  for callers that need one number (reports, the plan's prediction).
It tracks the device it runs on (a replica's GPU, a busy CPU): it learns from every measured
step.

How it works (Clockwork-style predictability, kept small):
- Batch sizes fall into geometric buckets (1, 2, 3, 4, 6, 8, 12, 16, 24, ...). A step of size
  B is recorded in the largest bucket <= B, so a bucket's samples never understate its own
  size's cost (a step of 5 frames costs at least what 4 cost).
- Each bucket keeps the last `window` samples; its estimate is their `quantile` (p95 by
  default), its distribution their quantiles at DIST_LEVELS levels plus min and max. A profile
  seeds each bucket: a `{p50, p99}` entry (e.g. `auralink bench codec`'s `latency_profile_ms`)
  with SEED_SAMPLES quantiles of the log-normal through them, a bare number with one sample;
  a bucket first measured at run time starts from the distribution interpolated there (its
  DIST_LEVELS quantiles) as a prior; real observations push seeds and priors out of the window.
- Between buckets the estimate is interpolated linearly; below the first it is the first
  bucket's value; above the last it is extrapolated with the steeper of the last segment's
  slope and the average per-frame cost (through the origin), so an unseen large batch is never
  predicted cheap. The envelope is made non-decreasing in B with a suffix minimum (cost grows
  with B, so a larger bucket's estimate bounds a smaller one's: an outlier in a small bucket
  cannot inflate every prediction), which lets `max_batch_within` binary-search. The
  distribution is built the same way, level by level (quantile functions interpolated in B).

A scheduler reads the model before every step, and a rebuild after every measured step would
cost more than the decision it serves: measured steps are applied every `refresh_every` (8)
steps (at once for a bucket's first one, and before `to_dict`); one step moves a 128-sample
window's quantiles by one order statistic at most. `version` changes with every rebuild.

Pure logic (numpy for the distribution), no Ray, no clock: the caller passes measured ms.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

DEFAULT_QUANTILE = 0.95
DEFAULT_WINDOW = 128
DEFAULT_REL_MARGIN = 0.05
DEFAULT_REFRESH_EVERY = 8  # measured steps between rebuilds of the distribution (see above)
# With nothing measured yet, assume a slow device: 10 ms per frame, linear. The scheduler then
# runs small batches until real steps teach it better.
UNSEEDED_MS_PER_FRAME = 10.0
# The step-time distribution per bucket: quantiles at these interior levels, plus min and max.
DIST_LEVELS = 32
# A {p50, p99} profile entry seeds this many samples (log-normal quantiles through p50/p99).
SEED_SAMPLES = 32
_Z99 = NormalDist().inv_cdf(0.99)
_LEVELS = np.array([0.0, *((m + 0.5) / DIST_LEVELS for m in range(DIST_LEVELS)), 1.0])
# Subtracted from a distribution row before interpolating the CDF: makes the abscissae strictly
# increasing (a deterministic bucket has equal quantiles) and P(T <= t) right-continuous, so a
# budget exactly equal to a deterministic step time counts as met.
_RAMP = (len(_LEVELS) - 1 - np.arange(len(_LEVELS))) * 1e-9
_STEPS = np.diff(_LEVELS)
# Above this many (budget, level) pairs a CDF evaluation loops over rows instead of comparing
# every budget with every level at once (fewer numpy calls win on small inputs, less work on large).
_BROADCAST_LIMIT = 40_000


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


def _on_line(line: tuple[np.ndarray, np.ndarray, float], batches: Sequence[int] | np.ndarray) -> np.ndarray:
    """Values at batch sizes of a quantity linear in B between bucket sizes (the first one's
    below them) and with the given slope beyond the last."""
    sizes, values, tail = line
    k = np.maximum(np.asarray(batches, float), 1.0)
    out = np.interp(k, sizes, values)
    beyond = k > sizes[-1]
    if beyond.any():
        out[beyond] = values[-1] + (k[beyond] - sizes[-1]) * tail
    return out


def _quantile(samples: Iterable[float], q: float) -> float:
    """Nearest-rank-above quantile (conservative: never interpolates below a sample)."""
    xs = sorted(samples)
    k = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[k]


def _lognormal_seeds(p50: float, p99: float, n: int = SEED_SAMPLES) -> list[float]:
    """`n` evenly spaced quantiles of the log-normal with median p50 and 99th percentile p99."""
    sigma = math.log(max(p99, p50) / p50) / _Z99
    nd = NormalDist()
    return [p50 * math.exp(sigma * nd.inv_cdf((i + 0.5) / n)) for i in range(n)]


@dataclass(frozen=True)
class _Envelope:
    sizes: list[int]  # bucket sizes with data, increasing
    ms: list[float]  # non-decreasing estimates at those sizes
    tail_slope: float  # ms per extra frame beyond the last size
    dist: np.ndarray  # [len(sizes), len(_LEVELS)] quantile rows, non-decreasing along both axes
    dist_tail: np.ndarray  # [len(_LEVELS)] ms per extra frame beyond the last size, per level
    # (sizes, their rows' means, the tail's mean slope): a row is linear in B between sizes
    # and beyond the last, so its mean is too (see `LatencyModel.mean_ms`); and the same for
    # the rows' largest values (`LatencyModel.max_ms`)
    mean_line: tuple[np.ndarray, np.ndarray, float] = field(init=False)
    max_line: tuple[np.ndarray, np.ndarray, float] = field(init=False)

    def __post_init__(self) -> None:
        sizes = np.asarray(self.sizes, float)
        object.__setattr__(self, "mean_line", (sizes, self.dist[:, 1:-1].mean(axis=1),
                                               float(self.dist_tail[1:-1].mean())))
        object.__setattr__(self, "max_line", (sizes, self.dist[:, -1].copy(), float(self.dist_tail[-1])))


class LatencyModel:
    """Conservative online estimate of step time (ms) by batch size."""

    def __init__(
        self,
        quantile: float = DEFAULT_QUANTILE,
        window: int = DEFAULT_WINDOW,
        rel_margin: float = DEFAULT_REL_MARGIN,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
    ) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if rel_margin < 0:
            raise ValueError(f"rel_margin must be >= 0, got {rel_margin}")
        self.quantile = quantile
        self.window = window
        self.rel_margin = rel_margin
        self.refresh_every = refresh_every
        self.version = 0  # bumped by every rebuild: callers may cache what they derive
        self._dirty = False  # samples recorded since the last rebuild
        self._unapplied = 0  # measured steps among them
        self._new_bucket = False  # a bucket appeared since the last rebuild: rebuild at once
        self._samples: dict[int, deque[float]] = {}
        self._observed = 0
        self._env: _Envelope | None = None
        # Per bucket (estimate, distribution row), recomputed only for the bucket that changed.
        self._bucket_stats: dict[int, tuple[float, np.ndarray]] = {}
        self._rows: np.ndarray | None = None  # dist rows for B = 1..len(_rows), from _env
        self._row_known: np.ndarray | None = None  # which of them are computed
        self._quantiles: dict[tuple[int, float], float] = {}
        self._scalars: dict[tuple[int, int], float] = {}  # (0 mean / 1 max, B) -> ms (`mean_of`)

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
                hi = value.get("p99", value.get("p95"))
                p50 = value.get("p50")
                if hi is None and p50 is None:
                    raise ValueError(f"profile entry for batch {b} has no p99/p95/p50: {value!r}")
                if p50 is not None and "p99" in value:
                    model._check_seed(b, float(p50))
                    model._check_seed(b, float(hi))
                    for ms in _lognormal_seeds(float(p50), float(hi)):
                        model._record(b, ms)
                    continue
                ms = hi if hi is not None else p50
            else:
                ms = value
            model._check_seed(b, float(ms))
            model._record(b, float(ms))
        return model

    @staticmethod
    def _check_seed(batch: int, ms: float) -> None:
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"profile time for batch {batch} must be a positive number, got {ms}")

    def to_dict(self) -> dict[str, Any]:
        """Current estimates (without the margin) per bucket; `from_profile` reads it back."""
        if self._dirty:
            self._refresh()  # every recorded step, not only those applied so far
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
        b = bucket_of(batch)
        if b not in self._samples and self._samples:
            # A bucket's first measurement joins a prior: the distribution interpolated there
            # so far. One sample alone would make the bucket's distribution a single point,
            # so one slow step would look like the only possible outcome at that size.
            self._refresh()  # the prior includes every step measured so far
            for prior_ms in self.dist_rows([b])[0, 1:-1]:
                self._record(b, float(prior_ms))
        self._record(batch, ms)
        self._unapplied += 1

    def _record(self, batch: int, ms: float) -> None:
        b = bucket_of(batch)
        d = self._samples.get(b)
        if d is None:
            d = self._samples[b] = deque(maxlen=self.window)
            self._new_bucket = True
        d.append(ms)
        self._bucket_stats.pop(b, None)
        self._dirty = True

    def _stale(self) -> bool:
        """Samples wait and are due: nothing built yet, a new bucket, or `refresh_every`
        measured steps since the last rebuild."""
        return self._dirty and (self._env is None or self._new_bucket
                                or self._unapplied >= self.refresh_every)

    def _refresh(self) -> None:
        """Apply the samples recorded so far: everything derived is rebuilt when next read."""
        self._dirty, self._unapplied, self._new_bucket = False, 0, False
        self._env = None
        if self._row_known is not None:
            self._row_known.fill(False)
        self._quantiles.clear()
        self._scalars.clear()
        self.version += 1

    @property
    def observed_steps(self) -> int:
        return self._observed

    # ----------------------------------------------------------------------------- predicting
    def _envelope(self) -> _Envelope:
        if self._stale():
            self._refresh()
        if self._env is not None:
            return self._env
        if not self._samples:
            row = np.full(len(_LEVELS), UNSEEDED_MS_PER_FRAME)
            env = _Envelope([1], [UNSEEDED_MS_PER_FRAME], UNSEEDED_MS_PER_FRAME, row[None, :], row)
        else:
            sizes = sorted(self._samples)
            stats = [self._stats(b) for b in sizes]
            ms = [est for est, _ in stats]
            # Non-decreasing in B via a suffix minimum: a step of B frames costs no more than
            # one of B' > B, so a larger bucket's estimate also bounds a smaller one. (A prefix
            # maximum would let one outlier in a small bucket inflate every batch size.)
            for i in range(len(ms) - 2, -1, -1):
                ms[i] = min(ms[i], ms[i + 1])
            per_frame = ms[-1] / sizes[-1]
            seg = (ms[-1] - ms[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else per_frame
            # The distribution, level by level, under the same rules.
            dist = np.array([row for _, row in stats])
            dist = np.minimum.accumulate(dist[::-1], axis=0)[::-1]
            d_per_frame = dist[-1] / sizes[-1]
            d_seg = (dist[-1] - dist[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else d_per_frame
            env = _Envelope(sizes, ms, max(seg, per_frame), dist, np.maximum(d_seg, d_per_frame))
        self._env = env
        return env

    def _stats(self, bucket: int) -> tuple[float, np.ndarray]:
        """(quantile estimate, distribution row) of one bucket's samples, cached until it changes."""
        cached = self._bucket_stats.get(bucket)
        if cached is None:
            xs = np.sort(np.fromiter(self._samples[bucket], float))
            n = len(xs)
            k = min(n - 1, max(0, math.ceil(self.quantile * n) - 1))  # nearest rank above
            pos = _LEVELS * (n - 1)  # linear interpolation between order statistics
            lo = np.floor(pos).astype(int)
            hi = np.minimum(lo + 1, n - 1)
            row = xs[lo] + (pos - lo) * (xs[hi] - xs[lo])
            # The tail beyond the top level: a window's largest sample is not the largest step
            # the device takes. Spread the last 1/(2 DIST_LEVELS) of probability up to
            # q_top * sqrt(q_top / median) (about a log-normal's p99.9 from its p98.4), so a
            # budget just above the largest sample is "very likely", not certain.
            q_top, q_med = row[-2], float(np.interp(0.5, _LEVELS, row))
            if q_med > 0:
                row[-1] = max(row[-1], q_top * math.sqrt(q_top / q_med))
            cached = self._bucket_stats[bucket] = (float(xs[k]), row)
        return cached

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

    # ------------------------------------------------------------------------- distribution
    def dist_rows(self, batches: Sequence[int] | np.ndarray) -> np.ndarray:
        """Quantile rows of T(B) for each B in `batches`: [len(batches), len(levels)], at the
        levels 0 (min), (m + 0.5) / DIST_LEVELS, 1 (max) of the samples. Linear in B between
        buckets, the first bucket's row below it, extrapolated per level above the last."""
        return self._cached_rows(batches)

    def _cached_rows(self, batches: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows for `batches`. Rows are kept per B once computed, and only the B asked for
        are computed (a replica asks for a few sizes up to thousands after every step)."""
        if self._stale():
            self._refresh()
        k = np.maximum(np.asarray(batches, int), 1)
        top = int(k.max()) if len(k) else 1
        if self._rows is None or len(self._rows) < top:
            size = max(top, 16, 2 * (0 if self._rows is None else len(self._rows)))
            rows = np.zeros((size, len(_LEVELS)))
            known = np.zeros(size, bool)
            if self._rows is not None:
                n = len(self._rows)
                rows[:n], known[:n] = self._rows, self._row_known
            self._rows, self._row_known = rows, known
        assert self._row_known is not None
        missing = k[~self._row_known[k - 1]]
        if missing.size > 1:
            missing = np.unique(missing)
        if missing.size:
            self._rows[missing - 1] = self._interpolate_rows(missing)
            self._row_known[missing - 1] = True
        return self._rows[k - 1]

    def _interpolate_rows(self, batches: np.ndarray) -> np.ndarray:
        env = self._envelope()
        k = np.asarray(batches, float)
        sizes = np.asarray(env.sizes, float)
        if len(sizes) == 1:
            out = np.repeat(env.dist, len(k), axis=0)
        else:
            i = np.minimum(np.maximum(sizes.searchsorted(k, side="right") - 1, 0), len(sizes) - 2)
            w = np.minimum(np.maximum((k - sizes[i]) / (sizes[i + 1] - sizes[i]), 0.0), 1.0)
            out = env.dist[i] + w[:, None] * (env.dist[i + 1] - env.dist[i])
        beyond = k > sizes[-1]
        if beyond.any():
            out[beyond] = env.dist[-1] + (k[beyond] - sizes[-1])[:, None] * env.dist_tail[None, :]
        return out

    def p_within_matrix(self, batches: Sequence[int] | np.ndarray, budgets_ms: np.ndarray) -> np.ndarray:
        """P(T(B) <= budget) for every B in `batches` (rows) and budget (columns). `budgets_ms`
        is one vector for every row, or a matrix with one row of budgets per batch size."""
        xp = self.dist_rows(batches) - _RAMP  # [K, L], strictly increasing along L
        budgets = np.asarray(budgets_ms, float)
        if budgets.ndim == 1:
            budgets = np.broadcast_to(budgets, (len(xp), len(budgets)))
        if budgets.size * len(_LEVELS) > _BROADCAST_LIMIT:  # large: one interpolation per row
            out = np.empty(budgets.shape)
            for i in range(len(xp)):
                out[i] = np.interp(budgets[i], xp[i], _LEVELS)
            return out
        # Piecewise-linear CDF through (xp[k, j], level j), all rows at once: 0 below the
        # smallest sample, 1 from the largest on.
        above = (xp[:, None, :] <= budgets[:, :, None]).sum(axis=2)  # levels at or below budget
        lo = np.minimum(np.maximum(above - 1, 0), len(_LEVELS) - 2)
        row = np.arange(len(xp))[:, None]
        x0 = xp[row, lo]
        frac = np.minimum(np.maximum((budgets - x0) / (xp[row, lo + 1] - x0), 0.0), 1.0)
        p = _LEVELS[lo] + frac * _STEPS[lo]
        p[above == 0] = 0.0
        p[above >= len(_LEVELS)] = 1.0
        return p

    def p_within(self, batch: int, budget_ms: float) -> float:
        """P(a step of `batch` frames takes <= budget_ms), from the recent samples."""
        if batch <= 0:
            return 1.0
        return float(self.p_within_matrix([batch], np.array([budget_ms]))[0, 0])

    def quantile_ms(self, batch: int, p: float) -> float:
        """The p-quantile of T(batch) (ms), without the margin."""
        if batch <= 0:
            return 0.0
        if self._stale():
            self._refresh()
        q = self._quantiles.get((batch, p))
        if q is None:
            q = self._quantiles[(batch, p)] = float(np.interp(p, _LEVELS, self.dist_rows([batch])[0]))
        return q

    def mean_ms(self, batches: Sequence[int] | np.ndarray) -> np.ndarray:
        """Mean step time (ms) for each B in `batches` (the average of its quantile row).
        Rows are linear in B between buckets and beyond the last, so the means are read off
        the buckets' means directly: any number of sizes at the cost of one interpolation."""
        return _on_line(self._envelope().mean_line, batches)

    def max_ms(self, batches: Sequence[int] | np.ndarray) -> np.ndarray:
        """The largest step time (ms) the distribution of T(B) allows, for each B in
        `batches` (its row's top level, read off the buckets as `mean_ms` does): a budget
        at least this long is certain to be met."""
        return _on_line(self._envelope().max_line, batches)

    def mean_of(self, batch: int) -> float:
        """`mean_ms([batch])[0]` as a float, kept until the model next changes: a scheduler
        asks for the same few sizes several times a decision."""
        return self._scalar(0, batch)

    def max_of(self, batch: int) -> float:
        """`max_ms([batch])[0]` as a float, kept as `mean_of` keeps it."""
        return self._scalar(1, batch)

    def _scalar(self, kind: int, batch: int) -> float:
        if self._stale():
            self._refresh()
        key = (kind, batch)
        v = self._scalars.get(key)
        if v is None:
            env = self._envelope()
            v = self._scalars[key] = float(_on_line(env.max_line if kind else env.mean_line, [batch])[0])
        return v

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
