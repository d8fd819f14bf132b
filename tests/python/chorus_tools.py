"""Helpers shared by whip_publish.py and whep_view.py (imported from the
scripts' own directory; not meant to be run)."""

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

# Program name in stderr messages ("PROG: ..."); each script sets it.
PROG = "chorus_tools.py"

AIORTC_MISSING = "cannot import aiortc ({}); run scripts/setup-test-deps.sh and use tests/python/.venv/bin/python"


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": round(time.time(), 3), **fields}) + "\n")
    sys.stdout.flush()


def warn(msg: str) -> None:
    """A line on stderr prefixed with the program name."""
    sys.stderr.write(f"{PROG}: {msg}\n")


class Fatal(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def die(msg: str, code: int = 1) -> None:
    """Report an error (stderr + an "error" event) and unwind; cleanup still runs."""
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()
    emit("error", message=msg.split("\n")[0])
    raise Fatal(code)


# --------------------------------------------------------------------------- HTTP

class HttpError(Exception):
    def __init__(self, method: str, url: str, status: int | None, body: str, reason: str = ""):
        self.method, self.url, self.status, self.body, self.reason = method, url, status, body, reason
        if status is None:
            text = f"{method} {url} failed: {reason}"
        else:
            text = (f"{method} {url} -> HTTP {status} {reason}".rstrip()
                    + f"\n--- response body ---\n{body}\n---------------------")
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


class Resource:
    """The WHIP/WHEP session resource: POST the offer, DELETE at the end."""

    def __init__(self, token: str | None, timeout: float):
        self.token = token
        self.timeout = timeout
        self.url: str | None = None

    async def post_offer(self, url: str, offer_sdp: str, print_sdp: bool):
        """POST the offer; die() unless 201 + Location. Returns (status, headers, answer, location)."""
        try:
            status, headers, answer = await asyncio.to_thread(
                http, "POST", url, token=self.token, body=offer_sdp.encode(),
                content_type="application/sdp", timeout=self.timeout)
        except HttpError as e:
            die(str(e))
        if status != 201:
            die(f"POST {url} -> HTTP {status} (expected 201 Created)\n"
                f"--- response body ---\n{answer}\n---------------------")
        location = headers.get("Location")
        if not location:
            die(f"POST {url} -> 201 without a Location header")
        self.url = urllib.parse.urljoin(url, location)
        ctype = headers.get("Content-Type", "")
        if not ctype.lower().startswith("application/sdp"):
            warn(f"warning: answer Content-Type is {ctype!r}, not application/sdp")
        if print_sdp:
            sys.stderr.write("--- answer ---\n" + answer + "\n")
        return status, headers, answer, location

    async def delete(self) -> None:
        """DELETE the resource once; emits "deleted" or an "error" and re-raises HttpError."""
        if not self.url:
            return
        target, self.url = self.url, None
        try:
            status, _, _ = await asyncio.to_thread(http, "DELETE", target, token=self.token,
                                                   timeout=self.timeout)
            emit("deleted", status=status, url=target)
        except HttpError as e:
            warn(f"DELETE failed: {e}")
            emit("error", message="DELETE failed", status=e.status, body=e.body)
            raise


# --------------------------------------------------------------------------- ICE / peer connection

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


def setup_loopback_candidates(option: bool | None, url: str) -> None:
    """--loopback-candidates / --no-loopback-candidates / default (loopback URL host)."""
    if option or (option is None and host_is_loopback(url)):
        allow_loopback_candidates()


def stop_event() -> asyncio.Event:
    """An event set on SIGINT/SIGTERM (call inside the running loop)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover
            pass
    return stop


def watch_state(pc) -> asyncio.Event:
    """Emit "pc-state" on every connection state change; returns an event set on each."""
    state_changed = asyncio.Event()

    @pc.on("connectionstatechange")
    async def _on_state() -> None:
        emit("pc-state", state=pc.connectionState)
        state_changed.set()

    return state_changed


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for event at most timeout seconds (no error on timeout)."""
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout)
    except asyncio.TimeoutError:
        pass


# --------------------------------------------------------------------------- SDP

def sdp_attrs(sdp: str, name: str) -> list[str]:
    """The values of every a=NAME: line of the SDP (session and media)."""
    prefix = f"a={name}:"
    return [line[len(prefix):] for line in sdp.splitlines() if line.startswith(prefix)]


def sdp_sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    session: list[str] = []
    media: list[list[str]] = []
    for line in sdp.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if not line:
            continue
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def summarize_sdp(sdp: str) -> dict:
    """What a human (or a test) wants to know about an offer/answer."""
    session, media = sdp_sections(sdp)
    out_m = []
    for lines in media:
        kind, port, proto, *fmts = lines[0][2:].split()
        m = {"kind": kind, "port": int(port), "proto": proto, "pts": fmts, "mid": None,
             "direction": "sendrecv", "codecs": [], "ssrcs": [], "extmaps": [], "candidates": 0,
             "candidate_lines": [], "msid": None}
        for line in lines[1:]:
            if line.startswith("a=mid:"):
                m["mid"] = line[6:]
            elif line in ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"):
                m["direction"] = line[2:]
            elif line.startswith("a=rtpmap:"):
                pt, _, enc = line[9:].partition(" ")
                m["codecs"].append(f"{pt} {enc}")
            elif line.startswith("a=ssrc:"):
                ssrc = int(line[7:].split()[0])
                if ssrc not in m["ssrcs"]:
                    m["ssrcs"].append(ssrc)
            elif line.startswith("a=extmap:"):
                m["extmaps"].append(line[9:])
            elif line.startswith("a=candidate:"):
                m["candidates"] += 1
                m["candidate_lines"].append(line[len("a=candidate:"):])
            elif line.startswith("a=msid:"):
                m["msid"] = line[7:]
        out_m.append(m)
    bundle = next((l[len("a=group:BUNDLE"):].split() for l in session if l.startswith("a=group:BUNDLE")), [])
    return {
        "iceLite": any(l == "a=ice-lite" for l in session + [l for m in media for l in m]),
        "bundle": bundle,
        "candidates": sum(m["candidates"] for m in out_m),
        "media": out_m,
    }


# --------------------------------------------------------------------------- command line

def add_timeout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect-timeout", type=float, default=10.0, help="ICE+DTLS connect timeout (default 10 s)")
    p.add_argument("--http-timeout", type=float, default=10.0, help="timeout of each HTTP request (default 10 s)")


def add_loopback_args(p: argparse.ArgumentParser) -> None:
    lb = p.add_mutually_exclusive_group()
    lb.add_argument("--loopback-candidates", dest="loopback_candidates", action="store_true", default=None,
                    help="offer 127.0.0.1/::1 host candidates (default: only when the URL host is loopback)")
    lb.add_argument("--no-loopback-candidates", dest="loopback_candidates", action="store_false")


def add_debug_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-sdp", action="store_true", help="print offer and answer SDP to stderr")
    p.add_argument("--verbose", action="store_true", help="aiortc debug logging to stderr")


def run_main(args: argparse.Namespace, run) -> int:
    """--verbose logging, then asyncio.run(run(args)); a die() becomes its exit code."""
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    try:
        return asyncio.run(run(args))
    except Fatal as e:
        return e.code
