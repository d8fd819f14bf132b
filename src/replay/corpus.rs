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
}
