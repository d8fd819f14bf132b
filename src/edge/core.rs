//! The edge core: every decision of an edge media thread, sans-IO, in the shape of quinn-proto's
//! `Connection`. Inputs are `handle_*` calls with `now` (µs since an epoch the driver owns, the
//! packet core's clock: the only clock here); outputs are polled with [`EdgeCore::poll_output`],
//! one ordered queue, so an event that announces a track change leaves before the first packet
//! it brings by construction, however many packets a round holds. No sockets, no peers, no
//! channels: the driver (`worker.rs`) feeds it and acts on what it polls, in order.
//!
//! A relayed packet is parsed once here ([`RtpView`]); the packet core takes the view and emits,
//! per (group, track), the rewritten header fields; each viewer of the group gets a [`Write`] of
//! them, with its level and the payload as a slice of the relayed datagram (no copy).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use str0m::media::Mid;
use tracing::{debug, info};

use super::board::{GroupBoard, StreamBoard, TrackBoard, BOARD_EVERY_US};
use super::events::{ActiveSource, ViewerEvent};
use super::lanes::{GroupTrack, Lanes, Queued};
use super::talking::{TalkingSink, TalkingWatch};
use super::{EdgeMetrics, Shared};
use crate::media::opus;
use crate::media::red::{RedLayout, RELAY_OPUS_PT, RELAY_RED_PT};
use crate::media::rewrite::{Feed, InputPacket, Rewritten};
use crate::media::rtp::{parse_audio_level, RtpView};
use crate::media::selection::{GroupId, GroupKey, TrackChange};
use crate::media::stream::{
    CoreConfig, Output as CoreOutput, SourceConfig, StreamCore, PREROLL_SLOTS,
};
use crate::media::SourceIdx;
use crate::relay::client::LinkRequest;
use crate::relay::proto::{DatagramHeader, Kind, SourceInfo, DATAGRAM_HEADER, LEVEL_EXT_ID};
use crate::rtc::peers::PeerId;

/// Selection runs this often per stream: one ranking per stream per tick, half a 20 ms frame, so
/// an onset missed by `on_onset` is still picked up within a frame.
pub(crate) const TICK_US: u64 = 10_000;
/// A viewer's keyframe requests reach the origin at most this often per stream: one keyframe a
/// second serves every viewer that joined or lost packets meanwhile, and a crowd asking at once
/// must not make the publisher send nothing but keyframes.
pub(crate) const KEYFRAME_INTERVAL_US: u64 = 1_000_000;
/// Video packet duration used when a main video track switches publication (30 fps at 90 kHz).
pub(crate) const VIDEO_FRAME: u32 = 3000;
/// `viewercount` goes to a stream's viewers at most this often, when the count changed: a crowd
/// joining must not cost a message per viewer per join.
pub(crate) const VIEWERCOUNT_INTERVAL_US: u64 = 1_000_000;
/// Relayed audio older than [`super::MAX_RELAY_AGE`] is dropped, in the core's clock.
pub(crate) const MAX_RELAY_AGE_US: u64 = super::MAX_RELAY_AGE.as_micros() as u64;

/// Which of a viewer's tracks a write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackRef {
    /// The main audio track (the pinned source, or the stream's main source).
    MainAudio,
    /// The main video track.
    MainVideo,
    /// Multiplexed track k (its index among the viewer's multiplexed m-lines).
    Mux(u8),
}

/// One packet for one viewer's track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The viewer it goes to.
    pub viewer: PeerId,
    /// Which of its tracks.
    pub track: TrackRef,
    /// The header fields the viewer's own numbering starts from: the group's rewritten fields
    /// (fed by the group's track) or, on a main track, the publisher's (fed by the source).
    pub input: InputPacket,
    /// RFC 6464 (voice, level), when the publisher sent one.
    pub level: Option<(bool, u8)>,
    /// The Opus (or video) payload: a slice of the relayed datagram.
    pub payload: Bytes,
    /// Its RED layout, when the publisher sends RED (then the viewer's negotiation decides
    /// between RED and the primary block alone).
    pub red: Option<RedLayout>,
    /// How far back a RED block may point and still be audio of the group track's current
    /// feed ([`Rewritten::reach`]); `u32::MAX` on a main track, whose only feed changes are the
    /// viewer's own re-anchors.
    pub reach: u32,
}

/// What the core asks of its driver, in the order it must be done.
#[derive(Debug)]
pub enum Output {
    /// Send a packet to a viewer's track.
    Write(Write),
    /// Send an event to a viewer's signalling socket.
    Event(PeerId, ViewerEvent),
    /// Ask the origin link for something.
    Link(LinkRequest),
}

impl Queued for Output {
    fn viewer(&self) -> Option<PeerId> {
        match self {
            Output::Write(w) => Some(w.viewer),
            Output::Event(id, _) => Some(*id),
            Output::Link(_) => None,
        }
    }
}

