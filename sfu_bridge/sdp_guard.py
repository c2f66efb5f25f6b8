"""Checks an SDP offer (RFC 8866) line by line before aiortc parses it.

aiortc's SDP parser trusts its input: `m=audio x` fails an `assert`, an `a=fmtp` for a
payload type without `a=rtpmap` raises `StopIteration`, a payload type of 200 is accepted
and later answered with another number. `check_offer` rejects, with a message naming the
line, everything aiortc would choke on and every value outside its wire range, so the
signalling edge answers 400 instead of 500:

- text: no control characters besides TAB/CR/LF and no Unicode line separators (aiortc
  splits lines with `str.splitlines`, which would cut a value in two); every line is
  `<letter>=<value>` and the first is `v=0`;
- `m=`: `<media> <port> <proto> <fmt>...` with a port of 0-65535; for audio and video
  every format is an RTP payload type, 0-127 (RFC 3550 section 5.1: seven bits), not
  72-76 (RFC 5761 section 4: they collide with RTCP packet types), listed once;
- every audio/video m-section states its direction (aiortc cannot answer one without);
- `a=rtpmap`, `a=fmtp`, `a=rtcp-fb` name a payload type of their m-line; an `a=fmtp` needs
  that type's `a=rtpmap`; clock rates, channel counts and the integer `a=fmtp` parameters
  aiortc reads (`minptime`, `apt`, ...) are bounded decimal numbers;
- `a=extmap` ids are 1-255 (RFC 8285), `a=ssrc` ids 32-bit, `a=mid` a token of at most
  16 characters (it travels in a one-byte RTP header extension), `a=setup` one of
  `actpass`/`active`/`passive`, ICE credentials `ice-char`s of RFC 8839 lengths,
  candidates as in RFC 8839 section 5.1 with an IP address or an mDNS `.local` name;
- at most `MAX_MEDIA_SECTIONS` m-lines, `MAX_FORMATS` formats per m-line.

Pure: no aiortc, no I/O. Every rejection is an `SdpRejected` (a `ValueError`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

MAX_MEDIA_SECTIONS = 16
MAX_FORMATS = 64
MAX_LINE_CHARS = 4096
MAX_PAYLOAD_TYPE = 127  # RFC 3550 section 5.1: PT is 7 bits
RTCP_CONFLICT_PTS = range(72, 77)  # RFC 5761 section 4: RTCP SR/RR/SDES/BYE/APP 200-204
MAX_CLOCK_RATE = 1_000_000  # RTP clocks are 8 kHz - 192 kHz for audio, 90 kHz for video
MAX_CHANNELS = 255
MAX_MID_CHARS = 16  # RFC 8843 section 15: the mid travels in a one-byte header extension
# `a=fmtp` parameters aiortc converts with int(): they must be plain decimal numbers
INT_FMTP_PARAMETERS = frozenset(
    {"apt", "max-fr", "max-fs", "maxplaybackrate", "minptime", "stereo", "useinbandfec"}
)
DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
SETUP_ROLES = frozenset({"actpass", "active", "passive"})
CANDIDATE_TYPES = frozenset({"host", "srflx", "prflx", "relay"})
RTP_MEDIA = frozenset({"audio", "video"})
# attributes aiortc reads as `<name>:<value>`: without a value it fails on None
VALUED_ATTRIBUTES = frozenset({
    "candidate", "extmap", "fingerprint", "fmtp", "group", "ice-options", "ice-pwd",
    "ice-ufrag", "max-message-size", "mid", "msid", "msid-semantic", "rtcp", "rtcp-fb",
    "rtpmap", "sctp-port", "sctpmap", "setup", "ssrc", "ssrc-group",
})

_LINE = re.compile(r"[a-z]=", re.ASCII)
_M_LINE = re.compile(r"m=([^ ]+) ([0-9]+) ([A-Z/]+) (.+)", re.ASCII)
_DECIMAL = re.compile(r"[0-9]{1,10}", re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+", re.ASCII)  # RFC 8866 token
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+", re.ASCII)  # RFC 8839 ice-char
_ENCODING = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,63}", re.ASCII)
_CONNECTION = re.compile(r"IN (IP4|IP6) ([^ ]+)", re.ASCII)
_FINGERPRINT = re.compile(r"[A-Za-z0-9\-]{1,16} [0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){15,63}", re.ASCII)
# control characters (TAB, CR and LF aside) and what str.splitlines() also treats as line ends
_BAD_CHARS = re.compile("[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")


class SdpRejected(ValueError):
    """An offer the bridge will not hand to aiortc; the message names the line and the rule."""


@dataclass
class _Section:
    kind: str
    formats: list[int] | None  # payload types (audio/video), None for other media
    line_no: int = 0
    direction: bool = False
    rtpmap: set[int] = field(default_factory=set)
    fmtp: list[tuple[int, int]] = field(default_factory=list)  # (payload type, line number)


def _close_section(section: _Section | None) -> None:
    """Checks that need the whole m-section: aiortc reads a=fmtp after all of its a=rtpmap
    lines (Firefox sends them first), and answers only m-sections that state a direction."""
    if section is None or section.formats is None:
        return
    for pt, no in section.fmtp:
        if pt not in section.rtpmap:
            raise SdpRejected(f"line {no}: a=fmtp for payload type {pt}, which has no a=rtpmap")
    if not section.direction:
        raise SdpRejected(
            f"line {section.line_no}: the m-section has no a=sendrecv, a=sendonly, a=recvonly"
            " or a=inactive"
        )


def _number(text: str, what: str, lo: int, hi: int) -> int:
    if not _DECIMAL.fullmatch(text):
        raise SdpRejected(f"{what} {text[:20]!r} is not a decimal number")
    value = int(text)
    if not lo <= value <= hi:
        raise SdpRejected(f"{what} {value} is outside {lo}-{hi}")
    return value


def _rtp_section(section: _Section | None, what: str) -> _Section:
    if section is None or section.formats is None:
        raise SdpRejected(f"{what} outside an audio or video m-section")
    return section


def _payload_type(text: str, section: _Section, what: str) -> int:
    assert section.formats is not None  # _rtp_section checked it
    pt = _number(text, f"{what} payload type", 0, MAX_PAYLOAD_TYPE)
    if pt not in section.formats:
        raise SdpRejected(f"{what} payload type {pt} is not listed on the m-line")
    return pt


def _check_m_line(line: str) -> _Section:
    m = _M_LINE.fullmatch(line)
    if m is None:
        raise SdpRejected("m-line is not 'm=<media> <port> <proto> <fmt> ...'")
    kind, port, _proto, fmt = m.groups()
    _number(port, "port", 0, 65535)
    formats = fmt.split(" ")
    if len(formats) > MAX_FORMATS:
        raise SdpRejected(f"m-line lists {len(formats)} formats, at most {MAX_FORMATS}")
    if kind not in RTP_MEDIA:
        return _Section(kind, None)
    pts: list[int] = []
    for f in formats:
        pt = _number(f, "payload type", 0, MAX_PAYLOAD_TYPE)
        if pt in RTCP_CONFLICT_PTS:
            raise SdpRejected(f"payload type {pt} collides with RTCP (RFC 5761)")
        if pt in pts:
            raise SdpRejected(f"payload type {pt} is listed twice")
        pts.append(pt)
    return _Section(kind, pts)


def _check_rtpmap(value: str, section: _Section) -> None:
    pt_text, _, desc = value.partition(" ")
    pt = _payload_type(pt_text, section, "a=rtpmap")
    if pt in section.rtpmap:
        raise SdpRejected(f"a=rtpmap for payload type {pt} appears twice")
    bits = desc.split("/")
    if not 2 <= len(bits) <= 3 or not _ENCODING.fullmatch(bits[0]):
        raise SdpRejected("a=rtpmap is not '<pt> <encoding>/<clock rate>[/<channels>]'")
    _number(bits[1], "clock rate", 1, MAX_CLOCK_RATE)
    if len(bits) == 3:
        _number(bits[2], "channel count", 1, MAX_CHANNELS)
    section.rtpmap.add(pt)


def _check_fmtp(value: str, section: _Section, line_no: int) -> None:
    pt_text, sep, params = value.partition(" ")
    pt = _payload_type(pt_text, section, "a=fmtp")
    section.fmtp.append((pt, line_no))
    if not sep:
        raise SdpRejected("a=fmtp is not '<pt> <parameters>'")
    for param in params.split(";"):
        name, eq, v = param.partition("=")
        if eq and name in INT_FMTP_PARAMETERS:
            _number(v, f"a=fmtp parameter {name}", 0, 2**31 - 1)


def _check_candidate(value: str) -> None:
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise SdpRejected(
            "a=candidate is not '<foundation> <component> <transport> <priority> <address>"
            " <port> typ <type> ...'"
        )
    foundation, component, transport, priority, address, port, _, kind = bits[:8]
    if not _ICE_CHARS.fullmatch(foundation) or len(foundation) > 32:
        raise SdpRejected("a=candidate foundation must be 1-32 ice-chars")
    _number(component, "candidate component", 1, 256)
    if transport.lower() not in ("udp", "tcp"):
        raise SdpRejected(f"candidate transport {transport[:10]!r} is not udp or tcp")
    _number(priority, "candidate priority", 0, 2**32 - 1)
    if not address.endswith(".local"):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise SdpRejected("candidate address is neither an IP address nor a .local name") from None
    elif not _TOKEN.fullmatch(address):
        raise SdpRejected("candidate .local name has characters outside a token")
    _number(port, "candidate port", 0, 65535)
    if kind not in CANDIDATE_TYPES:
        raise SdpRejected(f"candidate type {kind[:10]!r} is not host, srflx, prflx or relay")
    for i in range(8, len(bits) - 1, 2):
        if bits[i] == "rport":
            _number(bits[i + 1], "candidate rport", 0, 65535)


def _check_attribute(attr: str, value: str | None, section: _Section | None, line_no: int) -> None:
    if attr in DIRECTIONS and section is not None:
        section.direction = True
    if not value:
        if attr in VALUED_ATTRIBUTES:
            raise SdpRejected(f"a={attr} needs a value")
        return
    if attr == "rtpmap":
        _check_rtpmap(value, _rtp_section(section, "a=rtpmap"))
    elif attr == "fmtp":
        _check_fmtp(value, _rtp_section(section, "a=fmtp"), line_no)
    elif attr == "rtcp-fb":
        pt_text, _, rest = value.partition(" ")
        if pt_text != "*":
            _payload_type(pt_text, _rtp_section(section, "a=rtcp-fb"), "a=rtcp-fb")
        if not rest.strip():
            raise SdpRejected("a=rtcp-fb is not '<pt> <type> [<parameter>]'")
    elif attr == "extmap":
        bits = value.split()
        if len(bits) != 2:
            raise SdpRejected("a=extmap is not '<id>[/<direction>] <uri>' (no extension attributes)")
        ext_id, slash, direction = bits[0].partition("/")
        _number(ext_id, "a=extmap id", 1, 255)
        if slash and direction not in DIRECTIONS:
            raise SdpRejected(f"a=extmap direction {direction[:10]!r} is not a direction")
    elif attr == "setup":
        if value not in SETUP_ROLES:
            raise SdpRejected(f"a=setup:{value[:10]} is not actpass, active or passive")
    elif attr == "fingerprint":
        if not _FINGERPRINT.fullmatch(value):
            raise SdpRejected("a=fingerprint is not '<hash function> <hex bytes separated by :>'")
    elif attr == "ice-ufrag":
        if not _ICE_CHARS.fullmatch(value) or not 4 <= len(value) <= 256:
            raise SdpRejected("a=ice-ufrag must be 4-256 ice-chars (RFC 8839)")
    elif attr == "ice-pwd":
        if not _ICE_CHARS.fullmatch(value) or not 22 <= len(value) <= 256:
            raise SdpRejected("a=ice-pwd must be 22-256 ice-chars (RFC 8839)")
    elif attr == "candidate":
        _check_candidate(value)
    elif attr == "mid":
        if not _TOKEN.fullmatch(value) or len(value) > MAX_MID_CHARS:
            raise SdpRejected(f"a=mid must be a token of 1-{MAX_MID_CHARS} characters")
    elif attr == "ssrc":
        ssrc, _, desc = value.partition(" ")
        _number(ssrc, "a=ssrc id", 0, 2**32 - 1)
        if ":" not in desc:
            raise SdpRejected("a=ssrc is not '<ssrc> <attribute>:<value>'")
    elif attr == "ssrc-group":
        for ssrc in value.split()[1:]:
            _number(ssrc, "a=ssrc-group id", 0, 2**32 - 1)
    elif attr == "rtcp":
        port, _, address = value.partition(" ")
        _number(port, "a=rtcp port", 0, 65535)
        if address and not _CONNECTION.fullmatch(address):
            raise SdpRejected("a=rtcp address is not 'IN IP4|IP6 <address>'")
    elif attr in ("sctp-port", "max-message-size"):
        _number(value, f"a={attr}", 0, 2**32 - 1)
    elif attr == "sctpmap":
        number, sep, _ = value.partition(" ")
        _number(number, "a=sctpmap number", 0, 65535)
        if not sep:
            raise SdpRejected("a=sctpmap is not '<number> <app>'")


def check_offer(text: str) -> None:
    """Raise `SdpRejected` unless `text` is an SDP offer aiortc can parse within wire ranges."""
    bad = _BAD_CHARS.search(text)
    if bad is not None:
        raise SdpRejected(f"control character U+{ord(bad.group()):04X} in the SDP")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    section: _Section | None = None
    sections = 0
    first = True
    for no, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("m="):
            _close_section(section)  # its messages carry their own line numbers
        try:
            if "\r" in line:
                raise SdpRejected("a bare CR inside a line")
            if len(line) > MAX_LINE_CHARS:
                raise SdpRejected(f"line longer than {MAX_LINE_CHARS} characters")
            if not line:
                continue  # aiortc skips empty lines, and so do lenient peers
            if not _LINE.match(line):
                raise SdpRejected("not '<type letter>=<value>'")
            if first != (line[0] == "v") or (first and line != "v=0"):
                raise SdpRejected("an SDP offer starts with 'v=0', and only its first line is v=")
            first = False
            kind = line[0]
            if kind == "m":
                sections += 1
                if sections > MAX_MEDIA_SECTIONS:
                    raise SdpRejected(f"more than {MAX_MEDIA_SECTIONS} m-sections")
                section = _check_m_line(line)
                section.line_no = no
            elif kind == "c":
                if not _CONNECTION.fullmatch(line[2:]):
                    raise SdpRejected("c= is not 'IN IP4|IP6 <address>'")
            elif kind == "a":
                attr, colon, value = line[2:].partition(":")
                _check_attribute(attr, value if colon else None, section, no)
        except SdpRejected as exc:
            raise SdpRejected(f"line {no}: {exc}") from None
    if first:
        raise SdpRejected("empty SDP")
    _close_section(section)
