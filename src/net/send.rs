//! Batched sends (`sendmmsg`): [`SendBatch`] copies each datagram into one arena as it is
//! queued (the media threads: str0m's transmits and the sealed audio); [`SlotBatch`] is a fixed
//! set of slots the caller fills in place and sends again (the floor benchmark).

use std::io;
use std::mem::zeroed;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use super::addr::{addr_len, sockaddr, std_to_sockaddr};

/// Datagrams handed to the kernel in one `sendmmsg` call.
pub const SEND_BATCH: usize = 64;

/// Outgoing datagrams waiting for one `sendmmsg`, copied into one arena. The vectors keep their
/// capacity, so a steady stream of sends allocates nothing here.
pub struct SendBatch {
    arena: Vec<u8>,
    /// (destination, start in the arena, length)
    pending: Vec<(SocketAddr, usize, usize)>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams the kernel refused (dropped, not retried).
    pub errors: u64,
    /// `sendmmsg` calls made.
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

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is queued.
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

/// Preallocated `sendmmsg` state: sends `bufs[i][..lens[i]]` to `dests[i]`.
pub(crate) struct SlotBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub dests: Vec<SocketAddr>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
}

// SAFETY: the raw pointers only ever point into this struct's own buffers during a call.
unsafe impl Send for SlotBatch {}

impl SlotBatch {
    pub(crate) fn new(slots: usize, slot_bytes: usize, dest: SocketAddr) -> SlotBatch {
        SlotBatch {
            bufs: vec![vec![0u8; slot_bytes]; slots],
            lens: vec![0; slots],
            dests: vec![dest; slots],
            // SAFETY: all-zero is a valid mmsghdr / sockaddr_storage.
            hdrs: vec![unsafe { zeroed() }; slots],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                slots
            ],
            names: vec![unsafe { zeroed() }; slots],
        }
    }

    /// Sends the first `n` slots with as few `sendmmsg` calls as it takes. A datagram the
    /// kernel refuses (full buffer, ICMP error) is dropped, not retried.
    pub(crate) fn send(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        send_batch(
            fd,
            &mut self.hdrs,
            &mut self.iovs,
            &mut self.names,
            &self.bufs,
            &self.lens,
            &self.dests,
            n,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn send_batch(
    fd: RawFd,
    hdrs: &mut [libc::mmsghdr],
    iovs: &mut [libc::iovec],
    names: &mut [libc::sockaddr_storage],
    bufs: &[Vec<u8>],
    lens: &[usize],
    dests: &[SocketAddr],
    n: usize,
) -> io::Result<usize> {
    let n = n.min(hdrs.len()).min(dests.len()).min(bufs.len());
    for i in 0..n {
        let len = std_to_sockaddr(dests[i], &mut names[i]);
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_ptr() as *mut libc::c_void,
            iov_len: lens[i].min(bufs[i].len()),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = len;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
    }
    let mut sent = 0;
    while sent < n {
        // SAFETY: headers [sent..n] point to live buffers for the call's duration.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[sent..n].as_mut_ptr(),
                (n - sent) as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // A full send buffer (or a refused port) drops this packet only.
                io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused => {
                    sent += 1;
                    continue;
                }
                _ => return Err(e),
            }
        }
        sent += r as usize;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
