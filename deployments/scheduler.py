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

Cost: a decision runs on the replica's event loop before every step, so it is kept to a fixed
number of numpy calls over [batch sizes x candidates] (one CDF lookup for every size and both
steps, window sums by cumulative sums), reads the queue's head without popping, skips the
valuation when every frame is certain to make it in one batch, and skips a hold option whose
upper bound cannot beat running now. The candidates are bounded (max_batch + max_head_skip),
so a long queue costs its expiry and removal (bisection, slices), not a decision per frame.
`tests/deployments/test_scheduler_reference.py` checks it against a plain frame-by-frame
reference; `auralink bench batching` reports the time per decision.

Pure logic (numpy for the valuation), no Ray, no clock: the caller passes `now` (seconds, the
clock of the deadlines) and measured times.
"""

from __future__ import annotations

import bisect
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
from deployments.latency_model import BUDGET_LIMIT_MS, LatencyModel

ARRIVAL_WINDOW = 256  # recent arrivals kept to estimate the arrival rate
MAX_HOLD_OPTIONS = 2  # expected arrival times a decision weighs holding for
# Holding is weighed with fewer frames than this waiting, for at most this many expected ones
# (the earliest): it pays on a device whose step takes most of the deadline, with few streams;
# with thousands, the forecast must not cost a scan.
MAX_HOLD_FRAMES = 64


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


# Frames finished now count this much more than the same chance in the next step: ties (and
# near-ties) go to frames finished now, the lookahead being an estimate.
_NOW_BONUS = 1.001


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    a = np.arange(n)
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> np.ndarray:
    a = np.zeros(n)
    a.flags.writeable = False
    return a


def _first_best(value: np.ndarray) -> int:
    """Index of the first entry within a relative 1e-9 of the maximum: what counts as the best
    does not hang on the order numpy happens to add in."""
    best = float(np.maximum.reduce(value))
    return int((value >= best - 1e-9 * (1.0 + abs(best))).argmax())


# Batch sizes up to this many are valued one by one; larger ones on the size grid (a window of
# a size between grid points is valued as the grid size below, a next step of one as the grid
# size above), so a replica with a very large max_batch keeps per-size data for few sizes.
EXACT_SIZES = 256


@functools.lru_cache(maxsize=32)
def _axis_sizes(cap: int, exact: int) -> np.ndarray:
    """The sizes whose step-time distributions a decision reads: every size up to
    min(cap, exact), then the size grid up to cap."""
    grid = _size_grid(cap)
    sizes = np.unique(np.concatenate((np.arange(1, min(cap, exact) + 1), grid[grid > exact])))
    sizes.flags.writeable = False
    return sizes


@functools.lru_cache(maxsize=256)
def _window_sizes(kmax: int, cap: int, exact: int) -> np.ndarray:
    """Window sizes valued for up to kmax frames: the size grid, each size beyond `exact`
    taken down to an axis size."""
    ks = _size_grid(kmax)
    if kmax > exact:
        axis = _axis_sizes(cap, exact)
        ks = np.unique(axis[np.searchsorted(axis, ks, side="right") - 1])
        ks.flags.writeable = False
    return ks


@functools.lru_cache(maxsize=64)
def _windows(n: int, n_starts: int, ks_key: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For windows of the sizes _window_sizes(*ks_key) starting at 0..n_starts-1 over n
    frames, as flat indices into a [sizes, n + 1] array of cumulative sums: (first [S, K],
    end [S, K]), and 0 for a window within the frames, -inf for one running past the last."""
    ks = _window_sizes(*ks_key)
    starts = np.arange(n_starts)[:, None]
    end = starts + ks
    row = np.arange(len(ks)) * (n + 1)
    out = (row + starts, row + np.minimum(end, n), np.where(end > n, -np.inf, 0.0))
    for a in out:
        a.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _prefix_ends(n: int, ks_key: tuple[int, int, int]) -> np.ndarray:
    """Flat indices into a [sizes, n] array of each window size's last frame (size - 1)."""
    ks = _window_sizes(*ks_key)
    idx = np.arange(len(ks)) * n + ks - 1
    idx.flags.writeable = False
    return idx


