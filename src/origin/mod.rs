//! The origin: streams, their sources (one live publication per sourceId), and the fan-out of
//! every source's RTP to the edges subscribed to its stream.
//!
//! Control-plane state sits behind one mutex touched by signalling, WHIP, the relay and (on a
//! publication's end) the media thread; nothing holds it across I/O. The packet path does not
//! take it: each publication's handler owns its stream's fan-out list (a read lock per packet).

pub(crate) mod indices;
pub(crate) mod media_thread;
pub(crate) mod publication;
pub(crate) mod redundancy;
pub mod relay_server;
pub(crate) mod talking;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use str0m::media::MediaKind;
use str0m::rtp::Extension;
use tracing::{error, info, warn};

use crate::recording::Recorder;
use crate::relay::proto::{OriginMsg, SourceInfo, TrackInfo};
use crate::rtc::offer::OfferRequirements;
use crate::rtc::offer::{mlines, OfferError};
use crate::rtc::peers::media_config;
use crate::rtc::peers::{CloseReason, PeerId};
use crate::webhooks::Hooks;
use indices::SourceIndices;
use media_thread::MediaThread;
use publication::{PublicationHandler, Route};
use redundancy::{Feed, MAX_FEEDS_PER_SOURCE};

/// A sourceId; None is the stream's main source.
pub(crate) type SourceKey = Option<String>;

/// Where a subscribed edge's datagrams and control messages go (a QUIC connection).
pub(crate) trait EdgeSink: Send + Sync {
    /// Sends one datagram; Err says what was dropped and why.
    fn datagram(&self, d: Bytes) -> Result<(), RelayDrop>;
    fn control(&self, msg: OriginMsg);
}

/// Why the fan-out lost a datagram on its way to an edge (`chorus_origin_relay_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayDrop {
    /// Sent, but the link's datagram send buffer was full: quinn dropped the oldest queued
    /// datagram to make room (congestion; audio that old is worthless anyway).
    Evicted,
    /// Larger than the link's datagram limit (path MTU).
    TooLarge,
    /// The edge's connection is gone (it is being dropped).
    ConnectionLost,
    /// The edge did not negotiate datagrams.
    Unsupported,
}

impl RelayDrop {
    pub(crate) const ALL: [RelayDrop; 4] = [
        RelayDrop::Evicted,
        RelayDrop::TooLarge,
        RelayDrop::ConnectionLost,
        RelayDrop::Unsupported,
    ];

    /// The `reason` label in /metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            RelayDrop::Evicted => "send_buffer_full",
            RelayDrop::TooLarge => "too_large",
            RelayDrop::ConnectionLost => "connection_lost",
            RelayDrop::Unsupported => "unsupported",
        }
    }
}

#[derive(Clone)]
pub(crate) struct Sub {
    pub conn: u64,
    pub channel: u32,
    pub sink: Arc<dyn EdgeSink>,
}

/// The edges subscribed to one stream; read per packet, written on (un)subscribe.
#[derive(Default)]
pub(crate) struct Fanout {
    pub subs: RwLock<Vec<Sub>>,
}

/// Counters of one source, updated on the media thread.
#[derive(Debug, Default)]
pub(crate) struct SourceStats {
    pub audio_packets: AtomicU64,
    pub audio_bytes: AtomicU64,
    pub level_packets: AtomicU64,
    /// Last RFC 6464 level + 1 (0 = none seen).
    pub last_level: AtomicU32,
    pub video_packets: AtomicU64,
    pub relay_drops: AtomicU64,
}

/// Origin-wide counters for /metrics (they outlive publications).
#[derive(Debug, Default)]
pub(crate) struct OriginMetrics {
    pub audio_packets: AtomicU64,
    pub video_packets: AtomicU64,
    pub bytes_in: AtomicU64,
    pub padding_dropped: AtomicU64,
    /// RED packets whose blocks do not parse (end-to-end encrypted, or broken): relayed
    /// untouched, for the edge to send whole to viewers with RED.
    pub red_malformed: AtomicU64,
    /// RED packets relayed (the publisher negotiated RED).
    pub red_packets: AtomicU64,
    /// Packets of a muted room member, not relayed (`audio.mute`).
    pub muted_dropped: AtomicU64,
    pub relay_datagrams: AtomicU64,
    pub relay_drops: AtomicU64,
    /// `relay_drops` by [`RelayDrop`], in the order of [`RelayDrop::ALL`].
    pub relay_drops_by: [AtomicU64; 4],
    pub publications_total: AtomicU64,
    pub replacements_total: AtomicU64,
    /// Standby feeds closed to make room for a newer publish of their source
    /// ([`redundancy::MAX_FEEDS_PER_SOURCE`]).
    pub standby_evicted: AtomicU64,
    /// Publish attempts refused: the stream held [`indices::MAX_SOURCES_PER_STREAM`] sources.
    pub refused_sources_limit: AtomicU64,
    /// Publish attempts refused: every source index of the stream held or quarantined.
    pub refused_index_space: AtomicU64,
}

/// Who owns a publication, so that owner's end can remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    Signalling(u64),
    Whip,
}

