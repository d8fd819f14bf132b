//! A connected viewer without str0m: what carries its audio once ICE and DTLS are up.
//!
//! A str0m `Rtc` is about 90 KiB per peer (RTX caches, a `StreamTx` per m-line, its RTCP queue,
//! AES contexts). A viewer that only receives AES-GCM audio needs none of it after the
//! handshake: this state answers the viewer's ICE consent checks (RFC 8445 §7.3, RFC 7675),
//! seals its RTP (RFC 7714 §8) and speaks SRTCP (RFC 3711 §3.4, RFC 7714 §9): sender reports
//! that count every packet sent on each track, receiver reports and NACKs opened, checked and
//! answered from a short per-track history. Sans-IO: time is an argument, what it sends goes to
//! an [`Emit`], and its one deadline is polled by the peer set's timer heap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use bytes::Bytes;
use smallvec::SmallVec;
use str0m::crypto::dtls::SrtpProfile;
use str0m::ice::StunMessage;

use super::srtp_out::{Srtcp, SrtpOut};
use crate::media::rtp::{write_packet, HeaderFields};
use crate::prefetch::{prefetch, prefetch_all};

/// A viewer whose consent checks stop for this long is gone. str0m's ICE-lite agent drops a
/// pair after the same 15 s without a binding request (`is` crate, `RECENT_BINDING_REQUEST`);
/// RFC 7675's 30 s is the checking side's figure, and a browser checks every 2.5-5 s.
pub(crate) const CONSENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Packets remembered per track for NACK: 320 ms of 20 ms Opus, more than a loopback or LAN
/// round trip and a receiver's NACK delay; each costs one refcount on the relay datagram.
pub(crate) const NACK_HISTORY: usize = 16;
/// Times one remembered packet may be sent again: a second NACK for it is answered once
/// more (the first retransmission may be lost too), the rest are ignored, so a viewer's
/// NACKs can never make the edge send more than this many copies of what it forwarded.
pub(crate) const MAX_RESENDS: u8 = 2;
/// One sender report per track this often (what the 1-in-50 str0m packets gave before, and
/// str0m's own audio interval): a receiver's RTP to wall-clock mapping and loss figures stay
/// fresh for a few bytes a second.
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The CNAME of every SDES chunk (RFC 3550 §6.5.1): one per viewer session is all it names.
const CNAME: &[u8] = b"chorus";
/// Chunks one SDES packet can carry: its 5-bit source count.
const MAX_SDES_CHUNKS: usize = 31;

/// RTCP packet types (RFC 3550 §12.1, RFC 4585 §6.1).
const SR: u8 = 200;
const RR: u8 = 201;
const SDES: u8 = 202;
const BYE: u8 = 203;
const RTPFB: u8 = 205;
const PSFB: u8 = 206;

