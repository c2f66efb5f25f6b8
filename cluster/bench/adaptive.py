"""`auralink bench adaptive`: adaptive compression with real WebRTC peers on this machine.

A real bridge (aiohttp + aiortc, the product's `make_server`) with the in-process streaming
EnCodec (RANDOM weights unless pretrained ones are given: timings and sizes are real, audio
is noise) and SDK peers (aiortc) on loopback. Four parts:

1. **Wire bitrate on a conversation** (`wire_kbps_aic`, `wire_kbps_opus`, `wire_kbps_opus_dtx`):
   one talker's side of a conversation synthesised at run time with espeak-ng (speech turns
   with the other party's turns as pauses, cluster/bench/conversation.py). Stream "conv" is
   published with Opus at 32 kbps and its hints ask for 6 kbps (120 ms packets by default);
   an AIC subscriber (adaptive layers + DTX) and a plain Opus subscriber (the publisher's packets forwarded) receive it.
   Stream "conv-dtx" is the same audio published with Opus DTX (silent frames sent once and
   then every 400 ms, as browsers do) and received by a plain Opus subscriber. Each figure is
   one subscriber's bytes on its UDP sockets (RTP/SRTP, RTCP, STUN, IPv4+UDP headers) over the
   same window, as `bench bridge` measures.
2. **One encode, three layers** (`encodes_per_chunk`, `layer_kbps`): one publisher asking
   for 24 kbps, three AIC subscribers held at 1.5, 6 and 24 kbps; rows the codec encoded for
   the stream per chunk, and what each subscriber received.
3. **Hint to effect** (`hint_effect_ticks`): that publisher's hints switch to 6 kbps; ticks
   from the tick that accepted the hint to the first frame encoded at the new depth.
4. **Constrained link** (`constrained`): an AIC subscriber in a network namespace the bench
   creates (veth pair; `tc qdisc ... tbf rate 12kbit` on the bridge's side), its publisher
   asking for 12 kbps (18 kbit/s on the wire; 6 kbps, ~10 kbit/s, would fit), first free, then
   limited to 12 kbit/s, then lifted (the tbf rate raised to 100 Mbit/s); received bitrate and loss from the subscriber's side.
   `converge_s`: from the limit until the rate the bridge sends fits the link and loss from
   then until the lift stays < 2%; `loss_after`: that loss; `recover_s`: from the lift until
   the subscriber is back at the requested layer. The same link with adaptation off is the
   contrast. Needs root (`ip netns`); skipped, and said so, without it.

The voice-activity detector (models/vad.py, energy) is measured against the clean
signal's speech chunks, with noise added, and against WebRTC's `webrtcvad` when importable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JSON = REPO / "docs" / "bench" / "adaptive.json"
COMMAND = "auralink bench adaptive --json docs/bench/adaptive.json"
NETNS = "auralink-bench"
VETH_HOST, VETH_PEER = "alb0", "alb1"
HOST_IP, PEER_IP = "10.231.7.1", "10.231.7.2"


class CountingCodec:
    """Wraps the in-process codec client: rows encoded per stream (one per stream per chunk
    is the claim under test)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rows: Counter[str] = Counter()

    async def process(self, batch: Any) -> Any:
        self.rows.update(batch.stream_ids)
        return await self.inner.process(batch)

    async def leave(self, stream_ids: list[str]) -> None:
        await self.inner.leave(stream_ids)


