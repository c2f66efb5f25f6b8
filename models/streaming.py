"""Streaming EnCodec (24 kHz) with batched per-stream state slots.

The reference `encodec` package only compresses whole signals: each call pads its
convolutions and drops the LSTM state, so feeding it 40 ms chunks gives different codes and
re-encoding a sliding window of context costs ~25x the compute. Here every stateful layer
keeps a small per-stream state instead (moshi-style):

* causal ``Conv1d``: the last ``K_eff - stride`` input samples (its left context);
* causal ``ConvTranspose1d``: the ``K - stride`` overlap tail not yet emitted (without bias);
* ``LSTM``: ``h`` and ``c`` per layer.

All of a stream's encoder state lives in one flat row of ``encoder_state`` ``[capacity, S]``
(decoder likewise), preallocated on the device. A call gathers the named slots' rows once,
runs the step, and writes them back in place with ``index_copy_``: one gather and one scatter
per call whatever the depth, and a step that is a pure function ``(input, state) -> (output,
new_state)`` — which is also what the ONNX export (``models.onnx_step``) runs.

Streaming equals the reference's offline pass over the whole signal with its convolutions
padded by zeros (``pad_mode="constant"``), because zero-initialised context is exactly that
left padding, and every chunk is a multiple of the 320-sample hop so no right padding occurs.

Next to that gather step sits the graph-ready masked step (`MaskedStep`, moshi's exec-mask
pattern): a call runs a fixed-shape bucket of rows, merges the new state of the rows that
advance with ``torch.where`` and writes it back in place, so on CUDA each bucket is captured
once as a CUDA graph and replayed. On the same rows it computes exactly what the gather step
computes; which one ``encode``/``decode`` use is ``StreamingEncodec(step=...)``.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import enum
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.constants import (
    BANDWIDTHS_KBPS,
    CODEBOOK_SIZE,
    FRAME_SAMPLES,
    N_Q_BY_BANDWIDTH,
    SAMPLE_RATE,
)

log = logging.getLogger(__name__)


# Bandwidth (kbps) -> number of RVQ codebooks (10 bits each at 75 frames/s).
BANDWIDTH_CODEBOOKS: dict[float, int] = dict(zip(BANDWIDTHS_KBPS, N_Q_BY_BANDWIDTH, strict=True))
VALID_N_Q: frozenset[int] = frozenset(BANDWIDTH_CODEBOOKS.values())
# Convolutions with at most this many output frames per call run as one GEMM.
GEMM_MAX_FRAMES = 16

SlotsLike = Sequence[int] | np.ndarray | torch.Tensor
ArrayLike = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------- state layout


class _StateLayout:
    """Hands out consecutive column ranges of a flat ``[B, S]`` state row."""

    def __init__(self) -> None:
        self.size = 0

    def add(self, n: int) -> int:
        offset = self.size
        self.size += n
        return offset


# --------------------------------------------------------------------------- streaming layers
#
# Every layer has forward(x, state, new_states) where ``state`` is the gathered [B, S] rows
# and ``new_states`` collects each layer's next state, flattened to [B, n], in layout order
# (layers register their ranges in execution order, so a plain cat rebuilds the row).


def _plain_weight(module: nn.Module) -> torch.Tensor:
    """The effective weight of a conv, with weight norm (hook or parametrize style) folded in.

    Computed from the caller's module without modifying it (hook-style weight-normed modules
    cannot even be deep-copied).
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    with torch.no_grad():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                v = getattr(module, hook.name + "_v")
                g = getattr(module, hook.name + "_g")
                return torch._weight_norm(v, g, hook.dim).detach().clone().contiguous()
        if parametrize.is_parametrized(module, "weight"):
            return module.weight.detach().clone().contiguous()
        return module.weight.detach().clone().contiguous()


class _StreamConv(nn.Module):
    """Causal Conv1d with a left-context buffer of ``(K-1)*dilation + 1 - stride`` samples."""

    def __init__(self, conv: nn.Conv1d, layout: _StateLayout) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding != (0,):
            raise ValueError("streaming conv expects groups=1 and no built-in padding")
        self.register_buffer("weight", _plain_weight(conv))
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.register_buffer("bias", bias)
        self.stride = conv.stride[0]
        self.dilation = conv.dilation[0]
        self.channels = conv.in_channels
        self.kernel_span = (conv.kernel_size[0] - 1) * self.dilation + 1
        self.context = self.kernel_span - self.stride
        # [Cout, Cin, K] -> [Cin*K, Cout] for the GEMM form.
        self.register_buffer("weight_cols", self.weight.flatten(1).t().contiguous())
        if self.context < 0:
            raise ValueError("kernel shorter than stride is not streamable")
        self.offset = layout.add(self.channels * self.context)

    def forward(self, x: torch.Tensor, state: torch.Tensor, new_states: list) -> torch.Tensor:
        if self.context:
            # -1 for the batch axis keeps the ONNX export free of batch-size constants.
            prev = state[:, self.offset:self.offset + self.channels * self.context]
            x = torch.cat([prev.reshape(-1, self.channels, self.context), x], dim=-1)
            new_states.append(x[:, :, x.shape[-1] - self.context:].flatten(1))
        frames = (x.shape[-1] - self.kernel_span) // self.stride + 1
        if frames <= GEMM_MAX_FRAMES and self.dilation == 1 and not torch.onnx.is_in_onnx_export():
            # Few output frames (the deep, low-rate layers of a 40 ms step): one im2col GEMM
            # beats the CPU convolution kernels, which are tuned for long sequences. (ONNX
            # export keeps the Conv op: onnxruntime has its own kernels, and Unfold does not
            # export with a dynamic batch.)
            cols = x.unfold(-1, self.kernel_span, self.stride)  # [B, C, n, K]
            cols = cols.permute(0, 2, 1, 3).reshape(-1, self.channels * self.kernel_span)
            y = torch.mm(cols, self.weight_cols)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(-1, frames, y.shape[-1]).transpose(1, 2)
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation)


