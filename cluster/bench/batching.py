"""`auralink bench batching`: EDF deadline-aware batching vs Ray Serve `@serve.batch` vs none.

One trace, one device, one model, every scheduler side by side, at each deadline of
`--deadline-ms` (default 20, 40 and 100 ms: one table each):

- Trace: streams sending one 960-sample chunk every 40 ms. Streams are spread over
  `--bridges` bridges with random tick phases; a bridge sends all its streams' chunks in one
  request per tick, which reaches the replica after a transit jitter (uniform 0..`--jitter-ms`).
  A frame's deadline is its bridge send time + the deadline. The offered load is exact: a
  rate of x streams is floor(x) streams sending every tick plus one that sends on the
  fraction x - floor(x) of the ticks, spread evenly (a stream in DTX between talk spurts).
- Schedulers:
  `edf`          `deployments.scheduler.EdfScheduler`, its latency model seeded from the profile
                 and updated from every measured step; frames it expires are answered fallback
                 at once; when it holds frames for an expected chunk, the clock moves to the
                 next arrival or its `hold_until`, as the replica's loop sleeps.
  `serve_batch`  Ray Serve's `@serve.batch` semantics (ray 2.60 `serve/batching.py`), emulated
                 in the same event loop: FIFO; a batch opens when the batcher takes its first
                 item and closes at `max_batch_size` items or `batch_wait_timeout_s` after it
                 opened; batches form while the previous one runs (compute off the event loop)
                 and run one at a time (`max_concurrent_batches=1`). Items are single frames,
                 its most favourable granularity. It has no notion of deadlines, so every frame
                 is computed. The best (`max_batch_size`, `batch_wait_timeout_s`) of a grid is
                 reported per load (highest goodput).
  `none`         one frame per step, FIFO.
- Compute:
  `emulated`  a virtual clock; a step of B frames takes a time drawn from a log-normal fitted
              to the profile's p50/p99 at B (interpolated). Deterministic given `--seeds`, fast
              for thousands of streams. The profile comes from `--profile` (a codec bench JSON
              with `latency_profile_ms`) or is measured here from the real model.
  `real`      the real `models.StreamingEncodec` encodes each batch on this machine; the same
              virtual clock is advanced by the measured time of the step (and of the
              scheduler's own decision), so idle gaps cost nothing but every step is real.
              `--clock wall` measures elapsed time; `--clock cpu` (with `--threads 1`) the
              thread's CPU time, which leaves out time other processes took on a shared CPU.
- Capacity (`steady_capacity`): what a replica sustains with every frame on time whatever the
  arrival phases, at typical (p50) step times. Steps of B frames run back to back, each taking
  the frames that arrived during the previous one; a frame that arrives just after a step
  started waits for all of it, then runs in the next: answered jitter + 2 p50(B) after its
  send. Capacity = max over B <= max_batch with jitter + 2 p50(B) + margin <= deadline and
  mean(B) <= 40 ms (B frames need B streams) of B / mean(B). Where no B qualifies, there is no
  such steady state and loads are fractions of the single-step bound (jitter + p99(B) + margin
  <= deadline: only frames that never wait make it), basis `single_step`. Loads are fractions
  of the capacity.
- Streaming state: a batch never holds two chunks of one stream. `@serve.batch` does not know
  that, so a batch it forms with two chunks of a stream runs as sub-steps (the k-th chunk of
  each stream in sub-step k), as a correct replica behind it would have to.
- Step times are common random numbers: at one load every scheduler and every grid point
  draws from the same seeded stream (emulated), so rows differ by policy, not by luck.
- Seeds: every (deadline, load) runs once per seed of `--seeds` (trace phases, jitter, step
  times); rows pool the runs (rates over all their frames) and list each seed's miss rate.
- Per deadline: `edf_dominates` (EDF goodput >= `serve_batch`'s at every load, over all seeds;
  `edf_dominates_every_seed` for each seed's run alone) and the targets (EDF misses <= 1% at 95%
  load, goodput >= 95% of capacity at 120%; over all seeds and per seed), which apply where the
  deadline leaves room for batching: a wait-one-step capacity of at least 8 streams, or a
  deadline >= 100 ms.
- Decision cost (`decision_cost`): CPU time of each `schedule()` and `add()` call for a number
  of streams, on the bench's profile and, at scale, on a second one (default the modelled H100
  profile, max batch 16384).
- Metrics per scheduler and load: miss_rate (frames not answered `ai` within their deadline,
  of all frames), goodput_fps, p50/p99 latency (bridge send -> codes, frames answered `ai`),
  wasted_compute_s (step time spent on frames that missed their deadline anyway, pro rata),
  queue_max / queue_end (frames waiting, max over the run / when arrivals stop). The run stops
  one deadline after the last arrival; frames still waiting then count as misses.
"""

from __future__ import annotations

import argparse
import bisect
import enum
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json
from deployments.contract import CHUNK_SAMPLES
from deployments.latency_model import LatencyModel
from deployments.scheduler import EdfScheduler, PendingFrame, SchedulerConfig

log = logging.getLogger(__name__)

TICK_S = 0.040
Z99 = 2.3263478740408408  # standard normal 99th percentile
DEFAULT_JSON = Path(__file__).resolve().parents[2] / "docs" / "bench" / "batching.json"
DEFAULT_REAL_JSON = DEFAULT_JSON.with_name("batching_real.json")
DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "docs" / "bench" / "codec.json"
DEFAULT_SCALE_PROFILE = DEFAULT_PROFILE.with_name("profile-h100-modelled.json")

# Outcome codes per frame.
AI_ON_TIME, AI_LATE, EXPIRED, SHED, UNANSWERED = range(5)


# ------------------------------------------------------------------------------------ profile
@dataclass
class Profile:
    """Step time by batch size: p50 and p99 in ms, measured on `device`."""

    p50: dict[int, float]
    p99: dict[int, float]
    device: str
    source: str
    weights: str = "random"

    def __post_init__(self) -> None:
        self._sizes = sorted(self.p50)
        if not self._sizes:
            raise ValueError("empty latency profile")

    def _interp(self, table: dict[int, float], b: int) -> float:
        sizes = self._sizes
        if b <= sizes[0]:
            return table[sizes[0]]
        if b >= sizes[-1]:
            if len(sizes) == 1:
                return table[sizes[0]] * b / sizes[0]
            b0, b1 = sizes[-2], sizes[-1]
        else:
            i = bisect.bisect_right(sizes, b)
            b0, b1 = sizes[i - 1], sizes[i]
        m0, m1 = table[b0], table[b1]
        return m0 + (m1 - m0) * (b - b0) / (b1 - b0)

    def p50_ms(self, b: int) -> float:
        return self._interp(self.p50, b)

    def p99_ms(self, b: int) -> float:
        return max(self._interp(self.p99, b), self.p50_ms(b))

    def sigma(self, b: int) -> float:
        return math.log(self.p99_ms(b) / self.p50_ms(b)) / Z99

    def mean_ms(self, b: int) -> float:
        return self.p50_ms(b) * math.exp(self.sigma(b) ** 2 / 2)

    def sample_ms(self, b: int, rng: np.random.Generator) -> float:
        return self.p50_ms(b) * math.exp(self.sigma(b) * rng.standard_normal())

    def as_json(self) -> dict[str, dict[str, float]]:
        return {str(b): {"p50": round(self.p50[b], 4), "p99": round(self.p99[b], 4)} for b in self._sizes}

    @classmethod
    def load(cls, path: Path) -> Profile:
        """From a codec bench JSON: `latency_profile_ms` {batch: {"p50", "p99"}} (or {batch: ms})."""
        data = json.loads(Path(path).read_text())
        prof = data.get("latency_profile_ms")
        if not isinstance(prof, dict) or not prof:
            raise ValueError(f"{path} has no `latency_profile_ms` object")
        p50, p99 = {}, {}
        for k, v in prof.items():
            b = int(k)
            if isinstance(v, dict):
                p50[b] = float(v["p50"])
                p99[b] = float(v.get("p99", v["p50"]))
            else:
                p50[b] = p99[b] = float(v)
        device = str(data.get("device", "unknown device"))
        if data.get("machine"):  # the codec bench names the host and its thread count apart
            threads = f", torch threads {data['threads']}" if data.get("threads") else ""
            device = f"{device} ({data['machine']}{threads})"
        weights = str(data.get("weights", "unknown"))
        return cls(p50, p99, device, _repo_relative(Path(path)), weights)


