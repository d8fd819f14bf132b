//! Which source plays in which multiplexed track, for every distinct viewer group.
//!
//! Viewers asking for the same (N tracks, pinned source, excluded sources) share one group and
//! one slot assignment. The rules, per group:
//! - a source that keeps talking keeps its slot: nothing is reshuffled by rank;
//! - a new talker takes a free slot at once (on its onset packet, not at the next tick);
//! - a slot is taken from a source only when it has fallen silent (after its hangover), or when a
//!   talker needs it and the holder is in hangover, or is clearly less active and has held the
//!   slot for a while;
//! - a slot nobody talks in is left empty rather than filled with the least quiet noise;
//! - the pinned source (it plays in the main track) and excluded sources never get a slot.

use std::collections::HashMap;

use smallvec::SmallVec;

use super::activity::Voice;
use super::SourceIdx;

/// Names a group of viewers that share one selection; reused after the group is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// The selection-relevant part of a viewer's request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    tracks: u8,
    pinned: Option<SourceIdx>,
    /// Sorted, deduplicated.
    excluded: SmallVec<[SourceIdx; 4]>,
    /// Tracks a viewer projected a chosen source into (`project`), sorted by track.
    fixed: SmallVec<[(u8, SourceIdx); 2]>,
}

impl GroupKey {
    /// The key of viewers asking for `tracks` tracks, with this pinned source and these excluded.
    pub fn new(
        tracks: u8,
        pinned: Option<SourceIdx>,
        excluded: impl IntoIterator<Item = SourceIdx>,
    ) -> Self {
        let mut excluded: SmallVec<[SourceIdx; 4]> = excluded.into_iter().collect();
        excluded.sort_unstable();
        excluded.dedup();
        GroupKey {
            tracks,
            pinned,
            excluded,
            fixed: SmallVec::new(),
        }
    }

    /// The same key with these tracks fixed to these sources (a later entry for the same track
    /// wins; a source fixed twice keeps its last track). Tracks out of range are ignored.
    pub(crate) fn with_fixed(mut self, fixed: impl IntoIterator<Item = (u8, SourceIdx)>) -> Self {
        for (t, s) in fixed {
            if t >= self.tracks {
                continue;
            }
            self.fixed.retain(|(ft, fs)| *ft != t && *fs != s);
            self.fixed.push((t, s));
        }
        self.fixed.sort_unstable();
        self
    }
    pub(crate) fn fixed(&self) -> &[(u8, SourceIdx)] {
        &self.fixed
    }
    fn fixed_source(&self, track: u8) -> Option<SourceIdx> {
        self.fixed
            .iter()
            .find(|(t, _)| *t == track)
            .map(|(_, s)| *s)
    }
    /// How many voice-activated tracks the group has.
    pub fn tracks(&self) -> u8 {
        self.tracks
    }
    pub(crate) fn pinned(&self) -> Option<SourceIdx> {
        self.pinned
    }
    /// The sources that never get a slot, sorted.
    pub fn excluded(&self) -> &[SourceIdx] {
        &self.excluded
    }
    /// May this source play in one of the group's voice-activated tracks? A projected source
    /// plays only in its fixed track.
    pub fn admits(&self, s: SourceIdx) -> bool {
        self.pinned != Some(s)
            && self.excluded.binary_search(&s).is_err()
            && !self.fixed.iter().any(|(_, f)| *f == s)
    }
}

/// A source's standing at the time of a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    /// Talking, in hangover or silent.
    pub voice: Voice,
    /// The activity score it is ranked by (1.0 = just at the voiced threshold).
    pub score: f32,
    /// Published right now (a projected track shows its source whenever it is live).
    pub live: bool,
}

impl Standing {
    /// Not published.
    pub(crate) const GONE: Standing = Standing {
        voice: Voice::Silent,
        score: 0.0,
        live: false,
    };
    /// Published, not talking.
    pub(crate) const QUIET: Standing = Standing {
        voice: Voice::Silent,
        score: 0.0,
        live: true,
    };
}

