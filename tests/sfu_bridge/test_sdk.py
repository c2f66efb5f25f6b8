"""End to end over real aiortc connections: SDK publisher -> bridge -> AIC and Opus subscribers."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging

import numpy as np

from sfu_bridge.hint_auth import HintSigner, derive_stream_key
from sfu_bridge.hint_ext import Hint
from sfu_bridge.limiter import AsyncHintLimiter
from sfu_bridge.redis_store import connect_async
from sfu_bridge.sdk import AicPublisher, AicSubscriber

# Generous: the codec runs for real on a shared CPU; these tests check behaviour, not speed.
CONFIG = dict(deadline_ms=2_000.0, max_backlog_chunks=200, opted_out_users=frozenset({"dave"}))


class SeenStreams:
    """The real in-process codec, recording which streams reached it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen: set[str] = set()

    async def process(self, batch):
        self.seen.update(batch.stream_ids)
        return await self.inner.process(batch)


def test_sdk_publisher_to_aic_and_plain_subscribers(running_bridge, tokens, streaming_codec, replica_core, secret, caplog):
    from sfu_bridge.aic_payload import AicPayload, payload_size
    from sfu_bridge.rate_control import min_packet_ms
    from telemetry import metrics as m

    caplog.set_level(logging.DEBUG)
    codec = SeenStreams(replica_core())
    reg = m.local_registry()
    wire0 = {p: reg.counter(m.WIRE_BYTES, path=p) for p in ("ai", "native")}

    async def go():
        limiter = AsyncHintLimiter(connect_async(), bridge_id="test-sdk")  # embedded Redis
        async with running_bridge(codec, limiter=limiter, **CONFIG) as (server, base):
            pub = AicPublisher(
                base, "room1", tokens.issue("alice", "room1", ["publish"]),
                hint_key=derive_stream_key(secret, "room1"),
            )
            await pub.start()
            aic = AicSubscriber(
                base, "room1", tokens.issue("bob", "room1", ["subscribe"]),
                codec=streaming_codec, slot=0, keep_payloads=5,
            )
            plain = AicSubscriber(base, "room1", tokens.issue("carol", "room1", ["subscribe"]), aic=False)
            await aic.start()
            await plain.start()
            assert aic.aic_negotiated and not plain.aic_negotiated
            ok = await aic.wait_frames(n_aic=8, timeout_s=90)
            ok_plain = await plain.wait_frames(n_opus=16, timeout_s=90)
            # a late AIC subscriber joins mid-epoch: it must start decoding at an epoch start
            late = AicSubscriber(base, "room1", tokens.issue("dan", "room1", ["subscribe"]),
                                 codec=streaming_codec, slot=2)
            await late.start()
            ok_late = await late.wait_frames(n_aic=8, timeout_s=90)
            await late.stop()
            ok = ok and ok_late and late.stats.decoded_samples > 0
            restarts = server.media.core.epoch_restarts
            received = aic.stats.aic_frames
            stats = server.media.stats()
            stats["aic_received"] = received
            publisher = server.media.publishers["room1"]
            ingress = publisher.ingress
            stats["native_ingress"] = (ingress.packets, dict(ingress.drops), publisher.ingest.packets)
            wire = {p: reg.counter(m.WIRE_BYTES, path=p) - wire0[p] for p in ("ai", "native")}
            lim = dataclasses.replace(limiter.counters)  # snapshot with the stats
            ticks = server.media.core.ticks
            statuses = [await aic.stop(), await plain.stop(), await pub.stop()]
        await limiter.aclose()
        return ok, ok_plain, aic, plain, pub, stats, statuses, lim, ticks, late, restarts, wire

    ok, ok_plain, aic, plain, pub, stats, statuses, lim, ticks, late, restarts, wire = asyncio.run(go())
    assert ok and ok_plain, (aic.stats, plain.stats)
    assert statuses == [200, 200, 200]
    # the AIC subscriber decoded every AIC payload to 40, 80 or 120 ms of 24 kHz audio (6 kbps
    # goes in 120 ms packets), epoch by epoch
    assert aic.stats.bad_payloads == 0
    for sub in (aic, late):  # decoded = every payload of the epochs it followed from the start
        assert sub.stats.decoded_samples == 320 * sub.stats.in_sync_frames
        in_sync = sub.stats.aic_frames - sub.stats.out_of_sync
        assert 3 * in_sync <= sub.stats.in_sync_frames <= 9 * in_sync
        assert sub.stats.decoder_resets == len(sub.stats.epochs) >= 1
        assert sub.stats.epochs == sorted(set(sub.stats.epochs))  # epochs only move forward
        assert sub.stats.sequence_gaps == 0  # loopback: nothing lost
    # each AIC join opened a new epoch; the first subscriber followed it (reset, in sync)
    assert restarts >= 1 and len(aic.stats.epochs) >= 2
    assert late.stats.epochs[0] > aic.stats.epochs[0]
    # a subscriber that missed its epoch's first packet asked for a new one (RTCP PLI)
    assert late.stats.out_of_sync == 0 or late.stats.pli_sent >= 1
    assert all(np.isfinite(p).all() for p in aic.pcm)
    # the plain subscriber never saw an AIC packet
    assert plain.stats.aic_frames == 0 and plain.meter.totals("rx", ("rtp/120",))[0] == 0
    # the publisher's first consumed packet took aiortc's path; from then on its packets took
    # the native receive (aiortc_compat.RtpIngress), hints included: nothing dropped there
    native, native_drops, decoded = stats["native_ingress"]
    assert native_drops == {} and 0 < native and decoded - native <= 5
    # ... as the bridge's stats (GET /health) say
    assert stats["native_receive"] == {"publishers": 1, "packets": native}
    # hints were signed, verified and counted; none rejected
    assert stats["hints"].get("accepted", 0) > 5
    # ... through the Redis limiter: one call per tick that had hints, never one per hint
    assert 0 < lim.calls <= ticks and lim.allowed == stats["hints"]["accepted"]
    assert lim.calls < lim.allowed
    assert not any(k.startswith("dropped/") and k != "dropped/rate_limited" for k in stats["hints"])
    assert stats["frames"].get("ai", 0) >= stats["aic_received"]  # sent before received
    # wire: 6 kbps goes in 120 ms packets (rate_control.min_packet_ms); per ms of audio an AIC
    # packet is smaller than an Opus packet (20 ms), headers included
    aic_ms = min_packet_ms(8)
    assert aic_ms == 120 and max(AicPayload.parse(p).n_frames for p in aic.payloads) == 9
    aic_pt = aic._aic_pt
    aic_bytes = aic.meter.bytes_per_datagram("rx", f"rtp/{aic_pt}")
    opus_kind = next(k for k in plain.meter.rx if k.startswith("rtp/"))
    opus_bytes = plain.meter.bytes_per_datagram("rx", opus_kind)
    assert 0 < aic_bytes / aic_ms < opus_bytes / 20
    # the payload bytes sent reach the metrics by codec path (a full AIC payload is the
    # largest; one flushed early at an epoch change is shorter; the last tick's bytes may
    # still be waiting for the end of its fan-out)
    ai_payload = payload_size(8, 3 * aic_ms // 40)
    assert 0 < wire["ai"] <= stats["packets"]["aic"] * ai_payload
    assert wire["native"] > 0  # the plain subscriber's forwarded Opus
    assert aic_bytes * 1000 / aic_ms < opus_bytes * 50 / 2  # AIC needs < half of Opus's wire rate
    # privacy: no hint, code or audio bytes in any log record (DEBUG, all loggers)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name.startswith("aiortc") and r.levelno == logging.DEBUG for r in caplog.records)
    signer = HintSigner(secret)
    secrets = [signer.sign("room1", Hint(0, 6.0, 1, seq=i)) for i in range(1, 4)] + aic.payloads
    assert secrets
    for blob in secrets:
        for form in (blob.hex(), repr(blob)[2:-1], base64.b64encode(blob).decode()):
            assert form not in text
    for samples in (aic.pcm[0][:4], pub.source(0, 4)):  # audio, as numpy would print it
        assert str(samples)[1:-1].strip() not in text and repr(samples) not in text


def test_opted_out_stream_never_reaches_the_ai_and_forged_hints_are_dropped(
    running_bridge, tokens, streaming_codec, replica_core, secret
):
    codec = SeenStreams(replica_core())

    async def go():
        async with running_bridge(codec, **CONFIG) as (server, base):
            pub = AicPublisher(
                base, "room2", tokens.issue("dave", "room2", ["publish"]),
                hint_key=derive_stream_key(b"not-the-cluster-secret-at-all!!!", "room2"),
            )
            await pub.start()
            sub = AicSubscriber(base, "room2", tokens.issue("bob", "room2", ["subscribe"]), codec=None)
            await sub.start()
            ok = await sub.wait_frames(n_opus=20, timeout_s=90)
            stats = server.media.stats()
            await sub.stop()
            await pub.stop()
            return ok, sub, stats

    ok, sub, stats = asyncio.run(go())
    assert ok
    assert "room2" not in codec.seen  # opted out: no inference, ever
    assert sub.stats.aic_frames == 0 and sub.stats.opus_frames >= 20
    assert stats["frames"].get("fallback/opted_out", 0) > 0 and "ai" not in stats["frames"]
    assert stats["hints"].get("dropped/tag", 0) > 0 and stats["hints"].get("accepted", 0) == 0
