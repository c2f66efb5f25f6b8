"""Metrics: local registry semantics, real Ray export to Prometheus, Grafana dashboard names,
and that every declared metric is recorded somewhere in the product."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cluster import metrics as m
from tests import ray_local

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "cluster" / "grafana" / "auralink.json"
PRODUCT_PACKAGES = ("models", "auth", "telemetry", "deployments", "sfu_bridge", "autoscaling", "cluster")


@pytest.fixture()
def local() -> m.LocalRegistry:
    reg = m.local_registry()
    reg.clear()
    yield reg
    reg.clear()


def test_frames_by_outcome_and_reason(local: m.LocalRegistry) -> None:
    m.record_frames("encode", {"ai": 7, "fallback/deadline": 2, "fallback/overload": 0})
    m.record_frame_outcome("encode", "fallback", "deadline")
    assert local.counter(m.FRAMES, op="encode", outcome="ai") == 7
    assert local.counter(m.FRAMES, op="encode", outcome="fallback", reason="deadline") == 3
    # zero counts create no series (Ray counters reject 0 increments)
    assert local.counter(m.FRAMES, reason="overload") == 0
    assert local.counter(m.FRAMES) == 10


def test_bad_outcome_key_and_tags_rejected(local: m.LocalRegistry) -> None:
    with pytest.raises(ValueError, match="is not 'ai', 'dtx' or 'fallback/<reason>'"):
        m.record_frames("encode", {"dropped": 1})
    with pytest.raises(ValueError, match=r"takes tags \['op'\]"):
        local.inc(m.SPECS[m.BATCH_SIZE], 1, {"op": "encode", "x": "y"})
    with pytest.raises(ValueError, match="not a valid HintVerdict"):
        m.record_hints("lost")


def test_histogram_buckets_and_gauges(local: m.LocalRegistry) -> None:
    for ms in (0.2, 4.0, 4.5, 1000.0):
        m.observe_step("decode", ms, 1, "cuda", np.empty(0))
    m.observe_step("encode", 3.0, 2, "cpu", np.array([5.0, -1.0]))  # the miss is not a slack sample
    m.set_slots("replica-a", 12, 64)
    m.set_slots("replica-a", 10, 64)
    snap = local.snapshot()
    h = snap["histograms"]["auralink_step_latency_ms,op=decode,device=cuda"]
    assert h["count"] == 4 and h["buckets"][0] == 1 and h["buckets"][-1] == 1
    assert h["buckets"][m._LATENCY_MS.index(5)] == 2
    assert local.histogram_count(m.DEADLINE_SLACK, op="encode") == 1
    m.observe_step("encode", 3.0, 3, "cpu", np.full(3, 4.0))  # one request's frames: one slack
    m.observe_step("encode", 3.0, 2, "cpu", np.array([-2.0, -2.0]))  # all missed: no sample
    m.observe_step("encode", 3.0, 2, "cpu", np.array([0.5, 0.5]))
    slack = local.snapshot()["histograms"]["auralink_deadline_slack_ms,op=encode"]
    assert slack["count"] == 6 and slack["sum"] == pytest.approx(5.0 + 12.0 + 1.0)
    assert local.gauge(m.SLOTS_IN_USE, replica="replica-a") == 10
    assert json.loads(json.dumps(snap)) == snap


class _FakeRay:
    """Stands in for `ray.util.metrics` objects only to see what reaches them and when."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict]] = []
        self.called = threading.Event()

    def inc(self, spec, value, tags):
        self.calls.append(("inc", spec.name, value, dict(tags)))
        self.called.set()

    def set(self, spec, value, tags):
        self.calls.append(("set", spec.name, value, dict(tags)))

    def observe(self, spec, value, tags):
        self.calls.append(("observe", spec.name, value, dict(tags)))


def _buffered(monkeypatch, flush_s: float) -> tuple[_FakeRay, m.RayBuffer]:
    fake, buf = _FakeRay(), m.RayBuffer(flush_s)
    monkeypatch.setattr(m, "_ray", fake)
    monkeypatch.setattr(m, "_ray_sink", lambda: fake)
    monkeypatch.setattr(m, "_buffer", buf)
    return fake, buf


