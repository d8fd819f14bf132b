//! What the edge's media threads show the dashboard: each thread's selection groups and the
//! source in each of their tracks. A thread writes its
//! board from its tick, at most every [`BOARD_EVERY_US`] and only while a dashboard watches
//! ([`Boards::watch`]), so nobody watching costs one atomic load per tick and the packet path
//! nothing at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A watched media thread writes its board this often (core clock): well under the dashboard's
/// own period, so a switch reaches the page within about one of those.
pub(crate) const BOARD_EVERY_US: u64 = 100_000;

/// One multiplexed track of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TrackBoard {
    Empty,
    /// The source in it (None: the stream's main source).
    Source(Option<Arc<str>>),
}

/// One selection group: viewers with the same (tracks, main source, excluded, projections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupBoard {
    /// Its id on its media thread (ids are per thread and reused once a group is gone).
    pub id: u32,
    pub viewers: usize,
    /// The source its viewers' main tracks carry (None: the main source).
    pub main: Option<Arc<str>>,
    /// How many sources its viewers exclude.
    pub excluded: usize,
    /// How many of its tracks hold a projected source.
    pub fixed: usize,
    pub tracks: Vec<TrackBoard>,
}

/// One stream on one media thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamBoard {
    pub stream: Arc<str>,
    pub groups: Vec<GroupBoard>,
}

/// Every media thread's last board, and whether anyone is watching.
#[derive(Default)]
pub(crate) struct Boards {
    watched: AtomicBool,
    /// By media thread (the slot [`Boards::slot`] gave it).
    threads: Mutex<Vec<Vec<StreamBoard>>>,
}

impl Boards {
    /// A place for one more media thread's board.
    pub(crate) fn slot(&self) -> usize {
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        t.push(Vec::new());
        t.len() - 1
    }

    /// Whether the media threads should write their boards. When nobody watches any more the
    /// boards are cleared: a watcher that comes later must not read a stale one as the truth.
    pub(crate) fn watch(&self, on: bool) {
        if !self.watched.swap(on, Ordering::Relaxed) || on {
            return;
        }
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        t.iter_mut().for_each(Vec::clear);
    }

    pub(crate) fn watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    pub(crate) fn put(&self, slot: usize, board: Vec<StreamBoard>) {
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = t.get_mut(slot) {
            *b = board;
        }
    }

    /// Every thread's streams with the thread's slot (a stream two threads follow appears
    /// twice, each with its own groups: group ids are per thread).
    pub(crate) fn read(&self) -> Vec<(usize, StreamBoard)> {
        let t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .enumerate()
            .flat_map(|(i, b)| b.iter().map(move |s| (i, s.clone())))
            .collect()
    }
}

impl super::Edge {
    /// The media threads' boards (the dashboard turns them on and reads them).
    pub(crate) fn boards(&self) -> &Boards {
        &self.shared.boards
    }
}
