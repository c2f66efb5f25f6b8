"""`FallbackSupervisor`: the named Ray actor that decides, stream by stream, if AI is used.

A thin shell around `SupervisorPolicy` (supervisor_policy.py). Each bridge calls `report` about
once a second with ALL its streams' outcome counts in one call and gets back the streams whose
AI is off (and why). Operators and users opt out / in through the ingress.

Persistence: Ray's internal KV (the GCS key-value store). Opt-outs are written through on every
change, before the call returns; per-stream health is snapshotted every few seconds. When the
actor is restarted (`max_restarts`), it restores the snapshot and then the opt-out record,
so an opted-out user is never turned back on. Why the GCS KV and not Redis: the supervisor is
a Ray actor and the GCS is the one store every Ray cluster already has (and already makes
fault tolerant, backed by Redis in production via GCS FT); the hint limiter's Redis is an
optional, fail-open dependency of the media path, and opt-outs must not be lost when it is down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import ray

from deployments.config import SupervisorSettings
from deployments.supervisor_policy import SNAPSHOT_VERSION, SupervisorConfig, SupervisorPolicy
from telemetry import metrics

logger = logging.getLogger(__name__)

_OPTOUTS_KEY = b"opt_outs"
_SNAPSHOT_KEY = b"snapshot"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


class FallbackSupervisorCore:
    """The actor's logic with the KV store injected (`put(key, bytes)`, `get(key)`)."""

    def __init__(self, settings: SupervisorSettings, policy_config: SupervisorConfig | None,
                 put, get) -> None:
        self.settings = settings
        self._put, self._get = put, get
        self._last_snapshot = 0.0
        self.policy = self._restore(policy_config)

    def _restore(self, config: SupervisorConfig | None) -> SupervisorPolicy:
        snap: dict[str, Any] = {"version": SNAPSHOT_VERSION}
        raw = self._get(_SNAPSHOT_KEY)
        if raw:
            try:
                snap = json.loads(raw)
            except ValueError as exc:
                logger.error("supervisor snapshot unreadable, starting from opt-outs only: %s", exc)
        raw = self._get(_OPTOUTS_KEY)
        if raw:
            # The opt-out record is written through on every change: it is authoritative and
            # newer than any health snapshot.
            rec = json.loads(raw)
            snap["opted_out_users"] = rec.get("users", [])
            snap["opted_out_streams"] = rec.get("streams", [])
        try:
            policy = SupervisorPolicy.restore(snap, config)
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("supervisor health state dropped (%s); keeping opt-outs", exc)
            policy = SupervisorPolicy.restore(
                {"version": SNAPSHOT_VERSION,
                 "opted_out_users": snap.get("opted_out_users", []),
                 "opted_out_streams": snap.get("opted_out_streams", [])}, config)
        s = policy.snapshot()
        logger.info("supervisor restored: %d opted-out users, %d opted-out streams, %d streams",
                    len(s["opted_out_users"]), len(s["opted_out_streams"]), len(s["streams"]))
        return policy

    def _persist_opt_outs(self) -> None:
        snap = self.policy.snapshot()
        rec = {"users": snap["opted_out_users"], "streams": snap["opted_out_streams"]}
        self._put(_OPTOUTS_KEY, json.dumps(rec).encode())

    def _maybe_snapshot(self, now: float, force: bool = False) -> None:
        if force or now - self._last_snapshot >= self.settings.snapshot_interval_s:
            self._last_snapshot = now
            self._put(_SNAPSHOT_KEY, json.dumps(self.policy.snapshot()).encode())

    def report(self, reports: Mapping[str, Mapping[str, Any]], now: float | None = None) -> dict[str, str]:
        """`{stream_id: {"ai": n, "fallback": {reason: n}, "user_id": optional, "replica":
        optional}}` since the last report -> `{stream_id: reason}` for every reported stream
        whose AI is off. `replica` (the codec replica serving the stream) lets the policy
        tell a replica-wide stall from a stream's own failures."""
        now = time.time() if now is None else now
        off: dict[str, str] = {}
        before = {sid: self.policy.decision(sid, now) for sid in reports}
        excused = self.policy.counters["excused/deadline"]
        decisions = self.policy.report_many(reports, now)
        excused = self.policy.counters["excused/deadline"] - excused
        if excused:
            logger.info("shared stall: %d deadline misses excused (streams kept on AI)", excused)
        for sid, on in decisions.items():
            if on != before[sid]:
                metrics.record_supervisor_transition("on" if on else "off")
            if not on:
                reason = self.policy.reason(sid, now)
                off[sid] = reason.value if reason is not None else "unhealthy"
        self._maybe_snapshot(now)
        return off

    def opt_out(self, user_id: str | None = None, stream_id: str | None = None) -> None:
        self.policy.opt_out(user_id=user_id, stream_id=stream_id)
        self._persist_opt_outs()

    def opt_in(self, user_id: str | None = None, stream_id: str | None = None) -> None:
        self.policy.opt_in(user_id=user_id, stream_id=stream_id)
        self._persist_opt_outs()


