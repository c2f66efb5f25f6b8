"""`auralink simulate`: N publishers through the real bridge core, limiter, replicas and
supervisor, without WebRTC sockets; writes a JSON report and PNG plots. Load generators are
Ray actors, each driving its share of the streams through its own `BridgeCore`.

    auralink simulate                                   # 200 streams, 20 s, emulated, local
    auralink simulate --streams 10000 --duration 60 --compute emulated
    auralink simulate --streams 2000 --fault kill-replica@20 --fault stop-redis@40
    auralink simulate --compute real --streams 4 --duration 10
    auralink simulate --address ray://head:10001        # an existing cluster (serve deploy)

See cluster/simulator/driver.py for what is real, what is simulated, time dilation and the
compact frames of emulated compute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

from cluster.bench.model_profile import PROFILE_MEASURED, PROFILE_MODELLED, parameters_text
from cluster.simulator.driver import SimConfig, Simulation, choose_dilation
from cluster.simulator.faults import FaultPlan

logger = logging.getLogger(__name__)


# The design's per-chunk inference budget (bridge send -> codes back), met by GPU replicas.
GPU_DEADLINE_MS = 20.0
# Local CPU replicas: one 40 ms chunk costs ~25 ms end to end on 2 cores (`auralink simulate
# --compute real --deadline-ms 60`: p50 25-30 ms), so 20 ms would answer every frame `deadline`.
CPU_REAL_DEADLINE_MS = 60.0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int, default=4,
                   help="expected live streams (default 4: what one 2-core CPU machine sustains with real compute)")
    p.add_argument("--duration", type=float, default=20.0, help="simulated seconds (default 20)")
    p.add_argument("--compute", choices=("emulated", "real"), default="real",
                   help="replicas run the model (real) or spend its measured latency profile (emulated)")
    p.add_argument("--address", default=None, help="existing Ray cluster (else local Ray + embedded Redis)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default runs/sim-<timestamp>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault", action="append", default=[], metavar="KIND@SECONDS",
                   help="kill-replica@T, stop-redis@T, slow-replica@T (late answers) or stall-replica@T (no answers for 5 s) (repeatable)")
    p.add_argument("--time-dilation", type=float, default=None,
                   help="wall seconds per simulated second (default: from the stream count)")
    p.add_argument("--replicas", type=int, default=None, help="codec replicas (default: from the profile)")
    p.add_argument("--bridges", type=int, default=None,
                   help="load generators, each a Ray actor with its own bridge core "
                        "(default: one per 5000 streams)")
    p.add_argument("--deadline-ms", type=float, default=None,
                   help=f"inference deadline per chunk (default {GPU_DEADLINE_MS:g} ms; {CPU_REAL_DEADLINE_MS:g} ms "
                        "for real compute without a GPU, where one 40 ms chunk takes ~25 ms end to end)")
    p.add_argument("--trace", choices=("steady", "ramp"), default="steady",
                   help="steady: Poisson join/leave around --streams; ramp: an event - 10%% at the start, "
                        "arrivals to half-time, then 20%% join within 2 s, peak --streams")
    p.add_argument("--autoscale", choices=("off", "forecast", "queue-length"), default="off",
                   help="let Serve scale the replicas: this project's StreamForecastPolicy or Serve's "
                        "default queue-length policy (default off: a fixed replica count)")
    p.add_argument("--max-replicas", type=int, default=6, help="autoscaled runs: most replicas (default 6)")
    p.add_argument("--flooders", type=int, default=None)
    p.add_argument("--forgers", type=int, default=None)
    p.add_argument("--replayers", type=int, default=None)
    p.add_argument("--profile", type=Path, default=None,
                   help="latency profile JSON: measured by `auralink bench codec` (default "
                        "docs/bench/codec.json) or modelled by `auralink bench model-profile` "
                        "(e.g. docs/bench/profile-h100-modelled.json; the report says which)")
    p.add_argument("--weights-dir", default=None, help="EnCodec checkpoint folder (else random weights)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--docs", action="store_true",
                   help="also write docs/bench/simulate-<streams>.json and its docs/benchmarks.md section")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    out = args.out or Path("runs") / f"sim-{time.strftime('%Y%m%d-%H%M%S')}"
    FaultPlan.parse(args.fault, args.duration)  # fail on a bad --fault before starting Ray
    if args.autoscale != "off" and args.address:
        raise SystemExit("--autoscale scales the app this command starts; an existing cluster "
                         "scales as it was deployed (serve_config.yaml's autoscaling_config)")
    if args.autoscale != "off" and args.replicas is not None:
        raise SystemExit("--replicas fixes the replica count; with --autoscale use --max-replicas")
    profile = device = weights = None
    kind, parameters = PROFILE_MEASURED, None
    if args.profile is not None:
        from cluster.simulator.environment import load_profile_file

        try:
            loaded = load_profile_file(args.profile)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        if loaded is None:
            raise SystemExit(f"{args.profile}: no latency_profile_ms in it")
        profile, device, weights = loaded.ms, loaded.device, loaded.weights
        kind, parameters = loaded.kind, loaded.parameters
        print(profile_banner(kind, parameters, device))
    deadline_ms = args.deadline_ms
    if deadline_ms is None:
        deadline_ms = GPU_DEADLINE_MS
        if args.compute == "real" and args.address is None and not _cuda_available():
            deadline_ms = CPU_REAL_DEADLINE_MS
            print(f"deadline {deadline_ms:g} ms: real compute on this machine's CPU "
                  f"(the production budget, {GPU_DEADLINE_MS:g} ms, is for GPU replicas)")
    return SimConfig(
        streams=args.streams, duration_s=args.duration, compute=args.compute, address=args.address,
        out=out, seed=args.seed, faults=list(args.fault), time_dilation=args.time_dilation,
        deadline_ms=deadline_ms, replicas=args.replicas, bridges=args.bridges,
        flooders=args.flooders, forgers=args.forgers, replayers=args.replayers,
        latency_profile=profile, profile_device=device, profile_weights=weights or "unknown",
        profile_kind=kind, profile_parameters=parameters,
        weights_dir=args.weights_dir,
        progress=not args.no_progress, trace=args.trace, autoscale=args.autoscale,
        max_replicas=args.max_replicas,
    )


def profile_banner(kind: str, parameters: dict | None, device: str) -> str:
    """What the run's latency profile is, and for a modelled one every input of it."""
    lines = [f"profile: {kind} ({device})"]
    if parameters:
        lines += parameters_text(parameters)
    return "\n".join(lines)


