//! The edge: viewers' WebRTC sessions, fed from the origin over the relay through the packet
//! core. The control plane ([`Edge`]) answers offers and deals the peers out to the media threads
//! ([`worker`]), one per core by default: each owns its viewers, their socket and an edge core
//! ([`core`], sans-IO: one packet core per stream it serves, the viewers' groups and events), and
//! gets every relayed packet of those streams (one shared buffer).

pub(crate) mod board;
pub mod core;
pub(crate) mod events;
pub(crate) mod follow;
pub(crate) mod lanes;
#[cfg(feature = "tools")]
pub mod loopback;
pub(crate) mod stream_counts;
pub(crate) mod talking;
pub mod viewer;
pub(crate) mod worker;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::media::Mid;
use str0m::RtcConfig;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use crate::auth::jwt::JwtVerifier;
use crate::net::poll::Doorbell;
use crate::relay::client::{manage_link, AuthorizeAnswer, LinkConfig, LinkCtl, LinkHandler};
use crate::relay::proto::{DatagramHeader, SourceInfo};
use crate::rtc::offer::{check_offer, mlines, OfferError, OfferRequirements};
use crate::rtc::peers::{answer_offer, media_config, ConnectSlot, PeerId, PeerStats};
use crate::rtc::srtp_out::{tapping_provider, with_key_slot, KeySlot};
use crate::rtc::supervise::spawn_media;
use crate::rtc::tcp::{candidate_addr, IceTcp, TcpSide};
use worker::{EdgeCmd, NewViewer, Worker};

/// More multiplexed tracks than this in one offer is refused.
pub(crate) const MAX_TRACKS: usize = 16;
/// A view naming more excluded sourceIds than this is refused. An app excludes its own user's
/// source, or a few; each name is interned on a media thread while the view lasts, so this bounds
/// what one viewer holds there (with [`crate::millicast::MAX_SOURCE_ID`] bytes per name).
pub(crate) const MAX_EXCLUDED: usize = 64;

/// Relayed packets queued at most for one media thread: about 100 ms of 200 sources talking at
/// once (50 packets a second each). A full lane refuses the newest packet (counted as
/// `lane_full`): the thread is more than its bound behind, and what it still holds is older than
/// audio is worth; dropping the oldest instead would have the link's reader take from the media
/// thread's end of the queue, racing it, and could drop a source list.
pub(crate) const RELAY_LANE_PACKETS: usize = 1024;
/// Room kept in each media thread's lane beyond the packets, for commands (viewers, source lists,
/// link state) that must not be dropped for audio; a lane full even of those means the thread is
/// stuck, and the command is dropped, counted (`lane_control_full`) and logged.
pub(crate) const LANE_CONTROL_HEADROOM: usize = 1024;
/// Relayed audio older than this when its media thread takes it (time queued on the link, from
/// the origin's send stamp over the link's delay floor, plus time in the lane) is dropped and
/// counted (`stale`), never forwarded: late audio is worth less than a gap.
pub(crate) const MAX_RELAY_AGE: Duration = Duration::from_millis(100);

