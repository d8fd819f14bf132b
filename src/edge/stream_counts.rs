//! Stream-wide viewer counts, the edge's side: every [`VIEWERS_EVERY`] an edge writes its viewers
//! of each stream it carries to the registry (`chorus:viewers:{stream}`) and learns the other
//! edges' counts of the same streams, which its `viewercount` events add to its own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Edge;
use serde_json::json;

use crate::cluster::{Cluster, MAX_COUNTED_STREAMS, VIEWERS_EVERY};
use crate::webhooks::Hooks;

impl Edge {
    /// This edge's viewers per stream (at most `max` streams).
    pub(crate) fn stream_counts(&self, max: usize) -> Vec<(String, u64)> {
        let Ok(m) = self.shared.viewers.lock() else {
            return Vec::new();
        };
        m.iter()
            .take(max)
            .map(|(s, &n)| (s.clone(), n as u64))
            .collect()
    }

    /// The stream's viewers at this edge and, with a shared registry, at the others.
    pub(crate) fn viewers_of(&self, stream: &str) -> usize {
        self.shared.viewers_of(stream)
    }

    /// The other edges' viewers per stream, as the registry said last.
    pub(crate) fn set_remote_counts(&self, others: HashMap<String, usize>) {
        if let Ok(mut m) = self.shared.remote.lock() {
            *m = others;
        }
    }
}

/// A stream's viewer count reaches webhooks at most this often per edge: a count that changes
/// every second (people come and go) is one event per stream per interval, with the latest
/// value; the first change after a quiet interval goes out within a second.
pub(crate) const VIEWER_HOOK_EVERY: Duration = Duration::from_secs(10);

/// Sends `viewers` `count` webhooks for `edge`'s streams whose count changed (a stream this
/// edge no longer carries counts 0), each stream at most every [`VIEWER_HOOK_EVERY`].
pub(crate) fn spawn_viewer_hooks(hooks: Hooks, edge: Arc<Edge>) {
    tokio::spawn(async move {
        // Per stream: the count last sent and when.
        let mut sent: HashMap<String, (u64, Instant)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let mut counts: HashMap<String, u64> = edge
                .stream_counts(MAX_COUNTED_STREAMS)
                .into_iter()
                .collect();
            for gone in sent.keys() {
                counts.entry(gone.clone()).or_insert(0);
            }
            for (stream, n) in counts {
                let due = match sent.get(&stream) {
                    Some(&(last, at)) => last != n && now - at >= VIEWER_HOOK_EVERY,
                    None => n > 0,
                };
                if due {
                    hooks.emit(
                        "viewers",
                        "count",
                        json!({"streamName": stream, "viewers": n}),
                    );
                    if n == 0 {
                        sent.remove(&stream);
                    } else {
                        sent.insert(stream, (n, now));
                    }
                }
            }
        }
    });
}

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

#[cfg(test)]
mod tests {
    use super::super::Shared;

    #[test]
    fn viewercount_adds_the_other_edges_while_this_one_has_viewers() {
        let s = Shared::default();
        s.remote.lock().unwrap().insert("st".into(), 3);
        assert_eq!(s.viewers_of("st"), 0, "nobody here to tell");
        s.count_viewers("st", 2);
        assert_eq!(s.viewers_of("st"), 5);
        s.count_viewers("st", -2);
        assert_eq!(s.viewers_of("st"), 0);
    }
}
