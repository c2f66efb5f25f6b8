"""Deadline-aware batching for a codec replica: a pure earliest-deadline-first scheduler.

The replica adds every frame it receives (`add_many`: one call per request, columns of the
request's frames), calls `schedule(now)` whenever the model is free, runs `plan.run_refs` as
one batch, answers `plan.expired_refs` with `fallback/deadline` and `plan.shed_refs` with
`fallback/overload` *before* computing, then calls `complete(plan, measured_ms)`.

Decisions come from the latency model's *distribution* of step times T(B) (expected goodput),
not from a worst case: a worst-case rule sheds frames that would very likely have made it.
Rules (why each exists):
- The queue is ordered by (deadline, arrival): the frame closest to being useless goes first.
- A frame whose chance of finishing in time even if run now alone is below `min_on_time_p`
  (P(T(1) <= deadline - now - margin)) is expired at once, and a frame whose deadline is
  already within the margin always is: no compute goes to a frame the call has moved past.
- The batch is the window of eligible frames in queue order (at most `max_batch` long) with
  the most expected on-time frames: those of this step, sum of P(T(B) <= slack_i), plus those
  it leaves behind, in one following step that starts when this one is expected to end and
  also holds the frames expected meanwhile. The lookahead keeps a large batch from stranding
  the frames behind it, and an urgent head frame from costing the rest more than it gains.
- Under overload (steps sized to their head frames cannot serve every frame at mean step
  times) the window may skip up to `max_head_skip` head frames; otherwise it starts at the
  head, since later steps can serve what this one leaves.
- A frame of the chosen batch whose own chance in it is below `min_on_time_p` is not computed;
  it and any skipped head frame stay queued if a later step can still serve them, and are
  expired otherwise (Nexus-style early drop).
- Bridges send one request per tick, so each stream's next chunk is due about one frame period
  after its last (arrivals.py). When holding the batch until such an expected frame arrives
  (at most `max_hold_ms`) is worth more expected on-time frames than running now, nothing
  runs and `plan.hold_until` says when to decide again at the latest (an arrival earlier).
  On a device whose single step takes most of the deadline, two chunks a millisecond apart
  must share a step: run apart, the second waits a whole step.
- A stream's frames run in order ((epoch, epoch_seq)) and never two of one stream in a batch:
  its streaming state advances one chunk per step. Later frames wait for the next step. A
  stream that has fallen behind (a newer frame queued) skips a head frame less than
  `catch_up_p` likely to make it: one frame lost instead of a backlog that drains for ticks.
- The queue is bounded (`max_queue`): a frame beyond it is shed `overload` on arrival.
- The model learns only from steps that run, so when everything expires and nothing has run
  for `probe_after_s`, the expiring frame with the most slack that has not yet missed is run
  as a probe: a stretch of slow steps (warm-up, a stall) cannot turn the AI off for good.
- Whenever frames stay queued and nothing runs, the plan names `hold_until`: the caller sleeps
  until then or the next arrival, never polls.

Every frame ever added ends in exactly one place: the queue, a plan's run/expired/shed list;
`check_invariants()` asserts it at the end of every step (cheap counters, not a scan).

Columnar: the queue is a set of numpy columns (deadline, arrival, stream key, epoch, seq, the
caller's reference), the forecast is columnar too (arrivals.py), and every rule above is an
array operation over them, so a replica's bookkeeping costs a fraction of a microsecond per
frame at thousands of frames per tick. A batch's value is computed over runs of frames with
one deadline (a request's frames share one), not frame by frame: the same sums, in a few
terms. Stream keys are small non-negative integers (a replica's state slots).
`add(PendingFrame)` is the same queue one frame at a time, for callers that think in frames
(the batching benchmark, tests); their plans also list the frames as objects.

Pure logic (numpy), no Ray, no clock: the caller passes `now` (seconds, the clock of the
deadlines) and measured times.
"""

from __future__ import annotations

import enum
import functools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from deployments.arrivals import ArrivalForecast, Expected, use_c_loops
from deployments.contract import FallbackReason
from deployments.latency_model import LatencyModel
from models.constants import (
    DEFAULT_DEADLINE_MS,
    DEFAULT_FRAME_PERIOD_MS,
    DEFAULT_MARGIN_MS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_HOLD_MS,
    DEFAULT_MAX_QUEUE,
)

