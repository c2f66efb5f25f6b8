"""`auralink up` end to end: a real local cluster, the real `serve status`, then `--down`.

Also the security of a default start: with no secret configured, `up` creates a random one in
a 0600 file under the run folder and says where; `auralink token` run with the same run folder
issues operator tokens the control API takes; neither the secret nor a token reaches any Ray
log; and `--down` leaves no process of the cluster behind (the Ray Client server included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def _files_containing(root: Path, needles: dict[str, str], skip: set[Path]) -> dict[str, list[str]]:
    """{needle name: files under root whose bytes contain it}."""
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path in skip or not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for name, needle in needles.items():
            if needle.encode() in data:
                found.setdefault(name, []).append(str(path.relative_to(root)))
    return found


def _leftovers(temp_dir: str, gcs_address: str) -> list[str]:
    """Processes of a cluster: its temp dir on the command line, or its Ray Client server
    (`ray.util.client.server --address=<node ip>:<gcs port>`, no temp dir on that one)."""
    import psutil

    port = gcs_address.rpartition(":")[2]
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        args = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        client = "ray.util.client.server" in args and any(
            a.startswith("--address=") and a.endswith(f":{port}") for a in args)
        if client or temp_dir in " ".join(args):
            left.append(f"{p.info['pid']}: {' '.join(args)[:160]}")
    return left


def test_auralink_up_serves_healthy_and_down_stops_it(tmp_path):
    state_file = tmp_path / "up.json"
    run_dir = tmp_path / "runs"
    # No secret configured: `up` must make one. AURALINK_API_TOKEN is not read any more; were
    # it forwarded anywhere, it must not reach a log either.
    legacy_api_token = "legacy-api-token-" + os.urandom(12).hex()
    base_env = {k: v for k, v in os.environ.items() if k not in ("AURALINK_SECRET", "AURALINK_SECRET_FILE")}
    base_env.update(AURALINK_RUN_DIR=str(run_dir), AURALINK_API_TOKEN=legacy_api_token)
    up = _cli("up", "--num-cpus", "2", "--state-file", str(state_file), env=base_env)
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "serve status --address" in up.stdout and "auralink up --down" in up.stdout
        if state["weights"].startswith("random"):
            assert "RANDOM weights" in up.stderr  # said loudly, not buried in a log

        # The secret: random, in a 0600 file under the run folder; the console says where only.
        secret_file = run_dir / "cluster-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_bytes().strip().decode()
        assert len(secret) == 64 and secret not in up.stdout + up.stderr
        assert str(secret_file) in up.stderr and state["secret_file"] == str(secret_file)
        assert secret not in state_file.read_text()

        # `auralink token` finds that same secret through the run folder alone.
        tok = _cli("token", "--user", "ops", "--stream", "*", "--scope", "operator", env=base_env, timeout=60)
        assert tok.returncode == 0, tok.stderr
        operator_token = tok.stdout.strip()

        env = dict(base_env, RAY_AUTH_MODE="token")
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
        code, info = _get(f"{state['http_url']}/v1/replica", token=operator_token)
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
        code, stats = _get(f"{state['http_url']}/dashboard/api/stats", token=operator_token)
        assert code == 200

        # Every log of the session (Serve logs application args, user_config, runtime_env):
        # no secret, no token. The secret file's path is there: proof these are the logs
        # that would have shown a secret passed as an argument or environment value.
        temp_dir = Path(state["temp_dir"])
        found = _files_containing(
            temp_dir,
            {"cluster secret": secret, "operator token": operator_token,
             "legacy api token": legacy_api_token, "secret file path": str(secret_file)},
            skip={temp_dir / "cluster-secret"},
        )
        assert set(found) == {"secret file path"}, found
        assert any(f.startswith("session_") and "/logs/" in f for f in found["secret file path"]), found
    finally:
        if state is not None:
            down = _cli("up", "--down", "--state-file", str(state_file), timeout=180)
            assert down.returncode == 0, down.stderr[-2000:]
    assert not state_file.exists()
    time.sleep(1.0)  # let the last processes be reaped
    left = _leftovers(state["temp_dir"], state["gcs_address"])
    assert left == [], f"processes of the stopped cluster still running: {left}"