/// Why a publication ended (logged by [`Origin::remove`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Its owner unpublished it (`unpublish`).
    Unpublished,
    /// Stopped whoever owns it: a room member sent back to the audience, or removed.
    Stopped,
    /// Its owner's signalling session closed.
    OwnerGone,
    /// Its WHIP resource was deleted.
    WhipDeleted,
    /// Its peer ended on the media thread.
    PeerClosed(CloseReason),
}

impl std::fmt::Display for Removal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Removal::Unpublished => f.write_str("unpublished"),
            Removal::Stopped => f.write_str("stopped"),
            Removal::OwnerGone => f.write_str("owner's session closed"),
            Removal::WhipDeleted => f.write_str("WHIP resource deleted"),
            Removal::PeerClosed(r) => write!(f, "peer closed: {r}"),
        }
    }
}

/// A source's live publication: the peer it arrives from and who may end it.
struct LivePublication {
    publication: u64,
    /// What the edges know this source by (held in the stream's [`SourceIndices`]).
    index: u16,
    /// Unguessable: a WHIP resource URL is built from it.
    publisher_id: String,
    peer: PeerId,
    owner: Owner,
    tracks: Vec<TrackInfo>,
    audio_level: bool,
    stats: Arc<SourceStats>,
    /// The publisher's `priority` (redundant ingest; 0 when it sent none).
    priority: i32,
    /// Whether its packets are relayed: its handler reads this per packet. True for the feed
    /// in `Stream::sources`, false for a standby.
    playing: Arc<AtomicBool>,
    /// Whether its source is muted (a room member's `audio.mute`): its handler reads this per
    /// packet and relays nothing while it is set.
    muted: Arc<AtomicBool>,
}

impl LivePublication {
    fn feed(&self) -> Feed {
        Feed {
            publication: self.publication,
            priority: self.priority,
        }
    }
}

#[derive(Default)]
struct Stream {
    /// The feed that plays, per source: always the one [`redundancy::playing`] picks among
    /// it and the source's standbys.
    sources: BTreeMap<SourceKey, LivePublication>,
    /// Other live feeds of a source, connected but not relayed, in arrival order; a source
    /// has standbys only while one plays.
    standby: BTreeMap<SourceKey, Vec<LivePublication>>,
    indices: SourceIndices,
    /// Publish attempts between their index claim and their end (answered or failed): the
    /// stream is not idle while one is in flight, so its entry, indices and fan-out list stay
    /// the ones the attempt's media handler was given.
    pending: usize,
    fanout: Arc<Fanout>,
}

impl Stream {
    /// How many feeds (playing and standby) `key` has.
    fn feeds(&self, key: &SourceKey) -> usize {
        usize::from(self.sources.contains_key(key)) + self.standby.get(key).map_or(0, Vec::len)
    }

    /// Removes the feeds of `key` that `doomed` picks, each giving its hold on the index back;
    /// when the playing one goes, the best standby plays at once. Returns the removed feeds
    /// and whether the playing feed changed (or the source ended).
    fn remove_feeds(
        &mut self,
        key: &SourceKey,
        doomed: &impl Fn(&SourceKey, &LivePublication) -> bool,
    ) -> (Vec<LivePublication>, bool) {
        let mut gone = Vec::new();
        if let Some(list) = self.standby.get_mut(key) {
            let (out, keep): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|v| doomed(key, v));
            *list = keep;
            gone.extend(out);
        }
        let mut changed = false;
        if self.sources.get(key).is_some_and(|v| doomed(key, v)) {
            gone.push(self.sources.remove(key).expect("present"));
            changed = true;
            let list = self.standby.get_mut(key);
            let next = list
                .as_ref()
                .and_then(|l| redundancy::playing(l.iter().map(|v| v.feed())));
            if let (Some(list), Some(next)) = (list, next) {
                let i = list
                    .iter()
                    .position(|v| v.publication == next.publication)
                    .expect("picked from the list");
                let promoted = list.remove(i);
                promoted.playing.store(true, Ordering::Relaxed);
                self.sources.insert(key.clone(), promoted);
            }
        }
        if self.standby.get(key).is_some_and(Vec::is_empty) {
            self.standby.remove(key);
        }
        for v in &gone {
            // Its peer ends on the media thread a moment later: not one more packet of it is
            // relayed next to the feed that plays now.
            v.playing.store(false, Ordering::Relaxed);
            self.indices.release(key, Instant::now());
        }
        (gone, changed)
    }

    fn snapshot(&self) -> Vec<SourceInfo> {
        self.sources
            .iter()
            .map(|(k, s)| SourceInfo {
                index: s.index,
                source_id: k.clone(),
                tracks: s.tracks.clone(),
                audio_level: s.audio_level,
            })
            .collect()
    }

    fn announce(&self, name: &str) {
        let sources = self.snapshot();
        for sub in self
            .fanout
            .subs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            sub.sink.control(OriginMsg::Sources {
                stream: name.to_owned(),
                channel: sub.channel,
                sources: sources.clone(),
            });
        }
    }

    fn is_idle(&self) -> bool {
        self.pending == 0
            && self.sources.is_empty()
            && self
                .fanout
                .subs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub publisher_id: String,
    pub answer: String,
}

