"""Every aiortc / aioice internal the bridge and the SDK touch, and nothing else.

aiortc's public API has no way to write RTP of two codecs on one SSRC, to see RTP packets
before its jitter buffer, to negotiate a header extension or codec it does not know, or to
count a connection's UDP bytes. What the bridge needs for that - private attributes, and a
few module globals it replaces - is read and written only here, so an aiortc upgrade breaks
in this one module: `check_version()` refuses a version these accessors were not written
against, and tests/sfu_bridge/test_aiortc_compat.py exercises each of them on a real
loopback connection.

**The fast send path** (`DatagramPath`, `FastSrtp`). aiortc sends an RTP packet through three
coroutines (`RTCDtlsTransport._send_rtp` -> `aioice.Connection.sendto` ->
`StunProtocol.send_data`) and pylibsrtp allocates a C length cell per `protect`. For a bridge
that writes tens of thousands of packets a second that is most of the cost of a packet; the
work underneath is one `srtp_protect` and one `sendto`. `DatagramPath` resolves those two once
(and again whenever the nominated ICE pair or the DTLS state changes) and writes a packet
with no coroutine and no allocation but the result. It reads `RTCDtlsTransport._state`,
`._tx_srtp` (a `pylibsrtp.Session`) and `.transport._connection` (`aioice.Connection`),
`aioice.Connection._nominated[1]` (the selected pair: `.protocol.transport`, `.remote_addr`),
`pylibsrtp.Session._srtp` (the `srtp_t *`) and `pylibsrtp._binding.{ffi, lib}`.

**The native send** (`native_path`, `sfu_bridge._rtpsend`, built from `_rtpsend.c` at install).
The same packet written, protected and sent by one C call: `srtp_protect` is pylibsrtp's own
(its address from `ffi.addressof`, the session's `srtp_t` from `Session._srtp`), the socket is
the nominated pair's (its file descriptor and the remote address as a `struct sockaddr`). A
packet the socket refuses (full buffer) is dropped and counted, where asyncio's transport would
queue it: a real-time packet late behind a queue is worth less than the next one. A transport
whose `sendto` was wrapped (`media.UdpMeter`) keeps the Python path, so the wrapper sees every
datagram. Without the extension (no C compiler at install) everything takes the Python path.

**The native receive** (`RtpIngress`, `fast_ingress`). aiortc receives an RTP packet through
`StunProtocol.datagram_received` (which first tries to parse it as STUN), aioice's queue, the
DTLS transport's receive coroutine, pylibsrtp's `unprotect`, `RtpPacket.parse`, the RTP router
and the receiver's handler. Once the bridge has consumed a publisher's first Opus packet on
that path (`tap_receiver`), `fast_ingress` puts `RtpIngress.take` in front of each of the
connection's ICE protocols' `datagram_received`: a datagram of that SSRC and payload type is
unprotected with the DTLS transport's own receive session (`._rx_srtp`: one replay window and
rollover counter, whichever path a packet takes) and parsed by one C call (`_rtpsend.unprotect`),
its hint handed to the extension map's `hint_sink` and the packet counted for aiortc's receiver
reports, as on aiortc's path; anything else (STUN, DTLS, RTCP, other SSRCs or payload types)
goes on to aioice untouched. It reads `RTCDtlsTransport._rx_srtp` and `._state`,
`aioice.Connection._protocols`, `RTCRtpReceiver.__remote_streams` and the DTLS transport's
received-bytes counters.
"""

from __future__ import annotations

import inspect
import socket
import struct
from collections.abc import Callable
from typing import Any

import aiortc
from aiortc import codecs as _codecs
from aiortc import rtcrtpreceiver as _receiver
from aiortc import rtp as _rtp
from aiortc.rtcdtlstransport import State as _DtlsState
from pylibsrtp._binding import ffi, lib

from models.constants import RTP_CLOCK_HZ

try:
    from sfu_bridge import _rtpsend
except ImportError as _exc:  # built at install (setup.py); optional
    _rtpsend = None
    NATIVE_SEND_MISSING: str | None = f"sfu_bridge._rtpsend is not built ({_exc})"
else:
    NATIVE_SEND_MISSING = None

SUPPORTED_AIORTC = ("1.16.0",)


class AiortcVersionError(RuntimeError):
    pass


def check_version(version: str | None = None) -> str:
    """The installed aiortc version, or AiortcVersionError when the accessors below were not
    written against it (pin `aiortc==1.16.0`, or update this module and its test)."""
    v = aiortc.__version__ if version is None else version
    if v not in SUPPORTED_AIORTC:
        raise AiortcVersionError(
            f"aiortc {v} is not supported: sfu_bridge/aiortc_compat.py reads its internals as of "
            f"{', '.join(SUPPORTED_AIORTC)}; pin that version or port this module"
        )
    return v


