//! The edge's media thread: it owns the viewers' peers and socket, one packet core per stream,
//! and turns relayed RTP into each viewer's main and multiplexed tracks plus its events.

use std::collections::{HashMap, HashSet};
use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use str0m::media::{KeyframeRequest, Mid};
use str0m::{Event, Rtc};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info};

use super::viewer::{NotSent, OutTrack, Sent, Viewer};
use super::{EdgeMetrics, Shared};
use crate::media::opus;
use crate::media::rewrite::InputPacket;
use crate::media::rtp::{parse_audio_level, RtpView};
use crate::media::selection::{GroupId, GroupKey, TrackChange};
use crate::media::stream::{CoreConfig, Output, SourceConfig, StreamCore};
use crate::media::SourceIdx;
use crate::net::poll::Doorbell;
use crate::relay::client::{LinkCtl, LinkRequest};
use crate::relay::proto::{DatagramHeader, Kind, SourceInfo, DATAGRAM_HEADER, LEVEL_EXT_ID};
use crate::rtc::peers::{CloseReason, ConnectSlot, Peer, PeerApp, PeerId, PeerSet};
use crate::rtc::srtp_out::KeySlot;
use crate::rtc::supervise::Heartbeat;

/// Selection runs this often per stream (one ranking per stream per tick).
const TICK_US: u64 = 10_000;
/// A viewer's keyframe requests reach the origin at most this often per stream.
const KEYFRAME_INTERVAL: Duration = Duration::from_secs(1);
/// Video packet duration used when a main video track switches publication (30 fps at 90 kHz).
const VIDEO_FRAME: u32 = 3000;
/// `viewercount` goes to a stream's viewers at most this often, when the count changed.
const VIEWERCOUNT_INTERVAL_US: u64 = 1_000_000;
/// Commands (mostly relayed packets) taken in one go before the peers' own work gets a turn.
/// Packets written in one round leave together: one str0m flush per viewer, not per packet.
const CMD_BURST: usize = 256;

pub struct NewViewer {
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
    pub events: UnboundedSender<Value>,
    pub keys: Arc<KeySlot>,
    /// Its place among the process's unconnected peers, until it connects.
    pub slot: ConnectSlot,
}

pub enum EdgeCmd {
    AddViewer(Box<NewViewer>),
    RemoveViewer(PeerId),
    /// Sets a viewer's projections: (multiplexed track index, sourceId).
    Project(PeerId, Vec<(u8, String)>),
    Sources {
        stream: String,
        channel: u32,
        sources: Vec<SourceInfo>,
    },
    Datagram(RelayPacket),
    /// The origin link is gone: its channels and source indices are void, its sources inactive
    /// until the next link announces them.
    LinkDown,
}

/// One relayed datagram in a media thread's lane.
pub struct RelayPacket {
    pub hdr: DatagramHeader,
    /// The whole datagram; the RTP packet starts at [`DATAGRAM_HEADER`].
    pub data: Bytes,
    /// When the link's reader took it: its age decides whether it is still worth forwarding.
    pub arrived: Instant,
    /// Holds the packet's place in its lane's bound until it is handled.
    pub _ticket: super::LaneTicket,
}

/// What the stream knows of each of its viewers, for events (no peer access needed).
struct ViewerHandle {
    events: UnboundedSender<Value>,
    group: GroupId,
    /// mids of the multiplexed tracks, in order.
    mids: Vec<String>,
}

struct EdgeStream {
    core: StreamCore,
    /// Relay source index -> core source.
    by_relay: HashMap<u16, SourceIdx>,
    /// Live sources as the origin announced them.
    live: HashMap<SourceIdx, SourceInfo>,
    viewers: HashMap<PeerId, ViewerHandle>,
    groups: HashMap<GroupId, Vec<PeerId>>,
    main_viewers: HashMap<SourceIdx, Vec<PeerId>>,
    channel: Option<u32>,
    last_keyframe: Option<Instant>,
    /// The edge-wide count this thread's viewers last heard, and when.
    last_viewercount: Option<usize>,
    last_viewercount_us: Option<u64>,
}

