"""RTCP between the bridge and one subscriber: receiver reports in, sender reports out.

The one place the rate-control glue touches aiortc internals (aiortc 1.16):

- ``RTCRtpSender._handle_rtcp_packet``: where aiortc routes the RTCP receiver reports
  (RFC 3550 section 6.4.2) a subscriber sends about our SSRC; wrapped to hand each report
  block to the subscriber's rate controller as well;
- ``RTCRtpSender._send_rtcp``: a subscriber's sender is trackless (the bridge writes its RTP
  itself, `media.RtpOut`), so aiortc's periodic sender report would say "0 packets at NTP
  time 0"; wrapped to send a true one (now, our packet and octet counts), whose send time
  we remember so that a report echoing it (LSR/DLSR) gives the round-trip time.

Everything else (what a report means, what to do about it) is pure logic in rate_control.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiortc import clock
from aiortc.rtp import RtcpRrPacket, RtcpSenderInfo, RtcpSrPacket

from sfu_bridge.rate_control import ReportBlock, SenderReportClock

AIORTC_VERSION = "1.16"

OnReport = Callable[[ReportBlock, float], None]  # (block about our SSRC, monotonic now)


def attach(sender: Any, counters: Callable[[], tuple[int, int, int]], sr_clock: SenderReportClock,
           on_report: OnReport) -> None:
    """Tap `sender` (an aiortc RTCRtpSender). `counters()` gives (packets, payload octets,
    RTP timestamp of the latest packet) of what the bridge sent on its SSRC."""
    handle = sender._handle_rtcp_packet
    send = sender._send_rtcp
    ssrc = sender._ssrc

    async def handle_rtcp_packet(packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            now = time.monotonic()
            for r in packet.reports:
                if r.ssrc == ssrc:
                    on_report(ReportBlock(r.fraction_lost, r.packets_lost, r.highest_sequence,
                                          r.jitter, r.lsr, r.dlsr), now)
        await handle(packet)

    async def send_rtcp(packets: list[Any]) -> None:
        fixed = []
        for p in packets:
            if isinstance(p, RtcpSrPacket) and p.ssrc == ssrc:
                n, octets, rtp_ts = counters()
                ntp = clock.current_ntp_time()
                sr_clock.sent(ntp, time.monotonic())
                p = RtcpSrPacket(ssrc=ssrc, sender_info=RtcpSenderInfo(
                    ntp_timestamp=ntp, rtp_timestamp=rtp_ts & 0xFFFFFFFF,
                    packet_count=n & 0xFFFFFFFF, octet_count=octets & 0xFFFFFFFF),
                    reports=p.reports)
            fixed.append(p)
        await send(fixed)

    sender._handle_rtcp_packet = handle_rtcp_packet
    sender._send_rtcp = send_rtcp
