"""The dashboard's feed from a bridge worker: once a second, one snapshot to `StatsBoard`.

`auralink simulate` publishes its generators' snapshots; a bridge serving real calls publishes
the same shape from its `MediaBridge`: live streams, frames and fallback reasons over the last
second, egress kbit/s by codec path (payload bytes actually sent), the hint limiter's health,
its users' AI state as the bridge applies it, and per stream the publisher's requested
bandwidth, the depth encoded, DTX and each AIC subscriber's layer (`MediaBridge.stream_stats`).

`kbps_all_native` is what the same frames would have cost as Opus at the bridge's configured
Opus bitrate (payload only), the baseline the dashboard's AI-vs-native graph compares with.

The board is any object with `publish(bridge_id, snapshot)` returning an awaitable or a Ray
object ref (the `StatsBoard` actor's `publish.remote`); a failed publish is logged at INFO
and counted, never raised: the dashboard must never stop a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from deployments.contract import FallbackReason, decode_reason
from models.constants import TICK_S
from sfu_bridge.core import DTX_CODE, N_CODES

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
MAX_USER_ROWS = 40
PUBLISH_TIMEOUT_S = 30.0


class StatsFeed:
    """Builds this bridge's snapshots (`snapshot`) and publishes one a second (`start`)."""

    def __init__(
        self,
        media: Any,
        bridge_id: str,
        publish: Callable[[str, dict[str, Any]], Any],
        *,
        every_s: float = PUBLISH_EVERY_S,
        compute: str = "real",
        opus_bitrate: int = 32_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.media = media
        self.bridge_id = bridge_id
        self._publish = publish
        self.every_s = every_s
        self.compute = compute
        self.opus_bitrate = opus_bitrate
        self._clock = clock
        self._last_t: float | None = None
        self._last_counts = np.zeros_like(media.core.counts)
        self._last_bytes: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self.published = 0
        self.failures = 0

    def snapshot(self) -> dict[str, Any]:
        """The counters since the previous snapshot, as `deployments.dashboard.aggregate` reads them."""
        media, core = self.media, self.media.core
        now = self._clock()
        span = max(1e-3, now - self._last_t) if self._last_t is not None else self.every_s
        self._last_t = now
        counts = core.counts.copy()
        sec, self._last_counts = counts - self._last_counts, counts
        sent = dict(media.bytes_by_kind)
        delta = {k: sent.get(k, 0) - self._last_bytes.get(k, 0) for k in sent}
        self._last_bytes = sent
        coded = sec[:N_CODES]  # DTX frames are answered by silence, neither AI nor fallback
        total, ai = int(coded.sum()), int(coded[0])
        opus_bps = float(self.opus_bitrate)
        return {
            "source": "bridge",
            "at": time.time(),
            "compute": self.compute,
            # streams published here: a cascaded stream counts once (on its owner) when the
            # dashboard sums bridges; those followed from another worker are apart
            "streams_live": sum(not p.relayed for p in media.publishers.values()),
            "streams_relayed": sum(p.relayed for p in media.publishers.values()),
            "replicas": _replicas(core.codec),
            "frames_last_s": total,
            "frames_dtx_last_s": int(sec[DTX_CODE]),
            "fallback_rate": (total - ai) / total if total else 0.0,
            "fallback_by_reason": {decode_reason(c).value: int(coded[c]) for c in range(1, N_CODES) if coded[c]},
            "kbps_ai": round(delta.get("aic", 0) * 8 / 1000 / span, 1),
            "kbps_native": round(delta.get("opus", 0) * 8 / 1000 / span, 1),
            "kbps_all_native": round(total * TICK_S * opus_bps / 1000 / span, 1),
            "limiter_health": _limiter_health(core.limiter),
            "users": self.user_rows(),
            "streams": media.stream_stats(),
        }

    def user_rows(self, limit: int = MAX_USER_ROWS) -> list[dict[str, Any]]:
        """The first live users (by id) plus every one whose AI is off, as the bridge applies it."""
        rows = []
        for stream_id in sorted(s for s, p in self.media.publishers.items() if not p.relayed):
            st = self.media.core.stream(stream_id)
            if st is None or st.user is None:
                continue
            if len(rows) >= limit and st.ai_off is None:
                continue
            rows.append({
                "user": st.user,
                "stream": stream_id,
                "live": True,
                "ai_enabled": st.ai_off is not FallbackReason.OPTED_OUT,
                "bridge_opted_out": st.ai_off is FallbackReason.OPTED_OUT,
                "bridge_state": st.ai_off.value if st.ai_off else "on",
                "kind": "publisher",
            })
        return rows

    async def publish_once(self) -> bool:
        try:
            ref = self._publish(self.bridge_id, self.snapshot())
            if asyncio.isfuture(ref) or asyncio.iscoroutine(ref) or hasattr(ref, "__await__"):
                # the board's first call may wait for the actor to start (seconds); the feed's
                # own loop waits, never a tick
                await asyncio.wait_for(ref, timeout=PUBLISH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the dashboard must never stop a call
            self.failures += 1
            logger.info("dashboard stats publish failed: %s: %s", type(exc).__name__, exc)
            return False
        self.published += 1
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.publish_once()


def _replicas(codec: Any) -> int:
    """Codec replicas this bridge's router knows (1: an in-process codec, or one replica)."""
    version = getattr(codec, "owners_version", None)
    uids = version() if callable(version) else None
    return len(uids) if uids else 1


def _limiter_health(limiter: Any) -> dict[str, Any] | None:
    health = getattr(limiter, "health", None)
    return health() if callable(health) else None


def ray_board_publisher() -> Callable[[str, dict[str, Any]], Any]:
    """`publish` for a bridge in the Ray cluster: the named `StatsBoard` actor (needs `ray.init`)."""
    from deployments.dashboard import get_or_create_board

    board = get_or_create_board()
    return lambda bridge_id, snapshot: board.publish.remote(bridge_id, snapshot)
