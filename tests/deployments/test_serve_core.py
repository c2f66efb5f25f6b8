"""CodecReplicaCore without Ray, driven by a BridgeCore as a bridge drives it: slots,
overload, idle timeout, epochs, emulated compute, reconfigure, health; plus the pure
stream-affinity hashing and the client's merge."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from deployments import affinity
from deployments.client import merge_results
from deployments.config import ComputeMode, ReplicaSettings, profile_ms
from deployments.contract import (
    CHUNK_SAMPLES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    reason_code,
)
from deployments.epochs import BridgeEpochs
from deployments.replica import EMULATED_WEIGHTS, CodecReplicaCore, EmulatedRuntime, SlotPool
from sfu_bridge.core import BridgeCore

SETTINGS = ReplicaSettings(capacity=3, allow_random_weights=True, torch_threads=1,
                           max_bandwidth_kbps=6.0, max_batch=8)
DEADLINE_MS = 8000.0


def _pcm(n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((n, CHUNK_SAMPLES))).astype(np.float32)


@pytest.fixture(scope="module")
def codec_runtime():
    """One model load for the module; each test gets a fresh core around it."""
    from deployments.replica import _load_codec

    return _load_codec(SETTINGS)


@pytest.fixture
def core(codec_runtime):
    c = CodecReplicaCore(SETTINGS, "core-test", build=False)
    c._codec, c.weights_kind = codec_runtime
    c._codec.reset(np.arange(SETTINGS.capacity + 1))
    return c


run = asyncio.run


class Bridge:
    """A BridgeCore sending to the replica core, keeping each tick's raw `BatchResult`."""

    def __init__(self, core: CodecReplicaCore) -> None:
        self.core = core
        self.bridge = BridgeCore(self, bridge_id="b", deadline_ms=DEADLINE_MS)

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.result = await self.core.process(batch)
        return self.result

    async def leave(self, ids: list[str]) -> int:
        return await self.core.leave(ids)


async def _tick(bridge: Bridge, ids: list[str], seed: int = 0) -> BatchResult:
    """One tick in which each of `ids` (joining if new) sends a chunk: the replica's answer."""
    for sid, pcm in zip(ids, _pcm(len(ids), seed), strict=True):
        bridge.bridge.join(sid)
        bridge.bridge.push(sid, pcm)
    report = await bridge.bridge.tick()
    assert report.batch_size == len(ids)
    return bridge.result


def _batch(ids: list[str], deadline_ms: float = DEADLINE_MS) -> FrameBatch:
    """A first frame of each stream, numbered as a bridge numbers them (the epoch rule)."""
    epochs, seqs = BridgeEpochs(len(ids)).number(np.arange(len(ids)))
    return FrameBatch(Op.ENCODE, "b", list(ids), epochs, seqs,
                      np.full(len(ids), float(deadline_ms)), pcm=_pcm(len(ids)))


def test_full_pool_answers_overload_never_evicts(core):
    async def go():
        br = Bridge(core)
        first = await _tick(br, ["a", "b", "c"])
        assert first.counts() == {"ai": 3}
        res = await _tick(br, ["a", "b", "c", "d"])  # d finds no slot
        assert res.outcome(3)[1] is FallbackReason.OVERLOAD
        assert res.outcome_codes[:3].tolist() == [0, 0, 0]  # nobody was evicted for d
        assert await core.leave(["b"]) == 1
        res = await _tick(br, ["d"])  # d's next frame opens a new epoch and gets b's slot
        assert res.counts() == {"ai": 1} and res.epochs[0] == 2
        assert sorted(core.pool.streams()) == ["a", "c", "d"]
        await core.stop()

    run(go())


def test_idle_streams_are_freed(core):
    async def go():
        br = Bridge(core)
        await _tick(br, ["x", "y"])
        core.pool.last_seen[core.pool.get("x")] -= SETTINGS.idle_timeout_s + 1
        core._sweep_idle(core.clock())
        assert core.pool.streams() == ["y"]
        assert core.counters["slots_idle_freed"] == 1
        res = await _tick(br, ["x"])  # its state is gone: the epoch cannot continue
        assert res.outcome(0)[1] is FallbackReason.RESET
        await core.stop()

    run(go())


