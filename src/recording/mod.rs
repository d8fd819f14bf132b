//! Recording publications as the corpus `chorus replay` reads (README "### Recording").
//!
//! The origin's media thread does no file I/O: each recorded feed's handler holds a [`RecTap`]
//! that copies every audio packet into a fixed-size [`RecPacket`] and hands it to the one
//! recorder thread over a bounded channel of [`QUEUE`] packets (std's `sync_channel`, whose
//! bounded flavour is crossbeam's preallocated array channel: no allocation per packet). A full
//! queue drops the packet, counts it (`chorus_origin_dropped_total{reason="recording_full"}`)
//! and logs once; the file then has a filler frame in its place. The thread writes
//! `<data-dir>/recordings/<stream>/<start UTC>/` ([`files`]).

pub(crate) mod files;
pub(crate) mod ogg;
pub(crate) mod timeline;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use crate::webhooks::Hooks;
use files::Recordings;

/// Packets queued to the recorder at most: 2048 × ~1.3 KB ≈ 2.7 MB, 4 s of ten sources.
pub(crate) const QUEUE: usize = 2048;
/// The largest payload recorded: one Opus frame's limit (RFC 6716 §3.4, 1275 bytes).
pub(crate) const MAX_PAYLOAD: usize = 1275;
/// How long stopping the origin waits for the recorder to close its files.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// One recorded audio packet, copied off the media thread.
pub(crate) struct RecPacket {
    /// The publication it belongs to.
    pub feed: u64,
    pub arrival: Instant,
    pub ts: u32,
    /// RFC 6464 level, when the packet carried one.
    pub level: Option<u8>,
    pub len: u16,
    pub payload: [u8; MAX_PAYLOAD],
}

// A packet is copied into the channel's preallocated slot whole: boxing it would allocate per
// packet on the media thread.
#[allow(clippy::large_enum_variant)]
enum RecMsg {
    Start {
        feed: u64,
        stream: String,
        source: Option<String>,
        at: Instant,
        wall: SystemTime,
    },
    Packet(RecPacket),
    Stop {
        feed: u64,
        at: Instant,
    },
    Finish(SyncSender<()>),
}

/// The recorder's counters, for /metrics.
#[derive(Debug, Default)]
pub(crate) struct RecorderStats {
    /// Packets dropped: the queue was full.
    pub queue_full: AtomicU64,
    /// Packets dropped: larger than [`MAX_PAYLOAD`].
    pub too_large: AtomicU64,
    /// Packets dropped: their slot was written already (late or duplicate).
    pub late: AtomicU64,
    /// Packets of no open recording (its start was lost).
    pub unknown: AtomicU64,
    /// Writes that failed (that file stops growing).
    pub write_errors: AtomicU64,
    /// Frames written, fillers included.
    pub frames: AtomicU64,
    /// Recordings opened.
    pub recordings: AtomicU64,
}

/// A recording could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    /// The origin has no `--data-dir`.
    #[error("recording needs the origin to run with --data-dir")]
    NoDataDir,
    /// The token does not allow it.
    #[error("this token does not allow recording (record: true)")]
    NotAllowed,
    /// The recorder is behind (its queue is full) or gone.
    #[error("the recorder is not keeping up: not recorded")]
    Busy,
}

