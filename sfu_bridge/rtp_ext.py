"""aiortc glue: negotiate the AIC hint header extension and the AIC payload type.

aiortc knows a closed list of RTP header extensions (`aiortc.rtp.HeaderExtensionsMap`,
`aiortc.codecs.HEADER_EXTENSIONS`) and codecs (`aiortc.codecs.CODECS`). `install()` extends
them, idempotently, through `sfu_bridge.aiortc_compat` (the one module touching aiortc's
internals):

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import rtp as _rtp
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
)

from models.constants import RTP_CLOCK_HZ
from sfu_bridge import aiortc_compat
from sfu_bridge.hint_ext import HINT_URI

# aiortc uses ids 1-3 (mid, audio level, abs-send-time); BUNDLE shares the id space
# across media, so the hint takes an id no aiortc extension uses. Answers use the offerer's id.
HINT_EXT_ID = 10
AIC_MIME = "audio/AIC"
AIC_CLOCK_RATE = RTP_CLOCK_HZ
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


def install() -> None:
    """Extend aiortc's closed lists (idempotent; call before creating peer connections)."""
    aiortc_compat.install_extensions(
        AicHeaderExtensions, AicHeaderExtensionsMap,
        RTCRtpHeaderExtensionParameters(id=HINT_EXT_ID, uri=HINT_URI),
        RTCRtpCodecParameters(mimeType=AIC_MIME, clockRate=AIC_CLOCK_RATE, channels=1,
                              payloadType=AIC_PAYLOAD_TYPE),
        is_aic, AicPassthroughDecoder,
    )


def hint_map(transceiver: Any) -> AicHeaderExtensionsMap:
    """The map a transceiver's DTLS transport parses received packets with (its `hint_sink`
    sees every received hint element)."""
    ext_map = aiortc_compat.receive_extensions_map(transceiver)
    if not isinstance(ext_map, AicHeaderExtensionsMap):
        raise RuntimeError("aiortc extensions not installed: call rtp_ext.install() first")
    return ext_map
