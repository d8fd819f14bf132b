//! Which edge a viewer goes to, sans-IO: serving edges below capacity, the requested region
//! first, an edge already carrying the stream while it is below [`CARRY_PREFERENCE_PCT`] of its
//! capacity, else the least loaded. Loads include the viewers this director sent out in the
//! last [`ASSIGNMENT_MEMORY_MS`] ([`Assignments`]), so a burst of subscribes between two
//! heartbeats does not pile onto the edge that looked emptiest (Jicofo's trick).

use std::collections::VecDeque;

/// An edge carrying the stream keeps getting its viewers below this share of its capacity:
/// one stream's viewers stay together (one origin subscription, one packet core) while the
/// edge has room left for the bursts its heartbeat has not reported yet.
pub(crate) const CARRY_PREFERENCE_PCT: u64 = 80;

/// How long this director counts a viewer it sent to an edge on top of the edge's reported
/// load: longer than two heartbeats (the viewer connects, then the edge reports it), so a
/// burst is counted until the edge's own figure includes it. Until then it may count twice,
/// which errs towards spreading.
pub(crate) const ASSIGNMENT_MEMORY_MS: u64 = 5_000;

/// Most assignments remembered: a flood of subscribes beyond it forgets the oldest early
/// (placement then leans on the edges' reports alone), memory stays bounded.
pub(crate) const MAX_ASSIGNMENTS: usize = 100_000;

/// One edge as placement sees it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<'a> {
    pub id: &'a str,
    pub region: Option<&'a str>,
    pub capacity: u32,
    /// Reported viewers plus this director's recent assignments.
    pub load: u64,
    /// It has viewers of the stream (reported, or sent there lately).
    pub carries: bool,
    pub serving: bool,
}

impl Candidate<'_> {
    fn has_room(&self) -> bool {
        self.load < u64::from(self.capacity)
    }

    fn below_carry_share(&self) -> bool {
        self.load * 100 < u64::from(self.capacity) * CARRY_PREFERENCE_PCT
    }

    /// Load as a share of capacity (parts per million), then the load itself, then the id:
    /// a total order, so the choice is the same at every director.
    fn rank(&self) -> (u64, u64, &str) {
        let cap = u64::from(self.capacity.max(1));
        (
            self.load.saturating_mul(1_000_000) / cap,
            self.load,
            self.id,
        )
    }
}

/// Why no edge was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlacementError {
    #[error(
        "no edge is registered in the cluster to serve viewers (start chorus edge --redis ...)"
    )]
    NoEdges,
    #[error("every serving edge is full ({edges} edges at capacity): try again later")]
    AllFull { edges: usize },
    #[error("no edge is serving: every registered edge is draining")]
    AllDraining,
}