/// The recorder thread's handle.
pub(crate) struct Recorder {
    tx: SyncSender<RecMsg>,
    pub stats: Arc<RecorderStats>,
    full_logged: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Recorder {
    /// Starts the recorder thread, writing under `<data_dir>/recordings`; `hooks` hear of each
    /// finished recording (`recording` `ready`).
    pub(crate) fn start(data_dir: &Path, hooks: Hooks) -> std::io::Result<Arc<Recorder>> {
        let root = data_dir.join("recordings");
        std::fs::create_dir_all(&root)?;
        let (tx, rx) = sync_channel(QUEUE);
        let stats = Arc::new(RecorderStats::default());
        let recs = Recordings::new(root.clone(), stats.clone(), hooks);
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || run(recs, rx))?;
        info!(dir = %root.display(), "recorder ready");
        Ok(Arc::new(Recorder {
            tx,
            stats,
            full_logged: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Starts recording feed `feed` of `source` in `stream`: its handler gets the tap. Call
    /// before the feed's first packet can arrive.
    pub(crate) fn tap(
        self: &Arc<Self>,
        feed: u64,
        stream: &str,
        source: Option<&str>,
    ) -> Result<RecTap, RecordError> {
        let msg = RecMsg::Start {
            feed,
            stream: stream.to_owned(),
            source: source.map(str::to_owned),
            at: Instant::now(),
            wall: SystemTime::now(),
        };
        self.tx.try_send(msg).map_err(|_| RecordError::Busy)?;
        Ok(RecTap {
            rec: self.clone(),
            feed,
        })
    }

    /// Closes every open recording (the origin stops) and waits for the thread, a few seconds
    /// at most.
    pub(crate) fn finish(&self) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.tx.send(RecMsg::Finish(done_tx)).is_err() {
            return;
        }
        match done_rx.recv_timeout(FINISH_WAIT) {
            Ok(()) => {
                let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(t) = t {
                    let _ = t.join();
                }
            }
            Err(_) => warn!(
                "recorder did not finish within {FINISH_WAIT:?}: its last pages may be missing"
            ),
        }
    }

    fn drop_full(&self) {
        self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
        if !self.full_logged.swap(true, Ordering::Relaxed) {
            warn!(queue = QUEUE, "recorder queue full: recorded packets dropped (counted in chorus_origin_dropped_total{{reason=\"recording_full\"}}; logged once)");
        }
    }
}

/// A recorded feed's end of the channel, held by its handler on the media thread; dropping it
/// (the feed's peer is gone) stops the feed's recording.
pub(crate) struct RecTap {
    rec: Arc<Recorder>,
    feed: u64,
}

impl RecTap {
    /// Hands one audio packet to the recorder; a full queue drops it (counted).
    pub(crate) fn packet(&self, ts: u32, level: Option<u8>, payload: &[u8]) {
        if payload.len() > MAX_PAYLOAD {
            self.rec.stats.too_large.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut p = RecPacket {
            feed: self.feed,
            arrival: Instant::now(),
            ts,
            level,
            len: payload.len() as u16,
            payload: [0; MAX_PAYLOAD],
        };
        p.payload[..payload.len()].copy_from_slice(payload);
        match self.rec.tx.try_send(RecMsg::Packet(p)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => self.rec.drop_full(),
        }
    }
}

impl Drop for RecTap {
    fn drop(&mut self) {
        let stop = RecMsg::Stop {
            feed: self.feed,
            at: Instant::now(),
        };
        if let Err(TrySendError::Full(_)) = self.rec.tx.try_send(stop) {
            // Its recording then ends with the stream's others, or when the origin stops.
            warn!(
                feed = self.feed,
                "recorder queue full: a feed's stop was lost"
            );
        }
    }
}

fn run(mut recs: Recordings, rx: Receiver<RecMsg>) {
    loop {
        let Ok(msg) = rx.recv() else {
            // Every sender is gone: the origin is gone without finishing.
            recs.finish_all(Instant::now());
            return;
        };
        match msg {
            RecMsg::Start {
                feed,
                stream,
                source,
                at,
                wall,
            } => {
                if let Err(e) = recs.start(feed, &stream, source.as_deref(), at, wall) {
                    error!(stream, source = ?source, error = %e, "recording not started");
                }
            }
            RecMsg::Packet(p) => recs.packet(&p),
            RecMsg::Stop { feed, at } => recs.stop(feed, at),
            RecMsg::Finish(done) => {
                recs.finish_all(Instant::now());
                let _ = done.send(());
                return;
            }
        }
    }
}

/// What a publish asked about recording and what its credential says (Millicast's rule: the
/// publish's `record` decides when present, else the token's default; `record: true` needs a
/// token that allows it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecordAsk {
    /// The publish's `record` (signalling) or `?record=` (WHIP); None when absent.
    pub asked: Option<bool>,
    /// The credential allows recording (JWT `millicast.record`).
    pub allowed: bool,
    /// The credential records when the publish does not say (a token file entry's `record`;
    /// dev mode allows recording but does not record by default).
    pub by_default: bool,
}

impl RecordAsk {
    /// Whether to record, given whether the origin has a recorder (a `--data-dir`). A token's
    /// default with no data dir records nothing (`Ok(false)`; the caller warns).
    pub(crate) fn decide(self, have_recorder: bool) -> Result<bool, RecordError> {
        match self.asked {
            Some(true) if !self.allowed => Err(RecordError::NotAllowed),
            Some(true) if !have_recorder => Err(RecordError::NoDataDir),
            Some(true) => Ok(true),
            Some(false) => Ok(false),
            None => Ok(self.allowed && self.by_default && have_recorder),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_decides_within_what_the_token_allows() {
        let ask = |asked, allowed, by_default| RecordAsk {
            asked,
            allowed,
            by_default,
        };
        assert_eq!(ask(Some(true), true, false).decide(true), Ok(true));
        assert_eq!(
            ask(Some(true), false, false).decide(true),
            Err(RecordError::NotAllowed)
        );
        assert_eq!(
            ask(Some(true), true, false).decide(false),
            Err(RecordError::NoDataDir)
        );
        assert_eq!(ask(Some(false), true, true).decide(true), Ok(false));
        assert_eq!(ask(None, true, true).decide(true), Ok(true));
        assert_eq!(ask(None, true, false).decide(true), Ok(false));
        assert_eq!(ask(None, true, true).decide(false), Ok(false));
        assert_eq!(ask(None, false, true).decide(true), Ok(false));
    }
}
