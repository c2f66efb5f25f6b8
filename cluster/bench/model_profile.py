"""`auralink bench model-profile`: a labelled capacity model for when no GPU profile exists.

    auralink bench model-profile --device h100-sxm --efficiency 0.10 --overhead-ms 2 \\
        --json docs/bench/profile-h100-modelled.json

A measured latency profile (`auralink bench codec` on the target device) is always better;
this writes one from arithmetic instead, and says so everywhere it goes:

    step_ms(B) = overhead_ms + B * gflop_per_chunk / (peak_tflops * efficiency)

- `gflop_per_chunk`: what a codec replica computes for one 40 ms frame. A replica only
  *encodes* bridge frames (the bridge sends `Op.ENCODE`; subscribers decode, and legacy
  subscribers get the publisher's own Opus), so this is the streaming encoder - SEANet
  convolutions, its 2-layer LSTM and the residual quantizer at the batch's codebook depth.
  The convolutions are 2.35 GFLOP per audio-second (the design card's figure, and what
  `torch.utils.flop_counter` counts on the encoder); the counter does not count the LSTM, which
  is added analytically (2 layers x 4 gates x 512 x (512 + 512) multiply-adds at 75 Hz), and the
  quantizer is 2 x 1024 x 128 FLOPs per codebook per 75 Hz frame (tests/cluster check the
  convolution and quantizer figures against the counter and the LSTM's shape against the
  model). The default depth is 24 kbps (32 codebooks): the deepest a
  subscriber may ask for, so the model does not flatter the replica.
- `peak_tflops`: a named device's dense peak at the model's precision, from the vendor's
  datasheet (the table below names its source); `efficiency`: the assumed share of it a
  batched step achieves (small convolutions and an LSTM are far from peak: 10% is a
  conservative default); `overhead_ms`: a fixed cost per step (kernel launches, host <-> device
  copies, Python), paid once per batch.

The JSON has `latency_profile_ms` (step ms by batch size, the format `auralink bench codec`
writes and the emulated replicas consume, see deployments/config.py `profile_ms`) plus
`"modelled": true`, `"profile": "modelled (not measured)"` and `profile_parameters` with every
input above. `auralink simulate --profile FILE` prints those parameters at start and copies
them into its report. A measured profile replaces this one by passing its file instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deployments.contract import BANDWIDTHS_KBPS, CHUNK_SAMPLES, SAMPLE_RATE, bandwidth_codebooks

PROFILE_MEASURED = "measured"
PROFILE_MODELLED = "modelled (not measured)"
PROFILE_SEED = "unmeasured seed (a guess)"

# --- the model's FLOPs (EnCodec 24 kHz, streaming encoder) -------------------------------
# SEANet encoder convolutions, FLOPs per audio-second: torch.utils.flop_counter.FlopCounterMode
# over `EncodecModel.encodec_model_24khz().encoder` on 1 s of audio (2 FLOPs per MAC).
ENCODER_CONV_GFLOP_PER_S = 2.3503872
ENCODER_LSTM_LAYERS = 2
ENCODER_LSTM_DIM = 512
FRAME_RATE_HZ = 75  # 24 kHz / hop 320
CODEBOOK_BINS = 1024
CODEBOOK_DIM = 128


def lstm_gflop_per_s(layers: int = ENCODER_LSTM_LAYERS, dim: int = ENCODER_LSTM_DIM,
                     frame_rate: int = FRAME_RATE_HZ) -> float:
    """4 gates, each a [dim x (input + hidden)] matrix-vector product per layer and frame."""
    return 2.0 * layers * 4 * dim * (dim + dim) * frame_rate / 1e9


def quantizer_gflop_per_s(n_q: int, bins: int = CODEBOOK_BINS, dim: int = CODEBOOK_DIM,
                          frame_rate: int = FRAME_RATE_HZ) -> float:
    """Distances to every code of every codebook used (the residual x codebook matmul)."""
    return 2.0 * n_q * bins * dim * frame_rate / 1e9


def encode_flops(bandwidth_kbps: float) -> dict[str, float]:
    """GFLOP per audio-second of one stream's encode, by part."""
    return {
        "encoder_convolutions": ENCODER_CONV_GFLOP_PER_S,
        "encoder_lstm": lstm_gflop_per_s(),
        f"quantizer_{bandwidth_codebooks(bandwidth_kbps)}_codebooks": quantizer_gflop_per_s(
            bandwidth_codebooks(bandwidth_kbps)),
    }


