//! One lean established viewer (`rtc::established`) fed arbitrary datagrams from the network,
//! raw (an attacker who knows the 5-tuple) or sealed with the viewer's own SRTCP keys (a
//! hostile viewer: validly authenticated, malformed RTCP behind it), valid and broken consent
//! checks, stray DTLS, interleaved with sends and time steps.
//!
//! The first input byte chooses the mode: even, a script of operations (below); odd, the
//! rest of the input is one datagram, sealed with the viewer's keys if the byte's bit 1 is set.
//!
//! Checked: never panics; every datagram in is answered by a bounded number out (a consent
//! check by one reply, an SRTCP datagram by at most `MAX_RESENDS` copies of each remembered
//! packet of each track, a timeout by one report per track plus nothing else); over the whole
//! run NACKs never resend more than `MAX_RESENDS` times what was sent; a valid consent check is
//! always answered; nothing emitted exceeds one MTU.
#![no_main]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use chorus::fuzzing::{EstablishedFuzz, MAX_RESENDS, NACK_HISTORY};
use chorus::rtc::established::{Emit, Established, IceLite, RtcpStats, TrackSpec, ViewerSide};
use libfuzzer_sys::fuzz_target;
use str0m::crypto::dtls::SrtpProfile;

const SSRCS: [u32; 2] = [0x1234_5678, 0x1234_5679];
const PROFILE: SrtpProfile = SrtpProfile::AEAD_AES_128_GCM;
/// The edge's DTLS role (the server, as with browsers).
const CLIENT: bool = false;
/// The largest payload a send may carry (an Opus frame is well under this).
const MAX_PAYLOAD: usize = 1200;
/// What may come out in one datagram: the payload, RTP header with two extensions, the tag.
const MAX_OUT: usize = MAX_PAYLOAD + 12 + 4 + 2 + 2 + 16 + 16;

fn material() -> Vec<u8> {
    (0..56u8).collect()
}

fn ice() -> IceLite {
    IceLite {
        local_ufrag: "edge".into(),
        local_pwd: "edge-password-edge-password".into(),
        remote_ufrag: "view".into(),
    }
}

fn addr(n: u8) -> SocketAddr {
    if n & 0x80 != 0 {
        SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), 5000 + n as u16)
    } else {
        SocketAddr::from(([127, 0, 0, 2], 5000 + n as u16))
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Any bytes, demultiplexed by their first byte as `PeerSet::lean_datagram` does.
    Raw(Vec<u8>),
    /// Any bytes (padded to an RTCP header) sealed by the viewer with this SRTCP index.
    Sealed { index: u32, body: Vec<u8> },
    /// A well-formed generic NACK, sealed, for a track (or not one) and these (pid, blp).
    Nack {
        index: u32,
        track: u8,
        pairs: Vec<(u16, u16)>,
    },
    /// A consent check with the right credentials (or, `valid` false, a broken byte of it).
    Consent {
        from: u8,
        use_candidate: bool,
        valid: bool,
        flip: u8,
    },
    /// One packet sent on a track, `step` after the last sequence number of that track.
    Send {
        track: u8,
        step: u16,
        len: u16,
        marker: bool,
        level: Option<u8>,
    },
    /// Time passes (ms), then the timeout is handled.
    Advance(u16),
}

/// Counts what comes out, checks each datagram's size, keeps no copy.
#[derive(Default)]
struct Counter {
    n: usize,
}

impl Emit for Counter {
    fn emit(&mut self, _to: SocketAddr, data: &[u8]) {
        assert!(data.len() <= MAX_OUT, "{} bytes out", data.len());
        self.n += 1;
    }
}

struct Run {
    lean: Established,
    viewer: ViewerSide,
    stats: RtcpStats,
    now: Instant,
    seqs: [u64; 2],
    sent: u64,
    scratch: Vec<u8>,
    ended: bool,
}

impl Run {
    fn new() -> Run {
        let now = Instant::now();
        let tracks = SSRCS.map(|ssrc| TrackSpec {
            ssrc,
            pt: 111,
            red_pt: Some(63),
            clock_rate: 48_000,
            level_id: Some(1),
            mid_id: Some(4),
            mid: b"1"[..].into(),
        });
        let lean = Established::new(ice(), &material(), PROFILE, CLIENT, tracks, addr(0), now)
            .expect("AES-GCM");
        Run {
            lean,
            viewer: ViewerSide::new(&material(), PROFILE, CLIENT).expect("AES-GCM"),
            stats: RtcpStats::default(),
            now,
            seqs: [65_500, 10],
            sent: 0,
            scratch: Vec::new(),
            ended: false,
        }
    }

    fn resent(&self) -> u64 {
        self.stats.nack_resent.load(Ordering::Relaxed)
    }

