//! Per-source noise floor: the minimum loudness seen over a sliding window of fixed buckets.
//!
//! A minimum over a few seconds follows a steady noise (a fan, a hum, a noisy room) up and down,
//! while speech, which always has pauses between words, keeps pulling it back to the real floor.
//! Fixed buckets keep it O(1) per packet and allocation-free.

const BUCKETS: usize = 8;
const EMPTY: u8 = u8::MAX;

#[derive(Debug, Clone)]
pub(crate) struct NoiseFloor {
    mins: [u8; BUCKETS],
    /// Bucket number (time / bucket length) of the newest bucket.
    head: u64,
    bucket_us: u64,
    cached: u8,
}

impl NoiseFloor {
    /// `window_us` is split into 8 buckets; the floor forgets a value 7/8 to 1 window after it.
    pub(crate) fn new(window_us: u64) -> Self {
        NoiseFloor {
            mins: [EMPTY; BUCKETS],
            head: 0,
            bucket_us: (window_us / BUCKETS as u64).max(1),
            cached: EMPTY,
        }
    }

    /// Records a loudness sample (higher is louder) at `now_us`.
    pub(crate) fn observe(&mut self, now_us: u64, value: u8) {
        self.advance(now_us);
        let v = value.min(EMPTY - 1);
        let slot = &mut self.mins[(self.head % BUCKETS as u64) as usize];
        if v < *slot {
            *slot = v;
        }
        if v < self.cached {
            self.cached = v;
        }
    }

    /// Current floor, or None when nothing was observed within the window.
    pub(crate) fn floor(&self) -> Option<u8> {
        (self.cached != EMPTY).then_some(self.cached)
    }

    fn advance(&mut self, now_us: u64) {
        let bucket = now_us / self.bucket_us;
        // Time going backwards (reordered arrivals) just lands in the newest bucket.
        if bucket <= self.head && self.cached != EMPTY {
            return;
        }
        let steps = bucket.saturating_sub(self.head).min(BUCKETS as u64);
        for i in 1..=steps {
            self.mins[((self.head + i) % BUCKETS as u64) as usize] = EMPTY;
        }
        self.head = bucket.max(self.head);
        self.cached = self.mins.iter().copied().min().unwrap_or(EMPTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_minimum_and_forgets_it_after_the_window() {
        let mut f = NoiseFloor::new(4_000_000);
        assert_eq!(f.floor(), None);
        f.observe(0, 80);
        f.observe(20_000, 50);
        f.observe(40_000, 90);
        assert_eq!(f.floor(), Some(50));
        // 3.9 s later the 50 is still inside the window.
        f.observe(3_900_000, 85);
        assert_eq!(f.floor(), Some(50));
        // After a full window it is gone; the floor rises to the steady 85.
        f.observe(4_100_000, 85);
        assert_eq!(f.floor(), Some(85));
        // A long silence in observations empties the window entirely.
        f.observe(60_000_000, 70);
        assert_eq!(f.floor(), Some(70));
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let mut f = NoiseFloor::new(4_000_000);
        f.observe(5_000_000, 60);
        f.observe(1_000_000, 40);
        assert_eq!(f.floor(), Some(40));
    }
}
