"""The whole Serve app: control API auth, supervisor decisions, supervisor restart.

One 2-CPU cluster for the module with the app from `build_app` behind an HTTP proxy on a free
port (other Ray clusters may run on this machine). The ingress reads the cluster secret from
the file named by AURALINK_SECRET_FILE, inherited from this process (as `auralink up` gives
it through the application's runtime_env).
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

SECRET = b"serve-app-test-secret-0123456789abcdef"
SUPERVISOR = {"name": "auralink-supervisor-test", "namespace": "auralink-test",
              "kv_namespace": "auralink-supervisor-test", "snapshot_interval_s": 0.0}


def _wait(pred, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _operator_token(scopes=("operator",)) -> str:
    from auth.tokens import TokenAuthority

    return TokenAuthority(SECRET).issue("ops", "*", list(scopes), ttl_s=600)


@pytest.fixture(scope="module", autouse=True)
def secret_file(tmp_path_factory):
    """Before `ray_local` starts Ray: its workers inherit the path, never the secret."""
    import os

    path = tmp_path_factory.mktemp("secret") / "cluster-secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    saved = {k: os.environ.pop(k, None) for k in ("AURALINK_SECRET", "AURALINK_SECRET_FILE")}
    os.environ["AURALINK_SECRET_FILE"] = str(path)
    yield path
    os.environ.pop("AURALINK_SECRET_FILE")
    os.environ.update({k: v for k, v in saved.items() if v is not None})


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
        "supervisor": SUPERVISOR,
    })
    serve.run(app, name="auralink", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("auralink")
    import ray

    ray.kill(ray.get_actor(SUPERVISOR["name"], namespace=SUPERVISOR["namespace"]), no_restart=True)


def _http(method: str, url: str, token: str | None = "operator", body: dict | None = None,
          authorization: str | bytes | None = None):
    """(status, JSON body); `token` "operator" = a fresh operator token; `authorization` = a raw
    header value (bytes go on the wire as they are)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    if token == "operator":
        token = _operator_token()
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, u.path, body=json.dumps(body).encode() if body else None, headers=headers)
        res = conn.getresponse()
        raw = res.read()
    finally:
        conn.close()
    try:
        return res.status, json.loads(raw or b"{}")
    except ValueError:
        return res.status, raw.decode("utf-8", "replace")


def test_control_api_requires_an_operator_token(app_url):
    assert _http("GET", f"{app_url}/healthz", token=None) == (200, {"ok": True})
    status, body = _http("GET", f"{app_url}/v1/replica", token=None)
    assert status == 401 and body["detail"] == "missing Authorization: Bearer header"
    status, body = _http("GET", f"{app_url}/v1/replica", token="wrong")
    assert status == 401 and body["detail"] == "malformed token: expected 'al1.<claims>.<signature>'"
    status, body = _http("GET", f"{app_url}/v1/replica", token=_operator_token(["publish"]))
    assert status == 403 and body["detail"] == "token lacks the 'operator' scope"
    status, info = _http("GET", f"{app_url}/v1/replica")
    assert status == 200
    assert info["compute"] == "real" and info["weights"] == "random (codebooks k-means initialised)"
    assert info["capacity"] == 8
    status, body = _http("POST", f"{app_url}/v1/opt-out", body={})
    assert status == 422


def test_control_api_and_dashboard_share_one_authorizer(app_url):
    """Every credential gets the same answer from the control API and the dashboard API."""
    from auth.tokens import TokenAuthority

    former_dev = TokenAuthority(b"auralink-dev-secret-do-not-use-in-production")
    cases = {
        "none": dict(token=None),
        "not bearer": dict(authorization="Basic b3BzOm9wcw=="),
        "garbage": dict(token="wrong"),
        "non-ascii bytes": dict(authorization=b"Bearer al1.\xc3\xa9t\xc3\xa9.sig"),
        "non-ascii latin-1": dict(authorization=b"Bearer al1.e30.\xe9"),
        "former dev secret": dict(token=former_dev.issue("mallory", "*", ["operator"])),
        "publish scope": dict(token=_operator_token(["publish"])),
        "operator": dict(token="operator"),
    }
    for name, kw in cases.items():
        api_status, api_body = _http("GET", f"{app_url}/v1/supervisor", **kw)
        dash_status, dash_body = _http("GET", f"{app_url}/dashboard/api/stats", **kw)
        assert api_status == dash_status, (name, api_body, dash_body)
        if api_status == 200:
            assert name == "operator"
        else:
            assert api_status in (401, 403) and api_body == dash_body, (name, api_body, dash_body)
    assert _http("GET", f"{app_url}/v1/supervisor", authorization=b"Bearer \xff\xfe")[0] == 401


def test_no_unauthenticated_api_schema_or_cdn_docs(app_url):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert _http("GET", f"{app_url}{path}", token=None)[0] == 404, path


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
