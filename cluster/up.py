"""`auralink up`: a local Ray cluster running the AuraLink Serve app; `auralink up --down`.

`up` starts a Ray head node (`ray start --head`, dashboard on, every port chosen free unless
given, its own temp dir so several clusters can share a machine), then deploys
serve_config.yaml through the real `serve deploy`, waits until the app is RUNNING, starts
`--bridges` bridge workers next to it (`auralink bridges up`: Ray actors under the bridge
registry, cluster/bridge_registry.py), and prints how to check it (`auralink status`, `serve
status`) and how to stop it. It writes a small state file (ports,
temp dir, where the secret is) that `--down` uses to stop exactly this cluster's processes.

The cluster secret (operator tokens, WHIP/WHEP tokens, hint keys) reaches the Serve app as a
file path, ``AURALINK_SECRET_FILE`` in the application's runtime_env, never as a value: Serve
and Ray log application arguments, `user_config` and runtime_env. With
``AURALINK_SECRET_FILE`` set, that file is used; with ``AURALINK_SECRET`` set, its value is
written to a 0600 file in the cluster's private temp dir (removed by `--down`) and kept out
of the Ray processes' environment; with neither, `auth.secret.provision_secret` creates (or
reuses) ``runs/cluster-secret``, which `auralink token` run from the same folder also finds.

Weights: if pretrained EnCodec weights are not found locally, the replicas run random
weights, and this command says so loudly (timings are real, audio is noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from auth.secret import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SECRET_FILE_NAME,
    SecretUnavailable,
    load_secret,
    provision_secret,
    write_secret_file,
)
from sfu_bridge.fleet import BRIDGE_RESOURCE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "serve_config.yaml"
DEFAULT_STATE = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "auralink" / "up.json"
APP = "auralink"


@dataclass
class UpState:
    gcs_address: str
    dashboard_url: str
    http_url: str
    temp_dir: str
    config: str
    weights: str  # "pretrained" | models.weights.RANDOM_LABEL
    secret_file: str = ""  # the cluster secret's file (a path; the secret is never in here)
    client_server_port: int = 0  # Ray Client server: the one Ray process without temp_dir

    @classmethod
    def from_json(cls, text: str) -> UpState:
        known = {f.name for f in fields(cls)}  # tolerate state files of older versions
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--down", action="store_true", help="stop the cluster `auralink up` started")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config (serve_config.yaml)")
    parser.add_argument("--state-file", default=str(DEFAULT_STATE), help="where up/down keep ports and paths")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--port", type=int, default=0, help="GCS port (0 = a free one)")
    parser.add_argument("--dashboard-port", type=int, default=0, help="0 = a free one")
    parser.add_argument("--http-port", type=int, default=0, help="Serve HTTP port (0 = a free one)")
    parser.add_argument("--weights-dir", default=None, help="EnCodec checkpoint directory")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="wait this long for RUNNING")
    parser.add_argument("--bridges", type=int, default=1,
                        help="bridge workers (Ray actors, one core each) started next to the app; 0: none")
    parser.add_argument("--bridge-host", default="127.0.0.1",
                        help="bind address of the bridge workers (0.0.0.0: reachable from the network)")
    parser.add_argument("--bridge-codec", choices=["serve", "in-process"], default="serve",
                        help="the workers' codec: the deployed app, or in-process random weights")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """The CLI next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _weights_available(weights_dir: str | None) -> bool:
    from models.weights import WeightsUnavailable, load_encodec

    try:
        load_encodec(weights_dir, allow_random=False)
    except WeightsUnavailable:
        return False
    return True


def _loud(lines: list[str]) -> None:
    bar = "!" * 78
    print("\n".join([bar, *(f"!! {line}" for line in lines), bar]), file=sys.stderr, flush=True)


def render_config(path: str, http_port: int, secret_file: str, allow_random: bool,
                  weights_dir: str | None) -> dict:
    """serve_config.yaml with this cluster's port, secret FILE and weights choice filled in."""
    cfg = yaml.safe_load(Path(path).read_text())
    cfg.setdefault("http_options", {})["port"] = http_port
    for app in cfg["applications"]:
        if app.get("name") != APP:
            continue
        env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env_vars[SECRET_FILE_ENV] = secret_file  # a path: runtime_env is logged
        for dep in app.get("deployments", []):
            if dep.get("name") == "CodecReplica":
                uc = dep.setdefault("user_config", {})
                uc["allow_random_weights"] = allow_random
                if weights_dir:
                    uc["weights_dir"] = str(Path(weights_dir).resolve())
    return cfg


def serve_status(dashboard_url: str, timeout_s: float = 60.0) -> dict:
    """`serve status` (the real CLI), parsed."""
    out = subprocess.run([_bin("serve"), "status", "--address", dashboard_url],
                         capture_output=True, text=True, timeout=timeout_s, env=_ray_env())
    if out.returncode != 0:
        raise RuntimeError(f"serve status failed: {out.stderr.strip()[-500:]}")
    return yaml.safe_load(out.stdout) or {}