/// Counters the edge keeps for /metrics.
#[derive(Debug, Default)]
pub struct EdgeMetrics {
    /// Connected viewers now (a gauge).
    pub viewers: AtomicU64,
    /// Viewer offers answered since start.
    pub viewers_total: AtomicU64,
    /// Packets received from the origin.
    pub relay_packets: AtomicU64,
    /// Packets written to viewers' multiplexed tracks.
    pub packets_out: AtomicU64,
    /// Relayed packets of a source index the stream's `Sources` did not announce.
    pub dropped_unknown: AtomicU64,
    /// Relayed datagrams too short for RTP, or not valid RTP.
    pub dropped_malformed: AtomicU64,
    /// Relayed RED packets whose blocks do not parse (end-to-end encrypted, or broken): sent
    /// whole to viewers with RED, to no others (`media::red::RedLayout::opaque`).
    pub red_opaque: AtomicU64,
    /// Packets of such RED not sent to a viewer without RED.
    pub dropped_red_opaque: AtomicU64,
    /// RED packets sent to viewers that negotiated RED (whole, or stripped at a switch).
    pub red_out: AtomicU64,
    /// RED packets sent as their primary block alone, to viewers without RED.
    pub red_unwrapped: AtomicU64,
    /// RED packets whose redundant blocks of a previous feed were stripped (after a switch).
    pub red_stripped: AtomicU64,
    /// `vad` events sent to viewers (a track changed source).
    pub vad_events: AtomicU64,
    /// `active` events sent to viewers (a source went live), one per viewer told.
    pub active_events: AtomicU64,
    /// Track changes (a multiplexed track taking a source or emptying), per group.
    pub switches: AtomicU64,
    /// Late packets from before a switch, not forwarded.
    pub dropped_before_switch: AtomicU64,
    /// Held packets replayed into a track when its source entered it (pre-roll), per group.
    pub preroll_packets: AtomicU64,
    /// Pre-roll packets whose payload the edge no longer held (never expected: counted, not sent).
    pub dropped_preroll_missing: AtomicU64,
    /// Pre-roll writes not queued because the replay lane was full ([`lanes::MAX_REPLAY`]).
    pub dropped_replay_full: AtomicU64,
    /// Relayed packets the packet core refused (malformed, oversized).
    pub dropped_core: AtomicU64,
    /// sourceIds the media threads' packet cores hold (live, or named by a viewer's view).
    pub interned_names: AtomicU64,
    /// Packets for a viewer's track not sent, by [`viewer::NotSent`] reason.
    pub dropped_viewer_before_switch: AtomicU64,
    /// Packets for an m-line the viewer did not negotiate.
    pub dropped_not_negotiated: AtomicU64,
    /// Packets the lean path could not seal.
    pub dropped_seal: AtomicU64,
    /// The media threads' sockets and peers (flood drops, send errors, unroutable, STUN refused,
    /// peer ends by reason), shared by every media thread.
    pub peers: Arc<PeerStats>,
    /// Viewers whose audio is sealed and sent by the edge itself (AES-GCM SRTP).
    pub direct_viewers: AtomicU64,
    /// Viewers the origin authorized, refused, or could not answer for (link down, deadline).
    pub authorize_allowed: AtomicU64,
    /// Viewers the origin refused.
    pub authorize_refused: AtomicU64,
    /// Viewers the origin could not answer for (link down, deadline passed).
    pub authorize_unavailable: AtomicU64,
    /// Relayed datagrams on a channel no stream of this edge follows (another link's, a stale
    /// one after a relink).
    pub dropped_unknown_channel: AtomicU64,
    /// Relay datagrams without a valid header.
    pub dropped_relay_malformed: AtomicU64,
    /// Relayed packets refused by a full media-thread lane ([`RELAY_LANE_PACKETS`]).
    pub dropped_lane_full: AtomicU64,
    /// Relayed packets older than [`MAX_RELAY_AGE`] when their media thread took them.
    pub dropped_stale: AtomicU64,
    /// Commands a stuck media thread's lane could not take ([`LANE_CONTROL_HEADROOM`]).
    pub lane_control_full: AtomicU64,
    /// Times the link to the origin was lost.
    pub link_losses: AtomicU64,
    /// Media threads' requests to the link manager dropped for a full queue.
    pub link_requests_dropped: Arc<AtomicU64>,
}

/// A viewer's request, from `view` or WHEP.
#[derive(Debug, Clone, Default)]
pub(crate) struct ViewOptions {
    pub pinned: Option<String>,
    pub excluded: Vec<String>,
    /// WHEP's `tracks`: at most this many multiplexed tracks (the offer decides otherwise).
    pub max_tracks: Option<usize>,
}

/// Where an edge's streams come from.
pub(crate) enum Uplink {
    /// One origin (`--origin`, or `chorus serve`'s own).
    Fixed(LinkConfig),
    /// Each stream's owner, looked up in the registry (`--redis` without `--origin`).
    Follow(follow::RouterConfig),
}

/// An answered offer whose peer is not on the media thread yet: the caller sends the answer
/// first, then [`Edge::commit`]s, so no event can overtake the answer.
pub(crate) struct PendingViewer {
    viewer: Box<NewViewer>,
    pub answer: String,
    pub subscriber_id: String,
    pub tracks: Vec<String>,
    /// The mids of its main audio and video m-lines, if it has them.
    pub main_audio: Option<String>,
    pub main_video: Option<String>,
}

impl PendingViewer {
    pub(crate) fn id(&self) -> PeerId {
        self.viewer.id
    }
}

/// Packets of history a viewer's audio track keeps for NACK (320 ms): the lean path's
/// [`NACK_HISTORY`](crate::rtc::established::NACK_HISTORY), so a viewer that keeps str0m
/// (AES-CM, main video) gets the same.
pub(crate) const VIEWER_AUDIO_HISTORY: usize = crate::rtc::established::NACK_HISTORY;

