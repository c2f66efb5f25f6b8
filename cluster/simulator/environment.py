"""The live components a simulation drives: Ray + Serve app, Redis + limiter, supervisor.

Local by default (a local Ray, the AuraLink Serve app started here with the replica settings
of the run, an embedded redis-server); `--address` joins an existing cluster whose app was
deployed with `serve deploy` and uses it as it is (its replicas' compute mode is read back and
reported, not assumed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.model_profile import PROFILE_MEASURED, PROFILE_MODELLED, PROFILE_SEED
from cluster.simulator.audio import SpeechSource
from deployments.config import (
    APP_NAME,
    DEFAULT_LATENCY_PROFILE,
    DEFAULT_PROFILE_DEVICE,
    RAY_NAMESPACE,
    REPLICA_DEPLOYMENT,
    ReplicaSettings,
    profile_ms,
)
from deployments.contract import CHUNK_SAMPLES, SAMPLE_RATE

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CODEC_BENCH_JSON = REPO / "docs" / "bench" / "codec.json"
MAX_LOCAL_REPLICAS = 6  # replica processes on one 2-core machine (a real one holds ~1 GB of model)
TRANSPORT_ALLOWANCE_MS = 4.0  # bridge -> replica -> bridge, per tick, on top of L(B)
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's own setting: the nice value of its workers


@dataclass(frozen=True)
class LatencyProfile:
    """A latency profile file: step ms by batch, what it describes, and whether it was measured
    (`auralink bench codec`) or modelled (`auralink bench model-profile`)."""

    ms: dict[int, float]
    device: str  # label for reports: machine, command, weights or model parameters
    weights: str
    kind: str  # PROFILE_MEASURED | PROFILE_MODELLED
    parameters: dict[str, Any] | None = None  # every input of a modelled profile


def load_profile_file(path: Path = CODEC_BENCH_JSON) -> LatencyProfile | None:
    """The profile in `path`, or None if there is none. A modelled profile must carry its
    parameters; a file without `modelled: true` is a measurement."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    prof = doc.get("latency_profile_ms") if isinstance(doc, dict) else None
    if not isinstance(prof, dict) or not prof:
        return None
    out = {}
    for b, v in prof.items():
        out[int(b)] = float(v["p50"] if isinstance(v, dict) else v)
    if doc.get("modelled") is True:
        params = doc.get("profile_parameters")
        if not isinstance(params, dict) or not params:
            raise ValueError(f"{path}: a modelled profile needs its profile_parameters")
        label = str(doc.get("machine") or doc.get("device") or "unnamed device")
        if PROFILE_MODELLED not in label:
            label += f", {PROFILE_MODELLED}"
        return LatencyProfile(out, label, "none (modelled profile)", PROFILE_MODELLED, params)
    device = doc.get("machine") or doc.get("device") or "unknown device"
    weights = doc.get("weights")
    label = f"{device}, `auralink bench codec`" + (f", {weights} weights" if weights else "")
    return LatencyProfile(out, label, str(weights or "unknown"), PROFILE_MEASURED)


def load_profile(path: Path = CODEC_BENCH_JSON) -> tuple[dict[int, float], str, str] | None:
    """The latency profile (p50 step ms by batch), device label and the weights it was measured
    with (see `load_profile_file` for what kind of profile it is)."""
    p = load_profile_file(path)
    return None if p is None else (p.ms, p.device, p.weights)


def max_batch_within(profile: dict[int, float], deadline_ms: float, margin_ms: float) -> int:
    """Largest batch whose step fits the deadline with the margin and a transport allowance
    (0 if not even one frame does)."""
    budget = deadline_ms - margin_ms - TRANSPORT_ALLOWANCE_MS
    best = 0
    b = 1
    while b <= 65536 and profile_ms(profile, b) <= budget:
        best = b
        b = b + 1 if b < 64 else int(b * 1.1)
    return best


def streams_per_replica(profile: dict[int, float], deadline_ms: float, margin_ms: float) -> int:
    """`max_batch_within`, with 20% headroom for Poisson bursts (at least 1)."""
    return max(1, int(max_batch_within(profile, deadline_ms, margin_ms) * 0.8))


# The forecast policy's look-ahead: decision -> replica ready. A local emulated replica
# process starts in a few wall seconds, well under 2 simulated seconds at x6 or more.
SIM_REPLICA_WARMUP_S = 2.0
# Time constants of the forecast policy (autoscaling.policy.PolicyConfig) that are durations.
_POLICY_DURATIONS = ("warmup_s", "level_tau_s", "trend_tau_s", "trend_damping_s",
                     "pressure_memory_s", "window_s", "sample_interval_s")