def test_ray_gets_a_flush_a_second_with_sums_last_values_and_every_sample(local, monkeypatch) -> None:
    """The local registry has every recording at once; Ray gets them at the next flush:
    counters summed, a gauge's last value, each histogram value."""
    fake, _ = _buffered(monkeypatch, flush_s=60.0)
    m.record_frames("encode", {"ai": 5})
    m.record_frames("encode", {"ai": 3, "fallback/deadline": 1})
    m.set_slots("r", 3, 64)
    m.set_slots("r", 4, 64)
    m.observe_step("encode", 2.0, 7, "cpu", np.array([3.0, -1.0, 5.0]))
    assert fake.calls == [] and local.counter(m.FRAMES, outcome="ai") == 8
    m.flush_ray()
    got = fake.calls
    assert ("inc", m.FRAMES, 8.0, {"op": "encode", "outcome": "ai", "reason": ""}) in got
    assert ("inc", m.FRAMES, 1.0, {"op": "encode", "outcome": "fallback", "reason": "deadline"}) in got
    assert [c for c in got if c[1] == m.SLOTS_IN_USE] == [("set", m.SLOTS_IN_USE, 4.0, {"replica": "r"})]
    assert sorted((c[1], c[2]) for c in got if c[0] == "observe") == sorted(
        [(m.STEP_LATENCY, 2.0), (m.BATCH_SIZE, 7.0), (m.DEADLINE_SLACK, 3.0), (m.DEADLINE_SLACK, 5.0)])
    fake.calls.clear()
    m.flush_ray()
    assert fake.calls == []  # nothing twice


def test_ray_connection_is_looked_up_once_per_flush_and_again_after_it(local, monkeypatch) -> None:
    """A recording asks Ray whether it is connected only until it is; the flush asks again
    before handing anything over, so a Ray that shut down meanwhile gets nothing."""
    fake, buf = _FakeRay(), m.RayBuffer(60.0)
    buf._thread = threading.Thread(target=lambda: None)  # no flusher thread: flushes by hand
    monkeypatch.setattr(m, "_ray", fake)
    monkeypatch.setattr(m, "_buffer", buf)
    monkeypatch.setattr(m, "_ray_connected", False)
    asked = []
    ray = types.SimpleNamespace(is_initialized=lambda: asked.append(1) or ray.up, up=True)
    monkeypatch.setitem(sys.modules, "ray", ray)
    m.record_hints("forged")
    m.record_hints("forged")
    assert len(asked) == 1  # connected: not asked again until the flush
    m.flush_ray()
    assert len(asked) == 2 and fake.calls == [("inc", m.HINTS, 2.0, {"verdict": "forged"})]
    m.record_hints("replayed")  # the flush's look holds: not asked
    ray.up = False
    m.flush_ray()  # asks: Ray is gone by then, and gets nothing
    assert len(asked) == 3 and len(fake.calls) == 1
    m.record_hints("replayed")  # not connected: asked each time, nothing buffered
    m.record_hints("replayed")
    assert len(asked) == 5 and not buf._inc
    assert local.counter(m.HINTS, verdict="replayed") == 3  # the local registry has every one


def test_ray_flush_comes_with_the_next_recording_when_due_or_from_the_thread(local, monkeypatch) -> None:
    fake, buf = _buffered(monkeypatch, flush_s=60.0)
    buf._thread = threading.Thread(target=lambda: None)  # no flusher thread: recordings only
    m.record_hints("forged")
    assert fake.calls == []
    buf._due = time.monotonic() - 1.0  # as if a minute had passed
    m.record_hints("forged")  # due: this recording hands both over
    assert fake.calls == [("inc", m.HINTS, 2.0, {"verdict": "forged"})]
    fake, buf = _buffered(monkeypatch, flush_s=0.1)
    m.record_hints("replayed")  # and then nothing more: the thread hands it over
    assert fake.called.wait(5.0)
    assert fake.calls == [("inc", m.HINTS, 1.0, {"verdict": "replayed"})]


