"""Typed configuration of the Serve app: replica knobs, supervisor, ingress.

Values come, in increasing priority, from the dataclass defaults, `AURALINK_*` environment
variables (read when the replica starts), and Serve's `user_config` (applied at run time by
`reconfigure()`). Everything here is plain data; nothing imports Ray.
"""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from models.constants import (
    BANDWIDTHS_KBPS,
    DEFAULT_DEADLINE_MS,
    DEFAULT_FRAME_PERIOD_MS,
    DEFAULT_MARGIN_MS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_HOLD_MS,
    DEFAULT_MAX_QUEUE,
    MAX_BANDWIDTH_KBPS,
)

APP_NAME = "auralink"
REPLICA_DEPLOYMENT = "CodecReplica"
INGRESS_DEPLOYMENT = "Ingress"
SUPERVISOR_NAME = "auralink-fallback-supervisor"
RAY_NAMESPACE = "auralink"

# Seed for the online latency model L(B) (ms by batch size, 40 ms chunks): deliberately slow,
# CPU-like guesses, pushed out by measured steps as the replica runs. It is NOT a measurement:
# emulated compute should be given a profile measured by `auralink bench codec` on a named
# device (`latency_profile` + `latency_profile_device`); with this seed it says so loudly.
DEFAULT_LATENCY_PROFILE: dict[int, float] = {1: 9.0, 2: 12.0, 4: 18.0, 8: 30.0, 16: 55.0}
DEFAULT_PROFILE_DEVICE = "unmeasured seed"


class ComputeMode(str, enum.Enum):
    REAL = "real"  # run the model
    EMULATED = "emulated"  # sleep the latency profile's L(B) and answer zero codes (load tests)


class Backend(str, enum.Enum):
    TORCH = "torch"
    ONNX = "onnx"


# Knobs whose change needs a new model/slot pool (slots are dropped; streams reset by epoch).
# `compute` too: an emulated replica holds no model, a real one loads it.
_REBUILD_KNOBS = ("backend", "capacity", "device", "max_bandwidth_kbps", "weights_dir",
                  "allow_random_weights", "torch_threads", "compute")


@dataclass(frozen=True)
class ReplicaSettings:
    """Everything a `CodecReplica` can be told; all of it may arrive as `user_config`."""

    deadline_ms: float = DEFAULT_DEADLINE_MS  # budget when a frame's own deadline is absent
    max_batch: int = DEFAULT_MAX_BATCH
    margin_ms: float = DEFAULT_MARGIN_MS  # safety margin added to the latency model's prediction
    max_queue: int = DEFAULT_MAX_QUEUE  # frames waiting in the EDF queue before new ones are shed
    # The scheduler may hold a batch this long for a frame its arrival forecast expects
    # (0: never hold); streams are forecast to send one chunk per frame period.
    max_hold_ms: float = DEFAULT_MAX_HOLD_MS
    frame_period_ms: float = DEFAULT_FRAME_PERIOD_MS
    capacity: int = 256  # streaming slots (streams) per replica
    idle_timeout_s: float = 30.0  # a slot with no frame for this long is freed
    backend: Backend = Backend.TORCH
    compute: ComputeMode = ComputeMode.REAL
    device: str = "cpu"
    # The deepest quantization the replica computes; a request for a lower bandwidth gets a
    # prefix of the codebooks. (Which bandwidth subscribers get is the bridge's setting,
    # $AURALINK_BANDWIDTH_KBPS; this one is $AURALINK_MAX_BANDWIDTH_KBPS.)
    max_bandwidth_kbps: float = MAX_BANDWIDTH_KBPS
    weights_dir: str | None = None
    allow_random_weights: bool = False
    torch_threads: int = 0  # 0 = leave torch's default
    latency_profile: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_LATENCY_PROFILE))
    latency_profile_device: str = DEFAULT_PROFILE_DEVICE

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "compute", ComputeMode(self.compute))
        object.__setattr__(
            self, "latency_profile", {int(k): float(v) for k, v in self.latency_profile.items()}
        )
        if self.deadline_ms <= 0 or self.margin_ms < 0:
            raise ValueError("deadline_ms must be > 0 and margin_ms >= 0")
        if self.max_batch < 1 or self.capacity < 1 or self.max_queue < 1:
            raise ValueError("max_batch, capacity and max_queue must be >= 1")
        if self.max_hold_ms < 0 or self.frame_period_ms <= 0:
            raise ValueError("max_hold_ms must be >= 0 and frame_period_ms > 0")
        if self.max_bandwidth_kbps not in BANDWIDTHS_KBPS:
            raise ValueError(f"max_bandwidth_kbps {self.max_bandwidth_kbps} not in {BANDWIDTHS_KBPS}")
        if not self.latency_profile or min(self.latency_profile) < 1:
            raise ValueError("latency_profile needs at least one batch size >= 1")

    @property
    def profile_is_measured(self) -> bool:
        return self.latency_profile_device != DEFAULT_PROFILE_DEVICE

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base: ReplicaSettings | None = None) -> ReplicaSettings:
        """Overlay `data` on `base` (or the defaults); unknown keys are an error, not ignored."""
        base = base or cls()
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown replica settings {unknown}; known: {sorted(known)}")
        return replace(base, **data)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ReplicaSettings:
        """`AURALINK_DEADLINE_MS=15` etc. override the defaults."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"AURALINK_{f.name.upper()}")
            if raw is None or f.name == "latency_profile":
                continue
            default = getattr(cls(), f.name)
            if isinstance(default, bool):
                data[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int) and not isinstance(default, enum.Enum):
                data[f.name] = int(raw)
            elif isinstance(default, float):
                data[f.name] = float(raw)
            else:
                data[f.name] = raw
        return cls.from_dict(data)

    def needs_rebuild(self, other: ReplicaSettings) -> bool:
        return any(getattr(self, k) != getattr(other, k) for k in _REBUILD_KNOBS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backend"] = self.backend.value
        d["compute"] = self.compute.value
        return d


def profile_ms(profile: dict[int, float], batch: int) -> float:
    """Step time for `batch` frames: linear between measured sizes, extrapolated past the ends."""
    if batch <= 0:
        return 0.0
    sizes = sorted(profile)
    if batch in profile:
        return profile[batch]
    if len(sizes) == 1:
        return profile[sizes[0]] * batch / sizes[0]
    lo, hi = (sizes[0], sizes[1]) if batch < sizes[0] else (sizes[-2], sizes[-1])
    for a, b in zip(sizes, sizes[1:], strict=False):
        if a < batch < b:
            lo, hi = a, b
            break
    slope = (profile[hi] - profile[lo]) / (hi - lo)
    return max(0.0, profile[lo] + slope * (batch - lo))


@dataclass(frozen=True)
class SupervisorSettings:
    name: str = SUPERVISOR_NAME
    namespace: str = RAY_NAMESPACE
    max_restarts: int = -1  # restart forever; state comes back from the KV
    kv_namespace: str = "auralink-supervisor"
    snapshot_interval_s: float = 5.0  # how often health state is persisted (opt-outs: always)
