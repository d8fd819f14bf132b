//! Turns the packets of whichever sources a track carries over time into one continuous RTP
//! stream: fixed SSRC, gapless sequence numbers across switches, timestamps that advance by the
//! real elapsed time at a switch, and a marker bit on the first packet after each switch.

use super::opus::CLOCK_RATE;
use super::selection::GroupId;
use super::SourceIdx;

/// A sequence jump larger than this within one source is a restart, not loss.
const MAX_SEQ_JUMP: i64 = 3000;

/// Header values for a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// The track's own SSRC.
    pub ssrc: u32,
    /// The next number of the track's gapless sequence.
    pub seq: u16,
    /// The timestamp on the track's clock (advanced by the real elapsed time at a switch).
    pub ts: u32,
    /// The input's marker, or set on the first packet after a switch.
    pub marker: bool,
    /// Samples of the track's current feed before this packet: how far back a redundant (RED)
    /// block of it may point and still be audio of this feed, not of the one before the switch.
    pub reach: u32,
}

/// What feeds a rewriter: a rewriter re-anchors when its feed changes. A group's track is fed by
/// publishers' sources; a viewer's track by a group's track (already one continuous stream, so
/// the viewer re-anchors only when it moves to another group) or, for its main tracks, straight
/// by the pinned source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// A publisher's source.
    Source(SourceIdx),
    /// A group's track (the group, the track's index in it).
    Group(GroupId, u8),
}

/// The input header fields the rewriter needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputPacket {
    /// What the packet came from.
    pub source: Feed,
    /// Its SSRC (a new one re-anchors, as a new feed does).
    pub ssrc: u32,
    /// Its sequence number.
    pub seq: u16,
    /// Its RTP timestamp.
    pub ts: u32,
    /// Its marker bit.
    pub marker: bool,
    /// Audio duration in samples (960 for 20 ms Opus).
    pub samples: u32,
}

/// Why a packet of the current source is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteDrop {
    /// A late packet sent before the switch to this source: its output number is already taken.
    BeforeSwitch,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    source: Feed,
    in_ssrc: u32,
    /// Extended input sequence numbers of the first packet after the switch and the highest seen.
    first_ext: i64,
    highest_ext: i64,
    highest_seq: u16,
    /// The input timestamp of the first packet after the switch.
    first_ts: u32,
    seq_delta: u16,
    ts_delta: u32,
}

/// One output track's continuous RTP stream, fed by whichever source the track carries.
#[derive(Debug, Clone)]
pub struct TrackRewriter {
    ssrc: u32,
    anchor: Option<Anchor>,
    /// Highest output sequence number and its timestamp, arrival time and duration.
    out_seq: u16,
    out_ts: u32,
    out_at_us: u64,
    out_samples: u32,
    started: bool,
    clock_rate: u32,
}

impl TrackRewriter {
    /// `first_seq` / `first_ts` are the (random, RFC 3550) starting points of the output stream.
    pub fn new(ssrc: u32, first_seq: u16, first_ts: u32) -> Self {
        TrackRewriter {
            ssrc,
            anchor: None,
            out_seq: first_seq.wrapping_sub(1),
            out_ts: first_ts,
            out_at_us: 0,
            out_samples: 0,
            started: false,
            clock_rate: CLOCK_RATE,
        }
    }

    /// For a non-Opus track (video: 90 kHz): the clock a switch's elapsed time is counted in.
    pub(crate) fn with_clock_rate(mut self, clock_rate: u32) -> Self {
        self.clock_rate = clock_rate;
        self
    }

    /// The track's SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Highest sequence number sent, its RTP timestamp and the packet time it was sent at.
    /// Sender reports extrapolate from this.
    pub fn last_sent(&self) -> Option<(u16, u32, u64)> {
        self.started
            .then_some((self.out_seq, self.out_ts, self.out_at_us))
    }

