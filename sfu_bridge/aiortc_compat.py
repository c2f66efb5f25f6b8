"""The few aiortc / aioice / pylibsrtp internals the fast send path reads, in one place.

aiortc sends an RTP packet through three coroutines (`RTCDtlsTransport._send_rtp` ->
`aioice.Connection.sendto` -> `StunProtocol.send_data`) and pylibsrtp allocates a C length
cell per `protect`. For a bridge that writes tens of thousands of packets a second that is
most of the cost of a packet; the work underneath is one `srtp_protect` and one `sendto`.
`DatagramPath` resolves those two once (and again whenever the nominated ICE pair or the
DTLS state changes) and writes a packet with no coroutine and no allocation but the result.

Internals used (aiortc 1.x, aioice 0.9+, pylibsrtp 0.10+), checked by tests/sfu_bridge:
- `RTCDtlsTransport._state`, `._tx_srtp` (a `pylibsrtp.Session`), `.transport` (the ICE
  transport) and its `._connection` (`aioice.Connection`);
- `aioice.Connection._nominated[1]` (the selected pair: `.protocol.transport`, `.remote_addr`);
- `pylibsrtp.Session._srtp` (the `srtp_t *`) and `pylibsrtp._binding.{ffi, lib}`.
"""

from __future__ import annotations

from typing import Any

from pylibsrtp._binding import ffi, lib

SRTP_MAX_TRAILER = 16 + 128  # pylibsrtp's SRTP_MAX_TRAILER_LEN
BUFFER_BYTES = 1500


class FastSrtp:
    """`srtp_protect` on a reusable C buffer: the header is written in place, the payload
    copied after it, one call, one `bytes` out (pylibsrtp's `protect` allocates per call)."""

    def __init__(self, session: Any) -> None:
        self._session = session  # keeps the srtp_t alive
        self._srtp = session._srtp[0]
        self._cdata = ffi.new("char[]", BUFFER_BYTES)
        self.buffer = ffi.buffer(self._cdata)  # writable: struct.pack_into works on it
        self._len = ffi.new("int *")

    def protect_in_place(self, n: int) -> bytes:
        """Protect the n bytes of RTP already in `buffer`; returns the SRTP packet."""
        self._len[0] = n
        rc = lib.srtp_protect(self._srtp, self._cdata, self._len)
        if rc != 0:
            raise ConnectionError(f"srtp_protect failed ({rc})")
        return self.buffer[0:self._len[0]]

    def protect(self, header: bytes, payload: bytes) -> bytes:
        h = len(header)
        n = h + len(payload)
        if n > BUFFER_BYTES - SRTP_MAX_TRAILER:
            raise ValueError("packet is too long")
        buf = self.buffer
        buf[0:h] = header
        buf[h:n] = payload
        return self.protect_in_place(n)


class DatagramPath:
    """The socket, remote address and SRTP session an RTP sender's packets leave by."""

    def __init__(self, dtls_transport: Any) -> None:
        self.dtls = dtls_transport
        self._pair: Any = None
        self._srtp_session: Any = None
        self.srtp: FastSrtp | None = None
        self.sendto: Any = None
        self.addr: Any = None

    def ready(self) -> bool:
        """True when connected; re-resolves after an ICE restart or a new DTLS session."""
        from aiortc.rtcdtlstransport import State

        dtls = self.dtls
        if dtls._state != State.CONNECTED:
            return False
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return False
        if pair is not self._pair or dtls._tx_srtp is not self._srtp_session:
            self._pair = pair
            self._srtp_session = dtls._tx_srtp
            self.srtp = FastSrtp(dtls._tx_srtp)
            self.sendto = pair.protocol.transport.sendto
            self.addr = pair.remote_addr
        return True

