"""`auralink bench bridge`: streams per bridge worker at 40 ms ticks, and wire bitrate AIC vs Opus.

**Streams per worker** (one process, one core's worth of event loop): N publisher streams,
each with ``--aic-subs`` AIC subscribers and ``--opus-subs`` legacy subscribers, run the
bridge's real per-tick work back to back for ``--ticks`` ticks:

  SRTP unprotect + RTP parse of the publisher's two 20 ms Opus packets -> `MediaBridge.forward`:
  forwarded to the legacy subscribers (header template + SRTP in place + UDP ``sendto`` to a
  local sink socket, fastpath.py) and gathered into 40 ms chunks (`OpusIngest`) ->
  `BridgeCore.tick` (one FrameBatch) -> `MediaBridge.dispatch` (AIC payloads to the AIC
  subscribers, same send path). ``--decode-at replica`` (the default, as a WebRTC bridge's):
  a chunk is its packets, which the batch carries and the codec replica decodes - the worker
  decodes nothing, and what decoding costs the replica is measured apart
  (``opus_decode_us_per_stream_tick``). ``--decode-at bridge`` (``AURALINK_DECODE_AT=bridge``):
  the worker decodes them inline by libopus at 24 kHz. The bench's streams have DTX off.

The codec is EMULATED (answers every frame ``ai`` after ``--codec-ms`` of sleep, no CPU):
the figure is the bridge's own cost; the codec's compute lives on the Serve replicas and is
measured by ``auralink bench codec``. "Tick overhead" is a tick's wall time minus the time
spent awaiting the codec. ``streams_per_worker`` is the largest N of the ladder whose p99
tick overhead stays within ``--budget-ms`` (default 20 ms: half the tick, the rest is left
for the codec round trip).

**Wire bitrate**: a real bridge (aiohttp + aiortc, loopback UDP) with one SDK publisher, one
AIC subscriber and one plain Opus subscriber of the same audio; bytes are counted on each
subscriber's UDP sockets for ``--wire-s`` seconds (RTP/SRTP, RTCP, STUN; IPv4+UDP headers
added per datagram). Same emulated codec: AIC payload size does not depend on code values
(fixed 10-bit packing), so the bytes are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json
from deployments.contract import BatchResult, FrameBatch, bandwidth_codebooks

log = logging.getLogger(__name__)

DEFAULT_JSON = Path(__file__).resolve().parents[2] / "docs" / "bench" / "bridge.json"
TICK_S = 0.040
AIC_PT, OPUS_PT = 120, 111  # the payload types the bridge negotiates for AIC and Opus


class EmulatedCodec:
    """Codec-client stand-in for load tests: every frame `ai` after a fixed sleep, no model
    compute. A batch that carries DTX state (`FrameBatch.vad`) is answered as a replica
    answers it: its Opus rows decoded and run through the detector (`dtx` for silent rows),
    which costs CPU in this process; the streams-per-worker ladder sends none."""

    def __init__(self, codec_ms: float = 5.0) -> None:
        self.codec_ms = codec_ms
        self.calls = 0
        self._intake: Any = None

    async def process(self, batch: FrameBatch) -> BatchResult:
        self.calls += 1
        await asyncio.sleep(self.codec_ms / 1000.0)
        b = len(batch)
        n_q = bandwidth_codebooks(batch.bandwidth_kbps)
        f = batch.samples // 320
        codes = (np.arange(b * n_q * f, dtype=np.int64).reshape(b, n_q, f) * 37 % 1024).astype(np.int16)
        outcome, vad = np.zeros(b, np.uint8), None
        if batch.vad is not None:
            from deployments.contract import DTX_CODE
            from deployments.replica import OpusIntake
            from models.vad import VadConfig, vad_step

            if self._intake is None:
                self._intake = OpusIntake()
            pcm = self._intake.decode(batch.stream_ids, batch.opus) if batch.opus is not None else batch.pcm_float()
            silent, vad = vad_step(pcm, batch.vad, VadConfig.from_wire(batch.vad_config))
            outcome[silent] = DTX_CODE
        return BatchResult(
            stream_ids=list(batch.stream_ids), outcome_codes=outcome,
            epochs=batch.epochs.copy(), queue_ms=np.zeros(b, np.float32),
            compute_ms=np.full(b, self.codec_ms, np.float32), codes=codes,
            replica_id="emulated", vad=vad,
        )


def _srtp_pair() -> tuple[Any, Any]:
    from pylibsrtp import Policy, Session

    key = os.urandom(30)  # AES_CM_128_HMAC_SHA1_80: 16-byte key + 14-byte salt
    tx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    rx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND))
    return tx, rx


def send_path(native: int, outs: int) -> str:
    """How the emulated subscribers' packets were sent (`native` of `outs` on the C path)."""
    if outs and native == outs:
        return "native: header, SRTP and sendto in one C call (sfu_bridge/_rtpsend.c)"
    if native == 0:
        return "python: RtpWriter.write + socket.sendto (sfu_bridge._rtpsend not built)"
    return f"mixed: {native} of {outs} subscribers on the native path"


