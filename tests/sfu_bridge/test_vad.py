"""Voice activity per chunk and the DTX talk-spurt state machine."""

from __future__ import annotations

import numpy as np

from models.vad import DtxState, EnergyVad, TalkSpurt, VadConfig, chunk_levels_db


def _noise(db: float, n: int = 960, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 10 ** (db / 20)).astype(np.float32)


def _tone(db: float, n: int = 960) -> np.ndarray:
    return (np.sqrt(2) * 10 ** (db / 20) * np.sin(2 * np.pi * 200 * np.arange(n) / 24_000)).astype(np.float32)


def test_levels_are_the_loudest_subframe_in_dbfs():
    pcm = np.zeros((2, 960), np.float32)
    pcm[0, :240] = _tone(-20.0, 240)  # a 10 ms burst in one sub-frame counts fully
    levels = chunk_levels_db(pcm)
    assert abs(levels[0] - -20.0) < 0.5
    assert levels[1] < -100


def test_speech_over_a_steady_floor_and_the_floor_tracks_noise():
    vad = EnergyVad()
    floors = np.full(1, VadConfig().initial_floor_db)
    for i in range(200):  # 8 s of -45 dBFS noise: the floor rises to it, it is not speech
        speech, floors = vad.decide(chunk_levels_db(_noise(-45, seed=i)[None]), floors)
    assert not speech[0]
    assert -46 < floors[0] < -40
    speech, _ = vad.decide(chunk_levels_db((_noise(-45) + _tone(-25))[None]), floors)
    assert speech[0]
    # below the absolute floor nothing is speech, however quiet the background
    speech, _ = vad.decide(np.array([-58.0]), np.array([-120.0]))
    assert not speech[0]


def test_batch_decisions_equal_one_by_one():
    vad = EnergyVad()
    pcm = np.stack([_tone(-20), _noise(-70), _tone(-50), _noise(-30)])
    floors = np.array([-70.0, -70.0, -70.0, -35.0])
    speech, new = vad.decide(chunk_levels_db(pcm), floors)
    for i in range(4):
        s1, f1 = vad.decide(chunk_levels_db(pcm[i : i + 1]), floors[i : i + 1])
        assert s1[0] == speech[i] and f1[0] == new[i]
    assert speech.tolist() == [True, False, True, False]


def test_talk_spurt_hangover_then_dtx_then_restart():
    ts = TalkSpurt(hangover_chunks=3)
    states = [ts.step(s) for s in [True, True, False, False, False, False, False, True, False]]
    A, S = DtxState.ACTIVE, DtxState.SILENT
    assert states == [A, A, A, A, A, S, S, A, A]
    assert ts.silent_chunks == 2
    assert ts.spurts == 1  # one return from silence
    fresh = TalkSpurt()
    assert fresh.step(False) is S  # a stream that starts silent spends nothing
