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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import aiortc
from aiortc import codecs as _codecs
from aiortc import rtcrtpreceiver as _receiver
from aiortc import rtp as _rtp
from aiortc.rtcdtlstransport import State as _DtlsState
from pylibsrtp._binding import ffi, lib

from models.constants import RTP_CLOCK_HZ

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
            self.sendto = pair.protocol.transport.sendto
            self.addr = pair.remote_addr
        return True

