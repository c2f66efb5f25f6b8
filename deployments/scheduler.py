"""Deadline-aware batching for a codec replica: a pure earliest-deadline-first scheduler.

The replica adds every frame it receives (`add_many`: one call per request, columns of the
request's frames), calls `schedule(now)` whenever the model is free, runs `plan.run_refs` as
one batch, answers `plan.expired_refs` with `fallback/deadline` and `plan.shed_refs` with
`fallback/overload` *before* computing, then calls `complete(plan, measured_ms)`.

Rules (why each exists):
- The queue is ordered by (deadline, arrival): the frame closest to being useless goes first.
- A frame that cannot finish in time even if run now alone (now + L(1) + margin > deadline) is
  expired at once: no compute is spent on a frame the call has already moved past.
- The batch is the longest EDF prefix of eligible frames whose predicted step fits the earliest
  deadline in it: now + L(B) + margin <= min deadline. Larger batches use the device better,
  and every frame in the batch is then predicted on time.
- Under overload the head of the queue can hold frames with just enough slack for a tiny
  batch; serving them would starve throughput and push everything else late. When the queue
  holds more than the head-limited batch, the scheduler may skip a few head frames if that
  buys a batch that finishes more frames per millisecond; a skipped frame that can still fit a
  later step stays queued, one that cannot is expired (Nexus-style early drop).
- A stream's frames run in order ((epoch, epoch_seq)) and never two of one stream in a batch:
  its streaming state advances one chunk per step. Later frames wait for the next step.
- The queue is bounded (`max_queue`): a frame beyond it is shed `overload` on arrival.
- The model learns only from steps that run, so when everything expires and nothing has run
  for `probe_after_s`, one frame that the median step time would still finish is run as a
  probe: a single outlier (warm-up, GC pause) cannot turn the AI off for good.

Every frame ever added ends in exactly one place: the queue, a plan's run/expired/shed list;
`check_invariants()` asserts it at the end of every step (cheap counters, not a scan).

Columnar: the queue is a set of numpy columns (deadline, arrival, stream key, epoch, seq, the
caller's reference), and every rule above is an array operation over it, so a replica's
bookkeeping costs a fraction of a microsecond per frame at thousands of frames per tick.
Stream keys are small non-negative integers (a replica's state slots). `add(PendingFrame)`
is the same queue one frame at a time, for callers that think in frames (the batching
benchmark); its plans also list the frames as objects.

Pure Python + numpy: the caller passes `now` (seconds, same clock as deadlines) and measured
times.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from deployments.contract import FallbackReason
from deployments.latency_model import LatencyModel
from models.constants import (
    DEFAULT_DEADLINE_MS,
    DEFAULT_MARGIN_MS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
)

_EMPTY = np.empty(0, np.int64)
_EMPTY_F = np.empty(0, np.float64)


@dataclass(frozen=True)
class SchedulerConfig:
    deadline_ms: float = DEFAULT_DEADLINE_MS  # budget for a frame that arrives without one
    max_batch: int = DEFAULT_MAX_BATCH
    margin_ms: float = DEFAULT_MARGIN_MS  # slack kept between a step's predicted end and a deadline
    max_queue: int = DEFAULT_MAX_QUEUE  # frames waiting; beyond it new frames are shed `overload`
    # Skip up to this many head frames to form a more productive batch under overload.
    max_head_skip: int = 128
    # With frames expiring and no step for this long, run one as a probe of the model.
    probe_after_s: float = 0.25

    def __post_init__(self) -> None:
        if self.deadline_ms <= 0 or self.max_batch < 1 or self.margin_ms < 0 or self.max_queue < 1:
            raise ValueError(f"invalid scheduler config: {self}")

    def updated(self, **changes: Any) -> SchedulerConfig:
        """A copy with the known keys of `changes` applied (unknown keys are ignored)."""
        known = {k: v for k, v in changes.items() if k in self.__dataclass_fields__}
        return replace(self, **known)


@dataclass(eq=False)
class PendingFrame:
    """One frame, for `add()`. `ref` is the caller's handle to it (opaque here)."""

    stream_id: str
    epoch: int
    epoch_seq: int
    deadline: float  # absolute seconds; NaN = use arrival + config.deadline_ms
    arrival: float  # seconds, same clock
    ref: Any = None

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch, self.epoch_seq)


