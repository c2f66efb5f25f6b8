"""Fault injection plan: `--fault kill-replica@20 --fault stop-redis@30 --fault slow-replica@10`.

Parsing and scheduling are pure; the driver executes a due fault against the real component
(Serve replica actor, embedded Redis server, replica slow-down knob) and records when it did.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FaultKind(str, enum.Enum):
    KILL_REPLICA = "kill-replica"  # ray.kill one codec replica; Serve replaces it
    STOP_REDIS = "stop-redis"  # stop the limiter's Redis; the limiter's configured policy applies
    SLOW_REPLICA = "slow-replica"  # one replica's steps take longer than the latency profile
    STALL_REPLICA = "stall-replica"  # one replica answers nothing for a while (a hung node)


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    at_s: float  # simulated seconds after the start

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`kind@seconds`, e.g. `kill-replica@20`; raises ValueError with the accepted forms."""
        kind, sep, at = text.partition("@")
        kinds = [k.value for k in FaultKind]
        if not sep:
            raise ValueError(f"fault {text!r} must look like KIND@SECONDS, KIND one of {kinds}")
        try:
            fk = FaultKind(kind.strip())
        except ValueError:
            raise ValueError(f"unknown fault {kind!r}; expected one of {kinds}") from None
        try:
            t = float(at)
        except ValueError:
            raise ValueError(f"fault time {at!r} is not a number of seconds") from None
        if t < 0:
            raise ValueError(f"fault time must be >= 0, got {t}")
        return cls(fk, t)

    def __str__(self) -> str:
        return f"{self.kind.value}@{self.at_s:g}"


@dataclass
class FaultPlan:
    faults: list[Fault]
    fired: list[tuple[Fault, float, str]] = field(default_factory=list)  # (fault, sim t, detail)

    @classmethod
    def parse(cls, texts: list[str] | None, duration_s: float) -> FaultPlan:
        faults = sorted((Fault.parse(t) for t in texts or []), key=lambda f: f.at_s)
        for f in faults:
            if f.at_s >= duration_s:
                raise ValueError(f"fault {f} is at or after the end of the run ({duration_s:g} s)")
        return cls(faults)

    def due(self, t_sim: float) -> list[Fault]:
        """Faults whose time has come and that have not fired yet (each fires once)."""
        done = {id(f) for f, _, _ in self.fired}
        return [f for f in self.faults if f.at_s <= t_sim and id(f) not in done]

    def mark(self, fault: Fault, t_sim: float, detail: str) -> None:
        self.fired.append((fault, t_sim, detail))
