"""Operator dashboard: snapshot aggregation, bearer-token auth, the opt-out toggle reaching the
real supervisor actor, and a page that loads nothing from the internet."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from deployments.dashboard import STATIC, StatsBoardCore, aggregate
from tests import ray_local

SECRET = "dashboard-test-secret-0123456789"


def test_aggregate_sums_bridges_and_drops_stale_snapshots():
    core = StatsBoardCore()
    now = 1000.0
    core.publish("b1", {"streams_live": 10, "replicas": 2, "frames_last_s": 250, "fallback_rate": 0.04,
                        "kbps_ai": 68.0, "kbps_native": 12.4, "kbps_all_native": 310.0,
                        "fallback_by_reason": {"deadline": 10}, "users": [{"user": "u2"}]}, now=now)
    core.publish("b2", {"streams_live": 5, "streams_relayed": 1, "replicas": 3, "frames_last_s": 125, "fallback_rate": 0.0,
                        "kbps_ai": 34.0, "fallback_by_reason": {"deadline": 1, "overload": 2},
                        "users": [{"user": "u1"}]}, now=now)
    core.publish("old", {"streams_live": 99}, now=now - 60)
    agg = aggregate(core.fresh(now=now))
    assert agg["bridges"] == ["b1", "b2"]
    assert agg["streams_live"] == 15 and agg["streams_relayed"] == 1
    assert agg["replicas"] == 3
    assert agg["fallback_by_reason"] == {"deadline": 11, "overload": 2}
    assert agg["fallback_rate"] == pytest.approx(10 / 375)
    assert agg["kbps_ai"] == pytest.approx(102.0)
    assert [u["user"] for u in agg["users"]] == ["u1", "u2"]
    assert aggregate({})["fallback_rate"] == 0.0


def test_users_get_the_supervisors_decision_else_the_bridges():
    from deployments.dashboard import apply_ai_states

    users = [
        {"user": "u1", "stream": "u1-0", "live": True, "ai_enabled": True, "bridge_state": "on"},
        {"user": "u2", "stream": "u2-0", "live": True, "ai_enabled": True, "bridge_state": "on"},
        {"user": "u3", "stream": "u3-0", "live": True, "ai_enabled": True, "bridge_state": "unhealthy"},
        {"user": "u4", "stream": None, "live": False, "ai_enabled": False},
    ]
    statuses = {
        "u1-0": {"ai": False, "reason": "unhealthy", "off_until": 1234.5, "off_cause": "bad_rate"},
        "u2-0": {"ai": False, "reason": "opted_out", "off_until": None, "off_cause": None},
    }
    apply_ai_states(users, statuses)
    got = [(u["ai_state"], u["ai_off_until"], u["ai_state_from"]) for u in users]
    assert got == [("unhealthy", 1234.5, "supervisor"), ("opted_out", None, "supervisor"),
                   ("unhealthy", None, "bridge"), (None, None, None)]
    assert users[0]["ai_off_cause"] == "bad_rate" and users[1]["ai_enabled"] is False
    apply_ai_states(users, None)  # no answer from the supervisor: what the bridges apply
    assert [u["ai_state"] for u in users] == ["on", "on", "unhealthy", None]


def test_limiter_outage_is_in_the_stats():
    ok = {"policy": "fail-open", "available": True, "unavailable_s": 0.0, "hints_fail_open": 0,
          "hints_fail_closed": 0, "calls_without_redis": 0, "errors": 0}
    down = dict(ok, available=False, unavailable_s=12.3, hints_fail_open=4321, calls_without_redis=300,
                errors=3)
    agg = aggregate({"b1": {"limiter_health": ok}, "b2": {"limiter_health": down}, "b3": {}})
    assert agg["limiter"] == {"bridges": 2, "bridges_without_redis": 1, "unavailable_s": 12.3,
                              "policies": ["fail-open"], "hints_fail_open": 4321, "hints_fail_closed": 0,
                              "calls_without_redis": 300, "errors": 3}
    assert aggregate({"b1": {}})["limiter"] is None


def test_page_loads_nothing_from_elsewhere():
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
    html = (STATIC / "dashboard.html").read_text()
    assert "experimental" in html


@pytest.fixture(scope="module")
def server():
    """A real Ray (stats board + supervisor actors) and the router served by uvicorn."""
    import os

    import ray
    import uvicorn
    from fastapi import FastAPI

    from deployments.config import SupervisorSettings
    from deployments.dashboard import make_router
    from deployments.supervisor import get_or_create_supervisor

    previous = os.environ.get("AURALINK_SECRET")
    os.environ["AURALINK_SECRET"] = SECRET  # module-scoped: monkeypatch is function-scoped
    ray_local.init(num_cpus=1, include_dashboard=False, namespace="auralink-dashboard-test")
    board_cls = __import__("deployments.dashboard", fromlist=["_board_class"])._board_class()
    board = board_cls.remote()
    sup = get_or_create_supervisor(SupervisorSettings(name="dash-test-supervisor", kv_namespace="dash-test"))
    app = FastAPI()
    app.include_router(make_router(board=lambda: board, supervisor=lambda: sup), prefix="/dashboard")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (srv.started and srv.servers):
        assert time.monotonic() < deadline, "uvicorn did not start"
        thread.join(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield {"base": f"http://127.0.0.1:{port}/dashboard", "board": board, "sup": sup}
    srv.should_exit = True
    thread.join(10)
    ray.kill(sup)
    ray.shutdown()
    if previous is None:
        os.environ.pop("AURALINK_SECRET", None)
    else:
        os.environ["AURALINK_SECRET"] = previous


def _call(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            raw = res.read().decode()
            return res.status, json.loads(raw) if res.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _token(scope: str) -> str:
    from sfu_bridge.tokens import TokenAuthority

    return TokenAuthority(SECRET.encode()).issue("ops", "*", [scope], ttl_s=600)


def test_api_needs_an_operator_token(server):
    base = server["base"]
    assert _call(f"{base}/api/stats")[0] == 401
    assert _call(f"{base}/api/stats", token="al1.bogus.token")[0] == 401
    assert _call(f"{base}/api/stats", token=_token("publish"))[0] == 403
    assert _call(f"{base}/api/users/u1/ai", body={"enabled": False})[0] == 401
    status, page = _call(f"{base}/")
    assert status == 200 and "AuraLink" in page  # the page itself holds no data
    assert _call(f"{base}/static/dashboard.js")[0] == 200
    assert _call(f"{base}/static/secret.txt")[0] == 404


def _raw_status(url: str, authorization: bytes) -> int:
    """Status for a request whose Authorization header carries these exact bytes."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", u.path, headers={"Authorization": authorization})
        res = conn.getresponse()
        res.read()
        return res.status
    finally:
        conn.close()


