//! The edge's media thread, a driver around the [`EdgeCore`]: it owns the viewers' peers and
//! socket and the lane from the link, feeds the core, and does what the core's output says, in
//! order: writes to the viewers' tracks (through [`Worker::write`], the one place a packet goes
//! out), events to the viewers' signalling sockets, requests to the origin link.

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::media::{KeyframeRequest, Mid};
use str0m::{Event, Rtc};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use super::core::{EdgeCore, Join, Output, Projection, Relayed, TrackRef, Write};
use super::events::ViewerEvent;
use super::lanes::REPLAY_BURST;
use super::viewer::{NotSent, OutTrack, RedSent, Sent, Viewer};
use super::{EdgeMetrics, Shared};
use crate::media::opus;
use crate::net::poll::Doorbell;
use crate::prefetch::{prefetch, prefetch_all};
use crate::relay::client::LinkCtl;
use crate::relay::proto::{DatagramHeader, SourceInfo};
use crate::rtc::peers::{CloseReason, ConnectSlot, Peer, PeerApp, PeerId, PeerSet};
use crate::rtc::srtp_out::KeySlot;
use crate::rtc::supervise::Heartbeat;
use crate::rtc::tcp::TcpSide;

/// Commands (mostly relayed packets) taken in one go before the peers' own work gets a turn.
/// Packets written in one round leave together: one str0m flush per viewer, not per packet.
const CMD_BURST: usize = 256;

/// How many writes ahead [`Worker::prefetch_ahead`] asks for a viewer's track lines; its lean
/// state twice and its peer's first fields three times as far ahead. A write takes about a
/// microsecond, a line from memory a tenth.
const PREFETCH_AHEAD: usize = 4;

pub(crate) struct NewViewer {
    pub id: PeerId,
    pub ufrag: String,
    pub rtc: Rtc,
    pub stream: String,
    pub subscriber_id: String,
    pub main_audio: Option<Mid>,
    pub main_video: Option<Mid>,
    pub tracks: Vec<Mid>,
    pub pinned: Option<String>,
    pub excluded: Vec<String>,
    pub events: UnboundedSender<ViewerEvent>,
    pub keys: Arc<KeySlot>,
    /// Its place among the process's unconnected peers, until it connects.
    pub slot: ConnectSlot,
}

pub(crate) enum EdgeCmd {
    AddViewer(Box<NewViewer>),
    RemoveViewer(PeerId),
    /// Sets a viewer's projections (and adds the tracks they name that it did not have).
    Project(PeerId, Projection),
    Sources {
        stream: String,
        channel: u32,
        sources: Vec<SourceInfo>,
    },
    Datagram(RelayPacket),
    /// The origin link is gone: its channels and source indices are void, its sources inactive
    /// until the next link announces them.
    LinkDown,
    /// One origin link of several is gone, or these streams moved to another origin: their
    /// channels and source indices are void, their sources inactive until announced again.
    StreamsDown(Vec<String>),
}

/// One relayed datagram in a media thread's lane.
pub(crate) struct RelayPacket {
    pub hdr: DatagramHeader,
    /// The whole datagram; the RTP packet starts at [`crate::relay::proto::DATAGRAM_HEADER`].
    pub data: Bytes,
    /// When the link's reader took it: its age decides whether it is still worth forwarding.
    pub arrived: Instant,
    /// Holds the packet's place in its lane's bound until it is handled.
    pub _ticket: super::LaneTicket,
}

/// The core's clock: µs since the thread's epoch.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.0).as_micros() as u64
    }
}

/// Handles viewers' str0m events and their end, with access to everything but the peers.
struct ViewerEvents<'a> {
    core: &'a mut EdgeCore,
    metrics: &'a EdgeMetrics,
    clock: Clock,
}

