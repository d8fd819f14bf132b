//! `chorus replay --explain T`: what the packet core held at T, read from its own state (the
//! selector's last ranking and tracks, each source's standing), to explain a decision.

use std::fmt::Write as _;

use serde::Serialize;

use super::corpus::Speaker;
use super::{Change, FRAME_US};
use crate::media::activity::Voice;
use crate::media::selection::GroupId;
use crate::media::stream::StreamCore;
use crate::media::SourceIdx;

/// One source at T.
#[derive(Debug, Clone, Serialize)]
pub struct SourceAt {
    /// Its id (the file stem).
    pub source: String,
    /// Its place in the last tick's ranking (1 = first); None = not ranked (not talking).
    pub rank: Option<usize>,
    /// `talking`, `hangover` or `silent`.
    pub voice: &'static str,
    /// The activity score it is ranked by (1.0 = at the voiced threshold).
    pub score: f32,
    /// Its last packet's loudness over its noise floor (dB with levels, bytes without).
    pub over_floor: Option<i16>,
    /// The RFC 6464 level of its frame at T (0 loudest, 127 silence), if the corpus has levels.
    pub level: Option<u8>,
    /// The view's multiplexed track it is in.
    pub track: Option<u8>,
}

/// The core's state at T.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    /// T, ms of packet time.
    pub t_ms: u64,
    /// Every source: the ranked ones first, best first, then the others by id.
    pub sources: Vec<SourceAt>,
}

/// Reads the core's state at `t_us` for the view `group`; `names` by source index.
pub(crate) fn explain(
    core: &StreamCore,
    group: GroupId,
    speakers: &[Speaker],
    phase_us: &[u64],
    t_us: u64,
) -> Explained {
    let ranking: Vec<SourceIdx> = core.selector().ranking().map(|(s, _)| s).collect();
    let tracks: Vec<Option<SourceIdx>> = core.selector().tracks(group).collect();
    let mut sources: Vec<SourceAt> = speakers
        .iter()
        .enumerate()
        .map(|(i, sp)| {
            let s = SourceIdx(i as u32);
            let st = core.standing(s, t_us);
            let frame = t_us.saturating_sub(phase_us[i]) / FRAME_US;
            SourceAt {
                source: sp.id.clone(),
                rank: ranking.iter().position(|&r| r == s).map(|p| p + 1),
                voice: match st.voice {
                    Voice::Talking => "talking",
                    Voice::Hangover => "hangover",
                    Voice::Silent => "silent",
                },
                score: st.score,
                over_floor: core.over_floor(s),
                level: sp
                    .levels
                    .as_ref()
                    .and_then(|l| l.get(frame as usize))
                    .copied(),
                track: tracks.iter().position(|&t| t == Some(s)).map(|t| t as u8),
            }
        })
        .collect();
    sources.sort_by(|a, b| {
        (a.rank.is_none(), a.rank, &a.source).cmp(&(b.rank.is_none(), b.rank, &b.source))
    });
    Explained {
        t_ms: t_us / 1000,
        sources,
    }
}

/// The readable report: the track changes up to T, then the table at T.
pub fn render(e: &Explained, changes: &[Change], tracks: u8) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "track changes up to {:.3} s:", e.t_ms as f64 / 1000.0);
    for c in changes {
        let who = c.source.as_deref().unwrap_or("(empty)");
        let _ = writeln!(
            out,
            "  {:>9.3} s  track {}  {who}",
            c.t_ms as f64 / 1000.0,
            c.track
        );
    }
    let _ = writeln!(
        out,
        "at {:.3} s, a view of {tracks} tracks (rank: the core's last ranking; score 1.0 = at the voiced threshold):",
        e.t_ms as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "  {:<4} {:<16} {:<8} {:>6} {:>10} {:>5} {:>5}",
        "rank", "source", "voice", "score", "over_floor", "level", "track"
    );
    let dash = || "-".to_owned();
    for s in &e.sources {
        let _ = writeln!(
            out,
            "  {:<4} {:<16} {:<8} {:>6.2} {:>10} {:>5} {:>5}",
            s.rank.map_or_else(dash, |r| r.to_string()),
            s.source,
            s.voice,
            s.score,
            s.over_floor.map_or_else(dash, |x| x.to_string()),
            s.level.map_or_else(dash, |x| x.to_string()),
            s.track.map_or_else(dash, |x| x.to_string()),
        );
    }
    out
}

/// `--explain`'s T: seconds (`12.5`), or milliseconds with `ms` (`12500ms`); µs out.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, scale) = match t.strip_suffix("ms") {
        Some(n) => (n, 1e3),
        None => (t.strip_suffix('s').unwrap_or(t), 1e6),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..1e7).contains(&v) => Ok((v * scale).round() as u64),
        _ => Err(format!(
            "not a time {s:?}: seconds (12.5) or milliseconds (12500ms)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_seconds_or_ms() {
        assert_eq!(parse_time("12.5"), Ok(12_500_000));
        assert_eq!(parse_time("12s"), Ok(12_000_000));
        assert_eq!(parse_time("12500ms"), Ok(12_500_000));
        assert_eq!(parse_time(" 0 "), Ok(0));
        for bad in ["", "-1", "x", "1e9", "NaN", "5 min"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
