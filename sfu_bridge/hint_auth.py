"""Authentication and replay protection of AIC hints (layout in hint_ext.py).

- **Per-stream key** (RFC 5869 HKDF-SHA256): ``key = HKDF(salt=HKDF_SALT,
  info=HKDF_INFO_PREFIX + stream_id (UTF-8), length=32)(cluster_secret)``. The key binds
  the stream: a hint signed for stream A fails the tag on stream B. A publisher is given
  its stream's key (never the cluster secret), so it can sign only its own stream.
- **Tag**: the first 80 bits of ``HMAC-SHA256(key, index (6 bytes, big endian) || body)``
  where ``body`` is the element's 6 bytes before the tag and ``index`` the 48-bit hint
  index, of which only the low 24 bits travel (like SRTP's ROC, RFC 3711 section 3.3.1,
  the high bits are authenticated but implicit). Compared in constant time.
- **Replay** (RFC 3711 section 3.3.2): a sliding window of the last ``window`` indices
  (default 128, at least 64) below the highest authenticated index, kept as a bitmask.
  A hint is accepted once; older than the window or seen before is a replay. The window
  moves only after the tag verified, so forged hints cannot advance it.

``HintVerifier.verify`` returns the hint or raises `HintRejected` (a ValueError) naming the
reason; the bridge core catches it, drops the hint and counts the reason, so nothing here
raises into the media path.

A bridge core checks its streams' hints with one `HintTable`: the same checks, column by
column over its stream table, in C (sfu_bridge/_rtpsend.c) where the extension is built.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
from dataclasses import dataclass, field

import numpy as np

from sfu_bridge.hint_ext import (
    HINT_BANDWIDTHS_KBPS,
    HINT_BODY_BYTES,
    HINT_BYTES,
    HINT_INDEX_BITS,
    HINT_SEQ_BITS,
    HINT_SEQ_MASK,
    HINT_TAG_BYTES,
    Hint,
    HintElement,
)

HKDF_SALT = b"auralink/aic-hint/v1"
HKDF_INFO_PREFIX = b"auralink aic-hint v1 stream="
KEY_BYTES = 32
MIN_WINDOW = 64
DEFAULT_WINDOW = 128
_INDEX_BYTES = HINT_INDEX_BITS // 8
_HALF = 1 << (HINT_SEQ_BITS - 1)
_SPAN = 1 << HINT_SEQ_BITS
_MAX_INDEX = (1 << HINT_INDEX_BITS) - 1


@functools.lru_cache(maxsize=4)
def _hkdf_prk(cluster_secret: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 section 2.2): the same for every stream of one secret."""
    return hmac.digest(HKDF_SALT, cluster_secret, "sha256")


def derive_stream_key(cluster_secret: bytes, stream_id: str) -> bytes:
    """The stream's 256-bit hint key (HKDF-SHA256 with the stream id in `info`). A key of
    one hash length is HKDF-Expand's first block, T(1) = HMAC(PRK, info || 0x01) (RFC 5869
    section 2.3), so a new stream costs one HMAC: a bridge derives thousands per second."""
    if not cluster_secret:
        raise ValueError("cluster secret is empty")
    info = HKDF_INFO_PREFIX + stream_id.encode("utf-8")
    return hmac.digest(_hkdf_prk(bytes(cluster_secret)), info + b"\x01", "sha256")[:KEY_BYTES]


def compute_tag(key: bytes, index: int, body: bytes) -> bytes:
    """80-bit truncated HMAC-SHA256 over the 48-bit index and the 6-byte body."""
    mac = hmac.digest(key, index.to_bytes(_INDEX_BYTES, "big") + body, "sha256")
    return mac[:HINT_TAG_BYTES]


_IPAD = bytes(b ^ 0x36 for b in range(256))  # byte -> byte ^ ipad (RFC 2104)
_OPAD = bytes(b ^ 0x5C for b in range(256))