async def simulate(cfg: SimConfig) -> dict:
    """Runs one simulation and writes report.json + plots under `cfg.out`; returns the report."""
    from cluster.simulator.environment import Environment
    from cluster.simulator.plots import write_plots

    dilation = cfg.time_dilation or choose_dilation(cfg.streams, cfg.compute, cfg.address)
    if cfg.address and dilation != 1.0:
        logger.warning("--time-dilation with --address: the cluster's replicas keep real-time deadlines and costs")
    cfg.time_dilation = dilation
    env = await Environment.start(cfg, dilation)
    try:
        if env.dashboard_url:
            logger.info("operator dashboard: %s", env.dashboard_url)
        sim = Simulation(cfg, env)
        await sim.run()
        report = sim.report()
        report["dashboard_url"] = env.dashboard_url
    finally:
        await env.close()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    label = f"{cfg.streams} streams, {report['compute_label']}, weights {report['weights']}, x{dilation:g} dilation"
    plots = write_plots(sim.acc, out, label, [(str(f.kind.value), at) for f, at, _ in sim.faults.fired])
    report["plots"] = plots
    report["report_path"] = str(out / "report.json")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def docs_name(r: dict) -> str:
    """The run's docs/benchmarks.md section (and docs/bench/<name>.json)."""
    name = f"simulate-{r['streams']}"
    if r.get("trace", "steady") != "steady":
        name += f"-{r['trace']}"
    if r.get("autoscaling"):
        name += f"-autoscale-{r['autoscaling']['policy']}"
    return name + ("-faults" if r.get("faults") else "")


