"""AuraLink metrics: one table of names and tags, recorded the same way from every layer.

This module sits low (it imports neither Ray nor any other AuraLink package) so that every
process that makes a decision records it where it is made: codec replicas and the supervisor
(deployments), bridges and the hint limiter (sfu_bridge), the autoscaling policy. `cluster.metrics`
(the name the CLI and operators use) and `deployments.metrics` are the same module.

Every metric is declared once in `SPECS`. Callers use the typed helpers below
(`record_frames`, `observe_step`, ...) and never build metric objects themselves.

Two sinks receive each recording:

* a process-local `LocalRegistry` (always on, a dict under a lock) so pure code paths, tests,
  the simulator and the operator dashboard can read counts without Ray;
* `ray.util.metrics` objects, created lazily on first use and only when the process is
  connected to Ray (a driver after `ray.init`, a Serve replica, an actor), because Ray's
  metric objects need a core worker. Ray exports them to Prometheus with a `ray_` prefix;
  counters get a `_total` suffix and histograms `_bucket`/`_sum`/`_count`
  (`prometheus_names`). `cluster/grafana/auralink.json` charts exactly those names.
  Recordings reach them through `RayBuffer`, at most `RAY_FLUSH_S` (1 s) later, summed:
  Ray exports every few seconds, and a media path that records every tick should not pay
  for a handful of Ray metric calls each time. A process that dies loses at most its last
  second of counts to Ray (never to the local registry).
"""

from __future__ import annotations

import bisect
import enum
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class MetricKind(str, enum.Enum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


class HintVerdict(str, enum.Enum):
    """What became of one AIC hint (RTP header extension) at the bridge."""

    ACCEPTED = "accepted"
    LIMITED = "limited"  # over the per-stream rate (GCRA)
    FORGED = "forged"  # tag did not verify
    REPLAYED = "replayed"  # outside or already seen in the replay window
    MALFORMED = "malformed"  # failed size/format checks
    UNKNOWN_MODEL = "unknown_model"  # names a model no replica runs


class WirePath(str, enum.Enum):
    """Which codec carried a frame on the wire."""

    AI = "ai"  # EnCodec codes in the AIC payload
    NATIVE = "native"  # Opus


@dataclass(frozen=True)
class MetricSpec:
    name: str  # Ray metric name; Prometheus adds `ray_` (and `_total` for counters)
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms only; Ray needs them positive

    def prometheus_names(self) -> tuple[str, ...]:
        """The series names Prometheus shows for this metric when scraped from Ray."""
        base = f"ray_{self.name}"
        if self.kind is MetricKind.COUNTER:
            return (f"{base}_total",)
        if self.kind is MetricKind.HISTOGRAM:
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


_LATENCY_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 40, 60, 100, 200, 500)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SLACK_MS = (1, 2, 5, 10, 15, 20, 30, 40)

FRAMES = "auralink_frames"
FRAME_LATENCY = "auralink_frame_latency_ms"
STEP_LATENCY = "auralink_step_latency_ms"
BATCH_SIZE = "auralink_batch_size"
DEADLINE_SLACK = "auralink_deadline_slack_ms"
SLOTS_IN_USE = "auralink_slots_in_use"
SLOT_CAPACITY = "auralink_slot_capacity"
STREAMS_ACTIVE = "auralink_streams_active"
STREAMS_RELAYED = "auralink_streams_relayed"
HINTS = "auralink_hints"
WIRE_BYTES = "auralink_wire_bytes"
LIMITER_UNAVAILABLE = "auralink_limiter_unavailable"
LIMITER_UNAVAILABLE_SECONDS = "auralink_limiter_unavailable_seconds"
LIMITER_ERRORS = "auralink_limiter_errors"
SUPERVISOR_TRANSITIONS = "auralink_supervisor_transitions"
LAYER_SWITCHES = "auralink_layer_switches"
DTX_SECONDS = "auralink_dtx_seconds"
AUTOSCALE_FORECAST = "auralink_autoscale_forecast_streams"
AUTOSCALE_DESIRED = "auralink_autoscale_desired_replicas"

SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(FRAMES, MetricKind.COUNTER,
                   "Frames by op, outcome (ai|fallback) and fallback reason ('' for ai)",
                   ("op", "outcome", "reason")),
        MetricSpec(FRAME_LATENCY, MetricKind.HISTOGRAM,
                   "Bridge send to result, per frame that got an AI outcome (ms)",
                   ("op",), _LATENCY_MS),
        MetricSpec(STEP_LATENCY, MetricKind.HISTOGRAM,
                   "Model step compute time on a replica (ms)", ("op", "device"), _LATENCY_MS),
        MetricSpec(BATCH_SIZE, MetricKind.HISTOGRAM,
                   "Streams per model step on a replica", ("op",), _BATCH),
        MetricSpec(DEADLINE_SLACK, MetricKind.HISTOGRAM,
                   "Deadline minus completion time for frames that met it (ms)", ("op",),
                   _SLACK_MS),
        MetricSpec(SLOTS_IN_USE, MetricKind.GAUGE,
                   "Stream slots holding state on a replica", ("replica",)),
        MetricSpec(SLOT_CAPACITY, MetricKind.GAUGE,
                   "Stream slots a replica has", ("replica",)),
        MetricSpec(STREAMS_ACTIVE, MetricKind.GAUGE,
                   "Streams published on a bridge (summed over bridges: each stream once)",
                   ("bridge",)),
        MetricSpec(STREAMS_RELAYED, MetricKind.GAUGE,
                   "Streams another bridge worker owns that a bridge fans out to its own "
                   "subscribers (cascading)", ("bridge",)),
        MetricSpec(HINTS, MetricKind.COUNTER,
                   "AIC hints by verdict (accepted|limited|forged|replayed|malformed|"
                   "unknown_model)", ("verdict",)),
        MetricSpec(LAYER_SWITCHES, MetricKind.COUNTER,
                   "AIC subscribers' layer changes by the rate controller, by direction "
                   "(up|down: deeper or shallower codebooks / shorter or longer packets)",
                   ("direction",)),
        MetricSpec(DTX_SECONDS, MetricKind.COUNTER,
                   "Seconds of stream audio not encoded nor sent as AI frames because the "
                   "stream was silent (DTX)"),
        MetricSpec(WIRE_BYTES, MetricKind.COUNTER,
                   "Payload bytes sent to subscribers by codec path (ai|native)", ("path",)),
        MetricSpec(LIMITER_UNAVAILABLE, MetricKind.COUNTER,
                   "Limiter calls answered without Redis, by configured policy (open|closed)",
                   ("policy",)),
        MetricSpec(LIMITER_UNAVAILABLE_SECONDS, MetricKind.COUNTER,
                   "Seconds the limiter ran without Redis (first failed call to the next "
                   "success), by configured policy (open|closed)", ("policy",)),
        MetricSpec(LIMITER_ERRORS, MetricKind.COUNTER,
                   "Failed limiter calls to Redis, by exception type", ("error",)),
        MetricSpec(SUPERVISOR_TRANSITIONS, MetricKind.COUNTER,
                   "Per-stream AI health transitions by new state (on|off)", ("state",)),
        MetricSpec(AUTOSCALE_FORECAST, MetricKind.GAUGE,
                   "Streams the autoscaling policy expects at the end of its horizon",
                   ("deployment",)),
        MetricSpec(AUTOSCALE_DESIRED, MetricKind.GAUGE,
                   "Replicas the autoscaling policy asked for", ("deployment",)),
    )
}


def _tag_tuple(spec: MetricSpec, tags: Mapping[str, str]) -> tuple[str, ...]:
    if set(tags) != set(spec.tag_keys):
        raise ValueError(
            f"metric {spec.name} takes tags {sorted(spec.tag_keys)}, got {sorted(tags)}"
        )
    return tuple(str(tags[k]) for k in spec.tag_keys)


@dataclass
class HistogramState:
    boundaries: tuple[float, ...]
    buckets: list[int]  # len(boundaries) + 1; last is +Inf
    count: int = 0
    total: float = 0.0


