"""The whole Serve app: control API auth, supervisor decisions, supervisor restart.

One 2-CPU cluster for the module with the app from `build_app` behind an HTTP proxy on a free
port (other Ray clusters may run on this machine).
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

TOKEN = "test-operator-token"
SUPERVISOR = {"name": "auralink-supervisor-test", "namespace": "auralink-test",
              "kv_namespace": "auralink-supervisor-test", "snapshot_interval_s": 0.0}


def _wait(pred, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def app_url(ray_local):
    import socket

    from ray import serve

    from deployments.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = build_app({
        "replica": {"capacity": 8, "allow_random_weights": True, "torch_threads": 1},
        "num_cpus": 0,
        "api_token": TOKEN,
        "supervisor": SUPERVISOR,
    })
    serve.run(app, name="auralink", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("auralink")
    import ray

    ray.kill(ray.get_actor(SUPERVISOR["name"], namespace=SUPERVISOR["namespace"]), no_restart=True)


def _http(method: str, url: str, token: str | None = TOKEN, body: dict | None = None):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_control_api_requires_the_bearer_token(app_url):
    assert _http("GET", f"{app_url}/healthz", token=None) == (200, {"ok": True})
    status, body = _http("GET", f"{app_url}/v1/replica", token=None)
    assert status == 401 and body["detail"] == "missing bearer token"
    status, body = _http("GET", f"{app_url}/v1/replica", token="wrong")
    assert status == 403 and body["detail"] == "invalid token"
    status, info = _http("GET", f"{app_url}/v1/replica")
    assert status == 200
    assert info["compute"] == "real" and info["weights"] == "random (codebooks k-means initialised)"
    assert info["capacity"] == 8
    status, body = _http("POST", f"{app_url}/v1/opt-out", body={})
    assert status == 422


def test_supervisor_turns_unhealthy_streams_off_and_opt_outs_win(app_url):
    import ray

    from deployments.config import SupervisorSettings
    from deployments.supervisor import get_supervisor

    sup = get_supervisor(SupervisorSettings(**SUPERVISOR))
    r = _http("POST", f"{app_url}/v1/opt-out", body={"stream_id": "quiet"})
    assert r[0] == 200, r
    now = time.time()
    off = ray.get(sup.report.remote({
        "quiet": {"ai": 50, "fallback": {}},
        "sick": {"ai": 40, "fallback": {"deadline": 10}},
        "fine": {"ai": 50, "fallback": {"overload": 1}},
    }, now))
    assert off == {"quiet": "opted_out", "sick": "unhealthy"}
    status, st = _http("GET", f"{app_url}/v1/streams/sick")
    assert status == 200 and st["ai"] is False and st["off_cause"] == "bad_rate"


def test_supervisor_restart_keeps_opt_outs(app_url):
    import ray

    from deployments.config import SupervisorSettings
    from deployments.supervisor import get_supervisor

    settings = SupervisorSettings(**SUPERVISOR)
    assert _http("POST", f"{app_url}/v1/opt-out", body={"user_id": "alice"})[0] == 200
    sup = get_supervisor(settings)
    ray.get(sup.register.remote("alice-mic", "alice"))
    ray.get(sup.snapshot.remote())  # health state (the stream->user tie) is snapshotted
    before = ray.get(sup.info.remote())["started_at"]
    assert ray.get(sup.decision.remote("alice-mic")) is False

    ray.kill(sup, no_restart=False)  # the process dies; Ray restarts the actor
    t0 = time.monotonic()

    def restarted() -> bool:
        try:
            return ray.get(get_supervisor(settings).info.remote(), timeout=5)["started_at"] != before
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
            return False

    _wait(restarted, 60, "supervisor restart")
    print(f"\nsupervisor restarted in {time.monotonic() - t0:.1f} s")
    sup = get_supervisor(settings)
    assert ray.get(sup.decision.remote("quiet")) is False  # stream opt-out survived
    assert ray.get(sup.decision.remote("alice-mic")) is False  # user opt-out survived
    off = ray.get(sup.report.remote({"quiet": {"ai": 10}, "alice-mic": {"ai": 10}, "new": {"ai": 10}}))
    assert off == {"quiet": "opted_out", "alice-mic": "opted_out"}
    # Opting back in is also durable.
    assert _http("POST", f"{app_url}/v1/opt-in", body={"stream_id": "quiet"})[0] == 200
    assert ray.get(sup.decision.remote("quiet")) is True
