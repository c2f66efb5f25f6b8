"""The policy inside a real Serve controller: loaded from its import path, scaling on stats.

A small deployment reports the stats a codec replica reports (`record_autoscaling_stats`)
with a stream count the test sets; Serve's controller runs `StreamForecastPolicy` on them.
"""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.ray

import ray  # noqa: E402
from ray import serve  # noqa: E402

from tests import ray_local  # noqa: E402


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StatsSource:
    """Reports codec-replica stats: `streams` spread over the replicas."""

    def __init__(self) -> None:
        self.streams = 0.0

    def set_streams(self, n: float) -> None:
        self.streams = n

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {
            "slots_in_use": self.streams,
            "slot_occupancy": self.streams / 256.0,
            "miss_rate": 0.0,
            "deadline_slack_p10_ms": 10.0,
        }


def _running(app: str) -> int:
    status = serve.status().applications[app].deployments["StatsSource"]
    return status.replica_states.get("RUNNING", 0)


def _wait(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.5)  # polling Serve's status, bounded above
    return pred()


def test_serve_controller_scales_with_the_forecast_policy() -> None:
    # stats reach the controller every 0.5 s instead of 10 s (read by the replica processes)
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    ray_local.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")
        app = StatsSource.options(
            graceful_shutdown_timeout_s=1,
            graceful_shutdown_wait_loop_s=0.2,
            autoscaling_config={
                "min_replicas": 1,
                "max_replicas": 2,
                "upscale_delay_s": 0,
                "downscale_delay_s": 2,
                "policy": {
                    "policy_function": "autoscaling.policy:StreamForecastPolicy",
                    "policy_kwargs": {"streams_per_replica": 100, "warmup_s": 5},
                },
            }
        ).bind()
        handle = serve.run(app, name="scaletest", route_prefix=None)
        assert _running("scaletest") == 1
        # 400 streams on one replica: 400 * 1.1 / (100 * 0.8) = 5.5 -> capped at max_replicas (2)
        handle.set_streams.remote(400.0).result()
        assert _wait(lambda: _running("scaletest") == 2, 90), serve.status()
        # streams gone on every replica: back down to min_replicas after the downscale delay
        for _ in range(20):
            handle.set_streams.remote(0.0).result()
        assert _wait(lambda: _running("scaletest") == 1, 90), serve.status()
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", None)
