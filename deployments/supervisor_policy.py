"""Per-stream AI on/off decisions with hysteresis: the pure logic of the fallback supervisor.

Bridges report, about once a second, each stream's outcome counts since the last report. The
policy turns AI *off* for a stream when

- its deadline misses + errors exceed `max_bad_rate` (1%) over a sliding `window_s` (2 s), or
- a quality probe on its audio failed,

and back *on* after an exponential, capped backoff (1 s, 2 s, 4 s, ... 30 s). The backoff
level resets once the stream has stayed healthy for `healthy_reset_s` after coming back.
Opt-outs (per user or per stream) always win, whatever the health says, and survive
`snapshot()` / `restore()`, so a restarted supervisor never turns AI on for an opted-out user.

Small samples: at 25 frames/s a 2 s window holds ~50 frames, so one miss is already 2%. A
rate over a handful of frames is noise, so a stream is turned off only when (a) the window
holds at least `min_bad` (2) bad frames, and (b) the Wilson score lower bound (one-sided 95%)
of its bad-frame rate exceeds 1%. One miss in 10 frames on a new stream therefore keeps AI on
(one event is not evidence); 2 in 10 (lower bound ~7%) or 2 in 50 (~1.3%) turns it off, while
a steady 1% (2 in 100) does not. Frames that never tried the AI (`opted_out`, `unhealthy`)
do not count either way; `overload` and `reset` count as attempts but not as the stream's
fault (capacity is the autoscaler's problem, not a reason to stop AI on one stream).

Shared stalls. A replica that stalls (a noisy neighbour, a GC pause, a stopped process) makes
every stream it serves miss deadlines in the same second; EDF already answers those frames
one by one, and switching every stream off for a back-off would turn a 0.5 s stall into
seconds of fallback for everyone. So a report may name the stream's `replica`, and a stream's
deadline misses in a report are *excused* (counted neither as attempts nor as bad) when at
least `shared_frac` (half) of the OTHER streams on the same replica also missed: those in the
same report, or those in all reports of the last `correlation_s` (other bridges'). A stream that misses while the others on its replica are fine
is failing on its own and is judged as above; a stream alone on its replica, or reported
without one, cannot be told apart from a stall and is judged as above too. Errors are never
excused: an exception is not a stall. A replica that answered no frame with codes in any
report for `replica_failure_s` (2 s) is failing, not stalled: its streams' misses count
again, so they are switched off within that window as well.

Pure logic (Python and numpy): the caller passes `now` (seconds; wall-clock time if snapshots
must survive a restart) and gets decisions back. The Ray actor around it is thin. State is
kept in columns, a row per stream, so that a report of thousands of healthy streams costs a
few array operations; tests/deployments/supervisor_reference.py keeps the same policy written
a stream at a time, and the two must agree decision for decision.
"""

from __future__ import annotations

import enum
import json
import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from deployments.contract import REASON_CODES, FallbackReason

SNAPSHOT_VERSION = 1

# Fallback reasons that are the stream's AI path failing (count as bad).
BAD_REASONS = frozenset({FallbackReason.DEADLINE.value, FallbackReason.ERROR.value})
# Fallback reasons for frames that never tried the AI (not counted at all).
NOT_ATTEMPTED = frozenset({FallbackReason.OPTED_OUT.value, FallbackReason.UNHEALTHY.value,
                           FallbackReason.RATE_LIMITED.value})


# A columnar report's outcome columns: 0 = ai, c = fallback reason REASON_CODES[c - 1] (the
# contract's outcome codes), and which of them count as attempts, as bad, as deadline misses.
OUTCOME_COLUMNS: tuple[str, ...] = ("ai", *(r.value for r in REASON_CODES))
_ATTEMPTED = np.array([c not in NOT_ATTEMPTED for c in OUTCOME_COLUMNS], np.int64)
_BAD = np.array([c in BAD_REASONS for c in OUTCOME_COLUMNS], np.int64)
_MISS = OUTCOME_COLUMNS.index(FallbackReason.DEADLINE.value)


