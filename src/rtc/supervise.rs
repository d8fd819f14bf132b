//! Media threads are supervised: a panic on one (ours or str0m's) ends the process loudly
//! instead of leaving its peers silent while HTTP still answers, and each thread bumps a
//! heartbeat every loop so `/healthz` can tell a stuck thread (503, with its name).
//!
//! Restarting a thread in place is not done: its peers' DTLS and SRTP state died with it, so the
//! clients must reconnect anyway, and a process supervisor (systemd, Kubernetes) restarting the
//! whole process is the one restart path that is tested.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::error;

/// A media thread whose heartbeat is older than this makes `/healthz` answer 503. Its loop wakes
/// at least every 10 ms (the edge's selection tick, the origin's command wait), so this is two
/// hundred missed loops: a stuck thread, not a slow one.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(2);

/// The process exit status after a media thread panicked (EX_SOFTWARE).
pub(crate) const EXIT_MEDIA_PANIC: i32 = 70;

/// Value of a heartbeat whose thread has ended by itself (its control plane went away).
const RETIRED: u64 = u64::MAX;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// One media thread's liveness.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    name: String,
    last_ms: AtomicU64,
    #[cfg(debug_assertions)]
    fault: Option<test_fault::Fault>,
}

impl Heartbeat {
    /// Called once per loop of the thread.
    pub(crate) fn beat(&self) {
        let now = now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        #[cfg(debug_assertions)]
        if let Some(f) = &self.fault {
            f.maybe_fire(&self.name, now);
        }
    }
}

fn registry() -> &'static Mutex<Vec<Arc<Heartbeat>>> {
    static REG: Mutex<Vec<Arc<Heartbeat>>> = Mutex::new(Vec::new());
    &REG
}

/// Media threads silent for longer than [`STALL_AFTER`]: (thread name, time since its last beat).
pub(crate) fn stale() -> Vec<(String, Duration)> {
    let now = now_ms();
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.iter()
        .filter_map(|h| {
            let last = h.last_ms.load(Ordering::Relaxed);
            let silent = Duration::from_millis(now.saturating_sub(last));
            (last != RETIRED && silent > STALL_AFTER).then(|| (h.name.clone(), silent))
        })
        .collect()
}

/// Starts a media thread named `name` running `body` with its heartbeat. If `body` panics, the
/// panic is logged with the thread's name and the process exits with [`EXIT_MEDIA_PANIC`]: every
/// peer of that thread has lost its media, and a process that keeps answering HTTP would hide it.
pub(crate) fn spawn_media<F>(name: String, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce(Arc<Heartbeat>) + Send + 'static,
{
    let hb = Arc::new(Heartbeat {
        last_ms: AtomicU64::new(now_ms()),
        #[cfg(debug_assertions)]
        fault: test_fault::Fault::from_env(&name),
        name: name.clone(),
    });
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(hb.clone());
    thread::Builder::new().name(name.clone()).spawn(move || {
        let result = catch_unwind(AssertUnwindSafe(|| body(hb.clone())));
        match result {
            Ok(()) => hb.last_ms.store(RETIRED, Ordering::Relaxed),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                error!(thread = name.as_str(), "media thread panicked: {msg}; its peers have no media: exiting");
                eprintln!("chorus: media thread {name} panicked: {msg}; exiting with status {EXIT_MEDIA_PANIC}");
                std::process::exit(EXIT_MEDIA_PANIC);
            }
        }
    })
}

/// Faults a test can inject into a debug build's media threads, never compiled into release:
/// `CHORUS_TEST_PANIC_MEDIA_AFTER_MS=N` panics a media thread N ms after it started, and
/// `CHORUS_TEST_STALL_MEDIA_AFTER_MS=N` makes it sleep 10 s once, N ms after it started.
/// `CHORUS_TEST_FAULT_MEDIA_THREAD=NAME` limits the fault to the thread of that name.
#[cfg(debug_assertions)]
mod test_fault {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[derive(Debug)]
    pub(super) struct Fault {
        at_ms: u64,
        panic: bool,
        fired: AtomicBool,
    }

    impl Fault {
        pub(super) fn from_env(thread: &str) -> Option<Fault> {
            let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
            if let Ok(only) = std::env::var("CHORUS_TEST_FAULT_MEDIA_THREAD") {
                if only != thread {
                    return None;
                }
            }
            let start = super::now_ms();
            if let Some(ms) = var("CHORUS_TEST_PANIC_MEDIA_AFTER_MS") {
                return Some(Fault {
                    at_ms: start + ms,
                    panic: true,
                    fired: AtomicBool::new(false),
                });
            }
            var("CHORUS_TEST_STALL_MEDIA_AFTER_MS").map(|ms| Fault {
                at_ms: start + ms,
                panic: false,
                fired: AtomicBool::new(false),
            })
        }

        pub(super) fn maybe_fire(&self, thread: &str, now_ms: u64) {
            if now_ms < self.at_ms || self.fired.swap(true, Ordering::Relaxed) {
                return;
            }
            if self.panic {
                panic!("test fault: CHORUS_TEST_PANIC_MEDIA_AFTER_MS on {thread}");
            }
            tracing::warn!(
                thread,
                "test fault: CHORUS_TEST_STALL_MEDIA_AFTER_MS: stalling 10 s"
            );
            std::thread::sleep(Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_stops_beating_is_stale_and_one_that_ended_is_not() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let h = spawn_media("test-stuck".into(), move |hb| {
            hb.beat();
            let _ = rx.recv();
        })
        .unwrap();
        let stuck = |s: &[(String, Duration)]| s.iter().any(|(n, _)| n == "test-stuck");
        assert!(!stuck(&stale()));
        thread::sleep(STALL_AFTER + Duration::from_millis(300));
        assert!(stuck(&stale()), "no beat for {STALL_AFTER:?}: stale");
        tx.send(()).unwrap();
        h.join().unwrap();
        assert!(
            !stuck(&stale()),
            "a thread that returned is retired, not stale"
        );
    }
}
