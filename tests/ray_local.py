"""A test's private local Ray cluster, started as the product starts its clusters.

`auralink up`, `auralink simulate` and ray_cluster.yaml run Ray's workers at the node's own
priority (`RAY_worker_niceness=0`; Ray's default is nice 15, where any busy process of the
machine starves codec replicas, bridge workers and the supervisor). `init` starts a test's
cluster the same way; `processes_titled` finds its workers to check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cluster.simulator.environment import WORKER_NICENESS_ENV


def init(**kwargs: Any) -> Any:
    """`ray.init(**kwargs)` of a new local cluster whose workers run at nice 0 (read by the
    raylet it starts; the test process's environment is left as it was)."""
    import ray

    before = os.environ.get(WORKER_NICENESS_ENV)
    os.environ[WORKER_NICENESS_ENV] = "0"
    try:
        return ray.init(**kwargs)
    finally:
        if before is None:
            os.environ.pop(WORKER_NICENESS_ENV, None)
        else:
            os.environ[WORKER_NICENESS_ENV] = before


def processes_titled(prefix: str) -> list[int]:
    """Pids of this machine's processes whose title (Ray's `ray::...`) starts with `prefix`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(prefix):
            pids.append(int(entry.name))
    return pids
