//! An edge with `--redis` and no `--origin` follows each stream's owner: it looks up the stream's
//! lease holder (`chorus:stream:{name}`) and that origin's record (relay address, fingerprint),
//! keeps one QUIC link per origin it needs (each a [`manage_link`] of its own), and moves a
//! stream to the new owner's link when the lease changes hands or the owner's link dies. Its
//! viewers keep their sessions: the moved stream's sources go `inactive`, and come back
//! `active` from the new owner's source list.
//!
//! The decision ([`next_step`]) is sans-IO; the router task ([`spawn_router`]) does the I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};

use super::RelaySink;
use crate::auth::jwt::JwtVerifier;
use crate::cluster::{Cluster, NodeEntry, NodeKind, NodeState};
use crate::relay::client::{manage_link, LinkConfig, LinkCtl, LinkHandler, LinkRequest};
use crate::relay::proto::{DatagramHeader, SourceInfo};

/// How often the edge reads the owner of each stream it carries: a new owner (the old one died,
/// its lease lapsed, a publisher reconnected elsewhere) is followed within about this much.
pub(crate) const OWNER_POLL: Duration = Duration::from_secs(1);

/// A link that carries no stream is closed after this long (unless it is the edge's only one,
/// kept for the JWT key and for authorizing viewers): a viewer coming back soon reuses it.
pub(crate) const LINK_IDLE: Duration = Duration::from_secs(10);

/// Bits of a relayed channel number the origin's own numbering keeps; the top byte is the
/// link's slot, so two origins numbering channels from 1 do not collide at the media threads.
/// One origin would need 16 million subscriptions in one life to wrap into another's.
const CHANNEL_BITS: u32 = 24;

/// What the router does about one stream after an owner lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Stay where it is.
    Stay,
    /// Subscribe at this holder's link (after leaving the current one, if any).
    MoveTo(String),
    /// Leave the current (dead) link and wait for an owner.
    Detach,
}

/// The sans-IO rule: `current` is the holder whose link carries the stream, `alive` whether that
/// link is up, `owner` the lease holder now (None: no lease), `reachable` whether the owner has
/// a live record with a relay address.
pub(crate) fn next_step(
    current: Option<&str>,
    alive: bool,
    owner: Option<&str>,
    reachable: bool,
) -> Step {
    match (current, owner) {
        (Some(c), Some(o)) if c == o => Step::Stay,
        (_, Some(o)) if reachable => Step::MoveTo(o.to_owned()),
        // An owner without a record yet (or its record lapsed): wait, keep what still works.
        (Some(_), _) if alive => Step::Stay,
        (Some(_), _) => Step::Detach,
        (None, _) => Step::Stay,
    }
}

/// One origin link's side of the media threads: it renumbers the link's channels into its
/// slot, passes on only the source lists of streams assigned to it (a list that arrives after
/// the stream moved away is stale), and on the link's loss voids only its own streams.
struct LinkSide {
    sink: Arc<RelaySink>,
    slot: u32,
    origin: String,
    assigned: Mutex<HashSet<String>>,
    up: std::sync::atomic::AtomicBool,
    /// When each stream lost its sources (link loss or move), to log the gap when it is back.
    gaps: Arc<Mutex<HashMap<String, Instant>>>,
}

impl LinkSide {
    fn local(&self, channel: u32) -> u32 {
        (self.slot << CHANNEL_BITS) | (channel & ((1 << CHANNEL_BITS) - 1))
    }
}

impl LinkHandler for LinkSide {
    fn on_sources(&self, stream: &str, channel: u32, sources: &[SourceInfo]) {
        self.up.store(true, Ordering::Relaxed);
        let assigned = self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(stream);
        if !assigned {
            return;
        }
        if let Some(since) = self
            .gaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream)
        {
            info!(
                stream,
                owner = self.origin.as_str(),
                gap_ms = since.elapsed().as_millis() as u64,
                "stream back from its owner: viewers hear it again"
            );
        }
        self.sink.on_sources(stream, self.local(channel), sources);
    }

    fn on_datagram(&self, mut hdr: DatagramHeader, datagram: Bytes, queued: Duration) {
        // The media threads read the channel from `hdr`, never from the datagram's bytes.
        hdr.channel = self.local(hdr.channel);
        self.sink.on_datagram(hdr, datagram, queued);
    }

    fn on_closed(&self, reason: &str) {
        warn!(
            origin = self.origin.as_str(),
            "origin link closed: {reason}"
        );
    }

    fn on_revoke(&self, room: &str, member: &str) {
        self.sink.on_revoke(room, member);
    }

    fn on_malformed(&self) {
        self.sink.on_malformed();
    }

    fn on_link_down(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.sink
            .metrics
            .link_losses
            .fetch_add(1, Ordering::Relaxed);
        let streams: Vec<String> = self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        streams_down(&self.sink, &self.gaps, streams);
    }
}