check_version()


# -- transceivers and senders (the bridge writes RTP itself: AIC and Opus on one SSRC)
def sender_ssrc(transceiver: Any) -> int:
    """The SSRC aiortc's sender announced in SDP and RTCP (the sender stays trackless)."""
    return transceiver.sender._ssrc


def negotiated_codecs(transceiver: Any) -> list:
    """The codecs negotiated on a transceiver (`RTCRtpCodecParameters`), best first."""
    return list(transceiver._codecs)


def negotiated_header_extensions(transceiver: Any) -> list:
    return list(transceiver._headerExtensions)


async def send_rtp(transceiver: Any, data: bytes) -> None:
    """Hands one serialized RTP packet to the transceiver's DTLS transport (SRTP + UDP)."""
    await transceiver.sender.transport._send_rtp(data)


def on_keyframe_request(transceiver: Any, callback: Callable[[], Any]) -> None:
    """Calls `callback` when the remote receiver asks for a fresh start (RTCP PLI/FIR):
    the AIC subscriber's way to request a new epoch."""
    transceiver.sender._send_keyframe = callback


async def send_pli(receiver: Any, media_ssrc: int) -> None:
    """Sends an RTCP PLI for `media_ssrc` from a receiver (the SDK's epoch request)."""
    await receiver._send_rtcp_pli(media_ssrc)


# -- receivers: packets before aiortc's jitter buffer
def tap_receiver(receiver: Any, on_packet: Callable[[_rtp.RtpPacket], Any]) -> None:
    """Let `on_packet` (plain or async) see each RTP packet a receiver gets, before aiortc's
    jitter buffer; a packet it returns True for is consumed there. Used by the bridge to
    forward a publisher's Opus packets untouched, and by the SDK subscriber.

    Needed by a subscriber that gets AIC and Opus packets interleaved on one SSRC: aiortc's
    audio path assigns each reassembled frame the payload type of the packet that completed
    it (the next one), so frames at a codec switch would reach the wrong decoder.
    """
    original = receiver._handle_rtp_packet

    async def handle(packet: _rtp.RtpPacket, arrival_time_ms: int) -> None:
        consumed = on_packet(packet)
        if inspect.isawaitable(consumed):
            consumed = await consumed
        if consumed:
            # still counted for the receiver reports aiortc sends (RFC 3550 6.4.2): the
            # sender's rate control lives on them
            count_for_receiver_reports(receiver, packet)
            return
        await original(packet, arrival_time_ms=arrival_time_ms)

    receiver._handle_rtp_packet = handle


def count_for_receiver_reports(receiver: Any, packet: _rtp.RtpPacket) -> None:
    """Feed aiortc's per-source statistics (loss, jitter, highest sequence) with a packet
    that bypassed `_handle_rtp_packet`, as that method would."""
    streams = receiver._RTCRtpReceiver__remote_streams
    stats = streams.get(packet.ssrc)
    if stats is None:
        stats = streams[packet.ssrc] = _receiver.StreamStatistics(RTP_CLOCK_HZ)
    stats.add(packet)


def receive_extensions_map(transceiver: Any) -> Any:
    """The header-extension map a transceiver's DTLS transport parses received packets with."""
    return transceiver.receiver.transport._rtp_header_extensions_map


# -- the closed lists of header extensions, codecs and decoders
def install_extensions(extensions_cls: type, map_cls: type, audio_extension: Any,
                       audio_codec: Any, is_ours: Callable[[Any], bool],
                       decoder_for_ours: Callable[[], Any]) -> None:
    """Extends aiortc's closed lists (idempotent): RTP packets parse and serialize with
    `extensions_cls` / `map_cls`, `audio_extension` is offered and accepted in SDP,
    `audio_codec` joins the audio codecs after aiortc's own, and received frames of a codec
    `is_ours` get `decoder_for_ours()` instead of aiortc's decoder."""
    _rtp.HeaderExtensions = extensions_cls  # RtpPacket() and map.get() build ours
    _rtp.HeaderExtensionsMap = map_cls  # transports and senders build ours
    audio_ext = _codecs.HEADER_EXTENSIONS["audio"]
    if not any(e.uri == audio_extension.uri for e in audio_ext):
        audio_ext.append(audio_extension)
    audio = _codecs.CODECS["audio"]
    if not any(is_ours(c) for c in audio):
        audio.append(audio_codec)
    if not getattr(_receiver.get_decoder, "_auralink", False):
        aiortc_get_decoder = _receiver.get_decoder

        def get_decoder(codec: Any) -> Any:
            return decoder_for_ours() if is_ours(codec) else aiortc_get_decoder(codec)

        get_decoder._auralink = True  # type: ignore[attr-defined]
        _receiver.get_decoder = get_decoder