@pytest.mark.parametrize("header", [
    b"Bearer al1.\xc3\xa9t\xc3\xa9.sig", b"Bearer al1.e30.\xe9", b"Bearer \xff\xfe\xfd",
])
def test_non_ascii_token_is_401_not_500(server, header):
    assert _raw_status(f"{server['base']}/api/stats", header) == 401


def test_without_a_cluster_secret_nothing_opens(server, monkeypatch):
    """No secret on the server: 503 to everyone, in particular to a token signed with the
    development secret that earlier versions fell back to (it is printed in their source)."""
    from sfu_bridge.tokens import TokenAuthority

    monkeypatch.delenv("AURALINK_SECRET", raising=False)
    monkeypatch.delenv("AURALINK_SECRET_FILE", raising=False)
    forged = TokenAuthority(b"auralink-dev-secret-do-not-use-in-production").issue("mallory", "*", ["operator"])
    status, body = _call(f"{server['base']}/api/stats", token=forged)
    assert status == 503 and "no cluster secret" in body
    assert _call(f"{server['base']}/api/users/u1/ai", token=forged, body={"enabled": False})[0] == 503


def test_stats_come_from_the_board(server):
    import ray

    ray.get(server["board"].publish.remote("bridge-x", {"streams_live": 7, "replicas": 2, "frames_last_s": 175,
                                                        "fallback_rate": 0.0, "kbps_ai": 47.6}))
    status, stats = _call(f"{server['base']}/api/stats", token=_token("operator"))
    assert status == 200
    assert stats["bridges"] == ["bridge-x"] and stats["streams_live"] == 7 and stats["replicas"] == 2