def test_repeated_observation_matches_its_copies(local: m.LocalRegistry) -> None:
    """A tick's AI frames share one latency: recording it n times at once fills the same
    buckets, count and sum as n copies (a value on a bound included)."""
    for v, n in ((20.0, 37), (0.2, 5), (3.3, 1), (900.0, 2)):
        m.observe_frame_latency_repeated("encode", v, n)
        m.observe_frame_latency("decode", np.full(n, v))
    m.observe_frame_latency_repeated("encode", 5.0, 0)  # none: nothing recorded
    snap = local.snapshot()["histograms"]
    rep, copies = snap["auralink_frame_latency_ms,op=encode"], snap["auralink_frame_latency_ms,op=decode"]
    assert rep["buckets"] == copies["buckets"] and rep["count"] == copies["count"] == 45
    assert rep["sum"] == pytest.approx(copies["sum"])


def test_batched_observations_match_one_by_one(local: m.LocalRegistry) -> None:
    values = np.concatenate([np.linspace(0.0, 600.0, 997), [0.5, 1.0, 20.0]])  # bounds included
    m.observe_frame_latency("encode", values)
    for v in values.tolist():
        m.observe_step("encode", v, 1, "cpu", np.empty(0))
    snap = local.snapshot()["histograms"]
    batched = snap["auralink_frame_latency_ms,op=encode"]
    single = snap["auralink_step_latency_ms,op=encode,device=cpu"]
    assert batched["buckets"] == single["buckets"] and batched["count"] == 1000
    assert batched["sum"] == pytest.approx(single["sum"])
    m.observe_frame_latency("encode", [])  # nothing to record is fine
    assert local.histogram_count(m.FRAME_LATENCY) == 1000


def test_hints_and_wire_bytes(local: m.LocalRegistry) -> None:
    m.record_hints(m.HintVerdict.LIMITED, 5)
    m.record_hints("forged")
    m.record_hints("replayed", 0)
    m.record_wire_bytes(m.WirePath.AI, 60)
    m.record_wire_bytes("native", 160)
    assert local.counter(m.HINTS, verdict="limited") == 5
    assert local.counter(m.HINTS, verdict="forged") == 1
    assert local.counter(m.HINTS, verdict="replayed") == 0
    assert local.counter(m.WIRE_BYTES, path="ai") == 60
    assert local.counter(m.WIRE_BYTES, path="native") == 160


def _dashboard_metric_names() -> set[str]:
    text = DASHBOARD.read_text()
    return set(re.findall(r"\bray_auralink_[a-z_]+", text))


def test_grafana_dashboard_uses_only_defined_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    assert panels, "dashboard has no panels"
    exported = m.prometheus_names()
    for panel in panels:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = set(re.findall(r"\bray_auralink_[a-z_]+", expr))
            assert names, f"panel {panel['title']!r} queries no AuraLink metric: {expr}"
            assert names <= exported, f"{panel['title']!r}: unknown {sorted(names - exported)}"
    # every issue-listed metric family is on the dashboard
    used = _dashboard_metric_names()
    for name in (m.FRAMES, m.STEP_LATENCY, m.BATCH_SIZE, m.SLOTS_IN_USE, m.HINTS, m.WIRE_BYTES):
        assert set(m.SPECS[name].prometheus_names()) & used, f"{name} not charted"


def _metrics_recorded_by_helper() -> dict[str, set[str]]:
    """Public helper of the metrics module -> the metrics (SPECS names) a call to it records,
    read from the module's source: `_emit(..., NAME, ...)`, or `SPECS[NAME]` in a helper that
    calls `_emit_key` / `_observe_many` / `_observe_repeated`, or a call to another public
    helper."""
    tree = ast.parse(Path(m.__file__).read_text())
    consts = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
        and node.value.value in m.SPECS
    }
    direct: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
            continue
        direct[fn.name], calls[fn.name] = set(), set()
        specs_named = {consts[node.slice.id] for node in ast.walk(fn)
                       if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                       and node.value.id == "SPECS" and isinstance(node.slice, ast.Name)
                       and node.slice.id in consts}
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id == "_emit":
                direct[fn.name] |= {consts[a.id] for a in node.args if isinstance(a, ast.Name) and a.id in consts}
            elif node.func.id in ("_emit_key", "_observe_many", "_observe_repeated"):
                direct[fn.name] |= specs_named
            else:
                calls[fn.name].add(node.func.id)
    recorded = {name: set(v) for name, v in direct.items()}
    for _ in range(len(recorded)):  # helpers calling helpers (e.g. record_frame_outcome)
        for name, callees in calls.items():
            for c in callees & recorded.keys():
                recorded[name] |= recorded[c]
    return {name: v for name, v in recorded.items() if v}


