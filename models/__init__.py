"""Streaming EnCodec with per-stream state slots, the Opus fallback codec, bit packing,
ONNX export/runtime and weight loading. No Ray, HTTP or Redis in here."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "StreamingEncodec": "models.streaming",
    "load_encodec": "models.weights",
    "WeightsInfo": "models.weights",
    "WeightsUnavailable": "models.weights",
    "pack_codes": "models.bitpack",
    "unpack_codes": "models.bitpack",
    "payload_bits": "models.bitpack",
    "OpusCodec": "models.opus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: `import models` must not pull in torch for the parts that only need bit packing.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
