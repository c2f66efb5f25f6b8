"""`auralink bridges` / `auralink status` without a cluster: flags -> fleet settings, the
status table, worker URLs."""

from __future__ import annotations

import argparse

import pytest

from cluster.bridge_registry import FleetSettings
from cluster.bridges import add_arguments, fleet_settings, format_status
from sfu_bridge.cluster_bridge import advertised_host


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_become_fleet_settings_that_survive_the_trip_to_the_registry():
    s = fleet_settings(parse("up", "--min-workers", "2", "--max-workers", "6", "--streams-per-worker", "150",
                             "--ports", "8100-8131", "--codec", "in-process", "--deadline-ms", "30",
                             "--secret-file", "/etc/auralink/secret", "--cascade-after", "120"))
    assert s.cascade_after_sessions == 120 and fleet_settings(parse("up")).cascade_after_sessions == 400
    assert (s.scaling.min_workers, s.scaling.max_workers, s.scaling.streams_per_worker) == (2, 6, 150)
    assert (s.worker.port_min, s.worker.port_max, s.worker.codec) == (8100, 8131, "in-process")
    assert s.worker.bridge == {"deadline_ms": 30.0} and s.secret_file == "/etc/auralink/secret"
    assert FleetSettings.from_dict(s.to_dict()) == s
    pinned = fleet_settings(parse("up", "--workers", "3"))
    assert pinned.scaling.min_workers == pinned.scaling.max_workers == 3
    assert fleet_settings(parse("up", "--tls-cert", "c.pem", "--tls-key", "k.pem")).worker.url_scheme == "https"


def test_bad_settings_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="port range"):
        fleet_settings(parse("up", "--ports", "9000-8000"))
    with pytest.raises(ValueError, match="cascade-after"):
        fleet_settings(parse("up", "--cascade-after", "-1"))
    with pytest.raises(ValueError, match="unknown bridge fleet option"):
        FleetSettings.from_dict({"worker": {"hostt": "x"}})


def test_worker_urls_name_the_public_address_or_a_template_of_it():
    assert advertised_host("", "203.0.113.7", "10.0.0.5", "0.0.0.0") == "203.0.113.7"
    assert advertised_host("", "", "10.0.0.5", "0.0.0.0") == "10.0.0.5"
    assert advertised_host("", "", "10.0.0.5", "127.0.0.1") == "127.0.0.1"
    assert advertised_host("{public_ip_dashed}.bridges.example.com", "203.0.113.7", "10.0.0.5",
                           "0.0.0.0") == "203-0-113-7.bridges.example.com"


def test_status_table_lists_workers_states_and_streams():
    status = {
        "workers": [
            {"worker_id": "a1", "state": "active", "url": "http://203.0.113.7:8100", "node_ip": "10.0.0.5",
             "streams": ["room1", "room2"], "sessions": 5},
            {"worker_id": "b2", "state": "draining", "url": "http://203.0.113.8:8100", "node_ip": "10.0.0.6",
             "streams": [], "sessions": 0, "relayed": {"room1": 40}},
        ],
        "starting": ["c3"], "streams": 2,
        "scaling": {"min_workers": 1, "max_workers": 8, "streams_per_worker": 200.0},
        "cascade_after_sessions": 400,
    }
    text = format_status(status)
    assert "follows (subscribers here): room1 (40)" in text and "holds 400 sessions" in text
    assert "2 (1 active, 1 draining; 1 starting), 2 streams, scaling 1..8 at 200 streams/worker" in text
    assert "http://203.0.113.7:8100" in text and "streams: room1, room2" in text