def docs_markdown(r: dict, command: str) -> str:
    fl = r.get("flooder_allowed_hints_per_s", {})
    fl_cell = f"{fl.get('min_per_s', '-')}-{fl.get('max_per_s', '-')}"
    verdict = (r.get("flooder_limit") or {}).get("verdict")
    if verdict and verdict != "held" and fl.get("count"):
        fl_cell += f", {verdict}"
    cp = r["control_plane_cpu"]
    rec = ", ".join(_recovery_text(f) for f in r["faults"]) or "no fault injected"
    auto = r.get("autoscaling")
    title = f"### Simulator: {r['streams']} streams, {r['duration_s']:g} s"
    if r.get("trace", "steady") != "steady":
        title += f", {r['trace']} trace"
    if auto:
        title += f", autoscaled by {auto['policy']}"
    if r.get("faults"):
        title += ", faults " + ", ".join(f["fault"] for f in r["faults"])
    per_10k = (f" ({cp['cores_per_10k_streams']} cores / 10k streams)" if r["streams"] >= 1000
               else " (at this size fixed per-tick costs dominate; see a 10k-stream run for the per-stream cost)")
    lines = [
        title,
        "",
        f"`{command}` - {r['compute_label']}; profile: {r.get('profile', PROFILE_MEASURED)}; "
        f"weights: {r['weights']}; time dilation x{r['time_dilation']:g} "
        f"(achieved x{r['achieved_dilation']:g}, {r['late_ticks']} late ticks); machine: {_machine()}.",
        "",
        "| frames | AI | fallback | unaccounted | fallback by reason | p50 / p99 ms | hints sent / limited / forged rejected / replays rejected | flooders allowed/s | wire kbps AI / Opus | control plane CPU | fault recovery |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['frames_total']:,} | {r['frames_ai']:,} | {r['frames_fallback']:,} ({100 * r['fallback_rate']:.2f}%) "
        f"| {r['frames_unaccounted']} | {r['fallback_by_reason']} | {r['p50_ms']} / {r['p99_ms']} "
        f"| {r['hints_sent']:,} / {r['hints_limited']:,} / {r['hints_rejected_forged']:,} / {r['hints_rejected_replay']:,} "
        f"| {fl_cell} | {r['wire_kbps_ai']} / {r['wire_kbps_native']} "
        f"| {cp['cpu_us_per_stream_tick']} us per stream-tick{per_10k} | {rec} |",
    ]
    if r.get("profile") == PROFILE_MODELLED and r.get("profile_parameters"):
        p = r["profile_parameters"]
        lines += ["", f"Latency profile **{PROFILE_MODELLED}**: `{p['formula']}` with "
                      f"{p['device_name']} at {p['peak_tflops']:g} TFLOPS ({p['precision']}), "
                      f"efficiency {p['efficiency']:g}, overhead {p['overhead_ms']:g} ms, "
                      f"{p['gflop_per_chunk']:.4f} GFLOP per frame."]
    lim = limiter_text(r.get("limiter_health"))
    if lim:
        lines += ["", lim[0].upper() + lim[1:] + "."]
    plan = r.get("capacity_plan")
    if plan:
        lines += ["", f"Capacity plan from the latency profile: {plan['verdict']}."]
    if auto:
        kw = (auto["serve_autoscaling_config"].get("policy") or {}).get("policy_kwargs")
        lines += [
            "",
            f"Autoscaling ({auto['policy']}, trace {r['trace']}): {auto['replica_seconds']} replica-seconds, "
            f"replicas {auto['replicas_start']} -> max {auto['replicas_max']} (end {auto['replicas_end']}), "
            f"{auto['frames_fallback_capacity']:,} frames fell back for lack of capacity "
            f"({100 * auto['fallback_capacity_rate']:.2f}%, reasons {'/'.join(auto['capacity_reasons'])})"
            + (f"; policy_kwargs (wall seconds, x{r['time_dilation']:g}): {kw}" if kw else "") + ".",
        ]
    return "\n".join(lines)


def limiter_text(h: dict | None) -> str | None:
    """One line about a limiter that ran without Redis (None if it never did)."""
    if not h or (not h.get("calls_without_redis") and not h.get("unavailable_s")):
        return None
    if h.get("policy") == "fail-closed":
        cost = f"{h.get('hints_fail_closed', 0):,} hints dropped unchecked"
    else:
        cost = f"{h.get('hints_fail_open', 0):,} hints let through unchecked"
    now = "" if h.get("available") else ", still down at the end"
    return (f"hint limiter: Redis unavailable {h.get('unavailable_s', 0.0):.1f} s{now} "
            f"({h.get('policy')}: {cost}; {h.get('calls_without_redis', 0):,} limiter calls decided "
            f"without Redis, {h.get('errors', 0):,} Redis errors)")