@dataclass
class LocalRegistry:
    """In-process sink: counters, gauges and histograms keyed by (name, tag values)."""

    counters: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    gauges: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    histograms: dict[tuple[str, tuple[str, ...]], HistogramState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        self.inc_key(spec, _tag_tuple(spec, tags), value)

    def set(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        self.set_key(spec, _tag_tuple(spec, tags), value)

    def observe(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        self.observe_key(spec, _tag_tuple(spec, tags), value)

    def observe_many(self, spec: MetricSpec, values: np.ndarray, tags: Mapping[str, str]) -> None:
        self.observe_many_key(spec, _tag_tuple(spec, tags), values)

    def observe_repeated(self, spec: MetricSpec, value: float, n: int, tags: Mapping[str, str]) -> None:
        """`observe_many` of `n` copies of one value."""
        self.observe_key(spec, _tag_tuple(spec, tags), value, n)

    # The same, by the series' tag values in `spec.tag_keys` order (`_tag_tuple`), for the
    # typed helpers below: a media path records every tick, and building and checking a
    # dict of tags per recording costs more than the recording.
    def inc_key(self, spec: MetricSpec, tv: tuple[str, ...], value: float) -> None:
        key = (spec.name, tv)
        with self._lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def set_key(self, spec: MetricSpec, tv: tuple[str, ...], value: float) -> None:
        with self._lock:
            self.gauges[(spec.name, tv)] = float(value)

    def observe_key(self, spec: MetricSpec, tv: tuple[str, ...], value: float, n: int = 1) -> None:
        """`n` observations of one value."""
        i = bisect.bisect_left(spec.boundaries, value)  # bucket `le` semantics: value <= bound
        with self._lock:
            h = self._hist((spec.name, tv), spec)
            h.buckets[i] += n
            h.count += n
            h.total += value * n

    def observe_many_key(self, spec: MetricSpec, tv: tuple[str, ...], values: np.ndarray) -> None:
        if values.size > 1 and values[0] == values[-1] and values.min() == values.max():
            # one value repeated (a step's frames of one request share their slack)
            self.observe_key(spec, tv, float(values[0]), int(values.size))
            return
        idx = np.searchsorted(np.asarray(spec.boundaries, np.float64), values, side="left")
        counts = np.bincount(idx, minlength=len(spec.boundaries) + 1)
        with self._lock:
            h = self._hist((spec.name, tv), spec)
            for i, c in enumerate(counts.tolist()):
                h.buckets[i] += c
            h.count += int(values.size)
            h.total += float(values.sum())

    def _hist(self, key: tuple[str, tuple[str, ...]], spec: MetricSpec) -> HistogramState:
        h = self.histograms.get(key)
        if h is None:
            h = HistogramState(spec.boundaries, [0] * (len(spec.boundaries) + 1))
            self.histograms[key] = h
        return h

    def counter(self, name: str, **tags: str) -> float:
        """Sum of a counter over every series matching the given tags."""
        return self._sum(self.counters, name, tags)

    def gauge(self, name: str, **tags: str) -> float:
        return self._sum(self.gauges, name, tags)

    def histogram_count(self, name: str, **tags: str) -> int:
        spec = SPECS[name]
        with self._lock:
            return sum(
                h.count for (n, tv), h in self.histograms.items()
                if n == name and _matches(spec, tv, tags)
            )

    def _sum(self, table: dict, name: str, tags: Mapping[str, str]) -> float:
        spec = SPECS[name]
        with self._lock:
            return sum(v for (n, tv), v in table.items() if n == name and _matches(spec, tv, tags))

    def snapshot(self) -> dict[str, Any]:
        """Plain-data copy (JSON-able) for reports and the operator dashboard."""
        def key(name: str, tv: tuple[str, ...]) -> str:
            spec = SPECS[name]
            return name + "".join(f",{k}={v}" for k, v in zip(spec.tag_keys, tv, strict=True))

        with self._lock:
            return {
                "counters": {key(*k): v for k, v in self.counters.items()},
                "gauges": {key(*k): v for k, v in self.gauges.items()},
                "histograms": {
                    key(*k): {"count": h.count, "sum": h.total, "buckets": list(h.buckets)}
                    for k, h in self.histograms.items()
                },
            }

    def clear(self) -> None:
        with self._lock:
            self.counters.clear()
            self.gauges.clear()
            self.histograms.clear()


def _matches(spec: MetricSpec, tag_values: tuple[str, ...], want: Mapping[str, str]) -> bool:
    for k, v in want.items():
        if k not in spec.tag_keys:
            raise ValueError(f"metric {spec.name} has no tag {k!r}")
        if tag_values[spec.tag_keys.index(k)] != str(v):
            return False
    return True


class RayMetrics:
    """`ray.util.metrics` objects for `SPECS`, built on first use in a Ray-connected process."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _get(self, spec: MetricSpec) -> Any:
        obj = self._objects.get(spec.name)
        if obj is not None:
            return obj
        from ray.util import metrics as ray_metrics

        with self._lock:
            obj = self._objects.get(spec.name)
            if obj is None:
                if spec.kind is MetricKind.COUNTER:
                    obj = ray_metrics.Counter(spec.name, spec.description, spec.tag_keys)
                elif spec.kind is MetricKind.GAUGE:
                    obj = ray_metrics.Gauge(spec.name, spec.description, spec.tag_keys)
                else:
                    obj = ray_metrics.Histogram(
                        spec.name, spec.description, list(spec.boundaries), spec.tag_keys
                    )
                self._objects[spec.name] = obj
        return obj

    def inc(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        self._get(spec).inc(value, dict(tags))

    def set(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        self._get(spec).set(value, dict(tags))

    def observe(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        self._get(spec).observe(value, dict(tags))


RAY_FLUSH_S = 1.0  # the longest a recording waits in this process before Ray has it


class RayBuffer:
    """What this process recorded for Ray since it last handed it over: counters summed,
    each gauge's last value, histogram values in order. Handed to Ray (`flush`) at most
    once every `RAY_FLUSH_S`, by the next recording after that or, in a process that has
    stopped recording, by a daemon thread; Ray itself exports every few seconds. A media
    path records every tick and step: the handful of Ray metric calls (one per value) each
    time now come once a second, in one burst. The local registry gets every recording at
    once, as before."""

    def __init__(self, flush_s: float = RAY_FLUSH_S) -> None:
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._pending = threading.Condition(self._lock)  # notified when something waits for Ray
        self._inc: dict[tuple[str, tuple[str, ...]], float] = {}
        self._set: dict[tuple[str, tuple[str, ...]], float] = {}
        self._obs: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self._due = 0.0  # monotonic time of the next flush (0: nothing pending)
        self._thread: threading.Thread | None = None

    def add(self, method: str, spec: MetricSpec, values: list[float], tags: Mapping[str, str]) -> None:
        self.add_key(method, spec, _tag_tuple(spec, tags), values)

    def add_key(self, method: str, spec: MetricSpec, tv: tuple[str, ...], values: list[float]) -> None:
        """`add` by the series' tag values (`LocalRegistry.inc_key`)."""
        key = (spec.name, tv)
        now = time.monotonic()
        with self._lock:
            if method == "inc":
                self._inc[key] = self._inc.get(key, 0.0) + sum(values)
            elif method == "set":
                self._set[key] = values[-1]
            else:
                self._obs.setdefault(key, []).extend(values)
            if not self._due:
                self._due = now + self.flush_s
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="auralink-metrics", daemon=True)
                    self._thread.start()
                self._pending.notify()
            due = now >= self._due
        if due:
            self.flush()

    def flush(self) -> None:
        """Hands everything pending to Ray now; the first error turns Ray export off."""
        global _ray_failed, _ray_connected
        with self._lock:
            inc, self._inc = self._inc, {}
            sets, self._set = self._set, {}
            obs, self._obs = self._obs, {}
            self._due = 0.0
        _ray_connected = False  # looked up again: Ray may have shut down since
        if not (inc or sets or obs) or _ray_sink() is None:
            return  # nothing pending, or Ray is gone (shut down meanwhile): nothing to hand over
        sink = _ray
        try:
            for (name, tv), v in inc.items():
                sink.inc(SPECS[name], v, dict(zip(SPECS[name].tag_keys, tv, strict=True)))
            for (name, tv), v in sets.items():
                sink.set(SPECS[name], v, dict(zip(SPECS[name].tag_keys, tv, strict=True)))
            for (name, tv), vs in obs.items():
                tags = dict(zip(SPECS[name].tag_keys, tv, strict=True))
                for v in vs:
                    sink.observe(SPECS[name], v, tags)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            # Recording must never break a media path; one warning, then local-only.
            _ray_failed = True
            logger.warning("Ray metrics disabled in this process after error: %s", exc)

    def _run(self) -> None:
        """Flushes what a quiet process left pending once it is due (a busy one's next
        recording usually does first); waits without waking while nothing is pending."""
        while True:
            with self._pending:
                while not self._due or time.monotonic() < self._due:
                    self._pending.wait(max(0.0, self._due - time.monotonic()) if self._due else None)
            self.flush()


_local = LocalRegistry()
_ray = RayMetrics()
_ray_failed = False
_ray_connected = False  # Ray was connected at the last look (`_ray_sink`); each flush looks again
_buffer = RayBuffer()


def flush_ray() -> None:
    """Hands what this process recorded to Ray now, not within `RAY_FLUSH_S` (shutdown,
    tests)."""
    _buffer.flush()


def local_registry() -> LocalRegistry:
    """The process-local registry every recording also lands in."""
    return _local


def _ray_sink() -> RayMetrics | None:
    """Ray's metrics when this process is connected to Ray. Once it is, the answer is kept
    until the next flush (at most `RAY_FLUSH_S`), which looks again before it hands anything
    over: a recording does not ask Ray each time (after a quiet spell that lookup alone
    costs tens of microseconds, about what the recording does)."""
    global _ray_connected
    if _ray_failed:
        return None
    if _ray_connected:
        return _ray
    # A process that never imported ray is not connected to it; importing it here would
    # cost a second on the first recording of a pure code path.
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "is_initialized"):
        return None
    _ray_connected = bool(ray.is_initialized())
    return _ray if _ray_connected else None


def _emit(method: str, name: str, value: float, tags: Mapping[str, str]) -> None:
    spec = SPECS[name]
    _emit_key(method, spec, _tag_tuple(spec, tags), value)


def _emit_key(method: str, spec: MetricSpec, tv: tuple[str, ...], value: float) -> None:
    """`_emit` by the series' tag values in `spec.tag_keys` order."""
    if method == "inc":
        _local.inc_key(spec, tv, value)
    elif method == "set":
        _local.set_key(spec, tv, value)
    else:
        _local.observe_key(spec, tv, value)
    if _ray_sink() is not None:
        _buffer.add_key(method, spec, tv, [value])


# ---- typed helpers (the only API callers need) -------------------------------------------


_FRAMES_TV: dict[tuple[str, str], tuple[str, str, str]] = {}  # (op, counts key) -> tag values


def record_frames(op: str, counts: Mapping[str, int]) -> None:
    """Counts keyed as `BatchResult.counts()` gives them: 'ai', 'dtx' (a replica's DTX
    verdict) or 'fallback/<reason>'."""
    spec = SPECS[FRAMES]
    for key, n in counts.items():
        if n <= 0:
            continue
        tv = _FRAMES_TV.get((op, key))
        if tv is None:
            outcome, _, reason = key.partition("/")
            if outcome not in ("ai", "dtx", "fallback"):
                raise ValueError(f"outcome key {key!r} is not 'ai', 'dtx' or 'fallback/<reason>'")
            tv = _tag_tuple(spec, {"op": op, "outcome": outcome, "reason": reason})
            if len(_FRAMES_TV) < 1024:  # a few ops times the fallback reasons
                _FRAMES_TV[(op, key)] = tv
        _emit_key("inc", spec, tv, n)


def record_frame_outcome(op: str, outcome: str, reason: str | None = None, n: int = 1) -> None:
    record_frames(op, {outcome if not reason else f"{outcome}/{reason}": n})


# Ray histograms take one value per call (~10-25 us each); a tick can carry thousands of
# frames. The local registry takes every value (vectorised); Ray gets a uniform sample of at
# most this many per call, which keeps quantiles unbiased. Counts come from `frames_total`.
RAY_HISTOGRAM_SAMPLE = 128


def _observe_many(spec: MetricSpec, tv: tuple[str, ...], values: Iterable[float] | np.ndarray,
                  sample: int = RAY_HISTOGRAM_SAMPLE) -> None:
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), np.float64).ravel()
    if arr.size == 0:
        return
    _local.observe_many_key(spec, tv, arr)
    if _ray_sink() is None:
        return
    if arr.size > sample:
        arr = arr[np.linspace(0, arr.size - 1, sample).astype(np.int64)]
    _buffer.add_key("observe", spec, tv, arr.tolist())


