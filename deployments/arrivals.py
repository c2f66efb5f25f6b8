"""Where a codec replica's next frames come from: a per-stream forecast of arrivals.

A bridge sends each replica one request per tick, so a stream's chunks arrive about one frame
period (40 ms) apart, moved by transit jitter. A stream in DTX skips ticks. The scheduler uses
the forecast to decide whether holding a small batch for a frame about to arrive finishes more
frames in time than running it now (two chunks arriving 1 ms apart on a CPU whose single step
takes most of the deadline: run the first alone and the second waits a whole step).

Per stream (a small integer key: a replica's state slot): the last arrival, its deadline
budget (deadline - arrival) and a presence probability (EWMA over ticks of "a chunk came").
A stream's next chunk is expected one period after its last; a tick that passes without it
(more than `grace_s` late) counts as skipped and the next tick is expected instead, and a
stream silent for `forget_after` periods is dropped when next looked at.

Columnar: a request's frames are observed and the expected frames listed with array
operations over the keys, never a Python step per stream.

Pure numpy, no clock: the caller passes arrival times and `now` (seconds, one clock). Where
the optional C module deployments._columns is built, `observe` and `expected` each run as one
loop there, with the same results (tests/deployments/test_columns.py): a replica calls them
once a step, and each of the few dozen array operations they replace costs microseconds
after the replica wakes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from deployments._columns import forecast_expected as _c_expected
    from deployments._columns import forecast_observe as _c_observe
except ImportError:  # built without a C compiler: the numpy versions below
    _c_expected = _c_observe = None

FRAME_PERIOD_S = 0.040  # one 960-sample chunk at 24 kHz


def use_c_loops(native: bool | None) -> bool:
    """Whether a replica part runs its loops in deployments._columns: None, where it is built;
    False, numpy (the tests compare the two); True insists."""
    if native and _c_observe is None:
        raise RuntimeError("deployments._columns is not built")
    return _c_observe is not None if native is None else bool(native)


@dataclass(frozen=True)
class Expected:
    """The frames the forecast expects, one per stream, earliest first (arrays)."""

    keys: np.ndarray  # int64
    arrival: np.ndarray  # seconds; never before the `now` they were forecast at
    deadline: np.ndarray  # seconds
    weight: np.ndarray  # probability the stream sends this tick (its presence)
    due_by: np.ndarray  # seconds; from then on that tick counts as skipped

    def __len__(self) -> int:
        return int(self.keys.size)


class ArrivalForecast:
    """Expected arrivals of periodic streams, keyed by small non-negative integers."""

    def __init__(self, period_s: float = FRAME_PERIOD_S, grace_s: float = 0.002, alpha: float = 0.1,
                 forget_after: int = 50, native: bool | None = None) -> None:
        if period_s <= 0 or grace_s < 0 or not 0.0 < alpha <= 1.0 or forget_after < 1:
            raise ValueError("invalid arrival forecast settings")
        self.period_s = period_s
        self.grace_s = grace_s  # how late an expected frame may be before its tick counts as skipped
        self.alpha = alpha
        self.forget_after = forget_after
        self._known = np.zeros(0, bool)
        self._last = np.zeros(0, np.float64)
        self._budget = np.zeros(0, np.float64)
        self._presence = np.zeros(0, np.float64)
        self._next = np.zeros(0, np.float64)  # the tick expected next (last + k periods)
        self._scratch = self._out_keys = self._out_values = np.empty(0, np.int64)
        # the C loops where built (None: if so; False: numpy, as the tests compare them)
        self.native = use_c_loops(native)

    def __len__(self) -> int:
        return int(np.count_nonzero(self._known))

    def _grow(self, top: int) -> None:
        if top <= self._known.size:
            return
        n = max(top, 2 * self._known.size, 64)
        for name, fill in (("_known", False), ("_last", 0.0), ("_budget", 0.0), ("_presence", 0.0),
                           ("_next", 0.0)):
            old = getattr(self, name)
            new = np.full(n, fill, old.dtype)
            new[: old.size] = old
            setattr(self, name, new)

    def observe(self, keys: np.ndarray, arrival: float, deadlines: np.ndarray) -> None:
        """Frames of `keys` (distinct) arrived at `arrival` with these deadlines."""
        keys = np.asarray(keys, np.int64)
        if not keys.size:
            return
        if self.native:
            cols = (self._known, self._last, self._budget, self._presence, self._next)
            deadlines = np.ascontiguousarray(deadlines, np.float64)
            keys = np.ascontiguousarray(keys)
            need = _c_observe(keys, arrival, deadlines, *cols, self.period_s, 1.0 - self.alpha, self.alpha)
            if need:  # a key beyond the columns: grown, then the same call
                self._grow(need)
                cols = (self._known, self._last, self._budget, self._presence, self._next)
                _c_observe(keys, arrival, deadlines, *cols, self.period_s, 1.0 - self.alpha, self.alpha)
            return
        self._grow(int(keys.max()) + 1)
        budget = np.asarray(deadlines, np.float64) - arrival
        known = self._known[keys]
        if known.all():  # the usual tick: every stream seen before
            old, old_budget = keys, budget
        else:
            new = keys[~known]
            self._known[new] = True
            self._last[new] = arrival
            self._budget[new] = budget[~known]
            self._presence[new] = 1.0
            self._next[new] = arrival + self.period_s
            old, old_budget = keys[known], budget[known]
        if not old.size:
            return
        gap = arrival - self._last[old]
        # the same tick (a late duplicate or a burst) leaves the forecast as it stands
        step = gap >= 0.5 * self.period_s
        if not step.all():
            old, gap, old_budget = old[step], gap[step], old_budget[step]
        # ticks skipped (DTX) lower the presence; this tick's chunk raises it
        keep = 1.0 - self.alpha
        presence = self._presence[old]
        ticks = np.rint(gap / self.period_s)
        skipped = ticks > 1
        if skipped.any():  # decay by keep ** ticks (at least one), computed where it is not 1
            presence[skipped] *= keep ** (ticks[skipped] - 1.0)
        self._presence[old] = presence * keep + self.alpha
        self._last[old] = arrival
        self._budget[old] = old_budget
        self._next[old] = arrival + self.period_s

    def expected(self, now: float, horizon_s: float, exclude: np.ndarray | None = None) -> Expected:
        """Frames expected from now to now + horizon_s (one per stream, earliest first), except
        from the keys where the boolean array `exclude` is set. A frame up to `grace_s` late is
        still expected (now)."""
        if self.native:
            cap = self._known.size
            if self._scratch.size < 4 * cap:  # the C loop's working space, kept between calls
                self._scratch = np.empty(4 * cap, np.int64)
                self._out_keys, self._out_values = np.empty(cap, np.int64), np.empty(4 * cap, np.float64)
            if exclude is not None:
                exclude = np.ascontiguousarray(exclude, bool)
            m = _c_expected(self._known, self._last, self._budget, self._presence, self._next, now,
                            now + horizon_s, self.grace_s, self.forget_after * self.period_s,
                            now - self.grace_s, self.period_s, exclude, self._scratch, self._out_keys,
                            self._out_values)
            v = self._out_values[: 4 * m].copy()  # the caller's to keep: one copy of each
            return Expected(self._out_keys[:m].copy(), v[:m], v[m : 2 * m], v[2 * m : 3 * m], v[3 * m :])
        cand = (self._known & (self._next <= now + horizon_s)).nonzero()[0]
        if cand.size:
            nxt = self._next[cand]
            overdue = nxt + self.grace_s <= now
            if overdue.any():
                od = cand[overdue]
                # the tick passed without its chunk: expect the next one, unless the stream
                # has gone quiet for good
                quiet = now - self._last[od] > self.forget_after * self.period_s
                self._known[od[quiet]] = False
                late = od[~quiet]
                # (at least one tick: rounding can put an exactly-due tick a hair early)
                skip = np.maximum(1.0, np.floor((now - self.grace_s - self._next[late]) / self.period_s) + 1)
                self._next[late] += skip * self.period_s
                cand = cand[self._known[cand] & (self._next[cand] <= now + horizon_s)]
        if exclude is not None and cand.size:
            ex = np.zeros(cand.size, bool)
            inside = cand < exclude.size
            ex[inside] = exclude[cand[inside]]
            cand = cand[~ex]
        t = self._next[cand]
        order = t.argsort(kind="stable")
        cand, t = cand[order], t[order]
        return Expected(cand, np.maximum(t, now), t + self._budget[cand], self._presence[cand].copy(),
                        t + self.grace_s)
