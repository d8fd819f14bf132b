//! The edge's side of stream-wide viewer counts (`crate::cluster::viewer_counts`): its own
//! per-stream counts to report, and the other edges' counts its `viewercount` adds.

use std::collections::HashMap;

use super::Edge;

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

    /// The other edges' viewers per stream, as the registry said last.
    pub(crate) fn set_remote_counts(&self, others: HashMap<String, usize>) {
        if let Ok(mut m) = self.shared.remote.lock() {
            *m = others;
        }
    }
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