def _repo_relative(path: Path) -> str:
    """`path` relative to the repository when inside it (what a reader can open), else as is."""
    try:
        return str(path.resolve().relative_to(DEFAULT_JSON.parents[2]))
    except ValueError:
        return str(path)


def build_codec(threads: int | None, capacity: int):
    """The real streaming codec on CPU (random weights unless a checkpoint is installed)."""
    try:
        import torch

        from models import StreamingEncodec, load_encodec
    except ImportError as e:  # pragma: no cover - depends on the models package
        raise SystemExit(f"real compute needs models.StreamingEncodec: {e}") from e
    if threads:
        torch.set_num_threads(threads)
    model, info = load_encodec(allow_random=True, device="cpu")
    codec = StreamingEncodec(model, capacity=capacity, device="cpu", bandwidth_kbps=6.0)
    return codec, str(getattr(info.kind, "value", info.kind))


class RealCompute:
    """Encodes B chunks of noise with the real model; returns the measured step time (ms).

    clock "wall": elapsed time (a dedicated machine). clock "cpu": the calling thread's CPU
    time, which with one torch thread is the step's own work without the time the OS gave
    other processes - the usable measure on a shared machine."""

    def __init__(self, codec: Any, max_batch: int, seed: int, clock: str = "wall") -> None:
        self.codec = codec
        rng = np.random.default_rng(seed)
        self.pcm = (0.1 * rng.standard_normal((max_batch, CHUNK_SAMPLES))).astype(np.float32)
        self.slots = np.arange(max_batch)
        self.timer = time.thread_time if clock == "cpu" else time.perf_counter

    def __call__(self, b: int) -> float:
        # Slots 0..B-1: which slot a row uses does not change the step's cost.
        t = self.timer()
        self.codec.encode(self.slots[:b], self.pcm[:b])
        return (self.timer() - t) * 1000.0


def measure_profile(
    compute: RealCompute, batches: list[int], reps: int, device: str, weights: str,
    budget_s: float = 90.0,
) -> Profile:
    """p50/p99 of real steps per batch size (after warm-up); stops growing B past the budget."""
    for b in batches[:2]:
        for _ in range(3):
            compute(b)
    p50, p99 = {}, {}
    t_end = time.monotonic() + budget_s
    for b in batches:
        xs = np.array([compute(b) for _ in range(reps)])
        p50[b] = float(np.percentile(xs, 50))
        p99[b] = float(np.percentile(xs, 99))
        log.info("profile B=%d p50=%.2f ms p99=%.2f ms", b, p50[b], p99[b])
        if time.monotonic() > t_end:
            break
    return Profile(p50, p99, device, "measured by `auralink bench batching`", weights)


class CapacityBasis(str, enum.Enum):
    """How a deadline's capacity was found."""

    WAIT_ONE_STEP = "wait_one_step"  # a steady state where every frame may wait one running step
    SINGLE_STEP = "single_step"  # no such steady state: only frames that never wait can be on time


@dataclass(frozen=True)
class Capacity:
    """The rate one replica sustains at a deadline, the batch size that does it, and the basis."""

    fps: float
    batch: int
    basis: CapacityBasis
    step_ms: float  # mean step time at `batch`

    @property
    def streams(self) -> float:
        return self.fps * TICK_S


def single_step_capacity(profile: Profile, deadline_ms: float, margin_ms: float, jitter_ms: float,
                         max_batch: int) -> tuple[float, int]:
    """(frames/s, B): best B / mean(B) among B whose p99 step fits the deadline on its own and
    whose mean step fits one 40 ms tick. An upper bound, not a capacity: it assumes a frame
    never waits for a step already running, which only an idle replica guarantees."""
    best, best_b = 0.0, 0
    for b in range(1, max_batch + 1):
        if profile.p99_ms(b) + margin_ms + jitter_ms > deadline_ms or profile.mean_ms(b) > TICK_S * 1000.0:
            break
        fps = b / profile.mean_ms(b) * 1000.0
        if fps > best:
            best, best_b = fps, b
    return best, best_b


def steady_capacity(profile: Profile, deadline_ms: float, margin_ms: float, jitter_ms: float,
                    max_batch: int) -> Capacity:
    """The largest rate at which a replica has a steady state with every frame on time at
    typical (p50) step times, whatever the arrival phases.

    Steady state at batch B: steps of B frames run back to back, each taking the frames that
    arrived while the previous one ran. A frame reaching the replica (up to `jitter_ms` after
    its bridge sent it) just after a step started waits for that whole step, then runs in the
    next one, so it is answered jitter + p50(B) + p50(B) after the send, and must have
    `margin_ms` left. Back-to-back steps serve B / mean(B) frames/s in the long run. A stream
    has at most one chunk in a step, so B frames need B streams, which send B / 40 ms: the
    step must also fit a tick, mean(B) <= 40 ms. Capacity = max over B <= max_batch with
    jitter + 2 p50(B) + margin <= deadline and mean(B) <= 40 ms of B / mean(B).

    Where no B qualifies (a frame that waits for any running step misses), there is no such
    steady state; the capacity is then `single_step_capacity`, basis SINGLE_STEP.
    """
    best = Capacity(0.0, 0, CapacityBasis.WAIT_ONE_STEP, 0.0)
    for b in range(1, max_batch + 1):
        mean = profile.mean_ms(b)
        if jitter_ms + 2.0 * profile.p50_ms(b) + margin_ms > deadline_ms or mean > TICK_S * 1000.0:
            continue
        if b / mean * 1000.0 > best.fps:
            best = Capacity(b / mean * 1000.0, b, CapacityBasis.WAIT_ONE_STEP, mean)
    if best.batch:
        return best
    fps, b = single_step_capacity(profile, deadline_ms, margin_ms, jitter_ms, max_batch)
    return Capacity(fps, b, CapacityBasis.SINGLE_STEP, profile.mean_ms(b) if b else 0.0)


# ------------------------------------------------------------------------------------ trace
@dataclass
class Trace:
    send: np.ndarray  # float64 [F] bridge send time (s)
    arrival: np.ndarray  # float64 [F] arrival at the replica (s), non-decreasing
    deadline: np.ndarray  # float64 [F]
    stream: np.ndarray  # int64 [F]
    seq: np.ndarray  # int64 [F]
    duration_s: float
    n_streams: int
    offered_fps: float


