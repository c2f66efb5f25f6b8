"""Where a codec replica's next frames come from: a per-stream forecast of arrivals.

A bridge sends each replica one request per tick, so a stream's chunks arrive about one frame
period (40 ms) apart, moved by transit jitter. A stream in DTX skips ticks. The scheduler uses
the forecast to decide whether holding a small batch for a frame about to arrive finishes more
frames in time than running it now (two chunks arriving 1 ms apart on a CPU whose single step
takes most of the deadline: run the first alone and the second waits a whole step).

Per stream: the last arrival, its deadline budget (deadline - arrival) and a presence
probability (EWMA over ticks of "a chunk came"). A heap of next expected arrivals keeps a
lookup at O(frames in the horizon), not O(streams). Streams silent for `forget_after` periods
are dropped.

Pure Python, no clock: the caller passes arrival times and `now` (seconds, one clock).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container
from dataclasses import dataclass

FRAME_PERIOD_S = 0.040  # one 960-sample chunk at 24 kHz


@dataclass(frozen=True)
class ExpectedFrame:
    """A frame the forecast expects: when, due when, and how likely it is to come at all."""

    stream_id: str
    arrival: float  # seconds; never before the `now` it was forecast at
    deadline: float  # seconds
    weight: float  # probability the stream sends this tick (its presence)
    due_by: float  # seconds; from then on this tick counts as skipped


@dataclass
class _StreamClock:
    last_arrival: float
    budget_s: float
    presence: float
    version: int


class ArrivalForecast:
    """Expected arrivals of periodic streams."""

    def __init__(self, period_s: float = FRAME_PERIOD_S, grace_s: float = 0.002, alpha: float = 0.1,
                 forget_after: int = 50) -> None:
        if period_s <= 0 or grace_s < 0 or not 0.0 < alpha <= 1.0 or forget_after < 1:
            raise ValueError("invalid arrival forecast settings")
        self.period_s = period_s
        self.grace_s = grace_s  # how late an expected frame may be before its tick counts as skipped
        self.alpha = alpha
        self.forget_after = forget_after
        self._streams: dict[str, _StreamClock] = {}
        self._heap: list[tuple[float, int, str, int]] = []  # (expected arrival, seq, stream, version)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._streams)

    def observe(self, stream_id: str, arrival: float, deadline: float) -> None:
        """A frame of `stream_id` arrived."""
        c = self._streams.get(stream_id)
        if c is None:
            c = self._streams[stream_id] = _StreamClock(arrival, deadline - arrival, 1.0, 0)
        else:
            gap = arrival - c.last_arrival
            if gap < 0.5 * self.period_s:
                return  # the same tick (a late duplicate or a burst): the forecast stands
            ticks = max(1, round(gap / self.period_s))
            # Ticks skipped (DTX) lower the presence; this tick's chunk raises it.
            c.presence = c.presence * (1.0 - self.alpha) ** ticks + self.alpha
            c.last_arrival, c.budget_s = arrival, deadline - arrival
            c.version += 1
        heapq.heappush(self._heap, (arrival + self.period_s, next(self._seq), stream_id, c.version))
        if len(self._heap) > 4 * len(self._streams) + 64:
            # Superseded entries pile up when no lookup pops them: keep each stream's current one.
            self._heap = [e for e in self._heap if (c := self._streams.get(e[2])) is not None
                          and c.version == e[3]]
            heapq.heapify(self._heap)

    def expected(self, now: float, horizon_s: float, exclude: Container[str] = frozenset(),
                 limit: int | None = None) -> list[ExpectedFrame]:
        """Frames expected from now to now + horizon_s (one per stream, earliest first), except
        from the streams in `exclude`. A frame up to `grace_s` late is still expected (now).
        With `limit`, at most that many, looking at no more than 4 x limit + 64 heap entries:
        the cost of a lookup stays bounded however many streams there are."""
        out: list[ExpectedFrame] = []
        keep: list[tuple[float, int, str, int]] = []
        heap = self._heap
        budget = 4 * limit + 64 if limit is not None else -1
        while (heap and heap[0][0] <= now + horizon_s and budget != 0
               and (limit is None or len(out) < limit)):
            budget -= 1
            entry = heapq.heappop(heap)
            t, _, sid, version = entry
            c = self._streams.get(sid)
            if c is None or c.version != version:
                continue  # superseded by a later arrival
            if t + self.grace_s <= now:
                # The tick passed without its chunk: expect the next one, unless the stream
                # has gone quiet for good.
                if now - c.last_arrival > self.forget_after * self.period_s:
                    del self._streams[sid]
                else:
                    heapq.heappush(heap, (t + self.period_s, next(self._seq), sid, version))
                continue
            keep.append(entry)
            if sid not in exclude:
                out.append(ExpectedFrame(sid, max(t, now), t + c.budget_s, c.presence, t + self.grace_s))
        for entry in keep:
            heapq.heappush(heap, entry)
        return out
