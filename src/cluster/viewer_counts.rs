//! Stream-wide viewer counts: every [`VIEWERS_EVERY`] an edge writes its viewers of each
//! stream it carries to the registry (`chorus:viewers:{stream}`) and learns the other edges'
//! counts of the same streams, which its `viewercount` events add to its own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Cluster, VIEWERS_EVERY};
use crate::edge::Edge;

/// Most streams an edge reports per round: one registry call each, and far more streams than
/// one edge's viewers spread over in practice; the rest keep their edge-wide count.
pub(crate) const MAX_COUNTED_STREAMS: usize = 1024;

/// Reports `edge`'s per-stream counts for the life of the process (with a shared registry).
pub(crate) fn spawn_edge_counts(cluster: Arc<Cluster>, edge: Arc<Edge>) {
    tokio::spawn(async move {
        let mut reported: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(VIEWERS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let counts = edge.stream_counts(MAX_COUNTED_STREAMS);
            let mut others = HashMap::new();
            let mut now_reported = HashSet::new();
            for (stream, n) in counts {
                let r = cluster
                    .registry()
                    .put_viewers(&stream, &cluster.id, n)
                    .await;
                if let Ok(o) = cluster.outage.note("writing viewer counts", r) {
                    others.insert(stream.clone(), o as usize);
                }
                now_reported.insert(stream);
            }
            // A stream whose last viewer here left: its count goes at once, not at its expiry.
            for gone in reported.difference(&now_reported) {
                let r = cluster.registry().put_viewers(gone, &cluster.id, 0).await;
                let _ = cluster.outage.note("writing viewer counts", r);
            }
            reported = now_reported;
            edge.set_remote_counts(others);
        }
    });
}
