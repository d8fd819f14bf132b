#!/usr/bin/env python3
"""WHEP audio viewer for testing chorus, built on aiortc: checks what chorus sends.

    python3 whep_view.py --url http://127.0.0.1:8080/whep/STREAM --tracks 3 \\
        [--pinned ID] [--exclude a,b] [--token T] --seconds 20

Offers 1 + N recvonly audio m-lines, Opus only: the first is the main track
(the pinned source), the other N are the multiplexed tracks. POSTs the offer
(ICE gathering completed, no trickle) to URL?tracks=N&pinned=ID&exclude=a,b,
expects 201 + Location + an SDP answer, receives for --seconds after ICE/DTLS
connect, then DELETEs the resource.

Every RTP packet delivered to each receiver is recorded (arrival time, ssrc,
seq, ts, marker, payload length, payload type, RFC 6464 level) by wrapping
aiortc's RTCRtpReceiver._handle_rtp_packet; each track is also consumed with
track.recv() so the packets are decoded (libopus via PyAV), and decoded frames
and decode errors are counted per track.

stdout: one JSON object per line:
    {"event":"offer", ...} {"event":"answer", ...} {"event":"connected", ...}
    {"event":"stats","elapsed":s,"packets":{mid:n},"frames":{mid:n}} (every --stats-interval s)
    {"event":"rtcp-flood-start", ...} {"event":"rtcp-flood-stop", ...}   (with --rtcp-flood)
    {"event":"deleted","status":200}
    {"event":"report","tracks":{mid:{...}},"router":{...}}  (always, once connected)
    {"event":"done", ...}
stderr: human-readable errors. Exit status: 0 ok; 1 on any HTTP error (status
and body are printed), ICE/DTLS failure or connect timeout, or when no RTP
packet at all was received; 2 on bad usage; 3 when --check found violations
(a track with packets but != 1 SSRC, duplicates, ts going backwards, decode
errors or no decoded frame, or unroutable packets; ts_jumps are not a
violation: chorus advances the ts by the wall-clock time of a pause).

Per track in the report (mid "0" is the main track, "1".."N" the multiplexed
ones; "role" says which):
    packets, ssrcs (list; a rewritten stream must have exactly one),
    ssrc_packets, payload_types, seq_gaps (missing sequence numbers over the
    16-bit wrap-aware extended range), seq_gap_events, max_seq_gap,
    seq_gaps_at_s (when the first 10 gaps came, s after connecting),
    seq_duplicates, seq_reorders (packets older than the highest seen, not
    duplicates), ts_backwards (in-order packet whose ts is lower than the
    previous in-order packet's, 32-bit wrap-aware), ts_jumps (ts advance >
    48000, i.e. 1 s at 48 kHz, between consecutive in-order packets),
    max_ts_advance, ts_steps (most common ts deltas between packets with
    consecutive seq), markers, audio_level_packets, payload_bytes,
    decoded_frames, decode_errors, silent_frames, max_peak_dbfs,
    first_arrival/last_arrival (unix time), first_arrival_s/last_arrival_s
    (seconds since connected), max_arrival_gap_ms (+ max_arrival_gap_at_s),
    rtcp_sr, rtcp_bye, ended, answer_ssrcs (a=ssrc of that m-line).

--rtcp-flood RATE (with --rtcp-flood-after S, default 2, and --rtcp-flood-kind rr|pli):
S seconds after connecting, also send RTCP to the server at RATE packets/s (receiver
reports with a block per receiving track's SSRC, or PLIs for the first track) through
aiortc's own SRTCP path, in batches per event-loop tick, until the receive time is
over; media is received and checked as usual meanwhile. Stats lines, "report" and
"done" then carry rtcpFloodSent and rtcpFloodRate (achieved packets/s since the flood
started); "report" also has "rtcpFlood" (target rate, seconds, batches, errors, ...).
Meant to check that the server keeps serving other viewers while one floods.

aiortc BUNDLE candidate note: aiortc 1.16 keeps, per shared ICE transport, only
the candidates of the last bundled m-line of the answer. chorus (str0m) puts
its candidate in the first (BUNDLE-tag) m-line only, which is valid (RFC 8843)
but would leave aiortc without any remote candidate (ICE stays "checking"
against an ICE-lite server). This tool adds the skipped candidates with
addIceCandidate and says so in a {"event":"bundle-candidates-added"} line.

aiortc routing note: aiortc 1.16 routes incoming RTP by SSRC (from the
answer's a=ssrc lines) or, for an unknown SSRC, by payload type only if
exactly one receiver has that payload type. With several Opus m-lines on one
BUNDLE transport, packets of an SSRC not declared in the answer would be
dropped. Browsers also route by the RTP MID header extension (RFC 8843
9.2); this tool does the same (unless --no-mid-routing) and reports in
"router" how many SSRCs were learnt from the MID and how many packets could
not be routed at all.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import json
import math
import os
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chorus_tools  # noqa: E402
from chorus_tools import (  # noqa: E402
    AIORTC_MISSING, HttpError, Resource, add_debug_args, add_loopback_args, add_timeout_args, die, emit,
    run_main, setup_loopback_candidates, stop_event, summarize_sdp, wait_event, watch_state,
)

PROG = chorus_tools.PROG = "whep_view.py"
CLOCK_RATE = 48000


def build_url(url: str, tracks: int, pinned: str | None, exclude: list[str]) -> str:
    parts = urllib.parse.urlsplit(url)
    q = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
         if k not in ("tracks", "pinned", "exclude")]
    q.append(("tracks", str(tracks)))
    if pinned:
        q.append(("pinned", pinned))
    if exclude:
        q.append(("exclude", ",".join(exclude)))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q, safe=",")))


# --------------------------------------------------------------------------- per-track stats

def s16(x: int) -> int:
    return ((x + 0x8000) & 0xFFFF) - 0x8000


def s32(x: int) -> int:
    return ((x + 0x80000000) & 0xFFFFFFFF) - 0x80000000


class TrackStats:
    """RTP-level and decode-level record of one receiver (one m-line)."""

    def __init__(self, index: int):
        self.index = index
        self.mid: str | None = None
        self.role = "main" if index == 0 else f"mux{index}"
        self.answer_ssrcs: list[int] = []
        self.answer_direction: str | None = None
        self.receiving = False  # aiortc made a receive track for it (answer sendonly/sendrecv)
        # (mono arrival, wall arrival, ssrc, seq, ts, marker, payload len, pt, audio level)
        self.log: list[tuple] = []
        self.ssrc_packets: collections.Counter = collections.Counter()
        self.pts: collections.Counter = collections.Counter()
        self.seen: set[int] = set()
        self.max_ext: int | None = None
        self.min_ext: int | None = None
        self.last_ts: int | None = None       # ts of the previous in-order packet
        self.last_ts_seq: int | None = None   # its extended seq
        self.seq_duplicates = 0
        self.seq_reorders = 0
        self.seq_gap_events = 0
        self.max_seq_gap = 0
        # When the first gaps came (monotonic): at a start, a relink or mid-stream tells causes apart.
        self.seq_gap_times: list[float] = []
        self.ts_backwards = 0
        self.ts_jumps = 0
        self.max_ts_advance = 0
        self.ts_steps: collections.Counter = collections.Counter()
        self.markers = 0
        self.audio_level_packets = 0
        self.payload_bytes = 0
        self.max_arrival_gap = 0.0
        self.max_arrival_gap_at = None
        self.rtcp_sr = 0
        self.rtcp_bye = 0
        # decode side (decode_errors is incremented from the decoder thread)
        self.decoded_frames = 0
        self.decode_errors = 0
        self.decode_calls = 0
        self.recv_exceptions: list[str] = []
        self.silent_frames = 0
        self.odd_frames = 0
        self.max_peak = 0
        self.frame_formats: collections.Counter = collections.Counter()
        self.ended = False
        self.lock = threading.Lock()

    def add_packet(self, packet, mono: float, wall: float) -> None:
        seq, ts = packet.sequence_number, packet.timestamp
        level = packet.extensions.audio_level
        plen = len(packet.payload)
        if self.log:
            gap = mono - self.log[-1][0]
            if gap > self.max_arrival_gap:
                self.max_arrival_gap = gap
                self.max_arrival_gap_at = mono
        self.log.append((mono, wall, packet.ssrc, seq, ts, bool(packet.marker), plen,
                         packet.payload_type, level[1] if level else None))
        self.ssrc_packets[packet.ssrc] += 1
        self.pts[packet.payload_type] += 1
        self.payload_bytes += plen
        if packet.marker:
            self.markers += 1
        if level is not None:
            self.audio_level_packets += 1

        if self.max_ext is None:
            ext = seq + 0x10000  # headroom so reordered packets before the first stay >= 0
            self.seen.add(ext)
            self.max_ext = self.min_ext = ext
            self.last_ts, self.last_ts_seq = ts, ext
            return
        ext = self.max_ext + s16(seq - (self.max_ext & 0xFFFF))
        if ext in self.seen:
            self.seq_duplicates += 1
            return
        self.seen.add(ext)
        self.min_ext = min(self.min_ext, ext)
        if ext < self.max_ext:
            self.seq_reorders += 1
            return
        # in order (ext > max_ext)
        step = ext - self.max_ext
        if step > 1:
            self.seq_gap_events += 1
            self.max_seq_gap = max(self.max_seq_gap, step - 1)
            if len(self.seq_gap_times) < 10:
                self.seq_gap_times.append(mono)
        dts = s32(ts - self.last_ts)
        if dts < 0:
            self.ts_backwards += 1
        elif dts > CLOCK_RATE:
            self.ts_jumps += 1
        self.max_ts_advance = max(self.max_ts_advance, dts)
        if step == 1:
            self.ts_steps[dts] += 1
        self.max_ext = ext
        self.last_ts, self.last_ts_seq = ts, ext

    def add_frame(self, frame) -> None:
        self.decoded_frames += 1
        fmt = f"{frame.format.name}/{frame.layout.name}/{frame.sample_rate}"
        self.frame_formats[fmt] += 1
        if frame.samples != 960:
            self.odd_frames += 1
        if frame.format.name == "s16":
            a = array.array("h")
            a.frombytes(bytes(frame.planes[0])[: frame.samples * len(frame.layout.channels) * 2])
            peak = max(max(a, default=0), -min(a, default=0))
            self.max_peak = max(self.max_peak, peak)
            if peak < 33:  # about -60 dBFS
                self.silent_frames += 1

    def report(self, t_connected_mono: float, t_connected_wall: float) -> dict:
        n = len(self.log)
        r: dict = {
            "role": self.role,
            "packets": n,
            "ssrcs": sorted(self.ssrc_packets),
            "ssrc_packets": {str(k): v for k, v in sorted(self.ssrc_packets.items())},
            "answer_direction": self.answer_direction,
            "receiving": self.receiving,
            "answer_ssrcs": self.answer_ssrcs,
            "payload_types": {str(k): v for k, v in sorted(self.pts.items())},
            "seq_gaps": (self.max_ext - self.min_ext + 1 - len(self.seen)) if n else 0,
            "seq_gap_events": self.seq_gap_events,
            "max_seq_gap": self.max_seq_gap,
            "seq_gaps_at_s": [round(t - t_connected_mono, 3) for t in self.seq_gap_times],
            "seq_duplicates": self.seq_duplicates,
            "seq_reorders": self.seq_reorders,
            "ts_backwards": self.ts_backwards,
            "ts_jumps": self.ts_jumps,
            "max_ts_advance": self.max_ts_advance,
            "ts_steps": {str(k): v for k, v in self.ts_steps.most_common(5)},
            "markers": self.markers,
            "audio_level_packets": self.audio_level_packets,
            "payload_bytes": self.payload_bytes,
            "decoded_frames": self.decoded_frames,
            "decode_errors": self.decode_errors + len(self.recv_exceptions),
            "silent_frames": self.silent_frames,
            "odd_size_frames": self.odd_frames,
            "max_peak_dbfs": round(20 * math.log10(self.max_peak / 32768), 1) if self.max_peak else None,
            "frame_formats": dict(self.frame_formats),
            "first_arrival": None, "last_arrival": None,
            "first_arrival_s": None, "last_arrival_s": None,
            "max_arrival_gap_ms": round(self.max_arrival_gap * 1000, 1),
            "max_arrival_gap_at_s": (round(self.max_arrival_gap_at - t_connected_mono, 3)
                                     if self.max_arrival_gap_at is not None else None),
            "rtcp_sr": self.rtcp_sr,
            "rtcp_bye": self.rtcp_bye,
            "ended": self.ended,
        }
        if self.recv_exceptions:
            r["recv_exceptions"] = self.recv_exceptions[:5]
        if n:
            r["first_arrival"] = round(self.log[0][1], 3)
            r["last_arrival"] = round(self.log[-1][1], 3)
            r["first_arrival_s"] = round(self.log[0][0] - t_connected_mono, 3)
            r["last_arrival_s"] = round(self.log[-1][0] - t_connected_mono, 3)
            r["packets_per_s"] = round(n / max(1e-3, self.log[-1][0] - self.log[0][0]), 1) if n > 1 else None
        return r


class Recorder:
    """Hooks into aiortc; maps receivers and decoder threads to TrackStats."""

    def __init__(self, mid_routing: bool):
        self.mid_routing = mid_routing
        self.by_receiver: dict[int, TrackStats] = {}
        self.by_thread: dict[int, TrackStats] = {}
        self.unknown_receiver_packets = 0
        self.unrouted_packets = 0
        self.unrouted: collections.Counter = collections.Counter()  # (ssrc, pt, mid) -> n
        self.ssrcs_learnt_by_mid: dict[int, str] = {}
        self.mid_ssrc_conflicts = 0

    def install(self) -> None:
        import av
        import aiortc.rtcrtpreceiver as rr
        from aiortc.rtcdtlstransport import RtpRouter
        from aiortc.rtp import RtcpByePacket, RtcpSrPacket

        rec = self

        orig_handle_rtp = rr.RTCRtpReceiver._handle_rtp_packet

        async def _handle_rtp_packet(self, packet, arrival_time_ms):
            st = rec.by_receiver.get(id(self))
            if st is None:
                rec.unknown_receiver_packets += 1
            else:
                st.add_packet(packet, time.monotonic(), time.time())
            return await orig_handle_rtp(self, packet, arrival_time_ms=arrival_time_ms)

        rr.RTCRtpReceiver._handle_rtp_packet = _handle_rtp_packet

        orig_handle_rtcp = rr.RTCRtpReceiver._handle_rtcp_packet

        async def _handle_rtcp_packet(self, packet):
            st = rec.by_receiver.get(id(self))
            if st is not None:
                if isinstance(packet, RtcpSrPacket):
                    st.rtcp_sr += 1
                elif isinstance(packet, RtcpByePacket):
                    st.rtcp_bye += 1
            return await orig_handle_rtcp(self, packet)

        rr.RTCRtpReceiver._handle_rtcp_packet = _handle_rtcp_packet

        orig_receive = rr.RTCRtpReceiver.receive

        async def receive(self, parameters):
            await orig_receive(self, parameters)
            thread = getattr(self, "_RTCRtpReceiver__decoder_thread", None)
            st = rec.by_receiver.get(id(self))
            if thread is not None and thread.ident is not None and st is not None:
                rec.by_thread[thread.ident] = st

        rr.RTCRtpReceiver.receive = receive

        # Count decode errors per track: the decoder runs in one thread per receiver.
        orig_get_decoder = rr.get_decoder

        class CountingDecoder:
            def __init__(self, inner):
                self.inner = inner

            def decode(self, encoded_frame):
                st = rec.by_thread.get(threading.get_ident())
                try:
                    frames = self.inner.decode(encoded_frame)
                except Exception as exc:
                    if st is not None:
                        with st.lock:
                            st.decode_errors += 1
                    if isinstance(exc, av.FFmpegError):
                        raise  # aiortc logs it and keeps going
                    return []  # anything else would kill aiortc's decoder thread
                if st is not None:
                    with st.lock:
                        st.decode_calls += 1
                return frames

        rr.get_decoder = lambda codec: CountingDecoder(orig_get_decoder(codec))

        orig_route = RtpRouter.route_rtp

        def route_rtp(self, packet):
            mid = packet.extensions.mid
            if rec.mid_routing and mid is not None and mid in self.mid_table:
                target = self.mid_table[mid]
                by_ssrc = self.ssrc_table.get(packet.ssrc)
                if by_ssrc is None:
                    rec.ssrcs_learnt_by_mid[packet.ssrc] = mid
                elif by_ssrc is not target:
                    rec.mid_ssrc_conflicts += 1
                self.ssrc_table[packet.ssrc] = target
                if packet.payload_type in [pt for pt, rs in self.payload_type_table.items() if target in rs]:
                    return target
            result = orig_route(self, packet)
            if result is None:
                rec.unrouted_packets += 1
                rec.unrouted[(packet.ssrc, packet.payload_type, mid)] += 1
            return result

        RtpRouter.route_rtp = route_rtp

    def router_report(self) -> dict:
        return {
            "mid_routing": self.mid_routing,
            "ssrcs_learnt_by_mid": {str(k): v for k, v in self.ssrcs_learnt_by_mid.items()},
            "mid_ssrc_conflicts": self.mid_ssrc_conflicts,
            "unrouted_packets": self.unrouted_packets,
            "unrouted": [{"ssrc": s, "pt": pt, "mid": m, "packets": n}
                         for (s, pt, m), n in self.unrouted.most_common(10)],
            "packets_to_unknown_receiver": self.unknown_receiver_packets,
        }


# --------------------------------------------------------------------------- RTCP flood

class RtcpFlooder:
    """--rtcp-flood: once connected (+ --rtcp-flood-after s), send RTCP to the server at
    RATE packets/s through aiortc's own SRTCP path (RTCDtlsTransport._send_rtp, which
    protect_rtcp()s and sends on the nominated ICE pair), in batches per event-loop tick.
    "rr": receiver reports with one report block per track that has received packets
    (its latest SSRC, highest extended seq); "pli": PLI for the first track's SSRC.
    Media reception runs on the same loop, so a batch is bounded (20 ms worth of packets)
    and a backlog of more than 250 ms is dropped instead of caught up."""

    def __init__(self, rate: float, kind: str, delay: float, stats: list[TrackStats]):
        self.rate = rate
        self.kind = kind
        self.delay = delay
        self.stats = stats
        self.sent = 0
        self.errors = 0
        self.first_error: str | None = None
        self.batches = 0
        self.max_batch = 0
        self.skipped_backlog = 0  # packets never sent because the loop fell > 250 ms behind
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.stopped: str | None = None
        self.rtcp_ssrc: int | None = None

    def packet(self) -> bytes:
        from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket, RtcpReceiverInfo, RtcpRrPacket

        if self.kind == "pli":
            first = self.stats[0]
            media = (first.log[-1][2] if first.log else
                     (first.answer_ssrcs[0] if first.answer_ssrcs else 0))
            return bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=self.rtcp_ssrc, media_ssrc=media))
        reports = []
        for st in self.stats:
            if not st.log or st.max_ext is None:
                continue
            reports.append(RtcpReceiverInfo(
                ssrc=st.log[-1][2], fraction_lost=0, packets_lost=0,
                highest_sequence=(st.max_ext - 0x10000) & 0xFFFFFFFF, jitter=0, lsr=0, dlsr=0))
        return bytes(RtcpRrPacket(ssrc=self.rtcp_ssrc, reports=reports[:31]))

    def achieved_rate(self, now: float | None = None) -> float | None:
        if self.t_start is None:
            return None
        end = self.t_end if self.t_end is not None else (now if now is not None else time.monotonic())
        return round(self.sent / max(1e-3, end - self.t_start), 1)

    def summary(self, t_connected_mono: float) -> dict:
        return {
            "kind": self.kind, "target_rate": self.rate, "after_s": self.delay,
            "sent": self.sent, "rate": self.achieved_rate(),
            "started_at_s": round(self.t_start - t_connected_mono, 3) if self.t_start is not None else None,
            "seconds": (round((self.t_end if self.t_end is not None else time.monotonic()) - self.t_start, 3)
                        if self.t_start is not None else None),
            "batches": self.batches, "max_batch": self.max_batch,
            "skipped_backlog": self.skipped_backlog,
            "errors": self.errors, "first_error": self.first_error,
            "rtcp_ssrc": self.rtcp_ssrc, "stopped": self.stopped,
        }

    async def run(self, receiver) -> None:
        transport = receiver.transport  # RTCDtlsTransport shared by the BUNDLE
        self.rtcp_ssrc = getattr(receiver, "_RTCRtpReceiver__rtcp_ssrc", None)
        if self.rtcp_ssrc is None:
            self.rtcp_ssrc = 1
        try:
            await asyncio.sleep(self.delay)
            self.t_start = time.monotonic()
            emit("rtcp-flood-start", kind=self.kind, rate=self.rate, rtcp_ssrc=self.rtcp_ssrc)
            max_batch = max(1, int(self.rate * 0.02))
            max_backlog = max(max_batch, int(self.rate * 0.25))
            base_t, base_n = self.t_start, 0  # schedule: packet base_n + k is due at base_t + k/rate
            consecutive_errors = 0
            while True:
                now = time.monotonic()
                due = base_n + int((now - base_t) * self.rate) - self.sent
                if due > max_backlog:
                    self.skipped_backlog += due - max_batch
                    base_t, base_n = now, self.sent
                    due = max_batch
                if due <= 0:
                    wait = (self.sent + 1 - base_n) / self.rate - (now - base_t)
                    await asyncio.sleep(max(0.0, wait))
                    continue
                n = min(due, max_batch)
                data = self.packet()
                for _ in range(n):
                    try:
                        await transport._send_rtp(data)
                    except Exception as e:  # ConnectionError once the transport closes
                        self.errors += 1
                        consecutive_errors += 1
                        if self.first_error is None:
                            self.first_error = f"{type(e).__name__}: {e}"
                        break
                    else:
                        self.sent += 1
                        consecutive_errors = 0
                self.batches += 1
                self.max_batch = max(self.max_batch, n)
                if consecutive_errors >= 100:
                    self.stopped = f"send errors: {self.first_error}"
                    sys.stderr.write(f"{PROG}: RTCP flood stopped after {consecutive_errors} send errors "
                                     f"({self.first_error})\n")
                    return
                await asyncio.sleep(0)  # let media (and everything else) run between batches
        except asyncio.CancelledError:
            if self.stopped is None:
                self.stopped = "end"
            raise
        finally:
            if self.t_start is not None and self.t_end is None:
                self.t_end = time.monotonic()


# --------------------------------------------------------------------------- main flow

async def consume(track, st: TrackStats) -> None:
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            st.ended = True
            emit("track-ended", mid=st.mid, role=st.role)
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # pragma: no cover - defensive
            st.recv_exceptions.append(f"{type(e).__name__}: {e}")
            if len(st.recv_exceptions) > 100:
                return
            continue
        try:
            st.add_frame(frame)
        except Exception as e:  # pragma: no cover - defensive
            st.recv_exceptions.append(f"frame check {type(e).__name__}: {e}")


async def fix_bundle_candidates(pc, asum: dict) -> None:
    """Work around aiortc 1.16 with BUNDLE: setRemoteDescription keeps, per shared ICE
    transport, only the candidates of the *last* m-line that uses it. An answerer that
    puts its candidates in the BUNDLE-tag m-line only (RFC 8843 section 7.3.1; chorus/str0m
    does) would leave aiortc with no remote candidate at all, and with an ICE-lite server
    nothing would ever connect. So hand aiortc the candidates it skipped."""
    from aiortc.sdp import candidate_from_sdp

    media = asum["media"]
    bundled = [m for m in media if m["mid"] in asum["bundle"] and m["port"] != 0]
    if len(bundled) < 2:
        return
    used = set(bundled[-1]["candidate_lines"])  # what aiortc took
    primary = next(m for m in bundled if m["mid"] == asum["bundle"][0]) if any(
        m["mid"] == asum["bundle"][0] for m in bundled) else bundled[0]
    added = []
    for m in bundled:
        for line in m["candidate_lines"]:
            if line in used:
                continue
            used.add(line)
            cand = candidate_from_sdp(line)
            cand.sdpMid = primary["mid"]
            cand.sdpMLineIndex = media.index(primary)
            await pc.addIceCandidate(cand)
            added.append(line)
    if added:
        emit("bundle-candidates-added", count=len(added), fromMids=[m["mid"] for m in bundled if m["candidate_lines"]],
             note="aiortc only reads the last bundled m-line's candidates; added the others")


def check_offer(summary: dict, tracks: int) -> list[str]:
    problems = []
    media = summary["media"]
    if len(media) != 1 + tracks:
        problems.append(f"offer has {len(media)} m-lines, expected {1 + tracks}")
    for m in media:
        if m["kind"] != "audio":
            problems.append(f"m-line mid={m['mid']} is {m['kind']}, not audio")
        if m["direction"] != "recvonly":
            problems.append(f"m-line mid={m['mid']} is {m['direction']}, not recvonly")
        names = {c.split(" ", 1)[1].split("/")[0].lower() for c in m["codecs"]}
        if names != {"opus"}:
            problems.append(f"m-line mid={m['mid']} offers {sorted(names)}, not only opus")
    return problems


def check_report(tracks: dict, router: dict) -> list[str]:
    """Invariants of a rewritten chorus stream (used by --check)."""
    v = []
    for mid, r in tracks.items():
        if r["packets"] == 0:
            continue
        if len(r["ssrcs"]) != 1:
            v.append(f"mid {mid}: {len(r['ssrcs'])} SSRCs {r['ssrcs']} (expected exactly 1)")
        for key in ("seq_duplicates", "ts_backwards", "decode_errors"):
            if r[key]:
                v.append(f"mid {mid}: {key}={r[key]}")
        if r["decoded_frames"] == 0:
            v.append(f"mid {mid}: {r['packets']} packets but no decoded frame")
    if router["unrouted_packets"]:
        v.append(f"{router['unrouted_packets']} RTP packets could not be routed to any m-line")
    return v


async def run(args: argparse.Namespace) -> int:
    try:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
    except ImportError as e:
        die(AIORTC_MISSING.format(e))

    url = build_url(args.url, args.tracks, args.pinned, args.exclude)
    setup_loopback_candidates(args.loopback_candidates, url)

    rec = Recorder(mid_routing=args.mid_routing)
    rec.install()

    # No ICE servers: aiortc would otherwise add a public STUN server.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    opus = [c for c in RTCRtpReceiver.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
    if not opus:
        die("this aiortc has no Opus codec")
    stats: list[TrackStats] = []
    transceivers = []
    for i in range(1 + args.tracks):
        t = pc.addTransceiver("audio", direction="recvonly")
        t.setCodecPreferences(opus)
        st = TrackStats(i)
        rec.by_receiver[id(t.receiver)] = st
        stats.append(st)
        transceivers.append(t)

    resource = Resource(args.token, args.http_timeout)
    stop = stop_event()
    state_changed = watch_state(pc)

    consumers: list[asyncio.Task] = []
    flooder = (RtcpFlooder(args.rtcp_flood, args.rtcp_flood_kind, args.rtcp_flood_after, stats)
               if args.rtcp_flood > 0 else None)
    flood_task: asyncio.Task | None = None

    async def stop_flood() -> None:
        nonlocal flood_task
        if flood_task is None:
            return
        task, flood_task = flood_task, None
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        if flooder is not None and flooder.t_start is not None:
            emit("rtcp-flood-stop", rtcpFloodSent=flooder.sent, rtcpFloodRate=flooder.achieved_rate(),
                 errors=flooder.errors, stopped=flooder.stopped)

    def flood_fields() -> dict:
        if flooder is None:
            return {}
        return {"rtcpFloodSent": flooder.sent, "rtcpFloodRate": flooder.achieved_rate()}

    t_conn_mono = time.monotonic()
    t_conn_wall = time.time()
    connected = False

    def keyed() -> dict[str, TrackStats]:
        return {(st.mid if st.mid is not None else str(st.index)): st for st in stats}

    def final_report() -> tuple[dict, dict]:
        tracks = {mid: st.report(t_conn_mono, t_conn_wall) for mid, st in keyed().items()}
        router = rec.router_report()
        extra = flood_fields()
        if flooder is not None:
            extra["rtcpFlood"] = flooder.summary(t_conn_mono)
        emit("report", url=url, seconds=round(time.monotonic() - t_conn_mono, 3),
             tracks=tracks, router=router, **extra)
        return tracks, router

    exit_code = 0
    try:
        offer = await pc.createOffer()
        # aiortc gathers all candidates inside setLocalDescription.
        await pc.setLocalDescription(offer)
        if pc.iceGatheringState != "complete":
            die(f"ICE gathering not complete after setLocalDescription ({pc.iceGatheringState})")
        for t, st in zip(transceivers, stats):
            st.mid = t.mid
        offer_sdp = pc.localDescription.sdp
        osum = summarize_sdp(offer_sdp)
        problems = check_offer(osum, args.tracks)
        emit("offer", url=url, candidates=osum["candidates"], bundle=osum["bundle"],
             mlines=[{"mid": m["mid"], "kind": m["kind"], "direction": m["direction"], "codecs": m["codecs"],
                      "extmaps": m["extmaps"]} for m in osum["media"]],
             ok=not problems)
        if args.print_sdp:
            sys.stderr.write("--- offer ---\n" + offer_sdp + "\n")
        if problems:
            die("bad offer (bug in this tool or in aiortc): " + "; ".join(problems))
        if osum["candidates"] == 0:
            die("no ICE candidates were gathered (no usable network interface?)")
        if args.offer_only:
            if not args.print_sdp:
                sys.stdout.write(offer_sdp)
            return 0

        t0 = time.monotonic()
        status, headers, answer, location = await resource.post_offer(url, offer_sdp, args.print_sdp)
        try:
            asum = summarize_sdp(answer)
        except Exception as e:
            die(f"cannot parse the SDP answer ({type(e).__name__}: {e}):\n{answer}")
        for m in asum["media"]:
            for st in stats:
                if st.mid is not None and st.mid == m["mid"]:
                    st.answer_ssrcs = m["ssrcs"]
                    st.answer_direction = m["direction"] if m["port"] != 0 else "rejected"
        emit("answer", status=status, location=location, etag=headers.get("ETag"),
             iceLite=asum["iceLite"], candidates=asum["candidates"], bundle=asum["bundle"],
             mlines=[{"mid": m["mid"], "port": m["port"], "direction": m["direction"], "codecs": m["codecs"],
                      "ssrcs": m["ssrcs"], "msid": m["msid"], "extmaps": m["extmaps"]} for m in asum["media"]])
        if len(asum["media"]) != len(osum["media"]):
            sys.stderr.write(f"{PROG}: warning: answer has {len(asum['media'])} m-lines, offer had "
                             f"{len(osum['media'])}\n")
        for m in asum["media"]:
            if m["port"] != 0 and m["direction"] not in ("sendonly", "inactive"):
                sys.stderr.write(f"{PROG}: warning: answer m-line mid={m['mid']} is {m['direction']}, "
                                 "expected sendonly\n")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        except Exception as e:
            die(f"setRemoteDescription rejected the answer: {type(e).__name__}: {e}")
        await fix_bundle_candidates(pc, asum)

        # Decode every track from now on (frames only arrive after DTLS). aiortc only
        # makes a receive track for m-lines the answer sends on.
        for t, st in zip(transceivers, stats):
            if t.receiver.track is not None:
                st.receiving = True
                consumers.append(asyncio.ensure_future(consume(t.receiver.track, st)))

        # Wait for ICE + DTLS.
        deadline = time.monotonic() + args.connect_timeout
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed"):
                die(f"peer connection {pc.connectionState} before connecting "
                    f"(iceConnectionState={pc.iceConnectionState})")
            left = deadline - time.monotonic()
            if stop.is_set():
                die("interrupted before connecting")
            if left <= 0:
                die(f"timeout: ICE/DTLS did not connect within {args.connect_timeout} s "
                    f"(connectionState={pc.connectionState}, iceConnectionState={pc.iceConnectionState})")
            state_changed.clear()
            await wait_event(state_changed, min(left, 0.5))
        t_conn_mono, t_conn_wall = time.monotonic(), time.time()
        connected = True
        emit("connected", ms=round(1000 * (t_conn_mono - t0)), url=url)
        if flooder is not None:
            flood_task = asyncio.ensure_future(flooder.run(transceivers[0].receiver))

        end = t_conn_mono + args.seconds
        next_stats = t_conn_mono + args.stats_interval
        while not stop.is_set():
            now = time.monotonic()
            if pc.connectionState in ("failed", "closed"):
                sys.stderr.write(f"{PROG}: peer connection {pc.connectionState} while receiving "
                                 f"(iceConnectionState={pc.iceConnectionState})\n")
                emit("error", message=f"peer connection {pc.connectionState} while receiving")
                exit_code = 1
                break
            if now >= next_stats:
                ks = keyed()
                emit("stats", elapsed=round(now - t_conn_mono, 1),
                     packets={m: len(s.log) for m, s in ks.items()},
                     frames={m: s.decoded_frames for m, s in ks.items()}, **flood_fields())
                next_stats += args.stats_interval
            if now >= end:
                break
            await wait_event(stop, min(0.25, max(0.0, end - now)))
        if stop.is_set():
            emit("interrupted")
        await stop_flood()
        # Let the last decoded frames reach the consumers.
        await asyncio.sleep(0.2)

        try:
            await resource.delete()
        except HttpError:
            exit_code = 1

        tracks, router = final_report()
        connected = False  # report already printed
        if args.packet_log:
            write_packet_log(args.packet_log, stats, t_conn_mono)
        total = sum(r["packets"] for r in tracks.values())
        if total == 0:
            sys.stderr.write(f"{PROG}: no RTP packet was received on any track in {args.seconds} s"
                             + (f" ({router['unrouted_packets']} unroutable packets arrived)"
                                if router["unrouted_packets"] else "") + "\n")
            exit_code = 1
        if args.check:
            violations = check_report(tracks, router)
            for v in violations:
                sys.stderr.write(f"{PROG}: check: {v}\n")
            if violations and exit_code == 0:
                exit_code = 3
        emit("done", packets={m: r["packets"] for m, r in tracks.items()}, exit=exit_code, **flood_fields())
        return exit_code
    finally:
        if flood_task is not None:
            await stop_flood()
        if connected:
            # Out through die()/an exception after connecting: still show what we got.
            try:
                final_report()
            except Exception:
                pass
        if resource.url:
            try:
                await resource.delete()
            except Exception:
                pass
        for c in consumers:
            c.cancel()
        await pc.close()
        for c in consumers:
            try:
                await c
            except BaseException:
                pass


def write_packet_log(path: str, stats: list[TrackStats], t0: float) -> None:
    with open(path, "w") as f:
        for st in stats:
            for mono, wall, ssrc, seq, ts, marker, plen, pt, level in st.log:
                f.write(json.dumps({"mid": st.mid, "t": round(mono - t0, 6), "wall": round(wall, 6),
                                    "ssrc": ssrc, "seq": seq, "ts": ts, "marker": marker,
                                    "len": plen, "pt": pt, "level": level}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description="WHEP audio viewer (aiortc) that checks what chorus sends")
    p.add_argument("--url", required=True, help="WHEP endpoint, e.g. http://127.0.0.1:8080/whep/STREAM")
    p.add_argument("--tracks", type=int, default=3,
                   help="number of multiplexed tracks N; the offer has 1 (main/pinned) + N audio m-lines (default 3)")
    p.add_argument("--pinned", help="source id for the main track (?pinned=ID)")
    p.add_argument("--exclude", default="", help="comma-separated source ids to leave out (?exclude=a,b)")
    p.add_argument("--token", help="viewer token (Authorization: Bearer); default $CHORUS_VIEW_TOKEN")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to receive after connecting (default 20)")
    p.add_argument("--stats-interval", type=float, default=2.0, help="seconds between stats lines (default 2)")
    add_timeout_args(p)
    p.add_argument("--packet-log", metavar="FILE", help="write every received RTP packet as a JSON line to FILE")
    p.add_argument("--check", action="store_true",
                   help="exit 3 if a track has != 1 SSRC, duplicates, ts going back, decode errors, "
                        "or packets could not be routed")
    p.add_argument("--no-mid-routing", dest="mid_routing", action="store_false",
                   help="route RTP like plain aiortc (SSRC/payload type only), not by the MID header extension")
    add_loopback_args(p)
    p.add_argument("--rtcp-flood", type=float, default=0.0, metavar="RATE",
                   help="once connected, flood the server with RTCP at RATE packets/s through aiortc's "
                        "SRTCP path while still receiving and checking media (default 0 = off)")
    p.add_argument("--rtcp-flood-after", type=float, default=2.0, metavar="SECONDS",
                   help="start the RTCP flood this many seconds after connecting (default 2)")
    p.add_argument("--rtcp-flood-kind", choices=("rr", "pli"), default="rr",
                   help="flood packet: rr = receiver report with one block per receiving track's SSRC, "
                        "pli = PLI for the first track's SSRC (default rr)")
    p.add_argument("--offer-only", action="store_true",
                   help="build and check the offer, print it (stdout) and exit without any HTTP request")
    add_debug_args(p)
    args = p.parse_args()
    if args.token is None:
        args.token = os.environ.get("CHORUS_VIEW_TOKEN")
    args.exclude = [x.strip() for x in args.exclude.split(",") if x.strip()]
    if args.tracks < 0 or args.tracks > 64:
        p.error("--tracks must be between 0 and 64")
    if args.seconds <= 0 or args.stats_interval <= 0:
        p.error("--seconds and --stats-interval must be > 0")
    if args.rtcp_flood < 0 or args.rtcp_flood_after < 0:
        p.error("--rtcp-flood and --rtcp-flood-after must be >= 0")
    return run_main(args, run)


if __name__ == "__main__":
    sys.exit(main())
