//! Matches a payload a viewer received to the time a publisher sent it. The edge forwards Opus
//! payloads untouched, so a 64-bit hash of the payload bytes identifies the corpus frame; the
//! publishers store each frame's latest send time (the corpus loops: a new send overwrites the
//! old one). Payloads that occur more than once among the published frames (identical silence
//! frames, a speaker published twice) are ambiguous and not matched.
//!
//! Everything is fixed at start except the send times, which are atomics: publishers and
//! viewers on different threads share one `Matcher` without locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::replay::truth;

/// A talk spurt starts on a voiced frame after at least this many unvoiced ones (300 ms).
pub(crate) const SPURT_GAP_FRAMES: usize = 15;

/// FNV-1a-style 64-bit hash over 8-byte words, with a final mix: fast, deterministic, and
/// more than enough to tell a few thousand Opus frames apart.
pub(crate) fn payload_hash(b: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (b.len() as u64).wrapping_mul(K);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29);
    }
    for &x in chunks.remainder() {
        h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    crate::media::stream::splitmix64(h)
}

/// Which frames start a talk spurt: voiced (20 dB above the speaker's most common level, as
/// the replay's ground truth says) after at least [`SPURT_GAP_FRAMES`] unvoiced frames,
/// counting across the loop from the last frame back to the first.
pub(crate) fn spurt_starts(levels: &[u8]) -> Vec<bool> {
    let n = levels.len();
    let Some(limit) = truth::mode(levels).and_then(|m| m.checked_sub(truth::VOICED_DB)) else {
        return vec![false; n];
    };
    let voiced: Vec<bool> = levels.iter().map(|&l| l <= limit).collect();
    if voiced.iter().all(|&v| v) {
        return vec![false; n];
    }
    (0..n)
        .map(|k| voiced[k] && (1..=SPURT_GAP_FRAMES.min(n - 1)).all(|d| !voiced[(k + n - d) % n]))
        .collect()
}

/// A received payload, identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Match {
    /// Publisher index.
    pub source: u16,
    pub frame: u32,
    /// When it was last sent (ns since the epoch); 0 if never yet.
    pub send_ns: u64,
}

pub(crate) struct Matcher {
    /// hash -> (publisher, frame) for payloads that occur once.
    table: HashMap<u64, (u16, u32)>,
    /// Per publisher, per frame: the latest send time.
    sends: Vec<Box<[AtomicU64]>>,
    /// Per publisher: send time of the first packet of its latest talk spurt.
    spurts: Vec<AtomicU64>,
    pub ambiguous: usize,
}

impl Matcher {
    /// `frames[p]` is publisher p's payload sequence.
    pub(crate) fn new<P: AsRef<[u8]>>(frames: &[Vec<P>]) -> Matcher {
        let mut count: HashMap<u64, (u32, u16, u32)> = HashMap::new();
        for (p, list) in frames.iter().enumerate() {
            for (k, f) in list.iter().enumerate() {
                let e = count
                    .entry(payload_hash(f.as_ref()))
                    .or_insert((0, p as u16, k as u32));
                e.0 += 1;
            }
        }
        let ambiguous = count.values().filter(|e| e.0 > 1).count();
        let table = count
            .into_iter()
            .filter(|(_, e)| e.0 == 1)
            .map(|(h, (_, p, k))| (h, (p, k)))
            .collect();
        Matcher {
            table,
            sends: frames
                .iter()
                .map(|l| l.iter().map(|_| AtomicU64::new(0)).collect())
                .collect(),
            spurts: frames.iter().map(|_| AtomicU64::new(0)).collect(),
            ambiguous,
        }
    }

    pub(crate) fn record_send(&self, source: usize, frame: usize, ns: u64) {
        if let Some(s) = self.sends.get(source).and_then(|f| f.get(frame)) {
            s.store(ns, Ordering::Relaxed);
        }
    }

    pub(crate) fn lookup(&self, payload: &[u8]) -> Option<Match> {
        let &(source, frame) = self.table.get(&payload_hash(payload))?;
        let send_ns = self.sends[source as usize][frame as usize].load(Ordering::Relaxed);
        Some(Match {
            source,
            frame,
            send_ns,
        })
    }

    /// A publisher sent the first packet of a talk spurt.
    pub(crate) fn record_spurt(&self, source: usize, ns: u64) {
        if let Some(s) = self.spurts.get(source) {
            s.store(ns, Ordering::Relaxed);
        }
    }