def _observe_repeated(spec: MetricSpec, tv: tuple[str, ...], value: float, n: int,
                      sample: int = RAY_HISTOGRAM_SAMPLE) -> None:
    """`_observe_many` of `n` copies of one value, without building them."""
    if n <= 0:
        return
    _local.observe_key(spec, tv, float(value), int(n))
    if _ray_sink() is not None:
        _buffer.add_key("observe", spec, tv, [float(value)] * min(int(n), max(1, int(sample))))


def observe_frame_latency(op: str, latencies_ms: Iterable[float] | np.ndarray,
                          sample: int = RAY_HISTOGRAM_SAMPLE) -> None:
    """Per-frame latencies of one batch (all kept locally; at most `sample` of them for Ray:
    a caller whose frames share one latency per call can ask for fewer)."""
    _observe_many(SPECS[FRAME_LATENCY], (str(op),), latencies_ms, max(1, int(sample)))


def observe_frame_latency_repeated(op: str, ms: float, n: int, sample: int = RAY_HISTOGRAM_SAMPLE) -> None:
    """`n` frames that share one latency (a bridge tick's AI frames): all `n` kept locally,
    `min(n, sample)` observations of it for Ray, as `observe_frame_latency` of `n` copies
    records them."""
    _observe_repeated(SPECS[FRAME_LATENCY], (str(op),), ms, n, sample)


