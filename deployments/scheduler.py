"""Deadline-aware batching for a codec replica: a pure earliest-deadline-first scheduler.

The replica `add`s every frame it receives, calls `schedule(now)` whenever the model is free,
runs `plan.run` as one batch, answers `plan.expired` with `fallback/deadline` and `plan.shed`
with their reasons *before* computing, then calls `complete(plan, measured_ms)`.

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

Pure logic (numpy for the valuation), no Ray, no clock: the caller passes `now` (seconds, the
clock of the deadlines) and measured times.
"""

from __future__ import annotations

import enum
import functools
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from deployments.arrivals import ArrivalForecast
from deployments.contract import FallbackReason
from deployments.latency_model import LatencyModel

ARRIVAL_WINDOW = 256  # recent arrivals kept to estimate the arrival rate
MAX_HOLD_OPTIONS = 2  # expected arrival times a decision weighs holding for


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
    deadline_ms: float = 20.0  # budget for a frame that arrives without its own deadline
    max_batch: int = 128
    margin_ms: float = 1.0  # slack kept between the predicted end of a step and a deadline
    max_queue: int = 4096  # frames waiting; beyond it new frames are shed `overload`
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
    max_hold_ms: float = 20.0
    # A stream's chunk period, and how late its chunk may come before that tick counts as skipped.
    frame_period_ms: float = 40.0
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
    """One frame waiting for compute. `ref` is the replica's handle to the row (opaque here)."""

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
    """What to do now. `expired` and `shed` are answered before `run` is computed."""

    now: float
    run: list[PendingFrame] = field(default_factory=list)
    expired: list[PendingFrame] = field(default_factory=list)
    shed: list[tuple[PendingFrame, ShedReason]] = field(default_factory=list)
    predicted_ms: float = 0.0  # conservative (high-quantile) step time of `run`
    expected_on_time: float = 0.0  # expected frames of `run` finishing in time (model's view)
    probe: bool = False  # `run` is one frame run against the model's advice (see _maybe_probe)
    # Nothing runs but frames stay queued: when the decision must be made again at the latest
    # (the first moment a queued frame would expire). None when something runs or nothing waits.
    hold_until: float | None = None

    def __bool__(self) -> bool:
        return bool(self.run or self.expired or self.shed)


# ------------------------------------------------------------------------------------ queues
class FrameQueue(Protocol):
    """The ordering a scheduler serves frames in."""

    def push(self, frame: PendingFrame) -> None: ...
    def pop(self) -> PendingFrame: ...
    def peek(self) -> PendingFrame | None: ...
    def pop_expired(self, cutoff: float) -> list[PendingFrame]: ...
    def unpop(self, frames: list[PendingFrame]) -> None:
        """Return frames popped (in pop order) and not used, to their places."""
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[PendingFrame]: ...


class EdfQueue:
    """Heap on (deadline, arrival); ties broken by insertion order."""

    deadline_ordered = True  # pops come out by deadline: a batch's earliest deadline is its first

    def __init__(self) -> None:
        self._heap: list[tuple[float, float, int, PendingFrame]] = []
        self._seq = itertools.count()

    def push(self, frame: PendingFrame) -> None:
        heapq.heappush(self._heap, (frame.deadline, frame.arrival, next(self._seq), frame))

    def pop(self) -> PendingFrame:
        return heapq.heappop(self._heap)[3]

    def unpop(self, frames: list[PendingFrame]) -> None:
        for f in frames:
            self.push(f)

    def peek(self) -> PendingFrame | None:
        return self._heap[0][3] if self._heap else None

    def pop_expired(self, cutoff: float) -> list[PendingFrame]:
        """Frames whose deadline is before `cutoff`: all at the head of the heap."""
        out = []
        while self._heap and self._heap[0][0] < cutoff:
            out.append(heapq.heappop(self._heap)[3])
        return out

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[PendingFrame]:
        return (e[3] for e in self._heap)