@ray.remote(num_cpus=0)
class FallbackSupervisor:
    """Named actor; create it with `get_or_create_supervisor` so there is exactly one."""

    def __init__(self, settings: dict[str, Any] | None = None,
                 policy_config: dict[str, Any] | None = None) -> None:
        self.settings = SupervisorSettings(**(settings or {}))
        ns = self.settings.kv_namespace
        kv = _kv()

        def put(key: bytes, value: bytes) -> None:
            kv._internal_kv_put(key, value, overwrite=True, namespace=ns)

        def get(key: bytes) -> bytes | None:
            return kv._internal_kv_get(key, namespace=ns)

        cfg = SupervisorConfig(**policy_config) if policy_config else None
        self.core = FallbackSupervisorCore(self.settings, cfg, put, get)
        self.started_at = time.time()

    def report(self, reports: dict[str, dict[str, Any]], now: float | None = None) -> dict[str, str]:
        return self.core.report(reports, now)

    def register(self, stream_id: str, user_id: str | None) -> None:
        self.core.policy.register(stream_id, user_id)

    def quality_probe_failed(self, stream_id: str) -> None:
        self.core.policy.quality_probe_failed(stream_id, time.time())

    def opt_out(self, user_id: str | None = None, stream_id: str | None = None) -> None:
        self.core.opt_out(user_id=user_id, stream_id=stream_id)

    def opt_in(self, user_id: str | None = None, stream_id: str | None = None) -> None:
        self.core.opt_in(user_id=user_id, stream_id=stream_id)

    def forget(self, stream_ids: list[str]) -> None:
        for sid in stream_ids:
            self.core.policy.forget(sid)

    def decision(self, stream_id: str) -> bool:
        return self.core.policy.decision(stream_id, time.time())

    def stream_status(self, stream_id: str) -> dict[str, Any]:
        return self.core.policy.stream_status(stream_id, time.time())

    def streams_status(self, stream_ids: list[str]) -> dict[str, dict[str, Any]]:
        """`stream_status` of many streams in one call (the operator dashboard's users)."""
        now = time.time()
        return {sid: self.core.policy.stream_status(sid, now) for sid in stream_ids}

    def snapshot(self) -> dict[str, Any]:
        self.core._maybe_snapshot(time.time(), force=True)
        return self.core.policy.snapshot()

    def info(self) -> dict[str, Any]:
        snap = self.core.policy.snapshot()
        return {
            "started_at": self.started_at,
            "streams": len(snap["streams"]),
            "opted_out_users": len(snap["opted_out_users"]),
            "opted_out_streams": len(snap["opted_out_streams"]),
            "counters": snap["counters"],
            "replicas": self.core.policy.replica_status(time.time()),
            "settings": asdict(self.settings),
        }


def get_or_create_supervisor(settings: SupervisorSettings | None = None,
                             policy_config: dict[str, Any] | None = None):
    """The cluster's one supervisor: detached (outlives whoever created it), restarted by Ray
    if its process dies, and its calls retried across a restart."""
    s = settings or SupervisorSettings()
    return FallbackSupervisor.options(
        name=s.name,
        namespace=s.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=s.max_restarts,
        max_task_retries=3,
    ).remote(asdict(s), policy_config)


def get_supervisor(settings: SupervisorSettings | None = None):
    s = settings or SupervisorSettings()
    return ray.get_actor(s.name, namespace=s.namespace)
