"""`auralink bridges`: the bridge workers of a running Ray cluster (sfu_bridge/cluster_bridge.py,
cluster/bridge_registry.py).

    auralink bridges up --min-workers 2 --max-workers 16 --streams-per-worker 200
    auralink bridges status [--json]
    auralink bridges scale 3            # pin the fleet at 3 workers (0: drain them all)
    auralink bridges scale --auto       # back to --min-workers..--max-workers on the forecast
    auralink bridges drain <worker id> [--undo]
    auralink bridges down               # kill every worker and the registry

`up` creates the cluster's bridge registry (or reconfigures the one there) and waits until
the minimum number of workers serve. The workers live as detached Ray actors: this command
may exit, `auralink status` and `bridges status` show them. The cluster is found at
`--address` (default: the one `auralink up` recorded, else `auto`, i.e. this node's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.up import DEFAULT_STATE, UpState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "status", "scale", "drain", "down"])
    parser.add_argument("target", nargs="?", default=None,
                        help="scale: the number of workers; drain: a worker id")
    parser.add_argument("--address", default=None, help="Ray cluster (default: auralink up's, else auto)")
    parser.add_argument("--state-file", default=str(DEFAULT_STATE), help="auralink up's state file")
    parser.add_argument("--json", action="store_true", help="status as JSON")
    g = parser.add_argument_group("scaling (up, scale --auto)")
    g.add_argument("--workers", type=int, default=None, help="pin the fleet at N workers")
    g.add_argument("--min-workers", type=int, default=1)
    g.add_argument("--max-workers", type=int, default=8)
    g.add_argument("--streams-per-worker", type=float, default=200.0,
                   help="published streams one worker holds (measure with `auralink bench bridge`)")
    g.add_argument("--downscale-delay-s", type=float, default=60.0)
    g.add_argument("--cascade-after", type=int, default=400, metavar="SESSIONS",
                   help="an owner holding this many sessions sends new subscribers of its streams "
                        "to other workers, which follow them from its relay (0: never)")
    g.add_argument("--auto", action="store_true", help="scale: back to min..max on the forecast")
    g.add_argument("--undo", action="store_true", help="drain: take the worker back")
    w = parser.add_argument_group("workers (up)")
    w.add_argument("--codec", choices=["serve", "in-process"], default="serve")
    w.add_argument("--host", default="0.0.0.0", help="HTTP bind address of each worker")
    w.add_argument("--advertise-host", default="",
                   help="host in the workers' URLs (default: $AURALINK_PUBLIC_IP of the node, else its IP)")
    w.add_argument("--ports", default="0", help="HTTP port range per node, e.g. 8100-8131 (0: any free)")
    w.add_argument("--url-scheme", choices=["http", "https"], default="http")
    w.add_argument("--tls-cert", default="", help="PEM certificate: workers serve HTTPS themselves")
    w.add_argument("--tls-key", default="")
    w.add_argument("--redirect-mode", choices=["auto", "redirect", "forward"], default="auto",
                   help="requests for another worker's stream: 307, forwarded, or auto "
                   "(browsers forwarded, other clients 307)")
    w.add_argument("--no-hint-limiter", action="store_true", help="workers without the Redis hint limiter")
    w.add_argument("--deadline-ms", type=float, default=None)
    w.add_argument("--max-streams", type=int, default=None, help="streams one worker accepts (503 beyond)")
    w.add_argument("--secret-file", default=os.environ.get("AURALINK_SECRET_FILE", ""),
                   help="cluster secret file, at this path on every bridge node ($AURALINK_SECRET_FILE)")
    w.add_argument("--wait-s", type=float, default=300.0, help="up: wait this long for the workers")


def _ports(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not (0 <= a <= b <= 65535):
        raise ValueError(f"bad port range {text!r}")
    return a, b


def connect(address: str | None, state_file: str) -> None:
    """ray.init to the cluster: `address`, else the one `auralink up` recorded, else auto."""
    import logging

    if address is None and Path(state_file).exists():
        address = UpState.from_json(Path(state_file).read_text()).gcs_address
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # `auralink up` clusters use token auth
    import ray

    from deployments.config import RAY_NAMESPACE

    problem = _unreachable(address or "auto")
    if problem:
        raise NoCluster(problem)
    try:
        ray.init(address=address or "auto", namespace=RAY_NAMESPACE, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise NoCluster(f"no Ray cluster at {address or 'auto'}: {str(exc).splitlines()[0][:200]}") from None


def _unreachable(address: str) -> str | None:
    """Why no GCS answers at `address` (None: one does). Checked first: ray.init would retry
    an unreachable address for minutes."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        resolved = canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as exc:
        return f"no Ray cluster at {address}: {exc}"
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3.0).close()
    except (OSError, ValueError) as exc:
        return f"no Ray cluster answers at {resolved} ({exc})"
    return None


class NoCluster(RuntimeError):
    """`connect` found no Ray cluster to join."""


def fleet_settings(args: argparse.Namespace) -> Any:
    from autoscaling.fleet import FleetScaling, pinned
    from cluster.bridge_registry import FleetSettings
    from sfu_bridge.cluster_bridge import WorkerSettings

    scaling = FleetScaling(min_workers=args.min_workers, max_workers=max(args.min_workers, args.max_workers),
                           streams_per_worker=args.streams_per_worker,
                           downscale_delay_s=args.downscale_delay_s)
    if args.workers is not None:
        scaling = pinned(scaling, args.workers)
    lo, hi = _ports(args.ports)
    bridge: dict[str, Any] = {}
    if args.deadline_ms is not None:
        bridge["deadline_ms"] = args.deadline_ms
    if args.max_streams is not None:
        bridge["max_streams"] = args.max_streams
    worker = WorkerSettings(
        codec=args.codec, host=args.host, advertise_host=args.advertise_host, port_min=lo, port_max=hi,
        url_scheme="https" if args.tls_cert else args.url_scheme, tls_cert=args.tls_cert,
        tls_key=args.tls_key, redirect_mode=args.redirect_mode, hint_limiter=not args.no_hint_limiter,
        bridge=bridge,
    )
    if args.cascade_after < 0:
        raise ValueError("--cascade-after must be >= 0 (0: never cascade)")
    return FleetSettings(scaling=scaling, worker=worker, secret_file=args.secret_file,
                         cascade_after_sessions=args.cascade_after)


