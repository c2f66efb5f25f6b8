"""Deadline-aware batching for a codec replica: a pure earliest-deadline-first scheduler.

The replica `add`s every frame it receives, calls `schedule(now)` whenever the model is free,
runs `plan.run` as one batch, answers `plan.expired` with `fallback/deadline` and `plan.shed`
with their reasons *before* computing, then calls `complete(plan, measured_ms)`.

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

Pure Python: the caller passes `now` (seconds, same clock as deadlines) and measured times.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from deployments.contract import FallbackReason
from deployments.latency_model import LatencyModel


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

    def __post_init__(self) -> None:
        if self.deadline_ms <= 0 or self.max_batch < 1 or self.margin_ms < 0 or self.max_queue < 1:
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
    predicted_ms: float = 0.0
    probe: bool = False  # `run` is one frame run against the model's advice (see _maybe_probe)

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

    # --------------------------------------------------------------------------------- intake
    def add(self, frame: PendingFrame) -> PendingFrame | None:
        """Queue a frame. Returns it if it was shed `overload` (it is also in the next plan)."""
        self._added += 1
        self.counters["added"] += 1
        if not math.isfinite(frame.deadline):
            frame.deadline = frame.arrival + self.config.deadline_ms / 1000.0
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
        self.config = config

    # ------------------------------------------------------------------------------ deciding
    def schedule(self, now: float) -> Plan:
        """Decide the next step at time `now` (seconds)."""
        cfg = self.config
        margin_s = cfg.margin_ms / 1000.0
        plan = Plan(now=now, shed=self._overload)
        self._overload = []

        # 1. Expire what cannot finish even alone, before any compute.
        one_s = self.model.predict(1) / 1000.0
        for f in self._queue.pop_expired(now + one_s + margin_s):
            self._forget(f)
            plan.expired.append(f)

        # 2. Eligible frames in queue order: a stream's earliest queued frame, once per batch.
        popped, candidates = self._eligible_prefix(cfg.max_batch + cfg.max_head_skip)
        if candidates:
            start, size = self._choose_batch(candidates, now, margin_s)
            # Head frames skipped for a better batch: keep the ones a later step can still
            # serve, expire the rest (they would only miss after waiting).
            after_s = now + self.model.predict(size) / 1000.0 if size else now
            skipped = [f for f in candidates[:start] if after_s + one_s + margin_s > f.deadline]
            plan.run = candidates[start : start + size]
            plan.predicted_ms = self.model.predict(len(plan.run)) if plan.run else 0.0
            leaving = {id(f) for f in itertools.chain(plan.run, skipped)}
            self._queue.unpop([f for f in popped if id(f) not in leaving])
            for f in itertools.chain(plan.run, skipped):
                self._forget(f)
            plan.expired.extend(skipped)
        else:
            self._queue.unpop(popped)

        if not plan.run and plan.expired:
            self._maybe_probe(plan, now, margin_s)
        if plan.run:
            self._last_run_at = now
        self._account(plan)
        self.check_invariants()
        return plan

    def _maybe_probe(self, plan: Plan, now: float, margin_s: float) -> None:
        """Run one expiring frame as a probe when nothing has run for `probe_after_s`.

        The model only learns from steps that run. One outlier (a warm-up step, a GC pause)
        can push L(1) past every frame's slack; then every frame would expire, no step would
        run, and the model would never see the device is fast again. A probe runs the frame
        with the most slack if the *typical* (median) step would still make it."""
        cfg = self.config
        if cfg.probe_after_s <= 0 or now - self._last_run_at < cfg.probe_after_s:
            return
        typical_s = self.model.typical(1) / 1000.0
        earliest: dict[str, tuple[int, int]] = {}
        for f in plan.expired:
            if f.stream_id not in earliest or f.order < earliest[f.stream_id]:
                earliest[f.stream_id] = f.order
        best: PendingFrame | None = None
        for f in plan.expired:
            queued = self._pending.get(f.stream_id)
            in_order = f.order == earliest[f.stream_id] and (not queued or queued[0] > f.order)
            if in_order and now + typical_s + margin_s <= f.deadline:
                if best is None or f.deadline > best.deadline:
                    best = f
        if best is None:
            return
        plan.expired.remove(best)
        plan.run = [best]
        plan.predicted_ms = self.model.predict(1)
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

    def _choose_batch(
        self, cands: list[PendingFrame], now: float, margin_s: float
    ) -> tuple[int, int]:
        """(start, size): run cands[start:start+size].

        Default: the head-limited batch, cands[0:fit(0)]. Only when that batch is smaller than
        the work waiting AND running it first would also shrink the next step (a cascade of
        small steps, i.e. overload) are head frames skipped, and only if the skip finishes
        clearly more frames per ms of compute."""
        cfg = self.config
        model = self.model
        n = len(cands)
        edf = getattr(self._queue, "deadline_ordered", False)

        def fit(i: int, at: float = now) -> int:
            # Largest k with at + L(k) + margin <= min deadline of cands[i:i+k]. In EDF order
            # the min is cands[i]; a FIFO queue needs the running min, and feasibility stays
            # monotone in k, so a binary search over k works for both.
            hi_k = min(n - i, cfg.max_batch)
            if hi_k <= 0:
                return 0
            if edf:
                budget_ms = (cands[i].deadline - at - margin_s) * 1000.0
                return model.max_batch_within(budget_ms, hi_k)
            mins = list(itertools.accumulate((f.deadline for f in cands[i : i + hi_k]), min))

            def ok(k: int) -> bool:
                return at + model.predict(k) / 1000.0 + margin_s <= mins[k - 1]

            if not ok(1):
                return 0
            lo, hi = 1, hi_k + 1  # ok(lo) holds; hi is past the end or fails
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ok(mid):
                    lo = mid
                else:
                    hi = mid
            return lo

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
