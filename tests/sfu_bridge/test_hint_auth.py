"""Hint keys, tags and the replay window: vectors computed independently, every rejection."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from sfu_bridge.hint_auth import (
    HINT_CODES,
    HKDF_INFO_PREFIX,
    HKDF_SALT,
    HintRejected,
    HintRejection,
    HintSigner,
    HintTable,
    HintVerifier,
    ReplayWindow,
    derive_stream_key,
    estimate_index,
)
from sfu_bridge.hint_ext import Hint

SECRET = b"hint-test-cluster-secret-0123456789"



def verdict(v: HintVerifier, stream_id: str, data: bytes) -> Hint | HintRejection:
    """The verified hint, or why the verifier rejected it."""
    try:
        return v.verify(stream_id, data)
    except HintRejected as exc:
        return exc.reason

def _hkdf_reference(secret: bytes, stream_id: str) -> bytes:
    """RFC 5869 written out with hmac: extract, then one expand block (32 bytes)."""
    prk = hmac.new(HKDF_SALT, secret, hashlib.sha256).digest()
    info = HKDF_INFO_PREFIX + stream_id.encode()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _hint(seq: int, epoch: int = 9) -> Hint:
    return Hint(model_id=1, bandwidth_kbps=6.0, epoch=epoch, reset=False, seq=seq)


def test_key_derivation_matches_rfc5869_and_binds_the_stream():
    key_a = derive_stream_key(SECRET, "stream-a")
    assert key_a == _hkdf_reference(SECRET, "stream-a")
    assert key_a != derive_stream_key(SECRET, "stream-b")
    assert key_a != derive_stream_key(SECRET + b"x", "stream-a")
    for secret in (SECRET, b"k", bytes(range(200))):  # short, long (beyond a block) secrets
        for sid in ("s", "ström-ü", "x" * 300):
            assert derive_stream_key(secret, sid) == _hkdf_reference(secret, sid)


def test_tag_is_truncated_hmac_over_index_and_body():
    key = derive_stream_key(SECRET, "s1")
    data = HintSigner(SECRET).sign("s1", _hint(seq=(2 << 24) | 5))
    body = data[:6]
    expected = hmac.new(key, (2 << 24 | 5).to_bytes(6, "big") + body, hashlib.sha256).digest()[:10]
    assert len(data) == 16 and data[6:] == expected
    assert body[3:6] == (5).to_bytes(3, "big")  # only the low 24 bits travel


def test_sign_verify_round_trip_and_stream_key_signer():
    signer = HintSigner(SECRET)
    client = HintSigner(stream_keys={"s1": derive_stream_key(SECRET, "s1")})
    v = HintVerifier(SECRET, "s1")
    for seq in range(5):
        assert signer.sign("s1", _hint(seq)) == client.sign("s1", _hint(seq))
        assert v.verify("s1", client.sign("s1", _hint(seq))) == _hint(seq)
    with pytest.raises(ValueError, match="no hint key for stream 's2' and no cluster secret"):
        client.sign("s2", _hint(0))


def test_hint_for_another_stream_fails_the_tag():
    v = HintVerifier(SECRET, "s1")
    forged = HintSigner(SECRET).sign("s2", _hint(0))
    with pytest.raises(HintRejected) as err:
        v.verify("s1", forged)
    assert err.value.reason is HintRejection.TAG and str(err.value) == "hint tag does not verify"


@pytest.mark.parametrize(
    "mutate, reason, message",
    [
        (lambda d: d[:-1], HintRejection.SIZE, "hint element is 15 bytes, expected 16"),
        (lambda d: d + b"\x00", HintRejection.SIZE, "hint element is 17 bytes, expected 16"),
        (lambda d: b"", HintRejection.SIZE, "hint element is 0 bytes, expected 16"),
        (lambda d: d[:15] + bytes([d[15] ^ 1]), HintRejection.TAG, "hint tag does not verify"),
        (lambda d: bytes([d[0] ^ 0x10]) + d[1:], HintRejection.TAG, "hint tag does not verify"),
    ],
)
def test_rejections(mutate, reason, message):
    v = HintVerifier(SECRET, "s1")
    with pytest.raises(HintRejected) as err:
        v.verify("s1", mutate(HintSigner(SECRET).sign("s1", _hint(0))))
    assert err.value.reason is reason and str(err.value) == message


def test_authentic_but_invalid_field_is_rejected():
    key = derive_stream_key(SECRET, "s1")
    body = bytes([0x1E, 0, 1, 0, 0, 0])  # bandwidth index 7
    tag = hmac.new(key, (0).to_bytes(6, "big") + body, hashlib.sha256).digest()[:10]
    with pytest.raises(HintRejected) as err:
        HintVerifier(SECRET, "s1").verify("s1", body + tag)
    assert err.value.reason is HintRejection.FIELD
    assert str(err.value) == "hint bandwidth index 7 is invalid (0..4)"


def test_stream_mismatch_and_non_bytes():
    v = HintVerifier(SECRET, "s1")
    data = HintSigner(SECRET).sign("s1", _hint(0))
    with pytest.raises(HintRejected) as err:
        v.verify("s2", data)
    assert err.value.reason is HintRejection.STREAM
    assert verdict(v, "s1", None) is HintRejection.SIZE  # type: ignore[arg-type]


def test_replay_window_semantics():
    signer, v = HintSigner(SECRET), HintVerifier(SECRET, "s1", window=64)
    data = {i: signer.sign("s1", _hint(i)) for i in range(0, 200)}
    got = [verdict(v, "s1", data[i]) for i in (100, 100, 37, 36, 99, 99, 150, 100, 120)]
    replay = HintRejection.REPLAY
    # exact replay; 63 behind: inside the window, first time; 64 behind: too old; jump ahead;
    # then 50 behind and already seen
    assert [g if g is replay else g.seq for g in got] == [100, replay, 37, replay, 99, replay,
                                                          150, replay, 120]


def test_window_size_configurable_with_minimum():
    w = ReplayWindow(128)
    w.accept(1000)
    assert not w.seen(1000 - 127) and w.seen(1000 - 128) and w.seen(1000)
    with pytest.raises(ValueError, match="replay window 32 is below the minimum 64"):
        ReplayWindow(32)


def test_forged_hints_do_not_move_the_window():
    v = HintVerifier(SECRET, "s1")
    signer = HintSigner(SECRET)
    assert verdict(v, "s1", signer.sign("s1", _hint(10))).seq == 10
    forged = HintSigner(b"wrong-secret-wrong-secret").sign("s1", _hint(5000))
    assert verdict(v, "s1", forged) is HintRejection.TAG
    assert v.replay.highest == 10
    assert verdict(v, "s1", signer.sign("s1", _hint(11))).seq == 11


def test_index_estimation_across_the_24_bit_wrap():
    top = (1 << 24) - 3  # just below a wrap of the low 24 bits
    assert estimate_index(top, 1) == (1 << 24) + 1  # next roll-over
    assert estimate_index(top, (1 << 24) - 10) == (1 << 24) - 10
    assert estimate_index((1 << 24) + 2, (1 << 24) - 5) == (1 << 24) - 5  # late, previous roll
    assert estimate_index(None, 77) == 77
    signer, v = HintSigner(SECRET), HintVerifier(SECRET, "s1")
    for seq in range((1 << 24) - 3, (1 << 24) + 3):
        assert verdict(v, "s1", signer.sign("s1", _hint(seq))).seq == seq


def test_verifier_repr_holds_no_key_material():
    v = HintVerifier(SECRET, "s1")
    key = derive_stream_key(SECRET, "s1")
    text = repr(v)
    assert "s1" in text and repr(key) not in text and repr(SECRET) not in text


def test_the_verifiers_precomputed_hmac_equals_the_reference_tag():
    from sfu_bridge.hint_auth import _TagMac, compute_tag

    for key in (b"k" * 32, b"short", bytes(range(64)), bytes(range(100))):  # <, =, > one block
        mac = _TagMac(key)
        for index in (0, 1, (1 << 48) - 1):
            body = index.to_bytes(8, "big")[:6]
            assert mac.tag(index, body) == compute_tag(key, index, body) == hmac.digest(
                key, index.to_bytes(6, "big") + body, "sha256")[:10]


def _use_sha(impl: str):
    """Switches the C loop's SHA-256 compression to `impl` ("sha-ni" or "portable") for one
    test, skipping where the C part or the CPU's SHA extensions are missing; a finalizer
    restores the default."""
    from sfu_bridge.hint_auth import _c_hint_accept

    if _c_hint_accept is None:
        pytest.skip("the C part (sfu_bridge/_rtpsend.c) is not built")
    from sfu_bridge._rtpsend import hint_sha

    before = hint_sha()
    try:
        assert hint_sha(impl == "sha-ni") == impl
    except ValueError as exc:
        pytest.skip(str(exc))
    return lambda: hint_sha(before == "sha-ni")


@pytest.fixture(params=["sha-ni", "portable"])
def c_sha(request):
    """Each C-loop test runs with both SHA-256 compressions: the x86 SHA extensions' (chosen
    at import where the CPU has them) and the portable one (every other CPU)."""
    restore = _use_sha(request.param)
    yield request.param
    restore()


@pytest.mark.parametrize("impl", ["c-sha-ni", "c-portable", "python"])
@pytest.mark.parametrize("window", [64, 100, 128, 1024])
def test_hint_table_equals_accepting_one_by_one(impl: str, window: int, request):
    """The bridge's columnar verifier (`HintTable`, its C loop or its per-row fallback)
    gives every hint the verdict `HintVerifier.accept` gives it one by one, over many ticks,
    with the same index: fresh, forged, replayed, too old, out of order, near the 24-bit
    wrap, the wrong size, not bytes, a bad field, another stream's hint, streams interleaved
    and a row's stream leaving (its successor starts with an empty window)."""
    import random

    import numpy as np

    native = impl != "python"
    if native:
        request.addfinalizer(_use_sha(impl.removeprefix("c-")))
    rng = random.Random(window)
    signer = HintSigner(SECRET)
    n_rows = 6
    table = HintTable(SECRET, window, native=native)
    assert table.native is native
    table.grow(n_rows)
    names = [f"s{r}" for r in range(n_rows)]
    seq = [rng.choice([0, (1 << 24) - 40, 1 << 30]) for _ in range(n_rows)]
    one = {r: HintVerifier(SECRET, names[r], window) for r in range(n_rows)}
    kinds: set = set()
    for _ in range(120):
        rows: list[int] = []
        items: list[object] = []
        for _ in range(rng.randrange(0, 25)):
            r = rng.randrange(n_rows)
            sid = names[r]
            roll = rng.random()
            if roll < 0.55:
                seq[r] = max(0, seq[r] + rng.choice([1, 1, 2, 5, -3, window - 1, window, window + 1, 3000]))
                data: object = signer.sign(sid, _hint(seq[r]))
            elif roll < 0.65:  # a replay, or older than the window
                data = signer.sign(sid, _hint(max(0, seq[r] - rng.randrange(0, 2 * window))))
            elif roll < 0.75:
                raw = bytearray(signer.sign(sid, _hint(seq[r] + 1)))
                raw[rng.randrange(16)] ^= 1 << rng.randrange(8)  # forged
                data = bytes(raw)
            elif roll < 0.8:
                data = rng.choice([None, b"", signer.sign(sid, _hint(seq[r] + 1))[:15], b"x" * 17])
            elif roll < 0.85:  # authentic, bandwidth index 7
                body = bytes([0x1E, 0, 0]) + ((seq[r] + 1) % (1 << 24)).to_bytes(3, "big")
                data = body + hmac.new(derive_stream_key(SECRET, sid), (seq[r] + 1).to_bytes(6, "big") + body,
                                       hashlib.sha256).digest()[:10]
            elif roll < 0.9:
                data = signer.sign(names[(r + 1) % n_rows], _hint(seq[r] + 1))  # another stream's
            else:
                data = rng.choice([bytearray, memoryview])(signer.sign(sid, _hint(seq[r] + 2)))
            rows.append(r)
            items.append(data)
        expected = [_accept_or_reason(one[r], d) for r, d in zip(rows, items, strict=True)]
        index, code = table.accept_many(np.array(rows, np.int64), [names[r] for r in rows], items)  # type: ignore[arg-type]
        got = [int(i) if c == 0 else HINT_CODES[c] for i, c in zip(index, code, strict=True)]
        assert got == expected
        kinds |= {type(x) for x in expected} | {x for x in expected if isinstance(x, HintRejection)}
        if rng.random() < 0.1:  # the row's stream leaves; the next one on it starts afresh
            r = rng.randrange(n_rows)
            table.close(r)
            one[r] = HintVerifier(SECRET, names[r], window)
    assert {int, HintRejection.TAG, HintRejection.REPLAY, HintRejection.SIZE, HintRejection.FIELD} <= kinds


