//! Where each recorded packet goes on its file's timeline, sans-IO.
//!
//! A recording's files are read back one frame per 20 ms from the recording's start (that is
//! how `chorus replay` paces them), so every file is a gapless run of 20 ms slots from the
//! recording's start: a packet's slot comes from its RTP timestamp relative to its feed's
//! anchor, the anchor from arrival times. Slots nobody filled (the time before the source
//! published, DTX, loss, a pause between two publications) get a filler frame.
//!
//! Arrival times are stamped on the origin's media thread, so they are only ever late: a
//! first packet handled after a stall of that thread would anchor every later frame of its feed
//! late by the stall (a CI run's file came out 210 ms longer than its recording). So a new
//! feed's first packets are held for [`HOLD_US`] and the anchor is the earliest their
//! timestamps and arrivals allow together.

/// One slot: a 20 ms Opus frame.
pub(crate) const SLOT_US: u64 = 20_000;
/// RTP ticks of one slot (48 kHz).
const SLOT_TICKS: i64 = 960;
/// A timestamp-derived slot further than this from the arrival-derived one (a sender's clock
/// jump, a bogus timestamp) re-anchors the feed on its arrival time: 2 s.
const MAX_SKEW_SLOTS: i64 = 100;
/// How long a new feed's first packets are held while its anchor settles: 500 ms of arrivals.
pub(crate) const HOLD_US: u64 = 500_000;
/// At most this many packets are held (a burst ends the hold early): 1 s of 20 ms frames.
pub(crate) const HOLD_MAX: u32 = 50;

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Write `fill` filler frames, then this packet.
    Write { fill: u64 },
    /// Its slot is already written (late, reordered or duplicate): drop it.
    Late,
    /// A new feed's packet, held while the feed's anchor settles: keep it until `Release`.
    Hold,
    /// The held feed's anchor has settled: place the held packets again, in order, then this
    /// one (nothing of it was taken).
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    feed: u64,
    slot: i64,
    ts: u32,
}

/// A new feed's anchor while its first packets are held.
#[derive(Debug, Clone, Copy)]
struct Hold {
    /// The earliest slot its held packets allow for the first one's timestamp.
    best: Anchor,
    since_us: u64,
    held: u32,
}

/// One file's timeline.
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    anchor: Option<Anchor>,
    hold: Option<Hold>,
    /// The next slot to write: every slot before it is written.
    next: u64,
}

/// Whole slots in `ticks` (negative when before).
fn slots(ticks: i64) -> i64 {
    ticks.div_euclid(SLOT_TICKS)
}

impl Timeline {
    /// Places a packet of `feed` (a publication) with RTP timestamp `ts`, arrived `at_us` after
    /// the recording's start.
    pub(crate) fn place(&mut self, feed: u64, ts: u32, at_us: u64) -> Place {
        let by_arrival = (at_us / SLOT_US) as i64;
        if let Some(h) = self.hold.as_mut() {
            if h.best.feed == feed && at_us < h.since_us + HOLD_US && h.held < HOLD_MAX {
                // This packet, had it been the first, would put the first one here.
                let ticks = ts.wrapping_sub(h.best.ts) as i32 as i64;
                h.best.slot = h.best.slot.min(by_arrival - slots(ticks));
                h.held += 1;
                return Place::Hold;
            }
            self.settle();
            return Place::Release;
        }
        let by_ts = self.anchor.filter(|a| a.feed == feed).map(|a| {
            let ticks = ts.wrapping_sub(a.ts) as i32 as i64;
            a.slot + slots(ticks)
        });
        let slot = match by_ts {
            Some(s) if (s - by_arrival).abs() <= MAX_SKEW_SLOTS => s,
            Some(_) => {
                // A jump within a feed: the packet takes the slot it arrived in, or the next
                // free one when that is written already.
                let s = by_arrival.max(self.next as i64);
                self.anchor = Some(Anchor { feed, slot: s, ts });
                s
            }
            None => {
                self.hold = Some(Hold {
                    best: Anchor {
                        feed,
                        slot: by_arrival,
                        ts,
                    },
                    since_us: at_us,
                    held: 1,
                });
                return Place::Hold;
            }
        };
        if slot < self.next as i64 {
            return Place::Late;
        }
        let fill = slot as u64 - self.next;
        self.next = slot as u64 + 1;
        Place::Write { fill }
    }

    /// Ends a hold now (its feed stopped, the recording ends): true when packets were held,
    /// to be placed again in order.
    pub(crate) fn settle(&mut self) -> bool {
        let Some(h) = self.hold.take() else {
            return false;
        };
        // Nothing goes before what is written already (a new feed inside written slots).
        self.anchor = Some(Anchor {
            slot: h.best.slot.max(self.next as i64),
            ..h.best
        });
        true
    }