/// How the edge answers viewers: [`media_config`] (leaving transport-cc and abs-send-time out
/// saves about 5 % of str0m's cost per forwarded packet, `cargo bench --bench edge_send`).
/// str0m's periodic stats are not used,
/// and a viewer's audio history for NACK is kept short: Chrome does not NACK Opus unless asked,
/// and each remembered packet costs memory per viewer.
pub(crate) fn viewer_config() -> RtcConfig {
    media_config()
        .set_stats_interval(None)
        .set_send_buffer_audio(VIEWER_AUDIO_HISTORY)
}

/// What the edge's media threads share, per stream: the origin's last `Sources` (for a thread
/// that starts following a stream after they were announced) and the viewer count at this edge.
#[derive(Default)]
pub struct Shared {
    /// Per stream, the channel and source list of the origin's last `Sources`.
    pub sources: Mutex<HashMap<String, (u32, Vec<SourceInfo>)>>,
    /// Per stream, its viewers at this edge (every media thread's together).
    pub viewers: Mutex<HashMap<String, usize>>,
    /// Per stream, its viewers at the other edges (with a shared registry; see
    /// `stream_counts`), which `viewercount` adds.
    pub remote: Mutex<HashMap<String, usize>>,
    /// What the media threads show the dashboard, while one watches.
    pub(crate) boards: board::Boards,
}

impl Shared {
    /// Adds `delta` viewers to a stream's count; returns the new count.
    pub(crate) fn count_viewers(&self, stream: &str, delta: isize) -> usize {
        let Ok(mut m) = self.viewers.lock() else {
            return 0;
        };
        let n = m.entry(stream.to_owned()).or_default();
        *n = n.saturating_add_signed(delta);
        let now = *n;
        if now == 0 {
            m.remove(stream);
        }
        now
    }

    /// The stream's viewers here and, with a shared registry, at the other edges.
    pub(crate) fn viewers_of(&self, stream: &str) -> usize {
        let count = |m: &Mutex<HashMap<String, usize>>| {
            m.lock()
                .ok()
                .and_then(|m| m.get(stream).copied())
                .unwrap_or(0)
        };
        let here = count(&self.viewers);
        // Others are counted only while this edge has viewers of its own to tell.
        here + if here > 0 { count(&self.remote) } else { 0 }
    }
}

/// The way into one media thread: one bounded queue for relayed packets and commands alike, so a
/// source list is always taken before the packets that follow it.
#[derive(Clone)]
struct Lane {
    tx: SyncSender<EdgeCmd>,
    bell: Arc<Doorbell>,
    /// Relayed packets in the queue now (each holds a [`LaneTicket`]).
    packets: Arc<AtomicUsize>,
    metrics: Arc<EdgeMetrics>,
}

impl Lane {
    fn new(metrics: Arc<EdgeMetrics>) -> Result<(Lane, mpsc::Receiver<EdgeCmd>), String> {
        let (tx, rx) = mpsc::sync_channel(RELAY_LANE_PACKETS + LANE_CONTROL_HEADROOM);
        let bell = Doorbell::new().map_err(|e| format!("edge media thread wake-up: {e}"))?;
        let lane = Lane {
            tx,
            bell,
            packets: Arc::default(),
            metrics,
        };
        Ok((lane, rx))
    }