@dataclass
class _ModelView:
    """One version of the latency model as decisions read it (see EdfScheduler._sync_model)."""

    model: LatencyModel
    version: int
    cap: int  # max_batch
    exact: int  # EXACT_SIZES when built
    sizes: np.ndarray  # _axis_sizes(cap, exact): what the rest is indexed by
    sizes_list: list[int]
    offset: np.ndarray  # their CDFs on one axis (LatencyModel.cdf_axis)
    x: np.ndarray
    p: np.ndarray
    means: np.ndarray  # their mean step times
    means_list: list[float]
    grids: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]]

    def index_up(self, batch: int) -> int:
        """Index of the smallest axis size >= batch (the size itself up to `exact`)."""
        return batch - 1 if batch <= self.exact else bisect.bisect_left(self.sizes_list, batch)

    def indices_up(self, batches: np.ndarray) -> np.ndarray:
        if len(batches) and int(batches.max()) <= self.exact:
            return batches - 1
        return np.searchsorted(self.sizes, batches)


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> np.ndarray:
    a = np.ones(n)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class _Choice:
    """A decision: run candidates[start:start + size] (p: each one's chance in that batch,
    when known), or run nothing and decide again by hold_until."""

    start: int
    size: int
    hold_until: float | None
    p_run: np.ndarray | None


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
    def peek(self) -> PendingFrame | None: ...
    def head(self, limit: int) -> list[PendingFrame]:
        """The first `limit` frames in serving order, left queued."""
    def remove(self, frames: list[PendingFrame]) -> None:
        """Take these (queued) frames out."""
    def pop_expired(self, cutoff: float) -> list[PendingFrame]: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[PendingFrame]: ...


class EdfQueue:
    """Frames sorted by (deadline, arrival), ties by insertion order: a sorted list, so a
    decision reads its head without popping, and expiry is one bisection and one slice."""

    deadline_ordered = True  # the head has the earliest deadline

    def __init__(self) -> None:
        self._entries: list[tuple[float, float, int, PendingFrame]] = []
        self._seq = itertools.count()
        self._key: dict[PendingFrame, tuple[float, float, int]] = {}  # frame -> its sort key

    def push(self, frame: PendingFrame) -> None:
        key = (frame.deadline, frame.arrival, next(self._seq))
        self._key[frame] = key
        # Frames mostly arrive in deadline order: the insertion point is near the end.
        bisect.insort(self._entries, (*key, frame))

    def peek(self) -> PendingFrame | None:
        return self._entries[0][3] if self._entries else None

    def head(self, limit: int) -> list[PendingFrame]:
        return [e[3] for e in self._entries[:limit]]

    def remove(self, frames: list[PendingFrame]) -> None:
        if not frames:
            return
        entries = self._entries
        k = len(frames)
        if k <= len(entries) and all(e[3] is f for e, f in zip(entries, frames, strict=False)):
            # The usual case: the batch is the head of the queue, in order.
            del entries[:k]
            key = self._key
            for f in frames:
                del key[f]
            return
        at = sorted(bisect.bisect_left(entries, self._key.pop(f)) for f in frames)
        if at[-1] == len(at) - 1:  # the first len(frames) entries: one slice
            del entries[: len(at)]
            return
        kept, prev = [], 0
        for i in at:
            kept.append(entries[prev:i])
            prev = i + 1
        kept.append(entries[prev:])
        self._entries = list(itertools.chain.from_iterable(kept))

    def pop_expired(self, cutoff: float) -> list[PendingFrame]:
        """Frames whose deadline is before `cutoff`: all at the head."""
        i = bisect.bisect_left(self._entries, (cutoff,))
        if not i:
            return []
        out = [e[3] for e in self._entries[:i]]
        del self._entries[:i]
        for f in out:
            del self._key[f]
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PendingFrame]:
        return (e[3] for e in self._entries)