# -- aioice: the UDP sockets under a peer connection
def ice_datagram_protocols(pc: Any) -> list[Any]:
    """The asyncio datagram protocols (one per local candidate socket) of every ICE
    connection of a peer connection; each has `datagram_received` and `transport.sendto`."""
    seen: set[int] = set()
    out = []
    for t in pc.getTransceivers():
        conn = t.receiver.transport.transport._connection  # aioice.Connection
        if id(conn) in seen:
            continue
        seen.add(id(conn))
        out.extend(conn._protocols)
    return out


# -- the fast send path: SRTP in place and the nominated pair's socket
SRTP_MAX_TRAILER = 16 + 128  # pylibsrtp's SRTP_MAX_TRAILER_LEN
BUFFER_BYTES = 1500


class FastSrtp:
    """`srtp_protect` on a reusable C buffer: the header is written in place, the payload
    copied after it, one call, one `bytes` out (pylibsrtp's `protect` allocates per call)."""

    def __init__(self, session: Any) -> None:
        self._session = session  # keeps the srtp_t alive
        self._srtp = session._srtp[0]
        self.ctx = int(ffi.cast("uintptr_t", self._srtp))  # the srtp_t, for the native send
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


SRTP_PROTECT = int(ffi.cast("uintptr_t", ffi.addressof(lib, "srtp_protect")))


def native_send_available() -> bool:
    return _rtpsend is not None


def sockaddr_bytes(family: int, addr: tuple) -> bytes | None:
    """A numeric (host, port[, flowinfo, scope_id]) as the `struct sockaddr_in`/`_in6` sendto
    takes; None for anything else (a name, a scoped link-local text address)."""
    try:
        if family == socket.AF_INET:
            return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(addr[1]),
                               socket.inet_pton(socket.AF_INET, addr[0]))
        if family == socket.AF_INET6:
            flow, scope = (addr[2], addr[3]) if len(addr) >= 4 else (0, 0)
            return struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(addr[1]), socket.htonl(flow),
                               socket.inet_pton(socket.AF_INET6, addr[0]), scope)
    except (OSError, ValueError, TypeError, IndexError, struct.error):
        return None
    return None


def native_path(srtp: FastSrtp, sock: socket.socket | None, addr: tuple) -> tuple | None:
    """The `_rtpsend.send` path (srtp_protect, srtp_t, fd, sockaddr, srtp) of an SRTP context
    and a UDP socket to `addr` (the tuple holds `srtp`, so its srtp_t lives as long as the
    path); None when the extension is missing or the address is not numeric. The caller
    stops using the path when the socket closes (`DatagramPath.ready`)."""
    if _rtpsend is None or sock is None or sock.fileno() < 0:
        return None
    sa = sockaddr_bytes(sock.family, addr)
    return None if sa is None else (SRTP_PROTECT, srtp.ctx, sock.fileno(), sa, srtp)


SRTP_UNPROTECT = int(ffi.cast("uintptr_t", ffi.addressof(lib, "srtp_unprotect")))


class _Seen:
    """What aiortc's `StreamStatistics.add` reads of a packet."""

    __slots__ = ("sequence_number", "timestamp")

    def __init__(self) -> None:
        self.sequence_number = 0
        self.timestamp = 0


