//! ICE-TCP (RFC 6544) beside a media thread's UDP socket: one listener that a passive TCP host
//! candidate names, and its connections, each a stream of RFC 4571 frames (a 2-byte length
//! before every STUN, DTLS, RTP or RTCP packet).
//!
//! A new connection belongs to nobody. Its first frame must be a STUN binding request that the
//! peer set accepts exactly as it accepts a datagram from a new address (the local ufrag names
//! the peer, MESSAGE-INTEGRITY is checked with that peer's password); then it is that peer's
//! for good. Everything is bounded: [`MAX_TCP_CONNS`] connections per listener, [`HELLO_TIMEOUT`]
//! to send that request, [`MAX_FRAME`] per frame, [`OUT_BUFFER`] of unsent output per
//! connection (a client that stops reading is dropped when it is full, never waited for).
//! Deadlines live in one queue per thread, not in a timer per connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::net::poll::Epoll;

/// Connections one listener holds (connected or not yet); one past it is closed at once
/// (`tcp_limit`). A peer uses one; a browser may open one or two while it checks pairs.
pub(crate) const MAX_TCP_CONNS: usize = 256;
/// A connection that has not sent a STUN binding request its peer accepts within this is
/// closed (`tcp_idle`). A browser sends its first check within milliseconds of connecting.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest frame taken; a longer length field closes the connection (`tcp_bad_frame`).
/// WebRTC packets stay below the path MTU, and the UDP path reads no more than this either.
pub(crate) const MAX_FRAME: usize = 2048;
/// Unsent bytes a connection may hold; more closes it (`tcp_slow`). At 64 KiB that is several
/// seconds of a viewer's audio: a reader that far behind hears nothing useful anyway, and 256
/// full buffers are 16 MiB per thread.
pub(crate) const OUT_BUFFER: usize = 64 * 1024;
/// Frames read from one connection per readiness before the thread moves on (level-triggered
/// epoll brings it back).
const READ_BURST: usize = 64;

/// epoll tokens of [`TcpSide::epoll`]: the listener, then one per connection slot.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_CONN: u64 = 1;

/// What `--ice-tcp` says: no TCP candidates, the UDP socket's port number when it is free
/// (else any), or a given first port (each further media thread takes the next one, 0 = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IceTcp {
    /// No listener, no TCP candidate.
    Off,
    /// The UDP port's number, or any free port when TCP has it taken.
    #[default]
    SamePort,
    /// This port (+ the thread's index); 0 = any free port.
    Port(u16),
}

impl FromStr for IceTcp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "no" | "false" => Ok(IceTcp::Off),
            "on" | "same" | "yes" | "true" => Ok(IceTcp::SamePort),
            p => p
                .parse()
                .map(IceTcp::Port)
                .map_err(|_| format!("--ice-tcp: `on`, `off` or a port number, not `{p}`")),
        }
    }
}

impl IceTcp {
    /// Binds the listener of the media thread `index` whose UDP socket is on `udp`.
    pub(crate) fn bind(self, udp: SocketAddr, index: usize) -> io::Result<Option<TcpListener>> {
        let at = |port: u16| SocketAddr::new(udp.ip(), port);
        let listener = match self {
            IceTcp::Off => return Ok(None),
            IceTcp::SamePort => TcpListener::bind(at(udp.port())).or_else(|e| {
                warn!(
                    port = udp.port(),
                    "ICE-TCP: the UDP port's number is taken for TCP ({e}): any free port instead"
                );
                TcpListener::bind(at(0))
            })?,
            IceTcp::Port(0) => TcpListener::bind(at(0))?,
            IceTcp::Port(p) => {
                let port = u16::try_from(usize::from(p) + index).map_err(|_| {
                    io::Error::new(ErrorKind::InvalidInput, "ICE-TCP ports past 65535")
                })?;
                TcpListener::bind(at(port))?
            }
        };
        listener.set_nonblocking(true)?;
        Ok(Some(listener))
    }
}

/// What one thread's TCP side counted, part of [`super::peers::PeerStats`].
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed at once: the listener already held [`MAX_TCP_CONNS`].
    pub limit: AtomicU64,
    /// Connections whose first frame was not a STUN request a peer accepted.
    pub refused: AtomicU64,
    /// Connections closed for a frame of length 0 or over [`MAX_FRAME`].
    pub bad_frame: AtomicU64,
    /// Connections that sent nothing valid within [`HELLO_TIMEOUT`].
    pub idle: AtomicU64,
    /// Connections dropped with [`OUT_BUFFER`] full (the client does not read).
    pub slow: AtomicU64,
    /// Connections the client closed or reset.
    pub closed: AtomicU64,
}

