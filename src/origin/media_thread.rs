//! The origin's media thread: one UDP socket and every publisher peer on it.
//!
//! The control plane answers an offer with [`MediaThread::accept`] and hands the peer over; from then
//! on only this thread touches it. Each peer's events go to its [`PeerHandler`], called on this
//! thread, which must not block.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::media::{KeyframeRequestKind, MediaKind, Mid};
use str0m::{Event, Rtc, RtcConfig};
use tracing::{debug, info};

use crate::net::poll::Doorbell;
use crate::rtc::offer::{check_offer, OfferError, OfferRequirements};
use crate::rtc::peers::{
    answer_offer, CloseReason, ConnectSlot, Peer, PeerApp, PeerId, PeerSet, PeerStats,
};
use crate::rtc::supervise::{spawn_media, Heartbeat};
use crate::rtc::tcp::{self, IceTcp, TcpSide};

/// Upper bound on how long commands wait for the thread to notice them.
const MAX_WAIT: Duration = Duration::from_millis(5);

/// One incoming RTP packet, decrypted, with what the SDP says about it.
#[derive(Debug)]
pub(crate) struct MediaIn<'a> {
    pub kind: MediaKind,
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub marker: bool,
    pub pt: u8,
    /// When `pt` is the RFC 2198 RED the publisher negotiated: the payload type of the codec
    /// (Opus) its blocks carry.
    pub red_of: Option<u8>,
    /// RFC 6464 level (0 loudest .. 127 silence) and V flag, when the extension was negotiated
    /// and present.
    pub audio_level: Option<u8>,
    pub voice: Option<bool>,
    pub payload: &'a [u8],
}

pub(crate) enum PeerEvent<'a> {
    Connected,
    Media(MediaIn<'a>),
    Closed(CloseReason),
}

/// Receives one peer's events on the media thread.
pub(crate) trait PeerHandler: Send + 'static {
    fn on_event(&mut self, peer: PeerId, ev: PeerEvent<'_>);
}

enum MediaCmd {
    Add {
        id: PeerId,
        ufrag: String,
        rtc: Box<Rtc>,
        handler: Box<dyn PeerHandler>,
        slot: ConnectSlot,
    },
    Remove(PeerId),
    RequestKeyframe(PeerId, Mid),
}

#[derive(Debug, Clone)]
pub(crate) struct MediaThreadConfig {
    /// Address the UDP socket binds (port 0 = any free port).
    pub bind: SocketAddr,
    /// Address put in ICE candidates when it differs from the bound one (NAT, 0.0.0.0 bind).
    pub public_ip: Option<IpAddr>,
    /// The passive TCP candidate's listener (see `crate::rtc::tcp`).
    pub ice_tcp: IceTcp,
}

/// Handle to the media thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct MediaThread {
    tx: Sender<MediaCmd>,
    bell: Arc<Doorbell>,
    candidate_addr: SocketAddr,
    tcp_candidate: Option<SocketAddr>,
    next_id: Arc<AtomicU64>,
    stats: Arc<PeerStats>,
}

impl MediaThread {
    pub(crate) fn start(cfg: &MediaThreadConfig, name: &str) -> std::io::Result<MediaThread> {
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
        let bell = Doorbell::new()?;
        let stats = Arc::new(PeerStats::default());
        let (tcp, tcp_candidate) = match cfg.ice_tcp.bind(local, 0)? {
            Some(l) => {
                let addr = tcp::candidate_addr(&l, cfg.public_ip)?;
                (Some(TcpSide::new(l, addr)?), Some(addr))
            }
            None => (None, None),
        };
        let peers = PeerSet::new(socket, bell.clone(), stats.clone())?.with_tcp(tcp)?;
        spawn_media(thread_name, move |hb| run(peers, rx, &hb))?;
        info!(%local, candidate = %candidate_addr, tcp = ?tcp_candidate, "{name} media socket ready");
        Ok(MediaThread {
            tx,
            bell,
            candidate_addr,
            tcp_candidate,
            next_id: Arc::new(AtomicU64::new(1)),
            stats,
        })
    }

    /// The media thread's socket and peer counters.
    pub(crate) fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// Answers an offer with a new peer in `config` shape; the peer then lives on the media
    /// thread and reports to `handler`.
    pub(crate) fn accept(
        &self,
        offer_sdp: &str,
        config: RtcConfig,
        requirements: OfferRequirements,
        handler: Box<dyn PeerHandler>,
    ) -> Result<(PeerId, String), OfferError> {
        check_offer(offer_sdp, requirements)?;
        let slot = ConnectSlot::acquire()?;
        let (rtc, ufrag, answer) =
            answer_offer(offer_sdp, config, self.candidate_addr, self.tcp_candidate)?;
        let id = PeerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.tx
            .send(MediaCmd::Add {
                id,
                ufrag,
                rtc: Box::new(rtc),
                handler,
                slot,
            })
            .map_err(|_| OfferError::Internal("media thread is gone".into()))?;
        self.bell.ring();
        Ok((id, answer))
    }