/// Voids these streams' sources at every media thread (viewers get `inactive`).
fn streams_down(sink: &RelaySink, gaps: &Mutex<HashMap<String, Instant>>, streams: Vec<String>) {
    if streams.is_empty() {
        return;
    }
    if let Ok(mut cache) = sink.shared.sources.lock() {
        for s in &streams {
            cache.remove(s);
        }
    }
    let now = Instant::now();
    let mut g = gaps.lock().unwrap_or_else(|p| p.into_inner());
    for s in &streams {
        g.entry(s.clone()).or_insert(now);
    }
    drop(g);
    for lane in &sink.lanes {
        lane.send(super::worker::EdgeCmd::StreamsDown(streams.clone()));
    }
}

struct OriginLink {
    ctl: LinkCtl,
    side: Arc<LinkSide>,
    /// When it last stopped carrying any stream.
    idle_since: Option<Instant>,
}

struct Wanted {
    /// Media threads that want it (the router subscribes once per stream).
    count: usize,
    /// The holder whose link carries it.
    holder: Option<String>,
    /// Talking reports held per source, forwarded to the stream's current link.
    talking: BTreeMap<String, usize>,
}

/// What the router needs to make links.
pub(crate) struct RouterConfig {
    pub cluster: Arc<Cluster>,
    /// `--cluster-token` and this edge's signalling URL, for every link's `Hello`.
    pub template: LinkConfig,
    pub keys: Arc<JwtVerifier>,
}

struct Router {
    cfg: RouterConfig,
    sink: Arc<RelaySink>,
    links: HashMap<String, OriginLink>,
    streams: BTreeMap<String, Wanted>,
    next_slot: AtomicU8,
    gaps: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Starts the router; the returned [`LinkCtl`] takes the media threads' requests.
pub(super) fn spawn_router(cfg: RouterConfig, sink: Arc<RelaySink>) -> LinkCtl {
    let (ctl, mut rx) = LinkCtl::channel();
    let mut r = Router {
        cfg,
        sink,
        links: HashMap::new(),
        streams: BTreeMap::new(),
        next_slot: AtomicU8::new(1),
        gaps: Arc::default(),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(OWNER_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    Some(req) => r.request(req).await,
                    None => return,
                },
                _ = tick.tick() => r.poll().await,
            }
        }
    });
    ctl
}

impl Router {
    async fn request(&mut self, req: LinkRequest) {
        match req {
            LinkRequest::Subscribe(s) => {
                let w = self.streams.entry(s.clone()).or_insert(Wanted {
                    count: 0,
                    holder: None,
                    talking: BTreeMap::new(),
                });
                w.count += 1;
                if w.count == 1 {
                    self.follow(&s).await;
                }
            }
            LinkRequest::Unsubscribe(s) => {
                let Some(w) = self.streams.get_mut(&s) else {
                    return;
                };
                w.count -= 1;
                if w.count == 0 {
                    let holder = w.holder.take();
                    self.streams.remove(&s);
                    if let Some(h) = holder {
                        self.leave(&s, &h, false);
                    }
                }
            }
            LinkRequest::Keyframe { stream, source } => {
                if let Some(l) = self.link_of(&stream) {
                    l.ctl.send(LinkRequest::Keyframe { stream, source });
                }
            }
            LinkRequest::Talking {
                stream,
                source,
                talking,
            } => {
                let Some(w) = self.streams.get_mut(&stream) else {
                    return;
                };
                let n = w.talking.entry(source.clone()).or_default();
                *n = if talking { *n + 1 } else { n.saturating_sub(1) };
                if *n == 0 {
                    w.talking.remove(&source);
                }
                if let Some(l) = self.link_of(&stream) {
                    l.ctl.send(LinkRequest::Talking {
                        stream,
                        source,
                        talking,
                    });
                }
            }
            LinkRequest::Authorize {
                stream,
                token,
                reply,
            } => {
                // The owner's policy, or (no owner yet) any origin's: they share it.
                if self.link_of(&stream).is_none() {
                    self.follow(&stream).await;
                }
                let holder = match self.streams.get(&stream).and_then(|w| w.holder.clone()) {
                    Some(h) => Some(h),
                    None => self.any_link().await,
                };
                match holder.and_then(|h| self.links.get(&h)) {
                    Some(l) => l.ctl.send(LinkRequest::Authorize {
                        stream,
                        token,
                        reply,
                    }),
                    None => {
                        let _ = reply.send(Err((
                            503,
                            "this edge reaches no origin right now: try again shortly".into(),
                        )));
                    }
                }
            }
        }
    }