/// Counters of every viewer's lean state on the peer sets that share them, read by /metrics.
#[derive(Debug, Default)]
pub struct RtcpStats {
    /// Consent checks answered.
    pub stun_answered: AtomicU64,
    /// STUN that is not a binding request with this viewer's ufrags and MESSAGE-INTEGRITY.
    pub stun_refused: AtomicU64,
    /// Sender reports sent (one per track per [`REPORT_INTERVAL`]).
    pub sr_sent: AtomicU64,
    /// Report blocks about our tracks received, and the packets they newly say were lost.
    pub rr_blocks: AtomicU64,
    /// Packets report blocks newly said were lost.
    pub rr_lost: AtomicU64,
    /// Sequence numbers NACKed; answered from the history; not there (older than
    /// [`NACK_HISTORY`] packets, never sent, or resent [`MAX_RESENDS`] times already).
    pub nack_requested: AtomicU64,
    /// NACKed packets sent again from the history.
    pub nack_resent: AtomicU64,
    /// NACKed packets not in the history (or resent too often).
    pub nack_missed: AtomicU64,
    /// PLI and FIR (nothing to do: a lean viewer gets no video).
    pub pli: AtomicU64,
    /// SRTCP that does not authenticate or replays an index; RTCP inside that does not parse;
    /// RTP, DTLS or anything else a lean viewer has no business sending.
    pub unauthenticated: AtomicU64,
    /// RTCP inside authenticated SRTCP that does not parse.
    pub malformed: AtomicU64,
    /// Datagrams a lean viewer has no business sending (RTP, DTLS, other).
    pub unexpected: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Where a lean viewer's datagrams go: the peer set's send batch, or a test's list.
pub trait Emit {
    /// Sends (or queues) one datagram to `to`.
    fn emit(&mut self, to: SocketAddr, data: &[u8]);
}

impl Emit for Vec<(SocketAddr, Vec<u8>)> {
    fn emit(&mut self, to: SocketAddr, data: &[u8]) {
        self.push((to, data.to_vec()));
    }
}

/// The ICE credentials consent checks are verified against: USERNAME `local:remote`,
/// MESSAGE-INTEGRITY keyed with the local password (RFC 8445 §7.2.2).
#[derive(Debug, Clone)]
pub struct IceLite {
    /// Our ICE ufrag, as str0m's answer gave it.
    pub local_ufrag: String,
    /// Our ICE password: consent checks' MESSAGE-INTEGRITY key.
    pub local_pwd: String,
    /// The browser's ufrag, from the first consent check str0m accepted.
    pub remote_ufrag: String,
}

pub(crate) fn sha1_hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

impl IceLite {
    /// A binding request for this viewer: its ufrags, its integrity.
    pub(crate) fn verify<'a>(&self, data: &'a [u8]) -> Option<StunMessage<'a>> {
        let msg = StunMessage::parse(data).ok()?;
        if !msg.is_binding_request() {
            return None;
        }
        let (local, remote) = msg.split_username()?;
        if local != self.local_ufrag || remote != self.remote_ufrag {
            return None;
        }
        msg.verify(self.local_pwd.as_bytes(), sha1_hmac)
            .then_some(msg)
    }
}

/// What one track needs to be sent without str0m, read from str0m's negotiation.
#[derive(Debug, Clone)]
pub struct TrackSpec {
    /// The SSRC str0m chose for the track.
    pub ssrc: u32,
    /// The negotiated payload type.
    pub pt: u8,
    /// The negotiated RFC 2198 RED payload type (of `pt`), when the viewer accepted RED.
    pub red_pt: Option<u8>,
    /// The codec's RTP clock rate (48000 for Opus).
    pub clock_rate: u32,
    /// One-byte header extension ids of the audio level and the mid, when negotiated.
    pub level_id: Option<u8>,
    /// The mid's extension id, when negotiated (see `level_id`).
    pub mid_id: Option<u8>,
    /// The track's mid, as the mid extension carries it.
    pub mid: SmallVec<[u8; 16]>,
}

/// A payload in two slices of one received datagram, and whether it goes with the RED payload
/// type: a RED packet shaped for one viewer ([`crate::media::red::Shape`]) costs no copy. The
/// slices are ranges of `data`, so what the NACK history keeps of a packet is one reference
/// count and four numbers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts<'a> {
    /// Send with [`TrackSpec::red_pt`].
    pub red: bool,
    /// The datagram payload both slices are cut from.
    data: &'a Bytes,
    /// The first slice, `start..end` of `data` (empty for a payload sent whole).
    head: (u16, u16),
    /// The rest.
    tail: (u16, u16),
}

impl<'a> Parts<'a> {
    /// `data[head]` then `data[tail]`. None if a range is not within `data`, or ends past
    /// 64 KiB (no relayed datagram is that large).
    pub(crate) fn new(
        red: bool,
        data: &'a Bytes,
        head: std::ops::Range<usize>,
        tail: std::ops::Range<usize>,
    ) -> Option<Parts<'a>> {
        let cut = |r: std::ops::Range<usize>| -> Option<(u16, u16)> {
            if r.start > r.end || r.end > data.len() {
                return None;
            }
            Some((u16::try_from(r.start).ok()?, u16::try_from(r.end).ok()?))
        };
        Some(Parts {
            red,
            data,
            head: cut(head)?,
            tail: cut(tail)?,
        })
    }

    /// All of `data`, as one slice.
    pub(crate) fn whole(data: &'a Bytes) -> Option<Parts<'a>> {
        Parts::new(false, data, 0..0, 0..data.len())
    }

    /// The same slices, sent with the plain payload type (`red` false) or RED's.
    #[cfg(test)]
    pub(crate) fn with_red(self, red: bool) -> Parts<'a> {
        Parts { red, ..self }
    }

    fn head(&self) -> &'a [u8] {
        &self.data[self.head.0 as usize..self.head.1 as usize]
    }

    fn tail(&self) -> &'a [u8] {
        &self.data[self.tail.0 as usize..self.tail.1 as usize]
    }
}

