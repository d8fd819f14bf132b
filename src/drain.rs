//! Draining (SIGTERM on `chorus origin` and `chorus edge`): the node's record says `draining`
//! at once, so directors send it nothing new; every signalling session is told to move
//! (`migrate`); an origin gives its stream leases up, so a publisher that moves lands on a
//! serving origin and the edges follow it there. The process then waits until its viewers and
//! publications are gone, or a bound passes, and exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::http::App;

/// How long a draining node waits for its viewers and publishers to move by default
/// (`--drain-timeout`): the SDK reconnects within a few seconds of `migrate`; past this the
/// rest (WHEP viewers, which cannot be told) are cut off.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a draining node counts what is left: well below a second, so a node whose last
/// viewer left exits promptly.
pub(crate) const DRAIN_CHECK: Duration = Duration::from_millis(200);

/// What a drain ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Viewers and publications still here when it ended (0: all moved).
    pub remaining: u64,
    /// How long it took.
    pub took: Duration,
}

/// Drains a running node (see the module's doc).
pub struct Drainer {
    pub(crate) app: Arc<App>,
}

impl Drainer {
    /// Viewers (edge) and live publications (origin) here now.
    fn remaining(&self) -> u64 {
        let viewers = self.app.edge.as_ref().map_or(0, |e| e.load(0).0);
        let publications = self.app.origin.as_ref().map_or(0, |o| o.gauges().1 as u64);
        viewers + publications
    }

    /// Marks the node draining, tells every session to move, and waits until nothing is left
    /// or `bound` passes.
    pub async fn drain(&self, bound: Duration) -> Drained {
        let started = Instant::now();
        let cluster = &self.app.cluster;
        cluster.start_draining();
        self.app.drain.send_replace(true);
        info!(
            node = cluster.id.as_str(),
            remaining = self.remaining(),
            bound_s = bound.as_secs(),
            "draining: directors send nothing new here, sessions are told to move"
        );
        if self.app.origin.is_some() {
            let released = cluster.release_all().await;
            info!(
                released,
                "draining: stream leases given up, so moved publishers land on a serving origin"
            );
        }
        let deadline = started + bound;
        let mut remaining = self.remaining();
        while remaining > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_CHECK).await;
            remaining = self.remaining();
        }
        let took = started.elapsed();
        if remaining == 0 {
            info!(ms = took.as_millis() as u64, "drained: everyone moved");
        } else {
            warn!(
                remaining,
                ms = took.as_millis() as u64,
                "drain bound reached: the rest are cut off"
            );
        }
        Drained { remaining, took }
    }
}
