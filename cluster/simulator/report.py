"""Accounting for a simulation run and the JSON report built from it (pure numpy).

Every frame the simulated bridge produces is counted once when it is produced (`frames_total`)
and once when its outcome is known (`ai` or `fallback/<reason>`); `frames_unaccounted` is the
difference, so a lost answer shows up instead of disappearing. Latency is the bridge's view:
batch sent -> outcome back, in simulated milliseconds (wall time divided by the run's time
dilation), kept in a fixed-width histogram so a 60 s, 10,000-stream run needs no per-frame list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from deployments.contract import REASON_CODES, decode_reason

LAT_BIN_MS = 0.05
LAT_MAX_MS = 2000.0
N_CODES = len(REASON_CODES) + 1


def percentile_from_hist(hist: np.ndarray, q: float, bin_ms: float = LAT_BIN_MS) -> float | None:
    total = hist.sum()
    if total == 0:
        return None
    idx = int(np.searchsorted(np.cumsum(hist), q / 100.0 * total, side="left"))
    return round((idx + 0.5) * bin_ms, 3)


@dataclass
class TickRecord:
    t: float  # simulated seconds at the tick's start
    frames: int
    ai: int
    fallback: int
    unaccounted: int
    live: int
    replicas: int
    ai_bytes: int
    native_bytes: int
    native_all_bytes: int  # what the same frames would cost all in the native codec


@dataclass
class Accounting:
    """Counters the driver updates each tick; `report()` turns them into the JSON report."""

    frames_total: int = 0
    by_code: np.ndarray = field(default_factory=lambda: np.zeros(N_CODES, np.int64))
    latency_hist: np.ndarray = field(
        default_factory=lambda: np.zeros(int(LAT_MAX_MS / LAT_BIN_MS) + 1, np.int64)
    )
    replica_latency_hist: np.ndarray = field(
        default_factory=lambda: np.zeros(int(LAT_MAX_MS / LAT_BIN_MS) + 1, np.int64)
    )
    ticks: list[TickRecord] = field(default_factory=list)
    per_second_reasons: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    hints: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bridge_frames_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def produced(self, n: int) -> None:
        self.frames_total += n

    def outcomes(self, t_sim: float, codes: np.ndarray, latency_ms: np.ndarray | float | None = None,
                 replica_ms: np.ndarray | None = None) -> tuple[int, int]:
        """Counts outcome codes (uint8, 0 = ai); latency only for frames answered `ai`."""
        codes = np.asarray(codes, np.uint8)
        counts = np.bincount(codes, minlength=N_CODES)
        self.by_code += counts
        sec = int(t_sim)
        for c in np.flatnonzero(counts).tolist():
            self.per_second_reasons[sec][_key(c)] += int(counts[c])
        ai = codes == 0
        n_ai = int(ai.sum())
        if latency_ms is not None and n_ai:
            lat = np.broadcast_to(np.asarray(latency_ms, np.float64), codes.shape)[ai]
            self._hist(self.latency_hist, lat)
        if replica_ms is not None and n_ai:
            self._hist(self.replica_latency_hist, np.asarray(replica_ms, np.float64)[ai])
        return n_ai, int(codes.size - n_ai)

    @staticmethod
    def _hist(hist: np.ndarray, values: np.ndarray) -> None:
        idx = np.clip((values / LAT_BIN_MS).astype(np.int64), 0, hist.size - 1)
        hist += np.bincount(idx, minlength=hist.size)

    @property
    def frames_ai(self) -> int:
        return int(self.by_code[0])

    @property
    def frames_fallback(self) -> int:
        return int(self.by_code[1:].sum())

    @property
    def frames_unaccounted(self) -> int:
        return self.frames_total - self.frames_ai - self.frames_fallback

    def fallback_by_reason(self) -> dict[str, int]:
        return {
            decode_reason(c).value: int(self.by_code[c])  # type: ignore[union-attr]
            for c in range(1, N_CODES)
            if self.by_code[c]
        }

    def tick_arrays(self) -> dict[str, np.ndarray]:
        cols = TickRecord.__dataclass_fields__
        return {k: np.asarray([getattr(r, k) for r in self.ticks]) for k in cols}


def _key(code: int) -> str:
    r = decode_reason(code)
    return "ai" if r is None else r.value


def recovery_time(t: np.ndarray, frames: np.ndarray, fallback: np.ndarray, fault_t: float,
                  threshold: float = 0.01, hold_s: float = 1.0, baseline: float = 0.0,
                  window_s: float = 1.0) -> dict:
    """How long after `fault_t` the fallback rate took to come back to normal and stay there
    for `hold_s`. The rate is taken over a sliding `window_s` (one tick is too noisy), and
    "normal" is the pre-fault baseline plus max(`threshold`, half the baseline)."""
    after = t >= fault_t
    if not after.any():
        return {"fault_at_s": fault_t, "peak_fallback_rate": None, "recovered_after_s": None}
    dt = float(np.median(np.diff(t))) if t.size > 1 else 0.04
    w = max(1, int(round(window_s / dt)))
    kern = np.ones(w)
    # Trailing window: the rate at tick i covers ticks i-w+1 .. i.
    fb_w = np.convolve(fallback.astype(float), kern)[: t.size]
    fr_w = np.convolve(frames.astype(float), kern)[: t.size]
    rate = np.where(fr_w > 0, fb_w / np.maximum(fr_w, 1), 0.0)
    limit = baseline + max(threshold, 0.5 * baseline)
    ta, ra = t[after], rate[after]
    if limit >= 1.0:
        # Falling back before the fault already (a load the profile cannot hold): there is
        # no healthy state to return to, and "recovered after 0 s" would be a false claim.
        return {"fault_at_s": fault_t, "peak_fallback_rate": round(float(ra.max()), 4),
                "recovered_after_s": None, "recovery_threshold": round(limit, 4),
                "window_s": window_s,
                "note": f"not measurable: {baseline:.1%} of frames fell back before the fault"}
    bad = ra > limit
    peak = float(ra.max())
    recovered = None
    if not bad.any():
        recovered = 0.0
    else:
        last_bad = int(np.flatnonzero(bad)[-1])
        if last_bad + 1 < ta.size and ta[-1] - ta[last_bad + 1] >= hold_s - 1e-9:
            # The window trails by window_s: the rate was back once the window cleared.
            recovered = max(0.0, float(ta[last_bad + 1] - fault_t) - window_s + dt)
    first_bad = float(ta[np.flatnonzero(bad)[0]] - fault_t) if bad.any() else None
    return {
        "fault_at_s": fault_t,
        "first_fallback_after_s": first_bad,
        "peak_fallback_rate": round(peak, 4),
        "recovered_after_s": None if recovered is None else round(recovered, 3),
        "recovery_threshold": round(limit, 4),
        "window_s": window_s,
    }


def summarize_rates(rates: dict[str, float], target: float) -> dict:
    vals = np.asarray(list(rates.values()), np.float64)
    if vals.size == 0:
        return {"count": 0}
    return {
        "count": int(vals.size),
        "target_per_s": target,
        "min_per_s": round(float(vals.min()), 2),
        "max_per_s": round(float(vals.max()), 2),
        "mean_per_s": round(float(vals.mean()), 2),
        "per_stream": {k: round(v, 2) for k, v in sorted(rates.items())},
    }


AMPLIFICATION_NOTE = (
    "fallback frames per failed AI attempt, the failure itself included: (deadline + error + "
    "unhealthy) / (deadline + error) over the run; 1.0 = the supervisor added no fallback, "
    "N = each miss or error cost N frames in all (the other N-1 answered `unhealthy` while "
    "the supervisor had the stream off AI); null when no attempt failed"
)


def fallback_amplification(by_reason: dict[str, int]) -> dict:
    """How many fallback frames each failed AI attempt caused: the frame itself, plus the
    frames its stream then spent switched off by the supervisor (`unhealthy`)."""
    deadline = int(by_reason.get("deadline", 0))
    error = int(by_reason.get("error", 0))
    unhealthy = int(by_reason.get("unhealthy", 0))
    failed = deadline + error
    value = round((failed + unhealthy) / failed, 3) if failed else None
    return {"value": value, "deadline": deadline, "error": error, "unhealthy": unhealthy,
            "definition": AMPLIFICATION_NOTE}

# A flooder's measured rate may exceed the limit by this much (plus the burst the limiter
# grants once, spread over the run) and still count as held: GCRA is exact, the rest is
# where the run's seconds were cut.
HELD_TOLERANCE = 0.02


def _rate_range(lo: float, hi: float) -> str:
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def flooder_limit(rates: dict[str, float], limit: float, burst: int, duration_s: float,
                  limiter: dict | None, flooders: int | None = None) -> dict:
    """Was the per-stream hint limit enforced on the flooders? Computed, never assumed: held
    only if every flooder's measured rate is within `HELD_TOLERANCE` of the limit (plus the
    one-off burst over `duration_s`) AND the limiter had Redis for the whole run (`limiter`
    is `HintLimiter.health()` with seconds in the run's time; None = no limiter at all).

    `summary` is the line the CLI prints and `verdict` the short form for tables, e.g.
    "NOT held (limiter unavailable 12.3 s, fail-open)". `flooders`: how many there were,
    when no limiter measured their rates."""
    n = len(rates) or (flooders or 0)
    if not n:
        return {"count": 0, "held": None, "verdict": "no flooders", "summary": None}
    if limiter is None or not rates:
        verdict = "NOT held (no hint limiter)"
        return {"count": n, "held": False, "verdict": verdict, "limit_per_s": limit,
                "summary": f"flooders: {n} {verdict} (limit {limit:g})"}
    lo, hi = min(rates.values()), max(rates.values())
    ceiling = limit * (1 + HELD_TOLERANCE) + burst / max(duration_s, 1e-9)
    within = hi <= ceiling
    down_s = float(limiter.get("unavailable_s", 0.0))
    available = down_s <= 0 and not limiter.get("calls_without_redis")
    if not available and limiter.get("policy") == "fail-closed":
        verdict = (f"NOT rate limited for {down_s:.1f} s (limiter unavailable, fail-closed: "
                   "their hints were dropped)")
    elif not available:
        verdict = f"NOT held (limiter unavailable {down_s:.1f} s, {limiter.get('policy', 'fail-open')})"
    elif not within:
        verdict = f"NOT held ({100 * (hi / limit - 1):+.1f}% over the limit)"
    else:
        verdict = "held"
    held = available and within
    rate = _rate_range(round(lo, 2), round(hi, 2))
    summary = (f"flooders: {n} held to {rate} hints/s (limit {limit:g})" if held
               else f"flooders: {n} {verdict}: {rate} hints/s (limit {limit:g})")
    return {
        "count": n,
        "held": held,
        "within_limit": within,
        "limiter_available_whole_run": available,
        "limiter_unavailable_s": round(down_s, 3),
        "limit_per_s": limit,
        "held_ceiling_per_s": round(ceiling, 3),
        "max_per_s": round(hi, 2),
        "verdict": verdict,
        "summary": summary,
        "rule": f"held = every flooder within +{100 * HELD_TOLERANCE:g}% of the limit (plus the "
                "burst over the run) AND the limiter reached Redis for the whole run",
    }