impl PeerApp<Viewer> for ViewerEvents<'_> {
    fn on_event(&mut self, id: PeerId, peer: &mut Peer<Viewer>, ev: Event) -> Option<CloseReason> {
        match ev {
            Event::Connected => {
                let lean = super::viewer::go_lean(peer, Instant::now());
                debug!(%id, lean, "viewer connected");
                if lean {
                    self.metrics.direct_viewers.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::KeyframeRequest(KeyframeRequest { mid, .. }) => {
                let now_us = self.clock.us(Instant::now());
                self.core.handle_keyframe_request(now_us, id, mid);
            }
            _ => {}
        }
        None
    }

    fn on_closed(&mut self, id: PeerId, peer: Peer<Viewer>, reason: CloseReason) {
        let v = peer.data;
        info!(viewer = %id, stream = v.stream.as_str(), subscriber = v.subscriber_id.as_str(), %reason, "viewer left");
        self.core.handle_leave(id);
    }
}

pub(crate) struct Worker {
    peers: PeerSet<Viewer>,
    core: EdgeCore,
    link: LinkCtl,
    metrics: Arc<EdgeMetrics>,
    clock: Clock,
    /// Viewers written through str0m this round: flushed once each at the end of the round.
    touched: Vec<PeerId>,
}

impl Worker {
    pub(crate) fn new(
        socket: UdpSocket,
        tcp: Option<TcpSide>,
        link: LinkCtl,
        metrics: Arc<EdgeMetrics>,
        bell: Arc<Doorbell>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Worker> {
        Ok(Worker {
            peers: PeerSet::new(socket, bell, metrics.peers.clone())?.with_tcp(tcp)?,
            core: EdgeCore::new(metrics.clone(), shared, rand::random()),
            link,
            metrics,
            clock: Clock(Instant::now()),
            touched: Vec::new(),
        })
    }

    /// The peers, and what handles their events: everything else of the thread.
    fn split(&mut self) -> (&mut PeerSet<Viewer>, ViewerEvents<'_>) {
        (
            &mut self.peers,
            ViewerEvents {
                core: &mut self.core,
                metrics: &self.metrics,
                clock: self.clock,
            },
        )
    }

    pub(crate) fn run(mut self, rx: Receiver<EdgeCmd>, hb: &Heartbeat) {
        let mut next_cmd: Option<EdgeCmd> = None;
        loop {
            hb.beat();
            let mut taken = 0;
            while taken < CMD_BURST {
                match next_cmd.take().map_or_else(|| rx.try_recv(), Ok) {
                    Ok(cmd) => self.command(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        info!("edge media thread stopping: control plane gone");
                        return;
                    }
                }
                taken += 1;
            }
            let now = Instant::now();
            self.core.handle_timeout(self.clock.us(now));
            self.drain(now);
            self.flush_touched();
            let tick_at = self.clock.0 + Duration::from_micros(self.core.poll_timeout());
            let busy = taken == CMD_BURST || self.core.replay_waiting();
            let (peers, mut app) = self.split();
            let next_peer = peers.timeouts(Instant::now(), &mut app);
            let wait = match busy {
                true => Duration::ZERO,
                false => next_peer
                    .map_or(tick_at, |t| t.min(tick_at))
                    .saturating_duration_since(Instant::now()),
            };
            peers.wait(wait, || match rx.try_recv() {
                Ok(cmd) => {
                    next_cmd = Some(cmd);
                    true
                }
                Err(TryRecvError::Empty) => false,
                Err(TryRecvError::Disconnected) => true,
            });
            peers.recv(&mut app);
            self.drain(Instant::now());
        }
    }

    /// Feeds one command to the core (or the peers) and does what it asks at once.
    fn command(&mut self, cmd: EdgeCmd) {
        let now = Instant::now();
        let now_us = self.clock.us(now);
        match cmd {
            EdgeCmd::Datagram(p) => {
                let arrived_us = self.clock.us(p.arrived);
                let (hdr, data) = (p.hdr, p.data);
                self.core.handle_packet(
                    now_us,
                    Relayed {
                        hdr,
                        data,
                        arrived_us,
                    },
                );
            }
            EdgeCmd::LinkDown => self.core.handle_link_down(now_us),
            EdgeCmd::StreamsDown(streams) => self.core.handle_streams_down(now_us, &streams),
            EdgeCmd::Sources {
                stream,
                channel,
                sources,
            } => self.core.handle_sources(now_us, &stream, channel, sources),
            EdgeCmd::AddViewer(v) => self.add_viewer(now_us, *v),
            EdgeCmd::RemoveViewer(id) => {
                let (peers, mut app) = self.split();
                peers.close(id, CloseReason::Removed, &mut app);
            }
            EdgeCmd::Project(id, mut p) => {
                // The tracks come first: the core writes into them as soon as it places a
                // source there. One that cannot be added is not projected into either.
                if let Some(peer) = self.peers.get_mut(id) {
                    p.added.retain(|&mid| {
                        let ok = super::viewer::add_track(peer, mid);
                        if !ok {
                            warn!(%id, %mid, "added track refused: this viewer's media stays on str0m, or it has all its tracks");
                        }
                        ok
                    });
                }
                self.core.handle_project(now_us, id, &p);
            }
        }
        self.drain(now);
    }

    /// Does what the core asks, in its order: all that is live, and a bounded share of a
    /// switch's replay ([`REPLAY_BURST`] or as much as the live lane had), so the link is read
    /// again before the rest (`run` comes back without sleeping while some waits).
    fn drain(&mut self, now: Instant) {
        let now_us = self.clock.us(now);
        let mut budget = REPLAY_BURST;
        while let Some(o) = self.core.poll_output_within(&mut budget) {
            match o {
                Output::Write(w) => {
                    self.prefetch_ahead();
                    self.write(now_us, now, w)
                }
                Output::Event(id, ev) => {
                    if let Some(p) = self.peers.get_mut(id) {
                        let _ = p.data.events.send(ev);
                    }
                }
                Output::Link(r) => self.link.send(r),
            }
        }
    }

    /// Starts loading the state of the viewers the next writes go to (see [`crate::prefetch`]),
    /// in three stages, since each one's addresses are read from what the one before loaded:
    /// the peer's first fields [`PREFETCH_AHEAD`] writes before its track and lean state, and
    /// those as long before the track's own lines.
    fn prefetch_ahead(&self) {
        if let Some(Output::Write(w)) = self.core.peek_output(3 * PREFETCH_AHEAD - 1) {
            if let Some(p) = self.peers.get(w.viewer) {
                p.prefetch();
                prefetch(&p.data.tracks);
                prefetch(&p.data.main_audio);
            }
        }
        if let Some(Output::Write(w)) = self.core.peek_output(2 * PREFETCH_AHEAD - 1) {
            if let Some(p) = self.peers.get(w.viewer) {
                if let Some(t) = track_of(&p.data, w.track) {
                    prefetch_all(t);
                }
                if let Some(lean) = p.lean() {
                    lean.prefetch_state();
                }
            }
        }
        if let Some(Output::Write(w)) = self.core.peek_output(PREFETCH_AHEAD - 1) {
            let Some(p) = self.peers.get(w.viewer) else {
                return;
            };
            let slot = track_of(&p.data, w.track).and_then(OutTrack::next_slot);
            if let (Some(lean), Some((track, ext_seq))) = (p.lean(), slot) {
                lean.prefetch_track(track, ext_seq);
            }
        }
    }

    /// The one place a packet is written to a viewer's track: its final numbering, the seal and
    /// the batch (or str0m's queue). Nothing is written before DTLS is up: str0m would only
    /// queue it.
    fn write(&mut self, now_us: u64, wall: Instant, w: Write) {
        let Some((data, out)) = self.peers.writer(w.viewer) else {
            return;
        };
        let Some(t) = track_of_mut(data, w.track) else {
            return;
        };
        let m = &self.metrics;
        let (sent, red) = t.write_red(
            out,
            now_us,
            wall,
            &w.input,
            w.level,
            &w.payload,
            w.red.as_ref(),
            w.reach,
        );
        match red {
            Some(RedSent::Whole) => {
                m.red_out.fetch_add(1, Ordering::Relaxed);
            }
            Some(RedSent::Stripped) => {
                m.red_out.fetch_add(1, Ordering::Relaxed);
                m.red_stripped.fetch_add(1, Ordering::Relaxed);
            }
            Some(RedSent::Unwrapped) => {
                m.red_unwrapped.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        if sent == Sent::Str0m {
            self.touched.push(w.viewer);
        }
        match sent {
            Sent::Dropped(why) => count_not_sent(m, why),
            // The counter is the multiplexed tracks' (as /metrics describes it).
            _ if matches!(w.track, TrackRef::Mux(_)) => {
                m.packets_out.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Sends what this round wrote: one str0m flush per viewer that got packets.
    fn flush_touched(&mut self) {
        if self.touched.is_empty() {
            return;
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        let (peers, mut app) = self.split();
        for &id in &touched {
            peers.flush(id, &mut app);
        }
        touched.clear();
        self.touched = touched;
    }

    fn add_viewer(&mut self, now_us: u64, v: NewViewer) {
        let n = v.tracks.len();
        info!(viewer = %v.id, stream = v.stream.as_str(), subscriber = v.subscriber_id.as_str(), tracks = n, pinned = ?v.pinned, excluded = v.excluded.len(), "viewer joined");
        let viewer = Viewer {
            stream: v.stream.clone(),
            subscriber_id: v.subscriber_id,
            main_audio: v.main_audio.map(|m| OutTrack::new(m, opus::CLOCK_RATE)),
            main_video: v.main_video.map(|m| OutTrack::new(m, 90_000)),
            tracks: v
                .tracks
                .iter()
                .map(|&m| OutTrack::new(m, opus::CLOCK_RATE))
                .collect(),
            events: v.events,
            keys: v.keys,
        };
        self.peers.insert(v.id, v.ufrag, v.rtc, viewer, v.slot);
        let join = Join {
            stream: v.stream,
            pinned: v.pinned,
            excluded: v.excluded,
            main_video: v.main_video,
            tracks: v.tracks,
        };
        self.core.handle_join(now_us, v.id, join);
    }
}

fn track_of(v: &Viewer, r: TrackRef) -> Option<&OutTrack> {
    match r {
        TrackRef::MainAudio => v.main_audio.as_ref(),
        TrackRef::MainVideo => v.main_video.as_ref(),
        TrackRef::Mux(k) => v.tracks.get(k as usize),
    }
}

fn track_of_mut(v: &mut Viewer, r: TrackRef) -> Option<&mut OutTrack> {
    match r {
        TrackRef::MainAudio => v.main_audio.as_mut(),
        TrackRef::MainVideo => v.main_video.as_mut(),
        TrackRef::Mux(k) => v.tracks.get_mut(k as usize),
    }
}

fn count_not_sent(m: &EdgeMetrics, why: NotSent) {
    let c = match why {
        NotSent::BeforeSwitch => &m.dropped_viewer_before_switch,
        NotSent::NotNegotiated => &m.dropped_not_negotiated,
        NotSent::Seal => &m.dropped_seal,
        NotSent::RedOpaque => &m.dropped_red_opaque,
    };
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::proto::{Kind, DATAGRAM_HEADER};
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_driver_feeds_the_core_and_gives_back_the_lane_ticket() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (link, _rx) = LinkCtl::channel();
        let bell = Doorbell::new().unwrap();
        let metrics: Arc<EdgeMetrics> = Arc::default();
        let mut w = Worker::new(socket, None, link, metrics.clone(), bell, Arc::default()).unwrap();
        let queued = Arc::new(AtomicUsize::new(0));
        let hdr = DatagramHeader {
            channel: 9,
            source: 0,
            kind: Kind::Audio,
            sent_ms: 0,
        };
        w.command(EdgeCmd::Datagram(RelayPacket {
            hdr,
            data: Bytes::from(vec![0; DATAGRAM_HEADER + 12]),
            arrived: Instant::now(),
            _ticket: super::super::LaneTicket::new(&queued),
        }));
        assert_eq!(metrics.dropped_unknown_channel.load(Ordering::Relaxed), 1);
        assert_eq!(
            queued.load(Ordering::Relaxed),
            0,
            "the packet's lane slot is free"
        );
        assert!(w.core.poll_output().is_none());
    }
}