/// How sources are switched into and out of slots.
#[derive(Debug, Clone)]
pub struct SelectionConfig {
    /// A talker may take a talking holder's slot only with a score this much higher
    /// (score 1.0 = just at the voiced threshold).
    pub preempt_margin: f32,
    /// ...and only once the holder has held it this long.
    pub min_hold_us: u64,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        SelectionConfig {
            preempt_margin: 1.0,
            min_hold_us: 1_000_000,
        }
    }
}

/// A change of the source in one track of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackChange {
    /// The group.
    pub group: GroupId,
    /// The track's index in the group.
    pub track: u8,
    /// The source now in the track; None = it is empty.
    pub source: Option<SourceIdx>,
    /// When, in packet time (µs).
    pub at_us: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    source: Option<SourceIdx>,
    since_us: u64,
}

#[derive(Debug)]
struct Group {
    key: GroupKey,
    refs: u32,
    slots: SmallVec<[Slot; 4]>,
}

#[derive(Debug, Clone, Copy)]
struct Ranked {
    source: SourceIdx,
    standing: Standing,
}

/// Every group of one stream and which source holds each of its slots (see the module doc).
#[derive(Debug, Default)]
pub struct Selector {
    cfg: SelectionConfig,
    groups: Vec<Option<Group>>,
    by_key: HashMap<GroupKey, GroupId>,
    free_ids: Vec<u32>,
    /// For each source, the (group, track) slots it holds: the forwarding fan-out list.
    placements: Vec<SmallVec<[(GroupId, u8); 4]>>,
    ranking: Vec<Ranked>,
    events: Vec<TrackChange>,
}

impl Selector {
    pub(crate) fn new(cfg: SelectionConfig) -> Self {
        Selector {
            cfg,
            ..Default::default()
        }
    }