def test_hint_table_tags_are_hmac_sha256(c_sha: str):
    """The C loop's tag is the standard HMAC-SHA256 (truncated), with either compression: a
    hint signed with hmac's own tag for random keys and indexes, including 48-bit ones,
    verifies; one bit off fails."""
    import random

    import numpy as np

    rng = random.Random(3)
    table = HintTable(SECRET)
    table.grow(512)
    for row in range(512):
        sid = f"stream-{rng.getrandbits(64):x}"
        index = rng.choice([rng.randrange(1 << 24), rng.randrange(1 << 48)])
        body = bytes([0x12, rng.randrange(256), rng.randrange(256)]) + (index % (1 << 24)).to_bytes(3, "big")
        tag = hmac.digest(derive_stream_key(SECRET, sid), index.to_bytes(6, "big") + body, "sha256")[:10]
        bad = bytearray(tag)
        bad[rng.randrange(10)] ^= 1 << rng.randrange(8)
        table.close(row)
        if index >= 1 << 24:  # the high bits are implicit: the row must have seen an index near it
            table.accept_many(np.array([row]), [sid], [b""])  # opens the row
            table._highest[row] = index - 1
        idx, code = table.accept_many(np.array([row, row]), [sid, sid], [body + bytes(bad), body + tag])
        assert code.tolist() == [1, 0] and int(idx[1]) == index


def _accept_or_reason(v: HintVerifier, data: object) -> int | HintRejection:
    try:
        return v.accept(v.stream_id, data)  # type: ignore[arg-type]
    except HintRejected as exc:
        return exc.reason