@dataclass
class StreamReports:
    """One bridge's report in columns (what a bridge sends each second for thousands of
    streams): row i is `stream_ids[i]`, its frames by outcome since its last report in
    `outcomes[i]` (OUTCOME_COLUMNS order), its replica in `replicas[i]` (None: unknown); a
    stream's user goes in `user_ids` once, with its first report."""

    stream_ids: list[str]
    outcomes: np.ndarray  # int [n, len(OUTCOME_COLUMNS)]
    user_ids: dict[str, str] = field(default_factory=dict)
    replicas: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.stream_ids)

    def validate(self) -> None:
        """ValueError naming the first problem (a report is another process's data)."""
        n = len(self.stream_ids)
        o = self.outcomes
        if not isinstance(o, np.ndarray) or o.shape != (n, len(OUTCOME_COLUMNS)) or o.dtype.kind not in "iu":
            raise ValueError(f"outcomes must be integers of shape ({n}, {len(OUTCOME_COLUMNS)})")
        if len(set(self.stream_ids)) != n:
            raise ValueError("a stream is reported twice in one report")
        if self.replicas is not None and len(self.replicas) != n:
            raise ValueError(f"replicas must name one replica (or None) per stream, got {len(self.replicas)}")

    @classmethod
    def from_mapping(cls, reports: Mapping[str, Mapping[str, Any]]) -> StreamReports:
        """From `{stream: {"ai": n, "fallback": {reason: n}, "user_id": optional, "replica":
        optional}}` (reasons by name or as FallbackReason; unknown names are ignored)."""
        ids = list(reports)
        out = np.zeros((len(ids), len(OUTCOME_COLUMNS)), np.int64)
        users: dict[str, str] = {}
        replicas: list[str | None] = []
        for i, (sid, rep) in enumerate(reports.items()):
            out[i, 0] = int(rep.get("ai", 0))
            for reason, n in (rep.get("fallback") or {}).items():
                key = reason.value if isinstance(reason, FallbackReason) else str(reason)
                if key in _COLUMN_OF:
                    out[i, _COLUMN_OF[key]] += int(n)
            if rep.get("user_id") is not None:
                users[sid] = rep["user_id"]
            replica = rep.get("replica")
            replicas.append(str(replica) if replica else None)
        return cls(ids, out, users, replicas)


_COLUMN_OF = {c: i for i, c in enumerate(OUTCOME_COLUMNS) if i}


class OffCause(str, enum.Enum):
    BAD_RATE = "bad_rate"  # deadline misses + errors over the window
    QUALITY_PROBE = "quality_probe"


@dataclass(frozen=True)
class SupervisorConfig:
    window_s: float = 2.0
    max_bad_rate: float = 0.01
    min_bad: int = 2  # never judge on a single bad frame
    z: float = 1.645  # one-sided 95% for the Wilson lower bound
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    healthy_reset_s: float = 10.0  # on and untripped this long -> backoff starts over
    # Shared stalls: a stream's misses are excused when this share of the other streams on
    # its replica, reported within `correlation_s`, missed too.
    shared_frac: float = 0.5
    correlation_s: float = 1.5  # > one report period (1 s), so other bridges' reports count
    replica_failure_s: float = 2.0  # a replica with no AI answer this long is failing

    def backoff_s(self, level: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * (2.0 ** max(0, level)))


def wilson_lower_bound(bad: int, total: int, z: float) -> float:
    """Lower end of the Wilson score interval for a proportion bad/total."""
    if total <= 0:
        return 0.0
    p = bad / total
    z2 = z * z
    centre = p + z2 / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, (centre - spread) / (1 + z2 / total))


@dataclass
class StreamHealth:
    """What the policy remembers about one stream."""

    user_id: str | None = None
    window: deque[tuple[float, int, int]] = field(default_factory=deque)  # (t, attempts, bad)
    off_until: float | None = None  # AI off until then (None = on)
    off_cause: OffCause | None = None
    level: int = 0  # backoff exponent of the next trip
    on_since: float | None = None  # when AI last came (back) on
    last_report: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "window": [list(w) for w in self.window],
            "off_until": self.off_until,
            "off_cause": self.off_cause.value if self.off_cause else None,
            "level": self.level,
            "on_since": self.on_since,
            "last_report": self.last_report,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StreamHealth:
        return cls(
            user_id=d.get("user_id"),
            window=deque((float(t), int(a), int(b)) for t, a, b in d.get("window", [])),
            off_until=d.get("off_until"),
            off_cause=OffCause(d["off_cause"]) if d.get("off_cause") else None,
            level=int(d.get("level", 0)),
            on_since=d.get("on_since"),
            last_report=d.get("last_report"),
        )


@dataclass
class ReplicaGroup:
    """The streams last reported on one replica (not persisted: it spans seconds); their
    latest intervals live in the policy's columns."""

    streams: int = 0  # streams whose last report named this replica
    no_ai_since: float | None = None  # start of the run of reports without one AI answer
    attempted_at: float | None = None  # last report in which its streams tried the AI
    stalled_at: float | None = None  # last report whose misses were excused as shared

    def failing(self, now: float, cfg: SupervisorConfig) -> bool:
        return self.no_ai_since is not None and now - self.no_ai_since >= cfg.replica_failure_s


_NONE = math.nan  # a float column's "None"
_NO_REPLICA = -1
_MIN_WIDTH = 4  # window entries a row holds at least (a report a second, a 2 s window: 2-3)
_NEW_REPLICA = -2  # a replica no report named before


def _opt(x: float) -> float | None:
    return None if x != x else x


