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
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 320  # encoder hop: strides 2*4*5*8
CODEBOOK_SIZE = 1024
# Bandwidth (kbps) -> number of RVQ codebooks (10 bits each at 75 frames/s).
BANDWIDTH_CODEBOOKS: dict[float, int] = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
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
        x = pcm.unsqueeze(1)
        new_states: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x, state, new_states)
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
        out = torch.stack(codes, dim=1).reshape(-1, frames, self.n_q).transpose(1, 2)
        return out, _cat_states(new_states, state)


class DecoderCore(nn.Module):
    """Pure decode step: ``(codes [B, n_q, F], state [B, S]) -> (pcm [B, F*320], state')``."""

    def __init__(self, layers: list[nn.Module], state_size: int, codebooks: torch.Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.state_size = state_size
        self.register_buffer("codebooks", codebooks.contiguous())

    def forward(self, codes: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_q = codes.shape[1]
        # Sum of the chosen code vectors, in the reference's order (book 0 first).
        emb = F.embedding(codes[:, 0], self.codebooks[0])
        for q in range(1, n_q):
            emb = emb + F.embedding(codes[:, q], self.codebooks[q])
        x = emb.transpose(1, 2).contiguous()  # [B, D, F]
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
    """

    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES

    def __init__(self, model: nn.Module, capacity: int = 64, device: str | torch.device = "cpu",
                 bandwidth_kbps: float = 6.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = int(capacity)
        self.n_q = check_bandwidth(bandwidth_kbps)
        self.bandwidth_kbps = float(bandwidth_kbps)
        self.device = torch.device(device)
        encoder, decoder = build_cores(model)
        self._encoder = encoder.to(self.device)
        self._decoder = decoder.to(self.device)
        self._encoders = {n: self._encoder.with_n_q(n) for n in VALID_N_Q}
        self.encoder_state = torch.zeros(self.capacity, encoder.state_size, device=self.device)
        self.decoder_state = torch.zeros(self.capacity, decoder.state_size, device=self.device)
        self._lock = threading.Lock()

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
            index = torch.from_numpy(idx).to(self.device)
            state = self.decoder_state.index_select(0, index)
            pcm, new_state = self._decoder(c.to(self.device), state)
            self.decoder_state.index_copy_(0, index, new_state)
        return _like(pcm, codes)

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