/// How a publication went live next to the source's other feeds (redundant ingest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WentLive {
    /// The source's only feed: it plays.
    Alone,
    /// It plays; the feed that played stays connected as standby.
    TookOver,
    /// A feed of higher priority plays: this one waits as standby.
    Standby,
}

#[derive(Debug, Serialize)]
pub(crate) struct SourceView {
    #[serde(rename = "sourceId")]
    pub source_id: Option<String>,
    #[serde(rename = "publisherId")]
    pub publisher_id: String,
    pub tracks: Vec<TrackInfo>,
    pub audio: AudioView,
    pub video: VideoView,
    /// The publisher ids of the source's standby feeds (redundant ingest), oldest first.
    pub standby: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct AudioView {
    pub packets: u64,
    pub bytes: u64,
    #[serde(rename = "levelPackets")]
    pub level_packets: u64,
    #[serde(rename = "lastLevel")]
    pub last_level: Option<u8>,
}

#[derive(Debug, Serialize)]
pub(crate) struct VideoView {
    pub packets: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct StreamView {
    pub stream: String,
    pub sources: Vec<SourceView>,
    pub edges: usize,
}

/// Room removals queued to each edge's link at most (a removal is rare: a burst past this is
/// logged by the link as lagged, and those views end by their own sessions' checks instead).
pub(crate) const REVOCATIONS_QUEUE: usize = 256;

pub(crate) struct Origin {
    host: MediaThread,
    pub metrics: Arc<OriginMetrics>,
    /// Linked edges that serve viewers: (relay connection, signalling URL).
    edges: Mutex<Vec<(u64, String)>>,
    next_edge: AtomicU64,
    state: Mutex<HashMap<String, Stream>>,
    next_publication: AtomicU64,
    next_channel: AtomicU32,
    me: Weak<Origin>,
    /// Who talks, as the linked edges report it.
    pub talking: talking::TalkingBoard,
    /// Room members removed (room, member id), for every linked edge to end their views.
    pub revocations: tokio::sync::broadcast::Sender<(String, String)>,
    /// Muted sources (stream, sourceId): a feed of one starts muted. Only ever locked inside
    /// `state` (set in [`Origin::set_muted`], read in `commit`), so a feed going live and a
    /// mute cannot miss each other. Holds only what is muted now: unmuting removes it.
    muted: Mutex<HashSet<(String, SourceKey)>>,
    /// Webhooks for feeds and (through the room service) rooms.
    pub hooks: Hooks,
    /// Writes recorded feeds (set once at start when there is a `--data-dir`).
    recorder: OnceLock<Arc<Recorder>>,
}

impl Origin {
    pub(crate) fn new(host: MediaThread, hooks: Hooks) -> Arc<Origin> {
        Arc::new_cyclic(|me| Origin {
            host,
            metrics: Arc::new(OriginMetrics::default()),
            edges: Mutex::new(Vec::new()),
            next_edge: AtomicU64::new(0),
            state: Mutex::new(HashMap::new()),
            next_publication: AtomicU64::new(1),
            next_channel: AtomicU32::new(1),
            me: me.clone(),
            talking: talking::TalkingBoard::default(),
            revocations: tokio::sync::broadcast::channel(REVOCATIONS_QUEUE).0,
            muted: Mutex::new(HashSet::new()),
            hooks,
            recorder: OnceLock::new(),
        })
    }

    /// Records feeds published with `record` from now on (set once; false if already set).
    pub(crate) fn set_recorder(&self, r: Arc<Recorder>) -> bool {
        self.recorder.set(r).is_ok()
    }

    /// The recorder, when the origin has a `--data-dir`.
    pub(crate) fn recorder(&self) -> Option<&Arc<Recorder>> {
        self.recorder.get()
    }

    /// Mutes (or unmutes) every feed of `source` in `stream`, now and for feeds to come, until
    /// unmuted: nothing of it reaches an edge meanwhile. Returns the live feeds it changed.
    pub(crate) fn set_muted(&self, stream: &str, source: &SourceKey, muted: bool) -> usize {
        let st = self.lock();
        {
            let mut set = self.muted.lock().unwrap_or_else(|p| p.into_inner());
            let key = (stream.to_owned(), source.clone());
            if muted {
                set.insert(key);
            } else {
                set.remove(&key);
            }
        }
        let Some(s) = st.get(stream) else {
            return 0;
        };
        let feeds = s
            .sources
            .get(source)
            .into_iter()
            .chain(s.standby.get(source).into_iter().flatten());
        let mut n = 0;
        for f in feeds {
            f.muted.store(muted, Ordering::Relaxed);
            n += 1;
        }
        n
    }