    /// What currently feeds this track (the last one a packet was forwarded from).
    pub fn current_source(&self) -> Option<Feed> {
        self.anchor.map(|a| a.source)
    }

    /// The track changed source (or emptied): whatever comes next starts a new anchor, even if it
    /// is the same source again, so a pause in forwarding is not mistaken for loss.
    pub fn detach(&mut self) {
        self.anchor = None;
    }

    /// The header of a frame of `samples` that follows the last packet sent, at `now_us` (the
    /// track's audio ending in silence when it empties); None before anything was sent. The next
    /// source anchors after it.
    pub(crate) fn follow_on(&mut self, now_us: u64, samples: u32) -> Option<Rewritten> {
        if !self.started {
            return None;
        }
        self.out_seq = self.out_seq.wrapping_add(1);
        self.out_ts = self.out_ts.wrapping_add(self.out_samples);
        self.out_at_us = now_us;
        self.out_samples = samples;
        Some(Rewritten {
            ssrc: self.ssrc,
            seq: self.out_seq,
            ts: self.out_ts,
            marker: false,
            reach: 0,
        })
    }

    /// The header to forward `p` with at `now_us`, or why it is dropped.
    #[inline]
    pub fn rewrite(&mut self, now_us: u64, p: &InputPacket) -> Result<Rewritten, RewriteDrop> {
        let mut switched = false;
        let a = match self.anchor {
            Some(a) if a.source == p.source && a.in_ssrc == p.ssrc => {
                let delta = p.seq.wrapping_sub(a.highest_seq) as i16 as i64;
                let ext = a.highest_ext + delta;
                // A jump this far either way is the sender restarting its sequence on the same
                // SSRC, not loss or reordering (3000 packets is a minute of audio).
                if delta.abs() > MAX_SEQ_JUMP {
                    switched = true;
                    self.anchor_at(now_us, p)
                } else if ext < a.first_ext {
                    return Err(RewriteDrop::BeforeSwitch);
                } else {
                    a
                }
            }
            _ => {
                switched = true;
                self.anchor_at(now_us, p)
            }
        };
        let seq = p.seq.wrapping_add(a.seq_delta);
        let ts = p.ts.wrapping_add(a.ts_delta);
        let delta = p.seq.wrapping_sub(a.highest_seq) as i16 as i64;
        let mut a = a;
        if delta > 0 || switched {
            if !switched {
                a.highest_ext += delta;
                a.highest_seq = p.seq;
            }
            self.out_seq = seq;
            self.out_ts = ts;
            self.out_at_us = now_us;
            self.out_samples = p.samples;
            self.started = true;
        }
        self.anchor = Some(a);
        // A reordered packet from before the first one has no audio of this feed before it.
        let reach = p.ts.wrapping_sub(a.first_ts) as i32;
        Ok(Rewritten {
            ssrc: self.ssrc,
            seq,
            ts,
            marker: p.marker || switched,
            reach: reach.max(0) as u32,
        })
    }

