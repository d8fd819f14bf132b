//! The cluster: which nodes exist (membership), which origin owns which stream (leases), and
//! where a viewer goes (placement). The shared state sits behind one interface, [`Registry`],
//! with an in-memory implementation (`chorus serve` and every process without `--redis`) and a
//! Redis one (`--redis URL`), so one process and a cluster run the same code above the store.
//! The decisions (lease bookkeeping, the edge choice) are sans-IO and take `now` as an argument.

pub(crate) mod holds;
pub(crate) mod memory;
pub(crate) mod node;
pub(crate) mod outage;
pub(crate) mod placement;
pub(crate) mod redis;
mod redis_rooms;
pub(crate) mod this_node;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

pub(crate) use node::{Load, NodeEntry, NodeKind, NodeRecord, NodeState};
pub(crate) use outage::Outage;
pub(crate) use this_node::{spawn_heartbeat, spawn_lease_keeper, Cluster, ClusterError};

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

/// How long an edge's viewer count of a stream (`chorus:viewers:{stream}`) counts without a
/// refresh: three of the edges' one-second refreshes, so a dead edge's viewers leave the
/// stream-wide count within 3 s while one late refresh does not drop a live edge's.
pub(crate) const VIEWERS_TTL: Duration = Duration::from_secs(3);

/// How often an edge writes its per-stream viewer counts and an origin reads its rooms'
/// stream-wide counts: `viewercount` and `room.audience_count` change at most this often.
pub(crate) const VIEWERS_EVERY: Duration = Duration::from_secs(1);
/// Most streams an edge reports per round: one registry call each, and far more streams than
/// one edge's viewers spread over in practice; the rest keep their edge-wide count.
pub(crate) const MAX_COUNTED_STREAMS: usize = 1024;

/// The answer to a room write fenced by the stream's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fence {
    /// The writer holds the lease: written.
    Written,
    /// The lease is another's (its holder) or nobody's (None): nothing written.
    NotHolder(Option<String>),
}

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
    /// Gives `from`'s lease to `to`, only if `from` still holds it: a director takes the lease
    /// of a holder whose record went stale (it died) without waiting for the lease to lapse.
    fn take_over<'a>(&'a self, stream: &'a str, from: &'a str, to: &'a str) -> Pending<'a, bool>;
    /// Who holds a stream's lease.
    fn owner<'a>(&'a self, stream: &'a str) -> Pending<'a, Option<String>>;
    /// Every held lease: (stream, holder).
    fn owners(&self) -> Pending<'_, Vec<(String, String)>>;
    /// Writes room records (member id → JSON) into `chorus:room:{room}` only while `holder`
    /// holds the stream's lease; the room lives at least until `expires_at` (Unix seconds).
    fn room_write<'a>(
        &'a self,
        room: &'a str,
        holder: &'a str,
        records: &'a [(String, String)],
        expires_at: u64,
    ) -> Pending<'a, Fence>;
    /// A room's records (member id → JSON).
    fn room_read<'a>(&'a self, room: &'a str) -> Pending<'a, Vec<(String, String)>>;
    /// Sets `node`'s viewer count of `stream` (0 takes it out); returns the other nodes'
    /// fresh counts together.
    fn put_viewers<'a>(&'a self, stream: &'a str, node: &'a str, count: u64) -> Pending<'a, u64>;
    /// The stream's viewers on every node (fresh counts only).
    fn viewers<'a>(&'a self, stream: &'a str) -> Pending<'a, u64>;
}

/// Milliseconds of a clock private to this process, for the sans-IO parts.
pub(crate) fn mono_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}