    /// The media thread's socket and peer counters (flood drops, send errors, peer ends...).
    pub(crate) fn peer_stats(&self) -> &Arc<crate::rtc::peers::PeerStats> {
        self.host.stats()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stream>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a publisher's offer. A source may have several feeds (redundant ingest, see
    /// [`redundancy`]): the one of highest `priority`, the newest among equals, plays (same
    /// index for the edges); the others stay connected as standby, and none is closed.
    ///
    /// The attempt holds its stream (a pending count) and its source index from the claim to
    /// its end, so the stream cannot be removed as idle while the media thread answers the
    /// offer, whatever else happens meanwhile (failed offers, edges leaving).
    ///
    /// With `record` (decided by the caller, see [`crate::recording::RecordAsk`]) the feed's
    /// audio is also recorded while it plays.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn publish(
        &self,
        stream: &str,
        source: SourceKey,
        offer: &str,
        owner: Owner,
        priority: i32,
        record: bool,
    ) -> Result<Published, OfferError> {
        let audio_level = mlines(offer)
            .iter()
            .any(|m| m.media == "audio" && m.audio_level);
        let publication = self.next_publication.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(SourceStats::default());
        let playing = Arc::new(AtomicBool::new(false));
        // Set from the muted sources when it goes live (`commit`).
        let muted = Arc::new(AtomicBool::new(false));
        let (index, fanout) = self.reserve(stream, &source)?;
        // Started before the offer is answered: the recorder hears of the feed before any
        // packet of it.
        let tap = match (record, self.recorder.get()) {
            (true, Some(r)) => match r.tap(publication, stream, source.as_deref()) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(stream, source = ?source, publication, error = %e, "feed not recorded");
                    None
                }
            },
            _ => None,
        };
        let route = Route {
            stream: stream.to_owned(),
            source: source.clone(),
            publication,
            index,
        };
        let handler = PublicationHandler::new(
            self.me.clone(),
            route,
            fanout,
            stats.clone(),
            self.metrics.clone(),
            playing.clone(),
            muted.clone(),
        )
        .recorded(tap);
        // Publishers may send simulcast video: rid too.
        let config = media_config().set_extension(10, Extension::RtpStreamId);
        let accepted = self.host.accept(
            offer,
            config,
            OfferRequirements {
                audio_send: true,
                audio_recv: false,
            },
            Box::new(handler),
        );
        let (peer, answer) = match accepted {
            // libwebrtc sends the first codec of the answer's m-line: RED first, or it never
            // sends RED (str0m lists the primary first).
            Ok((peer, answer)) => (peer, crate::rtc::offer::red_first(&answer)),
            Err(e) => {
                self.finish_attempt(stream, &source);
                return Err(e);
            }
        };
        let tracks = answer_tracks(&answer);
        let publisher_id = format!("pub-{publication}-{}", crate::auth::random_secret(9));
        let src = LivePublication {
            publication,
            index,
            publisher_id: publisher_id.clone(),
            peer,
            owner,
            tracks,
            audio_level,
            stats,
            priority,
            playing,
            muted,
        };
        // Playing or standby, the publisher's answer is the same (the log and webhook say which).
        let went = self.commit(stream, &source, src)?;
        self.hooks.emit(
            "feeds",
            "started",
            serde_json::json!({
                "streamName": stream,
                "sourceId": source,
                "feedId": publication,
                "priority": priority,
                "standby": went == WentLive::Standby,
            }),
        );
        Ok(Published {
            publisher_id,
            answer,
        })
    }