def test_gap_in_an_epoch_resets_and_stale_frames_do_not_break_the_new_epoch(core):
    async def go():
        assert (await _tick(Bridge(core), ["s"])).counts() == {"ai": 1}

        def frame(epoch: int, seq: int) -> FrameBatch:
            return FrameBatch(Op.ENCODE, "b", ["s"], np.array([epoch]), np.array([seq]),
                              np.array([5000.0]), pcm=_pcm(1))

        assert (await core.process(frame(1, 2))).outcome(0)[1] is FallbackReason.RESET  # seq 1 skipped
        assert (await core.process(frame(1, 3))).outcome(0)[1] is FallbackReason.RESET  # still broken
        assert (await core.process(frame(2, 0))).counts() == {"ai": 1}
        assert (await core.process(frame(1, 4))).outcome(0)[1] is FallbackReason.RESET  # stale
        assert (await core.process(frame(2, 1))).counts() == {"ai": 1}  # epoch 2 unharmed
        await core.stop()

    run(go())


def test_emulated_compute_costs_the_profile_and_says_so(core):
    async def go():
        profile = {1: 30.0, 4: 60.0}
        await core.reconfigure({"compute": "emulated", "latency_profile": profile,
                                "latency_profile_device": "test profile"})
        assert core.info()["latency_profile_device"] == "test profile"
        res = await _tick(Bridge(core), ["e1", "e2"])
        assert res.counts() == {"ai": 2} and res.compute == "emulated"
        assert not res.codes.any()
        want = profile_ms(profile, 2)  # 40 ms: linear between measured sizes
        assert want == pytest.approx(40.0)
        assert res.compute_ms[0] >= want * 0.95
        assert core.info()["compute"] == "emulated"
        # No model behind an emulated replica, and it says so; the health step still runs.
        assert core.info()["weights"] == EMULATED_WEIGHTS
        assert isinstance(core._codec, EmulatedRuntime)
        await core.check_health()
        # Back to real compute: the model is loaded again and answers real codes.
        await core.reconfigure({"compute": "real"})
        assert core.info()["weights"] == "random (codebooks k-means initialised)"
        assert not isinstance(core._codec, EmulatedRuntime)
        res = await _tick(Bridge(core), ["e3"])
        assert res.counts() == {"ai": 1} and res.compute == "real"
        await core.stop()

    run(go())


def test_reconfigure_knobs_apply_at_run_time_and_rebuild_only_when_needed(core):
    async def go():
        codec = core._codec
        await core.reconfigure({"deadline_ms": 15.0, "max_batch": 4, "margin_ms": 3.0})
        assert core._codec is codec  # scheduler knobs only: same runtime, slots kept
        cfg = core.scheduler.config
        assert (cfg.deadline_ms, cfg.max_batch, cfg.margin_ms) == (15.0, 4, 3.0)
        with pytest.raises(ValueError, match="unknown replica settings"):
            await core.reconfigure({"max_batch_size": 3})
        with pytest.raises(ValueError):
            await core.reconfigure({"max_batch": 0})
        assert core.settings.max_batch == 4  # a bad config changes nothing
        await core.stop()

    run(go())


def test_health_check_runs_a_real_step(core):
    async def go():
        await core.check_health()

        def broken(*_a, **_k):
            raise RuntimeError("device lost")

        core._codec.encode, saved = broken, core._codec.encode
        try:
            with pytest.raises(RuntimeError, match="device lost"):
                await core.check_health()
        finally:
            core._codec.encode = saved
        await core.stop()

    run(go())