    /// Maps the packet so it follows the last output packet: next sequence number, and a
    /// timestamp advanced by the real time elapsed (never less than one frame, so frames do not
    /// overlap in the receiver's jitter buffer).
    fn anchor_at(&self, now_us: u64, p: &InputPacket) -> Anchor {
        let (out_seq, out_ts) = if self.started {
            let elapsed_us = now_us.saturating_sub(self.out_at_us);
            // Capped at half the RTP clock's range: beyond that "later" is ambiguous anyway.
            let elapsed = (elapsed_us as u128 * self.clock_rate as u128 / 1_000_000)
                .min(u32::MAX as u128 / 2) as u32;
            (
                self.out_seq.wrapping_add(1),
                self.out_ts.wrapping_add(elapsed.max(self.out_samples)),
            )
        } else {
            (self.out_seq.wrapping_add(1), self.out_ts)
        };
        Anchor {
            source: p.source,
            in_ssrc: p.ssrc,
            first_ext: 0,
            highest_ext: 0,
            highest_seq: p.seq,
            first_ts: p.ts,
            seq_delta: out_seq.wrapping_sub(p.seq),
            ts_delta: out_ts.wrapping_sub(p.ts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(source: u32, seq: u16, ts: u32) -> InputPacket {
        InputPacket {
            source: Feed::Source(SourceIdx(source)),
            ssrc: 1000 + source,
            seq,
            ts,
            marker: false,
            samples: 960,
        }
    }

    #[test]
    fn reach_counts_the_current_feeds_audio_and_restarts_at_a_switch() {
        let mut r = TrackRewriter::new(1, 0, 0);
        let reach =
            |r: &mut TrackRewriter, at: u64, p: InputPacket| r.rewrite(at, &p).unwrap().reach;
        assert_eq!(reach(&mut r, 0, pkt(1, 10, 9600)), 0);
        assert_eq!(reach(&mut r, 20_000, pkt(1, 11, 10_560)), 960);
        // A loss does not shorten it: the timestamps say how much audio came before.
        assert_eq!(reach(&mut r, 60_000, pkt(1, 13, 12_480)), 2880);
        // Late, but after the anchor: its own distance.
        assert_eq!(reach(&mut r, 61_000, pkt(1, 12, 11_520)), 1920);
        // Another source: nothing of it came before its first packet.
        assert_eq!(reach(&mut r, 80_000, pkt(2, 500, 77)), 0);
        assert_eq!(reach(&mut r, 100_000, pkt(2, 501, 77 + 960)), 960);
        // The same source again after a detach (a switch back): anew.
        r.detach();
        assert_eq!(reach(&mut r, 120_000, pkt(2, 502, 77 + 1920)), 0);
    }

    #[test]
    fn switch_keeps_numbering_and_real_time() {
        let mut r = TrackRewriter::new(77, 500, 10_000);
        let a = r.rewrite(0, &pkt(1, 40_000, 3_000_000)).unwrap();
        assert_eq!((a.ssrc, a.seq, a.ts, a.marker), (77, 500, 10_000, true));
        let b = r.rewrite(20_000, &pkt(1, 40_001, 3_000_960)).unwrap();
        assert_eq!((b.seq, b.ts, b.marker), (501, 10_960, false));
        // Switch to source 2 100 ms later: seq continues, ts advances 100 ms = 4800 samples.
        let c = r.rewrite(120_000, &pkt(2, 7, 123)).unwrap();
        assert_eq!((c.seq, c.ts, c.marker), (502, 10_960 + 4800, true));
        let d = r.rewrite(140_000, &pkt(2, 8, 123 + 960)).unwrap();
        assert_eq!((d.seq, d.ts, d.marker), (503, 10_960 + 4800 + 960, false));
    }

    #[test]
    fn loss_keeps_gaps_and_reorder_keeps_numbers() {
        let mut r = TrackRewriter::new(1, 0, 0);
        r.rewrite(0, &pkt(1, 65_534, 0)).unwrap();
        // 65535 lost; 0 arrives (wrap), then 65535 late.
        let b = r.rewrite(40_000, &pkt(1, 0, 1920)).unwrap();
        assert_eq!((b.seq, b.ts), (2, 1920));
        let late = r.rewrite(45_000, &pkt(1, 65_535, 960)).unwrap();
        assert_eq!((late.seq, late.ts, late.marker), (1, 960, false));
        // The late packet did not move the head: next switch continues after seq 2.
        let c = r.rewrite(60_000, &pkt(2, 9, 0)).unwrap();
        assert_eq!(c.seq, 3);
    }

    #[test]
    fn late_packets_from_before_a_switch_are_dropped() {
        let mut r = TrackRewriter::new(1, 0, 0);
        r.rewrite(0, &pkt(1, 10, 0)).unwrap();
        r.rewrite(20_000, &pkt(2, 50, 0)).unwrap();
        assert_eq!(
            r.rewrite(25_000, &pkt(2, 49, 0)),
            Err(RewriteDrop::BeforeSwitch)
        );
        // Back to source 1: its old late packets predate the new anchor too.
        r.rewrite(40_000, &pkt(1, 20, 9600)).unwrap();
        assert_eq!(
            r.rewrite(45_000, &pkt(1, 19, 8640)),
            Err(RewriteDrop::BeforeSwitch)
        );
    }

    #[test]
    fn same_source_after_detach_continues_without_gap() {
        let mut r = TrackRewriter::new(1, 0, 0);
        r.rewrite(0, &pkt(1, 10, 0)).unwrap();
        r.detach();
        // 1 s later the same source comes back with 50 packets skipped: no gap in the output.
        let b = r.rewrite(1_000_000, &pkt(1, 60, 48_000)).unwrap();
        assert_eq!((b.seq, b.ts, b.marker), (1, 48_000, true));
    }

    #[test]
    fn a_viewer_moving_to_another_group_reanchors_once_and_stays_continuous() {
        // A viewer's rewriter is fed a group's track: already one stream (its own SSRC and
        // numbering), so only a move to another group's track re-anchors it.
        let group = |g: u32, seq: u16, ssrc: u32| InputPacket {
            source: Feed::Group(GroupId(g), 0),
            ssrc,
            seq,
            ts: seq as u32 * 960,
            marker: false,
            samples: 960,
        };
        let mut r = TrackRewriter::new(9, 100, 0);
        let a = r.rewrite(0, &group(1, 7000, 11)).unwrap();
        let b = r.rewrite(20_000, &group(1, 7001, 11)).unwrap();
        assert_eq!(
            (b.seq, b.ts.wrapping_sub(a.ts), b.marker),
            (101, 960, false)
        );
        // Same sequence numbers, another group: a new feed, even with an equal SSRC.
        let c = r.rewrite(40_000, &group(2, 7001, 11)).unwrap();
        assert_eq!((c.seq, c.ts.wrapping_sub(b.ts), c.marker), (102, 960, true));
        let d = r.rewrite(60_000, &group(2, 7002, 11)).unwrap();
        assert_eq!((d.seq, d.marker), (103, false));
    }

    #[test]
    fn switch_within_one_frame_still_advances_a_frame() {
        let mut r = TrackRewriter::new(1, 0, 0);
        r.rewrite(0, &pkt(1, 10, 0)).unwrap();
        let b = r.rewrite(1_000, &pkt(2, 10, 0)).unwrap();
        assert_eq!(b.ts, 960);
    }

    #[test]
    fn backward_restart_on_the_same_ssrc_reanchors_instead_of_dropping() {
        let mut r = TrackRewriter::new(1, 0, 0);
        for i in 0..3 {
            r.rewrite(i * 20_000, &pkt(1, 10_000 + i as u16, i as u32 * 960))
                .unwrap();
        }
        let b = r.rewrite(60_000, &pkt(1, 5000, 7)).unwrap();
        assert_eq!((b.seq, b.marker), (3, true));
        let c = r.rewrite(80_000, &pkt(1, 5001, 967)).unwrap();
        assert_eq!((c.seq, c.ts.wrapping_sub(b.ts), c.marker), (4, 960, false));
    }

    #[test]
    fn restart_of_a_source_reanchors() {
        let mut r = TrackRewriter::new(1, 0, 0);
        r.rewrite(0, &pkt(1, 10, 0)).unwrap();
        let b = r.rewrite(20_000, &pkt(1, 30_000, 5)).unwrap();
        assert_eq!((b.seq, b.ts, b.marker), (1, 960, true));
        // New SSRC for the same source (republished): also a switch.
        let mut p = pkt(1, 30_001, 965);
        p.ssrc = 4242;
        let c = r.rewrite(40_000, &p).unwrap();
        assert_eq!((c.seq, c.marker), (2, true));
    }
}