/// One packet as it was sent, to send again on a NACK. A cache line: a write replaces one of
/// these per viewer, and the thousand viewers written in turn each read and write their own.
#[derive(Debug)]
#[repr(align(64))]
struct Kept {
    ext_seq: u64,
    /// The datagram payload it was cut from; the packet's payload is `data[head]` then
    /// `data[tail]` (see [`Parts`]).
    data: Bytes,
    ts: u32,
    head: (u16, u16),
    tail: (u16, u16),
    level: Option<u8>,
    marker: bool,
    /// Sent with [`TrackSpec::red_pt`] rather than `pt`.
    red: bool,
    resent: u8,
}

impl Kept {
    fn parts(&self) -> Parts<'_> {
        Parts {
            red: self.red,
            data: &self.data,
            head: self.head,
            tail: self.tail,
        }
    }
}

#[derive(Debug)]
struct TrackTx {
    spec: TrackSpec,
    /// RTP packets and payload octets sent (RFC 3550 §6.4.1), first sends only.
    packets: u32,
    octets: u32,
    /// The RTP timestamp of the last packet and when it was sent: an SR maps its NTP time
    /// onto this timeline.
    last: Option<(u32, Instant)>,
    /// Indexed by extended sequence number modulo [`NACK_HISTORY`].
    history: [Option<Kept>; NACK_HISTORY],
    /// The cumulative loss the viewer last reported for this track.
    reported_lost: Option<i32>,
}

/// Why a lean viewer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// No consent check for [`CONSENT_TIMEOUT`].
    ConsentExpired,
    /// The viewer said BYE in authenticated SRTCP (RFC 3550 §6.6).
    Closed,
}

/// A connected viewer's transport after the handshake.
pub struct Established {
    ice: IceLite,
    srtp: SrtpOut,
    rtcp_out: Srtcp,
    rtcp_in: Srtcp,
    /// The next outgoing SRTCP index (RFC 3711 §3.4: from 0, one per packet).
    srtcp_index: u32,
    /// Highest incoming SRTCP index seen and a 64-packet window behind it (replay check).
    rtcp_in_top: Option<u32>,
    rtcp_in_seen: u64,
    tracks: SmallVec<[TrackTx; 4]>,
    dest: SocketAddr,
    last_consent: Instant,
    next_report: Instant,
    /// An authenticated BYE came: the next timeout ends the viewer.
    said_bye: bool,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("dest", &self.dest)
            .field("tracks", &self.tracks.len())
            .finish()
    }
}

