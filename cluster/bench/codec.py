"""`auralink bench codec`: streaming EnCodec throughput and step latency vs offline.

For each batch size B it measures, on the chosen device:

* the streaming codec (`models.StreamingEncodec`) fed 40 ms chunks (960 samples) for B
  streams: real-time streams sustained (audio-seconds per wall second) for encode, decode and
  both, and the step latency p50/p99 (the numbers a scheduler calibrates from), once per step
  path: `gather` (exactly the B rows) and `masked` (a fixed-shape bucket with an execution
  mask; on CUDA replayed from CUDA graphs, one per bucket). The latency profile is the path
  the device runs by default (`models.streaming.default_step`);
* the reference `encodec` package offline on whole signals of the same length (the compute
  floor: one call per batch, no per-chunk overhead);
* the sliding-window approach without streaming state: an offline encode of the last 1 s of
  context for every 40 ms chunk.

On CUDA it also measures how far TF32 and bf16 masked steps agree with float32 (codes and
state); on CPU bf16 only, with `--agreement`. On CPU it stops growing the batch once a step
takes more than 1 s. Results go to JSON and to the "codec" section of docs/benchmarks.md;
`latency_profile_ms` is what `auralink simulate --profile` reads, `serve_user_config` the
keys to copy into serve_config.yaml's `user_config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.report import git_revision, machine_description, update_docs_section, write_json

log = logging.getLogger(__name__)

CHUNK = 960  # 40 ms at 24 kHz
CHUNK_SECONDS = CHUNK / 24_000
WINDOW = 24_000  # sliding window: 1 s of context per chunk
CPU_STEP_LIMIT_S = 1.0
DEFAULT_JSON = "runs/bench-codec.json"
STEP_PATHS = ("gather", "masked")
AGREEMENT_STREAMS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"output path (default {DEFAULT_JSON})")
    parser.add_argument("--batches", default="1,8,32,128",
                        help="comma-separated batch sizes (streams per step)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="audio seconds per stream for the streaming and offline runs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--weights", choices=["auto", "random", "pretrained"], default="auto",
                        help="auto: pretrained if a checkpoint is found, else random (loudly)")
    parser.add_argument("--bandwidth", type=float, default=6.0, help="kbps: 1.5, 3, 6, 12 or 24")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on CPU, where a 40 ms step's "
                             "small ops gain nothing from more and replicas scale per core; "
                             "torch's default on CUDA)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="max wall seconds of streaming steps per batch size (fewer steps "
                             "are measured when a batch is slow; at least 5)")
    parser.add_argument("--steps", default=",".join(STEP_PATHS),
                        help="comma-separated step paths to measure: gather, masked")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                        help="arithmetic of the masked step (tf32: CUDA only)")
    parser.add_argument("--agreement", action="store_true",
                        help="also measure bf16 vs fp32 agreement on CPU (always on CUDA)")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")


# --------------------------------------------------------------------------- model


def load_model(weights: str) -> tuple[Any, str]:
    """(model, label): pretrained when asked for or found, else random with a loud warning."""
    from models.weights import RANDOM_LABEL, WeightsKind, WeightsUnavailable, load_encodec

    if weights == "random":
        model, _ = load_encodec(allow_random=True, repository=_nowhere())
    else:
        try:
            model, info = load_encodec(allow_random=False)
        except WeightsUnavailable:
            if weights == "pretrained":
                raise
            model, info = load_encodec(allow_random=True, repository=_nowhere())
        if info.kind == WeightsKind.PRETRAINED:
            return model, "pretrained"
    banner = "#" * 78
    print(f"{banner}\n# WARNING: RANDOM EnCodec WEIGHTS. Timings are real, audio is noise.\n"
          f"# Results are labelled \"weights\": \"{RANDOM_LABEL}\".\n{banner}", file=sys.stderr,
          flush=True)
    return model, RANDOM_LABEL


def _nowhere() -> Path:
    # A directory that holds no checkpoint, so load_encodec takes its random path.
    return Path(os.devnull).parent / "auralink-no-checkpoint-here"


# --------------------------------------------------------------------------- signals


def make_signals(batch: int, samples: int, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: harmonics with a wandering pitch, syllable AM, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 24_000
    out = np.empty((batch, samples), np.float32)
    for b in range(batch):
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.3, 1) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 24_000
        x = sum(np.sin(k * phase) / k for k in range(1, 12))
        x = x * np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None)
        x = x + 0.01 * rng.standard_normal(samples)
        out[b] = 0.4 * x / (np.abs(x).max() + 1e-9)
    return out


# --------------------------------------------------------------------------- measurement


class _Clock:
    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def bench_streaming(model: Any, batch: int, seconds: float, device: str, bandwidth: float,
                    budget: float, step: str = "gather",
                    precision: str = "fp32") -> dict[str, Any]:
    """Stream `batch` signals through encode then decode, one 40 ms step at a time.

    The codec holds `batch` slots, so the masked step's bucket is the batch itself (a bucket
    size): the figures are those of a full bucket. On CUDA both paths run with TF32 as
    `precision` says (on only for tf32), so they are compared at the same arithmetic.
    """
    from models.streaming import tf32_scope

    if device != "cuda":
        return _bench_streaming(model, batch, seconds, device, bandwidth, budget, step, precision)
    with tf32_scope(precision == "tf32"):
        return _bench_streaming(model, batch, seconds, device, bandwidth, budget, step, precision)


def _bench_streaming(model: Any, batch: int, seconds: float, device: str, bandwidth: float,
                     budget: float, step: str, precision: str) -> dict[str, Any]:
    import torch

    from models import StreamingEncodec

    codec = StreamingEncodec(model, capacity=batch, device=device, bandwidth_kbps=bandwidth,
                             step=step, precision=precision if step == "masked" else "fp32")
    steps = max(1, int(round(seconds / CHUNK_SECONDS)))
    pcm = torch.from_numpy(make_signals(batch, steps * CHUNK)).to(device)
    slots = torch.arange(batch, device=device)
    clock = _Clock(device)
    # Warm-up: the first few calls allocate, pick kernels (and capture the masked step's CUDA
    # graphs); then start the streams afresh.
    for i in range(min(5, steps)):
        codec.decode(slots, codec.encode(slots, pcm[:, i * CHUNK:(i + 1) * CHUNK]))
    codec.reset(slots)

    enc_ms: list[float] = []
    dec_ms: list[float] = []
    start = clock()
    for i in range(steps):
        chunk = pcm[:, i * CHUNK:(i + 1) * CHUNK]
        t0 = clock()
        codes = codec.encode(slots, chunk)
        t1 = clock()
        codec.decode(slots, codes)
        t2 = clock()
        enc_ms.append((t1 - t0) * 1e3)
        dec_ms.append((t2 - t1) * 1e3)
        if len(enc_ms) >= 5 and t2 - start > budget:
            break
    audio = batch * CHUNK_SECONDS * len(enc_ms)
    enc_s, dec_s = sum(enc_ms) / 1e3, sum(dec_ms) / 1e3
    both_ms = [e + d for e, d in zip(enc_ms, dec_ms, strict=True)]
    return {
        "steps": len(enc_ms),
        "streams_realtime_encode": audio / enc_s,
        "streams_realtime_decode": audio / dec_s,
        "streams_realtime_both": audio / (enc_s + dec_s),
        "p50_ms": _pct(enc_ms, 50),
        "p99_ms": _pct(enc_ms, 99),
        "decode_p50_ms": _pct(dec_ms, 50),
        "decode_p99_ms": _pct(dec_ms, 99),
        "both_p50_ms": _pct(both_ms, 50),
        "both_p99_ms": _pct(both_ms, 99),
        "state_bytes_per_stream": codec.state_bytes_per_stream,
        "precision": precision if step == "masked" else "fp32",
        "cuda_graphs": codec.masked.graphs if step == "masked" else 0,
        "graph_capture_ms": sum(d["capture_ms"] for d in codec.masked.describe()),
    }


def precision_agreement(model: Any, device: str, bandwidth: float, seconds: float,
                        precisions: list[str]) -> dict[str, dict[str, float]]:
    """How far reduced-precision masked steps agree with the float32 one on the same audio.

    Per precision: the fraction of codes equal to float32's, the encoder and decoder state's
    largest difference relative to float32's largest value, and the decoded audio's largest
    difference relative to its peak (decoding float32's codes, so the decoder alone is
    compared).
    """
    import torch

    from models import StreamingEncodec

    n = AGREEMENT_STREAMS
    steps = max(1, int(round(seconds / CHUNK_SECONDS)))
    pcm = torch.from_numpy(make_signals(n, steps * CHUNK, seed=3)).to(device)
    slots = torch.arange(n, device=device)

    def run(precision: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        codec = StreamingEncodec(model, capacity=n, device=device, bandwidth_kbps=bandwidth,
                                 step="masked", precision=precision)
        codes = [codec.encode(slots, pcm[:, i * CHUNK:(i + 1) * CHUNK]) for i in range(steps)]
        return torch.cat(codes, dim=-1), codec

    ref_codes, ref = run("fp32")
    ref_audio = torch.cat([ref.decode(slots, ref_codes[:, :, i * 3:(i + 1) * 3])
                           for i in range(steps)], dim=-1)
    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        codes, codec = run(precision)
        audio = torch.cat([codec.decode(slots, ref_codes[:, :, i * 3:(i + 1) * 3])
                           for i in range(steps)], dim=-1)
        out[precision] = {
            "codes_equal": float((codes == ref_codes).float().mean()),
            "encoder_state_rel_err": _rel_err(codec.encoder_state, ref.encoder_state),
            "decoder_state_rel_err": _rel_err(codec.decoder_state, ref.decoder_state),
            "audio_rel_err": _rel_err(audio, ref_audio),
        }
    return out


def _rel_err(x: Any, ref: Any) -> float:
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def bench_offline(model: Any, batch: int, seconds: float, device: str,
                  bandwidth: float) -> dict[str, float]:
    """The reference package on whole signals: one encode and one decode call per batch."""
    import torch

    model = model.to(device)
    model.set_target_bandwidth(bandwidth)
    samples = max(CHUNK, int(round(seconds / CHUNK_SECONDS)) * CHUNK)
    x = torch.from_numpy(make_signals(batch, samples, seed=1)).to(device)[:, None]
    clock = _Clock(device)
    with torch.inference_mode():
        model.decode(model.encode(x[:, :, :CHUNK * 5]))  # warm-up
        t0 = clock()
        frames = model.encode(x)
        t1 = clock()
        model.decode(frames)
        t2 = clock()
    audio = batch * samples / 24_000
    return {
        "offline_streams_realtime_encode": audio / (t1 - t0),
        "offline_streams_realtime_decode": audio / (t2 - t1),
        "offline_streams_realtime": audio / (t2 - t0),
    }


def bench_sliding_window(model: Any, batch: int, device: str, bandwidth: float,
                         budget: float) -> dict[str, float]:
    """Without state: every 40 ms chunk re-encodes the last 1 s of each stream."""
    import torch

    model = model.to(device)
    model.set_target_bandwidth(bandwidth)
    x = torch.from_numpy(make_signals(batch, WINDOW, seed=2)).to(device)[:, None]
    clock = _Clock(device)
    times: list[float] = []
    with torch.inference_mode():
        model.encode(x)  # warm-up
        start = clock()
        while not times or (len(times) < 10 and clock() - start < budget / 3):
            t0 = clock()
            model.encode(x)
            times.append(clock() - t0)
    per_chunk = float(np.median(times))
    return {
        "sliding_window_streams_realtime": batch * CHUNK_SECONDS / per_chunk,
        "sliding_window_step_ms": per_chunk * 1e3,
    }


# --------------------------------------------------------------------------- report


def _docs_markdown(data: dict[str, Any], command: str) -> str:
    lines = [
        "## codec: streaming EnCodec vs offline and sliding window",
        "",
        f"Command: `{command}`  ",
        f"Machine: {data['machine']}; torch threads: {data['threads']}  ",
        f"Weights: **{data['weights']}**"
        + (" (timings are real, audio is noise)" if data["weights"].startswith("random") else "")
        + f"; bandwidth {data['bandwidth_kbps']} kbps ({data['n_q']} codebooks); "
        f"40 ms chunks; real compute (not emulated); revision {data['revision']}.",
        "",
        "Streams = audio-seconds processed per wall second (real-time streams sustained). "
        "Latency is one 40 ms step for the whole batch. Offline = the `encodec` package on "
        "whole signals (the compute floor); sliding window = offline encode of the last 1 s "
        "for every chunk.",
        "",
        "| batch | enc streams | dec streams | enc+dec streams | enc p50 / p99 ms "
        "| offline enc+dec streams | streaming / offline | sliding-window enc streams "
        "| streaming / sliding |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {r['batch']} | {r['streams_realtime_encode']:.1f} "
            f"| {r['streams_realtime_decode']:.1f} | {r['streams_realtime_both']:.1f} "
            f"| {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['offline_streams_realtime']:.1f} "
            f"| {r['speedup_vs_offline']:.2f}x | {r['sliding_window_streams_realtime']:.2f} "
            f"| {r['speedup_vs_sliding_window']:.1f}x |")
    paths = data.get("steps_measured", [])
    if paths:
        lines += [
            "",
            f"Step paths ({', '.join(paths)}): `gather` runs exactly the batch's rows; "
            "`masked` runs a fixed-shape bucket with an execution mask"
            + (" replayed from CUDA graphs" if data["device"] == "cuda" else
               " (no graphs on CPU)")
            + f", {data['precision']}. The latency profile is the "
            f"**{data['latency_profile_step']}** step, this device's default.",
            "",
            "| batch | " + " | ".join(f"{s} enc p50 / p99 ms | {s} dec p50 / p99 ms "
                                       f"| {s} enc+dec streams" for s in paths) + " |",
            "|---:|" + "---:|---:|---:|" * len(paths),
        ]
        for r in data["results"]:
            cells = []
            for name in paths:
                m = r["paths"][name]
                cells.append(f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f} "
                             f"| {m['decode_p50_ms']:.1f} / {m['decode_p99_ms']:.1f} "
                             f"| {m['streams_realtime_both']:.1f}")
            lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    agreement = data.get("precision_agreement") or {}
    if agreement:
        lines += [
            "",
            "Masked step precision vs float32 (same audio, "
            f"{AGREEMENT_STREAMS} streams; codes chosen with float32 distances in every mode):",
            "",
            "| precision | codes equal | encoder state max rel. diff | decoder state max rel. "
            "diff | decoded audio max diff / peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, a in agreement.items():
            lines.append(f"| {name} | {a['codes_equal']:.4f} | {a['encoder_state_rel_err']:.2e} "
                         f"| {a['decoder_state_rel_err']:.2e} | {a['audio_rel_err']:.2e} |")
    if data.get("stopped_early"):
        lines += ["", f"Stopped growing the batch: {data['stopped_early']}."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        print(f"--batches must be comma-separated integers, got {args.batches!r}", file=sys.stderr)
        return 2
    if not batches or batches[0] < 1 or args.seconds <= 0:
        print("need positive batch sizes and --seconds", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.steps.split(",") if p.strip()]
    if not paths or any(p not in STEP_PATHS for p in paths) or len(set(paths)) != len(paths):
        print(f"--steps must name some of {', '.join(STEP_PATHS)}, got {args.steps!r}",
              file=sys.stderr)
        return 2
    if args.precision == "tf32" and device != "cuda":
        print("--precision tf32 needs --device cuda", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device == "cpu":
        torch.set_num_threads(1)
    threads = torch.get_num_threads()
    model, weights = load_model(args.weights)
    from models.streaming import check_bandwidth, default_step

    n_q = check_bandwidth(args.bandwidth)
    default = default_step(device).value
    profile_step = default if default in paths else paths[0]
    command = "auralink bench codec " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "codec"]
                                                 else [])
    print(f"bench codec: device={device} weights={weights} bandwidth={args.bandwidth} kbps "
          f"threads={threads} batches={batches} seconds={args.seconds} steps={paths} "
          f"(profile: {profile_step}) masked precision={args.precision}", flush=True)

    results: list[dict[str, Any]] = []
    stopped = None
    for batch in batches:
        row: dict[str, Any] = {"batch": batch, "paths": {}}
        for name in paths:
            print(f"[B={batch}] streaming ({name}) ...", flush=True)
            m = bench_streaming(model, batch, args.seconds, device, args.bandwidth, args.budget,
                                step=name, precision=args.precision)
            row["paths"][name] = m
            print(f"[B={batch}] streaming ({name}): enc {m['streams_realtime_encode']:.1f} "
                  f"streams, dec {m['streams_realtime_decode']:.1f}, p50 {m['p50_ms']:.1f} ms, "
                  f"p99 {m['p99_ms']:.1f} ms ({m['steps']} steps)"
                  + (f", {m['cuda_graphs']} CUDA graphs" if m["cuda_graphs"] else ""), flush=True)
        # The top-level figures are the profile's path (what this device runs by default).
        row.update(row["paths"][profile_step], step=profile_step)
        print(f"[B={batch}] offline ...", flush=True)
        row.update(bench_offline(model, batch, args.seconds, device, args.bandwidth))
        print(f"[B={batch}] offline: {row['offline_streams_realtime']:.1f} streams "
              f"(enc+dec); sliding window ...", flush=True)
        row.update(bench_sliding_window(model, batch, device, args.bandwidth, args.budget))
        row["speedup_vs_offline"] = row["streams_realtime_both"] / row["offline_streams_realtime"]
        row["speedup_vs_sliding_window"] = (row["streams_realtime_encode"]
                                            / row["sliding_window_streams_realtime"])
        print(f"[B={batch}] sliding window: {row['sliding_window_streams_realtime']:.2f} "
              f"streams; streaming/offline {row['speedup_vs_offline']:.2f}x, "
              f"streaming/sliding {row['speedup_vs_sliding_window']:.1f}x", flush=True)
        results.append(row)
        worst = max(row["p50_ms"] + row["decode_p50_ms"], row["p99_ms"])
        if device == "cpu" and worst > CPU_STEP_LIMIT_S * 1e3 and batch != batches[-1]:
            stopped = f"a step at batch {batch} took {worst:.0f} ms (> 1 s) on CPU"
            print(f"stopping: {stopped}", flush=True)
            break

    agreement: dict[str, dict[str, float]] = {}
    if device == "cuda" or args.agreement:
        precisions = ["tf32", "bf16"] if device == "cuda" else ["bf16"]
        print(f"precision agreement vs fp32 ({', '.join(precisions)}) ...", flush=True)
        agreement = precision_agreement(model, device, args.bandwidth, args.seconds, precisions)
        for name, a in agreement.items():
            print(f"  {name}: codes equal {a['codes_equal']:.4f}, encoder state rel diff "
                  f"{a['encoder_state_rel_err']:.2e}, decoder state rel diff "
                  f"{a['decoder_state_rel_err']:.2e}, audio diff/peak {a['audio_rel_err']:.2e}",
                  flush=True)

    profile = {str(r["batch"]): {"p50": r["p50_ms"], "p99": r["p99_ms"]} for r in results}
    machine = machine_description()
    data: dict[str, Any] = {
        "device": device,
        "machine": machine,
        "weights": weights,
        "bandwidth_kbps": args.bandwidth,
        "n_q": n_q,
        "chunk_samples": CHUNK,
        "seconds_per_stream": args.seconds,
        "threads": threads,
        "torch": torch.__version__,
        "revision": git_revision(),
        "command": command.strip(),
        "steps_measured": paths,
        "precision": args.precision,
        "results": results,
        # batch -> encode-step latency of the device's default step path; what the Serve
        # scheduler and the simulator (`auralink simulate --profile`) calibrate on.
        "latency_profile_ms": profile,
        "latency_profile_step": profile_step,
        "latency_profile_ms_by_step": {
            name: {str(r["batch"]): {"p50": r["paths"][name]["p50_ms"],
                                     "p99": r["paths"][name]["p99_ms"]} for r in results}
            for name in paths},
        # The keys to copy into serve_config.yaml's user_config (a replica seeds its latency
        # model with the conservative p99).
        "serve_user_config": {
            "latency_profile": {int(b): v["p99"] for b, v in profile.items()},
            "latency_profile_device": f"{machine}, `auralink bench codec`, {weights} weights",
        },
        "precision_agreement": agreement,
        "stopped_early": stopped,
    }
    path = write_json(args.json, data)
    print(f"wrote {path}", flush=True)
    if not args.no_docs:
        update_docs_section("codec", _docs_markdown(data, data["command"]))
        print("updated docs/benchmarks.md section 'codec'", flush=True)
    return 0
