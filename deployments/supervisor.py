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
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import ray

from deployments.config import SupervisorSettings
from deployments.cpu_meter import CpuMeter
from deployments.supervisor_policy import (
    SNAPSHOT_VERSION,
    StreamReports,
    SupervisorConfig,
    SupervisorPolicy,
)
from deployments.user_policy import UserPolicies, UserPolicy
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
        self.user_policies = self._restore_user_policies()
        # CPU of the supervisor's own work (judging reports, snapshots, forgetting), for load
        # tests' control-plane figures; Ray's transport and runtime are not in it
        self.cpu = CpuMeter()

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

    def _restore_user_policies(self) -> UserPolicies:
        raw = self._get(_OPTOUTS_KEY)
        try:
            return UserPolicies.from_dict(json.loads(raw).get("policies", {}) if raw else {})
        except (ValueError, TypeError, AttributeError) as exc:
            logger.error("operator policies unreadable, starting without caps: %s", exc)
            return UserPolicies()

    def _persist_opt_outs(self) -> None:
        snap = self.policy.snapshot()
        rec = {"users": snap["opted_out_users"], "streams": snap["opted_out_streams"],
               "policies": self.user_policies.to_dict()}
        self._put(_OPTOUTS_KEY, json.dumps(rec).encode())

    def set_user_policy(self, user_id: str, max_kbps: float | None, dtx: bool) -> None:
        """An operator's cap and DTX switch for a user, written through like an opt-out."""
        self.user_policies.set(user_id, UserPolicy(max_kbps=max_kbps, dtx=dtx))
        self._persist_opt_outs()

    def _maybe_snapshot(self, now: float, force: bool = False) -> None:
        if force or now - self._last_snapshot >= self.settings.snapshot_interval_s:
            self._last_snapshot = now
            self._put(_SNAPSHOT_KEY, self.policy.snapshot_json())

    def report(self, reports: StreamReports | Mapping[str, Mapping[str, Any]],
               now: float | None = None) -> dict[str, str]:
        """A bridge's outcome counts since its last report, in columns (`StreamReports`, what
        bridges send) or as `{stream_id: {"ai": n, "fallback": {reason: n}, "user_id":
        optional, "replica": optional}}` -> `{stream_id: reason}` for every reported stream
        whose AI is off. `replica` (the codec replica serving the stream) lets the policy
        tell a replica-wide stall from a stream's own failures. A malformed report is a
        ValueError, and changes nothing."""
        with self.cpu:
            batch = reports if isinstance(reports, StreamReports) else StreamReports.from_mapping(reports)
            batch.validate()
            return self._report(batch, time.time() if now is None else now)

    def _report(self, batch: StreamReports, now: float) -> dict[str, str]:
        policy = self.policy
        # Streams already off (or opted out) before this report: nearly always a few, so the
        # transitions are counted from them and the verdicts, not from a decision per stream.
        was_off = set(policy.off_streams(batch.stream_ids, now))
        excused = policy.counters["excused/deadline"]
        reasons = policy.report_columns(batch, now)
        excused = policy.counters["excused/deadline"] - excused
        if excused:
            logger.info("shared stall: %d deadline misses excused (streams kept on AI)", excused)
        metrics.record_supervisor_transition("off", sum(1 for sid in reasons if sid not in was_off))
        metrics.record_supervisor_transition("on", sum(1 for sid in was_off if sid not in reasons))
        self._maybe_snapshot(now)
        return {sid: r.value for sid, r in reasons.items()}

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

    def report(self, reports: StreamReports | dict[str, dict[str, Any]],
               now: float | None = None) -> dict[str, str]:
        return self.core.report(reports, now)

    def register(self, stream_id: str, user_id: str | None) -> None:
        self.core.policy.register(stream_id, user_id)

    def quality_probe_failed(self, stream_id: str) -> None:
        self.core.policy.quality_probe_failed(stream_id, time.time())

    def opt_out(self, user_id: str | None = None, stream_id: str | None = None) -> None:
        self.core.opt_out(user_id=user_id, stream_id=stream_id)

    def opt_in(self, user_id: str | None = None, stream_id: str | None = None) -> None:
        self.core.opt_in(user_id=user_id, stream_id=stream_id)

    def set_user_policy(self, user_id: str, max_kbps: float | None = None, dtx: bool = True) -> None:
        self.core.set_user_policy(user_id, max_kbps, dtx)

    def user_policy(self, user_id: str) -> dict[str, Any]:
        return asdict(self.core.user_policies.get(user_id))

    def user_policies(self, user_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The non-default policies of these users (a bridge asks for its publishers')."""
        return self.core.user_policies.for_users(user_ids)

    def forget(self, stream_ids: list[str]) -> None:
        with self.core.cpu:
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
            "cpu_s": round(self.core.cpu.seconds, 6),  # its own work (see FallbackSupervisorCore)
            "process_cpu_s": round(sum(os.times()[:2]), 3),
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