    pub(crate) fn remove(&self, id: PeerId) {
        let _ = self.tx.send(MediaCmd::Remove(id));
        self.bell.ring();
    }

    pub(crate) fn request_keyframe(&self, id: PeerId, mid: Mid) {
        let _ = self.tx.send(MediaCmd::RequestKeyframe(id, mid));
        self.bell.ring();
    }
}

/// Routes str0m events to each publisher's handler.
struct Handlers {
    stats: Arc<PeerStats>,
}

impl PeerApp<Box<dyn PeerHandler>> for Handlers {
    fn on_event(
        &mut self,
        id: PeerId,
        p: &mut Peer<Box<dyn PeerHandler>>,
        ev: Event,
    ) -> Option<CloseReason> {
        match ev {
            Event::Connected => p.data.on_event(id, PeerEvent::Connected),
            Event::RtpPacket(pkt) => {
                // A packet of an SSRC no m-line declares is not media we asked for.
                let declared = p
                    .rtc
                    .direct_api()
                    .stream_rx(&pkt.header.ssrc)
                    .map(|s| s.mid())
                    .and_then(|mid| p.rtc.media(mid).map(|m| (mid, m.kind())));
                let Some((_, kind)) = declared else {
                    let n = self.stats.undeclared_ssrc.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        debug!(%id, ssrc = *pkt.header.ssrc, count = n, "RTP of an undeclared SSRC dropped");
                    }
                    return None;
                };
                let pt = pkt.header.payload_type;
                // A scan of the few negotiated codecs (chorus enables three).
                let red_of = (kind == MediaKind::Audio)
                    .then(|| p.rtc.codec_config().find(|c| c.red() == Some(pt)))
                    .flatten()
                    .map(|c| *c.pt());
                let ext = &pkt.header.ext_vals;
                let media = MediaIn {
                    kind,
                    ssrc: *pkt.header.ssrc,
                    seq: pkt.header.sequence_number,
                    ts: pkt.header.timestamp,
                    marker: pkt.header.marker,
                    pt: *pt,
                    red_of,
                    audio_level: ext.audio_level.map(|l| l.unsigned_abs().min(127)),
                    voice: ext.voice_activity,
                    payload: &pkt.payload,
                };
                p.data.on_event(id, PeerEvent::Media(media));
            }
            _ => {}
        }
        None
    }

    fn on_closed(&mut self, id: PeerId, mut p: Peer<Box<dyn PeerHandler>>, reason: CloseReason) {
        p.data.on_event(id, PeerEvent::Closed(reason));
    }
}

fn run(mut peers: PeerSet<Box<dyn PeerHandler>>, rx: Receiver<MediaCmd>, hb: &Heartbeat) {
    let mut app = Handlers {
        stats: peers.stats().clone(),
    };
    let mut next_cmd: Option<MediaCmd> = None;
    loop {
        hb.beat();
        loop {
            let cmd = match next_cmd.take().map_or_else(|| rx.try_recv(), Ok) {
                Ok(cmd) => cmd,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if peers.is_empty() {
                        info!("media thread stopping: control plane gone");
                        return;
                    }
                    break;
                }
            };
            match cmd {
                MediaCmd::Add {
                    id,
                    ufrag,
                    rtc,
                    handler,
                    slot,
                } => peers.insert(id, ufrag, *rtc, handler, slot),
                MediaCmd::Remove(id) => peers.close(id, CloseReason::Removed, &mut app),
                MediaCmd::RequestKeyframe(id, mid) => {
                    if let Some(p) = peers.get_mut(id) {
                        if let Some(rx) = p.rtc.direct_api().stream_rx_by_mid(mid, None) {
                            rx.request_keyframe(KeyframeRequestKind::Pli);
                        }
                    }
                    peers.flush(id, &mut app);
                }
            }
        }
        let now = Instant::now();
        let next = peers
            .timeouts(now, &mut app)
            .unwrap_or(now + MAX_WAIT)
            .min(now + MAX_WAIT);
        peers.wait(
            next.saturating_duration_since(Instant::now()),
            || match rx.try_recv() {
                Ok(cmd) => {
                    next_cmd = Some(cmd);
                    true
                }
                Err(TryRecvError::Empty) => false,
                Err(TryRecvError::Disconnected) => true,
            },
        );
        peers.recv(&mut app);
    }
}
