//! The recorder thread's state: each stream's open recording, its files and its scenario.
//!
//! `<root>/<stream>/<start, UTC>/` holds `<id>.opus`, `<id>.levels` and `scenario.json`; a
//! stream's recording starts with its first recorded feed and ends when its last one stops (or
//! the origin stops). Pages are written out as they fill (about a second each) and the scenario
//! is rewritten at every start and stop, so a crash leaves readable files up to about a second
//! before it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tracing::{info, warn};

use super::ogg::OggWriter;
use super::timeline::{Place, Timeline, SLOT_US};
use super::{RecPacket, RecorderStats};
use crate::media::opus;
use crate::webhooks::Hooks;

/// The file stem of the stream's main source (published with no sourceId).
pub(crate) const MAIN_SOURCE_STEM: &str = "main";
/// The TOC byte of filler frames before a source's first packet: CELT fullband 20 ms, mono.
const DEFAULT_TOC: u8 = 0xF8;
/// The level of a filler frame, or of a packet without one: silence.
const SILENT_LEVEL: u8 = 127;

/// A recording that could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("cannot create {path}: {err}", path = .0.display(), err = .1)]
    Create(PathBuf, std::io::Error),
}

struct SourceFile {
    source_id: Option<String>,
    /// None once a write failed: the file keeps what was written before.
    opus: Option<File>,
    levels: Option<BufWriter<File>>,
    levels_path: PathBuf,
    ogg: Option<OggWriter>,
    timeline: Timeline,
    /// The last packet's TOC byte (code bits cleared): fillers keep its mode and frame size.
    toc: u8,
    any_level: bool,
    /// (start, stop) offsets in seconds of each of its publications.
    published: Vec<(f64, Option<f64>)>,
}

struct Recording {
    dir: PathBuf,
    started: Instant,
    started_unix_ms: u64,
    files: BTreeMap<String, SourceFile>,
    live_feeds: usize,
}

/// Every open recording, by stream.
pub(crate) struct Recordings {
    root: PathBuf,
    open: HashMap<String, Recording>,
    /// Live feed (publication id) → (stream, file stem).
    feeds: HashMap<u64, (String, String)>,
    stats: Arc<RecorderStats>,
    page: Vec<u8>,
    /// Told `recording` `ready` when a recording's files are final.
    hooks: Hooks,
}

impl Recordings {
    pub(crate) fn new(root: PathBuf, stats: Arc<RecorderStats>, hooks: Hooks) -> Recordings {
        Recordings {
            root,
            open: HashMap::new(),
            feeds: HashMap::new(),
            stats,
            hooks,
            page: Vec::with_capacity(16 * 1024),
        }
    }

    /// Streams with a recording open.
    #[cfg(test)]
    pub(crate) fn open_streams(&self) -> usize {
        self.open.len()
    }

    /// A recorded feed of `source` in `stream` starts at `at` (`wall` the same instant).
    pub(crate) fn start(
        &mut self,
        feed: u64,
        stream: &str,
        source: Option<&str>,
        at: Instant,
        wall: SystemTime,
    ) -> Result<PathBuf, OpenError> {
        if !self.open.contains_key(stream) {
            let unix_ms = wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let base = self.root.join(file_stem(stream));
            let dir = fresh_dir(&base, &utc_stamp(unix_ms / 1000))?;
            self.stats.recordings.fetch_add(1, Ordering::Relaxed);
            info!(stream, dir = %dir.display(), "recording started");
            self.open.insert(
                stream.to_owned(),
                Recording {
                    dir,
                    started: at,
                    started_unix_ms: unix_ms,
                    files: BTreeMap::new(),
                    live_feeds: 0,
                },
            );
        }
        let rec = self.open.get_mut(stream).expect("inserted above");
        let stem = source.map_or_else(|| MAIN_SOURCE_STEM.to_owned(), file_stem);
        let offset = at.saturating_duration_since(rec.started).as_secs_f64();
        if !rec.files.contains_key(&stem) {
            let f = open_source(&rec.dir, &stem, source, &mut self.page)?;
            rec.files.insert(stem.clone(), f);
        }
        let f = rec.files.get_mut(&stem).expect("inserted above");
        f.published.push((offset, None));
        rec.live_feeds += 1;
        write_scenario(stream, rec, None);
        self.feeds.insert(feed, (stream.to_owned(), stem));
        Ok(rec.dir.clone())
    }

