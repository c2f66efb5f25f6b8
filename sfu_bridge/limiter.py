"""Hint rate limiter: GCRA (generic cell rate algorithm, ITU-T I.371), 100 hints/s per stream.

Strategy and storage are separate:

- `gcra_allow` is the math, shared by `MemoryGCRA` (explicit clock, for unit tests and
  simulations) and mirrored line for line by ``lua/gcra.lua``;
- `HintLimiter` runs that script on Redis for *all* of a bridge's streams in ONE call per
  tick (``EVALSHA``; KEYS = the bridge's hash and its prune cursor, ARGV = interval,
  tolerance, per-stream counts, then the stream ids).
  Time comes from the server (``TIME``), never from a client clock. `AsyncHintLimiter` is
  the same on ``redis.asyncio`` for code that must not block its event loop. The one
  exception is a load test's simulated clock (`clock`): a dilated simulation must limit
  hints per *simulated* second, or ticks that run late (simulated time stretched over more
  wall time) would let flooders through faster than the limit in the run's own time.

GCRA with emission interval ``T = 1/rate`` and tolerance ``tau = burst * T``: a stream's
state is its theoretical arrival time ``tat``; at time ``now`` it may send
``floor((tau - (max(tat, now) - now)) / T)`` hints, and each one sent adds ``T`` to ``tat``.
A stream offering more than the rate gets exactly ``rate`` per second after an initial
burst of ``burst``. Granting k hints in one step equals granting them one at a time at the
same instant, so batching a tick changes no decision. ``T`` is rounded to whole
microseconds (exact for 100/s).

A bridge's state is one hash, ``<prefix>:{<bridge_id>}`` (field: stream id, value: its
TAT), so a call is one HMGET and one HSET whatever its size, instead of a write with its own
expiry per stream (which cost the server about twice as much per stream). The hash expires
when its last debt is paid, and once it holds more than `PRUNE_ABOVE_FIELDS` fields each
call also deletes a few whose debt is paid (HSCAN), so streams that left stop costing
memory. Redis Cluster runs a
multi-key script only when all keys hash to one slot; the hash tag is the bridge, so one
bridge's state sits on one shard (bounded: a bridge holds a few thousand streams; bridges
spread over slots). A stream that moves to another bridge starts with fresh state (one
extra burst at most), which is acceptable for a soft limit on hints.

When Redis is unreachable the limiter never raises into the media path: ``fail_open=True``
(default) lets every hint through, ``False`` drops them; either way it is counted, Redis is
not retried for a short back-off (0.25 s doubling to 5 s) so a dead server costs one failed
call per back-off rather than one per tick, and the next successful call closes the
circuit. What an outage cost is kept in `LimiterCounters` (calls and hints decided without
Redis by policy, errors by type, seconds from the first failed call to the next success) and
recorded in the metrics (`telemetry.metrics`): a report can then say when the limit was
not enforced instead of implying that it held. The connection pool reconnects by itself, and a ``NOSCRIPT`` reply (a restarted
or flushed server) loads the script again and repeats the call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from telemetry import metrics

log = logging.getLogger(__name__)

SCRIPT_VERSION = 3
SCRIPT_PATH = Path(__file__).with_name("lua") / "gcra.lua"
KEY_PREFIX = f"auralink:gcra{SCRIPT_VERSION}"
DEFAULT_RATE_PER_S = 100.0
DEFAULT_BURST = 10
_MAX_CACHED_FIELDS = 200_000
_MAX_COUNT = 0xFFFF  # counts travel as uint16; more in one call are refused
# a bridge's hash is pruned of paid-up streams only above this many fields (gcra.lua)
PRUNE_ABOVE_FIELDS = 8192
OWN_CHECK_AFTER_S = 1.0  # a limiter connection idle this long is checked before it is used


@dataclass(frozen=True)
class GcraParams:
    """Rate and burst in the integer microseconds the Lua script uses."""

    interval_us: int
    tolerance_us: int

    @classmethod
    def from_rate(cls, rate_per_s: float, burst: int) -> GcraParams:
        if rate_per_s <= 0 or rate_per_s > 1_000_000:
            raise ValueError(f"rate must be in (0, 1e6] per second, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        interval = max(1, round(1_000_000 / rate_per_s))
        return cls(interval_us=interval, tolerance_us=interval * int(burst))


def gcra_allow(
    tat: np.ndarray, now_us: int, offered: np.ndarray, params: GcraParams
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised GCRA step: -> (allowed per stream, new tat). `tat` int64 µs, 0 = none."""
    tat = np.maximum(np.asarray(tat, np.int64), now_us)
    room = (params.tolerance_us - (tat - now_us)) // params.interval_us
    allowed = np.minimum(np.maximum(np.asarray(offered, np.int64), 0), np.maximum(room, 0))
    return allowed, tat + allowed * params.interval_us