fn add(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    /// Tells a reused slot from the connection a queued deadline was for.
    gen: u64,
    /// The peer (its `PeerId` number) it belongs to.
    peer: Option<u64>,
    /// Bytes read, not yet a whole frame: at most one frame and its length.
    input: Box<[u8]>,
    in_len: usize,
    /// Framed bytes not yet written; `out_at` of them are.
    out: Vec<u8>,
    out_at: usize,
    /// EPOLLOUT is armed.
    want_write: bool,
    /// In [`TcpSide::dirty`].
    dirty: bool,
    /// Close once `out` is written: its peer ended (its DTLS close is in `out`).
    closing: bool,
    /// Close at the next flush: its buffer overflowed.
    dead: bool,
}

/// One frame read from a connection.
pub(crate) enum Frame {
    /// A frame of this length was copied out.
    Got(usize),
    /// No whole frame buffered.
    Pending,
    /// The stream is unusable (closed, reset, bad length): the connection is gone.
    Closed,
}

/// The TCP listener of one media thread and its connections.
pub(crate) struct TcpSide {
    listener: TcpListener,
    /// The candidate's address: what str0m is told a TCP packet arrived on.
    pub(crate) local: SocketAddr,
    /// Readiness of the listener and the connections; its own fd sits in the thread's poller.
    pub(crate) epoll: Epoll,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    /// The connections attached to a peer, by remote address: where sends go.
    by_addr: HashMap<SocketAddr, usize>,
    /// (deadline, slot, gen) of connections not attached yet, in deadline order.
    hello: VecDeque<(Instant, usize, u64)>,
    /// Slots with output to write.
    dirty: Vec<usize>,
    next_gen: u64,
    ready: Vec<u64>,
}

impl TcpSide {
    /// Takes a non-blocking listener; `candidate` is the address its TCP candidate announces.
    pub(crate) fn new(listener: TcpListener, candidate: SocketAddr) -> io::Result<TcpSide> {
        let epoll = Epoll::new(64)?;
        epoll.add(listener.as_raw_fd(), TOKEN_LISTENER)?;
        Ok(TcpSide {
            listener,
            local: candidate,
            epoll,
            conns: Vec::new(),
            free: Vec::new(),
            open: 0,
            by_addr: HashMap::new(),
            hello: VecDeque::new(),
            dirty: Vec::new(),
            next_gen: 0,
            ready: Vec::with_capacity(64),
        })
    }

    /// Collects the slots that are ready (accepting new connections on the way) into `out`.
    pub(crate) fn poll_ready(&mut self, now: Instant, stats: &TcpStats, out: &mut Vec<usize>) {
        let mut ready = std::mem::take(&mut self.ready);
        if let Ok(tokens) = self.epoll.wait(Duration::ZERO) {
            ready.extend(tokens);
        }
        for &t in &ready {
            if t == TOKEN_LISTENER {
                self.accept(now, stats);
            } else {
                out.push((t - TOKEN_CONN) as usize);
            }
        }
        ready.clear();
        self.ready = ready;
    }

