"""An AIC subscriber for `auralink bench adaptive`'s constrained link, run in its own network
namespace (`ip netns exec ... python -m cluster.bench.adaptive_peer`). It subscribes over
WHEP and prints, every `--every` s, one JSON line: wall time, AIC packets and bytes received
(headers included: IPv4+UDP added per datagram) and packets expected from the RTP sequence
numbers, so the bench computes received bitrate and loss from the receiver's side."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from sfu_bridge.media import IP_UDP_HEADER_BYTES
from sfu_bridge.sdk import AicSubscriber


class CountingSubscriber(AicSubscriber):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.rx_packets = 0
        self.rx_bytes = 0
        self.highest: int | None = None  # extended highest sequence number
        self.first: int | None = None

    def _on_packet(self, packet) -> bool:
        if packet.payload_type == self._aic_pt:
            self.rx_packets += 1
            # wire size: RTP header + extensions + payload + SRTP tag (10) + IPv4/UDP
            self.rx_bytes += len(packet.serialize()) + 10 + IP_UDP_HEADER_BYTES
            seq = packet.sequence_number
            if self.highest is None:
                self.first = self.highest = seq
            else:
                d = (seq - (self.highest & 0xFFFF)) & 0xFFFF
                if d < 0x8000:
                    self.highest += d
        return super()._on_packet(packet)


async def main(args: argparse.Namespace) -> None:
    sub = CountingSubscriber(args.url, args.stream, args.token, codec=None)
    await sub.start()
    end = time.time() + args.seconds
    try:
        while time.time() < end:
            await asyncio.sleep(args.every)
            expected = 0 if sub.highest is None else sub.highest - sub.first + 1
            print(json.dumps({"t": time.time(), "packets": sub.rx_packets, "bytes": sub.rx_bytes,
                              "expected": expected, "sids": sub.stats.sid_frames}), flush=True)
    finally:
        await sub.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--token", default=None, help="WHEP bearer token (else read from stdin)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--every", type=float, default=0.5)
    a = p.parse_args()
    if a.token is None:
        a.token = sys.stdin.readline().strip()  # keeps the token off the process list
    asyncio.run(main(a))
