"""Interop beyond Chromium: GStreamer's webrtcbin (RSA DTLS certificate, libnice) publishes
over WHIP to the bridge, which must complete ICE and DTLS and decode its Opus.

webrtcbin offers `a=setup:actpass`; answered `active`, aiortc is the DTLS client and offers
only ECDHE-ECDSA suites, which webrtcbin's RSA certificate cannot serve ("no shared cipher").
The bridge answers `passive` (sfu_bridge/ice.py, `prefer_dtls_server`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi: the venv has no PyGObject
SCRIPT = Path(__file__).with_name("gst_whip_publisher.py")
ELEMENTS = ["webrtcbin", "nicesrc", "dtlssrtpenc", "srtpenc", "audiotestsrc", "opusenc", "rtpopuspay"]
PROBE = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0');"
    "gi.require_version('GstSdp', '1.0'); from gi.repository import Gst, GstWebRTC, GstSdp;"
    f"Gst.init(None); missing = [e for e in {ELEMENTS!r} if Gst.ElementFactory.find(e) is None];"
    "print(' '.join(missing)); raise SystemExit(1 if missing else 0)"
)
SECONDS = 4.0


def require_gstreamer() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the GStreamer interop test runs on Debian/Linux only")
    hint = "run `bash scripts/setup.sh --test` (installs Debian's GStreamer and python3-gi)"
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.fail(f"{SYSTEM_PYTHON} not found: {hint}")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", PROBE], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        detail = probe.stdout.strip() or probe.stderr.strip().splitlines()[-1:]
        pytest.fail(f"GStreamer WebRTC stack incomplete ({detail}): {hint}")


def test_gstreamer_webrtcbin_publishes_over_whip(running_bridge, tokens, streaming_codec, replica_core):
    require_gstreamer()

    async def go():
        async with running_bridge(
            replica_core(), deadline_ms=2_000.0, max_backlog_chunks=200,
            decode_at="bridge",  # the worker decodes (test_browser: the replica does)
        ) as (server, base):
            env = {**os.environ, "WHIP_TOKEN": tokens.issue("gst", "gst-room", ["publish"])}
            proc = await asyncio.create_subprocess_exec(
                SYSTEM_PYTHON, str(SCRIPT), f"{base}/whip/gst-room", str(SECONDS),
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            chunks = 0
            native = None
            wait = asyncio.ensure_future(proc.communicate())
            try:
                while not wait.done():  # the publisher's session ends with its DELETE
                    pub = server.media.publishers.get("gst-room")
                    if pub is not None:
                        chunks = max(chunks, pub.chunks)
                        if pub.ingress is not None:
                            native = (pub.ingress.packets, dict(pub.ingress.drops), pub.ingest.packets)
                    await asyncio.wait({wait}, timeout=0.1)
                out, err = await asyncio.wait_for(wait, timeout=50)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            # a publisher that leaves has its pending chunks answered in the bridge's next
            # ticks: on a loaded machine a backlog may still be draining when its DELETE is done
            stats = server.media.stats()
            for _ in range(100):
                if sum(stats["frames"].values()) >= chunks - 3:
                    break
                await asyncio.sleep(0.1)
                stats = server.media.stats()
            return proc.returncode, out.decode(), err.decode(), chunks, stats, native

    rc, out, err, chunks, stats, native = asyncio.run(go())
    lines = out.strip().splitlines()
    assert lines, (rc, err[-2000:])
    result = json.loads(lines[-1])
    assert result["status"] == 201, result
    assert set(result["offer_setup"]) == {"a=setup:actpass"}, result
    assert set(result["answer_setup"]) == {"a=setup:passive"}, result
    assert "connected" in result["states"] and "failed" not in result["states"], (result, err[-2000:])
    assert rc == 0 and result.get("delete_status") == 200, result
    # the bridge decoded the publisher's Opus into 40 ms chunks and gave each an outcome:
    # at least half of the published seconds (ICE + DTLS take some of them)
    assert chunks >= SECONDS / 2 / 0.040, (chunks, result)
    assert sum(stats["frames"].values()) >= chunks - 3, stats
    assert stats["decode_at"] == "bridge"  # AURALINK_DECODE_AT=bridge: webrtcbin's Opus decoded here
    # webrtcbin's packets took the native receive after the first (aiortc_compat.RtpIngress)
    assert native is not None and native[1] == {} and native[0] > 0 and native[2] - native[0] <= 5, native
