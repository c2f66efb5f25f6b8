"""`auralink status`: the Serve app (the real `serve status`) and the bridge workers.

    auralink status                     # the cluster `auralink up` started
    auralink status --address auto --dashboard http://127.0.0.1:8265   # on a cloud head node

Serve's status lists the codec replicas and the ingress; the bridge workers are Ray actors
outside Serve (docs/operations.md, section 6), so their registry is asked too: each worker's
state (active, draining, unresponsive), URL, streams and sessions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.up import APP, DEFAULT_STATE, UpState, serve_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-file", default=str(DEFAULT_STATE), help="auralink up's state file")
    parser.add_argument("--address", default=None, help="Ray cluster (default: auralink up's, else auto)")
    parser.add_argument("--dashboard", default=None,
                        help="Ray dashboard URL for `serve status` (default: auralink up's, else "
                        "http://127.0.0.1:8265)")
    parser.add_argument("--json", action="store_true")


def format_serve(status: dict[str, Any]) -> str:
    app = (status.get("applications") or {}).get(APP)
    if not app:
        return f"serve: no application {APP!r}"
    lines = [f"serve app {APP}: {app.get('status', '?')}"]
    for name, dep in (app.get("deployments") or {}).items():
        replicas = dep.get("replica_states") or {}
        counts = ", ".join(f"{n} {s}" for s, n in sorted(replicas.items()))
        lines.append(f"  {name:<14} {dep.get('status', '?'):<10} {counts}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cluster.bridges import NoCluster, connect, format_status, registry_status

    dashboard = args.dashboard
    if Path(args.state_file).exists():
        state = UpState.from_json(Path(args.state_file).read_text())
        dashboard = dashboard or state.dashboard_url
    dashboard = dashboard or "http://127.0.0.1:8265"
    rc = 0
    try:
        serve = serve_status(dashboard)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        serve, rc = {"error": (str(exc).strip().splitlines() or [""])[-1][-300:]}, 1
    try:
        connect(args.address, args.state_file)
    except NoCluster as exc:
        if "error" in serve:
            print(f"serve status failed: {serve['error']}", file=sys.stderr)
        print(f"auralink status: {exc}", file=sys.stderr)
        return 1
    bridges = registry_status()
    if args.json:
        print(json.dumps({"serve": serve, "bridges": bridges}, indent=2, default=str))
        return rc
    print(format_serve(serve) if "error" not in serve else f"serve status failed: {serve['error']}")
    print(format_status(bridges) if bridges is not None
          else "bridge workers: none (no bridge registry; `auralink bridges up` starts them)")
    return rc