impl EdgeStream {
    fn new(seed: u64) -> Self {
        EdgeStream {
            core: StreamCore::new(CoreConfig {
                seed,
                ..CoreConfig::default()
            }),
            by_relay: HashMap::new(),
            live: HashMap::new(),
            viewers: HashMap::new(),
            groups: HashMap::new(),
            main_viewers: HashMap::new(),
            channel: None,
            last_keyframe: None,
            last_viewercount: None,
            last_viewercount_us: None,
        }
    }

    fn broadcast(&self, v: &Value) {
        for h in self.viewers.values() {
            let _ = h.events.send(v.clone());
        }
    }

    fn viewercount_event(&self, n: usize) -> Value {
        json!({"type": "event", "name": "viewercount", "data": {"viewercount": n}})
    }

    /// The sourceId as the protocol says it: the main source is null.
    fn source_id(&self, s: SourceIdx) -> Value {
        match self.core.name(s) {
            "" => Value::Null,
            n => Value::String(n.to_owned()),
        }
    }

    fn active(&self, stream: &str, info: &SourceInfo) -> Value {
        let tracks: Vec<Value> = info
            .tracks
            .iter()
            .map(|t| json!({"trackId": t.media, "media": t.media}))
            .collect();
        json!({"type": "event", "name": "active", "data": {
            "streamId": stream, "sourceId": info.source_id, "tracks": tracks}})
    }

