"""WHIP/WHEP signaling for the SFU bridge (aiohttp), and the `auralink bridge` command.

- ``POST /whip/{stream}`` (RFC 9725): ``Content-Type: application/sdp`` offer, ``Authorization:
  Bearer <token>`` with the ``publish`` scope for that stream -> ``201 Created``, ``Location``
  of the session and the SDP answer. ``DELETE <Location>`` ends it.
- ``POST /whep/{stream}``: the same for subscribers (``subscribe`` scope). An offer that lists
  the AIC payload type (``a=rtpmap:<pt> AIC/48000``) gets EnCodec codes; others get Opus.
- ``PATCH`` on a session: 405 (no trickle ICE: send a complete offer, as WHIP allows).
- ``OPTIONS``: CORS preflight for browser clients on another origin.
- ICE: the bridge's connections use only the configured STUN/TURN servers (``--ice-server``,
  ``$AURALINK_ICE_SERVERS``; none = host candidates only), announced to clients in ``Link``
  headers (RFC 9725 section 4.6); ``--public-ip`` announces a 1:1 NAT's public address.
  DTLS: the bridge is the DTLS server when the offer lets it choose (sfu_bridge/ice.py).
- ``GET /health``: liveness and the worker's counters (no media content).

Errors are 4xx with a one-line text message: 400 malformed SDP or stream id, 401/403 token,
404 unknown session or stream, 409 stream already published, 413 body too large, 415 not
application/sdp, 503 worker full.

Scaling: one worker process per core, each its own event loop and port (``--workers N``
listens on ``--port`` .. ``--port + N - 1``); a front proxy routes by stream id so a stream's
publisher and subscribers meet on one worker. How many streams a worker holds is measured by
``auralink bench bridge`` (docs/benchmarks.md, section "bridge").
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import re
import signal
import sys
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription
from multidict import CIMultiDict

from auth.secret import SecretUnavailable, provision_secret
from sfu_bridge import ice, rtp_ext
from sfu_bridge.config import BridgeConfig
from sfu_bridge.hint_auth import HintVerifier
from sfu_bridge.media import MediaBridge, Publisher, RtpOut
from sfu_bridge.tick import TickBatcher
from sfu_bridge.tokens import Scope, TokenAuthority, TokenError, load_secret

logger = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class SignalingError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_offer(body: bytes) -> str:
    """The offer as text, checked enough that aiortc will not choke on it; 400 otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignalingError(400, "malformed SDP: body is not UTF-8 text") from None
    if not text.lstrip().startswith("v=0"):
        raise SignalingError(400, "malformed SDP: an SDP offer starts with 'v=0'")
    try:
        desc = SessionDescription.parse(text)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise SignalingError(400, f"malformed SDP: {type(exc).__name__}: {exc}"[:200]) from None
    audio = [m for m in desc.media if m.kind == "audio"]
    if not audio:
        raise SignalingError(400, "malformed SDP: the offer has no audio m-line")
    for m in audio:
        if not m.rtp.codecs:
            raise SignalingError(400, "malformed SDP: the audio m-line lists no codecs")
        if m.ice is None or not m.ice.usernameFragment or m.dtls is None or not m.dtls.fingerprints:
            raise SignalingError(400, "malformed SDP: ICE credentials or DTLS fingerprint missing")
    return text