def make_trace(rate_fps: float, duration_s: float, bridges: int, jitter_ms: float,
               deadline_ms: float, seed: int) -> Trace:
    """Exactly `rate_fps` offered: floor(rate x 40 ms) streams send a chunk every tick, and one
    more stream (when the rate asks for a fraction of a stream) sends on that fraction of the
    ticks, spread evenly (as a stream in DTX between talk spurts would)."""
    streams_f = rate_fps * TICK_S
    n_full = math.floor(streams_f + 1e-9)
    frac = max(0.0, streams_f - n_full)
    if frac < 1e-9:
        frac = 0.0
    n_streams = max(1, n_full + (1 if frac else 0))
    # Bridge tick phases depend on the seed only, so every load sees the same bridges.
    phase = np.random.default_rng(seed).uniform(0, TICK_S, size=max(1, bridges))
    rng = np.random.default_rng([seed, round(rate_fps * 1000)])
    bridge_of = np.arange(n_streams) % max(1, bridges)
    ticks = int(duration_s / TICK_S)
    frac_phase = rng.random()
    sends, arrs, streams, seqs = [], [], [], []
    for k in range(ticks):
        present = np.ones(n_streams, bool)
        if frac:  # the fractional stream: present when the running count of its share steps up
            present[-1] = math.floor((k + 1) * frac + frac_phase) > math.floor(k * frac + frac_phase)
        for br in range(max(1, bridges)):
            members = np.nonzero(present & (bridge_of == br))[0]
            if not len(members):
                continue
            t_send = phase[br] + k * TICK_S
            t_arr = t_send + rng.uniform(0, jitter_ms / 1000.0)
            sends.append(np.full(len(members), t_send))
            arrs.append(np.full(len(members), t_arr))
            streams.append(members)
            seqs.append(np.full(len(members), k))
    send = np.concatenate(sends)
    arr = np.concatenate(arrs)
    order = np.argsort(arr, kind="stable")
    send, arr = send[order], arr[order]
    stream, seq = np.concatenate(streams)[order], np.concatenate(seqs)[order]
    return Trace(send, arr, send + deadline_ms / 1000.0, stream, seq, ticks * TICK_S,
                 n_streams, len(send) / (ticks * TICK_S))


# ------------------------------------------------------------------------------------ runs
@dataclass
class RunLog:
    """What happened to every frame, and the steps that ran."""

    n: int
    outcome: np.ndarray = field(init=False)
    answer: np.ndarray = field(init=False)
    steps: list[tuple[float, float, int, int]] = field(default_factory=list)  # start, end, B, late
    wasted_s: float = 0.0
    busy_s: float = 0.0
    queue_max: int = 0
    queue_end: int = 0
    decision_s: list[float] = field(default_factory=list)  # EDF: each schedule() call's own time

    def __post_init__(self) -> None:
        self.outcome = np.full(self.n, UNANSWERED, np.int8)
        self.answer = np.full(self.n, np.nan)

    def ran(self, idx: list[int] | np.ndarray, start: float, end: float, deadline: np.ndarray) -> None:
        idx = np.asarray(idx, np.int64)
        late = end > deadline[idx]
        self.outcome[idx] = np.where(late, AI_LATE, AI_ON_TIME)
        self.answer[idx] = end
        n_late = int(late.sum())
        self.steps.append((start, end, len(idx), n_late))
        self.busy_s += end - start
        self.wasted_s += (end - start) * n_late / len(idx)


StepCost = Callable[[int], float]


def run_edf(tr: Trace, step_ms: StepCost, profile: Profile, cfg: SchedulerConfig,
            add_overhead: bool) -> RunLog:
    rl = RunLog(len(tr.arrival))
    # The scheduler's own time: with real compute on the step's clock (it delays the steps);
    # emulated, this thread's CPU time (what a decision costs, whatever else the machine runs).
    timer = getattr(step_ms, "timer", time.thread_time)
    model = LatencyModel.from_profile(profile.as_json())
    sched = EdfScheduler(model, cfg)
    t_stop = tr.duration_s + cfg.deadline_ms / 1000.0
    k, n = 0, len(tr.arrival)
    t = 0.0
    queue_end_set = False
    while t < t_stop:
        while k < n and tr.arrival[k] <= t:
            sched.add(PendingFrame(str(tr.stream[k]), 1, int(tr.seq[k]), float(tr.deadline[k]),
                                   float(tr.arrival[k]), ref=k))
            k += 1
        if not queue_end_set and k == n:
            rl.queue_end, queue_end_set = len(sched), True
        rl.queue_max = max(rl.queue_max, len(sched))
        c0 = timer()
        plan = sched.schedule(t)
        spent = timer() - c0
        rl.decision_s.append(spent)
        overhead_s = spent if add_overhead else 0.0
        for f in plan.expired:
            rl.outcome[f.ref], rl.answer[f.ref] = EXPIRED, t
        for f, _reason in plan.shed:
            rl.outcome[f.ref], rl.answer[f.ref] = SHED, t
        t += overhead_s
        if plan.run:
            ms = step_ms(len(plan.run))
            end = t + ms / 1000.0
            rl.ran([f.ref for f in plan.run], t, end, tr.deadline)
            sched.complete(plan, ms)
            t = end
        elif k < n or plan.hold_until is not None:
            # Idle until the next arrival or the scheduler's next decision, as the replica does.
            wake = min(float(tr.arrival[k]) if k < n else math.inf,
                       plan.hold_until if plan.hold_until is not None else math.inf)
            t = max(t, wake)
        else:
            break
    rl.queue_max = max(rl.queue_max, len(sched))
    return rl


def serve_batches(arrival: np.ndarray, max_batch_size: int, wait_s: float) -> list[tuple[float, int, int]]:
    """@serve.batch's batch formation over a FIFO of items: (close time, first, end) per batch.

    The batcher takes the first queued item (or waits for one), opens the batch then, and
    closes it when it holds `max_batch_size` items or `wait_s` after opening, taking what has
    arrived by then. It loops at once (batches queue for the executor), so formation depends
    on arrivals only.
    """
    out = []
    n = len(arrival)
    i = 0
    prev_close = 0.0
    while i < n:
        start = max(float(arrival[i]), prev_close)
        full_at = float(arrival[i + max_batch_size - 1]) if i + max_batch_size - 1 < n else math.inf
        close = max(start, full_at) if full_at <= start + wait_s else start + wait_s
        j = min(bisect.bisect_right(arrival, close, lo=i), i + max_batch_size)
        j = max(j, i + 1)
        out.append((close, i, j))
        prev_close = close
        i = j
    return out


def run_fifo_batches(tr: Trace, step_ms: StepCost, batches: list[tuple[float, int, int]],
                     deadline_ms: float) -> RunLog:
    """Run formed batches one at a time in order; every frame is computed, late or not."""
    rl = RunLog(len(tr.arrival))
    t_stop = tr.duration_s + deadline_ms / 1000.0
    free = 0.0
    starts = []
    for ready, i, j in batches:
        start = max(free, ready)
        if start >= t_stop:
            break
        # A stream's chunks must run one after another (streaming state), so a batch holding
        # two chunks of one stream runs as sub-steps: the k-th chunk of each stream in step k.
        rows = np.arange(i, j)
        _, first = np.unique(tr.stream[rows], return_index=True)
        rank = np.zeros(len(rows), np.int64)
        if len(first) < len(rows):
            seen: dict[int, int] = {}
            for r, sid in enumerate(tr.stream[rows].tolist()):
                rank[r] = seen.get(sid, 0)
                seen[sid] = rank[r] + 1
        free = start
        for k in range(int(rank.max()) + 1):
            sub = rows[rank == k]
            sub_start = free
            free = sub_start + step_ms(len(sub)) / 1000.0
            rl.ran(sub, sub_start, free, tr.deadline)
        starts.append((start, j))
    # Queue = frames arrived but not started, sampled at each step start and at the end of arrivals.
    if starts:
        st = np.array([s for s, _ in starts])
        started = np.array([0] + [j for _, j in starts[:-1]])
        arrived = np.searchsorted(tr.arrival, st, side="right")
        rl.queue_max = int(max(0, (arrived - started).max()))
    t_end_arr = float(tr.arrival[-1])
    started_by_end = max((j for s, j in starts if s <= t_end_arr), default=0)
    rl.queue_end = int(len(tr.arrival) - started_by_end)
    return rl


