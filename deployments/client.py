"""The bridge side of the frame-batch contract: `CodecClient`.

`CodecClient.process(batch)` splits a tick's `FrameBatch` by the replica that owns each
stream (stream affinity, see router.py), sends ONE request per replica, and merges the
replies back in row order. It never raises: a malformed batch, a dead replica, a timeout or
any transport failure becomes a per-frame fallback, so every frame gets exactly one outcome.

Deadlines (contract.py): a batch arrives here with each frame's budget as of the tick; each
request leaves with that budget less the time spent here since and less the estimated one-way
transit to the replica (`TransitEstimate`), so the replica's deadline, stamped on its own
clock on arrival, falls where the bridge's does whatever either host's clock says.

The fallbacks the client decides itself (a replica that did not answer in time, a failed
transport, an answer for a different batch, a malformed batch) are recorded in the metrics
here; frames a replica answered are counted by that replica.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import Any

import numpy as np

from deployments.affinity import local_view
from deployments.contract import (
    BatchResult,
    FallbackReason,
    FrameBatch,
    reason_code,
)
from deployments.cpu_meter import CpuMeter
from telemetry import metrics

logger = logging.getLogger(__name__)

# A request still unanswered this long after its latest deadline is abandoned: its frames
# are worthless by then, and the media path must not wait on a stuck replica.
RESPONSE_GRACE_S = 1.0


@dataclass
class ClientCounters:
    requests: int = 0
    transport_errors: int = 0
    timeouts: int = 0
    malformed: int = 0
    frames_by_outcome: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class TransitEstimate:
    """One-way bridge -> replica transit (ms), NTP-style: a request's round trip on the
    bridge's clock less the time the replica held it on its own clock (`held_ms`), halved
    (the path is taken as symmetric). Each side measures only a duration on its own clock, so
    clock offsets cancel. The estimate is the median of recent requests (0 before the first)."""

    def __init__(self, window: int = 32) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self._median = 0.0

    def observe(self, round_trip_ms: float, held_ms: float) -> None:
        if held_ms <= 0.0 or round_trip_ms < held_ms:
            return  # a reply without a held time (or from a stopped clock) says nothing
        self._samples.append((round_trip_ms - held_ms) / 2.0)
        self._median = statistics.median(self._samples)

    @property
    def one_way_ms(self) -> float:
        return self._median


Rows = np.ndarray | slice  # a replica's rows of a batch: indexes, or one contiguous range


def _take(batch: FrameBatch, rows: Rows, spent_ms: float = 0.0) -> FrameBatch:
    """The rows of `batch` for one replica, their budgets less `spent_ms`. A range of rows
    (a batch ordered by owner) is taken as views, without copying its PCM."""
    ids = batch.stream_ids[rows] if isinstance(rows, slice) else [batch.stream_ids[i] for i in rows.tolist()]
    return FrameBatch(
        op=batch.op,
        bridge_id=batch.bridge_id,
        stream_ids=ids,
        epochs=batch.epochs[rows],
        epoch_seqs=batch.epoch_seqs[rows],
        budgets_ms=np.asarray(batch.budgets_ms[rows], np.float64) - spent_ms,
        pcm=None if batch.pcm is None else batch.pcm[rows],
        opus=None if batch.opus is None else (
            batch.opus[rows] if isinstance(rows, slice) else [batch.opus[i] for i in rows.tolist()]),
        bandwidth_kbps=batch.bandwidth_kbps,
        n_q=None if batch.n_q is None else batch.n_q[rows],
        vad=None if batch.vad is None else batch.vad[rows],
        vad_config=batch.vad_config,
        stream_refs=None if batch.stream_refs is None else batch.stream_refs[rows],
    )


def merge_results(batch: FrameBatch, parts: list[tuple[Rows, BatchResult]]) -> BatchResult:
    """Scatter per-replica results back into the batch's row order."""
    b = len(batch)
    if _in_order(parts, b):
        return _concatenate(batch, parts)
    out = BatchResult(
        stream_ids=list(batch.stream_ids),
        outcome_codes=np.zeros(b, np.uint8),
        epochs=np.asarray(batch.epochs, np.int64).copy(),
        queue_ms=np.zeros(b, np.float32),
        compute_ms=np.zeros(b, np.float32),
    )
    seen = np.zeros(b, bool)
    for rows, res in parts:
        out.outcome_codes[rows] = res.outcome_codes
        out.queue_ms[rows] = res.queue_ms
        out.compute_ms[rows] = res.compute_ms
        seen[rows] = True
        if res.vad is not None and batch.vad is not None:
            if out.vad is None:
                out.vad = batch.vad.copy()  # a part without a verdict keeps its rows' state
            out.vad[rows] = res.vad
        if res.codes is not None and res.codes.ndim == 3:
            if out.codes is None:
                # as deep as the batch's deepest row (parts hold their own deepest row's)
                n_q = max(int(batch.depths().max()) if b else 0, res.codes.shape[1])
                out.codes = np.zeros((b, n_q, res.codes.shape[2]), res.codes.dtype)
            k = min(out.codes.shape[1], res.codes.shape[1])
            if out.codes.shape[2] == res.codes.shape[2]:
                out.codes[rows, :k] = res.codes[:, :k]
    assert seen.all(), "every row must come back from exactly one part"
    if parts:
        _merge_summary(out, [res for _, res in parts])
    return out