class MemoryGCRA:
    """The same GCRA in process memory with an explicit clock (tests, simulations)."""

    def __init__(self, rate_per_s: float = DEFAULT_RATE_PER_S, burst: int = DEFAULT_BURST) -> None:
        self.params = GcraParams.from_rate(rate_per_s, burst)
        self._tat: dict[str, int] = {}

    def allow(self, stream_ids: Sequence[str], counts: Sequence[int], now_s: float) -> np.ndarray:
        now_us = int(round(now_s * 1_000_000))
        tat = np.array([self._tat.get(s, 0) for s in stream_ids], np.int64)
        offered = np.minimum(np.asarray(counts, np.int64), _MAX_COUNT)  # as the Redis call does
        allowed, new_tat = gcra_allow(tat, now_us, offered, self.params)
        for s, t, a in zip(stream_ids, new_tat.tolist(), allowed.tolist(), strict=True):
            if a:
                self._tat[s] = t
        return allowed


@dataclass
class LimiterCounters:
    calls: int = 0  # script calls that reached Redis
    allowed: int = 0  # hints let through by a Redis decision
    limited: int = 0  # hints refused by a Redis decision
    errors: int = 0  # failed Redis calls (each opens the circuit)
    skipped_calls: int = 0  # ticks decided without Redis because the circuit was open
    fail_open: int = 0  # hints let through because Redis was unreachable
    fail_closed: int = 0  # hints dropped because Redis was unreachable
    unavailable_calls: int = 0  # calls answered by the fail-open/closed policy, not by Redis
    unavailable_s: float = 0.0  # time without Redis up to the last call (see `unavailable_seconds`)
    outages: int = 0  # times Redis went from reachable to unreachable
    recoveries: int = 0  # successful calls after a failure
    last_error: str = ""
    by_error: dict[str, int] = field(default_factory=dict)


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class _GcraClient:
    """What the sync and asyncio limiters share: keys, packing, decoding, counters, back-off."""

    def __init__(
        self,
        redis_client: redis.Redis | redis.asyncio.Redis,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: int = DEFAULT_BURST,
        fail_open: bool = True,
        bridge_id: str = "bridge",
        prefix: str = KEY_PREFIX,
        retry_after_s: float = 0.25,
        max_retry_after_s: float = 5.0,
        clock: Callable[[], float] | None = None,
        clock_rate: float = 1.0,
        prune_above: int = PRUNE_ABOVE_FIELDS,
    ) -> None:
        """`clock` (seconds) is the time the limit runs on: None = the Redis server's clock
        (bridges); a load test passes its simulated clock, which runs `clock_rate` clock
        seconds per wall second (1 / its time dilation; the hash then expires in wall time).
        `prune_above`: the bridge's hash is pruned of streams whose debt is paid only while it
        holds more fields than this (`PRUNE_ABOVE_FIELDS`; tests set it low)."""
        if "{" in bridge_id or "}" in bridge_id or not bridge_id:
            raise ValueError(f"bridge id {bridge_id!r} must be non-empty without braces (it is the hash tag)")
        self.redis = redis_client
        # the limiter's own connection (see HintLimiter), made on first use: whether it has
        # sent since it last (re)connected, and when it was last used
        self._own: Any = None
        self._own_open = False
        self._own_used = 0.0
        self.params = GcraParams.from_rate(rate_per_s, burst)
        self.rate_per_s, self.burst = rate_per_s, burst
        self.fail_open = fail_open
        self.bridge_id = bridge_id
        self.key = f"{prefix}:{{{bridge_id}}}"  # the bridge's hash: field = stream id, value = TAT
        self.scan_key = f"{self.key}:scan"  # the prune's HSCAN cursor
        self._keys_frag = _bulk(b"2") + _bulk(self.key.encode("utf-8")) + _bulk(self.scan_key.encode("utf-8"))
        self.retry_after_s, self.max_retry_after_s = retry_after_s, max_retry_after_s
        self.counters = LimiterCounters()
        self.script = SCRIPT_PATH.read_text()
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()
        self._params_frag = _bulk(b"%d" % self.params.interval_us) + _bulk(b"%d" % self.params.tolerance_us)
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be > 0, got {clock_rate}")
        self.clock = clock
        self._px_frag = _bulk(repr(0.001 / clock_rate).encode())
        self._server_clock_frag = _bulk(b"") + _bulk(b"")
        if prune_above < 0:
            raise ValueError(f"prune_above must be >= 0, got {prune_above}")
        self._prune_frag = _bulk(b"%d" % prune_above)
        self._field_frags: dict[str, bytes] = {}
        self._backoff_s = retry_after_s
        self._retry_at = 0.0  # monotonic time before which Redis is not tried
        self._failing = False
        self._down_mark = 0.0  # monotonic time up to which an outage is in `unavailable_s`
        self._preload()

    def _preload(self) -> None:
        """Register the script up front where that can be done synchronously."""

    @property
    def policy(self) -> str:
        """The configured unreachable-Redis policy, as metrics tag it: "open" or "closed"."""
        return "open" if self.fail_open else "closed"

    @property
    def available(self) -> bool:
        """False from a failed Redis call until the next successful one."""
        return not self._failing

    def unavailable_seconds(self, now: float | None = None) -> float:
        """Seconds without Redis so far, the outage still going on included."""
        extra = 0.0
        if self._failing:
            extra = max(0.0, (time.monotonic() if now is None else now) - self._down_mark)
        return self.counters.unavailable_s + extra

    def health(self) -> dict:
        """What reports and the dashboard show: is the limit being enforced, and what did
        running without Redis cost so far."""
        c = self.counters
        return {
            "policy": f"fail-{self.policy}",
            "available": self.available,
            "unavailable_s": round(self.unavailable_seconds(), 3),
            "outages": c.outages,
            "calls_without_redis": c.unavailable_calls,
            "hints_fail_open": c.fail_open,
            "hints_fail_closed": c.fail_closed,
            "errors": c.errors,
            "errors_by_type": dict(c.by_error),
            "last_error": c.last_error,
        }

    def _account_down(self, now: float) -> None:
        """Moves the outage time up to `now` into the counters and the metrics."""
        dt = now - self._down_mark
        self._down_mark = now
        if dt > 0:
            self.counters.unavailable_s += dt
            metrics.record_limiter_unavailable_seconds(self.policy, dt)

    def _field_frag(self, stream_id: str) -> bytes:
        frag = _bulk(stream_id.encode("utf-8"))
        if len(self._field_frags) >= _MAX_CACHED_FIELDS:
            self._field_frags.clear()
        self._field_frags[stream_id] = frag
        return frag

    def pack_call(self, stream_ids: Sequence[str], offered: np.ndarray) -> bytes:
        """The RESP bytes of one EVALSHA deciding `offered[i]` hints of `stream_ids[i]`."""
        n = len(stream_ids)
        counts = np.minimum(offered, _MAX_COUNT).astype(">u2").tobytes()
        cached = self._field_frags.get
        frags = [cached(s) or self._field_frag(s) for s in stream_ids]
        if self.clock is None:
            clock = self._server_clock_frag
        else:
            clock = _bulk(b"%d" % round(self.clock() * 1_000_000)) + self._px_frag
        head = b"*%d\r\n$7\r\nEVALSHA\r\n" % (n + 11) + _bulk(self.sha.encode()) + self._keys_frag
        return b"".join((head, self._params_frag, _bulk(counts), clock, self._prune_frag, *frags))

    def _check_sha(self, sha: str | bytes) -> None:
        if isinstance(sha, bytes):
            sha = sha.decode()
        if sha != self.sha:
            raise redis.ResponseError(f"SCRIPT LOAD returned {sha}, expected {self.sha}")

    @staticmethod
    def _prepare(ticks: Sequence[tuple[Sequence[str], Sequence[int]]]) -> list[tuple[Sequence[str], np.ndarray]]:
        calls = []
        for stream_ids, counts in ticks:
            n = len(stream_ids)
            if n != len(counts):
                raise ValueError(f"{n} stream ids but {len(counts)} counts")  # caller bug, not I/O
            calls.append((stream_ids, np.maximum(np.asarray(counts, np.int64).reshape(n), 0)))
        return calls

    @staticmethod
    def _decode(calls: list[tuple[Sequence[str], np.ndarray]], replies: list) -> list[np.ndarray]:
        out = []
        for (ids, _), r in zip(calls, replies, strict=True):
            if isinstance(r, Exception):
                raise r
            allowed = np.frombuffer(r, ">u2").astype(np.int64)
            if allowed.shape != (len(ids),):
                raise redis.ResponseError(f"gcra returned {allowed.shape[0]} decisions for {len(ids)} streams")
            out.append(allowed)
        return out

    def _skip(self) -> bool:
        if time.monotonic() < self._retry_at:
            self.counters.skipped_calls += 1
            return True
        return False

    def _succeeded(self, calls: list[tuple[Sequence[str], np.ndarray]], results: list[np.ndarray]) -> list[np.ndarray]:
        it = iter(results)
        out = []
        for ids, off in calls:
            allowed = next(it) if len(ids) else off
            self.counters.calls += 1 if len(ids) else 0
            total = int(allowed.sum())
            self.counters.allowed += total
            self.counters.limited += int(off.sum()) - total
            out.append(allowed)
        if self._failing:
            self._account_down(time.monotonic())
            self._failing = False
            self._backoff_s = self.retry_after_s
            self.counters.recoveries += 1
            log.info("hint limiter: Redis reachable again after %.2f s without it",
                     self.counters.unavailable_s)
        return out

    def _failed(self, exc: BaseException, calls: list[tuple[Sequence[str], np.ndarray]]) -> list[np.ndarray]:
        name = type(exc).__name__
        self.counters.errors += 1
        self.counters.by_error[name] = self.counters.by_error.get(name, 0) + 1
        self.counters.last_error = name
        metrics.record_limiter_error(name)
        now = time.monotonic()
        if not self._failing:
            log.warning(
                "hint limiter: Redis unreachable (%s); failing %s, retrying in %.2f s",
                name, self.policy, self._backoff_s,
            )
            self.counters.outages += 1
            self._down_mark = now
        self._failing = True
        self._retry_at = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.max_retry_after_s)
        return self._unreachable(calls)

    def _unreachable(self, calls: list[tuple[Sequence[str], np.ndarray]]) -> list[np.ndarray]:
        n_calls = sum(1 for ids, _ in calls if len(ids))
        self.counters.unavailable_calls += n_calls
        metrics.record_limiter_unavailable(self.policy, n_calls)
        if self._failing:
            self._account_down(time.monotonic())
        out = []
        for _, off in calls:
            total = int(off.sum())
            if self.fail_open:
                self.counters.fail_open += total
                out.append(off.copy())
            else:
                self.counters.fail_closed += total
                out.append(np.zeros_like(off))
        return out

    def _own_connection(self) -> tuple[Any, bool]:
        """The limiter's connection, and whether to check it before use: open, and idle long
        enough that the server may have closed it."""
        conn = self._own
        if conn is None:
            conn = self._own = self.redis.connection_pool.make_connection()
            self._own_open = False
        now = time.monotonic()
        check = self._own_open and now - self._own_used > OWN_CHECK_AFTER_S
        self._own_used = now
        return conn, check

    def retry_now(self) -> None:
        """End the back-off so the next call tries Redis (operators, tests)."""
        self._retry_at = 0.0