    /// One packet of a recorded feed.
    pub(crate) fn packet(&mut self, p: &RecPacket) {
        let Some((stream, stem)) = self.feeds.get(&p.feed) else {
            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(rec) = self.open.get_mut(stream) else {
            return;
        };
        let at_us = p.arrival.saturating_duration_since(rec.started).as_micros() as u64;
        let Some(f) = rec.files.get_mut(stem) else {
            return;
        };
        let fill = match f.timeline.place(p.feed, p.ts, at_us) {
            Place::Write { fill } => fill,
            Place::Late => {
                self.stats.late.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let payload = &p.payload[..p.len as usize];
        write_fillers(f, fill, &mut self.page);
        if let Some(&toc) = payload.first() {
            f.toc = toc & 0xFC;
        }
        let samples = opus::packet_info(payload).map_or(opus::SILENCE_SAMPLES, |i| i.samples);
        f.any_level |= p.level.is_some();
        write_frame(
            f,
            payload,
            samples,
            p.level.unwrap_or(SILENT_LEVEL),
            &mut self.page,
        );
        self.stats.frames.fetch_add(1 + fill, Ordering::Relaxed);
        self.write_out(stream.clone(), stem.clone());
    }

    /// Writes the pages the last frames completed (and the levels with them).
    fn write_out(&mut self, stream: String, stem: String) {
        if self.page.is_empty() {
            return;
        }
        let Some(f) = self
            .open
            .get_mut(&stream)
            .and_then(|r| r.files.get_mut(&stem))
        else {
            self.page.clear();
            return;
        };
        write_page(f, &mut self.page, &self.stats);
    }

    /// A recorded feed stopped at `at`; its stream's recording ends with its last feed.
    pub(crate) fn stop(&mut self, feed: u64, at: Instant) {
        let Some((stream, stem)) = self.feeds.remove(&feed) else {
            return;
        };
        let Some(rec) = self.open.get_mut(&stream) else {
            return;
        };
        let offset = at.saturating_duration_since(rec.started).as_secs_f64();
        if let Some(f) = rec.files.get_mut(&stem) {
            if let Some(p) = f.published.iter_mut().rev().find(|p| p.1.is_none()) {
                p.1 = Some(offset);
            }
            // What it sent so far is on disk now.
            if let Some(ogg) = f.ogg.as_mut() {
                ogg.flush(&mut self.page);
            }
            write_page(f, &mut self.page, &self.stats);
        }
        rec.live_feeds = rec.live_feeds.saturating_sub(1);
        if rec.live_feeds == 0 {
            let rec = self.open.remove(&stream).expect("present");
            self.feeds.retain(|_, (s, _)| *s != stream);
            let ready = finish(&stream, rec, at, &mut self.page, &self.stats);
            self.hooks.emit("recording", "ready", ready);
        } else {
            write_scenario(&stream, rec, None);
        }
    }

    /// Ends every open recording at `at` (the origin stops).
    pub(crate) fn finish_all(&mut self, at: Instant) {
        self.feeds.clear();
        for (stream, mut rec) in self.open.drain() {
            let offset = at.saturating_duration_since(rec.started).as_secs_f64();
            for f in rec.files.values_mut() {
                for p in f.published.iter_mut().filter(|p| p.1.is_none()) {
                    p.1 = Some(offset);
                }
            }
            let ready = finish(&stream, rec, at, &mut self.page, &self.stats);
            self.hooks.emit("recording", "ready", ready);
        }
    }
}

fn open_source(
    dir: &Path,
    stem: &str,
    source: Option<&str>,
    page: &mut Vec<u8>,
) -> Result<SourceFile, OpenError> {
    let create = |p: PathBuf| File::create(&p).map_err(|e| OpenError::Create(p, e));
    let opus_path = dir.join(format!("{stem}.opus"));
    let mut opus = create(opus_path.clone())?;
    let levels_path = dir.join(format!("{stem}.levels"));
    let levels = create(levels_path.clone())?;
    page.clear();
    let ogg = OggWriter::new(page);
    opus.write_all(page)
        .map_err(|e| OpenError::Create(opus_path, e))?;
    page.clear();
    Ok(SourceFile {
        source_id: source.map(str::to_owned),
        opus: Some(opus),
        levels: Some(BufWriter::new(levels)),
        levels_path,
        ogg: Some(ogg),
        timeline: Timeline::default(),
        toc: DEFAULT_TOC,
        any_level: false,
        published: Vec::new(),
    })
}

fn write_fillers(f: &mut SourceFile, n: u64, page: &mut Vec<u8>) {
    // A TOC byte alone is a zero-length frame: decoders conceal it (RFC 6716 §3.2.1), what
    // they do for DTX and loss anyway.
    let filler = [f.toc];
    for _ in 0..n {
        write_frame(f, &filler, opus::SILENCE_SAMPLES, SILENT_LEVEL, page);
    }
}

fn write_frame(f: &mut SourceFile, packet: &[u8], samples: u32, level: u8, page: &mut Vec<u8>) {
    if let Some(ogg) = f.ogg.as_mut() {
        ogg.push(packet, samples, page);
    }
    if let Some(l) = f.levels.as_mut() {
        if writeln!(l, "{level}").is_err() {
            f.levels = None;
        }
    }
}

/// Writes out `page` (whole Ogg pages) and the levels buffered with them.
fn write_page(f: &mut SourceFile, page: &mut Vec<u8>, stats: &RecorderStats) {
    let mut failed = None;
    if let Some(file) = f.opus.as_mut() {
        if !page.is_empty() {
            if let Err(e) = file.write_all(page) {
                failed = Some(e);
            }
        }
    }
    page.clear();
    if let Some(l) = f.levels.as_mut() {
        if let Err(e) = l.flush() {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        stats.write_errors.fetch_add(1, Ordering::Relaxed);
        warn!(file = %f.levels_path.with_extension("opus").display(), error = %e, "recording write failed: this file keeps what it had");
        f.opus = None;
        f.levels = None;
        f.ogg = None;
    }
}

/// Ends one recording at `at`: every file filled to the end and closed, the scenario final.
/// Returns the `recording` `ready` webhook's data: where it is and what it holds.
fn finish(
    stream: &str,
    mut rec: Recording,
    at: Instant,
    page: &mut Vec<u8>,
    stats: &RecorderStats,
) -> serde_json::Value {
    let end_us = at.saturating_duration_since(rec.started).as_micros() as u64;
    for f in rec.files.values_mut() {
        let n = f.timeline.fill_to(end_us);
        write_fillers(f, n, page);
        if let Some(ogg) = f.ogg.take() {
            ogg.finish(page);
        }
        write_page(f, page, stats);
        f.levels = None;
        f.opus = None;
        // A source that never sent a level (a WHIP client without RFC 6464) has no levels
        // file: replay it with --no-levels, as the edge ranked it.
        if !f.any_level {
            let _ = std::fs::remove_file(&f.levels_path);
        }
    }
    let duration = end_us as f64 / 1e6;
    write_scenario(stream, &rec, Some(duration));
    info!(stream, dir = %rec.dir.display(), duration_s = duration, sources = rec.files.len(), "recording finished");
    json!({
        "streamName": stream,
        "path": rec.dir.display().to_string(),
        "startedAt": utc_rfc3339_ms(rec.started_unix_ms),
        "durationS": (duration * 1000.0).round() / 1000.0,
        "sources": rec.files.values().map(|f| f.source_id.clone()).collect::<Vec<_>>(),
    })
}

/// Writes `scenario.json` whole (to a temporary name, then renamed over the old one).
fn write_scenario(stream: &str, rec: &Recording, duration_s: Option<f64>) {
    let round = |s: f64| (s * 1000.0).round() / 1000.0;
    let speakers: Vec<_> = rec
        .files
        .iter()
        .map(|(stem, f)| {
            json!({
                "id": stem,
                "sourceId": f.source_id,
                "published": f.published.iter().map(|(a, b)| json!([round(*a), b.map(round)])).collect::<Vec<_>>(),
                "frames": f.timeline.slots(),
            })
        })
        .collect();
    let doc = json!({
        "stream": stream,
        "started_at": utc_rfc3339_ms(rec.started_unix_ms),
        "started_unix_ms": rec.started_unix_ms,
        "duration_s": duration_s.map(round),
        "frame_ms": SLOT_US / 1000,
        "note": "Recorded by chorus: each speaker's published intervals are [start, stop] seconds from started_at (stop null: live, or cut off by a crash).",
        "speakers": speakers,
    });
    let tmp = rec.dir.join("scenario.json.tmp");
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    let res = std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, rec.dir.join("scenario.json")));
    if let Err(e) = res {
        warn!(dir = %rec.dir.display(), error = %e, "recording scenario.json not written");
    }
}

/// A name usable as one path component: characters outside `[A-Za-z0-9._-]` become `_`, and
/// a name of dots only is prefixed (it would name a directory above).
pub(crate) fn file_stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("_{s}")
    } else {
        s
    }
}

