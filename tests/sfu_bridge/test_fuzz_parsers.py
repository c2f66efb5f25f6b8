"""Hypothesis fuzzing of every wire parser: random input raises only ValueError (or the typed
rejection), and everything built from valid fields round-trips byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfu_bridge.aic_payload import N_Q_BY_INDEX, AicPayload
from sfu_bridge.hint_auth import HintRejected, HintRejection, HintSigner, HintVerifier
from sfu_bridge.hint_ext import (
    HINT_BANDWIDTHS_KBPS,
    Hint,
    HintElement,
)
from sfu_bridge.tokens import Scope, TokenAuthority, TokenError
from tests.sfu_bridge.rfc8285 import HeaderExtensionBlock

SECRET = b"fuzz-cluster-secret-0123456789ab"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AUTHORITY = TokenAuthority(SECRET)
SIGNER = HintSigner(SECRET)


def _parse_or_value_error(parse, data):
    try:
        return parse(data)
    except ValueError:
        return None


# ---- AIC payload ---------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1400))
def test_payload_random_bytes(data):
    p = _parse_or_value_error(AicPayload.parse, data)
    if p is not None:
        assert bytes(p) == data  # anything accepted is canonical


@FUZZ
@given(
    st.sampled_from(N_Q_BY_INDEX),
    st.integers(1, 12),
    st.integers(0, 65535),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_payload_round_trip(n_q, frames, epoch, start, seed):
    codes = np.random.default_rng(seed).integers(0, 1024, size=(n_q, frames))
    data = bytes(AicPayload(epoch, n_q, codes, start))
    back = AicPayload.parse(data)
    assert (back.epoch, back.n_q, back.start) == (epoch, n_q, start)
    np.testing.assert_array_equal(back.codes, codes)
    assert bytes(back) == data


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 200), st.integers(0, 255))
def test_payload_corrupted_byte(seed, pos, value):
    codes = np.random.default_rng(seed).integers(0, 1024, size=(8, 3))
    data = bytearray(bytes(AicPayload(seed % 65536, 8, codes)))
    data[pos % len(data)] = value
    _parse_or_value_error(AicPayload.parse, bytes(data))


# ---- RFC 8285 blocks -----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_block_random_bytes(data):
    _parse_or_value_error(HeaderExtensionBlock.parse, data)


@FUZZ
@given(st.sampled_from([0xBEDE, 0x1000, 0x100F, 0x1234]), st.binary(max_size=300))
def test_block_random_elements(profile, value):
    _parse_or_value_error(lambda v: HeaderExtensionBlock.from_profile(profile, v), value)


_one_byte = st.lists(st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16)), max_size=8)
_two_byte = st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=40)), max_size=8)


@FUZZ
@given(st.one_of(_one_byte, _two_byte))
def test_block_round_trip(elements):
    block = HeaderExtensionBlock.for_elements(elements)
    data = bytes(block)
    assert len(data) % 4 == 0
    back = HeaderExtensionBlock.parse(data)
    assert back.elements == elements and back.two_byte == block.two_byte
    assert bytes(back) == data


# ---- hints ---------------------------------------------------------------------------------

_hints = st.builds(
    Hint,
    model_id=st.integers(0, 15),
    bandwidth_kbps=st.sampled_from(HINT_BANDWIDTHS_KBPS),
    epoch=st.integers(0, 65535),
    reset=st.booleans(),
    seq=st.integers(0, 2**23),
)


@FUZZ
@given(st.binary(max_size=40))
def test_hint_element_random_bytes(data):
    el = _parse_or_value_error(HintElement.parse, data)
    if el is not None:
        assert bytes(el) == data


@FUZZ
@given(st.one_of(st.binary(max_size=40), st.binary(min_size=16, max_size=16)))
def test_verifier_random_bytes_only_raise_rejections(data):
    v = HintVerifier(None, "s", key=b"k" * 32)
    try:
        v.verify("s", data)
    except HintRejected as exc:  # a random 80-bit tag does not verify
        assert exc.reason in (HintRejection.SIZE, HintRejection.TAG)
    else:
        raise AssertionError("random bytes verified")


@FUZZ
@given(_hints, st.integers(0, 15), st.integers(0, 255))
def test_hint_sign_verify_round_trip_and_any_bit_flip_rejected(hint, pos, flip):
    data = SIGNER.sign("stream-1", hint)
    v = HintVerifier(SECRET, "stream-1")
    assert v.verify("stream-1", data) == hint
    with pytest.raises(HintRejected) as replayed:
        v.verify("stream-1", data)
    assert replayed.value.reason is HintRejection.REPLAY
    if flip:
        mutated = bytearray(data)
        mutated[pos] ^= flip
        with pytest.raises(HintRejected) as forged:
            HintVerifier(SECRET, "stream-1").verify("stream-1", bytes(mutated))
        assert forged.value.reason is HintRejection.TAG


# ---- tokens --------------------------------------------------------------------------------


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_token_shaped = st.tuples(st.text(_B64, max_size=80), st.text(_B64, max_size=60)).map(
    lambda t: f"al1.{t[0]}.{t[1]}"
)


@FUZZ
@given(st.one_of(st.text(max_size=200), _token_shaped))
def test_token_random_text(text):
    try:
        AUTHORITY.verify(text, now=0)
    except TokenError as err:
        assert err.status == 401


_ids = st.text(min_size=1, max_size=30)


@FUZZ
@given(_ids, _ids, st.sets(st.sampled_from(list(Scope)), min_size=1), st.integers(1, 10**6))
def test_token_round_trip(user, stream, scopes, ttl):
    tok = AUTHORITY.issue(user, stream, scopes, ttl_s=ttl, now=1_000.0)
    t = AUTHORITY.verify(tok, now=1_000.0)
    assert (t.user, t.stream, t.scopes, t.expires_at) == (user, stream, frozenset(scopes), 1_000 + ttl)
