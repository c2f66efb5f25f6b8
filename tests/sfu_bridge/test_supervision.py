"""The bridge's supervisor link: per-second tallies go to the real supervisor logic, and its
verdicts switch streams' AI off (answered locally) and back on after the backoff."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.config import SupervisorSettings
from deployments.contract import CHUNK_SAMPLES
from deployments.supervisor import FallbackSupervisorCore
from deployments.supervisor_policy import SupervisorConfig
from sfu_bridge.supervision import SupervisorLink
from sfu_bridge.tick import Chunk, InProcessCodec, TickBatcher


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_supervisor_link_turns_a_failing_stream_off_and_back_on(streaming_codec):
    clock = Clock()
    kv: dict[bytes, bytes] = {}
    core = FallbackSupervisorCore(SupervisorSettings(), SupervisorConfig(), kv.__setitem__, kv.get)

    async def exchange(reports):
        return core.report(reports, now=clock.t)

    tb = TickBatcher(InProcessCodec(streaming_codec), deadline_ms=60_000.0)
    link = SupervisorLink(tb, exchange, period_s=1.0, users={"bad": "u1", "good": "u2"},
                          clock=clock)
    for sid in ("bad", "good"):
        tb.join(sid)

    async def run_ticks(n: int, fail_bad: bool) -> list[dict[str, str]]:
        seen = []
        for _ in range(n):
            for sid in ("bad", "good"):
                tb.push(Chunk(sid, np.zeros(CHUNK_SAMPLES, np.float32), 0))
            if fail_bad:
                # the real failure path: a frame that cannot be computed (NaN) is `error`
                tb.streams["bad"].backlog[-1].pcm24[:] = np.nan
            report = await tb.tick()
            seen.append({f.chunk.stream_id: f.key for f in report.frames})
            link.observe(report)
            clock.t += 0.04
        await link.close()
        return seen

    async def scenario():
        await run_ticks(30, fail_bad=True)  # > 1 s of errors on "bad"
        after = await run_ticks(30, fail_bad=False)
        return after

    after = asyncio.run(scenario())
    assert link.exchanges >= 1 and link.failures == 0
    assert all(s["good"] == "ai" for s in after)
    assert any(s["bad"] == "fallback/unhealthy" for s in after)

    # After the backoff the supervisor lets the stream retry, and healthy frames keep it on.
    clock.t += 60.0
    later = asyncio.run(run_ticks(60, fail_bad=False))
    assert later[-1] == {"bad": "ai", "good": "ai"}


def test_a_failing_exchange_keeps_media_flowing(streaming_codec):
    async def broken(reports):
        raise ConnectionError("supervisor restarting")

    clock = Clock()
    tb = TickBatcher(InProcessCodec(streaming_codec), deadline_ms=60_000.0)
    link = SupervisorLink(tb, broken, period_s=0.0, clock=clock)
    tb.join("s")

    async def scenario():
        for _ in range(3):
            tb.push(Chunk("s", np.zeros(CHUNK_SAMPLES, np.float32), 0))
            link.observe(await tb.tick())
            await asyncio.sleep(0)
        await link.close()

    asyncio.run(scenario())
    assert link.failures >= 1 and tb.counters["ai"] == 3
