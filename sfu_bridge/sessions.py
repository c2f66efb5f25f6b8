"""The lifecycle of WHIP/WHEP sessions: admission caps, connect deadline, ownership, counters.

A session is answered (201) before its peer has done ICE and DTLS; a peer that never
completes them would hold a publisher slot, sockets and timers for ever. `SessionRegistry`
keeps one `SessionRecord` per session and decides, without any I/O:

- admission: a subscriber is refused when its stream already has
  `max_subscribers_per_stream` subscribers on this worker (503) or when the bearer token it
  presents already holds `max_subscribers_per_token` subscriber sessions (429); 0 = no cap;
- the connect deadline: a session whose answer went out more than `connect_timeout_s` ago
  and whose peer connection never reached ``connected`` is `overdue` (the server reaps it);
- ownership: a session may be ended by a token of the user that opened it, or an operator.

Every end and every refusal is counted by reason (`EndReason`, `Refusal`); the counters are
part of the worker's ``/health`` stats. The server (sfu_bridge/server.py) owns the peer
connections and does the closing; this module only keeps the books.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class SessionKind(str, enum.Enum):
    PUBLISHER = "publisher"  # WHIP
    SUBSCRIBER = "subscriber"  # WHEP


class EndReason(str, enum.Enum):
    DELETED = "deleted"  # DELETE on the session URL
    CONNECT_TIMEOUT = "connect_timeout"  # ICE/DTLS not connected within the deadline
    # the peer closed DTLS, or went silent: ICE failed or consent expired (RFC 7675). aiortc
    # reports either as a failed or closed connection, in an order that races: one reason
    PEER_GONE = "peer_gone"
    REPLACED = "replaced"  # a new publish of the same stream by the same user or an operator
    SHUTDOWN = "shutdown"  # the worker stopped


class Refusal(str, enum.Enum):
    STREAM_CAP = "stream_cap"  # the stream has its maximum of subscribers on this worker
    TOKEN_CAP = "token_cap"  # the token holds its maximum of subscriber sessions
    WORKER_FULL = "worker_full"  # no publisher slot left on this worker
    STREAM_TAKEN = "stream_taken"  # another user publishes the stream


REFUSAL_STATUS = {
    Refusal.STREAM_CAP: 503,
    Refusal.TOKEN_CAP: 429,
    Refusal.WORKER_FULL: 503,
    Refusal.STREAM_TAKEN: 409,
}


class SessionRefused(Exception):
    """A session the worker will not open; `status` is the HTTP status to answer."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = REFUSAL_STATUS[reason]


