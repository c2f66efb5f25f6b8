"""Bridge settings: one dataclass, filled from CLI flags or environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from models.constants import DEFAULT_BANDWIDTH_KBPS, DEFAULT_DEADLINE_MS, TICK_S
from sfu_bridge.ice import (
    ENV_ICE_SERVERS,
    ENV_PUBLIC_IP,
    IceServer,
    check_public_ip,
    parse_ice_servers,
)
from sfu_bridge.rate_control import DEFAULT_MAX_HEADER_SHARE


@dataclass
class BridgeConfig:
    host: str = "0.0.0.0"
    port: int = 8088
    # also the limiter's Redis hash tag: no braces
    bridge_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}".replace("{", "").replace("}", "")
    )
    tick_ms: float = 1000.0 * TICK_S  # 40 ms: one chunk per stream per tick
    deadline_ms: float = DEFAULT_DEADLINE_MS  # bridge send -> codes back
    bandwidth_kbps: float = DEFAULT_BANDWIDTH_KBPS  # a stream's bandwidth until its publisher's BW hint says otherwise
    dtx: bool = True  # silent streams send no AI frames (per-user switch: operator policy)
    # where publishers' Opus is decoded: "replica" (the worker forwards and batches packets,
    # the codec replica decodes them and runs DTX's VAD) or "bridge" (this worker decodes,
    # for replicas short of CPU); docs/operations.md "Where publishers' Opus is decoded"
    decode_at: str = "replica"
    adaptive: bool = True  # per-subscriber layers from RTCP; off: full depth, its default packets
    # default packet duration of a depth: the shortest whose headers are at most this share of
    # its wire bytes (docs/protocol.md section 9); 1 = 40 ms whenever the link allows
    max_header_share: float = DEFAULT_MAX_HEADER_SHARE
    opus_bitrate: int = 32_000  # fallback frames re-encoded on the worker (decode_at="bridge" only)
    max_body_bytes: int = 64 * 1024  # SDP offers are a few KB; anything bigger is refused
    max_backlog_chunks: int = 3  # per stream; older chunks are answered fallback/overload
    max_streams: int = 2_000  # published streams one worker accepts (503 beyond)
    # session lifecycle (sfu_bridge/sessions.py): an answered session not connected (ICE +
    # DTLS) by then is closed; subscriber caps per stream and per bearer token, 0 = none
    connect_timeout_s: float = 30.0
    max_subscribers_per_stream: int = 200
    max_subscribers_per_token: int = 10
    public_url: str = ""  # base URL for Location headers; empty = relative paths
    opted_out_users: frozenset[str] = frozenset()  # users whose streams never touch the AI
    limiter_fail_open: bool = True  # Redis unreachable: let hints through (counted) or drop
    # STUN/TURN servers of the bridge's peer connections, announced to clients in Link
    # headers; none = host candidates only, no traffic to any server (sfu_bridge/ice.py)
    ice_servers: tuple[IceServer, ...] = ()
    public_ip: str = ""  # 1:1 NAT: the address announced in place of host candidates

    @classmethod
    def from_env(cls, **overrides) -> BridgeConfig:
        env = os.environ
        cfg = cls(
            host=env.get("AURALINK_BRIDGE_HOST", cls.host),
            port=int(env.get("AURALINK_BRIDGE_PORT", cls.port)),
            deadline_ms=float(env.get("AURALINK_DEADLINE_MS", cls.deadline_ms)),
            bandwidth_kbps=float(env.get("AURALINK_BANDWIDTH_KBPS", cls.bandwidth_kbps)),
            connect_timeout_s=float(env.get("AURALINK_CONNECT_TIMEOUT_S", cls.connect_timeout_s)),
            max_subscribers_per_stream=int(
                env.get("AURALINK_MAX_SUBSCRIBERS_PER_STREAM", cls.max_subscribers_per_stream)
            ),
            max_subscribers_per_token=int(
                env.get("AURALINK_MAX_SUBSCRIBERS_PER_TOKEN", cls.max_subscribers_per_token)
            ),
            opted_out_users=frozenset(
                u for u in env.get("AURALINK_OPTED_OUT_USERS", "").split(",") if u
            ),
            limiter_fail_open=env.get("AURALINK_LIMITER_FAIL", "open").lower() != "closed",
            dtx=env.get("AURALINK_DTX", "on").lower() not in ("off", "0", "false"),
            decode_at=_decode_at(env.get("AURALINK_DECODE_AT", cls.decode_at)),
            adaptive=env.get("AURALINK_ADAPTIVE", "on").lower() not in ("off", "0", "false"),
            max_header_share=_share(env.get("AURALINK_MAX_HEADER_SHARE", "")),
            ice_servers=parse_ice_servers(env.get(ENV_ICE_SERVERS, "")),
            public_ip=check_public_ip(env[ENV_PUBLIC_IP]) if env.get(ENV_PUBLIC_IP) else "",
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg


def _decode_at(text: str) -> str:
    """AURALINK_DECODE_AT: replica or bridge."""
    value = text.strip().lower()
    if value not in ("replica", "bridge"):
        raise ValueError(f"AURALINK_DECODE_AT must be 'replica' or 'bridge', got {text!r}")
    return value


def _share(text: str) -> float:
    """AURALINK_MAX_HEADER_SHARE: a share in (0, 1]; empty = the default policy."""
    if not text.strip():
        return DEFAULT_MAX_HEADER_SHARE
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"AURALINK_MAX_HEADER_SHARE must be in (0, 1], got {text!r}")
    return value
