"""Shared fixtures. Tests never download anything: models use random weights from fixed seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def encodec_model_24k():
    """The reference 24 kHz EnCodec model with random weights from a fixed seed."""
    import torch
    from encodec import EncodecModel

    torch.manual_seed(1234)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.eval()
    return model
