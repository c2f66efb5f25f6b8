"""ICE and DTLS settings of every peer connection the bridge and the SDK make, and the few
SDP rewrites that go with them.

- **No default STUN.** aiortc 1.16 gives an `RTCPeerConnection` without ICE servers a public
  Google STUN server (`RTCIceGatherer.getDefaultIceServers`), so every session would send a
  binding request off the machine. `peer_connection(servers)` always passes an explicit
  `RTCConfiguration(iceServers=[...])`: with an empty list aioice gathers host candidates
  only and contacts no server (`Connection.stun_server`/`turn_server` stay None).
- **ICE servers for clients** (RFC 9725 section 4.6): the servers the bridge uses are also
  announced in `Link: <uri>; rel="ice-server"` headers of the 201 responses (`link_headers`).
- **1:1 NAT** (cloud hosts with a fixed public address): `announce_address` rewrites the host
  candidates of the answer to the public address; the NAT maps the same port to this host.
- **DTLS role**: `prefer_dtls_server`, see there.

All functions here but `peer_connection` are pure: no I/O, no event loop.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # aiortc is imported where a connection is made: config stays light
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

ENV_ICE_SERVERS = "AURALINK_ICE_SERVERS"
ENV_PUBLIC_IP = "AURALINK_PUBLIC_IP"

# characters that would break a Link header (RFC 8288) or smuggle another header
_FORBIDDEN = re.compile(r'[\x00-\x20\x7f<>"\\,;]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class IceServer:
    """One STUN/TURN server, as the W3C `RTCIceServer` dictionary has it."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an ICE server needs at least one URL")
        for url in self.urls:
            if _FORBIDDEN.search(url):
                raise ValueError(f"bad ICE server URL {url!r}: spaces, quotes, <>,; not allowed")
            from aiortc.rtcicetransport import parse_stun_turn_uri

            try:
                parsed = parse_stun_turn_uri(url)  # RFC 7064 / 7065, as aiortc reads them
            except ValueError as exc:
                raise ValueError(f"bad ICE server URL {url!r}: {exc}") from None
            if parsed["scheme"] in ("turn", "turns") and not (self.username and self.credential):
                raise ValueError(
                    f"TURN server {url!r} needs a username and a credential "
                    f"(give them in ${ENV_ICE_SERVERS} as JSON, never on the command line)"
                )
        for value in (self.username, self.credential):
            if value is not None and _CONTROL.search(value):
                raise ValueError("ICE server username/credential must not hold control characters")

    def to_rtc(self) -> RTCIceServer:
        from aiortc import RTCIceServer

        return RTCIceServer(urls=list(self.urls), username=self.username, credential=self.credential)


def parse_ice_servers(text: str) -> tuple[IceServer, ...]:
    """`$AURALINK_ICE_SERVERS`: URLs separated by commas or spaces (`stun:host:3478`), or a
    JSON list of `{"urls": ..., "username": ..., "credential": ...}` (needed for TURN)."""
    text = text.strip()
    if not text:
        return ()
    if not text.startswith("["):
        return tuple(IceServer((url,)) for url in re.split(r"[,\s]+", text) if url)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_ICE_SERVERS} is not valid JSON: {exc.msg}") from None
    servers = []
    for item in items:
        if not isinstance(item, dict) or "urls" not in item:
            raise ValueError(f'{ENV_ICE_SERVERS}: each entry needs "urls"')
        urls = item["urls"]
        urls = (urls,) if isinstance(urls, str) else tuple(urls)
        if not all(isinstance(u, str) for u in urls):
            raise ValueError(f'{ENV_ICE_SERVERS}: "urls" must be strings')
        servers.append(IceServer(urls, item.get("username"), item.get("credential")))
    return tuple(servers)


def rtc_configuration(servers: Sequence[IceServer] = ()) -> RTCConfiguration:
    """Always an explicit list: `iceServers=None` would mean aiortc's public STUN default."""
    from aiortc import RTCConfiguration

    return RTCConfiguration(iceServers=[s.to_rtc() for s in servers])