def observe_step(op: str, ms: float, size: int, device: str, slack_ms: np.ndarray,
                 slack_sample: int = RAY_HISTOGRAM_SAMPLE) -> None:
    """One finished replica step: its time (STEP_LATENCY), its batch size (BATCH_SIZE) and
    the slack of its frames that met their deadline (DEADLINE_SLACK; a negative slack is a
    miss, counted as fallback/deadline, not a sample). Every value is kept locally; Ray gets
    at most `slack_sample` of the slacks, an even sample, as `observe_frame_latency`."""
    by_op = (str(op),)
    _emit_key("observe", SPECS[STEP_LATENCY], (by_op[0], str(device)), float(ms))
    _emit_key("observe", SPECS[BATCH_SIZE], by_op, float(size))
    if slack_ms.size:  # (no mask and copy when none missed, the usual step)
        slack = slack_ms if float(slack_ms.min()) >= 0 else slack_ms[slack_ms >= 0]
        _observe_many(SPECS[DEADLINE_SLACK], by_op, slack, max(1, int(slack_sample)))


def set_slots(replica: str, in_use: int, capacity: int) -> None:
    _emit("set", SLOTS_IN_USE, float(in_use), {"replica": replica})
    _emit("set", SLOT_CAPACITY, float(capacity), {"replica": replica})


