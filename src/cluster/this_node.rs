//! This node in the cluster: its identity, the leases it holds, the viewers its director sent
//! out lately, and the tasks that keep its record and leases alive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{info, warn};

use super::{
    holds, mono_ms, node, placement, Claim, NodeEntry, NodeKind, NodeRecord, NodeState, Outage,
    Refresh, Registry, RegistryError, LEASE_REFRESH, LEASE_TTL, NODE_HEARTBEAT, NODE_RETRY,
    NODE_STALE, UNLIMITED_CAPACITY,
};

/// Why a publish or a placement could not be decided.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    /// The registry did not answer.
    #[error("the cluster registry is unreachable ({0}); try again shortly")]
    Registry(#[from] RegistryError),
    /// Another origin holds the stream's lease (stream, owner id, its signalling URL).
    #[error("stream {stream:?} is owned by origin {owner:?}: publish there ({url}) or through any director")]
    OwnedElsewhere {
        stream: String,
        owner: String,
        url: String,
    },
    /// The lease's holder has no live record (stream, holder).
    #[error("stream {stream:?} is held by {holder:?}, which is not serving; its lease lapses within {} s, then publish again", LEASE_TTL.as_secs())]
    OwnerGone { stream: String, holder: String },
    /// The placement's refusal.
    #[error(transparent)]
    Placement(#[from] placement::PlacementError),
    /// This origin is draining (shutting down): it takes no new publication.
    #[error("origin {0:?} is draining: publish through any director")]
    Draining(String),
}

/// This node's place in the cluster: its registry, its identity, the leases it holds and the
/// viewers its director sent out lately.
pub(crate) struct Cluster {
    registry: Arc<dyn Registry>,
    /// True with `--redis`: several processes share the registry.
    pub(crate) shared: bool,
    pub(crate) id: String,
    pub(crate) boot: String,
    /// `{id}/{boot}`: what this node's leases hold.
    pub(crate) holder: String,
    epoch: Instant,
    holds: Mutex<holds::Holds>,
    /// Open publishers' signalling sessions per stream: a stream keeps its lease while one is
    /// open, so a publisher between two publications is not refused.
    sessions: Mutex<HashMap<String, usize>>,
    assignments: Mutex<placement::Assignments>,
    pub(crate) outage: Outage,
    /// Set by SIGTERM: the record says `draining`, directors send nothing new here.
    draining: AtomicBool,
    /// Wakes the heartbeat to write the record at once (the state changed).
    beat_now: tokio::sync::Notify,
}

/// A publisher's signalling session on a stream, counted while it lives.
pub(crate) struct PublisherSession {
    cluster: Arc<Cluster>,
    stream: String,
}

impl Drop for PublisherSession {
    fn drop(&mut self) {
        let mut s = self
            .cluster
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = s.get_mut(&self.stream) {
            *n -= 1;
            if *n == 0 {
                s.remove(&self.stream);
            }
        }
    }
}

impl Cluster {
    /// A node of `registry`, named `id`; its boot id is new at every start.
    pub(crate) fn new(registry: Arc<dyn Registry>, shared: bool, id: String) -> Arc<Cluster> {
        let boot = crate::auth::random_secret(6);
        Arc::new(Cluster {
            registry,
            shared,
            holder: format!("{id}/{boot}"),
            id,
            boot,
            epoch: Instant::now(),
            holds: Mutex::default(),
            sessions: Mutex::default(),
            assignments: Mutex::default(),
            outage: Outage::default(),
            draining: AtomicBool::new(false),
            beat_now: tokio::sync::Notify::new(),
        })
    }

    /// From now on this node is `draining`: its record says so at once (the heartbeat writes
    /// it now), directors stop sending it work, and an origin takes no new publication.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.beat_now.notify_one();
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Gives up every lease this origin holds (draining): the next publish of each stream,
    /// through any director, lands on a serving origin, and the edges follow it there.
    pub(crate) async fn release_all(&self) -> usize {
        let held: Vec<String> = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .streams();
        let mut released = 0;
        for stream in held {
            let r = self.registry.release(&stream, &self.holder).await;
            if let Ok(true) = self.outage.note("releasing a lease", r) {
                released += 1;
            }
            self.holds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget(&stream);
        }
        released
    }

    pub(crate) fn registry(&self) -> &dyn Registry {
        &*self.registry
    }

    fn now(&self) -> u64 {
        mono_ms(self.epoch)
    }

    /// Live nodes whose heartbeat is recent (see [`NODE_STALE`]).
    pub(crate) async fn live_nodes(&self) -> Result<Vec<NodeEntry>, RegistryError> {
        let nodes = self
            .outage
            .note("reading nodes", self.registry.nodes().await)?;
        Ok(nodes.into_iter().filter(|n| n.age < NODE_STALE).collect())
    }

    /// Where a publisher of `stream` goes, asked at this origin's director: the lease holder's
    /// signalling URL (`own_url` when it is this origin). With no holder, the least-loaded
    /// serving origin gets the lease.
    pub(crate) async fn publish_target(
        &self,
        stream: &str,
        own_url: &str,
    ) -> Result<String, ClusterError> {
        // A lease this origin holds (confirmed within its life) needs no round trip, and keeps
        // its publishers coming here through a registry outage.
        if self.holds_now(stream) && !self.is_draining() {
            return Ok(own_url.to_owned());
        }
        let owner = self
            .outage
            .note("reading a stream owner", self.registry.owner(stream).await)?;
        let nodes = self.live_nodes().await?;
        let holder = match owner {
            Some(h) => h,
            None => {
                let candidate = match node::least_loaded_origin(&nodes, &self.id) {
                    Some(n) => n.record.holder(),
                    None if self.is_draining() => {
                        return Err(ClusterError::Draining(self.id.clone()))
                    }
                    None => self.holder.clone(),
                };
                match self.outage.note(
                    "claiming a stream",
                    self.registry.claim(stream, &candidate).await,
                )? {
                    Claim::Won => {
                        info!(stream, holder = candidate.as_str(), "stream lease claimed");
                        candidate
                    }
                    Claim::Held(h) => h,
                }
            }
        };
        let holder = match nodes.iter().any(|n| n.record.holder() == holder) {
            true => holder,
            false => self.take_over(stream, holder, &nodes).await?,
        };
        if holder == self.holder {
            self.confirmed(stream);
            return Ok(own_url.to_owned());
        }
        match nodes.iter().find(|n| n.record.holder() == holder) {
            Some(n) => Ok(n.record.ws.clone()),
            None => Err(ClusterError::OwnerGone {
                stream: stream.to_owned(),
                holder,
            }),
        }
    }

    /// The lease's holder has no live record (no heartbeat for [`NODE_STALE`]: it died or is
    /// cut off): the least-loaded serving origin takes the lease over at once, fenced on that
    /// holder still having it, rather than the publisher waiting for it to lapse. Returns the
    /// holder now.
    async fn take_over(
        &self,
        stream: &str,
        gone: String,
        nodes: &[NodeEntry],
    ) -> Result<String, ClusterError> {
        let Some(to) = node::least_loaded_origin(nodes, &self.id).map(|n| n.record.holder()) else {
            return Err(ClusterError::OwnerGone {
                stream: stream.to_owned(),
                holder: gone,
            });
        };
        let r = self.registry.take_over(stream, &gone, &to).await;
        if self.outage.note("taking a lease over", r)? {
            info!(
                stream,
                gone = gone.as_str(),
                holder = to.as_str(),
                "stream lease taken over from a holder with no live record"
            );
            return Ok(to);
        }
        // Someone else moved it first: whoever holds it now.
        let now = self
            .outage
            .note("reading a stream owner", self.registry.owner(stream).await)?;
        Ok(now.unwrap_or(gone))
    }

    /// Before this origin takes a publication of `stream`: it holds the lease (recently
    /// confirmed), or takes it now if it is free; refused if another origin holds it.
    pub(crate) async fn ensure_owner(&self, stream: &str) -> Result<(), ClusterError> {
        if self.is_draining() {
            return Err(ClusterError::Draining(self.id.clone()));
        }
        if self.holds_now(stream) {
            return Ok(());
        }
        let claim = self.outage.note(
            "claiming a stream",
            self.registry.claim(stream, &self.holder).await,
        )?;
        match claim {
            Claim::Won => {
                info!(
                    stream,
                    holder = self.holder.as_str(),
                    "stream lease claimed"
                );
                self.confirmed(stream);
                Ok(())
            }
            Claim::Held(h) => {
                let nodes = self.live_nodes().await.unwrap_or_default();
                let owner = h.split('/').next().unwrap_or(&h).to_owned();
                match nodes.iter().find(|n| n.record.holder() == h) {
                    Some(n) => Err(ClusterError::OwnedElsewhere {
                        stream: stream.to_owned(),
                        owner,
                        url: n.record.ws.clone(),
                    }),
                    None => Err(ClusterError::OwnerGone {
                        stream: stream.to_owned(),
                        holder: h,
                    }),
                }
            }
        }
    }

    /// True while this origin's lease on `stream` was confirmed less than [`LEASE_TTL`] ago.
    pub(crate) fn holds_now(&self, stream: &str) -> bool {
        let now = self.now();
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held(stream, now)
    }

    /// Counts a publisher's signalling session on `stream` until the value is dropped.
    pub(crate) fn publisher_session(self: &Arc<Self>, stream: &str) -> PublisherSession {
        *self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(stream.to_owned())
            .or_default() += 1;
        PublisherSession {
            cluster: self.clone(),
            stream: stream.to_owned(),
        }
    }

    fn confirmed(&self, stream: &str) {
        let now = self.now();
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .confirmed(stream, now);
    }

    /// One round of lease upkeep: refreshes the leases of streams published here (`live`, or
    /// with a publisher's session open) or lately, releases the others.
    pub(crate) async fn keep_leases(&self, live: &[String]) {
        // A draining origin gave its leases up and must not take them back.
        if self.is_draining() {
            return;
        }
        let mut live = live.to_vec();
        live.extend(
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned(),
        );
        let plan = {
            let now = self.now();
            let mut h = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            h.plan(now, &live)
        };
        for (stream, action) in plan {
            match action {
                holds::Action::Refresh => {
                    let r = self.registry.refresh(&stream, &self.holder).await;
                    match self.outage.note("refreshing a lease", r) {
                        Ok(Refresh::Kept) => self.confirmed(&stream),
                        Ok(Refresh::Reclaimed) => {
                            info!(stream, "stream lease had lapsed and was free: reclaimed");
                            self.confirmed(&stream);
                        }
                        Ok(Refresh::Lost(other)) => {
                            warn!(stream, holder = other.as_str(), "stream lease lost to another origin: new publications here are refused");
                            self.holds
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .forget(&stream);
                        }
                        // Kept in the table: it stops counting as held once unconfirmed for
                        // LEASE_TTL, and the next round tries again.
                        Err(_) => {}
                    }
                }
                holds::Action::Release => {
                    let r = self.registry.release(&stream, &self.holder).await;
                    if let Ok(released) = self.outage.note("releasing a lease", r) {
                        info!(
                            stream,
                            released, "stream has no publication here: lease given up"
                        );
                    }
                    self.holds
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget(&stream);
                }
            }
        }
    }

    /// Picks the edge for a viewer of `stream` among the registered edges (requested region
    /// first), counting the viewers this director sent out lately; its signalling URL.
    pub(crate) async fn place_viewer(
        &self,
        stream: &str,
        region: Option<&str>,
    ) -> Result<String, ClusterError> {
        let nodes = self.live_nodes().await?;
        let now = self.now();
        let mut a = self.assignments.lock().unwrap_or_else(|p| p.into_inner());
        let edges: Vec<placement::Candidate<'_>> = nodes
            .iter()
            .filter(|n| n.record.kind == NodeKind::Edge)
            .map(|n| {
                let r = &n.record;
                placement::Candidate {
                    id: &r.id,
                    region: r.region.as_deref(),
                    capacity: r.capacity.unwrap_or(UNLIMITED_CAPACITY),
                    load: r.load.viewers + a.pending(&r.id, now),
                    carries: r.streams.iter().any(|s| s == stream) || a.carries(&r.id, stream, now),
                    serving: r.state == NodeState::Serving,
                }
            })
            .collect();
        let i = placement::choose(&edges, region)?;
        let id = edges[i].id;
        a.assigned(id, stream, now);
        let url = nodes
            .iter()
            .find(|n| n.record.id == id)
            .map(|n| n.record.ws.clone())
            .unwrap_or_default();
        Ok(url)
    }
}

/// Writes this node's record now and every [`NODE_HEARTBEAT`] (every [`NODE_RETRY`] while it
/// fails), with what `record` says at the time (its load changes); logs the first
/// registration and each one after an outage.
pub(crate) fn spawn_heartbeat(
    cluster: Arc<Cluster>,
    record: impl Fn() -> NodeRecord + Send + Sync + 'static,
) {
    tokio::spawn(async move {
        let mut registered = false;
        loop {
            let mut r = record();
            if cluster.is_draining() {
                r.state = NodeState::Draining;
            }
            let next = match cluster.registry.put_node(&r).await {
                Ok(()) => {
                    let back = cluster.outage.ok();
                    if !registered || back {
                        info!(
                            id = r.id.as_str(),
                            kind = r.kind.as_str(),
                            ws = r.ws.as_str(),
                            "node registered in the cluster"
                        );
                        registered = true;
                    }
                    NODE_HEARTBEAT
                }
                Err(e) => {
                    cluster.outage.failed("the node heartbeat", &e);
                    NODE_RETRY
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = cluster.beat_now.notified() => {
                    info!(id = cluster.id.as_str(), "node draining: record updated at once");
                }
            }
        }
    });
}

/// Refreshes and releases this origin's leases every [`LEASE_REFRESH`].
pub(crate) fn spawn_lease_keeper(
    cluster: Arc<Cluster>,
    live: impl Fn() -> Vec<String> + Send + Sync + 'static,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LEASE_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            cluster.keep_leases(&live()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::node::tests::record;
    use super::*;

    /// Two origins over one in-memory registry: what two processes do over Redis.
    fn pair() -> (Arc<Cluster>, Arc<Cluster>, Arc<dyn Registry>) {
        let r: Arc<dyn Registry> = Arc::new(super::super::memory::MemoryRegistry::default());
        (
            Cluster::new(r.clone(), true, "o1".into()),
            Cluster::new(r.clone(), true, "o2".into()),
            r,
        )
    }

    async fn register(c: &Cluster, r: &dyn Registry, publications: u64) {
        let mut n = record(&c.id, NodeKind::Origin, publications).record;
        n.boot = c.boot.clone();
        r.put_node(&n).await.unwrap();
    }

    #[tokio::test]
    async fn both_directors_send_a_publisher_to_the_least_loaded_origin_which_alone_takes_it() {
        let (o1, o2, r) = pair();
        register(&o1, &*r, 1).await;
        register(&o2, &*r, 0).await;
        // o1's director: o2 is less loaded and gets the lease.
        assert_eq!(
            o1.publish_target("s", "ws://me").await.unwrap(),
            "ws://o2/ws"
        );
        assert_eq!(o2.publish_target("s", "ws://me").await.unwrap(), "ws://me");
        assert!(o2.ensure_owner("s").await.is_ok());
        match o1.ensure_owner("s").await {
            Err(ClusterError::OwnedElsewhere { owner, url, .. }) => {
                assert_eq!((owner.as_str(), url.as_str()), ("o2", "ws://o2/ws"))
            }
            other => panic!("{other:?}"),
        }
        assert!(o2.holds_now("s") && !o1.holds_now("s"));
    }

    #[tokio::test]
    async fn a_holder_without_a_live_record_is_taken_over_or_reported_gone() {
        let (o1, o2, r) = pair();
        assert!(
            o2.ensure_owner("s").await.is_ok(),
            "o2 has no record, but may claim"
        );
        // No serving origin to give it to: gone, and the lease stays o2's.
        assert!(matches!(
            o1.publish_target("s", "ws://me").await,
            Err(ClusterError::OwnerGone { .. })
        ));
        assert_eq!(r.owner("s").await.unwrap(), Some(o2.holder.clone()));
        // o1 serving: it takes the dead holder's lease over at once (no wait for the lapse).
        register(&o1, &*r, 0).await;
        assert_eq!(o1.publish_target("s", "ws://me").await.unwrap(), "ws://me");
        assert_eq!(r.owner("s").await.unwrap(), Some(o1.holder.clone()));
        // Fenced: a takeover from a holder that no longer has it changes nothing.
        assert!(!r.take_over("s", &o2.holder, &o2.holder).await.unwrap());
        assert_eq!(r.owner("s").await.unwrap(), Some(o1.holder.clone()));
    }

    #[tokio::test]
    async fn an_open_publisher_session_keeps_its_lease_in_upkeep() {
        let (o1, _, r) = pair();
        o1.ensure_owner("s").await.unwrap();
        let session = o1.publisher_session("s");
        o1.keep_leases(&[]).await;
        assert_eq!(r.owner("s").await.unwrap(), Some(o1.holder.clone()));
        drop(session);
        assert!(o1.sessions.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_draining_origin_gives_its_leases_up_takes_none_and_sends_publishers_on() {
        let (o1, o2, r) = pair();
        register(&o1, &*r, 0).await;
        register(&o2, &*r, 5).await;
        o1.ensure_owner("s").await.unwrap();
        o1.start_draining();
        let mut n = record("o1", NodeKind::Origin, 0).record;
        (n.boot, n.state) = (o1.boot.clone(), NodeState::Draining);
        r.put_node(&n).await.unwrap();
        assert_eq!(o1.release_all().await, 1);
        assert_eq!(r.owner("s").await.unwrap(), None);
        // Upkeep does not take it back, and no new publication is taken here.
        o1.keep_leases(&["s".to_string()]).await;
        assert_eq!(r.owner("s").await.unwrap(), None);
        assert!(matches!(
            o1.ensure_owner("s").await,
            Err(ClusterError::Draining(_))
        ));
        // Its director sends the publisher to the serving origin, busier as it is.
        assert_eq!(
            o1.publish_target("s", "ws://o1").await.unwrap(),
            record("o2", NodeKind::Origin, 5).record.ws
        );
        assert_eq!(r.owner("s").await.unwrap(), Some(o2.holder.clone()));
    }
}
