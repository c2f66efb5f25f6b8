"""The dashboard in a real headless Chromium, end to end against a running `auralink simulate`:
the bitrate graph updates, and the per-user toggle turns AI off in the simulated bridge
(browser -> ingress -> FallbackSupervisor -> bridge -> stats board -> browser) and on again."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECRET = "browser-test-secret-0123456789ab"
REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.browser, pytest.mark.ray]


def _wait_for_url(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = re.search(r"operator dashboard: (http://\S+)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        if proc.poll() is not None:
            pytest.fail(f"auralink simulate exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            proc.wait(0.25)  # bounded wait on the process instead of a sleep
        except subprocess.TimeoutExpired:
            pass
    pytest.fail(f"no dashboard URL within {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_dashboard_graph_and_toggle_in_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (bash scripts/setup.sh --test)")
    from playwright.sync_api import sync_playwright

    from sfu_bridge.tokens import TokenAuthority

    env = dict(os.environ, AURALINK_SECRET=SECRET, RAY_USAGE_STATS_ENABLED="0")
    env.pop("REDIS_URL", None)
    out = tmp_path / "sim"
    log = tmp_path / "simulate.log"
    cmd = [sys.executable, "-m", "cluster.cli", "simulate", "--compute", "emulated", "--streams", "8", "--duration", "45", "--time-dilation", "1",
           "--replicas", "1", "--flooders", "0", "--forgers", "0", "--replayers", "0",
           "--no-progress", "--out", str(out)]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = _wait_for_url(proc, log, 120)
        token = TokenAuthority(SECRET.encode()).issue("ops", "*", ["operator"], ttl_s=600)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}#token={token}")
            # The graph updates: its point count grows while the simulation runs.
            page.wait_for_function("Number(document.getElementById('graph').dataset.points) >= 2",
                                   timeout=60_000)
            first = int(page.get_attribute("#graph", "data-points"))
            page.wait_for_function(f"Number(document.getElementById('graph').dataset.points) > {first}",
                                   timeout=10_000)
            assert page.is_visible("#experimental")
            page.wait_for_selector("#users tbody tr[data-user] .state-on", timeout=30_000)
            user = page.get_attribute("#users tbody tr[data-user]:has(.state-on)", "data-user")
            row = f"#users tbody tr[data-user='{user}']"
            page.uncheck(f"{row} .ai-toggle")
            # Off in the bridge: the bridge reports the stream opted out in its next snapshot.
            page.wait_for_function(
                f"document.querySelector(\"{row} .state\")?.textContent === 'AI off (opted out)'",
                timeout=20_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            shot = os.environ.get("AURALINK_DASHBOARD_SCREENSHOT")
            if shot:
                shutil.copy(tmp_path / "dashboard.png", shot)
            page.check(f"{row} .ai-toggle")
            page.wait_for_function(
                f"document.querySelector(\"{row} .state\")?.textContent === 'AI on'", timeout=20_000)
            browser.close()
        proc.wait(timeout=180)
        assert proc.returncode == 0, log.read_text()[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["frames_unaccounted"] == 0
        assert report["fallback_by_reason"].get("opted_out", 0) > 0  # the toggle reached the media path
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