class FifoQueue:
    """Arrival order, for comparison (what a plain batching queue does)."""

    def __init__(self) -> None:
        self._q: deque[PendingFrame] = deque()

    def push(self, frame: PendingFrame) -> None:
        self._q.append(frame)

    def peek(self) -> PendingFrame | None:
        return self._q[0] if self._q else None

    def head(self, limit: int) -> list[PendingFrame]:
        return list(itertools.islice(self._q, limit))

    def remove(self, frames: list[PendingFrame]) -> None:
        gone = {id(f) for f in frames}
        self._q = deque(f for f in self._q if id(f) not in gone)

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
        self._view: _ModelView | None = None
        self._rate = 0.0  # arrival rate (frames/ms) as of the decision under way

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
        self._sync_model()

        # 1. Expire what is unlikely to finish even alone, before any compute.
        hopeless_s = self._hopeless_s()
        for f in self._queue.pop_expired(now + margin_s + hopeless_s):
            self._forget(f)
            plan.expired.append(f)

        # 2. Eligible frames in queue order: a stream's earliest queued frame, once per batch.
        candidates = self._candidates(plan, now, margin_s)

        # 3. Run the most productive window of them now, or hold them all for expected frames.
        if candidates:
            choice = self._decide(candidates, now, margin_s)
            if choice.hold_until is None:
                self._take(plan, candidates, choice, hopeless_s)
            else:
                plan.hold_until = choice.hold_until
                self.counters["holds"] += 1

        if not plan.run and plan.expired and plan.hold_until is None:
            self._maybe_probe(plan, now, margin_s)
        if plan.run:
            self._last_run_at = now
            plan.predicted_ms = self.model.predict(len(plan.run))
        elif len(self._queue) and plan.hold_until is None:
            # Frames wait and none can run yet: name the time to decide again, 1 us past the
            # expiry cutoff of the earliest deadline (the decision then expires it).
            if getattr(self._queue, "deadline_ordered", False):
                head = self._queue.peek().deadline  # type: ignore[union-attr]
            else:
                head = min(f.deadline for f in self._queue)
            plan.hold_until = max(now, head - margin_s - hopeless_s + 1e-6)
        self._account(plan)
        self.check_invariants()
        assert plan.run or not len(self._queue) or plan.hold_until is not None, "frames kept without a time"
        return plan

    def _candidates(self, plan: Plan, now: float, margin_s: float) -> list[PendingFrame]:
        """Eligible frames in queue order (a stream's earliest queued frame, one per stream),
        after streams that fell behind caught up."""
        limit = self.config.max_batch + self.config.max_head_skip
        if self._pending_n == len(self._pending):
            # Every queued stream has exactly one frame: all are eligible, none is behind.
            return self._queue.head(limit)
        candidates = self._eligible_prefix(limit)
        behind = self._behind(candidates, now, margin_s)
        if not behind:
            return candidates
        # A stream that has fallen behind skips its frame least likely to make it, so its
        # newer frame runs instead of waiting a step behind it (and the next one behind that):
        # one frame lost instead of a backlog that takes many ticks to drain.
        self._queue.remove(behind)
        for f in behind:
            self._forget(f)
        plan.expired.extend(behind)
        self.counters["caught_up"] += len(behind)
        return self._eligible_prefix(limit)

    def _eligible_prefix(self, limit: int) -> list[PendingFrame]:
        """The first `limit` eligible frames in queue order (a stream's earliest queued frame,
        one per stream)."""
        candidates: list[PendingFrame] = []
        seen: set[str] = set()
        pending = self._pending
        # Bound the scan: a queue full of one stream's frames must not make a step O(queue).
        for f in itertools.islice(self._queue, 4 * limit + 64):
            sid = f.stream_id
            if sid in seen or pending[sid][0] != f.order:
                continue
            seen.add(sid)
            candidates.append(f)
            if len(candidates) == limit:
                break
        return candidates

    def _take(self, plan: Plan, candidates: list[PendingFrame], choice: _Choice, hopeless_s: float) -> None:
        """Run the chosen window of candidates (less the frames unlikely to make it in it);
        frames passed over stay queued if a later step can still serve them, else expire."""
        margin_s = self.config.margin_ms / 1000.0
        start, size = choice.start, choice.size
        run, dropped, plan.expected_on_time = self._keep_likely(
            candidates[start : start + size], choice.p_run, plan.now, margin_s)
        after_s = plan.now + self._mean(len(run)) / 1000.0 if run else plan.now
        cutoff = after_s + margin_s + hopeless_s
        lost = [f for f in itertools.chain(candidates[:start], dropped) if f.deadline < cutoff]
        plan.run = run
        leaving = run + lost
        self._queue.remove(leaving)
        self._forget_all(leaving)
        plan.expired.extend(lost)

    def _behind(self, cands: list[PendingFrame], now: float, margin_s: float) -> list[PendingFrame]:
        """Candidates whose stream has a newer frame queued and that are less than
        `catch_up_p` likely to finish in a batch of every candidate."""
        if self.config.catch_up_p <= 0:
            return []
        queued = [f for f in cands if len(self._pending[f.stream_id]) > 1]
        if not queued:
            return []
        view = self._view
        assert view is not None
        k = min(len(cands), self.config.max_batch)
        p = np.interp(self._slack_ms(queued, now, margin_s) + view.offset[view.index_up(k)], view.x, view.p)
        return [f for f, pf in zip(queued, p.tolist(), strict=True) if pf < self.config.catch_up_p]

    def _hopeless_s(self) -> float:
        """Slack (s) below which a frame run alone now is less than `min_on_time_p` likely on time."""
        return self.model.quantile_ms(1, self.config.min_on_time_p) / 1000.0

    def _keep_likely(
        self, run: list[PendingFrame], p: np.ndarray | None, now: float, margin_s: float
    ) -> tuple[list[PendingFrame], list[PendingFrame], float]:
        """(kept, dropped, expected on-time frames of kept): frames of the batch less than
        `min_on_time_p` likely to finish in it are not computed. Dropping one shortens the
        step, so the rest are re-checked. `p`: each frame's chance in this batch, if known."""
        dropped: list[PendingFrame] = []
        while run:
            if p is None:
                p = self.model.p_within_matrix([len(run)], self._slack_ms(run, now, margin_s))[0]
            low = p < self.config.min_on_time_p
            if not low.any():
                return run, dropped, float(p.sum())
            dropped.extend(f for f, lo in zip(run, low, strict=True) if lo)
            run = [f for f, lo in zip(run, low, strict=True) if not lo]
            p = None
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

    def _decide(self, cands: list[PendingFrame], now: float, margin_s: float) -> _Choice:
        """Run a window of cands now, or (hold_until set) run nothing and decide again then,
        because waiting for frames the arrival forecast expects finishes more frames in time."""
        cfg = self.config
        n = len(cands)
        self._rate = self._arrival_rate_per_ms()
        expected = []
        # A stream with a frame queued cannot add another to the next batch: with every
        # stream the forecast knows queued, there is nothing to wait for; with a batch's
        # worth of frames waiting (MAX_HOLD_FRAMES), a step runs.
        if (cfg.max_hold_ms > 0 and n < min(cfg.max_batch, MAX_HOLD_FRAMES)
                and len(self._forecast) > len(self._pending)):
            expected = self._forecast.expected(now, cfg.max_hold_ms / 1000.0, exclude=self._pending.keys(),
                                               limit=MAX_HOLD_FRAMES)
        if not expected and n == 1:
            return _Choice(0, 1, None, None)  # nothing to weigh: the one frame runs (expiry vetted it)
        base = now + margin_s
        slack_list = [(f.deadline - base) * 1000.0 for f in cands]
        if max(slack_list) > BUDGET_LIMIT_MS:  # a deadline far beyond any step: as good as none
            slack_list = [min(x, BUDGET_LIMIT_MS) for x in slack_list]
        exp_list = [min((e.deadline - base) * 1000.0, BUDGET_LIMIT_MS) for e in expected]
        # Overload: steps sized to their head frames cannot serve every frame (expected ones
        # and those the arrival rate brings meanwhile included) at mean step times. Then head
        # frames may be skipped and device time is what a batch is valued against. Otherwise
        # later steps can serve what this one leaves, which the one-step lookahead cannot see
        # (it would trade head frames for more now), so the batch starts at the head.
        overloaded = n > 1 and not self._feasible(slack_list, exp_list, len(expected))
        exp_weight = [e.weight for e in expected]
        if not overloaded and (k := self._all_on_time(slack_list, exp_list, exp_weight)):
            return _Choice(0, k, None, _ones(k))
        slack = np.array(slack_list)
        exp_slack, exp_w = np.array(exp_list), np.array(exp_weight)
        value, start, size, p_run = self._best_window(slack, None, exp_slack, exp_w, overloaded)
        if not expected:
            return _Choice(start, size, None, p_run)
        # Holding until the i-th expected arrival: those frames join the candidates (weighted
        # by how likely they are to come), every slack shrinks by the wait. Only arrivals before
        # the batch chosen now would end are worth waiting for: a later one finds the device free.
        edf = getattr(self._queue, "deadline_ordered", False)
        step_end = now + self._mean(size) / 1000.0
        arrivals = sorted({e.arrival for e in expected if e.arrival < step_end})[:MAX_HOLD_OPTIONS]
        best_hold, best_value = None, value * (1.0 + 1e-3) + 1e-3  # a clear gain, or run now
        # A hold's value is at most _NOW_BONUS x each frame's weight x its chance alone after
        # the wait (a larger batch or a later step is no faster), per the least device time
        # when overloaded (plus what unknown arrivals can add): a hold that cannot beat
        # running now even so is not valued.
        view = self._view
        assert view is not None
        s_all = np.concatenate((slack, exp_slack))
        w_all = np.concatenate((_ones(n), exp_w))
        one = view.offset[0]
        arrival = np.array([e.arrival for e in expected])
        for t in arrivals:
            wait_ms = (t - now) * 1000.0
            bound = _NOW_BONUS * float(np.dot(np.interp(s_all - wait_ms + one, view.x, view.p), w_all))
            if overloaded:
                bound = bound / (wait_ms + 2.0 * self._mean(1)) + self._rate
            if bound * (1.0 + 1e-9) + 1e-12 <= best_value:
                continue
            joins = arrival <= t
            h_slack = np.concatenate((slack, exp_slack[joins])) - wait_ms
            h_weight = np.concatenate((_ones(n), exp_w[joins]))
            if edf:
                order = np.argsort(h_slack, kind="stable")
                h_slack, h_weight = h_slack[order], h_weight[order]
            v = self._best_window(h_slack, h_weight, exp_slack[~joins] - wait_ms, exp_w[~joins],
                                  overloaded, wait_ms)[0]
            if v > best_value:
                best_hold, best_value = t, v
        if best_hold is None:
            return _Choice(start, size, None, p_run)
        # Wait for those frames at most until they are overdue; an arrival wakes the caller.
        return _Choice(0, 0, max(e.due_by for e in expected if e.arrival == best_hold), None)

    def _all_on_time(self, slack: list[float], later: list[float], later_weight: list[float]) -> int:
        """The largest window (k frames from the head) when every one of its frames is
        certain to finish in time in it and every other frame (candidates left and later
        ones) certain in the step after it; else 0. Then that window is the best (a smaller
        one finishes no more frames) and no hold can do better, so the valuation is skipped.
        Pure Python: the common case of a lightly loaded replica."""
        n = len(slack)
        cfg = self.config
        later_w = sum(later_weight)
        if n > cfg.max_batch or n + later_w > cfg.max_batch:
            return 0
        view = self._view
        assert view is not None
        k = n if n <= view.exact else view.sizes_list[bisect.bisect_right(view.sizes_list, n) - 1]
        model = self.model
        if min(slack[:k]) < model.max_ms(k):
            return 0
        rest = slack[k:] + later
        if not rest:
            return k
        tau = self._mean(k)
        unknown = max(self._rate * tau - later_w, 0.0)
        m = min(max(round((n - k) + later_w + unknown), 1), cfg.max_batch)
        return k if min(rest) - tau >= model.max_ms(view.sizes_list[view.index_up(m)]) else 0

    @staticmethod
    def _slack_ms(frames: list[PendingFrame], now: float, margin_s: float) -> np.ndarray:
        base = now + margin_s
        return np.array([(f.deadline - base) * 1000.0 for f in frames])

    def _sync_model(self) -> _ModelView:
        """What decisions read from the latency model, rebuilt when the model changed (a new
        version, another model object, another max_batch): the CDFs of the axis sizes on one
        axis, their mean step times (array and list) and the window-size grids asked for."""
        model, cap = self.model, self.config.max_batch
        model.estimate(1)  # applies measured steps that are due (may bump the version)
        view = self._view
        if (view is None or view.model is not model or view.version != model.version or view.cap != cap
                or view.exact != EXACT_SIZES):
            sizes = _axis_sizes(cap, EXACT_SIZES)
            offset, x, p, means = model.cdf_axis(sizes)
            view = self._view = _ModelView(model, model.version, cap, EXACT_SIZES, sizes, sizes.tolist(),
                                           offset, x, p, means, means.tolist(), {})
        return view

    def _mean(self, batch: int) -> float:
        """Mean step time (ms) of `batch` frames."""
        view = self._view
        assert view is not None
        if batch <= view.exact:
            return view.means_list[batch - 1]
        return float(self.model.mean_ms([batch])[0])

    def _grid(self, view: _ModelView, kmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
        """(window sizes, their mean step times, their CDF offsets, cache key) for up to kmax
        frames."""
        grid = view.grids.get(kmax)
        if grid is None:
            key = (kmax, view.cap, view.exact)
            ks = _window_sizes(*key)
            i = view.indices_up(ks)
            grid = view.grids[kmax] = (ks, view.means[i], view.offset[i], key)
        return grid

    def _best_window(
        self, slack: np.ndarray, weight: np.ndarray | None, later_slack: np.ndarray,
        later_weight: np.ndarray, overloaded: bool, wait_ms: float = 0.0,
    ) -> tuple[float, int, int, np.ndarray]:
        """(value, start, size, p) of the best batch from frames with these slacks (ms, in
        queue order) and weights (probability each frame is there at all; None: all 1); p is
        each chosen frame's chance to finish in time in that batch (times its weight).

        Every window (start = head frames skipped, up to max_head_skip; size from the size
        grid, up to max_batch) is valued by the expected number of frames finishing in time:
        this step's, sum of w_i P(T(size) <= slack_i) over the window, plus the frames it
        leaves behind and the `later` ones (frames that can only join a following step), each
        with P(T(m) <= slack_i - E[T(size)]) in one following step of m frames (those left
        plus the arrivals expected meanwhile). The lookahead is what stops a large batch from
        stranding the frames behind it, and a head frame from costing the rest more than it
        gains. Frames finished now count x _NOW_BONUS (the lookahead is an estimate).
        Overloaded, windows may skip head frames and the value is per ms of device time
        (`wait_ms` of holding included). The first window (by start, then size) within a
        relative 1e-9 of the best value wins.

        All sizes and both steps in one CDF lookup ([2 x sizes, frames]), window sums by
        cumulative sums: O(sizes x frames) work in a fixed number of numpy calls."""
        cfg = self.config
        view = self._view
        assert view is not None
        n = len(slack)
        n_later = len(later_slack)
        ks, means, offset_now, ks_key = self._grid(view, min(n, cfg.max_batch))
        nk = len(ks)
        later_w = float(np.add.reduce(later_weight)) if n_later else 0.0
        # Frames arriving during this step beyond the expected ones we know: they join the
        # next step (with about the usual budget less half the step).
        rate = self._rate
        unknown = np.maximum(rate * means - later_w, 0.0) if rate > 0 else _zeros(nk)
        m = np.rint((n - ks) + later_w + unknown).astype(np.intp)
        np.minimum(np.maximum(m, 1, out=m), cfg.max_batch, out=m)
        m_at = view.indices_up(m)  # a next step's size as the axis size at or above it
        offset_next = view.offset[m_at]
        cols = np.concatenate((slack, later_slack)) if n_later else slack
        # CDF arguments (budget + the size's offset): this step's sizes, then the next step's.
        x = np.empty((2 * nk, len(cols)))
        np.add(cols, offset_now[:, None], out=x[:nk])
        np.subtract(cols, means[:, None], out=x[nk:])
        x[nk:] += offset_next[:, None]
        p = np.interp(x, view.x, view.p)
        now_p = p[:nk, :n]
        next_p = p[nk:]
        if weight is not None:
            now_p *= weight
            next_p[:, :n] *= weight
        if n_later:
            next_p[:, n:] *= later_weight
        nxt = np.add.reduce(next_p, axis=1)  # every frame in the next step, were none run now
        if overloaded:
            # ... and the unknown arrivals, which a full next step serves anyway under overload
            # (frames left behind compete with them).
            unknown_budget = (self._budget_ms - cfg.margin_ms) - 0.5 * means
            nxt += unknown * np.interp(unknown_budget + offset_next, view.x, view.p)
        # A window's value = its frames' chances now + everyone else's in the next step
        #                  = nxt + sum over the window of (now - next). (now_p is a copy when
        # weighted, else p's own rows: p is not read again but for the chosen window.)
        gain = now_p * _NOW_BONUS
        gain -= next_p[:, :n]
        capped = n + later_w > cfg.max_batch and float(np.maximum.reduce(nxt)) > cfg.max_batch
        if not overloaded:
            # The window starts at the head: its frames are the first `size`.
            last = _prefix_ends(n, ks_key)
            window = np.add.accumulate(gain, axis=1).take(last)
            if capped:
                in_window = np.add.accumulate(next_p[:, :n], axis=1).take(last)
                value = window + in_window + np.minimum(nxt - in_window, cfg.max_batch)
            else:
                value = window + nxt
            j = _first_best(value)
            size = int(ks[j])
            return float(value[j]), 0, size, p[j, :size]
        cum = np.zeros((nk, n + 1))
        np.add.accumulate(gain, axis=1, out=cum[:, 1:])
        first, end, invalid = _windows(n, min(n - 1, cfg.max_head_skip) + 1, ks_key)
        window = cum.take(end)
        window -= cum.take(first)
        if capped:
            # The next step cannot take every frame left behind: cap its share.
            ncum = np.zeros((nk, n + 1))
            np.add.accumulate(next_p[:, :n], axis=1, out=ncum[:, 1:])
            in_window = ncum.take(end) - ncum.take(first)
            value = window + in_window + np.minimum(nxt - in_window, cfg.max_batch)
        else:
            value = window + nxt
        # Device time is the scarce thing: on-time frames per ms over both steps (and any
        # wait before them), or a step of a few easy frames would look as good as a full one.
        value /= (wait_ms + means) + view.means[m_at]
        value += invalid
        si, kj = divmod(_first_best(value.ravel()), nk)
        size = int(ks[kj])
        return float(value[si, kj]), si, size, p[kj, si : si + size]

    def _unseen_slack(self, horizon_ms: float, known: int) -> np.ndarray:
        """Slacks (ms from now) of the frames the arrival rate brings within `horizon_ms`,
        beyond `known` expected ones: evenly spaced, each with the usual budget."""
        rate = self._rate
        count = int(rate * horizon_ms) - known
        if count <= 0:
            return _zeros(0)
        return (np.arange(count) + 0.5) / rate + (self._budget_ms - self.config.margin_ms)

    def _feasible(self, slack: list[float], expected: list[float], n_expected: int) -> bool:
        """Can steps run back to back, each the largest deadline-order prefix whose mean step
        time fits its first frame's slack, serve every frame: the candidates, the expected
        ones and those the arrival rate brings meanwhile? (An EDF fluid check.) With many
        streams the unseen frames are many: they are merged as an array, and the loop runs
        once per step, not per frame."""
        unseen = self._unseen_slack(max(slack), n_expected)
        if len(unseen):
            merged = np.concatenate((np.array(slack + expected), unseen))
            merged.sort(kind="stable")
            slack_sorted = merged.tolist()
        else:
            slack_sorted = sorted(slack + expected)
        n = len(slack_sorted)
        view = self._view
        assert view is not None
        means, sizes = view.means_list, view.sizes_list
        top = bisect.bisect_right(sizes, min(self.config.max_batch, n))  # axis sizes usable
        t, i = 0.0, 0
        while i < n:
            j = bisect.bisect_right(means, slack_sorted[i] - t, 0, top)
            if j == 0:
                return False
            k = sizes[j - 1]
            if k > n - i:  # the last step: just the frames left
                k = n - i
                j = view.index_up(k) + 1
            t += means[j - 1]
            i += k
        return True

    def _arrival_rate_per_ms(self) -> float:
        """Frames per ms over the recent arrivals (0 until two distinct arrival times)."""
        a = self._arrivals
        if len(a) < 2 or a[-1] <= a[0]:
            return 0.0
        return (len(a) - 1) / ((a[-1] - a[0]) * 1000.0)

    def _forget_all(self, frames: list[PendingFrame]) -> None:
        """_forget for each frame (inlined for the usual case: its stream's only frame)."""
        pending = self._pending
        for f in frames:
            h = pending[f.stream_id]
            if len(h) == 1 and h[0] == f.order:
                del pending[f.stream_id]
                self._pending_n -= 1
            else:
                self._forget(f)

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
