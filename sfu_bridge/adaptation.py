"""What a stream's hints, its subscribers and the operator's policy make of its encode.

Per stream (`StreamAdaptation`), the bridge keeps:

- the publisher's **requested bandwidth**, set by the BW field of its latest accepted hint
  (docs/protocol.md, "Hint semantics") and in effect from the next tick;
- the operator's **cap** for the publishing user (kbps, None = none) and **DTX switch**,
  from the fallback supervisor's policy record (deployments/supervisor_policy.py);
- the depth its AIC subscribers **need**: the deepest layer any subscriber's rate controller
  asks for (sfu_bridge/rate_control.py); None when it has no AIC subscriber;
- its **model** id, from the hint's model field, checked against `MODEL_REGISTRY`;
- its voice-activity state (sfu_bridge/vad.py) for DTX.

The replica quantizes the stream `depth()` codebooks deep: what the deepest subscriber needs,
never more than the publisher asked for or the operator allows. Subscribers then get their
own prefix of those codes.

Pure logic, no I/O: the tick batcher (tick.py) calls it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.contract import BANDWIDTHS_KBPS, MODEL_REGISTRY, VALID_N_Q, bandwidth_codebooks
from sfu_bridge.vad import DtxState, EnergyVad, TalkSpurt, VadConfig, chunk_levels_db


class HintReject(str, enum.Enum):
    UNKNOWN_MODEL = "unknown_model"  # the model id names no model a replica can run


class HintRejected(ValueError):
    def __init__(self, reason: HintReject, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_model(hint: Any, registry: dict[int, str] = MODEL_REGISTRY) -> None:
    """Raises `HintRejected` when the hint names a model no replica runs."""
    model_id = getattr(hint, "model_id", 0)
    if model_id not in registry:
        raise HintRejected(HintReject.UNKNOWN_MODEL,
                           f"hint model id {model_id} is not one of {sorted(registry)}")


def cap_codebooks(kbps: float) -> int:
    """The deepest layer whose bandwidth is at most `kbps` (at least the shallowest)."""
    fit = [n for n, b in zip(VALID_N_Q, BANDWIDTHS_KBPS, strict=True) if b <= kbps + 1e-9]
    return fit[-1] if fit else VALID_N_Q[0]


@dataclass
class StreamAdaptation:
    requested_kbps: float  # from the publisher's BW hint (the bridge's default until one)
    cap_kbps: float | None = None  # operator cap for the user
    dtx_enabled: bool = True  # operator switch (and the bridge's default)
    need_n_q: int | None = None  # deepest layer the stream's AIC subscribers ask for
    model_id: int = 0
    hint_tick: int | None = None  # tick at which the latest BW change was accepted
    spurt: TalkSpurt = field(default_factory=TalkSpurt)

    def max_n_q(self) -> int:
        """The deepest layer the stream may be sent at: publisher's request, operator cap."""
        n = bandwidth_codebooks(self.requested_kbps)
        if self.cap_kbps is not None:
            n = min(n, cap_codebooks(self.cap_kbps))
        return n

    def depth(self) -> int:
        """Codebooks the replica computes: the deepest subscriber's need under the cap."""
        top = self.max_n_q()
        return top if self.need_n_q is None else min(top, self.need_n_q)

    def apply_hint(self, hint: Any, tick: int) -> bool:
        """An accepted hint takes effect: BW from the next tick, the model; returns whether
        it asks for a new epoch now (R). `check_model` has already passed."""
        self.model_id = int(getattr(hint, "model_id", 0))
        bw = float(hint.bandwidth_kbps)
        if bw != self.requested_kbps:
            self.requested_kbps = bw
            self.hint_tick = tick
        return bool(getattr(hint, "reset", False))


class DtxDetector:
    """Voice activity for a tick's chunks in one pass, then each stream's talk spurt."""

    name = EnergyVad.name

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self.vad = EnergyVad(self.config)

    def new_spurt(self) -> TalkSpurt:
        return TalkSpurt(hangover_chunks=self.config.hangover_chunks,
                         floor_db=self.config.initial_floor_db)

    def silent(self, spurts: Sequence[TalkSpurt], pcm: np.ndarray) -> np.ndarray:
        """pcm [B, T] of B streams' chunks (in `spurts` order) -> bool [B]: in DTX now."""
        if not len(spurts):
            return np.zeros(0, bool)
        floors = np.fromiter((s.floor_db for s in spurts), np.float64, len(spurts))
        speech, floors = self.vad.decide(chunk_levels_db(pcm), floors)
        out = np.empty(len(spurts), bool)
        for i, (s, sp, fl) in enumerate(zip(spurts, speech.tolist(), floors.tolist(), strict=True)):
            s.floor_db = fl
            out[i] = s.step(sp) is DtxState.SILENT
        return out