    /// A command: never refused for packets (the headroom is kept for commands).
    fn send(&self, cmd: EdgeCmd) {
        match self.tx.try_send(cmd) {
            Ok(()) => self.bell.ring(),
            Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                let n = self
                    .metrics
                    .lane_control_full
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n % 1000 == 1 {
                    warn!(
                        dropped = n,
                        "edge media thread not taking commands: lane full, command dropped"
                    );
                }
            }
        }
    }

    /// A relayed packet: refused (counted) when the lane already holds its share of packets.
    fn send_packet(&self, hdr: DatagramHeader, data: Bytes, arrived: Instant) {
        if self.packets.load(Ordering::Relaxed) >= RELAY_LANE_PACKETS {
            self.metrics
                .dropped_lane_full
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ticket = LaneTicket::new(&self.packets);
        let cmd = EdgeCmd::Datagram(worker::RelayPacket {
            hdr,
            data,
            arrived,
            _ticket: ticket,
        });
        match self.tx.try_send(cmd) {
            Ok(()) => self.bell.ring(),
            Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics
                    .dropped_lane_full
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Counts a relayed packet in its lane while it is queued (and being handled): taken on send,
/// given back when the media thread is done with the packet.
pub(crate) struct LaneTicket(Arc<AtomicUsize>);

impl LaneTicket {
    fn new(count: &Arc<AtomicUsize>) -> LaneTicket {
        count.fetch_add(1, Ordering::Relaxed);
        LaneTicket(count.clone())
    }
}

impl Drop for LaneTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct Edge {
    lanes: Vec<Lane>,
    /// Each media thread's ICE candidate.
    /// Each worker's UDP candidate and, with ICE-TCP, its passive TCP candidate.
    candidates: Vec<(SocketAddr, Option<SocketAddr>)>,
    next_id: AtomicU64,
    pub metrics: Arc<EdgeMetrics>,
    link: LinkCtl,
    /// Viewer counts per stream, for the cluster record.
    shared: Arc<Shared>,
    /// Room members the origin removed (room, member id): their views here are ended.
    pub revocations: tokio::sync::broadcast::Sender<(String, String)>,
}

impl Edge {
    /// Links to the origin, binds the viewers' media socket and starts the media thread.
    /// Returns once the origin link is up; `keys` then holds the origin's JWT verify key (and
    /// follows it on every relink). `workers` media threads each own a socket and a share of
    /// the viewers: on `bind`'s port and the next ones (so a firewall opens a known range), or
    /// any free ports when it is 0.
    pub(crate) async fn start(
        bind: SocketAddr,
        public_ip: Option<IpAddr>,
        uplink: Uplink,
        workers: usize,
        ice_tcp: IceTcp,
        keys: Arc<JwtVerifier>,
    ) -> Result<Arc<Edge>, String> {
        let mut sockets = Vec::new();
        for i in 0..workers.max(1) {
            let mut bind = bind;
            if bind.port() != 0 {
                let port = u16::try_from(usize::from(bind.port()) + i)
                    .map_err(|_| format!("edge media ports from {bind}: past port 65535"))?;
                bind.set_port(port);
            }
            let socket =
                UdpSocket::bind(bind).map_err(|e| format!("edge media socket on {bind}: {e}"))?;
            let local = socket.local_addr().map_err(|e| e.to_string())?;
            let ip = public_ip.unwrap_or(local.ip());
            if ip.is_unspecified() {
                return Err("edge media bound to an unspecified address: give --public-ip for the ICE candidates".into());
            }
            let tcp = ice_tcp
                .bind(local, i)
                .map_err(|e| format!("edge ICE-TCP listener beside {local}: {e}"))?
                .map(|l| {
                    let addr = candidate_addr(&l, public_ip)?;
                    Ok::<_, std::io::Error>((TcpSide::new(l, addr)?, addr))
                })
                .transpose()
                .map_err(|e| format!("edge ICE-TCP listener beside {local}: {e}"))?;
            sockets.push((socket, SocketAddr::new(ip, local.port()), tcp));
        }
        let shared: Arc<Shared> = Arc::default();
        let metrics = Arc::new(EdgeMetrics::default());
        let mut lanes = Vec::new();
        let mut receivers = Vec::new();
        for _ in &sockets {
            let (lane, rx) = Lane::new(metrics.clone())?;
            lanes.push(lane);
            receivers.push(rx);
        }
        let revocations = tokio::sync::broadcast::channel(crate::origin::REVOCATIONS_QUEUE).0;
        let sink = Arc::new(RelaySink {
            lanes: lanes.clone(),
            shared: shared.clone(),
            metrics: metrics.clone(),
            revocations: revocations.clone(),
        });
        let ctl = match uplink {
            Uplink::Fixed(link) => {
                let sink: Arc<dyn LinkHandler> = sink;
                manage_link(link, sink, keys).await?
            }
            Uplink::Follow(cfg) => follow::spawn_router(cfg, sink),
        };
        let ctl = ctl.counting_drops_in(metrics.link_requests_dropped.clone());
        let mut candidates = Vec::new();
        for (i, ((socket, candidate, tcp), rx)) in sockets.into_iter().zip(receivers).enumerate() {
            let (tcp, tcp_candidate) = match tcp {
                Some((side, addr)) => (Some(side), Some(addr)),
                None => (None, None),
            };
            let worker = Worker::new(
                socket,
                tcp,
                ctl.clone(),
                metrics.clone(),
                lanes[i].bell.clone(),
                shared.clone(),
            )
            .map_err(|e| e.to_string())?;
            spawn_media(format!("media-edge-{i}"), move |hb| worker.run(rx, &hb))
                .map_err(|e| e.to_string())?;
            info!(worker = i, %candidate, tcp = ?tcp_candidate, "edge media socket ready");
            candidates.push((candidate, tcp_candidate));
        }
        let edge = Arc::new(Edge {
            lanes,
            candidates,
            next_id: AtomicU64::new(1),
            metrics,
            link: ctl,
            shared,
            revocations,
        });
        Ok(edge)
    }

    /// (viewers here, streams with viewers here, at most `max` of them): the edge's cluster load.
    pub(crate) fn load(&self, max: usize) -> (u64, Vec<String>) {
        let Ok(m) = self.shared.viewers.lock() else {
            return (0, Vec::new());
        };
        let viewers = m.values().map(|&n| n as u64).sum();
        (viewers, m.keys().take(max).cloned().collect())
    }

    /// Asks the origin whether a viewer with this bearer may view `stream` (its token policy is
    /// the only truth): a subscribe JWT, or the refusal to pass on.
    pub(crate) async fn authorize(&self, stream: &str, token: Option<&str>) -> AuthorizeAnswer {
        let answer = self.link.authorize(stream, token).await;
        let counter = match &answer {
            Ok(_) => &self.metrics.authorize_allowed,
            Err((503, _)) => &self.metrics.authorize_unavailable,
            Err(_) => &self.metrics.authorize_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }

    /// The media thread that owns (or will own) a viewer: viewers are dealt out in turn.
    fn lane(&self, id: PeerId) -> usize {
        (id.0 % self.lanes.len() as u64) as usize
    }

    /// Answers a viewer's offer: the first audio (and video) m-line carries the main source,
    /// every further receiving audio m-line is a multiplexed track.
    pub(crate) fn prepare(
        &self,
        stream: &str,
        offer: &str,
        opts: ViewOptions,
        events: UnboundedSender<events::ViewerEvent>,
    ) -> Result<PendingViewer, OfferError> {
        check_offer(
            offer,
            OfferRequirements {
                audio_send: false,
                audio_recv: true,
            },
        )?;
        let lines = mlines(offer);
        let receiving =
            |m: &&crate::rtc::offer::MLine| matches!(m.direction.as_str(), "recvonly" | "sendrecv");
        let mut audio = lines
            .iter()
            .filter(|m| m.media == "audio")
            .filter(receiving);
        let main_audio = audio.next().and_then(|m| m.mid.clone());
        let mut tracks: Vec<String> = audio.filter_map(|m| m.mid.clone()).collect();
        if tracks.len() > MAX_TRACKS {
            return Err(OfferError::Unacceptable(format!(
                "{} multiplexed audio tracks asked for; at most {MAX_TRACKS}",
                tracks.len()
            )));
        }
        if let Some(n) = opts.max_tracks {
            tracks.truncate(n);
        }
        check_names(&opts)?;
        let main_video = lines
            .iter()
            .filter(|m| m.media == "video")
            .find(receiving)
            .and_then(|m| m.mid.clone());
        let keys = Arc::new(KeySlot::default());
        let config = viewer_config().set_crypto_provider(tapping_provider());
        let slot = ConnectSlot::acquire()?;
        let id = PeerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (candidate, tcp) = self.candidates[self.lane(id)];
        let (rtc, ufrag, answer) =
            with_key_slot(keys.clone(), || answer_offer(offer, config, candidate, tcp))?;
        let subscriber_id = format!("sub-{}-{}", id.0, crate::auth::random_secret(6));
        self.metrics.viewers_total.fetch_add(1, Ordering::Relaxed);
        Ok(PendingViewer {
            answer,
            subscriber_id: subscriber_id.clone(),
            tracks: tracks.clone(),
            main_audio: main_audio.clone(),
            main_video: main_video.clone(),
            viewer: Box::new(NewViewer {
                id,
                ufrag,
                rtc,
                stream: stream.to_owned(),
                subscriber_id,
                main_audio: main_audio.as_deref().map(Mid::from),
                main_video: main_video.as_deref().map(Mid::from),
                tracks: tracks.iter().map(|m| Mid::from(m.as_str())).collect(),
                pinned: opts.pinned,
                excluded: opts.excluded,
                events,
                keys,
                slot,
            }),
        })
    }

    pub(crate) fn commit(&self, v: PendingViewer) -> PeerId {
        let id = v.viewer.id;
        self.lanes[self.lane(id)].send(EdgeCmd::AddViewer(v.viewer));
        id
    }

    pub(crate) fn remove(&self, id: PeerId) {
        self.lanes[self.lane(id)].send(EdgeCmd::RemoveViewer(id));
    }

    /// Sets all of a viewer's projections (see [`core::Projection`]).
    pub(crate) fn project(&self, id: PeerId, p: core::Projection) {
        self.lanes[self.lane(id)].send(EdgeCmd::Project(id, p));
    }
}

/// Refuses a view that names too many sources, or names no publisher could have.
fn check_names(opts: &ViewOptions) -> Result<(), OfferError> {
    use crate::millicast::MAX_SOURCE_ID;
    if opts.excluded.len() > MAX_EXCLUDED {
        return Err(OfferError::Unacceptable(format!(
            "{} excluded sourceIds; at most {MAX_EXCLUDED} per view",
            opts.excluded.len()
        )));
    }
    let names = opts.excluded.iter().chain(&opts.pinned);
    if let Some(long) = names.into_iter().find(|n| n.len() > MAX_SOURCE_ID) {
        return Err(OfferError::Unacceptable(format!(
            "a sourceId of {} bytes; sourceIds are at most {MAX_SOURCE_ID}",
            long.len()
        )));
    }
    Ok(())
}

/// Hands what the origin relays to every media thread: each runs its own packet core per
/// stream for its own viewers (a relayed packet is one shared `Bytes`, not a copy per thread).
struct RelaySink {
    lanes: Vec<Lane>,
    shared: Arc<Shared>,
    metrics: Arc<EdgeMetrics>,
    revocations: tokio::sync::broadcast::Sender<(String, String)>,
}

impl LinkHandler for RelaySink {
    fn on_revoke(&self, room: &str, member: &str) {
        // No receiver (no HTTP yet) is not an error: there are no views to end.
        let _ = self.revocations.send((room.to_owned(), member.to_owned()));
    }

    fn on_sources(&self, stream: &str, channel: u32, sources: &[SourceInfo]) {
        if let Ok(mut cache) = self.shared.sources.lock() {
            cache.insert(stream.to_owned(), (channel, sources.to_vec()));
        }
        for lane in &self.lanes {
            lane.send(EdgeCmd::Sources {
                stream: stream.to_owned(),
                channel,
                sources: sources.to_vec(),
            });
        }
    }

    fn on_datagram(&self, hdr: DatagramHeader, datagram: Bytes, queued: Duration) {
        self.metrics.relay_packets.fetch_add(1, Ordering::Relaxed);
        // Its age counts from when it would have arrived had it not queued on the link.
        let now = Instant::now();
        let arrived = now.checked_sub(queued).unwrap_or(now);
        for lane in &self.lanes {
            lane.send_packet(hdr, datagram.clone(), arrived);
        }
    }

    fn on_closed(&self, reason: &str) {
        tracing::warn!("origin link closed: {reason}");
    }

    fn on_malformed(&self) {
        self.metrics
            .dropped_relay_malformed
            .fetch_add(1, Ordering::Relaxed);
    }

    fn on_link_down(&self) {
        self.metrics.link_losses.fetch_add(1, Ordering::Relaxed);
        // A media thread that starts following a stream now must wait for the next link's list.
        if let Ok(mut cache) = self.shared.sources.lock() {
            cache.clear();
        }
        for lane in &self.lanes {
            lane.send(EdgeCmd::LinkDown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_names_at_most_64_sources_of_at_most_128_bytes() {
        let view = |excluded: usize, len: usize| ViewOptions {
            pinned: Some("p".repeat(len)),
            excluded: (0..excluded).map(|i| format!("{i}")).collect(),
            max_tracks: None,
        };
        assert_eq!(check_names(&view(MAX_EXCLUDED, 128)), Ok(()));
        let too_many = check_names(&view(MAX_EXCLUDED + 1, 1)).unwrap_err();
        assert!(
            too_many.to_string().contains("at most 64 per view"),
            "{too_many}"
        );
        let too_long = check_names(&view(0, 129)).unwrap_err();
        assert!(too_long.to_string().contains("at most 128"), "{too_long}");
    }
}