def _interleave(n: int, parts: list[str | list[str]]) -> list[str]:
    """Row by row, each part's string for the row (a part is a list of n strings, or one
    string for every row): what `"".join` turns into n rows of text without a call per row."""
    flat: list[str] = [""] * (n * len(parts))
    for j, part in enumerate(parts):
        flat[j :: len(parts)] = part if isinstance(part, list) else [part] * n
    return flat


def _json_floats(column: np.ndarray) -> list[str]:
    """A float column as json writes it (NaN, the column's None: `null`). The column's values
    repeat (a report's time is every reported stream's), so each distinct one (by its bits:
    -0.0 is not 0.0) is formatted once."""
    bits, inv = np.unique(np.ascontiguousarray(column, np.float64).view(np.int64), return_inverse=True)
    text = np.array([("null" if x != x else float.__repr__(x)) for x in bits.view(np.float64).tolist()],
                    object)
    return text[inv.reshape(-1)].tolist()


def _json_ints(column: np.ndarray) -> list[str]:
    """An int column as json writes it, each distinct value formatted once."""
    values, inv = np.unique(column, return_inverse=True)
    return np.array(list(map(int.__repr__, values.tolist())), object)[inv.reshape(-1)].tolist()


_CAUSE_JSON: dict[OffCause | None, str] = {None: "null", **{c: f'"{c.value}"' for c in OffCause}}