    /// Send time of the first packet of the source's latest talk spurt (0: none yet).
    pub(crate) fn spurt(&self, source: usize) -> u64 {
        self.spurts
            .get(source)
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

/// At a run's start, a packet whose successor's latency is this much lower arrived ahead of
/// its pacing: a replay (4 ms; the successor was sent 20 ms later).
const REPLAY_STEP_NS: u64 = 4_000_000;

/// One sampled packet, told apart by [`RunSplit`]: (send, receive) times in ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Forwarded as it came: its latency is the edge's added latency.
    Live { send_ns: u64, rx_ns: u64 },
    /// Replayed by a pre-roll when its source entered the track: late by design.
    Preroll { send_ns: u64, rx_ns: u64 },
}

/// Tells a track's pre-roll from its live packets. When a source enters a track the edge first
/// replays up to 120 ms of the talk spurt's start at once: those packets arrive up to 120 ms
/// or more after they were sent by design, and counted as added latency they were the whole
/// tail (a run at 1000 viewers: p99 110 ms with them, 17 ms with the pre-roll turned off in a
/// build for the purpose). A run is the packets of one source on one track. Replayed packets
/// come faster than they were sent (20 ms of audio apart, written back to back, only the other
/// viewers' writes between them), so each one's latency is well above the next one's; the
/// first packet of the run whose successor is not [`REPLAY_STEP_NS`] faster ends the replay,
/// and it and everything after it are live. A run without pre-roll is live from its first
/// packet. A stall of the edge just as a run starts would be taken for a replay: a tail
/// anywhere else is not.
#[derive(Debug, Default, Clone)]
pub(crate) struct RunSplit {
    source: Option<u32>,
    /// The run's latest packet while its start is being told apart: (send, receive) ns.
    held: Option<(u64, u64)>,
}

impl RunSplit {
    /// A packet of `source` on this track; `out` gets what can be told apart now.
    pub(crate) fn on_packet(
        &mut self,
        source: u32,
        send_ns: u64,
        rx_ns: u64,
        out: &mut impl FnMut(Arrival),
    ) {
        if self.source != Some(source) {
            self.flush(out);
            self.source = Some(source);
            self.held = Some((send_ns, rx_ns));
            return;
        }
        let Some((s0, r0)) = self.held.take() else {
            out(Arrival::Live { send_ns, rx_ns });
            return;
        };
        let lat = |s: u64, r: u64| r as i128 - s as i128;
        if lat(s0, r0) - lat(send_ns, rx_ns) >= REPLAY_STEP_NS as i128 {
            out(Arrival::Preroll {
                send_ns: s0,
                rx_ns: r0,
            });
            self.held = Some((send_ns, rx_ns));
        } else {
            out(Arrival::Live {
                send_ns: s0,
                rx_ns: r0,
            });
            out(Arrival::Live { send_ns, rx_ns });
        }
    }

    /// Gives out the packet still held (the run's last so far): live.
    pub(crate) fn flush(&mut self, out: &mut impl FnMut(Arrival)) {
        if let Some((send_ns, rx_ns)) = self.held.take() {
            out(Arrival::Live { send_ns, rx_ns });
        }
    }
}

/// One sampled viewer's switch-latency state: per source, the spurt already measured.
#[derive(Debug, Clone)]
pub(crate) struct SwitchTracker {
    measured: Vec<u64>,
    /// Spurts that started before this time (the viewer's connection) are not measured.
    since_ns: u64,
}

impl SwitchTracker {
    pub(crate) fn new(sources: usize, since_ns: u64) -> SwitchTracker {
        SwitchTracker {
            measured: vec![0; sources],
            since_ns,
        }
    }

