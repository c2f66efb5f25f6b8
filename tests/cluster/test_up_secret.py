"""`auralink up` hands the Serve app a secret FILE, never the secret, and finds all of its
processes on `--down` (no Ray needed here; tests/deployments/test_serve_up.py runs it all)."""

from __future__ import annotations

import stat

import yaml

from cluster import up


def test_a_secret_given_by_value_reaches_ray_as_a_0600_file(tmp_path, monkeypatch):
    monkeypatch.setenv("AURALINK_SECRET", "value-secret-0123456789abcdef")
    monkeypatch.delenv("AURALINK_SECRET_FILE", raising=False)
    path = up._secret_file_for(str(tmp_path))
    assert path == str(tmp_path / "cluster-secret")
    assert (tmp_path / "cluster-secret").read_bytes().strip() == b"value-secret-0123456789abcdef"
    assert stat.S_IMODE((tmp_path / "cluster-secret").stat().st_mode) == 0o600
    ray_env = up._ray_env()
    assert "AURALINK_SECRET" not in ray_env  # `ray start` and every worker: no secret value


def test_rendered_config_carries_a_path_and_no_credential(tmp_path):
    cfg = up.render_config(str(up.DEFAULT_CONFIG), 8123, "/srv/auralink/cluster-secret", True, None)
    app = next(a for a in cfg["applications"] if a["name"] == up.APP)
    assert app["runtime_env"]["env_vars"]["AURALINK_SECRET_FILE"] == "/srv/auralink/cluster-secret"
    assert "AURALINK_SECRET" not in app["runtime_env"]["env_vars"]  # runtime_env is logged
    assert "api_token" not in yaml.safe_dump(cfg)  # nor are application args


def test_down_recognises_the_ray_client_server_of_its_cluster():
    # The command line `ray start --head` gives the Ray Client server (Ray 2.60): no temp dir.
    cmd = ("/venv/bin/python -m ray.util.client.server --address=192.0.2.2:36787 --host=192.0.2.2 "
           "--port=54477 --mode=proxy --runtime-env-agent-address=http://192.0.2.2:37691 --node-id=32c9")
    assert up._is_client_server_of(cmd, "36787", 54477)
    assert up._is_client_server_of(cmd, "36787", 0)  # state files without the client port
    assert not up._is_client_server_of(cmd, "36788", 11111)  # another cluster's
    assert not up._is_client_server_of("/venv/bin/python worker.py --address=192.0.2.2:36787", "36787", 0)


def test_old_state_files_still_stop_their_cluster():
    state = up.UpState.from_json(
        '{"gcs_address": "127.0.0.1:1", "dashboard_url": "d", "http_url": "h", "temp_dir": "/tmp/x",'
        ' "api_token": "old", "config": "c", "weights": "random"}'
    )
    assert state.temp_dir == "/tmp/x" and state.client_server_port == 0
