"""EdfScheduler's fast decision path against a slow reference kept here.

The scheduler keeps its queue in numpy columns and values windows over runs of frames that
share a deadline (a request's frames do), with cumulative sums, one CDF lookup for every
size and both steps, and a shortcut when every frame is certain to make it in one batch.
The reference below is the same decision written plainly: one `LatencyModel.p_within` call
per frame and batch size, Python sums per window, the full valuation every time, the
feasibility check size by size, eligibility by a scan of the queue. On queues from
bench-like traces (three deadlines, normal and overload, CPU-like step times), from random
traces and settings and on large queues, both must make the same plan: the same frames run,
the same expire, the same hold.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from deployments.latency_model import LatencyModel
from deployments.scheduler import EdfScheduler, PendingFrame, SchedulerConfig, _size_grid

MS = 1e-3
NOW_BONUS = 1.001  # frames finished now count this much more than in the next step
# docs/bench/codec.json's profile (random weights, a 2-core CPU): step time p50/p99 (ms) by batch.
CPU_PROFILE = {1: {"p50": 9.86, "p99": 16.62}, 8: {"p50": 30.59, "p99": 49.32},
               32: {"p50": 73.33, "p99": 89.04}, 128: {"p50": 265.96, "p99": 304.82}}


# --------------------------------------------------------------------------------- reference
def mean(s: EdfScheduler, k: int) -> float:
    return float(s.model.mean_ms([k])[0])


def ref_first_best(values: list[float]) -> int:
    best = max(values)
    return next(i for i, v in enumerate(values) if v >= best - 1e-9 * (1.0 + abs(best)))


def ref_best_window(s: EdfScheduler, slack: list[float], weight: list[float], later: list[float],
                    later_weight: list[float], overloaded: bool, rate: float,
                    wait_ms: float = 0.0) -> tuple[float, int, int]:
    """(value, start, size): every window valued frame by frame (see _best_window's doc)."""
    cfg, model = s.config, s.model
    n = len(slack)
    later_w = sum(later_weight)
    frames = list(zip(slack, weight, strict=True)) + list(zip(later, later_weight, strict=True))
    n_starts = min(n - 1, cfg.max_head_skip) + 1 if overloaded else 1
    sizes = _size_grid(min(n, cfg.max_batch)).tolist()
    per_size = {}
    for k in sizes:
        tau = mean(s, k)
        unknown = max(rate * tau - later_w, 0.0)
        m = min(max(round((n - k) + later_w + unknown), 1), cfg.max_batch)
        now_p = [model.p_within(k, x) * w for x, w in zip(slack, weight, strict=True)]
        next_p = [model.p_within(m, x - tau) * w for x, w in frames]
        nxt = sum(next_p)
        if overloaded:
            nxt += unknown * model.p_within(m, s._budget_ms - cfg.margin_ms - tau / 2.0)
        per_size[k] = (tau, m, now_p, next_p, nxt)
    capped = max(v[4] for v in per_size.values()) > cfg.max_batch
    values: list[float] = []
    order: list[tuple[int, int]] = []
    for start in range(n_starts):
        for k in sizes:
            tau, m, now_p, next_p, nxt = per_size[k]
            order.append((start, k))
            if start + k > n:
                values.append(-math.inf)
                continue
            inside = range(start, start + k)
            value = sum(now_p[i] * NOW_BONUS - next_p[i] for i in inside)
            if capped:
                in_window = sum(next_p[i] for i in inside)
                value += in_window + min(nxt - in_window, cfg.max_batch)
            else:
                value += nxt
            if overloaded:
                value /= wait_ms + tau + mean(s, m)
            values.append(value)
    j = ref_first_best(values)
    return values[j], order[j][0], order[j][1]


def ref_feasible(s: EdfScheduler, slack_sorted: list[float]) -> bool:
    """Steps back to back, each the largest size whose mean fits the head's slack."""
    n = len(slack_sorted)
    top = min(s.config.max_batch, n)
    t, i = 0.0, 0
    while i < n:
        fits = [k for k in range(1, top + 1) if mean(s, k) <= slack_sorted[i] - t]
        if not fits:
            return False
        k = min(max(fits), n - i)
        t += mean(s, k)
        i += k
    return True


class ReferenceScheduler(EdfScheduler):
    """The same decisions, computed the slow and obvious way."""

    def _eligible(self, limit):
        live = [i for i in range(self._n) if self._live[i]]
        first: dict[int, int] = {}
        for i in live:
            k = int(self._key[i])
            if k not in first or (self._ep[i], self._sq[i]) < (self._ep[first[k]], self._sq[first[k]]):
                first[k] = i
        out = sorted(first.values(), key=lambda i: (self._dl[i], self._arr[i], i))
        return np.asarray(out[:limit], np.int64)

    def _behind(self, cands, now, margin_s):
        if self.config.catch_up_p <= 0:
            return np.empty(0, np.int64)
        k = min(len(cands), self.config.max_batch)
        base = now + margin_s
        return np.asarray([i for i in cands.tolist() if self._kq[self._key[i]] > 1
                           and self.model.p_within(k, (self._dl[i] - base) * 1000.0) < self.config.catch_up_p],
                          np.int64)

    def _decide(self, cands, now, margin_s):
        cfg = self.config
        n = len(cands)
        rate = self._arrival_rate_per_ms()
        base = now + margin_s
        slack = [(float(self._dl[i]) - base) * 1000.0 for i in cands.tolist()]
        expected = None
        if cfg.max_hold_ms > 0 and n < cfg.max_batch:
            expected = self._forecast.expected(now, cfg.max_hold_ms / 1000.0, exclude=self._kq > 0)
        exp = [] if expected is None else list(zip(
            expected.arrival.tolist(), ((expected.deadline - base) * 1000.0).tolist(),
            expected.weight.tolist(), expected.due_by.tolist(), strict=True))
        if not exp and n == 1:
            return 0, 1, None, False
        exp_slack, exp_w = [e[1] for e in exp], [e[2] for e in exp]
        unseen = []
        count = int(rate * max(slack)) - len(exp)
        for i in range(max(count, 0)):
            unseen.append((i + 0.5) / rate + self._budget_ms - cfg.margin_ms)
        overloaded = n > 1 and not ref_feasible(self, sorted(slack + exp_slack + unseen))
        value, start, size = ref_best_window(self, slack, [1.0] * n, exp_slack, exp_w, overloaded, rate)
        if not exp:
            return start, size, None, False
        step_end = now + mean(self, size) / 1000.0
        arrivals = sorted({a for a, *_ in exp if a < step_end})[:2]
        best_hold, best_value = None, value * (1.0 + 1e-3) + 1e-3
        for t in arrivals:
            wait = (t - now) * 1000.0
            joined = [(x - wait, 1.0) for x in slack] + [(x - wait, w) for a, x, w, _ in exp if a <= t]
            joined.sort(key=lambda xw: xw[0])  # stable: ties keep queue order
            rest = [(x - wait, w) for a, x, w, _ in exp if a > t]
            v = ref_best_window(self, [x for x, _ in joined], [w for _, w in joined],
                                [x for x, _ in rest], [w for _, w in rest], overloaded, rate, wait)[0]
            if v > best_value:
                best_hold, best_value = t, v
        if best_hold is None:
            return start, size, None, False
        return 0, 0, max(d for a, _, _, d in exp if a == best_hold), False


# --------------------------------------------------------------------------------- comparing
def as_reference(s: EdfScheduler) -> ReferenceScheduler:
    ref = copy.deepcopy(s)
    ref.__class__ = ReferenceScheduler
    return ref


def outcome(plan) -> tuple:
    return (sorted(f.ref for f in plan.run), sorted(f.ref for f in plan.expired),
            sorted(f.ref for f, _ in plan.shed), plan.hold_until, plan.probe)


def compare(s: EdfScheduler, now: float, seen: dict[str, int]):
    """Decide on a copy with the reference and on `s` itself; they must agree."""
    ref = as_reference(s)
    want = ref.schedule(now)
    got = s.schedule(now)
    assert outcome(got) == outcome(want), f"at {now:.6f}: fast {outcome(got)} != reference {outcome(want)}"
    assert got.expected_on_time == pytest.approx(want.expected_on_time, rel=1e-9, abs=1e-9)
    seen["decisions"] += 1
    seen["held"] += got.hold_until is not None and not got.run
    seen["ran"] += bool(got.run)
    seen["expired"] += len(got.expired)
    seen["batch>1"] += len(got.run) > 1
    seen["largest"] = max(seen.get("largest", 0), len(got.run))
    return got


def drive(s: EdfScheduler, arrivals: list[tuple[float, str, int, float]], step_ms, until: float) -> dict:
    """Feed (time, stream, seq, deadline) arrivals; decide whenever the device is free, like the
    replica loop, comparing every decision; steps take step_ms(batch) ms."""
    seen = dict.fromkeys(("decisions", "held", "ran", "expired", "batch>1"), 0)
    arrivals = sorted(arrivals)
    k, t = 0, 0.0
    while t < until:
        while k < len(arrivals) and arrivals[k][0] <= t:
            at, sid, seq, dl = arrivals[k]
            s.add(PendingFrame(sid, 1, seq, dl, at, ref=(sid, seq)))
            k += 1
        plan = compare(s, t, seen)
        if plan.run:
            ms = step_ms(len(plan.run))
            s.complete(plan, ms)
            t += ms * MS
        else:
            nxt = [arrivals[k][0]] if k < len(arrivals) else []
            if plan.hold_until is not None:
                nxt.append(plan.hold_until)
            if not nxt:
                break
            t = max(t, min(nxt))
    return seen


def periodic_trace(streams: float, deadline_ms: float, seconds: float, bridges: int, seed: int):
    """`streams` 40 ms streams (a fractional one sends on that share of ticks) on bridges with
    random phases and 0-2 ms transit jitter, deadline from the send time."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 0.040, bridges)
    n_full = int(streams)
    frac = streams - n_full
    out = []
    for tick in range(int(seconds / 0.040)):
        for i in range(n_full + (1 if frac else 0)):
            if i == n_full and math.floor((tick + 1) * frac) == math.floor(tick * frac):
                continue
            send = phase[i % bridges] + tick * 0.040
            out.append((send + rng.uniform(0, 0.002), f"s{i}", tick, send + deadline_ms * MS))
    return out


def lognormal_steps(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    sizes = sorted(CPU_PROFILE)

    def step_ms(b: int) -> float:
        i = min(max(np.searchsorted(sizes, b) - 1, 0), len(sizes) - 2)
        b0, b1 = sizes[i], sizes[i + 1]
        w = (b - b0) / (b1 - b0)
        p50 = CPU_PROFILE[b0]["p50"] + w * (CPU_PROFILE[b1]["p50"] - CPU_PROFILE[b0]["p50"])
        p99 = CPU_PROFILE[b0]["p99"] + w * (CPU_PROFILE[b1]["p99"] - CPU_PROFILE[b0]["p99"])
        return scale * p50 * math.exp(math.log(p99 / p50) / 2.3263 * rng.standard_normal())

    return step_ms


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("deadline_ms", "streams"), [
    (20.0, 3.76), (20.0, 4.75), (40.0, 7.06), (40.0, 8.92), (100.0, 11.92), (100.0, 15.05)])
def test_bench_like_traces_decide_as_the_reference(deadline_ms, streams):
    s = EdfScheduler(LatencyModel.from_profile(CPU_PROFILE),
                     SchedulerConfig(deadline_ms=deadline_ms, max_batch=128, margin_ms=1.0))
    seen = drive(s, periodic_trace(streams, deadline_ms, 1.2, bridges=8, seed=int(deadline_ms)),
                 lognormal_steps(int(streams * 100)), until=1.3)
    assert seen["decisions"] > 25 and seen["ran"] > 10
    s.check_invariants()


def test_random_traces_and_settings_decide_as_the_reference():
    totals = dict.fromkeys(("decisions", "held", "ran", "expired", "batch>1"), 0)
    for seed in range(14):
        rng = np.random.default_rng(seed)
        cfg = SchedulerConfig(
            deadline_ms=float(rng.choice([15.0, 30.0, 60.0])), max_batch=int(rng.choice([1, 3, 8, 32])),
            margin_ms=float(rng.choice([0.0, 1.0])), max_head_skip=int(rng.choice([0, 4, 128])),
            max_hold_ms=float(rng.choice([0.0, 5.0, 20.0])), catch_up_p=float(rng.choice([0.0, 0.7])),
            min_on_time_p=float(rng.choice([0.05, 0.3])))
        model = (LatencyModel.from_profile(CPU_PROFILE) if seed % 2 else
                 LatencyModel.from_profile({b: 1.0 + 0.8 * b for b in (1, 2, 4, 8, 16, 32)}, rel_margin=0.0))
        s = EdfScheduler(model, cfg)
        arrivals = []
        t = 0.0
        for i in range(int(rng.integers(20, 90))):
            t += float(rng.exponential(0.004))
            sid = f"s{int(rng.integers(0, 12))}"
            arrivals.append((t, sid, i, t + float(rng.uniform(0.0, 2.5)) * cfg.deadline_ms * MS))
        scale = float(rng.choice([0.15, 0.5, 1.0]))
        seen = drive(s, arrivals, lognormal_steps(seed, scale), until=t + 1.0)
        for key in totals:
            totals[key] += seen[key]
        s.check_invariants()
    # the traces exercised every kind of decision
    assert totals["decisions"] > 300 and totals["expired"] > 20 and totals["batch>1"] > 20
    assert totals["held"] > 0


def test_large_queues_decide_as_the_reference():
    # Hundreds of frames, most of them hopeless within one step: head skips, capped
    # lookahead, the size grid beyond 16 and the candidate limit all come into play.
    for seed, (n_frames, max_batch) in enumerate([(300, 128), (120, 8), (60, 64)]):
        rng = np.random.default_rng(100 + seed)
        s = EdfScheduler(LatencyModel.from_profile(CPU_PROFILE),
                         SchedulerConfig(deadline_ms=100.0, max_batch=max_batch, margin_ms=1.0))
        for i in range(n_frames):
            at = float(rng.uniform(0.0, 0.05))
            s.add(PendingFrame(f"s{i}", 1, 0, at + float(rng.uniform(0.02, 0.4)), at, ref=(f"s{i}", 0)))
        seen = dict.fromkeys(("decisions", "held", "ran", "expired", "batch>1"), 0)
        now = 0.05
        for _ in range(3):
            plan = compare(s, now, seen)
            if plan.run:
                s.complete(plan, plan.predicted_ms)
                now += plan.predicted_ms * MS
        assert seen["batch>1"] >= 1


def test_windows_beyond_the_exact_sizes_are_valued_on_the_size_grid():
    # A queue of a hundred frames and more with a linear step time: windows past 16 frames
    # come from the size grid, and batches that large are chosen.
    seen = dict.fromkeys(("decisions", "held", "ran", "expired", "batch>1"), 0)
    for seed, (n_frames, max_batch, lo, hi) in enumerate([(90, 64, 0.01, 0.06), (150, 128, 0.02, 0.09)]):
        rng = np.random.default_rng(200 + seed)
        profile = {b: {"p50": 2.0 + 0.25 * b, "p99": 3.0 + 0.4 * b} for b in (1, 8, 32, 128)}
        s = EdfScheduler(LatencyModel.from_profile(profile), SchedulerConfig(
            deadline_ms=100.0, max_batch=max_batch, margin_ms=1.0, max_hold_ms=0.0))
        for i in range(n_frames):
            at = float(rng.uniform(0.0, 0.02))
            s.add(PendingFrame(f"s{i}", 1, 0, at + float(rng.uniform(lo, hi)), at, ref=(f"s{i}", 0)))
        now = 0.02
        for _ in range(3):
            plan = compare(s, now, seen)
            if plan.run:
                s.complete(plan, plan.predicted_ms)
                now += plan.predicted_ms * MS
    assert seen["ran"] >= 4 and seen["largest"] > 20