def token_key(token: str) -> str:
    """What identifies a bearer token in the books: a digest, never the token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True)
class SessionLimits:
    connect_timeout_s: float = 30.0
    max_subscribers_per_stream: int = 200  # 0 = no cap
    max_subscribers_per_token: int = 10  # 0 = no cap


@dataclass
class SessionRecord:
    session_id: str
    kind: SessionKind
    stream_id: str
    user: str
    token_key: str
    answered_at: float | None = None  # monotonic; the connect deadline runs from here
    connected_at: float | None = None

    @property
    def connected(self) -> bool:
        return self.connected_at is not None


@dataclass
class SessionRegistry:
    """The books of one worker's sessions (pure: time comes from `clock`)."""

    limits: SessionLimits = field(default_factory=SessionLimits)
    clock: Callable[[], float] = time.monotonic
    records: dict[str, SessionRecord] = field(default_factory=dict)
    ended: Counter = field(default_factory=Counter)  # EndReason -> sessions
    refused: Counter = field(default_factory=Counter)  # Refusal -> requests

    # -- admission ---------------------------------------------------------------------
    def refuse(self, reason: Refusal, message: str) -> SessionRefused:
        """Count a refusal and return the exception to raise."""
        self.refused[reason] += 1
        return SessionRefused(reason, message)

    def subscribers(self, stream_id: str) -> int:
        """The stream's subscriber sessions here, those still negotiating included."""
        return sum(r.kind is SessionKind.SUBSCRIBER and r.stream_id == stream_id for r in self.records.values())

    def stream_full(self, stream_id: str) -> bool:
        """The stream holds its maximum of subscribers here (a fleet cascades the next one)."""
        cap = self.limits.max_subscribers_per_stream
        return bool(cap) and self.subscribers(stream_id) >= cap

    def full_streams(self) -> list[str]:
        """Every stream at its maximum of subscribers here, in one pass over the books."""
        cap = self.limits.max_subscribers_per_stream
        if not cap:
            return []
        counts = Counter(r.stream_id for r in self.records.values() if r.kind is SessionKind.SUBSCRIBER)
        return [s for s, n in counts.items() if n >= cap]

    def admit_subscriber(self, stream_id: str, token: str) -> None:
        """Raise `SessionRefused` (counted) if one more subscriber would exceed a cap."""
        per_stream, per_token = (
            self.limits.max_subscribers_per_stream, self.limits.max_subscribers_per_token
        )
        subs = [r for r in self.records.values() if r.kind is SessionKind.SUBSCRIBER]
        if self.stream_full(stream_id):
            raise self.refuse(
                Refusal.STREAM_CAP,
                f"stream has its maximum of {per_stream} subscribers on this bridge worker",
            )
        key = token_key(token)
        if per_token and sum(r.token_key == key for r in subs) >= per_token:
            raise self.refuse(
                Refusal.TOKEN_CAP,
                f"this token already holds {per_token} subscriber sessions (the cap): "
                "end one (DELETE its URL) before opening another",
            )

    # -- lifecycle ---------------------------------------------------------------------
    def open(self, session_id: str, kind: SessionKind, stream_id: str, user: str, token: str) -> SessionRecord:
        """Book a session being negotiated (it counts against the caps from now on)."""
        rec = SessionRecord(session_id, kind, stream_id, user, token_key(token))
        self.records[session_id] = rec
        return rec

    def answered(self, session_id: str) -> None:
        """The answer goes out: the connect deadline starts."""
        rec = self.records.get(session_id)
        if rec is not None and rec.answered_at is None:
            rec.answered_at = self.clock()

    def connected(self, session_id: str) -> None:
        rec = self.records.get(session_id)
        if rec is not None and rec.connected_at is None:
            rec.connected_at = self.clock()

    def discard(self, session_id: str) -> SessionRecord | None:
        """Forget a session that was never answered (its request got a 4xx): not an end."""
        return self.records.pop(session_id, None)

    def close(self, session_id: str, reason: EndReason) -> SessionRecord | None:
        """Forget a session and count its end; None (and nothing counted) if already gone."""
        rec = self.records.pop(session_id, None)
        if rec is not None:
            self.ended[reason] += 1
        return rec

    def get(self, session_id: str) -> SessionRecord | None:
        return self.records.get(session_id)

    def overdue(self) -> list[str]:
        """Answered sessions whose peer did not connect within the deadline."""
        deadline = self.clock() - self.limits.connect_timeout_s
        return [
            sid for sid, r in self.records.items()
            if r.connected_at is None and r.answered_at is not None and r.answered_at <= deadline
        ]

    # -- ownership ---------------------------------------------------------------------
    @staticmethod
    def may_end(rec: SessionRecord, user: str, operator: bool) -> bool:
        return operator or rec.user == user

    # -- stats -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        recs = list(self.records.values())
        return {
            "open": {
                kind.value: sum(r.kind is kind for r in recs) for kind in SessionKind
            },
            "connecting": sum(not r.connected for r in recs),
            "ended": {r.value: self.ended.get(r, 0) for r in EndReason},
            "refused": {r.value: self.refused.get(r, 0) for r in Refusal},
            "connect_timeout_s": self.limits.connect_timeout_s,
        }