# --- devices -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePeak:
    name: str
    peak_tflops: float  # dense, at `precision`
    precision: str
    source: str


DEVICES: dict[str, DevicePeak] = {
    "h100-sxm": DevicePeak(
        "NVIDIA H100 SXM5 80GB", 989.4, "bf16 dense (tensor cores, no sparsity)",
        "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 Tensor Core 1,979 TFLOPS "
        "'with sparsity'; dense is half, 989.4 TFLOPS",
    ),
    "h100-pcie": DevicePeak(
        "NVIDIA H100 PCIe 80GB", 756.5, "bf16 dense (tensor cores, no sparsity)",
        "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column: BF16 Tensor Core 1,513 TFLOPS "
        "'with sparsity'; dense is half, 756.5 TFLOPS",
    ),
    "a100-sxm": DevicePeak(
        "NVIDIA A100 SXM4 80GB", 312.0, "bf16 dense (tensor cores, no sparsity)",
        "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)",
    ),
}

# Batch sizes written into `latency_profile_ms`: the model is linear, so any two reproduce it
# (`profile_ms` interpolates and extrapolates linearly); a spread keeps the emulated replica's
# latency-model buckets seeded up to the largest batch a replica forms.
PROFILE_BATCHES = tuple(2**k for k in range(15))  # 1 .. 16384


@dataclass(frozen=True)
class CapacityModel:
    """step_ms(B) = overhead_ms + B * gflop_per_chunk / (peak_tflops * efficiency)."""

    device: str
    device_name: str
    peak_tflops: float
    precision: str
    peak_source: str
    efficiency: float
    overhead_ms: float
    bandwidth_kbps: float
    chunk_ms: float
    gflop_per_audio_s: dict[str, float]

    def __post_init__(self) -> None:
        if not (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)):
            raise ValueError(f"peak_tflops must be a positive number, got {self.peak_tflops}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if not (self.overhead_ms >= 0 and math.isfinite(self.overhead_ms)):
            raise ValueError(f"overhead_ms must be >= 0, got {self.overhead_ms}")

    @classmethod
    def for_device(cls, device: str, efficiency: float, overhead_ms: float,
                   bandwidth_kbps: float = 24.0, peak_tflops: float | None = None) -> CapacityModel:
        """A named device from `DEVICES`, or any name with an explicit `peak_tflops`."""
        known = DEVICES.get(device)
        if known is None and peak_tflops is None:
            raise ValueError(f"unknown device {device!r}: one of {sorted(DEVICES)}, or give its "
                             "dense peak with --peak-tflops")
        if known is not None and peak_tflops is None:
            peak = known
        else:
            peak = DevicePeak(known.name if known else device, float(peak_tflops),
                              known.precision if known else "as given",
                              "given on the command line (--peak-tflops)")
        return cls(
            device=device, device_name=peak.name, peak_tflops=peak.peak_tflops,
            precision=peak.precision, peak_source=peak.source, efficiency=float(efficiency),
            overhead_ms=float(overhead_ms), bandwidth_kbps=float(bandwidth_kbps),
            chunk_ms=1000.0 * CHUNK_SAMPLES / SAMPLE_RATE,
            gflop_per_audio_s=encode_flops(bandwidth_kbps),
        )

    @property
    def gflop_per_chunk(self) -> float:
        return sum(self.gflop_per_audio_s.values()) * self.chunk_ms / 1000.0

    @property
    def per_frame_ms(self) -> float:
        # GFLOP / (TFLOP/s) = 1e-3 s = 1 ms
        return self.gflop_per_chunk / (self.peak_tflops * self.efficiency)

    def step_ms(self, batch: int) -> float:
        return self.overhead_ms + batch * self.per_frame_ms if batch > 0 else 0.0

    def label(self) -> str:
        return (f"{self.device_name}, {PROFILE_MODELLED}: {self.efficiency:.0%} of "
                f"{self.peak_tflops:g} TFLOPS {self.precision.split(' (')[0]} + "
                f"{self.overhead_ms:g} ms per step")

    def parameters(self) -> dict[str, Any]:
        p = asdict(self)
        p.update(
            op="encode (a replica only encodes bridge frames)",
            gflop_per_chunk=round(self.gflop_per_chunk, 9),
            per_frame_ms=round(self.per_frame_ms, 12),
            formula="step_ms(B) = overhead_ms + B * gflop_per_chunk / (peak_tflops * efficiency)",
        )
        return p

    def document(self, command: str, batches: tuple[int, ...] = PROFILE_BATCHES) -> dict[str, Any]:
        return {
            "profile": PROFILE_MODELLED,
            "modelled": True,
            "device": self.device,
            "machine": self.label(),
            "weights": "none (modelled profile)",
            "command": command,
            "profile_parameters": self.parameters(),
            # batch -> step ms, the format emulated replicas and the simulator read.
            "latency_profile_ms": {str(b): round(self.step_ms(b), 6) for b in batches},
        }


def parameters_text(parameters: dict[str, Any]) -> list[str]:
    """One line per parameter, for the start of a run and its report."""
    out = []
    for k, v in parameters.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b:.4g}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        out.append(f"  {k}: {v}")
    return out


