"""Operator policy per user: a bitrate cap for the user's streams and a DTX switch.

Kept by the fallback supervisor beside the opt-outs, in the same write-through record of
its persistent store (deployments/supervisor.py), and fetched by each bridge with its
health exchange (sfu_bridge/core.py, `SupervisorLink.policies`): a cap bounds how deep the user's streams are
encoded and sent (sfu_bridge/adaptation.py), whatever the publisher's hints ask; `dtx`
off keeps the user's silent streams on the AI path. Pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from deployments.contract import BANDWIDTHS_KBPS

MIN_CAP_KBPS, MAX_CAP_KBPS = BANDWIDTHS_KBPS[0], BANDWIDTHS_KBPS[-1]


@dataclass(frozen=True)
class UserPolicy:
    max_kbps: float | None = None  # None: no cap (the publisher's request rules)
    dtx: bool = True

    def validate(self) -> None:
        if self.max_kbps is not None and not MIN_CAP_KBPS <= self.max_kbps <= MAX_CAP_KBPS:
            raise ValueError(f"max_kbps {self.max_kbps} outside [{MIN_CAP_KBPS}, {MAX_CAP_KBPS}]")

    @property
    def is_default(self) -> bool:
        return self == UserPolicy()


class UserPolicies:
    def __init__(self) -> None:
        self._by_user: dict[str, UserPolicy] = {}

    def set(self, user_id: str, policy: UserPolicy) -> None:
        policy.validate()
        if policy.is_default:
            self._by_user.pop(user_id, None)
        else:
            self._by_user[user_id] = policy

    def get(self, user_id: str) -> UserPolicy:
        return self._by_user.get(user_id, UserPolicy())

    def for_users(self, user_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The non-default policies of these users (what a bridge needs)."""
        return {u: asdict(self._by_user[u]) for u in set(user_ids) if u in self._by_user}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {u: asdict(p) for u, p in sorted(self._by_user.items())}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]]) -> UserPolicies:
        out = cls()
        for user, p in d.items():
            out.set(str(user), UserPolicy(max_kbps=p.get("max_kbps"), dtx=bool(p.get("dtx", True))))
        return out

    def __len__(self) -> int:
        return len(self._by_user)
