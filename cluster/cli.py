"""`auralink` command line: one table of subcommands, each in its own module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its command runs, so ``auralink --help`` stays fast and a broken optional part
(say, the browser tooling) cannot stop the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command, module, help). `bench` has its own sub-table below.
COMMANDS: list[tuple[str, str, str]] = [
    ("simulate", "cluster.simulate", "run the N-stream load simulator and write a report"),
    ("up", "cluster.up", "start a local Ray cluster with the AuraLink Serve app"),
    ("token", "sfu_bridge.tokens", "issue a signed WHIP/WHEP/operator bearer token"),
    ("certs", "cluster.certs", "create a CA and node certificates for Ray mTLS"),
    ("bridge", "sfu_bridge.server", "run the WHIP/WHEP SFU bridge"),
    ("bridges", "cluster.bridges", "bridge workers on the Ray cluster: up, status, scale, drain, down"),
    ("status", "cluster.status", "Serve's status and the bridge workers with their streams"),
]

BENCHES: list[tuple[str, str, str]] = [
    ("codec", "cluster.bench.codec", "streaming EnCodec throughput and latency vs offline"),
    ("model-profile", "cluster.bench.model_profile",
     "a modelled (not measured) latency profile from FLOPs, a device's peak and an efficiency"),
    ("batching", "cluster.bench.batching", "EDF scheduler vs @serve.batch vs no batching"),
    ("limiter", "cluster.bench.limiter", "Redis GCRA hint limiter: batched vs per-hint"),
    ("bridge", "cluster.bench.bridge", "streams per bridge worker and wire bitrate"),
    ("fanout", "cluster.bench.fanout", "one publisher to 10,000 subscribers over cascading bridge workers"),
    ("adaptive", "cluster.bench.adaptive",
     "adaptive layers, DTX and a constrained link with real WebRTC peers"),
    ("autoscaling", "cluster.bench.autoscaling", "forecast policy vs Serve's default on a 10k-stream trace"),
    ("supervisor-cpu", "cluster.bench.supervisor_cpu", "the fallback supervisor's CPU per report, in process"),
    ("control-plane", "cluster.bench.control_plane",
     "the bridge core's and the replica's bookkeeping CPU per stream-tick, in process"),
]


class _Lazy:
    """Defers importing a command module until its subcommand is chosen."""

    def __init__(self, module: str) -> None:
        self.module = module

    def load(self):
        return importlib.import_module(self.module)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auralink", description="AuraLink AIC")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == chosen:
            _Lazy(module).load().add_arguments(p)
    bench = sub.add_parser("bench", help="benchmarks that write JSON and docs/benchmarks.md")
    bsub = bench.add_subparsers(dest="bench", required=True)
    rest = [a for a in argv if not a.startswith("-")]
    bench_chosen = rest[1] if chosen == "bench" and len(rest) > 1 else None
    for name, module, help_ in BENCHES:
        p = bsub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == bench_chosen:
            _Lazy(module).load().add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
