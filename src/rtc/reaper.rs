//! Frees lean peers' str0m states off the media threads, then gives the freed heap back to the
//! operating system.
//!
//! Why a thread: one str0m state is 80–125 KB in many small allocations, and a wave of joins
//! ends hundreds of [`super::peers::DTLS_GRACE`]s within a second: freed on a media thread, that
//! was a pause in every viewer's audio.
//!
//! Why a trim: glibc keeps what is freed in its arenas, so the process kept the peak of a wave's
//! str0m states as its own memory until later joins reused it. In the load test, 2000 viewers
//! that joined at once held 260 MB of RSS 20 s later; `malloc_trim(0)` brought it to 149 MB (on
//! the running edge, through gdb). So once the reaper has freed states and has nothing queued,
//! it trims, at most once per [`TRIM_EVERY`]: `malloc_trim` hands every arena's whole free pages
//! back (`MADV_DONTNEED`). It takes each arena's lock in turn, which a media thread waits for
//! only if it allocates meanwhile (its packet path does not); and it runs only after joins.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use str0m::Rtc;
use tracing::{debug, warn};

/// str0m states waiting for the reaper thread to free them, at most. Beyond (the reaper is
/// behind), a state is freed where it is, as before.
pub(crate) const REAPER_QUEUE: usize = 4096;

/// The least time between two trims of the heap.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Frees a lean peer's str0m state on the reaper thread (inline if the thread is missing or
/// behind).
pub(crate) fn reap(rtc: Box<Rtc>) {
    static REAPER: OnceLock<Option<SyncSender<Box<Rtc>>>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Box<Rtc>>(REAPER_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("str0m-reaper".into())
            .spawn(move || run(&rx));
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                warn!("no str0m reaper thread ({e}): lean peers' str0m states are freed inline");
                None
            }
        }
    });
    if let Some(tx) = tx {
        if let Err(TrySendError::Full(rtc) | TrySendError::Disconnected(rtc)) = tx.try_send(rtc) {
            drop(rtc);
        }
    }
}

/// The reaper thread: frees what arrives, trims when [`Trims`] says so, ends with the channel.
fn run(rx: &Receiver<Box<Rtc>>) {
    let mut trims = Trims::default();
    loop {
        let got = match trims.wait(Instant::now()) {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(wait) => rx.recv_timeout(wait),
        };
        match got {
            Ok(rtc) => {
                drop(rtc);
                // The rest of the wave first: one trim after it, not one per state.
                let more = rx.try_iter().map(drop).count();
                trims.freed(1 + more);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if let Some(freed) = trims.take_due(Instant::now()) {
            let t = Instant::now();
            let released = release_free_heap();
            debug!(
                freed,
                released,
                took_ms = t.elapsed().as_secs_f64() * 1e3,
                "heap trimmed after freeing str0m states"
            );
        }
    }
}

/// When the reaper trims: after it freed something, once [`TRIM_EVERY`] has passed since the
/// last trim. Time is passed in, for the tests.
#[derive(Debug, Default)]
struct Trims {
    /// States freed since the last trim.
    freed: usize,
    /// When the last trim was (None: never).
    last: Option<Instant>,
}

impl Trims {
    fn freed(&mut self, n: usize) {
        self.freed += n;
    }

    /// How long to wait for the next state before a trim is due; None: no trim is pending,
    /// wait as long as it takes.
    fn wait(&self, now: Instant) -> Option<Duration> {
        if self.freed == 0 {
            return None;
        }
        Some(match self.last {
            Some(last) => (last + TRIM_EVERY).saturating_duration_since(now),
            None => Duration::ZERO,
        })
    }

    /// If a trim is due now: how many states it follows, and the trim is counted as done.
    fn take_due(&mut self, now: Instant) -> Option<usize> {
        if self.wait(now)? > Duration::ZERO {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.freed))
    }
}

/// Hands the allocator's free pages back to the OS; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() -> bool {
    // SAFETY: malloc_trim takes the arenas' own locks; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return memory by their own rules.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_a_wave_of_frees_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut t = Trims::default();
        assert_eq!(
            t.wait(t0),
            None,
            "nothing freed: nothing to trim, wait for work"
        );
        assert_eq!(t.take_due(t0), None);
        t.freed(300);
        assert_eq!(
            t.wait(t0),
            Some(Duration::ZERO),
            "the first trim is due at once"
        );
        assert_eq!(t.take_due(t0), Some(300));
        assert_eq!(t.wait(t0), None, "done: nothing pending");
        // The next wave, 200 ms later, waits for the rest of the second.
        let t1 = t0 + Duration::from_millis(200);
        t.freed(5);
        t.freed(7);
        assert_eq!(t.wait(t1), Some(Duration::from_millis(800)));
        assert_eq!(t.take_due(t1), None);
        let t2 = t0 + TRIM_EVERY;
        assert_eq!(t.take_due(t2), Some(12));
        assert_eq!(t.take_due(t2 + TRIM_EVERY), None, "nothing freed since");
    }
}