def test_model_error_answers_its_frames_and_the_loop_survives(core):
    async def go():
        br = Bridge(core)

        def broken(*_a, **_k):
            raise RuntimeError("CUDA error: an illegal memory access")

        saved = core._codec.encode
        core._codec.encode = broken
        res = await _tick(br, ["m1", "m2"])
        core._codec.encode = saved
        assert res.counts() == {"fallback/error": 2}
        assert "illegal memory access" in res.errors["m1"]
        res = await _tick(br, ["m1", "m2"])
        assert res.counts() == {"ai": 2} and res.epochs.tolist() == [2, 2]  # new epochs
        await core.stop()

    run(go())


def test_autoscaling_stats_are_numbers(core):
    async def go():
        await _tick(Bridge(core), ["q"])
        stats = core.autoscaling_stats()
        assert all(isinstance(v, float) for v in stats.values())
        assert stats["slot_occupancy"] == pytest.approx(1 / 3) and stats["miss_rate"] == 0.0
        await core.stop()

    run(go())


def test_slot_pool_reuses_freed_slots():
    pool = SlotPool(2)
    a, b = pool.acquire("a", 0.0), pool.acquire("b", 0.0)
    assert {a, b} == {0, 1} and pool.acquire("c", 0.0) is None
    pool.release("a")
    assert pool.acquire("c", 0.0) == a


def test_new_streams_admitted_in_the_usual_path_as_in_the_full_one(monkeypatch):
    """Streams new to the replica (their epoch's first frame) take slots in the usual intake
    path; the outcomes, slots and epochs are those of the full path, over random requests
    that mix known, new and orphaned streams, leaves and a pool that fills up."""
    from deployments import replica as rep

    rng = np.random.default_rng(11)
    names = [f"s{i}" for i in range(12)]
    steps = []
    for _ in range(120):
        ids = [names[i] for i in rng.choice(12, size=int(rng.integers(1, 7)), replace=False)]
        steps.append((ids, rng.integers(0, 3, len(ids)) // 2, rng.integers(0, 2, len(ids)),
                      [names[i] for i in rng.choice(12, size=int(rng.integers(0, 2)), replace=False)]))

    async def trace(full_path: bool) -> list:
        if full_path:  # no free slot as far as the usual path can tell: new streams go the full way
            monkeypatch.setattr(rep.SlotPool, "free", property(lambda self: -1))
        else:
            monkeypatch.undo()
        core = CodecReplicaCore(ReplicaSettings(capacity=6, compute="emulated"), "admit-test")
        out = []
        for ids, seqs, epochs, leaving in steps:
            b = FrameBatch(Op.ENCODE, "b", list(ids), np.asarray(epochs, np.int64),
                           np.asarray(seqs, np.int64), np.full(len(ids), float(DEADLINE_MS)),
                           pcm=_pcm(len(ids)))
            res = await asyncio.wait_for(core.process(b), 10.0)
            out.append((res.outcome_codes.tolist(), core.pool.lookup(names).tolist()))
            await core.leave(leaving)
        await core.stop()
        return out

    full = run(trace(True))
    usual = run(trace(False))
    assert usual == full
    assert sum(codes.count(0) for codes, _ in usual) > 50  # AI answers, not only refusals


def test_duplicate_stream_ids_are_found_among_known_and_unknown_streams():
    pool = SlotPool(4)
    pool.acquire("a", 0.0)
    pool.acquire("b", 0.0)
    for ids, distinct in ((["a", "b", "x", "y"], True), (["a", "x", "a"], False),
                          (["x", "b", "y", "x"], False), ([], True), (["x"], True)):
        assert pool.distinct(ids, pool.lookup(ids)) is distinct, ids

    async def go():
        core = CodecReplicaCore(ReplicaSettings(capacity=4, compute="emulated"), "dup-test")
        for ids in (["a", "b"], ["a", "b", "a"], ["a", "b", "c", "c"]):
            b = _batch(ids)
            b.epoch_seqs = np.full(len(ids), 0 if ids == ["a", "b"] else 1, np.int64)
            res = await asyncio.wait_for(core.process(b), 10.0)
            if ids == ["a", "b"]:
                assert res.counts() == {"ai": 2}
            else:  # the whole batch is malformed, however its streams stand on the replica
                assert res.counts() == {"fallback/error": len(ids)}
                assert all("duplicate stream id" in e for e in res.errors.values())
        await core.stop()

    run(go())