/// NTP time (RFC 3550 §4) of `now`: the wall clock read once per process, then the monotonic
/// clock, so reports of one process never jump.
fn ntp(now: Instant) -> u64 {
    static EPOCH: OnceLock<(Instant, Duration)> = OnceLock::new();
    let (at, wall) = *EPOCH.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), wall)
    });
    let since_unix = if now >= at {
        wall + (now - at)
    } else {
        wall.saturating_sub(at - now)
    };
    let secs = since_unix.as_secs() + 2_208_988_800;
    let frac = ((since_unix.subsec_nanos() as u64) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

impl TrackTx {
    fn new(spec: TrackSpec) -> Self {
        TrackTx {
            spec,
            packets: 0,
            octets: 0,
            last: None,
            history: [const { None }; NACK_HISTORY],
            reported_lost: None,
        }
    }
}

impl Established {
    /// The lean state of a viewer whose handshake gave `material` (`client`: this side was the
    /// DTLS client). None unless the profile is AEAD AES-GCM.
    pub(crate) fn new(
        ice: IceLite,
        material: &[u8],
        profile: SrtpProfile,
        client: bool,
        tracks: impl IntoIterator<Item = TrackSpec>,
        dest: SocketAddr,
        now: Instant,
    ) -> Option<Established> {
        let srtp = SrtpOut::new(material, profile, client)?;
        let rtcp_out = Srtcp::new(material, profile, client)?;
        let rtcp_in = Srtcp::new(material, profile, !client)?;
        let tracks = tracks.into_iter().map(TrackTx::new).collect();
        Some(Established {
            ice,
            srtp,
            rtcp_out,
            rtcp_in,
            srtcp_index: 0,
            rtcp_in_top: None,
            rtcp_in_seen: 0,
            tracks,
            dest,
            last_consent: now,
            next_report: now + REPORT_INTERVAL,
            said_bye: false,
        })
    }

    /// A track str0m never negotiated (the SDK's `addRemoteTrack` renegotiates only locally):
    /// sent like `spec` with its own SSRC and mid, which the mid extension carries so the
    /// browser routes it to its new transceiver. Its index for [`Self::send_rtp`].
    pub(crate) fn add_track(&mut self, spec: TrackSpec) -> usize {
        self.tracks.push(TrackTx::new(spec));
        self.tracks.len() - 1
    }

    /// Starts loading what every write reads of this state (see [`crate::prefetch`]): the SRTP
    /// context, the destination and the track list, whose length sits after its inline tracks.
    pub(crate) fn prefetch_state(&self) {
        prefetch_all(&self.srtp);
        prefetch(&self.dest);
        let tracks = &self.tracks as *const _ as *const u8;
        prefetch(tracks.wrapping_add(size_of_val(&self.tracks) - 1));
    }

    /// Starts loading what a write to track `track` reads and writes: the SRTP key's context, the
    /// track's spec and counters, and the NACK slot of `ext_seq`. Call after
    /// [`Self::prefetch_state`] has had time to land.
    pub(crate) fn prefetch_track(&self, track: usize, ext_seq: u64) {
        let Some(t) = self.tracks.get(track) else {
            return;
        };
        self.srtp.prefetch();
        prefetch_all(&t.spec);
        prefetch(&t.last);
        prefetch_all(&t.history[(ext_seq % NACK_HISTORY as u64) as usize]);
    }

    /// What track `i` was built with.
    pub(crate) fn spec(&self, i: usize) -> Option<&TrackSpec> {
        self.tracks.get(i).map(|t| &t.spec)
    }

    /// Where this viewer's media goes (the address of its last nominated consent check).
    pub fn dest(&self) -> SocketAddr {
        self.dest
    }

    /// The next time [`Established::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Instant {
        if self.said_bye {
            // Already past: the peer set's timer ends the viewer at once.
            return self.last_consent;
        }
        self.next_report.min(self.last_consent + CONSENT_TIMEOUT)
    }

    /// (packets, octets) sent on a track so far.
    #[cfg(test)]
    fn counts(&self, track: usize) -> (u32, u32) {
        let t = &self.tracks[track];
        (t.packets, t.octets)
    }

    /// Builds, seals and emits one RTP packet of track `track` (an index into the specs it was
    /// built with); `ext_seq` is the extended sequence number (its high bits the ROC). The
    /// packet is counted and remembered for NACK. False if it could not be sealed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_rtp(
        &mut self,
        now: Instant,
        track: usize,
        ext_seq: u64,
        ts: u32,
        marker: bool,
        level: Option<u8>,
        payload: &Bytes,
        scratch: &mut Vec<u8>,
        out: &mut impl Emit,
    ) -> bool {
        let Some(parts) = Parts::whole(payload) else {
            return false;
        };
        self.send_rtp_parts(now, track, ext_seq, ts, marker, level, parts, scratch, out)
    }

    /// [`send_rtp`](Self::send_rtp) of a payload in two slices (a RED packet's kept block
    /// headers, then its kept data), with the track's RED payload type when `parts.red`.
    /// False, as for a seal failure, for RED on a track that did not negotiate it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_rtp_parts(
        &mut self,
        now: Instant,
        track: usize,
        ext_seq: u64,
        ts: u32,
        marker: bool,
        level: Option<u8>,
        parts: Parts<'_>,
        scratch: &mut Vec<u8>,
        out: &mut impl Emit,
    ) -> bool {
        let Some(t) = self.tracks.get_mut(track) else {
            return false;
        };
        let Some(pt) = (if parts.red {
            t.spec.red_pt
        } else {
            Some(t.spec.pt)
        }) else {
            return false;
        };
        let (head, tail) = (parts.head(), parts.tail());
        if !seal_rtp(
            &self.srtp, &t.spec, pt, ext_seq, ts, marker, level, head, tail, scratch,
        ) {
            return false;
        }
        out.emit(self.dest, scratch);
        t.packets = t.packets.wrapping_add(1);
        let len = head.len() + tail.len();
        t.octets = t.octets.wrapping_add(len as u32);
        t.last = Some((ts, now));
        t.history[(ext_seq % NACK_HISTORY as u64) as usize] = Some(Kept {
            ext_seq,
            ts,
            marker,
            level,
            red: parts.red,
            data: parts.data.clone(),
            head: parts.head,
            tail: parts.tail,
            resent: 0,
        });
        true
    }

    /// Answers a consent check (a binding request with this viewer's credentials) from `from`.
    /// False, counted, if it is not one.
    pub fn handle_stun(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        stats: &RtcpStats,
        out: &mut impl Emit,
    ) -> bool {
        let Some(msg) = self.ice.verify(data) else {
            add(&stats.stun_refused, 1);
            return false;
        };
        // The controlling browser nominates the pair media should use.
        if msg.use_candidate() {
            self.dest = from;
        }
        self.last_consent = now;
        let mut buf = [0u8; 128];
        let reply = StunMessage::binding_reply(msg.trans_id(), from);
        match reply.to_bytes(Some(self.ice.local_pwd.as_bytes()), &mut buf, sha1_hmac) {
            Ok(n) => {
                out.emit(from, &buf[..n]);
                add(&stats.stun_answered, 1);
            }
            Err(_) => add(&stats.malformed, 1),
        }
        true
    }

    /// Our ICE ufrag and password (what the browser's consent checks are keyed with).
    pub(crate) fn local_ice(&self) -> (&str, &str) {
        (&self.ice.local_ufrag, &self.ice.local_pwd)
    }

    /// Whether a binding request would be accepted (for routing a new address to this peer).
    pub(crate) fn accepts_stun(&self, data: &[u8]) -> bool {
        self.ice.verify(data).is_some()
    }

    /// A DTLS record after the switch (str0m, which held the DTLS keys, is gone): counted,
    /// never acted on. An alert cannot be authenticated here, and one forged byte 21 from
    /// anyone who knows the 5-tuple must not end a viewer; a viewer that closes stops its
    /// consent checks (or says BYE in SRTCP) and ends by that.
    pub(crate) fn handle_dtls(&mut self, _data: &[u8], stats: &RtcpStats) -> Option<Ended> {
        add(&stats.unexpected, 1);
        None
    }

    /// One SRTCP datagram from the viewer: opened, then each RTCP packet in it handled.
    /// Garbage is counted and dropped. True if it was the viewer's own (opened with its key,
    /// not a replay), whatever it held: a viewer that speaks SRTCP has finished its DTLS
    /// handshake, since its keys come from it.
    pub fn handle_rtcp(
        &mut self,
        data: &[u8],
        scratch: &mut Vec<u8>,
        stats: &RtcpStats,
        out: &mut impl Emit,
    ) -> bool {
        let mut plain = [0u8; 1500];
        let Some(buf) = plain.get_mut(..data.len()) else {
            add(&stats.malformed, 1);
            return false;
        };
        buf.copy_from_slice(data);
        let Some((rtcp, index)) = self.rtcp_in.open(buf) else {
            add(&stats.unauthenticated, 1);
            return false;
        };
        if !self.fresh_index(index) {
            add(&stats.unauthenticated, 1);
            return false;
        }
        let rtcp: &[u8] = rtcp;
        let mut at = 0;
        while at + 4 <= rtcp.len() {
            let words = u16::from_be_bytes([rtcp[at + 2], rtcp[at + 3]]) as usize;
            let end = at + 4 * (words + 1);
            if rtcp[at] >> 6 != 2 || end > rtcp.len() {
                add(&stats.malformed, 1);
                return true;
            }
            let pkt = &rtcp[at..end];
            match pkt[1] {
                SR => self.report_blocks(pkt, 28, stats),
                RR => self.report_blocks(pkt, 8, stats),
                RTPFB if pkt[0] & 0x1F == 1 => self.nack(pkt, scratch, stats, out),
                PSFB if matches!(pkt[0] & 0x1F, 1 | 4) => add(&stats.pli, 1),
                BYE => self.said_bye = true,
                // SDES, XR, REMB, transport-cc...: nothing a lean sender acts on.
                _ => {}
            }
            at = end;
        }
        if at != rtcp.len() {
            add(&stats.malformed, 1);
        }
        true
    }

    /// RFC 3711 §3.3.2's replay list for SRTCP, 64 indexes wide.
    fn fresh_index(&mut self, index: u32) -> bool {
        let Some(top) = self.rtcp_in_top else {
            self.rtcp_in_top = Some(index);
            self.rtcp_in_seen = 1;
            return true;
        };
        if index > top {
            let shift = index - top;
            self.rtcp_in_seen = if shift >= 64 {
                0
            } else {
                self.rtcp_in_seen << shift
            } | 1;
            self.rtcp_in_top = Some(index);
            return true;
        }
        let behind = top - index;
        if behind >= 64 || self.rtcp_in_seen & (1 << behind) != 0 {
            return false;
        }
        self.rtcp_in_seen |= 1 << behind;
        true
    }

    /// The report blocks of an SR or RR (starting at `first`) about our tracks.
    fn report_blocks(&mut self, pkt: &[u8], first: usize, stats: &RtcpStats) {
        let count = (pkt[0] & 0x1F) as usize;
        for i in 0..count {
            let Some(b) = pkt.get(first + 24 * i..first + 24 * (i + 1)) else {
                add(&stats.malformed, 1);
                return;
            };
            let ssrc = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let Some(t) = self.tracks.iter_mut().find(|t| t.spec.ssrc == ssrc) else {
                continue;
            };
            // 24-bit signed (RFC 3550 §6.4.1: duplicates can make it negative).
            let lost = (i32::from_be_bytes([b[5], b[6], b[7], 0])) >> 8;
            let before = t.reported_lost.replace(lost).unwrap_or(0);
            add(&stats.rr_blocks, 1);
            if lost > before {
                add(&stats.rr_lost, (lost - before) as u64);
            }
        }
    }

    /// A generic NACK (RFC 4585 §6.2.1): each lost packet still in the history is sent again.
    fn nack(&mut self, pkt: &[u8], scratch: &mut Vec<u8>, stats: &RtcpStats, out: &mut impl Emit) {
        if pkt.len() < 12 {
            add(&stats.malformed, 1);
            return;
        }
        let media = u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]);
        let Some(t) = self.tracks.iter_mut().find(|t| t.spec.ssrc == media) else {
            add(&stats.nack_missed, 1);
            return;
        };
        for fci in pkt[12..].chunks_exact(4) {
            let pid = u16::from_be_bytes([fci[0], fci[1]]);
            let blp = u16::from_be_bytes([fci[2], fci[3]]);
            for bit in 0..17u16 {
                if bit > 0 && blp & (1 << (bit - 1)) == 0 {
                    continue;
                }
                let seq = pid.wrapping_add(bit);
                add(&stats.nack_requested, 1);
                // NACK_HISTORY divides 2^16, so the slot of a 16-bit number is its packet's.
                let slot = &mut t.history[seq as usize % NACK_HISTORY];
                let Some(k) = slot.as_mut().filter(|k| k.ext_seq as u16 == seq) else {
                    add(&stats.nack_missed, 1);
                    continue;
                };
                if k.resent >= MAX_RESENDS {
                    add(&stats.nack_missed, 1);
                    continue;
                }
                k.resent += 1;
                // The same index, the same nonce, the same bytes: a receiver that did get the
                // first copy drops this one as a replay.
                let pt = if k.red {
                    t.spec.red_pt
                } else {
                    Some(t.spec.pt)
                };
                let kept = k.parts();
                if seal_rtp(
                    &self.srtp,
                    &t.spec,
                    pt.unwrap_or(t.spec.pt),
                    k.ext_seq,
                    k.ts,
                    k.marker,
                    k.level,
                    kept.head(),
                    kept.tail(),
                    scratch,
                ) {
                    out.emit(self.dest, scratch);
                    add(&stats.nack_resent, 1);
                }
            }
        }
    }

    /// Sends what is due at `now`: sender reports; ends the viewer if consent expired.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        scratch: &mut Vec<u8>,
        stats: &RtcpStats,
        out: &mut impl Emit,
    ) -> Result<(), Ended> {
        if self.said_bye {
            return Err(Ended::Closed);
        }
        if now >= self.last_consent + CONSENT_TIMEOUT {
            return Err(Ended::ConsentExpired);
        }
        if now < self.next_report {
            return Ok(());
        }
        self.next_report = now + REPORT_INTERVAL;
        let ntp = ntp(now);
        // Every track's report in one compound packet (RFC 8108 §5.3 lets an endpoint's SSRCs
        // share one): one seal and one send per viewer per interval instead of one per track,
        // in groups of 31 (an SDES names at most 31 sources).
        let mut from = 0;
        while from < self.tracks.len() {
            let group = from..self.tracks.len().min(from + MAX_SDES_CHUNKS);
            from = group.end;
            let sending = || {
                self.tracks[group.clone()]
                    .iter()
                    .filter(|t| t.last.is_some())
            };
            scratch.clear();
            for t in sending() {
                let Some((last_ts, at)) = t.last else {
                    continue;
                };
                // In u128: a track silent for long at a high clock rate overflows u64.
                let elapsed = now.saturating_duration_since(at).as_micros();
                let rtp_ts =
                    last_ts.wrapping_add((elapsed * t.spec.clock_rate as u128 / 1_000_000) as u32);
                sender_report(scratch, t.spec.ssrc, ntp, rtp_ts, t.packets, t.octets);
            }
            let reports = sending().count();
            if reports == 0 {
                continue;
            }
            source_description(scratch, sending().map(|t| t.spec.ssrc), reports);
            if self.seal_rtcp(scratch) {
                out.emit(self.dest, scratch);
                add(&stats.sr_sent, reports as u64);
            }
        }
        Ok(())
    }

    /// An RTCP BYE for every track (RFC 3550 §6.6): the viewer learns at once that the edge
    /// ended it, as str0m's DTLS close told it before.
    pub(crate) fn bye(&mut self, scratch: &mut Vec<u8>, out: &mut impl Emit) {
        let Some(first) = self.tracks.first() else {
            return;
        };
        scratch.clear();
        // An empty RR first: RFC 3550 §6.1 compounds start with a report.
        scratch.extend_from_slice(&[0x80, RR, 0, 1]);
        scratch.extend_from_slice(&first.spec.ssrc.to_be_bytes());
        let n = self.tracks.len().min(31);
        scratch.extend_from_slice(&[0x80 | n as u8, BYE]);
        scratch.extend_from_slice(&(n as u16).to_be_bytes());
        for t in &self.tracks[..n] {
            scratch.extend_from_slice(&t.spec.ssrc.to_be_bytes());
        }
        if self.seal_rtcp(scratch) {
            out.emit(self.dest, scratch);
        }
    }

    fn seal_rtcp(&mut self, buf: &mut Vec<u8>) -> bool {
        let index = self.srtcp_index;
        self.srtcp_index = (index + 1) & 0x7FFF_FFFF;
        self.rtcp_out.seal(buf, index)
    }
}