ARRIVAL_WINDOW = 256  # recent arrivals kept to estimate the arrival rate
MAX_HOLD_OPTIONS = 2  # expected arrival times a decision weighs holding for
_BUDGET_ALPHA = 0.05  # EWMA weight of one frame's budget in the usual budget
# the weights of the last 700 frames' budgets in it, oldest first (older ones: < 1e-16)
_BUDGET_TAIL = _BUDGET_ALPHA * (1.0 - _BUDGET_ALPHA) ** np.arange(699, -1, -1)
_BUDGET_TAIL.flags.writeable = False
try:
    from deployments._columns import queue_add as _c_queue_add
    from deployments._columns import queue_remove as _c_queue_remove
except ImportError:  # built without a C compiler: the numpy versions
    _c_queue_add = _c_queue_remove = None

_EMPTY = np.empty(0, np.int64)
_EMPTY_F = np.empty(0, np.float64)


@functools.lru_cache(maxsize=256)
def _size_grid(kmax: int) -> np.ndarray:
    """Batch sizes the scheduler values: every size up to 16, then steps of ~12.5%, and kmax."""
    sizes = list(range(1, min(16, kmax) + 1))
    b = 16
    while b < kmax:
        b = min(kmax, math.ceil(b * 1.125))
        sizes.append(b)
    grid = np.asarray(sizes)
    grid.flags.writeable = False  # shared by every call
    return grid


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
    # A frame less likely than this to finish in time (alone, or in its batch) is not computed.
    min_on_time_p: float = 0.05
    # A stream with a newer frame queued skips its head frame when that is less likely than
    # this to finish in time (0: never).
    catch_up_p: float = 0.7
    # Hold a batch at most this long for frames the arrival forecast expects (0: never hold).
    max_hold_ms: float = DEFAULT_MAX_HOLD_MS
    # A stream's chunk period, and how late its chunk may come before that tick counts as skipped.
    frame_period_ms: float = DEFAULT_FRAME_PERIOD_MS
    arrival_grace_ms: float = 2.0

    def __post_init__(self) -> None:
        if (self.deadline_ms <= 0 or self.max_batch < 1 or self.margin_ms < 0 or self.max_queue < 1
                or not 0.0 < self.min_on_time_p < 1.0 or self.max_hold_ms < 0
                or self.frame_period_ms <= 0 or self.arrival_grace_ms < 0):
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
    run_refs: np.ndarray = field(default_factory=lambda: _EMPTY)  # int64
    run_deadlines: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    expired_refs: np.ndarray = field(default_factory=lambda: _EMPTY)
    shed_refs: np.ndarray = field(default_factory=lambda: _EMPTY)  # all `overload`
    predicted_ms: float = 0.0  # conservative (high-quantile) step time of the run
    expected_on_time: float = 0.0  # expected frames of the run finishing in time (model's view)
    probe: bool = False  # the run is one frame run against the model's advice (_maybe_probe)
    # Nothing runs but frames stay queued: when the decision must be made again at the latest
    # (the first moment a queued frame would expire). None when something runs or nothing waits.
    hold_until: float | None = None
    run: list[PendingFrame] = field(default_factory=list)
    expired: list[PendingFrame] = field(default_factory=list)
    shed: list[tuple[PendingFrame, ShedReason]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.run_refs.size or self.expired_refs.size or self.shed_refs.size)


