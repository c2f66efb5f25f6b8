"""The modelled capacity profile: its formula, its FLOP count, the shipped H100 file, and the
labels a simulation run gives a modelled versus a measured profile."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cluster.bench.model_profile import (
    DEVICES,
    ENCODER_CONV_GFLOP_PER_S,
    ENCODER_LSTM_DIM,
    ENCODER_LSTM_LAYERS,
    PROFILE_MEASURED,
    PROFILE_MODELLED,
    CapacityModel,
    quantizer_gflop_per_s,
)
from cluster.simulator.environment import load_profile, load_profile_file
from deployments.config import ReplicaSettings, profile_ms

REPO = Path(__file__).resolve().parents[2]
H100 = REPO / "docs" / "bench" / "profile-h100-modelled.json"
MEASURED = REPO / "docs" / "bench" / "codec.json"


def test_step_time_follows_the_formula():
    m = CapacityModel.for_device("h100-sxm", efficiency=0.10, overhead_ms=2.0)
    assert m.peak_tflops == 989.4
    # Encode of a 40 ms frame: convolutions + LSTM + 32 codebooks, per audio-second x 0.04.
    gflop = (2.3503872 + 2 * 2 * 4 * 512 * 1024 * 75 / 1e9 + 2 * 32 * 1024 * 128 * 75 / 1e9) * 0.04
    assert m.gflop_per_chunk == pytest.approx(gflop, rel=1e-12)
    for b in (1, 7, 100, 10_000):
        assert m.step_ms(b) == pytest.approx(2.0 + b * gflop / (989.4 * 0.10), rel=1e-12)
    # Halving the efficiency doubles the per-frame cost, not the overhead.
    half = CapacityModel.for_device("h100-sxm", efficiency=0.05, overhead_ms=2.0)
    assert half.step_ms(1000) - 2.0 == pytest.approx(2 * (m.step_ms(1000) - 2.0))
    # A shallower quantizer is cheaper; an unknown device needs its peak.
    assert CapacityModel.for_device("h100-sxm", 0.1, 2.0, bandwidth_kbps=6.0).gflop_per_chunk < gflop
    assert CapacityModel.for_device("my-gpu", 0.1, 1.0, peak_tflops=100.0).per_frame_ms == pytest.approx(
        gflop / 10.0)
    with pytest.raises(ValueError, match="unknown device 'my-gpu'"):
        CapacityModel.for_device("my-gpu", 0.1, 1.0)
    with pytest.raises(ValueError, match="efficiency must be in"):
        CapacityModel.for_device("h100-sxm", 1.5, 1.0)


def test_the_shipped_h100_profile_is_what_the_command_writes():
    doc = json.loads(H100.read_text())
    assert doc["profile"] == PROFILE_MODELLED and doc["modelled"] is True
    p = doc["profile_parameters"]
    assert (p["device"], p["peak_tflops"], p["efficiency"], p["overhead_ms"]) == ("h100-sxm", 989.4, 0.1, 2.0)
    assert "SXM" in p["device_name"] and "datasheet" in p["peak_source"]
    m = CapacityModel.for_device("h100-sxm", 0.10, 2.0)
    assert doc == m.document(doc["command"])
    assert doc["command"].startswith("auralink bench model-profile --device h100-sxm")


def test_loading_a_modelled_profile_labels_it_and_replicas_take_it_unchanged():
    loaded = load_profile_file(H100)
    assert loaded is not None
    assert loaded.kind == PROFILE_MODELLED
    assert loaded.parameters == json.loads(H100.read_text())["profile_parameters"]
    assert PROFILE_MODELLED in loaded.device and "989.4" in loaded.device
    m = CapacityModel.for_device("h100-sxm", 0.10, 2.0)
    # The emulated replica's own interpolation reproduces the formula between and past the
    # written batch sizes (it is linear).
    settings = ReplicaSettings(compute="emulated", latency_profile=loaded.ms,
                               latency_profile_device=loaded.device)
    for b in (1, 3, 1000, 5000, 20_000):
        assert profile_ms(settings.latency_profile, b) == pytest.approx(m.step_ms(b), abs=1e-5)
    assert load_profile(H100) == (loaded.ms, loaded.device, loaded.weights)


def test_a_measured_profile_is_labelled_measured():
    loaded = load_profile_file(MEASURED)
    assert loaded is not None and loaded.kind == PROFILE_MEASURED and loaded.parameters is None
    assert "auralink bench codec" in loaded.device


def test_a_modelled_profile_without_its_parameters_is_refused(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"modelled": True, "latency_profile_ms": {"1": 2.0}}))
    with pytest.raises(ValueError, match="needs its profile_parameters"):
        load_profile_file(bad)


def test_simulate_arguments_carry_the_label_and_print_every_parameter(tmp_path, capsys):
    from cluster.simulate import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--profile", str(H100), "--compute", "emulated",
                                         "--out", str(tmp_path)]))
    assert cfg.profile_kind == PROFILE_MODELLED
    assert cfg.profile_parameters["efficiency"] == 0.1
    out = capsys.readouterr().out
    assert f"profile: {PROFILE_MODELLED}" in out
    for key in ("peak_tflops: 989.4", "efficiency: 0.1", "overhead_ms: 2", "gflop_per_chunk",
                "formula"):
        assert key in out, key
    cfg = config_from_args(p.parse_args(["--profile", str(MEASURED), "--out", str(tmp_path)]))
    assert cfg.profile_kind == PROFILE_MEASURED and cfg.profile_parameters is None


def test_the_flop_figures_match_the_model(encodec_model_24k):
    """The convolution and quantizer FLOPs are what torch's counter counts on the reference
    model (it counts matmuls and convolutions exactly, independent of the CPU); the LSTM it
    does not count has the shape the analytic term assumes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = encodec_model_24k
    x = torch.zeros(1, 1, 24_000)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            emb = model.encoder(x)
        assert fc.get_total_flops() / 1e9 == pytest.approx(ENCODER_CONV_GFLOP_PER_S, rel=1e-9)
        with FlopCounterMode(display=False) as fc:
            model.quantizer.encode(emb, model.frame_rate, 24.0)
        assert fc.get_total_flops() / 1e9 == pytest.approx(quantizer_gflop_per_s(32), rel=1e-9)
    lstms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.LSTM)]
    assert len(lstms) == 1
    lstm = lstms[0]
    assert (lstm.num_layers, lstm.input_size, lstm.hidden_size) == (
        ENCODER_LSTM_LAYERS, ENCODER_LSTM_DIM, ENCODER_LSTM_DIM)
    assert model.frame_rate == 75
    assert set(DEVICES) >= {"h100-sxm"}
