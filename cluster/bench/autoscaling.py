"""`auralink bench autoscaling`: the forecast policy vs Serve's default on a 10k-stream trace.

    auralink bench autoscaling --json docs/bench/autoscaling.json --capacity 256 \\
        --capacity-source "<where the number comes from>"

The evaluation itself (traces, the world model, both policies) is `autoscaling/evaluate.py`;
this is its command: arguments, the JSON report and the "autoscaling" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from autoscaling.evaluate import (
    CODEC_BENCH_JSON,
    REPO,
    EventTrace,
    evaluate,
    markdown,
    resolve_capacity,
)
from cluster.bench.report import update_docs_section, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default="runs/bench-autoscaling.json", help="where to write the JSON report")
    p.add_argument("--capacity", type=float, default=None, help="streams per replica within the deadline")
    p.add_argument("--capacity-source", default=None, help="where --capacity comes from (printed in the report)")
    p.add_argument("--profile-json", default=None,
                   help=f"benchmark JSON with latency_profile_ms (default: {CODEC_BENCH_JSON.relative_to(REPO)} if present)")
    p.add_argument("--deadline-ms", type=float, default=20.0)
    p.add_argument("--margin-ms", type=float, default=2.0)
    p.add_argument("--start-latency-s", type=float, default=60.0)
    p.add_argument("--peak-streams", type=int, default=10_000)
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    capacity, source = resolve_capacity(args)
    trace = EventTrace(peak_streams=args.peak_streams, burst_streams=args.peak_streams // 5)
    report = evaluate(capacity, source, args.start_latency_s, trace)
    write_json(args.json, report)
    command = command or "auralink bench autoscaling " + shlex.join(sys.argv[3:])
    for r in report["results"]:
        print(f"{r['policy']}: {r['replica_hours']:.2f} replica-h, "
              f"{r['frames_fallback_capacity']:,} frames fell back ({r['fallback_pct']:.3f}%), "
              f"peak {r['peak_replicas']}, burst recovery {r['burst_recovery_s']}")
    print(f"oracle: {report['oracle']['replica_hours']:.2f} replica-h")
    if not args.no_docs:
        update_docs_section("autoscaling", markdown(report, command))
    print(json.dumps({"json": args.json, "label": report["label"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="auralink bench autoscaling",
                                description="forecast policy vs Serve's default on a 10k-stream trace")
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    return run(p.parse_args(argv), "auralink bench autoscaling " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
