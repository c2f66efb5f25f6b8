"""`auralink bench codec` runs end to end on a tiny setting and writes the documented JSON."""

from __future__ import annotations

import json

from cluster.cli import main


def test_bench_codec_writes_json(tmp_path, capsys):
    out = tmp_path / "codec.json"
    rc = main(["bench", "codec", "--json", str(out), "--batches", "2,1", "--seconds", "0.12",
               "--budget", "1", "--weights", "random", "--device", "cpu", "--no-docs"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["weights"] == "random (codebooks k-means initialised)"
    assert data["bandwidth_kbps"] == 6.0 and data["n_q"] == 8
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for row in data["results"]:
        for key in ("streams_realtime_encode", "streams_realtime_decode", "p50_ms", "p99_ms",
                    "offline_streams_realtime", "sliding_window_streams_realtime"):
            assert row[key] > 0, key
        assert row["p99_ms"] >= row["p50_ms"]
    assert set(data["latency_profile_ms"]) == {"1", "2"}
    assert data["latency_profile_ms"]["2"]["p50"] == data["results"][1]["p50_ms"]
    printed = capsys.readouterr()
    assert "[B=2] sliding window" in printed.out
    assert "RANDOM" in printed.err


def test_bench_codec_rejects_bad_batches(tmp_path):
    rc = main(["bench", "codec", "--json", str(tmp_path / "x.json"), "--batches", "a,b",
               "--no-docs"])
    assert rc == 2
