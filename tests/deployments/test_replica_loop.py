"""The replica's step loop without Serve (emulated compute, no model): it sleeps when there is
nothing to run, waits out the scheduler's holds instead of polling, and teaches the latency
model the cost of the frames it computed."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from deployments.config import ReplicaSettings
from deployments.contract import CHUNK_SAMPLES, FallbackReason, FrameBatch, Op
from deployments.epochs import BridgeEpochs
from deployments.replica import CodecReplicaCore


def emulated(**kw) -> CodecReplicaCore:
    settings = ReplicaSettings(**{"capacity": 4, "compute": "emulated", "max_batch": 8,
                                  "latency_profile": {1: 5.0, 2: 6.0, 8: 10.0},
                                  "latency_profile_device": "test profile", **kw})
    return CodecReplicaCore(settings, "loop-test")


def pcm(n: int) -> np.ndarray:
    return np.zeros((n, CHUNK_SAMPLES), np.float32)


class Frames:
    """Batches numbered as a bridge numbers them (deployments/epochs.py)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.epochs = BridgeEpochs(16)

    def batch(self, bridge: str, ids: list[str], budget_ms: float) -> FrameBatch:
        rows = np.array([self.rows.setdefault(s, len(self.rows)) for s in ids])
        epochs, seqs = self.epochs.number(rows)
        return FrameBatch(Op.ENCODE, bridge, list(ids), epochs, seqs,
                          np.full(len(ids), float(budget_ms)), pcm=pcm(len(ids)))


def test_an_idle_replica_uses_no_cpu():
    # 10 s with streams in their slots and no frame: the step loop must sleep, not poll.
    # CPU time of the event loop's thread (where the loop runs), not wall time, so a busy
    # machine does not move the figure.
    async def go():
        core = emulated()
        tr = Frames()
        res = await core.process(tr.batch("b", ["a", "b"], 500.0))
        assert res.counts() == {"ai": 2}
        cpu0, wall0 = time.thread_time(), time.monotonic()
        await asyncio.sleep(10.0)
        cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
        await core.stop()
        return cpu, wall

    cpu, wall = asyncio.run(go())
    assert wall >= 10.0
    assert cpu / wall < 0.02, f"idle replica used {cpu / wall:.1%} of a core"


def test_the_loop_waits_out_a_hold_instead_of_polling():
    # Steps of 100 ms (two frames: 101 ms), 150 ms budgets, stream b's chunk 30 ms after a's,
    # one chunk per stream every 200 ms. Run alone, a makes b miss (b waits 70 ms, then 100);
    # held 30 ms, both finish at 131 ms. Each tick the scheduler holds a until b arrives: the
    # loop must then sleep until b (or hold_until), i.e. about one hold decision per tick, not
    # one per millisecond.
    async def go():
        core = emulated(latency_profile={1: 100.0, 2: 101.0, 8: 110.0}, frame_period_ms=200.0,
                        max_hold_ms=100.0, margin_ms=1.0)
        tr = Frames()
        ticks = 4
        for _ in range(ticks):
            start = time.monotonic()
            a = asyncio.ensure_future(core.process(tr.batch("b1", ["a"], 150.0)))
            await asyncio.sleep(0.030)
            b = asyncio.ensure_future(core.process(tr.batch("b2", ["b"], 150.0)))
            await asyncio.gather(a, b)
            await asyncio.sleep(max(0.0, 0.200 - (time.monotonic() - start)))
        counters = core.scheduler.snapshot_counters()
        await core.stop()
        return counters, ticks

    counters, ticks = asyncio.run(go())
    assert counters.get("holds", 0) >= 1  # the scheduler did hold
    assert counters["holds"] <= 2 * ticks, counters  # ... and the loop did not poll through it


def test_the_latency_model_learns_only_from_frames_computed():
    # Two streams queued for one step; one leaves before the step runs, so its frame is
    # answered `reset` without compute. The step computed one frame: the model must record
    # a step of 1, not of 2.
    async def go():
        core = emulated()
        tr = Frames()
        first = await core.process(tr.batch("b", ["a", "b"], 500.0))
        assert first.counts() == {"ai": 2}
        before = dict(core.latency.to_dict()["samples"])
        async with core._step_lock:  # the loop cannot plan until both frames are queued
            task = asyncio.ensure_future(
                core.process(tr.batch("b", ["a", "b"], 500.0)))
            while len(core.scheduler) < 2:
                await asyncio.sleep(0.001)
            assert await core.leave(["b"]) == 1
        res = await task
        after = dict(core.latency.to_dict()["samples"])
        await core.stop()
        return res, before, after

    res, before, after = asyncio.run(go())
    assert res.outcome(0)[1] is None and res.outcome(1)[1] is FallbackReason.RESET
    assert after["1"] == before["1"] + 1  # one step of one frame
    assert after["2"] == before["2"]  # nothing learned about steps of two