    /// A packet of `m.source` arrived at `rx_ns`. Returns the switch latency (ns) when this is
    /// the first packet of that source since its latest spurt began.
    pub(crate) fn on_packet(&mut self, matcher: &Matcher, m: &Match, rx_ns: u64) -> Option<u64> {
        let s = m.source as usize;
        let spurt = matcher.spurt(s);
        let seen = self.measured.get_mut(s)?;
        if spurt == 0 || spurt <= *seen || spurt < self.since_ns || m.send_ns < spurt {
            return None;
        }
        *seen = spurt;
        rx_ns.checked_sub(spurt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_roll_burst_is_told_from_live_packets() {
        const MS: u64 = 1_000_000;
        let mut r = RunSplit::default();
        let mut got = Vec::new();
        let mut put = |r: &mut RunSplit, src: u32, send_ms: u64, rx_ms: f64| {
            r.on_packet(src, send_ms * MS, (rx_ms * MS as f64) as u64, &mut |a| {
                got.push(a)
            })
        };
        // Source 1 enters at 1000 ms: 100 ms of its spurt replayed with the packet that made it
        // enter, 6 ms apart at this viewer (the other viewers' writes between them), then live
        // packets 20 ms apart.
        for k in 0..6 {
            put(&mut r, 1, 900 + 20 * k, 1002.0 + 6.0 * k as f64);
        }
        put(&mut r, 1, 1020, 1052.5);
        put(&mut r, 1, 1040, 1062.0);
        // Source 2 takes the track over with no pre-roll (one packet), then goes on.
        put(&mut r, 2, 2000, 2003.0);
        put(&mut r, 2, 2020, 2022.5);
        r.flush(&mut |a| got.push(a));
        let kinds: Vec<(bool, u64)> = got
            .iter()
            .map(|a| match *a {
                Arrival::Live { send_ns, rx_ns } => (true, (rx_ns - send_ns) / 100_000),
                Arrival::Preroll { send_ns, rx_ns } => (false, (rx_ns - send_ns) / 100_000),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (false, 1020),
                (false, 880),
                (false, 740),
                (false, 600),
                (false, 460),
                (true, 320),
                (true, 325),
                (true, 220),
                (true, 30),
                (true, 25),
            ]
        );
    }

    #[test]
    fn hash_tells_frames_apart_and_is_stable() {
        let a = payload_hash(b"hello opus frame 1");
        assert_eq!(a, payload_hash(b"hello opus frame 1"));
        assert_ne!(a, payload_hash(b"hello opus frame 2"));
        assert_ne!(payload_hash(b""), payload_hash(&[0]));
        assert_ne!(payload_hash(&[0; 8]), payload_hash(&[0; 9]));
    }

    #[test]
    fn matches_payloads_to_their_latest_send_and_skips_ambiguous_ones() {
        let frames = vec![
            vec![b"a0".to_vec(), b"a1".to_vec(), b"same".to_vec()],
            vec![b"b0".to_vec(), b"same".to_vec()],
        ];
        let m = Matcher::new(&frames);
        assert_eq!(m.ambiguous, 1);
        assert_eq!(
            m.lookup(b"a1").map(|x| (x.source, x.frame, x.send_ns)),
            Some((0, 1, 0))
        );
        m.record_send(0, 1, 1_000);
        m.record_send(1, 0, 2_000);
        assert_eq!(m.lookup(b"a1").unwrap().send_ns, 1_000);
        assert_eq!(m.lookup(b"b0").unwrap().source, 1);
        // The corpus loops: the latest send wins.
        m.record_send(0, 1, 21_000);
        assert_eq!(m.lookup(b"a1").unwrap().send_ns, 21_000);
        assert_eq!(m.lookup(b"same"), None);
        assert_eq!(m.lookup(b"never sent"), None);
        // Out-of-range indices are ignored, not a panic.
        m.record_send(9, 9, 1);
        m.record_spurt(9, 1);
    }

    #[test]
    fn spurts_start_after_300_ms_of_quiet() {
        let mut l = vec![70u8; 100];
        l[20..30].fill(30); // spurt at 20
        l[40..45].fill(30); // 10 quiet frames before: same spurt
        l[70..80].fill(30); // 25 quiet frames before: new spurt
        let s = spurt_starts(&l);
        let starts: Vec<usize> = (0..100).filter(|&k| s[k]).collect();
        assert_eq!(starts, vec![20, 70]);
        // Looping: a spurt at frame 0 counts when the end of the file is quiet.
        let mut l = vec![70u8; 100];
        l[0..5].fill(30);
        assert!(spurt_starts(&l)[0]);
        l[95] = 30;
        assert!(!spurt_starts(&l)[0]);
        assert!(spurt_starts(&[]).is_empty());
    }

    #[test]
    fn switch_latency_is_measured_once_per_spurt() {
        let frames = vec![vec![b"x0".to_vec(), b"x1".to_vec(), b"x2".to_vec()]];
        let m = Matcher::new(&frames);
        let mut t = SwitchTracker::new(1, 500);
        m.record_send(0, 0, 900);
        let before = m.lookup(b"x0").unwrap();
        // No spurt yet.
        assert_eq!(t.on_packet(&m, &before, 950), None);
        m.record_spurt(0, 1_000);
        m.record_send(0, 1, 1_000);
        m.record_send(0, 2, 1_020);
        // A packet sent before the spurt does not end it.
        assert_eq!(t.on_packet(&m, &before, 1_010), None);
        let first = m.lookup(b"x2").unwrap();
        assert_eq!(t.on_packet(&m, &first, 1_045), Some(45));
        assert_eq!(t.on_packet(&m, &first, 1_046), None);
        // Spurts from before the viewer connected are not measured.
        let mut late = SwitchTracker::new(1, 2_000);
        assert_eq!(late.on_packet(&m, &first, 2_100), None);
    }
}