    fn accept(&mut self, now: Instant, stats: &TcpStats) {
        loop {
            let (stream, remote) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: the pending connection stays queued until later.
                    debug!("ICE-TCP accept: {e}");
                    return;
                }
            };
            if self.open >= MAX_TCP_CONNS {
                let n = add(&stats.limit);
                if n.is_power_of_two() {
                    warn!(%remote, count = n, max = MAX_TCP_CONNS, "ICE-TCP connection refused: listener full");
                }
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if self
                .epoll
                .add(stream.as_raw_fd(), TOKEN_CONN + slot as u64)
                .is_err()
            {
                self.free.push(slot);
                continue;
            }
            self.next_gen += 1;
            self.conns[slot] = Some(Conn {
                stream,
                remote,
                gen: self.next_gen,
                peer: None,
                input: vec![0; 2 + MAX_FRAME].into_boxed_slice(),
                in_len: 0,
                out: Vec::new(),
                out_at: 0,
                want_write: false,
                dirty: false,
                closing: false,
                dead: false,
            });
            self.open += 1;
            self.hello
                .push_back((now + HELLO_TIMEOUT, slot, self.next_gen));
            add(&stats.accepted);
            debug!(%remote, slot, "ICE-TCP connection accepted");
        }
    }

    /// The remote address of a slot's connection and the peer it belongs to, if any.
    pub(crate) fn route(&self, slot: usize) -> Option<(SocketAddr, Option<u64>)> {
        let c = self.conns.get(slot)?.as_ref()?;
        Some((c.remote, c.peer))
    }

    /// The connection's first request was accepted for `peer`: it is that peer's from now on.
    pub(crate) fn attach(&mut self, slot: usize, peer: u64) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            c.peer = Some(peer);
            self.by_addr.insert(c.remote, slot);
            info!(peer, remote = %c.remote, "ICE-TCP connection attached");
        }
    }

    /// Reads what the connection has and copies its next whole frame into `buf`.
    pub(crate) fn next_frame(&mut self, slot: usize, buf: &mut [u8], stats: &TcpStats) -> Frame {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return Frame::Closed;
        };
        loop {
            if c.in_len >= 2 {
                let len = usize::from(u16::from_be_bytes([c.input[0], c.input[1]]));
                if len == 0 || len > MAX_FRAME || len > buf.len() {
                    let n = add(&stats.bad_frame);
                    if n.is_power_of_two() {
                        warn!(remote = %c.remote, len, count = n, "ICE-TCP connection closed: bad frame length");
                    }
                    self.close(slot);
                    return Frame::Closed;
                }
                if c.in_len >= 2 + len {
                    buf[..len].copy_from_slice(&c.input[2..2 + len]);
                    c.input.copy_within(2 + len..c.in_len, 0);
                    c.in_len -= 2 + len;
                    return Frame::Got(len);
                }
            }
            // Never more than the rest of this frame (or its length): the next stays in the
            // kernel, so `input` holds one frame at most.
            let want = match c.in_len {
                0 | 1 => 2 - c.in_len,
                _ => 2 + usize::from(u16::from_be_bytes([c.input[0], c.input[1]])) - c.in_len,
            };
            match c.stream.read(&mut c.input[c.in_len..c.in_len + want]) {
                Ok(0) => {
                    add(&stats.closed);
                    debug!(remote = %c.remote, "ICE-TCP connection closed by the client");
                    self.close(slot);
                    return Frame::Closed;
                }
                Ok(n) => c.in_len += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Frame::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    add(&stats.closed);
                    debug!(remote = %c.remote, "ICE-TCP connection failed: {e}");
                    self.close(slot);
                    return Frame::Closed;
                }
            }
        }
    }

    /// Frames read per readiness of one connection.
    pub(crate) const fn read_burst() -> usize {
        READ_BURST
    }

    /// Closes a connection for good (its peer, if any, lives on; its consent lapses if it
    /// had no other path).
    pub(crate) fn close(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.epoll.remove(c.stream.as_raw_fd());
        if self.by_addr.get(&c.remote) == Some(&slot) {
            self.by_addr.remove(&c.remote);
        }
        self.free.push(slot);
        self.open -= 1;
    }

    /// Closes a connection whose first frame no peer accepted.
    pub(crate) fn refuse(&mut self, slot: usize, stats: &TcpStats) {
        if let Some((remote, _)) = self.route(slot) {
            let n = add(&stats.refused);
            if n.is_power_of_two() {
                warn!(%remote, count = n, "ICE-TCP connection closed: its first frame is no STUN request a peer accepts");
            }
        }
        self.close(slot);
    }

    /// A peer ended: its connections close once what is queued for them (its DTLS close) is
    /// written, or at the next flush whatever is left.
    pub(crate) fn peer_closed(&mut self, peer: u64) {
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(c) = c.as_mut().filter(|c| c.peer == Some(peer)) {
                c.closing = true;
                c.peer = None;
                if !c.dirty {
                    c.dirty = true;
                    self.dirty.push(slot);
                }
            }
        }
    }

    /// Closes the connections that sent nothing valid within [`HELLO_TIMEOUT`].
    pub(crate) fn expire(&mut self, now: Instant, stats: &TcpStats) {
        while let Some(&(at, slot, gen)) = self.hello.front() {
            if at > now {
                return;
            }
            self.hello.pop_front();
            let unattached = self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.gen == gen && c.peer.is_none() && !c.closing);
            if unattached {
                let n = add(&stats.idle);
                if n.is_power_of_two() {
                    debug!(
                        count = n,
                        "ICE-TCP connection closed: nothing valid in time"
                    );
                }
                self.close(slot);
            }
        }
    }

    /// The earliest deadline of a connection not attached yet.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.hello.front().map(|(at, _, _)| *at)
    }

    /// Queues one frame for the attached connection from `to`; false if there is none (the
    /// packet is then not TCP's).
    pub(crate) fn send_to(&mut self, to: SocketAddr, data: &[u8], stats: &TcpStats) -> bool {
        if self.by_addr.is_empty() {
            return false;
        }
        let Some(&slot) = self.by_addr.get(&to) else {
            return false;
        };
        self.send_slot(slot, data, stats);
        true
    }

    fn send_slot(&mut self, slot: usize, data: &[u8], stats: &TcpStats) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.dead || data.len() > usize::from(u16::MAX) {
            return;
        }
        if c.out.len() - c.out_at + 2 + data.len() > OUT_BUFFER {
            c.dead = true;
            let n = add(&stats.slow);
            warn!(remote = %c.remote, peer = ?c.peer, count = n, "ICE-TCP connection dropped: the client does not read ({OUT_BUFFER} bytes unsent)");
        } else {
            if c.out_at > 0 && c.out_at == c.out.len() {
                c.out.clear();
                c.out_at = 0;
            }
            c.out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            c.out.extend_from_slice(data);
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Writes what the connections queued, as far as the kernel takes it; the rest waits for
    /// EPOLLOUT.
    pub(crate) fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                c.dirty = false;
            }
            self.write(slot);
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// A connection is ready: writes what it holds (its readiness may be EPOLLOUT).
    pub(crate) fn writable(&mut self, slot: usize) {
        if self
            .conns
            .get(slot)
            .is_some_and(|c| c.as_ref().is_some_and(|c| c.want_write))
        {
            self.write(slot);
        }
    }

    fn write(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.dead {
            self.close(slot);
            return;
        }
        while c.out_at < c.out.len() {
            match c.stream.write(&c.out[c.out_at..]) {
                Ok(0) => break,
                Ok(n) => c.out_at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(slot);
                    return;
                }
            }
        }
        let pending = c.out_at < c.out.len();
        if !pending {
            c.out.clear();
            c.out_at = 0;
            if c.closing {
                self.close(slot);
                return;
            }
        }
        if pending != c.want_write {
            let fd = c.stream.as_raw_fd();
            if self
                .epoll
                .set(fd, TOKEN_CONN + slot as u64, pending)
                .is_ok()
            {
                c.want_write = pending;
            }
        }
    }
}