class _TagMac:
    """`compute_tag` under one key with the key's HMAC pads (RFC 2104) hashed once: a tag
    then costs two short SHA-256 continuations, not a keyed HMAC set up per hint."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\0")
        self._inner = hashlib.sha256(block.translate(_IPAD))
        self._outer = hashlib.sha256(block.translate(_OPAD))

    def tag(self, index: int, body: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(index.to_bytes(_INDEX_BYTES, "big") + body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:HINT_TAG_BYTES]


def estimate_index(highest: int | None, seq24: int) -> int:
    """The 48-bit index nearest to `highest` whose low 24 bits are `seq24` (RFC 3711 A).

    A receiver that has accepted nothing yet assumes the high bits are zero.
    """
    if highest is None:
        return seq24
    roc, s_l = highest >> HINT_SEQ_BITS, highest & HINT_SEQ_MASK
    if s_l < _HALF:
        v = roc - 1 if seq24 - s_l > _HALF and roc > 0 else roc
    else:
        v = roc + 1 if s_l - _HALF > seq24 else roc
    return min((v << HINT_SEQ_BITS) | seq24, _MAX_INDEX)


class HintRejection(str, enum.Enum):
    SIZE = "size"  # the element is not exactly 16 bytes (or not bytes at all)
    TAG = "tag"  # bad tag: forged, corrupted, or signed for another stream
    FIELD = "field"  # authentic but a field value is invalid (e.g. bandwidth index 7)
    REPLAY = "replay"  # index already seen or older than the window
    STREAM = "stream"  # presented to the verifier of a different stream


class HintRejected(ValueError):
    def __init__(self, reason: HintRejection, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ReplayWindow:
    """RFC 3711 section 3.3.2 replay list: highest index and a bitmask of the ones below."""

    size: int = DEFAULT_WINDOW
    highest: int | None = None
    mask: int = 0  # bit i set = index (highest - i) was accepted

    def __post_init__(self) -> None:
        if self.size < MIN_WINDOW:
            raise ValueError(f"replay window {self.size} is below the minimum {MIN_WINDOW}")

    def seen(self, index: int) -> bool:
        """True if `index` must be rejected as a replay."""
        if self.highest is None or index > self.highest:
            return False
        delta = self.highest - index
        return delta >= self.size or bool((self.mask >> delta) & 1)

    def accept(self, index: int) -> None:
        if self.highest is None:
            self.highest, self.mask = index, 1
        elif index > self.highest:
            shift = index - self.highest
            self.mask = ((self.mask << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = index
        else:
            self.mask |= 1 << (self.highest - index)


class HintSigner:
    """Signs hints: with the cluster secret (bridge, tools) or given stream keys (SDK)."""

    def __init__(
        self, cluster_secret: bytes | None = None, stream_keys: dict[str, bytes] | None = None
    ) -> None:
        self._secret = cluster_secret
        self._keys: dict[str, bytes] = dict(stream_keys or {})
        self._macs: dict[str, _TagMac] = {}

    def stream_key(self, stream_id: str) -> bytes:
        key = self._keys.get(stream_id)
        if key is None:
            if self._secret is None:
                raise ValueError(f"no hint key for stream {stream_id!r} and no cluster secret")
            key = self._keys[stream_id] = derive_stream_key(self._secret, stream_id)
        return key

    def sign(self, stream_id: str, hint: Hint) -> bytes:
        """The 16-byte element data for `hint` (its `seq` is the 48-bit index)."""
        element = HintElement.from_hint(hint)
        body = element.body()
        mac = self._macs.get(stream_id)
        if mac is None:
            mac = self._macs[stream_id] = _TagMac(self.stream_key(stream_id))
        return body + mac.tag(hint.seq, body)


@dataclass
class HintVerifier:
    """Verifies the hints of one stream: tag under its key, then its replay window.

    Build it with the cluster secret (the key is derived) or with the stream key itself.
    """

    cluster_secret: bytes | None = field(repr=False)
    stream_id: str
    window: int = DEFAULT_WINDOW
    key: bytes | None = field(default=None, repr=False)  # never in logs or reprs

    def __post_init__(self) -> None:
        if self.key is None:
            if self.cluster_secret is None:
                raise ValueError("HintVerifier needs a cluster secret or a stream key")
            self.key = derive_stream_key(self.cluster_secret, self.stream_id)
        self.cluster_secret = None  # only the stream key is needed from here on
        self.replay = ReplayWindow(self.window)
        self._mac = _TagMac(self.key)

    def accept(self, stream_id: str, data: bytes) -> int:
        """The 48-bit index of the authentic, fresh hint in `data`; its index is then marked
        seen. HintRejected (a ValueError) names the reason otherwise: size, tag, field or
        replay, checked in that order (a forged hint is `tag`, whatever its fields say)."""
        if stream_id != self.stream_id:
            raise HintRejected(HintRejection.STREAM, "hint presented for another stream")
        if type(data) is not bytes:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise HintRejected(HintRejection.SIZE, f"hint data must be bytes, got {type(data).__name__}")
            data = bytes(data)
        if len(data) != HINT_BYTES:
            raise HintRejected(
                HintRejection.SIZE, f"hint element is {len(data)} bytes, expected {HINT_BYTES}"
            )
        body = data[:HINT_BODY_BYTES]
        replay = self.replay
        index = estimate_index(replay.highest, int.from_bytes(data[3:HINT_BODY_BYTES], "big"))
        if not hmac.compare_digest(self._mac.tag(index, body), data[HINT_BODY_BYTES:]):
            raise HintRejected(HintRejection.TAG, "hint tag does not verify")
        if (data[0] >> 1) & 0x07 >= len(HINT_BANDWIDTHS_KBPS):  # the only field with invalid values
            try:
                HintElement.parse(data)
            except ValueError as exc:
                raise HintRejected(HintRejection.FIELD, str(exc)) from None
        if replay.seen(index):
            raise HintRejected(HintRejection.REPLAY, f"hint index {index} was already seen or is too old")
        replay.accept(index)
        return index

    def verify(self, stream_id: str, data: bytes) -> Hint:
        """The authentic, fresh hint in `data`, or HintRejected (a ValueError) with a reason."""
        index = self.accept(stream_id, data)
        return HintElement.parse(bytes(data)).to_hint(index)


try:  # the columnar verifier's C loop (sfu_bridge/_rtpsend.c); HintVerifier objects without it
    from sfu_bridge._rtpsend import hint_accept as _c_hint_accept
    from sfu_bridge._rtpsend import hint_pads as _c_hint_pads
except ImportError:  # pragma: no cover - a build without the C part
    _c_hint_accept = _c_hint_pads = None

# HintTable.accept_many's answer per hint: 0 = accepted (its index is valid), else the reason
HINT_ACCEPTED = 0
HINT_CODES = (None, HintRejection.TAG, HintRejection.FIELD, HintRejection.REPLAY, HintRejection.SIZE)
_SIZE_CODE = 4


class HintTable:
    """The hint verifiers of a stream table (a bridge core's rows), column by column: each
    open row's key pads and replay window. `accept_many` gives what `HintVerifier.accept`
    would for each hint, in arrival order, with the same effect on the windows; with the C
    part built it runs as one loop over the hints (two SHA-256 compressions a tag), without
    it through one `HintVerifier` per row. A row is opened (its stream's key derived) at its
    first hint and closed when its stream leaves."""

    def __init__(self, cluster_secret: bytes, window: int = DEFAULT_WINDOW, native: bool = True) -> None:
        ReplayWindow(window)  # the same bounds as one stream's window
        self._secret = bytes(cluster_secret)
        self.window = window
        self.native = native and _c_hint_accept is not None and window <= 1024
        self._words = (window + 63) // 64
        self._open = np.zeros(0, bool)
        self._pads = np.zeros((0, 64), np.uint8)
        self._highest = np.zeros(0, np.int64)
        self._mask = np.zeros((0, self._words), np.uint64)
        self._verifiers: list[HintVerifier | None] = []

    def grow(self, capacity: int) -> None:
        extra = capacity - self._open.size
        if extra <= 0:
            return
        self._open = np.concatenate([self._open, np.zeros(extra, bool)])
        if self.native:
            self._pads = np.concatenate([self._pads, np.zeros((extra, 64), np.uint8)])
            self._highest = np.concatenate([self._highest, np.full(extra, -1, np.int64)])
            self._mask = np.concatenate([self._mask, np.zeros((extra, self._words), np.uint64)])
        else:
            self._verifiers.extend([None] * extra)

    def close(self, row: int) -> None:
        """The row's stream left: its key and window go (a new stream on the row starts afresh)."""
        if row < self._open.size:
            self._open[row] = False
            if not self.native:
                self._verifiers[row] = None

    def _open_rows(self, rows: np.ndarray, stream_ids: list[str]) -> None:
        """Opens the rows (distinct, not open) for these streams: keys derived, windows empty."""
        if self.native:
            secret = self._secret
            pads = b"".join([_c_hint_pads(derive_stream_key(secret, sid)) for sid in stream_ids])
            self._pads[rows] = np.frombuffer(pads, np.uint8).reshape(-1, 64)
            self._highest[rows] = -1
            self._mask[rows] = 0
        else:
            for row, sid in zip(rows.tolist(), stream_ids, strict=True):
                self._verifiers[row] = HintVerifier(self._secret, sid, self.window)
        self._open[rows] = True

    def accept_many(self, rows: np.ndarray, stream_ids: list[str], elements: list[bytes]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(index int64, code uint8) per hint: element i of stream `stream_ids[i]` on row
        `rows[i]`, in arrival order; code 0 = accepted (index is its 48-bit index), else
        `HINT_CODES[code]` names the rejection."""
        rows = np.asarray(rows, np.int64)
        n = rows.size
        index = np.zeros(n, np.int64)
        code = np.zeros(n, np.uint8)
        if not n:
            return index, code
        new = rows[~self._open[rows]]
        if new.size:
            uniq, first = np.unique(new, return_index=True)
            pos = (~self._open[rows]).nonzero()[0][first]
            self._open_rows(uniq, [stream_ids[i] for i in pos.tolist()])
        if not self.native:
            for i, (row, data) in enumerate(zip(rows.tolist(), elements, strict=True)):
                try:
                    index[i] = self._verifiers[row].accept(stream_ids[i], data)
                except HintRejected as exc:
                    code[i] = HINT_CODES.index(exc.reason)
            return index, code
        # elements of the usual shape go through the C loop; others are a size rejection
        # (a bytes-like element of 16 bytes is taken as its bytes)
        try:
            data = b"".join(elements)
            usual = len(data) == n * HINT_BYTES and all(map(HINT_BYTES.__eq__, map(len, elements)))
        except TypeError:  # an element that is not bytes-like
            usual = False
        if usual:
            at = np.arange(n)
        else:
            good = np.zeros(n, bool)
            fixed = list(elements)
            for i, d in enumerate(elements):
                if isinstance(d, bytes | bytearray | memoryview) and len(bytes(d)) == HINT_BYTES:
                    fixed[i] = bytes(d)
                    good[i] = True
            at = good.nonzero()[0]
            code[~good] = _SIZE_CODE
            data = b"".join([fixed[i] for i in at.tolist()])
        if at.size:
            out_i = np.zeros(at.size, np.int64)
            out_c = np.zeros(at.size, np.uint8)
            _c_hint_accept(np.ascontiguousarray(rows[at]), data, self._pads, self._highest, self._mask,
                           self.window, len(HINT_BANDWIDTHS_KBPS), out_i, out_c)
            index[at], code[at] = out_i, out_c
        return index, code