def format_status(status: dict[str, Any]) -> str:
    workers = status["workers"]
    by_state: dict[str, int] = {}
    for w in workers:
        by_state[w["state"]] = by_state.get(w["state"], 0) + 1
    sc = status["scaling"]
    size = (f"pinned at {sc['min_workers']}" if sc["min_workers"] == sc["max_workers"]
            else f"{sc['min_workers']}..{sc['max_workers']} at {sc['streams_per_worker']:g} streams/worker")
    lines = [
        f"bridge workers: {len(workers)} ({', '.join(f'{n} {s}' for s, n in sorted(by_state.items())) or 'none'}"
        f"; {len(status['starting'])} starting), {status['streams']} streams, scaling {size}",
    ]
    if workers:
        lines.append(f"  {'WORKER':<12} {'STATE':<13} {'URL':<34} {'STREAMS':>7} {'SESSIONS':>8}  NODE")
    for w in workers:
        lines.append(f"  {w['worker_id']:<12} {w['state']:<13} {w['url']:<34} {len(w['streams']):>7} "
                     f"{w['sessions']:>8}  {w['node_ip']}")
        if w["streams"]:
            shown = ", ".join(w["streams"][:8]) + (" ..." if len(w["streams"]) > 8 else "")
            lines.append(f"      streams: {shown}")
        if w.get("relayed"):
            shown = ", ".join(f"{k} ({n})" for k, n in sorted(w["relayed"].items())[:8])
            lines.append(f"      follows (subscribers here): {shown}")
    if status.get("cascade_after_sessions"):
        lines.append(f"  subscribers cascade to other workers once an owner holds "
                     f"{status['cascade_after_sessions']} sessions")
    return "\n".join(lines)


def registry_status() -> dict[str, Any] | None:
    """The registry's status, or None if this cluster has no bridge registry."""
    import ray

    from cluster.bridge_registry import get_registry

    try:
        registry = get_registry()
    except ValueError:
        return None
    return ray.get(registry.status.remote(), timeout=30)


def run(args: argparse.Namespace) -> int:
    import ray

    from cluster.bridge_registry import get_or_create_registry, get_registry, wait_for_workers

    try:
        fleet = fleet_settings(args) if args.action == "up" else None
    except ValueError as exc:
        print(f"auralink bridges: {exc}", file=sys.stderr)
        return 2
    try:
        connect(args.address, args.state_file)
    except NoCluster as exc:
        print(f"auralink bridges: {exc} (start one with `auralink up`, or give --address)", file=sys.stderr)
        return 1
    if args.action == "up":
        if not fleet.secret_file:
            from auth.secret import SecretUnavailable, provision_secret

            try:
                path = provision_secret("auralink bridges")
            except SecretUnavailable as exc:
                print(f"auralink bridges: {exc}", file=sys.stderr)
                return 2
            if path is None:
                print("auralink bridges: give the workers the secret as a FILE: --secret-file or "
                      "AURALINK_SECRET_FILE (a value in AURALINK_SECRET would reach Ray's logs)",
                      file=sys.stderr)
                return 2
            from dataclasses import replace

            fleet = replace(fleet, secret_file=str(Path(path).absolute()))
        registry = get_or_create_registry(fleet)
        ray.get(registry.configure.remote(scaling=asdict(fleet.scaling), worker=asdict(fleet.worker)))
        try:
            status = asyncio.run(wait_for_workers(registry, fleet.scaling.min_workers, args.wait_s))
        except TimeoutError as exc:
            print(f"auralink bridges: {exc}", file=sys.stderr)
            return 1
        print(format_status(status))
        return 0
    if args.action == "status":
        status = registry_status()
        if status is None:
            print("no bridge registry on this cluster (start one with `auralink bridges up`)", file=sys.stderr)
            return 1
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0
    try:
        registry = get_registry()
    except ValueError:
        print("no bridge registry on this cluster", file=sys.stderr)
        return 1
    if args.action == "scale":
        if args.auto:
            scaling = {"min_workers": args.min_workers, "max_workers": max(args.min_workers, args.max_workers),
                       "streams_per_worker": args.streams_per_worker,
                       "downscale_delay_s": args.downscale_delay_s}
            print(ray.get(registry.configure.remote(scaling=scaling)))
        elif args.target is not None and args.target.isdigit():
            ray.get(registry.configure.remote(workers=int(args.target)))
        else:
            print("auralink bridges scale: give a number of workers or --auto", file=sys.stderr)
            return 2
        print(format_status(ray.get(registry.status.remote())))
        return 0
    if args.action == "drain":
        if not args.target:
            print("auralink bridges drain: give a worker id (see `auralink bridges status`)", file=sys.stderr)
            return 2
        if not ray.get(registry.drain.remote(args.target, not args.undo)):
            print(f"no bridge worker {args.target!r}", file=sys.stderr)
            return 1
        print(format_status(ray.get(registry.status.remote())))
        return 0
    n = ray.get(registry.shutdown.remote())
    ray.kill(registry, no_restart=True)
    print(f"stopped {n} bridge worker(s) and the registry")
    return 0
