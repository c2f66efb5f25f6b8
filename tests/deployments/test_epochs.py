"""The epoch rule (deployments/epochs.py): bridge numbering, replica admission and run-time
checks, the decoder - each half on its own, column by column."""

from __future__ import annotations

import numpy as np

from deployments.epochs import NONE, BridgeEpochs, DecoderEpoch, ReplicaEpochs


def test_bridge_numbers_frames_and_opens_an_epoch_after_any_fallback():
    ep = BridgeEpochs(3)
    rows = np.array([0, 2])
    assert [a.tolist() for a in ep.number(rows)] == [[1, 1], [0, 0]]
    assert [a.tolist() for a in ep.number(rows)] == [[1, 1], [1, 1]]
    ep.fell_back(np.array([2]))
    assert [a.tolist() for a in ep.number(rows)] == [[1, 2], [2, 0]]
    assert ep.restart(0) and not ep.restart(0)  # already opening a new epoch
    assert [a.tolist() for a in ep.number(np.array([0]))] == [[2], [0]]
    ep.join(2)  # a new stream in a reused row starts over
    ep.ensure(10)
    assert [a.tolist() for a in ep.number(np.array([2, 9]))] == [[1, 1], [0, 0]]


def test_replica_admits_epoch_starts_and_continuations_only():
    ep = ReplicaEpochs(4)
    slots = np.array([0, 1, 2])
    # seq 0 opens; a continuation of an epoch the slot does not hold is refused
    ok = ep.admit(slots, np.array([1, 1, 1]), np.array([0, 0, 3]))
    assert ok.tolist() == [True, True, False]
    ok = ep.admit(np.array([0, 1]), np.array([1, 1]), np.array([1, 2]))  # slot 1 skips seq 1
    assert ok.tolist() == [True, False]
    assert ep.admitted_epoch[1] == NONE  # the gap ended the epoch
    ok = ep.admit(np.array([0]), np.array([1]), np.array([2]))
    assert ok.tolist() == [True]


def test_a_stale_frame_is_refused_without_ending_the_new_epoch():
    ep = ReplicaEpochs(1)
    s = np.array([0])
    assert ep.admit(s, np.array([1]), np.array([0]))[0]
    assert ep.admit(s, np.array([2]), np.array([0]))[0]  # the bridge opened epoch 2
    assert not ep.admit(s, np.array([1]), np.array([1]))[0]  # late frame of epoch 1
    assert ep.admit(s, np.array([2]), np.array([1]))[0]  # epoch 2 unharmed


def test_run_time_check_follows_what_the_model_state_holds():
    ep = ReplicaEpochs(2)
    s = np.array([0, 1])
    assert ep.admit(s, np.array([1, 1]), np.array([0, 0])).all()
    assert ep.admit(s, np.array([1, 1]), np.array([1, 1])).all()
    assert ep.run_check(s, np.array([1, 1]), np.array([0, 0])).all()
    ep.end(np.array([1]))  # slot 1's seq-0 frame fell back after running
    ok = ep.run_check(s, np.array([1, 1]), np.array([1, 1]))
    assert ok.tolist() == [True, False]
    assert ep.ran_epoch[1] == NONE and ep.admitted_epoch[1] == NONE


def test_decoder_follows_an_epoch_from_its_start_and_waits_after_a_loss():
    d = DecoderEpoch()
    assert not d.accept(5, start=False)  # joined mid-epoch: wait for a start
    assert d.accept(5, start=True) and d.accept(5, start=False)
    d.lost()
    assert not d.accept(5, start=False)
    assert not d.accept(6, start=False)
    assert d.accept(6, start=True)
