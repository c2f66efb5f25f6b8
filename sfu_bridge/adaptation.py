"""What a stream's hints, its subscribers and the operator's policy make of its encode.

Per stream, the bridge core (core.py) keeps, as columns of its stream table:

- the publisher's **requested depth**, set by the BW field of its latest accepted hint
  (docs/protocol.md, "Hint semantics") and in effect from the next tick;
- the operator's **cap** for the publishing user (kbps, none by default) and **DTX switch**,
  from the fallback supervisor's policy record (deployments/user_policy.py);
- the depth its AIC subscribers **need**: the deepest layer any subscriber's rate controller
  asks for (sfu_bridge/rate_control.py); none when it has no AIC subscriber;
- its voice-activity state (models/vad.py) for DTX.

The replica quantizes the stream `depth()` codebooks deep: what the deepest subscriber needs,
never more than the publisher asked for or the operator allows. Subscribers then get their
own prefix of those codes.

Pure logic over arrays (one entry per stream), no I/O.
"""

from __future__ import annotations

import numpy as np

from deployments.contract import BANDWIDTHS_KBPS, VALID_N_Q

NO_NEED = 0  # `need` of a stream without AIC subscribers


def cap_codebooks(kbps: float) -> int:
    """The deepest layer whose bandwidth is at most `kbps` (at least the shallowest)."""
    fit = [n for n, b in zip(VALID_N_Q, BANDWIDTHS_KBPS, strict=True) if b <= kbps + 1e-9]
    return fit[-1] if fit else VALID_N_Q[0]


def max_depth(requested: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """The deepest layer each stream may be sent at: its publisher's request (codebooks)
    under its user's cap (codebooks; the deepest layer where there is none)."""
    return np.minimum(requested, cap)


def max_depth_of(requested: int, cap: int) -> int:
    """`max_depth` of one stream, on Python integers (the per-frame question of media.py)."""
    return requested if requested < cap else cap


def depth(requested: np.ndarray, cap: np.ndarray, need: np.ndarray) -> np.ndarray:
    """Codebooks the replica computes per stream: the deepest subscriber's need (NO_NEED:
    none) under `max_depth`."""
    top = max_depth(requested, cap)
    return np.where(need > NO_NEED, np.minimum(top, need), top)