class SupervisorPolicy:
    """Decides, stream by stream, whether the AI path is used.

    State lives in columns, a row per stream (`_row`: stream id -> row, in the order streams
    were first seen): a report of thousands of streams, nearly all healthy and unchanged, is
    a few numpy operations over their rows; Python runs only for the streams whose state
    changes (new, moved between replicas, missing deadlines, tripping, off, opted out). Each
    stream's window is a row of `(t, attempts, bad)` entries, oldest first (`_wn` of them);
    the columns widen when a stream is reported more often than they hold. The replica
    columns are the stream's last report's replica and outcomes (the shared-stall test)."""

    def __init__(self, config: SupervisorConfig | None = None) -> None:
        self.config = config if config is not None else SupervisorConfig()
        self._opted_users: set[str] = set()
        self._opted_streams: set[str] = set()
        self._replicas: dict[str, ReplicaGroup] = {}
        self._replica_names: list[str] = []
        self._replica_code: dict[str | None, int] = {None: _NO_REPLICA}
        self.counters: Counter[str] = Counter()
        self._row: dict[str, int] = {}
        self._free: list[int] = []
        self._alloc(64, _MIN_WIDTH)

    def _alloc(self, cap: int, width: int) -> None:
        self._cap, self._width = cap, width
        self._ids: list[str | None] = [None] * cap
        self._user: list[str | None] = [None] * cap
        self._opted = np.zeros(cap, bool)  # the stream or its user opted out
        self._cause: list[OffCause | None] = [None] * cap
        self._last = np.full(cap, _NONE)  # last_report
        self._off = np.full(cap, _NONE)  # off_until
        self._on_since = np.full(cap, _NONE)
        self._level = np.zeros(cap, np.int64)
        self._wt = np.zeros((cap, width))  # window: (t, attempts, bad) entries, oldest first
        self._wa = np.zeros((cap, width), np.int64)
        self._wb = np.zeros((cap, width), np.int64)
        self._wn = np.zeros(cap, np.int64)
        self._rep = np.full(cap, _NO_REPLICA, np.int64)  # replica code of the last report
        self._iv_t = np.zeros(cap)  # ... and that report's time, attempts, misses
        self._iv_a = np.zeros(cap, np.int64)
        self._iv_m = np.zeros(cap, np.int64)
        self._free = list(range(cap - 1, -1, -1))

    def _grow(self, cap: int, width: int) -> None:
        """Room for `cap` streams (never fewer) with `width` window entries each (never fewer
        than a row holds)."""
        cap, width = max(cap, self._cap), max(width, int(self._wn.max()))
        old_cap, old_width = self._cap, self._width
        lists = (self._ids, self._user, self._cause)
        rows = (self._opted, self._last, self._off, self._on_since, self._level, self._wn, self._rep,
                self._iv_t, self._iv_a, self._iv_m)
        windows = (self._wt, self._wa, self._wb)
        free = set(self._free)
        self._alloc(cap, width)
        for new, prev in zip((self._ids, self._user, self._cause), lists, strict=True):
            new[:old_cap] = prev
        for new, prev in zip((self._opted, self._last, self._off, self._on_since, self._level, self._wn,
                              self._rep, self._iv_t, self._iv_a, self._iv_m), rows, strict=True):
            new[:old_cap] = prev
        for new, prev in zip((self._wt, self._wa, self._wb), windows, strict=True):
            new[:old_cap, : min(old_width, width)] = prev[:, : min(old_width, width)]
        self._free = [r for r in range(cap - 1, -1, -1) if r >= old_cap or r in free]

    def _new_row(self, stream_id: str) -> int:
        if not self._free:
            self._grow(2 * self._cap, self._width)
        r = self._free.pop()
        self._row[stream_id] = r
        self._ids[r] = stream_id
        self._opted[r] = stream_id in self._opted_streams
        return r

    def _set_user(self, r: int, user_id: str | None) -> None:
        self._user[r] = user_id
        self._refresh_opted(r)

    def _refresh_opted(self, r: int) -> None:
        user_id = self._user[r]
        self._opted[r] = self._ids[r] in self._opted_streams or (
            user_id is not None and user_id in self._opted_users)

    def _refresh_opted_user(self, user_id: str) -> None:
        for r, u in enumerate(self._user):
            if u == user_id:
                self._refresh_opted(r)

    def _drop_row(self, stream_id: str) -> None:
        r = self._row.pop(stream_id, None)
        if r is None:
            return
        self._move(r, _NO_REPLICA)
        self._ids[r] = self._user[r] = self._cause[r] = None
        self._opted[r] = False
        self._wa[r] = self._wb[r] = 0
        self._last[r] = self._off[r] = self._on_since[r] = _NONE
        self._level[r] = self._wn[r] = 0
        self._free.append(r)

    # ----------------------------------------------------------------------------- inputs
    def register(self, stream_id: str, user_id: str | None) -> None:
        """Tie a stream to its user, so a user's opt-out covers all of their streams."""
        self._set_user(self._state(stream_id), user_id)

    def report(
        self,
        stream_id: str,
        ai: int,
        fallback_by_reason: Mapping[str, int],
        now: float,
        user_id: str | None = None,
        replica: str | None = None,
    ) -> bool:
        """Outcome counts of one stream since its last report. Returns the decision."""
        rep: dict[str, Any] = {"ai": ai, "fallback": fallback_by_reason, "user_id": user_id,
                               "replica": replica}
        return self.report_many({stream_id: rep}, now)[stream_id]

    def report_many(self, reports: Mapping[str, Mapping[str, Any]], now: float) -> dict[str, bool]:
        """One bridge's report for all its streams: `{stream: {"ai": n, "fallback": {reason:
        n}, "user_id": optional, "replica": optional}}`. Returns `{stream: decision}` (see
        `report_columns`, which this is)."""
        batch = StreamReports.from_mapping(reports)
        off = self.report_columns(batch, now)
        return {sid: sid not in off for sid in batch.stream_ids}

    def report_columns(self, batch: StreamReports, now: float) -> dict[str, FallbackReason]:
        """One bridge's report for all its streams, in columns (each stream once). Every
        stream's outcomes are recorded before any is judged, so streams on one replica see
        each other's misses. Returns the reported streams whose AI is off now, and why."""
        o = np.maximum(np.asarray(batch.outcomes, np.int64), 0)  # a negative count is no count
        ids = batch.stream_ids
        n = len(ids)
        attempts = o @ _ATTEMPTED
        bads = o @ _BAD
        misses = o[:, _MISS]
        ais = o[:, 0]
        # rows: the new streams get theirs in report order (the order snapshots list them in)
        rows = np.fromiter(map(self._row.get, ids, repeat(-1)), np.intp, n)
        for i in (rows < 0).nonzero()[0].tolist():
            rows[i] = self._new_row(ids[i])
        if batch.user_ids:
            here = np.zeros(self._cap, bool)
            here[rows] = True
            row_of = self._row
            for sid, user_id in batch.user_ids.items():
                r = row_of.get(sid)
                if user_id is not None and r is not None and here[r]:
                    self._set_user(r, user_id)
        last = self._last[rows]
        start = np.where(np.isnan(last), now, last)
        self._last[rows] = now
        codes = self._codes(batch.replicas, n)
        placed = codes != _NO_REPLICA
        at = rows[placed]
        self._iv_t[at] = now
        self._iv_a[at] = attempts[placed]
        self._iv_m[at] = misses[placed]
        for i in (self._rep[rows] != codes).nonzero()[0].tolist():  # joined, moved, left
            self._move(int(rows[i]), int(codes[i]))
        self.counters["reports"] += n
        self._update_liveness(self._seen(codes, attempts, ais, start), now)
        tally = self._tally(codes, attempts, misses, now) if misses.any() else {}

        cfg = self.config
        excused = np.zeros(n, np.int64)
        for i in misses.nonzero()[0].tolist():
            a, m = int(attempts[i]), int(misses[i])
            if self._shared_stall(int(codes[i]), a, m, tally, now):
                excused[i] = m
        total_excused = int(excused.sum())
        if total_excused:
            self.counters["excused/deadline"] += total_excused
        self._append(rows, now, attempts - excused, bads - excused)
        self._evict(rows, now - cfg.window_s)
        if self._width > _MIN_WIDTH and 2 * int(self._wn.max()) <= self._width:
            self._grow(self._cap, max(_MIN_WIDTH, self._width // 2))  # a burst is over: narrow again
        # judge: the streams on (or back from a backoff) whose window holds enough bad frames
        off = self._off[rows]
        on = np.isnan(off) | (now >= off)
        bad = self._wb[rows].sum(axis=1)  # entries past a window's end are 0
        for i in (on & (bad >= cfg.min_bad)).nonzero()[0].tolist():
            r = int(rows[i])
            if self._window_unhealthy(r):
                self._trip(r, now, OffCause.BAD_RATE)
        # what `reason` would find for the rest (on, not opted out), without its calls
        check = ~np.isnan(self._off[rows]) | self._opted[rows]
        out: dict[str, FallbackReason] = {}
        for i in check.nonzero()[0].tolist():
            why = self.reason(ids[i], now)
            if why is not None:
                out[ids[i]] = why
        return out

    def off_streams(self, stream_ids: list[str], now: float) -> list[str]:
        """Those of these streams whose AI is off now (`not decision(...)` of each, with its
        effects: a backoff that is over ends), found without a call per stream that is on."""
        if not stream_ids:
            return []
        rows = np.fromiter(map(self._row.get, stream_ids, repeat(-1)), np.intp, len(stream_ids))
        known = rows >= 0
        at = np.where(known, rows, 0)
        check = known & (~np.isnan(self._off[at]) | self._opted[at])
        if self._opted_streams:  # an opted-out stream the policy holds no state for
            check |= ~known & np.fromiter(map(self._opted_streams.__contains__, stream_ids), bool,
                                          len(stream_ids))
        return [stream_ids[i] for i in check.nonzero()[0].tolist()
                if not self.decision(stream_ids[i], now)]

    def quality_probe_failed(self, stream_id: str, now: float) -> None:
        r = self._state(stream_id)
        if self._is_on(r, now):
            self._trip(r, now, OffCause.QUALITY_PROBE)

    def opt_out(self, *, user_id: str | None = None, stream_id: str | None = None) -> None:
        if user_id is None and stream_id is None:
            raise ValueError("opt_out needs a user_id or a stream_id")
        if user_id is not None:
            self._opted_users.add(user_id)
            self._refresh_opted_user(user_id)
        if stream_id is not None:
            self._opted_streams.add(stream_id)
            if (r := self._row.get(stream_id)) is not None:
                self._refresh_opted(r)
        self.counters["opt_outs"] += 1

    def opt_in(self, *, user_id: str | None = None, stream_id: str | None = None) -> None:
        if user_id is None and stream_id is None:
            raise ValueError("opt_in needs a user_id or a stream_id")
        if user_id is not None:
            self._opted_users.discard(user_id)
            self._refresh_opted_user(user_id)
        if stream_id is not None:
            self._opted_streams.discard(stream_id)
            if (r := self._row.get(stream_id)) is not None:
                self._refresh_opted(r)

    def forget(self, stream_id: str) -> None:
        """The stream ended: drop its health (a stream-level opt-out stays)."""
        self._drop_row(stream_id)

    def sweep(self, now: float, idle_s: float = 60.0) -> int:
        """Forget streams with no report for `idle_s` that are not in a backoff; returns how
        many. Keeps the state (and snapshots) bounded when bridges never say goodbye."""
        if not self._row:
            return 0
        ids = list(self._row)
        rows = np.fromiter(self._row.values(), np.intp, len(ids))
        off, last, wn = self._off[rows], self._last[rows], self._wn[rows]
        newest = self._wt[rows, np.maximum(wn - 1, 0)]
        gone = ((np.isnan(off) | (now >= off))
                & ((wn == 0) | (now - newest >= idle_s))
                & (np.isnan(last) | (now - last >= idle_s)))
        for i in gone.nonzero()[0].tolist():
            self._drop_row(ids[i])
        return int(gone.sum())

    # ----------------------------------------------------------------------------- outputs
    def decision(self, stream_id: str, now: float) -> bool:
        """True: use the AI for this stream now."""
        r = self._row.get(stream_id)
        if r is not None and self._off[r] != self._off[r] and stream_id not in self._opted_streams:
            # on, unless its user opted out (what `reason` would find, without its calls)
            user_id = self._user[r]
            return user_id is None or user_id not in self._opted_users
        return self.reason(stream_id, now) is None

    def reason(self, stream_id: str, now: float) -> FallbackReason | None:
        """None if AI is on, else why not (`opted_out` wins over `unhealthy`)."""
        if self.is_opted_out(stream_id):
            return FallbackReason.OPTED_OUT
        r = self._row.get(stream_id)
        if r is None:
            return None
        off_until = float(self._off[r])
        if off_until == off_until:
            if now < off_until:
                return FallbackReason.UNHEALTHY
            # Backoff over: retry the AI with a clean window.
            self._off[r], self._cause[r] = _NONE, None
            self._clear_window(r)
            self._on_since[r] = now
            self.counters["retries"] += 1
        return None

    def replica_status(self, now: float) -> dict[str, dict[str, Any]]:
        """Per replica (as named in reports): streams last reported on it, whether it is
        failing, and when misses there were last excused as a shared stall."""
        cfg = self.config
        return {
            r: {
                "streams": g.streams,
                "failing": g.failing(now, cfg),
                "no_ai_since": g.no_ai_since,
                "shared_stall_at": g.stalled_at,
            }
            for r, g in self._replicas.items()
        }

    def is_opted_out(self, stream_id: str) -> bool:
        if stream_id in self._opted_streams:
            return True
        r = self._row.get(stream_id)
        if r is None:
            return False
        user_id = self._user[r]
        return user_id is not None and user_id in self._opted_users

    def stream_status(self, stream_id: str, now: float) -> dict[str, Any]:
        """For the dashboard: on/off, why, until when, current window."""
        why = self.reason(stream_id, now)
        r = self._row.get(stream_id)
        st = self._health(r) if r is not None else StreamHealth()
        return {
            "stream_id": stream_id,
            "ai": why is None,
            "reason": why.value if why else None,
            "off_cause": st.off_cause.value if st.off_cause else None,
            "off_until": st.off_until,
            "backoff_level": st.level,
            "window_frames": sum(a for _, a, _ in st.window),
            "window_bad": sum(b for _, _, b in st.window),
        }

    # ----------------------------------------------------------------------------- persistence
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state; opt-outs first, as they must never be lost."""
        ids = list(self._row)
        rows = np.fromiter(self._row.values(), np.intp, len(ids))
        wn = self._wn[rows].tolist()
        wt, wa, wb = self._wt[rows].tolist(), self._wa[rows].tolist(), self._wb[rows].tolist()
        users, causes = self._user, self._cause
        streams = {
            sid: {
                "user_id": users[r],
                "window": [[t[j], a[j], b[j]] for j in range(k)],
                "off_until": _opt(off),
                "off_cause": causes[r].value if causes[r] else None,
                "level": level,
                "on_since": _opt(on_since),
                "last_report": _opt(last),
            }
            for sid, r, k, t, a, b, off, level, on_since, last in zip(
                ids, rows.tolist(), wn, wt, wa, wb, self._off[rows].tolist(),
                self._level[rows].tolist(), self._on_since[rows].tolist(),
                self._last[rows].tolist(), strict=True)
        }
        return {
            "version": SNAPSHOT_VERSION,
            "opted_out_users": sorted(self._opted_users),
            "opted_out_streams": sorted(self._opted_streams),
            "streams": streams,
            "counters": dict(self.counters),
        }

    def snapshot_json(self) -> bytes:
        """`json.dumps(self.snapshot()).encode()`, byte for byte, without building a dict per
        stream: each column is formatted once (`float.__repr__`, json's string escaping) and
        the streams' entries are assembled from the formatted columns."""
        ids = list(self._row)
        rows = np.fromiter(self._row.values(), np.intp, len(ids))
        floats = (self._off[rows], self._on_since[rows], self._last[rows])
        if not all(np.isfinite(c[~np.isnan(c)]).all() for c in floats) or not np.isfinite(
                np.where(np.arange(self._width) < self._wn[rows, None], self._wt[rows], 0.0)).all():
            return json.dumps(self.snapshot()).encode()  # NaN / Infinity: json's own spelling
        head = json.dumps({"version": SNAPSHOT_VERSION, "opted_out_users": sorted(self._opted_users),
                           "opted_out_streams": sorted(self._opted_streams)})
        counters = json.dumps(dict(self.counters))
        if not ids:
            return f'{head[:-1]}, "streams": {{}}, "counters": {counters}}}'.encode()
        n = len(ids)
        enc = json.encoder.encode_basestring_ascii
        at = rows.tolist()
        users = list(map(self._user.__getitem__, at))
        user_s = list(map(enc, users)) if None not in users else [
            "null" if u is None else enc(u) for u in users]
        cause_s = list(map(_CAUSE_JSON.__getitem__, map(self._cause.__getitem__, at)))
        off_s, on_s, last_s = (_json_floats(c) for c in floats)
        level_s = _json_ints(self._level[rows])
        window_s = np.full(n, "[]", object)
        wn = self._wn[rows]
        for k in np.unique(wn[wn > 0]).tolist():
            group = (wn == k).nonzero()[0]
            sub = rows[group]
            parts: list[str | list[str]] = []
            for j in range(k):
                parts += ["[[" if j == 0 else "], [", _json_floats(self._wt[sub, j]),
                          ", ", _json_ints(self._wa[sub, j]), ", ", _json_ints(self._wb[sub, j])]
            parts.append("]]\x00")  # windows hold only numbers: NUL splits them apart
            window_s[group] = "".join(_interleave(len(sub), parts)).split("\x00")[:-1]
        streams = "".join(_interleave(n, [
            list(map(enc, ids)), ': {"user_id": ', user_s, ', "window": ', window_s.tolist(),
            ', "off_until": ', off_s, ', "off_cause": ', cause_s, ', "level": ', level_s,
            ', "on_since": ', on_s, ', "last_report": ', last_s, "}, "]))[:-2]
        return f'{head[:-1]}, "streams": {{{streams}}}, "counters": {counters}}}'.encode()

    @classmethod
    def restore(cls, snap: Mapping[str, Any], config: SupervisorConfig | None = None) -> SupervisorPolicy:
        if snap.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported supervisor snapshot version {snap.get('version')!r}")
        p = cls(config)
        p._opted_users = set(snap.get("opted_out_users", []))
        p._opted_streams = set(snap.get("opted_out_streams", []))
        health = {sid: StreamHealth.from_dict(d) for sid, d in snap.get("streams", {}).items()}
        width = max([p._width, *(len(st.window) for st in health.values())])
        cap = p._cap
        while cap < len(health):
            cap *= 2
        p._grow(cap, width)
        for sid, st in health.items():
            r = p._new_row(sid)
            p._set_user(r, st.user_id)
            p._cause[r] = st.off_cause
            p._level[r] = st.level
            for col, v in ((p._off, st.off_until), (p._on_since, st.on_since), (p._last, st.last_report)):
                col[r] = _NONE if v is None else v
            k = p._wn[r] = len(st.window)
            if k:
                t, a, b = zip(*st.window, strict=True)
                p._wt[r, :k], p._wa[r, :k], p._wb[r, :k] = t, a, b
        p.counters.update(snap.get("counters", {}))
        return p

    # ----------------------------------------------------------------------------- internals
    def _state(self, stream_id: str) -> int:
        r = self._row.get(stream_id)
        return self._new_row(stream_id) if r is None else r

    def _health(self, r: int) -> StreamHealth:
        k = int(self._wn[r])
        return StreamHealth(
            user_id=self._user[r],
            window=deque(zip(self._wt[r, :k].tolist(), self._wa[r, :k].tolist(),
                             self._wb[r, :k].tolist(), strict=True)),
            off_until=_opt(float(self._off[r])),
            off_cause=self._cause[r],
            level=int(self._level[r]),
            on_since=_opt(float(self._on_since[r])),
            last_report=_opt(float(self._last[r])),
        )

    def _codes(self, replicas: list[str | None] | None, n: int) -> np.ndarray:
        """Each stream's replica as a code (-1: none named)."""
        if replicas is None:
            return np.full(n, _NO_REPLICA, np.int64)
        known = self._replica_code
        codes = np.fromiter(map(known.get, replicas, repeat(_NEW_REPLICA)), np.int64, n)
        for i in (codes == _NEW_REPLICA).nonzero()[0].tolist():
            name = replicas[i]
            if name not in known:
                known[name] = len(self._replica_names)
                self._replica_names.append(name)
            codes[i] = known[name]
        return codes

    def _move(self, r: int, code: int) -> None:
        """The stream in row `r` is now reported on replica `code` (-1: on none); a replica
        with no stream left is forgotten."""
        old = int(self._rep[r])
        if old == code:
            return
        if old != _NO_REPLICA:
            name = self._replica_names[old]
            g = self._replicas.get(name)
            if g is not None:
                g.streams -= 1
                if not g.streams:
                    del self._replicas[name]
        if code != _NO_REPLICA:
            self._replicas.setdefault(self._replica_names[code], ReplicaGroup()).streams += 1
        self._rep[r] = code

    def _seen(self, codes: np.ndarray, attempts: np.ndarray, ais: np.ndarray,
              start: np.ndarray) -> dict[str, tuple[int, int, float]]:
        """Per replica named in this report by streams that tried the AI: their attempts,
        AI answers and earliest interval start."""
        tried = ((codes != _NO_REPLICA) & (attempts > 0)).nonzero()[0]
        if not len(tried):
            return {}
        uniq, inv = np.unique(codes[tried], return_inverse=True)
        a = np.bincount(inv, attempts[tried], len(uniq))
        ai = np.bincount(inv, ais[tried], len(uniq))
        first = np.full(len(uniq), np.inf)
        np.minimum.at(first, inv, start[tried])
        names = self._replica_names
        return {names[c]: (int(x), int(y), float(s))
                for c, x, y, s in zip(uniq.tolist(), a.tolist(), ai.tolist(), first.tolist(), strict=True)}

    def _update_liveness(self, seen: Mapping[str, tuple[int, int, float]], now: float) -> None:
        """Per replica named in this report (`seen`: its streams' attempts, AI answers and
        earliest interval start): did it answer any frame with codes? A run of reports
        without one, from whichever bridges, is how a failing replica looks."""
        for r, (_, ai, start) in seen.items():
            g = self._replicas[r]
            if g.attempted_at is not None and start - g.attempted_at > self.config.correlation_s:
                g.no_ai_since = None  # nothing was tried there for a while: start over
            g.attempted_at = now
            if ai:
                g.no_ai_since = None
            elif g.no_ai_since is None:
                g.no_ai_since = start
                self.counters["replica_no_ai"] += 1

    def _tally(self, codes: np.ndarray, attempts: np.ndarray, misses: np.ndarray,
               now: float) -> dict[int, tuple[int, int, int, int]]:
        """Per replica in this report: (streams that tried the AI, those that missed) in this
        report, then the same among all reports within `correlation_s` (other bridges').
        Once per report, so judging n streams stays O(n)."""
        horizon = now - self.config.correlation_s
        here = (codes != _NO_REPLICA) & (attempts > 0)
        if not here.any():
            return {}
        k = len(self._replica_names)
        tried_here = np.bincount(codes[here], minlength=k)
        missed_here = np.bincount(codes[here], misses[here] > 0, minlength=k)
        recent = (self._rep != _NO_REPLICA) & (self._iv_t > horizon) & (self._iv_a > 0)
        tried = np.bincount(self._rep[recent], minlength=k)
        missed = np.bincount(self._rep[recent], self._iv_m[recent] > 0, minlength=k)
        return {c: (int(tried_here[c]), int(missed_here[c]), int(tried[c]), int(missed[c]))
                for c in tried_here.nonzero()[0].tolist()}

    def _shared_stall(self, code: int, attempts: int, misses: int,
                      tally: Mapping[int, tuple[int, int, int, int]], now: float) -> bool:
        """True if a stream's misses in this report are its replica's, not its own: at
        least `shared_frac` of the other streams that tried the AI there missed too, among
        this report's streams (the same interval) or among all recent reports (other
        bridges report at other moments; the first to report a stall still sees their
        intervals from before it)."""
        if code == _NO_REPLICA or not misses or not attempts:
            return False
        g = self._replicas[self._replica_names[code]]
        if g.failing(now, self.config):
            return False
        tally_r = tally[code]
        frac = self.config.shared_frac
        shared = False
        for tried, missed in (tally_r[:2], tally_r[2:]):
            others, others_missed = tried - 1, missed - 1  # this stream tried and missed
            shared = shared or (others >= 1 and others_missed >= frac * others)
        if shared:
            g.stalled_at = now
        return shared

    def _append(self, rows: np.ndarray, now: float, attempts: np.ndarray, bad: np.ndarray) -> None:
        """A window entry `(now, attempts, bad)` for each row with attempts."""
        some = attempts != 0
        rows, attempts, bad = rows[some], attempts[some], bad[some]
        if not len(rows):
            return
        k = self._wn[rows]
        if int(k.max()) >= self._width:
            self._grow(self._cap, 2 * self._width)
        self._wt[rows, k] = now
        self._wa[rows, k] = attempts
        self._wb[rows, k] = bad
        self._wn[rows] = k + 1

    def _evict(self, rows: np.ndarray, horizon: float) -> None:
        """Drop each row's leading window entries at or before `horizon`."""
        width = self._width
        old = (self._wt[rows] <= horizon) & (np.arange(width) < self._wn[rows, None])
        k = np.cumprod(old, axis=1).sum(axis=1)
        some = k > 0
        if not some.any():
            return
        rows, k = rows[some], k[some]
        src = np.arange(width) + k[:, None]
        past = src >= width  # shifted in from past the end: 0, as entries past the end are
        src = np.minimum(src, width - 1)
        for col in (self._wt, self._wa, self._wb):
            shifted = np.take_along_axis(col[rows], src, axis=1)
            shifted[past] = 0
            col[rows] = shifted
        self._wn[rows] -= k

    def _clear_window(self, r: int) -> None:
        self._wn[r] = 0
        self._wa[r] = self._wb[r] = 0

    def _is_on(self, r: int, now: float) -> bool:
        off_until = float(self._off[r])
        return off_until != off_until or now >= off_until

    def _window_unhealthy(self, r: int) -> bool:
        cfg = self.config
        k = int(self._wn[r])
        attempts = sum(self._wa[r, :k].tolist())
        bad = sum(self._wb[r, :k].tolist())
        return bad >= cfg.min_bad and wilson_lower_bound(bad, attempts, cfg.z) > cfg.max_bad_rate

    def _trip(self, r: int, now: float, cause: OffCause) -> None:
        cfg = self.config
        on_since = float(self._on_since[r])
        level = int(self._level[r])
        if on_since == on_since and now - on_since >= cfg.healthy_reset_s:
            level = 0  # it was healthy long enough: start the backoff over
        self._off[r] = now + cfg.backoff_s(level)
        self._cause[r] = cause
        self._level[r] = level + 1
        self._clear_window(r)
        self._on_since[r] = _NONE
        self.counters[f"off/{cause.value}"] += 1
