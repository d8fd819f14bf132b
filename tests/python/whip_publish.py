#!/usr/bin/env python3
"""WHIP (RFC 9725) audio publisher for testing chorus, built on aiortc.

    python3 whip_publish.py --url http://127.0.0.1:8080/whip/STREAM \\
        --source-id ana --token TOKEN --file tests/corpus/panel/ana.opus --seconds 10

POSTs an SDP offer (ICE gathering completed, so every candidate is in the
offer; no trickle), applies the answer, plays --file through aiortc's
MediaPlayer (PyAV decodes it, aiortc re-encodes it with libopus) and DELETEs
the WHIP resource at the end.

stdout: one JSON object per line:
    {"event":"offer", ...} {"event":"answer", ...} {"event":"connected", ...}
    {"event":"stats","packetsSent":N,"bytesSent":N} (every --stats-interval s)
    {"event":"deleted","status":200} {"event":"done", ...}
stderr: human-readable errors. Exit status: 0 ok, 1 on any HTTP/ICE/DTLS
error (the HTTP status and body are printed), 2 on bad usage.

aiortc and RFC 6464: aiortc 1.16 offers a=extmap:2
urn:ietf:params:rtp-hdrext:ssrc-audio-level on audio and, if the answer
accepts it, sends it on every packet with the id the answer chose. The level
is computed by aiortc itself (RFC 6465 appendix A formula) over the s16
*stereo* frame that MediaPlayer produces, and the V (voice activity) bit is
always 0. See --no-audio-level to strip it from the offer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chorus_tools  # noqa: E402
from chorus_tools import (  # noqa: E402
    AIORTC_MISSING, HttpError, Resource, add_debug_args, add_loopback_args, add_timeout_args, die, emit,
    run_main, sdp_attrs, setup_loopback_candidates, stop_event, wait_event, warn, watch_state,
)

chorus_tools.PROG = "whip_publish.py"
LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


def extmaps(sdp: str) -> list[str]:
    return sdp_attrs(sdp, "extmap")


def candidates(sdp: str) -> list[str]:
    return sdp_attrs(sdp, "candidate")


def strip_level_ext(sdp: str) -> str:
    return "\r\n".join(l for l in sdp.split("\r\n") if not (l.startswith("a=extmap:") and LEVEL_URI in l))


async def run(args: argparse.Namespace) -> int:
    # Import here so --help works without aiortc installed.
    try:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.contrib.media import MediaPlayer
    except ImportError as e:
        die(AIORTC_MISSING.format(e))

    url = args.url
    if args.source_id is not None:
        parts = urllib.parse.urlsplit(url)
        q = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "sourceId" for k, _ in q):
            q.append(("sourceId", args.source_id))
        url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))

    setup_loopback_candidates(args.loopback_candidates, url)

    try:
        player = MediaPlayer(args.file, loop=args.loop)
    except Exception as e:  # av.error.FileNotFoundError etc.
        die(f"cannot open {args.file}: {e}")
    if player.audio is None:
        die(f"{args.file} has no audio stream")

    # No ICE servers: aiortc would otherwise add a public STUN server.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(player.audio, direction="sendonly")
    resource = Resource(args.token, args.http_timeout)
    stop = stop_event()
    state_changed = watch_state(pc)

    exit_code = 0
    try:
        offer = await pc.createOffer()
        sdp = offer.sdp
        if not args.audio_level:
            sdp = strip_level_ext(sdp)
        # aiortc gathers all candidates inside setLocalDescription.
        await pc.setLocalDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if pc.iceGatheringState != "complete":
            die(f"ICE gathering not complete after setLocalDescription ({pc.iceGatheringState})")
        offer_sdp = pc.localDescription.sdp
        cands = candidates(offer_sdp)
        emit("offer", candidates=len(cands), audioLevelExt=LEVEL_URI in offer_sdp, extmaps=extmaps(offer_sdp))
        if args.print_sdp:
            sys.stderr.write("--- offer ---\n" + offer_sdp + "\n")
        if not cands:
            die("no ICE candidates were gathered (no usable network interface?)")

        t0 = time.monotonic()
        status, headers, answer, location = await resource.post_offer(url, offer_sdp, args.print_sdp)
        emit("answer", status=status, location=location, etag=headers.get("ETag"),
             audioLevelExt=LEVEL_URI in answer, extmaps=extmaps(answer),
             candidates=len(candidates(answer)), iceLite="a=ice-lite" in answer)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        except Exception as e:
            die(f"setRemoteDescription rejected the answer: {type(e).__name__}: {e}")

        # Wait for ICE + DTLS.
        deadline = time.monotonic() + args.connect_timeout
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed"):
                die(f"peer connection {pc.connectionState} before connecting")
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                die(f"ICE/DTLS did not connect within {args.connect_timeout} s (connectionState={pc.connectionState}, "
                    f"iceConnectionState={pc.iceConnectionState})")
            state_changed.clear()
            await wait_event(state_changed, min(left, 0.5))
        emit("connected", ms=round(1000 * (time.monotonic() - t0)), url=url)

        end = time.monotonic() + args.seconds
        last = {"packetsSent": 0, "bytesSent": 0}
        next_stats = time.monotonic() + args.stats_interval
        while not stop.is_set():
            now = time.monotonic()
            if pc.connectionState in ("failed", "closed"):
                warn(f"peer connection {pc.connectionState} while publishing")
                emit("error", message=f"peer connection {pc.connectionState} while publishing")
                exit_code = 1
                break
            if now >= next_stats or now >= end:
                last = await sent_stats(pc)
                emit("stats", **last)
                next_stats = now + args.stats_interval
            if now >= end:
                break
            await wait_event(stop, min(0.25, max(0.0, end - now)))
        if stop.is_set():
            emit("interrupted")
        if last.get("packetsSent", 0) == 0:
            warn("no RTP packets were sent")
            exit_code = 1
        try:
            await resource.delete()
        except HttpError:
            exit_code = 1
        emit("done", **last)
        return exit_code
    finally:
        # Best effort DELETE if we got out through die()/an exception.
        if resource.url:
            try:
                await resource.delete()
            except Exception:
                pass
        player_audio = player.audio
        if player_audio is not None:
            player_audio.stop()
        await pc.close()


async def sent_stats(pc) -> dict:
    out = {"packetsSent": 0, "bytesSent": 0}
    report = await pc.getStats()
    for s in report.values():
        if getattr(s, "type", None) == "outbound-rtp" and getattr(s, "kind", None) == "audio":
            out["packetsSent"] += s.packetsSent or 0
            out["bytesSent"] += s.bytesSent or 0
            out["ssrc"] = s.ssrc
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="WHIP audio publisher (aiortc) for chorus tests")
    p.add_argument("--url", required=True, help="WHIP endpoint, e.g. http://127.0.0.1:8080/whip/STREAM")
    p.add_argument("--source-id", help="added to the URL as ?sourceId=ID")
    p.add_argument("--token", help="publish token (Authorization: Bearer); default $CHORUS_PUBLISH_TOKEN")
    p.add_argument("--file", required=True, help="audio file to play (e.g. tests/corpus/panel/ana.opus)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to send after connecting (default 10)")
    p.add_argument("--stats-interval", type=float, default=1.0, help="seconds between stats lines (default 1)")
    add_timeout_args(p)
    p.add_argument("--no-loop", dest="loop", action="store_false", help="do not loop the file")
    p.add_argument("--no-audio-level", dest="audio_level", action="store_false",
                   help=f"remove {LEVEL_URI} from the offer")
    add_loopback_args(p)
    add_debug_args(p)
    args = p.parse_args()
    if args.token is None:
        args.token = os.environ.get("CHORUS_PUBLISH_TOKEN")
    if args.seconds <= 0 or args.stats_interval <= 0:
        p.error("--seconds and --stats-interval must be > 0")
    return run_main(args, run)


if __name__ == "__main__":
    sys.exit(main())
