//! A media thread that owns one UDP socket and every WebRTC peer (str0m `Rtc`) on it.
//!
//! The control plane (signalling, WHIP) builds an `Rtc` from an offer with [`RtcHost::accept`]
//! and hands it over; from then on only this thread touches it. Datagrams are routed to peers by
//! the ICE ufrag in STUN requests, then by the remote address learned from them: no scan over
//! all peers. Each peer's events go to its [`PeerHandler`], called on this thread, which must not
//! block.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::ice::StunMessage;
use str0m::media::{KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc, RtcConfig};
use tracing::{debug, info, warn};

use super::offer::{check_offer, OfferError};

/// A peer that has not completed ICE + DTLS within this time is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on how long commands wait for the thread to notice them.
const MAX_WAIT: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

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

/// One incoming RTP packet, decrypted, with what the SDP says about it.
#[derive(Debug)]
pub struct MediaIn<'a> {
    pub mid: Mid,
    pub kind: MediaKind,
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub marker: bool,
    pub pt: u8,
    /// RFC 6464 level (0 loudest .. 127 silence) and V flag, when the extension was negotiated
    /// and present.
    pub audio_level: Option<u8>,
    pub voice: Option<bool>,
    pub payload: &'a [u8],
}

pub enum PeerEvent<'a> {
    Connected,
    Media(MediaIn<'a>),
    Closed(CloseReason),
}

/// Receives one peer's events on the media thread.
pub trait PeerHandler: Send + 'static {
    fn on_event(&mut self, peer: PeerId, ev: PeerEvent<'_>);
}

enum Cmd {
    Add {
        id: PeerId,
        ufrag: String,
        rtc: Box<Rtc>,
        handler: Box<dyn PeerHandler>,
    },
    Remove(PeerId),
    RequestKeyframe(PeerId, Mid),
}

#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Address the UDP socket binds (port 0 = any free port).
    pub bind: SocketAddr,
    /// Address put in ICE candidates when it differs from the bound one (NAT, 0.0.0.0 bind).
    pub public_ip: Option<IpAddr>,
}

/// Handle to the media thread. Cheap to clone.
#[derive(Clone)]
pub struct RtcHost {
    tx: Sender<Cmd>,
    candidate_addr: SocketAddr,
    next_id: Arc<AtomicU64>,
}

impl RtcHost {
    pub fn start(cfg: &HostConfig, name: &str) -> std::io::Result<RtcHost> {
        let socket = UdpSocket::bind(cfg.bind)?;
        let local = socket.local_addr()?;
        let ip = cfg.public_ip.unwrap_or(local.ip());
        if ip.is_unspecified() {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "media bound to an unspecified address: give --public-ip for the ICE candidates",
            ));
        }
        let candidate_addr = SocketAddr::new(ip, local.port());
        let (tx, rx) = mpsc::channel();
        let thread_name = format!("media-{name}");
        thread::Builder::new()
            .name(thread_name)
            .spawn(move || MediaLoop::new(socket, local, rx).run())?;
        info!(%local, candidate = %candidate_addr, "{name} media socket ready");
        Ok(RtcHost {
            tx,
            candidate_addr,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    pub fn candidate_addr(&self) -> SocketAddr {
        self.candidate_addr
    }

    /// Answers an offer with a new peer in `config` shape; the peer then lives on the media
    /// thread and reports to `handler`.
    pub fn accept(
        &self,
        offer_sdp: &str,
        config: RtcConfig,
        requirements: OfferRequirements,
        handler: Box<dyn PeerHandler>,
    ) -> Result<(PeerId, String), OfferError> {
        check_offer(offer_sdp, requirements)?;
        let offer = SdpOffer::from_sdp_string(offer_sdp)
            .map_err(|e| OfferError::Malformed(e.to_string()))?;
        let creds = IceCreds::new();
        let ufrag = creds.ufrag.clone();
        let mut rtc = config
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .set_local_ice_credentials(creds)
            .build(Instant::now());
        let cand = Candidate::host(self.candidate_addr, "udp")
            .map_err(|e| OfferError::Internal(e.to_string()))?;
        rtc.add_local_candidate(cand);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| OfferError::Rejected(e.to_string()))?;
        let id = PeerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.tx
            .send(Cmd::Add {
                id,
                ufrag,
                rtc: Box::new(rtc),
                handler,
            })
            .map_err(|_| OfferError::Internal("media thread is gone".into()))?;
        Ok((id, answer.to_sdp_string()))
    }

    pub fn remove(&self, id: PeerId) {
        let _ = self.tx.send(Cmd::Remove(id));
    }

    pub fn request_keyframe(&self, id: PeerId, mid: Mid) {
        let _ = self.tx.send(Cmd::RequestKeyframe(id, mid));
    }
}

/// What the offer must contain to be accepted.
#[derive(Debug, Clone, Copy)]
pub struct OfferRequirements {
    pub audio_send: bool,
}

struct Peer {
    rtc: Rtc,
    ufrag: String,
    handler: Box<dyn PeerHandler>,
    added: Instant,
    connected: bool,
    remote: Option<SocketAddr>,
}