def receive_path(native: bool) -> str:
    """How the publishers' packets were received (`PublisherFeed.receiver`)."""
    if native:
        return "native: SRTP and the header's fields in one C call (aiortc_compat.RtpIngress)"
    return "aiortc: pylibsrtp unprotect + RtpPacket.parse (the native receive is off or not built)"


class LoopbackOut:
    """`RtpOut` whose transport is SRTP + a UDP socket to a local sink (same per-packet work).
    `with_mid`: packets carry the MID header extension (as before a subscriber's first receiver
    report); `send_refused` counts packets the socket's full buffer refused."""

    def __init__(self, aic: bool, sock: socket.socket, sink: tuple[str, int], with_mid: bool = True,
                 srtp_tx: Any = None) -> None:
        from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

        from sfu_bridge import rtp_ext
        from sfu_bridge.aiortc_compat import FastSrtp, native_path
        from sfu_bridge.fastpath import RtpWriter

        self.aic_pt = AIC_PT if aic else None
        self.opus_pt = OPUS_PT
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.mid = "0"
        self.ext_map = rtp_ext.AicHeaderExtensionsMap()
        self.ext_map.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        ]))
        self._srtp = FastSrtp(srtp_tx if srtp_tx is not None else _srtp_pair()[0])
        self.writer = RtpWriter(self.ssrc, self.ext_map, self.mid)
        self._with_mid = with_mid
        self._sock, self._sink = sock, sink
        self._native = native_path(self._srtp, sock, sink)
        self.packets = 0
        self.send_refused = 0
        self.payload_bytes = 0
        self.last_wire_bytes = 0

    @property
    def aic(self) -> bool:
        return self.aic_pt is not None

    async def send(self, payload_type: int, payload: bytes, timestamp: int, hint: bytes | None = None,
                   marker: bool = False) -> bool:
        return self.send_now(payload_type, payload, timestamp, marker)

    def send_now(self, payload_type: int, payload: bytes, timestamp: int, marker: bool = False) -> bool:
        # the bridge's own send (`RtpOut.send_now`'s); a closed socket's descriptor is never
        # handed to the native path (it may be reused)
        native = self._native if self._sock.fileno() >= 0 else None
        n = self.writer.send(native, payload_type, payload, timestamp, marker, self._with_mid,
                             srtp=self._srtp, sendto=self._sock.sendto, addr=self._sink)
        if n < 0:
            self.send_refused += 1  # sink buffer full: counted as not sent, like a congested socket
            return False
        self.packets += 1
        self.last_wire_bytes = n + 28
        self.payload_bytes += len(payload)
        return True


