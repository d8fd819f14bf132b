//! A speech corpus on disk: `<id>.opus` (Ogg Opus, sourceId = file stem) and, optionally,
//! `<id>.levels` (one RFC 6464 level per 20 ms frame, `#` comments) and `<id>.turns` (the
//! speaker's annotated turns, `start end` in seconds a line, `#` comments: the truth a replay is
//! measured against when a careful annotation exists, instead of turns guessed from the levels).

use std::fmt;
use std::path::{Path, PathBuf};

use super::ogg::{read_ogg_opus, OggError};

/// A corpus directory that cannot be loaded.
#[derive(Debug)]
pub enum CorpusError {
    /// A file or the directory could not be read.
    Io(PathBuf, std::io::Error),
    /// An `.opus` file is not readable Ogg Opus.
    Ogg(PathBuf, OggError),
    /// A `.turns` line that is not `start end` in seconds, with start <= end.
    Turn {
        /// The turns file.
        file: PathBuf,
        /// The line's number, from 1.
        line: usize,
        /// What it holds.
        text: String,
    },
    /// A `.levels` line that is not a level 0-127.
    Level {
        /// The levels file.
        file: PathBuf,
        /// The line's number, from 1.
        line: usize,
        /// What it holds.
        text: String,
    },
    /// No `<id>.opus` file in the directory.
    Empty(PathBuf),
}

impl fmt::Display for CorpusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorpusError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            CorpusError::Ogg(p, e) => write!(f, "{}: {e}", p.display()),
            CorpusError::Level { file, line, text } => {
                write!(f, "{}:{line}: not a level 0-127: {text:?}", file.display())
            }
            CorpusError::Turn { file, line, text } => write!(
                f,
                "{}:{line}: not a turn \"start end\" in seconds: {text:?}",
                file.display()
            ),
            CorpusError::Empty(p) => write!(f, "{}: no <id>.opus files", p.display()),
        }
    }
}

impl std::error::Error for CorpusError {}

/// One speaker of a corpus: `<id>.opus` and, if present, `<id>.levels`.
#[derive(Debug, Clone)]
pub struct Speaker {
    /// The file name without its extension.
    pub id: String,
    /// Opus packets, one per frame, in order.
    pub packets: Vec<Vec<u8>>,
    /// One level per packet, if the corpus has them.
    pub levels: Option<Vec<u8>>,
    /// Annotated turns (start, end) in µs from the file's start, if the corpus has them.
    pub turns: Option<Vec<(u64, u64)>>,
}

/// Loads every speaker of a directory, sorted by id.
pub fn load(dir: &Path) -> Result<Vec<Speaker>, CorpusError> {
    let entries = std::fs::read_dir(dir).map_err(|e| CorpusError::Io(dir.into(), e))?;
    let mut opus_files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "opus"))
        .collect();
    opus_files.sort();
    if opus_files.is_empty() {
        return Err(CorpusError::Empty(dir.into()));
    }
    opus_files
        .into_iter()
        .map(|path| {
            let id = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = std::fs::read(&path).map_err(|e| CorpusError::Io(path.clone(), e))?;
            let ogg = read_ogg_opus(&data).map_err(|e| CorpusError::Ogg(path.clone(), e))?;
            let lpath = path.with_extension("levels");
            let levels = if lpath.exists() {
                Some(read_levels(&lpath)?)
            } else {
                None
            };
            let tpath = path.with_extension("turns");
            let turns = if tpath.exists() {
                let text = std::fs::read_to_string(&tpath)
                    .map_err(|e| CorpusError::Io(tpath.clone(), e))?;
                Some(
                    parse_turns(&text).map_err(|(line, text)| CorpusError::Turn {
                        file: tpath.clone(),
                        line,
                        text,
                    })?,
                )
            } else {
                None
            };
            Ok(Speaker {
                id,
                packets: ogg.packets,
                levels,
                turns,
            })
        })
        .collect()
}

/// Reads a levels file: one level (0-127) a line; blank lines and `#` comments skipped.
pub fn read_levels(path: &Path) -> Result<Vec<u8>, CorpusError> {
    let text = std::fs::read_to_string(path).map_err(|e| CorpusError::Io(path.into(), e))?;
    parse_levels(&text).map_err(|(line, text)| CorpusError::Level {
        file: path.into(),
        line,
        text,
    })
}

/// Parses one level per line; `#` starts a comment. Errors with (1-based line, text).
pub(crate) fn parse_levels(text: &str) -> Result<Vec<u8>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.split('#').next().unwrap_or("").trim();
        if t.is_empty() {
            continue;
        }
        match t.parse::<u8>() {
            Ok(v) if v <= 127 => out.push(v),
            _ => return Err((i + 1, t.to_owned())),
        }
    }
    Ok(out)
}