def summarize(rl: RunLog, tr: Trace) -> dict[str, Any]:
    return summarize_runs([(rl, tr)])


def summarize_runs(runs: list[tuple[RunLog, Trace]]) -> dict[str, Any]:
    """One row from runs of one scheduler on traces of equal length (one per seed): rates over
    all their frames, latency percentiles over all answers, queue figures the worst run's,
    wasted compute per run."""
    oc = np.concatenate([rl.outcome for rl, _ in runs])
    n = len(oc)
    duration = sum(tr.duration_s for _, tr in runs)
    counts = {name: int((oc == code).sum()) for code, name in
              ((AI_ON_TIME, "ai_on_time"), (AI_LATE, "ai_late"), (EXPIRED, "fallback_deadline"),
               (SHED, "fallback_overload"), (UNANSWERED, "unanswered"))}
    lat_parts, ans_parts = [], []
    for rl, tr in runs:
        ai = (rl.outcome == AI_ON_TIME) | (rl.outcome == AI_LATE)
        lat_parts.append((rl.answer[ai] - tr.send[ai]) * 1000.0)
        answered = ~np.isnan(rl.answer)
        ans_parts.append((rl.answer[answered] - tr.send[answered]) * 1000.0)
    lat, ans_lat = np.concatenate(lat_parts), np.concatenate(ans_parts)
    sizes = [s[2] for rl, _ in runs for s in rl.steps]
    decisions = np.array([d for rl, _ in runs for d in rl.decision_s]) * 1e6
    out = {
        "miss_rate": round(1.0 - counts["ai_on_time"] / n, 5) if n else 0.0,
        "goodput_fps": round(counts["ai_on_time"] / duration, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
        "wasted_compute_s": round(sum(rl.wasted_s for rl, _ in runs) / len(runs), 4),
        "answer_p99_ms": round(float(np.percentile(ans_lat, 99)), 3) if len(ans_lat) else None,
        "busy_s": round(sum(rl.busy_s for rl, _ in runs) / len(runs), 3),
        "mean_batch": round(float(np.mean(sizes)), 2) if sizes else 0.0,
        "steps": len(sizes),
        "queue_max": max(rl.queue_max for rl, _ in runs),
        "queue_end": max(rl.queue_end for rl, _ in runs),
        "frames": n,
        **counts,
    }
    if len(decisions):
        out["decisions"] = len(decisions)
        out["decision_us_p50"] = round(float(np.percentile(decisions, 50)), 1)
        out["decision_us_p99"] = round(float(np.percentile(decisions, 99)), 1)
    return out


# ------------------------------------------------------------------------------ decision cost
DEFAULT_DECISION_STREAMS = (32, 1000, 8000)


def decision_cost(profile: Profile, deadline_ms: float, max_batch: int, streams: int,
                  seconds: float, seed: int) -> dict[str, Any]:
    """CPU time (this thread) of `EdfScheduler.schedule()` and `add()` for `streams` streams
    sending a chunk every 40 ms (random phases), deadline `deadline_ms` after the send, steps
    run back to back at the profile's mean time (and fed back, so the model's rebuilds are
    part of the figures), for `seconds` of virtual time. Streams beyond the replica's
    capacity keep the queue long: the figures are per queue length, not per load."""
    rng = np.random.default_rng([seed, streams])
    ticks = max(1, int(seconds / TICK_S))
    phase = rng.uniform(0.0, TICK_S, streams)
    send = (phase[None, :] + TICK_S * np.arange(ticks)[:, None]).ravel()
    order = np.argsort(send, kind="stable")
    send = send[order]
    stream = np.tile(np.arange(streams), ticks)[order]
    seq = np.repeat(np.arange(ticks), streams)[order]
    deadline = send + deadline_ms / 1000.0
    model = LatencyModel.from_profile(profile.as_json())
    sched = EdfScheduler(model, SchedulerConfig(deadline_ms=deadline_ms, max_batch=max_batch,
                                                margin_ms=1.0, max_queue=1 << 22))
    decide_us: list[float] = []
    queue: list[int] = []
    add_s = 0.0
    k, n, t = 0, len(send), 0.0
    clock = time.thread_time
    while k < n:
        c0 = clock()
        while k < n and send[k] <= t:
            sched.add(PendingFrame(str(stream[k]), 1, int(seq[k]), float(deadline[k]), float(send[k])))
            k += 1
        c1 = clock()
        add_s += c1 - c0
        queue.append(len(sched))
        plan = sched.schedule(t)
        decide_us.append((clock() - c1) * 1e6)
        if plan.run:
            ms = float(model.mean_ms([len(plan.run)])[0])
            sched.complete(plan, ms)
            t += ms / 1000.0
        else:
            wake = float(send[k]) if k < n else math.inf
            t = max(t, min(wake, plan.hold_until if plan.hold_until is not None else math.inf))
    us = np.array(decide_us)
    q = np.array(queue, float)
    p50 = float(np.percentile(us, 50))
    return {
        "streams": streams,
        "decisions": len(us),
        "queue_p50": int(np.percentile(q, 50)),
        "queue_max": int(q.max()),
        "decision_us_p50": round(p50, 1),
        "decision_us_p99": round(float(np.percentile(us, 99)), 1),
        "decision_us_per_queued_frame_p50": round(float(np.percentile(us / np.maximum(q, 1), 50)), 4),
        "add_us_mean": round(add_s / n * 1e6, 2),
    }


# ------------------------------------------------------------------------------------ driver
DEFAULT_DEADLINES_MS = (20.0, 40.0, 100.0)
TARGET_MIN_STREAMS = 8  # the targets hold where capacity is at least this many streams
TARGET_DEADLINE_MS = 100.0  # ... or at this deadline and above


@dataclass
class BenchConfig:
    compute: str = "emulated"
    loads: tuple[float, ...] = (0.5, 0.8, 0.95, 1.2)
    duration_s: float = 20.0
    deadlines_ms: tuple[float, ...] = DEFAULT_DEADLINES_MS
    margin_ms: float = 1.0
    max_batch: int = 128
    bridges: int = 8
    jitter_ms: float = 2.0
    # Every (deadline, load) runs once per seed (trace phases, jitter and step times); rows pool
    # the runs, so a verdict rests on len(seeds) x duration_s of trace, not on one lucky draw.
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    serve_max_batch_sizes: tuple[int, ...] = ()  # empty: derived from the capacity batch
    # batch_wait_timeout grid as fractions of the deadline (or absolute ms, see serve_wait_ms)
    serve_wait_fractions: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    serve_wait_ms: tuple[float, ...] = ()  # non-empty: this grid (ms) at every deadline
    torch_threads: int | None = None
    clock: str = "wall"
    # Decision cost: streams per run (empty: skip) and virtual seconds each, at the largest
    # deadline; and at scale, on a second profile (a GPU's) with a large max_batch.
    decision_streams: tuple[int, ...] = DEFAULT_DECISION_STREAMS
    decision_seconds: float = 2.0
    scale_profile: str | None = None
    scale_streams: tuple[int, ...] = (64, 1000, 10_000)
    scale_max_batch: int = 16_384
    scale_deadline_ms: float = 40.0


def serve_grid(cfg: BenchConfig, batches: tuple[int, ...], deadline_ms: float) -> list[tuple[int, float]]:
    """@serve.batch settings tried: max_batch_size around each of `batches` (half, same,
    double), batch_wait_timeout from the fractions of the deadline (or the ms given)."""
    sizes = cfg.serve_max_batch_sizes or tuple(sorted(
        {min(cfg.max_batch, max(1, x)) for b in batches for x in (b // 2, b, 2 * b)}))
    waits = cfg.serve_wait_ms or tuple(round(f * deadline_ms, 3) for f in cfg.serve_wait_fractions)
    return [(s, w / 1000.0) for s in sizes for w in waits]


def run_deadline(cfg: BenchConfig, deadline_ms: float, profile: Profile,
                 real: RealCompute | None) -> dict[str, Any]:
    """Every scheduler at every load for one deadline, each load once per seed."""
    cap = steady_capacity(profile, deadline_ms, cfg.margin_ms, cfg.jitter_ms, cfg.max_batch)
    if cap.fps <= 0:
        raise SystemExit(
            f"no batch size fits a {deadline_ms} ms deadline on this profile "
            f"(p99 at B=1 is {profile.p99_ms(1):.1f} ms): raise --deadline-ms or use a faster device")
    single_fps, single_b = single_step_capacity(profile, deadline_ms, cfg.margin_ms, cfg.jitter_ms, cfg.max_batch)
    peak = max(b / profile.mean_ms(b) * 1000.0 for b in range(1, cfg.max_batch + 1))
    sched_cfg = SchedulerConfig(deadline_ms=deadline_ms, max_batch=cfg.max_batch,
                                margin_ms=cfg.margin_ms, max_queue=1 << 20)
    results: list[dict[str, Any]] = []
    grid = serve_grid(cfg, (cap.batch, single_b), deadline_ms)
    for li, load in enumerate(cfg.loads):
        t0 = time.perf_counter()
        edf_runs: list[tuple[RunLog, Trace]] = []
        none_runs: list[tuple[RunLog, Trace]] = []
        serve_runs: dict[tuple[int, float], list[tuple[RunLog, Trace]]] = {g: [] for g in grid}
        for seed in cfg.seeds:
            tr = make_trace(load * cap.fps, cfg.duration_s, cfg.bridges, cfg.jitter_ms, deadline_ms, seed)

            def step_fn(seed: int = seed, li: int = li) -> StepCost:
                # Common random numbers: every scheduler (and grid point) at this load and seed
                # draws its step times from the same stream, so rows differ by policy, not by
                # luck (and the best of the @serve.batch grid is not the luckiest of many draws).
                if real is not None:
                    return real
                rng = np.random.default_rng([seed, round(deadline_ms * 1000), li])
                return lambda b: profile.sample_ms(b, rng)

            edf_runs.append((run_edf(tr, step_fn(), profile, replace(sched_cfg),
                                     add_overhead=real is not None), tr))
            for mbs, wait_s in grid:
                serve_runs[(mbs, wait_s)].append(
                    (run_fifo_batches(tr, step_fn(), serve_batches(tr.arrival, mbs, wait_s), deadline_ms), tr))
            none_runs.append((run_fifo_batches(tr, step_fn(), serve_batches(tr.arrival, 1, 0.0), deadline_ms), tr))
        common = {"load": load, "offered_fps": round(sum(tr.offered_fps for _, tr in edf_runs) / len(edf_runs), 2),
                  "n_streams": edf_runs[0][1].n_streams, "offered_streams": round(load * cap.streams, 3)}
        edf = {**summarize_runs(edf_runs), "per_seed": per_seed(cfg.seeds, edf_runs)}
        results.append({"scheduler": "edf", **common, **edf})
        # One @serve.batch setting for every seed (what an operator configures): the grid
        # point with the best goodput over all of them.
        best: dict[str, Any] | None = None
        for (mbs, wait_s), runs in serve_runs.items():
            s = summarize_runs(runs)
            s["max_batch_size"], s["batch_wait_timeout_s"] = mbs, wait_s
            s["per_seed"] = per_seed(cfg.seeds, runs)
            if best is None or (s["goodput_fps"], -s["miss_rate"]) > (best["goodput_fps"], -best["miss_rate"]):
                best = s
        assert best is not None
        best["grid"] = [[m, w] for m, w in grid]
        results.append({"scheduler": "serve_batch", **common, **best})
        results.append({"scheduler": "none", **common, **summarize_runs(none_runs),
                        "per_seed": per_seed(cfg.seeds, none_runs)})
        log.info("deadline %g ms, load %.2f: %.2f streams, edf miss %.4f goodput %.1f decision "
                 "p50/p99 %s/%s us; serve_batch miss %.4f goodput %.1f (bs=%d wait=%.3f)  [%.1fs]",
                 deadline_ms, load, common["offered_streams"], edf["miss_rate"], edf["goodput_fps"],
                 edf.get("decision_us_p50"), edf.get("decision_us_p99"), best["miss_rate"],
                 best["goodput_fps"], best["max_batch_size"], best["batch_wait_timeout_s"],
                 time.perf_counter() - t0)
    decisions = [r for r in results if r["scheduler"] == "edf" and "decision_us_p50" in r]
    return {
        "deadline_ms": deadline_ms,
        "capacity_fps": round(cap.fps, 2),
        "capacity_batch": cap.batch,
        "capacity_streams": round(cap.streams, 2),
        "capacity_basis": cap.basis.value,
        "capacity_step_ms": round(cap.step_ms, 3),
        "single_step_fps": round(single_fps, 2),
        "single_step_batch": single_b,
        "peak_fps": round(peak, 2),
        "edf_dominates": dominates(results),
        "edf_dominates_every_seed": dominates(results, every_seed=True),
        "targets": targets(results, cap, deadline_ms),
        "decision_us_p50": max((r["decision_us_p50"] for r in decisions), default=None),
        "decision_us_p99": max((r["decision_us_p99"] for r in decisions), default=None),
        "results": results,
    }


def per_seed(seeds: tuple[int, ...], runs: list[tuple[RunLog, Trace]]) -> list[dict[str, Any]]:
    """Miss rate and goodput of each seed's run."""
    out = []
    for seed, run in zip(seeds, runs, strict=True):
        s = summarize_runs([run])
        out.append({"seed": seed, "miss_rate": s["miss_rate"], "goodput_fps": s["goodput_fps"]})
    return out


def dominates(results: list[dict[str, Any]], every_seed: bool = False) -> bool:
    """EDF's goodput >= @serve.batch's (best grid point) at every load run: over all seeds'
    frames, or (`every_seed`) in each seed's run alone."""
    edf = {r["load"]: r for r in results if r["scheduler"] == "edf"}
    sb = {r["load"]: r for r in results if r["scheduler"] == "serve_batch"}
    if not every_seed:
        return all(edf[load]["goodput_fps"] >= sb[load]["goodput_fps"] for load in sb)
    return all(e["goodput_fps"] >= s["goodput_fps"]
               for load in sb
               for e, s in zip(edf[load].get("per_seed", [edf[load]]), sb[load].get("per_seed", [sb[load]]),
                               strict=True))


def cpu_calibration_ms() -> float:
    """This thread's CPU time for sum(range(10**6)), best of 3: how fast this machine runs
    plain Python, to read the decision times against (a few ms on a current desktop core)."""
    best = math.inf
    for _ in range(3):
        t0 = time.thread_time()
        sum(range(10**6))
        best = min(best, time.thread_time() - t0)
    return round(best * 1000.0, 2)


def run_decision_cost(cfg: BenchConfig, profile: Profile) -> dict[str, Any] | None:
    if not cfg.decision_streams and not cfg.scale_profile:
        return None
    runs = [(profile, max(cfg.deadlines_ms), cfg.max_batch, cfg.decision_streams)]
    if cfg.scale_profile:
        path = Path(cfg.scale_profile)
        if not path.is_absolute() and not path.exists():
            path = DEFAULT_JSON.parents[2] / path  # relative to the repository
        runs.append((Profile.load(path), cfg.scale_deadline_ms, cfg.scale_max_batch,
                     cfg.scale_streams))
    rows = []
    for prof, deadline, max_batch, streams_list in runs:
        for streams in streams_list:
            t0 = time.perf_counter()
            row = decision_cost(prof, deadline, max_batch, streams, cfg.decision_seconds, cfg.seeds[0])
            rows.append({"profile": prof.device, "profile_source": prof.source, "deadline_ms": deadline,
                         "max_batch": max_batch, **row})
            log.info("decision cost: %s  [%.1fs]", rows[-1], time.perf_counter() - t0)
    return {"seconds": cfg.decision_seconds, "cpu_calibration_ms": cpu_calibration_ms(), "rows": rows}


def run_bench(cfg: BenchConfig, profile: Profile, real: RealCompute | None) -> dict[str, Any]:
    sections = [run_deadline(cfg, d, profile, real) for d in cfg.deadlines_ms]
    return {
        "device": profile.device,
        "compute": cfg.compute,
        "weights": profile.weights,
        "profile_source": profile.source,
        "latency_profile_ms": profile.as_json(),
        "capacity_definition": CAPACITY_DEFINITION,
        "edf_dominates_everywhere": all(d["edf_dominates"] for d in sections),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "host": machine_description(),
        "host_load_avg_1m": round(os.getloadavg()[0], 2),
        "torch_threads": cfg.torch_threads if real is not None or cfg.compute == "real" else None,
        "git": git_revision(),
        "deadlines": sections,
        "decision_cost": run_decision_cost(cfg, profile),
    }


CAPACITY_DEFINITION = (
    "max over B <= max_batch with jitter + 2 p50(B) + margin <= deadline and mean(B) <= 40 ms "
    "of B / mean(B): steps of B frames back to back, a frame waits for the running step and runs "
    "in the next (basis wait_one_step); where no B qualifies, max B / mean(B) with jitter + "
    "p99(B) + margin <= deadline (basis single_step: only frames that never wait are on time)")


def targets(results: list[dict[str, Any]], cap: Capacity, deadline_ms: float) -> dict[str, Any]:
    """The targets, checked on this deadline's EDF rows (absent where a load was not run), over
    all seeds' frames and in each seed's run alone (`*_every_seed`). They apply where the
    deadline leaves room for batching: a steady state where frames may wait a running step at
    a capacity of at least TARGET_MIN_STREAMS streams, or a deadline of TARGET_DEADLINE_MS or more."""
    edf = {r["load"]: r for r in results if r["scheduler"] == "edf"}
    room = cap.basis is CapacityBasis.WAIT_ONE_STEP and cap.streams >= TARGET_MIN_STREAMS
    out: dict[str, Any] = {"apply": room or deadline_ms >= TARGET_DEADLINE_MS}
    if 0.95 in edf:
        r = edf[0.95]
        seeds = r.get("per_seed", [r])
        out["edf_miss_rate_at_95"] = r["miss_rate"]
        out["edf_miss_at_95_le_1pct"] = r["miss_rate"] <= 0.01
        out["edf_miss_rate_at_95_max_seed"] = max(x["miss_rate"] for x in seeds)
        out["edf_miss_at_95_le_1pct_every_seed"] = all(x["miss_rate"] <= 0.01 for x in seeds)
    if 1.2 in edf:
        r = edf[1.2]
        seeds = r.get("per_seed", [r])
        out["edf_goodput_over_capacity_at_120"] = round(r["goodput_fps"] / cap.fps, 4)
        out["edf_goodput_at_120_ge_95pct"] = r["goodput_fps"] >= 0.95 * cap.fps
        out["edf_goodput_over_capacity_at_120_min_seed"] = round(
            min(x["goodput_fps"] for x in seeds) / cap.fps, 4)
        out["edf_goodput_at_120_ge_95pct_every_seed"] = all(x["goodput_fps"] >= 0.95 * cap.fps for x in seeds)
        out["edf_wasted_compute_s_at_120"] = r["wasted_compute_s"]
        out["edf_queue_end_at_120"] = r["queue_end"]
    return out


def sections_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-deadline sections of a results file (a file from before per-deadline runs is one)."""
    if "deadlines" in data:
        return data["deadlines"]
    legacy = {k: data[k] for k in ("capacity_fps", "capacity_batch", "peak_fps", "targets", "results")
              if k in data}
    legacy["deadline_ms"] = data["config"]["deadline_ms"]
    legacy["capacity_streams"] = round(data["capacity_fps"] * TICK_S, 2)
    legacy["edf_dominates"] = dominates(data["results"])
    return [legacy]


# ------------------------------------------------------------------------------------ docs
SECTION_INTRO = """## batching

EDF deadline-aware batching (`deployments/scheduler.py`) against Ray Serve's `@serve.batch`
policy and no batching, on the same traces, device and model, at each deadline. Rows per
offered load (fraction of that deadline's capacity), each pooling one run per seed.
Definitions (module docstring of `cluster/bench/batching.py`):

- **capacity**: what a replica sustains with every frame on time whatever the arrival
  phases. Steps of B frames run back to back; a frame that arrives just after a step started
  waits for it and runs in the next, so it is answered jitter + 2 p50 step(B) after its send.
  Capacity = max over B <= max_batch with jitter + 2 p50(B) + margin <= deadline and mean
  step(B) <= 40 ms (B frames need B streams) of B / mean step(B) (basis `wait_one_step`).
  Where no B qualifies there is no such steady state; the load axis then uses the single-step
  bound (jitter + p99(B) + margin <= deadline: only a frame that never waits is on time;
  basis `single_step`). **streams**: the offered load in 40 ms streams (a fractional stream
  sends on that fraction of the ticks).
- **miss rate**: frames not answered `ai` within their deadline (late, fallback, or still
  queued when the run ends), of all frames (per seed: each seed's run). **goodput**: frames
  answered `ai` in time per s.
- **p50/p99**: bridge send -> codes, frames answered `ai`. **wasted compute**: step time spent
  on frames that missed anyway (pro rata, per run). **queue**: frames waiting, max / when
  arrivals stop. **decision us**: CPU time of this thread per `EdfScheduler.schedule()` call
  in the run (emulated; with real compute, the step's clock), on this shared machine.
- `serve_batch` emulates `@serve.batch` (ray 2.60) in the same event loop: FIFO, a batch
  closes at `max_batch_size` or `batch_wait_timeout_s` after it opens, batches form while the
  previous one runs and run one at a time; it computes every frame; a batch with two chunks of
  one stream runs as sub-steps (streaming state). The grid point with the best goodput over
  all seeds is shown (one setting for every seed). `none`: one frame per step, FIFO.
- **EDF dominates**: EDF's goodput >= `serve_batch`'s at every load of that deadline (over all
  seeds; "every seed" checks each seed's run alone). The targets (EDF misses <= 1% at 95% load,
  EDF goodput >= 95% of capacity at 120%) apply where the deadline leaves room for batching:
  a `wait_one_step` capacity >= 8 streams, or a deadline >= 100 ms.
"""


def _pct_list(xs: list[float]) -> str:
    return ", ".join(f"{x:.2%}" for x in xs)


def markdown_section(sec: dict[str, Any]) -> list[str]:
    t = sec.get("targets", {})
    applies = t.get("apply", True)
    if "capacity_basis" in sec:
        basis = ("frames may wait one running step" if sec["capacity_basis"] == CapacityBasis.WAIT_ONE_STEP.value
                 else "no steady state where a frame can wait a running step: single-step bound")
        cap_line = (f"- capacity {sec['capacity_fps']} frames/s ({sec['capacity_streams']} streams) at "
                    f"B={sec['capacity_batch']}, mean step {sec['capacity_step_ms']} ms ({basis}); "
                    f"single-step bound {sec['single_step_fps']} frames/s at B={sec['single_step_batch']}; "
                    f"device peak ignoring deadlines: {sec['peak_fps']} frames/s")
    else:  # a results file from before the wait-one-step definition
        cap_line = (f"- capacity {sec['capacity_fps']} frames/s ({sec['capacity_streams']} streams) at "
                    f"B={sec['capacity_batch']} (the earlier single-step definition); device peak "
                    f"ignoring deadlines: {sec['peak_fps']} frames/s")
    lines = [
        f"#### deadline {sec['deadline_ms']:g} ms",
        "",
        cap_line,
        f"- EDF goodput >= `serve_batch`'s at every load: **{'yes' if sec['edf_dominates'] else 'no'}**"
        + (f" (every seed alone: {'yes' if sec['edf_dominates_every_seed'] else 'no'})"
           if "edf_dominates_every_seed" in sec else ""),
    ]
    if sec.get("decision_us_p50") is not None:
        lines.append(f"- EDF decision time (worst load): p50 {sec['decision_us_p50']} us, "
                     f"p99 {sec['decision_us_p99']} us")
    na = "does not apply: no wait-one-step capacity of 8 streams"
    if "edf_miss_rate_at_95" in t:
        met = t["edf_miss_at_95_le_1pct"] and t.get("edf_miss_at_95_le_1pct_every_seed", True)
        verdict = ("met" if met else "not met") if applies else na
        worst = (f", worst seed {t['edf_miss_rate_at_95_max_seed']:.2%}"
                 if "edf_miss_rate_at_95_max_seed" in t else "")
        lines.append(f"- target at 95% load, EDF misses <= 1%: **{t['edf_miss_rate_at_95']:.2%}**{worst} "
                     f"({verdict})")
    if "edf_goodput_over_capacity_at_120" in t:
        met = t["edf_goodput_at_120_ge_95pct"] and t.get("edf_goodput_at_120_ge_95pct_every_seed", True)
        verdict = ("met" if met else "not met") if applies else na
        worst = (f", worst seed {t['edf_goodput_over_capacity_at_120_min_seed']:.1%}"
                 if "edf_goodput_over_capacity_at_120_min_seed" in t else "")
        lines.append(f"- target at 120% load, EDF goodput >= 95% of capacity: "
                     f"**{t['edf_goodput_over_capacity_at_120']:.1%}**{worst} ({verdict}); wasted "
                     f"compute {t['edf_wasted_compute_s_at_120']} s; queue when arrivals stop "
                     f"{t['edf_queue_end_at_120']} frames")
    lines += [
        "",
        "| load | scheduler | streams | miss rate | miss rate per seed | goodput fps | p50 ms | p99 ms | wasted compute s | mean batch | queue max / at end | decision us p50 / p99 | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sec["results"]:
        params = (f"bs={r['max_batch_size']}, wait={r['batch_wait_timeout_s'] * 1000:g} ms"
                  if r["scheduler"] == "serve_batch" else "")
        streams = r.get("offered_streams", r["n_streams"])
        seeds = _pct_list([x["miss_rate"] for x in r["per_seed"]]) if "per_seed" in r else ""
        decision = f"{r['decision_us_p50']} / {r['decision_us_p99']}" if "decision_us_p50" in r else ""
        lines.append(
            f"| {r['load']:.0%} | {r['scheduler']} | {streams:g} | {r['miss_rate']:.2%} | {seeds} | "
            f"{r['goodput_fps']:.1f} | {r['p50_ms']} | {r['p99_ms']} | {r['wasted_compute_s']:.3f} | "
            f"{r['mean_batch']} | {r['queue_max']} / {r['queue_end']} | {decision} | {params} |")
    return lines


def markdown_run(data: dict[str, Any]) -> str:
    c = data["config"]
    title = "emulated compute (virtual clock)" if data["compute"] == "emulated" else "real compute"
    label = ("emulated compute calibrated from the profile measured on " + data["device"]
             if data["compute"] == "emulated" else "real compute on " + data["device"])
    lines = [
        f"### {title}",
        "",
        f"Command: `{data.get('command', 'auralink bench batching')}`",
        "",
        f"- {label}; weights: **{data['weights']}**; profile from {data['profile_source']}; run "
        f"on {data['host']} (1-min load average {data.get('host_load_avg_1m')}) at {data['git']}",
        f"- trace: 40 ms chunks, {c['bridges']} bridges with random phases, transit jitter "
        f"0-{c['jitter_ms']} ms, deadline from bridge send, margin {c['margin_ms']} ms, max batch "
        f"{c['max_batch']}, {c['duration_s']} s per run, "
        + (f"seeds {', '.join(str(x) for x in c['seeds'])} (one run each, pooled)" if "seeds" in c
           else f"seed {c['seed']}"),
        "- step-time profile (ms): " + ", ".join(
            f"B={b}: p50 {v['p50']:.2f} / p99 {v['p99']:.2f}" for b, v in data["latency_profile_ms"].items()),
    ]
    if data["compute"] == "real":
        lines.append("- schedulers run one after another on the same machine; on a shared CPU "
                     "their step times move with other processes' load, so rows are not taken "
                     "under identical conditions (the emulated table replays one profile for all)")
    if "deadlines" not in data:
        lines.append(f"- recorded at {data['git']}, before the scheduler decided from the step-time "
                     "distribution; rerun the command to refresh it")
    for sec in sections_of(data):
        lines += [""] + markdown_section(sec)
    if data.get("decision_cost"):
        lines += [""] + markdown_decision_cost(data["decision_cost"])
    return "\n".join(lines)


def markdown_decision_cost(dc: dict[str, Any]) -> list[str]:
    lines = [
        "#### decision cost",
        "",
        f"CPU time of this thread per `EdfScheduler.schedule()` call (and per `add()`): streams "
        f"sending every 40 ms, steps run back to back at the profile's mean step time (each fed "
        f"back, so the model's rebuilds every 8 steps are included), {dc['seconds']:g} s of virtual "
        f"time per row. Where the streams exceed what the profile serves, the queue holds what has "
        f"not expired yet. Plain Python speed of this machine: `sum(range(10**6))` takes "
        f"{dc['cpu_calibration_ms']} ms of CPU.",
        "",
        "| step-time profile | deadline ms | max batch | streams | queue p50 / max | decision us p50 | decision us p99 | us per queued frame p50 | add() us mean | decisions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in dc["rows"]:
        lines.append(f"| {r.get('profile', '')} | {r.get('deadline_ms', '')} | {r.get('max_batch', '')} | "
                     f"{r['streams']} | {r['queue_p50']} / {r['queue_max']} | {r['decision_us_p50']} | "
                     f"{r['decision_us_p99']} | {r['decision_us_per_queued_frame_p50']} | "
                     f"{r['add_us_mean']} | {r['decisions']} |")
    return lines


def markdown(runs: list[dict[str, Any]]) -> str:
    return "\n\n".join([SECTION_INTRO.rstrip()] + [markdown_run(d) for d in runs])


def refresh_docs() -> None:
    """Rebuild the section from the committed JSON of both modes (whichever exist)."""
    runs = [json.loads(p.read_text()) for p in (DEFAULT_JSON, DEFAULT_REAL_JSON) if p.exists()]
    if runs:
        update_docs_section("batching", markdown(runs))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the results (default docs/bench/batching.json, "
                        "batching_real.json for --compute real)")
    p.add_argument("--compute", choices=("emulated", "real"), default="emulated")
    p.add_argument("--profile", type=Path, default=None,
                   help="codec bench JSON with latency_profile_ms (emulated; default: "
                        "docs/bench/codec.json if present, else measure one here)")
    p.add_argument("--loads", default="0.5,0.8,0.95,1.2", help="comma-separated fractions of capacity")
    p.add_argument("--duration-s", type=float, default=None, help="trace length per run (default 20 emulated, 3 real)")
    p.add_argument("--deadline-ms", default=",".join(f"{d:g}" for d in DEFAULT_DEADLINES_MS),
                   help="comma-separated deadlines (ms); one table each")
    p.add_argument("--margin-ms", type=float, default=1.0)
    p.add_argument("--max-batch", type=int, default=None, help="default 128 emulated, 16 real")
    p.add_argument("--bridges", type=int, default=8)
    p.add_argument("--jitter-ms", type=float, default=2.0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds; every (deadline, load) runs once per seed and rows "
                        "pool them (default 0,1,2,3,4 emulated, 0 real)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for real compute (1: several threads thrash on a shared CPU)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="real step time: elapsed (wall) or this thread's CPU time (cpu, for a "
                        "shared machine; needs --threads 1)")
    p.add_argument("--profile-reps", type=int, default=30, help="steps per batch size when measuring")
    p.add_argument("--serve-wait-ms", default="",
                   help="batch_wait_timeout grid in ms (default 0, 10, 25, 50%% of each deadline)")
    p.add_argument("--serve-max-batch", default="", help="max_batch_size grid (default from capacity)")
    p.add_argument("--decision-streams", default=",".join(str(x) for x in DEFAULT_DECISION_STREAMS),
                   help="streams per decision-cost run, at the largest deadline (empty: skip)")
    p.add_argument("--decision-seconds", type=float, default=2.0,
                   help="virtual seconds per decision-cost run")
    p.add_argument("--scale-profile", default=None,
                   help="profile for decision cost at scale (default docs/bench/profile-h100-modelled.json "
                        "if present; empty: skip): 64, 1000 and 10,000 streams, max batch 16384, 40 ms")
    p.add_argument("--no-docs", action="store_true", help="do not refresh docs/benchmarks.md")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in str(s).split(",") if x.strip())


def print_tables(data: dict[str, Any]) -> None:
    for sec in data["deadlines"]:
        t = sec["targets"]
        print(f"\ndeadline {sec['deadline_ms']:g} ms: capacity {sec['capacity_fps']} fps "
              f"({sec['capacity_streams']} streams, B={sec['capacity_batch']}, "
              f"{sec['capacity_basis']}); EDF dominates: {sec['edf_dominates']} (every seed: "
              f"{sec['edf_dominates_every_seed']}); targets apply: {t['apply']}")
        print(f"{'load':>5} {'scheduler':<12} {'streams':>8} {'miss':>8} {'goodput':>8} "
              f"{'p99 ms':>8} {'wasted s':>9} {'batch':>6} {'queue':>7}  decision us p50/p99; miss per seed")
        for r in sec["results"]:
            decision = f"{r['decision_us_p50']}/{r['decision_us_p99']}" if "decision_us_p50" in r else "-"
            seeds = " ".join(f"{x['miss_rate']:.4f}" for x in r.get("per_seed", []))
            print(f"{r['load']:>5.0%} {r['scheduler']:<12} {r['offered_streams']:>8.2f} "
                  f"{r['miss_rate']:>8.4f} {r['goodput_fps']:>8.1f} {r['p99_ms']!s:>8} "
                  f"{r['wasted_compute_s']:>9.3f} {r['mean_batch']:>6} "
                  f"{str(r['queue_max']) + '/' + str(r['queue_end']):>7}  {decision}; {seeds}")


def print_decision_cost(data: dict[str, Any]) -> None:
    dc = data.get("decision_cost")
    if not dc:
        return
    print(f"\ndecision cost (thread CPU time; sum(range(10**6)) takes {dc['cpu_calibration_ms']} ms here)")
    print(f"{'profile':<28} {'dl ms':>6} {'max b':>6} {'streams':>8} {'queue p50':>10} {'p50 us':>9} "
          f"{'p99 us':>9} {'us/frame':>9} {'add us':>7}")
    for r in dc["rows"]:
        print(f"{r['profile'][:28]:<28} {r['deadline_ms']:>6g} {r['max_batch']:>6} {r['streams']:>8} "
              f"{r['queue_p50']:>10} {r['decision_us_p50']:>9} {r['decision_us_p99']:>9} "
              f"{r['decision_us_per_queued_frame_p50']:>9} {r['add_us_mean']:>7}")


def run(args: argparse.Namespace) -> int:
    real_mode = args.compute == "real"
    seeds = tuple(int(x) for x in _floats(args.seeds or ("0" if real_mode else "0,1,2,3,4")))
    if not seeds:
        raise SystemExit("--seeds needs at least one seed")
    max_batch = args.max_batch or (16 if real_mode else 128)
    cfg = BenchConfig(
        compute=args.compute, loads=_floats(args.loads),
        duration_s=args.duration_s or (3.0 if real_mode else 20.0),
        deadlines_ms=_floats(args.deadline_ms), margin_ms=args.margin_ms, max_batch=max_batch,
        bridges=args.bridges, jitter_ms=args.jitter_ms, seeds=seeds,
        serve_max_batch_sizes=tuple(int(x) for x in _floats(args.serve_max_batch)),
        serve_wait_ms=_floats(args.serve_wait_ms), torch_threads=args.threads, clock=args.clock,
        decision_streams=tuple(int(x) for x in _floats(args.decision_streams)),
        decision_seconds=args.decision_seconds,
        scale_profile=(args.scale_profile if args.scale_profile is not None
                       else (_repo_relative(DEFAULT_SCALE_PROFILE) if DEFAULT_SCALE_PROFILE.exists() else None)) or None,
    )
    if not cfg.deadlines_ms:
        raise SystemExit("--deadline-ms needs at least one deadline")
    real: RealCompute | None = None
    profile: Profile | None = None
    profile_path = args.profile or (DEFAULT_PROFILE if DEFAULT_PROFILE.exists() and not real_mode else None)
    if profile_path is not None and not real_mode:
        profile = Profile.load(profile_path)
    if profile is None or real_mode:
        codec, weights = build_codec(args.threads, max_batch)
        if args.clock == "cpu" and args.threads != 1:
            raise SystemExit("--clock cpu measures one thread: use --threads 1")
        real = RealCompute(codec, max_batch, seeds[0], args.clock)
        sizes = [b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if b <= max_batch]
        device = f"{machine_description()}, torch threads {args.threads}, {args.clock} clock"
        profile = measure_profile(real, sizes, args.profile_reps, device, weights)
        if not real_mode:
            real = None  # emulated: replay the profile just measured
    data = run_bench(cfg, profile, real)
    data["command"] = "auralink " + " ".join(a for a in sys.argv[1:] if a != "--no-docs")
    default_path = DEFAULT_REAL_JSON if real_mode else DEFAULT_JSON
    out = args.json or default_path
    write_json(out, data)
    if not args.no_docs:
        if Path(out).resolve() == default_path.resolve():
            refresh_docs()
        else:
            print("docs/benchmarks.md not refreshed: it is built from the default JSON paths")
    print_tables(data)
    print_decision_cost(data)
    print(f"\nEDF dominates @serve.batch at every deadline: {data['edf_dominates_everywhere']}; wrote {out}")
    return 0