class PublisherFeed:
    """One publisher's inbound side: SRTP-protected Opus RTP packets, replayed in a loop."""

    def __init__(self, opus_packets: list[bytes]) -> None:
        self.tx, self.rx = _srtp_pair()
        self.packets = opus_packets
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.seq = 0
        self.ts = 0

    def receiver(self, media: Any, stream_id: str) -> Any:
        """What the bridge does with each of this publisher's datagrams once its first Opus
        packet was consumed (server.py): the native receive (aiortc_compat.RtpIngress, with
        aiortc's receiver statistics) when the extension is built, else aiortc's unprotect and
        parse; then `MediaBridge.forward`."""
        from aiortc.rtcrtpreceiver import StreamStatistics
        from aiortc.rtp import RtpPacket

        from sfu_bridge.aiortc_compat import RtpIngress, native_send_available

        if media.native_receive and native_send_available():
            pub = media.publishers[stream_id]
            pub.ingress = RtpIngress(lambda: self.rx, self.ssrc, OPUS_PT, media.payload_sink(pub, OPUS_PT),
                                     stats=StreamStatistics(48_000))  # as server.py sets it up
            return pub.ingress.take
        return lambda data: media.forward(stream_id, RtpPacket.parse(self.rx.unprotect(data)))

    def next_wire(self, n: int) -> list[bytes]:
        """The next n packets as they arrive on the bridge's socket (prepared outside timing)."""
        from aiortc.rtp import RtpPacket

        out = []
        for _ in range(n):
            pkt = RtpPacket(payload_type=OPUS_PT, sequence_number=self.seq & 0xFFFF, timestamp=self.ts,
                            ssrc=self.ssrc, payload=self.packets[self.seq % len(self.packets)])
            out.append(self.tx.protect(pkt.serialize()))
            self.seq += 1
            self.ts += 960
        return out


