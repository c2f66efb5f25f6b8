"""The bridge's supervisor link: per-second tallies go to the real supervisor logic, and its
verdicts switch streams' AI off (answered locally) and back on after the backoff."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

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


class StallingCodec:
    """The in-process codec behind a replica that can be stalled: while `stalled`, a call
    sleeps past the bridge's deadline, as a stopped replica process does."""

    def __init__(self, codec: InProcessCodec) -> None:
        self.codec = codec
        self.stalled = False

    async def process(self, batch):
        if self.stalled:
            await asyncio.sleep(0.05)
        return await self.codec.process(batch)


@pytest.mark.parametrize("names_replica", [True, False])
def test_a_shared_stall_keeps_streams_on_when_the_link_names_their_replica(streaming_codec, names_replica):
    """Four streams on one replica miss every frame for 1.2 s together. Reported with their
    replica, the supervisor sees a shared stall and keeps them on AI (the frames after it
    are `ai`); reported without, it cannot tell and switches each of them off."""
    clock = Clock()
    kv: dict[bytes, bytes] = {}
    core = FallbackSupervisorCore(SupervisorSettings(), SupervisorConfig(), kv.__setitem__, kv.get)

    async def exchange(reports):
        return core.report(reports, now=clock.t)

    codec = StallingCodec(InProcessCodec(streaming_codec))
    tb = TickBatcher(codec, deadline_ms=60_000.0)
    streams = ["a", "b", "c", "d"]
    link = SupervisorLink(tb, exchange, period_s=1.0, clock=clock,
                          replica_of=(lambda sid: "replica-1") if names_replica else None)

    async def run_ticks(n: int) -> list[dict[str, str]]:
        seen = []
        for _ in range(n):
            for sid in streams:
                tb.push(Chunk(sid, np.zeros(CHUNK_SAMPLES, np.float32), 0))
            report = await tb.tick()
            seen.append({f.chunk.stream_id: f.key for f in report.frames})
            link.observe(report)
            await asyncio.sleep(0)  # let a due exchange run, as the media loop would
            clock.t += 0.04
        return seen

    async def scenario():
        await run_ticks(30)
        codec.stalled, tb.deadline_ms = True, 20.0
        stall = await run_ticks(30)
        codec.stalled, tb.deadline_ms = False, 60_000.0
        after = await run_ticks(30)
        await link.close()
        return stall, after

    stall, after = asyncio.run(scenario())
    missed = sum(s.get(sid) == "fallback/deadline" for s in stall for sid in streams)
    unhealthy = sum(s.get(sid) == "fallback/unhealthy" for s in stall + after for sid in streams)
    if names_replica:
        assert missed == 4 * 30  # EDF's answer, frame by frame, and nothing more
        assert unhealthy == 0 and after[-1] == dict.fromkeys(streams, "ai")
        assert core.policy.counters["excused/deadline"] >= 4 * 25
    else:
        assert unhealthy >= 4 * 10  # each stream off for its 1 s back-off at least


@pytest.mark.parametrize("failure", ["errors", "stalled"])
def test_a_replica_failing_every_step_has_its_streams_switched_off_within_the_window(
    streaming_codec, failure
):
    """All four streams of one replica fail every step: with `error` (frames the model cannot
    compute), each is switched off within `window_s`; with `deadline` on every frame (a
    stopped replica), once reports have shown no AI answer for `replica_failure_s`: within
    that plus the one report interval that still held the last AI answers."""
    clock = Clock()
    kv: dict[bytes, bytes] = {}
    cfg = SupervisorConfig()
    core = FallbackSupervisorCore(SupervisorSettings(), cfg, kv.__setitem__, kv.get)

    async def exchange(reports):
        return core.report(reports, now=clock.t)

    codec = StallingCodec(InProcessCodec(streaming_codec))
    tb = TickBatcher(codec, deadline_ms=60_000.0)
    streams = ["a", "b", "c", "d"]
    link = SupervisorLink(tb, exchange, period_s=1.0, clock=clock, replica_of=lambda sid: "replica-1")
    first_off: dict[str, float] = {}

    async def run_ticks(n: int, failing: bool) -> None:
        for _ in range(n):
            for sid in streams:
                tb.push(Chunk(sid, np.zeros(CHUNK_SAMPLES, np.float32), 0))
                if failing and failure == "errors":
                    tb.streams[sid].backlog[-1].pcm24[:] = np.nan
            report = await tb.tick()
            for f in report.frames:
                if f.key == "fallback/unhealthy":
                    first_off.setdefault(f.chunk.stream_id, clock.t)
            link.observe(report)
            await asyncio.sleep(0)
            clock.t += 0.04

    async def scenario() -> float:
        await run_ticks(30, failing=False)
        start = clock.t
        if failure == "stalled":
            codec.stalled, tb.deadline_ms = True, 20.0
        await run_ticks(int(3.2 / 0.04), failing=True)
        await link.close()
        return start

    start = asyncio.run(scenario())
    assert set(first_off) == set(streams)
    window = cfg.window_s if failure == "errors" else cfg.replica_failure_s + link.period_s
    assert max(first_off.values()) - start <= window + 0.1  # + the tick that applies it
