//! A speech corpus on disk: `<id>.opus` (Ogg Opus, sourceId = file stem) and, optionally,
//! `<id>.levels` (one RFC 6464 level per 20 ms frame, `#` comments).

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
            Ok(Speaker {
                id,
                packets: ogg.packets,
                levels,
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

#[cfg(test)]
mod tests {
    use super::*;

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