def _merge_summary(out: BatchResult, results: list[BatchResult]) -> None:
    """What a merged result says of its parts as a whole: their replicas, errors, compute
    mode ("real", "emulated", or both, "emulated,real", if replicas disagree
    mid-reconfigure) and the longest hold."""
    out.replica_id = ",".join(sorted({r.replica_id for r in results if r.replica_id}))
    for r in results:
        out.errors.update(r.errors)
    out.compute = ",".join(sorted({r.compute for r in results}))
    out.held_ms = max(out.held_ms, *(r.held_ms for r in results))


def _in_order(parts: list[tuple[Rows, BatchResult]], b: int) -> bool:
    """Whether the parts are ranges of rows that follow each other from 0 to b (a batch a
    bridge ordered by owner), each answering its rows' columns, with codes of one shape
    (or none) and no VAD state."""
    at = 0
    shapes = set()
    for rows, res in parts:
        if (not isinstance(rows, slice) or rows.start != at or rows.step not in (None, 1)
                or res.vad is not None or not len(res.outcome_codes) == len(res.queue_ms)
                == len(res.compute_ms) == rows.stop - at):
            return False
        at = rows.stop
        shapes.add(None if res.codes is None else res.codes.shape[1:])
    return at == b and len(shapes) == 1


def _concatenate(batch: FrameBatch, parts: list[tuple[Rows, BatchResult]]) -> BatchResult:
    """`merge_results` of parts in row order: each column joined, nothing scattered."""
    results = [res for _, res in parts]
    codes = None
    first = results[0].codes
    if first is not None and first.ndim == 3:
        n_q = int(batch.depths().max()) if len(batch) else 0
        codes = np.concatenate([r.codes for r in results])
        if codes.shape[1] < n_q:  # as deep as the batch's deepest row, zeros below
            codes = np.concatenate([codes, np.zeros((codes.shape[0], n_q - codes.shape[1], codes.shape[2]),
                                                    codes.dtype)], axis=1)
    out = BatchResult(
        stream_ids=list(batch.stream_ids),
        outcome_codes=np.concatenate([r.outcome_codes for r in results]).astype(np.uint8, copy=False),
        epochs=np.asarray(batch.epochs, np.int64).copy(),
        queue_ms=np.concatenate([r.queue_ms for r in results]).astype(np.float32, copy=False),
        compute_ms=np.concatenate([r.compute_ms for r in results]).astype(np.float32, copy=False),
        codes=codes,
    )
    _merge_summary(out, results)
    return out