class RtpIngress:
    """One publisher SSRC's packets of one payload type, each unprotected and parsed by one C
    call and handed to `on_payload(sequence number, timestamp, payload)`.

    `session_of()` returns the pylibsrtp session to unprotect with (None: not connected, the
    datagram is not taken). `hint_id`/`hint_sink`: the hint extension's negotiated id and
    where its values go (as `rtp_ext.AicHeaderExtensionsMap` does on aiortc's path). `stats`:
    aiortc's per-source statistics the receiver reports are built from. A packet libsrtp
    refuses (authentication, replay) or whose plaintext is not RTP is dropped and counted in
    `drops` ("srtp", "rtp_malformed"), as aiortc drops it."""

    def __init__(self, session_of: Callable[[], Any], ssrc: int, payload_type: int,
                 on_payload: Callable[[int, int, bytes], Any], *, hint_id: int | None = None,
                 hint_sink: Callable[[bytes], Any] | None = None, stats: Any = None,
                 dtls: Any = None) -> None:
        if _rtpsend is None:
            raise RuntimeError(NATIVE_SEND_MISSING)
        self._session_of = session_of
        self._session: Any = None
        self._ctx = 0
        self._ssrc = struct.pack("!I", ssrc)
        self._pt = payload_type
        self._on_payload = on_payload
        self._hint_id = -1 if hint_id is None else hint_id
        self._hint_sink = hint_sink
        self._stats = stats
        self._seen = _Seen()
        self._dtls = dtls
        self.packets = 0
        self.drops: dict[str, int] = {}

    def take(self, data: bytes) -> bool:
        """True when the datagram was this ingress's (handled or dropped here); False: it is
        someone else's (STUN, DTLS, RTCP, another SSRC or payload type) or not yet."""
        if (len(data) < 12 or not 127 < data[0] < 192 or data[1] & 0x7F != self._pt
                or data[8:12] != self._ssrc):
            return False
        session = self._session_of()
        if session is None:
            return False
        if session is not self._session:  # a new DTLS session: its own srtp_t
            self._session = session
            self._ctx = int(ffi.cast("uintptr_t", session._srtp[0]))
        if self._dtls is not None:  # the transport's own counters (getStats)
            self._dtls._RTCDtlsTransport__rx_bytes += len(data)
            self._dtls._RTCDtlsTransport__rx_packets += 1
        got = _rtpsend.unprotect(SRTP_UNPROTECT, self._ctx, data, self._hint_id)
        if got.__class__ is not tuple:
            why = "srtp" if got > 0 else "rtp_malformed"
            self.drops[why] = self.drops.get(why, 0) + 1
            return True
        _, seq, ts, payload, hint = got
        self.packets += 1
        if hint is not None and self._hint_sink is not None:
            self._hint_sink(hint)
        if self._stats is not None:
            seen = self._seen
            seen.sequence_number = seq
            seen.timestamp = ts
            self._stats.add(seen)
        self._on_payload(seq, ts, payload)
        return True


def fast_ingress(receiver: Any, ssrc: int, payload_type: int, on_payload: Callable[[int, int, bytes], Any],
                 *, hint_id: int | None = None, hint_sink: Callable[[bytes], Any] | None = None) -> RtpIngress | None:
    """Route a receiver's packets of `ssrc` and `payload_type` through an `RtpIngress` in front
    of its ICE connection's sockets (module doc); None without the extension, or when a
    protocol's `datagram_received` is already wrapped (`media.UdpMeter` must see every
    datagram: aiortc's path then)."""
    dtls = receiver.transport
    protocols = dtls.transport._connection._protocols
    if _rtpsend is None or any("datagram_received" in vars(p) for p in protocols):
        return None
    streams = receiver._RTCRtpReceiver__remote_streams
    stats = streams.get(ssrc)
    if stats is None:
        stats = streams[ssrc] = _receiver.StreamStatistics(RTP_CLOCK_HZ)

    def session() -> Any:
        return dtls._rx_srtp if dtls._state == _DtlsState.CONNECTED else None

    ingress = RtpIngress(session, ssrc, payload_type, on_payload, hint_id=hint_id, hint_sink=hint_sink,
                         stats=stats, dtls=dtls)
    take = ingress.take
    for protocol in protocols:
        def datagram_received(data: bytes, addr: Any, _next: Any = protocol.datagram_received) -> None:
            if not take(data):
                _next(data, addr)

        protocol.datagram_received = datagram_received
    return ingress


# native_send(path, template, b1, seq, timestamp, payload) -> the SRTP packet's length, or
# -errno when the socket refused it (_rtpsend.c); None without the extension
native_send: Callable[..., int] | None = _rtpsend.send if _rtpsend is not None else None


class DatagramPath:
    """The socket, remote address and SRTP session an RTP sender's packets leave by."""

    def __init__(self, dtls_transport: Any) -> None:
        self.dtls = dtls_transport
        self._pair: Any = None
        self._srtp_session: Any = None
        self._transport: Any = None
        self.srtp: FastSrtp | None = None
        self.sendto: Any = None
        self.addr: Any = None
        self.native: tuple | None = None  # `native_path` of the pair's socket, when it has one

    def ready(self) -> bool:
        """True when connected; re-resolves after an ICE restart or a new DTLS session."""
        dtls = self.dtls
        if dtls._state != _DtlsState.CONNECTED:
            return False
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return False
        if pair is not self._pair or dtls._tx_srtp is not self._srtp_session:
            self._pair = pair
            self._srtp_session = dtls._tx_srtp
            self.srtp = FastSrtp(dtls._tx_srtp)
            transport = self._transport = pair.protocol.transport
            self.sendto = transport.sendto
            self.addr = pair.remote_addr
            # a wrapped sendto (UdpMeter) must see every datagram: no native path then (uvloop's
            # transports have no instance dictionary: nothing can be wrapped there)
            self.native = (None if "sendto" in getattr(transport, "__dict__", ())
                           else native_path(self.srtp, transport.get_extra_info("socket"), self.addr))
        # a closed socket's descriptor may be reused by another: never write to it
        return not self._transport.is_closing()