    /// The datagram demultiplexed as the peer set does for a lean peer.
    fn datagram(&mut self, from: SocketAddr, data: &[u8]) {
        let Some(&first) = data.first() else {
            return;
        };
        let before = self.resent();
        let mut out = Counter::default();
        match first {
            0..=3 => {
                self.lean
                    .handle_stun(self.now, from, data, &self.stats, &mut out);
                assert!(out.n <= 1);
            }
            20..=63 => {
                if self.lean.handle_dtls(data, &self.stats).is_some() {
                    self.ended = true;
                }
                assert_eq!(out.n, 0);
            }
            128..=191 if data.len() > 1 && (192..=223).contains(&data[1]) => {
                self.lean
                    .handle_rtcp(data, &mut self.scratch, &self.stats, &mut out);
                let bound = SSRCS.len() * NACK_HISTORY * MAX_RESENDS as usize;
                assert!(out.n <= bound, "{} answers to one datagram", out.n);
                assert_eq!(out.n as u64, self.resent() - before);
            }
            _ => {}
        }
        assert!(
            self.resent() <= MAX_RESENDS as u64 * self.sent,
            "resent {} of {} sent",
            self.resent(),
            self.sent
        );
    }

    fn sealed(&mut self, index: u32, mut body: Vec<u8>) {
        body.truncate(1400);
        if body.len() < 8 {
            body.resize(8, 0);
        }
        // An RTCP-looking first two bytes, so the demux hands it to the SRTCP path.
        body[0] = 0x80 | (body[0] & 0x3F);
        body[1] = 192 | (body[1] & 0x1F);
        assert!(self.viewer.seal_rtcp(&mut body, index));
        self.datagram(addr(0), &body);
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Raw(data) => self.datagram(addr(0), &data),
            Op::Sealed { index, body } => self.sealed(index, body),
            Op::Nack {
                index,
                track,
                pairs,
            } => {
                let media = SSRCS
                    .get(track as usize % 3)
                    .copied()
                    .unwrap_or(0xdead_beef);
                let n = pairs.len().min(300);
                let mut pkt = vec![0x81, 205];
                pkt.extend_from_slice(&(2 + n as u16).to_be_bytes());
                pkt.extend_from_slice(&0xBEEFu32.to_be_bytes());
                pkt.extend_from_slice(&media.to_be_bytes());
                for (pid, blp) in &pairs[..n] {
                    pkt.extend_from_slice(&pid.to_be_bytes());
                    pkt.extend_from_slice(&blp.to_be_bytes());
                }
                self.sealed(index, pkt);
            }
            Op::Consent {
                from,
                use_candidate,
                valid,
                flip,
            } => {
                let mut buf = [0u8; 256];
                let n = ViewerSide::consent_check(&ice(), use_candidate, &mut buf)
                    .expect("a binding request fits");
                let mut out = Counter::default();
                if !valid {
                    buf[flip as usize % n] ^= 0x01 << (flip % 8);
                }
                let ok =
                    self.lean
                        .handle_stun(self.now, addr(from), &buf[..n], &self.stats, &mut out);
                if valid {
                    assert!(ok && out.n == 1, "a valid consent check is answered");
                    if use_candidate {
                        assert_eq!(self.lean.dest(), addr(from));
                    }
                } else {
                    assert!(out.n <= 1);
                }
            }
            Op::Send {
                track,
                step,
                len,
                marker,
                level,
            } => {
                let t = track as usize % SSRCS.len();
                self.seqs[t] += step as u64;
                let payload = Bytes::from(vec![0x55; len as usize % MAX_PAYLOAD]);
                let mut out = Counter::default();
                let ts = (self.seqs[t] as u32).wrapping_mul(960);
                if self.lean.send_rtp(
                    self.now,
                    t,
                    self.seqs[t],
                    ts,
                    marker,
                    level,
                    &payload,
                    &mut self.scratch,
                    &mut out,
                ) {
                    assert_eq!(out.n, 1);
                    self.sent += 1;
                }
            }
            Op::Advance(ms) => {
                self.now += Duration::from_millis(ms as u64);
                let mut out = Counter::default();
                let r =
                    self.lean
                        .handle_timeout(self.now, &mut self.scratch, &self.stats, &mut out);
                assert!(out.n <= SSRCS.len());
                if r.is_err() {
                    self.ended = true;
                }
                assert!(self.lean.poll_timeout() > self.now || self.ended);
            }
        }
        assert!(self.scratch.capacity() <= 4096, "scratch grew");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut run = Run::new();
    if mode & 1 == 1 {
        if mode & 2 == 2 {
            run.sealed(u32::from(mode >> 2), rest.to_vec());
        } else {
            run.datagram(addr(0), rest);
        }
        return;
    }
    let mut u = Unstructured::new(rest);
    for _ in 0..64 {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        run.op(op);
        if run.ended {
            break;
        }
    }
});
