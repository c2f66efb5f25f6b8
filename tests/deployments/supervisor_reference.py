"""The fallback supervisor's policy written plainly, a stream at a time, with its state in a
`StreamHealth` object per stream (its window a deque) and its replicas' streams in dicts:
the reference the columnar `SupervisorPolicy` must decide exactly as."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from deployments.contract import FallbackReason
from deployments.supervisor_policy import (
    _ATTEMPTED,
    _BAD,
    _MISS,
    SNAPSHOT_VERSION,
    OffCause,
    StreamHealth,
    StreamReports,
    SupervisorConfig,
    wilson_lower_bound,
)


class Interval(NamedTuple):
    """One stream's outcomes in one report, as the shared-stall test needs them (a tuple:
    one is built per stream per report)."""

    t: float  # when it was reported
    attempts: int
    ai: int
    misses: int  # `deadline` frames


@dataclass
class ReplicaGroup:
    """The streams last reported on one replica (not persisted: it spans seconds)."""

    members: dict[str, Interval] = field(default_factory=dict)
    no_ai_since: float | None = None  # start of the run of reports without one AI answer
    attempted_at: float | None = None  # last report in which its streams tried the AI
    stalled_at: float | None = None  # last report whose misses were excused as shared

    def failing(self, now: float, cfg: SupervisorConfig) -> bool:
        return self.no_ai_since is not None and now - self.no_ai_since >= cfg.replica_failure_s


class ReferencePolicy:
    """Decides, stream by stream, whether the AI path is used."""

    def __init__(self, config: SupervisorConfig | None = None) -> None:
        self.config = config if config is not None else SupervisorConfig()
        self._streams: dict[str, StreamHealth] = {}
        self._opted_users: set[str] = set()
        self._opted_streams: set[str] = set()
        self._replicas: dict[str, ReplicaGroup] = {}
        self._replica_of: dict[str, str] = {}  # stream id -> replica of its last report
        self.counters: Counter[str] = Counter()

    # ----------------------------------------------------------------------------- inputs
    def register(self, stream_id: str, user_id: str | None) -> None:
        """Tie a stream to its user, so a user's opt-out covers all of their streams."""
        self._state(stream_id).user_id = user_id

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
        """One bridge's report for all its streams, in columns. Every stream's outcomes are
        recorded before any is judged, so streams on one replica see each other's misses.
        Returns the reported streams whose AI is off now, and why.

        A bridge reports thousands of streams a second, nearly all of them all-AI: the counts
        are summed by column for every stream at once, and the loops below do for each stream
        exactly what the helpers they inline do (the cross-report tally is built only when
        some stream missed a deadline, the only case that reads it)."""
        o = np.maximum(np.asarray(batch.outcomes, np.int64), 0)  # a negative count is no count
        attempts = (o @ _ATTEMPTED).tolist()
        bads = (o @ _BAD).tolist()
        misses = o[:, _MISS].tolist()
        ais = o[:, 0].tolist()
        ids = batch.stream_ids
        replicas = batch.replicas if batch.replicas is not None else [None] * len(ids)
        users = batch.user_ids
        streams = self._streams
        replica_of = self._replica_of
        groups = self._replicas
        # per replica in this report: (attempts, ai, earliest start) for the liveness check
        seen: dict[str, tuple[int, int, float]] = {}
        for i, sid in enumerate(ids):
            st = streams.get(sid)
            if st is None:
                st = streams[sid] = StreamHealth()
            if users:
                user_id = users.get(sid)
                if user_id is not None:
                    st.user_id = user_id
            start = st.last_report if st.last_report is not None else now
            st.last_report = now
            a = attempts[i]
            replica = replicas[i]
            iv = Interval(now, a, ais[i], misses[i])
            if replica is not None and replica_of.get(sid) == replica:
                groups[replica].members[sid] = iv  # _place's common case: it stayed
            else:
                self._place(sid, replica, iv)
            if replica is not None and a:
                was = seen.get(replica)
                seen[replica] = ((a, ais[i], start) if was is None else
                                 (was[0] + a, was[1] + ais[i], min(was[2], start)))
        self.counters["reports"] += len(ids)
        self._update_liveness(seen, now)
        tally = self._tally(ids, attempts, misses, now) if any(misses) else {}
        off: dict[str, FallbackReason] = {}
        cfg = self.config
        horizon = now - cfg.window_s
        min_bad = cfg.min_bad
        opted_streams, opted_users = self._opted_streams, self._opted_users
        for i, sid in enumerate(ids):
            st = streams[sid]
            a, b, m = attempts[i], bads[i], misses[i]
            excused = m if m and self._shared_stall(sid, a, m, tally, now) else 0
            if excused:
                self.counters["excused/deadline"] += excused
            window = st.window
            if a - excused:
                window.append((now, a - excused, b - excused))
            while window and window[0][0] <= horizon:  # _evict
                window.popleft()
            if st.off_until is None or now >= st.off_until:  # _is_on, then _window_unhealthy
                bad = 0
                for entry in window:
                    bad += entry[2]
                if bad >= min_bad and self._window_unhealthy(st):
                    self._trip(sid, st, now, OffCause.BAD_RATE)
            if st.off_until is None and sid not in opted_streams and (
                    st.user_id is None or st.user_id not in opted_users):
                continue  # on (what `reason` would find, without its calls)
            why = self.reason(sid, now)
            if why is not None:
                off[sid] = why
        return off

    def quality_probe_failed(self, stream_id: str, now: float) -> None:
        st = self._state(stream_id)
        if self._is_on(st, now):
            self._trip(stream_id, st, now, OffCause.QUALITY_PROBE)

    def opt_out(self, *, user_id: str | None = None, stream_id: str | None = None) -> None:
        if user_id is None and stream_id is None:
            raise ValueError("opt_out needs a user_id or a stream_id")
        if user_id is not None:
            self._opted_users.add(user_id)
        if stream_id is not None:
            self._opted_streams.add(stream_id)
        self.counters["opt_outs"] += 1

    def opt_in(self, *, user_id: str | None = None, stream_id: str | None = None) -> None:
        if user_id is None and stream_id is None:
            raise ValueError("opt_in needs a user_id or a stream_id")
        if user_id is not None:
            self._opted_users.discard(user_id)
        if stream_id is not None:
            self._opted_streams.discard(stream_id)

    def forget(self, stream_id: str) -> None:
        """The stream ended: drop its health (a stream-level opt-out stays)."""
        self._streams.pop(stream_id, None)
        self._place(stream_id, None, None)

    def sweep(self, now: float, idle_s: float = 60.0) -> int:
        """Forget streams with no report for `idle_s` that are not in a backoff; returns how
        many. Keeps the state (and snapshots) bounded when bridges never say goodbye."""
        gone = [
            sid for sid, st in self._streams.items()
            if (st.off_until is None or now >= st.off_until)
            and (not st.window or now - st.window[-1][0] >= idle_s)
            and (st.last_report is None or now - st.last_report >= idle_s)
        ]
        for sid in gone:
            del self._streams[sid]
            self._place(sid, None, None)
        return len(gone)

    # ----------------------------------------------------------------------------- outputs
    def decision(self, stream_id: str, now: float) -> bool:
        """True: use the AI for this stream now."""
        st = self._streams.get(stream_id)
        if st is not None and st.off_until is None and stream_id not in self._opted_streams:
            # on, unless its user opted out (what `reason` would find, without its calls)
            return st.user_id is None or st.user_id not in self._opted_users
        return self.reason(stream_id, now) is None

    def reason(self, stream_id: str, now: float) -> FallbackReason | None:
        """None if AI is on, else why not (`opted_out` wins over `unhealthy`)."""
        st = self._streams.get(stream_id)
        if self.is_opted_out(stream_id):
            return FallbackReason.OPTED_OUT
        if st is None:
            return None
        if st.off_until is not None:
            if now < st.off_until:
                return FallbackReason.UNHEALTHY
            # Backoff over: retry the AI with a clean window.
            st.off_until, st.off_cause = None, None
            st.window.clear()
            st.on_since = now
            self.counters["retries"] += 1
        return None

    def replica_status(self, now: float) -> dict[str, dict[str, Any]]:
        """Per replica (as named in reports): streams last reported on it, whether it is
        failing, and when misses there were last excused as a shared stall."""
        cfg = self.config
        return {
            r: {
                "streams": len(g.members),
                "failing": g.failing(now, cfg),
                "no_ai_since": g.no_ai_since,
                "shared_stall_at": g.stalled_at,
            }
            for r, g in self._replicas.items()
        }

    def is_opted_out(self, stream_id: str) -> bool:
        if stream_id in self._opted_streams:
            return True
        st = self._streams.get(stream_id)
        return st is not None and st.user_id is not None and st.user_id in self._opted_users

    def stream_status(self, stream_id: str, now: float) -> dict[str, Any]:
        """For the dashboard: on/off, why, until when, current window."""
        r = self.reason(stream_id, now)
        st = self._streams.get(stream_id) or StreamHealth()
        attempts = sum(a for _, a, _ in st.window)
        bad = sum(b for _, _, b in st.window)
        return {
            "stream_id": stream_id,
            "ai": r is None,
            "reason": r.value if r else None,
            "off_cause": st.off_cause.value if st.off_cause else None,
            "off_until": st.off_until,
            "backoff_level": st.level,
            "window_frames": attempts,
            "window_bad": bad,
        }

    # ----------------------------------------------------------------------------- persistence
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state; opt-outs first, as they must never be lost."""
        return {
            "version": SNAPSHOT_VERSION,
            "opted_out_users": sorted(self._opted_users),
            "opted_out_streams": sorted(self._opted_streams),
            "streams": {sid: st.to_dict() for sid, st in self._streams.items()},
            "counters": dict(self.counters),
        }

    @classmethod
    def restore(cls, snap: Mapping[str, Any], config: SupervisorConfig | None = None) -> ReferencePolicy:
        if snap.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported supervisor snapshot version {snap.get('version')!r}")
        p = cls(config)
        p._opted_users = set(snap.get("opted_out_users", []))
        p._opted_streams = set(snap.get("opted_out_streams", []))
        p._streams = {sid: StreamHealth.from_dict(d) for sid, d in snap.get("streams", {}).items()}
        p.counters.update(snap.get("counters", {}))
        return p

    # ----------------------------------------------------------------------------- internals
    def _state(self, stream_id: str) -> StreamHealth:
        st = self._streams.get(stream_id)
        if st is None:
            st = self._streams[stream_id] = StreamHealth()
        return st

    def _place(self, stream_id: str, replica: str | None, interval: Interval | None) -> None:
        """Record the stream's latest interval under its replica (None: under none)."""
        if replica is not None and interval is not None and self._replica_of.get(stream_id) == replica:
            self._replicas[replica].members[stream_id] = interval  # the common case: it stayed
            return
        old = self._replica_of.pop(stream_id, None)
        if old is not None and old != replica:
            g = self._replicas.get(old)
            if g is not None:
                g.members.pop(stream_id, None)
                if not g.members:
                    del self._replicas[old]
        if replica is not None and interval is not None:
            self._replicas.setdefault(replica, ReplicaGroup()).members[stream_id] = interval
            self._replica_of[stream_id] = replica

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

    def _tally(self, ids: list[str], attempts: list[int], misses: list[int],
               now: float) -> dict[str, tuple[int, int, int, int]]:
        """Per replica in this report: (streams that tried the AI, those that missed) in this
        report, then the same among all reports within `correlation_s` (other bridges').
        Once per report, so judging n streams stays O(n)."""
        horizon = now - self.config.correlation_s
        here: dict[str, list[int]] = {}
        for sid, a, m in zip(ids, attempts, misses, strict=True):
            r = self._replica_of.get(sid)
            if r is not None and a:
                h = here.setdefault(r, [0, 0])
                h[0] += 1
                h[1] += m > 0
        out: dict[str, tuple[int, int, int, int]] = {}
        for r, (tried_here, missed_here) in here.items():
            tried = missed = 0
            for iv in self._replicas[r].members.values():
                if iv.t > horizon and iv.attempts:
                    tried += 1
                    missed += iv.misses > 0
            out[r] = (tried_here, missed_here, tried, missed)
        return out

    def _shared_stall(self, stream_id: str, attempts: int, misses: int,
                      tally: Mapping[str, tuple[int, int, int, int]], now: float) -> bool:
        """True if the stream's misses in this report are its replica's, not its own: at
        least `shared_frac` of the other streams that tried the AI there missed too, among
        this report's streams (the same interval) or among all recent reports (other
        bridges report at other moments; the first to report a stall still sees their
        intervals from before it)."""
        r = self._replica_of.get(stream_id)
        if r is None or not misses or not attempts:
            return False
        g = self._replicas[r]
        if g.failing(now, self.config):
            return False
        tally_r = tally[r]
        frac = self.config.shared_frac
        shared = False
        for tried, missed in (tally_r[:2], tally_r[2:]):
            others, others_missed = tried - 1, missed - 1  # this stream tried and missed
            shared = shared or (others >= 1 and others_missed >= frac * others)
        if shared:
            g.stalled_at = now
        return shared

    def _evict(self, st: StreamHealth, now: float) -> None:
        horizon = now - self.config.window_s
        while st.window and st.window[0][0] <= horizon:
            st.window.popleft()

    def _is_on(self, st: StreamHealth, now: float) -> bool:
        return st.off_until is None or now >= st.off_until

    def _window_unhealthy(self, st: StreamHealth) -> bool:
        cfg = self.config
        attempts = sum(a for _, a, _ in st.window)
        bad = sum(b for _, _, b in st.window)
        return bad >= cfg.min_bad and wilson_lower_bound(bad, attempts, cfg.z) > cfg.max_bad_rate

    def _trip(self, stream_id: str, st: StreamHealth, now: float, cause: OffCause) -> None:
        cfg = self.config
        if st.on_since is not None and now - st.on_since >= cfg.healthy_reset_s:
            st.level = 0  # it was healthy long enough: start the backoff over
        st.off_until = now + cfg.backoff_s(st.level)
        st.off_cause = cause
        st.level += 1
        st.window.clear()
        st.on_since = None
        self.counters[f"off/{cause.value}"] += 1