/// The address a listener's candidate announces: `public_ip` if given, else its own.
pub(crate) fn candidate_addr(
    listener: &TcpListener,
    public_ip: Option<IpAddr>,
) -> io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    Ok(SocketAddr::new(
        public_ip.unwrap_or(local.ip()),
        local.port(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback and one client connected to it, accepted.
    fn side_and_client() -> (TcpSide, TcpStream, usize) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let mut side = TcpSide::new(l, addr).unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let stats = TcpStats::default();
        let mut ready = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while side.open == 0 {
            assert!(Instant::now() < deadline, "accepted");
            side.poll_ready(Instant::now(), &stats, &mut ready);
        }
        (side, client, 0)
    }

    #[test]
    fn frames_are_read_whole_and_a_bad_length_closes() {
        let (mut side, mut client, slot) = side_and_client();
        let stats = TcpStats::default();
        let mut buf = [0u8; MAX_FRAME];
        // Two frames, the second split across writes.
        client.write_all(&[0, 3, 1, 2, 3, 0, 2, 9]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(
            side.next_frame(slot, &mut buf, &stats),
            Frame::Got(3)
        ));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert!(matches!(
            side.next_frame(slot, &mut buf, &stats),
            Frame::Pending
        ));
        client.write_all(&[8]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(
            side.next_frame(slot, &mut buf, &stats),
            Frame::Got(2)
        ));
        assert_eq!(&buf[..2], &[9, 8]);
        client
            .write_all(&((MAX_FRAME + 1) as u16).to_be_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(
            side.next_frame(slot, &mut buf, &stats),
            Frame::Closed
        ));
        assert_eq!(stats.bad_frame.load(Ordering::Relaxed), 1);
        assert_eq!(side.open, 0);
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_when_its_buffer_is_full() {
        let (mut side, client, slot) = side_and_client();
        let stats = TcpStats::default();
        let remote = client.local_addr().unwrap();
        side.attach(slot, 7);
        let packet = [0u8; 1200];
        // Far more than the kernel's buffers and OUT_BUFFER together; the client reads nothing.
        let mut sent = 0;
        while side.open == 1 && sent < 100_000 {
            assert!(side.send_to(remote, &packet, &stats));
            side.flush();
            sent += 1;
        }
        assert_eq!(side.open, 0, "dropped after {sent} packets");
        assert_eq!(stats.slow.load(Ordering::Relaxed), 1);
        assert!(!side.send_to(remote, &packet, &stats), "no route left");
        drop(client);
    }

    #[test]
    fn a_silent_connection_expires() {
        let (mut side, _client, _) = side_and_client();
        let stats = TcpStats::default();
        side.expire(Instant::now(), &stats);
        assert_eq!(side.open, 1);
        side.expire(Instant::now() + HELLO_TIMEOUT, &stats);
        assert_eq!(side.open, 0);
        assert_eq!(stats.idle.load(Ordering::Relaxed), 1);
    }
}
