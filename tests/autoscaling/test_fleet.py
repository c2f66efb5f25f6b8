"""How many bridge workers: the forecast planner of autoscaling/fleet.py, without Ray."""

from __future__ import annotations

import pytest

from autoscaling.fleet import FleetPlanner, FleetScaling, pinned


def test_planner_scales_up_at_once_and_down_only_after_the_delay():
    scaling = FleetScaling(min_workers=1, max_workers=10, streams_per_worker=10, target_occupancy=1.0,
                           headroom=0.0, warmup_s=0.0, downscale_delay_s=30.0)
    p = FleetPlanner(scaling)
    assert p.desired(0.0, streams=5, active=1) == 1
    assert p.desired(1.0, streams=35, active=1) == 4  # 35 streams at 10 per worker
    for t in range(2, 30):
        assert p.desired(float(t), streams=5, active=4) == 4, t  # lower, but not for 30 s yet
    assert p.desired(40.0, streams=5, active=4) == 1


def test_planner_keeps_min_and_max_and_pinning_fixes_the_size():
    scaling = FleetScaling(min_workers=2, max_workers=3, streams_per_worker=10)
    p = FleetPlanner(scaling)
    assert p.desired(0.0, streams=0, active=0) == 2
    assert p.desired(1.0, streams=1000, active=2) == 3
    p.reconfigure(pinned(scaling, 1))
    assert p.desired(2.0, streams=1000, active=3) == 1  # pinned: no delay, no forecast


def test_bad_scaling_options_are_refused():
    with pytest.raises(ValueError, match="unknown bridge scaling option"):
        FleetScaling.from_kwargs({"max_worker": 3})
    with pytest.raises(ValueError, match="min_workers"):
        FleetScaling(min_workers=4, max_workers=2)
