"""A bridge worker's CPU per received publisher packet, on real aiortc connections:

    .venv/bin/python scripts/receive_probe.py --receive native
    .venv/bin/python scripts/receive_probe.py --receive aiortc

`--publishers` SDK publishers (`AicPublisher`: real WebRTC, Opus at 20 ms, in a separate
process) publish to one bridge worker in this process (`make_server`: WHIP, `MediaBridge`,
the tick loop; an EMULATED codec, no CPU). After they are connected the probe measures this
process's CPU over `--seconds` and divides it by the publishers' packets the bridge received
in that window. `--receive native` is the bridge's default (aiortc_compat.fast_ingress: each
publisher's Opus packets unprotected and parsed by one C call once its first was consumed);
`--receive aiortc` keeps every packet on aiortc's path (aioice's STUN check and queue, the
DTLS transport's coroutine, pylibsrtp, `RtpPacket.parse`, the RTP router, the bridge's tap).
Both include the same decode, ticks and signalling, so their difference is the receive path.
`--decode-at replica` (the default) is a worker that decodes nothing (the codec replica
decodes its publishers' Opus, docs/operations.md "Where publishers' Opus is decoded");
`--decode-at bridge` decodes here. No subscribers: nothing is sent but RTCP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PUBLISHERS = """
import asyncio, json, sys
from sfu_bridge.sdk import AicPublisher
base, seconds, tokens = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
async def main():
    pubs = [AicPublisher(base, stream, token) for stream, token in tokens]
    for p in pubs:
        await p.start()
    print("up", flush=True)
    await asyncio.sleep(seconds)
    for p in pubs:
        await p.stop()
asyncio.run(main())
"""


async def probe(n: int, seconds: float, receive: str, decode_at: str = "replica") -> dict:
    from aiohttp import web

    from cluster.bench.bridge import EmulatedCodec
    from sfu_bridge.config import BridgeConfig
    from sfu_bridge.server import make_server
    from sfu_bridge.tokens import TokenAuthority

    secret = os.urandom(32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = BridgeConfig(host="127.0.0.1", port=port, bridge_id="probe", max_streams=max(16, n),
                          decode_at=decode_at)
    server = make_server(config, EmulatedCodec(5.0), secret)
    server.media.native_receive = receive == "native"
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ta = TokenAuthority(secret)
    tokens = [(f"p{i}", ta.issue(f"user{i}", f"p{i}", ["publish"])) for i in range(n)]
    warm = 4.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHERS, f"http://127.0.0.1:{port}", str(seconds + warm + 2),
        json.dumps(tokens), cwd=str(REPO), stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"up"
    await asyncio.sleep(warm)

    def received() -> int:
        return sum(p.ingest.packets for p in server.media.publishers.values() if p.ingest is not None)

    pkts0, cpu0 = received(), time.process_time()
    await asyncio.sleep(seconds)
    cpu, pkts = time.process_time() - cpu0, received() - pkts0
    native = sum(p.ingress.packets for p in server.media.publishers.values() if p.ingress is not None)
    await proc.wait()
    await runner.cleanup()
    return {"receive": receive, "decode_at": server.media.decode_at, "publishers": n, "seconds": seconds, "packets": pkts,
            "packets_native_total": native, "cpu_s": round(cpu, 3),
            "us_per_packet": round(cpu * 1e6 / max(pkts, 1), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receive", choices=("native", "aiortc"), default="native")
    ap.add_argument("--publishers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--decode-at", choices=("replica", "bridge"), default="replica")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(probe(args.publishers, args.seconds, args.receive, args.decode_at))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