def set_streams_active(bridge: str, n: int) -> None:
    _emit("set", STREAMS_ACTIVE, float(n), {"bridge": bridge})


def set_streams_relayed(bridge: str, n: int) -> None:
    _emit("set", STREAMS_RELAYED, float(n), {"bridge": bridge})


# a verdict -> its tag values (a str-enum member hashes and compares as its value)
_HINT_TV: dict[str, tuple[str]] = {v.value: (v.value,) for v in HintVerdict}


def record_hints(verdict: HintVerdict | str, n: int = 1) -> None:
    if n > 0:
        tv = _HINT_TV.get(verdict) or (HintVerdict(verdict).value,)  # (an unknown one raises)
        _emit_key("inc", SPECS[HINTS], tv, n)


def record_layer_switches(direction: str, n: int = 1) -> None:
    if n > 0:
        _emit("inc", LAYER_SWITCHES, n, {"direction": direction})


def record_dtx_seconds(seconds: float) -> None:
    if seconds > 0:
        _emit("inc", DTX_SECONDS, float(seconds), {})


def record_wire_bytes(path: WirePath | str, nbytes: int) -> None:
    if nbytes > 0:
        _emit("inc", WIRE_BYTES, nbytes, {"path": WirePath(path).value})


def record_limiter_unavailable(policy: str, n: int = 1) -> None:
    if n > 0:
        _emit("inc", LIMITER_UNAVAILABLE, n, {"policy": policy})


def record_limiter_unavailable_seconds(policy: str, seconds: float) -> None:
    if seconds > 0:
        _emit("inc", LIMITER_UNAVAILABLE_SECONDS, float(seconds), {"policy": policy})


def record_limiter_error(error: str) -> None:
    _emit("inc", LIMITER_ERRORS, 1, {"error": error})


def record_supervisor_transition(state: str, n: int = 1) -> None:
    if n > 0:
        _emit("inc", SUPERVISOR_TRANSITIONS, n, {"state": state})


def set_autoscale_decision(deployment: str, forecast_streams: float, desired: int) -> None:
    _emit("set", AUTOSCALE_FORECAST, float(forecast_streams), {"deployment": deployment})
    _emit("set", AUTOSCALE_DESIRED, float(desired), {"deployment": deployment})


def prometheus_names() -> set[str]:
    """Every series name Ray exports for `SPECS` (what dashboards may query)."""
    return {n for spec in SPECS.values() for n in spec.prometheus_names()}