class Bridge:
    """A real bridge on `host`, with its tick reports recorded."""

    def __init__(self, codec: Any, host: str = "127.0.0.1", adaptive: bool = True,
                 deadline_ms: float = 150.0) -> None:
        from sfu_bridge.config import BridgeConfig
        from sfu_bridge.server import make_server
        from sfu_bridge.tokens import TokenAuthority

        self.secret = os.urandom(32)
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        cfg = BridgeConfig(host=host, port=port, bridge_id="bench-adaptive",
                           deadline_ms=deadline_ms, adaptive=adaptive, dtx=True)
        self.codec = CountingCodec(codec)
        self.server = make_server(cfg, self.codec, self.secret, hint_secret=self.secret)
        self.media = self.server.media
        self.tokens = TokenAuthority(self.secret)
        self.base = f"http://{host}:{port}"
        self.cfg = cfg
        self.ticks: list[tuple[int, dict[str, tuple[str, int]]]] = []
        # (tick, codec rows per stream, AI frames per stream) at each tick's end: consistent
        self.tallies: list[tuple[int, Counter, Counter]] = []
        self._ai: Counter[str] = Counter()
        dispatch = self.media.dispatch

        async def recording(report: Any) -> None:
            frames = report.frames()
            self.ticks.append((report.tick, {f.stream_id: (f.key, f.n_q) for f in frames}))
            self._ai.update(f.stream_id for f in frames if f.key == "ai")
            self.tallies.append((report.tick, Counter(self.codec.rows), Counter(self._ai)))
            await dispatch(report)

        self.media.dispatch = recording  # before start: the tick loop binds it then
        self._runner: Any = None

    async def __aenter__(self) -> Bridge:
        from aiohttp import web

        from sfu_bridge.server import RedactingAccessLogger

        self._runner = web.AppRunner(self.server.app, access_log_class=RedactingAccessLogger)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.cfg.host, self.cfg.port).start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._runner.cleanup()

    def publisher(self, stream: str, pcm: np.ndarray, **kw: Any) -> Any:
        from cluster.bench.conversation import source
        from sfu_bridge.hint_auth import derive_stream_key
        from sfu_bridge.sdk import AicPublisher

        return AicPublisher(self.base, stream, self.tokens.issue("pub-" + stream, stream, ["publish"]),
                            hint_key=derive_stream_key(self.secret, stream), source=source(pcm), **kw)

    def subscriber(self, stream: str, user: str, aic: bool = True) -> Any:
        from sfu_bridge.sdk import AicSubscriber

        return AicSubscriber(self.base, stream, self.tokens.issue(user, stream, ["subscribe"]),
                             aic=aic, codec=None)

    def session_of(self, stream: str, index: int) -> str:
        return list(self.media.subscribers[stream])[index]


def _codec(capacity: int) -> Any:
    """An in-process codec replica (`CodecReplicaCore`, no Serve) on random weights."""
    from deployments.config import ReplicaSettings
    from deployments.replica import CodecReplicaCore

    return CodecReplicaCore(ReplicaSettings(capacity=capacity, max_batch=capacity, max_bandwidth_kbps=24.0,
                                            allow_random_weights=True), "bench-adaptive")


# -- 1. wire bitrate on a conversation -------------------------------------------------------
async def _wire(pcm: np.ndarray, seconds: float, codec: Any) -> dict[str, Any]:
    async with Bridge(codec) as br:
        pub = br.publisher("conv", pcm, bandwidth_kbps=6.0)
        pub_dtx = br.publisher("conv-dtx", pcm, opus_dtx=True, hints=False)
        await pub.start()
        await pub_dtx.start()
        aic = br.subscriber("conv", "aic")
        opus = br.subscriber("conv", "opus", aic=False)
        opus_dtx = br.subscriber("conv-dtx", "opus-dtx", aic=False)
        for s in (aic, opus, opus_dtx):
            await s.start()
        await aic.wait_frames(n_aic=5, timeout_s=30)
        await asyncio.sleep(1.0)
        for s in (aic, opus, opus_dtx):
            s.meter.reset()
        c0 = Counter(br.media.core.stats()["frames"])
        tx = br.media.subscribers["conv"][br.session_of("conv", 0)]
        sent0, payload0 = Counter(tx.sent_by_kind), tx.out.payload_bytes
        await asyncio.sleep(seconds)
        frames = Counter(br.media.core.stats()["frames"]) - c0
        sent = Counter(tx.sent_by_kind) - sent0
        payload = tx.out.payload_bytes - payload0
        res = {
            "window_s": seconds,
            "wire_kbps_aic": round(aic.meter.kbps("rx"), 2),
            "wire_kbps_opus": round(opus.meter.kbps("rx"), 2),
            "wire_kbps_opus_dtx": round(opus_dtx.meter.kbps("rx"), 2),
            "aic_rx_by_kind": dict(aic.meter.rx),
            "opus_rx_by_kind": dict(opus.meter.rx),
            "opus_dtx_rx_by_kind": dict(opus_dtx.meter.rx),
            "frames_in_window": dict(frames),
            "dtx_fraction_of_chunks": round(frames.get("dtx", 0) / max(1, sum(frames.values())), 3),
            "aic_layers": _mode_layer(br, "conv"),
            "aic_packets_sent": dict(sent),
            "aic_bits": _where_the_bits_go(aic.meter, payload, seconds),
            "publisher_dtx_frames_not_sent": pub_dtx.dtx_skipped,
        }
        for s in (aic, opus, opus_dtx, pub, pub_dtx):
            await s.stop()
    return res