/// One relayed datagram, as the link's reader took it.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// Its relay header.
    pub hdr: DatagramHeader,
    /// The whole datagram; the RTP packet starts at [`DATAGRAM_HEADER`].
    pub data: Bytes,
    /// When it arrived, in the core's clock: its age decides whether it is still worth sending.
    pub arrived_us: u64,
}

/// A viewer joining: what its `view` asked for and what its offer negotiated.
#[derive(Debug, Clone, Default)]
pub struct Join {
    /// The stream to view.
    pub stream: String,
    /// The sourceId pinned to the main tracks; None = the main source.
    pub pinned: Option<String>,
    /// sourceIds never to play in its multiplexed tracks.
    pub excluded: Vec<String>,
    /// Its main video m-line, if any (keyframe requests on it go to the origin).
    pub main_video: Option<Mid>,
    /// The mids of its multiplexed tracks, in order.
    pub tracks: Vec<Mid>,
}

/// A viewer's projections as its last `project`/`unproject` left them, all of them at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projection {
    /// (multiplexed track index, sourceId): that source stays in that track.
    pub fixed: Vec<(u8, String)>,
    /// The source projected into the main tracks (None: the pinned one, as `view` asked).
    pub main: Option<String>,
    /// Multiplexed tracks the viewer added after its offer (the SDK's `addRemoteTrack`, which
    /// renegotiates only locally), by mid: they follow the offer's tracks, in this order. A
    /// track once added stays.
    pub added: Vec<Mid>,
}

/// What the core knows of a viewer. Its group is stored here, and only here.
struct ViewerState {
    stream: Arc<str>,
    group: GroupId,
    /// The source its `view` pinned (or the stream's main source).
    pinned: SourceIdx,
    /// The source in its main tracks: the pinned one, or the one projected there.
    main_source: SourceIdx,
    /// Exclusion wins over pinning: a viewer that excludes its main source hears nothing there.
    main_excluded: bool,
    main_video: Option<Mid>,
    tracks: Vec<Mid>,
    excluded: Vec<String>,
}

/// A live source as the origin announced it.
struct LiveSource {
    /// Its index in the relay's datagrams.
    index: u16,
    name: Option<Arc<str>>,
    active: Arc<ActiveSource>,
}

/// One held packet's payload, RED layout and level, with the sequence number that names it.
type HeldPayload = (u16, Bytes, Option<RedLayout>, Option<(bool, u8)>);

/// The payloads of a source's last [`PREROLL_SLOTS`] packets, slotted by sequence number as the
/// packet core slots their headers: when the core replays one ([`CoreOutput::Preroll`]), its
/// bytes are here. Each is a slice of its relayed datagram (a reference count, no copy), so a
/// source pins at most that many received datagrams.
#[derive(Default)]
struct HeldPayloads([Option<HeldPayload>; PREROLL_SLOTS]);

impl HeldPayloads {
    fn hold(
        &mut self,
        seq: u16,
        payload: &Bytes,
        red: Option<RedLayout>,
        level: Option<(bool, u8)>,
    ) {
        self.0[seq as usize % PREROLL_SLOTS] = Some((seq, payload.clone(), red, level));
    }

    fn get(&self, seq: u16) -> Option<&HeldPayload> {
        self.0[seq as usize % PREROLL_SLOTS]
            .as_ref()
            .filter(|(s, ..)| *s == seq)
    }
}

struct EdgeStream {
    /// Its number on this thread, which names its group tracks in the output lanes.
    id: u32,
    name: Arc<str>,
    core: StreamCore,
    /// Relay source index -> core source.
    by_relay: HashMap<u16, SourceIdx>,
    live: HashMap<SourceIdx, LiveSource>,
    /// The payloads of each source's last packets, by core index (no hashing per packet), for
    /// the packet core's pre-roll.
    held: Vec<HeldPayloads>,
    /// Every viewer of the stream on this thread.
    viewers: Vec<PeerId>,
    /// Viewers by group id (the packet core's group ids are small and reused).
    groups: Vec<Vec<PeerId>>,
    main_viewers: HashMap<SourceIdx, Vec<PeerId>>,
    channel: Option<u32>,
    last_keyframe_us: Option<u64>,
    /// The edge-wide count this thread's viewers last heard, and when.
    last_viewercount: Option<usize>,
    last_viewercount_us: Option<u64>,
}

impl EdgeStream {
    fn new(id: u32, name: &str, seed: u64) -> Self {
        EdgeStream {
            id,
            name: name.into(),
            core: StreamCore::new(CoreConfig {
                seed,
                ..CoreConfig::default()
            }),
            by_relay: HashMap::new(),
            live: HashMap::new(),
            held: Vec::new(),
            viewers: Vec::new(),
            groups: Vec::new(),
            main_viewers: HashMap::new(),
            channel: None,
            last_keyframe_us: None,
            last_viewercount: None,
            last_viewercount_us: None,
        }
    }

