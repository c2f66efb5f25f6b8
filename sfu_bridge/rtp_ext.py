"""aiortc glue: negotiate the AIC hint header extension and the AIC payload type.

aiortc knows a closed list of RTP header extensions (`aiortc.rtp.HeaderExtensionsMap`,
`aiortc.codecs.HEADER_EXTENSIONS`) and codecs (`aiortc.codecs.CODECS`). `install()` extends
them in this one place, idempotently:

- the hint extension (RFC 8285, URI `HINT_URI`) joins the audio header extensions, so it is
  offered and accepted in SDP like aiortc's own ones;
- `rtp.HeaderExtensions` gains an `aic_hint` field and `rtp.HeaderExtensionsMap` reads and
  writes it under the negotiated id. A map may carry a `hint_sink` callback: the DTLS
  transport parses every received packet with its map, so the sink sees each packet's hint
  bytes (after SRTP authentication) without touching aiortc's receive loop;
- the AIC payload format (`audio/AIC`, 48 kHz RTP clock so one SSRC can switch between
  Opus and AIC without a timestamp jump) joins the audio codecs, after Opus, so ordinary
  senders still pick Opus first. aiortc's receiver hands AIC frames through undecoded as
  `AicFrame` (the subscriber decodes codes itself, applying the epoch rule).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import codecs as _codecs
from aiortc import rtcrtpreceiver as _receiver
from aiortc import rtp as _rtp
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
)

try:  # the wire-format module owns the URI; keep one spelling.
    from sfu_bridge.hint_ext import HINT_URI  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - hint_ext always ships with the package
    HINT_URI = "urn:auralink:aic-hint:1"

# aiortc uses ids 1-3 (mid, audio level, abs-send-time); BUNDLE shares the id space
# across media, so the hint takes an id no aiortc extension uses. Answers use the offerer's id.
HINT_EXT_ID = 10
AIC_MIME = "audio/AIC"
AIC_CLOCK_RATE = 48_000
AIC_PAYLOAD_TYPE = 120  # our offers; answers take the offerer's dynamic PT


@dataclass
class AicHeaderExtensions(_rtp.HeaderExtensions):
    """aiortc's parsed header extensions plus the raw AIC hint element (or None)."""

    aic_hint: bytes | None = None


class AicHeaderExtensionsMap(_rtp.HeaderExtensionsMap):
    """aiortc's extension map that also reads/writes the AIC hint under its negotiated id."""

    def __init__(self) -> None:
        super().__init__()
        self.hint_id: int | None = None
        self.hint_sink: Callable[[bytes], None] | None = None

    def configure(self, parameters: RTCRtpParameters) -> None:
        super().configure(parameters)
        for ext in parameters.headerExtensions:
            if ext.uri == HINT_URI:
                self.hint_id = ext.id

    def get(self, extension_profile: int, extension_value: bytes) -> _rtp.HeaderExtensions:
        values = super().get(extension_profile, extension_value)
        if self.hint_id is None:
            return values
        for x_id, x_value in _rtp.unpack_header_extensions(extension_profile, extension_value):
            if x_id == self.hint_id:
                values.aic_hint = bytes(x_value)
                if self.hint_sink is not None:
                    self.hint_sink(values.aic_hint)
                break
        return values

    def set(self, values: _rtp.HeaderExtensions) -> tuple[int, bytes]:
        profile, data = super().set(values)
        hint = getattr(values, "aic_hint", None)
        if hint is None or self.hint_id is None:
            return profile, data
        elements = _rtp.unpack_header_extensions(profile, data) if data else []
        elements.append((self.hint_id, hint))
        return _rtp.pack_header_extensions(elements)


@dataclass
class AicFrame:
    """One received AIC RTP payload, handed through aiortc's receiver undecoded."""

    data: bytes
    timestamp: int  # RTP timestamp (48 kHz clock), rebased by aiortc to start at 0


class AicPassthroughDecoder(Decoder):
    def decode(self, encoded_frame: JitterFrame) -> list:  # type: ignore[override]
        return [AicFrame(bytes(encoded_frame.data), encoded_frame.timestamp)]


def is_aic(codec: RTCRtpCodecParameters) -> bool:
    return codec.mimeType.lower() == AIC_MIME.lower()


_installed = False
_aiortc_get_decoder = _receiver.get_decoder


def _get_decoder(codec: RTCRtpCodecParameters) -> Decoder:
    return AicPassthroughDecoder() if is_aic(codec) else _aiortc_get_decoder(codec)


def install() -> None:
    """Extend aiortc's closed lists (idempotent; call before creating peer connections)."""
    global _installed
    if _installed:
        return
    _rtp.HeaderExtensions = AicHeaderExtensions  # RtpPacket() and map.get() build ours
    _rtp.HeaderExtensionsMap = AicHeaderExtensionsMap  # transports and senders build ours
    audio_ext = _codecs.HEADER_EXTENSIONS["audio"]
    if not any(e.uri == HINT_URI for e in audio_ext):
        audio_ext.append(RTCRtpHeaderExtensionParameters(id=HINT_EXT_ID, uri=HINT_URI))
    audio = _codecs.CODECS["audio"]
    if not any(is_aic(c) for c in audio):
        audio.append(
            RTCRtpCodecParameters(
                mimeType=AIC_MIME, clockRate=AIC_CLOCK_RATE, channels=1,
                payloadType=AIC_PAYLOAD_TYPE,
            )
        )
    _receiver.get_decoder = _get_decoder
    _installed = True


def tap_receiver(receiver: Any, on_packet: Callable[[_rtp.RtpPacket], Any]) -> None:
    """Let `on_packet` (plain or async) see each RTP packet a receiver gets, before aiortc's
    jitter buffer; a packet it returns True for is consumed there. Used by the bridge to
    forward a publisher's Opus packets untouched, and by the SDK subscriber (below).

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
    that bypassed `_handle_rtp_packet`, as that method would (aiortc 1.16 internals)."""
    from aiortc.rtcrtpreceiver import StreamStatistics

    streams = receiver._RTCRtpReceiver__remote_streams
    stats = streams.get(packet.ssrc)
    if stats is None:
        stats = streams[packet.ssrc] = StreamStatistics(AIC_CLOCK_RATE)
    stats.add(packet)


def transport_extensions_map(pc_transceiver) -> AicHeaderExtensionsMap:
    """The map a transceiver's DTLS transport parses received packets with."""
    ext_map = pc_transceiver.receiver.transport._rtp_header_extensions_map
    if not isinstance(ext_map, AicHeaderExtensionsMap):
        raise RuntimeError("aiortc extensions not installed: call rtp_ext.install() first")
    return ext_map