def _calls_in_product_code() -> dict[str, list[str]]:
    """Every function name called in the product packages (not tests) -> where."""
    found: dict[str, list[str]] = {}
    for pkg in PRODUCT_PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.resolve() == Path(m.__file__).resolve():
                continue  # the helpers calling each other record nothing by themselves
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                    if name:
                        found.setdefault(name, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _recorded_in_product_code() -> dict[str, list[str]]:
    """Metric name -> product call sites of helpers that record it."""
    helpers = _metrics_recorded_by_helper()
    calls = _calls_in_product_code()
    out: dict[str, list[str]] = {}
    for helper, names in helpers.items():
        for name in names:
            out.setdefault(name, []).extend(calls.get(helper, []))
    return {k: v for k, v in out.items() if v}


def test_every_declared_metric_is_recorded_by_product_code() -> None:
    """A metric declared but never recorded is a Grafana panel that stays empty and a doc
    that promises what the system does not show."""
    helpers = _metrics_recorded_by_helper()
    recorded = _recorded_in_product_code()
    missing = {
        name: sorted(h for h, names in helpers.items() if name in names)
        for name in m.SPECS if name not in recorded
    }
    assert not missing, f"declared but never recorded outside tests (metric: its helpers): {missing}"


def test_every_grafana_panel_charts_metrics_the_product_records() -> None:
    by_series = {series: spec.name for spec in m.SPECS.values() for series in spec.prometheus_names()}
    recorded = _recorded_in_product_code()
    dash = json.loads(DASHBOARD.read_text())
    empty = {}
    for panel in (p for p in dash["panels"] if p.get("type") != "row"):
        names = {by_series[s] for t in panel.get("targets", [])
                 for s in re.findall(r"\bray_auralink_[a-z_]+", t["expr"]) if s in by_series}
        assert names, f"panel {panel['title']!r} names no declared metric"
        if not names & recorded.keys():
            empty[panel["title"]] = sorted(names)
    assert not empty, f"panels whose metrics nothing records: {empty}"
    charted = {by_series[s] for s in _dashboard_metric_names() if s in by_series}
    assert charted == set(m.SPECS), f"declared but not charted: {sorted(set(m.SPECS) - charted)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_ray_exports_metrics_to_prometheus(local: m.LocalRegistry) -> None:
    import ray
    port = _free_port()
    os.environ["RAY_metrics_report_interval_ms"] = "500"  # read by the processes ray.init starts
    ray_local.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port)
    try:
        m.record_frames("encode", {"ai": 5, "fallback/deadline": 2})
        m.observe_step("encode", 2.0, 7, "cpu", np.array([3.0]))
        m.set_slots("replica-x", 3, 64)
        m.record_hints("replayed", 4)
        m.observe_frame_latency("decode", np.full(1000, 7.0))  # Ray gets a uniform sample
        assert not m._ray_failed
        want = {
            r'ray_auralink_frames_total\{[^}]*outcome="fallback"[^}]*reason="deadline"[^}]*\} 2\.0',
            r'ray_auralink_hints_total\{[^}]*verdict="replayed"[^}]*\} 4\.0',
            r'ray_auralink_slots_in_use\{[^}]*replica="replica-x"[^}]*\} 3\.0',
            r'ray_auralink_batch_size_count\{[^}]*op="encode"[^}]*\} 1\.0',
            rf'ray_auralink_frame_latency_ms_count\{{[^}}]*op="decode"[^}}]*\}} {m.RAY_HISTOGRAM_SAMPLE}\.0',
        }
        deadline, body = time.monotonic() + 45, ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
            except (urllib.error.URLError, ConnectionError):
                body = ""
            if all(re.search(w, body) for w in want):
                break
            time.sleep(0.25)  # polling a scrape endpoint, bounded by the deadline above
        missing = [w for w in want if not re.search(w, body)]
        assert not missing, f"not exported: {missing}"
    finally:
        ray.shutdown()
        os.environ.pop("RAY_metrics_report_interval_ms", None)
