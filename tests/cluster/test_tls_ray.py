"""A real Ray head with mutual TLS on: certified clients get in, everyone else is refused.

The head runs in its own session (process group) and temp dir, so teardown stops exactly the
processes this test started; other Ray clusters on the machine are never touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from cluster.certs import TlsBundle, write_bundle

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
# a GCS method that needs no arguments: reaching it proves the transport let us in
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


@dataclass
class TlsHead:
    address: str  # host:port of the GCS
    bundle: TlsBundle
    env: dict[str, str]  # TLS + token environment a cluster member needs
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _stop_group(pgid: int, temp_dir: str) -> None:
    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) == pgid or temp_dir in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = ours()
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=8)


@pytest.fixture(scope="module")
def tls_head() -> Iterator[TlsHead]:
    # short path: Ray's unix socket paths must stay under ~107 bytes
    temp_dir = tempfile.mkdtemp(prefix="rtls")
    node_ip = _node_ip()
    bundle = write_bundle(Path(temp_dir) / "certs", ips=sorted({"127.0.0.1", node_ip}))
    token = secrets.token_hex(32)
    env = {**bundle.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True,
    )
    pgid = head.pid  # session leader: every daemon `ray start` forks stays in this group
    try:
        out, _ = head.communicate(timeout=90)
        assert head.returncode == 0, f"ray start failed:\n{out[-3000:]}"
        yield TlsHead(f"{node_ip}:{port}", bundle, env, token)
    finally:
        if head.poll() is None:
            head.kill()
        _stop_group(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gcs_call(address: str, credentials: grpc.ChannelCredentials | None, token: str) -> grpc.StatusCode:
    port = address.rsplit(":", 1)[1]
    target = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary(GCS_METHOD, request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", timeout=10, metadata=[("authorization", f"Bearer {token}")])
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_client_with_certificate_runs_a_task(tls_head: TlsHead) -> None:
    code = (
        "import ray\n"
        f"ray.init(address={tls_head.address!r}, log_to_driver=False)\n"
        "print('answer', ray.get(ray.remote(lambda: 41 + 1).remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    res = subprocess.run([sys.executable, "-c", code], env={**env, **tls_head.env},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "answer 42" in res.stdout


def test_mutual_tls_client_reaches_gcs(tls_head: TlsHead) -> None:
    b = tls_head.bundle
    creds = grpc.ssl_channel_credentials(
        b.ca_cert.read_bytes(), b.node_key.read_bytes(), b.node_cert.read_bytes()
    )
    assert _gcs_call(tls_head.address, creds, tls_head.token) == grpc.StatusCode.OK


def test_plaintext_client_refused(tls_head: TlsHead) -> None:
    # what a node or driver with RAY_USE_TLS=0 speaks
    assert _gcs_call(tls_head.address, None, tls_head.token) == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_refused(tls_head: TlsHead) -> None:
    creds = grpc.ssl_channel_credentials(tls_head.bundle.ca_cert.read_bytes())
    assert _gcs_call(tls_head.address, creds, tls_head.token) == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_refused(tls_head: TlsHead, tmp_path: Path) -> None:
    other = write_bundle(tmp_path / "other", ["127.0.0.1"])
    creds = grpc.ssl_channel_credentials(
        tls_head.bundle.ca_cert.read_bytes(), other.node_key.read_bytes(), other.node_cert.read_bytes()
    )
    assert _gcs_call(tls_head.address, creds, tls_head.token) == grpc.StatusCode.UNAVAILABLE


def test_wrong_token_is_a_separate_gate(tls_head: TlsHead) -> None:
    b = tls_head.bundle
    creds = grpc.ssl_channel_credentials(
        b.ca_cert.read_bytes(), b.node_key.read_bytes(), b.node_cert.read_bytes()
    )
    # TLS lets the client in; Ray's token auth then answers at the RPC level
    assert _gcs_call(tls_head.address, creds, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
