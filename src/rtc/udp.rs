//! The media threads' socket I/O: batched sends (`sendmmsg`), and one wait for both the socket
//! and the thread's command channel (epoll over the socket and an eventfd doorbell), so relayed
//! media is handled the moment it arrives instead of after a polling sleep.
//!
//! Linux only, like the rest of the media path.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Datagrams handed to the kernel in one `sendmmsg` call.
pub const SEND_BATCH: usize = 64;

/// Wakes a media thread that sleeps in [`Poller::wait`]. Cheap when the thread is awake: one
/// atomic swap, no syscall.
#[derive(Debug)]
pub struct Doorbell {
    fd: RawFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    pub fn new() -> io::Result<Arc<Doorbell>> {
        // SAFETY: plain syscall; the fd is owned by the Doorbell and closed on drop.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Doorbell {
            fd,
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Call after queueing work for the thread.
    pub fn ring(&self) {
        if self.sleeping.swap(false, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN)
            // still leaves the fd readable, which is all a wake needs.
            unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
        }
    }

    /// The thread is about to sleep: from now on a [`ring`](Self::ring) writes the eventfd.
    /// The thread must look for work once more after arming, then wait.
    pub fn arm(&self) {
        self.sleeping.store(true, Ordering::Release);
    }

    pub fn disarm(&self) {
        self.sleeping.store(false, Ordering::Release);
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; nonblocking.
        unsafe { libc::read(self.fd, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

/// Waits until the socket is readable, the doorbell rings, or a timeout passes.
pub struct Poller {
    epfd: RawFd,
    bell: Arc<Doorbell>,
}

const TOKEN_SOCKET: u64 = 1;
const TOKEN_BELL: u64 = 2;

impl Poller {
    pub fn new(socket: &UdpSocket, bell: Arc<Doorbell>) -> io::Result<Poller> {
        // SAFETY: plain syscall; the fd is owned by the Poller and closed on drop.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let poller = Poller { epfd, bell };
        poller.add(socket.as_raw_fd(), TOKEN_SOCKET)?;
        poller.add(poller.bell.fd, TOKEN_BELL)?;
        Ok(poller)
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd and event struct.
        if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sleeps up to `timeout`; the caller armed the doorbell and found no work after arming.
    pub fn wait(&self, timeout: Duration) {
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut events: [libc::epoll_event; 2] = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: the buffer holds 2 events and we pass 2.
        let n = unsafe { libc::epoll_wait(self.epfd, events.as_mut_ptr(), 2, ms) };
        self.bell.disarm();
        for ev in events.iter().take(n.max(0) as usize) {
            if ev.u64 == TOKEN_BELL {
                self.bell.drain();
            }
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.epfd) };
    }
}

/// Outgoing datagrams waiting for one `sendmmsg`, copied into one arena. The vectors keep their
/// capacity, so a steady stream of sends allocates nothing here.
pub struct SendBatch {
    arena: Vec<u8>,
    /// (destination, start in the arena, length)
    pending: Vec<(SocketAddr, usize, usize)>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    pub sent: u64,
    pub errors: u64,
    pub syscalls: u64,
}

/// Arena bytes reserved per batched datagram (an MTU-sized packet fits).
const SLOT: usize = 1500;

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            arena: Vec::with_capacity(SEND_BATCH * SLOT),
            pending: Vec::with_capacity(SEND_BATCH),
            addrs: Vec::with_capacity(SEND_BATCH),
            iovs: Vec::with_capacity(SEND_BATCH),
            msgs: Vec::with_capacity(SEND_BATCH),
            sent: 0,
            errors: 0,
            syscalls: 0,
        }
    }
}

impl SendBatch {
    /// Queues a datagram; sends the batch when it is full.
    pub fn push(&mut self, socket: &UdpSocket, to: SocketAddr, data: &[u8]) {
        if self.arena.len() + data.len() > self.arena.capacity() && !self.pending.is_empty() {
            self.flush(socket);
        }
        let start = self.arena.len();
        self.arena.extend_from_slice(data);
        self.pending.push((to, start, data.len()));
        if self.pending.len() >= SEND_BATCH {
            self.flush(socket);
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Drops what is queued without sending it.
    pub fn discard(&mut self) {
        self.pending.clear();
        self.arena.clear();
    }

    /// Sends everything queued. A datagram the kernel refuses (full buffer, unreachable) is
    /// counted and dropped, like a lost packet: it never stalls the others.
    pub fn flush(&mut self, socket: &UdpSocket) {
        if self.pending.is_empty() {
            return;
        }
        self.addrs.clear();
        self.iovs.clear();
        self.msgs.clear();
        for &(to, start, len) in &self.pending {
            self.addrs.push(sockaddr(&to));
            self.iovs.push(libc::iovec {
                iov_base: self.arena[start..].as_mut_ptr() as *mut libc::c_void,
                iov_len: len,
            });
        }
        for i in 0..self.pending.len() {
            // SAFETY: an all-zero msghdr is valid; the pointers set below stay alive (and the
            // vectors unmoved) until sendmmsg returns.
            let mut m: libc::mmsghdr = unsafe { zeroed() };
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = addr_len(&self.pending[i].0);
            m.msg_hdr.msg_iov = &mut self.iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        let fd = socket.as_raw_fd();
        let mut off = 0;
        while off < self.msgs.len() {
            let left = (self.msgs.len() - off) as libc::c_uint;
            // SAFETY: msgs[off..] are initialised mmsghdrs pointing into live buffers.
            let n = unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr().add(off), left, 0) };
            self.syscalls += 1;
            if n <= 0 {
                // The first datagram of the rest failed: drop it and go on with the others.
                self.errors += 1;
                off += 1;
            } else {
                self.sent += n as u64;
                off += n as usize;
            }
        }
        self.pending.clear();
        self.arena.clear();
        self.iovs.clear();
        self.msgs.clear();
    }
}

// SAFETY: `iovs` and `msgs` hold raw pointers only inside `flush`, and are empty outside it; the
// rest is owned data.
unsafe impl Send for SendBatch {}

fn sockaddr(a: &SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage, then one of the two variants is written.
    let mut s: libc::sockaddr_storage = unsafe { zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    s
}

fn addr_len(a: &SocketAddr) -> libc::socklen_t {
    (match a {
        SocketAddr::V4(_) => size_of::<libc::sockaddr_in>(),
        SocketAddr::V6(_) => size_of::<libc::sockaddr_in6>(),
    }) as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn batch_reaches_every_destination_in_order() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let six = UdpSocket::bind("[::1]:0");
        let mut batch = SendBatch::default();
        for i in 0..(SEND_BATCH + 6) {
            let to = rx[i % 3].local_addr().unwrap();
            batch.push(&tx, to, &vec![i as u8; 10 + i]);
        }
        assert_eq!(batch.len(), 6, "a full batch went out by itself");
        batch.flush(&tx);
        assert_eq!(batch.sent, SEND_BATCH as u64 + 6);
        assert_eq!(batch.syscalls, 2);
        for (r, sock) in rx.iter().enumerate() {
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 256];
            for i in (r..SEND_BATCH + 6).step_by(3) {
                let n = sock.recv(&mut buf).unwrap();
                assert_eq!(n, 10 + i);
                assert_eq!(buf[0], i as u8);
            }
        }
        // IPv6 loopback, where the machine has it.
        if let Ok(s6) = six {
            let tx6 = UdpSocket::bind("[::1]:0").unwrap();
            batch.push(&tx6, s6.local_addr().unwrap(), &[7u8; 5]);
            batch.flush(&tx6);
            s6.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 16];
            assert_eq!(s6.recv(&mut buf).unwrap(), 5);
        }
    }

    #[test]
    fn a_refused_datagram_is_counted_and_the_rest_still_go() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = SendBatch::default();
        // An IPv6 destination on an IPv4 socket fails with EAFNOSUPPORT.
        batch.push(&tx, "[::1]:9".parse().unwrap(), &[1u8; 4]);
        batch.push(&tx, rx.local_addr().unwrap(), &[2u8; 4]);
        batch.flush(&tx);
        assert_eq!((batch.errors, batch.sent), (1, 1));
        rx.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(rx.recv(&mut buf).unwrap(), 4);
        assert_eq!(buf[0], 2);
    }

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
