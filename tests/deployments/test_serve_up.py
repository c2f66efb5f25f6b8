"""`auralink up` end to end: a real local cluster, the real `serve status`, then `--down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def test_auralink_up_serves_healthy_and_down_stops_it(tmp_path):
    import psutil

    state_file = tmp_path / "up.json"
    up = _cli("up", "--num-cpus", "2", "--state-file", str(state_file))
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "serve status --address" in up.stdout and "auralink up --down" in up.stdout
        if state["weights"].startswith("random"):
            assert "RANDOM weights" in up.stderr  # said loudly, not buried in a log

        env = dict(os.environ, RAY_AUTH_MODE="token")
        status = subprocess.run(
            [str(Path(sys.executable).parent / "serve"), "status", "--address", state["dashboard_url"]],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        app = yaml.safe_load(status.stdout)["applications"]["auralink"]
        assert app["status"] == "RUNNING"
        assert app["deployments"]["CodecReplica"]["status"] == "HEALTHY"
        assert app["deployments"]["Ingress"]["status"] == "HEALTHY"

        assert _get(f"{state['http_url']}/healthz") == (200, {"ok": True})
        code, info = _get(f"{state['http_url']}/v1/replica", token=state["api_token"])
        assert code == 200 and info["compute"] == "real" and info["weights"] == state["weights"]
        # serve_config.yaml's user_config reached the replica.
        assert info["settings"]["deadline_ms"] == 20.0 and info["capacity"] == 256

        # The cloud path's last step: the simulator against this existing cluster (its
        # replicas as deployed, real compute; a CPU-sized deadline for the bridge's frames).
        sim = _cli("simulate", "--address", state["gcs_address"], "--streams", "2", "--duration", "3",
                   "--deadline-ms", "60", "--no-progress", "--out", str(tmp_path / "sim"), env=env)
        assert sim.returncode == 0, sim.stderr[-3000:]
        rep = json.loads((tmp_path / "sim" / "report.json").read_text())
        assert rep["compute"] == "real" and rep["time_dilation"] == 1.0
        assert rep["frames_total"] > 0 and rep["frames_unaccounted"] == 0
        assert rep["frames_ai"] > 0  # the deployed replica answered
    finally:
        if state is not None:
            down = _cli("up", "--down", "--state-file", str(state_file), timeout=180)
            assert down.returncode == 0, down.stderr[-2000:]
    assert not state_file.exists()
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if state["temp_dir"] in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the stopped cluster still running: {left}"
