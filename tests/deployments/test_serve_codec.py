"""CodecReplica on real Ray Serve: outcomes, bad input, epochs, affinity, replica death.

One 2-CPU cluster and one 2-replica app for the whole module (replicas take no CPU
reservation so both fit). Deadlines are generous: a shared 2-core CPU is slow, and speed
targets live in the benchmarks, not here.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from deployments.affinity import local_view
from deployments.client import CodecClient
from deployments.contract import (
    CHUNK_SAMPLES,
    BatchResult,
    FallbackReason,
    FrameBatch,
    Op,
    reason_code,
)
from deployments.epochs import BridgeEpochs
from sfu_bridge.core import BridgeCore
from tests.ray_local import processes_titled

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "auralink"
DEADLINE_MS = 8000.0  # generous: correctness, not speed
# Small pool, one torch thread, random weights from the fixed seed.
TEST_REPLICA = {"capacity": 64, "allow_random_weights": True, "torch_threads": 1,
                "max_bandwidth_kbps": 6.0, "max_batch": 16}


def chunks(n_streams: int, seed: int = 0) -> np.ndarray:
    """Deterministic 40 ms test chunks: a tone plus noise, float32 in about [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    t = np.arange(CHUNK_SAMPLES, dtype=np.float32) / 24_000
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    return (tone[None, :] + 0.1 * rng.standard_normal((n_streams, CHUNK_SAMPLES))).astype(np.float32)


@pytest.fixture(scope="module")
def codec_handle(ray_local):
    from ray import serve

    from deployments.replica import CodecReplica

    serve.start(proxy_location="Disabled")
    app = CodecReplica.options(
        num_replicas=2, ray_actor_options={"num_cpus": 0}, health_check_period_s=2.0
    ).bind(TEST_REPLICA)
    handle = serve.run(app, name=APP, route_prefix=None)
    yield handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def client(codec_handle, loop):
    c = CodecClient(codec_handle)
    assert loop.run_until_complete(c.ready(120)), "router never saw the replicas"
    return c


def _batch(ids: list[str], seed: int = 0, deadline_ms: float = DEADLINE_MS) -> FrameBatch:
    """First frames of `ids`, numbered as a bridge numbers them (deployments/epochs.py)."""
    epochs, seqs = BridgeEpochs(len(ids)).number(np.arange(len(ids)))
    return FrameBatch(Op.ENCODE, "bridge-test", list(ids), epochs, seqs,
                      np.full(len(ids), float(deadline_ms)), pcm=chunks(len(ids), seed))


class Bridge:
    """A BridgeCore sending to the codec client (as a bridge worker does), keeping each
    tick's batch and raw `BatchResult`."""

    def __init__(self, client: CodecClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.core = BridgeCore(self, bridge_id="bridge-test", deadline_ms=DEADLINE_MS)

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.batch, self.result = batch, None  # None: the bridge gave up waiting (its deadline)
        self.result = await self.client.process(batch)
        return self.result

    def tick(self, ids: list[str], seed: int = 0) -> tuple[FrameBatch, BatchResult]:
        for sid, pcm in zip(ids, chunks(len(ids), seed), strict=True):
            self.core.join(sid)
            self.core.push(sid, pcm)
        self.report = report = self.loop.run_until_complete(self.core.tick())
        assert report.batch_size == len(ids) and self.batch.stream_ids == ids
        return self.batch, self.result


def _assert_one_outcome_each(batch: FrameBatch, res: BatchResult) -> None:
    assert isinstance(res, BatchResult)
    assert res.stream_ids == batch.stream_ids
    assert res.outcome_codes.shape == (len(batch),)
    valid = {0} | {reason_code(r) for r in FallbackReason}
    assert set(res.outcome_codes.tolist()) <= valid
    assert sum(res.counts().values()) == len(batch)


def test_every_frame_gets_exactly_one_outcome(client, loop):
    ids = [f"one-{i}" for i in range(6)]
    b = _batch(ids)
    # Row 1: continues an epoch no replica holds. Row 2: deadline already past.
    # Row 3: NaN samples. The rest are fine.
    b.epoch_seqs[1] = 7
    b.budgets_ms[2] = -1000.0
    b.pcm[3, 10] = np.nan
    res = loop.run_until_complete(client.process(b))
    _assert_one_outcome_each(b, res)
    out = [res.outcome(i) for i in range(len(b))]
    assert out[1][1] is FallbackReason.RESET
    assert out[2][1] is FallbackReason.DEADLINE
    assert out[3][1] is FallbackReason.ERROR and "NaN" in res.errors[ids[3]]
    for i in (0, 4, 5):
        assert out[i][1] is None, out[i]
    assert res.codes.shape == (6, 8, 3)
    assert 0 <= res.codes.min() and res.codes.max() < 1024
    assert (res.compute_ms[[0, 4, 5]] > 0).all() and (res.queue_ms >= 0).all()
    assert getattr(res, "compute", None) == "real"


def _raw(batch) -> BatchResult:
    """Straight to a replica, bypassing the client's own validation."""
    from ray import serve

    h = serve.get_deployment_handle("CodecReplica", APP)
    return h.options(method_name="process").remote(batch).result(timeout_s=60)


def _good(ids: list[str]) -> FrameBatch:
    return _batch(ids, seed=3)


@pytest.mark.parametrize(
    "breaker, message",
    [
        (lambda b: setattr(b, "stream_ids", ["a", "a"]), "duplicate stream id"),
        (lambda b: setattr(b, "epochs", np.zeros(3, np.int64)), "epochs must be an array of shape (2,)"),
        (lambda b: setattr(b, "op", "transcode"), "unknown op"),
        (lambda b: setattr(b, "pcm", b.pcm.astype(np.float64)), "pcm dtype must be float32 or int16"),
        (lambda b: setattr(b, "pcm", b.pcm[:, :500]), "not a multiple of 320"),
        (lambda b: setattr(b, "bandwidth_kbps", 7.0), "bandwidth 7.0 kbps"),
        (lambda b: setattr(b, "bandwidth_kbps", 24.0), "above this replica's max_bandwidth_kbps"),
    ],
)
def test_malformed_batches_get_clear_errors_and_replica_keeps_serving(codec_handle, breaker, message):
    b = _good(["m-a", "m-b"])
    breaker(b)
    res = _raw(b)
    assert set(res.outcome_codes.tolist()) == {reason_code(FallbackReason.ERROR)}
    assert all(message in e for e in res.errors.values()), res.errors
    ok = _raw(_good(["m-ok"]))
    assert ok.outcome_codes.tolist() == [0], ok.errors


def test_client_answers_a_malformed_batch_without_raising(client, loop):
    from telemetry import metrics

    reg = metrics.local_registry()
    errors0 = reg.counter(metrics.FRAMES, op="encode", reason="error")
    b = _good(["c-a", "c-b"])
    b.budgets_ms = np.zeros(5)
    res = loop.run_until_complete(client.process(b))
    assert res.stream_ids == ["c-a", "c-b"]
    assert res.counts() == {"fallback/error": 2}
    # decided by the client, so counted by the client (no replica saw these frames)
    assert reg.counter(metrics.FRAMES, op="encode", reason="error") - errors0 == 2
    assert "budgets_ms must be an array of shape (2,)" in res.errors["c-a"]


def test_duplicate_ids_through_the_client_are_answered_by_their_replica(client, loop):
    """The client does not look for duplicate stream ids (a set of thousands of ids a tick):
    a stream's rows all go to its one owner, which finds them from its slot table and
    answers the request `fallback/error`, also in a list the client sent before, changed
    in place since."""
    ids = ["d-a", "d-b"]
    b = _good(ids)
    b.stream_ids = ids
    assert loop.run_until_complete(client.process(b)).counts() == {"ai": 2}
    ids[1] = "d-a"  # the same list object, changed in place since
    b = _good(["d-a", "d-b"])
    b.stream_ids = ids
    malformed = client.counters.malformed
    res = loop.run_until_complete(client.process(b))
    assert client.counters.malformed == malformed  # sent, and answered by the replica
    assert res.counts() == {"fallback/error": 2}
    assert all("duplicate stream id" in e for e in res.errors.values())


def test_opus_rows_are_split_by_replica_and_decoded_there(client, loop):
    """A bridge without DTX sends its publishers' Opus (FrameBatch.opus): the client splits
    the rows by owner like pcm rows, each replica decodes its streams' packets, and a
    malformed Opus batch is answered, not raised."""
    from models.opus import OpusCodec

    ids = [f"op-{i}" for i in range(8)]
    t48 = np.repeat(np.tile(chunks(1, seed=5), (1, 4)), 2, axis=1)  # 160 ms at 48 kHz, as WebRTC sends
    (packets,) = OpusCodec(1, 48_000, 20, 32_000).encode([0], t48)
    assert len(packets) == 8
    epochs, seqs = BridgeEpochs(len(ids)).number(np.arange(len(ids)))
    for k in range(4):
        rows = [(packets[2 * k], packets[2 * k + 1])] * len(ids)
        b = FrameBatch(Op.ENCODE, "bridge-test", list(ids), epochs, seqs + k,
                       np.full(len(ids), DEADLINE_MS), opus=rows)
        res = loop.run_until_complete(client.process(b))
        _assert_one_outcome_each(b, res)
        assert res.counts() == {"ai": len(ids)}, res.errors
        assert res.codes.shape == (len(ids), 8, 3)
    bad = FrameBatch(Op.ENCODE, "bridge-test", ["op-x"], np.ones(1, np.int64), np.zeros(1, np.int64),
                     np.full(1, DEADLINE_MS), opus=[("not bytes",)])
    assert _raw(bad).counts() == {"fallback/error": 1}


def test_not_a_frame_batch_is_an_error_not_a_crash(codec_handle):
    res = _raw({"op": "encode"})
    assert len(res) == 0 and res.counts() == {}
    ok = _raw(_good(["m-ok2"]))
    assert ok.outcome_codes.tolist() == [0]


def test_epoch_rule_across_a_gap_equals_a_fresh_start(client, loop):
    """Through the bridge's own epoch rule: a fallback ends the epoch, the replica refuses to
    continue it, and the next epoch's codes equal a fresh encoder's."""
    from models.streaming import StreamingEncodec
    from models.weights import load_encodec

    model, _ = load_encodec(None, allow_random=True)
    ref = StreamingEncodec(model, capacity=1, bandwidth_kbps=6.0)
    bridge = Bridge(client, loop)
    sid = ["enc-gap"]
    for k in range(3):  # epoch 1: frames 0..2
        _, res = bridge.tick(sid, seed=k)
        assert res.outcome_codes.tolist() == [0] and res.epochs.tolist() == [1]
    bridge.core.deadline_ms = 0.0  # the gap: a frame that cannot make its deadline
    _, gap = bridge.tick(sid, seed=3)
    # refused by the replica, or given up by the bridge before the answer came: a deadline
    # fallback either way
    assert gap is None or gap.outcome(0)[1] is FallbackReason.DEADLINE
    assert bridge.report.counts() == {"fallback/deadline": 1}
    bridge.core.deadline_ms = DEADLINE_MS
    # Continuing the broken epoch is refused by the replica (a stale frame touches no state).
    stale = _batch(sid, seed=4)
    stale.epochs[:], stale.epoch_seqs[:] = 1, 4
    assert loop.run_until_complete(client.process(stale)).outcome(0)[1] is FallbackReason.RESET
    fresh = [bridge.tick(sid, seed=k)[1] for k in (4, 5, 6)]  # the bridge opened epoch 2
    assert [(r.outcome_codes.tolist(), r.epochs.tolist()) for r in fresh] == [([0], [2])] * 3
    ref.reset_encoder([0])
    want = [ref.encode([0], chunks(1, k)) for k in (4, 5, 6)]
    for r, w in zip(fresh, want, strict=True):
        np.testing.assert_array_equal(r.codes[0], w[0])


def _owner_streams(handle, sid: str) -> tuple[str, list[str]]:
    info = handle.options(method_name="info", session_id=sid).remote().result(timeout_s=60)
    return info["replica_id"], info["streams"]


def test_affinity_streams_stay_on_one_replica(codec_handle, client, loop):
    bridge = Bridge(client, loop)
    ids = [f"aff-{i}" for i in range(12)]
    replicas_seen: set[str] = set()
    for tick in range(5):
        b, res = bridge.tick(ids, seed=tick)
        _assert_one_outcome_each(b, res)
        # A stream reaching another replica mid-epoch would be answered `reset`.
        assert res.counts() == {"ai": len(ids)}, res.counts()
        replicas_seen |= set(res.replica_id.split(","))
    assert len(replicas_seen) == 2, "streams should spread over both replicas"
    assert client.counters.requests >= 5
    # Each stream's slot lives on the replica its routing key owns, and only there.
    holders = {}
    for sid in ids:
        rid, streams = _owner_streams(codec_handle, sid)
        assert sid in streams
        holders[sid] = rid
    assert len(set(holders.values())) == 2


def test_replicas_run_at_the_nodes_priority(codec_handle, client):
    """Not Ray's nice 15 (tests/deployments/conftest.py `ray_local`): a replica must not
    starve behind the machine's other processes."""
    pids = processes_titled("ray::ServeReplica:")
    assert len(pids) >= 2, pids  # the app's two replicas
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in pids} == {os.getpriority(os.PRIO_PROCESS, 0)}

def test_replica_death_every_frame_answered_and_streams_resume(ray_local, codec_handle, client, loop):
    import ray

    bridge = Bridge(client, loop)
    ids = [f"kill-{i}" for i in range(8)]
    for tick in range(2):
        _, res = bridge.tick(ids, seed=tick)
        assert res.counts() == {"ai": len(ids)}

    victim_uid, victim_streams = _owner_streams(codec_handle, ids[0])
    victim_streams = [s for s in victim_streams if s in ids]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(victim_uid)]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    killed_at = time.monotonic()

    affected_fallback = set()
    recovered_at = None
    ticks = 0
    while time.monotonic() - killed_at < 150:
        b, res = bridge.tick(ids, seed=ticks)
        _assert_one_outcome_each(b, res)
        ticks += 1
        fell = {s for s, c in zip(res.stream_ids, res.outcome_codes.tolist(), strict=True) if c}
        affected_fallback |= fell
        if not fell and affected_fallback:
            recovered_at = time.monotonic()
            break
        loop.run_until_complete(asyncio.sleep(0.04))  # one bridge tick
    assert recovered_at is not None, f"streams never resumed AI after {ticks} ticks"
    assert affected_fallback & set(victim_streams), "the dead replica's streams should have fallen back"
    took = recovered_at - killed_at
    print(f"\nreplica killed: {len(victim_streams)} of {len(ids)} streams affected; all streams "
          f"back on AI after {took:.1f} s ({ticks} ticks), every frame answered")
    # Every stream's state now lives on the live replica its key routes to.
    for sid in ids:
        assert sid in _owner_streams(codec_handle, sid)[1]

    # Serve replaces the dead replica; when the router sees it, the streams hashed to it move
    # there with one epoch reset each, and every frame still gets exactly one outcome.
    view = local_view(APP, "CodecReplica")
    moved, t_replaced = set(), None
    while time.monotonic() - killed_at < 180:
        b, res = bridge.tick(ids, seed=ticks)
        _assert_one_outcome_each(b, res)
        ticks += 1
        fell = {s for s, c in zip(res.stream_ids, res.outcome_codes.tolist(), strict=True) if c}
        uids = view.replica_uids()
        if t_replaced is None and len(uids) == 2 and victim_uid not in uids:
            t_replaced = time.monotonic()
        if t_replaced is not None:
            moved |= fell
            if not fell and res.counts() == {"ai": len(ids)} and time.monotonic() - t_replaced > 1.0:
                break
        loop.run_until_complete(asyncio.sleep(0.04))
    assert t_replaced is not None, "Serve never replaced the dead replica"
    assert res.counts() == {"ai": len(ids)}
    print(f"replacement replica joined {t_replaced - killed_at:.1f} s after the kill; "
          f"{len(moved)} streams moved to it with an epoch reset and resumed AI")


def test_leave_frees_slots(codec_handle, client, loop):
    bridge = Bridge(client, loop)
    ids = ["leave-a", "leave-b"]
    assert bridge.tick(ids)[1].counts() == {"ai": 2}
    assert loop.run_until_complete(client.leave(ids)) == 2
    for sid in ids:
        assert sid not in _owner_streams(codec_handle, sid)[1]
    # The next frame of the left stream continues nothing: reset, then a new epoch works.
    res = bridge.tick(ids)[1]
    assert set(res.outcome_codes.tolist()) == {reason_code(FallbackReason.RESET)}
    assert bridge.tick(ids)[1].counts() == {"ai": 2}
