//! Ground truth for a replay: who talks when, from the levels file alone, by a method that
//! shares nothing with the live estimator (an offline modal floor, not a running minimum).

/// A turn: a run of voiced frames, with pauses shorter than `MERGE_GAP_FRAMES` inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// Its first voiced frame (20 ms frames from the file's start).
    pub first_frame: usize,
    /// Its last voiced frame.
    pub last_frame: usize,
}

/// A frame is voiced when it is this many dB louder than the speaker's most common level.
pub(crate) const VOICED_DB: u8 = 20;
/// Pauses up to 700 ms stay inside one turn (sentence breaks); longer ones end it.
pub(crate) const MERGE_GAP_FRAMES: usize = 35;
/// Fewer voiced frames than this is a click, not a turn.
pub const MIN_VOICED_FRAMES: usize = 3;

/// The turns of a speaker's levels (one per frame).
pub fn turns(levels: &[u8]) -> Vec<Turn> {
    let Some(mode) = mode(levels) else {
        return vec![];
    };
    let Some(limit) = mode.checked_sub(VOICED_DB) else {
        return vec![];
    };
    let voiced: Vec<usize> = levels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l <= limit)
        .map(|(i, _)| i)
        .collect();
    let mut out: Vec<(Turn, usize)> = Vec::new();
    for &i in &voiced {
        match out.last_mut() {
            Some((t, n)) if i - t.last_frame <= MERGE_GAP_FRAMES => {
                t.last_frame = i;
                *n += 1;
            }
            _ => out.push((
                Turn {
                    first_frame: i,
                    last_frame: i,
                },
                1,
            )),
        }
    }
    out.into_iter()
        .filter(|(_, n)| *n >= MIN_VOICED_FRAMES)
        .map(|(t, _)| t)
        .collect()
}

/// Annotated turns (µs, sorted by start) with the pauses inside a turn closed, as [`turns`]
/// closes them: a pause up to [`MERGE_GAP_FRAMES`] continues the turn (a talker in a track keeps
/// it over such a pause, so its end is no new onset).
pub fn merge(annotated: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let gap_us = MERGE_GAP_FRAMES as u64 * 20_000;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in annotated {
        match out.last_mut() {
            Some(last) if a <= last.1 + gap_us => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The speaker's most common level: its noise floor.
pub(crate) fn mode(levels: &[u8]) -> Option<u8> {
    let mut counts = [0usize; 128];
    for &l in levels {
        counts[(l & 0x7F) as usize] += 1;
    }
    let (l, &n) = counts
        .iter()
        .enumerate()
        .max_by_key(|(l, &n)| (n, usize::MAX - l))?;
    (n > 0).then_some(l as u8)
}

/// Nearest-rank percentile of a sorted slice.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotated_turns_merge_over_short_pauses_only() {
        let t = [
            (0, 1_000_000),
            (1_500_000, 2_000_000),
            (2_800_000, 3_000_000),
        ];
        // 500 ms pause: one turn; 800 ms: a new one.
        assert_eq!(merge(&t), [(0, 2_000_000), (2_800_000, 3_000_000)]);
        // Overlapping and nested segments.
        assert_eq!(merge(&[(0, 5), (1, 3), (4, 9)]), [(0, 9)]);
    }

    #[test]
    fn turns_merge_short_pauses_and_ignore_steady_noise_and_clicks() {
        let mut l = vec![70u8; 300];
        l[10..40].fill(20);
        l[60..70].fill(25); // 20-frame pause: same turn
        l[150] = 10; // click
        l[200..210].fill(30);
        assert_eq!(
            turns(&l),
            vec![
                Turn {
                    first_frame: 10,
                    last_frame: 69
                },
                Turn {
                    first_frame: 200,
                    last_frame: 209
                }
            ]
        );
        assert!(turns(&[42; 500]).is_empty());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&v, 95.0), Some(19));
        assert_eq!(percentile(&v, 50.0), Some(10));
        assert_eq!(percentile(&v, 100.0), Some(20));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