class BridgeServer:
    def __init__(
        self, config: BridgeConfig, media: MediaBridge, authority: TokenAuthority,
        hint_secret: bytes | None = None,
    ) -> None:
        self.config = config
        self.media = media
        self.authority = authority
        self.hint_secret = hint_secret
        self.verifiers: dict[str, HintVerifier] = {}
        self.http_errors: dict[int, int] = {}
        media.batcher.hint_checker = self._check_hint
        self.app = web.Application(client_max_size=config.max_body_bytes, middlewares=[self._errors])
        self.app.add_routes([
            web.post("/whip/{stream}", self.whip),
            web.post("/whep/{stream}", self.whep),
            web.delete("/whip/{stream}/{session}", self.delete),
            web.delete("/whep/{stream}/{session}", self.delete),
            web.patch("/whip/{stream}/{session}", self.patch),
            web.patch("/whep/{stream}/{session}", self.patch),
            web.route("OPTIONS", "/whip/{stream}", self.options),
            web.route("OPTIONS", "/whep/{stream}", self.options),
            web.route("OPTIONS", "/whip/{stream}/{session}", self.options),
            web.route("OPTIONS", "/whep/{stream}/{session}", self.options),
            web.get("/health", self.health),
        ])
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)

    # -- plumbing --------------------------------------------------------------------------
    async def _on_startup(self, app: web.Application) -> None:
        self.media.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.media.stop()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await self._handle(request, handler)
        # browsers on another origin (RFC 9725 section 4.1 expects CORS support)
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Access-Control-Expose-Headers"] = "Location, Link"
        return resp

    async def _handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except SignalingError as exc:
            return self._error(exc.status, str(exc))
        except TokenError as exc:
            return self._error(exc.status, str(exc), bearer=exc.status == 401)
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"request body exceeds {self.config.max_body_bytes} bytes")
        except web.HTTPException as exc:
            if exc.status >= 400:
                return self._error(exc.status, exc.reason)
            raise

    def _error(self, status: int, message: str, bearer: bool = False) -> web.Response:
        self.http_errors[status] = self.http_errors.get(status, 0) + 1
        headers = {"WWW-Authenticate": 'Bearer realm="auralink"'} if bearer else None
        return web.Response(status=status, text=message + "\n", headers=headers)

    def _check_hint(self, stream_id: str, raw: bytes) -> Any:
        verifier = self.verifiers.get(stream_id)
        if verifier is None:
            raise ValueError("no hint key for this stream")
        return verifier.verify(stream_id, raw)

    async def _read_offer(self, request: web.Request, scope: Scope) -> tuple[str, str, str]:
        stream = request.match_info["stream"]
        if not STREAM_ID_RE.match(stream):
            raise SignalingError(400, "bad stream id: use 1-128 of [A-Za-z0-9_.-]")
        token = self.authority.authorize_header(request.headers.get("Authorization"), scope, stream)
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != SDP_TYPE:
            raise SignalingError(415, f"Content-Type must be {SDP_TYPE}")
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise SignalingError(413, f"request body exceeds {self.config.max_body_bytes} bytes")
        return stream, token.user, parse_offer(await request.read())

    def _location(self, kind: str, stream: str, session: str) -> str:
        return f"{self.config.public_url.rstrip('/')}/{kind}/{stream}/{session}"

    @staticmethod
    async def _negotiate(pc: RTCPeerConnection, offer: str) -> str:
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SignalingError(400, f"unusable SDP offer: {exc}"[:200]) from None
        except Exception as exc:  # aiortc's OperationError etc.: nothing in common to answer with
            raise SignalingError(400, f"unusable SDP offer: {type(exc).__name__}: {exc}"[:200]) from None
        answer = await pc.createAnswer()
        # the bridge is the DTLS server where the offer allows: see ice.prefer_dtls_server
        sdp = ice.prefer_dtls_server(answer.sdp, offer)
        await pc.setLocalDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        return pc.localDescription.sdp

    def _watch(self, pc: RTCPeerConnection, session_id: str) -> None:
        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.media.end_session(session_id)

    def _created(self, kind: str, stream: str, session: str, answer: str) -> web.Response:
        """201 with the answer, the session's Location and the ICE servers (RFC 9725 4.6)."""
        headers = CIMultiDict(Location=self._location(kind, stream, session))
        for link in ice.link_headers(self.config.ice_servers):
            headers.add("Link", link)
        if self.config.public_ip:
            answer = ice.announce_address(answer, self.config.public_ip)
        return web.Response(status=201, text=answer, content_type=SDP_TYPE, headers=headers)

    # -- handlers --------------------------------------------------------------------------
    async def whip(self, request: web.Request) -> web.Response:
        stream, user, offer = await self._read_offer(request, Scope.PUBLISH)
        if stream in self.media.publishers:
            raise SignalingError(409, "stream already has a publisher")
        if self.media.full:
            raise SignalingError(503, "this bridge worker is full")
        pc = ice.peer_connection(self.config.ice_servers)
        pub = self.media.add_publisher(
            stream, user, pc, opted_out=user in self.config.opted_out_users
        )

        @pc.on("track")
        def _on_track(track: Any) -> None:
            if track.kind == "audio" and pub.task is None:
                self.media.attach_track(pub, track)

        try:
            answer = await self._negotiate(pc, offer)
            audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
            if not audio or audio[0].currentDirection not in ("recvonly", "sendrecv"):
                raise SignalingError(400, "the offer does not send audio")
        except BaseException:
            await self.media.end_session(pub.session_id)
            raise
        pub.opus_pt = next((c.payloadType for c in audio[0]._codecs if c.name.lower() == "opus"), None)
        rtp_ext.tap_receiver(audio[0].receiver, lambda pkt, s=stream: self.media.forward(s, pkt))
        if self.hint_secret is not None:
            self.verifiers[stream] = HintVerifier(self.hint_secret, stream)
            rtp_ext.transport_extensions_map(audio[0]).hint_sink = (
                lambda raw, s=stream: self.media.batcher.add_hint(s, raw)
            )
        self._watch(pc, pub.session_id)
        logger.info("publisher joined stream=%s session=%s", stream, pub.session_id[:8])
        return self._created("whip", stream, pub.session_id, answer)

    async def whep(self, request: web.Request) -> web.Response:
        stream, user, offer = await self._read_offer(request, Scope.SUBSCRIBE)
        if stream not in self.media.publishers:
            raise SignalingError(404, "stream has no publisher on this bridge")
        pc = ice.peer_connection(self.config.ice_servers)
        transceiver = pc.addTransceiver("audio", direction="sendonly")
        try:
            answer = await self._negotiate(pc, offer)
            if transceiver.currentDirection not in ("sendonly", "sendrecv"):
                raise SignalingError(400, "the offer does not receive audio")
            out = RtpOut(transceiver)
            if out.opus_pt is None and out.aic_pt is None:
                raise SignalingError(400, "the offer accepts neither AIC nor Opus")
        except BaseException:
            await pc.close()
            raise
        if out.aic:
            # A decoder must start at an epoch start: open a new epoch now, and again whenever
            # this subscriber loses sync and asks with RTCP PLI/FIR (its "keyframe request").
            self.media.batcher.restart_epoch(stream)
            transceiver.sender._send_keyframe = (
                lambda s=stream: self.media.batcher.restart_epoch(s)
            )
        sub = self.media.add_subscriber(stream, user, pc, out)
        self._watch(pc, sub.session_id)
        logger.info(
            "subscriber joined stream=%s session=%s aic=%s", stream, sub.session_id[:8], out.aic
        )
        return self._created("whep", stream, sub.session_id, answer)

    async def delete(self, request: web.Request) -> web.Response:
        stream, session = request.match_info["stream"], request.match_info["session"]
        scope = Scope.PUBLISH if request.path.startswith("/whip/") else Scope.SUBSCRIBE
        self.authority.authorize_header(request.headers.get("Authorization"), scope, stream)
        s = self.media.sessions.get(session)
        if s is None or s.stream_id != stream or isinstance(s, Publisher) != (scope is Scope.PUBLISH):
            raise SignalingError(404, "no such session")
        await self.media.end_session(session)
        if isinstance(s, Publisher):
            self.verifiers.pop(stream, None)
        return web.Response(status=200, text="session ended\n")

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={
            # PATCH too: a browser must see its 405 (no trickle ICE), not a CORS failure
            "Access-Control-Allow-Methods": "POST, DELETE, PATCH, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Accept-Post": SDP_TYPE,
        })

    async def patch(self, request: web.Request) -> web.Response:
        return web.Response(
            status=405, text="trickle ICE is not supported: send a complete offer\n",
            headers={"Allow": "DELETE"},
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.media.stats(), "http_errors": self.http_errors})