class _StreamConvTranspose(nn.Module):
    """Causal ConvTranspose1d keeping its ``K - stride`` overlap tail between calls.

    The reference trims ``K - stride`` samples on the right of the whole signal; streaming
    emits ``n * stride`` samples for ``n`` input frames and carries the rest (bias-free, so
    bias is added exactly once per output sample) into the next call's first samples.
    """

    def __init__(self, convtr: nn.ConvTranspose1d, layout: _StateLayout) -> None:
        super().__init__()
        if convtr.groups != 1 or convtr.padding != (0,) or convtr.dilation != (1,):
            raise ValueError("streaming transposed conv expects groups=1, no padding/dilation")
        self.register_buffer("weight", _plain_weight(convtr))
        # [Cin, Cout, K] -> [Cin, Cout*K] for the matmul form.
        self.register_buffer("weight_2d", self.weight.flatten(1).contiguous())
        bias = convtr.bias.detach().clone() if convtr.bias is not None else None
        self.register_buffer("bias", None if bias is None else bias.view(1, -1, 1))
        self.stride = convtr.stride[0]
        self.channels = convtr.out_channels
        self.tail = convtr.kernel_size[0] - self.stride
        self.offset = layout.add(self.channels * self.tail)

    def forward(self, x: torch.Tensor, state: torch.Tensor, new_states: list) -> torch.Tensor:
        if self.tail == self.stride:
            return self._forward_matmul(x, state, new_states)
        n = x.shape[-1]
        y = F.conv_transpose1d(x, self.weight, None, self.stride)
        emit = n * self.stride
        if self.tail:
            prev = state[:, self.offset:self.offset + self.channels * self.tail]
            y = torch.cat(
                [y[:, :, :self.tail] + prev.reshape(-1, self.channels, self.tail),
                 y[:, :, self.tail:]], dim=-1)
            new_states.append(y[:, :, emit:].flatten(1))
        y = y[:, :, :emit]
        return y if self.bias is None else y + self.bias

    def _forward_matmul(self, x: torch.Tensor, state: torch.Tensor,
                        new_states: list) -> torch.Tensor:
        """K == 2*stride (every EnCodec upsampler): one matmul plus a shifted add.

        Each input frame j yields K samples: its first half lands in output block j, its
        second half in block j+1. Block 0 also gets the previous call's last second half
        (the tail); this call's last second half becomes the new tail. Small-input
        ``conv_transpose1d`` takes a slow generic path on CPU; this is a single GEMM.
        """
        s, c_out = self.stride, self.channels
        # [B, n, Cin] @ [Cin, Cout*K] -> [B, n, Cout, K]
        n = x.shape[-1]
        z = torch.mm(x.transpose(1, 2).reshape(-1, x.shape[1]), self.weight_2d)
        z = z.reshape(-1, n, c_out, 2 * s)
        first, second = z[..., :s], z[..., s:]
        prev = state[:, self.offset:self.offset + c_out * s].reshape(-1, 1, c_out, s)
        new_states.append(second[:, -1].flatten(1))
        blocks = first + torch.cat([prev, second[:, :-1]], dim=1)  # [B, n, Cout, s]
        y = blocks.permute(0, 2, 1, 3).flatten(2)  # [B, Cout, n*s]
        return y if self.bias is None else y + self.bias


class _StreamLSTM(nn.Module):
    """SLSTM (``y = lstm(x) + x``) with per-stream ``h``/``c`` for every layer.

    Written out as matmuls rather than calling ``nn.LSTM``: for the 1-3 frames of a streaming
    step the fused CPU kernel costs ~20 ms of setup per call, while the input projection of
    all frames is one matmul and each frame then needs one small matmul.
    """

    def __init__(self, lstm: nn.LSTM, skip: bool, layout: _StateLayout) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.batch_first or lstm.proj_size or not lstm.bias:
            raise ValueError("streaming LSTM expects a plain unidirectional LSTM with bias")
        self.skip = skip
        self.layers = lstm.num_layers
        self.hidden = lstm.hidden_size
        with torch.no_grad():
            for k in range(self.layers):
                w_ih = getattr(lstm, f"weight_ih_l{k}").detach().clone()
                w_hh = getattr(lstm, f"weight_hh_l{k}").detach().clone()
                bias = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
                self.register_buffer(f"w_ih_t{k}", w_ih.t().contiguous())
                self.register_buffer(f"w_hh_t{k}", w_hh.t().contiguous())
                self.register_buffer(f"bias{k}", bias.detach().clone())
        self.offset = layout.add(2 * self.layers * self.hidden)

    def forward(self, x: torch.Tensor, state: torch.Tensor, new_states: list) -> torch.Tensor:
        n = 2 * self.layers * self.hidden
        hc = state[:, self.offset:self.offset + n].reshape(-1, 2, self.layers, self.hidden)
        xt = x.permute(2, 0, 1)  # [T, B, C]
        inp = xt
        hs, cs = [], []
        for k in range(self.layers):
            h, c = hc[:, 0, k], hc[:, 1, k]
            w_hh = getattr(self, f"w_hh_t{k}")
            # One 2-D GEMM for all frames (a 3-D matmul on a permuted view would be a bmm).
            gates_x = torch.addmm(getattr(self, f"bias{k}"), inp.reshape(-1, inp.shape[-1]),
                                  getattr(self, f"w_ih_t{k}")).unflatten(0, (inp.shape[0], -1))
            outs = []
            for t in range(gates_x.shape[0]):
                gates = torch.addmm(gates_x[t], h, w_hh)
                i, f, g, o = gates.chunk(4, dim=1)  # PyTorch's gate order
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            inp = torch.stack(outs)
            hs.append(h)
            cs.append(c)
        y = inp + xt if self.skip else inp
        new_states.append(torch.stack([torch.stack(hs, 1), torch.stack(cs, 1)], 1).flatten(1))
        return y.permute(1, 2, 0).contiguous()