def _speechlike(seconds: float, rate: int = 48_000, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    tone = 0.2 * np.sin(2 * np.pi * 180 * t) + 0.1 * np.sin(2 * np.pi * 360 * t)
    return ((tone + 0.02 * rng.standard_normal(t.size)) * env).astype(np.float32)


def _opus_loop(seconds: float = 2.0) -> list[bytes]:
    from models.opus import OpusCodec

    pcm = _speechlike(seconds)
    n = pcm.size // 960 * 960
    (packets,) = OpusCodec(1, 48_000, 20, 32_000).encode([0], pcm[None, :n])
    return packets


async def _run_streams(n: int, ticks: int, aic_subs: int, opus_subs: int, codec_ms: float,
                       decode_at: str = "replica") -> dict:

    from sfu_bridge.core import BridgeCore
    from sfu_bridge.media import MediaBridge

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sink.setblocking(False)
    out_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out_sock.setblocking(False)
    addr = sink.getsockname()

    codec = EmulatedCodec(codec_ms)
    core = BridgeCore(codec, deadline_ms=20.0, max_backlog=3, capacity=max(n, 1),
                      opus_in=decode_at == "replica")
    media = MediaBridge(core, max_streams=max(n, 1), opus_bitrate=32_000)
    loop_packets = _opus_loop()
    feeds, receive = {}, {}
    for i in range(n):
        sid = f"s{i}"
        media.add_publisher(sid, f"user{i}", None).opus_pt = OPUS_PT
        feeds[sid] = PublisherFeed(loop_packets)
        receive[sid] = feeds[sid].receiver(media, sid)
        for _ in range(aic_subs):
            media.add_subscriber(sid, "sub", None, LoopbackOut(True, out_sock, addr))
        for _ in range(opus_subs):
            media.add_subscriber(sid, "sub", None, LoopbackOut(False, out_sock, addr))

    overheads, totals, cpus = [], [], []
    aic_at_start = 0
    for t in range(ticks + 5):  # 5 warm-up ticks
        if t == 5:
            aic_at_start = media.packets_by_kind["aic"]
        wire = {sid: f.next_wire(2) for sid, f in feeds.items()}
        t0 = time.perf_counter()
        c0 = time.thread_time()
        for sid, packets in wire.items():
            on_datagram = receive[sid]
            for data in packets:
                # unprotected and parsed (PublisherFeed.receiver); legacy subscribers: forwarded
                # as received; the AIC path: decoded inline
                on_datagram(data)
        ingest_ms = (time.perf_counter() - t0) * 1000.0
        report = await core.tick()
        await media.dispatch(report)
        total_ms = (time.perf_counter() - t0) * 1000.0
        cpu_ms = (time.thread_time() - c0) * 1000.0  # the emulated codec sleeps: no CPU
        try:
            while True:
                sink.recv(2048)
        except BlockingIOError:
            pass
        if t >= 5:
            overheads.append(ingest_ms + report.overhead_ms)
            totals.append(total_ms)
            cpus.append(cpu_ms)
    sink.close()
    out_sock.close()
    ov = np.asarray(overheads)
    return {
        "streams": n,
        "tick_overhead_ms_p50": round(float(np.percentile(ov, 50)), 3),
        "tick_overhead_ms_p99": round(float(np.percentile(ov, 99)), 3),
        "tick_overhead_ms_mean": round(float(ov.mean()), 3),
        "per_stream_us_mean": round(float(ov.mean()) * 1000.0 / max(n, 1), 1),
        "cpu_ms_per_tick_mean": round(float(np.mean(cpus)), 3),
        "cpu_ms_per_tick_p99": round(float(np.percentile(np.asarray(cpus), 99)), 3),
        "cpu_us_per_stream": round(float(np.mean(cpus)) * 1000.0 / max(n, 1), 1),
        "tick_wall_ms_p99": round(float(np.percentile(np.asarray(totals), 99)), 3),
        "frames": core.stats()["frames"],
        "decode_at": media.decode_at,
        "native_receive": media.stats()["native_receive"]["publishers"] == n,  # every publisher's
        # AIC packets sent per measured tick (a packet carries 40, 80 or 120 ms: its layer's)
        "aic_packets_per_tick": round((media.packets_by_kind["aic"] - aic_at_start) / max(ticks, 1), 3),
    }


def replica_decode_cost(streams: int = 20, ticks: int = 100) -> dict:
    """What decoding the publishers' Opus costs the codec replica when the bridge does not
    (`--decode-at replica`): the replica's own intake (`deployments.replica.OpusIntake`,
    libopus at 24 kHz) on `streams` streams' 40 ms chunks of the bench's packets, one
    batch per tick, thread CPU time."""
    from deployments.replica import OpusIntake

    intake = OpusIntake()
    packets = _opus_loop()
    ids = [f"s{i}" for i in range(streams)]
    k = 0
    cpu = 0.0
    for t in range(ticks + 5):
        rows = [(packets[k % len(packets)], packets[(k + 1) % len(packets)])] * streams
        k += 2
        c0 = time.thread_time()
        intake.decode(ids, rows)
        if t >= 5:
            cpu += time.thread_time() - c0
    return {"streams": streams, "ticks": ticks,
            "us_per_stream_tick": round(cpu * 1e6 / (streams * ticks), 1)}


async def _wire(seconds: float) -> dict:
    """Real aiortc connections on loopback: bytes on the subscribers' UDP sockets."""
    from aiohttp import web

    from sfu_bridge.config import BridgeConfig
    from sfu_bridge.hint_auth import derive_stream_key
    from sfu_bridge.sdk import AicPublisher, AicSubscriber
    from sfu_bridge.server import RedactingAccessLogger, make_server
    from sfu_bridge.tokens import TokenAuthority

    secret = os.urandom(32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = BridgeConfig(host="127.0.0.1", port=port, bridge_id="bench")
    server = make_server(cfg, EmulatedCodec(2.0), secret, hint_secret=secret)
    runner = web.AppRunner(server.app, access_log_class=RedactingAccessLogger)  # session URLs are capabilities
    await runner.setup()
    await web.TCPSite(runner, cfg.host, cfg.port).start()
    base = f"http://{cfg.host}:{cfg.port}"
    ta = TokenAuthority(secret)
    speech = _speechlike(4.0)

    def source(start: int, n: int) -> np.ndarray:
        idx = (np.arange(n) + start) % speech.size
        return speech[idx]

    try:
        pub = AicPublisher(base, "bench", ta.issue("p", "bench", ["publish"]),
                           hint_key=derive_stream_key(secret, "bench"), source=source)
        await pub.start()
        aic = AicSubscriber(base, "bench", ta.issue("a", "bench", ["subscribe"]), codec=None)
        plain = AicSubscriber(base, "bench", ta.issue("b", "bench", ["subscribe"]), aic=False)
        await aic.start()
        await plain.start()
        await aic.wait_frames(n_aic=10, timeout_s=30)
        await plain.wait_frames(n_opus=20, timeout_s=30)
        for m in (aic.meter, plain.meter, pub.meter):
            m.reset()
        counts0 = server.media.core.stats()["frames"]
        outs = {s.aic: s.out for s in server.media.subscribers["bench"].values()}
        payload0 = {k: o.payload_bytes for k, o in outs.items()}
        await asyncio.sleep(seconds)
        counts1 = server.media.core.stats()["frames"]
        payload_kbps = {
            k: (o.payload_bytes - payload0[k]) * 8 / seconds / 1000 for k, o in outs.items()
        }
        aic_pt = aic._aic_pt
        opus_kind = next(k for k in plain.meter.rx if k.startswith("rtp/"))
        aic_sender = next(s.aic_sender for s in server.media.subscribers["bench"].values() if s.aic)
        res = {
            "window_s": seconds,
            "aic_packet_ms": aic_sender.layer.packet_ms,
            "aic_kbps": round(aic.meter.kbps("rx"), 2),
            "opus_kbps": round(plain.meter.kbps("rx"), 2),
            "aic_media_kbps": round(aic.meter.kbps("rx", (f"rtp/{aic_pt}",)), 2),
            "opus_media_kbps": round(plain.meter.kbps("rx", (opus_kind,)), 2),
            "aic_payload_kbps": round(payload_kbps[True], 2),
            "opus_payload_kbps": round(payload_kbps[False], 2),
            "aic_packet_bytes_on_wire": round(aic.meter.bytes_per_datagram("rx", f"rtp/{aic_pt}"), 1),
            "opus_packet_bytes_on_wire": round(plain.meter.bytes_per_datagram("rx", opus_kind), 1),
            "aic_rx_by_kind": {k: v for k, v in aic.meter.rx.items()},
            "opus_rx_by_kind": {k: v for k, v in plain.meter.rx.items()},
            "publisher_tx_kbps": round(pub.meter.kbps("tx"), 2),
            "frames_in_window": {k: counts1.get(k, 0) - counts0.get(k, 0) for k in counts1},
        }
        await aic.stop()
        await plain.stop()
        await pub.stop()
    finally:
        await runner.cleanup()
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    parser.add_argument("--ladder", default="5,10,20,30,40,50,60,80,120,160,200,240,320",
                        help="stream counts to try, ascending (stops after the first over budget)")
    parser.add_argument("--ticks", type=int, default=100, help="measured ticks per step")
    parser.add_argument("--aic-subs", type=int, default=1, help="AIC subscribers per stream")
    parser.add_argument("--opus-subs", type=int, default=1, help="Opus subscribers per stream")
    parser.add_argument("--codec-ms", type=float, default=5.0, help="emulated codec latency")
    parser.add_argument("--budget-ms", type=float, default=20.0,
                        help="p99 tick overhead allowed (of the 40 ms tick)")
    parser.add_argument("--wire-s", type=float, default=10.0, help="wire measurement window")
    parser.add_argument("--fanout-streams", type=int, default=20,
                        help="streams of the fan-out cost measurement")
    parser.add_argument("--fanout-repeats", type=int, default=3,
                        help="base/extra run pairs of the fan-out measurement (the median is kept)")
    parser.add_argument("--extra-subs", type=int, default=10,
                        help="extra AIC subscribers per stream in the fan-out cost measurement")
    parser.add_argument("--decode-at", choices=("replica", "bridge"), default="replica",
                        help="where publishers' Opus is decoded: by the codec replica (a WebRTC bridge's "
                             "default: the worker forwards and batches packets) or by the worker "
                             "(AURALINK_DECODE_AT=bridge)")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    from sfu_bridge import rtp_ext

    rtp_ext.install()
    ladder = [int(x) for x in args.ladder.split(",") if x.strip()]
    steps = []
    for n in ladder:
        step = asyncio.run(_run_streams(n, args.ticks, args.aic_subs, args.opus_subs, args.codec_ms,
                                        args.decode_at))
        steps.append(step)
        log.info("streams=%d p99 tick CPU %.2f ms, p99 wall overhead %.2f ms", n,
                 step["cpu_ms_per_tick_p99"], step["tick_overhead_ms_p99"])
        if step["cpu_ms_per_tick_p99"] > args.budget_ms:
            break
    # Capacity from the bridge thread's CPU time per tick (what one dedicated core spends);
    # wall-clock on a shared machine adds other processes' time slices and is reported beside.
    fit = [s for s in steps if s["cpu_ms_per_tick_p99"] <= args.budget_ms]
    fit_wall = [s for s in steps if s["tick_overhead_ms_p99"] <= args.budget_ms]
    best = fit[-1] if fit else steps[0]
    per_stream_us = float(np.median([s["per_stream_us_mean"] for s in steps]))
    cpu_us = float(np.median([s["cpu_us_per_stream"] for s in steps]))
    # Fan-out cost: the same streams with `--extra-subs` more AIC subscribers each; the CPU
    # difference per tick over the extra packets is what one more subscriber packet costs.
    # Base and extra runs alternate `--fanout-repeats` times; the median pair (by CPU
    # difference) is reported: one pair on a shared machine moves by a third between runs.
    n_fan = args.fanout_streams
    pairs = []
    for _ in range(max(1, args.fanout_repeats)):
        b = asyncio.run(_run_streams(n_fan, args.ticks, args.aic_subs, args.opus_subs, args.codec_ms,
                                     args.decode_at))
        m = asyncio.run(_run_streams(n_fan, args.ticks, args.aic_subs + args.extra_subs, args.opus_subs,
                                     args.codec_ms, args.decode_at))
        pairs.append((m["cpu_ms_per_tick_mean"] - b["cpu_ms_per_tick_mean"], b, m))
    pairs.sort(key=lambda p: p[0])
    _, base, more = pairs[len(pairs) // 2]
    fanout_spread = [round(p[0] * 1000.0 / (n_fan * args.extra_subs), 2) for p in pairs]
    # the extra subscribers' packets actually sent: one per packet duration of their layer
    # (the streams' default 6 kbps: 8 codebooks in 120 ms packets, one every third tick)
    extra_packets = more["aic_packets_per_tick"] - base["aic_packets_per_tick"]
    extra_cpu_us = (more["cpu_ms_per_tick_mean"] - base["cpu_ms_per_tick_mean"]) * 1000.0
    us_per_extra = extra_cpu_us / max(extra_packets, 1e-9)
    us_per_extra_sub_tick = extra_cpu_us / (n_fan * args.extra_subs)
    decode = replica_decode_cost(ticks=args.ticks)
    wire = asyncio.run(_wire(args.wire_s))
    from sfu_bridge.aiortc_compat import native_send_available

    data = {
        "bench": "bridge",
        "machine": machine_description(),
        "revision": git_revision(),
        "codec": f"emulated ({args.codec_ms} ms, no CPU): bridge-side cost only",
        "weights": "n/a (emulated codec)",
        "send_path": send_path(int(native_send_available()), 1),  # its loopback subscribers
        "receive_path": receive_path(all(st["native_receive"] for st in steps)),
        "decode_at": args.decode_at,
        # measured apart: with --decode-at replica this CPU is the codec replica's, not in the
        # bridge's figures; with --decode-at bridge the worker spends it and it is in them
        "opus_decode_us_per_stream_tick": decode["us_per_stream_tick"],
        "opus_decode_measurement": decode,
        "subscribers_per_stream": {"aic": args.aic_subs, "opus": args.opus_subs},
        "tick_ms": TICK_S * 1000,
        "budget_ms": args.budget_ms,
        "streams_per_worker": best["streams"] if fit else 0,
        "streams_per_worker_method": "largest ladder step with p99 bridge CPU time per tick <= budget",
        "p99_tick_overhead_ms": best["cpu_ms_per_tick_p99"],
        "p99_tick_overhead_wall_ms": best["tick_overhead_ms_p99"],
        "streams_per_worker_wall_measured": max((s["streams"] for s in fit_wall), default=0),
        "per_stream_us_mean": per_stream_us,
        "cpu_us_per_stream_per_tick": cpu_us,
        "streams_per_core_cpu_derived": int(args.budget_ms * 1000 / cpu_us),
        "ladder": steps,
        "fanout_us_per_extra_packet": round(us_per_extra, 2),
        "fanout_us_per_extra_subscriber_tick": round(us_per_extra_sub_tick, 2),
        "fanout_measurement": {"streams": n_fan, "extra_aic_subscribers_per_stream": args.extra_subs,
                               "cpu_ms_per_tick_base": base["cpu_ms_per_tick_mean"],
                               "cpu_ms_per_tick_with_extra": more["cpu_ms_per_tick_mean"],
                               "aic_packets_per_tick_base": base["aic_packets_per_tick"],
                               "aic_packets_per_tick_with_extra": more["aic_packets_per_tick"],
                               "us_per_extra_subscriber_tick_each_repeat": fanout_spread},
        "wire_kbps_aic": wire["aic_kbps"],
        "wire_kbps_opus": wire["opus_kbps"],
        "wire": wire,
        "load_average": os.getloadavg()[0],
        "command": "auralink bench bridge --json docs/bench/bridge.json"
                   + ("" if args.decode_at == "replica" else f" --decode-at {args.decode_at}"),
    }
    write_json(args.json, data)
    if not args.no_docs:
        update_docs_section("bridge", _markdown(data))
    print(f"streams_per_worker={data['streams_per_worker']} decode_at={args.decode_at} "
          f"p99_tick_overhead_ms={data['p99_tick_overhead_ms']} "
          f"fanout_us_per_extra_packet={data['fanout_us_per_extra_packet']} "
          f"wire_kbps_aic={data['wire_kbps_aic']} wire_kbps_opus={data['wire_kbps_opus']}")
    return 0


def _decode_words(d: dict) -> str:
    us = d["opus_decode_us_per_stream_tick"]
    if d["decode_at"] == "replica":
        return (f"by the codec replica** (a WebRTC bridge's default): the worker forwards and batches the "
                f"packets; decoding them costs the replica {us} us of CPU per stream per tick "
                f"(`OpusIntake`, measured apart), which is not in this worker's figures below.")
    return (f"by this worker** (`AURALINK_DECODE_AT=bridge`): {us} us of CPU per "
            f"stream per tick of libopus (measured apart), included in the figures below.")


def _markdown(d: dict) -> str:
    w = d["wire"]
    rows = "\n".join(
        f"| {s['streams']} | {s['tick_overhead_ms_p50']} | {s['tick_overhead_ms_p99']} "
        f"| {s['cpu_ms_per_tick_p99']} | {s['per_stream_us_mean']} | {s['cpu_us_per_stream']} |"
        for s in d["ladder"]
    )
    return f"""## bridge

`{d['command']}` at revision {d['revision']} - {d['machine']},
load average {d['load_average']:.1f} at the end of the run (a shared machine: figures are lower bounds).
Codec: **{d['codec']}**; send path: {d['send_path']}; receive path: {d['receive_path']}; each stream has {d['subscribers_per_stream']['aic']} AIC and
{d['subscribers_per_stream']['opus']} Opus subscriber(s). One worker process = one event loop.
Publishers' Opus is decoded **{_decode_words(d)}

**Streams per worker: {d['streams_per_worker']}** at 40 ms ticks: the largest step of the
ladder whose p99 bridge CPU time per tick ({d['p99_tick_overhead_ms']} ms, thread CPU time of
the worker's event loop) stays within {d['budget_ms']} ms of the 40 ms tick - what one
dedicated core spends. Wall-clock on this shared machine adds other processes' time slices:
p99 wall overhead at that step was {d['p99_tick_overhead_wall_ms']} ms, and the largest step
within budget wall-clock was {d['streams_per_worker_wall_measured']} streams. CPU per stream
per tick: {d['cpu_us_per_stream_per_tick']} us (the median over the ladder's steps; the table
has each step's, the mean over its ticks). Run one worker per core
(`auralink bridge --workers N`: one port each, a front proxy routes by stream id).

**Fan-out: {d['fanout_us_per_extra_packet']} us CPU per extra subscriber packet** -
{d['fanout_measurement']['streams']} streams with {d['fanout_measurement']['extra_aic_subscribers_per_stream']}
more AIC subscribers each: {d['fanout_measurement']['cpu_ms_per_tick_base']} ->
{d['fanout_measurement']['cpu_ms_per_tick_with_extra']} ms CPU per tick (mean), over the extra
packets sent ({d['fanout_measurement']['aic_packets_per_tick_base']} ->
{d['fanout_measurement']['aic_packets_per_tick_with_extra']} AIC packets per tick: the streams'
default 6 kbps is 8 codebooks in 120 ms packets, so a subscriber gets one every third tick).
Per extra subscriber and 40 ms tick: {d['fanout_us_per_extra_subscriber_tick']} us (AicSender,
RTP header template, SRTP in place, `sendto`; fastpath.py); the median of
{len(d['fanout_measurement']['us_per_extra_subscriber_tick_each_repeat'])} alternating base/extra
pairs, each pair's figure: {d['fanout_measurement']['us_per_extra_subscriber_tick_each_repeat']}.

| streams | p50 wall overhead ms | p99 wall overhead ms | p99 CPU ms / tick | wall us / stream | CPU us / stream |
|---|---|---|---|---|---|
{rows}

**Wire bitrate** of one subscriber, same audio, measured on its UDP sockets over
{w['window_s']} s (SRTP + RTP header/extensions + RTCP + STUN, IPv4/UDP headers added):

| path | kbps on the wire | media packets only | RTP payload only | bytes per packet on the wire |
|---|---|---|---|---|
| AIC (EnCodec 6 kbps codes, {w.get('aic_packet_ms', 40)} ms packets) | {d['wire_kbps_aic']} | {w['aic_media_kbps']} | {w['aic_payload_kbps']} | {w['aic_packet_bytes_on_wire']} |
| Opus (32 kbps, 20 ms packets, forwarded) | {d['wire_kbps_opus']} | {w['opus_media_kbps']} | {w['opus_payload_kbps']} | {w['opus_packet_bytes_on_wire']} |

Per packet, headers cost the same on both paths (IPv4+UDP 28, RTP 12, SRTP tag 16 bytes with
the GCM profiles aiortc negotiates, plus whatever extensions the sender adds), so AIC's
{w.get('aic_packet_ms', 40)} ms packets carry {20 / w.get('aic_packet_ms', 40):.2g} x Opus's per-second header overhead; the
frames in the AIC window were {w['frames_in_window']} (fallback frames go out as Opus).
"""
