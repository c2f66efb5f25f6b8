"""`auralink bench control-plane` at a small size: both parts run through the real core and
replica (every frame answered, hints verified and limited) and the figures are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_control_plane_bench_writes_both_figures(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "control-plane", "--streams", "200", "--seconds", "2",
         "--frames", "100", "--ticks", "6", "--json", str(out), "--no-docs"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    b, r = data["bridge"], data["replica"]
    assert b["stream_ticks"] > 0 and b["bridge_core_us_per_stream_tick"] > 0
    # the run's hint mix reached the verifier and the limiter: forged and replayed ones rejected
    assert b["hints"]["accepted"] > 0 and b["hints"]["dropped/tag"] > 0 and b["hints"]["dropped/replay"] > 0
    assert r["outcomes"] == {"ai": r["frames"]} and r["replica_bookkeeping_us_per_frame"] > 0
    assert data["profile"] == "modelled (not measured)" and data["compute"] == "emulated"
