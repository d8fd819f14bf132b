//! The WebRTC peers of one media thread and the UDP socket they share.
//!
//! Datagrams are routed by the ICE ufrag of STUN requests, then by the remote address those
//! requests came from: no scan over all peers. What happens with a peer's str0m events is up to
//! the thread's [`PeerApp`]; this module only owns sockets, routing, timeouts and the
//! per-peer input budget that keeps one flooding peer from starving the others.
//!
//! Peers are driven only when they have something to do: a datagram for them, media written to
//! them, or their own timeout (kept in one heap), so an idle peer costs nothing per loop.
//! Everything they send leaves in `sendmmsg` batches.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use str0m::change::SdpOffer;
use str0m::config::DtlsCert;
use str0m::crypto::dtls::SrtpProfile;
use str0m::ice::StunMessage;
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc, RtcConfig};
use tracing::{debug, info, warn};

use super::established::{Emit, Ended, Established, IceLite, RtcpStats, TrackSpec};
use super::offer::OfferError;
use super::reaper::reap;
use super::tcp::{Frame, TcpSide, TcpStats};
use crate::net::poll::{Doorbell, Poller};
use crate::net::send::SendBatch;
use crate::prefetch::prefetch;

/// A peer that has not completed ICE + DTLS within this time is dropped (counted as
/// `connect_timeout`). A browser on loopback or a LAN connects in well under a second, over TURN in
/// one or two; each answered peer holds about 90 KiB until it connects or lapses.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Answered but not yet connected peers per process (origin and edge together); a new offer past
/// this is refused with [`OfferError::Limit`] (HTTP 503). At about 90 KiB each this bounds the
/// memory of offers that never connect to about 90 MiB, and lets 100 offers per second through
/// the [`CONNECT_TIMEOUT`] even if none of them connects.
pub(crate) const MAX_UNCONNECTED_PEERS: usize = 1000;
/// Datagrams one peer may send per second before the excess is dropped. A viewer sends a few
/// RTCP reports and consent checks per second; a publisher 50-100 media packets per track.
pub(crate) const MAX_DATAGRAMS_PER_SEC: u32 = 2000;
/// STUN binding requests per second that one peer's ufrag may bring from addresses not yet
/// routed to it (each costs an HMAC-SHA1 check). A browser checks each candidate pair a few
/// times a second; a spoofer that knows a ufrag gets no more than this, and never eats the peer's
/// own [`MAX_DATAGRAMS_PER_SEC`].
pub(crate) const MAX_UNVERIFIED_STUN_PER_SEC: u32 = 100;
/// Remote addresses remembered per peer (one per candidate pair the browser tries).
const MAX_REMOTES: usize = 8;
/// How long a viewer that went lean keeps its str0m `Rtc` for DTLS only. str0m answers as the
/// DTLS server (`a=setup:passive`), so its last flight (ChangeCipherSpec, Finished) may be lost
/// after it reports `Connected`; the browser then resends its own last flight, which only
/// str0m's DTLS can answer. 8 s covers a browser's first three retransmissions (1 + 2 + 4 s,
/// RFC 6347 §4.2.4.1). Meanwhile str0m sends only DTLS: media, reports and consent answers
/// are the lean state's, so one sender counts every packet. The grace ends sooner at the
/// viewer's first authentic SRTCP (its receiver reports: 4.7–5.0 s after connecting for the
/// load generator's str0m clients): it has our last flight, or it would have no SRTCP keys.
pub(crate) const DTLS_GRACE: Duration = Duration::from_secs(8);
/// Counters of one or more media threads' sockets and peers, read by /metrics. A thread adds to
/// them as things happen (rare events) or once per loop (the send counters).
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Datagrams sent, refused by the kernel, and the `sendmmsg` calls they took.
    pub sent: AtomicU64,
    /// Datagrams the kernel refused.
    pub send_errors: AtomicU64,
    /// `sendmmsg` calls made.
    pub send_calls: AtomicU64,
    /// Datagrams over a peer's [`MAX_DATAGRAMS_PER_SEC`].
    pub flood_drops: AtomicU64,
    /// Datagrams from an unknown address that are not STUN for a known ufrag.
    pub unroutable: AtomicU64,
    /// STUN for a known ufrag from a new address that str0m refused (bad MESSAGE-INTEGRITY,
    /// wrong remote ufrag, not a binding request), or over [`MAX_UNVERIFIED_STUN_PER_SEC`].
    pub stun_refused: AtomicU64,
    /// Consent checks of peers the server ended, answered with a STUN error (`super::ended`).
    pub stun_ended: AtomicU64,
    /// Peer ends, by reason (see [`CloseReason`]).
    pub closed_removed: AtomicU64,
    /// Peers that did not connect within `CONNECT_TIMEOUT`.
    pub closed_connect_timeout: AtomicU64,
    /// Peers whose consent checks stopped.
    pub closed_ice_timeout: AtomicU64,
    /// Peers the remote closed.
    pub closed_remote: AtomicU64,
    /// Peers str0m reported an error for.
    pub closed_failed: AtomicU64,
    /// RTP of an SSRC no m-line of the peer declares (publishers; counted by the host).
    pub undeclared_ssrc: AtomicU64,
    /// Viewers that left str0m after their handshake, and those whose `Rtc` the grace ended.
    pub lean_switched: AtomicU64,
    /// Lean viewers whose str0m state was dropped after `DTLS_GRACE`.
    pub lean_str0m_dropped: AtomicU64,
    /// What the lean viewers' consent checks and SRTCP brought (see [`RtcpStats`]).
    pub lean: RtcpStats,
    /// The ICE-TCP listener's connections (see `super::tcp`).
    pub tcp: TcpStats,
}

