//! Loss counting from the RTP header alone. SRTP leaves the header in the clear, so a viewer
//! can count what it gets without decrypting: per SSRC, distinct packets received and the
//! highest extended sequence number, hence loss = expected − received. Reordering and
//! duplicates within the last [`WINDOW`] sequence numbers are recognized.

/// How far back (in sequence numbers) a duplicate is recognized.
pub(crate) const WINDOW: u64 = 128;

/// Whether a datagram is SRTP (not RTCP, STUN or DTLS), by RFC 7983 / RFC 5761 demultiplexing:
/// first byte 128..=191 (RTP version 2) and a second byte outside 192..=223 (RTCP types).
#[inline]
pub(crate) fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..=191).contains(&d[0]) && !(192..=223).contains(&d[1])
}

/// (ssrc, sequence number) of an RTP datagram that passed [`is_rtp`].
#[inline]
pub(crate) fn rtp_ids(d: &[u8]) -> (u32, u16) {
    (
        u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        u16::from_be_bytes([d[2], d[3]]),
    )
}

/// What one packet changed, to keep running totals without rescanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Delta {
    pub expected: u64,
    pub received: u64,
    pub duplicate: bool,
}

/// One SSRC's reception state.
#[derive(Debug, Clone)]
pub(crate) struct SeqCounter {
    pub ssrc: u32,
    /// Lowest and highest extended sequence numbers seen (offset by 2^16 so reordering before
    /// the first packet cannot go below zero).
    base: u64,
    max: u64,
    /// Bit i: sequence number `max - i` was received.
    seen: u128,
    pub received: u64,
    pub duplicates: u64,
}

impl SeqCounter {
    pub(crate) fn new(ssrc: u32, first_seq: u16) -> (SeqCounter, Delta) {
        let ext = (1 << 16) + first_seq as u64;
        let c = SeqCounter {
            ssrc,
            base: ext,
            max: ext,
            seen: 1,
            received: 1,
            duplicates: 0,
        };
        (
            c,
            Delta {
                expected: 1,
                received: 1,
                duplicate: false,
            },
        )
    }

    /// Packets the sender numbered between the first and the highest seen.
    #[cfg(test)]
    pub(crate) fn expected(&self) -> u64 {
        self.max - self.base + 1
    }

    /// Lost packets so far (negative never: late duplicates outside the window are rare).
    #[cfg(test)]
    pub(crate) fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// The SRTP rollover counter of `seq` (the high bits of its extended number, the one
    /// closest to the highest seen), counting from 0 at this SSRC's first packet as the sender
    /// does (RFC 3711 §3.3.1).
    pub(crate) fn roc(&self, seq: u16) -> u32 {
        let delta = seq.wrapping_sub(self.max as u16) as i16 as i64;
        let ext = (self.max as i64 + delta).max(0) as u64;
        ((ext >> 16).saturating_sub(1)) as u32
    }

