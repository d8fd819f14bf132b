//! Thin Linux wrappers the load generator needs and std lacks: epoll, eventfd, batched UDP
//! (recvmmsg / sendmmsg) with kernel receive timestamps, and CPU / memory figures from /proc.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// `SO_TIMESTAMPNS` (the "old" value: a native `timespec`, 64-bit on 64-bit Linux).
const SO_TIMESTAMPNS: libc::c_int = 35;
const SCM_TIMESTAMPNS: libc::c_int = SO_TIMESTAMPNS;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Wall clock in nanoseconds since the Unix epoch (CLOCK_REALTIME, the clock of the kernel's
/// receive timestamps).
pub fn realtime_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An epoll instance (level-triggered, readable events only).
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
    /// The kernel lacks epoll_pwait2.
    no_pwait2: bool,
}

impl Epoll {
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            no_pwait2: false,
        })
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev lives across the call.
        check(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    pub fn remove(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: ev lives across the call.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits up to `timeout` and returns the ready tokens: microsecond precision with
    /// epoll_pwait2 (Linux 5.11+), whole milliseconds (rounded up) without it.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<impl Iterator<Item = u64> + '_> {
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
pub struct EventFd(RawFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        Ok(EventFd(fd))
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
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

/// Asks the kernel for a receive timestamp (CLOCK_REALTIME) on each datagram.
pub fn enable_rx_timestamps(s: &UdpSocket) -> io::Result<()> {
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
pub fn set_buffers(s: &UdpSocket, rcv: usize, snd: usize) {
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
pub fn raise_nofile() -> u64 {
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

pub fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into a sockaddr_storage; returns the length to pass to the kernel.
pub fn std_to_sockaddr(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let s: &mut libc::sockaddr_in =
                unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in) };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
            let s: &mut libc::sockaddr_in6 =
                unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in6) };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            s.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Room for one SCM_TIMESTAMPNS control message.
const CMSG_SPACE: usize = 64;
pub const SLOT_BYTES: usize = 2048;

/// Preallocated buffers for `recvmmsg`: nothing is allocated per datagram.
pub struct RecvBatch {
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
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub from: Option<SocketAddr>,
    /// Kernel receive time (ns since the epoch), when the socket asked for it.
    pub rx_ns: Option<u64>,
    pub truncated: bool,
}

impl RecvBatch {
    pub fn new(slots: usize) -> RecvBatch {
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

    pub fn slots(&self) -> usize {
        self.hdrs.len()
    }

    /// One `recvmmsg` (non-blocking). Returns how many datagrams arrived (0 when none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
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

    pub fn get(&self, i: usize) -> Datagram<'_> {
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

/// Preallocated `sendmmsg` state: sends `bufs[i][..lens[i]]` to `dests[i]`.
pub struct SendBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub dests: Vec<SocketAddr>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
}

// SAFETY: the raw pointers only ever point into this struct's own buffers during a call.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(slots: usize, slot_bytes: usize, dest: SocketAddr) -> SendBatch {
        SendBatch {
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
    pub fn send(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
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

/// CPU seconds (user + system) of a process, from /proc/PID/stat (`None`: self).
pub fn cpu_seconds(pid: Option<u32>) -> io::Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(&path)?;
    parse_stat_cpu(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        )
    })
}

/// utime + stime in clock ticks, converted to seconds.
pub fn parse_stat_cpu(text: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: plain libc query.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// Resident memory (KiB) of a process, from /proc/PID/status VmRSS.
pub fn rss_kib(pid: Option<u32>) -> io::Result<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no VmRSS")))
}

/// A UDP socket bound to `ip` on a free port, non-blocking.
pub fn udp_socket(ip: IpAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_handles_names_with_spaces_and_parens() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 100 1000 10 18446744073709551615";
        // SAFETY: plain libc query.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(parse_stat_cpu(line), Some(300.0 / tck));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

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