/// The index of the edge for a viewer, among `edges`, wanting `region` if given.
pub(crate) fn choose(
    edges: &[Candidate<'_>],
    region: Option<&str>,
) -> Result<usize, PlacementError> {
    if edges.is_empty() {
        return Err(PlacementError::NoEdges);
    }
    let serving: Vec<usize> = (0..edges.len()).filter(|&i| edges[i].serving).collect();
    if serving.is_empty() {
        return Err(PlacementError::AllDraining);
    }
    let open: Vec<usize> = serving
        .iter()
        .copied()
        .filter(|&i| edges[i].has_room())
        .collect();
    if open.is_empty() {
        return Err(PlacementError::AllFull {
            edges: serving.len(),
        });
    }
    let in_region: Vec<usize> = match region {
        Some(r) => open
            .iter()
            .copied()
            .filter(|&i| edges[i].region == Some(r))
            .collect(),
        None => Vec::new(),
    };
    let pool = if in_region.is_empty() {
        open
    } else {
        in_region
    };
    let least = |it: &mut dyn Iterator<Item = usize>| {
        it.min_by(|&a, &b| edges[a].rank().cmp(&edges[b].rank()))
    };
    let carrying = least(
        &mut pool
            .iter()
            .copied()
            .filter(|&i| edges[i].carries && edges[i].below_carry_share()),
    );
    Ok(carrying
        .or_else(|| least(&mut pool.iter().copied()))
        .expect("the pool is not empty"))
}

/// The viewers this director sent to edges lately: (when, edge, stream), oldest first.
#[derive(Debug, Default)]
pub(crate) struct Assignments {
    recent: VecDeque<(u64, String, String)>,
}

impl Assignments {
    fn expire(&mut self, now: u64) {
        while self
            .recent
            .front()
            .is_some_and(|(at, _, _)| now.saturating_sub(*at) >= ASSIGNMENT_MEMORY_MS)
        {
            self.recent.pop_front();
        }
    }

    /// A viewer of `stream` was sent to `edge` at `now`.
    pub(crate) fn assigned(&mut self, edge: &str, stream: &str, now: u64) {
        self.expire(now);
        if self.recent.len() >= MAX_ASSIGNMENTS {
            self.recent.pop_front();
        }
        self.recent
            .push_back((now, edge.to_owned(), stream.to_owned()));
    }

    /// Viewers sent to `edge` in the last [`ASSIGNMENT_MEMORY_MS`].
    pub(crate) fn pending(&mut self, edge: &str, now: u64) -> u64 {
        self.expire(now);
        self.recent.iter().filter(|(_, e, _)| e == edge).count() as u64
    }

    /// True if a viewer of `stream` was sent to `edge` lately.
    pub(crate) fn carries(&mut self, edge: &str, stream: &str, now: u64) -> bool {
        self.expire(now);
        self.recent.iter().any(|(_, e, s)| e == edge && s == stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, capacity: u32, load: u64) -> Candidate<'_> {
        Candidate {
            id,
            region: None,
            capacity,
            load,
            carries: false,
            serving: true,
        }
    }

    #[test]
    fn the_least_loaded_share_wins_and_full_or_draining_edges_are_skipped() {
        let mut e = vec![edge("a", 10, 5), edge("b", 100, 20), edge("c", 10, 10)];
        assert_eq!(choose(&e, None), Ok(1)); // 20 % beats 50 %; c is full
        e[1].serving = false;
        assert_eq!(choose(&e, None), Ok(0));
        e[0].load = 10;
        assert_eq!(choose(&e, None), Err(PlacementError::AllFull { edges: 2 }));
        e[0].serving = false;
        e[2].serving = false;
        assert_eq!(choose(&e, None), Err(PlacementError::AllDraining));
        assert_eq!(choose(&[], None), Err(PlacementError::NoEdges));
    }

    #[test]
    fn ties_go_to_the_smaller_id_at_every_director() {
        let e = vec![edge("b", 3, 0), edge("a", 3, 0)];
        assert_eq!(choose(&e, None), Ok(1));
    }

    #[test]
    fn the_requested_region_comes_first_while_it_has_room() {
        let mut e = vec![edge("a", 10, 0), edge("b", 10, 8)];
        e[1].region = Some("eu");
        assert_eq!(choose(&e, Some("eu")), Ok(1));
        assert_eq!(choose(&e, Some("us")), Ok(0), "no edge there: any region");
        assert_eq!(choose(&e, None), Ok(0));
        e[1].load = 10;
        assert_eq!(
            choose(&e, Some("eu")),
            Ok(0),
            "its region is full: elsewhere"
        );
    }

    #[test]
    fn an_edge_carrying_the_stream_is_preferred_below_eighty_percent() {
        let mut e = vec![edge("a", 10, 0), edge("b", 10, 7)];
        e[1].carries = true;
        assert_eq!(choose(&e, None), Ok(1), "70 %: kept together");
        e[1].load = 8;
        assert_eq!(choose(&e, None), Ok(0), "80 %: the least loaded again");
    }

    #[test]
    fn a_burst_is_spread_by_counting_recent_assignments() {
        let mut a = Assignments::default();
        let mut split = [0u32; 2];
        for i in 0..7u64 {
            let ids = ["e1", "e2"];
            let e: Vec<Candidate<'_>> = ids
                .iter()
                .map(|id| Candidate {
                    id,
                    region: None,
                    capacity: 3,
                    load: a.pending(id, i),
                    carries: false,
                    serving: true,
                })
                .collect();
            match choose(&e, None) {
                Ok(k) => {
                    split[k] += 1;
                    a.assigned(ids[k], "s", i);
                }
                Err(err) => {
                    assert_eq!(i, 6, "only the seventh is refused");
                    assert_eq!(err, PlacementError::AllFull { edges: 2 });
                }
            }
        }
        assert_eq!(split, [3, 3]);
        assert!(a.carries("e2", "s", 5) && !a.carries("e2", "t", 5));
        // Forgotten after the memory: the edges' own reports take over.
        assert_eq!(a.pending("e1", 6 + ASSIGNMENT_MEMORY_MS), 0);
    }
}