impl PeerStats {
    fn closed(&self, reason: CloseReason) {
        let c = match reason {
            CloseReason::Removed => &self.closed_removed,
            CloseReason::ConnectTimeout => &self.closed_connect_timeout,
            CloseReason::IceTimeout => &self.closed_ice_timeout,
            CloseReason::RemoteClosed => &self.closed_remote,
            CloseReason::Failed => &self.closed_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

static UNCONNECTED: AtomicUsize = AtomicUsize::new(0);
static UNCONNECTED_REFUSED: AtomicU64 = AtomicU64::new(0);

/// The process-wide cap: [`MAX_UNCONNECTED_PEERS`], or in debug builds (tests only)
/// `CHORUS_TEST_MAX_UNCONNECTED`, so a test can reach it with a handful of offers.
fn max_unconnected() -> usize {
    #[cfg(debug_assertions)]
    {
        static CAP: OnceLock<usize> = OnceLock::new();
        *CAP.get_or_init(|| {
            std::env::var("CHORUS_TEST_MAX_UNCONNECTED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(MAX_UNCONNECTED_PEERS)
        })
    }
    #[cfg(not(debug_assertions))]
    MAX_UNCONNECTED_PEERS
}

/// One answered peer not connected yet, counted against [`MAX_UNCONNECTED_PEERS`] from the offer
/// until it connects or ends (the count goes down when this is dropped).
#[derive(Debug)]
pub(crate) struct ConnectSlot(());

impl ConnectSlot {
    /// Takes a slot, or refuses the offer when the process has too many unconnected peers.
    pub(crate) fn acquire() -> Result<ConnectSlot, OfferError> {
        let cap = max_unconnected();
        let taken = UNCONNECTED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(ConnectSlot(())),
            Err(n) => {
                let refused = UNCONNECTED_REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
                if refused.is_power_of_two() {
                    warn!(
                        unconnected = n,
                        cap, refused, "offer refused: too many unconnected peers"
                    );
                }
                Err(OfferError::Limit(format!(
                    "busy: {n} answered peers are still connecting (at most {cap}): try again in a few seconds"
                )))
            }
        }
    }

    /// (unconnected peers now, offers refused at the cap since start), for /metrics.
    pub(crate) fn gauges() -> (usize, u64) {
        (
            UNCONNECTED.load(Ordering::Relaxed),
            UNCONNECTED_REFUSED.load(Ordering::Relaxed),
        )
    }
}

impl Drop for ConnectSlot {
    fn drop(&mut self) {
        UNCONNECTED.fetch_sub(1, Ordering::AcqRel);
    }
}
/// Datagrams read from the socket in one go before the thread looks at its other work.
const RECV_BURST: usize = 256;

/// Names a peer: a sequential number its host hands out, not reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// Hashes a `PeerId` with one multiplication: ids are trusted, sequential numbers, and the peer
/// table is looked up for every packet of every viewer (SipHash was a visible share of it).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer-{}", self.0)
    }
}

/// Why a peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The control plane removed it (unpublish, replaced, signalling closed).
    Removed,
    /// ICE and DTLS did not complete within [`CONNECT_TIMEOUT`].
    ConnectTimeout,
    /// Consent checks stopped arriving.
    IceTimeout,
    /// The remote closed DTLS / sent BYE.
    RemoteClosed,
    /// str0m reported an error for this peer.
    Failed,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::Removed => "removed",
            CloseReason::ConnectTimeout => "not connected in time",
            CloseReason::IceTimeout => "ICE timeout",
            CloseReason::RemoteClosed => "closed by remote",
            CloseReason::Failed => "failed",
        })
    }
}

/// Answers an offer with a new ICE-lite, RTP-mode peer whose candidates are `candidate` (UDP)
/// and, if given, `tcp` (a passive TCP host candidate, RFC 6544, of lower priority than UDP).
/// Runs on the control plane; the returned `Rtc` is then handed to a media thread.
pub(crate) fn answer_offer(
    offer_sdp: &str,
    config: RtcConfig,
    candidate: SocketAddr,
    tcp: Option<SocketAddr>,
) -> Result<(Rtc, String, String), OfferError> {
    let offer = SdpOffer::from_sdp_string(&super::offer::normalize(offer_sdp)).map_err(|e| {
        debug!(offer = offer_sdp, "offer str0m cannot parse");
        OfferError::Malformed(e.to_string())
    })?;
    let creds = IceCreds::new();
    let ufrag = creds.ufrag.clone();
    let config = match (config.dtls_cert().is_none(), shared_dtls_cert()) {
        (true, Some(cert)) => config.set_dtls_cert(cert.clone()),
        _ => config,
    };
    // str0m asserts on some offers it parsed (its payload-type negotiation panics with "Pt
    // locked multiple times" on colliding PTs, found by fuzz/fuzz_targets/sdp_offer.rs): an SDP
    // from the network must not panic the server, so a panic while negotiating refuses this
    // offer. Nothing outlives it: the half-built `Rtc` is dropped.
    let negotiate = move || {
        let mut rtc = config
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .set_local_ice_credentials(creds)
            .build(Instant::now());
        let cand =
            Candidate::host(candidate, "udp").map_err(|e| OfferError::Internal(e.to_string()))?;
        rtc.add_local_candidate(cand);
        if let Some(addr) = tcp {
            let cand = Candidate::builder()
                .tcp()
                .host(addr)
                .tcptype(TcpType::Passive)
                .build()
                .map_err(|e| OfferError::Internal(e.to_string()))?;
            rtc.add_local_candidate(cand);
        }
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| OfferError::Rejected(e.to_string()))?;
        Ok((rtc, answer.to_sdp_string()))
    };
    let (rtc, answer) =
        std::panic::catch_unwind(AssertUnwindSafe(negotiate)).map_err(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            debug!(offer = offer_sdp, "str0m panicked on an offer: {why}");
            OfferError::Rejected(format!("str0m cannot negotiate this offer ({why})"))
        })??;
    Ok((rtc, ufrag, answer))
}

/// What every chorus peer negotiates: Opus (with in-band FEC, and RFC 2198 RED when the offer
/// has it: publishers then send RED, and viewers get it), VP8 and H264, and only the header
/// extensions it uses. No transport-cc or abs-send-time: with them, Chrome probes bandwidth with padding-only
/// packets on the audio SSRC (whose sequence numbers read as loss downstream once the padding is
/// dropped), and each negotiated extension is written into every packet sent.
pub(crate) fn media_config() -> RtcConfig {
    RtcConfig::new()
        .clear_codecs()
        .enable_opus(true, true)
        .enable_vp8(true)
        .enable_h264(true)
        .clear_extension_map()
        .set_extension(1, Extension::AudioLevel)
        .set_extension(4, Extension::RtpMid)
        .set_extension(13, Extension::VideoOrientation)
}

/// One DTLS certificate for every peer of the process: a fresh key pair per peer costs more
/// than the rest of a join (ICE, DTLS, SRTP set-up) together. The fingerprint in each answer is
/// this certificate's; the DTLS keys are still per session.
pub(crate) fn shared_dtls_cert() -> Option<&'static DtlsCert> {
    static CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();
    CERT.get_or_init(|| {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    })
    .as_ref()
}

/// A peer's str0m state: every origin peer's, and every viewer's until its lean switch plus
/// [`DTLS_GRACE`]. Boxed: str0m's state is about 10 KiB inline (90 KiB with what it points
/// to), and the peer table is walked per packet. It derefs to the `Rtc` for code that only
/// meets str0m peers (the origin's media thread, whose peers never go lean); code that may
/// meet a lean viewer asks [`Str0m::get_mut`].
pub struct Str0m(Option<Box<Rtc>>);

impl Str0m {
    pub(crate) fn get_mut(&mut self) -> Option<&mut Rtc> {
        self.0.as_deref_mut()
    }

    pub(crate) fn is_some(&self) -> bool {
        self.0.is_some()
    }
}

impl Deref for Str0m {
    type Target = Rtc;
    fn deref(&self) -> &Rtc {
        self.0
            .as_deref()
            .expect("str0m state of a peer that never goes lean")
    }
}

impl DerefMut for Str0m {
    fn deref_mut(&mut self) -> &mut Rtc {
        self.0
            .as_deref_mut()
            .expect("str0m state of a peer that never goes lean")
    }
}