def _mode_layer(br: Bridge, stream: str) -> dict[str, Any]:
    return br.media.stream_stats().get(stream, {})


def _where_the_bits_go(meter: Any, payload_bytes: int, seconds: float) -> dict[str, float]:
    """The AIC subscriber's received kbit/s split: AIC payloads (what the bridge sent; SIDs
    included), RTP header + extensions + SRTP tag, IPv4+UDP headers, RTCP, STUN."""
    from sfu_bridge.media import IP_UDP_HEADER_BYTES

    def kbps(n_bytes: float) -> float:
        return round(n_bytes * 8 / seconds / 1000.0, 2)

    rtp = [v for k, v in meter.rx.items() if k.startswith("rtp/")]
    rtp_packets, rtp_bytes = sum(v[0] for v in rtp), sum(v[1] for v in rtp)
    rtcp, stun = meter.rx.get("rtcp", [0, 0]), meter.rx.get("stun", [0, 0])
    datagrams = sum(v[0] for v in meter.rx.values())
    return {"payload_kbps": kbps(payload_bytes),
            "rtp_srtp_headers_kbps": kbps(rtp_bytes - payload_bytes),
            "ip_udp_kbps": kbps(datagrams * IP_UDP_HEADER_BYTES),
            "rtcp_kbps": kbps(rtcp[1]), "stun_kbps": kbps(stun[1]),
            "rtp_packets_per_s": round(rtp_packets / seconds, 2)}


# -- 2 + 3. one encode for three layers; hint to effect ----------------------------------------
async def _layers(pcm: np.ndarray, seconds: float, codec: Any) -> dict[str, Any]:
    from sfu_bridge.rate_control import default_layer

    async with Bridge(codec) as br:
        pub = br.publisher("layers", pcm, bandwidth_kbps=24.0)
        await pub.start()
        subs = [br.subscriber("layers", f"l{i}") for i in range(3)]
        for s in subs:
            await s.start()
        kbps = (1.5, 6.0, 24.0)
        for i, k in enumerate(kbps):
            br.media.pin_layer(br.session_of("layers", i), default_layer(int(k / 0.75)))
        await subs[0].wait_frames(n_aic=5, timeout_s=30)
        await asyncio.sleep(1.0)
        for s in subs:
            s.meter.reset()
        first = len(br.tallies)
        payload0 = [s.stats.aic_frames for s in subs]
        n_q0 = [len(s.stats.aic_n_q) for s in subs]
        await asyncio.sleep(seconds)
        (_, r0, a0), (_, r1, a1) = br.tallies[first], br.tallies[-1]
        rows, ai = r1["layers"] - r0["layers"], a1["layers"] - a0["layers"]
        layer_kbps = {}
        for s, k, p0, q0 in zip(subs, kbps, payload0, n_q0, strict=True):
            n_qs = Counter(s.stats.aic_n_q[q0:])
            layer_kbps[str(k)] = {
                "n_q": n_qs.most_common(1)[0][0] if n_qs else 0,
                "packet_ms": default_layer(int(k / 0.75)).packet_ms,
                "codec_kbps": (n_qs.most_common(1)[0][0] * 0.75) if n_qs else 0.0,
                "wire_kbps": round(s.meter.kbps("rx"), 2),
                "packets": s.stats.aic_frames - p0,
            }
        # 3. the publisher now asks for 6 kbps: from the accepting tick to the first frame at 8 books
        core = br.media.core
        pub.bandwidth_kbps = 6.0
        t_end = time.monotonic() + 5.0
        while core.stream("layers").requested_kbps != 6.0 and time.monotonic() < t_end:
            await asyncio.sleep(0.005)
        accepted = core.stream("layers").hint_tick
        await asyncio.sleep(0.5)
        first_at = next((t for t, fr in br.ticks if accepted is not None and t > accepted
                         and fr.get("layers", ("", 0))[1] == 8), None)
        for s in (*subs, pub):
            await s.stop()
    return {
        "window_s": seconds,
        "encodes_per_chunk": round(rows / max(1, ai), 3),
        "codec_rows": rows,
        "ai_chunks": ai,
        "layer_kbps": layer_kbps,
        "hint_effect_ticks": None if first_at is None or accepted is None else first_at - accepted,
    }