    fn group_mut(&mut self, g: GroupId) -> &mut Vec<PeerId> {
        let i = g.0 as usize;
        if self.groups.len() <= i {
            self.groups.resize_with(i + 1, Vec::new);
        }
        &mut self.groups[i]
    }

    fn broadcast(&self, out: &mut Lanes<Output>, ev: &ViewerEvent) {
        for &id in &self.viewers {
            out.push_back(Output::Event(id, ev.clone()));
        }
    }

    /// A source's sourceId for the dashboard (None: the main source).
    fn named(&self, s: SourceIdx) -> Option<Arc<str>> {
        match self.core.name(s) {
            "" => None,
            n => Some(
                self.live
                    .get(&s)
                    .and_then(|l| l.name.clone())
                    .unwrap_or_else(|| n.into()),
            ),
        }
    }

    /// The stream's groups as the dashboard shows them.
    fn board(&self) -> StreamBoard {
        let sel = self.core.selector();
        let groups = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, viewers)| !viewers.is_empty())
            .filter_map(|(i, viewers)| {
                let id = GroupId(i as u32);
                let key = sel.group_key(id)?;
                let tracks = sel
                    .tracks(id)
                    .map(|s| s.map_or(TrackBoard::Empty, |s| TrackBoard::Source(self.named(s))))
                    .collect();
                Some(GroupBoard {
                    id: id.0,
                    viewers: viewers.len(),
                    main: key.pinned().and_then(|p| self.named(p)),
                    excluded: key.excluded().len(),
                    fixed: key.fixed().len(),
                    tracks,
                })
            })
            .collect();
        StreamBoard {
            stream: self.name.clone(),
            groups,
        }
    }
}

/// The sourceId a track change names (None: the main source, or an empty track).
fn source_name(live: &HashMap<SourceIdx, LiveSource>, s: Option<SourceIdx>) -> Option<Arc<str>> {
    live.get(&s?).and_then(|l| l.name.clone())
}

