//! Waiting for work on a thread that owns sockets: epoll over the sockets, and an eventfd
//! another thread writes to wake the wait. The media threads wait on one socket and a
//! [`Doorbell`] (a ring costs nothing while the thread is awake); the load generator on many
//! sockets and a plain [`EventFd`].

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::check;

/// Wakes a media thread that sleeps in [`Poller::wait`]. Cheap when the thread is awake: one
/// atomic swap, no syscall.
#[derive(Debug)]
pub(crate) struct Doorbell {
    fd: EventFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    pub(crate) fn new() -> io::Result<Arc<Doorbell>> {
        Ok(Arc::new(Doorbell {
            fd: EventFd::new()?,
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Call after queueing work for the thread.
    pub(crate) fn ring(&self) {
        if self.sleeping.swap(false, Ordering::AcqRel) {
            self.fd.wake();
        }
    }

    /// The thread is about to sleep: from now on a [`ring`](Self::ring) writes the eventfd.
    /// The thread must look for work once more after arming, then wait.
    pub(crate) fn arm(&self) {
        self.sleeping.store(true, Ordering::Release);
    }

    pub(crate) fn disarm(&self) {
        self.sleeping.store(false, Ordering::Release);
    }
}

/// Waits until the socket is readable, the doorbell rings, or a timeout passes.
pub(crate) struct Poller {
    epoll: Epoll,
    bell: Arc<Doorbell>,
}

const TOKEN_SOCKET: u64 = 1;
const TOKEN_BELL: u64 = 2;
/// Another epoll (a media thread's ICE-TCP connections, see `crate::rtc::tcp`).
const TOKEN_INNER: u64 = 3;

impl Poller {
    pub(crate) fn new(socket: &UdpSocket, bell: Arc<Doorbell>) -> io::Result<Poller> {
        let epoll = Epoll::new(2)?;
        epoll.add(socket.as_raw_fd(), TOKEN_SOCKET)?;
        epoll.add(bell.fd.fd(), TOKEN_BELL)?;
        Ok(Poller { epoll, bell })
    }

    /// Also wakes when `inner` has ready events ([`wait`](Self::wait) then says so).
    pub(crate) fn add_inner(&self, inner: &Epoll) -> io::Result<()> {
        self.epoll.add(inner.fd, TOKEN_INNER)
    }

    /// Sleeps up to `timeout` (whole milliseconds, rounded up); the caller armed the doorbell
    /// and found no work after arming. True if the inner epoll has events.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut events: [libc::epoll_event; 3] = [libc::epoll_event { events: 0, u64: 0 }; 3];
        // SAFETY: the buffer holds 3 events and we pass 3.
        let n = unsafe { libc::epoll_wait(self.epoll.fd, events.as_mut_ptr(), 3, ms) };
        self.bell.disarm();
        let mut inner = false;
        for ev in events.iter().take(n.max(0) as usize) {
            match ev.u64 {
                TOKEN_BELL => self.bell.fd.drain(),
                TOKEN_INNER => inner = true,
                _ => {}
            }
        }
        inner
    }
}

/// An epoll instance (level-triggered, readable events only).
pub(crate) struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
    /// The kernel lacks epoll_pwait2.
    no_pwait2: bool,
}

impl Epoll {
    pub(crate) fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            no_pwait2: false,
        })
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev lives across the call.
        check(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    /// Readable events, and writable ones too when `writable` (a socket with output waiting).
    pub(crate) fn set(&self, fd: RawFd, token: u64, writable: bool) -> io::Result<()> {
        let mut events = libc::EPOLLIN as u32;
        if writable {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev lives across the call.
        check(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_MOD, fd, &mut ev) }).map(drop)
    }

    pub(crate) fn remove(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: ev lives across the call.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits up to `timeout` and returns the ready tokens: microsecond precision with
    /// epoll_pwait2 (Linux 5.11+), whole milliseconds (rounded up) without it.
    pub(crate) fn wait(&mut self, timeout: Duration) -> io::Result<impl Iterator<Item = u64> + '_> {
        let ptr = self.events.as_mut_ptr();
        let len = self.events.len() as libc::c_int;
        let mut n = -1;
        if !self.no_pwait2 {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: the events buffer is valid for `len` entries; no signal mask. A raw
            // syscall, so an older libc without the wrapper still links.
            n = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.fd,
                    ptr,
                    len,
                    &ts as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    8usize,
                )
            } as libc::c_int;
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                self.no_pwait2 = true;
            }
        }
        if self.no_pwait2 {
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: the events buffer is valid for `len` entries.
            n = unsafe { libc::epoll_wait(self.fd, ptr, len, ms) };
        }
        let n = match check(n) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        Ok(self.events[..n].iter().map(|e| e.u64))
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

/// An eventfd another thread writes to wake an epoll wait.
#[derive(Debug)]
pub(crate) struct EventFd(RawFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        Ok(EventFd(fd))
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0
    }

    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN) still leaves the fd
        // readable, which is all a wake needs.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }

    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn doorbell_wakes_a_sleeping_poller_and_costs_nothing_when_awake() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let bell = Doorbell::new().unwrap();
        let poller = Poller::new(&sock, bell.clone()).unwrap();
        // Not armed: ringing writes nothing, so a wait sleeps its whole timeout.
        bell.ring();
        let t = Instant::now();
        poller.wait(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(25));
        // Armed, then rung from another thread: the wait ends early.
        bell.arm();
        let b2 = bell.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b2.ring();
        });
        let t = Instant::now();
        poller.wait(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
        h.join().unwrap();
        // A datagram on the socket wakes it too.
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        other.send_to(b"x", sock.local_addr().unwrap()).unwrap();
        let t = Instant::now();
        poller.wait(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
