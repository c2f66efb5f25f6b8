"""The fan-out loop alone, in one process (docs/benchmarks.md, after section "fanout"):

    .venv/bin/python scripts/fanout_loop_probe.py --packet-ms 40
    .venv/bin/python scripts/fanout_loop_probe.py --packet-ms 120

A follower worker's `MediaBridge` (the stream relayed from another worker, cascade.py) with
N AIC subscribers pinned at one layer, each an SRTP context sending through one UDP socket to
a sink in this process (the bench's `LoopbackOut`); each tick hands it one relayed AI frame
(`dispatch_frames`, as the relay does) and times the thread CPU of that call. Prints the
median CPU per subscriber for each tick of a packet's period (a 120 ms packet is sent on one
tick in three) and per packet sent. No publisher, codec, relay socket or receiver process:
what is left is the per-subscriber work of the fan-out itself, `sendto` included.

`--send native` (the default, as the bridge sends where sfu_bridge._rtpsend is built) writes,
protects and sends each packet in one C call; `--send python` takes the Python path
(`RtpWriter.write` + the socket's `sendto`).

`--without sendto|srtp|both` splits the Python path's cost (it implies `--send python`): the
bench sink's `sendto` and/or libsrtp's `srtp_protect` are skipped (the packet is still built,
counted and, without SRTP, handed on unprotected), so the difference to a full run is what
those native calls cost and the rest is Python. `--without native` splits the native path's:
its one C call (header, SRTP, `sendto`) is replaced by a Python function that returns a
length, so what is left is the loop's Python."""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.bridge import EmulatedCodec, LoopbackOut  # noqa: E402
from deployments.contract import Outcome  # noqa: E402
from sfu_bridge import rtp_ext  # noqa: E402
from sfu_bridge.cascade import CascadeRelay, RelayedFrame  # noqa: E402
from sfu_bridge.core import BridgeCore  # noqa: E402
from sfu_bridge.media import MediaBridge  # noqa: E402
from sfu_bridge.rate_control import Layer  # noqa: E402


def _without(part: str) -> None:
    """Skip `sendto` (the bench sink's) and/or `srtp_protect`, or the native send, in this
    process (module doc)."""
    if part == "native":
        from sfu_bridge import fastpath

        fastpath.native_send = lambda path, template, b1, seq, ts, payload: len(template) + len(payload) + 16
        return
    if part in ("sendto", "both"):
        def send_now(self, payload_type, payload, timestamp, marker=False):  # LoopbackOut's, no socket
            data = self.writer.write(self._srtp, payload_type, payload, timestamp, marker, self._with_mid)
            self.packets += 1
            self.last_wire_bytes = len(data) + 28
            self.payload_bytes += len(payload)
            return True

        LoopbackOut.send_now = send_now  # type: ignore[method-assign]
    if part in ("srtp", "both"):
        from sfu_bridge.aiortc_compat import FastSrtp

        FastSrtp.protect_in_place = lambda self, n: self.buffer[0:n]  # type: ignore[method-assign]


def _drain(sink: socket.socket) -> None:
    try:
        while True:
            sink.recv(2048, socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass


async def probe(subscribers: int, n_q: int, packet_ms: int, ticks: int, send: str) -> None:
    rtp_ext.install()
    media = MediaBridge(BridgeCore(EmulatedCodec(1.0), bandwidth_kbps=24.0), max_streams=2)
    media.cascade = CascadeRelay(1, media)
    media.cascade.follow("s", ("127.0.0.1", 9))  # never sent to: only its bookkeeping is used
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for _ in range(subscribers):
        out = LoopbackOut(True, sock, sink.getsockname(), with_mid=False)
        if send == "python":
            out._native = None
        elif out._native is None:
            raise SystemExit("sfu_bridge._rtpsend is not built: only --send python is possible")
        sub = media.add_subscriber("s", "u", None, out)
        media.pin_layer(sub.session_id, Layer(n_q, packet_ms))
    codes = np.random.default_rng(0).integers(0, 1024, (32, 3)).astype(np.int16)
    period = packet_ms // 40
    warm = 2 * period
    dts = []
    p0 = 0
    for k in range(warm + ticks):
        if k == warm:
            p0 = sum(media.packets_by_kind.values())
        frame = RelayedFrame("s", Outcome.AI, None, 1, k, 1920 * k, codes, None, time.time())
        t = time.thread_time()
        media.dispatch_frames(k, [frame])
        if k >= warm:
            dts.append(time.thread_time() - t)
        _drain(sink)
    packets = sum(media.packets_by_kind.values()) - p0
    phases = [round(statistics.median(dts[i::period]) * 1e6 / subscribers, 2) for i in range(period)]
    print(f"{subscribers} subscribers at {n_q} codebooks in {packet_ms} ms packets, {ticks} ticks, "
          f"{send} send: "
          f"median CPU per subscriber by tick of the packet's period {phases} us; "
          f"{sum(dts) * 1e6 / max(packets, 1):.2f} us per packet ({packets} packets)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=2000)
    p.add_argument("--n-q", type=int, default=8, help="the subscribers' layer: codebooks")
    p.add_argument("--packet-ms", type=int, default=40, choices=(40, 80, 120))
    p.add_argument("--ticks", type=int, default=60)
    p.add_argument("--send", choices=("native", "python"), default="native",
                   help="the packet's write+SRTP+sendto in one C call, or the Python path")
    p.add_argument("--without", choices=("sendto", "srtp", "both", "native"),
                   help="skip native calls: of the Python path (sendto, srtp, both: implies --send "
                        "python) or the native send's one call (native) (module doc)")
    args = p.parse_args()
    if args.without:
        _without(args.without)
        args.send = "native" if args.without == "native" else "python"
        print(f"WITHOUT {args.without}: not a cost figure, one term of a split")
    asyncio.run(probe(args.subscribers, args.n_q, args.packet_ms, args.ticks, args.send))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
