"""The epoch rule: encoder and decoder state of a stream advance together. Written once, here.

Each frame carries its stream's `epoch` and `epoch_seq` (0 = the first frame of the epoch).

- **Bridge** (`BridgeEpochs`): a stream's first AI frame opens epoch 1 with seq 0; each
  following AI frame continues the epoch (seq + 1); any fallback of the stream, and any
  subscriber asking for a fresh start (join, RTCP PLI), makes its next AI frame open a new
  epoch (epoch + 1, seq 0). A frame that fell back therefore never leaves a gap inside an
  epoch, and the AIC payload's start bit is simply `epoch_seq == 0`.
- **Replica** (`ReplicaEpochs`): a frame with seq 0 resets the stream's state slot and starts
  holding that epoch; a frame continuing the epoch the slot holds, in sequence, runs; any
  other frame (an epoch the replica does not hold after a restart or a move, a gap, a stale
  frame of an older epoch) is answered `fallback/reset` - and a gap or a newer epoch also
  ends the held epoch, while a stale frame leaves it alone. A frame of the slot that falls
  back for any reason ends the held epoch too. The check runs twice: at intake (what was
  admitted to the queue) and at run time (what the model state really holds), because a
  frame can fall back while later ones wait.
- **Decoder** (`DecoderEpoch`, the SDK's subscriber): decode from an epoch's first payload
  (start bit) on, while the epoch stays the same and no packet was lost; otherwise wait for
  the next epoch start (and ask for one).

Everything is columnar: a tick's frames are numbered, admitted and checked with array
operations over stream rows (bridge) or state slots (replica), never a Python loop per frame.
"""

from __future__ import annotations

import numpy as np

NONE = -1  # "holds no epoch" in the replica's arrays (bridge epochs start at 1)


def _grow(arr: np.ndarray, size: int, fill: int | float | bool) -> np.ndarray:
    if arr.shape[0] >= size:
        return arr
    out = np.full(max(size, 2 * arr.shape[0]), fill, arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class BridgeEpochs:
    """The bridge half, per stream row: the current epoch, the next seq, and whether the next
    AI frame opens a new epoch."""

    def __init__(self, capacity: int = 0) -> None:
        self.epoch = np.zeros(capacity, np.int64)
        self.next_seq = np.zeros(capacity, np.int64)
        self.fresh = np.ones(capacity, bool)  # the next AI frame opens a new epoch

    def ensure(self, capacity: int) -> None:
        self.epoch = _grow(self.epoch, capacity, 0)
        self.next_seq = _grow(self.next_seq, capacity, 0)
        self.fresh = _grow(self.fresh, capacity, True)

    def join(self, row: int) -> None:
        """A new stream in `row`: its first AI frame opens epoch 1."""
        self.epoch[row] = 0
        self.next_seq[row] = 0
        self.fresh[row] = True

    def number(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, seqs) of one AI frame per row (rows unique) and advance the rows."""
        fresh = self.fresh[rows]
        self.epoch[rows] += fresh
        seqs = np.where(fresh, 0, self.next_seq[rows])
        self.next_seq[rows] = seqs + 1
        self.fresh[rows] = False
        return self.epoch[rows], seqs  # (indexing with an array copies)

    def fell_back(self, rows: np.ndarray) -> None:
        """These streams' frames fell back: their next AI frame opens a new epoch."""
        self.fresh[rows] = True

    def restart(self, row: int) -> bool:
        """A decoder asks for a fresh start; False if the next frame opens an epoch anyway."""
        if self.fresh[row]:
            return False
        self.fresh[row] = True
        return True


class ReplicaEpochs:
    """The replica half, per state slot. Two stages with the same rule: `admitted` (what the
    queue accepted) and `ran` (what the model state holds)."""

    def __init__(self, capacity: int) -> None:
        self.admitted_epoch = np.full(capacity, NONE, np.int64)
        self.admitted_next = np.zeros(capacity, np.int64)
        self.ran_epoch = np.full(capacity, NONE, np.int64)
        self.ran_next = np.zeros(capacity, np.int64)

    def end(self, slots: np.ndarray) -> None:
        """These slots hold no epoch: handed to a new stream, freed, or a frame of theirs fell
        back (the bridge starts a new epoch after any fallback)."""
        self.admitted_epoch[slots] = NONE
        self.ran_epoch[slots] = NONE

    @staticmethod
    def _step(held: np.ndarray, nxt: np.ndarray, slots: np.ndarray, epochs: np.ndarray,
              seqs: np.ndarray) -> np.ndarray:
        """One stage of the rule for frames of distinct slots: bool `ok` per frame; the
        slots of ok frames advance (a seq-0 frame opens its epoch)."""
        opens = seqs == 0
        ok = opens | ((held[slots] == epochs) & (nxt[slots] == seqs))
        if opens.any():
            held[slots[opens]] = epochs[opens]
        if ok.all():  # the usual tick: every frame continues its epoch
            nxt[slots] = seqs + 1
        else:
            nxt[slots[ok]] = seqs[ok] + 1
        return ok

    def admit(self, slots: np.ndarray, epochs: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """Intake: True where the frame may be queued (slots distinct, all >= 0)."""
        held = self.admitted_epoch[slots]
        ok = self._step(self.admitted_epoch, self.admitted_next, slots, epochs, seqs)
        if not ok.all():
            # Refused: a gap or a newer epoch ends what the slot holds; a stale frame of an
            # older epoch is refused without touching it (frames of the old epoch may still
            # be on their way).
            self.end(slots[~ok & ((held == NONE) | (epochs >= held))])
        return ok

    def run_check(self, slots: np.ndarray, epochs: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """Run time: True where the model state continues, or a seq-0 frame opens an epoch
        (its state is zeroed before the step); a refused frame ends what the slot held."""
        ok = self._step(self.ran_epoch, self.ran_next, slots, epochs, seqs)
        if not ok.all():
            self.end(slots[~ok])
        return ok


class DecoderEpoch:
    """The decoder half for one received stream (the SDK's AIC subscriber)."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.in_sync = False

    def lost(self) -> None:
        """A packet was lost: the decoder state is no longer the encoder's."""
        self.in_sync = False

    def accept(self, epoch: int, start: bool) -> bool:
        """Decode this payload? A start payload resets the decoder (the caller zeroes its
        state) and opens the epoch; others continue it only while in sync."""
        if start:
            self.epoch = epoch
            self.in_sync = True
            return True
        return self.in_sync and epoch == self.epoch