def _stale(conn: Any) -> bool:
    """A connection with bytes (or an end of file) to read before any command: not usable."""
    try:
        return bool(conn.can_read())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return True


async def _astale(conn: Any) -> bool:
    try:
        return bool(await conn.can_read_destructive())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return True


async def _aread_replies(conn: Any, n_replies: int) -> list:
    replies: list = []
    for _ in range(n_replies):
        try:
            replies.append(await conn.read_response(disable_decoding=True))
        except redis.ResponseError as exc:  # e.g. NOSCRIPT: keep reading the others
            replies.append(exc)
    return replies


def _read_replies(conn: Any, n_replies: int) -> list:
    replies: list = []
    for _ in range(n_replies):
        try:
            replies.append(conn.read_response(disable_decoding=True))
        except redis.ResponseError as exc:  # e.g. NOSCRIPT: keep reading the others
            replies.append(exc)
    return replies


class HintLimiter(_GcraClient):
    """Redis GCRA for all of one bridge's streams, one EVALSHA per `allow()` call.

    `redis_client` should come from `sfu_bridge.redis_store.connect()` (short timeouts, no
    retry back-off); any standalone redis-py client works (not a RedisCluster object: give
    it a client for the node that owns the bridge's slot). `AsyncHintLimiter` is the same
    for asyncio code that must not block its loop on Redis.

    The call is packed by hand from cached per-stream key fragments, because redis-py's
    generic packer costs microseconds per argument and a tick carries thousands of
    streams. It goes out on the limiter's own connection (made by the client's pool, so
    with its socket and timeout settings): taking one from the pool and giving it back
    cost about as much CPU as the round trip itself (pool bookkeeping, a readiness poll).
    A thread that finds that connection busy uses a pooled one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._own_lock = threading.Lock()  # held while a call uses the limiter's connection
        super().__init__(*args, **kwargs)

    def _preload(self) -> None:
        try:  # register once up front; NOSCRIPT later (restart, SCRIPT FLUSH) loads it again
            self._load_script()
        except (redis.RedisError, OSError) as exc:
            log.warning("hint limiter: could not load the GCRA script yet (%s); will retry", type(exc).__name__)

    def _load_script(self) -> None:
        self._check_sha(self.redis.script_load(self.script))

    def _roundtrip(self, packed: bytes, n_replies: int) -> list:
        """Send pipelined commands on the limiter's connection; replies or ResponseErrors."""
        if not self._own_lock.acquire(blocking=False):
            return self._pooled_roundtrip(packed, n_replies)
        return self._read_own(self._send_own(packed), n_replies)

    def _send_own(self, packed: bytes) -> Any:
        """With `_own_lock` held: `packed` sent on the limiter's connection, which stays this
        call's until `_read_own` (on failure the lock is released and the error raised)."""
        try:
            conn, check = self._own_connection()
            if check and _stale(conn):
                self._disconnect_own()  # closed by the server while idle
            try:
                conn.send_packed_command([packed])
            except redis.ConnectionError:
                if not self._own_open:
                    raise
                # Not sent on a connection the server has closed (a unix socket fails the
                # write): once more on a new one.
                self._disconnect_own()
                conn.send_packed_command([packed])
            self._own_open = True
            return conn
        except BaseException:
            self._own_lock.release()
            raise

    def _read_own(self, conn: Any, n_replies: int) -> list:
        """The replies to what `_send_own` sent; releases `_own_lock`."""
        try:
            return _read_replies(conn, n_replies)
        except BaseException:
            self._disconnect_own()  # a half-read reply must never be read as the next call's
            raise
        finally:
            self._own_lock.release()

    def send(self, stream_ids: Sequence[str], counts: Sequence[int]) -> PendingAllow:
        """`allow()` in two halves: the call goes out now and `result()` of what this returns
        reads its answer, so a caller with something else to wait for (a bridge tick, its
        codec's answer) reads it then, by when it has arrived, instead of blocking on it.
        Until then the limiter's connection is this call's (another call meanwhile, or one
        that finds it so, takes a pooled connection and answers at once). Redis decides when
        the call arrives, as for `allow()`; a caller that will not read the answer must
        `cancel()` it."""
        calls = self._prepare([(stream_ids, counts)])
        if not len(calls[0][0]):
            return PendingAllow(self, calls, value=calls[0][1])
        if not self._own_lock.acquire(blocking=False):
            return PendingAllow(self, calls, value=self.allow(stream_ids, counts))
        if self._skip():
            self._own_lock.release()
            return PendingAllow(self, calls, value=self._unreachable(calls)[0])
        try:
            conn = self._send_own(self.pack_call(*calls[0]))
        except (redis.RedisError, OSError) as exc:
            return PendingAllow(self, calls, value=self._failed(exc, calls)[0])
        return PendingAllow(self, calls, conn=conn)

    def _disconnect_own(self) -> None:
        self._own.disconnect()
        self._own_open = False

    def _pooled_roundtrip(self, packed: bytes, n_replies: int) -> list:
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed])
            return _read_replies(conn, n_replies)
        finally:
            pool.release(conn)

    def close(self) -> None:
        """Closes the limiter's own connection (the client and its pool are the caller's).
        A `send()` whose answer is still unread holds it: read or cancel that first."""
        with self._own_lock:
            if self._own is not None:
                self._disconnect_own()
                self._own = None

    def _evaluate(self, calls: list[tuple[Sequence[str], np.ndarray]]) -> list[np.ndarray]:
        """Run several calls in one round trip (raises on Redis failure)."""
        return self._answers(calls, self._roundtrip(b"".join(self.pack_call(*c) for c in calls), len(calls)))

    def _answers(self, calls: list[tuple[Sequence[str], np.ndarray]], replies: list) -> list[np.ndarray]:
        """The calls' decisions from their replies (raises on Redis failure)."""
        redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if redo:  # a restarted or flushed server: load once, then redo only those calls
            self._load_script()
            again = self._roundtrip(b"".join(self.pack_call(*calls[i]) for i in redo), len(redo))
            for i, r in zip(redo, again, strict=True):
                replies[i] = r
        return self._decode(calls, replies)

    def allow(self, stream_ids: Sequence[str], counts: Sequence[int]) -> np.ndarray:
        """How many of each stream's `counts` hints pass (int64 array). Never raises on I/O."""
        return self.allow_ticks([(stream_ids, counts)])[0]

    def allow_ticks(self, ticks: Sequence[tuple[Sequence[str], Sequence[int]]]) -> list[np.ndarray]:
        """Several calls (e.g. ticks, or bridges' worth of streams) in ONE round trip."""
        calls = self._prepare(ticks)
        todo = [c for c in calls if len(c[0])]
        if not todo:
            return [off for _, off in calls]
        if self._skip():
            return self._unreachable(calls)
        try:
            results = self._evaluate(todo)
        except (redis.RedisError, OSError) as exc:
            return self._failed(exc, calls)
        return self._succeeded(calls, results)


