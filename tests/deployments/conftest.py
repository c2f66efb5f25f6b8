"""Fixtures for the Serve tests: one small local Ray cluster per module, handles only."""

from __future__ import annotations

import socket

import pytest

from tests.ray_local import init as ray_local_init


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
    """A private 2-CPU Ray cluster for the module (workers at the node's priority, as on
    every cluster the product starts: tests/ray_local.py), torn down after it."""
    import ray

    ray_local_init(num_cpus=2, include_dashboard=False, namespace="auralink-test",
                   log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
