"""WHIP/WHEP signaling for the SFU bridge (aiohttp), and the `auralink bridge` command.

- ``POST /whip/{stream}`` (RFC 9725): ``Content-Type: application/sdp`` offer, ``Authorization:
  Bearer <token>`` with the ``publish`` scope for that stream -> ``201 Created``, ``Location``
  of the session and the SDP answer. ``DELETE <Location>`` ends it. A publish by the user
  already publishing the stream (or an operator) replaces that session at once (a crashed
  publisher's session would otherwise hold the stream until consent expires); the answer
  then carries ``Auralink-Replaced: publisher``. Another user gets 409.
- ``POST /whep/{stream}``: the same for subscribers (``subscribe`` scope). An offer that lists
  the AIC payload type (``a=rtpmap:<pt> AIC/48000``) gets EnCodec codes; others get Opus.
  Subscribers are capped per stream (503) and per bearer token (429).
- Sessions not connected (ICE + DTLS) within ``connect_timeout_s`` of their answer, and
  sessions whose peer fails (consent expiry) or closes, are closed and counted
  (sfu_bridge/sessions.py). A session is ended only by its user's token or an operator's.
- ``PATCH`` on a session: 405 (no trickle ICE: send a complete offer, as WHIP allows).
- ``OPTIONS``: CORS preflight for browser clients on another origin.
- ICE: the bridge's connections use only the configured STUN/TURN servers (``--ice-server``,
  ``$AURALINK_ICE_SERVERS``; none = host candidates only), announced to clients in ``Link``
  headers (RFC 9725 section 4.6); ``--public-ip`` announces a 1:1 NAT's public address.
  DTLS: the bridge is the DTLS server when the offer lets it choose (sfu_bridge/ice.py).
- ``GET /health``: liveness and the worker's counters (no media content).

Errors are 4xx with a one-line text message: 400 malformed SDP (sfu_bridge/sdp_guard.py
checks it before aiortc does) or stream id, 401/403 token, 404 unknown session or stream,
409 stream published by another user, 413 body too large, 415 not application/sdp, 429
subscriber cap of the token, 503 worker full or subscriber cap of the stream. The access log
shows session URLs cut to a prefix: a full one is a capability.

Scaling: one worker process per core, each its own event loop and port (``--workers N``
listens on ``--port`` .. ``--port + N - 1``); a front proxy routes by stream id so a stream's
publisher and subscribers meet on one worker. How many streams a worker holds is measured by
``auralink bench bridge`` (docs/benchmarks.md, section "bridge").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import re
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription
from multidict import CIMultiDict

from auth.secret import SecretUnavailable, provision_secret
from sfu_bridge import aiortc_compat, ice, rtp_ext
from sfu_bridge.config import BridgeConfig
from sfu_bridge.core import BridgeCore
from sfu_bridge.media import MediaBridge, RtpOut
from sfu_bridge.sdp_guard import SdpRejected, check_offer
from sfu_bridge.sessions import (
    EndReason,
    Refusal,
    SessionKind,
    SessionLimits,
    SessionRefused,
    SessionRegistry,
)
from sfu_bridge.tokens import Scope, Token, TokenAuthority, TokenError, TokenFailure, load_secret

logger = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
REPLACED_HEADER = "Auralink-Replaced"
SESSION_PATH_RE = re.compile(r"^(/wh(?:ip|ep)/[^/?]*/)([^/?]+)")
SESSION_PREFIX_CHARS = 8  # what logs show of a session id (the rest is the capability)


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
        check_offer(text)
    except SdpRejected as exc:
        raise SignalingError(400, f"malformed SDP: {exc}"[:200]) from None
    try:
        desc = SessionDescription.parse(text)
    except Exception as exc:  # aiortc's parser asserts and raises anything on bad input
        logger.warning("SDP passed sdp_guard but not aiortc's parser: %s", type(exc).__name__)
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


def redact_path(raw_path: str) -> str:
    """A request path fit for logs: a session id is cut to its first characters."""
    m = SESSION_PATH_RE.match(raw_path)
    if m is None:
        return raw_path
    return f"{m.group(1)}{m.group(2)[:SESSION_PREFIX_CHARS]}...{raw_path[m.end():]}"


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without full session URLs (each one is a bearer capability).
    The path is logged percent-encoded, so a hostile path cannot forge log lines."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs', request.remote, request.method,
            redact_path(request.rel_url.raw_path), request.version.major, request.version.minor,
            response.status, response.body_length, time,
        )


@dataclass
class OfferRequest:
    """A WHIP/WHEP POST that passed the token and SDP checks."""

    stream: str
    token: Token
    bearer: str  # the token as sent: the registry keeps only its digest
    sdp: str


class BridgeServer:
    def __init__(self, config: BridgeConfig, media: MediaBridge, authority: TokenAuthority) -> None:
        self.config = config
        self.media = media
        self.authority = authority
        self.http_errors: dict[int, int] = {}
        self.sessions = SessionRegistry(SessionLimits(
            connect_timeout_s=config.connect_timeout_s,
            max_subscribers_per_stream=config.max_subscribers_per_stream,
            max_subscribers_per_token=config.max_subscribers_per_token,
        ))
        self._reaper: asyncio.Task | None = None
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
        self._reaper = asyncio.ensure_future(self._reap())

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for sid in list(self.sessions.records):
            await self.end_session(sid, EndReason.SHUTDOWN)
        await self.media.stop()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await self._handle(request, handler)
        # browsers on another origin (RFC 9725 section 4.1 expects CORS support)
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Access-Control-Expose-Headers"] = "Location, Link, Auralink-Replaced"
        return resp

    async def _handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except SignalingError as exc:
            return self._error(exc.status, str(exc))
        except TokenError as exc:
            return self._error(exc.status, str(exc), bearer=exc.status == 401)
        except SessionRefused as exc:
            return self._error(exc.status, str(exc))
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

    def _authorize(self, request: web.Request, scope: Scope, stream: str | None = None) -> Token:
        """The request's bearer token with `scope` (for `stream`); TokenError 401/403 else."""
        try:
            return self.authority.authorize_header(request.headers.get("Authorization"), scope, stream)
        except TokenError:
            raise
        except Exception:  # hostile bytes must be a bad token, never a 500
            raise TokenError(TokenFailure.MALFORMED, "malformed token") from None

    async def _read_offer(self, request: web.Request, scope: Scope) -> OfferRequest:
        stream = request.match_info["stream"]
        if not STREAM_ID_RE.match(stream):
            raise SignalingError(400, "bad stream id: use 1-128 of [A-Za-z0-9_.-]")
        token = self._authorize(request, scope, stream)
        bearer = request.headers["Authorization"].strip().partition(" ")[2].strip()
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != SDP_TYPE:
            raise SignalingError(415, f"Content-Type must be {SDP_TYPE}")
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise SignalingError(413, f"request body exceeds {self.config.max_body_bytes} bytes")
        try:
            body = await request.read()
        except (ConnectionError, HttpProcessingError) as exc:
            # the client left mid-body or broke its chunked encoding: nobody to answer, no 500
            raise SignalingError(400, f"request body unreadable: {type(exc).__name__}") from None
        return OfferRequest(stream, token, bearer, parse_offer(body))

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

    # -- session lifecycle -------------------------------------------------------------------
    def _watch(self, pc: RTCPeerConnection, session_id: str) -> None:
        """Follow the peer connection: connected, or gone (consent expiry fails ICE)."""

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState == "connected":
                self.sessions.connected(session_id)
            elif pc.connectionState in ("failed", "closed"):  # no-op if we closed it
                await self.end_session(session_id, EndReason.PEER_GONE)

        self.sessions.answered(session_id)

    async def end_session(self, session_id: str, reason: EndReason) -> bool:
        """Close a session's peer connection, release its slot and count why; False if gone."""
        rec = self.sessions.close(session_id, reason)
        ended = await self.media.end_session(session_id)  # a publisher's stream leaves the core
        if rec is not None:
            logger.info(
                "%s left stream=%s session=%s reason=%s", rec.kind.value, rec.stream_id,
                session_id[:SESSION_PREFIX_CHARS], reason.value,
            )
        return rec is not None or ended

    async def _reap(self) -> None:
        """Close answered sessions whose peer never connected (the ICE/DTLS deadline)."""
        period = min(1.0, max(0.05, self.sessions.limits.connect_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            for sid in self.sessions.overdue():
                try:
                    await self.end_session(sid, EndReason.CONNECT_TIMEOUT)
                except Exception as exc:  # one bad close must not stop the reaper
                    logger.warning("closing session %s failed: %s", sid[:SESSION_PREFIX_CHARS],
                                   type(exc).__name__)

    async def _take_stream(self, req: OfferRequest) -> bool:
        """Make room for a publish: end the stream's publisher if the same user (or an
        operator) publishes again, else 409. True if a session was replaced. The old session
        ends before the new offer is negotiated (one stream, one slot); the offer has passed
        the token and SDP checks by then."""
        old = self.media.publishers.get(req.stream)
        if old is None:
            return False
        if not (old.user == req.token.user or Scope.OPERATOR in req.token.scopes):
            raise self.sessions.refuse(
                Refusal.STREAM_TAKEN, "stream already has a publisher (another user's)"
            )
        await self.end_session(old.session_id, EndReason.REPLACED)
        logger.info("publisher replaced stream=%s old_session=%s by a new publish of user %s",
                    req.stream, old.session_id[:SESSION_PREFIX_CHARS], req.token.user)
        if req.stream in self.media.publishers:  # a concurrent publish took it meanwhile
            raise self.sessions.refuse(Refusal.STREAM_TAKEN, "stream already has a publisher")
        return True

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
        req = await self._read_offer(request, Scope.PUBLISH)
        stream, user, offer = req.stream, req.token.user, req.sdp
        replaced = await self._take_stream(req)
        if self.media.full:
            raise self.sessions.refuse(Refusal.WORKER_FULL, "this bridge worker is full")
        pc = ice.peer_connection(self.config.ice_servers)
        sid = uuid.uuid4().hex
        self.sessions.open(sid, SessionKind.PUBLISHER, stream, user, req.bearer)
        # the core pins this bridge's configured opt-outs (BridgeConfig.opted_out_users)
        pub = self.media.add_publisher(stream, user, pc, session_id=sid)

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
            self.sessions.discard(pub.session_id)
            await self.media.end_session(pub.session_id)
            raise
        pub.opus_pt = next((c.payloadType for c in aiortc_compat.negotiated_codecs(audio[0])
                            if c.name.lower() == "opus"), None)
        # hints are checked by the core under the stream's key (none configured: dropped)
        hints = rtp_ext.hint_map(audio[0])
        hints.hint_sink = lambda raw, s=stream: self.media.core.add_hint(s, raw)
        aiortc_compat.tap_receiver(audio[0].receiver, self._publisher_tap(pub, audio[0].receiver, hints))
        self._watch(pc, pub.session_id)
        logger.info("publisher joined stream=%s session=%s", stream, pub.session_id[:8])
        resp = self._created("whip", stream, pub.session_id, answer)
        if replaced:
            resp.headers[REPLACED_HEADER] = "publisher"
        return resp

    def _publisher_tap(self, pub: Any, receiver: Any, hints: Any) -> Any:
        """A publisher's packets on aiortc's receive path -> `MediaBridge.forward`. Once one
        is consumed there, its SSRC's Opus packets take the native receive instead
        (aiortc_compat.fast_ingress: no STUN parse, queue, coroutine or Python parse)."""
        media, stream = self.media, pub.stream_id
        armed = not media.native_receive

        def on_packet(packet: Any) -> bool:
            nonlocal armed
            consumed = media.forward(stream, packet)
            if consumed and not armed:
                armed = True
                pub.ingress = aiortc_compat.fast_ingress(
                    receiver, packet.ssrc, packet.payload_type, media.payload_sink(pub, packet.payload_type),
                    hint_id=hints.hint_id, hint_sink=hints.hint_sink)
            return consumed

        return on_packet

    async def whep(self, request: web.Request) -> web.Response:
        req = await self._read_offer(request, Scope.SUBSCRIBE)
        stream, user, offer = req.stream, req.token.user, req.sdp
        if stream not in self.media.publishers:
            raise SignalingError(404, "stream has no publisher on this bridge")
        self.sessions.admit_subscriber(stream, req.bearer)
        sid = uuid.uuid4().hex
        self.sessions.open(sid, SessionKind.SUBSCRIBER, stream, user, req.bearer)
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
            self.sessions.discard(sid)
            await pc.close()
            raise
        if out.aic:
            # A decoder must start at an epoch start: open a new epoch now, and again whenever
            # this subscriber loses sync and asks with RTCP PLI/FIR (its "keyframe request").
            self.media.core.restart_epoch(stream)
            aiortc_compat.on_keyframe_request(
                transceiver, lambda s=stream: self.media.core.restart_epoch(s))
        sub = self.media.add_subscriber(stream, user, pc, out, session_id=sid)
        self._watch(pc, sub.session_id)
        logger.info(
            "subscriber joined stream=%s session=%s aic=%s", stream, sub.session_id[:8], out.aic
        )
        return self._created("whep", stream, sub.session_id, answer)

    async def delete(self, request: web.Request) -> web.Response:
        """End a session: a token of the user who opened it (with the WHIP/WHEP scope for
        the stream), or an operator token; 403 for anyone else."""
        stream, session = request.match_info["stream"], request.match_info["session"]
        publish = request.path.startswith("/whip/")
        scope = Scope.PUBLISH if publish else Scope.SUBSCRIBE
        try:
            token = self._authorize(request, scope, stream)
        except TokenError as exc:
            if exc.status != 403:
                raise
            try:
                token = self._authorize(request, Scope.OPERATOR)
            except TokenError:
                raise exc from None
        rec = self.sessions.get(session)
        kind = SessionKind.PUBLISHER if publish else SessionKind.SUBSCRIBER
        if rec is None or rec.stream_id != stream or rec.kind is not kind:
            raise SignalingError(404, "no such session")
        if not self.sessions.may_end(rec, token.user, Scope.OPERATOR in token.scopes):
            raise SignalingError(
                403, "this session belongs to another user: only its owner or an operator may end it"
            )
        await self.end_session(session, EndReason.DELETED)
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
        return web.json_response({
            "status": "ok", **self.media.stats(), "sessions": self.sessions.stats(),
            "http_errors": self.http_errors,
        })


def build_codec(kind: str, capacity: int, bandwidth_kbps: float) -> Any:
    """The codec client: `serve` (the Ray Serve CodecReplica app) or `in-process` (a
    `CodecReplicaCore` in this process, random weights: a bridge without a cluster)."""
    if kind == "serve":
        import ray
        from ray import serve

        from deployments.client import CodecClient
        from deployments.config import APP_NAME, REPLICA_DEPLOYMENT

        ray.init(address="auto", ignore_reinit_error=True)
        return CodecClient(serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP_NAME))
    from deployments.config import ReplicaSettings
    from deployments.replica import CodecReplicaCore

    logger.warning("in-process codec with RANDOM weights: real timings, noise audio")
    return CodecReplicaCore(ReplicaSettings(capacity=capacity, max_batch=capacity,
                                            allow_random_weights=True), "in-process")


def make_limiter(config: BridgeConfig) -> Any:
    """The Redis GCRA hint limiter ($REDIS_URL, else an embedded Redis), one call per tick."""
    from sfu_bridge.limiter import AsyncHintLimiter
    from sfu_bridge.redis_store import connect_async

    return AsyncHintLimiter(connect_async(), bridge_id=config.bridge_id, fail_open=config.limiter_fail_open)


def make_server(
    config: BridgeConfig, codec: Any, secret: bytes, hint_secret: bytes | None = None,
    limiter: Any = None,
) -> BridgeServer:
    """A bridge worker: signaling + media plane. `limiter` None = hints are not rate
    limited; `hint_secret` None = no hint keys, every hint is dropped (counted)."""
    rtp_ext.install()
    core = BridgeCore(
        codec, bridge_id=config.bridge_id, deadline_ms=config.deadline_ms,
        bandwidth_kbps=config.bandwidth_kbps, max_backlog=config.max_backlog_chunks,
        hint_secret=hint_secret, limiter=limiter, opted_out_users=config.opted_out_users,
        capacity=min(config.max_streams, 256), dtx=config.dtx,
        # publishers' Opus decoded by the codec replica (DTX decided there on the decoded
        # audio), not by this worker, unless configured otherwise (MediaBridge.decode_at)
        opus_in=config.decode_at != "bridge",
    )
    media = MediaBridge(
        core, max_streams=config.max_streams, opus_bitrate=config.opus_bitrate,
        tick_s=config.tick_ms / 1000.0, adaptive=config.adaptive,
        max_header_share=config.max_header_share,
    )
    return BridgeServer(config, media, TokenAuthority(secret))


def link_supervisor(media: MediaBridge) -> None:
    """Report outcomes to the cluster's FallbackSupervisor each second and apply its AI-off
    verdicts (needs a Ray connection, as the `serve` codec has)."""
    from deployments.supervisor import get_or_create_supervisor
    from sfu_bridge.core import ray_supervisor_link

    codec = media.core.codec
    media.core.supervisor = ray_supervisor_link(
        get_or_create_supervisor(), owners=getattr(codec, "owners", None))


def link_dashboard(server: BridgeServer, compute: str = "real") -> Any:
    """Publish this worker's stats snapshot to the dashboard's `StatsBoard` once a second,
    from app start to shutdown (needs a Ray connection, as the `serve` codec has)."""
    from sfu_bridge.stats_feed import StatsFeed, ray_board_publisher

    feed = StatsFeed(server.media, server.config.bridge_id, ray_board_publisher(), compute=compute,
                     opus_bitrate=server.config.opus_bitrate)

    async def start(app: web.Application) -> None:
        feed.start()

    async def stop(app: web.Application) -> None:
        await feed.stop()

    server.app.on_startup.append(start)
    server.app.on_shutdown.append(stop)
    return feed


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
    parser.add_argument("--connect-timeout-s", type=float, default=d.connect_timeout_s,
                        help="close sessions not connected (ICE + DTLS) this long after the answer")
    parser.add_argument("--max-subscribers-per-stream", type=int, default=d.max_subscribers_per_stream,
                        help="WHEP sessions per stream on one worker (503 beyond; 0 = no cap)")
    parser.add_argument("--max-subscribers-per-token", type=int, default=d.max_subscribers_per_token,
                        help="WHEP sessions one bearer token may hold (429 beyond; 0 = no cap)")
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
        connect_timeout_s=args.connect_timeout_s,
        max_subscribers_per_stream=args.max_subscribers_per_stream,
        max_subscribers_per_token=args.max_subscribers_per_token,
        **ice_overrides(args),
    )
    secret = load_secret()
    server = make_server(config, build_codec(args.codec, args.max_streams, args.bandwidth_kbps),
                         secret, hint_secret=secret, limiter=make_limiter(config))
    if args.codec == "serve":
        link_supervisor(server.media)
        link_dashboard(server)
    logger.info("bridge worker listening on %s:%d", config.host, port)
    web.run_app(server.app, host=config.host, port=port, print=None,
                access_log_class=RedactingAccessLogger)


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
