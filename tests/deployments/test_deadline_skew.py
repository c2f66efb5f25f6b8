"""Deadlines survive clock skew.

A bridge and a codec replica run on different hosts whose clocks differ. Each frame's deadline
travels as a relative budget (ms left when the batch is sent) and the replica stamps it on its
own clock on arrival, so a bridge clock 50 ms off in either direction changes nothing: frames
the replica has time for are computed (no spurious `deadline`), and frames it has no time for
are refused before any compute (none is computed after its real deadline, which would also
advance the stream's state on a frame the bridge has already sent as Opus). The scheduler's
one deliberate exception, a probe frame run against its model's advice when nothing has run
for a while (deployments/scheduler.py), is counted and still answered `deadline`.

The bridge is the real `BridgeCore` with a skewed injected clock; the replica is the real
`CodecReplicaCore` in emulated compute (each step costs the profile's time), called in-process.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deployments.client import TransitEstimate, _take
from deployments.config import ReplicaSettings
from deployments.contract import (
    CHUNK_SAMPLES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    Outcome,
)
from deployments.replica import CodecReplicaCore
from sfu_bridge.core import BridgeCore

DEADLINE_MS = 20.0
SKEW_S = 0.050
STREAMS = 4
TICKS = 5


def _core(step_ms: float, **kw) -> CodecReplicaCore:
    # No holding for expected arrivals: each tick's batch runs (or is refused) as it comes.
    settings = ReplicaSettings(
        compute="emulated", capacity=16, max_batch=16, margin_ms=1.0, max_bandwidth_kbps=6.0,
        latency_profile={1: step_ms, 16: step_ms}, latency_profile_device="test: fixed step",
        max_hold_ms=0.0,
    )
    return CodecReplicaCore(settings, "skew-test", **kw)


class ReplicaLink:
    """The bridge's codec client here: hands each batch to the replica in-process and keeps
    the replica's own answer, even one that arrives after the bridge stopped waiting."""

    def __init__(self, core: CodecReplicaCore, spend_ms: dict[int, float] | None = None) -> None:
        self.core = core
        self.spend_ms = spend_ms or {}  # row -> budget already used up before the send
        self.answers: list[BatchResult] = []
        self.sent = 0

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.sent += 1
        for row, ms in self.spend_ms.items():
            batch.budgets_ms[row] = ms
        task = asyncio.ensure_future(self.core.process(batch))
        task.add_done_callback(lambda t: self.answers.append(t.result()))
        return await asyncio.shield(task)


def _frames(bridge: BridgeCore) -> dict[str, int]:
    """The bridge's frames by outcome key ('ai', 'fallback/<reason>')."""
    return bridge.stats()["frames"]


async def _run(core: CodecReplicaCore, bridge_skew_s: float) -> tuple[BridgeCore, ReplicaLink, int]:
    """Ticks the bridge; returns it, the replica's answers and how many probes it ran."""
    link = ReplicaLink(core)
    bridge = BridgeCore(link, bridge_id="skewed", deadline_ms=DEADLINE_MS,
                        clock=lambda: time.time() + bridge_skew_s)
    ids = [f"s{i}" for i in range(STREAMS)]
    for sid in ids:
        bridge.join(sid)
    loop = asyncio.get_running_loop()
    for k in range(TICKS):
        for sid in ids:
            bridge.push(sid, np.zeros(CHUNK_SAMPLES, np.float32))
        t0 = loop.time()
        await bridge.tick()
        if k < TICKS - 1:  # one tick per 40 ms, as the bridge runs
            await asyncio.sleep(max(0.0, 0.040 - (loop.time() - t0)))
    for _ in range(200):  # late answers (after the bridge's timeout) still come back
        if len(link.answers) == link.sent:
            break
        await asyncio.sleep(0.01)
    probes = core.scheduler.snapshot_counters().get("probes", 0)
    await core.stop()
    assert len(link.answers) == link.sent == TICKS
    return bridge, link, probes


def _computed(answers: list[BatchResult]) -> int:
    return sum(int((r.compute_ms > 0).sum()) for r in answers)


def _spurious_misses(answers: list[BatchResult], step_ms: float) -> list[str]:
    """`deadline` verdicts the frame's real budget does not justify. The replica refuses a
    frame once its deadline is within a step and the margin (1 ms), so a justified verdict has
    spent at least budget - step - margin (less 1 ms of rounding) in the replica. This machine
    is shared: a step may stall for tens of ms, which justifies its verdict; a spurious one
    is a frame refused with its budget untouched."""
    out = []
    for r in answers:
        spent = r.queue_ms.astype(np.float64) + r.compute_ms
        for i in range(len(r)):
            if r.outcome(i)[1] is FallbackReason.DEADLINE and spent[i] < DEADLINE_MS - step_ms - 2.0:
                out.append(f"{r.stream_ids[i]}: deadline after {spent[i]:.1f} ms of {DEADLINE_MS} ms")
    return out


def _late_ai(answers: list[BatchResult]) -> list[str]:
    """`ai` verdicts for frames that finished after their real deadline."""
    out = []
    for r in answers:
        spent = r.queue_ms.astype(np.float64) + r.compute_ms
        for i in range(len(r)):
            if r.outcome(i)[0] is Outcome.AI and spent[i] > DEADLINE_MS + 0.5:
                out.append(f"{r.stream_ids[i]}: ai after {spent[i]:.1f} ms of {DEADLINE_MS} ms")
    return out


