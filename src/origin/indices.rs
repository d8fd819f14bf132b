//! Source indices of one stream: the u16 each relayed datagram carries instead of the sourceId.
//!
//! An index belongs to one sourceId while that source is live or a publish attempt for it is
//! pending. When the last holder lets go, an index that carried packets is quarantined for
//! [`INDEX_QUARANTINE`] (a datagram of the old source still in flight must not be taken for the
//! new one; a sourceId that comes back meanwhile gets its old index again) and then freed; an
//! index that never carried a packet (a failed offer) is freed at once. So two live sources
//! never share an index, the index space is reused instead of wrapping, and a stream refuses a
//! new source with a clear error when it holds [`MAX_SOURCES_PER_STREAM`] or when every index
//! is held or quarantined.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::SourceKey;

/// Live sources (and pending publish attempts for new sourceIds) one stream holds at most. A
/// panel or a room has a few speakers on stage; 256 is far past any conversation, and bounds
/// what one publish token can make the origin hold (~90 KiB per unconnected peer).
pub(crate) const MAX_SOURCES_PER_STREAM: usize = 256;

/// How long the index of a source that ended stays reserved before another sourceId may take
/// it: far beyond any relayed datagram's life (audio older than ~100 ms is worthless).
pub(crate) const INDEX_QUARANTINE: Duration = Duration::from_secs(5);

/// The whole index space of a stream (the datagram tag's u16).
const INDEX_SPACE: u32 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IndexError {
    #[error(
        "the stream already has {MAX_SOURCES_PER_STREAM} sources (the most one stream takes): \
         end one before publishing another sourceId"
    )]
    TooManySources,
    #[error(
        "the stream has no free source index: too many sources ended in the last {}s; \
         try again shortly",
        INDEX_QUARANTINE.as_secs()
    )]
    Exhausted,
}

#[derive(Debug)]
struct Held {
    index: u16,
    /// Pending attempts plus the live publication.
    holders: u32,
    /// A publication with this index went live: packets may have been relayed with it.
    used: bool,
}

#[derive(Debug, Default)]
pub(crate) struct SourceIndices {
    held: HashMap<SourceKey, Held>,
    /// Indices of sources that ended, oldest first, with when they ended. An entry is stale
    /// (skipped) unless `quarantine_of` still names the same index and time for its key.
    quarantined: VecDeque<(SourceKey, u16, Instant)>,
    quarantine_of: HashMap<SourceKey, (u16, Instant)>,
    free: Vec<u16>,
    /// Indices never handed out yet start here.
    next: u32,
}

impl SourceIndices {
    /// Takes (or shares) the index of `key` for one more holder.
    pub(crate) fn claim(&mut self, key: &SourceKey, now: Instant) -> Result<u16, IndexError> {
        if let Some(h) = self.held.get_mut(key) {
            h.holders += 1;
            return Ok(h.index);
        }
        if self.held.len() >= MAX_SOURCES_PER_STREAM {
            return Err(IndexError::TooManySources);
        }
        // A source that comes back within its quarantine keeps its index (and pays no new one).
        self.expire(now);
        let (index, used) = match self.quarantine_of.remove(key) {
            Some((index, _)) => (index, true),
            None => (self.fresh()?, false),
        };
        self.held.insert(
            key.clone(),
            Held {
                index,
                holders: 1,
                used,
            },
        );
        Ok(index)
    }

    /// Frees the indices whose quarantine is over.
    fn expire(&mut self, now: Instant) {
        while let Some((_, _, since)) = self.quarantined.front() {
            if now.duration_since(*since) < INDEX_QUARANTINE {
                break;
            }
            let (key, index, since) = self.quarantined.pop_front().expect("front above");
            if self.quarantine_of.get(&key) == Some(&(index, since)) {
                self.quarantine_of.remove(&key);
                self.free.push(index);
            }
        }
    }

    fn fresh(&mut self) -> Result<u16, IndexError> {
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        if self.next < INDEX_SPACE {
            self.next += 1;
            return Ok((self.next - 1) as u16);
        }
        Err(IndexError::Exhausted)
    }

    /// A publication with `key`'s index went live.
    pub(crate) fn mark_used(&mut self, key: &SourceKey) {
        if let Some(h) = self.held.get_mut(key) {
            h.used = true;
        }
    }

