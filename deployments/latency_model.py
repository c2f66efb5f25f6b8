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

For a scheduler that asks many (B, budget) questions per decision: the CDFs of a set of sizes
are laid on one axis (`cdf_axis`), so one np.interp call answers any mix of those sizes and
budgets; the distribution is rebuilt every `refresh_every` measured steps (at once for a new
bucket), and then only the cached sizes whose bucket rows moved are re-interpolated.
`version` changes with it.

Pure logic (numpy for the distribution), no Ray, no clock: the caller passes measured ms.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

DEFAULT_QUANTILE = 0.95
DEFAULT_WINDOW = 128
DEFAULT_REL_MARGIN = 0.05
# The distribution is rebuilt from the samples after this many new measured steps (at once for
# a bucket's first one). One step moves a 128-sample window's quantiles by one order statistic
# at most, while a rebuild costs more than a scheduling decision: rebuilding every step would
# make the model the largest part of a replica's control-plane time.
DEFAULT_REFRESH_EVERY = 8
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
# Budgets are clamped to +-BUDGET_LIMIT_MS before a CDF lookup (far beyond any deadline).
BUDGET_LIMIT_MS = 1e5
# Rows are kept for every batch size up to this many; larger sizes are interpolated when asked.
ROW_CACHE_SIZES = 1024


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