def test_rendezvous_owner_is_stable_and_moves_few_streams():
    replicas = [f"r{i}" for i in range(4)]
    streams = [f"stream-{i}" for i in range(2000)]
    before = {s: affinity.owner(s, replicas) for s in streams}
    assert before == {s: affinity.owner(s, list(reversed(replicas))) for s in streams}
    counts = np.bincount([replicas.index(o) for o in before.values()])
    assert counts.min() > 350  # roughly even: 500 each
    after = {s: affinity.owner(s, replicas[:3]) for s in streams}  # r3 died
    moved = [s for s in streams if before[s] != after[s]]
    assert all(before[s] == "r3" for s in moved)  # only its streams move
    assert affinity.owner("x", []) is None


def test_merge_results_restores_row_order():
    batch = _batch(["a", "b", "c"])
    part1 = BatchResult.all_fallback(batch, FallbackReason.DEADLINE)
    part1.stream_ids, part1.outcome_codes = ["b"], np.array([reason_code(FallbackReason.DEADLINE)], np.uint8)
    part1.epochs, part1.queue_ms, part1.compute_ms = np.array([1]), np.zeros(1, np.float32), np.zeros(1, np.float32)
    part2 = BatchResult(["a", "c"], np.zeros(2, np.uint8), np.array([1, 1]), np.ones(2, np.float32),
                        np.full(2, 5.0, np.float32), codes=np.full((2, 8, 3), 7, np.int16))
    merged = merge_results(batch, [(np.array([1]), part1), (np.array([0, 2]), part2)])
    assert merged.stream_ids == ["a", "b", "c"]
    assert merged.outcome_codes.tolist() == [0, reason_code(FallbackReason.DEADLINE), 0]
    assert merged.codes[0, 0, 0] == 7 and merged.codes[2, 0, 0] == 7 and merged.compute_ms[1] == 0


def test_a_batch_ordered_by_owner_is_split_into_views():
    """A bridge orders its batch by owning replica: each replica's part is a range of rows,
    taken without copying the PCM, and the answers merge back in the batch's order."""
    from deployments.client import _take

    batch = _batch(["a", "b", "c", "d"])
    first, second = _take(batch, slice(0, 1), spent_ms=2.0), _take(batch, slice(1, 4), spent_ms=2.0)
    assert first.stream_ids == ["a"] and second.stream_ids == ["b", "c", "d"]
    assert np.shares_memory(second.pcm, batch.pcm) and second.budgets_ms.tolist() == [DEADLINE_MS - 2.0] * 3
    by_index = _take(batch, np.array([3, 1]))
    assert by_index.stream_ids == ["d", "b"] and not np.shares_memory(by_index.pcm, batch.pcm)
    parts = [(slice(0, 1), BatchResult.all_fallback(first, FallbackReason.OVERLOAD)),
             (slice(1, 4), BatchResult(second.stream_ids, np.zeros(3, np.uint8), second.epochs,
                                       np.zeros(3, np.float32), np.zeros(3, np.float32)))]
    merged = merge_results(batch, parts)
    assert merged.counts() == {"ai": 3, "fallback/overload": 1} and merged.outcome(0)[1] is FallbackReason.OVERLOAD