/// One peer of a set: its str0m (or, after the handshake, lean) state and the host's data `T`.
pub struct Peer<T> {
    /// Its str0m state; gone for a lean viewer after `DTLS_GRACE`.
    pub rtc: Str0m,
    /// What carries a lean viewer's media after its handshake (see [`Peer::go_lean`]).
    lean: Option<Box<Established>>,
    /// When `rtc` goes, for a lean peer still in its [`DTLS_GRACE`].
    rtc_until: Option<Instant>,
    /// The browser's ICE ufrag, from the first consent check str0m accepted.
    remote_ufrag: Option<String>,
    /// What the host keeps with the peer (a viewer, a publication).
    pub data: T,
    ufrag: String,
    added: Instant,
    /// ICE and DTLS completed.
    pub connected: bool,
    /// Every address this peer's STUN came from: a browser checks several candidate pairs
    /// and may move media between them, so all stay routable, not just the latest.
    remotes: SmallVec<[SocketAddr; 4]>,
    /// Input budget: datagrams taken in the current one-second window.
    window_start: Instant,
    window_count: u32,
    /// STUN from addresses not routed to this peer yet, in the current window.
    unverified_count: u32,
    /// Datagrams of this peer dropped over `MAX_DATAGRAMS_PER_SEC`.
    pub dropped_flood: u64,
    /// Held until the peer connects: it counts against [`MAX_UNCONNECTED_PEERS`].
    slot: Option<ConnectSlot>,
    /// The deadline this peer has in the timer heap (the earliest one pushed and not yet due).
    scheduled: Option<Instant>,
    /// Where str0m last sent to this peer: the selected candidate pair's remote address.
    pub dest: Option<SocketAddr>,
}

impl<T> Peer<T> {
    #[cfg(test)]
    pub(crate) fn is_lean(&self) -> bool {
        self.lean.is_some()
    }

    /// Starts loading the fields a write reads first: whether it is connected and where its
    /// lean state and str0m state are (see [`crate::prefetch`]).
    pub(crate) fn prefetch(&self) {
        prefetch(&self.connected);
        prefetch(&self.lean);
        prefetch(&self.rtc);
    }

    /// Its lean state, once it went lean.
    pub(crate) fn lean(&self) -> Option<&Established> {
        self.lean.as_deref()
    }

    /// Its lean state, once it went lean.
    pub(crate) fn lean_mut(&mut self) -> Option<&mut Established> {
        self.lean.as_deref_mut()
    }

    /// Leaves str0m behind for media: from now on `lean` answers consent checks, seals the
    /// peer's RTP and speaks its SRTCP, and str0m is kept for DTLS only until [`DTLS_GRACE`]
    /// ends. `material`, `profile` and `client` are the DTLS-SRTP keys; `tracks` what str0m
    /// negotiated for each track. False (nothing changed) unless the profile is AES-GCM and
    /// the peer's ICE credentials and destination are known.
    pub fn go_lean(
        &mut self,
        material: &[u8],
        profile: SrtpProfile,
        client: bool,
        tracks: impl IntoIterator<Item = TrackSpec>,
        now: Instant,
    ) -> bool {
        let (Some(rtc), Some(remote_ufrag), Some(dest)) =
            (self.rtc.get_mut(), self.remote_ufrag.clone(), self.dest)
        else {
            return false;
        };
        let creds = rtc.direct_api().local_ice_credentials();
        let ice = IceLite {
            local_ufrag: creds.ufrag,
            local_pwd: creds.pass,
            remote_ufrag,
        };
        let Some(lean) = Established::new(ice, material, profile, client, tracks, dest, now) else {
            return false;
        };
        self.lean = Some(Box::new(lean));
        self.rtc_until = Some(now + DTLS_GRACE);
        true
    }
}

/// How a packet leaves for one connected peer: the lean state's seal into the send batch, or
/// str0m's send path.
pub enum PeerOut<'a> {
    /// A lean viewer: sealed here, queued on the thread's send batch.
    Lean {
        /// The viewer's lean state.
        lean: &'a mut Established,
        /// Where its datagrams go.
        sink: Sink<'a>,
        /// A buffer to seal into, reused.
        scratch: &'a mut Vec<u8>,
    },
    /// A peer still on str0m: written through its `Rtc`.
    Str0m(&'a mut Rtc),
}

/// The thread's socket and send batch, for datagrams built outside str0m, and its ICE-TCP
/// connections: a packet for the address of a connection attached to a peer goes there.
pub struct Sink<'a> {
    socket: &'a UdpSocket,
    out: &'a mut SendBatch,
    tcp: Option<(&'a mut TcpSide, &'a TcpStats)>,
}

impl<'a> Sink<'a> {
    /// A sink onto `socket` through the send batch `out`.
    pub fn new(socket: &'a UdpSocket, out: &'a mut SendBatch) -> Self {
        Sink {
            socket,
            out,
            tcp: None,
        }
    }

    fn with_tcp(
        socket: &'a UdpSocket,
        out: &'a mut SendBatch,
        tcp: &'a mut Option<TcpSide>,
        stats: &'a PeerStats,
    ) -> Self {
        Sink {
            socket,
            out,
            tcp: tcp.as_mut().map(|t| (t, &stats.tcp)),
        }
    }

    pub(crate) fn send(&mut self, to: SocketAddr, data: &[u8]) {
        if let Some((tcp, stats)) = self.tcp.as_mut() {
            if tcp.send_to(to, data, stats) {
                return;
            }
        }
        self.out.push(self.socket, to, data);
    }

    /// What str0m transmits: it knows the protocol (a TCP packet without its connection, one
    /// that closed, is dropped).
    fn transmit(&mut self, proto: Protocol, to: SocketAddr, data: &[u8]) {
        match (proto, self.tcp.as_mut()) {
            (Protocol::Udp, _) => self.out.push(self.socket, to, data),
            (_, Some((tcp, stats))) => {
                tcp.send_to(to, data, stats);
            }
            (_, None) => {}
        }
    }
}

impl Emit for Sink<'_> {
    fn emit(&mut self, to: SocketAddr, data: &[u8]) {
        self.send(to, data);
    }
}

/// Where an unrouted packet came in: the UDP socket, or a TCP connection's slot.
#[derive(Debug, Clone, Copy)]
enum Via {
    Udp,
    Tcp(usize),
}

/// What a media thread does with its peers' events.
pub(crate) trait PeerApp<T> {
    /// Handles one event; a returned reason ends the peer.
    fn on_event(&mut self, id: PeerId, peer: &mut Peer<T>, ev: Event) -> Option<CloseReason>;
    /// The peer has ended (after it was removed from the set).
    fn on_closed(&mut self, id: PeerId, peer: Peer<T>, reason: CloseReason);
}

