"""A bridge serving real calls feeds the dashboard: its snapshot (from a real aiortc publisher
and AIC subscriber through BridgeCore) carries the frames, the egress by codec path and the
per-stream bitrate view, in the shape the dashboard aggregates."""

from __future__ import annotations

import asyncio

from deployments.dashboard import StatsBoardCore, aggregate
from sfu_bridge.hint_auth import derive_stream_key
from sfu_bridge.rate_control import Layer
from sfu_bridge.sdk import AicPublisher, AicSubscriber
from sfu_bridge.stats_feed import StatsFeed

CONFIG = dict(deadline_ms=2_000.0, max_backlog_chunks=200)


def test_a_bridge_publishes_its_streams_layers_and_egress(running_bridge, tokens, replica_core, secret):
    board = StatsBoardCore()
    snaps = []

    def publish(bridge_id, snapshot):
        snaps.append(snapshot)
        board.publish(bridge_id, snapshot)

    async def go():
        async with running_bridge(replica_core(max_bandwidth_kbps=24.0), bandwidth_kbps=24.0,
                                  **CONFIG) as (server, base):
            feed = StatsFeed(server.media, "bridge-a", publish, every_s=0.5)
            pub = AicPublisher(base, "room", tokens.issue("alice", "room", ["publish"]),
                               hint_key=derive_stream_key(secret, "room"), bandwidth_kbps=12.0)
            await pub.start()
            sub = AicSubscriber(base, "room", tokens.issue("bob", "room", ["subscribe"]))
            await sub.start()
            (session,) = server.media.subscribers["room"]
            server.media.pin_layer(session, Layer(8, 80))
            feed.snapshot()  # the baseline: the next snapshot covers what follows
            feed.start()
            await sub.wait_frames(n_aic=10, timeout_s=60)
            end = asyncio.get_running_loop().time() + 10.0  # the periodic publish, with a bound
            while feed.published < 1 and asyncio.get_running_loop().time() < end:
                await asyncio.sleep(0.05)
            await feed.stop()
            ok = await feed.publish_once()
            for s in (sub, pub):
                await s.stop()
        return feed, ok

    feed, ok = asyncio.run(go())
    assert ok and feed.published >= 2 and feed.failures == 0
    snap = board.snapshots["bridge-a"]
    assert snap["source"] == "bridge" and snap["streams_live"] == 1
    assert snap["users"] and snap["users"][0]["user"] == "alice" and snap["users"][0]["bridge_state"] == "on"
    room = snap["streams"]["room"]
    assert room["requested_kbps"] == 12.0 and room["depth_n_q"] == 8  # its one subscriber's layer
    (layer,) = room["subscribers"].values()
    assert (layer["n_q"], layer["packet_ms"]) == (8, 80)
    # frames and AI egress were counted while the subscriber received (the last snapshot
    # may cover a short span)
    assert max(x["frames_last_s"] for x in snaps) >= 10
    assert max(x["kbps_ai"] for x in snaps) > max(x["kbps_native"] for x in snaps)
    assert max(x["kbps_all_native"] for x in snaps) > 0
    view = aggregate(board.fresh())
    assert view["streams"][0]["stream"] == "room" and view["streams"][0]["subscribers"][0]["n_q"] == 8


def test_snapshot_counts_the_interval_and_a_failing_board_never_raises(running_bridge, replica_core):
    published = []

    async def go():
        async with running_bridge(replica_core(), **CONFIG) as (server, base):
            feed = StatsFeed(server.media, "b", lambda b, s: published.append(s))
            first = feed.snapshot()
            second = feed.snapshot()

            def broken(bridge_id, snapshot):
                raise ConnectionError("board gone")

            failing = StatsFeed(server.media, "b", broken)
            ok = await failing.publish_once()
        return first, second, failing, ok

    first, second, failing, ok = asyncio.run(go())
    assert first["frames_last_s"] == second["frames_last_s"] == 0
    assert first["streams_live"] == first["streams_relayed"] == 0
    assert first["kbps_ai"] == first["kbps_native"] == 0.0 and first["streams"] == {}
    assert not ok and failing.failures == 1 and failing.published == 0


def test_a_stream_followed_from_another_worker_is_not_counted_as_published_here(replica_core):
    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    media = MediaBridge(BridgeCore(replica_core(), audio=False), max_streams=4)
    media.add_publisher("mine", "alice", None)
    media.add_publisher("theirs", "relay", None, relayed=True)
    snap = StatsFeed(media, "b", lambda b, s: None).snapshot()
    assert snap["streams_live"] == 1 and snap["streams_relayed"] == 1
    assert [r["stream"] for r in snap["users"]] == ["mine"]  # no phantom "relay" publisher
    assert (media.stats()["publishers"], media.stats()["relayed_streams"]) == (1, 1)
