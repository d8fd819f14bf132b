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
import asyncio
import ipaddress
import json
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": round(time.time(), 3), **fields}) + "\n")
    sys.stdout.flush()


class Fatal(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def die(msg: str, code: int = 1) -> None:
    """Report an error (stderr + an "error" event) and unwind; cleanup still runs."""
    sys.stderr.write(f"whip_publish.py: {msg}\n")
    sys.stderr.flush()
    emit("error", message=msg.split("\n")[0])
    raise Fatal(code)


class HttpError(Exception):
    def __init__(self, method: str, url: str, status: int | None, body: str, reason: str = ""):
        self.method, self.url, self.status, self.body, self.reason = method, url, status, body, reason
        if status is None:
            text = f"{method} {url} failed: {reason}"
        else:
            text = f"{method} {url} -> HTTP {status} {reason}".rstrip() + f"\n--- response body ---\n{body}\n---------------------"
        super().__init__(text)


def http(method: str, url: str, *, token: str | None, body: bytes | None = None,
         content_type: str | None = None, timeout: float = 10.0):
    """Blocking HTTP request; returns (status, headers, body_text). Raises HttpError."""
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace") if e.fp else ""
        raise HttpError(method, url, e.code, text, e.reason or "") from None
    except urllib.error.URLError as e:
        raise HttpError(method, url, None, "", f"{e.reason} (is chorus running there?)") from None
    except (TimeoutError, OSError) as e:
        raise HttpError(method, url, None, "", f"{type(e).__name__}: {e}") from None


def extmaps(sdp: str) -> list[str]:
    return [line[len("a=extmap:"):] for line in sdp.splitlines() if line.startswith("a=extmap:")]


def candidates(sdp: str) -> list[str]:
    return [line[len("a=candidate:"):] for line in sdp.splitlines() if line.startswith("a=candidate:")]


def strip_level_ext(sdp: str) -> str:
    return "\r\n".join(l for l in sdp.split("\r\n") if not (l.startswith("a=extmap:") and LEVEL_URI in l))


def host_is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allow_loopback_candidates() -> None:
    """aioice skips 127.0.0.1/::1 when gathering host candidates. Against a
    server on loopback (possibly in a network namespace with nothing but lo)
    we want them, so add them."""
    import aioice.ice

    orig = aioice.ice.get_host_addresses

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addrs = orig(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        extra = (["127.0.0.1"] if use_ipv4 else []) + (["::1"] if use_ipv6 else [])
        return extra + [a for a in addrs if a not in extra]

    aioice.ice.get_host_addresses = get_host_addresses


async def run(args: argparse.Namespace) -> int:
    # Import here so --help works without aiortc installed.
    try:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.contrib.media import MediaPlayer
    except ImportError as e:
        die(f"cannot import aiortc ({e}); run scripts/setup-test-deps.sh and use tests/python/.venv/bin/python")

    url = args.url
    if args.source_id is not None:
        parts = urllib.parse.urlsplit(url)
        q = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "sourceId" for k, _ in q):
            q.append(("sourceId", args.source_id))
        url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))

    if args.loopback_candidates or (args.loopback_candidates is None and host_is_loopback(url)):
        allow_loopback_candidates()

    try:
        player = MediaPlayer(args.file, loop=args.loop)
    except Exception as e:  # av.error.FileNotFoundError etc.
        die(f"cannot open {args.file}: {e}")
    if player.audio is None:
        die(f"{args.file} has no audio stream")

    # No ICE servers: aiortc would otherwise add a public STUN server.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(player.audio, direction="sendonly")
    resource_url: str | None = None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover
            pass

    state_changed = asyncio.Event()

    @pc.on("connectionstatechange")
    async def _on_state() -> None:
        emit("pc-state", state=pc.connectionState)
        state_changed.set()

    async def delete_resource() -> None:
        nonlocal resource_url
        if not resource_url:
            return
        target, resource_url = resource_url, None
        try:
            status, _, body = await asyncio.to_thread(http, "DELETE", target, token=args.token, timeout=args.http_timeout)
            emit("deleted", status=status, url=target)
        except HttpError as e:
            sys.stderr.write(f"whip_publish.py: DELETE failed: {e}\n")
            emit("error", message="DELETE failed", status=e.status, body=e.body)
            raise

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
        try:
            status, headers, answer = await asyncio.to_thread(
                http, "POST", url, token=args.token, body=offer_sdp.encode(),
                content_type="application/sdp", timeout=args.http_timeout)
        except HttpError as e:
            die(str(e))
        if status != 201:
            die(f"POST {url} -> HTTP {status} (expected 201 Created)\n--- response body ---\n{answer}\n---------------------")
        location = headers.get("Location")
        if not location:
            die(f"POST {url} -> 201 without a Location header")
        resource_url = urllib.parse.urljoin(url, location)
        ctype = headers.get("Content-Type", "")
        if not ctype.lower().startswith("application/sdp"):
            sys.stderr.write(f"whip_publish.py: warning: answer Content-Type is {ctype!r}, not application/sdp\n")
        if args.print_sdp:
            sys.stderr.write("--- answer ---\n" + answer + "\n")
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
            try:
                await asyncio.wait_for(state_changed.wait(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        emit("connected", ms=round(1000 * (time.monotonic() - t0)), url=url)

        end = time.monotonic() + args.seconds
        last = {"packetsSent": 0, "bytesSent": 0}
        next_stats = time.monotonic() + args.stats_interval
        while not stop.is_set():
            now = time.monotonic()
            if pc.connectionState in ("failed", "closed"):
                sys.stderr.write(f"whip_publish.py: peer connection {pc.connectionState} while publishing\n")
                emit("error", message=f"peer connection {pc.connectionState} while publishing")
                exit_code = 1
                break
            if now >= next_stats or now >= end:
                last = await sent_stats(pc)
                emit("stats", **last)
                next_stats = now + args.stats_interval
            if now >= end:
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(0.25, max(0.0, end - now)))
            except asyncio.TimeoutError:
                pass
        if stop.is_set():
            emit("interrupted")
        if last.get("packetsSent", 0) == 0:
            sys.stderr.write("whip_publish.py: no RTP packets were sent\n")
            exit_code = 1
        try:
            await delete_resource()
        except HttpError:
            exit_code = 1
        emit("done", **last)
        return exit_code
    finally:
        # Best effort DELETE if we got out through die()/an exception.
        if resource_url:
            try:
                await delete_resource()
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
    p.add_argument("--connect-timeout", type=float, default=10.0, help="ICE+DTLS connect timeout (default 10 s)")
    p.add_argument("--http-timeout", type=float, default=10.0, help="timeout of each HTTP request (default 10 s)")
    p.add_argument("--no-loop", dest="loop", action="store_false", help="do not loop the file")
    p.add_argument("--no-audio-level", dest="audio_level", action="store_false",
                   help=f"remove {LEVEL_URI} from the offer")
    lb = p.add_mutually_exclusive_group()
    lb.add_argument("--loopback-candidates", dest="loopback_candidates", action="store_true", default=None,
                    help="offer 127.0.0.1/::1 host candidates (default: only when the URL host is loopback)")
    lb.add_argument("--no-loopback-candidates", dest="loopback_candidates", action="store_false")
    p.add_argument("--print-sdp", action="store_true", help="print offer and answer SDP to stderr")
    p.add_argument("--verbose", action="store_true", help="aiortc debug logging to stderr")
    args = p.parse_args()
    if args.token is None:
        import os
        args.token = os.environ.get("CHORUS_PUBLISH_TOKEN")
    if args.seconds <= 0 or args.stats_interval <= 0:
        p.error("--seconds and --stats-interval must be > 0")
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    try:
        return asyncio.run(run(args))
    except Fatal as e:
        return e.code


if __name__ == "__main__":
    sys.exit(main())
