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
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use str0m::change::SdpOffer;
use str0m::config::DtlsCert;
use str0m::ice::StunMessage;
use str0m::net::{Protocol, Receive};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc, RtcConfig};
use tracing::{debug, info, warn};

use super::offer::OfferError;
use super::udp::{Doorbell, Poller, SendBatch};

/// A peer that has not completed ICE + DTLS within this time is dropped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Datagrams one peer may send per second before the excess is dropped. A viewer sends a few
/// RTCP reports and consent checks per second; a publisher 50-100 media packets per track.
pub const MAX_DATAGRAMS_PER_SEC: u32 = 2000;
/// Remote addresses remembered per peer (one per candidate pair the browser tries).
const MAX_REMOTES: usize = 8;
/// Datagrams read from the socket in one go before the thread looks at its other work.
const RECV_BURST: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// Hashes a `PeerId` with one multiplication: ids are trusted, sequential numbers, and the peer
/// table is looked up for every packet of every viewer (SipHash was a visible share of it).
#[derive(Default)]
pub struct IdHasher(u64);

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
pub enum CloseReason {
    /// The control plane removed it (unpublish, replaced, signalling closed).
    Removed,
    /// ICE never completed, or consent checks stopped arriving.
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
            CloseReason::IceTimeout => "ICE timeout",
            CloseReason::RemoteClosed => "closed by remote",
            CloseReason::Failed => "failed",
        })
    }
}

/// Answers an offer with a new ICE-lite, RTP-mode peer whose only candidate is `candidate`.
/// Runs on the control plane; the returned `Rtc` is then handed to a media thread.
pub fn answer_offer(
    offer_sdp: &str,
    config: RtcConfig,
    candidate: SocketAddr,
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

/// What every chorus peer negotiates: Opus, VP8 and H264, and only the header extensions it
/// uses. No transport-cc or abs-send-time: with them, Chrome probes bandwidth with padding-only
/// packets on the audio SSRC (whose sequence numbers read as loss downstream once the padding is
/// dropped), and each negotiated extension is written into every packet sent.
pub fn media_config() -> RtcConfig {
    RtcConfig::new()
        .clear_codecs()
        .enable_opus(true, false)
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
pub fn shared_dtls_cert() -> Option<&'static DtlsCert> {
    static CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();
    CERT.get_or_init(|| {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    })
    .as_ref()
}

pub struct Peer<T> {
    /// Boxed: str0m's state is about 10 KiB, and the peer table is walked per packet.
    pub rtc: Box<Rtc>,
    pub data: T,
    ufrag: String,
    added: Instant,
    pub connected: bool,
    /// Every address this peer's STUN came from: a browser checks several candidate pairs
    /// and may move media between them, so all stay routable, not just the latest.
    remotes: SmallVec<[SocketAddr; 4]>,
    /// Input budget: datagrams taken in the current one-second window.
    window_start: Instant,
    window_count: u32,
    pub dropped_flood: u64,
    /// The deadline this peer has in the timer heap (the earliest one pushed and not yet due).
    scheduled: Option<Instant>,
    /// Where str0m last sent to this peer: the selected candidate pair's remote address.
    pub dest: Option<SocketAddr>,
}

/// The thread's socket and send batch, for datagrams built outside str0m.
pub struct Sink<'a> {
    socket: &'a UdpSocket,
    out: &'a mut SendBatch,
}

impl<'a> Sink<'a> {
    pub fn new(socket: &'a UdpSocket, out: &'a mut SendBatch) -> Self {
        Sink { socket, out }
    }

    pub fn send(&mut self, to: SocketAddr, data: &[u8]) {
        self.out.push(self.socket, to, data);
    }
}

/// What a media thread does with its peers' events.
pub trait PeerApp<T> {
    /// Handles one event; a returned reason ends the peer.
    fn on_event(&mut self, id: PeerId, peer: &mut Peer<T>, ev: Event) -> Option<CloseReason>;
    /// The peer has ended (after it was removed from the set).
    fn on_closed(&mut self, id: PeerId, peer: Peer<T>, reason: CloseReason);
}

