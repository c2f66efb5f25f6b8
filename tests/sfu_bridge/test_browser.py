"""Real browser: headless Chromium publishes over WHIP (fake microphone); an SDK subscriber
receives AIC codes and a plain aiortc subscriber receives Opus."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import pytest
from aiohttp import web

from sfu_bridge.sdk import AicSubscriber

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]

PAGE = """<!doctype html><meta charset="utf-8"><title>WHIP publisher</title>
<script>
window.publish = async (stream, token) => {
  const media = await navigator.mediaDevices.getUserMedia({audio: true});
  const pc = new RTCPeerConnection({iceServers: []});  // nothing leaves the machine
  pc.addTransceiver(media.getAudioTracks()[0], {direction: "sendonly"});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => {
    if (pc.iceGatheringState === "complete") return ok();
    pc.addEventListener("icegatheringstatechange",
      () => pc.iceGatheringState === "complete" && ok());
  });
  const resp = await fetch("/whip/" + stream, {method: "POST", body: pc.localDescription.sdp,
    headers: {"Content-Type": "application/sdp", "Authorization": "Bearer " + token}});
  if (resp.status !== 201) return {status: resp.status, text: await resp.text()};
  await pc.setRemoteDescription({type: "answer", sdp: await resp.text()});
  window.whip = {pc, location: resp.headers.get("Location")};
  for (let i = 0; i < 400 && pc.connectionState !== "connected"; i++)
    await new Promise((ok) => setTimeout(ok, 50));
  return {status: resp.status, state: pc.connectionState, location: window.whip.location};
};
window.trickleFrom = async (origin, token) => {
  // a cross-origin PATCH (trickle ICE): the CORS preflight must let it through to the 405
  try {
    const r = await fetch(origin + window.whip.location, {method: "PATCH",
      body: "a=end-of-candidates\\r\\n", headers: {"Content-Type": "application/trickle-ice-sdpfrag",
      "Authorization": "Bearer " + token}});
    return {status: r.status};
  } catch (e) { return {error: String(e)}; }
};
window.sentBytes = async () => {
  let bytes = 0;
  (await window.whip.pc.getStats()).forEach((r) => {
    if (r.type === "outbound-rtp") bytes += r.bytesSent; });
  return bytes;
};
</script>"""


def require_chromium() -> None:
    if shutil.which("chromium") is None and not os.path.exists(CHROMIUM):
        pytest.fail(
            "Debian chromium is not installed: run `bash scripts/setup.sh --test` "
            "(the browser tests need it; they never download a browser)"
        )
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: run `bash scripts/setup.sh --test`")


def test_chromium_publishes_over_whip_to_aic_and_opus_subscribers(
    running_bridge, tokens, streaming_codec, replica_core
):
    require_chromium()
    from playwright.async_api import async_playwright

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def go():
        routes = [("GET", "/publish.html", page)]
        async with running_bridge(
            replica_core(), extra_routes=routes,
            deadline_ms=2_000.0, max_backlog_chunks=200,
            # the default: Chromium's Opus goes to the replica undecoded (test_gstreamer: decoded here)
        ) as (server, base):
            with tempfile.TemporaryDirectory() as profile:
                async with async_playwright() as pw:
                    ctx = await pw.chromium.launch_persistent_context(
                        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                    )
                    try:
                        tab = await ctx.new_page()
                        await tab.goto(f"{base}/publish.html")
                        token = tokens.issue("erin", "browser-room", ["publish"])
                        result = await tab.evaluate(
                            "([s, t]) => window.publish(s, t)", ["browser-room", token]
                        )
                        assert result["status"] == 201, result
                        assert result["state"] == "connected", result
                        other_origin = base.replace("127.0.0.1", "localhost")
                        trickle = await tab.evaluate(
                            "([o, t]) => window.trickleFrom(o, t)", [other_origin, token]
                        )
                        aic = AicSubscriber(
                            base, "browser-room", tokens.issue("bob", "browser-room", ["subscribe"]),
                            codec=streaming_codec, slot=1,
                        )
                        plain = AicSubscriber(
                            base, "browser-room",
                            tokens.issue("carol", "browser-room", ["subscribe"]), aic=False,
                        )
                        await aic.start()
                        await plain.start()
                        ok = await aic.wait_frames(n_aic=5, timeout_s=90)
                        ok_plain = await plain.wait_frames(n_opus=10, timeout_s=90)
                        sent = await tab.evaluate("window.sentBytes()")
                        stats = server.media.stats()
                        publisher = server.media.publishers["browser-room"]
                        stats["native_ingress"] = (publisher.ingress.packets, dict(publisher.ingress.drops),
                                                   publisher.ingest.packets)
                        await aic.stop()
                        await plain.stop()
                    finally:
                        await ctx.close()
        return result, ok, ok_plain, aic, plain, sent, stats, trickle

    result, ok, ok_plain, aic, plain, sent, stats, trickle = asyncio.run(go())
    assert result["location"].startswith("/whip/browser-room/")
    assert trickle == {"status": 405}, trickle  # not a CORS failure
    assert sent > 0
    assert ok, aic.stats
    assert ok_plain, plain.stats
    assert aic.stats.decoded_samples == 320 * aic.stats.in_sync_frames > 0
    in_sync = aic.stats.aic_frames - aic.stats.out_of_sync
    assert 3 * in_sync <= aic.stats.in_sync_frames <= 9 * in_sync
    assert plain.stats.aic_frames == 0
    assert stats["frames"].get("ai", 0) >= 5
    # the worker decoded nothing: the replica decoded Chromium's packets, chunk by chunk
    assert stats["decode_at"] == "replica" and stats["ingest_drops"] == {}
    # Chromium's packets (with its header extensions) took the native receive after the first
    native, native_drops, decoded = stats["native_ingress"]
    assert native_drops == {} and native > 0 and decoded - native <= 5, stats["native_ingress"]
    # same browser audio, two subscribers: wire cost per second from the packets on their
    # UDP sockets (SRTP, RTP header + extensions, UDP/IPv4 headers included); an AIC packet
    # carries 40, 80 or 120 ms (6 kbps: 120 ms, rate_control.min_packet_ms)
    packet_ms = 40 * aic.stats.in_sync_frames / 3 / in_sync
    aic_wire = aic.meter.bytes_per_datagram("rx", f"rtp/{aic._aic_pt}") * 1000 / packet_ms * 8 / 1000
    opus_kind = next(k for k in plain.meter.rx if k.startswith("rtp/"))
    opus_wire = plain.meter.bytes_per_datagram("rx", opus_kind) * 50 * 8 / 1000
    assert 0 < aic_wire < opus_wire / 2, (aic_wire, opus_wire)
