"""Who is connected when: a population of stream slots with Poisson join/leave.

Each *user slot* alternates between connected (exponential session length) and away
(exponential gap), so joins and leaves are Poisson processes whose rates keep the expected
number of live streams at the requested `streams`. A user that rejoins gets a fresh stream id
(`u00042-3` = user 42's fourth session), so per-user settings such as an opt-out outlive a
single stream, as they do for real callers.

Abusive streams (hint flooders, forgers, replayers) join at the start and stay for the whole
run, so that their per-stream hint rates are measured over the same window.

`Ramp` (autoscaling runs) replaces the steady state with an event: `floor_frac` of the
streams are there at the start, the rest trickle in (Poisson arrivals at a constant rate)
until `burst_at_frac` of the run, then `burst_frac` of all streams join within `burst_s`,
and everyone stays to the end.

Everything is a numpy column over slots; a step costs a few vector operations, not a Python
loop over streams.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class StreamKind(enum.IntEnum):
    NORMAL = 0
    FLOODER = 1  # sends validly signed hints far above the per-stream rate limit
    FORGER = 2  # sends hints with tags that were not made with the stream's key
    REPLAYER = 3  # re-sends copies of its own, already accepted hints


@dataclass(frozen=True)
class Ramp:
    """An event's arrivals over a run of `duration_s` (see the module docstring)."""

    duration_s: float
    floor_frac: float = 0.1
    burst_at_frac: float = 0.5
    burst_frac: float = 0.2
    burst_s: float = 2.0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.burst_s <= 0:
            raise ValueError("duration_s and burst_s must be > 0")
        if not (0 <= self.floor_frac and 0 <= self.burst_frac and self.floor_frac + self.burst_frac <= 1):
            raise ValueError("floor_frac and burst_frac must be >= 0 and sum to at most 1")
        if not 0 < self.burst_at_frac < 1:
            raise ValueError("burst_at_frac must be in (0, 1)")

    def arrival_times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Join times of `n` streams, sorted: floor at 0, trickle, burst."""
        floor = int(round(n * self.floor_frac))
        burst = int(round(n * self.burst_frac))
        trickle = n - floor - burst
        t_burst = self.burst_at_frac * self.duration_s
        # Uniform order statistics = Poisson arrivals at a constant rate, given their number.
        times = np.concatenate([
            np.zeros(floor),
            np.sort(rng.uniform(0.0, t_burst, trickle)),
            t_burst + np.sort(rng.uniform(0.0, self.burst_s, burst)),
        ])
        return times


@dataclass(frozen=True)
class TraceConfig:
    streams: int = 200  # expected live streams (the peak, with a ramp)
    mean_session_s: float = 120.0
    mean_gap_s: float = 6.0
    flooders: int = 2
    forgers: int = 2
    replayers: int = 2
    seed: int = 0
    ramp: Ramp | None = None

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError("streams must be >= 1")
        if self.flooders + self.forgers + self.replayers > self.streams:
            raise ValueError("more abusive streams than streams")
        if self.mean_session_s <= 0 or self.mean_gap_s <= 0:
            raise ValueError("mean_session_s and mean_gap_s must be > 0")

    @property
    def abusers(self) -> int:
        return self.flooders + self.forgers + self.replayers

    @property
    def slots(self) -> int:
        """User slots so that the expected number connected equals `streams` (with a ramp:
        one slot per stream)."""
        if self.ramp is not None:
            return self.streams
        normal = self.streams - self.abusers
        on_frac = self.mean_session_s / (self.mean_session_s + self.mean_gap_s)
        return self.abusers + int(np.ceil(normal / on_frac))


@dataclass
class Change:
    joined: np.ndarray  # slot indices that connected this step
    left: np.ndarray  # slot indices that disconnected this step (their old stream ids)
    left_ids: list[str]


class StreamPopulation:
    """Slots, their kind, whether connected, and the current stream id of each.

    `user_offset` numbers this population's users after those of others (several load
    generators each drive a share of one run's users: `u00000`.. then `u05000`..)."""

    def __init__(self, config: TraceConfig, user_offset: int = 0) -> None:
        self.config = config
        self.user_offset = user_offset
        self.rng = np.random.default_rng(config.seed)
        n = config.slots
        self.n_slots = n
        self.kind = np.zeros(n, np.int8)
        # Abusers take random slots so they mix with honest streams on every replica.
        abusive = self.rng.choice(n, size=config.abusers, replace=False)
        cut1, cut2 = config.flooders, config.flooders + config.forgers
        self.kind[abusive[:cut1]] = StreamKind.FLOODER
        self.kind[abusive[cut1:cut2]] = StreamKind.FORGER
        self.kind[abusive[cut2:]] = StreamKind.REPLAYER
        self.user_ids = [f"u{user_offset + i:05d}" for i in range(n)]
        self.sessions = np.zeros(n, np.int64)  # sessions started so far per slot
        on_frac = config.mean_session_s / (config.mean_session_s + config.mean_gap_s)
        normal = self.kind == StreamKind.NORMAL
        self.active = np.where(normal, self.rng.random(n) < on_frac, True)
        # Memoryless: the remaining time in the current state has the same law as a whole one.
        self.next_change = np.where(
            self.active,
            self.rng.exponential(config.mean_session_s, n),
            self.rng.exponential(config.mean_gap_s, n),
        )
        self.next_change[~normal] = np.inf
        if config.ramp is not None:
            # An event: every honest user joins once, at its arrival time, and stays.
            honest = np.flatnonzero(normal)
            at = config.ramp.arrival_times(honest.size, self.rng)
            self.active[honest] = at <= 0.0
            self.next_change[honest] = np.where(at <= 0.0, np.inf, at)
        self.stream_ids: list[str] = [""] * n
        self.joined_at = np.full(n, np.nan)
        for i in np.flatnonzero(self.active):
            self._start(int(i), 0.0)
        self.joins = 0  # joins after t = 0
        self.leaves = 0

    def _start(self, i: int, t: float) -> None:
        self.stream_ids[i] = f"{self.user_ids[i]}-{self.sessions[i]}"
        self.sessions[i] += 1
        self.joined_at[i] = t

    def step(self, t: float) -> Change:
        """Advance to time `t` (seconds); returns who joined and who left since the last step."""
        due = np.flatnonzero(self.next_change <= t)
        if due.size == 0:
            return Change(np.empty(0, np.int64), np.empty(0, np.int64), [])
        was_on = self.active[due]
        left = due[was_on]
        joined = due[~was_on]
        left_ids = [self.stream_ids[i] for i in left.tolist()]
        self.active[left] = False
        self.active[joined] = True
        for i in joined.tolist():
            self._start(i, t)
        cfg = self.config
        self.next_change[left] = t + self.rng.exponential(cfg.mean_gap_s, left.size)
        self.next_change[joined] = (
            np.inf if cfg.ramp is not None else t + self.rng.exponential(cfg.mean_session_s, joined.size)
        )
        self.joins += int(joined.size)
        self.leaves += int(left.size)
        return Change(joined, left, left_ids)

    def live(self) -> np.ndarray:
        return np.flatnonzero(self.active)

    def ids(self, slots: np.ndarray) -> list[str]:
        sid = self.stream_ids
        return [sid[i] for i in slots.tolist()]

    def slot_of_user(self, user_id: str) -> int | None:
        if not (user_id.startswith("u") and user_id[1:].isdigit()):
            return None
        i = int(user_id[1:]) - self.user_offset
        return i if 0 <= i < self.n_slots else None