def test_toggle_reaches_the_supervisor(server):
    import ray

    sup = server["sup"]
    ray.get(sup.register.remote("u00042-0", "u00042"))
    op = _token("operator")
    status, body = _call(f"{server['base']}/api/users/u00042/ai", token=op, body={"enabled": False})
    assert status == 200 and body["ai_enabled"] is False
    off = ray.get(sup.report.remote({"u00042-0": {"ai": 25, "fallback": {}, "user_id": "u00042"}}))
    assert off == {"u00042-0": "opted_out"}
    assert _call(f"{server['base']}/api/users/u00042/ai", token=op, body={"enabled": True})[0] == 200
    assert ray.get(sup.report.remote({"u00042-0": {"ai": 25, "fallback": {}, "user_id": "u00042"}})) == {}


def test_stats_show_the_supervisors_decision_per_user(server):
    """A stream the supervisor switched off as unhealthy is shown so, with when AI is retried,
    even while the bridge's snapshot still says it applied nothing yet."""
    import ray

    sup = server["sup"]
    for u in ("u7", "u8", "u9"):
        ray.get(sup.register.remote(f"{u}-0", u))
    t0 = time.time()
    off = ray.get(sup.report.remote({"u7-0": {"ai": 10, "fallback": {"deadline": 40}}}))
    assert off == {"u7-0": "unhealthy"}
    ray.get(sup.opt_out.remote(user_id="u8"))
    rows = [{"user": u, "stream": f"{u}-0", "live": True, "ai_enabled": True, "bridge_opted_out": False,
             "bridge_state": "on"} for u in ("u7", "u8", "u9")]
    ray.get(server["board"].publish.remote("bridge-users", {"streams_live": 3, "users": rows}))
    status, stats = _call(f"{server['base']}/api/stats", token=_token("operator"))
    assert status == 200 and stats["supervisor_error"] is None
    by_user = {u["user"]: u for u in stats["users"]}
    assert by_user["u7"]["ai_state"] == "unhealthy" and by_user["u7"]["ai_state_from"] == "supervisor"
    assert t0 < by_user["u7"]["ai_off_until"] <= time.time() + 1.0  # the first backoff is 1 s
    assert by_user["u8"]["ai_state"] == "opted_out" and by_user["u8"]["ai_enabled"] is False
    assert by_user["u9"]["ai_state"] == "on"
    ray.get(sup.opt_in.remote(user_id="u8"))


def test_streams_show_the_requested_bandwidth_and_each_subscribers_layer():
    """The bitrate view per stream, from the bridges' `MediaBridge.stream_stats()`."""
    streams = {"room": {"requested_kbps": 6.0, "cap_kbps": None, "depth_n_q": 8, "dtx": "active",
                        "dtx_enabled": True, "subscribers": {
                            "s1": {"n_q": 4, "kbps": 3.0, "packet_ms": 120, "wire_kbps": 7.0, "adaptive": True},
                            "s2": {"n_q": 8, "kbps": 6.0, "packet_ms": 120, "wire_kbps": 10.0, "adaptive": True}}}}
    agg = aggregate({"b2": {"streams": streams}, "b1": {"streams": {"alpha": {"requested_kbps": 24.0,
                                                                             "subscribers": {}}}},
                     "b3": {}})
    assert [(r["stream"], r["bridge"]) for r in agg["streams"]] == [("alpha", "b1"), ("room", "b2")]
    room = agg["streams"][1]
    assert (room["requested_kbps"], room["depth_n_q"], room["dtx"]) == (6.0, 8, "active")
    assert [(x["n_q"], x["packet_ms"], x["wire_kbps"]) for x in room["subscribers"]] == [(8, 120, 10.0), (4, 120, 7.0)]
    assert aggregate({})["streams"] == []
    page = (STATIC / "dashboard.js").read_text()
    assert "renderStreams(s.streams" in page and 'id="stream-layers"' in (STATIC / "dashboard.html").read_text()
