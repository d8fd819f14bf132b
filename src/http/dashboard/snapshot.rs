//! One dashboard snapshot: what the process already keeps (the origin's streams, levels and
//! talking reports, the edge media threads' boards, the registry's nodes, the drop counters),
//! read together and sent to every dashboard client as one JSON text.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::timeline::{Occupant, Rate, Switch, Timeline, TrackKey};
use crate::cluster::node::{NodeEntry, NodeKind};
use crate::edge::board::TrackBoard;
use crate::http::metrics::{edge_drops, origin_drops, relay_drops};
use crate::http::App;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Snapshot {
    pub seq: u64,
    pub at_ms: u64,
    pub node: String,
    pub period_ms: u64,
    pub streams: Vec<StreamSnap>,
    /// Track switches of the last minute, oldest first.
    pub switches: Vec<Switch>,
    pub switches_dropped: u64,
    pub window_ms: u64,
    pub nodes: Vec<NodeSnap>,
    /// The registry could not be read for the nodes (they are the last ones read).
    pub registry_error: Option<String>,
    /// Viewers at every edge the registry knows (this process's own without one).
    pub viewers: u64,
    pub rates: Rates,
    pub drops: Vec<DropSnap>,
    pub clients: usize,
    pub max_clients: usize,
    pub skipped: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StreamSnap {
    pub name: String,
    /// Its viewers at this process's edge (with the other edges' when it has some itself);
    /// None where no edge runs.
    pub viewers: Option<usize>,
    pub sources: Vec<SourceSnap>,
    pub groups: Vec<GroupSnap>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SourceSnap {
    /// None: the stream's main source.
    pub source_id: Option<String>,
    /// The RFC 6464 level of its last audio packet (0 loudest, 127 silence).
    pub level: Option<u8>,
    /// An edge says it talks (the talking reports rooms use too).
    pub talking: bool,
    /// How many groups' tracks carry it now.
    pub in_tracks: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GroupSnap {
    /// `{media thread}.{group id}`.
    pub id: String,
    /// What the timeline names its tracks by.
    pub key: String,
    pub viewers: usize,
    /// Its main tracks' source: "" = the main source.
    pub main: String,
    pub excluded: usize,
    pub fixed: usize,
    /// Each multiplexed track's source: null = empty, "" = the main source.
    pub tracks: Vec<Occupant>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NodeSnap {
    pub id: String,
    pub kind: NodeKind,
    pub state: crate::cluster::node::NodeState,
    pub region: Option<String>,
    pub viewers: u64,
    pub publications: u64,
    pub capacity: Option<u32>,
    pub streams: usize,
    pub heartbeat_age_ms: u64,
}

/// This process's packet rates, per second (None until two readings).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Rates {
    pub origin_packets_in: Option<f64>,
    pub edge_packets_in: Option<f64>,
    pub edge_packets_out: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct DropSnap {
    /// `origin`, `relay` or `edge`: the /metrics family (`chorus_{side}_dropped_total`).
    pub side: &'static str,
    pub reason: &'static str,
    pub count: u64,
}

/// What the snapshots carry from one to the next.
#[derive(Default)]
pub(crate) struct Producer {
    pub seq: u64,
    pub timeline: Timeline,
    pub nodes: Vec<NodeEntry>,
    pub registry_error: Option<String>,
    origin_in: Rate,
    edge_in: Rate,
    edge_out: Rate,
}

fn tagged(side: &'static str, drops: Vec<(&'static str, u64)>) -> impl Iterator<Item = DropSnap> {
    drops.into_iter().map(move |(reason, count)| DropSnap {
        side,
        reason,
        count,
    })
}

fn occupant(t: &TrackBoard) -> Occupant {
    match t {
        TrackBoard::Empty => None,
        TrackBoard::Source(s) => Some(s.as_deref().unwrap_or("").to_owned()),
    }
}

impl Producer {
    /// Nobody watches: what was seen is forgotten, so a watcher that comes later sees no
    /// switch that happened unwatched as if it were new.
    pub(crate) fn idle(&mut self) {
        self.timeline = Timeline::default();
        self.origin_in = Rate::default();
        self.edge_in = Rate::default();
        self.edge_out = Rate::default();
    }

    /// The snapshot at `now_ms` (Unix ms), from the process's state and the nodes last read.
    pub(crate) fn snapshot(&mut self, app: &App, now_ms: u64) -> Snapshot {
        self.seq += 1;
        let boards = app
            .edge
            .as_ref()
            .map(|e| e.boards().read())
            .unwrap_or_default();
        let mut names: BTreeSet<String> =
            boards.iter().map(|(_, b)| b.stream.to_string()).collect();
        if let Some(o) = &app.origin {
            names.extend(o.live_streams());
        }
        let mut streams = Vec::with_capacity(names.len());
        let mut tracks = Vec::new();
        for name in names {
            let groups: Vec<GroupSnap> = boards
                .iter()
                .filter(|(_, b)| *b.stream == *name)
                .flat_map(|(slot, b)| {
                    b.groups.iter().map(move |g| {
                        let main = g.main.as_deref().unwrap_or("").to_owned();
                        let n = g.tracks.len();
                        GroupSnap {
                            id: format!("{slot}.{}", g.id),
                            key: format!("{slot}.{}/{n}/{main}/{}/{}", g.id, g.excluded, g.fixed),
                            viewers: g.viewers,
                            main,
                            excluded: g.excluded,
                            fixed: g.fixed,
                            tracks: g.tracks.iter().map(occupant).collect(),
                        }
                    })
                })
                .collect();
            for g in &groups {
                for (k, o) in g.tracks.iter().enumerate() {
                    let key = TrackKey {
                        stream: name.clone(),
                        group: g.key.clone(),
                        track: k as u8,
                    };
                    tracks.push((key, o.clone()));
                }
            }
            let view = app.origin.as_ref().and_then(|o| o.stream_view(&name));
            let talkers = app
                .origin
                .as_ref()
                .map(|o| o.talking.talkers(&name))
                .unwrap_or_default();
            let mut sources: Vec<SourceSnap> = view
                .map(|v| v.sources)
                .unwrap_or_default()
                .into_iter()
                .map(|s| {
                    let id = s.source_id.as_deref().unwrap_or("");
                    let in_tracks = groups
                        .iter()
                        .flat_map(|g| &g.tracks)
                        .filter(|o| o.as_deref() == Some(id))
                        .count();
                    SourceSnap {
                        talking: talkers.iter().any(|t| t == id),
                        level: s.audio.last_level,
                        in_tracks,
                        source_id: s.source_id,
                    }
                })
                .collect();
            sources.sort_by(|a, b| a.source_id.cmp(&b.source_id));
            streams.push(StreamSnap {
                viewers: app.edge.as_ref().map(|e| e.viewers_of(&name)),
                name,
                sources,
                groups,
            });
        }
        self.timeline.observe(now_ms, tracks);
        let mut nodes: Vec<NodeSnap> = self
            .nodes
            .iter()
            .map(|n| {
                let r = &n.record;
                NodeSnap {
                    id: r.id.clone(),
                    kind: r.kind,
                    state: r.state,
                    region: r.region.clone(),
                    viewers: r.load.viewers,
                    publications: r.load.publications,
                    capacity: r.capacity,
                    streams: r.streams.len(),
                    heartbeat_age_ms: n.age.as_millis() as u64,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let local_viewers = app
            .edge
            .as_ref()
            .map_or(0, |e| e.metrics.viewers.load(Ordering::Relaxed));
        let viewers = if nodes.is_empty() {
            local_viewers
        } else {
            nodes
                .iter()
                .filter(|n| matches!(n.kind, NodeKind::Edge | NodeKind::Serve))
                .map(|n| n.viewers)
                .sum()
        };
        let mut drops = Vec::new();
        let mut rates = Rates::default();
        if let Some(o) = &app.origin {
            let m = &o.metrics;
            let packets =
                m.audio_packets.load(Ordering::Relaxed) + m.video_packets.load(Ordering::Relaxed);
            rates.origin_packets_in = self.origin_in.per_sec(now_ms, packets);
            drops.extend(tagged("origin", origin_drops(o)));
            drops.extend(tagged("relay", relay_drops(o)));
        }
        if let Some(e) = &app.edge {
            let m = &e.metrics;
            rates.edge_packets_in = self
                .edge_in
                .per_sec(now_ms, m.relay_packets.load(Ordering::Relaxed));
            rates.edge_packets_out = self
                .edge_out
                .per_sec(now_ms, m.packets_out.load(Ordering::Relaxed));
            drops.extend(tagged("edge", edge_drops(e)));
        }
        let d = &app.dashboard;
        Snapshot {
            seq: self.seq,
            at_ms: now_ms,
            node: app.cluster.id.clone(),
            period_ms: super::PERIOD.as_millis() as u64,
            streams,
            switches: self.timeline.switches().cloned().collect(),
            switches_dropped: self.timeline.dropped,
            window_ms: super::timeline::WINDOW_MS,
            nodes,
            registry_error: self.registry_error.clone(),
            viewers,
            rates,
            drops,
            clients: d.clients(),
            max_clients: super::MAX_CLIENTS,
            skipped: d.metrics.skipped.load(Ordering::Relaxed),
        }
    }
}