class PendingAllow:
    """A `HintLimiter.send()` call: `result()` is what `allow()` would have returned (read
    on first use; never raises on I/O); `cancel()` drops an answer that will not be read."""

    def __init__(self, limiter: HintLimiter, calls: list[tuple[Sequence[str], np.ndarray]],
                 conn: Any = None, value: np.ndarray | None = None) -> None:
        self._limiter, self._calls, self._conn, self._value = limiter, calls, conn, value

    @property
    def pending(self) -> bool:
        """Sent, its answer not read yet (the limiter's connection is still this call's)."""
        return self._conn is not None

    def result(self) -> np.ndarray:
        if self._conn is None:
            return self._value
        lim, calls, conn, self._conn = self._limiter, self._calls, self._conn, None
        try:
            self._value = lim._succeeded(calls, lim._answers(calls, lim._read_own(conn, 1)))[0]
        except (redis.RedisError, OSError) as exc:
            self._value = lim._failed(exc, calls)[0]
        return self._value

    def cancel(self) -> None:
        """The answer is not wanted: the connection is closed unread (a reply left on it must
        never be read as the next call's) and the next call makes a new one. The hints were
        decided by Redis all the same; none is counted here."""
        if self._conn is None:
            return
        lim, self._conn = self._limiter, None
        try:
            lim._disconnect_own()
        finally:
            lim._own_lock.release()
        self._value = np.zeros_like(self._calls[0][1])