    /// The first half of a publish attempt: the stream is held and the source has its index.
    fn reserve(&self, stream: &str, source: &SourceKey) -> Result<(u16, Arc<Fanout>), OfferError> {
        let mut st = self.lock();
        let s = st.entry(stream.to_owned()).or_default();
        if s.feeds(source) >= MAX_FEEDS_PER_SOURCE {
            let worst = s
                .standby
                .get(source)
                .and_then(|l| redundancy::evicted(l.iter().map(LivePublication::feed)));
            let Some(worst) = worst else {
                return Err(OfferError::Limit(format!(
                    "stream {stream:?}: source {source:?} already has {MAX_FEEDS_PER_SOURCE} feeds: end one first"
                )));
            };
            let (gone, _) = s.remove_feeds(source, &|_, v| v.publication == worst.publication);
            for v in gone {
                self.host.remove(v.peer);
                self.metrics.standby_evicted.fetch_add(1, Ordering::Relaxed);
                warn!(stream, source = ?source, publication = v.publication, "standby feed closed to make room: {MAX_FEEDS_PER_SOURCE} feeds of one source at most");
            }
        }
        match s.indices.claim(source, Instant::now()) {
            Ok(index) => {
                s.pending += 1;
                Ok((index, s.fanout.clone()))
            }
            Err(e) => {
                let counter = match e {
                    indices::IndexError::TooManySources => &self.metrics.refused_sources_limit,
                    indices::IndexError::Exhausted => &self.metrics.refused_index_space,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if s.is_idle() {
                    st.remove(stream);
                }
                Err(OfferError::Limit(format!("stream {stream:?}: {e}")))
            }
        }
    }

    /// Ends an attempt that did not go live: its hold on the stream and its index go.
    fn finish_attempt(&self, stream: &str, source: &SourceKey) {
        let mut st = self.lock();
        let Some(s) = st.get_mut(stream) else {
            error!(stream, "a pending publish attempt found its stream gone");
            return;
        };
        s.pending = s.pending.saturating_sub(1);
        s.indices.release(source, Instant::now());
        if s.is_idle() {
            st.remove(stream);
        }
    }

    /// The second half of a publish attempt: the answered publication goes live, playing or
    /// as standby (see [`redundancy`]).
    fn commit(
        &self,
        stream: &str,
        source: &SourceKey,
        src: LivePublication,
    ) -> Result<WentLive, OfferError> {
        let mut st = self.lock();
        let Some(s) = st.get_mut(stream) else {
            // Cannot happen while the attempt holds the stream; refuse rather than panic.
            error!(stream, "a pending publish attempt found its stream gone");
            self.host.remove(src.peer);
            return Err(OfferError::Internal(
                "the stream ended during the offer".into(),
            ));
        };
        s.pending = s.pending.saturating_sub(1);
        s.indices.mark_used(source);
        let muted = self
            .muted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(stream.to_owned(), source.clone()));
        src.muted.store(muted, Ordering::Relaxed);
        // The attempt's hold on the index passes to the publication: every feed holds it.
        let (publication, priority) = (src.publication, src.priority);
        self.metrics
            .publications_total
            .fetch_add(1, Ordering::Relaxed);
        let current = s.sources.get(source).map(LivePublication::feed);
        let Some(current) = current else {
            src.playing.store(true, Ordering::Relaxed);
            s.sources.insert(source.clone(), src);
            info!(stream, source = ?source, publication, priority, "source published");
            s.announce(stream);
            return Ok(WentLive::Alone);
        };
        // The playing feed is the best of all the source's feeds: comparing with it is enough.
        if redundancy::playing([current, src.feed()]) == Some(current) {
            s.standby.entry(source.clone()).or_default().push(src);
            info!(stream, source = ?source, publication, priority, playing = current.publication, "feed on standby: a feed of higher priority plays");
            return Ok(WentLive::Standby);
        }
        let playing = src.playing.clone();
        let old = s
            .sources
            .insert(source.clone(), src)
            .expect("checked present");
        old.playing.store(false, Ordering::Relaxed);
        playing.store(true, Ordering::Relaxed);
        self.metrics
            .replacements_total
            .fetch_add(1, Ordering::Relaxed);
        info!(stream, source = ?source, old = old.publication, new = publication, priority, "feed takes over; the one that played stays as standby");
        s.standby.entry(source.clone()).or_default().push(old);
        s.announce(stream);
        Ok(WentLive::TookOver)
    }

    /// Ends one owner's publication of `source` (or all of its publications with None).
    pub(crate) fn unpublish(
        &self,
        stream: &str,
        source: Option<&SourceKey>,
        owner: Owner,
    ) -> usize {
        self.remove(
            Some(stream),
            |k, v| v.owner == owner && source.is_none_or(|want| want == k),
            Removal::Unpublished,
        )
    }

    /// Ends the publication of `source`, whoever owns it (a room member sent back to the
    /// audience). Its owner's session stays open.
    pub(crate) fn unpublish_source(&self, stream: &str, source: &SourceKey) -> bool {
        self.remove(Some(stream), |k, _| k == source, Removal::Stopped) > 0
    }

    /// Ends every publication of an owner, in every stream (its signalling socket closed).
    pub(crate) fn drop_owner(&self, owner: Owner) {
        self.remove(None, |_, v| v.owner == owner, Removal::OwnerGone);
    }

    /// Ends the WHIP publication with this publisher id, wherever it is (WHIP DELETE).
    pub(crate) fn unpublish_whip(&self, publisher_id: &str) -> bool {
        let whip = |_: &SourceKey, v: &LivePublication| {
            v.owner == Owner::Whip && v.publisher_id == publisher_id
        };
        self.remove(None, whip, Removal::WhipDeleted) > 0
    }

    /// Called from the media thread when a publication's peer ends for any reason.
    pub(crate) fn publication_closed(
        &self,
        stream: &str,
        source: &SourceKey,
        publication: u64,
        reason: CloseReason,
    ) {
        // A replaced publication closing must not take its successor down.
        let this = |k: &SourceKey, v: &LivePublication| k == source && v.publication == publication;
        self.remove(Some(stream), this, Removal::PeerClosed(reason));
    }

