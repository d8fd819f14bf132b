//! The cluster: which nodes exist (membership), which origin owns which stream (leases), and
//! where a viewer goes (placement). The shared state sits behind one interface, [`Registry`],
//! with an in-memory implementation (`chorus serve` and every process without `--redis`) and a
//! Redis one (`--redis URL`), so one process and a cluster run the same code above the store.
//! The decisions (lease bookkeeping, the edge choice) are sans-IO and take `now` as an argument.

pub(crate) mod holds;
pub(crate) mod memory;
pub(crate) mod node;
pub(crate) mod placement;
pub(crate) mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

pub(crate) use node::{Load, NodeEntry, NodeKind, NodeRecord, NodeState};

/// How often a node rewrites its record (`chorus:node:{id}`): three writes fit in its expiry,
/// so one slow or lost write does not make a live node vanish.
pub(crate) const NODE_HEARTBEAT: Duration = Duration::from_secs(2);

/// How soon a node tries again after a heartbeat failed: the registry's connection comes back
/// on the call after it returns, so a short retry re-registers the node within about a second
/// of Redis's return instead of a heartbeat or two later.
pub(crate) const NODE_RETRY: Duration = Duration::from_millis(500);

/// How long a node's record lives without a heartbeat: a node that died (SIGKILL, power, a
/// partition) is gone from the registry this long after its last write at most.
pub(crate) const NODE_TTL: Duration = Duration::from_secs(6);

/// A record whose last heartbeat is older than this is ignored by placement and ownership
/// even before it expires: more than two heartbeats missed means the node is gone or cut off,
/// and directors stop naming it within 5 s of its death rather than the full [`NODE_TTL`].
pub(crate) const NODE_STALE: Duration = Duration::from_millis(5000);

/// How long a stream's lease (`chorus:stream:{name}`) lives without a refresh: the owner's
/// death frees the stream this long after its last refresh, after which the next publish
/// lands on another origin.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);

/// How often an origin refreshes the leases it holds: three refreshes fit in [`LEASE_TTL`].
pub(crate) const LEASE_REFRESH: Duration = Duration::from_secs(3);

/// How long an origin keeps a lease after its stream's last publication ends: a publisher that
/// reconnects (the SDK does within seconds) comes back to the same origin.
pub(crate) const LEASE_LINGER: Duration = Duration::from_secs(10);

/// Most streams an edge lists as carried in its record: the list only steers viewers of the
/// same stream together, and a record stays a few KiB.
pub(crate) const MAX_ADVERTISED_STREAMS: usize = 256;

/// Most nodes or stream owners one registry read returns (`/api/cluster`, placement): far more
/// than a cluster of this design (one Redis) has, and a bound on one answer's size.
pub(crate) const MAX_LISTED: usize = 10_000;

/// The capacity of an edge without `--capacity`: no limit (the director never counts it full).
pub(crate) const UNLIMITED_CAPACITY: u32 = u32::MAX;

/// Why the registry could not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    /// The Redis server did not answer or refused (what it said).
    #[error("redis: {0}")]
    Redis(String),
    /// A value in the registry could not be read (which key, why).
    #[error("malformed registry value at {key}: {why}")]
    Malformed { key: String, why: String },
}

/// The answer to a lease claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The lease is the claimant's (newly, or it already was).
    Won,
    /// Another holder has it.
    Held(String),
}

/// The answer to a lease refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refresh {
    /// Still the holder's; its life starts again.
    Kept,
    /// It had lapsed and nobody had taken it: the holder has it again.
    Reclaimed,
    /// Someone else holds it now.
    Lost(String),
}

/// A registry call's future.
pub(crate) type Pending<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// The shared state of a cluster: node records with an expiry, and stream leases that only
/// their holder refreshes or releases. A holder is `{node id}/{boot id}`, so a node restarted
/// under the same id does not inherit the leases of its previous life.
pub(crate) trait Registry: Send + Sync {
    /// Writes this node's record; it expires after [`NODE_TTL`] unless written again.
    fn put_node<'a>(&'a self, node: &'a NodeRecord) -> Pending<'a, ()>;
    /// Every live node's record with the age of its last heartbeat.
    fn nodes(&self) -> Pending<'_, Vec<NodeEntry>>;
    /// Takes a stream's lease for `holder` if nobody holds it (or `holder` already does).
    fn claim<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, Claim>;
    /// Extends `holder`'s lease (retaking it if it lapsed and is free).
    fn refresh<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, Refresh>;
    /// Gives a lease up, only if `holder` still has it; true if it did.
    fn release<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, bool>;
    /// Who holds a stream's lease.
    fn owner<'a>(&'a self, stream: &'a str) -> Pending<'a, Option<String>>;
    /// Every held lease: (stream, holder).
    fn owners(&self) -> Pending<'_, Vec<(String, String)>>;
}

/// Logs a registry outage once when it starts and once when it ends, however many calls fail
/// in between.
#[derive(Default)]
pub(crate) struct Outage {
    down_since: Mutex<Option<Instant>>,
}

impl Outage {
    /// A call failed: the first failure of an episode is logged.
    pub(crate) fn failed(&self, what: &str, e: &RegistryError) {
        let mut d = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = Some(Instant::now());
            warn!(error = %e, "cluster registry down ({what} failed): retrying; logged again when it is back");
        }
    }

    /// A call succeeded: true if it ended an outage (which is logged).
    pub(crate) fn ok(&self) -> bool {
        let mut d = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        match d.take() {
            Some(since) => {
                info!(
                    down_ms = since.elapsed().as_millis() as u64,
                    "cluster registry back"
                );
                true
            }
            None => false,
        }
    }

    fn note<T>(&self, what: &str, r: Result<T, RegistryError>) -> Result<T, RegistryError> {
        match &r {
            Ok(_) => {
                self.ok();
            }
            Err(e) => self.failed(what, e),
        }
        r
    }
}

/// Milliseconds of a clock private to this process, for the sans-IO parts.
pub(crate) fn mono_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

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
        })
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
        if self.holds_now(stream) {
            return Ok(own_url.to_owned());
        }
        let owner = self
            .outage
            .note("reading a stream owner", self.registry.owner(stream).await)?;
        let nodes = self.live_nodes().await?;
        let holder = match owner {
            Some(h) => h,
            None => {
                let candidate = node::least_loaded_origin(&nodes, &self.id)
                    .map_or_else(|| self.holder.clone(), |n| n.record.holder());
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

    /// Before this origin takes a publication of `stream`: it holds the lease (recently
    /// confirmed), or takes it now if it is free; refused if another origin holds it.
    pub(crate) async fn ensure_owner(&self, stream: &str) -> Result<(), ClusterError> {
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
            let r = record();
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
            tokio::time::sleep(next).await;
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
        let r: Arc<dyn Registry> = Arc::new(memory::MemoryRegistry::default());
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
    async fn a_holder_without_a_live_record_is_reported_gone() {
        let (o1, o2, r) = pair();
        register(&o1, &*r, 0).await;
        assert!(
            o2.ensure_owner("s").await.is_ok(),
            "o2 has no record, but may claim"
        );
        assert!(matches!(
            o1.publish_target("s", "ws://me").await,
            Err(ClusterError::OwnerGone { .. })
        ));
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
}