def build_codec(kind: str, capacity: int, bandwidth_kbps: float) -> Any:
    """The codec client: `serve` (the Ray Serve CodecReplica app) or `in-process`."""
    if kind == "serve":
        import ray
        from ray import serve

        from deployments.client import CodecClient
        from deployments.config import APP_NAME, REPLICA_DEPLOYMENT

        ray.init(address="auto", ignore_reinit_error=True)
        return CodecClient(serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP_NAME))
    from sfu_bridge.tick import InProcessCodec, random_streaming_codec

    logger.warning("in-process codec with RANDOM weights: real timings, noise audio")
    return InProcessCodec(random_streaming_codec(capacity, bandwidth_kbps))


def make_limiter(config: BridgeConfig) -> Any:
    """The Redis GCRA hint limiter ($REDIS_URL, else an embedded Redis), one call per tick."""
    from sfu_bridge.limiter import AsyncHintLimiter
    from sfu_bridge.redis_store import connect_async

    return AsyncHintLimiter(connect_async(), bridge_id=config.bridge_id, fail_open=config.limiter_fail_open)


def make_server(
    config: BridgeConfig, codec: Any, secret: bytes, hint_secret: bytes | None = None,
    limiter: Any = None,
) -> BridgeServer:
    """A bridge worker: signaling + media plane. `limiter` None = hints are not rate limited."""
    rtp_ext.install()
    batcher = TickBatcher(
        codec, bridge_id=config.bridge_id, deadline_ms=config.deadline_ms,
        bandwidth_kbps=config.bandwidth_kbps, max_backlog=config.max_backlog_chunks,
        limiter=limiter,
    )
    media = MediaBridge(
        batcher, max_streams=config.max_streams, opus_bitrate=config.opus_bitrate,
        tick_s=config.tick_ms / 1000.0,
    )
    return BridgeServer(config, media, TokenAuthority(secret), hint_secret)