def test_merging_parts_in_row_order_equals_scattering_them():
    """Parts that are ranges of rows in order (a bridge's batch ordered by owner) are joined
    column by column; the result is the one the general scatter gives the same rows as index
    arrays: outcomes, times, codes padded to the batch's deepest row, errors, replica ids,
    compute modes and held time; a part answering fewer rows than it was sent, or carrying
    VAD state, takes the general path."""
    batch = _batch([f"s{i}" for i in range(7)])
    batch.n_q = np.array([2, 8, 4, 8, 2, 2, 16], np.int64)
    rng = np.random.default_rng(1)

    def part(rows: range, rid: str, n_q: int | None) -> BatchResult:
        k = len(rows)
        res = BatchResult([f"s{i}" for i in rows], rng.integers(0, 3, k).astype(np.uint8),
                          np.arange(k), rng.random(k).astype(np.float32), rng.random(k).astype(np.float32),
                          codes=None if n_q is None else rng.integers(0, 1024, (k, n_q, 3)).astype(np.int16),
                          replica_id=rid, errors={f"s{rows[0]}": "x"}, compute="emulated", held_ms=float(k))
        return res

    for depths in ((8, 8, 8), (16, 16, 16), (None, None, None), (8, None, 8)):
        spans = [range(0, 3), range(3, 4), range(4, 7)]
        parts = [part(r, f"r{j}", d) for j, (r, d) in enumerate(zip(spans, depths, strict=True))]
        fast = merge_results(batch, [(slice(r.start, r.stop), p) for r, p in zip(spans, parts, strict=True)])
        slow = merge_results(batch, [(np.arange(r.start, r.stop), p) for r, p in zip(spans, parts, strict=True)])
        for name in ("stream_ids", "replica_id", "errors", "compute", "held_ms"):
            assert getattr(fast, name) == getattr(slow, name), name
        for name in ("outcome_codes", "epochs", "queue_ms", "compute_ms", "codes"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b))), name
    short = part(range(0, 2), "r0", 8)  # answers 2 of the 3 rows it was sent
    with pytest.raises(ValueError):
        merge_results(batch, [(slice(0, 3), short), (slice(3, 7), part(range(3, 7), "r1", 8))])


def test_settings_from_env_and_compute_mode():
    s = ReplicaSettings.from_env({"AURALINK_DEADLINE_MS": "15", "AURALINK_COMPUTE": "emulated",
                                  "AURALINK_LATENCY_PROFILE_DEVICE": "cpu: test",
                                  "AURALINK_ALLOW_RANDOM_WEIGHTS": "yes", "AURALINK_CAPACITY": "32"})
    assert (s.deadline_ms, s.compute, s.allow_random_weights, s.capacity) == (15.0, ComputeMode.EMULATED, True, 32)
    with pytest.raises(ValueError, match="max_bandwidth_kbps"):
        ReplicaSettings(max_bandwidth_kbps=5.0)
    # $AURALINK_BANDWIDTH_KBPS is what AIC subscribers get (the bridge's); the replica's cap
    # is its own variable, so the one name has one meaning and one default
    env = {"AURALINK_BANDWIDTH_KBPS": "1.5", "AURALINK_MAX_BANDWIDTH_KBPS": "12"}
    assert ReplicaSettings.from_env(env).max_bandwidth_kbps == 12.0
    assert s.profile_is_measured and not ReplicaSettings().profile_is_measured


def test_a_failing_step_answers_its_frames_and_the_loop_goes_on(core, monkeypatch):
    async def go():
        br = Bridge(core)
        real_group = core._group

        def boom(parts, now):
            raise KeyError("bug in grouping")

        monkeypatch.setattr(core, "_group", boom)
        res = await _tick(br, ["f1", "f2"])
        assert res.counts() == {"fallback/error": 2}
        assert res.errors["f1"] == "replica step failed"
        monkeypatch.setattr(core, "_group", real_group)
        assert (await _tick(br, ["f1", "f2"])).counts() == {"ai": 2}
        stats = core.autoscaling_stats()
        assert stats["slot_capacity"] == 3.0
        await core.stop()

    run(go())


def test_backend_switch_to_onnx_resets_streams_and_encodes_alike(core):
    async def go():
        br = Bridge(core)
        torch_out = await _tick(br, ["d"], seed=4)
        assert torch_out.counts() == {"ai": 1}
        await core.reconfigure({"backend": "onnx"})
        assert core.info()["backend"] == "onnx" and core.pool.streams() == []
        res = await _tick(br, ["d"], seed=4)  # the epoch cannot continue: its state did not cross
        assert res.outcome(0)[1] is FallbackReason.RESET
        onnx_out = await _tick(br, ["d"], seed=4)  # the bridge opened a new epoch
        assert onnx_out.counts() == {"ai": 1}
        # the same first chunk from a zero state: the same codes, up to float32 near-ties
        assert (onnx_out.codes == torch_out.codes).mean() >= 0.95
        await core.stop()

    run(go())