def autoscaling_config(cfg, per: int, dilation: float, capacity: int | None = None) -> dict[str, Any]:
    """Serve `autoscaling_config` for an autoscaled run, every duration in wall time (x D).

    `per`: streams per replica to start with (with headroom); `capacity`: the most one replica
    serves within the deadline (default `per`), which the forecast policy gets as its
    `streams_per_replica` (it plans at `target_occupancy` of it itself).
    `forecast`: this project's StreamForecastPolicy; `queue-length`: Serve's default policy
    with Serve's default target and delays."""
    from ray.serve.config import AutoscalingConfig

    from autoscaling.policy import PolicyConfig

    serve_default = AutoscalingConfig()  # Serve's own defaults for its queue-length policy
    look_back = serve_default.look_back_period_s * dilation
    floor = cfg.streams * (cfg.ramp_floor_frac if cfg.trace == "ramp" else 1.0)
    initial = max(1, min(cfg.max_replicas, math.ceil(floor / per)))
    common = {"min_replicas": 1, "initial_replicas": initial, "max_replicas": cfg.max_replicas}
    if cfg.autoscale == "queue-length":
        return {**common,
                "target_ongoing_requests": serve_default.target_ongoing_requests,
                "upscale_delay_s": serve_default.upscale_delay_s * dilation,
                "downscale_delay_s": serve_default.downscale_delay_s * dilation,
                "look_back_period_s": look_back}
    if cfg.autoscale != "forecast":
        raise ValueError(f"unknown autoscale policy {cfg.autoscale!r}: off, forecast or queue-length")
    cap = capacity or per
    base = PolicyConfig(streams_per_replica=cap, warmup_s=SIM_REPLICA_WARMUP_S)
    kwargs: dict[str, Any] = {"streams_per_replica": cap}
    for name in _POLICY_DURATIONS:
        v = getattr(base, name)
        kwargs[name] = None if v is None else v * dilation
    return {**common,
            # As serve_config.yaml: the policy smooths and forecasts itself.
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 120.0 * dilation,
            "look_back_period_s": look_back,
            "policy": {"policy_function": "autoscaling.policy:StreamForecastPolicy",
                       "policy_kwargs": kwargs}}


def replica_config(compute: str, profile: dict[int, float], dilation: float, deadline_ms: float,
                   margin_ms: float, streams_each: int) -> dict[str, Any]:
    """The `ReplicaSettings` fields a load test gives its codec replicas, `streams_each`
    streams per replica. Every time constant the replica sees is in wall time: scaled by the
    dilation."""
    d = ReplicaSettings()
    return {
        "compute": compute,
        "latency_profile": {int(b): v * dilation for b, v in profile.items()},
        "deadline_ms": deadline_ms * dilation,
        "margin_ms": margin_ms * dilation,
        "frame_period_ms": d.frame_period_ms * dilation,
        "max_hold_ms": d.max_hold_ms * dilation,
        "max_batch": max(64, 2 * streams_each),
        "capacity": max(64, int(streams_each * 2)),
        "max_queue": max(4096, 8 * streams_each),
    }


def capacity_plan(profile: dict[int, float], device: str, streams: int, deadline_ms: float,
                  margin_ms: float, replicas_run: int) -> dict[str, Any]:
    """What the latency profile says about this load before a frame is sent: streams one
    replica holds within the deadline, replicas the load needs, replicas this run has."""
    per = streams_per_replica(profile, deadline_ms, margin_ms)
    need = math.ceil(streams / per)
    holds = replicas_run >= need
    return {
        "profile_device": device,
        "deadline_ms": deadline_ms,
        "streams_per_replica": per,
        "replicas_needed": need,
        "replicas_run": replicas_run,
        "holds": holds,
        "verdict": (
            f"holds: {replicas_run} replica{'s' if replicas_run != 1 else ''} for {streams} streams "
            f"at {per} per replica" if holds else
            f"does not hold: {streams} streams need {need} replicas of '{device}' at {per} per replica "
            f"within {deadline_ms:g} ms; this run has {replicas_run}, so the rest falls back "
            "(deadline/overload) by design"
        ),
        "note": "largest batch B with L(B) + margin + transport allowance within the deadline, "
                "less 20% headroom for Poisson bursts",
    }


