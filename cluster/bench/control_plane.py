"""`auralink bench control-plane`: the bridge core's and the replica's bookkeeping CPU, in process.

The 10,000-stream load test (`auralink simulate`) reports `control_plane_us_per_stream_tick`
from Ray processes in about six minutes. This measures its two largest parts in about a
minute and a half, without Ray, so a change to either can be judged before the long run:

- **bridge core**: one simulator load generator (`cluster/simulator/generator.py`, the same
  `LoadGenerator` the load test runs, same population, churn and hint mix: 0.5 hints/s per
  honest stream, flooders at 250/s, forgers and replayers) driving one real `BridgeCore`
  with ``--streams`` streams; its codec is an in-process `CodecReplicaCore` (emulated
  compute, the modelled H100 profile), its limiter the real Redis GCRA (embedded Redis), its
  supervisor an in-process `SupervisorPolicy`. Figure: `BridgeCore.cpu` (thread CPU of its
  metered sections, the limiter call included) per stream-tick.
- **replica bookkeeping**: one `CodecReplicaCore` as the load test's replicas see their
  traffic: two bridges' requests of ``--frames`` frames each per tick, half a tick apart (two
  steps a tick), the simulator's replica settings. Figure: `CodecReplicaCore.cpu` per frame.

Both run paced at the load test's time dilation (x5). In-process figures are lower than the
same code's inside Ray processes (docs/benchmarks.md, simulate-10000, says by how much): a
bench to compare changes by, not a substitute for the load test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JSON = REPO / "docs" / "bench" / "control_plane.json"
PROFILE = REPO / "docs" / "bench" / "profile-h100-modelled.json"
DILATION = 5.0


def _profile() -> dict[int, float]:
    data = json.loads(PROFILE.read_text())
    ms = data.get("latency_profile_ms") or data["latency_profile"]
    return {int(k): float(v) for k, v in ms.items()}


def _replica_settings(streams: int) -> Any:
    """The settings `auralink simulate` gives a replica of `streams` streams (its margin, 2 ms)."""
    from cluster.simulator.environment import replica_config
    from deployments.config import ReplicaSettings

    cfg = replica_config("emulated", _profile(), DILATION, ReplicaSettings().deadline_ms, 2.0, streams)
    return ReplicaSettings.from_dict({**cfg, "max_bandwidth_kbps": 24.0})


async def bridge_core(streams: int, seconds: float) -> dict[str, Any]:
    from cluster.simulator import generator as gen
    from deployments.replica import CodecReplicaCore
    from deployments.supervisor_policy import SupervisorPolicy
    from sfu_bridge.core import SupervisorLink

    secret = os.urandom(32)  # signs and verifies this bench's hints only

    class Generator(gen.LoadGenerator):
        async def prepare(self) -> dict[str, Any]:
            client = CodecReplicaCore(_replica_settings(streams), replica_id="bench")
            await client.ensure_built()
            policy = SupervisorPolicy()

            async def report(reports: Any) -> dict[str, str]:
                return {k: v.value for k, v in policy.report_columns(reports, self.t_sim).items()}

            async def forget(ids: list[str]) -> None:
                for sid in ids:
                    policy.forget(sid)

            await self.start(secret, client, SupervisorLink(report, forget, 1.0))
            return {}

        def _publish(self, t_sim: float) -> None:  # no dashboard here
            return None

    flooders = max(1, round(streams * 50 / 10_000))
    abusers = max(1, round(streams * 20 / 10_000))
    spec = gen.GeneratorSpec(
        index=0, bridge_id="bench", streams=streams, flooders=flooders, forgers=abusers,
        replayers=abusers, user_offset=0, duration_s=seconds, dilation=DILATION, compute="emulated",
        deadline_ms=20.0, bandwidth_kbps=6.0, seed=0, trace="steady", ramp_floor_frac=0.1,
        mean_session_s=120.0, normal_hint_rate=0.5, flood_rate=250.0, abuse_rate=20.0,
        redis_url=os.environ.get("REDIS_URL"), ai_frame_bytes=30, native_frame_bytes=100.0,
        publish_stats=False)
    g = Generator(spec)
    await g.prepare()
    res = await g.run(time.time() + 0.2)
    await g.client.stop()
    st = max(1, g.stream_ticks)
    cpu = res["cpu"]
    return {
        "streams": streams, "simulated_s": seconds, "stream_ticks": g.stream_ticks,
        "flooders": flooders, "forgers": abusers, "replayers": abusers,
        "hints": dict(g.core.hint_counters),
        "late_ticks": g.late_ticks,
        "bridge_core_us_per_stream_tick": round(1e6 * float(cpu["bridge_core_s"]) / st, 3),
    }


async def replica(frames: int, ticks: int) -> dict[str, Any]:
    from deployments.contract import FrameBatch, Op
    from deployments.replica import CodecReplicaCore

    core = CodecReplicaCore(_replica_settings(2 * frames), replica_id="bench")
    await core.ensure_built()
    loop = asyncio.get_running_loop()
    outcomes: dict[str, int] = {}

    async def bridge(r: int, start: float, n_ticks: int, seq0: int) -> None:
        ids = [f"b{r}-s{i}" for i in range(frames)]
        refs = (np.arange(frames, dtype=np.int64) << 32) | 1  # as a bridge core names its rows
        pcm = np.zeros((frames, 320), np.int16)
        for t in range(n_ticks):
            await asyncio.sleep(max(0.0, start + (t + 0.5 * r) * 0.040 * DILATION - loop.time()))
            res = await core.process(FrameBatch(
                Op.ENCODE, f"b{r}", list(ids), np.zeros(frames, np.int64),
                np.full(frames, seq0 + t, np.int64), np.full(frames, 20.0 * DILATION), pcm, 6.0,
                np.full(frames, 8, np.int64), stream_refs=refs))
            for k, v in res.counts().items():
                outcomes[k] = outcomes.get(k, 0) + v

    warm = 10
    await asyncio.gather(*(bridge(r, loop.time() + 0.05, warm, 0) for r in range(2)))
    outcomes.clear()
    c0 = core.cpu.seconds
    await asyncio.gather(*(bridge(r, loop.time() + 0.05, ticks, warm) for r in range(2)))
    cpu = core.cpu.seconds - c0
    steps = int(core.scheduler.counters.get("steps", 0))  # warm-up included; stop() resets them
    await core.stop()
    n = 2 * frames * ticks
    return {"frames_per_request": frames, "ticks": ticks, "frames": n, "outcomes": outcomes,
            "steps_incl_warmup": steps,
            "replica_bookkeeping_us_per_frame": round(1e6 * cpu / n, 3)}


def markdown(data: dict[str, Any], cmd: str) -> str:
    b, r = data["bridge"], data["replica"]
    return "\n".join([
        "## control-plane", "", f"`{cmd}`", "",
        f"In process, no Ray, x{DILATION:g} pacing, emulated compute (modelled H100 profile); "
        f"{data['machine']}, revision {data['git']}. Thread CPU of the metered sections.", "",
        "| part | setting | CPU |", "|---|---|---|",
        f"| bridge core | {b['streams']} streams, {b['simulated_s']:g} simulated s, hints "
        f"{sum(b['hints'].values()):,} ({b['flooders']} flooders, {b['forgers']} forgers, "
        f"{b['replayers']} replayers) | **{b['bridge_core_us_per_stream_tick']} us per stream-tick** |",
        f"| replica bookkeeping | 2 x {r['frames_per_request']} frames per tick, half a tick apart, "
        f"{r['ticks']} ticks (+10 warm-up; {r['steps_incl_warmup']} steps in all) | **{r['replica_bookkeeping_us_per_frame']} us per frame** |",
        "", "The same parts inside the load test's Ray processes cost more: see simulate-10000.",
    ]) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--streams", type=int, default=5000, help="streams of the bridge core (one load-test bridge's share)")
    p.add_argument("--seconds", type=float, default=16.0, help="simulated seconds of the bridge run")
    p.add_argument("--frames", type=int, default=2500, help="frames per bridge request at the replica")
    p.add_argument("--ticks", type=int, default=100, help="ticks of the replica run")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")


def run(args: argparse.Namespace) -> int:
    print(f"control-plane: bridge core, {args.streams} streams for {args.seconds:g} simulated s "
          f"(x{DILATION:g}: ~{args.seconds * DILATION:.0f} s) ...", flush=True)
    b = asyncio.run(bridge_core(args.streams, args.seconds))
    print(f"  bridge core: {b['bridge_core_us_per_stream_tick']} us per stream-tick", flush=True)
    print(f"control-plane: replica, 2 x {args.frames} frames per tick for {args.ticks} ticks ...", flush=True)
    r = asyncio.run(replica(args.frames, args.ticks))
    print(f"  replica bookkeeping: {r['replica_bookkeeping_us_per_frame']} us per frame", flush=True)
    data = {"machine": machine_description(), "git": git_revision(), "dilation": DILATION,
            "compute": "emulated", "profile": "modelled (not measured)", "bridge": b, "replica": r}
    write_json(args.json, data)
    cmd = "auralink bench control-plane --json docs/bench/control_plane.json"
    if not args.no_docs:
        update_docs_section("control-plane", markdown(data, cmd))
    print(f"wrote {args.json}")
    return 0
