"""RFC 8285 extension blocks and the AIC hint element: fixtures, round trips, rejections."""

from __future__ import annotations

import pytest

from sfu_bridge.hint_ext import (
    HINT_BYTES,
    Hint,
    HintElement,
)
from tests.sfu_bridge.rfc8285 import HeaderExtensionBlock

TAG = bytes(range(0xA0, 0xAA))
# model 3, 6 kbps (BW 2), reset, epoch 0x0102, seq24 0x030405:
# first byte 0011 010 1 = 0x35
HINT_FIXTURE = bytes.fromhex("350102030405") + TAG
# one-byte block: BE DE, 5 words; element id 3, L=15 (0x3F), 16 bytes, then 3 padding bytes
ONE_BYTE_FIXTURE = bytes.fromhex("bede0005") + b"\x3f" + HINT_FIXTURE + b"\x00" * 3
# two-byte block (appbits 0): 10 00, 2 words; element id 200, length 0; element id 1, 2 bytes
TWO_BYTE_FIXTURE = bytes.fromhex("10000002" "c800" "0102" "aabb" "0000")


def test_hint_element_fixture_round_trip():
    el = HintElement.parse(HINT_FIXTURE)
    assert (el.model_id, el.bandwidth_index, el.reset, el.epoch, el.seq24, el.tag) == (
        3, 2, True, 0x0102, 0x030405, TAG,
    )
    assert el.to_hint(seq=0x7_030405) == Hint(3, 6.0, 0x0102, True, 0x7_030405)
    assert bytes(el) == HINT_FIXTURE
    hint = Hint(model_id=3, bandwidth_kbps=6.0, epoch=0x0102, reset=True, seq=(5 << 24) | 0x030405)
    assert bytes(HintElement.from_hint(hint, TAG)) == HINT_FIXTURE


def test_one_byte_block_fixture_round_trip():
    block = HeaderExtensionBlock.parse(ONE_BYTE_FIXTURE)
    assert not block.two_byte and block.elements == [(3, HINT_FIXTURE)]
    assert block.get(3) == HINT_FIXTURE and block.get(4) is None
    assert bytes(block) == ONE_BYTE_FIXTURE
    assert bytes(HeaderExtensionBlock.for_elements([(3, HINT_FIXTURE)])) == ONE_BYTE_FIXTURE


def test_two_byte_block_fixture_round_trip():
    block = HeaderExtensionBlock.parse(TWO_BYTE_FIXTURE)
    assert block.two_byte and block.appbits == 0
    assert block.elements == [(200, b""), (1, b"\xaa\xbb")]
    assert bytes(block) == TWO_BYTE_FIXTURE
    # id > 14 or an empty element forces the two-byte form
    assert bytes(HeaderExtensionBlock.for_elements(block.elements)) == TWO_BYTE_FIXTURE


def test_padding_between_elements_and_stop_id():
    value = b"\x00\x10\x07\x00\x00\x21\x01\x02" + b"\xf5\x01\x02\x03"
    assert HeaderExtensionBlock.from_profile(0xBEDE, value).elements == [(1, b"\x07"), (2, b"\x01\x02")]
    two = HeaderExtensionBlock.from_profile(0x1005, b"\x00\x07\x01\x09\x00\x00")
    assert two.elements == [(7, b"\x09")] and two.appbits == 5 and two.profile == 0x1005


def test_unknown_extension_ids_are_kept_for_the_caller_to_ignore():
    value = bytes(HeaderExtensionBlock.for_elements([(5, b"\x01"), (3, HINT_FIXTURE), (9, b"zz")]))
    block = HeaderExtensionBlock.parse(value)
    assert block.get(3) == HINT_FIXTURE and [i for i, _ in block.elements] == [5, 3, 9]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xbe\xde\x00", "header extension is truncated: 3 bytes, header needs 4"),
        (ONE_BYTE_FIXTURE[:-1], "header extension is truncated: 23 bytes, length field says 24"),
        (ONE_BYTE_FIXTURE + b"\x00", "header extension is oversized: 25 bytes, length field says 24"),
        (b"\x12\x34\x00\x00", "header extension profile 0x1234 is not an RFC 8285 profile"),
        (bytes.fromhex("bede0001") + b"\x13\x01\x02\x03",
         "one-byte extension element id 1 is truncated: needs 4 bytes, 3 left"),
        (bytes.fromhex("bede0001") + b"\x05\x01\x02\x03",
         "one-byte extension element at offset 0 has reserved id 0 with data"),
        (bytes.fromhex("10000001") + b"\x00\x00\x00\x07",
         "two-byte extension element id 7 is truncated: no length byte"),
        (bytes.fromhex("10000001") + b"\x07\x05\x01\x02",
         "two-byte extension element id 7 is truncated: needs 5 bytes, 2 left"),
    ],
)
def test_block_rejections(data, message):
    with pytest.raises(ValueError) as err:
        HeaderExtensionBlock.parse(data)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "elements, two_byte, message",
    [
        ([(15, b"\x01")], False, "one-byte extension id 15 out of range [1, 14]"),
        ([(1, b"")], False, "one-byte extension element is 0 bytes, must be 1..16"),
        ([(1, b"x" * 17)], False, "one-byte extension element is 17 bytes, must be 1..16"),
        ([(0, b"x")], True, "two-byte extension id 0 out of range [1, 255]"),
        ([(1, b"x" * 256)], True, "two-byte extension element is 256 bytes > 255"),
    ],
)
def test_block_build_rejections(elements, two_byte, message):
    with pytest.raises(ValueError) as err:
        bytes(HeaderExtensionBlock(elements, two_byte=two_byte))
    assert str(err.value) == message


@pytest.mark.parametrize(
    "data, message",
    [
        (HINT_FIXTURE[:-1], f"hint element is truncated: 15 bytes, expected {HINT_BYTES}"),
        (HINT_FIXTURE + b"\x00", f"hint element is oversized: 17 bytes, expected {HINT_BYTES}"),
        (b"\x3e" + HINT_FIXTURE[1:], "hint bandwidth index 7 is invalid (0..4)"),
    ],
)
def test_hint_element_rejections(data, message):
    with pytest.raises(ValueError) as err:
        HintElement.parse(data)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "hint, message",
    [
        (Hint(16, 6.0, 0), "hint model id 16 out of range [0, 15]"),
        (Hint(0, 5.0, 0), "hint bandwidth 5.0 kbps not in (1.5, 3.0, 6.0, 12.0, 24.0)"),
        (Hint(0, 6.0, 1 << 16), "hint epoch 65536 out of range [0, 65536)"),
        (Hint(0, 6.0, 0, seq=1 << 48), f"hint seq {1 << 48} out of range [0, 2**48)"),
    ],
)
def test_hint_validation(hint, message):
    with pytest.raises(ValueError) as err:
        HintElement.from_hint(hint)
    assert str(err.value) == message