class AsyncHintLimiter(_GcraClient):
    """`HintLimiter` for asyncio: `await allow(...)`; Redis I/O never blocks the event loop.

    Takes a `redis.asyncio.Redis` (e.g. ``redis.asyncio.Redis.from_url(url,
    **media_path_options())``). The script is loaded on first use (NOSCRIPT -> SCRIPT LOAD).
    """

    async def _load_script(self) -> None:
        self._check_sha(await self.redis.script_load(self.script))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the limiter's own connection, as `HintLimiter`'s; a call that finds it busy (another
        # coroutine's call awaits its reply) uses a pooled one
        self._own_busy = False
        super().__init__(*args, **kwargs)

    async def _roundtrip(self, packed: bytes, n_replies: int) -> list:
        if self._own_busy:
            return await self._pooled_roundtrip(packed, n_replies)
        self._own_busy = True
        try:
            conn, check = self._own_connection()
            if check and await _astale(conn):
                await self._disconnect_own()  # closed by the server while idle
            try:
                await conn.send_packed_command([packed])
            except redis.ConnectionError:
                if not self._own_open:
                    raise
                await self._disconnect_own()  # not sent on a closed connection: once more
                await conn.send_packed_command([packed])
            self._own_open = True
            try:
                return await _aread_replies(conn, n_replies)
            except BaseException:  # cancelled too: replies may be half read, never reuse it
                await self._disconnect_own()
                raise
        finally:
            self._own_busy = False

    async def _disconnect_own(self) -> None:
        self._own_open = False
        await self._own.disconnect()

    async def _pooled_roundtrip(self, packed: bytes, n_replies: int) -> list:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command([packed])
            return await _aread_replies(conn, n_replies)
        except asyncio.CancelledError:
            await conn.disconnect()  # replies may be half read: never reuse this connection
            raise
        finally:
            await pool.release(conn)

    async def _evaluate(self, calls: list[tuple[Sequence[str], np.ndarray]]) -> list[np.ndarray]:
        replies = await self._roundtrip(b"".join(self.pack_call(*c) for c in calls), len(calls))
        redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if redo:
            await self._load_script()
            again = await self._roundtrip(b"".join(self.pack_call(*calls[i]) for i in redo), len(redo))
            for i, r in zip(redo, again, strict=True):
                replies[i] = r
        return self._decode(calls, replies)

    async def allow(self, stream_ids: Sequence[str], counts: Sequence[int]) -> np.ndarray:
        return (await self.allow_ticks([(stream_ids, counts)]))[0]

    async def allow_ticks(self, ticks: Sequence[tuple[Sequence[str], Sequence[int]]]) -> list[np.ndarray]:
        calls = self._prepare(ticks)
        todo = [c for c in calls if len(c[0])]
        if not todo:
            return [off for _, off in calls]
        if self._skip():
            return self._unreachable(calls)
        try:
            results = await self._evaluate(todo)
        except (redis.RedisError, OSError) as exc:
            return self._failed(exc, calls)
        return self._succeeded(calls, results)

    async def aclose(self) -> None:
        if self._own is not None:
            await self._disconnect_own()
            self._own = None
        await self.redis.aclose()