def _recovery_text(f: dict) -> str:
    if f.get("recovered_after_s") is not None:
        return f"{f['fault']}: back under {100 * f['recovery_threshold']:.1f}% fallback after {f['recovered_after_s']} s"
    return f"{f['fault']}: {f.get('note', 'not back to the pre-fault rate by the end of the run')}"


def _machine() -> str:
    from cluster.bench.report import machine_description

    return machine_description()


def run(args: argparse.Namespace) -> int:
    import sys

    cfg = config_from_args(args)
    report = asyncio.run(simulate(cfg))
    if args.docs:
        from cluster.bench.report import update_docs_section, write_json

        name = docs_name(report)
        write_json(Path(__file__).resolve().parents[1] / "docs" / "bench" / f"{name}.json", report)
        command = "auralink " + " ".join(a for a in sys.argv[1:] if a != "--no-progress")
        update_docs_section(name, docs_markdown(report, command))
    keys = ("streams", "duration_s", "compute", "weights", "time_dilation", "wall_s", "frames_total",
            "frames_ai", "frames_fallback", "frames_unaccounted", "fallback_rate", "fallback_by_reason",
            "p50_ms", "p99_ms", "hints_sent", "hints_limited", "hints_rejected_forged",
            "hints_rejected_replay", "all_forged_rejected", "all_replays_rejected", "wire_kbps_ai",
            "wire_kbps_native", "control_plane_us_per_stream_tick", "late_ticks", "fault_recovery_s")
    print(json.dumps({k: report.get(k) for k in keys}, indent=2))
    # Whether the limit held is the report's verdict (measured rate vs limit, and limiter
    # availability), never assumed here.
    summary = (report.get("flooder_limit") or {}).get("summary")
    if summary:
        print(summary)
    lim = limiter_text(report.get("limiter_health"))
    if lim:
        print(lim)
    layers = report.get("ai_layers") or {}
    if layers:
        print("AI frames by layer (the streams' bandwidth hints): " + ", ".join(
            f"{k} kbps {v['share']:.0%} ({v['bytes'] / 1e6:.1f} MB)" for k, v in layers.items())
            + f"; mean AI payload {report['wire_kbps_ai']} kbps")
    print(f"compute: {report['compute_label']}")
    print(f"pace: {report['pace_note']}")
    cp = report["control_plane_cpu"]
    print(f"control plane: {cp['cpu_us_per_stream_tick']} us CPU per stream-tick ({cp['cores_per_10k_streams']} "
          f"cores per 10k streams); transport and runtime besides: "
          f"{report['transport_and_runtime_cpu']['cpu_us_per_stream_tick']} us")
    print(profile_banner(report.get("profile", PROFILE_MEASURED), report.get("profile_parameters"),
                         report.get("latency_profile_device", "")))
    plan = report.get("capacity_plan")
    if plan:
        print(f"capacity plan: {plan['verdict']}")
    amp = report.get("fallback_amplification_detail") or {}
    if amp.get("value") is not None:
        print(f"fallback amplification: {amp['value']:g} fallback frames per failed AI attempt "
              f"({amp['deadline']} deadline + {amp['error']} error, then {amp['unhealthy']} unhealthy)")
    auto = report.get("autoscaling")
    if auto:
        print(f"autoscaling ({auto['policy']}): {auto['replica_seconds']} replica-seconds, replicas "
              f"{auto['replicas_start']} -> max {auto['replicas_max']}, {auto['frames_fallback_capacity']} "
              f"frames fell back for lack of capacity ({100 * auto['fallback_capacity_rate']:.2f}%)")
    if report["compute"] == "emulated" and report.get("profile") == PROFILE_MODELLED:
        print("NOTE: the latency profile is modelled, not measured; pass a profile from `auralink "
              "bench codec` on the target device with --profile to replace it")
    elif report["compute"] == "emulated" and not report.get("latency_profile_measured", True):
        print("WARNING: the latency profile is the built-in unmeasured seed; run `auralink bench codec "
              "--json docs/bench/codec.json` on the target device (a GPU for 10,000 streams) or pass --profile")
    print(f"report: {report['report_path']}")
    for name, path in report["plots"].items():
        print(f"plot {name}: {path}")
    logging.getLogger(__name__).debug("done")
    return 0 if report["frames_unaccounted"] == 0 else 1
