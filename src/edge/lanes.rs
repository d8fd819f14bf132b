//! The edge core's two output lanes: what is live, and a switch's replay.
//!
//! When a source enters a track, its pre-roll (up to 120 ms of the talk spurt's start) goes to
//! every viewer of the group at once: at 1000 viewers, some 6000 writes, 15 ms of one media
//! thread. In one queue every other track's live packet waited behind them. Here the replay has
//! a lane of its own that yields to the live one: the driver takes live outputs first and a
//! bounded share of the replay each round ([`Lanes::pop`]), reading the link in between.
//!
//! What a viewer hears keeps its order: once a group track has outputs in the replay lane,
//! everything after them on that track (its live packets, its silence, a `vad` that names it)
//! joins them there ([`Lanes::push_group`]), so no track goes back in time and a `vad` still
//! leaves before the packets it announces. A viewer that changes group leaves its old group's
//! waiting outputs behind ([`Lanes::forget`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;

use super::EdgeMetrics;
use crate::media::selection::GroupId;
use crate::rtc::peers::PeerId;

/// One group track of one stream on this thread: the unit whose order the lanes keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GroupTrack {
    /// The stream's number on this thread (groups are numbered per stream).
    pub stream: u32,
    pub group: GroupId,
    pub track: u8,
}

/// Replayed outputs taken per round at least, whatever the live lane had.
pub(crate) const REPLAY_BURST: usize = 128;

/// Outputs the replay lane holds at most: past it a new replay is dropped (counted), while what
/// must follow a replay already waiting still joins it. About 8 switches' worth at 1000 viewers.
pub(crate) const MAX_REPLAY: usize = 65_536;

/// What the lanes hold: an output that may be one viewer's.
pub(crate) trait Queued {
    /// The viewer it is for, if it is one viewer's.
    fn viewer(&self) -> Option<PeerId>;
}

/// The live lane and the replay lane, of the core's outputs (`O`).
#[derive(Debug)]
pub(crate) struct Lanes<O> {
    live: VecDeque<O>,
    replay: VecDeque<(GroupTrack, O)>,
    /// Outputs of each group track waiting in `replay` (no entry: none).
    waiting: HashMap<GroupTrack, u32>,
    /// Replayed outputs dropped because the replay lane was full.
    pub dropped: u64,
}

impl<O> Default for Lanes<O> {
    fn default() -> Self {
        Lanes {
            live: VecDeque::new(),
            replay: VecDeque::new(),
            waiting: HashMap::new(),
            dropped: 0,
        }
    }
}

impl<O: Queued> Lanes<O> {
    /// Queues an output that keeps no group track's order (a main-track write, a link request,
    /// an event that names no track): the live lane.
    pub(crate) fn push_back(&mut self, o: O) {
        self.live.push_back(o);
    }

    /// Queues an output on group track `gt`: a replay (`replay`) and whatever follows one still
    /// waiting go to the replay lane, the rest to the live lane. Returns false if a replay was
    /// dropped because the lane is full.
    pub(crate) fn push_group(&mut self, gt: GroupTrack, replay: bool, o: O) -> bool {
        let behind = self.waiting.get(&gt).is_some_and(|&n| n > 0);
        if !replay && !behind {
            self.live.push_back(o);
            return true;
        }
        if replay && !behind && self.replay.len() >= MAX_REPLAY {
            self.dropped += 1;
            return false;
        }
        *self.waiting.entry(gt).or_default() += 1;
        self.replay.push_back((gt, o));
        true
    }

    /// The next output: the live lane's, else the replay lane's while `budget` lasts. Each live
    /// output adds one to the budget, so the replay moves at least as fast as the live lane.
    pub(crate) fn pop(&mut self, budget: &mut usize) -> Option<O> {
        if let Some(o) = self.live.pop_front() {
            *budget = budget.saturating_add(1);
            return Some(o);
        }
        if *budget == 0 {
            return None;
        }
        let (gt, o) = self.replay.pop_front()?;
        *budget -= 1;
        self.release(gt);
        Some(o)
    }

    /// The output `k` places ahead, in the order [`pop`](Self::pop) gives them with budget.
    pub(crate) fn get(&self, k: usize) -> Option<&O> {
        match self.live.get(k) {
            Some(o) => Some(o),
            None => self.replay.get(k - self.live.len()).map(|(_, o)| o),
        }
    }