def link_supervisor(media: MediaBridge) -> None:
    """Report outcomes to the cluster's FallbackSupervisor each second and apply its AI-off
    verdicts (needs a Ray connection, as the `serve` codec has)."""
    from deployments.supervisor import get_or_create_supervisor
    from sfu_bridge.supervision import SupervisorLink, ray_exchange

    media.supervision = SupervisorLink(
        media.batcher, ray_exchange(get_or_create_supervisor()), users=media.stream_users,
        replica_of=getattr(media.batcher.codec, "owner", None),
    )


# ---- CLI: `auralink bridge` ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BridgeConfig.from_env()
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (one per core)")
    parser.add_argument("--codec", choices=["serve", "in-process"], default="serve",
                        help="Ray Serve CodecReplica app, or an in-process random-weight codec")
    parser.add_argument("--deadline-ms", type=float, default=d.deadline_ms)
    parser.add_argument("--bandwidth-kbps", type=float, default=d.bandwidth_kbps)
    parser.add_argument("--max-streams", type=int, default=d.max_streams)
    parser.add_argument("--public-url", default="", help="base URL for Location headers")
    parser.add_argument(
        "--ice-server", action="append", metavar="URL", type=_ice_server,
        help="STUN/TURN server of the bridge's connections, announced to clients (repeatable; "
        f"replaces ${ice.ENV_ICE_SERVERS}; TURN credentials only there, as JSON). "
        "None: host candidates only, no traffic to any server",
    )
    parser.add_argument(
        "--public-ip", type=_public_ip, default=None,
        help=f"1:1 NAT: announce this address in place of host candidates (${ice.ENV_PUBLIC_IP})",
    )


def _ice_server(url: str) -> ice.IceServer:
    try:
        return ice.IceServer((url,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _public_ip(value: str) -> str:
    try:
        return ice.check_public_ip(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ice_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """BridgeConfig fields set by `--ice-server` / `--public-ip` (else the environment's)."""
    out: dict[str, Any] = {}
    if args.ice_server:
        out["ice_servers"] = tuple(args.ice_server)
    if args.public_ip:
        out["public_ip"] = args.public_ip
    return out


def _serve_worker(args: argparse.Namespace, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = BridgeConfig.from_env(
        host=args.host, port=port, deadline_ms=args.deadline_ms,
        bandwidth_kbps=args.bandwidth_kbps, max_streams=args.max_streams, public_url=args.public_url,
        **ice_overrides(args),
    )
    secret = load_secret()
    server = make_server(config, build_codec(args.codec, args.max_streams, args.bandwidth_kbps),
                         secret, hint_secret=secret, limiter=make_limiter(config))
    if args.codec == "serve":
        link_supervisor(server.media)
    logger.info("bridge worker listening on %s:%d", config.host, port)
    web.run_app(server.app, host=config.host, port=port, print=None)


def ray_cluster_problem() -> str | None:
    """Why `--codec serve` cannot reach a Ray cluster (None: one answers at the address that
    `ray.init(address="auto")` would use). Checked before any worker starts, so a missing
    cluster is a one-line error instead of a traceback per worker."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        address = canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as exc:
        return str(exc)
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3.0).close()
    except (OSError, ValueError) as exc:
        return f"no Ray cluster answers at {address} ({exc})"
    return None


def run(args: argparse.Namespace) -> int:
    if args.codec == "serve" and (problem := ray_cluster_problem()) is not None:
        print(
            f"auralink bridge: --codec serve needs a running AuraLink cluster: {problem}\n"
            "Start one with `auralink up` (then export RAY_ADDRESS=<its GCS address> "
            "RAY_AUTH_MODE=token), or run without one: `auralink bridge --codec in-process` "
            "(random weights: real timings, noise audio).",
            file=sys.stderr,
        )
        return 1
    try:
        provision_secret("auralink bridge")  # workers inherit AURALINK_SECRET_FILE
    except SecretUnavailable as exc:
        print(f"auralink bridge: {exc}", file=sys.stderr)
        return 2
    if args.workers <= 1:
        _serve_worker(args, args.port)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_serve_worker, args=(args, args.port + i)) for i in range(args.workers)]

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)  # a supervisor's stop ends the workers too
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=10)
    return max((p.exitcode or 0) for p in procs)


def main() -> None:  # pragma: no cover - `python -m sfu_bridge.server`
    parser = argparse.ArgumentParser(prog="auralink bridge")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":  # pragma: no cover
    main()