def _check_time_to_spare(bridge: BridgeCore, answers: list[BatchResult], step_ms: float) -> None:
    """Every verdict is right; and, stalls of this shared machine aside, the frames are `ai`."""
    assert _spurious_misses(answers, step_ms) == []
    assert _late_ai(answers) == []
    frames = _frames(bridge)
    assert set(frames) <= {"ai", "fallback/deadline"}
    assert sum(frames.values()) == STREAMS * TICKS
    assert frames.get("ai", 0) >= STREAMS * TICKS // 2, frames


@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S])
def test_frames_with_time_to_spare_are_computed_whatever_the_bridge_clock(skew_s):
    """A 2 ms step fits a 20 ms budget: frames are `ai` and never refused with time left,
    however the bridge's clock is set."""
    bridge, link, _ = asyncio.run(_run(_core(step_ms=2.0), skew_s))
    _check_time_to_spare(bridge, link.answers, step_ms=2.0)


@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S])
def test_frames_without_time_are_refused_not_computed_late(skew_s):
    """A 30 ms step cannot meet a 20 ms budget: the replica answers `deadline` before any
    compute (but for the scheduler's probes), whatever the bridge's clock says."""
    bridge, link, probes = asyncio.run(_run(_core(step_ms=30.0), skew_s))
    assert _frames(bridge) == {"fallback/deadline": STREAMS * TICKS}
    for res in link.answers:
        assert res.counts() == {"fallback/deadline": STREAMS}  # the replica's own verdict
    assert _computed(link.answers) == probes <= 1  # refused, not computed


@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S, 3600.0])
def test_the_replica_judges_on_its_own_clock(skew_s):
    """The replica's clock may be anywhere (another host, its own epoch): the budget is
    stamped on it at arrival, so only durations matter."""
    clock = lambda: time.monotonic() + skew_s  # noqa: E731 - a skewed host clock
    bridge, link, _ = asyncio.run(_run(_core(step_ms=2.0, clock=clock), 0.0))
    _check_time_to_spare(bridge, link.answers, step_ms=2.0)
    bridge, link, probes = asyncio.run(_run(_core(step_ms=30.0, clock=clock), 0.0))
    assert _frames(bridge) == {"fallback/deadline": STREAMS * TICKS}
    assert all(r.counts() == {"fallback/deadline": STREAMS} for r in link.answers)
    assert _computed(link.answers) == probes <= 1


def test_a_budget_already_spent_on_arrival_is_a_deadline_fallback():
    core = _core(step_ms=1.0)

    async def go() -> BatchResult:
        link = ReplicaLink(core, spend_ms={0: -1.0})  # the sender had already used it up
        bridge = BridgeCore(link, deadline_ms=DEADLINE_MS)
        for sid in ("late", "fine"):
            bridge.join(sid)
            bridge.push(sid, np.zeros(CHUNK_SAMPLES, np.float32))
        await bridge.tick()
        await core.stop()
        assert link.answers[0].stream_ids == ["late", "fine"]
        return link.answers[0]

    res = asyncio.run(go())
    assert res.outcome(0)[1] is FallbackReason.DEADLINE
    assert res.counts() == {"ai": 1, "fallback/deadline": 1}


def test_transit_is_measured_from_durations_on_each_side_only():
    """Round trip on the bridge's clock less the time the replica held the request on its
    own: an offset between the clocks never enters."""
    t = TransitEstimate()
    assert t.one_way_ms == 0.0
    t.observe(round_trip_ms=10.0, held_ms=6.0)
    assert t.one_way_ms == pytest.approx(2.0)
    t.observe(round_trip_ms=12.0, held_ms=6.0)
    t.observe(round_trip_ms=40.0, held_ms=6.0)  # one slow reply moves the median little
    assert t.one_way_ms == pytest.approx(3.0)
    t.observe(round_trip_ms=5.0, held_ms=0.0)  # no held time: nothing learned
    t.observe(round_trip_ms=3.0, held_ms=6.0)  # impossible: ignored
    assert t.one_way_ms == pytest.approx(3.0)


def test_the_client_sends_each_replica_the_budget_left():
    batch = FrameBatch(Op.ENCODE, "b", ["a", "b", "c"], np.array([1, 1, 1]), np.array([0, 0, 0]),
                       np.array([20.0, 15.0, np.nan]), pcm=np.zeros((3, CHUNK_SAMPLES), np.float32))
    sub = _take(batch, np.array([2, 0]), spent_ms=3.5)
    assert sub.stream_ids == ["c", "a"]
    assert np.isnan(sub.budgets_ms[0]) and sub.budgets_ms[1] == pytest.approx(16.5)
    assert batch.budgets_ms.tolist()[:2] == [20.0, 15.0]  # the tick's batch is untouched
    with pytest.raises(ValueError, match="budgets_ms must be finite"):
        FrameBatch(Op.ENCODE, "b", ["a"], np.array([1]), np.array([0]), np.array([np.inf]),
                   pcm=np.zeros((1, CHUNK_SAMPLES), np.float32)).validate()