    /// Filler frames that bring the file up to `at_us` (its end when the recording stops).
    /// Settle a hold first.
    pub(crate) fn fill_to(&mut self, at_us: u64) -> u64 {
        debug_assert!(self.hold.is_none(), "fill_to while packets are held");
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

    /// The caller's part, as the recorder does it: held packets kept and placed again, in
    /// order, on release; the slot each written packet took.
    #[derive(Default)]
    struct File {
        t: Timeline,
        held: Vec<(u64, u32, u64)>,
        /// (ts, slot) of each packet written; fillers counted.
        written: Vec<(u32, u64)>,
        fillers: u64,
        late: u32,
    }

    impl File {
        fn put(&mut self, feed: u64, ts: u32, at_us: u64) {
            match self.t.place(feed, ts, at_us) {
                Place::Write { fill } => {
                    self.fillers += fill;
                    self.written.push((ts, self.t.slots() - 1));
                }
                Place::Late => self.late += 1,
                Place::Hold => self.held.push((feed, ts, at_us)),
                Place::Release => {
                    self.release();
                    self.put(feed, ts, at_us);
                }
            }
        }

        fn release(&mut self) {
            for (feed, ts, at_us) in std::mem::take(&mut self.held) {
                self.put(feed, ts, at_us);
            }
        }

        fn stop(&mut self) {
            if self.t.settle() {
                self.release();
            }
        }

        fn slot_of(&self, ts: u32) -> Option<u64> {
            self.written.iter().find(|w| w.0 == ts).map(|w| w.1)
        }
    }

    #[test]
    fn first_packets_held_then_placed_by_timestamp_with_gaps_filled() {
        let mut f = File::default();
        // Publishes 1.01 s into the recording; its first half second is held.
        f.put(1, 5000, 1_010_000);
        assert_eq!(f.t.place(1, 5960, 1_049_000), Place::Hold);
        f.held.push((1, 5960, 1_049_000));
        assert!(f.written.is_empty());
        // DTX: 400 ms without packets, then a frame 20 slots on; then one past the hold.
        f.put(1, 5960 + 20 * 960, 1_450_000);
        f.put(1, 5960 + 21 * 960, 1_530_000);
        // 50 filler frames first; arrival jitter does not move frames: the timestamp decides.
        assert_eq!(f.slot_of(5000), Some(50));
        assert_eq!(f.slot_of(5960), Some(51));
        assert_eq!(f.slot_of(5960 + 20 * 960), Some(71));
        assert_eq!(f.fillers, 50 + 19);
        // A duplicate or late packet of a written slot is dropped.
        f.put(1, 5960, 1_560_000);
        assert_eq!(f.late, 1);
        assert_eq!(f.t.slots(), 73);
        // Stop 2 s in: filled to there.
        assert_eq!(f.t.fill_to(2_000_000), 27);
        assert_eq!(f.t.fill_to(1_000_000), 0);
    }

    #[test]
    fn a_first_packet_handled_late_does_not_move_its_feed() {
        let mut f = File::default();
        // Sent from 1 s on, one per 20 ms; the first eleven are handled together 200 ms late
        // (a stall), the rest on time.
        for k in 0..60u32 {
            let sent = 1_000_000 + 20_000 * u64::from(k);
            f.put(1, 960 * k, sent.max(1_200_000) + 300);
        }
        assert_eq!(f.slot_of(0), Some(50), "{:?}", f.written);
        assert_eq!(f.slot_of(960 * 59), Some(109));
        assert_eq!((f.fillers, f.late), (50, 0));
        // Ends with the recording at 2.2 s: the file is exactly as long.
        f.stop();
        assert_eq!(f.t.fill_to(2_200_000), 0);
        assert_eq!(f.t.slots(), 110);
    }

    #[test]
    fn a_stop_settles_a_hold_and_a_new_feed_releases_the_last() {
        let mut f = File::default();
        f.put(1, 100, 0);
        f.put(1, 1060, 20_000);
        f.stop();
        assert_eq!(f.written, [(100, 0), (1060, 1)]);
        // The source publishes again 3 s later, with another timestamp base; a third feed's
        // packet inside the hold ends it and is held in turn.
        f.put(2, 777, 3_000_000);
        f.put(3, 5, 3_010_000);
        assert_eq!(f.slot_of(777), Some(150));
        assert_eq!(f.held, [(3, 5, 3_010_000)]);
        // Inside written slots: the next free one.
        f.stop();
        assert_eq!(f.slot_of(5), Some(151));
        assert_eq!(f.fillers, 148);
    }

    #[test]
    fn a_timestamp_jump_reanchors_on_arrival() {
        let mut f = File::default();
        f.put(1, 777, 0);
        f.stop();
        f.put(1, 777 + 960, 20_000);
        // Its clock jumps by an hour: placed by arrival instead of an hour of filler.
        f.put(1, 777 + 3600 * 48_000, 40_000);
        assert_eq!(f.slot_of(777 + 3600 * 48_000), Some(2));
        assert_eq!(f.fillers, 0);
        // Timestamps wrap.
        let mut w = File::default();
        w.put(1, u32::MAX - 100, 0);
        w.put(1, 859, 20_000);
        w.stop();
        assert_eq!(w.written, [(u32::MAX - 100, 0), (859, 1)]);
    }
}
