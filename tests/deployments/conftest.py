"""Fixtures for the Serve tests: one small local Ray cluster per module, handles only."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cluster.simulator.environment import WORKER_NICENESS_ENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a currently free local TCP port (others run Ray here too)."""
    return _free_port


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray cluster for the module, torn down after it. Its workers run at
    the node's priority, as on every cluster the product starts (`auralink up`, `auralink
    simulate`, ray_cluster.yaml): Ray's default of nice 15 would let any busy process of
    the machine starve the codec replicas."""
    import ray

    before = os.environ.get(WORKER_NICENESS_ENV)
    os.environ[WORKER_NICENESS_ENV] = "0"  # read by the raylet ray.init starts
    try:
        ray.init(num_cpus=2, include_dashboard=False, namespace="auralink-test",
                 log_to_driver=False, configure_logging=False)
    finally:
        if before is None:
            os.environ.pop(WORKER_NICENESS_ENV, None)
        else:
            os.environ[WORKER_NICENESS_ENV] = before
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


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

