"""How long a 2-worker bridge fleet takes to start on a local Ray cluster, optionally with
N busy nice-0 processes competing for the CPUs (docs/operations.md, section 6):

    .venv/bin/python scripts/fleet_start_probe.py --busy 2

Prints the seconds until both workers joined and each worker's niceness."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _spin() -> None:
    while True:
        pass


async def _probe(secret_file: str) -> None:
    from autoscaling.fleet import FleetScaling, pinned
    from cluster.bridge_registry import FleetSettings, get_or_create_registry, wait_for_workers
    from sfu_bridge.cluster_bridge import WorkerSettings

    t0 = time.monotonic()
    registry = get_or_create_registry(FleetSettings(
        scaling=pinned(FleetScaling(), 2),
        worker=WorkerSettings(codec="in-process", host="127.0.0.1", hint_limiter=False),
        secret_file=secret_file, control_interval_s=0.25))
    try:
        status = await wait_for_workers(registry, 2, timeout_s=900)
        joined = [e["t"] for e in status["events"] if e["event"] == "joined"]
        starting = min(e["t"] for e in status["events"] if e["event"] == "starting")
        print(f"both workers joined {max(joined) - starting:.1f} s after they were started "
              f"({time.monotonic() - t0:.1f} s with the registry's own start); niceness: "
              f"{[os.getpriority(os.PRIO_PROCESS, w['pid']) for w in status['workers']]} "
              f"(this process: {os.getpriority(os.PRIO_PROCESS, 0)})")
    finally:
        await registry.shutdown.remote()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=0, help="busy nice-0 processes beside the fleet")
    args = ap.parse_args()
    import ray

    from sfu_bridge.fleet import BRIDGE_RESOURCE

    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    with tempfile.TemporaryDirectory() as d:
        secret_file = Path(d) / "cluster-secret"
        secret_file.write_bytes(os.urandom(32))
        secret_file.chmod(0o600)
        ray.init(num_cpus=2, resources={BRIDGE_RESOURCE: 4}, include_dashboard=False,
                 namespace="auralink-fleet-probe", log_to_driver=False, configure_logging=False)
        try:
            asyncio.run(_probe(str(secret_file)))
        finally:
            ray.shutdown()
            for p in spinners:
                p.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