    pub(crate) fn on_seq(&mut self, seq: u16) -> Delta {
        // The extended number closest to the highest seen.
        let delta = seq.wrapping_sub(self.max as u16) as i16 as i64;
        let ext = (self.max as i64 + delta).max(0) as u64;
        if ext > self.max {
            let shift = ext - self.max;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.max = ext;
            self.received += 1;
            return Delta {
                expected: shift,
                received: 1,
                duplicate: false,
            };
        }
        let back = self.max - ext;
        if back < WINDOW {
            let bit = 1u128 << back;
            if self.seen & bit != 0 {
                self.duplicates += 1;
                return Delta {
                    expected: 0,
                    received: 0,
                    duplicate: true,
                };
            }
            self.seen |= bit;
        }
        // A late packet, inside the window or older (then assumed not a duplicate).
        self.received += 1;
        let mut expected = 0;
        if ext < self.base {
            expected = self.base - ext;
            self.base = ext;
        }
        Delta {
            expected,
            received: 1,
            duplicate: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_counts_wraps_from_the_first_packet() {
        let (mut c, _) = SeqCounter::new(1, 65_534);
        assert_eq!(c.roc(65_534), 0);
        assert_eq!(c.roc(1), 1, "just past the wrap, before it is seen");
        c.on_seq(65_535);
        c.on_seq(2);
        assert_eq!(c.roc(2), 1);
        assert_eq!(c.roc(65_533), 0, "a late packet from before the wrap");
    }

    fn feed(seqs: &[u16]) -> (SeqCounter, Delta) {
        let (mut c, mut total) = SeqCounter::new(7, seqs[0]);
        for &s in &seqs[1..] {
            let d = c.on_seq(s);
            total.expected += d.expected;
            total.received += d.received;
        }
        // Running totals agree with the counter's own view.
        assert_eq!(total.expected, c.expected());
        assert_eq!(total.received, c.received);
        (c, total)
    }

    #[test]
    fn in_order_without_loss() {
        let seqs: Vec<u16> = (100..200).collect();
        let (c, _) = feed(&seqs);
        assert_eq!((c.expected(), c.received, c.lost()), (100, 100, 0));
    }

    #[test]
    fn wraps_around_the_sequence_space() {
        let seqs: Vec<u16> = (0..300u32).map(|i| (65_400 + i) as u16).collect();
        let (c, _) = feed(&seqs);
        assert_eq!((c.expected(), c.lost()), (300, 0));
        // A gap across the wrap is loss.
        let (c, _) = feed(&[65_534, 65_535, 2, 3]);
        assert_eq!((c.expected(), c.received, c.lost()), (6, 4, 2));
    }

    #[test]
    fn reordering_is_not_loss_and_fills_gaps() {
        let (c, _) = feed(&[10, 12, 11, 14, 13, 15]);
        assert_eq!((c.expected(), c.lost()), (6, 0));
        // Reordered before the first packet.
        let (c, _) = feed(&[10, 9, 8, 11]);
        assert_eq!((c.expected(), c.received, c.lost()), (4, 4, 0));
        // Reordered across the wrap.
        let (c, _) = feed(&[65_535, 1, 0, 2]);
        assert_eq!((c.expected(), c.lost()), (4, 0));
    }

    #[test]
    fn duplicates_are_counted_apart() {
        let (c, _) = feed(&[5, 6, 6, 7, 5, 8]);
        assert_eq!(
            (c.expected(), c.received, c.duplicates, c.lost()),
            (4, 4, 2, 0)
        );
        let (c, _) = feed(&[5, 7, 7]);
        assert_eq!((c.received, c.duplicates, c.lost()), (2, 1, 1));
    }

    #[test]
    fn big_jumps_clear_the_window() {
        let (c, _) = feed(&[1, 2, 1000, 1001, 2]);
        // 2 is far behind the window now: counted as a late packet, not a duplicate.
        assert_eq!((c.expected(), c.received, c.duplicates), (1001, 5, 0));
    }

    #[test]
    fn demultiplexes_rtp_from_rtcp_stun_and_dtls() {
        let mut rtp = [0u8; 20];
        rtp[0] = 0x80;
        rtp[1] = 111;
        rtp[2..4].copy_from_slice(&513u16.to_be_bytes());
        rtp[8..12].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert!(is_rtp(&rtp));
        assert_eq!(rtp_ids(&rtp), (0xdead_beef, 513));
        rtp[1] = 111 | 0x80; // marker
        assert!(is_rtp(&rtp));
        let mut rtcp = rtp;
        rtcp[1] = 200; // SR
        assert!(!is_rtp(&rtcp));
        let mut stun = rtp;
        stun[0] = 0;
        assert!(!is_rtp(&stun));
        let mut dtls = rtp;
        dtls[0] = 22;
        assert!(!is_rtp(&dtls));
        assert!(!is_rtp(&rtp[..8]));
    }
}