    /// Tells the viewers of the change's group which source its track now carries.
    fn vad(&self, c: &TrackChange, metrics: &EdgeMetrics) {
        metrics.switches.fetch_add(1, Ordering::Relaxed);
        let Some(ids) = self.groups.get(&c.group) else {
            return;
        };
        let source = c.source.map_or(Value::Null, |s| self.source_id(s));
        for id in ids {
            if let Some(h) = self.viewers.get(id) {
                if let Some(mid) = h.mids.get(c.track as usize) {
                    let _ = h
                        .events
                        .send(json!({"type": "event", "name": "vad", "data": {
                        "mediaId": mid, "sourceId": source}}));
                    metrics.vad_events.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A source left the stream (or the link that announced it): its tracks empty, with `vad`
    /// events, and the viewers hear `inactive`.
    fn source_gone(
        &mut self,
        now_us: u64,
        stream: &str,
        s: SourceIdx,
        info: &SourceInfo,
        metrics: &EdgeMetrics,
    ) {
        let mut changes = Vec::new();
        self.core.unpublish(now_us, s, &mut |o| {
            if let Output::Track(c) = o {
                changes.push(c)
            }
        });
        for c in &changes {
            self.vad(c, metrics);
        }
        self.broadcast(&json!({"type": "event", "name": "inactive", "data": {
            "streamId": stream, "sourceId": info.source_id}}));
    }
}

/// Handles viewers' str0m events and their end, with access to everything but the peers.
struct ViewerEvents<'a> {
    streams: &'a mut HashMap<String, EdgeStream>,
    channels: &'a mut HashMap<u32, String>,
    link: &'a LinkCtl,
    metrics: &'a EdgeMetrics,
    shared: &'a Shared,
}

impl PeerApp<Viewer> for ViewerEvents<'_> {
    fn on_event(&mut self, id: PeerId, peer: &mut Peer<Viewer>, ev: Event) -> Option<CloseReason> {
        if let Event::Connected = ev {
            let lean = super::viewer::go_lean(peer, Instant::now());
            debug!(%id, lean, "viewer connected");
            if lean {
                self.metrics.direct_viewers.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Event::KeyframeRequest(KeyframeRequest { mid, .. }) = ev {
            let v = &peer.data;
            if v.main_video.as_ref().is_some_and(|t| t.mid == mid) {
                if let Some(st) = self.streams.get_mut(&v.stream) {
                    let due = st
                        .last_keyframe
                        .is_none_or(|t| t.elapsed() >= KEYFRAME_INTERVAL);
                    if due {
                        st.last_keyframe = Some(Instant::now());
                        let source = match st.core.name(v.main_source) {
                            "" => None,
                            n => Some(n.to_owned()),
                        };
                        debug!(%id, stream = v.stream.as_str(), "keyframe request sent to the origin");
                        self.link.send(LinkRequest::Keyframe {
                            stream: v.stream.clone(),
                            source,
                        });
                    }
                }
            }
        }
        None
    }

    fn on_closed(&mut self, id: PeerId, peer: Peer<Viewer>, reason: CloseReason) {
        let v = peer.data;
        info!(%id, stream = v.stream.as_str(), subscriber = v.subscriber_id.as_str(), %reason, "viewer left");
        self.metrics.viewers.fetch_sub(1, Ordering::Relaxed);
        self.shared.count_viewers(&v.stream, -1);
        let Some(st) = self.streams.get_mut(&v.stream) else {
            return;
        };
        st.viewers.remove(&id);
        if let Some(g) = st.groups.get_mut(&v.group) {
            g.retain(|x| *x != id);
            if g.is_empty() {
                st.groups.remove(&v.group);
            }
        }
        st.core.leave(v.group);
        if let Some(m) = st.main_viewers.get_mut(&v.main_source) {
            m.retain(|x| *x != id);
            if m.is_empty() {
                st.main_viewers.remove(&v.main_source);
            }
        }
        if st.viewers.is_empty() {
            if let Some(c) = st.channel {
                self.channels.remove(&c);
            }
            self.streams.remove(&v.stream);
            self.link.send(LinkRequest::Unsubscribe(v.stream.clone()));
            info!(stream = v.stream.as_str(), "last viewer gone: unsubscribed");
        }
    }
}

pub struct Worker {
    peers: PeerSet<Viewer>,
    streams: HashMap<String, EdgeStream>,
    channels: HashMap<u32, String>,
    link: LinkCtl,
    metrics: Arc<EdgeMetrics>,
    epoch: Instant,
    next_tick_us: u64,
    touched: Vec<PeerId>,
    /// What the origin last announced per stream, shared by the edge's media threads.
    shared: Arc<Shared>,
    /// Channels of streams the origin relays to this edge, followed here or not: a datagram on
    /// one of those for a stream without viewers on this thread is another thread's.
    known_channels: HashSet<u32>,
    seed: u64,
    talking: super::talking::TalkingWatch,
    /// This thread's share of `EdgeMetrics::interned_names`, as last added.
    interned: u64,
}

impl Worker {
    pub fn new(
        socket: UdpSocket,
        link: LinkCtl,
        metrics: Arc<EdgeMetrics>,
        bell: Arc<Doorbell>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Worker> {
        Ok(Worker {
            shared,
            known_channels: HashSet::new(),
            peers: PeerSet::new(socket, bell, metrics.peers.clone())?,
            streams: HashMap::new(),
            channels: HashMap::new(),
            link,
            metrics,
            epoch: Instant::now(),
            next_tick_us: 0,
            touched: Vec::new(),
            seed: rand::random(),
            talking: Default::default(),
            interned: 0,
        })
    }

    /// The peers, and what handles their events: everything else of the thread.
    fn split(&mut self) -> (&mut PeerSet<Viewer>, ViewerEvents<'_>) {
        (
            &mut self.peers,
            ViewerEvents {
                streams: &mut self.streams,
                channels: &mut self.channels,
                link: &self.link,
                metrics: &self.metrics,
                shared: &self.shared,
            },
        )
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    pub fn run(mut self, rx: Receiver<EdgeCmd>, hb: &Heartbeat) {
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
            self.flush_touched();
            let now_us = self.now_us();
            if now_us >= self.next_tick_us {
                self.tick(now_us);
                self.next_tick_us = now_us + TICK_US;
            }
            let now = Instant::now();
            let tick_at = self.epoch + Duration::from_micros(self.next_tick_us);
            let (peers, mut app) = self.split();
            let next_peer = peers.timeouts(now, &mut app);
            let wait = if taken == CMD_BURST {
                Duration::ZERO
            } else {
                next_peer
                    .unwrap_or(tick_at)
                    .min(tick_at)
                    .saturating_duration_since(Instant::now())
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

    fn command(&mut self, cmd: EdgeCmd) {
        match cmd {
            EdgeCmd::Datagram(p) => {
                // Late video is still needed by the decoder (a frame spans packets); late audio
                // is only noise.
                if p.hdr.kind == Kind::Audio && p.arrived.elapsed() > super::MAX_RELAY_AGE {
                    self.metrics.dropped_stale.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.datagram(p.hdr, p.data)
            }
            EdgeCmd::LinkDown => self.link_down(),
            EdgeCmd::Sources {
                stream,
                channel,
                sources,
            } => self.sources(&stream, channel, sources),
            EdgeCmd::AddViewer(v) => self.add_viewer(*v),
            EdgeCmd::RemoveViewer(id) => {
                let (peers, mut app) = self.split();
                peers.close(id, CloseReason::Removed, &mut app);
            }
            EdgeCmd::Project(id, fixed) => self.project(id, fixed),
        }
    }

    fn add_viewer(&mut self, v: NewViewer) {
        let seed = self.seed ^ v.id.0;
        if !self.streams.contains_key(&v.stream) {
            info!(
                stream = v.stream.as_str(),
                "first viewer: subscribing at the origin"
            );
            self.link.send(LinkRequest::Subscribe(v.stream.clone()));
            self.streams.insert(v.stream.clone(), EdgeStream::new(seed));
            // Another media thread may already follow the stream: start from what the origin
            // announced then, instead of waiting for its next announcement.
            let cached = self
                .shared
                .sources
                .lock()
                .ok()
                .and_then(|c| c.get(&v.stream).cloned());
            if let Some((channel, sources)) = cached {
                self.sources(&v.stream, channel, sources);
            }
        }
        let st = self.streams.get_mut(&v.stream).expect("inserted above");
        let main_source = st.core.intern(v.pinned.as_deref().unwrap_or(""));
        let excluded: Vec<SourceIdx> = v.excluded.iter().map(|e| st.core.intern(e)).collect();
        let n = v.tracks.len() as u8;
        // Exclusion wins over pinning: a viewer that excludes its main source hears nothing there.
        let main_excluded = excluded.contains(&main_source);
        let group = st.core.join(GroupKey::new(n, Some(main_source), excluded));
        st.groups.entry(group).or_default().push(v.id);
        if !main_excluded {
            st.main_viewers.entry(main_source).or_default().push(v.id);
        }
        let mids: Vec<String> = v.tracks.iter().map(|m| m.to_string()).collect();
        st.viewers.insert(
            v.id,
            ViewerHandle {
                events: v.events.clone(),
                group,
                mids: mids.clone(),
            },
        );
        // What a new viewer must learn at once: every live source (the SDK plays nothing before
        // an `active`), then what each multiplexed track carries now.
        let mut live: Vec<&SourceInfo> = st.live.values().collect();
        live.sort_by_key(|i| i.index);
        for info in live {
            let _ = v.events.send(st.active(&v.stream, info));
        }
        let current: Vec<Option<SourceIdx>> = st.core.selector().tracks(group).collect();
        for (t, s) in current.into_iter().enumerate() {
            if let Some(s) = s {
                let _ = v
                    .events
                    .send(json!({"type": "event", "name": "vad", "data": {
                    "mediaId": mids[t], "sourceId": st.source_id(s)}}));
            }
        }
        // The newcomer learns the count at once; the others with the next coalesced broadcast
        // (one per stream per VIEWERCOUNT_INTERVAL: a join must not cost a message per viewer).
        let count = self.shared.count_viewers(&v.stream, 1);
        let _ = v.events.send(st.viewercount_event(count));
        info!(id = %v.id, stream = v.stream.as_str(), subscriber = v.subscriber_id.as_str(), tracks = n, pinned = ?v.pinned, excluded = v.excluded.len(), "viewer joined");
        debug!(id = %v.id, excluded = ?v.excluded, "viewer excludes");
        let viewer = Viewer {
            stream: v.stream,
            subscriber_id: v.subscriber_id,
            tracks_n: n,
            pinned: v.pinned,
            excluded: v.excluded,
            fixed: Vec::new(),
            group,
            main_source,
            main_audio: v.main_audio.map(|m| OutTrack::new(m, opus::CLOCK_RATE)),
            main_video: v.main_video.map(|m| OutTrack::new(m, 90_000)),
            tracks: v
                .tracks
                .into_iter()
                .map(|m| OutTrack::new(m, opus::CLOCK_RATE))
                .collect(),
            events: v.events,
            keys: v.keys,
        };
        self.metrics.viewers.fetch_add(1, Ordering::Relaxed);
        self.peers.insert(v.id, v.ufrag, v.rtc, viewer, v.slot);
    }

    fn project(&mut self, id: PeerId, fixed: Vec<(u8, String)>) {
        let now_us = self.now_us();
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        let v = &mut p.data;
        let Some(st) = self.streams.get_mut(&v.stream) else {
            return;
        };
        let excluded: Vec<SourceIdx> = v.excluded.iter().map(|e| st.core.intern(e)).collect();
        let fixed_idx: Vec<(u8, SourceIdx)> =
            fixed.iter().map(|(t, s)| (*t, st.core.intern(s))).collect();
        let key = GroupKey::new(v.tracks_n, Some(v.main_source), excluded).with_fixed(fixed_idx);
        let old = v.group;
        let before: Vec<Option<SourceIdx>> = st.core.selector().tracks(old).collect();
        let new = st.core.join_from(now_us, key, &before);
        if new != old {
            if let Some(g) = st.groups.get_mut(&old) {
                g.retain(|x| *x != id);
            }
            st.groups.entry(new).or_default().push(id);
            st.core.leave(old);
            v.group = new;
            if let Some(h) = st.viewers.get_mut(&id) {
                h.group = new;
            }
        } else {
            st.core.leave(new);
        }
        v.fixed = fixed;
        // The viewer's tracks now follow another group: tell it what changed.
        let current: Vec<Option<SourceIdx>> = st.core.selector().tracks(new).collect();
        for (t, s) in current.into_iter().enumerate() {
            if before.get(t) == Some(&s) {
                continue;
            }
            let source = s.map_or(Value::Null, |s| st.source_id(s));
            v.send(json!({"type": "event", "name": "vad", "data": {
                "mediaId": v.tracks[t].mid.to_string(), "sourceId": source}}));
        }
        info!(%id, fixed = ?v.fixed, "viewer projections changed");
    }

    fn sources(&mut self, stream: &str, channel: u32, sources: Vec<SourceInfo>) {
        let now_us = self.now_us();
        self.known_channels.insert(channel);
        let Some(st) = self.streams.get_mut(stream) else {
            return;
        };
        if let Some(old) = st.channel.replace(channel) {
            // Only this stream's own mapping goes: after a relink another stream may hold it.
            if old != channel && self.channels.get(&old).is_some_and(|s| s == stream) {
                self.channels.remove(&old);
            }
        }
        self.channels.insert(channel, stream.to_owned());
        let had_sources = !st.live.is_empty();
        // The list is complete: indices it does not name are no source of this stream any more.
        st.by_relay.clear();
        let mut seen = Vec::new();
        for info in sources {
            let name = info.source_id.clone().unwrap_or_default();
            let idx = st.core.intern(&name);
            seen.push(idx);
            st.by_relay.insert(info.index, idx);
            if !st.live.contains_key(&idx) {
                st.core.publish(
                    &name,
                    SourceConfig {
                        level_ext_id: info.audio_level.then_some(LEVEL_EXT_ID),
                    },
                );
                st.broadcast(&st.active(stream, &info));
                self.metrics
                    .active_events
                    .fetch_add(st.viewers.len() as u64, Ordering::Relaxed);
                info!(stream, source = ?info.source_id, "source active");
            }
            st.live.insert(idx, info);
        }
        let gone: Vec<SourceIdx> = st
            .live
            .keys()
            .copied()
            .filter(|s| !seen.contains(s))
            .collect();
        for s in gone {
            let info = st.live.remove(&s).expect("listed above");
            // The core may release the index (and reuse it for another name): nothing of this
            // edge may still route relay datagrams to it.
            st.by_relay.retain(|_, v| *v != s);
            st.source_gone(now_us, stream, s, &info, &self.metrics);
            info!(stream, source = ?info.source_id, "source inactive");
        }
        if had_sources && st.live.is_empty() {
            st.broadcast(
                &json!({"type": "event", "name": "stopped", "data": {"streamId": stream}}),
            );
        }
    }

    /// The origin link is gone. Every source its viewers were told is active goes `inactive`
    /// (their tracks empty, with `vad` events), and the channels and source indices of that link
    /// are forgotten: the next origin numbers them afresh, and its source list makes the sources
    /// `active` again with fresh voice activity. Viewers keep their sessions throughout.
    fn link_down(&mut self) {
        let now_us = self.now_us();
        self.channels.clear();
        self.known_channels.clear();
        for (name, st) in self.streams.iter_mut() {
            st.channel = None;
            st.by_relay.clear();
            let mut gone: Vec<(SourceIdx, SourceInfo)> = st.live.drain().collect();
            gone.sort_by_key(|(_, i)| i.index);
            for (s, info) in gone {
                st.source_gone(now_us, name, s, &info, &self.metrics);
            }
            info!(
                stream = name.as_str(),
                viewers = st.viewers.len(),
                "origin link lost: sources inactive until it is back"
            );
        }
    }

    fn tick(&mut self, now_us: u64) {
        for (name, st) in self.streams.iter_mut() {
            let mut changes: Vec<TrackChange> = Vec::new();
            st.core.tick(now_us, &mut |o| {
                if let Output::Track(c) = o {
                    changes.push(c)
                }
            });
            for c in &changes {
                st.vad(c, &self.metrics);
            }
            let due = st
                .last_viewercount_us
                .is_none_or(|t| now_us >= t + VIEWERCOUNT_INTERVAL_US);
            if due {
                let n = self.shared.viewers_of(name);
                if st.last_viewercount != Some(n) {
                    st.last_viewercount = Some(n);
                    st.last_viewercount_us = Some(now_us);
                    st.broadcast(&st.viewercount_event(n));
                }
            }
        }
        let cores = self.streams.iter().map(|(n, st)| (n, &st.core));
        self.talking.update(cores, now_us, &self.link);
        let interned: u64 = self
            .streams
            .values()
            .map(|st| st.core.interned() as u64)
            .sum();
        let before = std::mem::replace(&mut self.interned, interned);
        let gauge = &self.metrics.interned_names;
        if interned >= before {
            gauge.fetch_add(interned - before, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(before - interned, Ordering::Relaxed);
        }
    }

    fn datagram(&mut self, hdr: DatagramHeader, d: Bytes) {
        let now_us = self.now_us();
        let wall = Instant::now();
        let Some(st) = self
            .channels
            .get(&hdr.channel)
            .and_then(|n| self.streams.get_mut(n))
        else {
            if !self.known_channels.contains(&hdr.channel) {
                self.metrics
                    .dropped_unknown_channel
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        let Some(&src) = st.by_relay.get(&hdr.source) else {
            self.metrics.dropped_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let rtp = &d[DATAGRAM_HEADER..];
        let Ok(view) = RtpView::parse(rtp) else {
            self.metrics
                .dropped_malformed
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        // The payload is the datagram's own bytes: every viewer's write (and history) holds a
        // refcount, nobody copies it.
        let payload = d.slice_ref(view.payload());
        let level = view.extension(LEVEL_EXT_ID).and_then(parse_audio_level);
        let video = hdr.kind == Kind::Video;
        let input = InputPacket {
            source: src,
            ssrc: view.ssrc(),
            seq: view.sequence_number(),
            ts: view.timestamp(),
            marker: view.marker(),
            samples: if video {
                VIDEO_FRAME
            } else {
                opus::packet_info(view.payload()).map_or(960, |i| i.samples)
            },
        };
        // The main tracks: the pinned (or main) source, straight through.
        if let Some(ids) = st.main_viewers.get(&src) {
            for &id in ids {
                // Nothing is written before DTLS is up: str0m would only queue it.
                let Some((data, out)) = self.peers.writer(id) else {
                    continue;
                };
                let (track, lvl) = if video {
                    (&mut data.main_video, None)
                } else {
                    (&mut data.main_audio, level)
                };
                let Some(t) = track else {
                    continue;
                };
                match t.write(out, now_us, wall, &input, lvl, &payload) {
                    Sent::Str0m => self.touched.push(id),
                    Sent::Direct => {}
                    Sent::Dropped(why) => count_not_sent(&self.metrics, why),
                }
            }
        }
        // The multiplexed tracks: the packet core decides who hears this source.
        if !video {
            let peers = &mut self.peers;
            let touched = &mut self.touched;
            let metrics = &self.metrics;
            let mut sent = 0u64;
            let mut changes: Vec<TrackChange> = Vec::new();
            let groups = &st.groups;
            let late_before = st.core.stats().dropped_before_switch;
            let result = st.core.on_packet(now_us, src, rtp, &mut |o| match o {
                Output::Track(c) => changes.push(c),
                Output::Packet {
                    group,
                    track,
                    packet,
                } => {
                    let Ok(out) = RtpView::parse(packet) else {
                        return;
                    };
                    // The group's stream is already one continuous stream; each viewer
                    // re-anchors it only when it moves to another group.
                    let input = InputPacket {
                        source: SourceIdx(u32::MAX - group.0),
                        ssrc: out.ssrc(),
                        seq: out.sequence_number(),
                        ts: out.timestamp(),
                        marker: out.marker(),
                        samples: input.samples,
                    };
                    for &id in groups.get(&group).map(Vec::as_slice).unwrap_or(&[]) {
                        let Some((data, out)) = peers.writer(id) else {
                            continue;
                        };
                        let Some(t) = data.tracks.get_mut(track as usize) else {
                            continue;
                        };
                        match t.write(out, now_us, wall, &input, level, &payload) {
                            Sent::Dropped(why) => count_not_sent(metrics, why),
                            Sent::Str0m => {
                                touched.push(id);
                                sent += 1;
                            }
                            Sent::Direct => sent += 1,
                        }
                    }
                }
            });
            metrics.packets_out.fetch_add(sent, Ordering::Relaxed);
            if let Err(e) = result {
                metrics.dropped_core.fetch_add(1, Ordering::Relaxed);
                debug!("relayed packet dropped by the core: {e}");
            }
            let late = st.core.stats().dropped_before_switch - late_before;
            metrics
                .dropped_before_switch
                .fetch_add(late, Ordering::Relaxed);
            // A vad event leaves before the first packet it announces is flushed below.
            for c in &changes {
                st.vad(c, metrics);
            }
        }
    }
}

fn count_not_sent(m: &EdgeMetrics, why: NotSent) {
    let c = match why {
        NotSent::BeforeSwitch => &m.dropped_viewer_before_switch,
        NotSent::NotNegotiated => &m.dropped_not_negotiated,
        NotSent::Seal => &m.dropped_seal,
    };
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
#[path = "worker_link_tests.rs"]
mod link_tests;
