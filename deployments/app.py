"""The AuraLink Serve application: codec replicas, the fallback supervisor, the control API.

`build_app(args)` is the import path `serve deploy` uses (see serve_config.yaml):

    CodecReplica  x N   streaming EnCodec, EDF batching, stream-affinity routing
    Ingress       x 1   FastAPI control API (bearer token) + operator dashboard mount point
    FallbackSupervisor  named detached Ray actor, created by the ingress if absent

Bridges do not go through the ingress for media: they hold a `DeploymentHandle` to
`CodecReplica` (`serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP_NAME)`) wrapped in
`deployments.client.CodecClient`, and talk to the supervisor actor directly.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations of the
# Serve ingress class at run time and must see real types, not strings.
import hmac
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import (
    INGRESS_DEPLOYMENT,
    IngressSettings,
    ReplicaSettings,
    SupervisorSettings,
)
from deployments.replica import CodecReplica
from deployments.supervisor import get_or_create_supervisor

logger = logging.getLogger(__name__)

api = FastAPI(title="AuraLink AIC control API")


class OptRequest(BaseModel):
    user_id: str | None = None
    stream_id: str | None = None


def _operator_authority():
    """Signed-token verifier when a cluster secret is configured, else None. Never the
    built-in development secret: tokens signed with a public key would open the control API."""
    try:
        from sfu_bridge.tokens import SECRET_ENV, SECRET_FILE_ENV, TokenAuthority
    except ImportError:
        return None
    if not (os.environ.get(SECRET_ENV) or os.environ.get(SECRET_FILE_ENV)):
        return None
    try:
        return TokenAuthority.from_env()
    except ValueError as exc:
        logger.error("cluster secret unusable, operator tokens refused: %s", exc)
        return None


def mount_dashboard(app: FastAPI) -> None:
    """Operator dashboard (`deployments.dashboard`) under /dashboard, behind operator tokens."""
    from deployments import dashboard

    app.include_router(dashboard.router, prefix="/dashboard")


mount_dashboard(api)


@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, codec: DeploymentHandle, api_token: str = "",
                 supervisor: dict[str, Any] | None = None) -> None:
        self.codec = codec
        self.settings = IngressSettings(api_token=api_token or IngressSettings.from_env().api_token)
        self.supervisor = get_or_create_supervisor(SupervisorSettings(**(supervisor or {})))
        self._authority = _operator_authority()
        if not self.settings.api_token and self._authority is None:
            logger.warning("no API token or cluster secret configured: the control API refuses every call")

    def _auth(self, authorization: str | None) -> None:
        """The static API token, or an `operator`-scope token signed with the cluster secret
        (the same tokens the dashboard takes)."""
        token = self.settings.api_token
        if not token and self._authority is None:
            raise HTTPException(503, "control API disabled: no API token configured")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if token and hmac.compare_digest(given.encode(), token.encode()):
            return
        if self._authority is not None:
            from sfu_bridge.tokens import Scope, TokenError

            try:
                self._authority.authorize_header(authorization, Scope.OPERATOR)
                return
            except TokenError as exc:
                raise HTTPException(exc.status, str(exc)) from None
        raise HTTPException(403, "invalid token")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"ok": True}

    @api.get("/v1/replica")
    async def replica_info(self, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """One codec replica's state (slots, queue, scheduler counters, settings)."""
        self._auth(authorization)
        return await self.codec.options(method_name="info").remote()

    @api.get("/v1/supervisor")
    async def supervisor_info(self, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._auth(authorization)
        return await self.supervisor.info.remote()

    @api.get("/v1/streams/{stream_id}")
    async def stream_status(self, stream_id: str,
                            authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._auth(authorization)
        return await self.supervisor.stream_status.remote(stream_id)

    @api.post("/v1/opt-out")
    async def opt_out(self, body: OptRequest,
                      authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._auth(authorization)
        if body.user_id is None and body.stream_id is None:
            raise HTTPException(422, "give a user_id or a stream_id")
        await self.supervisor.opt_out.remote(user_id=body.user_id, stream_id=body.stream_id)
        return {"opted_out": body.model_dump(exclude_none=True)}

    @api.post("/v1/opt-in")
    async def opt_in(self, body: OptRequest,
                     authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._auth(authorization)
        if body.user_id is None and body.stream_id is None:
            raise HTTPException(422, "give a user_id or a stream_id")
        await self.supervisor.opt_in.remote(user_id=body.user_id, stream_id=body.stream_id)
        return {"opted_in": body.model_dump(exclude_none=True)}


@dataclass
class AppArgs:
    """`args:` of the application in serve_config.yaml (all optional)."""

    replica: dict[str, Any] = field(default_factory=dict)  # ReplicaSettings at construction
    num_cpus: float = 1.0  # per codec replica
    num_gpus: float = 0.0  # per codec replica: 1 on a GPU node, 0 locally
    api_token: str = ""
    supervisor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ReplicaSettings.from_dict(self.replica)  # fail at deploy time, not in a replica
        SupervisorSettings(**self.supervisor)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    a = AppArgs(**(args or {}))
    replica = CodecReplica.options(
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    ).bind(a.replica)
    return Ingress.bind(replica, a.api_token, asdict(SupervisorSettings(**a.supervisor)))