struct MediaLoop {
    socket: UdpSocket,
    local: SocketAddr,
    rx: Receiver<Cmd>,
    peers: HashMap<PeerId, Peer>,
    by_ufrag: HashMap<String, PeerId>,
    by_addr: HashMap<SocketAddr, PeerId>,
    unroutable: u64,
}

impl MediaLoop {
    fn new(socket: UdpSocket, local: SocketAddr, rx: Receiver<Cmd>) -> Self {
        MediaLoop {
            socket,
            local,
            rx,
            peers: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            unroutable: 0,
        }
    }

    fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        let mut deadlines: Vec<(PeerId, Instant)> = Vec::new();
        loop {
            if !self.commands() {
                info!("media thread stopping: control plane gone");
                return;
            }
            let now = Instant::now();
            let mut next = now + MAX_WAIT;
            deadlines.clear();
            let ids: Vec<PeerId> = self.peers.keys().copied().collect();
            for id in ids {
                if let Some(t) = self.drive(id, Input::Timeout(now)) {
                    next = next.min(t);
                }
            }
            let wait = next
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = self.socket.set_read_timeout(Some(wait));
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => self.datagram(&buf[..n], from),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    // ICMP port unreachable surfaces here on Linux; it concerns one peer only.
                    debug!("udp recv: {e}");
                }
            }
        }
    }

    /// Applies pending commands; false when the control plane dropped every handle.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Cmd::Add {
                    id,
                    ufrag,
                    rtc,
                    handler,
                }) => {
                    self.by_ufrag.insert(ufrag.clone(), id);
                    self.peers.insert(
                        id,
                        Peer {
                            rtc: *rtc,
                            ufrag,
                            handler,
                            added: Instant::now(),
                            connected: false,
                            remote: None,
                        },
                    );
                }
                Ok(Cmd::Remove(id)) => self.close(id, CloseReason::Removed),
                Ok(Cmd::RequestKeyframe(id, mid)) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        let mut api = p.rtc.direct_api();
                        if let Some(rx) = api.stream_rx_by_mid(mid, None) {
                            rx.request_keyframe(KeyframeRequestKind::Pli);
                        }
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return !self.peers.is_empty(),
            }
        }
    }

    fn datagram(&mut self, data: &[u8], from: SocketAddr) {
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
        if let Some(p) = self.peers.get_mut(&id) {
            if p.remote != Some(from) {
                if let Some(old) = p.remote.replace(from) {
                    self.by_addr.remove(&old);
                }
                self.by_addr.insert(from, id);
            }
        }
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source: from,
                destination: self.local,
                contents,
            },
        );
        self.drive(id, input);
    }

    /// Feeds one input and drains output; returns the peer's next timeout.
    fn drive(&mut self, id: PeerId, input: Input<'_>) -> Option<Instant> {
        let p = self.peers.get_mut(&id)?;
        if let Err(e) = p.rtc.handle_input(input) {
            warn!(%id, "peer input failed: {e}");
            self.close(id, CloseReason::Failed);
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
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination) {
                        debug!(%id, "udp send: {e}");
                    }
                }
                Ok(Output::Event(ev)) => {
                    if let Some(reason) = on_event(id, p, ev) {
                        end = Some(reason);
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
            self.close(id, reason);
        }
        timeout
    }

    fn close(&mut self, id: PeerId, reason: CloseReason) {
        let Some(mut p) = self.peers.remove(&id) else {
            return;
        };
        self.by_ufrag.remove(&p.ufrag);
        if let Some(a) = p.remote {
            self.by_addr.remove(&a);
        }
        p.rtc.disconnect();
        // Flush the close (DTLS close_notify) so the remote learns at once.
        while let Ok(Output::Transmit(t)) = p.rtc.poll_output() {
            let _ = self.socket.send_to(&t.contents, t.destination);
        }
        info!(%id, %reason, "peer closed");
        p.handler.on_event(id, PeerEvent::Closed(reason));
    }
}

/// Handles one str0m event; returns a reason when the peer must end.
fn on_event(id: PeerId, p: &mut Peer, ev: Event) -> Option<CloseReason> {
    match ev {
        Event::Connected => {
            p.connected = true;
            info!(%id, "peer connected");
            p.handler.on_event(id, PeerEvent::Connected);
        }
        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
            return Some(CloseReason::IceTimeout);
        }
        Event::Closed => return Some(CloseReason::RemoteClosed),
        Event::RtpPacket(pkt) => {
            let ssrc = *pkt.header.ssrc;
            // A packet of an SSRC no m-line declares is not media we asked for.
            let (mid, kind) = p
                .rtc
                .direct_api()
                .stream_rx(&pkt.header.ssrc)
                .map(|s| s.mid())
                .and_then(|mid| p.rtc.media(mid).map(|m| (mid, m.kind())))?;
            let ext = &pkt.header.ext_vals;
            let media = MediaIn {
                mid,
                kind,
                ssrc,
                seq: pkt.header.sequence_number,
                ts: pkt.header.timestamp,
                marker: pkt.header.marker,
                pt: *pkt.header.payload_type,
                audio_level: ext.audio_level.map(|l| l.unsigned_abs().min(127)),
                voice: ext.voice_activity,
                payload: &pkt.payload,
            };
            p.handler.on_event(id, PeerEvent::Media(media));
        }
        _ => {}
    }
    None
}