def native_frame_bytes(bitrate: int, seed: int = 0, seconds: float = 2.0) -> float:
    """Mean Opus bytes per 40 ms of the simulator's speech-like audio, by really encoding it."""
    from models.opus import OpusCodec

    n = 4
    src = SpeechSource(n, seed=seed)
    codec = OpusCodec(n, sample_rate=SAMPLE_RATE, frame_ms=20, bitrate=bitrate)
    rows = np.arange(n)
    total = 0
    chunks = int(seconds * SAMPLE_RATE / CHUNK_SAMPLES)
    for _ in range(chunks):
        pkts = codec.encode(rows, src.next(rows))
        total += sum(len(p) for per in pkts for p in per)
    return total / (n * chunks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Environment:
    def __init__(self) -> None:
        self.client = None
        self.redis_url: str | None = None
        self.limiter_label = "none"
        self.redis = None
        self.embedded = None
        self.supervisor = None
        self.supervisor_label = "none"
        self.hint_secret = b""
        self.native_frame_bytes = 0.0
        self.profile: dict[int, float] = {}
        self.profile_device = ""
        self.profile_kind = PROFILE_SEED
        self.profile_parameters: dict[str, Any] | None = None
        self.compute_label = ""
        self.weights = "unknown"
        self.dashboard_url: str | None = None
        self.board = None
        self.replicas = 0
        self.capacity_plan: dict[str, Any] | None = None
        self.autoscaling: dict[str, Any] | None = None
        self._env_restore: dict[str, str | None] = {}
        self._own_ray = False
        self._own_app = False
        self._redis_pid: int | None = None

    # -- start / stop
    @classmethod
    async def start(cls, cfg, dilation: float) -> Environment:
        import ray
        from ray import serve

        env = cls()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if cfg.autoscale != "off" and not cfg.address:
            # Replicas and handles report to the autoscaler once per simulated second (the
            # workers of the local Ray started below inherit this environment).
            for var in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
                env._env_restore[var] = os.environ.get(var)
                os.environ[var] = f"{dilation:g}"
        from auth.secret import SECRET_FILE_ENV, load_secret, provision_secret

        # Before Ray starts: the ingress of a local cluster inherits AURALINK_SECRET_FILE.
        env._env_restore.setdefault(SECRET_FILE_ENV, os.environ.get(SECRET_FILE_ENV))
        provision_secret("auralink simulate")
        if cfg.address:
            ray.init(address=cfg.address, namespace=RAY_NAMESPACE, log_to_driver=False)
        else:
            # Ray starts its workers at nice 15, below its own daemons (GCS, raylet, log
            # monitor, agents) and every other process here, which then preempt the bridges
            # and replicas ~30:1 whenever they wake: on a few shared cores, ticks stall for
            # 100s of ms and whole batches miss their deadline. The media path runs at the
            # priority of the rest (0).
            env._env_restore.setdefault(WORKER_NICENESS_ENV, os.environ.get(WORKER_NICENESS_ENV))
            os.environ[WORKER_NICENESS_ENV] = "0"
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     namespace=RAY_NAMESPACE, log_to_driver=False)
            env._own_ray = True
        env.hint_secret = load_secret()
        # Profile: given, else the codec benchmark's, else the built-in CPU one.
        if cfg.latency_profile:
            env.profile, env.profile_device = dict(cfg.latency_profile), cfg.profile_device or "given"
            profile_weights = cfg.profile_weights
            env.profile_kind, env.profile_parameters = cfg.profile_kind, cfg.profile_parameters
        else:
            loaded = load_profile_file() or load_profile_file(REPO / "runs" / "bench-codec.json")
            if loaded is not None:
                env.profile, env.profile_device, profile_weights = loaded.ms, loaded.device, loaded.weights
                env.profile_kind, env.profile_parameters = loaded.kind, loaded.parameters
            else:
                env.profile, env.profile_device, profile_weights = (
                    dict(DEFAULT_LATENCY_PROFILE), DEFAULT_PROFILE_DEVICE, "unknown")
        if cfg.address:
            await env._attach_app()
        else:
            env._start_app(cfg, dilation)
        from deployments.client import CodecClient

        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP_NAME)
        env.client = CodecClient(handle)
        if not await env.client.ready(timeout_s=120):
            raise RuntimeError("codec replicas did not become ready within 120 s")
        info = await handle.options(method_name="info").remote()
        if cfg.address and info.get("compute") in ("real", "emulated") and info["compute"] != cfg.compute:
            # An existing cluster runs what it was deployed with; the run follows and says so.
            logger.warning("the cluster's replicas run %s compute (not %s): simulating with theirs",
                           info["compute"], cfg.compute)
            cfg.compute = info["compute"]
        env.weights = info.get("weights", "unknown")
        if info.get("compute") == "emulated":
            # No model runs; the step costs are those of the model the profile was measured
            # with, so that is the label (`random` unless the benchmark had a checkpoint).
            env.weights = profile_weights
        env.compute_label = (
            f"{info.get('compute')}: replicas spend L(B) of the latency profile from "
            f"'{info.get('latency_profile_device')}'" if info.get("compute") == "emulated"
            else f"real: EnCodec on {info.get('device')} ({info.get('backend')})"
        )
        env._start_redis(dilation)
        env._start_supervisor()
        env.native_frame_bytes = native_frame_bytes(_opus_bitrate(), seed=cfg.seed)
        return env

    def _start_app(self, cfg, dilation: float) -> None:
        from ray import serve

        from deployments.app import Ingress
        from deployments.config import SupervisorSettings
        from deployments.replica import CodecReplica

        emulated = cfg.compute == "emulated"
        margin = 2.0
        per = streams_per_replica(self.profile, cfg.deadline_ms, margin)
        want = cfg.replicas or max(1, math.ceil(cfg.streams / per))
        if cfg.replicas is None and want > MAX_LOCAL_REPLICAS:
            want = MAX_LOCAL_REPLICAS
        if not emulated:
            # A real replica reserves a core; leave one for the bridges, Redis and Serve.
            import ray

            cores = int(ray.cluster_resources().get("CPU", 1))
            if want > max(1, cores - 1):
                logger.warning("real compute: %d replicas wanted, %d fit on %d cores", want,
                               max(1, cores - 1), cores)
                want = max(1, cores - 1)
        auto = None
        if cfg.autoscale != "off":
            cap = max(1, max_batch_within(self.profile, cfg.deadline_ms, margin))
            auto = autoscaling_config(cfg, per, dilation, capacity=cap)
        if auto is not None:
            if not emulated:
                auto["max_replicas"] = min(auto["max_replicas"], want)  # the cores there are
                auto["initial_replicas"] = min(auto["initial_replicas"], auto["max_replicas"])
            want = auto["initial_replicas"]
        self.autoscaling = auto
        self.replicas = want
        self.capacity_plan = capacity_plan(self.profile, self.profile_device, cfg.streams, cfg.deadline_ms,
                                           margin, auto["max_replicas"] if auto else want)
        if not self.capacity_plan["holds"]:
            logger.warning("capacity plan: %s", self.capacity_plan["verdict"])
        # Autoscaled: each replica is sized for what the profile says it serves.
        streams_each = per if auto is not None else math.ceil(cfg.streams / want)
        replica = replica_config(cfg.compute, self.profile, dilation, cfg.deadline_ms, margin,
                                 streams_each)
        replica.update({"latency_profile_device": self.profile_device,
                        "allow_random_weights": cfg.weights_dir is None, "weights_dir": cfg.weights_dir})
        if not emulated:
            replica["torch_threads"] = 1
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scale = {"autoscaling_config": auto} if auto is not None else {"num_replicas": want}
        rep = CodecReplica.options(
            **scale,
            # Emulated replicas sleep; they need no reserved core.
            ray_actor_options={"num_cpus": 0.01 if emulated else 1.0, "num_gpus": 0},
        ).bind(replica)
        app = Ingress.bind(rep, _asdict(SupervisorSettings()))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        self._own_app = True
        self.dashboard_url = f"http://127.0.0.1:{port}/dashboard/"

    async def _attach_app(self) -> None:
        self.replicas = self.replica_count()

    def _start_redis(self, dilation: float) -> None:
        """Redis for the generators' limiters: $REDIS_URL, else an embedded server here (on a
        unix socket: generators on this machine only; a cluster run needs $REDIS_URL)."""
        from sfu_bridge import redis_store

        self.redis = redis_store.connect()
        self.embedded = redis_store.embedded_server() if not os.environ.get(redis_store.REDIS_URL_ENV) else None
        if self.embedded is not None:
            self._redis_pid = self.embedded.pid
            self.redis_url = self.embedded.url
        else:
            self.redis_url = os.environ[redis_store.REDIS_URL_ENV]
        self.limiter_label = f"GCRA in Redis, {100.0:g} hints/s per stream (simulated time)"

    def _start_supervisor(self) -> None:
        from deployments.supervisor import get_or_create_supervisor

        self.supervisor = get_or_create_supervisor()
        self.supervisor_label = "FallbackSupervisor actor (named, detached)"

    async def close(self) -> None:
        import ray
        from ray import serve

        if self._own_app:
            try:
                serve.shutdown()
            except Exception as exc:  # noqa: BLE001 - shutting down: report, keep going
                logger.info("serve shutdown: %s", exc)
        for actor in (self.supervisor, self.board):
            if actor is None or not self._own_ray:
                continue
            try:
                ray.kill(actor)
            except Exception as exc:  # noqa: BLE001
                logger.info("actor kill: %s", exc)
        if self._own_ray:
            ray.shutdown()
        for var, old in self._env_restore.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old
        if self.embedded is not None:
            self.embedded.close()

    # -- what the loop asks for
    def replica_count(self) -> int:
        from deployments.affinity import local_view

        view = local_view(APP_NAME, REPLICA_DEPLOYMENT)
        return len(view.replica_uids()) if view is not None else self.replicas

    def _replica_actors(self) -> list[tuple[str, str]]:
        import ray

        out = []
        for a in ray.util.list_named_actors(all_namespaces=True):
            name = a["name"] if isinstance(a, dict) else a
            ns = a.get("namespace", "serve") if isinstance(a, dict) else "serve"
            if "SERVE_REPLICA" in name and REPLICA_DEPLOYMENT in name:
                out.append((name, ns))
        return sorted(out)

    def kill_replica(self) -> str:
        import ray

        actors = self._replica_actors()
        if not actors:
            return "no replica actor found"
        name, ns = actors[0]
        ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
        return f"killed {name.split('#')[-1]} ({len(actors)} replicas before)"

    def replica_pid(self) -> int | None:
        """A codec replica process of this run's local cluster (None on a remote cluster)."""
        pids = _descendants_named("ServeReplica", REPLICA_DEPLOYMENT)
        return pids[0] if pids else None

    def stop_redis(self) -> str:
        if self.embedded is None:
            return "Redis is external (REDIS_URL): not stopped by the simulator"
        self.embedded.stop()
        return "embedded redis-server stopped; the limiter's unreachable-Redis policy applies"

    def redis_cpu_s(self) -> float | None:
        if self._redis_pid is None:
            return None
        cpu = _proc_cpu_s(self._redis_pid)
        return cpu if cpu is not None else getattr(self, "_redis_cpu_last", None)

    async def supervisor_cpu_s(self) -> tuple[float | None, float | None]:
        """(CPU of the supervisor's own work, CPU of its whole process) in seconds, as the
        actor reports them (None: no supervisor, or it did not answer)."""
        if self.supervisor is None:
            return None, None
        try:
            info = await asyncio.wait_for(self.supervisor.info.remote(), 30.0)
        except Exception as exc:  # noqa: BLE001 - a restarting supervisor leaves a gap, not a crash
            logger.info("supervisor info failed: %s", type(exc).__name__)
            return None, None
        return info.get("cpu_s"), info.get("process_cpu_s")

    async def replica_infos(self) -> list[dict[str, Any]]:
        """`info()` of every live codec replica (its bookkeeping and process CPU among it),
        each reached through a routing key it owns."""
        from deployments import affinity
        from deployments.affinity import local_view

        view = local_view(APP_NAME, REPLICA_DEPLOYMENT)
        uids = view.replica_uids() if view is not None else []
        keys: dict[str, str] = {}
        i = 0
        while len(keys) < len(uids) and i < 100 * max(1, len(uids)):
            key = f"probe-{i}"
            keys.setdefault(affinity.owner(key, uids), key)
            i += 1
        from ray import serve

        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP_NAME)
        out = []
        for key in keys.values():
            try:
                out.append(await asyncio.wait_for(
                    handle.options(method_name="info", session_id=key).remote(), 10.0))
            except Exception as exc:  # noqa: BLE001 - a replica dying now is not the report's end
                logger.info("replica info for %s failed: %s", key, type(exc).__name__)
        return out


def _descendants_named(*words: str) -> list[int]:
    """Processes below this one (a local Ray started here: raylet -> workers) whose command
    line holds all `words`; Ray names worker processes `ray::<Actor>...`. Other people's Ray
    clusters on the same machine are not our descendants, so they are never touched."""
    me = os.getpid()
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    out = []
    for pid, line in cmd.items():
        if not all(w in line for w in words):
            continue
        p, hops = parent.get(pid), 0
        while p and p != me and hops < 16:
            p, hops = parent.get(p), hops + 1
        if p == me:
            out.append(pid)
    return sorted(out)


def _proc_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of a local process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _asdict(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


def _opus_bitrate() -> int:
    from sfu_bridge.config import BridgeConfig

    return int(BridgeConfig.opus_bitrate)


def wall_now() -> float:
    return time.time()
