"""A WHIP publisher on GStreamer's webrtcbin (RSA DTLS certificate, libnice ICE), driven by
tests/sfu_bridge/test_gstreamer.py. Runs under the system Python with PyGObject (Debian's
python3-gi), not the project's venv.

    WHIP_TOKEN=<token> python3 gst_whip_publisher.py <whip url> <seconds>

Publishes a 440 Hz tone (audiotestsrc -> opusenc -> rtpopuspay -> webrtcbin): complete offer
after ICE gathering (no trickle), POST, answer, then media for <seconds>, then DELETE. No
STUN/TURN server is configured, so nothing leaves the machine. Prints one JSON line with
what happened; exit status 0 when the peer connection reached `connected`.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

PIPELINE = (
    "webrtcbin name=send bundle-policy=max-bundle "
    "audiotestsrc is-live=true wave=sine freq=440 volume=0.3 ! audioconvert ! audioresample "
    "! opusenc bitrate=32000 frame-size=20 ! rtpopuspay pt=111 "
    "! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 ! send."
)


class Publisher:
    def __init__(self, url: str, token: str, seconds: float) -> None:
        self.url, self.token, self.seconds = url, token, seconds
        self.loop = GLib.MainLoop()
        self.pipe = Gst.parse_launch(PIPELINE)
        self.webrtc = self.pipe.get_by_name("send")
        self.result: dict = {"states": [], "errors": []}
        self.location: str | None = None
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("notify::ice-gathering-state", self._on_gathering)
        self.webrtc.connect("notify::connection-state", self._on_connection_state)
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self._on_error)

    # -- signalling ----------------------------------------------------------------------
    def _on_negotiation_needed(self, element: Gst.Element) -> None:
        transceiver = element.emit("get-transceiver", 0)
        transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
        promise = Gst.Promise.new_with_change_func(self._on_offer, element, None)
        element.emit("create-offer", None, promise)

    def _on_offer(self, promise: Gst.Promise, element: Gst.Element, _: object) -> None:
        reply = promise.get_reply()  # keep it referenced: the offer is borrowed from it
        offer = reply.get_value("offer")
        element.emit("set-local-description", offer, Gst.Promise.new())

    def _on_gathering(self, element: Gst.Element, _: object) -> None:
        if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(self._post_offer)

    def _post_offer(self) -> bool:
        offer = self.webrtc.get_property("local-description").sdp.as_text()
        self.result["offer_setup"] = [ln for ln in offer.splitlines() if ln.startswith("a=setup:")]
        request = urllib.request.Request(self.url, data=offer.encode(), method="POST", headers={
            "Content-Type": "application/sdp", "Authorization": f"Bearer {self.token}",
        })
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                self.result["status"] = resp.status
                self.location = resp.headers.get("Location")
                answer = resp.read().decode()
        except urllib.error.HTTPError as exc:
            self.result["status"] = exc.code
            self.result["errors"].append(exc.read().decode().strip())
            self.loop.quit()
            return False
        self.result["answer_setup"] = [ln for ln in answer.splitlines() if ln.startswith("a=setup:")]
        _, sdp = GstSdp.SDPMessage.new_from_text(answer)
        desc = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, sdp)
        self.webrtc.emit("set-remote-description", desc, Gst.Promise.new())
        GLib.timeout_add(int(self.seconds * 1000), self._finish)
        return False

    # -- state ---------------------------------------------------------------------------
    def _on_connection_state(self, element: Gst.Element, _: object) -> None:
        state = element.get_property("connection-state").value_nick
        self.result["states"].append(state)
        if state == "failed":
            GLib.idle_add(self._finish)

    def _on_error(self, bus: Gst.Bus, message: Gst.Message) -> None:
        err, _ = message.parse_error()
        self.result["errors"].append(err.message)
        self.loop.quit()

    def _finish(self) -> bool:
        if self.location:
            url = urllib.parse.urljoin(self.url, self.location)
            request = urllib.request.Request(
                url, method="DELETE", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    self.result["delete_status"] = resp.status
            except urllib.error.URLError as exc:
                self.result["errors"].append(f"DELETE: {exc}")
        self.loop.quit()
        return False

    def run(self) -> int:
        self.pipe.set_state(Gst.State.PLAYING)
        GLib.timeout_add(int((self.seconds + 30) * 1000), self._finish)  # never hang
        self.loop.run()
        self.pipe.set_state(Gst.State.NULL)
        print(json.dumps(self.result), flush=True)
        return 0 if "connected" in self.result["states"] else 1


def main() -> int:
    Gst.init(None)
    url, seconds = sys.argv[1], float(sys.argv[2])
    return Publisher(url, os.environ["WHIP_TOKEN"], seconds).run()


if __name__ == "__main__":
    sys.exit(main())