    /// The one way a live publication ends: those of `stream` (every stream with None) that
    /// `doomed` picks are removed with their indices given back, their peers ended (unless the
    /// peer is what ended), the edges told the new source list, and streams left idle dropped.
    /// Returns how many were removed.
    fn remove(
        &self,
        stream: Option<&str>,
        doomed: impl Fn(&SourceKey, &LivePublication) -> bool,
        reason: Removal,
    ) -> usize {
        let mut st = self.lock();
        let names: Vec<String> = match stream {
            Some(name) => vec![name.to_owned()],
            None => st.keys().cloned().collect(),
        };
        let mut removed = 0;
        for name in names {
            let Some(s) = st.get_mut(&name) else { continue };
            let keys: std::collections::BTreeSet<SourceKey> = s
                .sources
                .iter()
                .chain(
                    s.standby
                        .iter()
                        .flat_map(|(k, l)| l.iter().map(move |v| (k, v))),
                )
                .filter(|(k, v)| doomed(k, v))
                .map(|(k, _)| k.clone())
                .collect();
            let mut announce = false;
            for k in &keys {
                let (gone, changed) = s.remove_feeds(k, &doomed);
                announce |= changed;
                for src in gone {
                    if !matches!(reason, Removal::PeerClosed(_)) {
                        self.host.remove(src.peer);
                    }
                    info!(stream = name.as_str(), source = ?k, publication = src.publication, %reason, "feed removed");
                    self.hooks.emit(
                        "feeds",
                        "stopped",
                        serde_json::json!({
                            "streamName": name,
                            "sourceId": k,
                            "feedId": src.publication,
                            "reason": reason.to_string(),
                        }),
                    );
                    removed += 1;
                }
                if changed {
                    if let Some(next) = s.sources.get(k) {
                        info!(stream = name.as_str(), source = ?k, publication = next.publication, priority = next.priority, "standby feed takes over");
                    }
                }
            }
            if announce {
                s.announce(&name);
            }
            if s.is_idle() {
                st.remove(&name);
            }
        }
        removed
    }

    /// An edge subscribes; it gets the source list now and on every change.
    pub(crate) fn subscribe(&self, stream: &str, conn: u64, sink: Arc<dyn EdgeSink>) -> u32 {
        let channel = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let s = st.entry(stream.to_owned()).or_default();
        s.fanout
            .subs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Sub {
                conn,
                channel,
                sink: sink.clone(),
            });
        sink.control(OriginMsg::Sources {
            stream: stream.to_owned(),
            channel,
            sources: s.snapshot(),
        });
        // Per subscription, so debug: an edge may hold thousands (see MAX_EDGE_SUBSCRIPTIONS);
        // the edge's connect and end are logged at info.
        tracing::debug!(stream, conn, channel, "edge subscribed");
        channel
    }

    pub(crate) fn unsubscribe(&self, stream: &str, conn: u64) {
        let mut st = self.lock();
        let Some(s) = st.get_mut(stream) else { return };
        s.fanout
            .subs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|sub| sub.conn != conn);
        tracing::debug!(stream, conn, "edge unsubscribed");
        if s.is_idle() {
            st.remove(stream);
        }
    }

    /// A linked edge serves viewers at `ws_url`: the director may send subscribers there.
    pub(crate) fn register_edge(&self, conn: u64, ws_url: String) {
        info!(conn, ws_url = ws_url.as_str(), "edge serves viewers");
        self.edges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((conn, ws_url));
    }

    /// The signalling URL of a linked edge for the next subscriber, in turn.
    pub(crate) fn pick_edge(&self) -> Option<String> {
        let edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        if edges.is_empty() {
            return None;
        }
        let n = self.next_edge.fetch_add(1, Ordering::Relaxed) as usize;
        Some(edges[n % edges.len()].1.clone())
    }

    /// An edge connection ended: drop all of its subscriptions.
    pub(crate) fn drop_conn(&self, conn: u64) {
        self.talking.drop_conn(conn);
        self.edges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(c, _)| *c != conn);
        let mut st = self.lock();
        for s in st.values_mut() {
            s.fanout
                .subs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|sub| sub.conn != conn);
        }
        st.retain(|_, s| !s.is_idle());
    }

    /// Asks the publisher of `source` for a video keyframe (a viewer's PLI, via its edge).
    pub(crate) fn request_keyframe(&self, stream: &str, source: &SourceKey) -> bool {
        let st = self.lock();
        let Some(src) = st.get(stream).and_then(|s| s.sources.get(source)) else {
            return false;
        };
        let Some(video) = src.tracks.iter().find(|t| t.media == "video") else {
            return false;
        };
        self.host
            .request_keyframe(src.peer, video.mid.as_str().into());
        true
    }

    pub(crate) fn stream_view(&self, stream: &str) -> Option<StreamView> {
        let st = self.lock();
        let s = st.get(stream)?;
        let sources = s
            .sources
            .iter()
            .map(|(k, v)| {
                let last = v.stats.last_level.load(Ordering::Relaxed);
                SourceView {
                    source_id: k.clone(),
                    publisher_id: v.publisher_id.clone(),
                    tracks: v.tracks.clone(),
                    audio: AudioView {
                        packets: v.stats.audio_packets.load(Ordering::Relaxed),
                        bytes: v.stats.audio_bytes.load(Ordering::Relaxed),
                        level_packets: v.stats.level_packets.load(Ordering::Relaxed),
                        last_level: last.checked_sub(1).map(|l| l as u8),
                    },
                    video: VideoView {
                        packets: v.stats.video_packets.load(Ordering::Relaxed),
                    },
                    standby: s.standby.get(k).map_or_else(Vec::new, |l| {
                        l.iter().map(|f| f.publisher_id.clone()).collect()
                    }),
                }
            })
            .collect();
        Some(StreamView {
            stream: stream.to_owned(),
            sources,
            edges: s.fanout.subs.read().map_or(0, |s| s.len()),
        })
    }

    /// Streams with a live publication or one being answered: the leases this origin keeps.
    pub(crate) fn live_streams(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| !s.sources.is_empty() || s.pending > 0)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// (streams, live sources, subscribed edges) right now.
    pub(crate) fn gauges(&self) -> (usize, usize, usize) {
        let st = self.lock();
        let sources = st.values().map(|s| s.sources.len()).sum();
        let edges = st
            .values()
            .map(|s| s.fanout.subs.read().map_or(0, |v| v.len()))
            .sum();
        (st.len(), sources, edges)
    }
}

