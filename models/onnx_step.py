"""ONNX export of the streaming EnCodec steps, and a slot-based onnxruntime codec.

The encode and decode steps of `models.streaming` are pure functions
``(input, state) -> (output, new_state)`` with one flat state row per stream, so they export
as plain ONNX graphs with the state as an explicit input and output and a dynamic batch axis.
The time axis is fixed per graph (960 samples = 3 frames by default, what the bridge sends);
a call of another multiple of 320 samples is cut into the exported chunk plus, where needed,
one graph for the remainder (exported on first use).

`OnnxStreamingEncodec` offers the same ``encode``/``decode``/``reset`` over slots as
`StreamingEncodec`, with the per-stream state kept in host arrays updated in place. Export
happens when a codec is built (into a cache directory, keyed by a digest of the weights),
never at import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.streaming import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    ArrayLike,
    DecoderCore,
    EncoderCore,
    SlotResets,
    SlotsLike,
    build_cores,
    check_bandwidth,
    check_codes,
    check_pcm,
    check_slots,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SAMPLES = 960  # 40 ms
OPSET = 17
ENV_CACHE = "AURALINK_ONNX_CACHE"


# --------------------------------------------------------------------------- export


class _Step(nn.Module):
    """Names the step's inputs/outputs for export; runs the torch core unchanged."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core(x, state)