    fn link_of(&self, stream: &str) -> Option<&OriginLink> {
        let h = self.streams.get(stream)?.holder.as_deref()?;
        self.links.get(h)
    }

    /// Looks the stream's owner up and moves it there if it should.
    async fn follow(&mut self, stream: &str) {
        let owner = match self.cfg.cluster.registry().owner(stream).await {
            Ok(o) => o,
            Err(e) => {
                warn!(stream, "cannot read the stream's owner: {e}");
                return;
            }
        };
        let nodes = self.cfg.cluster.live_nodes().await.unwrap_or_default();
        self.apply(stream, owner.as_deref(), &nodes).await;
    }

    async fn apply(&mut self, stream: &str, owner: Option<&str>, nodes: &[NodeEntry]) {
        let Some(w) = self.streams.get(stream) else {
            return;
        };
        let current = w.holder.clone();
        let alive = current
            .as_ref()
            .and_then(|h| self.links.get(h))
            .is_some_and(|l| l.side.up.load(Ordering::Relaxed));
        let record = owner.and_then(|o| relay_of(nodes, o));
        let step = next_step(current.as_deref(), alive, owner, record.is_some());
        match step {
            Step::Stay => {}
            Step::Detach => {
                if let Some(h) = current {
                    info!(
                        stream,
                        old = h.as_str(),
                        "stream's owner is gone and no origin holds its lease yet: waiting"
                    );
                    self.leave(stream, &h, true);
                }
                if let Some(w) = self.streams.get_mut(stream) {
                    w.holder = None;
                }
            }
            Step::MoveTo(holder) => {
                let Some(entry) = record else { return };
                if !self.ensure_link(&holder, entry).await {
                    return;
                }
                if let Some(old) = &current {
                    info!(
                        stream,
                        old = old.as_str(),
                        new = holder.as_str(),
                        "stream's owner changed: relinking"
                    );
                    self.leave(stream, old, true);
                } else {
                    info!(
                        stream,
                        owner = holder.as_str(),
                        "following the stream's owner"
                    );
                }
                let Some(l) = self.links.get_mut(&holder) else {
                    return;
                };
                l.idle_since = None;
                l.side
                    .assigned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(stream.to_owned());
                l.ctl.send(LinkRequest::Subscribe(stream.to_owned()));
                let w = self.streams.get_mut(stream).expect("checked above");
                w.holder = Some(holder);
                for source in w.talking.keys() {
                    l.ctl.send(LinkRequest::Talking {
                        stream: stream.to_owned(),
                        source: source.clone(),
                        talking: true,
                    });
                }
            }
        }
    }

    /// Takes `stream` off `holder`'s link; `void` tells the media threads its sources are gone
    /// (not needed when its last viewer left).
    fn leave(&mut self, stream: &str, holder: &str, void: bool) {
        let Some(l) = self.links.get_mut(holder) else {
            return;
        };
        let mut assigned = l.side.assigned.lock().unwrap_or_else(|p| p.into_inner());
        assigned.remove(stream);
        if assigned.is_empty() {
            l.idle_since = Some(Instant::now());
        }
        drop(assigned);
        l.ctl.send(LinkRequest::Unsubscribe(stream.to_owned()));
        if void {
            streams_down(&self.sink, &self.gaps, vec![stream.to_owned()]);
        }
    }

    /// A link to `holder` (made now if there is none); false if it cannot be made.
    async fn ensure_link(&mut self, holder: &str, entry: &NodeEntry) -> bool {
        if self.links.contains_key(holder) {
            return true;
        }
        let Some(relay) = entry.record.relay.as_deref().and_then(|a| a.parse().ok()) else {
            return false;
        };
        let slot = self.free_slot();
        let side = Arc::new(LinkSide {
            sink: self.sink.clone(),
            slot,
            origin: entry.record.id.clone(),
            assigned: Mutex::default(),
            up: std::sync::atomic::AtomicBool::new(true),
            gaps: self.gaps.clone(),
        });
        let cfg = LinkConfig {
            origin: relay,
            fingerprint: entry.record.fingerprint.clone(),
            ..self.cfg.template.clone()
        };
        let started = Instant::now();
        match manage_link(cfg, side.clone(), self.cfg.keys.clone()).await {
            Ok(ctl) => {
                info!(
                    origin = entry.record.id.as_str(),
                    %relay,
                    ms = started.elapsed().as_millis() as u64,
                    "linked to origin (from the registry)"
                );
                let ctl = ctl.counting_drops_in(self.sink.metrics.link_requests_dropped.clone());
                self.links.insert(
                    holder.to_owned(),
                    OriginLink {
                        ctl,
                        side,
                        idle_since: Some(Instant::now()),
                    },
                );
                true
            }
            Err(e) => {
                warn!(
                    origin = entry.record.id.as_str(),
                    "cannot link to origin: {e}"
                );
                false
            }
        }
    }

