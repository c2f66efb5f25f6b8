"""`CpuMeter`: thread CPU seconds spent inside marked sections of code.

The media plane's parts (the bridge core, the codec client, the replica's bookkeeping)
count their own CPU this way, so a load test can report what the control plane costs per
stream and tick without counting what it does not own (the model's compute in its executor
thread, awaiting the network, the emulated publishers of a load test). Sections nest (the
outermost one counts); they must not span an `await`, where other coroutines run.
"""

from __future__ import annotations

import gc
import time


class CpuMeter:
    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._t0 = 0.0

    def __enter__(self) -> CpuMeter:
        if self._depth == 0:
            self._t0 = time.thread_time()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.thread_time() - self._t0


class GcWatch:
    """Pauses of Python's cyclic garbage collector in this process, by generation: a media
    process whose heap holds millions of objects (Ray, Serve) can stop for tens of ms in one
    full collection, which a load test must be able to tell from its own work. `start()`
    registers a `gc.callbacks` hook (a few attribute writes per collection); `stop()` removes it."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_pause_s = 0.0
        self._t0 = 0.0
        self._on = False

    def _hook(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        dt = time.perf_counter() - self._t0
        g = int(info.get("generation", 2))
        self.collections[g] += 1
        self.pause_s[g] += dt
        if dt > self.max_pause_s:
            self.max_pause_s = dt

    def start(self) -> GcWatch:
        if not self._on:
            gc.callbacks.append(self._hook)
            self._on = True
        return self

    def stop(self) -> None:
        if self._on:
            gc.callbacks.remove(self._hook)
            self._on = False

    def snapshot(self) -> dict[str, float | list[int] | list[float]]:
        return {"collections": list(self.collections),
                "pause_s": [round(s, 4) for s in self.pause_s],
                "max_pause_ms": round(self.max_pause_s * 1000.0, 2)}