def _export(core: nn.Module, example: torch.Tensor, state_size: int, path: Path,
            names: tuple[str, str, str, str]) -> Path:
    """Trace one step to ONNX with a dynamic batch axis; written atomically."""
    x_name, state_name, y_name, new_state_name = names
    state = torch.zeros(example.shape[0], state_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with torch.inference_mode():
        torch.onnx.export(
            _Step(core).eval(), (example, state), str(tmp),
            input_names=[x_name, state_name], output_names=[y_name, new_state_name],
            dynamic_axes={x_name: {0: "batch"}, state_name: {0: "batch"},
                          y_name: {0: "batch"}, new_state_name: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    os.replace(tmp, path)
    return path


def export_encode_step(core: EncoderCore, path: str | Path, chunk_samples: int = 960,
                       n_q: int = 8) -> Path:
    """Export ``(pcm [B, chunk], state [B, S]) -> (codes int64 [B, n_q, chunk/320], state')``."""
    if chunk_samples <= 0 or chunk_samples % FRAME_SAMPLES:
        raise ValueError(f"chunk_samples must be a positive multiple of {FRAME_SAMPLES}")
    example = torch.zeros(2, chunk_samples)
    return _export(core.with_n_q(n_q).cpu(), example, core.state_size, Path(path),
                   ("pcm", "state", "codes", "new_state"))


def export_decode_step(core: DecoderCore, path: str | Path, frames: int = 3,
                       n_q: int = 8) -> Path:
    """Export ``(codes int64 [B, n_q, frames], state [B, S]) -> (pcm [B, frames*320], state')``."""
    if frames <= 0:
        raise ValueError("frames must be positive")
    example = torch.zeros(2, n_q, frames, dtype=torch.int64)
    return _export(core.cpu(), example, core.state_size, Path(path),
                   ("codes", "state", "pcm", "new_state"))


def weights_digest(encoder: EncoderCore, decoder: DecoderCore) -> str:
    """Short digest of every weight, so a cached export is never used for other weights."""
    digest = hashlib.sha256()
    for core in (encoder, decoder):
        for name, tensor in core.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def onnx_providers(device: str) -> list[str]:
    """CUDA (then CPU) where asked for and present; CPU otherwise."""
    import onnxruntime as ort

    if device.startswith("cuda") and torch.cuda.is_available() \
            and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- runtime


class OnnxStreamingEncodec(SlotResets):
    """`StreamingEncodec`'s API over slots, running the exported steps with onnxruntime.

    State lives in host arrays ``encoder_state``/``decoder_state`` ``[capacity, S]``; a call
    gathers the named rows, runs the step, and writes them back in place. Bad input raises
    ValueError before any state is touched.
    """

    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES

    def __init__(self, model: nn.Module, capacity: int = 64, device: str = "cpu",
                 bandwidth_kbps: float = 6.0, chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
                 cache_dir: str | Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if chunk_samples <= 0 or chunk_samples % FRAME_SAMPLES:
            raise ValueError(f"chunk_samples must be a positive multiple of {FRAME_SAMPLES}")
        self.capacity = capacity
        self.n_q = check_bandwidth(bandwidth_kbps)
        self.bandwidth_kbps = float(bandwidth_kbps)
        self.chunk_samples = chunk_samples
        self.device = str(device)
        self._encoder, self._decoder = build_cores(model)
        base = cache_dir or os.environ.get(ENV_CACHE) or tempfile.mkdtemp(prefix="auralink-onnx-")
        self.cache_dir = Path(base) / weights_digest(self._encoder, self._decoder)
        self.providers_requested = onnx_providers(self.device)
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3
        if threads:
            self._options.intra_op_num_threads = threads
        self._sessions: dict[tuple[str, int, int], Any] = {}
        self.encoder_state = np.zeros((capacity, self._encoder.state_size), np.float32)
        self.decoder_state = np.zeros((capacity, self._decoder.state_size), np.float32)
        self._lock = threading.Lock()
        # Export the common graphs now: the first real call must not pay for it.
        frames = chunk_samples // FRAME_SAMPLES
        self._session("encode", self.n_q, frames)
        self._session("decode", self.n_q, frames)

    @property
    def providers(self) -> list[str]:
        """The execution providers the sessions actually run on."""
        return next(iter(self._sessions.values())).get_providers()

    def _session(self, kind: str, n_q: int, frames: int) -> Any:
        import onnxruntime as ort

        key = (kind, n_q, frames)
        if key not in self._sessions:
            path = self.cache_dir / f"{kind}-q{n_q}-f{frames}.onnx"
            if not path.is_file():
                log.info("exporting streaming %s step (n_q=%d, %d frames) to %s",
                         kind, n_q, frames, path)
                if kind == "encode":
                    export_encode_step(self._encoder, path, frames * FRAME_SAMPLES, n_q)
                else:
                    export_decode_step(self._decoder, path, frames, n_q)
            self._sessions[key] = ort.InferenceSession(
                str(path), sess_options=self._options, providers=self.providers_requested)
        return self._sessions[key]

    def _pieces(self, frames: int) -> list[tuple[int, int]]:
        """(start frame, frame count) pieces: whole chunks, then one remainder."""
        step = self.chunk_samples // FRAME_SAMPLES
        out = [(i, step) for i in range(0, frames - frames % step, step)]
        if frames % step:
            out.append((frames - frames % step, frames % step))
        return out

    def encode(self, slots: SlotsLike, pcm: ArrayLike,
               bandwidth_kbps: float | None = None) -> ArrayLike:
        n_q = self.n_q if bandwidth_kbps is None else check_bandwidth(bandwidth_kbps)
        x = check_pcm(pcm).cpu().numpy()
        idx = check_slots(slots, self.capacity, expected=x.shape[0])
        frames = x.shape[1] // FRAME_SAMPLES
        if x.shape[0] == 0:
            return _like(np.zeros((0, n_q, frames), np.int64), pcm)
        with self._lock:
            state = self.encoder_state[idx]
            out = []
            for start, count in self._pieces(frames):
                sess = self._session("encode", n_q, count)
                chunk = x[:, start * FRAME_SAMPLES:(start + count) * FRAME_SAMPLES]
                codes, state = sess.run(None, {"pcm": np.ascontiguousarray(chunk),
                                               "state": state})
                out.append(codes)
            self.encoder_state[idx] = state
        return _like(np.concatenate(out, axis=-1).astype(np.int64, copy=False), pcm)

    def decode(self, slots: SlotsLike, codes: ArrayLike) -> ArrayLike:
        c = check_codes(codes).cpu().numpy()
        idx = check_slots(slots, self.capacity, expected=c.shape[0])
        n_q, frames = c.shape[1], c.shape[2]
        if c.shape[0] == 0:
            return _like(np.zeros((0, frames * FRAME_SAMPLES), np.float32), codes)
        with self._lock:
            state = self.decoder_state[idx]
            out = []
            for start, count in self._pieces(frames):
                sess = self._session("decode", n_q, count)
                pcm, state = sess.run(None, {
                    "codes": np.ascontiguousarray(c[:, :, start:start + count]), "state": state})
                out.append(pcm)
            self.decoder_state[idx] = state
        return _like(np.concatenate(out, axis=-1), codes)

    def _zero(self, slots: SlotsLike, encoder: bool, decoder: bool) -> None:
        idx = check_slots(slots, self.capacity)
        with self._lock:
            if encoder:
                self.encoder_state[idx] = 0.0
            if decoder:
                self.decoder_state[idx] = 0.0

    @property
    def state_bytes_per_stream(self) -> int:
        return (self.encoder_state.shape[1] + self.decoder_state.shape[1]) * 4


def _like(result: np.ndarray, template: Any) -> ArrayLike:
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(result).to(template.device)
    return result