class _StreamELU(nn.Module):
    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor, state: torch.Tensor, new_states: list) -> torch.Tensor:
        return F.elu(x, self.alpha)


class _StreamResBlock(nn.Module):
    """SEANet residual block: ``shortcut(x) + block(x)``."""

    def __init__(self, block: list[nn.Module], shortcut: nn.Module | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(block)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor, state: torch.Tensor, new_states: list) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y, state, new_states)
        skip = x if self.shortcut is None else self.shortcut(x, state, new_states)
        return skip + y


def _convert(module: nn.Module, layout: _StateLayout) -> list[nn.Module]:
    """Translate one SEANet layer (recursively) into streaming layers, in execution order."""
    from encodec.modules import SLSTM, SConv1d, SConvTranspose1d
    from encodec.modules.seanet import SEANetResnetBlock

    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for sub in module:
            out.extend(_convert(sub, layout))
        return out
    if isinstance(module, nn.ELU):
        return [_StreamELU(module.alpha)]
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, SConv1d):
        if not module.causal:
            raise ValueError("only causal EnCodec models (the 24 kHz one) can stream")
        if not isinstance(module.conv.norm, nn.Identity):
            raise ValueError("streaming needs a model without time normalisation")
        return [_StreamConv(module.conv.conv, layout)]
    if isinstance(module, SConvTranspose1d):
        if not module.causal or module.trim_right_ratio != 1.0:
            raise ValueError("streaming needs causal transposed convs trimmed on the right")
        if not isinstance(module.convtr.norm, nn.Identity):
            raise ValueError("streaming needs a model without time normalisation")
        return [_StreamConvTranspose(module.convtr.convtr, layout)]
    if isinstance(module, SLSTM):
        return [_StreamLSTM(module.lstm, module.skip, layout)]
    if isinstance(module, SEANetResnetBlock):
        block = _convert(module.block, layout)
        shortcut = _convert(module.shortcut, layout)  # registered after the block: run order
        if len(shortcut) > 1:
            raise ValueError("unexpected residual shortcut")
        return [_StreamResBlock(block, shortcut[0] if shortcut else None)]
    raise ValueError(f"cannot stream EnCodec layer {type(module).__name__}")


# --------------------------------------------------------------------------- step cores