class EdfScheduler:
    """Earliest-deadline-first batch former over a columnar queue, valued by the latency
    model's step-time distribution."""

    def __init__(self, latency_model: LatencyModel | None = None,
                 config: SchedulerConfig | None = None, native: bool | None = None) -> None:
        # add_many's and _remove's column work (and the arrival forecast) in C where built (None: if so;
        # False: numpy, as the tests compare them; the same queue either way)
        self.native = use_c_loops(native)
        self.model = latency_model if latency_model is not None else LatencyModel()
        self.config = config if config is not None else SchedulerConfig()
        # -- the queue, column by column (live rows only count)
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
        # -- what the decisions learn from
        self.counters: Counter[str] = Counter()  # added, ai_planned, fallback/<reason>, steps
        self.batch_sizes: Counter[int] = Counter()
        self._added = 0
        self._planned_run = 0
        self._planned_expired = 0
        self._planned_shed = 0
        self._last_run_at = -math.inf
        self._arrivals = np.zeros(ARRIVAL_WINDOW, np.float64)  # a ring of recent arrivals
        self._arrivals_n = 0
        self._arrivals_at = 0
        self._forecast = self._new_forecast(self.config)
        self._budget_ms = self.config.deadline_ms  # the usual budget of a frame on arrival
        # -- add(PendingFrame): stream ids -> keys, refs -> the frames
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
        keys = np.ascontiguousarray(keys, np.int64)
        take = min(n, max(0, self.config.max_queue - self._live_n))  # the rest is shed
        if take:
            self._reserve(take)
        default = arrival + self.config.deadline_ms / 1000.0  # for frames without a deadline
        if self.native:
            deadlines, budgets = self._write_native(keys, epochs, seqs, deadlines, arrival, refs, take, default)
        else:
            deadlines = np.array(deadlines, np.float64)
            unset = ~np.isfinite(deadlines)
            if unset.any():
                deadlines[unset] = default
            budgets = (deadlines - arrival) * 1000.0
            if take:
                s = slice(self._n, self._n + take)
                self._dl[s] = deadlines[:take]
                self._arr[s] = arrival
                self._key[s] = keys[:take]
                self._ep[s] = np.asarray(epochs[:take], np.int64)
                self._sq[s] = np.asarray(seqs[:take], np.int64)
                self._ref[s] = np.asarray(refs[:take], np.int64)
                self._live[s] = True
                self._grow_kq(int(keys[:take].max()) + 1)
                self._kq[keys[:take]] += 1
        self._note_arrivals(arrival, n, budgets)
        self._forecast.observe(keys, arrival, deadlines)
        shed = _EMPTY
        if take < n:
            shed = np.asarray(refs[take:], np.int64)
            self._shed.append(shed)
            self._shed_n += shed.size
            self.counters["fallback/overload"] += int(shed.size)
        if take:
            self._n += take
            self._live_n += take
            if arrival < self._last_arrival:
                self._in_arrival_order = False
            self._last_arrival = arrival
        return shed

    def _write_native(self, keys: np.ndarray, epochs: np.ndarray, seqs: np.ndarray, deadlines: np.ndarray,
                      arrival: float, refs: np.ndarray, take: int, default: float
                      ) -> tuple[np.ndarray, np.ndarray]:
        """`add_many`'s column writes in one C loop (deployments._columns.queue_add), as its
        numpy lines do them; returns every frame's deadline (`default` where it had none) and
        budget (ms)."""
        n = len(keys)
        cols = (np.ascontiguousarray(epochs, np.int64), np.ascontiguousarray(seqs, np.int64),
                np.ascontiguousarray(refs, np.int64), np.ascontiguousarray(deadlines, np.float64))
        filled, budgets = np.empty(n, np.float64), np.empty(n, np.float64)
        queue = (self._dl, self._arr, self._key, self._ep, self._sq, self._ref, self._live)
        need = _c_queue_add(keys, *cols, take, self._n, arrival, default, filled, budgets, *queue, self._kq)
        if need:  # a key beyond kq: grown, then the same call
            self._grow_kq(need)
            _c_queue_add(keys, *cols, take, self._n, arrival, default, filled, budgets, *queue, self._kq)
        return filled, budgets

    def _grow_kq(self, top: int) -> None:
        """Room in the per-stream queued counts for keys below `top`."""
        if top > self._kq.size:
            grown = np.zeros(max(top, 2 * self._kq.size), np.int64)
            grown[: self._kq.size] = self._kq
            self._kq = grown

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

    def _note_arrivals(self, arrival: float, n: int, budgets_ms: np.ndarray) -> None:
        """The arrival-rate window and the usual budget, as n one-by-one arrivals move them."""
        k = min(n, ARRIVAL_WINDOW)
        at = self._arrivals_at  # into the ring from here on, wrapping at its end: two slices
        first = min(k, ARRIVAL_WINDOW - at)
        self._arrivals[at : at + first] = arrival
        self._arrivals[: k - first] = arrival
        self._arrivals_at = (at + k) % ARRIVAL_WINDOW
        self._arrivals_n = min(ARRIVAL_WINDOW, self._arrivals_n + n)
        # b <- b + a (x - b) per frame, in closed form (older terms vanish: 0.95^700 ~ 1e-16)
        tail = budgets_ms[-_BUDGET_TAIL.size:]
        self._budget_ms = (self._budget_ms * (1.0 - _BUDGET_ALPHA) ** n
                           + float(np.dot(_BUDGET_TAIL[_BUDGET_TAIL.size - tail.size:], tail)))

    def _reserve(self, n: int) -> None:
        if self._n + n <= self._cap:
            return
        live = self._live[: self._n].nonzero()[0]
        cap = max(1024, 2 * (live.size + n))
        for name in ("_dl", "_arr", "_key", "_ep", "_sq", "_ref", "_live"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: live.size] = old[live]  # compacted, insertion order kept
            setattr(self, name, new)
        self._cap = cap
        self._n = live.size

    def __len__(self) -> int:
        return self._live_n

    @property
    def pending(self) -> bool:
        """Frames queued or shed but not yet in a plan: `schedule()` has a decision to make."""
        return bool(self._live_n or self._shed)

    def queued_refs(self) -> np.ndarray:
        return self._ref[self._live[: self._n].nonzero()[0]]

    def queued(self) -> list[PendingFrame]:
        return [self._objects[r] for r in self.queued_refs().tolist() if r in self._objects]

    def reconfigure(self, config: SchedulerConfig) -> None:
        """New knobs apply from the next `schedule()`; queued frames keep their deadlines."""
        if (config.frame_period_ms, config.arrival_grace_ms) != (
                self.config.frame_period_ms, self.config.arrival_grace_ms):
            self._forecast = self._new_forecast(config)
        self.config = config

    def _new_forecast(self, config: SchedulerConfig) -> ArrivalForecast:
        return ArrivalForecast(config.frame_period_ms / 1000.0, config.arrival_grace_ms / 1000.0,
                               native=self.native)

    # ------------------------------------------------------------------------------ deciding
    def schedule(self, now: float) -> Plan:
        """Decide the next step at time `now` (seconds)."""
        plan = Plan(now=now)
        if not self.pending:
            return plan  # nothing queued, nothing to report: no decision to make
        cfg = self.config
        margin_s = cfg.margin_ms / 1000.0
        if self._shed:
            plan.shed_refs = np.concatenate(self._shed)
            self._shed, self._shed_n = [], 0
        expired: list[np.ndarray] = [_EMPTY]

        # 1. Expire what is unlikely to finish even alone, before any compute.
        hopeless_s = self._hopeless_s()
        live = self._live[: self._n].nonzero()[0]
        if live.size:
            gone = live[self._dl[live] < now + margin_s + hopeless_s]
            if gone.size:
                expired.append(gone[self._edf_order(gone)])
                self._remove(gone)

        # 2. Eligible frames in queue order: a stream's earliest queued frame, once per batch.
        cands = self._candidates(expired, now, margin_s)

        # 3. Run the most productive window of them now, or hold them all for expected frames.
        run = _EMPTY
        if cands.size:
            start, size, hold_until, certain = self._decide(cands, now, margin_s)
            if hold_until is None:
                run = self._take(plan, expired, cands, start, size, hopeless_s, certain)
            else:
                plan.hold_until = hold_until
                self.counters["holds"] += 1

        exp = np.concatenate(expired)
        if not run.size and exp.size and plan.hold_until is None:
            run, exp = self._maybe_probe(run, exp, now, margin_s, plan)
        if run.size:
            self._last_run_at = now
            plan.predicted_ms = self.model.predict(int(run.size))
        elif self._live_n and plan.hold_until is None:
            # Frames wait and none can run yet: name the time to decide again, 1 us past the
            # expiry cutoff of the earliest deadline (the decision then expires it).
            head = float(self._dl[self._live[: self._n].nonzero()[0]].min())
            plan.hold_until = max(now, head - margin_s - hopeless_s + 1e-6)
        plan.run_refs = self._ref[run]
        plan.run_deadlines = self._dl[run]
        plan.expired_refs = self._ref[exp]
        if self._objects:
            self._materialize(plan)
        self._account(plan)
        self.check_invariants()
        assert run.size or not self._live_n or plan.hold_until is not None, "frames kept without a time"
        return plan

    def _edf_order(self, idx: np.ndarray) -> np.ndarray:
        """Positions of `idx` (column indices, increasing = insertion order) sorted by
        (deadline, arrival, insertion)."""
        if self._in_arrival_order:
            return self._dl[idx].argsort(kind="stable")
        return np.lexsort((self._arr[idx], self._dl[idx]))

    def _eligible(self, limit: int) -> np.ndarray:
        """Each stream's earliest queued frame (by epoch, seq), the first `limit` in EDF order."""
        live = self._live[: self._n].nonzero()[0]
        if live.size and (self._kq > 1).any():
            o = np.lexsort((self._sq[live], self._ep[live], self._key[live]))
            k = self._key[live[o]]
            first = np.ones(o.size, bool)
            first[1:] = k[1:] != k[:-1]
            live = live[o[first]]
            live.sort()
        return live[self._edf_order(live)][:limit]

    def _remove(self, idx: np.ndarray) -> None:
        if not idx.size:
            return
        if self.native:
            _c_queue_remove(np.ascontiguousarray(idx, np.int64), self._live, self._key, self._kq)
        else:
            self._live[idx] = False
            keys = self._key[idx]
            if idx.size > 64:  # a step's worth: one count over the keys beats a scatter per frame
                self._kq -= np.bincount(keys, minlength=self._kq.size)
            else:
                np.subtract.at(self._kq, keys, 1)
        self._live_n -= int(idx.size)
        if self._live_n == 0:
            self._in_arrival_order = True
            self._last_arrival = -math.inf

    def _slack_ms(self, idx: np.ndarray, now: float, margin_s: float) -> np.ndarray:
        return (self._dl[idx] - now - margin_s) * 1000.0

    def _candidates(self, expired: list[np.ndarray], now: float, margin_s: float) -> np.ndarray:
        """The eligible frames, after streams that fell behind caught up."""
        limit = self.config.max_batch + self.config.max_head_skip
        cands = self._eligible(limit)
        behind = self._behind(cands, now, margin_s)
        if not behind.size:
            return cands
        # A stream that has fallen behind skips its frame least likely to make it, so its
        # newer frame runs instead of waiting a step behind it (and the next one behind that):
        # one frame lost instead of a backlog that takes many ticks to drain.
        self._remove(behind)
        expired.append(behind)
        self.counters["caught_up"] += int(behind.size)
        return self._eligible(limit)

    def _behind(self, cands: np.ndarray, now: float, margin_s: float) -> np.ndarray:
        """Candidates whose stream has a newer frame queued and that are less than
        `catch_up_p` likely to finish in a batch of every candidate."""
        if self.config.catch_up_p <= 0 or not cands.size:
            return _EMPTY
        queued = cands[self._kq[self._key[cands]] > 1]
        if not queued.size:
            return _EMPTY
        k = min(cands.size, self.config.max_batch)
        p = self.model.p_within_matrix([k], self._slack_ms(queued, now, margin_s))[0]
        return queued[p < self.config.catch_up_p]

    def _hopeless_s(self) -> float:
        """Slack (s) below which a frame run alone now is less than `min_on_time_p` likely on time."""
        return self.model.quantile_ms(1, self.config.min_on_time_p) / 1000.0

    def _take(self, plan: Plan, expired: list[np.ndarray], cands: np.ndarray, start: int, size: int,
              hopeless_s: float, certain: bool = False) -> np.ndarray:
        """Run cands[start:start+size] (less the frames unlikely to make it in it); frames
        passed over stay queued if a later step can still serve them, else expire."""
        margin_s = self.config.margin_ms / 1000.0
        if certain:  # every frame of the window is sure to finish in it: none to drop
            run, dropped = cands[start : start + size], _EMPTY
            plan.expected_on_time = float(run.size)
        else:
            run, dropped, plan.expected_on_time = self._keep_likely(cands[start : start + size],
                                                                    plan.now, margin_s)
        after_s = plan.now + self.model.mean_of(run.size) / 1000.0 if run.size else plan.now
        passed = np.concatenate([cands[:start], dropped])
        lost = passed[self._dl[passed] < after_s + margin_s + hopeless_s]
        self._remove(run)
        self._remove(lost)
        expired.append(lost)
        return run

    def _keep_likely(self, run: np.ndarray, now: float, margin_s: float
                     ) -> tuple[np.ndarray, np.ndarray, float]:
        """(kept, dropped, expected on-time frames of kept): frames of the batch less than
        `min_on_time_p` likely to finish in it are not computed. Dropping one shortens the
        step, so the rest are re-checked."""
        dropped: list[np.ndarray] = [_EMPTY]
        while run.size:
            p = self.model.p_within_matrix([run.size], self._slack_ms(run, now, margin_s))[0]
            low = p < self.config.min_on_time_p
            if not low.any():
                return run, np.concatenate(dropped), float(p.sum())
            dropped.append(run[low])
            run = run[~low]
        return run, np.concatenate(dropped), 0.0

    def _maybe_probe(self, run: np.ndarray, expired: np.ndarray, now: float, margin_s: float,
                     plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """Run one expiring frame as a probe when nothing has run for `probe_after_s`.

        The model only learns from steps that run. A stretch of slow steps (a warm-up, a
        stall) can fill the model's window until every frame looks hopeless; then every frame
        would expire, no step would run, and the model would never see the device is fast
        again. A probe runs the expiring frame with the most slack that has not yet missed:
        at most one single-frame step per `probe_after_s` spent against the model's advice
        (and it must be its stream's earliest frame, so the stream's order holds)."""
        cfg = self.config
        if cfg.probe_after_s <= 0 or now - self._last_run_at < cfg.probe_after_s:
            return run, expired
        ok = self._dl[expired] > now + margin_s
        if not ok.any():
            return run, expired
        # rare path (nothing ran): a loop over the few expiring frames is fine
        keys = self._key[expired].tolist()
        orders = list(zip(self._ep[expired].tolist(), self._sq[expired].tolist(), strict=True))
        earliest: dict[int, tuple[int, int]] = {}
        for k, o in zip(keys, orders, strict=True):
            if k not in earliest or o < earliest[k]:
                earliest[k] = o
        live = self._live[: self._n].nonzero()[0]
        best = -1
        for j in ok.nonzero()[0].tolist():
            k, o = keys[j], orders[j]
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

    def _decide(self, cands: np.ndarray, now: float, margin_s: float
                ) -> tuple[int, int, float | None, bool]:
        """(start, size, hold_until, certain): run cands[start:start+size] now, or (hold_until
        set) run nothing and decide again then, because waiting for frames the arrival
        forecast expects finishes more frames in time. `certain`: every frame of the window is
        sure to finish in time in it."""
        cfg = self.config
        slack = self._slack_ms(cands, now, margin_s)
        ones = np.ones(cands.size)
        expected: Expected | None = None
        if cfg.max_hold_ms > 0 and cands.size < cfg.max_batch:
            # A stream with a frame queued cannot add another to the next batch.
            expected = self._forecast.expected(now, cfg.max_hold_ms / 1000.0, exclude=self._kq > 0)
        n_exp = len(expected) if expected is not None else 0
        exp_slack = (expected.deadline - now - margin_s) * 1000.0 if n_exp else _EMPTY_F
        exp_weight = expected.weight if n_exp else _EMPTY_F
        if not n_exp and cands.size == 1:
            return 0, 1, None, False  # nothing to weigh: the one frame runs (expiry vetted it)
        # Overload: steps sized to their head frames cannot serve every frame (expected ones
        # and those the arrival rate brings meanwhile included) at mean step times. Then head
        # frames may be skipped and device time is what a batch is valued against. Otherwise
        # later steps can serve what this one leaves, which the one-step lookahead cannot see
        # (it would trade head frames for more now), so the batch starts at the head.
        overloaded = cands.size > 1 and not self._all_feasible(
            slack, exp_slack, self._unseen_slack(float(slack.max()), n_exp))
        if not overloaded and self._all_on_time(slack, exp_slack, exp_weight):
            return 0, cands.size, None, True
        value, start, size = self._best_window(slack, ones, exp_slack, exp_weight, overloaded)
        if not n_exp:
            return start, size, None, False
        # Holding until the i-th expected arrival: those frames join the candidates (weighted
        # by how likely they are to come), every slack shrinks by the wait. Only arrivals before
        # the batch chosen now would end are worth waiting for: a later one finds the device free.
        step_end = now + self.model.mean_of(size) / 1000.0
        arrivals = np.unique(expected.arrival[expected.arrival < step_end])[:MAX_HOLD_OPTIONS]
        best_hold, best_value = None, value * (1.0 + 1e-3) + 1e-3  # a clear gain, or run now
        for t in arrivals.tolist():
            wait_ms = (t - now) * 1000.0
            joins = expected.arrival <= t
            h_slack = np.concatenate([slack, exp_slack[joins]]) - wait_ms
            h_weight = np.concatenate([ones, exp_weight[joins]])
            order = h_slack.argsort(kind="stable")
            v, _, _ = self._best_window(h_slack[order], h_weight[order], exp_slack[~joins] - wait_ms,
                                        exp_weight[~joins], overloaded, wait_ms)
            if v > best_value:
                best_hold, best_value = t, v
        if best_hold is None:
            return start, size, None, False
        # Wait for those frames at most until they are overdue; an arrival wakes the caller.
        return 0, 0, float(expected.due_by[expected.arrival == best_hold].max()), False

    def _all_on_time(self, slack: np.ndarray, later_slack: np.ndarray, later_weight: np.ndarray) -> bool:
        """True when a batch of every candidate is certain to finish in time (each slack at
        least the step's largest possible time) and every later frame certain in the step
        after it. That batch is then the best window (a smaller one finishes no more frames)
        and no hold can do better, so the valuation is skipped: the common case of a replica
        with time to spare."""
        n = slack.size
        later_total = float(later_weight.sum())
        if n > self.config.max_batch or n + later_total > self.config.max_batch:
            return False
        if float(slack.min()) < self.model.max_of(n):
            return False
        if not later_slack.size:
            return True
        tau = self.model.mean_of(n)
        unknown = max(self._arrival_rate_per_ms() * tau - later_total, 0.0)
        m = min(max(round(later_total + unknown), 1), self.config.max_batch)
        return float(later_slack.min()) - tau >= self.model.max_of(m)

    def _best_window(
        self, slack: np.ndarray, weight: np.ndarray, later_slack: np.ndarray, later_weight: np.ndarray,
        overloaded: bool, wait_ms: float = 0.0,
    ) -> tuple[float, int, int]:
        """(value, start, size) of the best batch from frames with these slacks (ms, in queue
        order) and weights (probability each frame is there at all).

        Every window (start = head frames skipped, up to max_head_skip; size up to max_batch)
        is valued by the expected number of frames finishing in time: this step's, sum of
        w_i P(T(size) <= slack_i) over the window, plus the frames it leaves behind and the
        `later` ones (frames that can only join a following step), each with
        P(T(m) <= slack_i - E[T(size)]) in one following step of m frames (those left plus the
        arrivals expected meanwhile). The lookahead is what stops a large batch from stranding
        the frames behind it, and a head frame from costing the rest more than it gains.
        Overloaded, windows may skip head frames and the value is per ms of device time
        (`wait_ms` of holding included).

        The sums run over runs of frames with one slack (a request's frames share a
        deadline): P is evaluated once per distinct slack, and a prefix sum up to any frame
        is the whole runs before it plus the part of its own run, by weight."""
        cfg = self.config
        model = self.model
        n = len(slack)
        ks = _size_grid(min(n, cfg.max_batch))
        nk = len(ks)
        tau = model.mean_ms(ks)  # expected length of this step, per size
        later_total = float(later_weight.sum())
        # Frames arriving during this step beyond the expected ones we know: they join the
        # next step (with about the usual budget less half the step).
        unknown = np.maximum(self._arrival_rate_per_ms() * tau - later_total, 0.0)
        m = np.minimum(np.maximum(np.rint(n - ks + later_total + unknown), 1), cfg.max_batch).astype(int)
        # runs of equal slack among the candidates, and the later frames by distinct slack
        run_start = np.concatenate(([True], slack[1:] != slack[:-1])).nonzero()[0]
        run_slack = slack[run_start]
        cw = np.concatenate(([0.0], weight.cumsum()))  # weight before each position
        run_end = np.concatenate((run_start[1:], [n]))
        run_w = cw[run_end] - cw[run_start]
        lat_slack, lat_inv = np.unique(later_slack, return_inverse=True)
        lat_w = np.bincount(lat_inv.ravel(), weights=later_weight, minlength=lat_slack.size)
        u, v = run_slack.size, lat_slack.size
        # One CDF evaluation for both steps: rows for this step's sizes, then the next one's.
        all_slack = np.concatenate([run_slack, lat_slack, [0.0]])
        budgets = np.empty((2 * nk, all_slack.size))
        budgets[:nk] = all_slack
        budgets[nk:] = all_slack[None, :] - tau[:, None]
        budgets[nk:, -1] = self._budget_ms - cfg.margin_ms - tau / 2.0
        p = model.p_within_matrix(np.concatenate([ks, m]), budgets)
        now_run = p[:nk, :u]  # P per run, this step
        next_run = p[nk:, :u]  # ... and the next one
        nxt = next_run @ run_w + p[nk:, u : u + v] @ lat_w  # every frame next step, were none run now
        if overloaded:
            # ... and the unknown arrivals, which a full next step serves anyway under overload
            # (frames left behind compete with them).
            nxt = nxt + unknown * p[nk:, -1]
        # A window's value = its frames' chances now + everyone else's in the next step
        #                  = nxt + sum over the window of (now - next); ties (and near-ties)
        # go to frames finished now (x 1.001): the lookahead is an estimate.
        gain = now_run * 1.001 - next_run  # [nk, u] per unit of weight
        starts = np.arange(min(n - 1, cfg.max_head_skip) + 1 if overloaded else 1)
        end = starts[:, None] + ks[None, :]  # [S, K]
        end_c = np.minimum(end, n)
        window = _prefix(gain, run_start, run_w, cw, end_c) - _prefix(gain, run_start, run_w, cw, starts[:, None])
        if nxt.max() > cfg.max_batch:
            # The next step cannot take every frame left behind: cap its share.
            in_window = (_prefix(next_run, run_start, run_w, cw, end_c)
                         - _prefix(next_run, run_start, run_w, cw, starts[:, None]))
            value = window + in_window + np.minimum(nxt - in_window, cfg.max_batch)
        else:
            value = window + nxt
        if overloaded:
            # Device time is the scarce thing: on-time frames per ms over both steps (and any
            # wait before them), or a step of a few easy frames would look as good as a full one.
            value = value / (wait_ms + tau + model.mean_ms(m))
        value[end > n] = -np.inf
        # The first window in (start, size) order within a relative 1e-9 of the best: the head
        # first, and what counts as the best does not hang on the order numpy adds in.
        si, kj = np.unravel_index(_first_best(value.ravel()), value.shape)
        return float(value[si, kj]), int(si), int(ks[kj])

    def _unseen_slack(self, horizon_ms: float, known: int) -> np.ndarray:
        """Slacks (ms from now) of the frames the arrival rate brings within `horizon_ms`,
        beyond `known` expected ones: evenly spaced, each with the usual budget."""
        rate = self._arrival_rate_per_ms()
        count = int(rate * horizon_ms) - known
        if count <= 0:
            return _EMPTY_F
        at = (np.arange(count) + 0.5) / rate
        return at + self._budget_ms - self.config.margin_ms

    def _all_feasible(self, slack: np.ndarray, exp_slack: np.ndarray, unseen: np.ndarray) -> bool:
        """`_feasible` of all these frames. When one step of every frame fits the tightest
        slack, the check's first step takes them all: that is answered without sorting
        (`unseen` is in increasing order), the usual case of a replica with time to spare."""
        n = slack.size + exp_slack.size + unseen.size
        if n <= self.config.max_batch:
            tightest = float(slack.min())
            if exp_slack.size:
                tightest = min(tightest, float(exp_slack.min()))
            if unseen.size:
                tightest = min(tightest, float(unseen[0]))
            if self.model.mean_of(n) <= tightest:
                return True
        every = np.concatenate([slack, exp_slack, unseen])
        every.sort()
        return self._feasible(every)

    def _feasible(self, slack_sorted: np.ndarray) -> bool:
        """Can steps run back to back, each the largest deadline-order prefix whose mean step
        time fits its first frame's slack, serve every frame? (An EDF fluid check.)"""
        cap = self.config.max_batch
        top = min(cap, len(slack_sorted))
        mean_ms = self.model.mean_ms
        t, i, n = 0.0, 0, len(slack_sorted)
        grid = _size_grid(top)
        grid_means = mean_ms(grid)
        while i < n:
            # the largest k <= top with mean(k) <= slack - t (means grow with k): bracketed on
            # the size grid, then resolved among the sizes in the bracket, in two model calls
            budget = slack_sorted[i] - t
            j = int(grid_means.searchsorted(budget, side="right"))
            if j == 0:
                k = 0
            elif j == grid.size:
                k = int(grid[-1])
            else:
                ks = np.arange(grid[j - 1], grid[j])
                k = int(ks[mean_ms(ks).searchsorted(budget, side="right") - 1])
            k = min(k, n - i)
            if k == 0:
                return False
            t += self.model.mean_of(k)
            i += k
        return True

    def _arrival_rate_per_ms(self) -> float:
        """Frames per ms over the recent arrivals (0 until two distinct arrival times)."""
        n = self._arrivals_n
        if n < 2:
            return 0.0
        newest = self._arrivals[(self._arrivals_at - 1) % ARRIVAL_WINDOW]
        oldest = self._arrivals[(self._arrivals_at - n) % ARRIVAL_WINDOW]
        if newest <= oldest:
            return 0.0
        return (n - 1) / ((newest - oldest) * 1000.0)

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


def _first_best(value: np.ndarray) -> int:
    """Index of the first entry within a relative 1e-9 of the maximum."""
    best = float(value.max())
    return int((value >= best - 1e-9 * (1.0 + abs(best))).argmax())


def _prefix(per_run: np.ndarray, run_start: np.ndarray, run_w: np.ndarray, cw: np.ndarray,
            pos: np.ndarray) -> np.ndarray:
    """For each row k of `per_run` ([K, U]: a value per unit weight of each run) and each
    position in `pos` (any shape broadcasting against [..., K]: frames taken from the head),
    the weighted sum over those frames: whole runs before the position plus the part of its
    own run. Returns pos's shape with a trailing K axis folded in: [..., K]."""
    k = per_run.shape[0]
    whole = np.zeros((k, per_run.shape[1] + 1))
    np.cumsum(per_run * run_w, axis=1, out=whole[:, 1:])
    pos = np.broadcast_to(pos, np.broadcast_shapes(pos.shape, (1, k))) if pos.ndim == 2 else pos
    r = np.searchsorted(run_start, pos, side="right") - 1  # the run a position falls in
    rows = np.broadcast_to(np.arange(k), pos.shape)
    r_c = np.minimum(r, per_run.shape[1] - 1)
    partial = cw[pos] - cw[run_start[r_c]]
    return whole[rows, r_c] + per_run[rows, r_c] * partial
