"""A stream is encoded as deep as its deepest AIC subscriber's layer: the need the bridge
hands its core follows joins, leaves, pins and caps (media.py `_update_needs`, which keeps
fixed-layer subscribers grouped and only looks at rate-controlled ones every tick)."""

from __future__ import annotations

import asyncio
import socket

from cluster.bench.bridge import EmulatedCodec, LoopbackOut
from sfu_bridge.core import BridgeCore
from sfu_bridge.media import MediaBridge
from sfu_bridge.rate_control import Layer, RateController


def _need(media: MediaBridge) -> int | None:
    media._update_needs()
    view = media.core.stream("s")
    assert view is not None
    return view.need_n_q


def test_the_need_follows_joins_leaves_pins_caps_and_rate_controlled_subscribers():
    async def go() -> list:
        media = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=24.0), max_streams=2)
        media.add_publisher("s", "pub", None)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        def join(layer: Layer | None) -> str:
            sub = media.add_subscriber("s", "u", None, LoopbackOut(True, sock, ("127.0.0.1", 9)))
            if layer is not None:
                media.pin_layer(sub.session_id, layer)
            return sub.session_id

        seen = [_need(media)]  # no subscriber
        a = join(Layer(4))
        seen.append(_need(media))
        b = join(Layer(8))
        seen.append(_need(media))
        media.pin_layer(b, Layer(2))  # a pin moves the need at once
        seen.append(_need(media))
        media.core.set_policy("s", max_kbps=1.5)  # a cap of 2 codebooks holds every layer under it
        seen.append(_need(media))
        media.core.set_policy("s", max_kbps=None)
        seen.append(_need(media))
        await media.end_session(a)
        seen.append(_need(media))
        c = join(None)  # not pinned: the stream's full depth
        seen.append(_need(media))
        await media.end_session(c)
        # a rate-controlled subscriber is looked at every tick: its layer moves without a
        # join, leave or pin
        sender = media.sessions[b].aic_sender
        sender.rate, sender.pinned = RateController(), None
        media._needs.clear()  # what a new subscriber's join does
        sender.layer = Layer(16)
        seen.append(_need(media))
        sender.layer = Layer(8)
        seen.append(_need(media))
        sock.close()
        return seen

    assert asyncio.run(go()) == [None, 4, 8, 4, 2, 4, 2, 32, 16, 8]


def test_packets_a_subscribers_socket_refuses_are_counted_in_the_bridge_stats():
    """A send the socket refuses is a counted drop (`send_refused`), before and after the
    subscriber leaves, never a packet counted as sent."""
    import numpy as np

    from deployments.contract import Outcome
    from sfu_bridge.cascade import RelayedFrame

    async def go() -> tuple[dict, dict, int]:
        media = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=24.0), max_streams=2)
        media.add_publisher("s", "pub", None)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        ok_sock, gone_sock = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        ok = media.add_subscriber("s", "u", None, LoopbackOut(True, ok_sock, sink.getsockname(), with_mid=False))
        gone = media.add_subscriber("s", "u", None, LoopbackOut(True, gone_sock, sink.getsockname(), with_mid=False))
        for sub in (ok, gone):
            media.pin_layer(sub.session_id, Layer(8))
        gone_sock.close()
        codes = np.zeros((32, 3), np.int16)
        for k in range(3):
            media.dispatch_frames(k, [RelayedFrame("s", Outcome.AI, None, 1, k, 1920 * k, codes, None, 0.0)])
        live = media.stats()
        await media.end_session(gone.session_id)
        after = media.stats()
        ok_sock.close()
        sink.close()
        return live, after, ok.out.packets

    live, after, delivered = asyncio.run(go())
    assert delivered == 3
    assert live["send_refused"] == after["send_refused"] == 3
    assert live["packets"]["aic"] == 3  # only the delivered ones count as sent


def test_forwarded_opus_and_tick_output_follow_joins_and_leaves():
    """The stream's subscribers split into AIC and legacy Opus ones once per join or leave
    (media.py `_split`): a packet reaches exactly the legacy subscribers present when it
    arrives, a tick's frame exactly the AIC ones."""
    import numpy as np
    from aiortc.rtp import RtpPacket

    from deployments.contract import Outcome
    from sfu_bridge.cascade import RelayedFrame

    async def go() -> list[tuple[int, int, int]]:
        media = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=24.0), max_streams=2,
                            fast_ingest=False)
        media.add_publisher("s", "pub", None).opus_pt = 111
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        codes = np.zeros((32, 3), np.int16)
        outs: dict[str, LoopbackOut] = {}

        def join(aic: bool) -> str:
            out = LoopbackOut(aic, sock, sink.getsockname(), with_mid=False)
            sub = media.add_subscriber("s", "u", None, out)
            if aic:
                media.pin_layer(sub.session_id, Layer(8))
            outs[sub.session_id] = out
            return sub.session_id

        def step(k: int) -> tuple[int, int, int]:
            media.forward("s", RtpPacket(payload_type=111, sequence_number=k, timestamp=960 * k,
                                         payload=b"opus"))
            media.dispatch_frames(k, [RelayedFrame("s", Outcome.AI, None, 1, k, 1920 * k, codes, None, 0.0)])
            legacy = sum(o.packets for o in outs.values() if o.aic_pt is None)
            aic = sum(o.packets for o in outs.values() if o.aic_pt is not None)
            return legacy, aic, len(outs)

        seen = []
        first = join(False)
        seen.append(step(0))  # one legacy subscriber: one Opus packet, no AIC
        join(True)
        join(False)
        seen.append(step(1))  # +2 Opus, +1 AIC
        await media.end_session(first)
        seen.append(step(2))  # the one left: +1 Opus, +1 AIC
        sock.close()
        sink.close()
        return seen

    assert asyncio.run(go()) == [(1, 0, 1), (3, 1, 3), (4, 2, 3)]
