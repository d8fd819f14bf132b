//! Socket options std lacks, and the process's open-file limit that bounds how many sockets
//! one process may own.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use super::check;

/// `SO_TIMESTAMPNS` (the "old" value: a native `timespec`, 64-bit on 64-bit Linux).
pub(crate) const SO_TIMESTAMPNS: libc::c_int = 35;

/// Asks the kernel for a receive timestamp (CLOCK_REALTIME) on each datagram.
pub(crate) fn enable_rx_timestamps(s: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: option value is a valid c_int.
    check(unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sets SO_RCVBUF / SO_SNDBUF (best effort: the kernel caps them at its maximum).
pub(crate) fn set_buffers(s: &UdpSocket, rcv: usize, snd: usize) {
    for (opt, v) in [(libc::SO_RCVBUF, rcv), (libc::SO_SNDBUF, snd)] {
        if v == 0 {
            continue;
        }
        let v = v as libc::c_int;
        // SAFETY: option value is a valid c_int.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub(crate) fn raise_nofile() -> u64 {
    let mut r: libc::rlimit = unsafe { zeroed() };
    // SAFETY: r is a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    r.rlim_cur
}

/// A UDP socket bound to `ip` on a free port, non-blocking.
pub(crate) fn udp_socket(ip: IpAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    s.set_nonblocking(true)?;
    Ok(s)
}