def test_a_batch_above_the_replicas_bandwidth_is_refused_per_frame(core):
    async def go():
        batch = _batch(["hi"])
        batch.bandwidth_kbps = 12.0  # this replica computes at most 6 kbps
        res = await core.process(batch)
        assert res.counts() == {"fallback/error": 1}
        assert "above this replica's max_bandwidth_kbps" in res.errors["hi"]
        await core.stop()

    run(go())


def test_stream_refs_find_each_streams_own_slot():
    """A sender's stream refs find the slots its streams were admitted to; a ref whose slot
    changed hands since (the stream left, another took the slot) finds nothing and the id
    decides; a sender whose ref names another stream is caught by the id sample and loses
    its table, the ids deciding."""
    pool = SlotPool(4)
    ids = ["a", "b", "c"]
    refs = (np.arange(3, dtype=np.int64) << 32) | 7
    slots = pool.acquire_new(ids, 0.0)
    pool.remember("br", refs, slots)
    assert pool.lookup(ids, "br", refs).tolist() == slots.tolist()
    assert pool.lookup(ids, "other-sender", refs).tolist() == slots.tolist()  # by id
    assert pool.lookup(["a", "x"], "br", refs[[0, 2]]).tolist() == [slots[0], -1]  # ref of c, id x
    pool.release("a")
    d = pool.acquire("d", 0.0)  # a's slot, to a new stream
    assert d == slots[0]
    # d sent under a's old ref (a row reused without a new generation: a sender's bug) and
    # a under its own: the slot changed hands, so the ids decide
    assert pool.lookup(["d", "a"], "br", refs[[0, 0]]).tolist() == [d, -1]
    pool.remember("br", refs[[1]] + 1, np.array([slots[1]]))  # b's row, a new generation
    assert pool.lookup(["b"], "br", refs[[1]]).tolist() == [slots[1]]  # old ref: by id
    # Among many streams (more than the id sample): a stream idled out on the replica while
    # its sender still holds its ref, and its slot went to another stream
    pool = SlotPool(80)
    ids = [f"s{i}" for i in range(64)]
    refs = np.arange(64, dtype=np.int64) << 32
    slots = pool.acquire_new(ids, 0.0)
    pool.remember("br", refs, slots)
    pool.release("s5")
    assert pool.acquire("new", 0.0) == slots[5]
    got = pool.lookup(ids, "br", refs)
    assert got[5] == -1 and np.delete(got, 5).tolist() == np.delete(slots, 5).tolist()


def test_streams_found_by_their_refs_are_not_remembered_again(core):
    """A bridge's streams are found by their refs from their second frame on; a request
    that brings new streams among known ones remembers only the new ones' refs, and those
    are found by ref the tick after."""
    async def go():
        br = Bridge(core)
        remembered = []
        remember = core.pool.remember
        core.pool.remember = lambda sender, refs, slots: (remembered.append(refs.size),
                                                          remember(sender, refs, slots))
        await _tick(br, ["a", "b"])  # new: by id, remembered
        await _tick(br, ["a", "b", "c"])  # a, b by ref; c new
        await _tick(br, ["a", "b", "c"])  # all by ref
        look = core.info()["stream_lookup"]
        assert remembered == [2, 1]
        assert (look["by_ref"], look["by_id"]) == (2 + 3, 2 + 1)
        await core.stop()

    run(go())