def _fallback_part(sub: FrameBatch, reason: FallbackReason, message: str) -> BatchResult:
    """The client's own verdict on a request's frames, counted where it is made."""
    metrics.record_frame_outcome(_op_name(sub), "fallback", reason.value, len(sub))
    return BatchResult.all_fallback(sub, reason, error=message)


def _op_name(batch: Any) -> str:
    return getattr(getattr(batch, "op", None), "value", "unknown")


class CodecClient:
    """Sends a bridge's frame batches to the codec replicas; one request per replica per tick.

    `handle` is a `DeploymentHandle` to the `CodecReplica` deployment. Construct it once per
    bridge process and reuse it: the handle's router keeps the replica set up to date.
    """

    def __init__(self, handle, *, response_grace_s: float = RESPONSE_GRACE_S) -> None:
        self._handle = handle
        self._grace = response_grace_s
        self._app = handle.app_name
        self._deployment = handle.deployment_name
        self.counters = ClientCounters()
        # CPU of this client's own work (validating, splitting by replica, merging; not the
        # Serve handle call, which is transport), for load tests' control-plane figures
        self.cpu = CpuMeter()
        self.transit = TransitEstimate()
        self._owner_uids: tuple[str, ...] = ()  # the replica set `_owner_ix` was computed for
        self._owner_ix: dict[str, int] = {}  # stream id -> its owner's place in that set
        # Any call makes the handle build its router, which then learns the replica set from
        # the controller; by the first tick the client can usually group streams by owner.
        try:
            self._warm_up = handle.options(method_name="ping").remote()
        except Exception as exc:  # noqa: BLE001 - warm-up only; process() copes without it
            logger.info("codec client warm-up call failed: %s", exc)

    async def ready(self, timeout_s: float = 60.0) -> bool:
        """Waits until the handle's router knows the replicas (so ticks group by owner)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                await asyncio.wait_for(
                    self._handle.options(method_name="ping").remote(), max(0.1, end - time.monotonic())
                )
            except Exception as exc:  # noqa: BLE001 - readiness is polled, not raised
                logger.debug("codec replicas not ready yet: %s", exc)
                await asyncio.sleep(0.2)
                continue
            view = local_view(self._app, self._deployment)
            if view is not None and view.replica_uids():
                return True
            await asyncio.sleep(0.05)
        return False

    def group_rows(self, stream_ids: list[str], owners: tuple[Any, np.ndarray] | None = None
                   ) -> list[tuple[str, Rows]]:
        """(routing key, rows) per owning replica: a range of rows each when the batch is
        ordered by owner (a bridge orders it, see `owner_index`), else index arrays. Without a
        router view yet (first tick of a fresh process), everything goes in one request keyed
        by its first stream. `owners`: (replica set, owner of each row) as the caller knows
        them; used while that is still the replica set."""
        n = len(stream_ids)
        if not n:
            return []
        if owners is not None and owners[0] == self.owners_version() and len(owners[1]) == n:
            owners = owners[1]
        else:
            owners = self.owner_index(stream_ids)
        if owners is None or (owners == owners[0]).all():
            return [(stream_ids[0], slice(0, n))]
        if (owners[1:] >= owners[:-1]).all():
            bounds = [0, *((owners[1:] != owners[:-1]).nonzero()[0] + 1).tolist(), n]
            return [(stream_ids[a], slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        order = owners.argsort(kind="stable")
        cuts = ((o := owners[order])[1:] != o[:-1]).nonzero()[0] + 1
        return [(stream_ids[int(rows[0])], rows) for rows in np.split(order, cuts)]

    def owners_version(self) -> tuple[str, ...] | None:
        """The replica set `owner_index` answers for: the router's replica ids, or None
        while it knows at most one (nothing to split)."""
        view = local_view(self._app, self._deployment)
        uids = tuple(view.replica_uids()) if view is not None else ()
        return uids if len(uids) > 1 else None

    def owner_index(self, stream_ids: list[str]) -> np.ndarray | None:
        """Each stream's owning replica, as its place in the router's replica set (streams
        whose owner is unknown share one more), or None while at most one replica is known.
        The router's answer is kept per stream until the replica set changes, so a tick costs
        one dictionary lookup per stream. A bridge orders each tick's batch by it, so each
        replica's frames go as one contiguous range of the batch."""
        view = local_view(self._app, self._deployment)
        uids = tuple(view.replica_uids()) if view is not None else ()
        if len(uids) <= 1:
            return None
        n = len(stream_ids)
        if uids != self._owner_uids or len(self._owner_ix) > 2 * n + 100_000:
            # a new replica set moves streams; entries of streams long gone are dropped too
            self._owner_uids, self._owner_ix = uids, {}
        cache = self._owner_ix
        out = np.fromiter(map(cache.get, stream_ids, repeat(-1)), np.int64, n)
        missing = (out < 0).nonzero()[0]
        if missing.size:
            place = {u: i for i, u in enumerate(uids)}
            owner = view.owner
            for i in missing.tolist():
                sid = stream_ids[i]
                out[i] = cache[sid] = place.get(owner(sid), len(uids))
        return out

    def owner(self, stream_id: str) -> str | None:
        """The replica (its unique id) this process routes the stream to now, or None while
        the router does not know the replicas yet. Reported to the fallback supervisor so
        it can tell a replica-wide stall from a stream's own failures."""
        return self.owners([stream_id]).get(stream_id)

    def owners(self, stream_ids: list[str]) -> dict[str, str]:
        """`owner` for many streams at once (one router lookup); unknown ones left out."""
        ix = self.owner_index(stream_ids)
        if ix is None:  # one replica (or none known yet)
            view = local_view(self._app, self._deployment)
            uids = view.replica_uids() if view is not None else []
            return dict.fromkeys(stream_ids, uids[0]) if len(uids) == 1 else {}
        uids = self._owner_uids
        return {sid: uids[k] for sid, k in zip(stream_ids, ix.tolist(), strict=True) if k < len(uids)}

    async def process(self, batch: FrameBatch, owners: tuple[Any, np.ndarray] | None = None) -> BatchResult:
        """One tick's batch -> one result, one request per owning replica. `owners`: (replica
        set, owner of each row) when the caller keeps them (see `group_rows`)."""
        with self.cpu:
            t0 = time.monotonic()
            try:
                # Everything but distinct stream ids, which each replica finds from its slot
                # table among the rows it is sent (a stream's rows all go to its one owner)
                # and answers as a malformed request: no set of thousands of ids per tick here.
                if not isinstance(batch, FrameBatch):
                    raise ValueError(f"expected a FrameBatch, got {type(batch).__name__}")
                batch.validate(distinct=True)
            except ValueError as exc:
                self.counters.malformed += 1
                res = malformed_result(batch, str(exc))
                metrics.record_frames(_op_name(batch), res.counts())
                return self._count(res)
            if len(batch) == 0:
                return self._count(BatchResult.all_fallback(batch, FallbackReason.ERROR))
            groups = self.group_rows(batch.stream_ids, owners)
            budgets = np.asarray(batch.budgets_ms, np.float64)
            longest = float(budgets.max())
            if longest != longest:  # a NaN (the replica's default budget) among them
                known = budgets[budgets == budgets]
                longest = float(known.max()) if known.size else 0.0
            longest_s = longest / 1000.0
            timeout = max(0.05, longest_s + self._grace)
            # What the budgets lose before they reach a replica: this client's own work since
            # the tick handed the batch over, and the way there.
            spent_ms = (time.monotonic() - t0) * 1000.0 + self.transit.one_way_ms
            if len(groups) == 1:  # one owner (or no view yet): the batch goes whole
                sends = [self._send(groups[0][0], replace(batch, budgets_ms=budgets - spent_ms), timeout)]
            else:
                subs = [(key, rows, _take(batch, rows, spent_ms)) for key, rows in groups]
                sends = [self._send(key, sub, timeout) for key, _, sub in subs]
        results = await asyncio.gather(*sends)
        with self.cpu:
            if len(groups) == 1:
                return self._count(results[0])
            return self._count(merge_results(
                batch, [(rows, res) for (_, rows, _), res in zip(subs, results, strict=True)]))

    async def _send(self, key: str, sub: FrameBatch, timeout: float) -> BatchResult:
        self.counters.requests += 1
        sent = time.monotonic()
        # the handle call itself is transport (Serve's own budget), not this client's work
        response = self._handle.options(method_name="process", session_id=key).remote(sub)
        try:
            res = await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()
            self.counters.timeouts += 1
            return _fallback_part(sub, FallbackReason.DEADLINE, "")
        except Exception as exc:  # noqa: BLE001 - the media path never sees an exception
            self.counters.transport_errors += 1
            reason = _transport_reason(exc)
            logger.warning("codec request for %d frames failed (%s): %s", len(sub), reason.value, type(exc).__name__)
            return _fallback_part(sub, reason, f"{type(exc).__name__}: {exc}"[:300])
        if not isinstance(res, BatchResult) or len(res) != len(sub) or res.stream_ids != sub.stream_ids:
            self.counters.transport_errors += 1
            return _fallback_part(sub, FallbackReason.ERROR, "replica answered a different batch")
        # Equal to the list sent, which the caller holds: its own objects compare by identity
        # from here on (the transport's copies compare string by string).
        res.stream_ids = sub.stream_ids
        self.transit.observe((time.monotonic() - sent) * 1000.0, float(res.held_ms))
        return res

    async def leave(self, stream_ids: list[str]) -> int:
        """Frees the streams' slots on their replicas; returns how many were freed."""
        freed = 0
        stream_ids = list(stream_ids)
        for key, rows in self.group_rows(stream_ids):
            ids = stream_ids[rows] if isinstance(rows, slice) else [stream_ids[i] for i in rows.tolist()]
            try:
                freed += int(await self._handle.options(method_name="leave", session_id=key).remote(ids))
            except Exception as exc:  # noqa: BLE001 - a dead replica has freed them already
                logger.info("leave for %d streams not delivered: %s", len(ids), type(exc).__name__)
        return freed

    def _count(self, res: BatchResult) -> BatchResult:
        for k, n in res.counts().items():
            self.counters.frames_by_outcome[k] += n
        return res


def _transport_reason(exc: BaseException) -> FallbackReason:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if isinstance(exc, (ActorDiedError, RayActorError, ActorUnavailableError)):
        # The replica and the streams' state on it are gone: the next frame starts an epoch.
        return FallbackReason.RESET
    return FallbackReason.ERROR


def malformed_result(batch: Any, message: str) -> BatchResult:
    """A batch whose rows cannot be trusted still gets one `fallback/error` per listed stream."""
    raw_ids = getattr(batch, "stream_ids", None)
    ids = [str(s) for s in raw_ids] if isinstance(raw_ids, list) else []
    b = len(ids)
    raw_epochs = getattr(batch, "epochs", None)
    ok = isinstance(raw_epochs, np.ndarray) and raw_epochs.shape == (b,)
    epochs = np.asarray(raw_epochs, np.int64) if ok else np.zeros(b, np.int64)
    return BatchResult(
        stream_ids=ids,
        outcome_codes=np.full(b, reason_code(FallbackReason.ERROR), np.uint8),
        epochs=epochs,
        queue_ms=np.zeros(b, np.float32),
        compute_ms=np.zeros(b, np.float32),
        errors={s: f"malformed batch: {message}" for s in ids},
    )