/// The audio/video m-lines of an answer with their mids.
fn answer_tracks(answer: &str) -> Vec<TrackInfo> {
    let mut out = Vec::new();
    let mut media: Option<String> = None;
    for line in answer.lines().map(str::trim_end) {
        if let Some(rest) = line.strip_prefix("m=") {
            media = Some(rest.split(' ').next().unwrap_or("").to_owned());
        } else if let (Some(mid), Some(m)) = (line.strip_prefix("a=mid:"), media.as_ref()) {
            if m == "audio" || m == "video" {
                out.push(TrackInfo {
                    media: m.clone(),
                    mid: mid.to_owned(),
                });
            }
        }
    }
    out
}

/// Which relayed kind a str0m media kind is.
pub(crate) fn relay_kind(k: MediaKind) -> crate::relay::proto::Kind {
    match k {
        MediaKind::Audio => crate::relay::proto::Kind::Audio,
        MediaKind::Video => crate::relay::proto::Kind::Video,
    }
}

#[cfg(test)]
mod tests {
    use super::media_thread::MediaThreadConfig;
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<OriginMsg>>);

    impl EdgeSink for Recorder {
        fn datagram(&self, _: Bytes) -> Result<(), RelayDrop> {
            Ok(())
        }
        fn control(&self, msg: OriginMsg) {
            self.0.lock().unwrap().push(msg);
        }
    }

    fn origin() -> Arc<Origin> {
        let host = MediaThread::start(
            &MediaThreadConfig {
                bind: "127.0.0.1:0".parse().unwrap(),
                public_ip: None,
                ice_tcp: crate::rtc::tcp::IceTcp::Off,
            },
            "origin-test",
        )
        .unwrap();
        Origin::new(host, Hooks::default())
    }

    fn source(publication: u64, index: u16) -> LivePublication {
        LivePublication {
            publication,
            index,
            publisher_id: format!("pub-{publication}"),
            peer: PeerId(u64::MAX - publication),
            owner: Owner::Whip,
            tracks: Vec::new(),
            audio_level: true,
            stats: Arc::default(),
            priority: 0,
            playing: Arc::default(),
            muted: Arc::default(),
        }
    }

    fn key(s: &str) -> SourceKey {
        Some(s.to_owned())
    }

    #[test]
    fn a_pending_attempt_holds_its_stream_through_every_removal_path() {
        let o = origin();
        let ana = key("ana");
        let (index, fanout) = o.reserve("s", &ana).unwrap();
        // Meanwhile, everything that used to remove the idle stream: an edge subscribing and
        // leaving, a failed offer for another source, an edge connection dropping.
        let sink: Arc<dyn EdgeSink> = Arc::new(Recorder::default());
        o.subscribe("s", 7, sink.clone());
        o.unsubscribe("s", 7);
        let bo = key("bo");
        o.reserve("s", &bo).unwrap();
        o.finish_attempt("s", &bo);
        o.subscribe("s", 8, sink);
        o.drop_conn(8);
        {
            let st = o.lock();
            let s = st.get("s").expect("held by the pending attempt");
            assert!(Arc::ptr_eq(&s.fanout, &fanout), "same fan-out list");
        }
        assert_eq!(o.commit("s", &ana, source(1, index)), Ok(WentLive::Alone));
        let (streams, sources, _) = o.gauges();
        assert_eq!((streams, sources), (1, 1));
        assert_eq!(o.lock()["s"].snapshot()[0].index, index);
        // The publication ends: the stream is idle and goes.
        assert!(o.unpublish_source("s", &ana));
        assert_eq!(o.gauges().0, 0);
        // A commit whose stream vanished anyway is refused, not a panic.
        let (i, _) = o.reserve("t", &ana).unwrap();
        o.lock().remove("t");
        assert!(matches!(
            o.commit("t", &ana, source(2, i)),
            Err(OfferError::Internal(_))
        ));
        o.finish_attempt("t", &ana);
    }

    #[test]
    fn a_muted_source_relays_nothing_from_any_feed_now_or_later_until_unmuted() {
        let o = origin();
        let ana = key("ana");
        let feed = |publication: u64| {
            let (index, _) = o.reserve("s", &ana).unwrap();
            let f = source(publication, index);
            (f.muted.clone(), f)
        };
        // Muted before it publishes (a muted member reconnecting): its feed goes live muted.
        assert_eq!(o.set_muted("s", &ana, true), 0);
        let (one, f) = feed(1);
        o.commit("s", &ana, f).unwrap();
        assert!(one.load(Ordering::Relaxed));
        // Unmuted: the live feed and a standby that joins later play out.
        assert_eq!(o.set_muted("s", &ana, false), 1);
        assert!(!one.load(Ordering::Relaxed));
        let (two, f) = feed(2);
        o.commit("s", &ana, f).unwrap();
        assert!(!two.load(Ordering::Relaxed));
        // Muted again: both feeds, the playing one and the standby.
        assert_eq!(o.set_muted("s", &ana, true), 2);
        assert!(one.load(Ordering::Relaxed) && two.load(Ordering::Relaxed));
        // Only what is muted now is remembered.
        o.set_muted("s", &key("bo"), true);
        o.set_muted("s", &key("bo"), false);
        assert_eq!(o.muted.lock().unwrap().len(), 1);
    }

    #[test]
    fn feeds_of_one_source_stand_by_and_take_over_without_closing_anyone() {
        let o = origin();
        let ana = key("ana");
        let feed = |publication: u64, priority: i32| {
            let (index, _) = o.reserve("s", &ana).unwrap();
            let mut f = source(publication, index);
            f.priority = priority;
            (f.playing.clone(), index, f)
        };
        let (one, index, f) = feed(1, 0);
        assert_eq!(o.commit("s", &ana, f), Ok(WentLive::Alone));
        // Equal priority: the newest plays, the older stays as standby.
        let (two, i2, f) = feed(2, 0);
        assert_eq!(o.commit("s", &ana, f), Ok(WentLive::TookOver));
        // A newer feed of lower priority waits.
        let (three, i3, f) = feed(3, -1);
        assert_eq!(o.commit("s", &ana, f), Ok(WentLive::Standby));
        assert_eq!((i2, i3), (index, index), "one index for every feed");
        let relayed = || [&one, &two, &three].map(|p| p.load(Ordering::Relaxed));
        assert_eq!(relayed(), [false, true, false]);
        assert_eq!(o.gauges().1, 1, "one source for the edges");
        // One feed more than the bound: the standby that would play last (3, priority -1) is
        // closed to make room before the offer is answered; the newest always gets in.
        let (_, _, f) = feed(4, 0);
        assert_eq!(o.commit("s", &ana, f), Ok(WentLive::TookOver));
        assert!(o.reserve("s", &ana).is_ok());
        o.finish_attempt("s", &ana);
        assert_eq!(o.lock()["s"].feeds(&ana), 3);
        assert!(o.lock()["s"].standby[&ana]
            .iter()
            .all(|v| v.publication != 3));
        assert_eq!(o.metrics.standby_evicted.load(Ordering::Relaxed), 1);
        o.publication_closed("s", &ana, 4, CloseReason::Removed);
        assert_eq!(relayed(), [false, true, false]);
        // The playing feed ends: the best standby (priority 0 beats -1) plays at once, on the
        // same index; a standby ending changes nothing that plays.
        o.publication_closed("s", &ana, 2, CloseReason::Removed);
        assert_eq!(relayed(), [true, false, false]);
        assert_eq!(o.lock()["s"].snapshot()[0].index, index);
        o.publication_closed("s", &ana, 3, CloseReason::Removed);
        assert_eq!(relayed(), [true, false, false]);
        o.publication_closed("s", &ana, 1, CloseReason::Removed);
        assert_eq!(o.gauges().0, 0, "the last feed gone, the stream is idle");
        // Stopping a source ends all of its feeds.
        let (_, _, f) = feed(5, 0);
        o.commit("s", &ana, f).unwrap();
        let (_, _, f) = feed(6, 9);
        o.commit("s", &ana, f).unwrap();
        assert!(o.unpublish_source("s", &ana));
        assert_eq!(o.gauges().0, 0);
    }

    #[test]
    fn concurrent_attempts_edges_and_failures_never_panic() {
        let o = origin();
        let sink: Arc<dyn EdgeSink> = Arc::new(Recorder::default());
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let o = o.clone();
                let sink = sink.clone();
                scope.spawn(move || {
                    for i in 0..2000u64 {
                        let k = key(&format!("t{t}-{}", i % 7));
                        match i % 4 {
                            0 => {
                                if let Ok((idx, _)) = o.reserve("s", &k) {
                                    let _ = o.commit("s", &k, source(t * 100_000 + i, idx));
                                }
                            }
                            1 => {
                                if o.reserve("s", &k).is_ok() {
                                    o.finish_attempt("s", &k);
                                }
                            }
                            2 => {
                                o.subscribe("s", t, sink.clone());
                                o.unsubscribe("s", t);
                            }
                            _ => {
                                o.unpublish_source("s", &k);
                                o.drop_conn(t);
                            }
                        }
                    }
                });
            }
        });
        // Live sources never share an index.
        let st = o.lock();
        if let Some(s) = st.get("s") {
            let snap = s.snapshot();
            let mut idx: Vec<u16> = snap.iter().map(|i| i.index).collect();
            idx.sort_unstable();
            idx.dedup();
            assert_eq!(idx.len(), snap.len());
            assert_eq!(s.pending, 0);
        }
    }
}
