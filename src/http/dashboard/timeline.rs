//! The dashboard's decisions, sans-IO (time is an argument): which track switches the snapshots
//! show, kept for [`WINDOW_MS`] in a ring of at most [`MAX_SWITCHES`], and packet rates from
//! counters.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// Switches are shown for this long.
pub(crate) const WINDOW_MS: u64 = 60_000;
/// The ring holds at most this many switches (10 a second over the window); past it the oldest
/// goes, counted.
pub(crate) const MAX_SWITCHES: usize = 600;

/// What a track holds: None = empty; "" = the stream's main source; else a sourceId.
pub(crate) type Occupant = Option<String>;

/// One track of one group, named so that a group gone and another come under its reused id
/// (with another key) is another track.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub(crate) struct TrackKey {
    pub stream: String,
    pub group: String,
    pub track: u8,
}

/// A track that took another source, or emptied, as first seen in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Switch {
    #[serde(rename = "atMs")]
    pub at_ms: u64,
    #[serde(flatten)]
    pub track: TrackKey,
    pub from: Occupant,
    pub to: Occupant,
}

/// The switches of the last [`WINDOW_MS`]. Each snapshot's tracks are compared with the last
/// one's, so switches within one snapshot period coalesce into one (from the first occupant to
/// the last): the page cannot show faster changes anyway.
#[derive(Default)]
pub(crate) struct Timeline {
    last: HashMap<TrackKey, Occupant>,
    switches: VecDeque<Switch>,
    /// Switches the ring let go before their time (more than [`MAX_SWITCHES`] in the window).
    pub dropped: u64,
}

impl Timeline {
    /// Every track as the snapshot at `now_ms` shows it. A track seen for the first time is no
    /// switch (its source came in before anyone watched); a track gone is forgotten.
    pub(crate) fn observe(
        &mut self,
        now_ms: u64,
        tracks: impl IntoIterator<Item = (TrackKey, Occupant)>,
    ) {
        let mut seen = HashMap::with_capacity(self.last.len());
        for (key, now) in tracks {
            if let Some(before) = self.last.get(&key) {
                if *before != now {
                    if self.switches.len() == MAX_SWITCHES {
                        self.switches.pop_front();
                        self.dropped += 1;
                    }
                    self.switches.push_back(Switch {
                        at_ms: now_ms,
                        track: key.clone(),
                        from: before.clone(),
                        to: now.clone(),
                    });
                }
            }
            seen.insert(key, now);
        }
        self.last = seen;
        while self
            .switches
            .front()
            .is_some_and(|s| s.at_ms + WINDOW_MS < now_ms)
        {
            self.switches.pop_front();
        }
    }

    /// The switches still in the window, oldest first.
    pub(crate) fn switches(&self) -> impl Iterator<Item = &Switch> {
        self.switches.iter()
    }
}

/// A counter's rate per second between two readings.
#[derive(Default)]
pub(crate) struct Rate {
    last: Option<(u64, u64)>,
}

impl Rate {
    /// The rate since the last reading (None for the first, or when no time passed). A counter
    /// that went back (a restart) reads as 0 for that interval.
    pub(crate) fn per_sec(&mut self, now_ms: u64, count: u64) -> Option<f64> {
        let before = self.last.replace((now_ms, count));
        let (t, c) = before?;
        let dt = now_ms.checked_sub(t).filter(|&d| d > 0)?;
        Some(count.saturating_sub(c) as f64 * 1000.0 / dt as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(group: &str, track: u8) -> TrackKey {
        TrackKey {
            stream: "s".into(),
            group: group.into(),
            track,
        }
    }

    fn occ(s: &str) -> Occupant {
        Some(s.into())
    }

    fn seen(t: &Timeline) -> Vec<(u64, u8, Occupant, Occupant)> {
        t.switches()
            .map(|s| (s.at_ms, s.track.track, s.from.clone(), s.to.clone()))
            .collect()
    }

    #[test]
    fn a_change_between_snapshots_is_one_switch_and_a_new_track_none() {
        let mut t = Timeline::default();
        t.observe(0, [(key("g", 0), occ("host")), (key("g", 1), None)]);
        assert!(seen(&t).is_empty(), "first sight is no switch");
        t.observe(250, [(key("g", 0), occ("host")), (key("g", 1), occ("ana"))]);
        t.observe(500, [(key("g", 0), None), (key("g", 1), occ("ana"))]);
        assert_eq!(
            seen(&t),
            [(250, 1, None, occ("ana")), (500, 0, occ("host"), None)]
        );
        // A group that goes and comes back is seen afresh.
        t.observe(750, []);
        t.observe(1000, [(key("g", 0), occ("bo"))]);
        assert_eq!(seen(&t).len(), 2);
    }

    #[test]
    fn switches_leave_the_window_after_a_minute_and_the_ring_is_bounded() {
        let mut t = Timeline::default();
        t.observe(0, [(key("g", 0), None)]);
        t.observe(1000, [(key("g", 0), occ("ana"))]);
        t.observe(WINDOW_MS + 1000, [(key("g", 0), occ("ana"))]);
        assert_eq!(seen(&t).len(), 1, "exactly a minute old: still shown");
        t.observe(WINDOW_MS + 1001, [(key("g", 0), occ("ana"))]);
        assert!(seen(&t).is_empty());
        let now = 2 * WINDOW_MS;
        for i in 0..MAX_SWITCHES as u64 + 5 {
            let who = if i % 2 == 0 { "bo" } else { "ana" };
            t.observe(now + i, [(key("g", 0), occ(who))]);
        }
        assert_eq!(seen(&t).len(), MAX_SWITCHES);
        assert_eq!(t.dropped, 5);
        assert_eq!(seen(&t)[0].0, now + 5, "the oldest went first");
    }

    #[test]
    fn rates_come_from_two_readings() {
        let mut r = Rate::default();
        assert_eq!(r.per_sec(0, 100), None);
        assert_eq!(r.per_sec(500, 150), Some(100.0));
        assert_eq!(r.per_sec(500, 160), None, "no time passed");
        assert_eq!(r.per_sec(1500, 10), Some(0.0), "a counter that went back");
    }
}