# -- 4. constrained link -------------------------------------------------------------------
def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def _namespace():
    _sh("ip", "netns", "del", NETNS, check=False)
    _sh("ip", "link", "del", VETH_HOST, check=False)
    _sh("ip", "netns", "add", NETNS)
    try:
        _sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_PEER)
        _sh("ip", "link", "set", VETH_PEER, "netns", NETNS)
        _sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST)
        _sh("ip", "link", "set", VETH_HOST, "up")
        _sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{PEER_IP}/30", "dev", VETH_PEER)
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_PEER, "up")
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        yield
    finally:
        _sh("tc", "qdisc", "del", "dev", VETH_HOST, "root", check=False)
        _sh("ip", "link", "del", VETH_HOST, check=False)
        _sh("ip", "netns", "del", NETNS, check=False)


def _limit(kbit: int | None, latency_ms: int) -> None:
    """Limit the bridge -> subscriber direction to `kbit`; None lifts the limit by raising the
    rate (`tc qdisc change`: the queued packets drain instead of being dropped, as a link that
    frees up does)."""
    # burst: one MTU-sized packet's worth; latency bounds the queue (then drops)
    rate = f"{kbit}kbit" if kbit is not None else "100mbit"
    verb = "add" if kbit is not None else "change"
    if kbit is not None:
        _sh("tc", "qdisc", "del", "dev", VETH_HOST, "root", check=False)
    _sh("tc", "qdisc", verb, "dev", VETH_HOST, "root", "tbf", "rate", rate, "burst", "1600",
        "latency", f"{latency_ms}ms")


async def _constrained_run(pcm: np.ndarray, codec: Any, adaptive: bool, link_kbit: int,
                           free_s: float, limit_s: float, after_s: float, latency_ms: int,
                           requested_kbps: float) -> dict[str, Any]:
    from sfu_bridge.rate_control import default_layer

    async with Bridge(codec, host=HOST_IP, adaptive=adaptive) as br:
        stream = "link"
        pub = br.publisher(stream, pcm, bandwidth_kbps=requested_kbps)
        await pub.start()
        total = free_s + limit_s + after_s + 5.0
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", NETNS, sys.executable, "-m", "cluster.bench.adaptive_peer",
            "--url", br.base, "--stream", stream, "--seconds", str(total), "--every", "0.25",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env, cwd=str(REPO))
        proc.stdin.write((br.tokens.issue("netns-peer", stream, ["subscribe"]) + "\n").encode())
        await proc.stdin.drain()
        samples: list[dict[str, Any]] = []
        layers: list[tuple[float, int, int, float]] = []  # (time, n_q, packet ms, sent kbit/s)
        trace: list[dict[str, Any]] = []  # the controller, per receiver report

        async def read() -> None:
            while True:
                line = await proc.stdout.readline()
                if not line:
                    return
                with contextlib.suppress(ValueError):
                    samples.append(json.loads(line))

        sent: list[tuple[float, int]] = []  # (time, wire bytes the bridge sent the subscriber)

        async def watch() -> None:
            while True:
                for sub in br.media.subscribers.get(stream, {}).values():
                    tx = sub.aic_sender
                    if tx is None:
                        continue
                    if tx.trace is None and tx.rate is not None:
                        tx.trace = trace
                    now = time.time()
                    sent.append((now, tx.wire_bytes))
                    back = [b for t, b in sent if t >= now - 1.0]
                    kbps = (sent[-1][1] - back[0]) * 8 / 1000.0 if len(back) > 1 else 0.0
                    layers.append((now, tx.layer.n_q, tx.layer.packet_ms, kbps))
                await asyncio.sleep(0.1)

        reader = asyncio.ensure_future(read())
        watcher = asyncio.ensure_future(watch())
        t_wait = time.time() + 30
        while not samples or samples[-1]["packets"] < 10:
            if time.time() > t_wait:
                raise RuntimeError("the namespaced subscriber received nothing")
            await asyncio.sleep(0.2)
        await asyncio.sleep(free_s)
        t_limit = time.time()
        _limit(link_kbit, latency_ms)
        await asyncio.sleep(limit_s)
        t_lift = time.time()
        _limit(None, latency_ms)
        await asyncio.sleep(after_s)
        watcher.cancel()
        proc.terminate()
        await reader
        await proc.wait()
        await pub.stop()
    out = _constrained_figures(samples, layers, t_limit, t_lift, link_kbit,
                               default_layer(int(requested_kbps / 0.75)))
    if adaptive:
        t0 = t_limit
        out["controller"] = [{**e, "t": round(e["t"] - (time.monotonic() - time.time() + t0), 2)}
                             for e in trace]
    return out


