"""The bridge's link to the fallback supervisor.

Each tick's outcomes are tallied per stream; once per `period_s` the tallies go to the
supervisor in ONE call (`exchange`), whose answer - `{stream: "opted_out" | "unhealthy"}` for
every stream with AI off - is applied to the tick batcher, which then answers those streams'
frames locally. Each stream's tally names the codec replica it is routed to when the codec
client knows it (`replica_of`), so the supervisor can tell misses a replica's streams share
(a stall: kept on AI) from a stream's own. The exchange runs in the background: a slow or
restarting supervisor delays decisions, never a tick, and a failed exchange keeps the last
decisions (counted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from deployments.contract import Outcome
from sfu_bridge.tick import TickBatcher, TickReport

logger = logging.getLogger(__name__)

Exchange = Callable[[dict[str, dict[str, Any]]], Awaitable[Mapping[str, str]]]
# user ids -> {user: {"max_kbps": float | None, "dtx": bool}} for users with a policy
PolicyFetch = Callable[[list[str]], Awaitable[Mapping[str, Mapping[str, Any]]]]


class SupervisorLink:
    def __init__(
        self,
        batcher: TickBatcher,
        exchange: Exchange,
        *,
        period_s: float = 1.0,
        users: Mapping[str, str] | None = None,
        replica_of: Callable[[str], str | None] | None = None,
        policies: PolicyFetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.batcher = batcher
        self.exchange = exchange
        self.period_s = period_s
        self.users = users if users is not None else {}  # stream id -> user id, for opt-outs
        self.replica_of = replica_of  # stream id -> the codec replica it is routed to
        self.policies = policies  # the operator's per-user caps and DTX switches
        self.clock = clock
        self._ai: dict[str, int] = defaultdict(int)
        self._fallback: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._last = clock()
        self._inflight: asyncio.Task | None = None
        self.exchanges = 0
        self.failures = 0

    def observe(self, report: TickReport) -> None:
        """Tally a tick; starts a background exchange when one is due and none is running."""
        for fo in report.frames:
            sid = fo.chunk.stream_id
            if fo.outcome is Outcome.AI:
                self._ai[sid] += 1
            elif fo.reason is not None:  # DTX frames say nothing about the AI path's health
                self._fallback[sid][fo.reason.value] += 1
        if self.clock() - self._last >= self.period_s and (
            self._inflight is None or self._inflight.done()
        ):
            self._inflight = asyncio.ensure_future(self.flush())

    def _take(self) -> dict[str, dict[str, Any]]:
        reports: dict[str, dict[str, Any]] = {}
        for sid in set(self._ai) | set(self._fallback):
            rep: dict[str, Any] = {
                "ai": self._ai.get(sid, 0),
                "fallback": dict(self._fallback.get(sid, {})),
            }
            if sid in self.users:
                rep["user_id"] = self.users[sid]
            if self.replica_of is not None and (replica := self.replica_of(sid)):
                rep["replica"] = replica
            reports[sid] = rep
        self._ai.clear()
        self._fallback.clear()
        self._last = self.clock()
        return reports

    async def flush(self) -> None:
        reports = self._take()
        await self._refresh_policies()
        if not reports:
            return
        try:
            off = await self.exchange(reports)
        except Exception as exc:  # noqa: BLE001 - any supervisor failure keeps media flowing
            self.failures += 1
            logger.warning("supervisor exchange failed (%s); keeping the last decisions", exc)
            return
        self.exchanges += 1
        self.batcher.apply_decisions(off)

    async def _refresh_policies(self) -> None:
        """Every stream's user policy, on the exchange's period (a silent stream in DTX
        reports nothing, but its policy still applies)."""
        if self.policies is None or not self.users:
            return
        users = dict(self.users)
        try:
            by_user = await self.policies(sorted(set(users.values())))
        except Exception as exc:  # noqa: BLE001 - keep the last policies, like decisions
            self.failures += 1
            logger.warning("operator policy fetch failed (%s); keeping the last policies", exc)
            return
        self.batcher.apply_policies({sid: by_user[u] for sid, u in users.items() if u in by_user})

    async def close(self) -> None:
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)


def ray_exchange(supervisor: Any) -> Exchange:
    """`exchange` over the `FallbackSupervisor` actor (deployments.supervisor)."""

    async def _call(reports: dict[str, dict[str, Any]]) -> Mapping[str, str]:
        return await supervisor.report.remote(reports)

    return _call


def ray_policies(supervisor: Any) -> PolicyFetch:
    """`policies` over the `FallbackSupervisor` actor."""

    async def _call(user_ids: list[str]) -> Mapping[str, Mapping[str, Any]]:
        return await supervisor.user_policies.remote(user_ids)

    return _call