class FifoQueue:
    """Arrival order, for comparison (what a plain batching queue does)."""

    def __init__(self) -> None:
        self._q: deque[PendingFrame] = deque()

    def push(self, frame: PendingFrame) -> None:
        self._q.append(frame)

    def pop(self) -> PendingFrame:
        return self._q.popleft()

    def unpop(self, frames: list[PendingFrame]) -> None:
        self._q.extendleft(reversed(frames))

    def peek(self) -> PendingFrame | None:
        return self._q[0] if self._q else None

    def pop_expired(self, cutoff: float) -> list[PendingFrame]:
        if not any(f.deadline < cutoff for f in self._q):
            return []
        out = [f for f in self._q if f.deadline < cutoff]
        self._q = deque(f for f in self._q if f.deadline >= cutoff)
        return out

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[PendingFrame]:
        return iter(self._q)


# ------------------------------------------------------------------------------------ scheduler
class EdfScheduler:
    """Earliest-deadline-first batch former, sized by an online latency model."""

    def __init__(
        self,
        latency_model: LatencyModel | None = None,
        config: SchedulerConfig | None = None,
        queue: FrameQueue | None = None,
    ) -> None:
        self.model = latency_model if latency_model is not None else LatencyModel()
        self.config = config if config is not None else SchedulerConfig()
        self._queue: FrameQueue = queue if queue is not None else EdfQueue()
        # Per stream: heap of (epoch, epoch_seq) still queued, to keep a stream's frames in order.
        self._pending: dict[str, list[tuple[int, int]]] = {}
        self._pending_n = 0  # total entries in _pending (checked against the queue length)
        self._overload: list[tuple[PendingFrame, ShedReason]] = []  # shed in add(), reported next plan
        self.counters: Counter[str] = Counter()  # added, ai_planned, fallback/<reason>, steps
        self.batch_sizes: Counter[int] = Counter()
        self._added = 0
        self._planned_run = 0
        self._planned_expired = 0
        self._planned_shed = 0
        self._last_run_at = -math.inf
        self._arrivals: deque[float] = deque(maxlen=ARRIVAL_WINDOW)
        self._forecast = self._new_forecast(self.config)
        self._budget_ms = self.config.deadline_ms

    # --------------------------------------------------------------------------------- intake
    def add(self, frame: PendingFrame) -> PendingFrame | None:
        """Queue a frame. Returns it if it was shed `overload` (it is also in the next plan)."""
        self._added += 1
        self.counters["added"] += 1
        self._arrivals.append(frame.arrival)
        # The usual budget of a frame on arrival, for arrivals not yet seen.
        self._budget_ms += 0.05 * ((frame.deadline - frame.arrival) * 1000.0 - self._budget_ms)
        if not math.isfinite(frame.deadline):
            frame.deadline = frame.arrival + self.config.deadline_ms / 1000.0
        self._forecast.observe(frame.stream_id, frame.arrival, frame.deadline)
        if len(self._queue) >= self.config.max_queue:
            self._overload.append((frame, ShedReason.OVERLOAD))
            self.counters["fallback/overload"] += 1
            return frame
        self._queue.push(frame)
        heapq.heappush(self._pending.setdefault(frame.stream_id, []), frame.order)
        self._pending_n += 1
        return None

    def __len__(self) -> int:
        return len(self._queue)

    def queued(self) -> list[PendingFrame]:
        return list(self._queue)

    def reconfigure(self, config: SchedulerConfig) -> None:
        """New knobs apply from the next `schedule()`; queued frames keep their deadlines."""
        if (config.frame_period_ms, config.arrival_grace_ms) != (
                self.config.frame_period_ms, self.config.arrival_grace_ms):
            self._forecast = self._new_forecast(config)
        self.config = config

    @staticmethod
    def _new_forecast(config: SchedulerConfig) -> ArrivalForecast:
        return ArrivalForecast(config.frame_period_ms / 1000.0, config.arrival_grace_ms / 1000.0)

    # ------------------------------------------------------------------------------ deciding
    def schedule(self, now: float) -> Plan:
        """Decide the next step at time `now` (seconds)."""
        margin_s = self.config.margin_ms / 1000.0
        plan = Plan(now=now, shed=self._overload)
        self._overload = []

        # 1. Expire what is unlikely to finish even alone, before any compute.
        hopeless_s = self._hopeless_s()
        for f in self._queue.pop_expired(now + margin_s + hopeless_s):
            self._forget(f)
            plan.expired.append(f)

        # 2. Eligible frames in queue order: a stream's earliest queued frame, once per batch.
        popped, candidates = self._candidates(plan, now, margin_s)

        # 3. Run the most productive window of them now, or hold them all for expected frames.
        if candidates:
            start, size, hold_until = self._decide(candidates, now, margin_s)
            if hold_until is None:
                self._take(plan, popped, candidates, start, size, hopeless_s)
            else:
                self._queue.unpop(popped)
                plan.hold_until = hold_until
                self.counters["holds"] += 1
        else:
            self._queue.unpop(popped)

        if not plan.run and plan.expired and plan.hold_until is None:
            self._maybe_probe(plan, now, margin_s)
        if plan.run:
            self._last_run_at = now
            plan.predicted_ms = self.model.predict(len(plan.run))
        elif len(self._queue) and plan.hold_until is None:
            # Frames wait and none can run yet: name the time to decide again, 1 us past the
            # expiry cutoff of the earliest deadline (the decision then expires it).
            head = min(f.deadline for f in self._queue)
            plan.hold_until = max(now, head - margin_s - hopeless_s + 1e-6)
        self._account(plan)
        self.check_invariants()
        assert plan.run or not len(self._queue) or plan.hold_until is not None, "frames kept without a time"
        return plan

    def _candidates(
        self, plan: Plan, now: float, margin_s: float
    ) -> tuple[list[PendingFrame], list[PendingFrame]]:
        """(popped, eligible) as `_eligible_prefix`, after streams that fell behind caught up."""
        limit = self.config.max_batch + self.config.max_head_skip
        popped, candidates = self._eligible_prefix(limit)
        behind = self._behind(candidates, now, margin_s)
        if not behind:
            return popped, candidates
        # A stream that has fallen behind skips its frame least likely to make it, so its
        # newer frame runs instead of waiting a step behind it (and the next one behind that):
        # one frame lost instead of a backlog that takes many ticks to drain.
        gone = {id(f) for f in behind}
        self._queue.unpop([f for f in popped if id(f) not in gone])
        for f in behind:
            self._forget(f)
        plan.expired.extend(behind)
        self.counters["caught_up"] += len(behind)
        return self._eligible_prefix(limit)

    def _take(self, plan: Plan, popped: list[PendingFrame], candidates: list[PendingFrame],
              start: int, size: int, hopeless_s: float) -> None:
        """Run candidates[start:start+size] (less the frames unlikely to make it in it);
        frames passed over stay queued if a later step can still serve them, else expire."""
        margin_s = self.config.margin_ms / 1000.0
        run, dropped, plan.expected_on_time = self._keep_likely(
            candidates[start : start + size], plan.now, margin_s)
        after_s = plan.now + float(self.model.mean_ms([len(run)])[0]) / 1000.0 if run else plan.now
        lost = [f for f in (*candidates[:start], *dropped) if f.deadline < after_s + margin_s + hopeless_s]
        plan.run = run
        leaving = {id(f) for f in itertools.chain(run, lost)}
        self._queue.unpop([f for f in popped if id(f) not in leaving])
        for f in itertools.chain(run, lost):
            self._forget(f)
        plan.expired.extend(lost)

    def _behind(self, cands: list[PendingFrame], now: float, margin_s: float) -> list[PendingFrame]:
        """Candidates whose stream has a newer frame queued and that are less than
        `catch_up_p` likely to finish in a batch of every candidate."""
        if self.config.catch_up_p <= 0:
            return []
        queued = [f for f in cands if len(self._pending[f.stream_id]) > 1]
        if not queued:
            return []
        k = min(len(cands), self.config.max_batch)
        p = self.model.p_within_matrix([k], self._slack_ms(queued, now, margin_s))[0]
        return [f for f, pf in zip(queued, p, strict=True) if pf < self.config.catch_up_p]

    def _hopeless_s(self) -> float:
        """Slack (s) below which a frame run alone now is less than `min_on_time_p` likely on time."""
        return self.model.quantile_ms(1, self.config.min_on_time_p) / 1000.0

    def _on_time_p(self, frames: list[PendingFrame], now: float, margin_s: float) -> np.ndarray:
        return self.model.p_within_matrix([len(frames)], self._slack_ms(frames, now, margin_s))[0]

    def _keep_likely(
        self, run: list[PendingFrame], now: float, margin_s: float
    ) -> tuple[list[PendingFrame], list[PendingFrame], float]:
        """(kept, dropped, expected on-time frames of kept): frames of the batch less than
        `min_on_time_p` likely to finish in it are not computed. Dropping one shortens the
        step, so the rest are re-checked."""
        dropped: list[PendingFrame] = []
        while run:
            p = self._on_time_p(run, now, margin_s)
            low = p < self.config.min_on_time_p
            if not low.any():
                return run, dropped, float(p.sum())
            dropped.extend(f for f, lo in zip(run, low, strict=True) if lo)
            run = [f for f, lo in zip(run, low, strict=True) if not lo]
        return run, dropped, 0.0

    def _maybe_probe(self, plan: Plan, now: float, margin_s: float) -> None:
        """Run one expiring frame as a probe when nothing has run for `probe_after_s`.

        The model only learns from steps that run. A stretch of slow steps (a warm-up, a
        stall) can fill the model's window until every frame looks hopeless; then every frame
        would expire, no step would run, and the model would never see the device is fast
        again. A probe runs the expiring frame with the most slack that has not yet missed:
        at most one single-frame step per `probe_after_s` spent against the model's advice."""
        cfg = self.config
        if cfg.probe_after_s <= 0 or now - self._last_run_at < cfg.probe_after_s:
            return
        earliest: dict[str, tuple[int, int]] = {}
        for f in plan.expired:
            if f.stream_id not in earliest or f.order < earliest[f.stream_id]:
                earliest[f.stream_id] = f.order
        best: PendingFrame | None = None
        for f in plan.expired:
            queued = self._pending.get(f.stream_id)
            in_order = f.order == earliest[f.stream_id] and (not queued or queued[0] > f.order)
            if in_order and now + margin_s < f.deadline:
                if best is None or f.deadline > best.deadline:
                    best = f
        if best is None:
            return
        plan.expired.remove(best)
        plan.run = [best]
        plan.probe = True
        self.counters["probes"] += 1

    def _eligible_prefix(self, limit: int) -> tuple[list[PendingFrame], list[PendingFrame]]:
        """Pop frames in queue order until `limit` eligible ones are found (a stream's
        earliest queued frame, one per stream). Returns (all popped, eligible subset)."""
        popped: list[PendingFrame] = []
        candidates: list[PendingFrame] = []
        seen: set[str] = set()
        # Bound the scan: a queue full of one stream's frames must not make a step O(queue).
        scan_budget = 4 * limit + 64
        queue = self._queue
        remaining = len(queue)
        while remaining and len(candidates) < limit and len(popped) < scan_budget:
            f = queue.pop()
            remaining -= 1
            popped.append(f)
            sid = f.stream_id
            if sid in seen or self._pending[sid][0] != f.order:
                continue
            seen.add(sid)
            candidates.append(f)
        return popped, candidates

    def _decide(
        self, cands: list[PendingFrame], now: float, margin_s: float
    ) -> tuple[int, int, float | None]:
        """(start, size, hold_until): run cands[start:start+size] now, or (hold_until set) run
        nothing and decide again then, because waiting for frames the arrival forecast expects
        finishes more frames in time."""
        cfg = self.config
        slack = self._slack_ms(cands, now, margin_s)
        ones = np.ones(len(cands))
        expected = []
        if cfg.max_hold_ms > 0 and len(cands) < cfg.max_batch:
            # A stream with a frame queued cannot add another to the next batch.
            expected = self._forecast.expected(now, cfg.max_hold_ms / 1000.0, exclude=self._pending.keys())
        exp_slack = np.array([(e.deadline - now - margin_s) * 1000.0 for e in expected])
        exp_weight = np.array([e.weight for e in expected])
        if not expected and len(cands) == 1:
            return 0, 1, None  # nothing to weigh: the one frame runs (expiry vetted it)
        # Overload: steps sized to their head frames cannot serve every frame (expected ones
        # and those the arrival rate brings meanwhile included) at mean step times. Then head frames may be skipped and device time is
        # what a batch is valued against. Otherwise later steps can serve what this one
        # leaves, which the one-step lookahead cannot see (it would trade head frames for more
        # now), so the batch starts at the head.
        overloaded = len(cands) > 1 and not self._feasible(np.sort(np.concatenate(
            [slack, exp_slack, self._unseen_slack(float(slack.max()), len(expected))])))
        value, start, size = self._best_window(slack, ones, exp_slack, exp_weight, overloaded)
        if not expected:
            return start, size, None
        # Holding until the i-th expected arrival: those frames join the candidates (weighted
        # by how likely they are to come), every slack shrinks by the wait. Only arrivals before
        # the batch chosen now would end are worth waiting for: a later one finds the device free.
        edf = getattr(self._queue, "deadline_ordered", False)
        step_end = now + float(self.model.mean_ms([size])[0]) / 1000.0
        arrivals = sorted({e.arrival for e in expected if e.arrival < step_end})[:MAX_HOLD_OPTIONS]
        best_hold, best_value = None, value * (1.0 + 1e-3) + 1e-3  # a clear gain, or run now
        for t in arrivals:
            wait_ms = (t - now) * 1000.0
            joins = np.array([e.arrival <= t for e in expected])
            h_slack = np.concatenate([slack, exp_slack[joins]]) - wait_ms
            h_weight = np.concatenate([ones, exp_weight[joins]])
            if edf:
                order = np.argsort(h_slack, kind="stable")
                h_slack, h_weight = h_slack[order], h_weight[order]
            v, _, _ = self._best_window(h_slack, h_weight, exp_slack[~joins] - wait_ms, exp_weight[~joins],
                                        overloaded, wait_ms)
            if v > best_value:
                best_hold, best_value = t, v
        if best_hold is None:
            return start, size, None
        # Wait for those frames at most until they are overdue; an arrival wakes the caller.
        return 0, 0, max(e.due_by for e in expected if e.arrival == best_hold)

    @staticmethod
    def _slack_ms(frames: list[PendingFrame], now: float, margin_s: float) -> np.ndarray:
        return np.fromiter(((f.deadline - now - margin_s) * 1000.0 for f in frames), float, len(frames))

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
        (`wait_ms` of holding included)."""
        cfg = self.config
        model = self.model
        n = len(slack)
        ks = _size_grid(min(n, cfg.max_batch))
        nk = len(ks)
        tau = model.mean_ms(ks)  # expected length of this step, per size
        # Frames arriving during this step beyond the expected ones we know: they join the
        # next step (with about the usual budget less half the step).
        unknown = np.maximum(self._arrival_rate_per_ms() * tau - later_weight.sum(), 0.0)
        m = np.minimum(np.maximum(np.rint(n - ks + later_weight.sum() + unknown), 1), cfg.max_batch).astype(int)
        # One CDF evaluation for both steps: rows for this step's sizes, then the next one's.
        all_slack = np.concatenate([slack, later_slack, [0.0]])
        budgets = np.empty((2 * nk, len(all_slack)))
        budgets[:nk] = all_slack
        budgets[nk:] = all_slack[None, :] - tau[:, None]
        budgets[nk:, -1] = self._budget_ms - cfg.margin_ms - tau / 2.0
        p = model.p_within_matrix(np.concatenate([ks, m]), budgets)
        now_p = p[:nk, :n] * weight
        next_p = p[nk:, :-1] * np.concatenate([weight, later_weight])
        nxt = next_p.sum(axis=1)  # every frame in the next step, were none run now
        if overloaded:
            # ... and the unknown arrivals, which a full next step serves anyway under overload
            # (frames left behind compete with them).
            nxt = nxt + unknown * p[nk:, -1]
        # A window's value = its frames' chances now + everyone else's in the next step
        #                  = nxt + sum over the window of (now - next); ties (and near-ties)
        # go to frames finished now (x 1.001): the lookahead is an estimate.
        diff = np.zeros((nk, n + 1))
        np.cumsum(now_p * 1.001 - next_p[:, :n], axis=1, out=diff[:, 1:])
        starts = np.arange(min(n - 1, cfg.max_head_skip) + 1 if overloaded else 1)[:, None]
        end = starts + ks  # [S, K]
        end_c = np.minimum(end, n)
        ki = np.arange(nk)
        window = diff[ki, end_c] - diff[ki, starts]
        if nxt.max() > cfg.max_batch:
            # The next step cannot take every frame left behind: cap its share.
            cum = np.zeros((nk, n + 1))
            np.cumsum(next_p[:, :n], axis=1, out=cum[:, 1:])
            in_window = cum[ki, end_c] - cum[ki, starts]
            value = window + in_window + np.minimum(nxt - in_window, cfg.max_batch)
        else:
            value = window + nxt
        if overloaded:
            # Device time is the scarce thing: on-time frames per ms over both steps (and any
            # wait before them), or a step of a few easy frames would look as good as a full one.
            value = value / (wait_ms + tau + model.mean_ms(m))
        value[end > n] = -np.inf
        # First maximum in (start, size) order: then the head first.
        si, kj = np.unravel_index(int(np.argmax(value)), value.shape)
        return float(value[si, kj]), int(si), int(ks[kj])

    def _unseen_slack(self, horizon_ms: float, known: int) -> np.ndarray:
        """Slacks (ms from now) of the frames the arrival rate brings within `horizon_ms`,
        beyond `known` expected ones: evenly spaced, each with the usual budget."""
        rate = self._arrival_rate_per_ms()
        count = int(rate * horizon_ms) - known
        if count <= 0:
            return np.empty(0)
        at = (np.arange(count) + 0.5) / rate
        return at + self._budget_ms - self.config.margin_ms

    def _feasible(self, slack_sorted: np.ndarray) -> bool:
        """Can steps run back to back, each the largest deadline-order prefix whose mean step
        time fits its first frame's slack, serve every frame? (An EDF fluid check.)"""
        cap = self.config.max_batch
        means = self.model.mean_ms(np.arange(1, min(cap, len(slack_sorted)) + 1))
        t, i, n = 0.0, 0, len(slack_sorted)
        while i < n:
            k = min(int(np.searchsorted(means, slack_sorted[i] - t, side="right")), n - i)
            if k == 0:
                return False
            t += float(means[k - 1])
            i += k
        return True

    def _arrival_rate_per_ms(self) -> float:
        """Frames per ms over the recent arrivals (0 until two distinct arrival times)."""
        a = self._arrivals
        if len(a) < 2 or a[-1] <= a[0]:
            return 0.0
        return (len(a) - 1) / ((a[-1] - a[0]) * 1000.0)

    def _forget(self, f: PendingFrame) -> None:
        """Remove a frame leaving the queue from its stream's order heap."""
        h = self._pending[f.stream_id]
        if h[0] == f.order:
            heapq.heappop(h)
        else:  # an expired frame that was not its stream's head (rare)
            h.remove(f.order)
            heapq.heapify(h)
        if not h:
            del self._pending[f.stream_id]
        self._pending_n -= 1

    def _account(self, plan: Plan) -> None:
        self._planned_run += len(plan.run)
        self._planned_expired += len(plan.expired)
        self._planned_shed += len(plan.shed)
        c = self.counters
        if plan.run:
            c["steps"] += 1
            c["ai_planned"] += len(plan.run)
            self.batch_sizes[len(plan.run)] += 1
        if plan.expired:
            c["fallback/deadline"] += len(plan.expired)

    def check_invariants(self) -> None:
        """Every frame ever added is in exactly one of: queue, a plan's run/expired/shed."""
        queued = len(self._queue)
        accounted = queued + len(self._overload) + self._planned_run + self._planned_expired + self._planned_shed
        assert accounted == self._added, (
            f"frame accounting broken: added={self._added} queued={queued} "
            f"pending_shed={len(self._overload)} run={self._planned_run} "
            f"expired={self._planned_expired} shed={self._planned_shed}"
        )
        assert self._pending_n == queued, "stream order index out of sync"

    # ----------------------------------------------------------------------------- feedback
    def complete(self, plan: Plan, measured_ms: float, computed: int | None = None) -> None:
        """Feed the measured step time back into the latency model.

        `computed` is how many frames the step really ran when the replica dropped some of
        `plan.run` before compute (e.g. `reset` answers); a step that ran nothing
        (`measured_ms <= 0` or `computed == 0`) teaches the model nothing."""
        if not plan.run:
            return
        n = len(plan.run) if computed is None else computed
        if n > 0 and measured_ms > 0:
            self.model.observe(n, measured_ms)
        if measured_ms > plan.predicted_ms:
            self.counters["steps_over_prediction"] += 1
        end = plan.now + measured_ms / 1000.0
        late = sum(1 for f in plan.run if end > f.deadline)
        if late:
            self.counters["ran_late"] += late
        elif plan.probe:
            # The probe made its deadline: the model is likely stale, probe again at once so
            # it relearns in a few steps instead of one probe per probe_after_s.
            self._last_run_at = -math.inf

    def snapshot_counters(self) -> dict[str, int]:
        return dict(self.counters)
