"""AIC SDK client on aiortc: a publisher that signs hints, a subscriber that decodes codes.

`AicPublisher` publishes over WHIP: Opus packets (20 ms, 48 kHz clock) from a PCM source,
each carrying a signed AIC hint in the RFC 8285 header extension (sfu_bridge.hint_ext,
hint_auth) under the stream key the token service handed out.

`AicSubscriber` subscribes over WHEP. With `aic=True` its offer lists the AIC payload type,
so the bridge sends EnCodec codes for `ai` frames and Opus for fallback frames; it decodes
the codes with `models.StreamingEncodec` under the epoch rule: the decoder resets on a
payload that starts an epoch (S bit) and decodes only payloads that continue the epoch it
started, without a gap in RTP sequence numbers. Anything else (joined mid-epoch, a lost
packet) is skipped and answered with an RTCP PLI, on which the bridge opens a new epoch: the
decoder never runs on state its encoder did not produce. With `aic=False` it is a plain
WebRTC Opus receiver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from yarl import URL

from deployments.epochs import DecoderEpoch
from models.constants import DEFAULT_BANDWIDTH_KBPS, OPUS_FRAME_RTP_TICKS, RTP_CLOCK_HZ, SAMPLE_RATE
from models.opus import OpusCodec, is_dtx_frame
from sfu_bridge import aiortc_compat, ice, rtp_ext
from sfu_bridge.aic_payload import AicPayload
from sfu_bridge.hint_auth import HintSigner
from sfu_bridge.hint_ext import Hint
from sfu_bridge.media import RtpOut, UdpMeter

logger = logging.getLogger(__name__)

PcmSource = Callable[[int, int], np.ndarray]  # (first sample index, n) -> float32 [n] at 48 kHz


def sine_source(freq: float = 440.0, amp: float = 0.3, rate: int = RTP_CLOCK_HZ) -> PcmSource:
    def src(start: int, n: int) -> np.ndarray:
        t = (np.arange(n) + start) / rate
        return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)

    return src


class WhipError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


REDIRECT_STATUSES = (307, 308)  # method and body kept (RFC 9110 15.4.8/15.4.9)
MAX_REDIRECTS = 5


def _redirect_target(current: str, location: str, trusted_hosts: Container[str] | None) -> str:
    """The absolute URL a 307/308 points to, if the bearer token may follow it there."""
    target = URL(current).join(URL(location))
    if target.scheme not in ("http", "https") or not target.host:
        raise WhipError(502, f"redirect to a non-HTTP URL: {location[:100]}")
    if URL(current).scheme == "https" and target.scheme != "https":
        raise WhipError(502, "redirect from https to http refused: the token would travel in clear")
    if trusted_hosts is not None and target.host not in trusted_hosts:
        raise WhipError(502, f"redirect to an untrusted host {target.host!r}")
    return str(target)


async def _post_offer(
    url: str, token: str, sdp: str, *, trusted_hosts: Container[str] | None = None,
    retry_s: float = 3.0,
) -> tuple[str, str]:
    """POST an offer; (absolute session URL, SDP answer).

    Redirects (RFC 9725 section 4.5: any bridge worker of a cluster may answer 307 with the
    worker that owns the stream) are followed here with the same method, body and
    Authorization header. aiohttp's own redirect handling drops Authorization when the
    origin changes (so do browsers), and a cluster's workers are different origins. The
    token goes where the bridge it was sent to says, which could use it anyway; only a
    downgrade from https to http is refused, and `trusted_hosts` can narrow it further.
    A redirect target that does not answer (a worker that just died, before the cluster
    noticed) is retried from `url` for up to `retry_s`.
    """
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}
    give_up = time.monotonic() + retry_s
    async with aiohttp.ClientSession() as http:
        while True:
            target = url
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    async with http.post(target, data=sdp.encode(), headers=headers,
                                         allow_redirects=False) as resp:
                        text = await resp.text()
                        if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                            target = _redirect_target(target, resp.headers["Location"], trusted_hosts)
                            continue
                        if resp.status != 201:
                            raise WhipError(resp.status, text.strip())
                        location = str(URL(target).join(URL(resp.headers["Location"])))
                        return location, text
                raise WhipError(508, f"more than {MAX_REDIRECTS} redirects")
            except aiohttp.ClientConnectionError:
                if target == url or time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.1)  # the cluster drops a dead worker within seconds


async def _delete(base_url: str, location: str, token: str, timeout_s: float = 10.0) -> int:
    url = location if location.startswith("http") else base_url.rstrip("/") + location
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        async with http.delete(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status


async def wait_connected(pc: RTCPeerConnection, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > end:
            raise ConnectionError(f"peer connection {pc.connectionState}")
        await asyncio.sleep(0.02)


class AicPublisher:
    def __init__(
        self,
        base_url: str,
        stream_id: str,
        token: str,
        *,
        hint_key: bytes | None = None,
        source: PcmSource | None = None,
        opus_bitrate: int = 32_000,
        bandwidth_kbps: float = DEFAULT_BANDWIDTH_KBPS,
        hints: bool = True,
        ice_servers: Sequence[ice.IceServer] = (),
        opus_dtx: bool = False,
        trusted_hosts: Container[str] | None = None,
    ) -> None:
        rtp_ext.install()
        self.base_url = base_url.rstrip("/")
        self.stream_id = stream_id
        self.token = token
        self.ice_servers = tuple(ice_servers)
        self.trusted_hosts = trusted_hosts  # None: follow the bridge's redirects (see _post_offer)
        self.signer = HintSigner(stream_keys={stream_id: hint_key}) if hint_key else None
        self.source = source or sine_source()
        # opus_dtx: libopus DTX; its TOC-only silence frames are not sent after the first
        # (libopus sends a comfort-noise update every 400 ms; RFC 7587 section 3.1.3)
        self.opus = OpusCodec(1, sample_rate=RTP_CLOCK_HZ, frame_ms=20, bitrate=opus_bitrate, dtx=opus_dtx)
        self.opus_dtx = opus_dtx
        self.dtx_skipped = 0
        self._dtx_run = 0
        self.bandwidth_kbps = bandwidth_kbps
        self.hints = hints and self.signer is not None
        self.pc = ice.peer_connection(ice_servers)  # none: host candidates, no STUN default
        self.meter = UdpMeter()
        self.location: str | None = None
        self.packets = 0
        self.hints_sent = 0
        self.epoch = 1
        self._task: asyncio.Task | None = None
        self._out: RtpOut | None = None

    async def start(self) -> None:
        transceiver = self.pc.addTransceiver("audio", direction="sendonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.meter.attach(self.pc)
        self.location, answer = await _post_offer(
            f"{self.base_url}/whip/{self.stream_id}", self.token, self.pc.localDescription.sdp,
            trusted_hosts=self.trusted_hosts,
        )
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(self.pc)
        self._out = RtpOut(transceiver)
        self._task = asyncio.ensure_future(self._send_loop())

    def next_hint(self) -> bytes | None:
        if not self.hints:
            return None
        self.hints_sent += 1
        hint = Hint(model_id=0, bandwidth_kbps=self.bandwidth_kbps, epoch=self.epoch, seq=self.hints_sent)
        return self.signer.sign(self.stream_id, hint)

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        sample = 0
        assert self._out is not None and self._out.opus_pt is not None
        try:
            while True:
                pcm = self.source(sample, OPUS_FRAME_RTP_TICKS)
                (packets,) = self.opus.encode([0], pcm[None, :])
                for p in packets:
                    if self.opus_dtx and is_dtx_frame(p):
                        self._dtx_run += 1
                        if self._dtx_run > 1:  # the first tells the receiver DTX began
                            self.dtx_skipped += 1
                            continue
                    else:
                        self._dtx_run = 0
                    await self._out.send(self._out.opus_pt, p, sample, hint=self.next_hint())
                    self.packets += 1
                sample += OPUS_FRAME_RTP_TICKS
                next_at += OPUS_FRAME_RTP_TICKS / RTP_CLOCK_HZ
                await asyncio.sleep(max(0.0, next_at - loop.time()))
        except asyncio.CancelledError:
            pass

    async def republish(self, base_url: str | None = None, delete_timeout_s: float = 0.5) -> float:
        """Publish again on a new peer connection, through `base_url` (any bridge worker of
        the cluster; default: the first URL), e.g. after the worker holding the stream died.
        The old session is ended if its worker still answers. Returns the seconds it took."""
        t0 = time.monotonic()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.location:
            try:
                await _delete(self.base_url, self.location, self.token, timeout_s=delete_timeout_s)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # its worker is gone: so is the session
        await self.pc.close()
        if base_url is not None:
            self.base_url = base_url.rstrip("/")
        self.pc = ice.peer_connection(self.ice_servers)
        self.meter = UdpMeter()
        self.location = None
        await self.start()
        return time.monotonic() - t0

    async def stop(self) -> int | None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        status = None
        if self.location:
            try:
                status = await _delete(self.base_url, self.location, self.token)
            except aiohttp.ClientError:
                status = None
        await self.pc.close()
        return status


@dataclass
class SubscriberStats:
    aic_frames: int = 0
    opus_frames: int = 0
    bad_payloads: int = 0
    decoder_resets: int = 0
    epochs: list[int] = field(default_factory=list)
    decoded_samples: int = 0  # 24 kHz samples out of the EnCodec decoder
    # EnCodec frames (320 samples) in the AIC payloads taken in sync (3, 6 or 9 a payload)
    in_sync_frames: int = 0
    out_of_sync: int = 0  # AIC payloads skipped: not part of an epoch decoded from its start
    sid_frames: int = 0  # DTX silence descriptors (no codes; the next codes start an epoch)
    aic_n_q: list[int] = field(default_factory=list)  # codebooks of each AIC payload, in order
    pli_sent: int = 0
    sequence_gaps: int = 0
    first_frame_at: float | None = None


class AicSubscriber:
    def __init__(
        self,
        base_url: str,
        stream_id: str,
        token: str,
        *,
        aic: bool = True,
        codec: Any = None,
        slot: int = 0,
        keep_payloads: int = 0,
        ice_servers: Sequence[ice.IceServer] = (),
        trusted_hosts: Container[str] | None = None,
    ) -> None:
        rtp_ext.install()
        self.base_url = base_url.rstrip("/")
        self.stream_id = stream_id
        self.token = token
        self.trusted_hosts = trusted_hosts
        self.aic = aic
        self.codec = codec  # models.StreamingEncodec (decode side); None = count, don't decode
        self.slot = slot
        self.pc = ice.peer_connection(ice_servers)  # none: host candidates, no STUN default
        self.meter = UdpMeter()
        self.stats = SubscriberStats()
        self.location: str | None = None
        self.pcm: list[np.ndarray] = []  # decoded 24 kHz audio (AIC and Opus frames)
        self.keep_payloads = keep_payloads  # keep the first N AIC payloads (tests inspect them)
        self.payloads: list[bytes] = []
        self._epoch = DecoderEpoch()
        self._reset_pending = False
        self._last_seq: int | None = None
        self._last_pli = 0.0
        self._aic_pt: int | None = None
        self._task: asyncio.Task | None = None
        self.frame_event = asyncio.Event()

    async def start(self) -> None:
        transceiver = self.pc.addTransceiver("audio", direction="recvonly")
        if self.aic:
            # AIC and Opus packets interleave on one SSRC: take them before aiortc's jitter
            # buffer (see aiortc_compat.tap_receiver) and decode both here, in arrival order.
            self._opus = OpusCodec(1, sample_rate=SAMPLE_RATE, frame_ms=20)
            self._queue: asyncio.Queue = asyncio.Queue()
            aiortc_compat.tap_receiver(transceiver.receiver, self._on_packet)
            self._task = asyncio.ensure_future(self._decode_loop())
        else:  # a plain WebRTC receiver: Opus only, no AIC payload type, aiortc's decoder
            caps = RTCRtpSender.getCapabilities("audio").codecs
            transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() == "audio/opus"])

            @self.pc.on("track")
            def _on_track(track: Any) -> None:
                self._task = asyncio.ensure_future(self._track_loop(track))

        self._transceiver = transceiver
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.meter.attach(self.pc)
        self.location, answer = await _post_offer(
            f"{self.base_url}/whep/{self.stream_id}", self.token, self.pc.localDescription.sdp,
            trusted_hosts=self.trusted_hosts,
        )
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        codecs = aiortc_compat.negotiated_codecs(transceiver)
        self._aic_pt = next((c.payloadType for c in codecs if rtp_ext.is_aic(c)), None)
        await wait_connected(self.pc)

    @property
    def aic_negotiated(self) -> bool:
        return self._aic_pt is not None

    def _on_packet(self, packet: Any) -> bool:
        kind = "aic" if packet.payload_type == self._aic_pt else "opus"
        gap = self._last_seq is not None and packet.sequence_number != (self._last_seq + 1) & 0xFFFF
        self._last_seq = packet.sequence_number
        if gap:
            self.stats.sequence_gaps += 1
        self._queue.put_nowait((kind, bytes(packet.payload), gap, packet.ssrc))
        return True

    async def _request_epoch(self, ssrc: int) -> None:
        now = time.monotonic()
        if now - self._last_pli < 0.2:  # one request per 200 ms is plenty
            return
        self._last_pli = now
        self.stats.pli_sent += 1
        await aiortc_compat.send_pli(self._transceiver.receiver, ssrc)

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                kind, payload, gap, ssrc = await self._queue.get()
                if self.stats.first_frame_at is None:
                    self.stats.first_frame_at = time.monotonic()
                if gap:
                    self._epoch.lost()  # a lost packet: the decoder state is no longer the encoder's
                if kind == "aic":
                    parsed = self._parse_aic(payload)
                    if parsed is not None and parsed.is_sid:
                        self.stats.sid_frames += 1
                        self._in_sync = False  # whatever comes next opens a new epoch
                    elif parsed is not None and self._accept(parsed):
                        self.stats.in_sync_frames += parsed.n_frames
                        await loop.run_in_executor(None, self._decode_aic, parsed)
                    elif parsed is not None:
                        self.stats.out_of_sync += 1
                        await self._request_epoch(ssrc)
                else:
                    self._on_opus(payload)
                self.frame_event.set()
        except asyncio.CancelledError:
            pass

    async def _track_loop(self, track: Any) -> None:
        try:
            while True:
                await track.recv()
                if self.stats.first_frame_at is None:
                    self.stats.first_frame_at = time.monotonic()
                self.stats.opus_frames += 1
                self.frame_event.set()
        except (MediaStreamError, asyncio.CancelledError):
            pass

    def _on_opus(self, payload: bytes) -> None:
        self.stats.opus_frames += 1
        try:
            self.pcm.append(self._opus.decode([0], [[payload]])[0])
        except ValueError:
            self.stats.bad_payloads += 1

    def _parse_aic(self, data: bytes) -> AicPayload | None:
        try:
            payload = AicPayload.parse(data)
        except ValueError:
            self.stats.bad_payloads += 1
            return None
        if payload.is_sid:
            return payload
        self.stats.aic_frames += 1
        if len(self.stats.aic_n_q) < 100_000:
            self.stats.aic_n_q.append(payload.n_q)
        if len(self.payloads) < self.keep_payloads:
            self.payloads.append(data)
        return payload

    def _accept(self, payload: AicPayload) -> bool:
        """The epoch rule (deployments/epochs.py): decode from an epoch's first payload on,
        in sequence, else wait."""
        if not self._epoch.accept(payload.epoch, payload.start):
            return False
        if payload.start:
            self._reset_pending = True
            self.stats.epochs.append(payload.epoch)
            self.stats.decoder_resets += 1
        return True

    def _decode_aic(self, payload: AicPayload) -> None:
        if self.codec is None:
            return
        slots = np.array([self.slot])
        if self._reset_pending:
            self.codec.reset_decoder(slots)  # a new epoch: a fresh encoder state on the bridge
            self._reset_pending = False
        pcm = np.asarray(self.codec.decode(slots, payload.codes[None].astype(np.int64)))
        self.pcm.append(pcm[0])
        self.stats.decoded_samples += pcm.shape[1]

    async def wait_frames(self, n_aic: int = 0, n_opus: int = 0, timeout_s: float = 20.0) -> bool:
        end = time.monotonic() + timeout_s
        while self.stats.aic_frames < n_aic or self.stats.opus_frames < n_opus:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self.frame_event.clear()
            try:
                await asyncio.wait_for(self.frame_event.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    async def stop(self) -> int | None:
        status = None
        if self.location:
            try:
                status = await _delete(self.base_url, self.location, self.token)
            except aiohttp.ClientError:
                status = None
        await self.pc.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return status