    /// Moves the count of dropped replays to the edge's metrics
    /// ([`EdgeMetrics::dropped_replay_full`]).
    pub(crate) fn count_dropped(&mut self, m: &EdgeMetrics) {
        if self.dropped > 0 {
            let n = std::mem::take(&mut self.dropped);
            m.dropped_replay_full.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Whether replayed outputs are waiting (the driver then comes back without sleeping).
    pub(crate) fn replay_waiting(&self) -> bool {
        !self.replay.is_empty()
    }

    /// Drops viewer `id`'s outputs waiting in the replay lane for its old group `group` of
    /// stream `stream` (it moved to another group, or left).
    pub(crate) fn forget(&mut self, stream: u32, group: GroupId, id: PeerId) {
        if self.replay.is_empty() {
            return;
        }
        let waiting = &mut self.waiting;
        self.replay.retain(|(gt, o)| {
            let mine = gt.stream == stream && gt.group == group && o.viewer() == Some(id);
            if mine {
                Self::release_in(waiting, *gt);
            }
            !mine
        });
    }

    fn release(&mut self, gt: GroupTrack) {
        Self::release_in(&mut self.waiting, gt);
    }

    fn release_in(waiting: &mut HashMap<GroupTrack, u32>, gt: GroupTrack) {
        if let Some(n) = waiting.get_mut(&gt) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&gt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write: (viewer, track, seq).
    #[derive(Debug, PartialEq)]
    struct W(u64, u8, u16);

    impl Queued for W {
        fn viewer(&self) -> Option<PeerId> {
            Some(PeerId(self.0))
        }
    }

    fn gt(group: u32, track: u8) -> GroupTrack {
        GroupTrack {
            stream: 0,
            group: GroupId(group),
            track,
        }
    }

    fn write(viewer: u64, track: u8, seq: u16) -> W {
        W(viewer, track, seq)
    }

    fn seq_of(o: &W) -> (u64, u8, u16) {
        (o.0, o.1, o.2)
    }

    fn all(l: &mut Lanes<W>) -> Vec<(u64, u8, u16)> {
        let mut budget = usize::MAX / 2;
        std::iter::from_fn(|| l.pop(&mut budget))
            .map(|o| seq_of(&o))
            .collect()
    }

    #[test]
    fn live_outputs_pass_a_replay_and_the_replayed_track_keeps_its_order() {
        let mut l = Lanes::default();
        for seq in 0..3 {
            assert!(l.push_group(gt(0, 0), true, write(1, 0, seq)));
        }
        // The replayed track's next packet waits behind its replay; another track's does not.
        l.push_group(gt(0, 0), false, write(1, 0, 3));
        l.push_group(gt(0, 1), false, write(1, 1, 50));
        assert_eq!(l.get(0).map(seq_of), Some((1, 1, 50)));
        assert_eq!(l.get(1).map(seq_of), Some((1, 0, 0)));
        assert_eq!(
            all(&mut l),
            [(1, 1, 50), (1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3)]
        );
        // Drained: the track is live again.
        l.push_group(gt(0, 0), false, write(1, 0, 4));
        assert!(!l.replay_waiting());
    }

    #[test]
    fn the_replay_moves_by_budget_and_at_least_as_fast_as_the_live_lane() {
        let mut l = Lanes::default();
        for seq in 0..10 {
            l.push_group(gt(0, 0), true, write(1, 0, seq));
        }
        let mut budget = 3;
        let took: Vec<_> = std::iter::from_fn(|| l.pop(&mut budget)).collect();
        assert_eq!(took.len(), 3, "the budget bounds a round");
        assert!(l.replay_waiting());
        // Two live outputs buy two more replayed ones.
        l.push_back(write(2, 1, 0));
        l.push_back(write(2, 1, 1));
        let mut budget = 0;
        let took: Vec<_> = std::iter::from_fn(|| l.pop(&mut budget))
            .map(|o| seq_of(&o))
            .collect();
        assert_eq!(took, [(2, 1, 0), (2, 1, 1), (1, 0, 3), (1, 0, 4)]);
    }

    #[test]
    fn a_full_replay_lane_drops_new_replays_but_not_what_follows_a_waiting_one() {
        let mut l = Lanes::default();
        for i in 0..MAX_REPLAY {
            assert!(l.push_group(gt(1, 0), true, write(1, 0, i as u16)));
        }
        assert!(!l.push_group(gt(2, 0), true, write(2, 0, 0)));
        assert_eq!(l.dropped, 1);
        // The waiting track's live packet still joins its replay, in order.
        assert!(l.push_group(gt(1, 0), false, write(1, 0, 9)));
        let out = all(&mut l);
        assert_eq!(out.len(), MAX_REPLAY + 1);
        assert_eq!(out.last(), Some(&(1, 0, 9)));
    }

    #[test]
    fn a_viewer_that_moves_leaves_its_old_groups_waiting_outputs() {
        let mut l = Lanes::default();
        for v in [1, 2] {
            l.push_group(gt(0, 0), true, write(v, 0, 0));
            l.push_group(gt(0, 0), true, write(v, 0, 1));
        }
        l.forget(0, GroupId(0), PeerId(1));
        // Another stream's group 0 is another group.
        l.forget(1, GroupId(0), PeerId(2));
        assert_eq!(all(&mut l), [(2, 0, 0), (2, 0, 1)]);
        // Nothing waits any more: the group track is live.
        l.push_group(gt(0, 0), false, write(2, 0, 2));
        assert!(!l.replay_waiting());
    }
}