    /// One holder of `key` lets go (an attempt failed or finished, a publication ended).
    pub(crate) fn release(&mut self, key: &SourceKey, now: Instant) {
        let Some(h) = self.held.get_mut(key) else {
            return;
        };
        h.holders = h.holders.saturating_sub(1);
        if h.holders > 0 {
            return;
        }
        let h = self.held.remove(key).expect("present above");
        self.expire(now);
        if h.used {
            self.quarantined.push_back((key.clone(), h.index, now));
            self.quarantine_of.insert(key.clone(), (h.index, now));
        } else {
            self.free.push(h.index);
        }
    }

    /// Sourceids holding an index (live or pending).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn k(s: &str) -> SourceKey {
        Some(s.to_owned())
    }

    #[test]
    fn failed_attempts_give_their_index_back_at_once() {
        let mut ix = SourceIndices::default();
        let t = Instant::now();
        // 200,000 distinct failed offers: the index space never runs out.
        for i in 0..200_000 {
            let key = k(&format!("s{i}"));
            let idx = ix.claim(&key, t).unwrap();
            assert_eq!(idx, 0);
            ix.release(&key, t);
        }
        assert_eq!(ix.held(), 0);
    }

    #[test]
    fn live_sources_never_share_an_index_under_churn() {
        let mut ix = SourceIndices::default();
        let mut t = Instant::now();
        let mut live: Vec<(SourceKey, u16)> = Vec::new();
        let mut n = 0u64;
        // 300,000 distinct sourceIds come and go, a few hundred live at a time, with time
        // moving on: indices are reused, never shared, and never wrap.
        for round in 0..3000 {
            for _ in 0..100 {
                n += 1;
                let key = k(&format!("src-{n}"));
                let idx = ix.claim(&key, t).unwrap();
                ix.mark_used(&key);
                live.push((key, idx));
            }
            let indices: HashSet<u16> = live.iter().map(|l| l.1).collect();
            assert_eq!(indices.len(), live.len(), "round {round}: shared index");
            for (key, _) in live.drain(..live.len() - 50) {
                ix.release(&key, t);
            }
            t += Duration::from_millis(200);
        }
        // An ended source is quarantined: a source ending now does not hand its index to the
        // next new sourceId.
        let (key, idx) = live.pop().unwrap();
        ix.release(&key, t);
        let other = ix.claim(&k("newcomer"), t).unwrap();
        assert_ne!(other, idx);
        // Coming back within the quarantine gives the same index.
        assert_eq!(ix.claim(&key, t).unwrap(), idx);
    }

    #[test]
    fn limits_refuse_clearly() {
        let mut ix = SourceIndices::default();
        let t = Instant::now();
        for i in 0..MAX_SOURCES_PER_STREAM {
            ix.claim(&k(&i.to_string()), t).unwrap();
        }
        assert_eq!(ix.claim(&k("one-more"), t), Err(IndexError::TooManySources));
        // A held source may still be claimed again (a replacement).
        assert!(ix.claim(&k("0"), t).is_ok());
        // Every index quarantined at once: refused until the quarantine ends.
        let mut ix = SourceIndices::default();
        for i in 0..INDEX_SPACE {
            let key = k(&i.to_string());
            ix.claim(&key, t).unwrap();
            ix.mark_used(&key);
            ix.release(&key, t);
        }
        assert_eq!(ix.claim(&k("late"), t), Err(IndexError::Exhausted));
        assert!(ix.claim(&k("late"), t + INDEX_QUARANTINE).is_ok());
        assert!(IndexError::Exhausted.to_string().contains("try again"));
    }

    #[test]
    fn a_replacement_failing_after_the_source_ended_still_quarantines() {
        let mut ix = SourceIndices::default();
        let t = Instant::now();
        let a = k("a");
        let idx = ix.claim(&a, t).unwrap();
        ix.mark_used(&a);
        ix.claim(&a, t).unwrap(); // a replacement attempt
        ix.release(&a, t); // the live publication ends
        ix.release(&a, t); // the attempt fails
        assert_ne!(ix.claim(&k("b"), t).unwrap(), idx);
    }
}
