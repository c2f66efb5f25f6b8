"""The bridge's edge: non-ASCII tokens are 401 on WHIP and WHEP, and `auralink bridge --codec
serve` without a Ray cluster says what to run instead of dying with a traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


async def _raw_post(base: str, path: str, authorization: bytes) -> tuple[int, bytes]:
    """POST with an Authorization header of these exact bytes (clients refuse to send them)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b"v=0\r\n"
    writer.write(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Authorization: " + authorization + b"\r\nContent-Type: application/sdp\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("header", [
    b"Bearer al1.\xc3\xa9t\xc3\xa9.sig", b"Bearer al1.e30.\xe9", b"Bearer \xff\xfe\xfd",
])
def test_non_ascii_token_is_401_on_whip_and_whep(running_bridge, replica_core, header):
    async def go():
        async with running_bridge(replica_core()) as (server, base):
            return [await _raw_post(base, path, header) for path in ("/whip/room1", "/whep/room1")]

    for status, text in asyncio.run(go()):
        assert status == 401, text
        assert b"malformed token" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bridge_serve_codec_without_a_cluster_says_what_to_run(tmp_path):
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{_free_port()}",  # nothing listens there
               AURALINK_RUN_DIR=str(tmp_path / "runs"), PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bridge", "--codec", "serve", "--port", str(_free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "--codec serve needs a running AuraLink cluster" in res.stderr
    assert "`auralink up`" in res.stderr and "--codec in-process" in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing provisioned