def _app_status(status: dict) -> tuple[str, dict[str, str]]:
    app = (status.get("applications") or {}).get(APP) or {}
    deps = {name: d.get("status", "") for name, d in (app.get("deployments") or {}).items()}
    return app.get("status", "NOT_STARTED"), deps


def up(args: argparse.Namespace) -> int:
    state_file = Path(args.state_file)
    if state_file.exists():
        print(f"a cluster from `auralink up` is recorded in {state_file}; run `auralink up --down` first",
              file=sys.stderr)
        return 1
    gcs_port = args.port or _free_port()
    dash_port = args.dashboard_port or _free_port()
    http_port = args.http_port or _free_port()
    # A short private temp dir: Unix socket paths must stay under ~100 bytes.
    temp_dir = tempfile.mkdtemp(prefix="auralink-ray-", dir="/tmp")
    try:
        secret_file = _secret_file_for(temp_dir)
    except SecretUnavailable as exc:
        shutil.rmtree(temp_dir, ignore_errors=True)
        print(f"auralink up: {exc}", file=sys.stderr)
        return 2
    client_port = _free_port()

    pretrained = _weights_available(args.weights_dir)
    from models.weights import RANDOM_LABEL  # what the replicas will report

    if not pretrained:
        _loud([
            "No pretrained EnCodec weights found: the codec replicas run RANDOM weights.",
            "Timings are real; the audio is noise. Put the checkpoint in the encodec cache",
            "or pass --weights-dir DIR for real audio.",
        ])

    cmd = [
        _bin("ray"), "start", "--head",
        "--port", str(gcs_port),
        "--num-cpus", str(args.num_cpus),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
        # bridge worker slots of this node (sfu_bridge/cluster_bridge.py: one per worker)
        "--resources", json.dumps({BRIDGE_RESOURCE: max(args.bridges, args.num_cpus)}),
    ]
    print(f"starting Ray head: GCS 127.0.0.1:{gcs_port}, dashboard {dash_port}, temp {temp_dir}")
    _ensure_ray_token()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_ray_env())
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-2000:], file=sys.stderr)
        return res.returncode
    dashboard_url = f"http://127.0.0.1:{dash_port}"
    state = UpState(
        gcs_address=f"127.0.0.1:{gcs_port}", dashboard_url=dashboard_url,
        http_url=f"http://127.0.0.1:{http_port}", temp_dir=temp_dir,
        config=str(Path(args.config).resolve()), weights="pretrained" if pretrained else RANDOM_LABEL,
        secret_file=secret_file, client_server_port=client_port,
    )
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(asdict(state), indent=2))
    state_file.chmod(0o600)

    rendered = Path(temp_dir) / "serve_config.yaml"
    rendered.write_text(yaml.safe_dump(render_config(args.config, http_port, secret_file,
                                                     not pretrained, args.weights_dir), sort_keys=False))
    deploy = _deploy_when_dashboard_ready(rendered, dashboard_url, args.timeout_s)
    if deploy != 0:
        print("deploy failed; stopping the cluster", file=sys.stderr)
        down_state(state, state_file)
        return deploy

    end = time.monotonic() + args.timeout_s
    app_status, deps = "NOT_STARTED", {}
    while time.monotonic() < end:
        try:
            app_status, deps = _app_status(serve_status(dashboard_url))
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if app_status in ("RUNNING", "DEPLOY_FAILED"):
            break
        time.sleep(1.0)
    if app_status != "RUNNING":
        print(f"app is {app_status} ({deps}); see `serve status --address {dashboard_url}`",
              file=sys.stderr)
        return 1
    bridges = start_bridges(args, state, end - time.monotonic()) if args.bridges > 0 else ""
    if bridges is None:
        return 1
    print(f"""
AuraLink is up ({'pretrained' if pretrained else 'RANDOM'} weights, {args.num_cpus} CPUs).
  The cluster uses Ray token auth (~/.ray/auth_token): export RAY_AUTH_MODE=token first.
  Ray:        ray status --address {state.gcs_address}
  Serve:      serve status --address {dashboard_url}
  Dashboard:  {dashboard_url}   (Ray)   {state.http_url}/dashboard/   (AuraLink)
  Control API {state.http_url}/v1/...   Authorization: Bearer <operator token from
              {SECRET_FILE_ENV}={secret_file} auralink token --user ops --stream '*' --scope operator>
 {bridges}
  Status:     auralink status      (Serve's status and the bridge workers with their streams)
Stop it:      auralink up --down      (or `ray stop`, which stops EVERY Ray cluster on this machine)
""")
    return 0


