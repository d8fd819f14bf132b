//! A source's packet duration, learnt from its RTP timestamps.
//!
//! The payload may be end-to-end encrypted (an encoded transform in the publisher's browser):
//! then its first byte is ciphertext, not an Opus TOC, and any duration read from it is noise.
//! Timestamps stay in clear, and consecutive packets of an audio source advance them by one
//! packet's duration; a DTX pause or a loss shows as a larger or broken step, which is why a
//! new duration is taken only when two consecutive steps agree.

use super::opus::CLOCK_RATE;

/// The duration assumed until two steps agree: 20 ms, what every WebRTC Opus sender uses.
pub(crate) const DEFAULT_FRAME: u32 = CLOCK_RATE / 50;
/// The shortest Opus packet, 2.5 ms: a smaller step is a timestamp glitch, not a frame.
const MIN_FRAME: u32 = CLOCK_RATE / 400;
/// The longest Opus packet, 120 ms: a larger step is a DTX pause or a jump, not a frame.
const MAX_FRAME: u32 = CLOCK_RATE * 120 / 1000;

/// What one source's timestamps say a packet lasts.
#[derive(Debug, Clone)]
pub(crate) struct FrameClock {
    /// The newest packet seen (sequence number, timestamp).
    last: Option<(u16, u32)>,
    /// The duration in use.
    frame: u32,
    /// The last step between consecutive packets, waiting for a second one to agree.
    step: u32,
}

impl Default for FrameClock {
    fn default() -> Self {
        FrameClock {
            last: None,
            frame: DEFAULT_FRAME,
            step: 0,
        }
    }
}

impl FrameClock {
    /// Feeds a packet in arrival order; returns the duration (in samples) to use for it.
    pub(crate) fn observe(&mut self, seq: u16, ts: u32) -> u32 {
        match self.last {
            Some((lseq, lts)) if seq == lseq.wrapping_add(1) => {
                let step = ts.wrapping_sub(lts);
                if (MIN_FRAME..=MAX_FRAME).contains(&step) {
                    if step == self.step {
                        self.frame = step;
                    }
                    self.step = step;
                }
                self.last = Some((seq, ts));
            }
            // Reordered or duplicate: the newest stays.
            Some((lseq, _)) if (seq.wrapping_sub(lseq) as i16) <= 0 => {}
            // First packet, or after a loss: no step to learn from.
            _ => self.last = Some((seq, ts)),
        }
        self.frame
    }

    /// The duration in use (as of the last packet).
    pub(crate) fn frame(&self) -> u32 {
        self.frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(c: &mut FrameClock, pkts: &[(u16, u32)]) -> Vec<u32> {
        pkts.iter().map(|&(s, t)| c.observe(s, t)).collect()
    }

    #[test]
    fn twenty_ms_until_two_steps_agree() {
        let mut c = FrameClock::default();
        // 10 ms packets: the first step is a candidate, the second confirms it.
        let d = feed(&mut c, &[(1, 0), (2, 480), (3, 960), (4, 1440)]);
        assert_eq!(d, vec![960, 960, 480, 480]);
    }

    #[test]
    fn dtx_pauses_and_losses_teach_nothing() {
        let mut c = FrameClock::default();
        feed(&mut c, &[(10, 0), (11, 960), (12, 1920)]);
        // DTX: consecutive sequence numbers, 400 ms of timestamps.
        assert_eq!(c.observe(13, 1920 + 19_200), 960);
        // A loss: sequence 15 after 13, a 40 ms step over two packets.
        assert_eq!(c.observe(15, 1920 + 19_200 + 1920), 960);
        // One odd step (a 40 ms packet) alone does not move it either.
        assert_eq!(c.observe(16, 1920 + 19_200 + 3840), 960);
        assert_eq!(c.frame(), 960);
    }

    #[test]
    fn reordered_packets_and_wraps_keep_the_newest() {
        let mut c = FrameClock::default();
        feed(&mut c, &[(65_534, u32::MAX - 959), (65_535, 0)]);
        // A late duplicate of 65_534 changes nothing; 0 follows 65_535 across the wrap (a
        // 40 ms step: a candidate), and 1 confirms it.
        c.observe(65_534, u32::MAX - 959);
        assert_eq!(c.observe(0, 1920), 960);
        assert_eq!(c.observe(1, 3840), 1920);
        assert_eq!(c.observe(2, 5760), 1920);
    }

    #[test]
    fn ciphertext_payloads_cannot_move_it() {
        // The clock never sees the payload: only header fields go in.
        let mut c = FrameClock::default();
        for i in 0..100u16 {
            assert_eq!(c.observe(i, i as u32 * 960), 960);
        }
    }
}