/// `base/stamp`, or `base/stamp-2`... when taken (two recordings started within one second).
fn fresh_dir(base: &Path, stamp: &str) -> Result<PathBuf, OpenError> {
    std::fs::create_dir_all(base).map_err(|e| OpenError::Create(base.into(), e))?;
    for n in 1..1000 {
        let name = if n == 1 {
            stamp.to_owned()
        } else {
            format!("{stamp}-{n}")
        };
        let dir = base.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(OpenError::Create(dir, e)),
        }
    }
    Err(OpenError::Create(
        base.join(stamp),
        std::io::Error::other("1000 recordings started within one second"),
    ))
}

/// (year, month, day) of a day count since 1970-01-01 (Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn utc_parts(unix_s: u64) -> (i64, u32, u32, u64, u64, u64) {
    let (y, m, d) = civil((unix_s / 86_400) as i64);
    let s = unix_s % 86_400;
    (y, m, d, s / 3600, s / 60 % 60, s % 60)
}

/// `20261202T010203Z`: a directory name that sorts by time.
pub(crate) fn utc_stamp(unix_s: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(unix_s);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `2026-12-02T01:02:03.456Z`.
pub(crate) fn utc_rfc3339_ms(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(unix_ms / 1000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dates() {
        assert_eq!(file_stem("ana"), "ana");
        assert_eq!(file_stem("../x y"), ".._x_y");
        assert_eq!(file_stem(".."), "_..");
        assert_eq!(file_stem(""), "_");
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2026-12-02T01:02:03Z
        assert_eq!(utc_stamp(1_796_173_323), "20261202T010203Z");
        assert_eq!(utc_rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }
}