    /// Adds a viewer to the group of `key`, creating it (with empty tracks) if needed.
    pub fn join(&mut self, key: GroupKey) -> GroupId {
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(g) = self.groups[id.0 as usize].as_mut() {
                g.refs += 1;
            }
            return id;
        }
        let slots = (0..key.tracks)
            .map(|_| Slot {
                source: None,
                since_us: 0,
            })
            .collect();
        let group = Group {
            key: key.clone(),
            refs: 1,
            slots,
        };
        let id = match self.free_ids.pop() {
            Some(i) => {
                self.groups[i as usize] = Some(group);
                GroupId(i)
            }
            None => {
                self.groups.push(Some(group));
                GroupId(self.groups.len() as u32 - 1)
            }
        };
        self.by_key.insert(key, id);
        id
    }

    /// Removes one viewer from a group; returns true when the group is gone with it.
    pub(crate) fn leave(&mut self, id: GroupId) -> bool {
        let Some(g) = self.groups.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return false;
        };
        g.refs -= 1;
        if g.refs > 0 {
            return false;
        }
        let g = self.groups[id.0 as usize].take().expect("checked above");
        for s in g.slots.iter().filter_map(|s| s.source) {
            if let Some(p) = self.placements.get_mut(s.0 as usize) {
                p.retain(|(gid, _)| *gid != id);
            }
        }
        self.by_key.remove(&g.key);
        self.free_ids.push(id.0);
        true
    }

    /// How many viewers share this group.
    pub(crate) fn refs(&self, id: GroupId) -> u32 {
        self.group(id).map_or(0, |g| g.refs)
    }

    /// Starts a just-created group from another's assignment (a viewer moving groups keeps
    /// hearing who it heard): each voice-activated track takes `tracks[t]` if it is admitted,
    /// audible per `standing`, and not placed yet. No events: nothing changed for the viewer.
    pub(crate) fn seed(
        &mut self,
        id: GroupId,
        now_us: u64,
        tracks: &[Option<SourceIdx>],
        standing: impl Fn(SourceIdx) -> Standing,
    ) {
        let Some(g) = self.groups.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        for (t, s) in tracks.iter().enumerate().take(g.slots.len()) {
            let Some(s) = *s else { continue };
            let free = g.slots[t].source.is_none() && g.key.fixed_source(t as u8).is_none();
            let taken = g.slots.iter().any(|x| x.source == Some(s));
            if !free || taken || !g.key.admits(s) || standing(s).voice == Voice::Silent {
                continue;
            }
            g.slots[t] = Slot {
                source: Some(s),
                since_us: now_us,
            };
            let idx = s.0 as usize;
            if self.placements.len() <= idx {
                self.placements.resize_with(idx + 1, SmallVec::new);
            }
            self.placements[idx].push((id, t as u8));
        }
    }

    /// The key a group was made for, while the group exists.
    pub fn group_key(&self, id: GroupId) -> Option<&GroupKey> {
        self.group(id).map(|g| &g.key)
    }

    /// The source in each track of a group.
    pub fn tracks(&self, id: GroupId) -> impl Iterator<Item = Option<SourceIdx>> + '_ {
        self.group(id)
            .into_iter()
            .flat_map(|g| g.slots.iter().map(|s| s.source))
    }

    /// Where a source's packets go.
    pub fn placements(&self, s: SourceIdx) -> &[(GroupId, u8)] {
        self.placements
            .get(s.0 as usize)
            .map_or(&[], |p| p.as_slice())
    }

    /// Changes since the last call, in the order they happened.
    pub(crate) fn events(&mut self) -> &mut Vec<TrackChange> {
        &mut self.events
    }

    /// A source started talking: give it a free slot in every group that admits it, now.
    /// Slots held by sources in hangover count as free for this.
    pub(crate) fn on_onset(
        &mut self,
        now_us: u64,
        s: SourceIdx,
        standing: impl Fn(SourceIdx) -> Standing,
    ) {
        let me = Ranked {
            source: s,
            standing: standing(s),
        };
        for gi in 0..self.groups.len() {
            self.place(now_us, gi, me, &standing, false);
        }
    }

    /// A source left the stream: its tracks empty at once.
    pub(crate) fn remove_source(&mut self, now_us: u64, s: SourceIdx) {
        let Some(places) = self.placements.get_mut(s.0 as usize) else {
            return;
        };
        for (gid, track) in std::mem::take(places) {
            if let Some(g) = self.groups[gid.0 as usize].as_mut() {
                g.slots[track as usize] = Slot {
                    source: None,
                    since_us: now_us,
                };
                self.events.push(TrackChange {
                    group: gid,
                    track,
                    source: None,
                    at_us: now_us,
                });
            }
        }
    }

    /// The ranking of the last tick, best first: the talking sources and their standing then
    /// (read-only, for `chorus replay --explain`).
    pub fn ranking(&self) -> impl Iterator<Item = (SourceIdx, Standing)> + '_ {
        self.ranking.iter().map(|r| (r.source, r.standing))
    }

    /// One ranking for the whole stream, then every group's slots follow it.
    /// `sources` yields every live source with its standing.
    pub fn tick(
        &mut self,
        now_us: u64,
        sources: impl Iterator<Item = (SourceIdx, Standing)>,
        standing: impl Fn(SourceIdx) -> Standing,
    ) {
        self.ranking.clear();
        self.ranking.extend(
            sources
                .filter(|(_, st)| st.voice == Voice::Talking)
                .map(|(source, standing)| Ranked { source, standing }),
        );
        self.ranking.sort_unstable_by(|a, b| {
            b.standing
                .score
                .total_cmp(&a.standing.score)
                .then(a.source.cmp(&b.source))
        });
        for gi in 0..self.groups.len() {
            self.release_silent(now_us, gi, &standing);
            self.fill_fixed(now_us, gi, &standing);
            for ri in 0..self.ranking.len() {
                let r = self.ranking[ri];
                if !self.place(now_us, gi, r, &standing, true) {
                    break;
                }
            }
        }
    }

    fn release_silent(
        &mut self,
        now_us: u64,
        gi: usize,
        standing: &impl Fn(SourceIdx) -> Standing,
    ) {
        let Some(g) = self.groups[gi].as_mut() else {
            return;
        };
        for (t, slot) in g.slots.iter_mut().enumerate() {
            let Some(s) = slot.source else { continue };
            let st = standing(s);
            let fixed = g.key.fixed_source(t as u8).is_some();
            if (!fixed && st.voice == Voice::Silent) || (fixed && !st.live) {
                *slot = Slot {
                    source: None,
                    since_us: now_us,
                };
                unplace(&mut self.placements, s, GroupId(gi as u32), t as u8);
                self.events.push(TrackChange {
                    group: GroupId(gi as u32),
                    track: t as u8,
                    source: None,
                    at_us: now_us,
                });
            }
        }
    }

    /// Projected tracks show their source whenever it is live.
    fn fill_fixed(&mut self, now_us: u64, gi: usize, standing: &impl Fn(SourceIdx) -> Standing) {
        let Some(g) = self.groups[gi].as_mut() else {
            return;
        };
        let gid = GroupId(gi as u32);
        for &(t, s) in g.key.fixed.iter() {
            let slot = &mut g.slots[t as usize];
            if slot.source.is_none() && standing(s).live {
                *slot = Slot {
                    source: Some(s),
                    since_us: now_us,
                };
                let idx = s.0 as usize;
                if self.placements.len() <= idx {
                    self.placements.resize_with(idx + 1, SmallVec::new);
                }
                self.placements[idx].push((gid, t));
                self.events.push(TrackChange {
                    group: gid,
                    track: t,
                    source: Some(s),
                    at_us: now_us,
                });
            }
        }
    }

    /// Tries to give `cand` a slot in group `gi`. Returns false when the group has no slot a
    /// weaker candidate could get either (so a ranked pass can stop early).
    fn place(
        &mut self,
        now_us: u64,
        gi: usize,
        cand: Ranked,
        standing: &impl Fn(SourceIdx) -> Standing,
        allow_preempt_talker: bool,
    ) -> bool {
        let Some(g) = self.groups[gi].as_mut() else {
            return false;
        };
        if !g.key.admits(cand.source) || g.slots.iter().any(|s| s.source == Some(cand.source)) {
            return true;
        }
        let gid = GroupId(gi as u32);
        // Free slot first; else the weakest holder, if it may be displaced.
        let key = &g.key;
        let free = (0..g.slots.len())
            .find(|&t| g.slots[t].source.is_none() && key.fixed_source(t as u8).is_none());
        let target = match free {
            Some(t) => Some(t),
            None => {
                let Some((t, holder)) = g
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(t, _)| key.fixed_source(*t as u8).is_none())
                    .filter_map(|(t, s)| s.source.map(|h| (t, standing(h))))
                    .min_by(|(_, a), (_, b)| {
                        a.voice.cmp(&b.voice).then(a.score.total_cmp(&b.score))
                    })
                else {
                    // Every track is projected: none follows voice activity.
                    return false;
                };
                let displaceable = holder.voice != Voice::Talking
                    || (allow_preempt_talker
                        && cand.standing.score >= holder.score + self.cfg.preempt_margin
                        && now_us.saturating_sub(g.slots[t].since_us) >= self.cfg.min_hold_us);
                displaceable.then_some(t)
            }
        };
        let Some(t) = target else {
            return false;
        };
        if let Some(old) = g.slots[t].source {
            unplace(&mut self.placements, old, gid, t as u8);
        }
        g.slots[t] = Slot {
            source: Some(cand.source),
            since_us: now_us,
        };
        let idx = cand.source.0 as usize;
        if self.placements.len() <= idx {
            self.placements.resize_with(idx + 1, SmallVec::new);
        }
        self.placements[idx].push((gid, t as u8));
        self.events.push(TrackChange {
            group: gid,
            track: t as u8,
            source: Some(cand.source),
            at_us: now_us,
        });
        true
    }

    fn group(&self, id: GroupId) -> Option<&Group> {
        self.groups.get(id.0 as usize).and_then(Option::as_ref)
    }
}

