"""sfu_bridge._tick (the bridge core's per-tick loops in C) against their numpy versions:
two bridge cores, one on each, fed the same joins, leaves, pushes (some beyond the backlog,
some past the ring so it spills) and ticks give the same reports (batches ordered by owning
replica), tallies and queues. Integers only:
equal means equal."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import ComputeMode, ReplicaSettings
from deployments.replica import CodecReplicaCore
from sfu_bridge import core as core_module
from sfu_bridge.core import BridgeCore

pytestmark = pytest.mark.skipif(core_module._c_ring_push is None, reason="sfu_bridge._tick is not built")


class ThreeReplicas:
    """An emulated replica that says which of three replicas owns each stream, as the Serve
    codec client does: the bridge core orders each tick's batch by owner."""

    def __init__(self) -> None:
        self.replica = CodecReplicaCore(ReplicaSettings(compute=ComputeMode.EMULATED, capacity=256,
                                                        max_batch=256, latency_profile={1: 0.5, 256: 1.0}),
                                        "tick-test")

    def owners_version(self) -> tuple[str, ...]:
        return ("r0", "r1", "r2")

    def owner_index(self, stream_ids: list[str]) -> np.ndarray:
        return np.array([sum(map(ord, s)) % 3 for s in stream_ids], np.int64)

    async def process(self, batch, owners=None):
        return await self.replica.process(batch)

    async def leave(self, ids):
        return await self.replica.leave(ids)


def _bridge(native: bool) -> BridgeCore:
    bridge = BridgeCore(ThreeReplicas(), deadline_ms=5_000, audio=False, max_backlog=2)
    bridge.native_loops = native
    return bridge


def _queues(b: BridgeCore) -> tuple:
    n = b._top
    return b.q_n[:n].tolist(), b.q_head[:n].tolist(), b.q_ts[:n].tolist()


@pytest.mark.parametrize("seed", range(3))
def test_the_chunk_queue_in_c_matches_numpy(seed: int) -> None:
    async def main() -> None:
        rng = np.random.default_rng(seed)
        c, py = _bridge(True), _bridge(False)
        live = [f"s{i}" for i in range(120)]
        for sid in live:
            c.join(sid)
            py.join(sid)
        spills = 0
        for tick in range(30):
            if tick % 4 == 1:  # churn: rows freed and reused
                for sid in rng.choice(live, size=6, replace=False).tolist():
                    live.remove(sid)
                    c.leave(sid)
                    py.leave(sid)
                for k in range(5):
                    sid = f"n{tick}-{k}"
                    live.append(sid)
                    c.join(sid)
                    py.join(sid)
            rows_c = np.array([c._row_of[s] for s in live])
            assert rows_c.tolist() == [py._row_of[s] for s in live]
            for _ in range(int(rng.integers(1, 4))):  # pushes between ticks: 1 to 3 per row
                pick = rows_c[rng.random(rows_c.size) < 0.8]
                ts = rng.integers(0, 2**32, size=pick.size)
                full = int((c.q_n[pick] >= c._depth).sum())
                spills += full
                c.push_rows(pick, rtp_ts=ts)
                py.push_rows(pick, rtp_ts=ts)
                assert _queues(c) == _queues(py)
            rc, rp = await c.tick(), await py.tick()
            assert rc.stream_ids == rp.stream_ids
            for name in ("rows", "codes", "rtp_ts", "epochs", "epoch_seqs"):
                assert getattr(rc, name).tolist() == getattr(rp, name).tolist(), name
            assert _queues(c) == _queues(py)
        assert spills > 0 and c.counts.tolist() == py.counts.tolist()
        assert c.tally.tolist() == py.tally.tolist() and int(c.tally.sum()) > 0
        assert int(c.counts.sum()) > 3000
        await c.close()
        await py.close()

    asyncio.run(main())


def test_a_ticks_hints_are_grouped_by_stream_in_c_as_in_numpy() -> None:
    """core._ranks (a tick's hints by stream: distinct rows, each hint's group, the groups'
    sizes, each hint's place in its group in arrival order), C and numpy, on floods and
    single hints alike."""
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 7, 64, 333, 1000):
        for spread in (1, 5, 50, 10_000):
            rows = rng.integers(0, spread, size=n)
            got, want = core_module._ranks(rows, native=True), core_module._ranks(rows, native=False)
            for g, w, name in zip(got, want, ("uniq", "inv", "counts", "rank"), strict=True):
                assert g.dtype == w.dtype == np.int64 and g.tolist() == w.tolist(), (n, spread, name)


def test_a_ticks_outcomes_are_tallied_in_c_as_in_numpy() -> None:
    """core._tally: frames by code, and by row and code for the supervisor, without streams
    that left during the tick (row -1) and DTX frames; C and numpy on the same ticks."""
    rng = np.random.default_rng(5)
    n_rows = 300
    tables = {native: (np.zeros(core_module.N_KEYS, np.int64), np.zeros((n_rows, core_module.N_CODES), np.int64))
              for native in (True, False)}
    for n in (0, 1, 40, 2000, 2000):
        rows = rng.integers(-1, n_rows, size=n)
        codes = rng.integers(0, core_module.N_KEYS, size=n).astype(np.uint8)  # DTX_CODE included
        for native, (counts, tally) in tables.items():
            core_module._tally(counts, tally, rows, codes, native)
    (cc, tc), (cp, tp) = tables[True], tables[False]
    assert cc.tolist() == cp.tolist() and tc.tolist() == tp.tolist()
    assert int(cc[core_module.DTX_CODE]) > 0 and int(tc.sum()) < int(cc.sum())
    with pytest.raises(IndexError):  # a code beyond the tables: nothing counted
        core_module._tally(cc, tc, np.array([0]), np.array([core_module.N_KEYS], np.uint8), True)
    assert cc.tolist() == cp.tolist()
