"""Operator dashboard: a FastAPI router (mounted by the ingress under /dashboard) + one page.

- `GET  /dashboard/`                       the page (static HTML/JS, no data, nothing from a CDN)
- `GET  /dashboard/api/stats`              live streams, bitrate AI vs native, per stream the
                                           publisher's requested bandwidth and its subscribers'
                                           layers, fallback rate and reasons, replicas, hint
                                           limiter health, per-user AI state as the supervisor
                                           decided it (operator token)
- `POST /dashboard/api/users/{user}/ai`    `{"enabled": false}` opts the user out of AI
                                           compression, `true` back in (operator token)

Auth: `Authorization: Bearer <token>` with the `operator` scope (`auralink token --scope
operator --stream '*' ...`), checked by `deployments.operator_auth.require_operator`, the
control API's very check; 401 without or with a bad token, 403 without the scope, 503 when
the server has no cluster secret. The page takes the token from its URL fragment
(`/dashboard/#token=...`, never sent to the server) or a prompt, keeps it in sessionStorage,
and sends it on every API call.

Data source: bridges (and `auralink simulate`) publish one stats snapshot per bridge about
once a second to `StatsBoard`, a small named Ray actor (`auralink-dashboard-stats` in the
`auralink` namespace). A Ray actor rather than Redis because every process that needs it -
bridges, the ingress replica - is already in the Ray cluster, while the limiter's Redis is
optional and fail-open (the dashboard must not go dark when it is down). The dashboard sums
the snapshots that are fresher than `STALE_S`.

Opt-outs go to the `FallbackSupervisor` actor (persisted in the GCS KV). Bridges report to
the supervisor every second and get back the streams whose AI is off, opted-out ones
included, so a toggle reaches the media path within about a second. The users' AI state on
the page is the supervisor's decision (on; off by opt-out; off as unhealthy until when),
asked for in one call per stats request; if the supervisor does not answer, the page shows
what the bridges last applied and says so.
"""

# No `from __future__ import annotations` here: Serve pickles the ingress app, and string
# annotations (the request model) would not resolve in the replica that unpickles it.
import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel

from deployments.operator_auth import require_operator

STATIC = Path(__file__).with_name("static")
BOARD_NAME = "auralink-dashboard-stats"
BOARD_NAMESPACE = "auralink"
STALE_S = 5.0
MAX_STREAM_ROWS = 200  # the per-stream bitrate table: enough for a page, bounded for a big fleet
SUPERVISOR_TIMEOUT_S = 2.0  # the page polls every second; a stuck supervisor must not stall it

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- stats board
class StatsBoardCore:
    """Latest snapshot per bridge; pure, so it is tested without Ray."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}

    def publish(self, bridge_id: str, snapshot: dict[str, Any], now: float | None = None) -> None:
        snap = dict(snapshot)
        snap["received_at"] = time.time() if now is None else now
        self.snapshots[bridge_id] = snap

    def fresh(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = time.time() if now is None else now
        return {b: s for b, s in self.snapshots.items() if now - s["received_at"] <= STALE_S}


def aggregate(snapshots: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One cluster view from per-bridge snapshots (sums, and the max of replica counts)."""
    out: dict[str, Any] = {
        "bridges": sorted(snapshots),
        "streams_live": 0,
        "streams_relayed": 0,  # followed by other workers of a cascade (not counted live twice)
        "replicas": 0,
        "frames_last_s": 0,
        "fallback_frames_last_s": 0,
        "kbps_ai": 0.0,
        "kbps_native": 0.0,
        "kbps_all_native": 0.0,
        "fallback_by_reason": {},
        "users": [],
        "streams": [],
        "compute": None,
        "time_dilation": None,
        "at": time.time(),
    }
    reasons: dict[str, int] = {}
    for bridge_id, snap in snapshots.items():
        out["streams_live"] += int(snap.get("streams_live", 0))
        out["streams_relayed"] += int(snap.get("streams_relayed", 0))
        out["replicas"] = max(out["replicas"], int(snap.get("replicas", 0)))
        frames = int(snap.get("frames_last_s", 0))
        out["frames_last_s"] += frames
        out["fallback_frames_last_s"] += int(round(frames * float(snap.get("fallback_rate", 0.0))))
        for k in ("kbps_ai", "kbps_native", "kbps_all_native"):
            out[k] += float(snap.get(k, 0.0))
        for r, n in (snap.get("fallback_by_reason") or {}).items():
            reasons[r] = reasons.get(r, 0) + int(n)
        out["users"].extend(snap.get("users") or [])
        out["streams"].extend(_stream_rows(bridge_id, snap.get("streams") or {}))
        out["compute"] = out["compute"] or snap.get("compute")
        out["time_dilation"] = out["time_dilation"] or snap.get("time_dilation")
    out["fallback_by_reason"] = reasons
    out["fallback_rate"] = out["fallback_frames_last_s"] / out["frames_last_s"] if out["frames_last_s"] else 0.0
    out["users"].sort(key=lambda u: u.get("user", ""))
    out["streams"].sort(key=lambda r: r["stream"])
    del out["streams"][MAX_STREAM_ROWS:]
    out["limiter"] = _limiter_view([s["limiter_health"] for s in snapshots.values() if s.get("limiter_health")])
    return out