fn unplace(placements: &mut [SmallVec<[(GroupId, u8); 4]>], s: SourceIdx, gid: GroupId, track: u8) {
    if let Some(p) = placements.get_mut(s.0 as usize) {
        p.retain(|e| *e != (gid, track));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A scripted world: each source's standing is set by the test.
    struct World {
        st: RefCell<Vec<Standing>>,
    }

    impl World {
        fn new(n: usize) -> Self {
            World {
                st: RefCell::new(vec![Standing::GONE; n]),
            }
        }
        fn set(&self, s: u32, voice: Voice, score: f32) {
            self.st.borrow_mut()[s as usize] = Standing {
                voice,
                score,
                live: true,
            };
        }
        fn get(&self, s: SourceIdx) -> Standing {
            self.st.borrow()[s.0 as usize]
        }
        fn tick(&self, sel: &mut Selector, now: u64) {
            let all: Vec<_> = (0..self.st.borrow().len() as u32)
                .map(|i| (SourceIdx(i), self.get(SourceIdx(i))))
                .collect();
            sel.tick(now, all.into_iter(), |s| self.get(s));
        }
    }

    fn tracks(sel: &Selector, g: GroupId) -> Vec<Option<u32>> {
        sel.tracks(g).map(|s| s.map(|s| s.0)).collect()
    }

    #[test]
    fn talkers_keep_slots_and_new_talker_takes_free_slot_at_once() {
        let w = World::new(5);
        let mut sel = Selector::new(SelectionConfig::default());
        let g = sel.join(GroupKey::new(2, None, []));
        w.set(1, Voice::Talking, 2.0);
        sel.on_onset(0, SourceIdx(1), |s| w.get(s));
        assert_eq!(tracks(&sel, g), vec![Some(1), None]);
        // A louder talker does not reshuffle: it takes the other, free slot.
        w.set(2, Voice::Talking, 3.5);
        sel.on_onset(10, SourceIdx(2), |s| w.get(s));
        w.tick(&mut sel, 20);
        assert_eq!(tracks(&sel, g), vec![Some(1), Some(2)]);
        // A third talker cannot take a talking holder's slot before min_hold.
        w.set(3, Voice::Talking, 3.9);
        sel.on_onset(30, SourceIdx(3), |s| w.get(s));
        w.tick(&mut sel, 40);
        assert_eq!(tracks(&sel, g), vec![Some(1), Some(2)]);
        // Source 1 goes into hangover: the talker takes its slot.
        w.set(1, Voice::Hangover, 0.5);
        w.tick(&mut sel, 60);
        assert_eq!(tracks(&sel, g), vec![Some(3), Some(2)]);
        // Source 2 falls silent: its slot empties rather than holding noise.
        w.set(2, Voice::Silent, 0.0);
        w.tick(&mut sel, 80);
        assert_eq!(tracks(&sel, g), vec![Some(3), None]);
        let evs: Vec<_> = sel
            .events()
            .drain(..)
            .map(|e| (e.track, e.source.map(|s| s.0)))
            .collect();
        assert_eq!(
            evs,
            vec![(0, Some(1)), (1, Some(2)), (0, Some(3)), (1, None)]
        );
    }

    #[test]
    fn clearly_more_active_talker_preempts_after_min_hold() {
        let w = World::new(3);
        let mut sel = Selector::new(SelectionConfig::default());
        let g = sel.join(GroupKey::new(1, None, []));
        w.set(1, Voice::Talking, 1.1);
        sel.on_onset(0, SourceIdx(1), |s| w.get(s));
        w.set(2, Voice::Talking, 1.5);
        w.tick(&mut sel, 2_000_000);
        assert_eq!(tracks(&sel, g), vec![Some(1)], "not clearly more active");
        w.set(2, Voice::Talking, 3.0);
        w.tick(&mut sel, 2_020_000);
        assert_eq!(tracks(&sel, g), vec![Some(2)]);
        assert_eq!(sel.placements(SourceIdx(1)), &[]);
        assert_eq!(sel.placements(SourceIdx(2)), &[(g, 0)]);
    }

    #[test]
    fn pinned_and_excluded_never_get_a_slot_and_groups_are_shared() {
        let w = World::new(4);
        let mut sel = Selector::new(SelectionConfig::default());
        let a = sel.join(GroupKey::new(
            3,
            Some(SourceIdx(0)),
            [SourceIdx(2), SourceIdx(2)],
        ));
        let b = sel.join(GroupKey::new(3, Some(SourceIdx(0)), [SourceIdx(2)]));
        assert_eq!(a, b);
        let c = sel.join(GroupKey::new(3, None, []));
        for s in 0..4 {
            w.set(s, Voice::Talking, 1.0 + s as f32);
            sel.on_onset(s as u64, SourceIdx(s), |s| w.get(s));
        }
        w.tick(&mut sel, 100);
        assert_eq!(tracks(&sel, a), vec![Some(1), Some(3), None]);
        assert_eq!(tracks(&sel, c), vec![Some(0), Some(1), Some(2)]);
        assert!(!sel.leave(a));
        assert!(sel.leave(b));
        assert_eq!(sel.placements(SourceIdx(3)), &[]);
        assert_eq!(sel.placements(SourceIdx(1)), &[(c, 1)]);
        sel.remove_source(200, SourceIdx(1));
        assert_eq!(tracks(&sel, c), vec![Some(0), None, Some(2)]);
    }

    #[test]
    fn projected_track_holds_its_source_and_others_follow_voice() {
        let w = World::new(6);
        let mut sel = Selector::new(SelectionConfig::default());
        let key = GroupKey::new(3, None, []).with_fixed([(1, SourceIdx(2))]);
        assert!(!key.admits(SourceIdx(2)));
        let g = sel.join(key);
        // Live but quiet: a projected source shows anyway.
        w.set(2, Voice::Silent, 0.0);
        w.tick(&mut sel, 10);
        assert_eq!(tracks(&sel, g), vec![None, Some(2), None]);
        // Talkers fill the other tracks only, even when more talk than there is room for.
        for s in [3, 4, 5] {
            w.set(s, Voice::Talking, 2.0);
            sel.on_onset(20, SourceIdx(s), |s| w.get(s));
        }
        w.set(2, Voice::Talking, 3.0);
        w.tick(&mut sel, 30);
        assert_eq!(tracks(&sel, g), vec![Some(3), Some(2), Some(4)]);
        // The projected source leaves: its track empties, nobody else takes it; it comes back.
        w.st.borrow_mut()[2] = Standing::GONE;
        w.tick(&mut sel, 40);
        assert_eq!(tracks(&sel, g), vec![Some(3), None, Some(4)]);
        w.set(2, Voice::Silent, 0.0);
        w.tick(&mut sel, 50);
        assert_eq!(tracks(&sel, g), vec![Some(3), Some(2), Some(4)]);
        // A key out of range or fixing one source twice keeps the last valid entry.
        let k = GroupKey::new(2, None, []).with_fixed([
            (0, SourceIdx(1)),
            (1, SourceIdx(1)),
            (5, SourceIdx(3)),
        ]);
        assert_eq!(k.fixed(), &[(1, SourceIdx(1))]);
    }
}
