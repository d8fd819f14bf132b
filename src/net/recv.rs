//! Batched receives (`recvmmsg`) with kernel receive timestamps, into preallocated slots:
//! nothing is allocated per datagram.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::addr::sockaddr_to_std;
use super::sockopt::SO_TIMESTAMPNS;

const SCM_TIMESTAMPNS: libc::c_int = SO_TIMESTAMPNS;

/// Wall clock in nanoseconds since the Unix epoch (CLOCK_REALTIME, the clock of the kernel's
/// receive timestamps).
pub(crate) fn realtime_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Room for one SCM_TIMESTAMPNS control message.
const CMSG_SPACE: usize = 64;
pub(crate) const SLOT_BYTES: usize = 2048;

/// Preallocated buffers for `recvmmsg`: nothing is allocated per datagram.
pub(crate) struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; CMSG_SPACE / 8]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    n: usize,
}

// SAFETY: the raw pointers in iovs/hdrs point into this struct's own heap buffers, which move
// with it; nothing is shared.
unsafe impl Send for RecvBatch {}

/// One received datagram.
pub(crate) struct Datagram<'a> {
    pub data: &'a [u8],
    pub from: Option<SocketAddr>,
    /// Kernel receive time (ns since the epoch), when the socket asked for it.
    pub rx_ns: Option<u64>,
    pub truncated: bool,
}

impl RecvBatch {
    pub(crate) fn new(slots: usize) -> RecvBatch {
        let slots = slots.max(1);
        let mut b = RecvBatch {
            bufs: vec![0; slots * SLOT_BYTES],
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { zeroed() }; slots],
            cmsgs: vec![[0; CMSG_SPACE / 8]; slots],
            iovs: Vec::with_capacity(slots),
            // SAFETY: all-zero is a valid mmsghdr.
            hdrs: vec![unsafe { zeroed() }; slots],
            n: 0,
        };
        for i in 0..slots {
            b.iovs.push(libc::iovec {
                iov_base: b.bufs[i * SLOT_BYTES..].as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            });
        }
        // The buffers are heap allocations that never grow: their addresses hold for the
        // batch's life, so the headers point at them once.
        for i in 0..slots {
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = b.cmsgs[i].as_mut_ptr().cast();
        }
        b
    }

    pub(crate) fn slots(&self) -> usize {
        self.hdrs.len()
    }

    /// One `recvmmsg` (non-blocking). Returns how many datagrams arrived (0 when none).
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.n = 0;
        // What the kernel overwrote last time.
        for m in &mut self.hdrs {
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_controllen = CMSG_SPACE as _;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by self, valid for the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.n = r as usize;
        Ok(self.n)
    }

    pub(crate) fn get(&self, i: usize) -> Datagram<'_> {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(SLOT_BYTES);
        let data = &self.bufs[i * SLOT_BYTES..i * SLOT_BYTES + len];
        let from = sockaddr_to_std(&self.addrs[i]);
        let mut rx_ns = None;
        let mh = &h.msg_hdr;
        if mh.msg_controllen > 0 {
            // SAFETY: the kernel wrote msg_controllen bytes of control messages into our buffer.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(mh);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SCM_TIMESTAMPNS {
                        let ts: libc::timespec =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                        rx_ns = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                    }
                    c = libc::CMSG_NXTHDR(mh, c);
                }
            }
        }
        Datagram {
            data,
            from,
            rx_ns,
            truncated: mh.msg_flags & libc::MSG_TRUNC != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::sockopt::{enable_rx_timestamps, udp_socket};
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    #[test]
    fn recvmmsg_gets_batches_with_kernel_timestamps() {
        let rx = udp_socket("127.0.0.1".parse().unwrap()).unwrap();
        enable_rx_timestamps(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = realtime_ns();
        for i in 0..5u8 {
            tx.send_to(&[i; 40], rx.local_addr().unwrap()).unwrap();
        }
        let mut b = RecvBatch::new(4);
        let mut got = Vec::new();
        for _ in 0..100 {
            let n = b.recv(rx.as_raw_fd()).unwrap();
            for i in 0..n {
                let d = b.get(i);
                assert_eq!(d.from, Some(tx.local_addr().unwrap()));
                let ts = d.rx_ns.expect("kernel timestamp");
                assert!(ts + 1_000_000 >= before && ts <= realtime_ns() + 1_000_000);
                got.push(d.data[0]);
            }
            if got.len() == 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }
}