/// One packet of `spec`'s track, sealed into `scratch`.
#[allow(clippy::too_many_arguments)]
fn seal_rtp(
    srtp: &SrtpOut,
    spec: &TrackSpec,
    pt: u8,
    ext_seq: u64,
    ts: u32,
    marker: bool,
    level: Option<u8>,
    head: &[u8],
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> bool {
    let level_byte = level.map(|l| [l]);
    let mut exts: [(u8, &[u8]); 2] = [(0, &[]), (0, &[])];
    let mut n = 0;
    if let (Some(id), Some(b)) = (spec.level_id, level_byte.as_ref()) {
        exts[n] = (id, b);
        n += 1;
    }
    if let Some(id) = spec.mid_id.filter(|_| !spec.mid.is_empty()) {
        exts[n] = (id, &spec.mid);
        n += 1;
    }
    let fields = HeaderFields {
        payload_type: pt,
        sequence_number: ext_seq as u16,
        timestamp: ts,
        ssrc: spec.ssrc,
        marker,
    };
    let header = write_packet(scratch, &fields, &exts[..n], head);
    scratch.extend_from_slice(payload);
    srtp.protect(scratch, header - head.len(), (ext_seq >> 16) as u32)
}

/// An SR with no report blocks (a lean viewer sends no media back) followed by an SDES CNAME
/// chunk: the compound RFC 3550 §6.1 asks for.
fn sender_report(buf: &mut Vec<u8>, ssrc: u32, ntp: u64, rtp_ts: u32, packets: u32, octets: u32) {
    buf.extend_from_slice(&[0x80, SR, 0, 6]);
    buf.extend_from_slice(&ssrc.to_be_bytes());
    buf.extend_from_slice(&ntp.to_be_bytes());
    buf.extend_from_slice(&rtp_ts.to_be_bytes());
    buf.extend_from_slice(&packets.to_be_bytes());
    buf.extend_from_slice(&octets.to_be_bytes());
}

/// One SDES naming `count` (1 to [`MAX_SDES_CHUNKS`]) sources `ssrcs`, each with the CNAME.
fn source_description(buf: &mut Vec<u8>, ssrcs: impl Iterator<Item = u32>, count: usize) {
    // A chunk: SSRC, CNAME item, a null end item, padded to a word.
    let chunk = 4 + 2 + CNAME.len() + 1;
    let padded = chunk.div_ceil(4) * 4;
    buf.extend_from_slice(&[0x80 | count as u8, SDES]);
    buf.extend_from_slice(&((count * padded / 4) as u16).to_be_bytes());
    for ssrc in ssrcs {
        buf.extend_from_slice(&ssrc.to_be_bytes());
        buf.extend_from_slice(&[1, CNAME.len() as u8]);
        buf.extend_from_slice(CNAME);
        buf.resize(buf.len() + 1 + padded - chunk, 0);
    }
}

/// The viewer's end of a lean session, for tests and fuzzing from outside the crate: it seals
/// SRTCP with the keys the viewer holds (a hostile viewer's malformed RTCP gets past the
/// authentication) and builds consent checks with its ICE credentials.
#[cfg(feature = "tools")]
pub struct ViewerSide {
    sealer: Srtcp,
}

#[cfg(feature = "tools")]
impl ViewerSide {
    /// The viewer of a lean state built with `material`, `profile` and `client` (the edge's
    /// role, as given to [`Established::new`]).
    pub fn new(material: &[u8], profile: SrtpProfile, client: bool) -> Option<ViewerSide> {
        Some(ViewerSide {
            sealer: Srtcp::new(material, profile, !client)?,
        })
    }

    /// Seals `packet` (at least 8 bytes) as SRTCP with index `index`. False if too short.
    pub fn seal_rtcp(&self, packet: &mut Vec<u8>, index: u32) -> bool {
        self.sealer.seal(packet, index)
    }

    /// A binding request with `ice`'s credentials (as the viewer sends it) into `buf`: its
    /// length, or None if `buf` is too short.
    pub fn consent_check(ice: &IceLite, use_candidate: bool, buf: &mut [u8]) -> Option<usize> {
        let user = format!("{}:{}", ice.local_ufrag, ice.remote_ufrag);
        let msg = StunMessage::binding_request(
            &user,
            str0m::ice::TransId::new(),
            true,
            7,
            100,
            use_candidate,
        );
        msg.to_bytes(Some(ice.local_pwd.as_bytes()), buf, sha1_hmac)
            .ok()
    }
}

#[cfg(test)]
#[path = "established_tests.rs"]
mod tests;
