"""`CpuMeter`: thread CPU seconds spent inside marked sections of code.

The media plane's parts (the bridge core, the codec client, the replica's bookkeeping)
count their own CPU this way, so a load test can report what the control plane costs per
stream and tick without counting what it does not own (the model's compute in its executor
thread, awaiting the network, the emulated publishers of a load test). Sections nest (the
outermost one counts); they must not span an `await`, where other coroutines run.
"""

from __future__ import annotations

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