pub(crate) struct PeerSet<T> {
    socket: UdpSocket,
    local: SocketAddr,
    poller: Poller,
    bell: Arc<Doorbell>,
    /// Boxed, so the table itself is small and stays in cache, and a peer's address is known
    /// from its entry before its lines are (the media thread prefetches them, see
    /// `edge::worker`'s `prefetch_ahead`).
    peers: HashMap<PeerId, Box<Peer<T>>, BuildHasherDefault<IdHasher>>,
    by_ufrag: HashMap<String, PeerId>,
    by_addr: HashMap<SocketAddr, PeerId>,
    /// (deadline, peer); an entry whose peer has since rescheduled is skipped when it pops.
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    out: SendBatch,
    due: Vec<PeerId>,
    stats: Arc<PeerStats>,
    /// The send batch's counters already added to `stats`.
    reported: (u64, u64, u64),
    buf: Vec<u8>,
    /// Where lean peers' packets are built and sealed.
    scratch: Vec<u8>,
    /// Peers the server ended, whose browsers' consent checks get a STUN error.
    ended: super::ended::EndedPeers,
    /// The ICE-TCP listener and its connections, when the thread has one.
    tcp: Option<TcpSide>,
    /// The TCP side may have events: the poller said so, or the thread did not sleep.
    tcp_check: bool,
    tcp_ready: Vec<usize>,
}

