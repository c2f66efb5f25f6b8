"""The AuraLink Serve application: codec replicas, the fallback supervisor, the control API.

`build_app(args)` is the import path `serve deploy` uses (see serve_config.yaml):

    CodecReplica  x N   streaming EnCodec, EDF batching, stream-affinity routing
    Ingress       x 1   FastAPI control API + operator dashboard, one authorizer (operator
                        tokens under the cluster secret, `deployments.operator_auth`)
    FallbackSupervisor  named detached Ray actor, created by the ingress if absent

Bridges do not go through the ingress for media: they hold a `DeploymentHandle` to
`CodecReplica` (`serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP_NAME)`) wrapped in
`deployments.client.CodecClient`, and talk to the supervisor actor directly.

No secret travels in the application's arguments or `user_config` (Serve logs both): the
ingress reads the cluster secret from its environment (``AURALINK_SECRET_FILE``, a path).
The API schema and its docs pages (`/docs`, `/redoc`, `/openapi.json`) are not served: they
would be unauthenticated, and FastAPI's docs pages load their scripts from a CDN.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations of the
# Serve ingress class at run time and must see real types, not strings.
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from auth.operator import OPERATOR_AUTHORIZER, AuthDenied
from deployments.config import INGRESS_DEPLOYMENT, ReplicaSettings, SupervisorSettings
from deployments.operator_auth import require_operator
from deployments.replica import CodecReplica
from deployments.supervisor import get_or_create_supervisor
from deployments.user_policy import UserPolicy

logger = logging.getLogger(__name__)

api = FastAPI(title="AuraLink AIC control API", docs_url=None, redoc_url=None, openapi_url=None)


class OptRequest(BaseModel):
    user_id: str | None = None
    stream_id: str | None = None


class PolicyRequest(BaseModel):
    user_id: str
    max_kbps: float | None = None  # bitrate cap for the user's streams (1.5-24), None = none
    dtx: bool = True  # silent streams send no AI frames


def mount_dashboard(app: FastAPI) -> None:
    """Operator dashboard (`deployments.dashboard`) under /dashboard, behind operator tokens."""
    from deployments import dashboard

    app.include_router(dashboard.router, prefix="/dashboard")


mount_dashboard(api)


@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, codec: DeploymentHandle, supervisor: dict[str, Any] | None = None) -> None:
        self.codec = codec
        self.supervisor = get_or_create_supervisor(SupervisorSettings(**(supervisor or {})))
        try:
            OPERATOR_AUTHORIZER.authority()  # say at start-up whether operators can get in
        except AuthDenied:
            pass  # logged by the authorizer; every operator call answers 503 until fixed

    def _auth(self, authorization: str | None) -> None:
        """An `operator`-scope token under the cluster secret: the dashboard's very check."""
        require_operator(authorization)

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


    @api.post("/v1/policy")
    async def set_policy(self, body: PolicyRequest,
                         authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """An operator's bitrate cap and DTX switch for one user, kept with the opt-outs."""
        self._auth(authorization)
        try:
            UserPolicy(max_kbps=body.max_kbps, dtx=body.dtx).validate()
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        await self.supervisor.set_user_policy.remote(body.user_id, body.max_kbps, body.dtx)
        return {"policy": body.model_dump()}

    @api.get("/v1/policy/{user_id}")
    async def get_policy(self, user_id: str,
                         authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._auth(authorization)
        return {"user_id": user_id, **await self.supervisor.user_policy.remote(user_id)}


@dataclass
class AppArgs:
    """`args:` of the application in serve_config.yaml (all optional)."""

    replica: dict[str, Any] = field(default_factory=dict)  # ReplicaSettings at construction
    num_cpus: float = 1.0  # per codec replica
    num_gpus: float = 0.0  # per codec replica: 1 on a GPU node, 0 locally
    supervisor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ReplicaSettings.from_dict(self.replica)  # fail at deploy time, not in a replica
        SupervisorSettings(**self.supervisor)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    if "api_token" in (args or {}):
        # Serve logs application arguments: a secret there is a secret in the logs.
        raise ValueError("args.api_token is not supported: operators use `auralink token --scope "
                         "operator` tokens, checked under the cluster secret the ingress reads "
                         "from AURALINK_SECRET_FILE (see docs/operations.md, Security model)")
    a = AppArgs(**(args or {}))
    replica = CodecReplica.options(
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    ).bind(a.replica)
    return Ingress.bind(replica, asdict(SupervisorSettings(**a.supervisor)))
