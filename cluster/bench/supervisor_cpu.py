"""`auralink bench supervisor-cpu`: the fallback supervisor's own CPU per report, in process.

What the 10,000-stream load test counts as the supervisor (`FallbackSupervisorCore.report`:
judging a bridge's columnar report, the transitions, the periodic health snapshot), without
Ray: ``--bridges`` bridges of ``--streams`` streams each report once per simulated second for
``--seconds`` seconds, half a second apart, through one `FallbackSupervisorCore` with an
in-memory KV. The reports are built up front from a seeded generator and look like a load
test's: 25 AI frames per stream per second, ~0.1% of frames missing their deadline (2.5% of
streams miss one in a second), a few streams failing on their own, scattered errors and
overloads, 5% of streams silent (DTX: not reported), a two-second stall on one replica,
a few streams joining and leaving every 5 s, each new stream's user in its first report,
streams spread over ``--replicas`` replicas (a few named without one). Thread CPU
(`time.thread_time`) is summed over the calls, as the actor's CpuMeter does; each
configuration runs ``--rounds`` times and the median is reported (a shared machine's
noise). ``--snapshot-interval-s`` is the actor's default (5 s of report time); the
no-snapshot figure isolates judging.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json
from deployments.config import SupervisorSettings
from deployments.supervisor import FallbackSupervisorCore
from deployments.supervisor_policy import OUTCOME_COLUMNS, StreamReports

DEFAULT_JSON = Path(__file__).resolve().parents[2] / "docs" / "bench" / "supervisor_cpu.json"
COL = {c: i for i, c in enumerate(OUTCOME_COLUMNS)}


def make_reports(bridges: int, streams: int, seconds: int, replicas: int,
                 seed: int = 1) -> list[tuple[float, StreamReports]]:
    """(report time, report) in the order the supervisor gets them."""
    rng = np.random.default_rng(seed)
    ids = [[f"b{b}-s{i}" for i in range(streams)] for b in range(bridges)]
    nxt = [streams] * bridges
    named: set[str] = set()
    out: list[tuple[float, StreamReports]] = []
    for t in range(seconds):
        for b in range(bridges):
            now = 1000.0 + t + b / bridges
            if t and t % 5 == 0:  # churn
                for _ in range(20):
                    ids[b].pop(int(rng.integers(0, len(ids[b]))))
                    ids[b].append(f"b{b}-s{nxt[b]}")
                    nxt[b] += 1
            n = len(ids[b])
            num = np.array([int(s.split("-s")[1]) for s in ids[b]])
            o = np.zeros((n, len(OUTCOME_COLUMNS)), np.int64)
            o[:, 0] = 25
            miss = rng.random(n) < 0.025
            o[miss, COL["deadline"]], o[miss, 0] = 1, 24
            failing = num % 997 == 3
            o[failing, COL["deadline"]] = rng.integers(0, 6, int(failing.sum()))
            o[num % 1499 == 7, COL["error"]] = 1
            o[rng.random(n) < 0.01, COL["overload"]] += 1
            if 20 <= t < 22:  # one replica stalls
                stalled = num % replicas == 3
                o[stalled, COL["deadline"]], o[stalled, 0] = 10, 15
            keep = rng.random(n) >= 0.05
            sids = [s for s, k in zip(ids[b], keep, strict=True) if k]
            users = {s: f"u{s.split('-s')[1]}" for s in sids if s not in named}
            named.update(users)
            reps = [f"r{k % replicas}" if k % 211 else None for k in num[keep].tolist()]
            out.append((now, StreamReports(sids, o[keep], users, reps)))
    return out


def measure(reports: list[tuple[float, StreamReports]], snapshot_interval_s: float) -> dict[str, Any]:
    store: dict[bytes, bytes] = {}
    core = FallbackSupervisorCore(SupervisorSettings(snapshot_interval_s=snapshot_interval_s), None,
                                  store.__setitem__, store.get)
    core.opt_out(user_id="u17")
    per: list[float] = []
    off = 0
    for now, batch in reports:
        t0 = time.thread_time()
        off += len(core.report(batch, now))
        per.append(time.thread_time() - t0)
    rows = sum(len(b) for _, b in reports)
    return {"cpu_s": round(sum(per), 4), "ms_per_report": round(1e3 * sum(per) / len(per), 3),
            "us_per_stream_report": round(1e6 * sum(per) / rows, 3),
            "max_ms": round(1e3 * max(per), 2),
            "off_verdicts": off, "counters": dict(core.policy.counters)}


def markdown(data: dict[str, Any], cmd: str) -> str:
    lines = [
        "## supervisor-cpu", "", f"`{cmd}`", "",
        f"{data['bridges']} bridges x {data['streams']} streams, one report each per simulated "
        f"second for {data['seconds']} s, through `FallbackSupervisorCore` in process (no Ray); "
        f"thread CPU, median of {data['rounds']} rounds; {data['machine']}.", "",
        "| snapshots | CPU s | ms / report | us / stream / report | max ms |",
        "|---|---|---|---|---|",
    ]
    for label, r in (("every 5 s (the actor's default)", data["with_snapshots"]),
                     ("none (judging only)", data["no_snapshots"])):
        lines.append(f"| {label} | {r['cpu_s']} | {r['ms_per_report']} | {r['us_per_stream_report']} "
                     f"| {r['max_ms']} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--bridges", type=int, default=2)
    p.add_argument("--streams", type=int, default=5000, help="streams per bridge")
    p.add_argument("--seconds", type=int, default=60, help="simulated seconds (one report per bridge each)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--snapshot-interval-s", type=float, default=SupervisorSettings().snapshot_interval_s)
    p.add_argument("--rounds", type=int, default=3, help="runs per configuration (median reported)")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["cpu_s"])[len(runs) // 2]


def run(args: argparse.Namespace) -> int:
    reports = make_reports(args.bridges, args.streams, args.seconds, args.replicas)
    with_snap = _median([measure(reports, args.snapshot_interval_s) for _ in range(args.rounds)])
    no_snap = _median([measure(reports, float("inf")) for _ in range(args.rounds)])
    data = {
        "machine": machine_description(),
        "git": git_revision(),
        "bridges": args.bridges, "streams": args.streams, "seconds": args.seconds,
        "replicas": args.replicas, "rounds": args.rounds,
        "snapshot_interval_s": args.snapshot_interval_s,
        "with_snapshots": with_snap,
        "no_snapshots": no_snap,
    }
    write_json(args.json, data)
    cmd = "auralink bench supervisor-cpu --json docs/bench/supervisor_cpu.json"
    if not args.no_docs:
        update_docs_section("supervisor-cpu", markdown(data, cmd))
    print(f"supervisor: {with_snap['ms_per_report']} ms/report with snapshots "
          f"({with_snap['us_per_stream_report']} us/stream), {no_snap['ms_per_report']} ms without; "
          f"wrote {args.json}")
    return 0
