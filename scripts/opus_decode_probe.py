"""What one publisher packet's Opus decode costs (the replica's by default; the worker's with
AURALINK_DECODE_AT=bridge), alone in a loop:

    .venv/bin/python scripts/opus_decode_probe.py

The libopus of `models.opus.OpusChunkDecoder` (what `OpusIngest` and the replica's `OpusIntake` use, 24 kHz mono) decodes
the bridge bench's publisher packets (`cluster.bench.bridge._opus_loop`: 32 kbps, 20 ms,
speech-like audio) `--packets` times per round; prints the best round's microseconds per
packet. A stream's 40 ms tick decodes two of them (docs/benchmarks.md, section "bridge")."""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.bridge import _opus_loop  # noqa: E402
from models.opus import CHUNK_RATE as INGEST_RATE  # noqa: E402
from models.opus import MAX_PACKET_SAMPLES, libopus_decoder_api  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    lib = libopus_decoder_api()
    err = ctypes.c_int()
    dec = lib.opus_decoder_create(INGEST_RATE, 1, ctypes.byref(err))
    if err.value != 0 or not dec:
        raise SystemExit(f"opus_decoder_create failed ({err.value})")
    buf = np.zeros(MAX_PACKET_SAMPLES, np.float32)
    packets = _opus_loop()
    rounds = []
    for _ in range(args.rounds):
        t0 = time.thread_time()
        for i in range(args.packets):
            p = packets[i % len(packets)]
            lib.opus_decode_float(dec, p, len(p), buf.ctypes.data, MAX_PACKET_SAMPLES, 0)
        rounds.append((time.thread_time() - t0) * 1e6 / args.packets)
    lib.opus_decoder_destroy(dec)
    print(f"libopus decode at {INGEST_RATE} Hz, {len(packets)} distinct 20 ms packets of "
          f"{sum(map(len, packets)) / len(packets):.0f} bytes: best {min(rounds):.2f} us per packet "
          f"(rounds: {', '.join(f'{r:.2f}' for r in rounds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