/// Tells the viewers of the change's group which source its track now carries.
fn vad(
    c: &TrackChange,
    groups: &[Vec<PeerId>],
    live: &HashMap<SourceIdx, LiveSource>,
    viewers: &HashMap<PeerId, ViewerState>,
    (stream, out): (u32, &mut Lanes<Output>),
    metrics: &EdgeMetrics,
) {
    metrics.switches.fetch_add(1, Ordering::Relaxed);
    let Some(ids) = groups.get(c.group.0 as usize) else {
        return;
    };
    let source = source_name(live, c.source);
    // Behind whatever the track still has waiting in the replay lane.
    let gt = GroupTrack {
        stream,
        group: c.group,
        track: c.track,
    };
    for id in ids {
        if let Some(mid) = viewers.get(id).and_then(|v| v.tracks.get(c.track as usize)) {
            let ev = ViewerEvent::Vad {
                mid: *mid,
                source: source.clone(),
            };
            out.push_group(gt, false, Output::Event(*id, ev));
            metrics.vad_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Talking flips go out as link requests, in order with everything else.
struct LinkOut<'a>(&'a mut Lanes<Output>);

impl TalkingSink for LinkOut<'_> {
    fn talking(&mut self, stream: &str, source: &str, talking: bool) {
        self.0.push_back(Output::Link(LinkRequest::Talking {
            stream: stream.to_owned(),
            source: source.to_owned(),
            talking,
        }));
    }
}

/// One media thread's decisions: its streams, their packet cores, its viewers' groups.
pub struct EdgeCore {
    streams: HashMap<String, EdgeStream>,
    channels: HashMap<u32, String>,
    /// Channels of streams the origin relays to this edge, followed here or not: a datagram on
    /// one of those for a stream without viewers on this thread is another thread's.
    known_channels: HashSet<u32>,
    viewers: HashMap<PeerId, ViewerState>,
    out: Lanes<Output>,
    /// The number the next stream gets ([`EdgeStream::id`]).
    next_stream_id: u32,
    metrics: Arc<EdgeMetrics>,
    /// What the origin last announced per stream, and the edge's viewer counts, shared by the
    /// edge's media threads.
    shared: Arc<Shared>,
    seed: u64,
    next_tick_us: u64,
    talking: TalkingWatch,
    /// This thread's share of `EdgeMetrics::interned_names`, as last added.
    interned: u64,
    /// Its place in `Shared::boards`, and when its board is due next while a dashboard watches.
    board_slot: usize,
    next_board_us: u64,
}

impl EdgeCore {
    /// An empty core; `seed` seeds its rewriters' SSRCs and starting numbers.
    pub fn new(metrics: Arc<EdgeMetrics>, shared: Arc<Shared>, seed: u64) -> Self {
        EdgeCore {
            board_slot: shared.boards.slot(),
            next_board_us: 0,
            streams: HashMap::new(),
            channels: HashMap::new(),
            known_channels: HashSet::new(),
            viewers: HashMap::new(),
            out: Lanes::default(),
            next_stream_id: 0,
            metrics,
            shared,
            seed,
            next_tick_us: 0,
            talking: TalkingWatch::default(),
            interned: 0,
        }
    }

    /// The next thing to do, in order: everything live first, then a switch's replay (see
    /// [`super::lanes`]).
    pub fn poll_output(&mut self) -> Option<Output> {
        let mut unbounded = usize::MAX;
        self.out.pop(&mut unbounded)
    }

    /// The same, with the replay lane bounded: each replayed output takes one from `budget`,
    /// each live one adds one. None also when replayed outputs wait beyond the budget
    /// ([`replay_waiting`](Self::replay_waiting)).
    pub(crate) fn poll_output_within(&mut self, budget: &mut usize) -> Option<Output> {
        self.out.pop(budget)
    }

    /// Whether replayed outputs still wait: the driver comes back for them without sleeping.
    pub(crate) fn replay_waiting(&self) -> bool {
        self.out.replay_waiting()
    }

    /// The output `k` places behind the next [`poll_output`](Self::poll_output) would give, to
    /// look ahead (the driver prefetches the viewers the coming writes go to).
    pub(crate) fn peek_output(&self, k: usize) -> Option<&Output> {
        self.out.get(k)
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    pub fn poll_timeout(&self) -> u64 {
        self.next_tick_us
    }

    /// The tick: selection, coalesced `viewercount`, talking reports, gauges.
    pub fn handle_timeout(&mut self, now_us: u64) {
        if now_us < self.next_tick_us {
            return;
        }
        self.next_tick_us = now_us + TICK_US;
        let EdgeCore {
            streams,
            viewers,
            out,
            metrics,
            shared,
            talking,
            ..
        } = self;
        for (name, st) in streams.iter_mut() {
            let sid = st.id;
            let EdgeStream {
                core,
                groups,
                live,
                held,
                ..
            } = &mut *st;
            core.tick(now_us, &mut |o| {
                track_output(o, groups, live, held, viewers, (sid, &mut *out), metrics);
            });
            out.count_dropped(metrics);
            let due = st
                .last_viewercount_us
                .is_none_or(|t| now_us >= t + VIEWERCOUNT_INTERVAL_US);
            if due {
                let n = shared.viewers_of(name);
                if st.last_viewercount != Some(n) {
                    st.last_viewercount = Some(n);
                    st.last_viewercount_us = Some(now_us);
                    st.broadcast(out, &ViewerEvent::ViewerCount(n));
                }
            }
        }
        let cores = streams.iter().map(|(n, st)| (n, &st.core));
        talking.update(cores, now_us, &mut LinkOut(out));
        let interned: u64 = streams.values().map(|st| st.core.interned() as u64).sum();
        let before = std::mem::replace(&mut self.interned, interned);
        let gauge = &self.metrics.interned_names;
        if interned >= before {
            gauge.fetch_add(interned - before, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(before - interned, Ordering::Relaxed);
        }
        if self.shared.boards.watched() && now_us >= self.next_board_us {
            self.next_board_us = now_us + BOARD_EVERY_US;
            let board = self.streams.values().map(|st| st.board()).collect();
            self.shared.boards.put(self.board_slot, board);
        }
    }

    /// A viewer joins (its peer is the driver's). It hears at once every live source (`active`:
    /// the SDK plays nothing before one), what each multiplexed track carries now (`vad`), and
    /// the viewer count; the first viewer of a stream subscribes to it.
    pub fn handle_join(&mut self, now_us: u64, id: PeerId, j: Join) {
        if !self.streams.contains_key(&j.stream) {
            info!(
                stream = j.stream.as_str(),
                "first viewer: subscribing at the origin"
            );
            self.out
                .push_back(Output::Link(LinkRequest::Subscribe(j.stream.clone())));
            let seed = self.seed ^ id.0;
            self.streams.insert(
                j.stream.clone(),
                EdgeStream::new(self.next_stream_id, &j.stream, seed),
            );
            self.next_stream_id = self.next_stream_id.wrapping_add(1);
            // Another media thread may already follow the stream: start from what the origin
            // announced then, instead of waiting for its next announcement.
            let cached = self
                .shared
                .sources
                .lock()
                .ok()
                .and_then(|c| c.get(&j.stream).cloned());
            if let Some((channel, sources)) = cached {
                self.handle_sources(now_us, &j.stream, channel, sources);
            }
        }
        let st = self.streams.get_mut(&j.stream).expect("inserted above");
        let main_source = st.core.intern(j.pinned.as_deref().unwrap_or(""));
        let excluded: Vec<SourceIdx> = j.excluded.iter().map(|e| st.core.intern(e)).collect();
        let n = j.tracks.len() as u8;
        let main_excluded = excluded.contains(&main_source);
        let group = st.core.join(GroupKey::new(n, Some(main_source), excluded));
        st.group_mut(group).push(id);
        if !main_excluded {
            st.main_viewers.entry(main_source).or_default().push(id);
        }
        st.viewers.push(id);
        let mut live: Vec<&LiveSource> = st.live.values().collect();
        live.sort_by_key(|l| l.index);
        for l in live {
            self.out
                .push_back(Output::Event(id, ViewerEvent::Active(l.active.clone())));
        }
        for (t, s) in st.core.selector().tracks(group).enumerate() {
            if let (Some(s), Some(mid)) = (s, j.tracks.get(t)) {
                let source = source_name(&st.live, Some(s));
                self.out
                    .push_back(Output::Event(id, ViewerEvent::Vad { mid: *mid, source }));
            }
        }
        // The newcomer learns the count at once; the others with the next coalesced broadcast.
        let count = self.shared.count_viewers(&j.stream, 1);
        self.out
            .push_back(Output::Event(id, ViewerEvent::ViewerCount(count)));
        self.metrics.viewers.fetch_add(1, Ordering::Relaxed);
        debug!(%id, excluded = ?j.excluded, "viewer excludes");
        self.viewers.insert(
            id,
            ViewerState {
                stream: st.name.clone(),
                group,
                pinned: main_source,
                main_source,
                main_excluded,
                main_video: j.main_video,
                tracks: j.tracks,
                excluded: j.excluded,
            },
        );
    }

    /// A viewer left; the last one of a stream unsubscribes from it.
    pub(crate) fn handle_leave(&mut self, id: PeerId) {
        let Some(v) = self.viewers.remove(&id) else {
            return;
        };
        self.metrics.viewers.fetch_sub(1, Ordering::Relaxed);
        self.shared.count_viewers(&v.stream, -1);
        let Some(st) = self.streams.get_mut(&*v.stream) else {
            return;
        };
        st.viewers.retain(|x| *x != id);
        st.group_mut(v.group).retain(|x| *x != id);
        self.out.forget(st.id, v.group, id);
        st.core.leave(v.group);
        if !v.main_excluded {
            if let Some(m) = st.main_viewers.get_mut(&v.main_source) {
                m.retain(|x| *x != id);
                if m.is_empty() {
                    st.main_viewers.remove(&v.main_source);
                }
            }
        }
        if st.viewers.is_empty() {
            if let Some(c) = st.channel {
                if self.channels.get(&c).is_some_and(|s| **s == *v.stream) {
                    self.channels.remove(&c);
                }
            }
            self.streams.remove(&*v.stream);
            self.out
                .push_back(Output::Link(LinkRequest::Unsubscribe(v.stream.to_string())));
            info!(stream = &*v.stream, "last viewer gone: unsubscribed");
        }
    }

    /// Sets a viewer's projections ([`Projection`]): it moves to the group of its new key
    /// (more tracks if it added some, another main source if one is projected there) and hears
    /// `vad` for every multiplexed track that changed.
    pub(crate) fn handle_project(&mut self, now_us: u64, id: PeerId, p: &Projection) {
        let Some(v) = self.viewers.get_mut(&id) else {
            return;
        };
        let Some(st) = self.streams.get_mut(&*v.stream) else {
            return;
        };
        for mid in &p.added {
            if !v.tracks.contains(mid) && v.tracks.len() < super::MAX_TRACKS {
                v.tracks.push(*mid);
            }
        }
        let excluded: Vec<SourceIdx> = v.excluded.iter().map(|e| st.core.intern(e)).collect();
        let main = p.main.as_deref().map_or(v.pinned, |m| st.core.intern(m));
        if main != v.main_source {
            if !v.main_excluded {
                if let Some(m) = st.main_viewers.get_mut(&v.main_source) {
                    m.retain(|x| *x != id);
                    if m.is_empty() {
                        st.main_viewers.remove(&v.main_source);
                    }
                }
            }
            v.main_source = main;
            // Exclusion still wins: a projected source the view excludes plays nowhere.
            v.main_excluded = excluded.contains(&main);
            if !v.main_excluded {
                st.main_viewers.entry(main).or_default().push(id);
            }
        }
        let fixed_idx: Vec<(u8, SourceIdx)> = p
            .fixed
            .iter()
            .map(|(t, s)| (*t, st.core.intern(s)))
            .collect();
        let key = GroupKey::new(v.tracks.len() as u8, Some(v.main_source), excluded)
            .with_fixed(fixed_idx);
        let old = v.group;
        let before: Vec<Option<SourceIdx>> = st.core.selector().tracks(old).collect();
        let new = st.core.join_from(now_us, key, &before);
        st.core.leave(old);
        if new != old {
            st.group_mut(old).retain(|x| *x != id);
            st.group_mut(new).push(id);
            v.group = new;
            // Its old group's replay is not its stream any more.
            self.out.forget(st.id, old, id);
        }
        for (t, s) in st.core.selector().tracks(new).enumerate() {
            // A track added empty says nothing until a source enters it.
            if before.get(t).map_or(s.is_none(), |b| *b == s) {
                continue;
            }
            if let Some(mid) = v.tracks.get(t) {
                let source = source_name(&st.live, s);
                self.out
                    .push_back(Output::Event(id, ViewerEvent::Vad { mid: *mid, source }));
            }
        }
        info!(%id, ?p, "viewer projections changed");
    }

    /// A viewer asked for a keyframe on `mid`: passed to the origin if it is its main video, at
    /// most once per [`KEYFRAME_INTERVAL_US`] per stream.
    pub(crate) fn handle_keyframe_request(&mut self, now_us: u64, id: PeerId, mid: Mid) {
        let Some(v) = self.viewers.get(&id) else {
            return;
        };
        if v.main_video != Some(mid) {
            return;
        }
        let Some(st) = self.streams.get_mut(&*v.stream) else {
            return;
        };
        let due = st
            .last_keyframe_us
            .is_none_or(|t| now_us >= t + KEYFRAME_INTERVAL_US);
        if !due {
            return;
        }
        st.last_keyframe_us = Some(now_us);
        let source = match st.core.name(v.main_source) {
            "" => None,
            n => Some(n.to_owned()),
        };
        debug!(%id, stream = &*v.stream, "keyframe request sent to the origin");
        self.out.push_back(Output::Link(LinkRequest::Keyframe {
            stream: v.stream.to_string(),
            source,
        }));
    }

    /// The origin's complete source list for a stream, on `channel`.
    pub fn handle_sources(
        &mut self,
        now_us: u64,
        stream: &str,
        channel: u32,
        sources: Vec<SourceInfo>,
    ) {
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
        // The list is complete: indices it does not name are no source of this stream any more.
        st.by_relay.clear();
        let mut seen = Vec::new();
        for info in sources {
            let name = info.source_id.clone().unwrap_or_default();
            let idx = st.core.intern(&name);
            seen.push(idx);
            st.by_relay.insert(info.index, idx);
            let media: Vec<String> = info.tracks.iter().map(|t| t.media.clone()).collect();
            if let Some(l) = st.live.get_mut(&idx) {
                l.index = info.index;
                // Same source, other tracks (a takeover by a feed with video, say): Millicast's
                // `updated`, with the tracks it has now.
                if l.active.media != media {
                    l.active = Arc::new(ActiveSource {
                        stream: st.name.clone(),
                        source: l.name.clone(),
                        media,
                    });
                    let ev = ViewerEvent::Updated(l.active.clone());
                    for &id in &st.viewers {
                        self.out.push_back(Output::Event(id, ev.clone()));
                    }
                    info!(stream, source = ?info.source_id, "source updated");
                }
                continue;
            }
            st.core.publish(
                &name,
                SourceConfig {
                    level_ext_id: info.audio_level.then_some(LEVEL_EXT_ID),
                },
            );
            // A new publication holds nothing yet (the core starts it afresh too).
            let i = idx.0 as usize;
            if st.held.len() <= i {
                st.held.resize_with(i + 1, HeldPayloads::default);
            }
            st.held[i] = HeldPayloads::default();
            let source: Option<Arc<str>> = info.source_id.as_deref().map(Arc::from);
            let active = Arc::new(ActiveSource {
                stream: st.name.clone(),
                source: source.clone(),
                media,
            });
            st.broadcast(&mut self.out, &ViewerEvent::Active(active.clone()));
            self.metrics
                .active_events
                .fetch_add(st.viewers.len() as u64, Ordering::Relaxed);
            info!(stream, source = ?info.source_id, "source active");
            st.live.insert(
                idx,
                LiveSource {
                    index: info.index,
                    name: source,
                    active,
                },
            );
        }
        let mut gone: Vec<SourceIdx> = st
            .live
            .keys()
            .copied()
            .filter(|s| !seen.contains(s))
            .collect();
        gone.sort_unstable();
        for s in gone {
            // The core may release the index (and reuse it for another name): nothing of this
            // edge may still route relay datagrams to it.
            st.by_relay.retain(|_, v| *v != s);
            source_gone(now_us, st, s, &self.viewers, &mut self.out, &self.metrics);
        }
        // No `stopped` when the last source goes: a stage is empty between talkers, after a
        // demotion, while a publisher reconnects, and an app that ends its view on `stopped`
        // (Millicast's "disconnected from the publisher") would lose its listeners in a pause.
        // The last `inactive` says the stage is empty; `stopped` comes when the server ends
        // the view (`http::signal`).
    }

    /// The origin link is gone. Every source its viewers were told is active goes `inactive`
    /// (their tracks empty, with `vad` events), and the channels and source indices of that link
    /// are forgotten: the next origin numbers them afresh, and its source list makes the sources
    /// `active` again with fresh voice activity. Viewers keep their sessions throughout.
    pub(crate) fn handle_link_down(&mut self, now_us: u64) {
        self.channels.clear();
        self.known_channels.clear();
        self.streams_down(now_us, |_| true);
    }

    /// One origin link of several is gone, or these streams moved to another origin (a new
    /// lease holder): as [`Self::handle_link_down`], for these streams only. Their channels
    /// are forgotten; the other links' streams keep theirs.
    pub(crate) fn handle_streams_down(&mut self, now_us: u64, streams: &[String]) {
        for name in streams {
            if let Some(c) = self.streams.get(name.as_str()).and_then(|st| st.channel) {
                self.channels.remove(&c);
                self.known_channels.remove(&c);
            }
        }
        self.streams_down(now_us, |name| streams.iter().any(|s| s == name));
    }

    fn streams_down(&mut self, now_us: u64, which: impl Fn(&str) -> bool) {
        for st in self.streams.values_mut().filter(|st| which(&st.name)) {
            st.channel = None;
            st.by_relay.clear();
            let mut gone: Vec<(u16, SourceIdx)> =
                st.live.iter().map(|(s, l)| (l.index, *s)).collect();
            gone.sort_unstable();
            for (_, s) in gone {
                source_gone(now_us, st, s, &self.viewers, &mut self.out, &self.metrics);
            }
            info!(
                stream = &*st.name,
                viewers = st.viewers.len(),
                "origin link lost: sources inactive until it is back"
            );
        }
    }

    /// A relayed packet: one parse, then the main tracks of the viewers who pinned its source
    /// (straight through) and, for audio, the multiplexed tracks the packet core gives it.
    pub fn handle_packet(&mut self, now_us: u64, p: Relayed) {
        let m = &*self.metrics;
        // Late video is still needed by the decoder (a frame spans packets); late audio is only
        // noise.
        let video = p.hdr.kind == Kind::Video;
        if !video && now_us.saturating_sub(p.arrived_us) > MAX_RELAY_AGE_US {
            m.dropped_stale.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(st) = self
            .channels
            .get(&p.hdr.channel)
            .and_then(|n| self.streams.get_mut(n))
        else {
            if !self.known_channels.contains(&p.hdr.channel) {
                m.dropped_unknown_channel.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        let Some(&src) = st.by_relay.get(&p.hdr.source) else {
            m.dropped_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(rtp) = p.data.get(DATAGRAM_HEADER..) else {
            m.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(view) = RtpView::parse(rtp) else {
            m.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let red = match view.payload_type() {
            RELAY_RED_PT if !video => match RedLayout::parse(view.payload(), RELAY_OPUS_PT) {
                Ok(l) => Some(l),
                // End-to-end encrypted RED (or broken): whole, to RED viewers only.
                Err(_) => {
                    m.red_opaque.fetch_add(1, Ordering::Relaxed);
                    Some(RedLayout::opaque(view.payload().len()))
                }
            },
            _ => None,
        };
        let start = DATAGRAM_HEADER + view.header_len();
        let payload = p.data.slice(start..start + view.payload().len());
        let level = view.extension(LEVEL_EXT_ID).and_then(parse_audio_level);
        let samples = if video {
            VIDEO_FRAME
        } else {
            // From the timestamps (as of the source's last packet), never from the payload,
            // which may be end-to-end encrypted.
            st.core.frame_samples(src)
        };
        let out = &mut self.out;
        if let Some(ids) = st.main_viewers.get(&src) {
            let input = InputPacket {
                source: Feed::Source(src),
                ssrc: view.ssrc(),
                seq: view.sequence_number(),
                ts: view.timestamp(),
                marker: view.marker(),
                samples,
            };
            let (track, level) = if video {
                (TrackRef::MainVideo, None)
            } else {
                (TrackRef::MainAudio, level)
            };
            for &viewer in ids {
                out.push_back(Output::Write(Write {
                    viewer,
                    track,
                    input,
                    level,
                    payload: payload.clone(),
                    red,
                    reach: u32::MAX,
                }));
            }
        }
        if video {
            return;
        }
        let sid = st.id;
        let EdgeStream {
            core,
            groups,
            live,
            held,
            ..
        } = st;
        let viewers = &self.viewers;
        let late_before = core.stats().dropped_before_switch;
        let pkt = (&payload, red.as_ref());
        let result = core.on_rtp(now_us, src, &view, red.as_ref(), &mut |o| match o {
            CoreOutput::Track(c) => vad(&c, groups, live, viewers, (sid, &mut *out), m),
            CoreOutput::Packet {
                group,
                track,
                header,
                samples,
            } => {
                let p = (pkt.0, pkt.1, false);
                write_group(
                    group,
                    track,
                    header,
                    samples,
                    level,
                    p,
                    groups,
                    (sid, &mut *out),
                )
            }
            other => track_output(other, groups, live, held, viewers, (sid, &mut *out), m),
        });
        out.count_dropped(m);
        match result {
            // Held as the core holds its header: after it was handled.
            Ok(()) => {
                if let Some(h) = held.get_mut(src.0 as usize) {
                    h.hold(view.sequence_number(), &payload, red, level);
                }
            }
            Err(e) => {
                m.dropped_core.fetch_add(1, Ordering::Relaxed);
                debug!("relayed packet dropped by the core: {e}");
            }
        }
        let late = core.stats().dropped_before_switch - late_before;
        if late > 0 {
            m.dropped_before_switch.fetch_add(late, Ordering::Relaxed);
        }
    }
}

/// A source left the stream (or the link that announced it): its tracks empty, with `vad`
/// events, and the viewers hear `inactive`. It leaves `live` first: the sources the selector
/// moves into its tracks are still there, named.
fn source_gone(
    now_us: u64,
    st: &mut EdgeStream,
    s: SourceIdx,
    viewers: &HashMap<PeerId, ViewerState>,
    out: &mut Lanes<Output>,
    metrics: &EdgeMetrics,
) {
    let Some(gone) = st.live.remove(&s) else {
        return;
    };
    let sid = st.id;
    let EdgeStream {
        core,
        groups,
        live,
        held,
        ..
    } = &mut *st;
    core.unpublish(now_us, s, &mut |o| {
        track_output(o, groups, live, held, viewers, (sid, &mut *out), metrics);
    });
    out.count_dropped(metrics);
    // Its datagrams go now, not when the index is reused.
    if let Some(h) = held.get_mut(s.0 as usize) {
        *h = HeldPayloads::default();
    }
    let ev = ViewerEvent::Inactive {
        stream: st.name.clone(),
        source: gone.name,
    };
    st.broadcast(out, &ev);
    info!(stream = &*st.name, source = ?gone.active.source, "source inactive");
}

/// What the packet core says besides the packet being handled (which only `handle_packet` has
/// the payload of): track changes, the pre-roll a track replays when a source enters it, and the
/// silence that ends an emptied track.
fn track_output(
    o: CoreOutput,
    groups: &[Vec<PeerId>],
    live: &HashMap<SourceIdx, LiveSource>,
    held: &[HeldPayloads],
    viewers: &HashMap<PeerId, ViewerState>,
    out: (u32, &mut Lanes<Output>),
    metrics: &EdgeMetrics,
) {
    match o {
        CoreOutput::Track(c) => vad(&c, groups, live, viewers, out, metrics),
        CoreOutput::Ending {
            group,
            track,
            header,
        } => write_ending(group, track, header, groups, out),
        CoreOutput::Preroll {
            group,
            track,
            header,
            samples,
            source,
            seq,
        } => match held.get(source.0 as usize).and_then(|h| h.get(seq)) {
            Some((_, payload, red, level)) => {
                metrics.preroll_packets.fetch_add(1, Ordering::Relaxed);
                // The replay: its own lane, so other tracks' live packets need not wait.
                let pkt = (payload, red.as_ref(), true);
                write_group(group, track, header, samples, *level, pkt, groups, out);
            }
            // The core holds only what the edge handed it, so this is a bug: count it.
            None => {
                metrics
                    .dropped_preroll_missing
                    .fetch_add(1, Ordering::Relaxed);
            }
        },
        CoreOutput::Packet { .. } => {}
    }
}

/// A track's audio ending in silence when it empties ([`CoreOutput::Ending`]): the silence
/// frame to every viewer of the group, numbered like any packet of the group's track, with the
/// level of digital silence.
fn write_ending(
    group: GroupId,
    track: u8,
    header: Rewritten,
    groups: &[Vec<PeerId>],
    out: (u32, &mut Lanes<Output>),
) {
    let silence = Bytes::from_static(&opus::SILENCE_FRAME);
    let level = Some((false, 127));
    let samples = opus::SILENCE_SAMPLES;
    let pkt = (&silence, None, false);
    write_group(group, track, header, samples, level, pkt, groups, out);
}

/// One `Write` per viewer of `group` on its track `track` of stream `stream`: in the replay
/// lane if `replay` (a pre-roll) or if the track has a replay waiting there
/// ([`super::lanes`]). The group's stream is already one continuous stream; each viewer
/// re-anchors it only when it moves to another group.
#[allow(clippy::too_many_arguments)]
fn write_group(
    group: GroupId,
    track: u8,
    header: Rewritten,
    samples: u32,
    level: Option<(bool, u8)>,
    (payload, red, replay): (&Bytes, Option<&RedLayout>, bool),
    groups: &[Vec<PeerId>],
    (stream, out): (u32, &mut Lanes<Output>),
) {
    let input = InputPacket {
        source: Feed::Group(group, track),
        ssrc: header.ssrc,
        seq: header.seq,
        ts: header.ts,
        marker: header.marker,
        samples,
    };
    let gt = GroupTrack {
        stream,
        group,
        track,
    };
    let ids = groups.get(group.0 as usize).map_or(&[][..], Vec::as_slice);
    for &viewer in ids {
        let w = Write {
            viewer,
            track: TrackRef::Mux(track),
            input,
            level,
            payload: payload.clone(),
            red: red.copied(),
            reach: header.reach,
        };
        // A full replay lane refuses it; the lane counts it.
        out.push_group(gt, replay, Output::Write(w));
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
