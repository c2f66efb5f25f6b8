"""Hint traffic of simulated publishers: honest hints plus flooders, forgers and replayers.

Each tick every live stream may send hints (the 16-byte AIC hint element, signed with its
stream key by the real `HintSigner`):

- honest streams: Poisson, `normal_rate` hints/s, each asking for a bandwidth drawn from the
  EnCodec layers (1.5 ... 24 kbps; `honest_bandwidths_kbps`), so the bridge re-quantizes the
  stream from its next tick and the report counts AI bytes per layer;
- flooders: `flood_rate` validly signed hints/s, far above the 100/s per-stream limit;
- forgers: `abuse_rate` hints/s whose tag was not made with the stream's key;
- replayers: a fresh valid hint now and then, plus `abuse_rate` copies/s of hints they
  already sent (so every copy is a replay the window must reject).

The plan says which hint is which, so the driver can check that *every* forged and replayed
hint was rejected and count what the limiter let through per flooder.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from cluster.simulator.traces import StreamKind, StreamPopulation
from models.constants import BANDWIDTHS_KBPS
from sfu_bridge.hint_auth import HintSigner
from sfu_bridge.hint_ext import HINT_BODY_BYTES, HINT_TAG_BYTES, Hint


class HintKind(enum.IntEnum):
    HONEST = 0
    FLOOD = 1
    FORGED = 2
    REPLAY = 3


@dataclass(frozen=True)
class HintRates:
    normal_rate: float = 0.5  # hints/s per honest stream
    flood_rate: float = 250.0  # hints/s per flooder
    abuse_rate: float = 20.0  # forged (or replayed) hints/s per forger (replayer)
    replayer_fresh_rate: float = 2.0  # valid hints/s a replayer sends (what it replays)
    # the bandwidths honest hints ask for (drawn uniformly; abusers' hints ask for 6 kbps)
    honest_bandwidths_kbps: tuple[float, ...] = BANDWIDTHS_KBPS


class HintTraffic:
    def __init__(self, pop: StreamPopulation, secret: bytes, rates: HintRates, seed: int = 0) -> None:
        self.pop = pop
        self.rates = rates
        self.signer = HintSigner(cluster_secret=secret)
        self.rng = np.random.default_rng(seed + 7919)
        self.next_index: dict[str, int] = {}
        self.sent_by_stream: dict[str, list[bytes]] = {}  # replayers' own hints, to replay
        self.carry = np.zeros(pop.n_slots)  # fractional hints owed to fixed-rate senders
        self.sent = np.zeros(len(HintKind), np.int64)

    def _sign(self, sid: str, bandwidth_kbps: float = 6.0) -> bytes:
        idx = self.next_index.get(sid, 0)
        self.next_index[sid] = idx + 1
        return self.signer.sign(sid, Hint(model_id=0, bandwidth_kbps=bandwidth_kbps, epoch=1, seq=idx))

    def _honest(self, sid: str) -> bytes:
        bws = self.rates.honest_bandwidths_kbps
        return self._sign(sid, float(bws[int(self.rng.integers(len(bws)))]))

    def forget(self, stream_ids: list[str]) -> None:
        for sid in stream_ids:
            self.next_index.pop(sid, None)
            self.sent_by_stream.pop(sid, None)

    def tick(self, live: np.ndarray, dt: float) -> list[tuple[str, bytes, HintKind]]:
        """The hints sent during one tick of `dt` seconds by the live slots."""
        pop, r = self.pop, self.rates
        kind = pop.kind[live]
        rate = np.select(
            [kind == StreamKind.NORMAL, kind == StreamKind.FLOODER],
            [r.normal_rate, r.flood_rate],
            r.abuse_rate,
        )
        honest = kind == StreamKind.NORMAL
        n = np.zeros(live.size, np.int64)
        n[honest] = self.rng.poisson(rate[honest] * dt)
        # Abusers send at a steady rate: carry the fraction from tick to tick.
        ab = ~honest
        owed = self.carry[live[ab]] + rate[ab] * dt
        n[ab] = np.floor(owed).astype(np.int64)
        self.carry[live[ab]] = owed - n[ab]
        out: list[tuple[str, bytes, HintKind]] = []
        sids = pop.stream_ids
        for j in np.flatnonzero(n).tolist():
            slot = int(live[j])
            sid = sids[slot]
            k = int(kind[j])
            for _ in range(int(n[j])):
                if k == StreamKind.NORMAL:
                    out.append((sid, self._honest(sid), HintKind.HONEST))
                elif k == StreamKind.FLOODER:
                    out.append((sid, self._sign(sid), HintKind.FLOOD))
                elif k == StreamKind.FORGER:
                    body = self._sign(sid)[:HINT_BODY_BYTES]
                    out.append((sid, body + self.rng.bytes(HINT_TAG_BYTES), HintKind.FORGED))
                else:
                    past = self.sent_by_stream.get(sid)
                    if past:
                        out.append((sid, past[int(self.rng.integers(len(past)))], HintKind.REPLAY))
        # Replayers' own fresh hints (accepted once; they are what gets replayed later).
        rep = live[kind == StreamKind.REPLAYER]
        if rep.size:
            fresh = self.rng.poisson(r.replayer_fresh_rate * dt, rep.size)
            for slot, m in zip(rep.tolist(), fresh.tolist(), strict=True):
                sid = sids[slot]
                if m == 0 and sid not in self.sent_by_stream:
                    m = 1  # a replayer needs one genuine hint before it can replay anything
                for _ in range(m):
                    raw = self._sign(sid)
                    self.sent_by_stream.setdefault(sid, []).append(raw)
                    del self.sent_by_stream[sid][:-32]
                    out.insert(0, (sid, raw, HintKind.HONEST))
        for _, _, hk in out:
            self.sent[hk] += 1
        return out