def _stream_rows(bridge_id: str, streams: dict[str, Any]) -> list[dict[str, Any]]:
    """The bitrate view per stream (a bridge's `MediaBridge.stream_stats()`): the publisher's
    requested bandwidth, the operator's cap, the depth encoded, DTX, and each AIC subscriber's
    current layer (codebooks, codec kbit/s, packet duration, wire kbit/s)."""
    rows = []
    for stream, st in streams.items():
        subs = [{"n_q": int(x.get("n_q", 0)), "kbps": float(x.get("kbps", 0.0)),
                 "packet_ms": int(x.get("packet_ms", 0)), "wire_kbps": float(x.get("wire_kbps", 0.0)),
                 "adaptive": bool(x.get("adaptive", False))}
                for x in (st.get("subscribers") or {}).values()]
        subs.sort(key=lambda x: (-x["kbps"], x["packet_ms"]))
        rows.append({"stream": str(stream), "bridge": bridge_id, "requested_kbps": st.get("requested_kbps"),
                     "cap_kbps": st.get("cap_kbps"), "depth_n_q": st.get("depth_n_q"), "dtx": st.get("dtx"),
                     "subscribers": subs})
    return rows


def _limiter_view(healths: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bridges' hint limiters in one line: how many run without Redis now, the longest
    time any ran without it, and what the unreachable-Redis policy let through or dropped."""
    if not healths:
        return None
    return {
        "bridges": len(healths),
        "bridges_without_redis": sum(1 for h in healths if not h.get("available", True)),
        "unavailable_s": max(float(h.get("unavailable_s", 0.0)) for h in healths),
        "policies": sorted({str(h.get("policy", "")) for h in healths}),
        "hints_fail_open": sum(int(h.get("hints_fail_open", 0)) for h in healths),
        "hints_fail_closed": sum(int(h.get("hints_fail_closed", 0)) for h in healths),
        "calls_without_redis": sum(int(h.get("calls_without_redis", 0)) for h in healths),
        "errors": sum(int(h.get("errors", 0)) for h in healths),
    }


def apply_ai_states(users: list[dict[str, Any]], statuses: dict[str, dict[str, Any]] | None) -> None:
    """Gives each live user row the AI state of its stream: `ai_state` "on", "opted_out" or
    "unhealthy", `ai_off_until` (unhealthy: epoch seconds of the next retry), `ai_off_cause`,
    and `ai_state_from`: "supervisor" (its decision, from `streams_status`) or "bridge" (what
    the bridge applied last, when the supervisor did not answer)."""
    for u in users:
        sid = u.get("stream")
        if not sid or not u.get("live"):
            u.update(ai_state=None, ai_off_until=None, ai_off_cause=None, ai_state_from=None)
            continue
        st = (statuses or {}).get(sid)
        if st is not None:
            state = st.get("reason") or "on"
            u.update(ai_state=state, ai_state_from="supervisor",
                     ai_off_until=st.get("off_until") if state == "unhealthy" else None,
                     ai_off_cause=st.get("off_cause") if state == "unhealthy" else None)
            if state == "opted_out":
                u["ai_enabled"] = False
        else:
            state = u.get("bridge_state") or ("opted_out" if u.get("bridge_opted_out") else "on")
            u.update(ai_state=state, ai_off_until=None, ai_off_cause=None, ai_state_from="bridge")


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class StatsBoard:
        def __init__(self) -> None:
            self.core = StatsBoardCore()

        def publish(self, bridge_id: str, snapshot: dict[str, Any]) -> None:
            self.core.publish(bridge_id, snapshot)

        def fresh(self) -> dict[str, dict[str, Any]]:
            return self.core.fresh()

    return StatsBoard


def get_or_create_board():
    """The cluster's one stats board (detached: it outlives the process that made it)."""
    return _board_class().options(
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True,
    ).remote()


# ----------------------------------------------------------------------------- API
class AiToggle(BaseModel):
    enabled: bool


def _default_supervisor():
    from deployments.supervisor import get_or_create_supervisor

    return get_or_create_supervisor()


async def _with_ai_states(agg: dict[str, Any], supervisor: Callable[[], Any]) -> None:
    """The supervisor's decision for every listed stream, in one call; the bridges' view
    (and `supervisor_error`) when it cannot be had in time."""
    sids = [u["stream"] for u in agg["users"] if u.get("stream") and u.get("live")]
    statuses = None
    agg["supervisor_error"] = None
    if sids:
        try:
            ref = supervisor().streams_status.remote(sids)
            statuses = await asyncio.wait_for(asyncio.ensure_future(ref), SUPERVISOR_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the page still shows what the bridges applied
            agg["supervisor_error"] = type(exc).__name__
            logger.info("dashboard: supervisor state unavailable (%s)", type(exc).__name__)
    apply_ai_states(agg["users"], statuses)


def make_router(
    board: Callable[[], Any] = get_or_create_board,
    supervisor: Callable[[], Any] = _default_supervisor,
    authorize: Callable[[str | None], Any] = require_operator,
) -> APIRouter:
    """The dashboard's routes; `board`/`supervisor` return Ray actor handles (made lazily,
    on first use, inside whatever process serves the router)."""
    r = APIRouter()
    handles: dict[str, Any] = {}

    def _get(name: str, make: Callable[[], Any]):
        if name not in handles:
            handles[name] = make()
        return handles[name]

    @r.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    @r.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        allowed = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
        if name not in allowed:
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC / name, media_type=allowed[name])

    @r.get("/api/stats")
    async def stats(authorization: str | None = Header(default=None)) -> dict[str, Any]:
        authorize(authorization)
        snaps = await _get("board", board).fresh.remote()
        agg = aggregate(snaps)
        await _with_ai_states(agg, lambda: _get("supervisor", supervisor))
        return agg

    @r.post("/api/users/{user_id}/ai")
    async def toggle(user_id: str, body: AiToggle,
                     authorization: str | None = Header(default=None)) -> dict[str, Any]:
        authorize(authorization)
        if not user_id or len(user_id) > 200:
            raise HTTPException(422, "user id must be 1-200 characters")
        sup = _get("supervisor", supervisor)
        if body.enabled:
            await sup.opt_in.remote(user_id=user_id)
        else:
            await sup.opt_out.remote(user_id=user_id)
        return {"user": user_id, "ai_enabled": body.enabled, "at": time.time()}

    return r


router = make_router()
