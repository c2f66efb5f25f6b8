"""`auralink up --bridges 2` end to end: the Serve codec app and two bridge workers on a real
local Ray cluster; a publisher signals through one worker's URL, a subscriber through the
other's, and the subscriber decodes AIC frames the Serve replicas encoded; `auralink status`
shows Serve's app, both workers and the stream on its owner."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.affinity import owner as rendezvous_owner
from sfu_bridge.hint_auth import derive_stream_key
from sfu_bridge.sdk import AicPublisher, AicSubscriber

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_up_with_bridges_any_worker_url_reaches_the_stream(tmp_path, secret, tokens, streaming_codec):
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    state_file = tmp_path / "up.json"
    env = {k: v for k, v in os.environ.items() if k != "AURALINK_SECRET"}
    env.update(AURALINK_SECRET_FILE=str(secret_file), AURALINK_RUN_DIR=str(tmp_path / "runs"),
               # the workers read it from their environment: a budget a shared 2-core CPU meets
               AURALINK_DEADLINE_MS="2000", RAY_AUTH_MODE="token")
    up = _cli("up", "--num-cpus", "2", "--bridges", "2", "--state-file", str(state_file), env=env)
    try:
        assert up.returncode == 0, (up.stdout[-2000:], up.stderr[-3000:])
        assert "auralink status" in up.stdout
        st = _cli("status", "--state-file", str(state_file), "--json", env=env, timeout=120)
        assert st.returncode == 0, st.stderr[-2000:]
        before = json.loads(st.stdout)
        assert before["serve"]["applications"]["auralink"]["status"] == "RUNNING"
        workers = before["bridges"]["workers"]
        assert [w["state"] for w in workers] == ["active", "active"], workers
        a, b = workers
        stream = next(f"room{i}" for i in range(100)
                      if rendezvous_owner(f"room{i}", [a["worker_id"], b["worker_id"]]) == a["worker_id"])

        async def call():
            pub = AicPublisher(a["url"], stream, tokens.issue("alice", stream, ["publish"]),
                               hint_key=derive_stream_key(secret, stream))
            await pub.start()
            sub = AicSubscriber(b["url"], stream, tokens.issue("bob", stream, ["subscribe"]),
                                codec=streaming_codec, slot=0)
            await sub.start()  # b's URL -> 307 -> a, the stream's owner
            ok = await sub.wait_frames(n_aic=10, timeout_s=120)
            during = _cli("status", "--state-file", str(state_file), env=env, timeout=120)
            out = (ok, sub.stats, sub.location, pub.location, during)
            await sub.stop()
            await pub.stop()
            return out

        ok, stats, sub_loc, pub_loc, during = asyncio.run(call())
        assert ok, stats
        assert stats.aic_frames >= 10 and stats.decoded_samples > 0 and stats.bad_payloads == 0
        assert pub_loc.startswith(a["url"]) and sub_loc.startswith(a["url"])
        # the human status: Serve's app and both workers, the stream on its owner
        assert during.returncode == 0, during.stderr[-2000:]
        text = during.stdout
        assert "serve app auralink: RUNNING" in text and "CodecReplica" in text
        assert a["url"] in text and b["url"] in text and f"streams: {stream}" in text
    finally:
        if state_file.exists():
            down = _cli("up", "--down", "--state-file", str(state_file), env=env, timeout=180)
            assert down.returncode == 0, down.stderr[-2000:]
    import psutil

    def alive() -> list[int]:
        out = []
        for w in workers:
            try:
                if psutil.Process(w["pid"]).status() != psutil.STATUS_ZOMBIE:
                    out.append(w["pid"])
            except psutil.NoSuchProcess:
                pass
        return out

    end = time.monotonic() + 10.0  # their exit may trail `up --down` by a moment
    while (left := alive()) and time.monotonic() < end:
        time.sleep(0.1)
    assert left == [], f"bridge worker processes outlived `up --down`: {left}"
