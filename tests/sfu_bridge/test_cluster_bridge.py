"""Bridge workers as Ray actors under the registry: a worker dies mid-call, the fleet scales
down mid-call. Real WebRTC peers (the SDK, in this process) talk to worker processes (Ray
actors) through their URLs; the workers run the in-process random-weight codec (no Serve:
the codec path is covered by tests/cluster/test_up_bridges.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from deployments.affinity import owner as rendezvous_owner
from models.constants import CHUNK_FRAMES
from sfu_bridge.aic_payload import AicPayload
from sfu_bridge.hint_auth import derive_stream_key
from sfu_bridge.sdk import AicPublisher, AicSubscriber

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

BRIDGE = {"deadline_ms": 2_000.0, "max_backlog_chunks": 200, "max_streams": 8}
FRAME_TS = 1920  # one 40 ms frame at the 48 kHz RTP clock



class FrameLog(AicSubscriber):
    """An SDK subscriber that also keeps (arrival, RTP seq, RTP timestamp, 40 ms frames
    carried) of each packet: an AIC packet carries as many frames as its duration (40, 80 or
    120 ms; docs/protocol.md section 9), an Opus packet part of one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packets: list[tuple[float, int, int, int]] = []

    def _on_packet(self, packet) -> bool:
        span = 1
        if packet.payload_type == self._aic_pt:
            span = max(1, AicPayload.parse(bytes(packet.payload)).n_frames // CHUNK_FRAMES)
        self.packets.append((time.monotonic(), packet.sequence_number, packet.timestamp, span))
        return super()._on_packet(packet)

    def accounting(self, since: float = 0.0) -> dict:
        """Every packet arrived (RTP sequence numbers contiguous) and every 40 ms frame of the
        publisher's audio arrived as one outcome (frame timestamps contiguous)."""
        pk = [p for p in self.packets if p[0] >= since]
        seq_gaps = sum((b[1] - a[1]) & 0xFFFF != 1 for a, b in zip(pk, pk[1:], strict=False))
        ts0 = pk[0][2]
        frames = sorted({((p[2] - ts0) & 0xFFFFFFFF) // FRAME_TS + i for p in pk for i in range(p[3])})
        missing = (frames[-1] - frames[0] + 1) - len(frames)
        stall = max((b[0] - a[0] for a, b in zip(pk, pk[1:], strict=False)), default=0.0)
        return {"packets": len(pk), "frames": len(frames), "seq_gaps": seq_gaps,
                "frames_missing": missing, "max_stall_s": round(stall, 3),
                "last_packet_age_s": round(time.monotonic() - pk[-1][0], 3)}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, secret):
    import ray

    from sfu_bridge.fleet import BRIDGE_RESOURCE

    secret_file = tmp_path_factory.mktemp("secret") / "cluster-secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    # Ray's default worker priority (nice 15), unlike tests/ray_local.py: the fleet test checks
    # that the registry itself starts its workers at the node's priority, on any cluster
    ray.init(num_cpus=2, resources={BRIDGE_RESOURCE: 4}, include_dashboard=False,
             namespace="auralink-fleet-test", log_to_driver=False, configure_logging=False)
    try:
        yield str(secret_file)
    finally:
        ray.shutdown()


def start_fleet(secret_file: str, workers: int, bridge: dict | None = None, **fleet):
    from autoscaling.fleet import FleetScaling, pinned
    from cluster.bridge_registry import FleetSettings, get_or_create_registry
    from sfu_bridge.cluster_bridge import WorkerSettings

    settings = FleetSettings(
        scaling=pinned(FleetScaling(), workers),
        worker=WorkerSettings(codec="in-process", host="127.0.0.1", hint_limiter=False, bridge=bridge or BRIDGE,
                              heartbeat_s=0.25),
        secret_file=secret_file, control_interval_s=0.25, **fleet,
    )
    return get_or_create_registry(settings)


async def stop_fleet(registry) -> None:
    import ray

    await registry.shutdown.remote()
    ray.kill(registry, no_restart=True)
    await asyncio.sleep(0.5)


def placed_on(worker_id: str, worker_ids: list[str], prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(1000) if rendezvous_owner(f"{prefix}{i}", worker_ids) == worker_id)


async def call(tokens, secret, url: str, stream: str, streaming_codec, slot: int):
    pub = AicPublisher(url, stream, tokens.issue(f"pub-{stream}", stream, ["publish"]),
                       hint_key=derive_stream_key(secret, stream))
    await pub.start()
    sub = FrameLog(url, stream, tokens.issue(f"sub-{stream}", stream, ["subscribe"]),
                   codec=streaming_codec, slot=slot)
    await sub.start()
    assert await sub.wait_frames(n_aic=3, timeout_s=60), sub.stats
    return pub, sub


async def cascaded_call(registry, tokens, secret, streaming_codec, prefix: str):
    """On a fleet of two workers whose owner is full after one subscriber: a call placed on
    the first worker, its second subscriber signalling there (and cascaded to the other).
    Returns ((w1, w2), worker ids, stream, publisher, first and second subscriber)."""
    from cluster.bridge_registry import wait_for_workers

    status = await wait_for_workers(registry, 2, timeout_s=150)
    (w1, w2) = status["workers"]
    ids = [w1["worker_id"], w2["worker_id"]]
    stream = placed_on(w1["worker_id"], ids, prefix)
    pub, sub1 = await call(tokens, secret, w1["url"], stream, streaming_codec, 0)
    sub2 = FrameLog(w1["url"], stream, tokens.issue("sub2", stream, ["subscribe"]), codec=streaming_codec, slot=1)
    await sub2.start()
    assert await sub2.wait_frames(n_aic=3, timeout_s=60), sub2.stats
    return (w1, w2), ids, stream, pub, sub1, sub2


def test_a_killed_worker_costs_only_its_own_sessions_and_its_publisher_republishes_at_once(
    ray_cluster, tokens, secret, streaming_codec
):
    from cluster.bridge_registry import wait_for_workers

    async def go():
        registry = start_fleet(ray_cluster, 2)
        try:
            status = await wait_for_workers(registry, 2, timeout_s=150)
            (w1, w2) = status["workers"]
            # real-time media: the workers run at the node's priority (this test's, whose Ray
            # processes inherit it), not Ray's nice 15 above it
            node = os.getpriority(os.PRIO_PROCESS, 0)
            assert [os.getpriority(os.PRIO_PROCESS, w["pid"]) for w in (w1, w2)] == [node, node]
            ids = [w1["worker_id"], w2["worker_id"]]
            keep = placed_on(w1["worker_id"], ids, "keep")
            lost = placed_on(w2["worker_id"], ids, "lost")
            # each call signals through the OTHER worker's URL: redirected to its owner
            pub_keep, sub_keep = await call(tokens, secret, w2["url"], keep, streaming_codec, 0)
            pub_lost, sub_lost = await call(tokens, secret, w1["url"], lost, streaming_codec, 1)
            assert pub_keep.location.startswith(w1["url"]) and pub_lost.location.startswith(w2["url"])
            await asyncio.sleep(1.0)
            t_kill = time.monotonic()
            os.kill(w2["pid"], signal.SIGKILL)  # a crash: no drain, no goodbye
            # the killed worker's publisher republishes at once, through the dead worker's
            # peer's URL (any URL of the cluster would do)
            took = await pub_lost.republish(w1["url"])
            republished_at = time.monotonic() - t_kill
            sub2 = FrameLog(w1["url"], lost, tokens.issue("sub2", lost, ["subscribe"]),
                            codec=streaming_codec, slot=2)
            await sub2.start()
            assert await sub2.wait_frames(n_aic=3, timeout_s=60), sub2.stats
            await asyncio.sleep(max(0.0, t_kill + 4.0 - time.monotonic()))
            before_kill = sub_keep.accounting(since=t_kill - 1.0)
            whole = sub_keep.accounting()
            status = await registry.status.remote()
            info = await _info(w1["worker_id"])
            for p in (sub_keep, sub2, pub_keep, pub_lost):
                await p.stop()
            await sub_lost.pc.close()
            return (took, republished_at, pub_lost.location, before_kill, whole, status, info, ids,
                    sub2.stats)
        finally:
            await stop_fleet(registry)

    took, republished_at, location, window, whole, status, info, ids, sub2 = asyncio.run(go())
    print(f"republished {republished_at:.3f} s after the kill (republish call {took:.3f} s); "
          f"survivor around the kill: {window}")
    # the survivor's call lost nothing: every packet and every 40 ms frame, through the kill
    assert window["seq_gaps"] == 0 and window["frames_missing"] == 0, window
    assert whole["seq_gaps"] == 0 and whole["frames_missing"] == 0, whole
    # and kept flowing: frames arrive late on a loaded CPU, but they arrive, up to the end
    assert window["frames"] >= 50 and window["last_packet_age_s"] < 1.0, window
    assert info["media"]["frames"].get("tick_errors", 0) == 0
    # the killed worker's publisher was back, on the survivor, within 2 s of the kill
    assert republished_at < 2.0, (took, republished_at)
    assert location.startswith(next(w["url"] for w in status["workers"] if w["worker_id"] == ids[0]))
    assert sub2.decoded_samples > 0
    # the registry saw the death and replaced the worker (the fleet is pinned at 2)
    events = [(e["event"], e["worker_id"]) for e in status["events"]]
    assert ("died", ids[1]) in events, events
    assert any(e == "starting" for e, _ in events[events.index(("died", ids[1])):]), events


@pytest.mark.parametrize("full_by", ["sessions", "stream_cap"])
def test_a_full_owner_cascades_new_subscribers_to_another_worker_which_follows_its_relay(
    ray_cluster, tokens, secret, streaming_codec, full_by
):
    """The owner is full - it holds `cascade_after_sessions` (2: the publisher and one
    subscriber), or the stream holds the workers' per-stream subscriber cap (1) while the
    threshold is far off (400): the next subscriber, signalling through the owner's URL, is
    redirected to the other worker, which follows the stream from the owner's relay; it gets
    every frame, and the follower drops the stream once its last subscriber has gone."""
    from sfu_bridge.cluster_bridge import UNFOLLOW_AFTER_S

    async def go():
        # DTX off: the publisher's steady tone would turn silent to the VAD after a while, and
        # the owner's call is checked after the follower lets go
        cap = {"max_subscribers_per_stream": 1} if full_by == "stream_cap" else {}
        registry = start_fleet(ray_cluster, 2, {**BRIDGE, "dtx": False, **cap},
                               cascade_after_sessions=400 if cap else 2)
        try:
            (w1, w2), ids, stream, pub, sub1, sub2 = await cascaded_call(registry, tokens, secret,
                                                                         streaming_codec, "big")
            t0 = time.monotonic()
            await asyncio.sleep(3.0)
            owner, follower = await _info(ids[0]), await _info(ids[1])
            relayed = sub2.accounting(since=t0)
            await sub2.stop()
            deadline = time.monotonic() + UNFOLLOW_AFTER_S + 10.0
            while time.monotonic() < deadline:
                after = await _info(ids[1])
                if not after["relayed"]:
                    break
                await asyncio.sleep(0.5)
            t_gone = time.monotonic()
            await asyncio.sleep(2.0)  # the owner's call goes on after the follower let go
            owner_after = await _info(ids[0])
            kept = sub1.accounting(since=t_gone)
            for p in (sub1, pub):
                await p.stop()
            route_counts = (await registry.status.remote()).get("counters", {})
            return sub1, sub2, owner, follower, after, relayed, route_counts, stream, owner_after, kept
        finally:
            await stop_fleet(registry)

    sub1, sub2, owner, follower, after, relayed, counters, stream, owner_after, kept = asyncio.run(go())
    assert sub1.location.startswith(owner["url"])  # the owner had room for the first one
    assert sub2.location.startswith(follower["url"])  # the second was cascaded
    # the follower serves it from the relay: it reports the stream as followed, never as owned
    assert follower["relayed"] == {stream: 1} and stream not in follower["streams"]
    assert follower["counters"].get("cascaded") == 1
    assert follower["relay"]["received"].get("datagrams", 0) > 0 and not follower["relay"]["drops"]
    assert owner["relay"]["subscriptions"] == {stream: 1} and owner["streams"].keys() == {stream}
    # every packet and every 40 ms frame reached the cascaded subscriber, in order
    assert relayed["seq_gaps"] == 0 and relayed["frames_missing"] == 0 and relayed["frames"] >= 40, relayed
    assert sub2.stats.decoded_samples > 0
    assert counters.get("route/redirect/cascade", 0) >= 1 and counters.get("route/local/cascade", 0) >= 1
    # its last subscriber gone, the follower dropped the stream and its session
    assert after["relayed"] == {} and after["sessions"] == 0, after
    # ... and the owner's call went on: no reset, every frame still reaching its own
    # subscriber (these workers each run an in-process codec; with a shared codec, the
    # follower leaving the owner's slot alone is tested in test_core.py)
    resets = [w["media"]["frames"].get("fallback/reset", 0) for w in (owner, owner_after)]
    assert resets[1] == resets[0], resets
    assert kept["seq_gaps"] == 0 and kept["frames_missing"] == 0 and kept["frames"] >= 25, kept


def test_when_a_cascading_owner_dies_its_publisher_republishes_on_the_follower_whose_subscriber_stays(
    ray_cluster, tokens, secret, streaming_codec
):
    """The owner of a cascaded stream is killed; its publisher republishes, and the stream
    lands on the worker that followed it: that worker lets the relay go, serves the stream as
    its owner, and its subscriber (never reconnected) gets the new publisher's frames."""

    async def go():
        registry = start_fleet(ray_cluster, 2, {**BRIDGE, "dtx": False}, cascade_after_sessions=2)
        try:
            (w1, w2), ids, stream, pub, sub1, sub2 = await cascaded_call(registry, tokens, secret,
                                                                         streaming_codec, "town")
            following = await _info(ids[1])
            os.kill(w1["pid"], signal.SIGKILL)
            await pub.republish(w2["url"])
            t_back = time.monotonic()
            await asyncio.sleep(3.0)
            after = await _info(ids[1])
            served = sub2.accounting(since=t_back + 1.0)
            for p in (sub2, pub):
                await p.stop()
            await sub1.pc.close()
            return sub2, pub.location, w2, following, after, served, stream
        finally:
            await stop_fleet(registry)

    sub2, location, w2, following, after, served, stream = asyncio.run(go())
    assert sub2.location.startswith(w2["url"]) and following["relayed"] == {stream: 1}
    assert location.startswith(w2["url"])  # republished on the follower
    # it owns the stream now (no relay left) and still serves the subscriber it had
    assert after["relayed"] == {} and stream in after["streams"], after
    assert after["subscribers"] == {stream: 1}
    # which gets the new publisher's frames, every one of them in order
    assert served["frames"] >= 25 and served["seq_gaps"] == 0 and served["frames_missing"] == 0, served
    assert served["last_packet_age_s"] < 1.0, served


def test_a_fleet_taken_down_while_a_worker_starts_leaves_no_worker_behind(ray_cluster):
    """`auralink bridges down` during a scale-up: the worker still starting (a detached
    actor) is killed with the rest, not left running for the next fleet to take back."""
    import ray

    from deployments.config import RAY_NAMESPACE
    from sfu_bridge.fleet import WORKER_PREFIX

    def workers() -> list[str]:
        return [e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                if e["namespace"] == RAY_NAMESPACE and e["name"].startswith(WORKER_PREFIX)]

    async def go():
        registry = start_fleet(ray_cluster, 1)
        try:
            deadline = time.monotonic() + 60
            while not (await registry.status.remote())["starting"]:
                assert time.monotonic() < deadline, "no worker started"
                await asyncio.sleep(0.05)
        finally:
            await stop_fleet(registry)
        deadline = time.monotonic() + 15
        while workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        return workers()

    assert asyncio.run(go()) == []


async def _info(worker_id: str) -> dict:
    import ray

    from deployments.config import RAY_NAMESPACE
    from sfu_bridge.fleet import WORKER_PREFIX

    return await ray.get_actor(WORKER_PREFIX + worker_id, namespace=RAY_NAMESPACE).info.remote()


def test_a_scale_down_during_calls_cuts_no_stream_and_the_drained_worker_retires(
    ray_cluster, tokens, secret, streaming_codec
):
    from cluster.bridge_registry import wait_for_workers

    async def go():
        registry = start_fleet(ray_cluster, 2)
        try:
            status = await wait_for_workers(registry, 2, timeout_s=150)
            w = {x["worker_id"]: x for x in status["workers"]}
            ids = list(w)
            calls = {}
            for i, wid in enumerate(ids):
                s = placed_on(wid, ids, "call")
                calls[wid] = (s, *await call(tokens, secret, w[ids[1 - i]]["url"], s, streaming_codec, i))
            await registry.configure.remote(workers=1)  # scale down by one, mid-call
            t_drain = time.monotonic()
            status = await registry.status.remote()
            draining = [x["worker_id"] for x in status["workers"] if x["state"] == "draining"]
            assert len(draining) == 1, status
            gone, stays = draining[0], next(x for x in ids if x != draining[0])
            # the draining worker admits no new stream: a publish through its URL lands on the other
            fresh = placed_on(gone, ids, "fresh")  # would have gone to the draining worker
            pub_new = AicPublisher(w[gone]["url"], fresh, tokens.issue("n", fresh, ["publish"]), hints=False)
            await pub_new.start()
            # its live stream still takes new subscribers (it is not a new stream)
            late = FrameLog(w[stays]["url"], calls[gone][0], tokens.issue("late", calls[gone][0], ["subscribe"]),
                            codec=streaming_codec, slot=3)
            await late.start()
            assert await late.wait_frames(n_aic=3, timeout_s=60)
            await asyncio.sleep(3.0)
            during = {wid: calls[wid][2].accounting(since=t_drain) for wid in ids}
            whole = {wid: calls[wid][2].accounting() for wid in ids}
            alive_before_end = [x["worker_id"] for x in (await registry.status.remote())["workers"]]
            # the drained worker's calls end: it retires by itself
            for p in (late, calls[gone][2], calls[gone][1]):
                await p.stop()
            end = time.monotonic() + 20
            while time.monotonic() < end:
                status = await registry.status.remote()
                if [x["worker_id"] for x in status["workers"]] == [stays]:
                    break
                await asyncio.sleep(0.2)
            for p in (pub_new, calls[stays][2], calls[stays][1]):
                await p.stop()
            return (gone, stays, w, pub_new.location, during, whole, alive_before_end, status)
        finally:
            await stop_fleet(registry)

    gone, stays, w, new_location, during, whole, alive_before_end, status = asyncio.run(go())
    print(f"during the drain: {during}")
    for wid in (gone, stays):  # no call was cut or lost a frame, on either worker
        assert during[wid]["seq_gaps"] == 0 and during[wid]["frames_missing"] == 0, (wid, during)
        assert whole[wid]["seq_gaps"] == 0 and whole[wid]["frames_missing"] == 0, (wid, whole)
        assert during[wid]["frames"] >= 25 and during[wid]["last_packet_age_s"] < 1.0, during
    assert new_location.startswith(w[stays]["url"])
    assert sorted(alive_before_end) == sorted([gone, stays])  # drained, not killed, while in use
    assert [x["worker_id"] for x in status["workers"]] == [stays], status
    events = [(e["event"], e["worker_id"]) for e in status["events"]]
    assert ("drain", gone) in events and ("retired", gone) in events, events
    assert not any(e == "died" for e, _ in events), events


def test_a_restarted_registry_takes_the_running_workers_and_their_streams_back(ray_cluster, tokens, secret):
    import ray

    from cluster.bridge_registry import wait_for_workers

    async def go():
        registry = start_fleet(ray_cluster, 1)
        try:
            (w,) = (await wait_for_workers(registry, 1, timeout_s=150))["workers"]
            pub = AicPublisher(w["url"], "kept", tokens.issue("alice", "kept", ["publish"]), hints=False)
            await pub.start()
            ray.kill(registry, no_restart=False)  # its process dies; Ray starts a new one
            end, status = time.monotonic() + 60, {}
            while time.monotonic() < end:
                try:
                    status = await registry.status.remote()
                except ray.exceptions.RayActorError:
                    status = {}
                # the new process: its events start afresh (ray.kill returns before the old dies)
                restarted = "joined" not in [e["event"] for e in status.get("events", [])]
                if restarted and [(x["worker_id"], x["streams"]) for x in status["workers"]] == [
                        (w["worker_id"], ["kept"])]:
                    break
                await asyncio.sleep(0.2)
            # the new registry routes to the stream's owner, and the call itself went on
            route = await registry.route.remote("kept", "whep", "another-worker")
            sub = AicSubscriber(w["url"], "kept", tokens.issue("bob", "kept", ["subscribe"]), aic=False)
            await sub.start()
            ok = await sub.wait_frames(n_opus=5, timeout_s=30)
            await sub.stop()
            await pub.stop()
            return w, status, ok, route
        finally:
            await stop_fleet(registry)

    w, status, ok, route = asyncio.run(go())
    assert [(x["worker_id"], x["streams"]) for x in status["workers"]] == [(w["worker_id"], ["kept"])], status
    assert (route["kind"], route["worker_id"], route["url"]) == ("redirect", w["worker_id"], w["url"])
    assert ok
    events = [e["event"] for e in status["events"]]
    assert "adopted" in events and "starting" not in events, events  # taken back, not replaced