/// Parses `start end` (seconds) a line into µs; `#` starts a comment. Sorted by start.
/// Errors with (1-based line, text).
pub(crate) fn parse_turns(text: &str) -> Result<Vec<(u64, u64)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.split('#').next().unwrap_or("").trim();
        if t.is_empty() {
            continue;
        }
        let us = |x: &str| {
            x.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0 && *v < 1e6)
                .map(|v| (v * 1e6).round() as u64)
        };
        let mut f = t.split_whitespace();
        match (f.next().and_then(us), f.next().and_then(us), f.next()) {
            (Some(a), Some(b), None) if a <= b => out.push((a, b)),
            _ => return Err((i + 1, t.to_owned())),
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::files::Recordings;
    use crate::recording::{RecPacket, RecorderStats};
    use serde_json::json;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant, UNIX_EPOCH};

    fn packet(feed: u64, ts: u32, arrival: Instant, level: u8) -> RecPacket {
        let mut p = RecPacket {
            feed,
            arrival,
            ts,
            level: Some(level),
            len: 3,
            payload: [0; crate::recording::MAX_PAYLOAD],
        };
        p.payload[..3].copy_from_slice(&[0x78, 1, 2]);
        p
    }

    #[test]
    fn turns_parse_in_seconds_and_reject_garbage() {
        assert_eq!(
            parse_turns("# head\n8.32 10.02\n 6.69 7.12 # hello\n"),
            Ok(vec![(6_690_000, 7_120_000), (8_320_000, 10_020_000)])
        );
        assert_eq!(parse_turns("1 0.5\n"), Err((1, "1 0.5".into())));
        assert_eq!(parse_turns("1\n"), Err((1, "1".into())));
        assert_eq!(parse_turns("1 2 3\n"), Err((1, "1 2 3".into())));
        assert_eq!(parse_turns("-1 2\n"), Err((1, "-1 2".into())));
    }

    #[test]
    fn levels_parse_with_comments_and_reject_garbage() {
        assert_eq!(
            parse_levels("# head\n30\n 127 \n\n0 # loud\n"),
            Ok(vec![30, 127, 0])
        );
        assert_eq!(parse_levels("1\n128\n"), Err((2, "128".into())));
        assert_eq!(parse_levels("x"), Err((1, "x".into())));
    }

    /// What the recorder writes is a corpus this loader reads.
    #[test]
    fn two_sources_share_one_timeline_and_the_scenario_says_who_published_when() {
        let root = std::env::temp_dir().join(format!("chorus-rec-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let stats = Arc::new(RecorderStats::default());
        let mut r = Recordings::new(root.clone(), stats.clone(), Default::default());
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_796_173_323);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let dir = r.start(1, "panel", Some("ana"), t0, wall).unwrap();
        assert_eq!(dir, root.join("panel/20261202T010203Z"));
        for k in 0..100u32 {
            r.packet(&packet(1, k * 960, at(k as u64 * 20), 30));
        }
        // The main source joins 1 s in, sends 10 frames, and stops; ana stops at 3 s.
        assert_eq!(
            r.start(2, "panel", None, at(1000), wall).unwrap(),
            dir,
            "one recording per stream"
        );
        for k in 0..10u32 {
            r.packet(&packet(2, 5 + k * 960, at(1000 + k as u64 * 20), 90));
        }
        r.packet(&packet(9, 0, at(1000), 1));
        assert_eq!(stats.unknown.load(Ordering::Relaxed), 1);
        r.stop(2, at(1300));
        assert_eq!(r.open_streams(), 1);
        r.stop(1, at(3000));
        assert_eq!(r.open_streams(), 0);
        let speakers = load(&dir).unwrap();
        let ids: Vec<&str> = speakers.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["ana", "main"]);
        // Both run from the recording's start to its end: 150 frames of 20 ms.
        for s in &speakers {
            assert_eq!(s.packets.len(), 150, "{}", s.id);
            assert_eq!(s.levels.as_ref().unwrap().len(), 150, "{}", s.id);
        }
        let main = &speakers[1];
        let levels = main.levels.as_ref().unwrap();
        assert_eq!(levels[49], 127);
        assert_eq!(levels[50..60], [90; 10]);
        assert_eq!(levels[60], 127);
        assert_eq!(main.packets[49], vec![0xF8], "a filler before any packet");
        assert_eq!(main.packets[60], vec![0x78], "a filler keeps the last TOC");
        assert_eq!(speakers[0].levels.as_ref().unwrap()[99], 30);
        let sc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("scenario.json")).unwrap())
                .unwrap();
        assert_eq!(sc["duration_s"], 3.0);
        assert_eq!(sc["started_at"], "2026-12-02T01:02:03.000Z");
        assert_eq!(sc["speakers"][0]["published"], json!([[0.0, 3.0]]));
        assert_eq!(sc["speakers"][1]["id"], "main");
        assert_eq!(sc["speakers"][1]["sourceId"], serde_json::Value::Null);
        assert_eq!(sc["speakers"][1]["published"], json!([[1.0, 1.3]]));
        // A new feed after the end opens a new recording beside it.
        let again = r.start(3, "panel", Some("ana"), at(4000), wall).unwrap();
        assert_eq!(again, root.join("panel/20261202T010203Z-2"));
        r.finish_all(at(4100));
        let _ = std::fs::remove_dir_all(&root);
    }
}