def _window(samples: list[dict[str, Any]], t0: float, t1: float) -> tuple[float, float]:
    """(received kbit/s, loss) between t0 and t1 from the subscriber's cumulative counters."""
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    if len(inside) < 2:
        return 0.0, 0.0
    a, b = inside[0], inside[-1]
    dt = b["t"] - a["t"]
    got, exp = b["packets"] - a["packets"], b["expected"] - a["expected"]
    kbps = (b["bytes"] - a["bytes"]) * 8 / dt / 1000 if dt > 0 else 0.0
    return kbps, (1 - got / exp) if exp > 0 else 0.0


def _constrained_figures(samples, layers, t_limit, t_lift, link_kbit, requested) -> dict[str, Any]:
    """`requested`: the layer a subscriber with room gets (the requested depth in its default
    packet duration); recovering means being back at it."""
    requested_n_q = requested.n_q
    def sent_kbps_at(t: float) -> float | None:
        """What the bridge sent the subscriber over the second before t (wire bytes)."""
        before = [x for x in layers if x[0] <= t]
        return before[-1][3] if before else None

    converge = None
    for s in samples:
        t = s["t"]
        if t < t_limit or t >= t_lift - 1.0:
            continue
        sent = sent_kbps_at(t)
        if sent is not None and sent <= link_kbit and _window(samples, t, t_lift)[1] < 0.02:
            converge = t - t_limit
            break
    loss_after = _window(samples, t_limit + converge, t_lift)[1] if converge is not None else None
    recover = next((x[0] - t_lift for x in layers if x[0] >= t_lift and x[1] >= requested_n_q
                    and x[2] <= requested.packet_ms), None)
    recover_n_q = next((x[0] - t_lift for x in layers if x[0] >= t_lift and x[1] >= requested_n_q),
                       None)
    free_kbps, free_loss = _window(samples, t_limit - 5.0, t_limit)
    lim_kbps, lim_loss = _window(samples, t_limit, t_lift)
    after_kbps, after_loss = _window(samples, t_lift + 2.0, samples[-1]["t"] if samples else t_lift)
    trace = [(round(x[0] - t_limit, 2), x[1], x[2]) for i, x in enumerate(layers)
             if i == 0 or (x[1], x[2]) != (layers[i - 1][1], layers[i - 1][2])]
    return {
        "converge_s": None if converge is None else round(converge, 2),
        "loss_after": None if loss_after is None else round(loss_after, 4),
        "recover_s": None if recover is None else round(recover, 2),
        "recover_n_q_s": None if recover_n_q is None else round(recover_n_q, 2),
        "received_kbps_free": round(free_kbps, 2), "loss_free": round(free_loss, 4),
        "received_kbps_limited": round(lim_kbps, 2), "loss_limited": round(lim_loss, 4),
        "received_kbps_lifted": round(after_kbps, 2), "loss_lifted": round(after_loss, 4),
        "layer_changes": trace,  # (s since the limit, codebooks, packet ms)
    }