class EncoderCore(nn.Module):
    """Pure encode step: ``(pcm [B, T], state [B, S]) -> (codes [B, n_q, T/320], state')``."""

    def __init__(self, layers: list[nn.Module], state_size: int, codebooks: torch.Tensor,
                 n_q: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.state_size = state_size
        self.n_q = n_q
        # [n_books, D, bins] for x @ e and |e|^2 per code, as the reference computes distances.
        self.register_buffer("codebooks_t", codebooks.transpose(1, 2).contiguous())
        self.register_buffer("codebooks", codebooks.contiguous())
        self.register_buffer("code_norms", codebooks.pow(2).sum(-1, keepdim=True).transpose(1, 2))

    def with_n_q(self, n_q: int) -> EncoderCore:
        """A view of this core quantizing with ``n_q`` books (shares every tensor)."""
        other = copy.copy(self)
        other.n_q = n_q
        return other

    def forward(self, pcm: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, new_state = self.features(pcm, state)
        return self.quantize(x), new_state

    def features(self, pcm: torch.Tensor,
                 state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SEANet encoder: ``(pcm [B, T], state) -> (embeddings [B, D, T/320], state')``."""
        x = pcm.unsqueeze(1)
        new_states: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x, state, new_states)
        return x, _cat_states(new_states, state)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Residual VQ of embeddings ``[B, D, F]`` with ``n_q`` books -> codes ``[B, n_q, F]``."""
        d, frames = x.shape[1], x.shape[2]
        residual = x.transpose(1, 2).reshape(-1, d)
        codes = []
        for q in range(self.n_q):
            # Same expression as encodec's EuclideanCodebook.quantize, for identical ties.
            dist = -(residual.pow(2).sum(1, keepdim=True)
                     - 2 * residual @ self.codebooks_t[q] + self.code_norms[q])
            idx = dist.max(dim=-1).indices
            residual = residual - F.embedding(idx, self.codebooks[q])
            codes.append(idx)
        return torch.stack(codes, dim=1).reshape(-1, frames, self.n_q).transpose(1, 2)


class DecoderCore(nn.Module):
    """Pure decode step: ``(codes [B, n_q, F], state [B, S]) -> (pcm [B, F*320], state')``."""

    def __init__(self, layers: list[nn.Module], state_size: int, codebooks: torch.Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.state_size = state_size
        self.register_buffer("codebooks", codebooks.contiguous())

    def forward(self, codes: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.synthesize(self.embed(codes), state)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, n_q, F]`` -> the sum of their code vectors ``[B, D, F]``."""
        n_q = codes.shape[1]
        # Sum of the chosen code vectors, in the reference's order (book 0 first).
        emb = F.embedding(codes[:, 0], self.codebooks[0])
        for q in range(1, n_q):
            emb = emb + F.embedding(codes[:, q], self.codebooks[q])
        return emb.transpose(1, 2).contiguous()  # [B, D, F]

    def synthesize(self, x: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SEANet decoder: ``(embeddings [B, D, F], state) -> (pcm [B, F*320], state')``."""
        new_states: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x, state, new_states)
        return x.squeeze(1), _cat_states(new_states, state)


def _cat_states(new_states: list[torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    return torch.cat(new_states, dim=1) if new_states else state[:, :0]


def build_cores(model: nn.Module) -> tuple[EncoderCore, DecoderCore]:
    """Streaming encoder/decoder cores from an ``encodec.EncodecModel`` (24 kHz, causal).

    Weight norm is folded into plain weights copied out of the model; the caller's model is
    never modified.
    """
    sample_rate = getattr(model, "sample_rate", None)
    if sample_rate != SAMPLE_RATE or getattr(model, "channels", None) != 1:
        raise ValueError("StreamingEncodec needs the 24 kHz mono EnCodec model")
    if getattr(model, "normalize", False):
        raise ValueError("streaming needs a model without audio normalisation")
    hop = int(np.prod(model.encoder.ratios))
    if hop != FRAME_SAMPLES:
        raise ValueError(f"expected a {FRAME_SAMPLES}-sample hop, model has {hop}")
    work = model
    layers = work.quantizer.vq.layers
    codebooks = torch.stack([layer._codebook.embed.detach().clone() for layer in layers])
    if codebooks.shape[1] != CODEBOOK_SIZE:
        raise ValueError(f"expected {CODEBOOK_SIZE}-entry codebooks, got {codebooks.shape[1]}")
    for layer in layers:
        if not isinstance(layer.project_in, nn.Identity):
            raise ValueError("codebooks with projections are not supported")
    enc_layout, dec_layout = _StateLayout(), _StateLayout()
    enc_layers = _convert(work.encoder.model, enc_layout)
    dec_layers = _convert(work.decoder.model, dec_layout)
    encoder = EncoderCore(enc_layers, enc_layout.size, codebooks, n_q=len(layers)).eval()
    decoder = DecoderCore(dec_layers, dec_layout.size, codebooks).eval()
    return encoder, decoder


# --------------------------------------------------------------------------- input checks


def check_bandwidth(bandwidth_kbps: float) -> int:
    """The number of codebooks for a bandwidth, or ValueError naming the valid ones."""
    if isinstance(bandwidth_kbps, bool) or not isinstance(bandwidth_kbps, numbers.Real):
        raise ValueError(f"bandwidth_kbps must be a number, got {type(bandwidth_kbps).__name__}")
    for kbps, n_q in BANDWIDTH_CODEBOOKS.items():
        if math.isclose(float(bandwidth_kbps), kbps):
            return n_q
    raise ValueError(
        f"bandwidth_kbps {bandwidth_kbps} not supported; choose one of "
        f"{sorted(BANDWIDTH_CODEBOOKS)}")


def check_slots(slots: Any, capacity: int, expected: int | None = None) -> np.ndarray:
    """Slots as an int64 numpy array, or ValueError (type, shape, range, repeats, count)."""
    if isinstance(slots, torch.Tensor):
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
            raise ValueError(f"slots must be integers, got dtype {slots.dtype}")
        arr = slots.detach().cpu().numpy()
    elif isinstance(slots, np.ndarray):
        if slots.dtype.kind not in "iu":
            raise ValueError(f"slots must be integers, got dtype {slots.dtype}")
        arr = slots
    elif isinstance(slots, (list, tuple, range)):
        for s in slots:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise ValueError(f"slots must be integers, got {type(s).__name__}")
        arr = np.asarray(list(slots), dtype=np.int64)
    else:
        raise ValueError(f"slots must be a list, numpy array or tensor, got {type(slots).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"slots must be 1-D, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.int64, copy=False)
    if expected is not None and arr.shape[0] != expected:
        raise ValueError(f"got {arr.shape[0]} slots for a batch of {expected}")
    if arr.size:
        if arr.min() < 0 or arr.max() >= capacity:
            bad = int(arr[(arr < 0) | (arr >= capacity)][0])
            raise ValueError(f"slot {bad} out of range [0, {capacity})")
        if np.unique(arr).size != arr.size:
            values, counts = np.unique(arr, return_counts=True)
            raise ValueError(f"slot {int(values[counts > 1][0])} repeated in one call")
    return arr


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")


def check_pcm(pcm: Any, batch: int | None = None) -> torch.Tensor:
    """float32 [B, T], T a positive multiple of 320, all finite; else ValueError."""
    t = _as_tensor(pcm, "pcm")
    if t.dtype != torch.float32:
        raise ValueError(f"pcm must be float32, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"pcm must have shape [B, T], got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"pcm batch {t.shape[0]} does not match {batch} slots")
    if t.shape[1] == 0 or t.shape[1] % FRAME_SAMPLES:
        raise ValueError(f"pcm length {t.shape[1]} is not a positive multiple of {FRAME_SAMPLES}")
    # One reduction: a NaN/inf anywhere makes the sum non-finite (the exact check only runs
    # then, so a sum that merely overflowed is not mistaken for bad input).
    if t.numel() and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError("pcm contains NaN or inf")
    return t


def check_codes(codes: Any, batch: int | None = None) -> torch.Tensor:
    """integer [B, n_q, F], n_q in {2,4,8,16,32}, F > 0, values in [0, 1024); else ValueError."""
    t = _as_tensor(codes, "codes")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"codes must be integers, got dtype {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"codes must have shape [B, n_q, F], got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"codes batch {t.shape[0]} does not match {batch} slots")
    if t.shape[1] not in VALID_N_Q:
        raise ValueError(
            f"codes have {t.shape[1]} codebooks; valid counts are {sorted(VALID_N_Q)}")
    if t.shape[2] == 0:
        raise ValueError("codes have no frames")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= CODEBOOK_SIZE):
        raise ValueError(f"codes outside [0, {CODEBOOK_SIZE})")
    return t.to(torch.int64)


def _like(result: torch.Tensor, template: Any) -> ArrayLike:
    """Return ``result`` as the caller's kind: numpy in, numpy out; tensor in, same device."""
    if isinstance(template, np.ndarray):
        return result.cpu().numpy()
    return result.to(template.device)


def check_mask(mask: Any, capacity: int) -> torch.Tensor:
    """bool [capacity] (which slots advance), as a CPU tensor; else ValueError."""
    t = _as_tensor(mask, "mask")
    if t.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != capacity:
        raise ValueError(f"mask must have shape [{capacity}], got {tuple(t.shape)}")
    return t.cpu()


# --------------------------------------------------------------------------- masked step
#
# moshi's pattern (`CUDAGraphed`, `set_exec_mask`): streams advance at their own pace inside
# a batch of fixed shape. The gather step's batch is as large as the call, so its shapes (and
# its few hundred small kernels) change every step and cannot be captured in a CUDA graph;
# the masked step always runs one of a few fixed shapes with a mask of the rows that advance.


class StepMode(str, enum.Enum):
    """How `StreamingEncodec.encode` / `decode` advance the slots they are given."""

    GATHER = "gather"  # index_select the B named rows, run B rows, index_copy_ them back
    MASKED = "masked"  # run a fixed-shape bucket of rows; an execution mask says which advance


class StepPrecision(str, enum.Enum):
    """Arithmetic of the masked step's SEANet layers. In every mode the state is stored in
    float32 and codes are chosen with float32 distances (a near-tie flipped by rounding is a
    different code, so the quantizer never runs in reduced precision).

    Agreement with float32 that tests/models/test_masked_step.py holds each mode to (after
    1 s of streaming): state within 1% (tf32) / 3% (bf16) of its largest value, decoded audio
    within 10% of its peak. Codes agree only where the codebooks' cells are wider than the
    rounding, which depends on the weights: with random ones as few as 25% (bf16) / 60%
    (tf32) are required to be equal; `auralink bench codec --device cuda` reports the figures
    for the weights it runs.
    """

    FP32 = "fp32"  # IEEE float32; on CUDA TF32 is switched off, cuDNN convolutions included
    TF32 = "tf32"  # CUDA only: matmuls and convolutions in TF32
    BF16 = "bf16"  # weights and activations in bfloat16


# The CPU default, measured with `auralink bench codec` (docs/benchmarks.md, codec section):
# without graphs the masked step runs the same compute plus its buffer copies and merge, and
# neither path was faster beyond run-to-run spread, so the one doing less work stays.
CPU_DEFAULT_STEP = StepMode.GATHER
GRAPH_WARMUP_STEPS = 3  # eager runs on a side stream before capture (cuBLAS/cuDNN set-up)


def default_step(device: str | torch.device) -> StepMode:
    """CUDA runs the masked step (captured in graphs); CPU the measured faster one."""
    return StepMode.MASKED if torch.device(device).type == "cuda" else CPU_DEFAULT_STEP


def default_buckets(capacity: int, device: str | torch.device) -> tuple[int, ...] | None:
    """Row counts the masked step runs: on CUDA the powers of two below ``capacity``, then
    ``capacity`` (one CUDA graph each, at most twice the rows a call needs); on CPU ``None``:
    each call is its own bucket, so no padded compute (there are no graphs to bound)."""
    if torch.device(device).type != "cuda":
        return None
    sizes = []
    b = 1
    while b < capacity:
        sizes.append(b)
        b *= 2
    return (*sizes, capacity)


def check_buckets(buckets: Any, capacity: int) -> tuple[int, ...]:
    """Sorted distinct bucket sizes in [1, capacity], ending with ``capacity`` (every call
    fits one); else ValueError."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise ValueError(f"buckets must be a sequence of integers, got {type(buckets).__name__}")
    sizes = set()
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise ValueError(f"bucket sizes must be integers, got {b!r}")
        if not 1 <= b <= capacity:
            raise ValueError(f"bucket size {b} outside [1, {capacity}]")
        sizes.add(int(b))
    sizes.add(capacity)
    return tuple(sorted(sizes))


@contextlib.contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on (or off) in the block, restored after.

    PyTorch reads these process-wide flags when it launches a kernel, so kernels captured in
    a CUDA graph keep the precision they were captured with.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


RowsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _BucketStep:
    """One fixed-shape masked step over ``rows`` state rows: static index, mask and input
    buffers, and on CUDA the graph that replays it.

    ``old = state[index]; out, new = fn(input, old); state[index] = where(mask, new, old)``.
    A row whose mask is off is written back bit for bit as it was read, so padding rows and
    the warm-up runs before capture never move a stream.
    """

    def __init__(self, fn: RowsFn, state: torch.Tensor, rows: int, in_shape: tuple[int, ...],
                 in_dtype: torch.dtype) -> None:
        device = state.device
        self.fn = fn
        self.state = state  # the codec's [capacity, S] tensor: updated in place, never replaced
        self.rows = rows
        self.index = torch.arange(rows, device=device)  # distinct rows: a safe warm-up
        self.mask = torch.zeros(rows, dtype=torch.bool, device=device)
        self.input = torch.zeros((rows, *in_shape), dtype=in_dtype, device=device)
        self.output: torch.Tensor | None = None
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.capture_ms = 0.0

    def body(self) -> torch.Tensor:
        old = self.state.index_select(0, self.index)
        out, new = self.fn(self.input, old)
        self.state.index_copy_(0, self.index, torch.where(self.mask.unsqueeze(1), new, old))
        return out

    def capture(self) -> None:
        """Warm up on a side stream (the mask is all off: state-neutral), then capture."""
        device = self.state.device
        t0 = time.perf_counter()
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self.body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (another codec) cannot break the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self.body()
            torch.cuda.synchronize()
        self.graph, self.output = graph, output
        self.capture_ms = (time.perf_counter() - t0) * 1e3

    def run(self, index: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output rows ``[:len(x)]``, with ``x`` in the first rows of the input (rest zero)."""
        n = x.shape[0]
        self.index.copy_(index)
        self.mask.copy_(mask)
        self.input[:n].copy_(x)
        if n < self.rows:
            self.input[n:].zero_()
        if self.graph is None:
            return self.body()[:n]
        self.graph.replay()
        assert self.output is not None
        return self.output[:n].clone()  # the static output is overwritten by the next replay


class MaskedStep:
    """The graph-ready step over a codec's slot state: fixed-shape buckets with a mask.

    A call for B slots runs the smallest bucket of at least B rows: its first B rows are the
    caller's slots in the caller's order, the rest padding slots that do not advance (the
    lowest free ones). State rows are read by index and written back through
    ``torch.where(mask, new, old)`` with ``index_copy_`` into the codec's preallocated
    ``[capacity, S]`` tensors, so each bucket has one shape and, on CUDA, is captured once as
    a CUDA graph (per op, chunk length and codebook count) and replayed. Callers hold the
    codec's lock and inference mode.
    """

    def __init__(self, encoders: dict[int, EncoderCore], decoder: DecoderCore,
                 encoder_state: torch.Tensor, decoder_state: torch.Tensor,
                 buckets: tuple[int, ...] | None, precision: StepPrecision,
                 cuda_graphs: bool) -> None:
        self.capacity = encoder_state.shape[0]
        self.device = encoder_state.device
        self.buckets = buckets
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self._encoders = encoders
        self._decoder = decoder
        self._encoder_state = encoder_state
        self._decoder_state = decoder_state
        self._dtype = torch.bfloat16 if precision is StepPrecision.BF16 else torch.float32
        encoder = next(iter(encoders.values()))
        if self._dtype == torch.float32:
            self._enc_layers: EncoderCore = encoder
            self._dec_layers: DecoderCore = decoder
        else:  # reduced-precision copies of the SEANet layers; quantizer and codebooks stay fp32
            self._enc_layers = copy.deepcopy(encoder).to(self._dtype)
            self._dec_layers = copy.deepcopy(decoder).to(self._dtype)
        self._steps: dict[tuple[str, int, int, int], _BucketStep] = {}
        self.graph_failures = 0

    # -- shapes

    def bucket_for(self, n: int) -> int:
        if self.buckets is None:
            return n
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def rows_for(self, slots: np.ndarray) -> np.ndarray:
        """The slots a call for ``slots`` computes, in row order: the caller's, then padding."""
        pad = self.bucket_for(len(slots)) - len(slots)
        if not pad:
            return slots
        free = np.ones(self.capacity, dtype=bool)
        free[slots] = False
        return np.concatenate([slots, np.flatnonzero(free)[:pad]])

    # -- steps

    def encode(self, slots: np.ndarray, pcm: torch.Tensor, n_q: int) -> torch.Tensor:
        rows = self.rows_for(slots)
        step = self._step(("encode", len(rows), pcm.shape[1], n_q))
        return step.run(torch.from_numpy(rows), _first(len(rows), len(slots)), pcm)

    def decode(self, slots: np.ndarray, codes: torch.Tensor) -> torch.Tensor:
        rows = self.rows_for(slots)
        step = self._step(("decode", len(rows), codes.shape[2], codes.shape[1]))
        return step.run(torch.from_numpy(rows), _first(len(rows), len(slots)), codes)

    def encode_all(self, mask: torch.Tensor, pcm: torch.Tensor, n_q: int) -> torch.Tensor:
        step = self._step(("encode", self.capacity, pcm.shape[1], n_q))
        return step.run(torch.arange(self.capacity), mask, pcm)

    def decode_all(self, mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        step = self._step(("decode", self.capacity, codes.shape[2], codes.shape[1]))
        return step.run(torch.arange(self.capacity), mask, codes)

    @property
    def graphs(self) -> int:
        """CUDA graphs captured so far."""
        return sum(s.graph is not None for s in self._steps.values())

    def describe(self) -> list[dict[str, Any]]:
        """One entry per built step: op, rows, chunk samples or frames, n_q, graph, capture ms."""
        return [{"op": op, "rows": rows, "length": length, "n_q": n_q,
                 "graph": s.graph is not None, "capture_ms": round(s.capture_ms, 3)}
                for (op, rows, length, n_q), s in sorted(self._steps.items())]

    def prepare(self, op: str, rows: int, length: int, n_q: int) -> None:
        """Build (on CUDA: capture) the step for ``op`` ("encode": ``length`` samples;
        "decode": ``length`` frames) over ``rows`` rows, ahead of its first call."""
        self._step((op, rows, length, n_q))

    def _step(self, key: tuple[str, int, int, int]) -> _BucketStep:
        step = self._steps.get(key)
        if step is not None:
            return step
        op, rows, length, n_q = key
        if op == "encode":
            step = _BucketStep(self._encode_fn(n_q), self._encoder_state, rows, (length,),
                               torch.float32)
        else:
            step = _BucketStep(self._decode_fn(), self._decoder_state, rows, (n_q, length),
                               torch.int64)
        if self.cuda_graphs:
            try:
                step.capture()
            except RuntimeError as exc:
                # The eager masked step computes the same thing; say so loudly and go on.
                self.graph_failures += 1
                step.graph = step.output = None
                log.warning("CUDA graph capture failed for %s step of %d rows (%s); running "
                            "it eagerly", op, rows, exc)
        self._steps[key] = step
        return step

    def _layers_scope(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return tf32_scope(self.precision is StepPrecision.TF32)

    def _strict_scope(self) -> contextlib.AbstractContextManager:
        return tf32_scope(False) if self.device.type == "cuda" else contextlib.nullcontext()

    def _encode_fn(self, n_q: int) -> RowsFn:
        quantizer, layers, dtype = self._encoders[n_q], self._enc_layers, self._dtype

        def run(pcm: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with self._layers_scope():
                x, new_state = layers.features(pcm.to(dtype), state.to(dtype))
            with self._strict_scope():
                codes = quantizer.quantize(x.float())
            return codes, new_state.float()

        return run

    def _decode_fn(self) -> RowsFn:
        embed, layers, dtype = self._decoder, self._dec_layers, self._dtype

        def run(codes: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = embed.embed(codes)  # float32 sum of code vectors
            with self._layers_scope():
                pcm, new_state = layers.synthesize(x.to(dtype), state.to(dtype))
            return pcm.float(), new_state.float()

        return run


def _first(rows: int, n: int) -> torch.Tensor:
    """A mask of ``rows`` entries, the first ``n`` on."""
    return torch.arange(rows) < n


# --------------------------------------------------------------------------- public API


class SlotResets:
    """Stream (re)starts over slots; a backend implements `_zero(slots, encoder, decoder)`."""

    def reset(self, slots: SlotsLike) -> None:
        """A stream (re)starts: its encoder and decoder state go to zero."""
        self._zero(slots, encoder=True, decoder=True)

    def reset_encoder(self, slots: SlotsLike) -> None:
        self._zero(slots, encoder=True, decoder=False)

    def reset_decoder(self, slots: SlotsLike) -> None:
        self._zero(slots, encoder=False, decoder=True)

    def _zero(self, slots: SlotsLike, encoder: bool, decoder: bool) -> None:
        raise NotImplementedError


class StreamingEncodec(SlotResets):
    """Streaming EnCodec 24 kHz over ``capacity`` per-stream state slots.

    ``encode(slots, pcm)`` / ``decode(slots, codes)`` advance only the named slots' state;
    ``reset(slots)`` (re)starts streams. Bad input raises ``ValueError`` before any state is
    touched. Calls are serialised by a lock, so one object can serve several threads.

    ``step`` chooses how a call runs (`StepMode`; default: masked on CUDA, the measured
    faster one on CPU): the gather step runs exactly the named rows; the masked step
    (`MaskedStep`) runs a fixed-shape bucket of rows (``buckets``, default
    `default_buckets`) with an execution mask, captured as CUDA graphs when ``cuda_graphs``
    (default: on CUDA), in ``precision`` (`StepPrecision`). ``encode_masked`` /
    ``decode_masked`` are the masked step over every slot (moshi's exec mask).
    """

    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES

    def __init__(self, model: nn.Module, capacity: int = 64, device: str | torch.device = "cpu",
                 bandwidth_kbps: float = 6.0, *, step: StepMode | str | None = None,
                 buckets: Sequence[int] | None = None,
                 precision: StepPrecision | str = StepPrecision.FP32,
                 cuda_graphs: bool | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = int(capacity)
        self.n_q = check_bandwidth(bandwidth_kbps)
        self.bandwidth_kbps = float(bandwidth_kbps)
        self.device = torch.device(device)
        self.step = default_step(self.device) if step is None else _choice(StepMode, step, "step")
        precision = _choice(StepPrecision, precision, "precision")
        cuda = self.device.type == "cuda"
        if precision is StepPrecision.TF32 and not cuda:
            raise ValueError("precision tf32 needs a CUDA device")
        if cuda_graphs is None:
            cuda_graphs = cuda
        elif cuda_graphs and not cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        bucket_sizes = (default_buckets(self.capacity, self.device) if buckets is None
                        else check_buckets(buckets, self.capacity))
        encoder, decoder = build_cores(model)
        self._encoder = encoder.to(self.device)
        self._decoder = decoder.to(self.device)
        self._encoders = {n: self._encoder.with_n_q(n) for n in VALID_N_Q}
        self.encoder_state = torch.zeros(self.capacity, encoder.state_size, device=self.device)
        self.decoder_state = torch.zeros(self.capacity, decoder.state_size, device=self.device)
        self._lock = threading.Lock()
        # Holds the state tensors above: they are updated in place from here on, never replaced.
        self.masked = MaskedStep(self._encoders, self._decoder, self.encoder_state,
                                 self.decoder_state, bucket_sizes, precision, bool(cuda_graphs))

    # -- streaming calls

    def encode(self, slots: SlotsLike, pcm: ArrayLike,
               bandwidth_kbps: float | None = None) -> ArrayLike:
        """pcm float32 [B, T] (T % 320 == 0) -> codes int64 [B, n_q, T // 320]."""
        n_q = self.n_q if bandwidth_kbps is None else check_bandwidth(bandwidth_kbps)
        x = check_pcm(pcm)
        idx = check_slots(slots, self.capacity, expected=x.shape[0])
        if x.shape[0] == 0:
            return _like(torch.zeros(0, n_q, x.shape[1] // FRAME_SAMPLES, dtype=torch.int64), pcm)
        with self._lock, torch.inference_mode():
            if self.step is StepMode.MASKED:
                codes = self.masked.encode(idx, x, n_q)
            else:
                index = torch.from_numpy(idx).to(self.device)
                state = self.encoder_state.index_select(0, index)
                codes, new_state = self._encoders[n_q](x.to(self.device), state)
                self.encoder_state.index_copy_(0, index, new_state)
        return _like(codes, pcm)

    def decode(self, slots: SlotsLike, codes: ArrayLike) -> ArrayLike:
        """codes integer [B, n_q, F] -> pcm float32 [B, F * 320]."""
        c = check_codes(codes)
        idx = check_slots(slots, self.capacity, expected=c.shape[0])
        if c.shape[0] == 0:
            return _like(torch.zeros(0, c.shape[2] * FRAME_SAMPLES), codes)
        with self._lock, torch.inference_mode():
            if self.step is StepMode.MASKED:
                pcm = self.masked.decode(idx, c)
            else:
                index = torch.from_numpy(idx).to(self.device)
                state = self.decoder_state.index_select(0, index)
                pcm, new_state = self._decoder(c.to(self.device), state)
                self.decoder_state.index_copy_(0, index, new_state)
        return _like(pcm, codes)

    def encode_masked(self, mask: ArrayLike, pcm: ArrayLike,
                      bandwidth_kbps: float | None = None) -> ArrayLike:
        """The masked step over every slot: ``pcm [capacity, T]`` and ``mask [capacity]``
        (bool, the slots that advance) -> codes ``[capacity, n_q, T // 320]``. Slots whose
        mask is off keep their state bit for bit; their rows of codes mean nothing."""
        n_q = self.n_q if bandwidth_kbps is None else check_bandwidth(bandwidth_kbps)
        x = check_pcm(pcm, batch=self.capacity)
        m = check_mask(mask, self.capacity)
        with self._lock, torch.inference_mode():
            codes = self.masked.encode_all(m, x, n_q)
        return _like(codes, pcm)

    def decode_masked(self, mask: ArrayLike, codes: ArrayLike) -> ArrayLike:
        """The masked step over every slot: codes ``[capacity, n_q, F]``, ``mask [capacity]``
        -> pcm ``[capacity, F * 320]`` (rows of slots whose mask is off mean nothing)."""
        c = check_codes(codes, batch=self.capacity)
        m = check_mask(mask, self.capacity)
        with self._lock, torch.inference_mode():
            pcm = self.masked.decode_all(m, c)
        return _like(pcm, codes)

    def warmup(self, chunk_samples: int = 960, decode_n_q: Sequence[int] | None = None) -> int:
        """Build (on CUDA: capture) the masked steps of every bucket ahead of traffic, for
        ``chunk_samples`` chunks, encoding at this codec's bandwidth and decoding at
        ``decode_n_q`` codebooks (default: this codec's). Returns the CUDA graphs held.
        State is untouched (the steps warm up with every row masked off)."""
        if self.masked.buckets is None:
            return self.masked.graphs  # exact buckets: nothing to prepare ahead of a call
        check_pcm(torch.zeros(1, chunk_samples))
        depths = [self.n_q] if decode_n_q is None else list(decode_n_q)
        for n_q in depths:
            if n_q not in VALID_N_Q:
                raise ValueError(f"decode_n_q {n_q} not in {sorted(VALID_N_Q)}")
        frames = chunk_samples // FRAME_SAMPLES
        with self._lock, torch.inference_mode():
            for rows in self.masked.buckets:
                self.masked.prepare("encode", rows, chunk_samples, self.n_q)
                for n_q in depths:
                    self.masked.prepare("decode", rows, frames, n_q)
        return self.masked.graphs

    # -- stream lifecycle

    def _zero(self, slots: SlotsLike, encoder: bool, decoder: bool) -> None:
        idx = check_slots(slots, self.capacity)
        if not idx.size:
            return
        with self._lock, torch.inference_mode():
            index = torch.from_numpy(idx).to(self.device)
            if encoder:
                self.encoder_state.index_fill_(0, index, 0.0)
            if decoder:
                self.decoder_state.index_fill_(0, index, 0.0)

    # -- introspection

    @property
    def encoder_core(self) -> EncoderCore:
        return self._encoder

    @property
    def decoder_core(self) -> DecoderCore:
        return self._decoder

    @property
    def state_bytes_per_stream(self) -> int:
        """Encoder plus decoder state of one stream, in bytes."""
        return (self.encoder_state.shape[1] + self.decoder_state.shape[1]) * \
            self.encoder_state.element_size()


def _choice(kind: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {[k.value for k in kind]}, got {value!r}") from None