@functools.lru_cache(maxsize=1024)
def _order_statistics(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac): the levels' positions among n sorted samples, interpolated linearly."""
    pos = _LEVELS * (n - 1)
    lo = np.floor(pos).astype(np.intp)
    out = (lo, np.minimum(lo + 1, n - 1), pos - lo)
    for a in out:
        a.flags.writeable = False
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
        # Bumped whenever the distribution changes: callers cache what they derive from it.
        self.version = 0
        self._samples: dict[int, deque[float]] = {}
        self._observed = 0
        self._env: _Envelope | None = None
        # Per bucket (estimate, distribution row), recomputed only for the bucket that changed.
        self._bucket_stats: dict[int, tuple[float, np.ndarray]] = {}
        self._rows: np.ndarray | None = None  # dist rows for B = 1..len(_rows), from _env
        self._row_means: np.ndarray | None = None  # their means
        self._quantiles: dict[tuple[int, float], float] = {}
        # Buckets recorded into since the envelope was built: the next read rebuilds only the
        # rows (and CDF tables) of the batch sizes those buckets shape (see _refresh).
        self._dirty: set[int] = set()
        self._unapplied = 0  # measured steps recorded since the last rebuild
        self._new_bucket = False  # a bucket appeared since the last rebuild: rebuild at once

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
            if self._dirty:
                self._refresh()  # the prior includes every step measured so far
            for prior_ms in self.dist_rows([b])[0, 1:-1]:
                self._record(b, float(prior_ms))
        self._record(batch, ms)

    def _record(self, batch: int, ms: float) -> None:
        b = bucket_of(batch)
        d = self._samples.get(b)
        if d is None:
            d = self._samples[b] = deque(maxlen=self.window)
            self._new_bucket = True
        d.append(ms)
        self._bucket_stats.pop(b, None)
        self._dirty.add(b)
        self._unapplied += 1

    @property
    def observed_steps(self) -> int:
        return self._observed

    # ----------------------------------------------------------------------------- predicting
    def _refresh(self) -> None:
        """Rebuild the envelope after new samples, and re-interpolate the cached rows of the
        batch sizes whose distribution changed: those read from a bucket row that moved (and,
        when the extrapolation moved, every size beyond the last bucket)."""
        old = self._env
        self._dirty.clear()
        self._unapplied = 0
        self._new_bucket = False
        self._env = None
        env = self._envelope()
        self._quantiles.clear()
        self.version += 1
        if self._rows is None:
            return
        if old is None or old.sizes != env.sizes:
            self._rows = self._row_means = None
            return
        sizes, n, cached = env.sizes, len(env.sizes), len(self._rows)
        moved = np.flatnonzero((old.dist != env.dist).any(axis=1))
        if not len(moved):
            return
        # Sizes between a moved bucket's neighbours read its row; the last two buckets' rows
        # also shape everything beyond the last (the extrapolation slope).
        i0, i1 = int(moved[0]), int(moved[-1])
        lo = sizes[i0 - 1] + 1 if i0 > 0 else 1
        hi = sizes[i1 + 1] if i1 < n - 1 else cached
        if (old.dist_tail != env.dist_tail).any():
            hi = cached
        hi = min(hi, cached)
        if lo > hi:
            return
        b = np.arange(lo, hi + 1)
        rows = self._rows[lo - 1:hi] = self._interpolate_rows(b)
        assert self._row_means is not None
        self._row_means[lo - 1:hi] = rows[:, 1:-1].mean(axis=1)

    def _stale(self) -> bool:
        """Samples are waiting and due: a new bucket, nothing built yet, or refresh_every
        measured steps since the last rebuild."""
        return bool(self._dirty) and (self._env is None or self._new_bucket
                                      or self._unapplied >= self.refresh_every)

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
            samples = self._samples[bucket]
            n = len(samples)
            xs = np.array(samples)
            xs.sort()
            k = min(n - 1, max(0, math.ceil(self.quantile * n) - 1))  # nearest rank above
            lo, hi, frac = _order_statistics(n)  # linear interpolation between them
            row = xs.take(lo)
            row += frac * (xs.take(hi) - row)
            # The tail beyond the top level: a window's largest sample is not the largest step
            # the device takes. Spread the last 1/(2 DIST_LEVELS) of probability up to
            # q_top * sqrt(q_top / median) (about a log-normal's p99.9 from its p98.4), so a
            # budget just above the largest sample is "very likely", not certain.
            q_top, q_med = float(row[-2]), float(np.interp(0.5, _LEVELS, row))
            if q_med > 0:
                row[-1] = max(float(row[-1]), q_top * math.sqrt(q_top / q_med))
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
        return self._cached_rows(batches)[0]

    def _cached_rows(self, batches: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, means) for `batches`: from the rows kept for every B up to the largest asked
        (at most ROW_CACHE_SIZES of them), interpolated on the spot beyond."""
        k = np.maximum(np.asarray(batches, np.intp), 1)
        top = int(k.max()) if len(k) else 1
        self._ensure_rows(min(top, ROW_CACHE_SIZES))
        assert self._rows is not None and self._row_means is not None
        if top <= len(self._rows):
            return self._rows[k - 1], self._row_means[k - 1]
        rows = self._interpolate_rows(k)
        return rows, rows[:, 1:-1].mean(axis=1)

    def _ensure_rows(self, top: int) -> None:
        """Rows for every B up to at least `top`, current."""
        if self._stale():
            self._refresh()
        if self._rows is None or len(self._rows) < top:
            have = 0 if self._rows is None else len(self._rows)
            n = min(max(top, 2 * have, 16), max(top, ROW_CACHE_SIZES))
            self._rows = self._interpolate_rows(np.arange(1, n + 1))
            self._row_means = self._rows[:, 1:-1].mean(axis=1)

    def _interpolate_rows(self, batches: np.ndarray) -> np.ndarray:
        env = self._envelope()
        k = np.asarray(batches, float)
        sizes = np.asarray(env.sizes, float)
        if len(sizes) == 1:
            out = np.repeat(env.dist, len(k), axis=0)
        else:
            i = np.clip(np.searchsorted(sizes, k, side="right") - 1, 0, len(sizes) - 2)
            w = np.clip((k - sizes[i]) / (sizes[i + 1] - sizes[i]), 0.0, 1.0)
            out = env.dist[i] + w[:, None] * (env.dist[i + 1] - env.dist[i])
        beyond = k > sizes[-1]
        if beyond.any():
            out[beyond] = env.dist[-1] + (k[beyond] - sizes[-1])[:, None] * env.dist_tail[None, :]
        return out

    def cdf_axis(self, sizes: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(offset, x, p, means): the CDF of T(B) for each B in `sizes` laid end to end on one axis,
        so that P(T(sizes[i]) <= t) = np.interp(t + offset[i], x, p) for |t| <=
        BUDGET_LIMIT_MS: one np.interp call evaluates any mix of these sizes and budgets.
        Valid until `version` changes (callers keep it per version).

        Row i (its quantiles, strictly increasing) is shifted by i x width and framed by a 0
        a half width below and a 1 just under a half width above, so a budget within the
        limit never reaches a neighbouring row: np.interp then gives the piecewise-linear CDF
        through the row's quantiles, 0 below its min, 1 from its max. `means`: each size's
        mean step time."""
        rows, means = self._cached_rows(sizes)
        n_rows = len(rows)
        half = BUDGET_LIMIT_MS + float(rows[:, -1].max()) + 1.0
        offset = np.arange(n_rows) * (2.0 * half)
        x = np.empty((n_rows, len(_LEVELS) + 2))
        x[:, 0] = offset - half
        x[:, 1:-1] = rows - _RAMP + offset[:, None]
        x[:, -1] = offset + half * (1.0 - 1e-9)
        p = np.empty_like(x)
        p[:, 0], p[:, 1:-1], p[:, -1] = 0.0, _LEVELS, 1.0
        return offset, x.ravel(), p.ravel(), means

    def p_within_matrix(self, batches: Sequence[int] | np.ndarray, budgets_ms: np.ndarray) -> np.ndarray:
        """P(T(B) <= budget) for every B in `batches` (rows) and budget (columns). `budgets_ms`
        is one vector for every row, or a matrix with one row of budgets per batch size.

        The piecewise-linear CDF through the size's quantile row: 0 below the smallest
        sample, 1 from the largest on. Each entry depends on its own (B, budget) only."""
        k = np.maximum(np.asarray(batches, np.intp), 1)
        sizes, row = np.unique(k, return_inverse=True)
        offset, x, p, _ = self.cdf_axis(sizes)
        t = np.minimum(np.maximum(np.asarray(budgets_ms, float), -BUDGET_LIMIT_MS), BUDGET_LIMIT_MS)
        return np.interp(t + offset[row][:, None], x, p)

    def p_within(self, batch: int, budget_ms: float) -> float:
        """P(a step of `batch` frames takes <= budget_ms), from the recent samples."""
        if batch <= 0:
            return 1.0
        return float(self.p_within_matrix([batch], np.array([budget_ms]))[0, 0])

    def quantile_ms(self, batch: int, p: float) -> float:
        """The p-quantile of T(batch) (ms), without the margin."""
        if batch <= 0:
            return 0.0
        q = self._quantiles.get((batch, p))
        if q is None:
            q = self._quantiles[(batch, p)] = float(np.interp(p, _LEVELS, self.dist_rows([batch])[0]))
        return q

    def max_ms(self, batch: int) -> float:
        """The largest step time the distribution of T(batch) allows: P(T(batch) <= t) = 1
        from here on."""
        return float(self._cached_rows([batch])[0][0, -1])

    def mean_ms(self, batches: Sequence[int] | np.ndarray) -> np.ndarray:
        """Mean step time (ms) for each B in `batches` (the average of its quantile row)."""
        return self._cached_rows(batches)[1]

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
