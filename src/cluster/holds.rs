//! The leases an origin holds, sans-IO: when each was last confirmed by the registry, when its
//! stream last had a publication here, and what the next upkeep round does with it.

use std::collections::HashMap;

use super::{LEASE_LINGER, LEASE_TTL};

/// What the upkeep does with one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Action {
    /// The stream is published here (or was lately): extend the lease.
    Refresh,
    /// Nothing published here for [`LEASE_LINGER`]: give it up.
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    /// When the registry last said the lease is ours (ms of the caller's clock); None: not yet.
    confirmed: Option<u64>,
    /// When the stream was last seen published here (or the lease was taken).
    live: u64,
}

/// The leases this origin holds, by stream.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    by_stream: HashMap<String, Hold>,
}

impl Holds {
    /// The registry confirmed the lease at `now` (claimed, refreshed or reclaimed).
    pub(crate) fn confirmed(&mut self, stream: &str, now: u64) {
        let h = self.by_stream.entry(stream.to_owned()).or_insert(Hold {
            confirmed: None,
            live: now,
        });
        h.confirmed = Some(now);
    }

    /// Every stream with a lease here.
    pub(crate) fn streams(&self) -> Vec<String> {
        self.by_stream.keys().cloned().collect()
    }

    /// The lease is lost or given up.
    pub(crate) fn forget(&mut self, stream: &str) {
        self.by_stream.remove(stream);
    }

    /// True while the last confirmation is younger than [`LEASE_TTL`]: past that, the lease
    /// may have lapsed and been taken by another origin, so this one no longer claims it.
    pub(crate) fn held(&self, stream: &str, now: u64) -> bool {
        self.by_stream
            .get(stream)
            .and_then(|h| h.confirmed)
            .is_some_and(|at| now.saturating_sub(at) < LEASE_TTL.as_millis() as u64)
    }

    /// The next upkeep round at `now`, given the streams published here: refresh the leases
    /// of those (a published stream without a lease here gets one, if free) and of the ones
    /// published within [`LEASE_LINGER`], release the rest.
    pub(crate) fn plan(&mut self, now: u64, live: &[String]) -> Vec<(String, Action)> {
        let linger = LEASE_LINGER.as_millis() as u64;
        for stream in live {
            // Not held until the registry says so.
            let h = self.by_stream.entry(stream.clone()).or_insert(Hold {
                confirmed: None,
                live: now,
            });
            h.live = now;
        }
        let mut out: Vec<(String, Action)> = self
            .by_stream
            .iter()
            .map(|(stream, h)| {
                let action = if now.saturating_sub(h.live) < linger {
                    Action::Refresh
                } else {
                    Action::Release
                };
                (stream.clone(), action)
            })
            .collect();
        out.sort();
        out
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_stream.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = LEASE_TTL.as_millis() as u64;
    const LINGER: u64 = LEASE_LINGER.as_millis() as u64;

    #[test]
    fn a_lease_counts_as_held_until_unconfirmed_for_its_ttl() {
        let mut h = Holds::default();
        assert!(!h.held("s", 0));
        h.confirmed("s", 1000);
        assert!(h.held("s", 1000 + TTL - 1));
        assert!(!h.held("s", 1000 + TTL));
        h.confirmed("s", 1000 + TTL);
        assert!(h.held("s", 1000 + TTL));
        h.forget("s");
        assert!(!h.held("s", 1000 + TTL));
    }

    #[test]
    fn a_published_stream_is_refreshed_and_an_idle_one_released_after_the_linger() {
        let mut h = Holds::default();
        h.confirmed("busy", 0);
        h.confirmed("quiet", 0);
        let live = ["busy".to_owned()];
        assert_eq!(
            h.plan(LINGER - 1, &live),
            vec![
                ("busy".into(), Action::Refresh),
                ("quiet".into(), Action::Refresh)
            ]
        );
        assert_eq!(
            h.plan(LINGER, &live),
            vec![
                ("busy".into(), Action::Refresh),
                ("quiet".into(), Action::Release)
            ]
        );
        // The busy stream goes quiet: it lingers from its last sighting, then goes.
        assert_eq!(
            h.plan(2 * LINGER - 1, &[])[0],
            ("busy".into(), Action::Refresh)
        );
        assert_eq!(h.plan(2 * LINGER, &[])[0], ("busy".into(), Action::Release));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn a_stream_published_without_a_lease_here_gets_one_asked_for() {
        let mut h = Holds::default();
        let plan = h.plan(50_000, &["new".to_owned()]);
        assert_eq!(plan, vec![("new".into(), Action::Refresh)]);
        assert!(
            !h.held("new", 50_000),
            "not held before the registry confirms it"
        );
        h.confirmed("new", 50_001);
        assert!(h.held("new", 50_001));
    }
}