pub struct PeerSet<T> {
    socket: UdpSocket,
    local: SocketAddr,
    poller: Poller,
    bell: Arc<Doorbell>,
    peers: HashMap<PeerId, Peer<T>, BuildHasherDefault<IdHasher>>,
    by_ufrag: HashMap<String, PeerId>,
    by_addr: HashMap<SocketAddr, PeerId>,
    /// (deadline, peer); an entry whose peer has since rescheduled is skipped when it pops.
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    out: SendBatch,
    due: Vec<PeerId>,
    pub unroutable: u64,
    /// Datagrams dropped over any peer's budget, since start.
    pub flood_drops: u64,
    buf: Vec<u8>,
}

impl<T> PeerSet<T> {
    /// Takes the thread's socket; `bell` is rung by whoever queues work for the thread.
    pub fn new(socket: UdpSocket, bell: Arc<Doorbell>) -> std::io::Result<Self> {
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
            unroutable: 0,
            flood_drops: 0,
            buf: vec![0; 2048],
        })
    }

    /// Datagrams sent, send errors, and `sendmmsg` calls, since start.
    pub fn send_stats(&self) -> (u64, u64, u64) {
        (self.out.sent, self.out.errors, self.out.syscalls)
    }

    pub fn insert(&mut self, id: PeerId, ufrag: String, rtc: Rtc, data: T) {
        let now = Instant::now();
        self.by_ufrag.insert(ufrag.clone(), id);
        self.peers.insert(
            id,
            Peer {
                rtc: Box::new(rtc),
                data,
                ufrag,
                added: now,
                connected: false,
                remotes: SmallVec::new(),
                window_start: now,
                window_count: 0,
                dropped_flood: 0,
                scheduled: Some(now),
                dest: None,
            },
        );
        self.timers.push(Reverse((now, id)));
    }

    pub fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer<T>> {
        self.peers.get_mut(&id)
    }

    /// A connected peer (ICE and DTLS up) together with the socket's send batch.
    pub fn connected_with_sink(&mut self, id: PeerId) -> Option<(&mut Peer<T>, Sink<'_>)> {
        let p = self.peers.get_mut(&id).filter(|p| p.connected)?;
        Some((p, Sink::new(&self.socket, &mut self.out)))
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn ids(&self) -> Vec<PeerId> {
        self.peers.keys().copied().collect()
    }

    /// Ends a peer: flushes its DTLS close so the remote learns at once, then tells the app.
    pub fn close(&mut self, id: PeerId, reason: CloseReason, app: &mut impl PeerApp<T>) {
        let Some(mut p) = self.peers.remove(&id) else {
            return;
        };
        self.by_ufrag.remove(&p.ufrag);
        for a in &p.remotes {
            self.by_addr.remove(a);
        }
        p.rtc.disconnect();
        while let Ok(Output::Transmit(t)) = p.rtc.poll_output() {
            self.out.push(&self.socket, t.destination, &t.contents);
        }
        info!(%id, %reason, dropped_flood = p.dropped_flood, "peer closed");
        app.on_closed(id, p, reason);
    }

    /// Sends what the peers queued, then sleeps until a datagram arrives, the doorbell rings
    /// or `wait` passes. `has_work` is asked once more after the doorbell is armed, so work
    /// queued just before the sleep is never left waiting.
    pub fn wait(&mut self, wait: Duration, has_work: impl FnOnce() -> bool) {
        self.out.flush(&self.socket);
        if wait.is_zero() {
            return;
        }
        self.bell.arm();
        if has_work() {
            self.bell.disarm();
            return;
        }
        self.poller.wait(wait);
    }

    /// Routes the datagrams waiting on the socket (up to a burst). Returns how many there were.
    pub fn recv(&mut self, app: &mut impl PeerApp<T>) -> usize {
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
        n
    }

    fn datagram(&mut self, data: &[u8], from: SocketAddr, app: &mut impl PeerApp<T>) {
        let id = match self.by_addr.get(&from) {
            Some(&id) => Some(id),
            None => StunMessage::parse(data)
                .ok()
                .and_then(|m| m.split_username().map(|(local, _)| local.to_owned()))
                .and_then(|ufrag| self.by_ufrag.get(&ufrag).copied()),
        };
        let Some(id) = id else {
            self.unroutable += 1;
            if self.unroutable.is_power_of_two() {
                debug!(%from, count = self.unroutable, "datagram for no known peer dropped");
            }
            return;
        };
        let Ok(contents) = data.try_into() else {
            return;
        };
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(p.window_start) >= Duration::from_secs(1) {
            p.window_start = now;
            p.window_count = 0;
        }
        p.window_count += 1;
        if p.window_count > MAX_DATAGRAMS_PER_SEC {
            p.dropped_flood += 1;
            self.flood_drops += 1;
            if p.dropped_flood.is_power_of_two() {
                warn!(%id, dropped = p.dropped_flood, "peer floods: datagrams over budget dropped");
            }
            return;
        }
        if !p.remotes.contains(&from) {
            // Only STUN can introduce an address (it carries the ufrag); bound the set so a
            // peer cannot grow the routing table without end.
            if p.remotes.len() >= MAX_REMOTES {
                let old = p.remotes.remove(0);
                self.by_addr.remove(&old);
            }
            p.remotes.push(from);
            self.by_addr.insert(from, id);
        }
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source: from,
                destination: self.local,
                contents,
            },
        );
        self.drive(id, input, app);
    }

    /// Drives the peers whose timeout is due; returns the earliest deadline still pending.
    /// A peer that asks to be driven again at once waits for the next call.
    pub fn timeouts(&mut self, now: Instant, app: &mut impl PeerApp<T>) -> Option<Instant> {
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
            self.drive(id, Input::Timeout(now), app);
        }
        due.clear();
        self.due = due;
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Sends what a peer has queued (after the app wrote RTP to it). str0m releases a stream's
    /// very first packet only on the timeout after the one that queued it, hence two.
    pub fn flush(&mut self, id: PeerId, app: &mut impl PeerApp<T>) {
        let now = Instant::now();
        self.drive(id, Input::Timeout(now), app);
        self.drive(id, Input::Timeout(now + Duration::from_micros(1)), app);
    }

    /// Feeds one input and drains output; returns the peer's next timeout.
    pub fn drive(
        &mut self,
        id: PeerId,
        input: Input<'_>,
        app: &mut impl PeerApp<T>,
    ) -> Option<Instant> {
        let p = self.peers.get_mut(&id)?;
        if let Err(e) = p.rtc.handle_input(input) {
            warn!(%id, "peer input failed: {e}");
            self.close(id, CloseReason::Failed, app);
            return None;
        }
        let mut end = None;
        let timeout = loop {
            if !p.rtc.is_alive() {
                end = Some(CloseReason::RemoteClosed);
                break None;
            }
            match p.rtc.poll_output() {
                Ok(Output::Timeout(t)) => break Some(t),
                Ok(Output::Transmit(t)) => {
                    p.dest = Some(t.destination);
                    self.out.push(&self.socket, t.destination, &t.contents)
                }
                Ok(Output::Event(ev)) => {
                    let r = match ev {
                        Event::Connected => {
                            p.connected = true;
                            info!(%id, "peer connected");
                            app.on_event(id, p, Event::Connected)
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
            end = Some(CloseReason::IceTimeout);
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
        if let Some(t) = timeout {
            if p.scheduled.is_none_or(|s| t < s) {
                p.scheduled = Some(t);
                self.timers.push(Reverse((t, id)));
            }
        }
        timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/fuzz_targets/sdp_offer.rs (kept as its seed): str0m's PT negotiation
    /// panics ("Pt locked multiple times: 101") on this offer. It must be a refusal instead.
    #[test]
    fn an_offer_str0m_panics_on_is_refused() {
        let sdp = include_str!("../../fuzz/seeds/sdp_offer/crash-str0m-pt-locked-twice");
        let candidate = "127.0.0.1:4000".parse().unwrap();
        match answer_offer(sdp, media_config(), candidate) {
            Err(OfferError::Rejected(m)) => assert!(m.contains("Pt locked multiple times"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, u, _)| u)),
        }
    }
}