def start_bridges(args: argparse.Namespace, state: UpState, timeout_s: float) -> str | None:
    """`auralink bridges up` against the new cluster: `--bridges` workers, pinned. Returns
    the lines for the summary (None: they did not start)."""
    cmd = [sys.executable, "-m", "cluster.cli", "bridges", "up", "--address", state.gcs_address,
           "--workers", str(args.bridges), "--codec", args.bridge_codec, "--host", args.bridge_host,
           "--secret-file", state.secret_file, "--wait-s", str(max(60.0, timeout_s)), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_ray_env(), cwd=REPO)
    if res.returncode != 0:
        print(f"bridge workers did not start: {(res.stderr or res.stdout)[-1500:]}", file=sys.stderr)
        return None
    print(res.stdout, end="")
    return (f"Bridges:    {args.bridges} worker(s); publish to any of them (WHIP POST /whip/<stream>,\n"
            f"              WHEP POST /whep/<stream>); `auralink bridges scale N` resizes the fleet")


def _deploy_when_dashboard_ready(config: Path, dashboard_url: str, timeout_s: float) -> int:
    """`serve deploy` once the dashboard's REST API answers (it starts after `ray start`)."""
    import urllib.error
    import urllib.request

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=5).close()
            break
        except urllib.error.HTTPError:
            break  # it answers (e.g. 401 without the token): it is up
        except OSError:
            time.sleep(0.5)
    res = None
    for _ in range(3):  # the Serve REST endpoint can lag the dashboard by a moment
        res = subprocess.run([_bin("serve"), "deploy", str(config), "--address", dashboard_url],
                             capture_output=True, text=True, env=_ray_env())
        if res.returncode == 0:
            print(f"deployed {config.name} to {dashboard_url}")
            return 0
        if "Authentication" in (res.stderr or ""):
            break
        time.sleep(2.0)
    assert res is not None
    print(f"serve deploy failed: {(res.stderr or res.stdout)[-1500:]}", file=sys.stderr)
    return 1


def _secret_file_for(temp_dir: str) -> str:
    """The path of the file the Serve app reads the cluster secret from (module docstring)."""
    if os.environ.get(SECRET_ENV):
        path = Path(temp_dir) / SECRET_FILE_NAME
        write_secret_file(path, load_secret())
        print(f"auralink up: the secret from {SECRET_ENV} reaches the cluster as the file {path} "
              "(mode 0600, removed by --down)", file=sys.stderr)
        return str(path)
    path = provision_secret("auralink up")
    assert path is not None  # None only for a secret given by value, handled above
    return str(path.absolute())


def _ray_env() -> dict[str, str]:
    """Ray CLIs run with token authentication on (the token lives in ~/.ray/auth_token). The
    secret's value stays out of every Ray process's environment: they get its file."""
    env = dict(os.environ)
    env.pop(SECRET_ENV, None)
    env.setdefault("RAY_AUTH_MODE", "token")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15 by default; here they are the media path (Serve codec
    # replicas, bridge workers) and must not stall behind every other process of the node
    env.setdefault("RAY_worker_niceness", "0")
    return env


def _ensure_ray_token() -> None:
    subprocess.run([_bin("ray"), "get-auth-token", "--generate"], capture_output=True, text=True,
                   env=_ray_env())


def _is_client_server_of(cmd: str, gcs_port: str, client_port: int) -> bool:
    """`ray start --head` also starts the Ray Client server (`python -m
    ray.util.client.server --address=<node ip>:<gcs port> --port=<client port> ...`): the one
    process whose command line has no temp dir in it, so it is recognised by its ports."""
    if "ray.util.client.server" not in cmd:
        return False
    args = cmd.split()
    if client_port and f"--port={client_port}" in args:
        return True
    return any(a.startswith("--address=") and a.endswith(f":{gcs_port}") for a in args)


def _cluster_pids(temp_dir: str, gcs_address: str = "", client_port: int = 0) -> list[int]:
    """Processes of THIS cluster: every Ray process started by `ray start` carries its temp
    or session dir on its command line, except the Ray Client server (`_is_client_server_of`).
    Other clusters on the machine are left alone."""
    import psutil

    gcs_port = gcs_address.rpartition(":")[2]
    me = os.getpid()
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "username"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ours = temp_dir in cmd or (gcs_port and _is_client_server_of(cmd, gcs_port, client_port))
        if p.info["pid"] != me and ours:
            pids.append(p.info["pid"])
            try:  # workers (replicas, actors) are the raylet's children
                pids.extend(c.pid for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    return sorted(set(pids) - {me})


def down_state(state: UpState, state_file: Path, grace_s: float = 10.0) -> int:
    import psutil

    subprocess.run([_bin("serve"), "shutdown", "--address", state.dashboard_url, "--yes"],
                   capture_output=True, text=True, timeout=120, env=_ray_env())
    pids = _cluster_pids(state.temp_dir, state.gcs_address, state.client_server_port)
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    state_file.unlink(missing_ok=True)
    print(f"stopped the AuraLink cluster at {state.gcs_address} ({len(pids)} processes)")
    return 0


def run(args: argparse.Namespace) -> int:
    state_file = Path(args.state_file)
    if args.down:
        if not state_file.exists():
            print(f"no cluster recorded in {state_file}", file=sys.stderr)
            return 1
        return down_state(UpState.from_json(state_file.read_text()), state_file)
    return up(args)