class ShedReason(str, enum.Enum):
    OVERLOAD = "overload"  # queue full on arrival

    @property
    def fallback(self) -> FallbackReason:
        return FallbackReason.OVERLOAD


@dataclass
class Plan:
    """What to do now. `expired_refs` and `shed_refs` are answered before `run_refs` is
    computed. `run`/`expired`/`shed` list the same frames as objects for `add()` callers."""

    now: float
    run_refs: np.ndarray = field(default_factory=lambda: _EMPTY)  # int64, EDF order
    run_deadlines: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    expired_refs: np.ndarray = field(default_factory=lambda: _EMPTY)
    shed_refs: np.ndarray = field(default_factory=lambda: _EMPTY)  # all `overload`
    predicted_ms: float = 0.0
    probe: bool = False  # the run is one frame run against the model's advice (_maybe_probe)
    run: list[PendingFrame] = field(default_factory=list)
    expired: list[PendingFrame] = field(default_factory=list)
    shed: list[tuple[PendingFrame, ShedReason]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.run_refs.size or self.expired_refs.size or self.shed_refs.size)


class EdfScheduler:
    """Earliest-deadline-first batch former over a columnar queue, sized by a latency model."""

    def __init__(self, latency_model: LatencyModel | None = None,
                 config: SchedulerConfig | None = None) -> None:
        self.model = latency_model if latency_model is not None else LatencyModel()
        self.config = config if config is not None else SchedulerConfig()
        self._cap = 0
        self._n = 0  # columns in use (live and removed)
        self._live_n = 0
        self._dl = np.empty(0, np.float64)
        self._arr = np.empty(0, np.float64)
        self._key = np.empty(0, np.int64)
        self._ep = np.empty(0, np.int64)
        self._sq = np.empty(0, np.int64)
        self._ref = np.empty(0, np.int64)
        self._live = np.empty(0, bool)
        self._kq = np.zeros(0, np.int64)  # frames queued per stream key
        self._in_arrival_order = True  # columns were appended with non-decreasing arrivals
        self._last_arrival = -math.inf
        self._shed: list[np.ndarray] = []  # shed in add_many(), reported by the next plan
        self._shed_n = 0
        self.counters: Counter[str] = Counter()  # added, ai_planned, fallback/<reason>, steps
        self.batch_sizes: Counter[int] = Counter()
        self._added = 0
        self._planned_run = 0
        self._planned_expired = 0
        self._planned_shed = 0
        self._last_run_at = -math.inf
        # add(PendingFrame): stream ids -> keys, refs -> the frames
        self._key_of: dict[str, int] = {}
        self._objects: dict[int, PendingFrame] = {}
        self._next_ref = 0

    # --------------------------------------------------------------------------------- intake
    def add_many(self, keys: np.ndarray, epochs: np.ndarray, seqs: np.ndarray,
                 deadlines: np.ndarray, arrival: float, refs: np.ndarray) -> np.ndarray:
        """Queue frames (keys >= 0, distinct within a call) that arrived at `arrival`.
        Returns the refs shed `overload` (they are also in the next plan)."""
        n = len(keys)
        if n == 0:
            return _EMPTY
        self._added += n
        self.counters["added"] += n
        deadlines = np.array(deadlines, np.float64)
        unset = ~np.isfinite(deadlines)
        if unset.any():
            deadlines[unset] = arrival + self.config.deadline_ms / 1000.0
        room = max(0, self.config.max_queue - self._live_n)
        shed = _EMPTY
        if n > room:
            shed = np.asarray(refs[room:], np.int64)
            self._shed.append(shed)
            self._shed_n += shed.size
            self.counters["fallback/overload"] += int(shed.size)
            n = room
            if n == 0:
                return shed
        keys = np.asarray(keys[:n], np.int64)
        self._reserve(n)
        s = slice(self._n, self._n + n)
        self._dl[s] = deadlines[:n]
        self._arr[s] = arrival
        self._key[s] = keys
        self._ep[s] = np.asarray(epochs[:n], np.int64)
        self._sq[s] = np.asarray(seqs[:n], np.int64)
        self._ref[s] = np.asarray(refs[:n], np.int64)
        self._live[s] = True
        self._n += n
        self._live_n += n
        top = int(keys.max()) + 1
        if top > self._kq.size:
            grown = np.zeros(max(top, 2 * self._kq.size), np.int64)
            grown[: self._kq.size] = self._kq
            self._kq = grown
        self._kq[keys] += 1
        if arrival < self._last_arrival:
            self._in_arrival_order = False
        self._last_arrival = arrival
        return shed

    def add(self, frame: PendingFrame) -> PendingFrame | None:
        """Queue one frame. Returns it if it was shed `overload` (it is also in the next plan)."""
        if not math.isfinite(frame.deadline):
            frame.deadline = frame.arrival + self.config.deadline_ms / 1000.0
        key = self._key_of.setdefault(frame.stream_id, len(self._key_of))
        ref = self._next_ref
        self._next_ref += 1
        self._objects[ref] = frame
        shed = self.add_many(np.array([key]), np.array([frame.epoch]), np.array([frame.epoch_seq]),
                             np.array([frame.deadline]), frame.arrival, np.array([ref]))
        return frame if shed.size else None

    def _reserve(self, n: int) -> None:
        if self._n + n <= self._cap:
            return
        live = np.flatnonzero(self._live[: self._n])
        cap = max(1024, 2 * (live.size + n))
        cols = {}
        for name in ("_dl", "_arr", "_key", "_ep", "_sq", "_ref", "_live"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: live.size] = old[live]  # compacted, insertion order kept
            cols[name] = new
        for name, arr in cols.items():
            setattr(self, name, arr)
        self._cap = cap
        self._n = live.size

    def __len__(self) -> int:
        return self._live_n

    def queued_refs(self) -> np.ndarray:
        return self._ref[np.flatnonzero(self._live[: self._n])]

    def queued(self) -> list[PendingFrame]:
        return [self._objects[r] for r in self.queued_refs().tolist() if r in self._objects]

    def reconfigure(self, config: SchedulerConfig) -> None:
        """New knobs apply from the next `schedule()`; queued frames keep their deadlines."""
        self.config = config

    # ------------------------------------------------------------------------------ deciding
    def schedule(self, now: float) -> Plan:
        """Decide the next step at time `now` (seconds)."""
        cfg = self.config
        margin_s = cfg.margin_ms / 1000.0
        plan = Plan(now=now)
        if self._shed:
            plan.shed_refs = np.concatenate(self._shed)
            self._shed, self._shed_n = [], 0
        one_s = self.model.predict(1) / 1000.0
        live = np.flatnonzero(self._live[: self._n])
        expired = [_EMPTY]

        # 1. Expire what cannot finish even alone, before any compute.
        if live.size:
            hopeless = self._dl[live] < now + one_s + margin_s
            if hopeless.any():
                gone = live[hopeless]
                expired.append(gone[self._edf_order(gone)])
                self._remove(gone)
                live = live[~hopeless]

        # 2. Eligible frames: a stream's earliest queued frame, in EDF order.
        run = _EMPTY
        if live.size:
            cands = self._eligible(live)[: cfg.max_batch + cfg.max_head_skip]
            start, size = self._choose_batch(self._dl[cands], now, margin_s)
            run = cands[start : start + size]
            # Head frames skipped for a better batch: keep the ones a later step can still
            # serve, expire the rest (they would only miss after waiting).
            after_s = now + self.model.predict(size) / 1000.0 if size else now
            head = cands[:start]
            lost = head[after_s + one_s + margin_s > self._dl[head]]
            self._remove(run)
            self._remove(lost)
            expired.append(lost)
        exp = np.concatenate(expired)
        if not run.size and exp.size:
            run, exp = self._maybe_probe(run, exp, now, margin_s, plan)
        if run.size:
            self._last_run_at = now
            plan.predicted_ms = self.model.predict(int(run.size))
        plan.run_refs = self._ref[run]
        plan.run_deadlines = self._dl[run]
        plan.expired_refs = self._ref[exp]
        if self._objects:
            self._materialize(plan)
        self._account(plan)
        self.check_invariants()
        return plan

    def _edf_order(self, idx: np.ndarray) -> np.ndarray:
        """Positions of `idx` (column indices, increasing = insertion order) sorted by
        (deadline, arrival, insertion)."""
        if self._in_arrival_order:
            return np.argsort(self._dl[idx], kind="stable")
        return np.lexsort((self._arr[idx], self._dl[idx]))

    def _eligible(self, live: np.ndarray) -> np.ndarray:
        """Each stream's earliest queued frame (by epoch, seq), in EDF order."""
        if (self._kq > 1).any():
            o = np.lexsort((self._sq[live], self._ep[live], self._key[live]))
            k = self._key[live[o]]
            first = np.ones(o.size, bool)
            first[1:] = k[1:] != k[:-1]
            live = np.sort(live[o[first]])
        return live[self._edf_order(live)]

    def _remove(self, idx: np.ndarray) -> None:
        if not idx.size:
            return
        self._live[idx] = False
        self._live_n -= int(idx.size)
        np.subtract.at(self._kq, self._key[idx], 1)
        if self._live_n == 0:
            self._in_arrival_order = True
            self._last_arrival = -math.inf

    def _choose_batch(self, deadlines: np.ndarray, now: float, margin_s: float) -> tuple[int, int]:
        """(start, size): run cands[start:start+size] (`deadlines` of the candidates, in EDF
        order, so a window's earliest deadline is its first).

        Default: the head-limited batch, cands[0:fit(0)]. Only when that batch is smaller than
        the work waiting AND running it first would also shrink the next step (a cascade of
        small steps, i.e. overload) are head frames skipped, and only if the skip finishes
        clearly more frames per ms of compute."""
        cfg = self.config
        model = self.model
        n = int(deadlines.size)

        def fit(i: int, at: float = now) -> int:
            # Largest k with at + L(k) + margin <= deadline of cands[i] (the window's min).
            hi_k = min(n - i, cfg.max_batch)
            if hi_k <= 0:
                return 0
            return model.max_batch_within((float(deadlines[i]) - at - margin_s) * 1000.0, hi_k)

        def full(i: int) -> int:
            return min(n - i, cfg.max_batch)

        k0 = fit(0)
        if k0 >= full(0):
            return 0, k0  # the head does not limit the batch
        if k0 and fit(k0, now + model.predict(k0) / 1000.0) >= full(k0):
            return 0, k0  # serving the head first costs the next step nothing
        best_start, best_size = 0, k0
        best_rate = k0 / model.predict(k0) if k0 else 0.0
        # Skip points: geometric (1, 2, 4, ...) plus the first skip that yields a full batch
        # (binary search; fit(s) grows with s as deadlines grow), all within max_head_skip.
        limit = min(n - 1, cfg.max_head_skip)
        skips = set()
        s = 1
        while s <= limit:
            skips.add(s)
            s *= 2
        lo, hi = 0, limit + 1  # find the smallest s in [1, limit] with fit(s) >= full(s)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fit(mid) >= full(mid):
                hi = mid
            else:
                lo = mid
        if hi <= limit:
            skips.add(hi)
        for skip in sorted(skips):
            size = fit(skip)
            if size:
                rate = size / model.predict(size)
                # Require a clear gain so noise does not skip urgent frames.
                if rate > best_rate * 1.1:
                    best_start, best_size, best_rate = skip, size, rate
        return best_start, best_size

    def _maybe_probe(self, run: np.ndarray, expired: np.ndarray, now: float, margin_s: float,
                     plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """Run one expiring frame as a probe when nothing has run for `probe_after_s`.

        The model only learns from steps that run. One outlier (a warm-up step, a GC pause)
        can push L(1) past every frame's slack; then every frame would expire, no step would
        run, and the model would never see the device is fast again. A probe runs the frame
        with the most slack if the *typical* (median) step would still make it, provided it
        is its stream's earliest frame (so the stream's order holds)."""
        cfg = self.config
        if cfg.probe_after_s <= 0 or now - self._last_run_at < cfg.probe_after_s:
            return run, expired
        typical_s = self.model.typical(1) / 1000.0
        ok = self._dl[expired] >= now + typical_s + margin_s
        if not ok.any():
            return run, expired
        # The stream's earliest frame among the expired ones, with none of its frames queued
        # before it: rare path (nothing ran), so a loop over the few candidates is fine.
        keys, orders = self._key[expired], list(zip(self._ep[expired].tolist(), self._sq[expired].tolist(),
                                                     strict=True))
        earliest: dict[int, tuple[int, int]] = {}
        for k, o in zip(keys.tolist(), orders, strict=True):
            if k not in earliest or o < earliest[k]:
                earliest[k] = o
        live = np.flatnonzero(self._live[: self._n])
        best = -1
        for j in np.flatnonzero(ok).tolist():
            k, o = int(keys[j]), orders[j]
            if o != earliest[k]:
                continue
            same = live[self._key[live] == k]
            if same.size and min(zip(self._ep[same].tolist(), self._sq[same].tolist(), strict=True)) < o:
                continue
            if best < 0 or self._dl[expired[j]] > self._dl[expired[best]]:
                best = j
        if best < 0:
            return run, expired
        plan.probe = True
        self.counters["probes"] += 1
        return expired[best : best + 1], np.delete(expired, best)

    def _materialize(self, plan: Plan) -> None:
        objs = self._objects
        plan.run = [objs.pop(r) for r in plan.run_refs.tolist() if r in objs]
        plan.expired = [objs.pop(r) for r in plan.expired_refs.tolist() if r in objs]
        plan.shed = [(objs.pop(r), ShedReason.OVERLOAD) for r in plan.shed_refs.tolist() if r in objs]

    def _account(self, plan: Plan) -> None:
        n_run, n_exp = int(plan.run_refs.size), int(plan.expired_refs.size)
        self._planned_run += n_run
        self._planned_expired += n_exp
        self._planned_shed += int(plan.shed_refs.size)
        c = self.counters
        if n_run:
            c["steps"] += 1
            c["ai_planned"] += n_run
            self.batch_sizes[n_run] += 1
        if n_exp:
            c["fallback/deadline"] += n_exp

    def check_invariants(self) -> None:
        """Every frame ever added is in exactly one of: queue, a plan's run/expired/shed."""
        accounted = (self._live_n + self._shed_n + self._planned_run + self._planned_expired
                     + self._planned_shed)
        assert accounted == self._added, (
            f"frame accounting broken: added={self._added} queued={self._live_n} "
            f"pending_shed={self._shed_n} run={self._planned_run} "
            f"expired={self._planned_expired} shed={self._planned_shed}"
        )
        assert int(self._kq.sum()) == self._live_n, "stream order index out of sync"

    # ----------------------------------------------------------------------------- feedback
    def complete(self, plan: Plan, measured_ms: float, computed: int | None = None) -> None:
        """Feed the measured step time back into the latency model.

        `computed` is how many frames the step really ran when the replica dropped some of
        the plan's run before compute (e.g. `reset` answers); a step that ran nothing
        (`measured_ms <= 0` or `computed == 0`) teaches the model nothing."""
        n_run = int(plan.run_refs.size)
        if not n_run:
            return
        n = n_run if computed is None else computed
        if n > 0 and measured_ms > 0:
            self.model.observe(n, measured_ms)
        if measured_ms > plan.predicted_ms:
            self.counters["steps_over_prediction"] += 1
        end = plan.now + measured_ms / 1000.0
        late = int(np.count_nonzero(end > plan.run_deadlines))
        if late:
            self.counters["ran_late"] += late
        elif plan.probe:
            # The probe made its deadline: the model is likely stale, probe again at once so
            # it relearns in a few steps instead of one probe per probe_after_s.
            self._last_run_at = -math.inf

    def snapshot_counters(self) -> dict[str, int]:
        return dict(self.counters)
