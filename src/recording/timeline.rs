//! Where each recorded packet goes on its file's timeline, sans-IO.
//!
//! A recording's files are read back one frame per 20 ms from the recording's start (that is
//! how `chorus replay` paces them), so every file is a gapless run of 20 ms slots from the
//! recording's start: a packet's slot comes from its RTP timestamp relative to the first packet
//! of its feed, that first packet's from its arrival time. Slots nobody filled (the time before
//! the source published, DTX, loss, a pause between two publications) get a filler frame.

/// One slot: a 20 ms Opus frame.
pub(crate) const SLOT_US: u64 = 20_000;
/// RTP ticks of one slot (48 kHz).
const SLOT_TICKS: i64 = 960;
/// A timestamp-derived slot further than this from the arrival-derived one (a sender's clock
/// jump, a bogus timestamp) re-anchors the feed on its arrival time: 2 s.
const MAX_SKEW_SLOTS: i64 = 100;

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Write `fill` filler frames, then this packet.
    Write { fill: u64 },
    /// Its slot is already written (late, reordered or duplicate): drop it.
    Late,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    feed: u64,
    slot: i64,
    ts: u32,
}

/// One file's timeline.
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    anchor: Option<Anchor>,
    /// The next slot to write: every slot before it is written.
    next: u64,
}

impl Timeline {
    /// Places a packet of `feed` (a publication) with RTP timestamp `ts`, arrived `at_us` after
    /// the recording's start.
    pub(crate) fn place(&mut self, feed: u64, ts: u32, at_us: u64) -> Place {
        let by_arrival = (at_us / SLOT_US) as i64;
        let by_ts = self.anchor.filter(|a| a.feed == feed).map(|a| {
            let ticks = ts.wrapping_sub(a.ts) as i32 as i64;
            a.slot + ticks.div_euclid(SLOT_TICKS)
        });
        let slot = match by_ts {
            Some(s) if (s - by_arrival).abs() <= MAX_SKEW_SLOTS => s,
            _ => {
                // A new feed (or a jump): the packet takes the slot it arrived in, or the next
                // free one when that is written already.
                let s = by_arrival.max(self.next as i64);
                self.anchor = Some(Anchor { feed, slot: s, ts });
                s
            }
        };
        if slot < self.next as i64 {
            return Place::Late;
        }
        let fill = slot as u64 - self.next;
        self.next = slot as u64 + 1;
        Place::Write { fill }
    }

    /// Filler frames that bring the file up to `at_us` (its end when the recording stops).
    pub(crate) fn fill_to(&mut self, at_us: u64) -> u64 {
        let end = at_us / SLOT_US;
        let fill = end.saturating_sub(self.next);
        self.next += fill;
        fill
    }

    /// Slots written so far.
    pub(crate) fn slots(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_packet_by_arrival_then_by_timestamp_with_gaps_filled() {
        let mut t = Timeline::default();
        // Publishes 1.01 s into the recording: 50 filler frames first.
        assert_eq!(t.place(1, 5000, 1_010_000), Place::Write { fill: 50 });
        // Arrival jitter does not move frames: the timestamp decides.
        assert_eq!(t.place(1, 5960, 1_049_000), Place::Write { fill: 0 });
        // DTX: 400 ms without packets, then a frame 20 slots on.
        assert_eq!(
            t.place(1, 5960 + 20 * 960, 1_450_000),
            Place::Write { fill: 19 }
        );
        // A duplicate or late packet of a written slot is dropped.
        assert_eq!(t.place(1, 5960, 1_460_000), Place::Late);
        assert_eq!(t.slots(), 72);
        // Stop 2 s in: filled to there.
        assert_eq!(t.fill_to(2_000_000), 28);
        assert_eq!(t.fill_to(1_000_000), 0);
    }

    #[test]
    fn a_new_feed_or_a_timestamp_jump_reanchors_on_arrival() {
        let mut t = Timeline::default();
        assert_eq!(t.place(1, 0, 0), Place::Write { fill: 0 });
        // The source publishes again 3 s later, with another timestamp base.
        assert_eq!(t.place(2, 777, 3_000_000), Place::Write { fill: 149 });
        assert_eq!(t.place(2, 777 + 960, 3_020_000), Place::Write { fill: 0 });
        // Its clock jumps by an hour: placed by arrival instead of an hour of filler.
        assert_eq!(
            t.place(2, 777 + 3600 * 48_000, 3_040_000),
            Place::Write { fill: 0 }
        );
        // A new feed arriving inside a written slot takes the next free one.
        assert_eq!(t.place(3, 1, 3_040_000), Place::Write { fill: 0 });
        assert_eq!(t.slots(), 154);
        // Timestamps wrap.
        let mut w = Timeline::default();
        assert_eq!(w.place(1, u32::MAX - 100, 0), Place::Write { fill: 0 });
        assert_eq!(w.place(1, 859, 20_000), Place::Write { fill: 0 });
    }
}
