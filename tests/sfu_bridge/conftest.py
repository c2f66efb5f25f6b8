"""Fixtures for the bridge tests: one random-weight streaming codec per session, a secret."""

from __future__ import annotations

import numpy as np
import pytest
from aiortc.rtcicetransport import RTCIceGatherer

from sfu_bridge import rtp_ext

rtp_ext.install()


def _no_default_ice_servers(cls) -> list:
    raise AssertionError(
        "a peer connection without explicit ICE servers would use aiortc's public STUN "
        "default and send traffic off this machine: make it with sfu_bridge.ice.peer_connection()"
    )


# Nothing leaves the machine: a test that forgets the explicit ICE configuration fails here
# instead of asking a public STUN server (tests/sfu_bridge/test_ice.py checks the real path).
RTCIceGatherer.getDefaultIceServers = classmethod(_no_default_ice_servers)

CLUSTER_SECRET = b"test-cluster-secret-0123456789abcdef"


def replica_settings(**overrides):
    """The in-process codec of the bridge tests: 16 slots, 6 kbps, random weights."""
    from deployments.config import ReplicaSettings

    base = dict(capacity=16, max_batch=16, max_bandwidth_kbps=6.0, allow_random_weights=True,
                torch_threads=1)
    return ReplicaSettings(**{**base, **overrides})


@pytest.fixture(scope="session")
def codec_runtime():
    """One random-weight model for the session: (StreamingEncodec with 16 + 1 slots, kind)."""
    from deployments.replica import _load_codec

    return _load_codec(replica_settings())


@pytest.fixture(scope="session")
def streaming_codec(codec_runtime):
    """The session's `models.StreamingEncodec`: subscribers decode with it (decoder slots are
    their own; the replicas below use its encoder slots)."""
    return codec_runtime[0]


@pytest.fixture(scope="session")
def replica_core(codec_runtime):
    """replica_core(replica_id="in-process", **settings) -> a `CodecReplicaCore` over the
    session's model: the codec every bridge test sends its batches to."""
    from deployments.replica import CodecReplicaCore

    made = []

    def make(replica_id: str = "in-process", **overrides):
        core = CodecReplicaCore(replica_settings(**overrides), replica_id, build=False)
        core._codec, core.weights_kind = codec_runtime
        made.append(core)
        return core

    yield make
    for core in made:
        core._executor.shutdown(wait=False)


@pytest.fixture(scope="session")
def secret() -> bytes:
    return CLUSTER_SECRET


def _sine_chunk(freq: float, index: int, amp: float = 0.3, n: int = 960, rate: int = 24_000):
    t = (np.arange(n) + index * n) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="session")
def sine_chunk():
    """sine_chunk(freq, index) -> float32 [960]: chunk `index` of a continuous 24 kHz sine."""
    return _sine_chunk


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def running_bridge(secret):
    """running_bridge(codec, **config) -> async context manager yielding (server, base_url)."""
    import contextlib

    from aiohttp import web

    from sfu_bridge.config import BridgeConfig
    from sfu_bridge.server import RedactingAccessLogger, make_server

    @contextlib.asynccontextmanager
    async def run(codec, extra_routes=None, limiter=None, **overrides):
        cfg = BridgeConfig(host="127.0.0.1", port=free_port(), bridge_id="test-bridge")
        for k, v in overrides.items():
            setattr(cfg, k, v)
        server = make_server(cfg, codec, secret, hint_secret=secret, limiter=limiter)
        for method, path, handler in extra_routes or []:
            server.app.router.add_route(method, path, handler)
        runner = web.AppRunner(server.app, access_log_class=RedactingAccessLogger)
        await runner.setup()
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        try:
            yield server, f"http://{cfg.host}:{cfg.port}"
        finally:
            await runner.cleanup()

    return run


@pytest.fixture(scope="session")
def tokens(secret):
    from sfu_bridge.tokens import TokenAuthority

    return TokenAuthority(secret)