async def _constrained(pcm: np.ndarray, codec_of, args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("ip"):
        return {"skipped": "needs root with iproute2 (ip netns, tc)"}
    from sfu_bridge.rate_control import default_layer, wire_kbps

    top = default_layer(int(args.constrained_kbps / 0.75))
    out: dict[str, Any] = {"link_kbit": args.link_kbit, "tbf_latency_ms": args.tbf_latency_ms,
                           "limit_s": args.limit_s, "requested_kbps": args.constrained_kbps,
                           "requested_n_q": top.n_q, "requested_packet_ms": top.packet_ms,
                           "requested_wire_kbps": round(wire_kbps(top.n_q, top.packet_ms), 2)}
    with _namespace():
        for adaptive in (True, False):
            r = await _constrained_run(pcm, codec_of(), adaptive, args.link_kbit, args.free_s,
                                       args.limit_s, args.after_s, args.tbf_latency_ms,
                                       args.constrained_kbps)
            out["adaptive" if adaptive else "adaptation_off"] = r
    a = out["adaptive"]
    out.update({"converge_s": a["converge_s"], "loss_after": a["loss_after"], "recover_s": a["recover_s"]})
    return out


# -- voice activity --------------------------------------------------------------------------
def _vad(seconds: float) -> dict[str, Any]:
    from cluster.bench.conversation import CHUNK_48K, conversation
    from models.vad import EnergyVad, TalkSpurt, VadConfig, chunk_levels_db

    def energy(pcm: np.ndarray) -> np.ndarray:
        ch = pcm[: pcm.size // CHUNK_48K * CHUNK_48K].reshape(-1, CHUNK_48K)[:, ::2]
        vad, floor, out = EnergyVad(), np.full(1, VadConfig().initial_floor_db), []
        for c in ch:
            s, floor = vad.decide(chunk_levels_db(c[None]), floor)
            out.append(bool(s[0]))
        return np.asarray(out)

    detectors = {"energy": energy}
    try:
        import webrtcvad  # not a dependency: measured when present

        def webrtc(pcm: np.ndarray) -> np.ndarray:
            v = webrtcvad.Vad(2)
            ch = (np.clip(pcm[: pcm.size // CHUNK_48K * CHUNK_48K], -1, 1) * 32767).astype(np.int16)
            ch = ch.reshape(-1, CHUNK_48K)
            return np.asarray([any(v.is_speech(c[k * 480:(k + 1) * 480].tobytes(), 48_000)
                                   for k in range(4)) for c in ch])

        detectors["webrtcvad (mode 2)"] = webrtc
    except ImportError:
        pass
    rows = []
    for noise in (None, -50.0, -40.0):
        pcm, truth = conversation(seconds, noise_dbfs=noise)
        for name, fn in detectors.items():
            dec = fn(pcm)[: truth.size]
            ts = TalkSpurt()
            active = np.asarray([ts.step(bool(d)).value == "active" for d in dec])
            rows.append({"detector": name, "noise_dbfs": noise,
                         "speech_chunks_sent": round(float(active[truth].mean()), 4),
                         "silent_chunks_in_dtx": round(float((~active[~truth]).mean()), 4)})
    return {"chosen": "energy", "hangover_ms": TalkSpurt().hangover_chunks * 40, "rows": rows}


def _turns_only(pcm: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """The speech chunks of the conversation, back to back (no pauses, no DTX)."""
    from cluster.bench.conversation import CHUNK_48K

    chunks = pcm[: speech.size * CHUNK_48K].reshape(-1, CHUNK_48K)[speech]
    return np.ascontiguousarray(chunks.reshape(-1))


# -- CLI ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    parser.add_argument("--wire-s", type=float, default=30.0, help="conversation window")
    parser.add_argument("--layers-s", type=float, default=5.0, help="three-layer window")
    parser.add_argument("--link-kbit", type=int, default=12)
    # 6 kbps goes out in 120 ms packets, ~10 kbit/s on the wire: under a 12 kbit/s link. At
    # 12 kbps (80 ms packets, 18 kbit/s) the link constrains the stream.
    parser.add_argument("--constrained-kbps", type=float, default=12.0,
                        help="bandwidth the constrained-link publisher asks for")
    parser.add_argument("--tbf-latency-ms", type=int, default=400,
                        help="tbf queue bound (then it drops)")
    parser.add_argument("--free-s", type=float, default=5.0)
    parser.add_argument("--limit-s", type=float, default=20.0)
    parser.add_argument("--after-s", type=float, default=15.0)
    parser.add_argument("--skip-constrained", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    from cluster.bench.conversation import conversation, espeak_available
    from sfu_bridge import rtp_ext

    rtp_ext.install()
    if not espeak_available():
        print("espeak-ng is not installed: run scripts/setup.sh", file=sys.stderr)
        return 2
    speech, truth = conversation(max(60.0, args.wire_s + 10.0))
    wire = asyncio.run(_wire(speech, args.wire_s, _codec(4)))
    # continuous speech (the talker's turns back to back): every tick has a frame to encode
    talk = _turns_only(speech, truth)
    layers = asyncio.run(_layers(talk, args.layers_s, _codec(4)))
    constrained = ({"skipped": "--skip-constrained"} if args.skip_constrained
                   else asyncio.run(_constrained(talk, lambda: _codec(2), args)))
    vad = _vad(60.0)
    data = {
        "bench": "adaptive",
        "machine": machine_description(),
        "revision": git_revision(),
        "weights": "random (seed 1234): sizes and timings are real, audio is noise",
        "signal": f"espeak-ng conversation, one talker, {truth.mean():.0%} of 40 ms chunks speech",
        "vad_detector": "energy (models/vad.py)",
        "wire_kbps_aic": wire["wire_kbps_aic"],
        "wire_kbps_opus": wire["wire_kbps_opus"],
        "wire_kbps_opus_dtx": wire["wire_kbps_opus_dtx"],
        "aic_below_opus": round(1 - wire["wire_kbps_aic"] / wire["wire_kbps_opus"], 3),
        "encodes_per_chunk": layers["encodes_per_chunk"],
        "layer_kbps": layers["layer_kbps"],
        "hint_effect_ticks": layers["hint_effect_ticks"],
        "constrained": constrained,
        "wire": wire,
        "layers": layers,
        "vad": vad,
        "load_average": os.getloadavg()[0],
        "command": COMMAND,
    }
    write_json(args.json, data)
    if not args.no_docs:
        update_docs_section("adaptive", _markdown(data))
    c = constrained
    print(f"wire_kbps_aic={data['wire_kbps_aic']} wire_kbps_opus={data['wire_kbps_opus']} "
          f"wire_kbps_opus_dtx={data['wire_kbps_opus_dtx']} encodes_per_chunk={data['encodes_per_chunk']} "
          f"hint_effect_ticks={data['hint_effect_ticks']} converge_s={c.get('converge_s')} "
          f"loss_after={c.get('loss_after')} recover_s={c.get('recover_s')}")
    return 0


def _markdown(d: dict) -> str:
    c = d["constrained"]
    lk = "\n".join(f"| {k} kbps | {v['n_q']} | {v.get('packet_ms', 40)} | {v['codec_kbps']} | {v['wire_kbps']} |"
                   for k, v in d["layer_kbps"].items())
    bits = d["wire"].get("aic_bits", {})
    bits_md = " / ".join(f"{bits[k]}" for k in ("payload_kbps", "rtp_srtp_headers_kbps", "ip_udp_kbps",
                                                 "rtcp_kbps", "stun_kbps") if k in bits)
    vad = "\n".join(f"| {r['detector']} | {r['noise_dbfs'] if r['noise_dbfs'] is not None else 'none'} "
                    f"| {r['speech_chunks_sent']} | {r['silent_chunks_in_dtx']} |" for r in d["vad"]["rows"])
    if "skipped" in c:
        cons = f"Constrained link: skipped ({c['skipped']})."
    else:
        a, off = c["adaptive"], c["adaptation_off"]
        cons = f"""Constrained link: an AIC subscriber (aiortc) in a network namespace behind a veth
pair, `tc qdisc add dev {VETH_HOST} root tbf rate {c['link_kbit']}kbit burst 1600 latency
{c['tbf_latency_ms']}ms` on the bridge's side for {c['limit_s']} s, then lifted (`tc qdisc
change ... rate 100mbit`: the queue drains); the
publisher asks for {c['requested_kbps']} kbps ({c.get('requested_n_q')} codebooks in {c.get('requested_packet_ms')} ms
packets, {c.get('requested_wire_kbps')} kbit/s on the wire; at 6 kbps the stream's 120 ms packets would fit
the link unadapted). From the subscriber's side:

| | adaptive | adaptation off |
|---|---|---|
| converge_s (goal <= 5) | **{a['converge_s']}** | {off['converge_s']} |
| loss_after (goal < 0.02) | **{a['loss_after']}** | {off['loss_after']} |
| recover_s (goal <= 10) | **{a['recover_s']}** | {off['recover_s']} |
| received kbit/s, free / limited / lifted | {a['received_kbps_free']} / {a['received_kbps_limited']} / {a['received_kbps_lifted']} | {off['received_kbps_free']} / {off['received_kbps_limited']} / {off['received_kbps_lifted']} |
| loss while limited | {a['loss_limited']} | {off['loss_limited']} |

Layer changes of the adaptive subscriber (s after the limit, codebooks, packet ms):
{a['layer_changes']}"""
    return f"""## adaptive

`{d['command']}` - {d['machine']}, load average {d['load_average']:.1f} at the end (a shared
machine). Real bridge and aiortc peers on this machine; codec: in-process streaming EnCodec,
**{d['weights']}**. Signal: {d['signal']}. Voice activity: **{d['vad_detector']}**.

| subscriber's wire bitrate (headers, RTCP, STUN included) | kbit/s |
|---|---|
| AIC (adaptive layers + DTX), `wire_kbps_aic` | **{d['wire_kbps_aic']}** |
| forwarded Opus 32 kbps, `wire_kbps_opus` | {d['wire_kbps_opus']} |
| Opus with DTX, `wire_kbps_opus_dtx` | {d['wire_kbps_opus_dtx']} |

AIC is {d['aic_below_opus']:.0%} below forwarded Opus (goal: >= 80% below, and below Opus DTX).
The publisher asks for 6 kbps: 8 codebooks in 120 ms packets (the default packet duration at
that depth, docs/protocol.md section 9: 80 ms more packetisation delay than 40 ms packets),
one silence descriptor per pause. Where the AIC
subscriber's kbit/s go - AIC payload / RTP header + SRTP tag / IPv4+UDP / RTCP / STUN:
{bits_md} ({bits.get('rtp_packets_per_s')} RTP packets/s). The stream's chunks in the window:
{d['wire']['frames_in_window']} (a fallback frame reaches the AIC subscriber as Opus packets, 50/s,
so fallback on a busy machine raises `wire_kbps_aic`).

One publisher asking for 24 kbps, three AIC subscribers held at three layers:
`encodes_per_chunk` = **{d['encodes_per_chunk']}** (codec rows for the stream per chunk).

| held at | codebooks received | packet ms | codec kbps | wire kbit/s |
|---|---|---|---|---|
{lk}

`hint_effect_ticks` = **{d['hint_effect_ticks']}** (the publisher's hints switch 24 -> 6 kbps:
ticks from the tick that accepted the hint to the first frame encoded at 8 codebooks).

{cons}

Voice activity on the same conversation, white noise added (speech chunks from the clean
signal; the talk spurt's {d['vad']['hangover_ms']} ms hangover included):

| detector | noise dBFS | speech chunks sent | silent chunks in DTX |
|---|---|---|---|
{vad}
"""
