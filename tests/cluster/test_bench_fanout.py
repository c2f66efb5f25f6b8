"""`bench fanout` end to end at a small size: separate worker processes cascading one stream,
emulated and real WebRTC subscribers, every frame delivered (run with the heavy lock: it
starts worker processes and aiortc peers)."""

from __future__ import annotations

import argparse
import json

from cluster.bench import fanout


def test_fanout_small_delivers_every_frame(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    fanout.add_arguments(parser)
    out = tmp_path / "fanout.json"
    args = parser.parse_args(["--json", str(out), "--no-docs", "--subscribers", "42", "--workers", "3",
                              "--ticks", "10", "--real-webrtc", "2", "--receiver-procs", "1"])
    assert fanout.run(args) == 0
    d = json.loads(out.read_text())
    for key in ("subscribers", "workers", "frames_expected", "delivered_ratio", "p99_fanout_ms",
                "us_per_packet", "real_webrtc_subscribers"):
        assert key in d
    assert d["subscribers"] == 42 and d["workers"] == 3 and d["real_webrtc_subscribers"] == 2
    assert d["frames_expected"] == 42 * d["chunks"] and d["chunks"] == 10
    assert d["delivered_ratio"] == 1.0
    assert d["emulated_sequence_gaps"] == 0
    assert d["real_webrtc_frames"] == [10.0, 10.0]
    # the owner relayed to both other workers, nothing was dropped
    assert len(d["relay"]["received"]) == 2 and all(r["datagrams"] > 0 for r in d["relay"]["received"])
    assert d["relay"]["drops"] == [{}, {}, {}]
    # the publisher's packets took the bridge's native receive, subscribers' the native send
    assert d["receive_path"].startswith("native") and d["send_path"].startswith("native")