# --- command -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="h100-sxm",
                        help=f"named device: {', '.join(sorted(DEVICES))} (default h100-sxm), or "
                             "any name with --peak-tflops")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOPS at the model's precision (default: the datasheet "
                             "figure of --device)")
    parser.add_argument("--efficiency", type=float, default=0.10,
                        help="assumed share of the peak a batched step achieves (default 0.10)")
    parser.add_argument("--overhead-ms", type=float, default=2.0,
                        help="fixed cost per step, paid once per batch (default 2 ms)")
    parser.add_argument("--bandwidth", type=float, default=24.0,
                        help=f"kbps the replica quantizes at, one of {BANDWIDTHS_KBPS} (default 24: "
                             "the deepest)")
    parser.add_argument("--json", type=Path, required=True, help="output path")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not touch docs/benchmarks.md (it is updated only for files "
                             "under docs/bench/)")


def docs_markdown(doc: dict[str, Any], path: str) -> str:
    p = doc["profile_parameters"]
    prof = doc["latency_profile_ms"]
    show = [b for b in ("1", "64", "1024", "4096", "8192", "16384") if b in prof]
    rows = " | ".join(f"B={b}: {prof[b]:.3f}" for b in show)
    return "\n".join([
        f"## model-profile: {p['device']}, {PROFILE_MODELLED}",
        "",
        f"`{doc['command']}` writes `{path}`. **Modelled, not measured**: computed from the "
        f"formula `{p['formula']}`, no device was used.",
        "",
        f"- device: {p['device_name']}, peak {p['peak_tflops']:g} TFLOPS {p['precision']} "
        f"({p['peak_source']})",
        f"- efficiency {p['efficiency']:g} (assumed), fixed overhead {p['overhead_ms']:g} ms per step (assumed)",
        f"- work per 40 ms frame: encode only, {p['gflop_per_chunk']:.4f} GFLOP (per audio-second: "
        + ", ".join(f"{k} {v:.4f}" for k, v in p["gflop_per_audio_s"].items()) + " GFLOP)",
        f"- per frame {p['per_frame_ms'] * 1000:.3f} us; step ms by batch: {rows}",
        "",
        f"`auralink simulate --profile {path}` labels its report `\"profile\": \"{PROFILE_MODELLED}\"` "
        "with these `profile_parameters`; a profile measured by `auralink bench codec` on the "
        "device replaces it by passing that file instead.",
    ])


def run(args: argparse.Namespace) -> int:
    try:
        model = CapacityModel.for_device(args.device, args.efficiency, args.overhead_ms,
                                         bandwidth_kbps=args.bandwidth, peak_tflops=args.peak_tflops)
    except ValueError as exc:
        print(f"bench model-profile: {exc}", file=sys.stderr)
        return 2
    from cluster.bench.report import update_docs_section, write_json

    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "model-profile"] else []
    command = ("auralink bench model-profile " + " ".join(argv)).strip()
    doc = model.document(command)
    print(f"latency profile: {PROFILE_MODELLED}")
    print("\n".join(parameters_text(doc["profile_parameters"])))
    path = write_json(args.json, doc)
    print(f"wrote {path}")
    rel = _docs_relative(path)
    if rel is not None and not args.no_docs:
        update_docs_section(f"model-profile-{model.device}", docs_markdown(doc, rel))
        print(f"updated docs/benchmarks.md section 'model-profile-{model.device}'")
    return 0


def _docs_relative(path: Path) -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        rel = path.resolve().relative_to(repo)
    except ValueError:
        return None
    return str(rel) if rel.parts[:2] == ("docs", "bench") else None