def peer_connection(servers: Sequence[IceServer] = ()) -> RTCPeerConnection:
    """The one way this project makes an `RTCPeerConnection`: only the given ICE servers."""
    from aiortc import RTCPeerConnection

    return RTCPeerConnection(rtc_configuration(servers))


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link_headers(servers: Sequence[IceServer]) -> list[str]:
    """RFC 9725 section 4.6: one `Link` header value per server URL; TURN URLs carry the
    username and credential as target attributes."""
    links = []
    for server in servers:
        for url in server.urls:
            link = f'<{url}>; rel="ice-server"'
            if url.startswith("turn") and server.username and server.credential:
                link += f"; username={_quoted(server.username)}; credential={_quoted(server.credential)}"
            links.append(link)
    return links


def check_public_ip(value: str) -> str:
    """A literal IPv4/IPv6 address (a 1:1 NAT's public side), or ValueError."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"public IP must be a literal IPv4/IPv6 address, not {value!r}") from None


def announce_address(sdp: str, public_ip: str) -> str:
    """Host candidates (and the `c=` lines) of the public IP's family carry `public_ip`.

    For a host behind a 1:1 NAT (a cloud VM with an elastic/public address): the NAT maps
    public_ip:port to the same port here, where aioice listens, so the peer's checks arrive.
    The private addresses are replaced, not added: they are unreachable from outside and
    need not be disclosed. Server-reflexive and relay candidates are left alone.
    """
    ip = ipaddress.ip_address(check_public_ip(public_ip))
    family = "IP4" if ip.version == 4 else "IP6"
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split(" ")
            # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type>
            if len(parts) >= 8 and parts[6] == "typ" and parts[7] == "host":
                try:
                    same_family = ipaddress.ip_address(parts[4]).version == ip.version
                except ValueError:  # an mDNS name: not ours to rewrite
                    same_family = False
                if same_family:
                    parts[4] = str(ip)
                    line = " ".join(parts)
        elif line.startswith(f"c=IN {family} "):
            line = f"c=IN {family} {ip}"
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def _setup_values(sdp: str) -> tuple[str | None, list[str | None]]:
    """(session-level a=setup, a=setup of each m-section) of an SDP text."""
    session: str | None = None
    media: list[str | None] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            media.append(None)
        elif line.startswith("a=setup:"):
            value = line[len("a=setup:"):].strip()
            if media:
                media[-1] = value
            else:
                session = value
    return session, media


def prefer_dtls_server(answer: str, offer: str) -> str:
    """Answer `a=setup:passive` to every m-section the offer marked `actpass`.

    Why: aiortc 1.16 answers `actpass` with `active` (it becomes the DTLS client) and its
    DTLS context offers only ECDHE-ECDSA cipher suites. A peer with an RSA certificate
    (GStreamer's webrtcbin, many SIP/WebRTC gateways) as DTLS server can pick none of them:
    "no shared cipher". As DTLS *server* the bridge chooses the suite for its own ECDSA
    certificate, and the client's certificate type does not matter (it only signs the
    CertificateVerify), so every peer interoperates. Widening aiortc's suite list would
    mean patching its private `RTCCertificate._create_ssl_context`; the setup role is plain
    offer/answer (RFC 5763 section 5 and RFC 8842 section 5.3: the answerer to `actpass`
    picks `active` or `passive`). aiortc takes the role from the answer given to
    `setLocalDescription`. Offers that say `active` or `passive` are answered as aiortc does.
    """
    session, offered = _setup_values(offer)
    out = []
    index = -1
    for line in answer.splitlines():
        if line.startswith("m="):
            index += 1
        elif line == "a=setup:active" and index >= 0:
            role = offered[index] if index < len(offered) and offered[index] else session
            if role == "actpass":
                line = "a=setup:passive"
        out.append(line)
    return "\r\n".join(out) + "\r\n"