    fn free_slot(&self) -> u32 {
        loop {
            let s = self.next_slot.fetch_add(1, Ordering::Relaxed);
            if s == 0 {
                continue;
            }
            let used = self.links.values().any(|l| l.side.slot == u32::from(s));
            if !used {
                return u32::from(s);
            }
        }
    }

    /// Some live link's holder, making one to a serving origin if there is none.
    async fn any_link(&mut self) -> Option<String> {
        if let Some((h, _)) = self
            .links
            .iter()
            .find(|(_, l)| l.side.up.load(Ordering::Relaxed))
        {
            return Some(h.clone());
        }
        let nodes = self.cfg.cluster.live_nodes().await.ok()?;
        let mut origins: Vec<&NodeEntry> = nodes
            .iter()
            .filter(|n| {
                n.record.kind == NodeKind::Origin
                    && n.record.state == NodeState::Serving
                    && n.record.relay.is_some()
            })
            .collect();
        origins.sort_by_key(|n| n.record.load.publications);
        let entry = (*origins.first()?).clone();
        let holder = entry.record.holder();
        self.ensure_link(&holder, &entry).await.then_some(holder)
    }

    /// Every [`OWNER_POLL`]: follows each stream's owner, closes idle links, and keeps one link
    /// up (for the JWT key and for authorizing viewers).
    async fn poll(&mut self) {
        let names: Vec<String> = self.streams.keys().cloned().collect();
        if !names.is_empty() {
            let Ok(nodes) = self.cfg.cluster.live_nodes().await else {
                return;
            };
            for s in names {
                match self.cfg.cluster.registry().owner(&s).await {
                    Ok(owner) => self.apply(&s, owner.as_deref(), &nodes).await,
                    Err(e) => {
                        warn!(stream = s.as_str(), "cannot read the stream's owner: {e}");
                        return;
                    }
                }
            }
        }
        let now = Instant::now();
        let idle: Vec<String> = self
            .links
            .iter()
            .filter(|(_, l)| l.idle_since.is_some_and(|t| now - t >= LINK_IDLE))
            .map(|(h, _)| h.clone())
            .collect();
        for h in idle {
            let live_others = self
                .links
                .iter()
                .any(|(o, l)| *o != h && l.side.up.load(Ordering::Relaxed));
            let dead = self
                .links
                .get(&h)
                .is_some_and(|l| !l.side.up.load(Ordering::Relaxed));
            if live_others || dead {
                info!(origin = h.as_str(), "closing an idle origin link");
                // Dropping its requests' sender ends its manager, which closes the link.
                self.links.remove(&h);
            }
        }
        if self.links.is_empty() {
            let _ = self.any_link().await;
        }
    }
}

/// The owner's record if it is live and has a relay address.
fn relay_of<'a>(nodes: &'a [NodeEntry], holder: &str) -> Option<&'a NodeEntry> {
    nodes
        .iter()
        .find(|n| n.record.holder() == holder && n.record.relay.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_follows_a_new_owner_and_waits_out_a_lapsed_lease() {
        // First owner: link to it.
        assert_eq!(
            next_step(None, false, Some("o1/a"), true),
            Step::MoveTo("o1/a".into())
        );
        // Same owner: stay, whether or not its link is up (the link manager relinks).
        assert_eq!(
            next_step(Some("o1/a"), true, Some("o1/a"), true),
            Step::Stay
        );
        assert_eq!(
            next_step(Some("o1/a"), false, Some("o1/a"), true),
            Step::Stay
        );
        // The lease moved (o1 died, its publisher came back through o2): relink.
        assert_eq!(
            next_step(Some("o1/a"), false, Some("o2/b"), true),
            Step::MoveTo("o2/b".into())
        );
        // A new owner with no record yet: keep a working link, leave a dead one.
        assert_eq!(
            next_step(Some("o1/a"), true, Some("o2/b"), false),
            Step::Stay
        );
        assert_eq!(
            next_step(Some("o1/a"), false, Some("o2/b"), false),
            Step::Detach
        );
        // No lease (the owner died and it lapsed): a dead link is left, a live one kept.
        assert_eq!(next_step(Some("o1/a"), false, None, false), Step::Detach);
        assert_eq!(next_step(Some("o1/a"), true, None, false), Step::Stay);
        // Nothing published yet: wait.
        assert_eq!(next_step(None, false, None, false), Step::Stay);
    }
}