impl<T> PeerSet<T> {
    /// Takes the thread's socket; `bell` is rung by whoever queues work for the thread; the
    /// thread counts into `stats` (several threads may share one).
    pub(crate) fn new(
        socket: UdpSocket,
        bell: Arc<Doorbell>,
        stats: Arc<PeerStats>,
    ) -> std::io::Result<Self> {
        let local = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        let poller = Poller::new(&socket, bell.clone())?;
        Ok(PeerSet {
            socket,
            local,
            poller,
            bell,
            peers: HashMap::default(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            timers: BinaryHeap::new(),
            out: SendBatch::default(),
            due: Vec::new(),
            stats,
            reported: (0, 0, 0),
            buf: vec![0; 2048],
            scratch: Vec::with_capacity(2048),
            ended: super::ended::EndedPeers::default(),
            tcp: None,
            tcp_check: false,
            tcp_ready: Vec::new(),
        })
    }

    /// Adds the ICE-TCP side: its connections are read, written and expired by this set.
    pub(crate) fn with_tcp(mut self, tcp: Option<TcpSide>) -> std::io::Result<Self> {
        if let Some(t) = &tcp {
            self.poller.add_inner(&t.epoll)?;
            self.tcp_check = true;
        }
        self.tcp = tcp;
        Ok(self)
    }

    pub(crate) fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// Adds what the send batch counted since the last call to the shared stats.
    fn report_sends(&mut self) {
        let now = (self.out.sent, self.out.errors, self.out.syscalls);
        let before = std::mem::replace(&mut self.reported, now);
        let s = &self.stats;
        s.sent.fetch_add(now.0 - before.0, Ordering::Relaxed);
        s.send_errors.fetch_add(now.1 - before.1, Ordering::Relaxed);
        s.send_calls.fetch_add(now.2 - before.2, Ordering::Relaxed);
    }

    /// Adds an answered peer; `slot` is its place among the unconnected peers until it connects.
    pub(crate) fn insert(
        &mut self,
        id: PeerId,
        ufrag: String,
        rtc: Rtc,
        data: T,
        slot: ConnectSlot,
    ) {
        let now = Instant::now();
        self.by_ufrag.insert(ufrag.clone(), id);
        self.peers.insert(
            id,
            Box::new(Peer {
                rtc: Str0m(Some(Box::new(rtc))),
                lean: None,
                rtc_until: None,
                remote_ufrag: None,
                data,
                ufrag,
                added: now,
                connected: false,
                remotes: SmallVec::new(),
                window_start: now,
                window_count: 0,
                unverified_count: 0,
                dropped_flood: 0,
                slot: Some(slot),
                scheduled: Some(now),
                dest: None,
            }),
        );
        self.timers.push(Reverse((now, id)));
    }

    pub(crate) fn get(&self, id: PeerId) -> Option<&Peer<T>> {
        self.peers.get(&id).map(|p| &**p)
    }

    pub(crate) fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer<T>> {
        self.peers.get_mut(&id).map(|p| &mut **p)
    }

    /// A connected peer's data and the one way its packets leave.
    pub(crate) fn writer(&mut self, id: PeerId) -> Option<(&mut T, PeerOut<'_>)> {
        let p = self.peers.get_mut(&id).filter(|p| p.connected)?;
        let out = match (p.lean.as_deref_mut(), p.rtc.0.as_deref_mut()) {
            (Some(lean), _) => PeerOut::Lean {
                lean,
                sink: Sink::with_tcp(&self.socket, &mut self.out, &mut self.tcp, &self.stats),
                scratch: &mut self.scratch,
            },
            (None, Some(rtc)) => PeerOut::Str0m(rtc),
            (None, None) => return None,
        };
        Some((&mut p.data, out))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Ends a peer: flushes its DTLS close so the remote learns at once, then tells the app.
    pub(crate) fn close(&mut self, id: PeerId, reason: CloseReason, app: &mut impl PeerApp<T>) {
        let Some(mut p) = self.peers.remove(&id) else {
            return;
        };
        // Only the mappings that point at this peer: another peer's are not this one's to end.
        if self.by_ufrag.get(&p.ufrag) == Some(&id) {
            self.by_ufrag.remove(&p.ufrag);
        }
        for a in &p.remotes {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        self.stats.closed(reason);
        // Ended here, the browser may not know: its next consent check is told (see
        // `super::ended`). The ICE password is the peer's own, not a secret of anyone else.
        if reason == CloseReason::Removed {
            let now = Instant::now();
            if let Some(lean) = p.lean.as_deref() {
                let (u, pwd) = lean.local_ice();
                self.ended.remember(u, pwd, now);
            } else if let Some(rtc) = p.rtc.get_mut() {
                let creds = rtc.direct_api().local_ice_credentials();
                self.ended.remember(&creds.ufrag, &creds.pass, now);
            }
        }
        let mut sink = Sink::with_tcp(&self.socket, &mut self.out, &mut self.tcp, &self.stats);
        if let Some(rtc) = p.rtc.get_mut() {
            rtc.disconnect();
            while let Ok(Output::Transmit(t)) = rtc.poll_output() {
                sink.transmit(t.proto, t.destination, &t.contents);
            }
        }
        if let Some(lean) = p.lean.as_deref_mut() {
            lean.bye(&mut self.scratch, &mut sink);
        }
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.peer_closed(id.0);
        }
        info!(%id, %reason, dropped_flood = p.dropped_flood, "peer closed");
        app.on_closed(id, *p, reason);
    }

    /// Sends what the peers queued, then sleeps until a datagram arrives, the doorbell rings
    /// or `wait` passes. `has_work` is asked once more after the doorbell is armed, so work
    /// queued just before the sleep is never left waiting.
    pub(crate) fn wait(&mut self, wait: Duration, has_work: impl FnOnce() -> bool) {
        self.out.flush(&self.socket);
        self.report_sends();
        let has_tcp = match self.tcp.as_mut() {
            Some(tcp) => {
                tcp.flush();
                true
            }
            None => false,
        };
        // Without a sleep in epoll nobody looked at the TCP side: the next `recv` does.
        self.tcp_check = has_tcp;
        if wait.is_zero() {
            return;
        }
        self.bell.arm();
        if has_work() {
            self.bell.disarm();
            return;
        }
        self.tcp_check = self.poller.wait(wait) && has_tcp;
    }

    /// Routes the datagrams waiting on the socket (up to a burst). Returns how many there were.
    pub(crate) fn recv(&mut self, app: &mut impl PeerApp<T>) -> usize {
        let mut buf = std::mem::take(&mut self.buf);
        let mut n = 0;
        while n < RECV_BURST {
            match self.socket.recv_from(&mut buf) {
                Ok((len, from)) => {
                    n += 1;
                    self.datagram(&buf[..len], from, app);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => {
                    // ICMP port unreachable surfaces here on Linux; it concerns one peer only.
                    debug!("udp recv: {e}");
                    n += 1;
                }
            }
        }
        self.buf = buf;
        if self.tcp_check {
            self.tcp_check = false;
            n += self.recv_tcp(app);
        }
        n
    }

    /// Accepts, reads and writes the TCP connections that are ready; returns the frames read.
    fn recv_tcp(&mut self, app: &mut impl PeerApp<T>) -> usize {
        let Some(tcp) = self.tcp.as_mut() else {
            return 0;
        };
        let mut ready = std::mem::take(&mut self.tcp_ready);
        tcp.poll_ready(Instant::now(), &self.stats.tcp, &mut ready);
        let mut buf = std::mem::take(&mut self.buf);
        let mut n = 0;
        for &slot in &ready {
            for _ in 0..TcpSide::read_burst() {
                let Some(tcp) = self.tcp.as_mut() else { break };
                match tcp.next_frame(slot, &mut buf, &self.stats.tcp) {
                    Frame::Got(len) => {
                        n += 1;
                        self.tcp_frame(slot, &buf[..len], app);
                    }
                    Frame::Pending | Frame::Closed => break,
                }
            }
            if let Some(tcp) = self.tcp.as_mut() {
                tcp.writable(slot);
            }
        }
        self.buf = buf;
        ready.clear();
        self.tcp_ready = ready;
        n
    }

    /// One frame from a TCP connection: its peer's, or, for the first, the STUN request that
    /// makes it a peer's (anything else closes the connection).
    fn tcp_frame(&mut self, slot: usize, data: &[u8], app: &mut impl PeerApp<T>) {
        let Some((from, peer)) = self.tcp.as_ref().and_then(|t| t.route(slot)) else {
            return;
        };
        let attached = self.route(data, from, Via::Tcp(slot), peer.map(PeerId), app);
        if peer.is_none() && !attached {
            if let Some(tcp) = self.tcp.as_mut() {
                tcp.refuse(slot, &self.stats.tcp);
            }
        }
    }

    fn datagram(&mut self, data: &[u8], from: SocketAddr, app: &mut impl PeerApp<T>) {
        let known = self.by_addr.get(&from).copied();
        self.route(data, from, Via::Udp, known, app);
    }

    /// Routes one packet from `from` to the peer `known` (its address or connection is that
    /// peer's), or, when unknown, to the peer a STUN request's ufrag names if that peer
    /// accepts it; the address (UDP) or connection (TCP) is then routed to it. True if an
    /// unknown sender was routed so.
    fn route(
        &mut self,
        data: &[u8],
        from: SocketAddr,
        via: Via,
        known: Option<PeerId>,
        app: &mut impl PeerApp<T>,
    ) -> bool {
        let Ok(contents) = data.try_into() else {
            // Neither STUN, DTLS, RTP nor RTCP: nobody's.
            self.count_unroutable(from);
            return false;
        };
        let now = Instant::now();
        let (proto, destination) = match (via, self.tcp.as_ref()) {
            (Via::Tcp(_), Some(t)) => (Protocol::Tcp, t.local),
            _ => (Protocol::Udp, self.local),
        };
        let input = Input::Receive(
            now,
            Receive {
                proto,
                source: from,
                destination,
                contents,
            },
        );
        let (id, routed) = match known {
            Some(id) => (id, true),
            None => {
                let by_ufrag = StunMessage::parse(data)
                    .ok()
                    .and_then(|m| m.split_username().map(|(local, _)| local.to_owned()))
                    .and_then(|ufrag| self.by_ufrag.get(&ufrag).copied());
                let Some(id) = by_ufrag else {
                    let mut reply = [0u8; 128];
                    if let (Via::Udp, Some(n)) = (via, self.ended.answer(data, now, &mut reply)) {
                        self.out.push(&self.socket, from, &reply[..n]);
                        self.stats.stun_ended.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    self.count_unroutable(from);
                    return false;
                };
                (id, false)
            }
        };
        let Some(p) = self.peers.get_mut(&id) else {
            return false;
        };
        if now.duration_since(p.window_start) >= Duration::from_secs(1) {
            p.window_start = now;
            p.window_count = 0;
            p.unverified_count = 0;
        }
        if !routed {
            // A new address: only a binding request that str0m accepts for this peer (its
            // ufrags, and MESSAGE-INTEGRITY keyed with its ICE password) may route it here. An
            // address routed to a live peer never gets here, so it cannot be taken over. Anyone
            // who saw the ufrag can send these: they have their own budget, not the peer's.
            p.unverified_count += 1;
            let accepted = match (p.lean.as_deref(), p.rtc.0.as_deref()) {
                (Some(lean), _) => lean.accepts_stun(data),
                (None, Some(rtc)) => rtc.accepts(&input),
                (None, None) => false,
            };
            if p.unverified_count > MAX_UNVERIFIED_STUN_PER_SEC || !accepted {
                let n = self.stats.stun_refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(%id, %from, refused = n, "STUN for a peer from a new address refused (integrity, ufrag or budget)");
                }
                return false;
            }
            match via {
                Via::Udp => {
                    if p.remotes.len() >= MAX_REMOTES {
                        let old = p.remotes.remove(0);
                        if self.by_addr.get(&old) == Some(&id) {
                            self.by_addr.remove(&old);
                        }
                    }
                    p.remotes.push(from);
                    self.by_addr.insert(from, id);
                }
                Via::Tcp(slot) => {
                    if let Some(tcp) = self.tcp.as_mut() {
                        tcp.attach(slot, id.0);
                    }
                }
            }
            if p.remote_ufrag.is_none() {
                p.remote_ufrag = StunMessage::parse(data)
                    .ok()
                    .and_then(|m| m.split_username().map(|(_, remote)| remote.to_owned()));
            }
        } else {
            p.window_count += 1;
            if p.window_count > MAX_DATAGRAMS_PER_SEC {
                p.dropped_flood += 1;
                self.stats.flood_drops.fetch_add(1, Ordering::Relaxed);
                if p.dropped_flood.is_power_of_two() {
                    warn!(%id, dropped = p.dropped_flood, "peer floods: datagrams over budget dropped");
                }
                return false;
            }
        }
        if p.lean.is_some() {
            self.lean_datagram(id, now, input, from, data, app);
        } else {
            self.drive(id, input, app);
        }
        !routed
    }

    /// A datagram for a lean peer: STUN and SRTCP are the lean state's, DTLS str0m's while it
    /// is kept (an alert after that ends the peer); anything else is counted and dropped.
    fn lean_datagram(
        &mut self,
        id: PeerId,
        now: Instant,
        input: Input<'_>,
        from: SocketAddr,
        data: &[u8],
        app: &mut impl PeerApp<T>,
    ) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(lean) = p.lean.as_deref_mut() else {
            return;
        };
        let stats = &self.stats.lean;
        let mut sink = Sink::with_tcp(&self.socket, &mut self.out, &mut self.tcp, &self.stats);
        match data[0] {
            0..=3 => {
                lean.handle_stun(now, from, data, stats, &mut sink);
            }
            20..=63 if p.rtc.is_some() => {
                self.drive(id, input, app);
                return;
            }
            20..=63 => {
                if let Some(Ended::Closed) = lean.handle_dtls(data, stats) {
                    self.close(id, CloseReason::RemoteClosed, app);
                }
                return;
            }
            128..=191 if data.len() > 1 && (192..=223).contains(&data[1]) => {
                let authentic = lean.handle_rtcp(data, &mut self.scratch, stats, &mut sink);
                // Its SRTCP keys come from the handshake's end: the viewer has str0m's last
                // flight, so the grace (kept for its retransmissions) can end now.
                if authentic && p.rtc_until.is_some_and(|t| t > now) {
                    p.rtc_until = Some(now);
                }
            }
            _ => {
                stats.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
        Self::schedule(&mut self.timers, id, p, lean_deadline(p));
    }

    /// Pushes `t` into the timer heap unless the peer already waits for an earlier one.
    fn schedule(
        timers: &mut BinaryHeap<Reverse<(Instant, PeerId)>>,
        id: PeerId,
        p: &mut Peer<T>,
        t: Option<Instant>,
    ) {
        if let Some(t) = t {
            if p.scheduled.is_none_or(|s| t < s) {
                p.scheduled = Some(t);
                timers.push(Reverse((t, id)));
            }
        }
    }

    /// A lean peer's timer: its reports and consent deadline; str0m's end of grace; str0m's
    /// own timeout while it is kept.
    fn lean_timeout(&mut self, id: PeerId, now: Instant, app: &mut impl PeerApp<T>) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(lean) = p.lean.as_deref_mut() else {
            return;
        };
        if p.rtc_until.is_some_and(|t| now >= t) {
            if let Some(rtc) = p.rtc.0.take() {
                reap(rtc);
            }
            p.rtc_until = None;
            self.stats
                .lean_str0m_dropped
                .fetch_add(1, Ordering::Relaxed);
            debug!(%id, "lean peer: str0m state dropped");
        }
        let mut sink = Sink::with_tcp(&self.socket, &mut self.out, &mut self.tcp, &self.stats);
        if let Err(e) = lean.handle_timeout(now, &mut self.scratch, &self.stats.lean, &mut sink) {
            let reason = match e {
                Ended::ConsentExpired => CloseReason::IceTimeout,
                Ended::Closed => CloseReason::RemoteClosed,
            };
            self.close(id, reason, app);
            return;
        }
        if p.rtc.is_some() {
            self.drive(id, Input::Timeout(now), app);
        } else {
            Self::schedule(&mut self.timers, id, p, lean_deadline(p));
        }
    }

    fn count_unroutable(&self, from: SocketAddr) {
        let n = self.stats.unroutable.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            debug!(%from, count = n, "datagram for no known peer dropped");
        }
    }

    /// Drives the peers whose timeout is due; returns the earliest deadline still pending.
    /// A peer that asks to be driven again at once waits for the next call.
    pub(crate) fn timeouts(&mut self, now: Instant, app: &mut impl PeerApp<T>) -> Option<Instant> {
        let mut due = std::mem::take(&mut self.due);
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(p) = self.peers.get_mut(&id) {
                if p.scheduled == Some(at) {
                    p.scheduled = None;
                    due.push(id);
                }
            }
        }
        for &id in &due {
            if self.peers.get(&id).is_some_and(|p| p.lean.is_some()) {
                self.lean_timeout(id, now, app);
            } else {
                self.drive(id, Input::Timeout(now), app);
            }
        }
        due.clear();
        self.due = due;
        let next = self.timers.peek().map(|Reverse((at, _))| *at);
        match self.tcp.as_mut() {
            Some(tcp) => {
                tcp.expire(now, &self.stats.tcp);
                match (next, tcp.next_deadline()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            None => next,
        }
    }

    /// Sends what a peer has queued (after the app wrote RTP to it). str0m releases a stream's
    /// very first packet only on the timeout after the one that queued it, hence two.
    pub(crate) fn flush(&mut self, id: PeerId, app: &mut impl PeerApp<T>) {
        let now = Instant::now();
        self.drive(id, Input::Timeout(now), app);
        self.drive(id, Input::Timeout(now + Duration::from_micros(1)), app);
    }

    /// Feeds one input and drains output; returns the peer's next timeout.
    pub(crate) fn drive(
        &mut self,
        id: PeerId,
        input: Input<'_>,
        app: &mut impl PeerApp<T>,
    ) -> Option<Instant> {
        let p = self.peers.get_mut(&id)?;
        let rtc = p.rtc.0.as_deref_mut()?;
        if let Err(e) = rtc.handle_input(input) {
            warn!(%id, "peer input failed: {e}");
            self.close(id, CloseReason::Failed, app);
            return None;
        }
        let mut end = None;
        let timeout = loop {
            let Some(rtc) = p.rtc.0.as_deref_mut() else {
                break None;
            };
            if !rtc.is_alive() {
                end = Some(CloseReason::RemoteClosed);
                break None;
            }
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break Some(t),
                // Once lean, str0m speaks only DTLS: RTCP and consent are the lean state's.
                Ok(Output::Transmit(t)) if p.lean.is_some() => {
                    if matches!(t.contents.first(), Some(20..=63)) {
                        Sink::with_tcp(&self.socket, &mut self.out, &mut self.tcp, &self.stats)
                            .transmit(t.proto, t.destination, &t.contents)
                    }
                }
                Ok(Output::Transmit(t)) => {
                    p.dest = Some(t.destination);
                    Sink::with_tcp(&self.socket, &mut self.out, &mut self.tcp, &self.stats)
                        .transmit(t.proto, t.destination, &t.contents)
                }
                Ok(Output::Event(ev)) => {
                    let r = match ev {
                        Event::Connected => {
                            p.connected = true;
                            p.slot = None;
                            let r = app.on_event(id, p, Event::Connected);
                            info!(%id, lean = p.lean.is_some(), "peer connected");
                            if p.lean.is_some() {
                                self.stats.lean_switched.fetch_add(1, Ordering::Relaxed);
                            }
                            r
                        }
                        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                            Some(CloseReason::IceTimeout)
                        }
                        Event::Closed => Some(CloseReason::RemoteClosed),
                        ev => app.on_event(id, p, ev),
                    };
                    if r.is_some() {
                        end = r;
                        break None;
                    }
                }
                Err(e) => {
                    warn!(%id, "peer failed: {e}");
                    end = Some(CloseReason::Failed);
                    break None;
                }
            }
        };
        if !p.connected && p.added.elapsed() > CONNECT_TIMEOUT {
            end = Some(CloseReason::ConnectTimeout);
        }
        if let Some(reason) = end {
            self.close(id, reason, app);
            return None;
        }
        // A connecting peer is looked at again at its connect deadline even if str0m sleeps.
        let timeout = match timeout {
            Some(t) if !p.connected => Some(t.min(p.added + CONNECT_TIMEOUT)),
            t => t,
        };
        // A lean peer in its grace also wakes for its reports, consent and the grace's end.
        let timeout = match (timeout, lean_deadline(p)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self::schedule(&mut self.timers, id, p, timeout);
        timeout
    }
}

/// When a lean peer next needs its timer: its own deadline, or str0m's end of grace.
fn lean_deadline<T>(p: &Peer<T>) -> Option<Instant> {
    let lean = p.lean.as_deref()?.poll_timeout();
    Some(p.rtc_until.map_or(lean, |g| g.min(lean)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::ice::TransId;
    use str0m::media::{Direction, MediaKind};
    use str0m::net::Protocol;

    struct NoApp;
    impl PeerApp<()> for NoApp {
        fn on_event(&mut self, _: PeerId, _: &mut Peer<()>, _: Event) -> Option<CloseReason> {
            None
        }
        fn on_closed(&mut self, _: PeerId, _: Peer<()>, _: CloseReason) {}
    }

    fn sdp_value<'a>(sdp: &'a str, key: &str) -> &'a str {
        sdp.lines()
            .find_map(|l| l.trim_end().strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {sdp}"))
    }

    /// A peer answered on `set`: (its id, "server:client" ufrags, its ICE password).
    fn answered(set: &mut PeerSet<()>, id: u64) -> (PeerId, String, String) {
        let mut client = RtcConfig::new().build(Instant::now());
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, _) = api.apply().unwrap();
        let offer = offer.to_sdp_string();
        let (rtc, ufrag, answer) = answer_offer(&offer, media_config(), set.local, None).unwrap();
        let user = format!("{ufrag}:{}", sdp_value(&offer, "a=ice-ufrag:"));
        let pwd = sdp_value(&answer, "a=ice-pwd:").to_owned();
        let slot = ConnectSlot::acquire().unwrap();
        set.insert(PeerId(id), ufrag, rtc, (), slot);
        (PeerId(id), user, pwd)
    }

    fn binding_request(user: &str, pwd: &str) -> Vec<u8> {
        let hmac = |k: &[u8], p: &[&[u8]]| {
            str0m::crypto::from_feature_flags()
                .sha1_hmac_provider
                .sha1_hmac(k, p)
        };
        let mut buf = vec![0u8; 512];
        let msg = StunMessage::binding_request(user, TransId::new(), true, 7, 100, false);
        let n = msg.to_bytes(Some(pwd.as_bytes()), &mut buf, hmac).unwrap();
        buf.truncate(n);
        buf
    }

    fn set() -> PeerSet<()> {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        PeerSet::new(socket, Doorbell::new().unwrap(), Arc::default()).unwrap()
    }

    #[test]
    fn only_stun_with_the_peers_integrity_routes_an_address() {
        let mut set = set();
        let (id, user, pwd) = answered(&mut set, 1);
        let spoofer: SocketAddr = "127.0.0.9:4000".parse().unwrap();
        // The right ufrags, a wrong password: refused, counted, not routed.
        set.datagram(
            &binding_request(&user, "not-the-password-at-all"),
            spoofer,
            &mut NoApp,
        );
        assert_eq!(set.by_addr.get(&spoofer), None);
        assert_eq!(set.stats.stun_refused.load(Ordering::Relaxed), 1);
        // No integrity at all: the same.
        let hmac = |_: &[u8], _: &[&[u8]]| [0u8; 20];
        let mut buf = vec![0u8; 512];
        let n = StunMessage::binding_request(&user, TransId::new(), true, 7, 100, false)
            .to_bytes(None, &mut buf, hmac)
            .unwrap();
        set.datagram(&buf[..n], spoofer, &mut NoApp);
        assert_eq!(set.by_addr.get(&spoofer), None);
        let refused = |s: &PeerStats| {
            s.stun_refused.load(Ordering::Relaxed) + s.unroutable.load(Ordering::Relaxed)
        };
        assert_eq!(refused(&set.stats), 2);
        // The peer's own check: routed.
        let honest: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        set.datagram(&binding_request(&user, &pwd), honest, &mut NoApp);
        assert_eq!(set.by_addr.get(&honest), Some(&id));
        assert!(set.peers[&id].remotes.contains(&honest));
        // Non-STUN from an unknown address goes nowhere.
        set.datagram(
            &[0x80, 0x60, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
            spoofer,
            &mut NoApp,
        );
        assert_eq!(refused(&set.stats), 3);
        assert_eq!(set.by_addr.len(), 1);
    }

    #[test]
    fn unverified_stun_has_its_own_budget_and_leaves_the_peers_alone() {
        let mut set = set();
        let (id, user, pwd) = answered(&mut set, 1);
        let honest: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        set.datagram(&binding_request(&user, &pwd), honest, &mut NoApp);
        let bad = binding_request(&user, "wrong-password-wrong-password");
        for i in 0..(MAX_UNVERIFIED_STUN_PER_SEC + 50) {
            let from = SocketAddr::new([127, 0, 0, 9].into(), 1000 + i as u16);
            set.datagram(&bad, from, &mut NoApp);
        }
        assert_eq!(
            set.stats.stun_refused.load(Ordering::Relaxed),
            (MAX_UNVERIFIED_STUN_PER_SEC + 50) as u64
        );
        let p = &set.peers[&id];
        assert_eq!(p.window_count, 0, "the peer's own budget is untouched");
        assert_eq!(p.remotes.as_slice(), &[honest]);
        assert_eq!(set.by_addr.len(), 1);
    }

    #[test]
    fn a_routed_address_is_not_taken_over_and_a_close_removes_only_its_own() {
        let mut set = set();
        let (a, user_a, pwd_a) = answered(&mut set, 1);
        let (b, user_b, pwd_b) = answered(&mut set, 2);
        let shared: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        set.datagram(&binding_request(&user_a, &pwd_a), shared, &mut NoApp);
        // B's own, valid check from A's address (a spoofed source): A keeps it.
        set.datagram(&binding_request(&user_b, &pwd_b), shared, &mut NoApp);
        // (It came from an address routed to A, so it went to A's str0m, which ignores it.)
        assert_eq!(set.by_addr.get(&shared), Some(&a));
        let other: SocketAddr = "127.0.0.3:5000".parse().unwrap();
        set.datagram(&binding_request(&user_b, &pwd_b), other, &mut NoApp);
        assert_eq!(set.by_addr.get(&other), Some(&b));
        // Even if B remembered A's address, closing B leaves A's route and ufrag alone.
        set.peers.get_mut(&b).unwrap().remotes.push(shared);
        set.close(b, CloseReason::Removed, &mut NoApp);
        assert_eq!(set.by_addr.get(&shared), Some(&a));
        assert_eq!(set.by_addr.get(&other), None);
        assert!(set.by_ufrag.values().any(|v| *v == a));
        assert_eq!(set.stats.closed_removed.load(Ordering::Relaxed), 1);
    }

    /// Goes lean on `Connected` with the keys its handshake left, no tracks.
    struct LeanApp(Arc<crate::rtc::srtp_out::KeySlot>);
    impl PeerApp<()> for LeanApp {
        fn on_event(&mut self, _: PeerId, p: &mut Peer<()>, ev: Event) -> Option<CloseReason> {
            if let (Event::Connected, Some((km, profile, client))) = (ev, self.0.take()) {
                assert!(p.go_lean(&km, profile, client, [], Instant::now()));
            }
            None
        }
        fn on_closed(&mut self, _: PeerId, _: Peer<()>, _: CloseReason) {}
    }

    /// A real handshake over loopback with a str0m client, then the switch: str0m is kept
    /// for DTLS only until the grace ends, then dropped; the consent deadline, on the peer
    /// set's timer heap, ends the peer as an ICE timeout.
    #[test]
    fn a_lean_peer_drops_str0m_after_the_grace_and_ends_without_consent() {
        use crate::rtc::srtp_out::{tapping_provider, with_key_slot, KeySlot};
        let mut set = set();
        let keys = Arc::new(KeySlot::default());
        let client_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        client_sock.set_nonblocking(true).unwrap();
        let c_addr = client_sock.local_addr().unwrap();
        let t0 = Instant::now();
        let mut client = RtcConfig::new().set_rtp_mode(true).build(t0);
        client.add_local_candidate(Candidate::host(c_addr, "udp").unwrap());
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let config = media_config().set_crypto_provider(tapping_provider());
        let (rtc, ufrag, answer) = with_key_slot(keys.clone(), || {
            answer_offer(&offer.to_sdp_string(), config, set.local, None)
        })
        .unwrap();
        client
            .sdp_api()
            .accept_answer(
                pending,
                str0m::change::SdpAnswer::from_sdp_string(&answer).unwrap(),
            )
            .unwrap();
        set.insert(PeerId(1), ufrag, rtc, (), ConnectSlot::acquire().unwrap());
        let mut app = LeanApp(keys);
        let mut buf = [0u8; 2000];
        let deadline = t0 + Duration::from_secs(5);
        while !set.peers[&PeerId(1)].is_lean() {
            assert!(Instant::now() < deadline, "connects within 5 s");
            let now = Instant::now();
            client.handle_input(Input::Timeout(now)).unwrap();
            while let Ok(o) = client.poll_output() {
                match o {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        client_sock.send_to(&t.contents, t.destination).unwrap();
                    }
                    Output::Event(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(2));
            set.recv(&mut app);
            set.timeouts(Instant::now(), &mut app);
            set.wait(Duration::ZERO, || true);
            while let Ok((n, from)) = client_sock.recv_from(&mut buf) {
                let r = Receive {
                    proto: Protocol::Udp,
                    source: from,
                    destination: c_addr,
                    contents: (&buf[..n]).try_into().unwrap(),
                };
                client
                    .handle_input(Input::Receive(Instant::now(), r))
                    .unwrap();
            }
        }
        let switched = Instant::now();
        assert!(
            set.peers[&PeerId(1)].rtc.is_some(),
            "str0m kept for the grace"
        );
        assert_eq!(set.stats.lean_switched.load(Ordering::Relaxed), 1);
        set.timeouts(switched + DTLS_GRACE + Duration::from_millis(1), &mut app);
        assert!(
            !set.peers[&PeerId(1)].rtc.is_some(),
            "str0m dropped after the grace"
        );
        assert_eq!(set.stats.lean_str0m_dropped.load(Ordering::Relaxed), 1);
        // Nothing on the wire that a lean peer takes (not STUN, not SRTCP): counted, dropped.
        let unexpected = set.stats.lean.unexpected.load(Ordering::Relaxed);
        set.lean_datagram(
            PeerId(1),
            Instant::now(),
            Input::Timeout(Instant::now()),
            c_addr,
            &[0x80, 111, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
            &mut app,
        );
        assert_eq!(
            set.stats.lean.unexpected.load(Ordering::Relaxed),
            unexpected + 1
        );
        set.timeouts(
            switched + crate::rtc::established::CONSENT_TIMEOUT + Duration::from_secs(1),
            &mut app,
        );
        assert!(set.peers.is_empty(), "consent expired");
        assert_eq!(set.stats.closed_ice_timeout.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn connect_slots_are_counted_until_dropped() {
        let before = ConnectSlot::gauges().0;
        let s = ConnectSlot::acquire().unwrap();
        assert!(ConnectSlot::gauges().0 > before || before >= max_unconnected());
        drop(s);
    }

    /// Found by fuzz/fuzz_targets/sdp_offer.rs (kept as its seed): str0m's PT negotiation
    /// panics ("Pt locked multiple times: 101") on this offer. It must be a refusal instead.
    #[test]
    fn an_offer_str0m_panics_on_is_refused() {
        let sdp = include_str!("../../fuzz/seeds/sdp_offer/crash-str0m-pt-locked-twice");
        let candidate = "127.0.0.1:4000".parse().unwrap();
        match answer_offer(sdp, media_config(), candidate, None) {
            Err(OfferError::Rejected(m)) => assert!(m.contains("Pt locked multiple times"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, u, _)| u)),
        }
    }

    /// Chrome offers `red/48000/2` (fmtp `111/111`) next to Opus: the answer takes it, so the
    /// publisher sends RED and a viewer gets it, and keeps in-band FEC on; an offer without RED
    /// gets plain Opus.
    #[test]
    fn red_is_answered_when_offered_and_in_band_fec_is_kept() {
        let chrome = include_str!("../../fuzz/seeds/sdp_offer/chrome_sendonly");
        let candidate = "127.0.0.1:4000".parse().unwrap();
        let answer = |sdp: &str| match answer_offer(sdp, media_config(), candidate, None) {
            Ok((_, _, answer)) => answer,
            Err(e) => panic!("{e}"),
        };
        let with = answer(chrome);
        assert!(with.contains("a=rtpmap:63 red/48000/2"), "{with}");
        assert!(with.contains("a=fmtp:63 111/111"), "{with}");
        let opus_fmtp = sdp_value(&with, "a=fmtp:111 ");
        assert!(opus_fmtp.contains("useinbandfec=1"), "{opus_fmtp}");
        let plain: String = chrome
            .lines()
            .filter(|l| !l.contains("red/48000") && !l.starts_with("a=fmtp:63 "))
            .map(|l| format!("{l}\r\n"))
            .collect::<String>()
            .replace(" 111 63 ", " 111 ");
        let without = answer(&plain);
        assert!(!without.contains("red/"), "{without}");
        assert!(sdp_value(&without, "a=fmtp:111 ").contains("useinbandfec=1"));
    }
}
