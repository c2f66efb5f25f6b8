"""GcWatch: the collector's pauses are counted by generation while it watches, not after."""

from __future__ import annotations

import gc

from deployments.cpu_meter import GcWatch


def test_counts_collections_while_started_only():
    watch = GcWatch().start()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        watch.stop()
    snap = watch.snapshot()
    assert snap["collections"][0] >= 1 and snap["collections"][2] >= 1
    assert snap["max_pause_ms"] >= 0.0
    before = list(watch.collections)
    gc.collect()
    assert watch.collections == before  # stopped: no hook left behind
    assert watch._hook not in gc.callbacks