def test_a_sender_whose_refs_name_other_streams_loses_them(caplog):
    pool = SlotPool(40)
    ids = [f"s{i}" for i in range(32)]
    refs = np.arange(32, dtype=np.int64) << 32
    slots = pool.acquire_new(ids, 0.0)
    pool.remember("br", refs, slots)
    swapped = refs[::-1].copy()  # every stream sent under another's ref
    with caplog.at_level("WARNING"):
        assert pool.lookup(ids, "br", swapped).tolist() == slots.tolist()
    assert "ref named another stream" in caplog.text
    assert "br" not in pool._refs
    assert (pool.by_ref, pool.by_id, pool.refs_dropped) == (0, 32, 1)


def test_a_replica_answers_alike_with_and_without_stream_refs():
    """A bridge core's batches (with refs) and the same batches without them get the same
    outcomes and epochs from two replicas, tick after tick, under joins, leaves, rows reused
    by new streams, streams idle and slots running out."""

    class Twin:
        def __init__(self) -> None:
            settings = ReplicaSettings(capacity=6, compute="emulated", idle_timeout_s=0.05)
            self.a = CodecReplicaCore(settings, "with-refs")
            self.b = CodecReplicaCore(settings, "without")
            self.pairs: list[tuple[BatchResult, BatchResult]] = []

        async def process(self, batch: FrameBatch) -> BatchResult:
            assert batch.stream_refs is not None
            ra, rb = await asyncio.gather(self.a.process(batch),
                                          self.b.process(replace(batch, stream_refs=None)))
            self.pairs.append((ra, rb))
            return ra

        async def leave(self, ids: list[str]) -> int:
            return await self.a.leave(ids) + 0 * await self.b.leave(ids)

    async def go() -> None:
        twin = Twin()
        bridge = BridgeCore(twin, bridge_id="b", deadline_ms=DEADLINE_MS, capacity=8)
        rng = np.random.default_rng(5)
        live: list[str] = []
        n = 0
        for tick in range(60):
            if live and rng.random() < 0.3:
                bridge.leave(live.pop(int(rng.integers(len(live)))))
            if rng.random() < 0.7 or not live:
                live.append(f"s{n}")
                bridge.join(f"s{n}")
                n += 1
            for sid in live:
                if rng.random() < 0.9:
                    bridge.push(sid, np.zeros(CHUNK_SAMPLES, np.float32))
            if tick == 30:
                await asyncio.sleep(1.2)  # every slot idles out (the sweep runs each second)
            await bridge.tick()
        for ra, rb in twin.pairs:
            assert ra.stream_ids == rb.stream_ids
            assert ra.outcome_codes.tolist() == rb.outcome_codes.tolist()
            assert ra.epochs.tolist() == rb.epochs.tolist()
        codes = np.concatenate([ra.outcome_codes for ra, _ in twin.pairs])
        assert (codes == 0).sum() > 100
        assert (codes == reason_code(FallbackReason.OVERLOAD)).any()  # more streams than slots
        assert len(twin.a.pool._refs["b"].ref) >= 8  # the refs were used
        look = twin.a.info()["stream_lookup"]  # what GET /v1/replica shows of them
        assert look["by_ref"] > 0 and look["by_id"] > 0 and look["refs_dropped"] == 0
        assert twin.b.info()["stream_lookup"]["by_ref"] == 0
        await twin.a.stop()
        await twin.b.stop()

    run(go())


@pytest.mark.parametrize("refs, message", [
    (np.array([0, 1], np.int32), "stream_refs must be an int64 array"),
    (np.array([0], np.int64), "stream_refs must be an int64 array of shape (2,)"),
    (np.array([0, -1], np.int64), "stream_refs must be >= 0"),
    (np.array([0, (1 << 20) << 32], np.int64), "with a row (ref >> 32) below"),
])
def test_malformed_stream_refs_are_answered_per_frame(refs, message):
    async def go() -> BatchResult:
        core = CodecReplicaCore(ReplicaSettings(capacity=4, compute="emulated"), "refs-test")
        b = _batch(["a", "b"])
        b.stream_refs = refs
        res = await asyncio.wait_for(core.process(b), 10.0)
        await core.stop()
        return res

    res = run(go())
    assert res.counts() == {"fallback/error": 2}
    assert all(message in e for e in res.errors.values()), res.errors
