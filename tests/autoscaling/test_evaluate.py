"""Policy evaluation on a trace: accounting invariants and the comparison's direction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscaling.evaluate import (
    ArrayTrace,
    EventTrace,
    capacity_from_profile,
    evaluate,
    markdown,
)
from cluster.bench.autoscaling import main

SMALL = EventTrace(peak_streams=2_000, burst_streams=400, ramp_s=200, burst_s=5, hold_s=200,
                   ramp_down_s=100, floor_streams=100, tail_s=100)


def test_trace_shape() -> None:
    assert SMALL.streams(0) == 100
    assert SMALL.streams(200) == 1_600  # burst starts
    assert SMALL.streams(205) == 2_000
    assert SMALL.streams(SMALL.duration_s - 1) == 100


@pytest.fixture(scope="module")
def report() -> dict:
    return evaluate(64.0, "test capacity", start_latency_s=30.0, trace=SMALL, slots=64)


def test_every_policy_sees_the_same_frames_and_none_beats_the_oracle(report: dict) -> None:
    results = report["results"]
    assert len({r["frames_total"] for r in results}) == 1
    expected = sum(SMALL.streams(t) for t in range(int(SMALL.duration_s))) * 25
    assert results[0]["frames_total"] == pytest.approx(expected, abs=1)
    for r in results:
        assert r["replica_seconds"] >= report["oracle"]["replica_seconds"] * 0.9
        assert 0 <= r["frames_fallback_capacity"] <= r["frames_total"]


def test_forecast_loses_fewer_frames_than_serve_default(report: dict) -> None:
    by = {r["policy"].split(" (")[0] + ("/default" if "default delays" in r["policy"] else ""): r
          for r in report["results"]}
    assert by["forecast"]["frames_fallback_capacity"] < by["queue_length/default"]["frames_fallback_capacity"]


def test_report_is_labelled(report: dict) -> None:
    assert report["label"] == "policy evaluation on a trace, capacity per replica from test capacity"
    md = markdown(report, "auralink bench autoscaling --json x.json")
    assert md.startswith("## autoscaling") and report["label"] in md
    assert md.count("\n| ") == len(report["results"]) + 2  # header + rows + oracle


def test_capacity_from_profile() -> None:
    # budget = 20 - 2 - 4 = 14 ms; 1 ms per 10 streams -> 140 streams
    assert capacity_from_profile({1: 0.1, 1000: 100.0}, 20.0, 2.0) == 140


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert main(["--json", str(out), "--capacity", "128", "--capacity-source", "unit test",
                 "--peak-streams", "1000", "--no-docs"]) == 0
    doc = json.loads(out.read_text())
    assert doc["capacity_per_replica"] == 128 and doc["trace"]["peak_streams"] == 1000


def test_pressure_path_recovers_from_a_capacity_set_too_high(report: dict) -> None:
    by = {r["policy"]: r for r in report["results"]}
    wrong = next(r for name, r in by.items() if "too high" in name)
    default = next(r for name, r in by.items() if "default delays" in name)
    assert wrong["frames_fallback_capacity"] < default["frames_fallback_capacity"]


def test_any_stream_series_can_be_evaluated() -> None:
    values = tuple([100.0] * 60 + [100.0 + 20 * i for i in range(60)] + [1300.0] * 120)
    trace = ArrayTrace(values, dt=1.0, burst_at_s=60.0)
    assert trace.duration_s == 240 and trace.peak_streams == 1300 and trace.streams(1e9) == 1300
    rep = evaluate(64.0, "test", start_latency_s=20.0, trace=trace, slots=64, misconfigured_factor=None)
    assert len(rep["results"]) == 4
    assert rep["trace"]["kind"] == "array" and "240 samples" in rep["trace_description"]
