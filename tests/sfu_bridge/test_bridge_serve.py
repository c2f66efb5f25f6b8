"""A bridge worker on the real cluster path: WebRTC publisher -> BridgeCore ->
`CodecClient` -> Ray Serve `CodecReplica` -> AIC subscriber, with the bridge reporting to the
`FallbackSupervisor` actor (what `auralink bridge --codec serve` runs)."""

from __future__ import annotations

import asyncio

import pytest

from sfu_bridge.hint_auth import derive_stream_key
from sfu_bridge.sdk import AicPublisher, AicSubscriber
from tests import ray_local

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPLICA = {"capacity": 16, "allow_random_weights": True, "torch_threads": 1,
           "max_bandwidth_kbps": 6.0, "max_batch": 8, "deadline_ms": 5_000.0}


@pytest.fixture(scope="module")
def codec_handle():
    import ray
    from ray import serve

    from deployments.replica import CodecReplica

    ray_local.init(num_cpus=2, include_dashboard=False, namespace="auralink-bridge-test",
                   log_to_driver=False, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        app = CodecReplica.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(REPLICA)
        yield serve.run(app, name="auralink", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_bridge_serves_aic_from_serve_replicas_and_reports_to_the_supervisor(
    codec_handle, running_bridge, tokens, streaming_codec, secret
):
    from deployments.client import CodecClient
    from deployments.supervisor import get_or_create_supervisor
    from sfu_bridge.server import link_supervisor
    from sfu_bridge.stats_feed import StatsFeed, ray_board_publisher

    async def go():
        client = CodecClient(codec_handle)
        assert await client.ready(120), "the router never saw the replica"
        async with running_bridge(client, deadline_ms=5_000.0, max_backlog_chunks=200) as (server, base):
            link_supervisor(server.media)
            pub = AicPublisher(base, "room9", tokens.issue("alice", "room9", ["publish"]),
                               hint_key=derive_stream_key(secret, "room9"))
            await pub.start()
            sub = AicSubscriber(base, "room9", tokens.issue("bob", "room9", ["subscribe"]),
                                codec=streaming_codec, slot=5)
            await sub.start()
            ok = await sub.wait_frames(n_aic=10, timeout_s=120)
            owner = client.owner("room9")
            # The supervisor link exchanges once a second: a bounded wait for a report that
            # names the stream's replica, read while the call is live (once it ends, the
            # stream is forgotten and a replica with no stream left with it).
            supervisor, replicas = get_or_create_supervisor(), {}
            for _ in range(200):
                replicas = (await supervisor.info.remote())["replicas"]
                if server.media.core.exchanges and owner in replicas:
                    break
                await asyncio.sleep(0.05)
            stats = server.media.stats()
            # what `auralink bridge --codec serve` publishes to the dashboard's board
            fed = await StatsFeed(server.media, "bridge-serve", ray_board_publisher()).publish_once()
            core = server.media.core
            await sub.stop()
            await pub.stop()
        return ok, sub.stats, stats, core, owner, fed, replicas

    ok, sub_stats, stats, core, owner, fed, replicas = asyncio.run(go())
    assert ok, sub_stats
    assert sub_stats.aic_frames >= 10 and sub_stats.decoded_samples > 0
    assert stats["frames"].get("ai", 0) >= 10, stats["frames"]
    assert core.exchanges >= 1 and core.exchange_failures == 0
    # The reports named the stream's replica, so the supervisor can tell stalls from failures.
    assert owner and owner in replicas, (owner, replicas)
    import ray

    from deployments.dashboard import aggregate, get_or_create_board

    assert fed
    view = aggregate(ray.get(get_or_create_board().fresh.remote()))
    assert "bridge-serve" in view["bridges"] and view["streams_live"] == 1
    assert [r["stream"] for r in view["streams"]] == ["room9"]
