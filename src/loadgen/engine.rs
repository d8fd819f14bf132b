//! A load generator thread: many peers, each on its own UDP socket (the edge routes by remote
//! address), all in one epoll instance; str0m timeouts from a min-heap, no task or timer per
//! peer. Publishers send the corpus on a clock; viewers count RTP from the clear header
//! (recvmmsg batches, nothing allocated per packet) and only a sample of them feeds media to
//! str0m, to decrypt it and match each payload to its send time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use str0m::media::{Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::counter::{is_rtp, rtp_ids, SeqCounter};
use super::feed::PlainFeed;
use super::matcher::{Arrival, Matcher, RunSplit, SwitchTracker};
use super::srtp_in::SrtpIn;
use crate::net::poll::{Epoll, EventFd};
use crate::net::recv::{realtime_ns, RecvBatch, SLOT_BYTES};
use crate::rtc::srtp_out::KeySlot;

/// 20 ms Opus frames.
pub(crate) const FRAME: Duration = Duration::from_millis(20);
/// Datagrams per recvmmsg.
const BATCH: usize = 32;
/// recvmmsg rounds per ready socket per wakeup (level-triggered epoll brings it back).
const MAX_ROUNDS: usize = 4;
/// A viewer tracks at most this many SSRCs (1 main + up to 16 multiplexed tracks).
const MAX_SSRCS: usize = 18;
const WAKE_TOKEN: u64 = u64::MAX;
/// Ready sockets taken per epoll_wait.
const EVENTS: usize = 4096;
/// Latency samples beyond this are not media that arrived, but a matcher confusion.
const MAX_LATENCY_NS: u64 = 10_000_000_000;

/// One corpus frame as a publisher sends it.
#[derive(Clone)]
pub(crate) struct Frame {
    pub payload: Arc<[u8]>,
    /// RFC 6464 level (0 loudest .. 127 silence), when the corpus has levels.
    pub level: Option<u8>,
    pub voiced: bool,
    /// First voiced frame after at least 300 ms of quiet.
    pub spurt: bool,
    /// 48 kHz samples.
    pub samples: u32,
}

/// A peer whose offer was answered, handed to a thread to connect.
pub(crate) struct NewPeer {
    pub socket: UdpSocket,
    pub rtc: Rtc,
    pub mids: Vec<Mid>,
    /// When its join began (director request).
    pub started: Instant,
    /// Told once: connected (at that instant) or why not.
    pub done: Option<oneshot::Sender<Result<Instant, String>>>,
    pub label: String,
    /// Where the DTLS tap leaves the peer's keying material: every viewer's SRTP profile is
    /// counted from it, and the sampled ones on the lean receive path open their SRTP with it.
    pub keys: Option<Arc<KeySlot>>,
}

pub(crate) enum EngineCmd {
    Publisher {
        peer: Box<NewPeer>,
        /// Index into the sources.
        source: usize,
    },
    Viewer {
        peer: Box<NewPeer>,
        sampled: bool,
        /// A sampled viewer opens its SRTP itself (with the keys) rather than through str0m.
        lean: bool,
        excluded: Option<usize>,
    },
    /// A speaker sent as plain RTP (a Janus mountpoint's port), on the publishers' clock.
    Feed(Box<PlainFeed>),
    /// Publishers start their corpus at this common instant (frame k at t0 + k * 20 ms).
    Start(Instant),
    Stop,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    /// Added latency of sampled packets forwarded as they came (µs).
    pub latency_us: Vec<u32>,
    /// Latency of sampled packets a pre-roll replayed (µs): late by design, kept apart.
    pub preroll_us: Vec<u32>,
    /// Switch latency (µs).
    pub switch_us: Vec<u32>,
}

/// What a thread reports, read by the orchestrator at step boundaries.
#[derive(Debug, Default)]
pub(crate) struct ThreadStats {
    /// Distinct RTP packets viewers received (header count).
    pub received: AtomicU64,
    /// Packets the edge numbered (per SSRC, first to highest sequence number).
    pub expected: AtomicU64,
    pub duplicates: AtomicU64,
    pub connected_viewers: AtomicU64,
    /// Viewers that were connected and then lost their connection.
    pub dropped_viewers: AtomicU64,
    /// Distinct (viewer, SSRC) pairs that brought RTP: a viewer that gets every track of a
    /// server that forwards them all counts one per track.
    pub viewer_ssrcs: AtomicU64,
    /// Viewers connected per negotiated SRTP profile (str0m's name of it).
    pub profiles: Mutex<BTreeMap<String, u64>>,
    /// Media packets sampled viewers decrypted.
    pub decrypted: AtomicU64,
    /// Decrypted payloads not matched to a send (ambiguous or unknown).
    pub unmatched: AtomicU64,
    /// Packets of a source the viewer excluded (must stay 0).
    pub excluded_received: AtomicU64,
    pub published: AtomicU64,
    /// Datagrams longer than a receive slot (dropped).
    pub truncated: AtomicU64,
    /// str0m timeouts handled (ICE consent, RTCP, DTLS retransmits).
    pub timeouts: AtomicU64,
    /// Datagrams handed to str0m.
    pub to_str0m: AtomicU64,
    /// Sampled SRTP packets opened on the generator's own path (not str0m's).
    pub opened: AtomicU64,
    /// Sampled SRTP packets that did not open (malformed, or failed authentication).
    pub open_failed: AtomicU64,
    /// `recvmmsg` calls made (packets per call says how much each read syscall is shared).
    pub recv_calls: AtomicU64,
    /// The thread's Linux thread id (0 until it runs), for its CPU time in
    /// /proc/self/task/TID/stat.
    pub tid: AtomicU64,
    pub samples: Mutex<Samples>,
}

/// Totals kept on the thread and published once per loop iteration.
#[derive(Default)]
struct Local {
    received: u64,
    expected: u64,
    duplicates: u64,
    decrypted: u64,
    unmatched: u64,
    excluded: u64,
    published: u64,
    truncated: u64,
    timeouts: u64,
    to_str0m: u64,
    opened: u64,
    open_failed: u64,
    recv_calls: u64,
    viewer_ssrcs: u64,
    samples: Samples,
    /// Peers of this thread still connecting (a gauge, not published).
    connecting: usize,
}

struct Publisher {
    source: usize,
    mid: Mid,
    pt: Option<Pt>,
    seq: u64,
    ts: u32,
    /// Frames sent since the common start.
    sent: u64,
    /// Offset of this source's frames within the 20 ms period (sources are not aligned).
    phase: Duration,
}

struct ClientViewer {
    sampled: bool,
    lean: bool,
    excluded: Option<usize>,
    ssrcs: SmallVec<[SeqCounter; 4]>,
    /// Sampled viewers only: each track's pre-roll told from its live packets, in the order
    /// of `ssrcs` (empty until a track's first matched packet).
    runs: Vec<RunSplit>,
    switch: Option<SwitchTracker>,
    /// The tap's slot until DTLS is up, then the session that opens this viewer's SRTP.
    keys: Option<Arc<KeySlot>>,
    srtp: Option<SrtpIn>,
}

// Viewers are the many: their counters stay inline (no pointer chase per packet); a peer's
// str0m state dwarfs either variant anyway.
#[allow(clippy::large_enum_variant)]
enum ClientRole {
    Publisher(Publisher),
    Viewer(ClientViewer),
}

struct ClientPeer {
    socket: UdpSocket,
    fd: RawFd,
    local: SocketAddr,
    rtc: Rtc,
    connected: bool,
    started: Instant,
    done: Option<oneshot::Sender<Result<Instant, String>>>,
    /// The timeout currently in the heap for this peer.
    timeout: Option<Instant>,
    label: String,
    role: ClientRole,
}

/// Handle to a running thread.
pub(crate) struct EngineHandle {
    tx: Sender<EngineCmd>,
    wake: Arc<EventFd>,
    pub stats: Arc<ThreadStats>,
    join: Option<JoinHandle<()>>,
}

impl EngineHandle {
    pub(crate) fn send(&self, cmd: EngineCmd) {
        if self.tx.send(cmd).is_ok() {
            self.wake.wake();
        }
    }

    /// Stops the thread and waits for it (it closes its peers first).
    pub(crate) fn stop(&mut self) {
        self.send(EngineCmd::Stop);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

pub(crate) struct EngineConfig {
    pub id: usize,
    pub sources: Arc<Vec<Vec<Frame>>>,
    pub matcher: Arc<Matcher>,
    /// The thread stops by itself here, whatever happens.
    pub deadline: Instant,
    /// Sockets are read at most this often (lets datagrams pile up into recvmmsg batches;
    /// the kernel timestamps keep latency exact).
    pub poll: Duration,
    /// A peer not connected this long after its join began is dropped.
    pub join_timeout: Duration,
}

pub(crate) fn spawn(cfg: EngineConfig) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new()?);
    let stats = Arc::new(ThreadStats::default());
    let epoll = Epoll::new(EVENTS)?;
    epoll.add(wake.fd(), WAKE_TOKEN)?;
    let mut engine = Engine {
        epoll,
        wake: wake.clone(),
        rx,
        peers: Vec::new(),
        free: Vec::new(),
        heap: BinaryHeap::new(),
        publishers: Vec::new(),
        feeds: Vec::new(),
        feed_buf: Vec::with_capacity(SLOT_BYTES),
        start: None,
        batch: RecvBatch::new(BATCH),
        scratch: vec![0; SLOT_BYTES],
        ready: Vec::with_capacity(EVENTS),
        local: Local::default(),
        stats: stats.clone(),
        cfg,
    };
    let join = std::thread::Builder::new()
        .name(format!("loadgen-{}", engine.cfg.id))
        .spawn(move || engine.run())?;
    Ok(EngineHandle {
        tx,
        wake,
        stats,
        join: Some(join),
    })
}

struct Engine {
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<EngineCmd>,
    peers: Vec<Option<ClientPeer>>,
    free: Vec<usize>,
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
    publishers: Vec<usize>,
    feeds: Vec<PlainFeed>,
    /// The packet a feed is writing (one buffer for all).
    feed_buf: Vec<u8>,
    start: Option<Instant>,
    batch: RecvBatch,
    /// A copy of the datagram being opened (the lean receive path decrypts in place).
    scratch: Vec<u8>,
    ready: Vec<u64>,
    local: Local,
    stats: Arc<ThreadStats>,
    cfg: EngineConfig,
}

impl Engine {
    fn run(&mut self) {
        // SAFETY: plain syscall, no arguments.
        let tid = unsafe { libc::gettid() };
        self.stats.tid.store(tid as u64, Ordering::Relaxed);
        let mut last_poll = Instant::now();
        let mut stopping = false;
        while !stopping {
            let now = Instant::now();
            if now >= self.cfg.deadline {
                break;
            }
            loop {
                match self.rx.try_recv() {
                    Ok(EngineCmd::Stop) | Err(TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                    Ok(cmd) => self.command(cmd),
                    Err(TryRecvError::Empty) => break,
                }
            }
            let next_pub = match (self.publish_due(now), self.feed_due(now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.timers(now);
            self.flush_stats();
            let mut next = now + Duration::from_millis(50);
            next = next.min(self.cfg.deadline);
            if let Some(t) = next_pub {
                next = next.min(t);
            }
            if let Some(Reverse((t, _))) = self.heap.peek() {
                next = next.min(*t);
            }
            // While peers connect, every ICE and DTLS round trip would wait for the next read:
            // read often then, so join times measure the server, not this loop.
            let poll = if self.local.connecting > 0 {
                self.cfg.poll.min(Duration::from_millis(1))
            } else {
                self.cfg.poll
            };
            let next_poll = last_poll + poll;
            let now = Instant::now();
            if next_poll > now {
                // Too early to read the sockets again: sleep until then or the next timer.
                let until = next_poll.min(next);
                std::thread::sleep(until.saturating_duration_since(now));
                if until < next_poll {
                    continue;
                }
            }
            let wait = next.saturating_duration_since(Instant::now());
            self.ready.clear();
            match self.epoll.wait(wait) {
                Ok(tokens) => self.ready.extend(tokens),
                Err(e) => {
                    warn!("epoll_wait failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // A full event array means more sockets are ready: read them without the pause.
            last_poll = if self.ready.len() >= EVENTS {
                Instant::now() - poll
            } else {
                Instant::now()
            };
            for i in 0..self.ready.len() {
                let token = self.ready[i];
                if token == WAKE_TOKEN {
                    self.wake.drain();
                } else {
                    self.readable(token as usize);
                }
            }
        }
        self.shutdown();
    }

    fn command(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Publisher { peer, source } => {
                let Some(&mid) = peer.mids.first() else {
                    return;
                };
                let n = self.cfg.sources.len().max(1) as u32;
                let role = ClientRole::Publisher(Publisher {
                    source,
                    mid,
                    pt: None,
                    seq: (rand::random::<u16>() & 0x0FFF) as u64,
                    ts: rand::random(),
                    sent: 0,
                    phase: FRAME * (source as u32 % n) / n,
                });
                if let Some(slot) = self.add(*peer, role) {
                    self.publishers.push(slot);
                }
            }
            EngineCmd::Viewer {
                peer,
                sampled,
                lean,
                excluded,
            } => {
                let role = ClientRole::Viewer(ClientViewer {
                    sampled,
                    lean,
                    excluded,
                    ssrcs: SmallVec::new(),
                    runs: Vec::new(),
                    switch: None,
                    keys: peer.keys.clone(),
                    srtp: None,
                });
                self.add(*peer, role);
            }
            EngineCmd::Feed(f) => self.feeds.push(*f),
            EngineCmd::Start(t0) => self.start = Some(t0),
            EngineCmd::Stop => {}
        }
    }

    fn add(&mut self, p: NewPeer, role: ClientRole) -> Option<usize> {
        let NewPeer {
            socket,
            rtc,
            started,
            mut done,
            label,
            ..
        } = p;
        let fail = |done: &mut Option<oneshot::Sender<_>>, msg: String| {
            if let Some(d) = done.take() {
                let _ = d.send(Err(msg));
            }
        };
        let local = match socket.local_addr() {
            Ok(a) => a,
            Err(e) => {
                fail(&mut done, format!("socket: {e}"));
                return None;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.peers.push(None);
            self.peers.len() - 1
        });
        let fd = socket.as_raw_fd();
        if let Err(e) = self.epoll.add(fd, slot as u64) {
            fail(&mut done, format!("epoll: {e}"));
            self.free.push(slot);
            return None;
        }
        self.local.connecting += 1;
        self.peers[slot] = Some(ClientPeer {
            socket,
            fd,
            local,
            rtc,
            connected: false,
            started,
            done,
            timeout: None,
            label,
            role,
        });
        // Starts ICE: the first checks go out now.
        self.drive(slot, Input::Timeout(Instant::now()), None);
        Some(slot)
    }

    /// Sends every publisher frame that is due; returns when the next one is.
    fn publish_due(&mut self, now: Instant) -> Option<Instant> {
        let t0 = self.start?;
        let mut next: Option<Instant> = None;
        for i in 0..self.publishers.len() {
            let slot = self.publishers[i];
            let Some(p) = self.peers[slot].as_mut() else {
                continue;
            };
            let ClientRole::Publisher(pb) = &mut p.role else {
                continue;
            };
            if !p.connected {
                continue;
            }
            let frames = &self.cfg.sources[pb.source];
            if frames.is_empty() {
                continue;
            }
            let mut wrote = false;
            loop {
                let due = t0 + pb.phase + FRAME * pb.sent as u32;
                if due > now {
                    next = Some(next.map_or(due, |n| n.min(due)));
                    break;
                }
                let k = (pb.sent % frames.len() as u64) as usize;
                let f = &frames[k];
                pb.sent += 1;
                let pt = match pb.pt {
                    Some(pt) => pt,
                    None => {
                        let Some(pt) = p
                            .rtc
                            .media(pb.mid)
                            .and_then(|m| m.remote_pts().first().copied())
                        else {
                            continue;
                        };
                        pb.pt = Some(pt);
                        pt
                    }
                };
                let mut ext = ExtensionValues::default();
                if let Some(l) = f.level {
                    ext.audio_level = Some(-(l.min(127) as i8));
                    ext.voice_activity = Some(f.voiced);
                }
                let mut api = p.rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(pb.mid, None) else {
                    continue;
                };
                tx.write_rtp(
                    RtpWrite::new(pt, SeqNo::from(pb.seq), pb.ts, due, f.payload.clone())
                        .ext_vals(ext),
                );
                pb.seq += 1;
                pb.ts = pb.ts.wrapping_add(f.samples);
                let ns = realtime_ns();
                self.cfg.matcher.record_send(pb.source, k, ns);
                if f.spurt {
                    self.cfg.matcher.record_spurt(pb.source, ns);
                }
                self.local.published += 1;
                wrote = true;
            }
            if wrote {
                self.drive(slot, Input::Timeout(now), None);
            }
        }
        next
    }

    /// Sends every plain RTP frame that is due; returns when the next one is.
    fn feed_due(&mut self, now: Instant) -> Option<Instant> {
        let t0 = self.start?;
        let mut next: Option<Instant> = None;
        for f in &mut self.feeds {
            let Some(frames) = self.cfg.sources.get(f.source).filter(|f| !f.is_empty()) else {
                continue;
            };
            loop {
                let due = f.due(t0);
                if due > now {
                    next = Some(next.map_or(due, |n| n.min(due)));
                    break;
                }
                let k = (f.sent % frames.len() as u64) as usize;
                let frame = &frames[k];
                let n = f.packet(&frame.payload, frame.samples, &mut self.feed_buf);
                if let Err(e) = f.socket.send_to(&self.feed_buf[..n], f.dest) {
                    debug!(dest = %f.dest, "RTP feed send: {e}");
                }
                let ns = realtime_ns();
                self.cfg.matcher.record_send(f.source, k, ns);
                if frame.spurt {
                    self.cfg.matcher.record_spurt(f.source, ns);
                }
                self.local.published += 1;
            }
        }
        next
    }

    fn timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, slot))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            let current = self.peers[slot].as_ref().and_then(|p| p.timeout);
            if current != Some(t) {
                continue; // stale: the peer rescheduled or is gone
            }
            if let Some(p) = self.peers[slot].as_mut() {
                p.timeout = None;
            }
            self.local.timeouts += 1;
            self.drive(slot, Input::Timeout(now), None);
        }
        // Stale entries pile up when peers reschedule often: rebuild now and then.
        if self.heap.len() > 4 * self.peers.len() + 64 {
            let live: Vec<_> = self
                .peers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref()?.timeout.map(|t| Reverse((t, i))))
                .collect();
            self.heap = BinaryHeap::from(live);
        }
    }

    fn readable(&mut self, slot: usize) {
        for _ in 0..MAX_ROUNDS {
            let Some(p) = self.peers.get(slot).and_then(Option::as_ref) else {
                return;
            };
            self.local.recv_calls += 1;
            let n = match self.batch.recv(p.fd) {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors (port unreachable) surface here; they concern this peer.
                    debug!(peer = p.label.as_str(), "recvmmsg: {e}");
                    return;
                }
            };
            for i in 0..n {
                self.datagram(slot, i);
            }
            if n < self.batch.slots() {
                return;
            }
        }
    }

    /// Handles datagram `i` of the batch just read for `slot`.
    fn datagram(&mut self, slot: usize, i: usize) {
        let Some(p) = self.peers[slot].as_mut() else {
            return;
        };
        let d = self.batch.get(i);
        if d.truncated {
            self.local.truncated += 1;
            return;
        }
        if let ClientRole::Viewer(v) = &mut p.role {
            if is_rtp(d.data) {
                let (ssrc, seq) = rtp_ids(d.data);
                let full = v.ssrcs.len() >= MAX_SSRCS;
                let mut roc = None;
                match v.ssrcs.iter_mut().find(|c| c.ssrc == ssrc) {
                    Some(c) => {
                        let delta = c.on_seq(seq);
                        self.local.expected += delta.expected;
                        self.local.received += delta.received;
                        self.local.duplicates += delta.duplicate as u64;
                        roc = (!delta.duplicate).then(|| c.roc(seq));
                    }
                    None if !full => {
                        let (c, delta) = SeqCounter::new(ssrc, seq);
                        roc = Some(c.roc(seq));
                        v.ssrcs.push(c);
                        self.local.viewer_ssrcs += 1;
                        self.local.expected += delta.expected;
                        self.local.received += delta.received;
                    }
                    None => {}
                }
                if !v.sampled {
                    return;
                }
                if let Some(srtp) = &v.srtp {
                    // A duplicate is counted above and not matched again (str0m's replay
                    // protection dropped it too).
                    let Some(roc) = roc else {
                        return;
                    };
                    let rx_ns = d.rx_ns.unwrap_or_else(realtime_ns);
                    let buf = &mut self.scratch[..d.data.len()];
                    buf.copy_from_slice(d.data);
                    match srtp.open(buf, roc) {
                        Some(payload) => {
                            self.local.opened += 1;
                            on_media(v, ssrc, payload, rx_ns, &self.cfg, &mut self.local);
                        }
                        None => self.local.open_failed += 1,
                    }
                    return;
                }
            }
        }
        let Some(from) = d.from else {
            return;
        };
        let rx_ns = d.rx_ns;
        let Ok(contents) = d.data.try_into() else {
            return;
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source: from,
                destination: p.local,
                contents,
            },
        );
        let rx_ns = rx_ns.unwrap_or_else(realtime_ns);
        self.local.to_str0m += 1;
        let end = drive_peer(
            p,
            input,
            Some(rx_ns),
            &self.cfg,
            &mut self.local,
            &self.stats,
            &mut self.heap,
            slot,
        );
        if let Some(reason) = end {
            self.close(slot, reason);
        }
    }

    fn drive(&mut self, slot: usize, input: Input<'_>, rx_ns: Option<u64>) {
        let Some(p) = self.peers[slot].as_mut() else {
            return;
        };
        if let Some(reason) = drive_peer(
            p,
            input,
            rx_ns,
            &self.cfg,
            &mut self.local,
            &self.stats,
            &mut self.heap,
            slot,
        ) {
            self.close(slot, reason);
        }
    }

    fn close(&mut self, slot: usize, reason: String) {
        let Some(mut p) = self.peers[slot].take() else {
            return;
        };
        self.epoll.remove(p.fd);
        self.publishers.retain(|&s| s != slot);
        p.rtc.disconnect();
        flush_transmits(&mut p);
        if let Some(d) = p.done.take() {
            let _ = d.send(Err(reason.clone()));
        }
        if !p.connected {
            self.local.connecting = self.local.connecting.saturating_sub(1);
        }
        if p.connected {
            if let ClientRole::Viewer(_) = p.role {
                self.stats.connected_viewers.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped_viewers.fetch_add(1, Ordering::Relaxed);
            }
            warn!(peer = p.label.as_str(), "connection lost: {reason}");
        } else {
            debug!(peer = p.label.as_str(), "did not connect: {reason}");
        }
        self.free.push(slot);
    }

    fn flush_stats(&mut self) {
        let l = &mut self.local;
        let s = &self.stats;
        for (a, v) in [
            (&s.received, &mut l.received),
            (&s.expected, &mut l.expected),
            (&s.duplicates, &mut l.duplicates),
            (&s.decrypted, &mut l.decrypted),
            (&s.unmatched, &mut l.unmatched),
            (&s.excluded_received, &mut l.excluded),
            (&s.published, &mut l.published),
            (&s.truncated, &mut l.truncated),
            (&s.timeouts, &mut l.timeouts),
            (&s.to_str0m, &mut l.to_str0m),
            (&s.recv_calls, &mut l.recv_calls),
            (&s.opened, &mut l.opened),
            (&s.open_failed, &mut l.open_failed),
            (&s.viewer_ssrcs, &mut l.viewer_ssrcs),
        ] {
            if *v > 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        }
        let ls = &mut l.samples;
        if !ls.latency_us.is_empty() || !ls.preroll_us.is_empty() || !ls.switch_us.is_empty() {
            let mut g = s.samples.lock().unwrap_or_else(|e| e.into_inner());
            g.latency_us.append(&mut ls.latency_us);
            g.preroll_us.append(&mut ls.preroll_us);
            g.switch_us.append(&mut ls.switch_us);
        }
    }

    fn shutdown(&mut self) {
        self.flush_stats();
        let mut closed = 0;
        for slot in 0..self.peers.len() {
            if let Some(mut p) = self.peers[slot].take() {
                self.epoll.remove(p.fd);
                p.rtc.disconnect();
                flush_transmits(&mut p);
                if let Some(d) = p.done.take() {
                    let _ = d.send(Err("the run ended before it connected".into()));
                }
                if p.connected {
                    if let ClientRole::Viewer(_) = p.role {
                        self.stats.connected_viewers.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                closed += 1;
            }
        }
        info!(
            thread = self.cfg.id,
            peers = closed,
            "load generator thread stopped"
        );
    }
}

fn flush_transmits(p: &mut ClientPeer) {
    while let Ok(Output::Transmit(t)) = p.rtc.poll_output() {
        let _ = p.socket.send_to(&t.contents, t.destination);
    }
}

/// A sampled viewer's decrypted payload of track `ssrc`: matched to its send time (added
/// latency, or a pre-roll's), checked against the viewer's excluded source, and fed to the
/// switch tracker.
fn on_media(
    v: &mut ClientViewer,
    ssrc: u32,
    payload: &[u8],
    rx_ns: u64,
    cfg: &EngineConfig,
    local: &mut Local,
) {
    local.decrypted += 1;
    match cfg.matcher.lookup(payload) {
        Some(m) if m.send_ns > 0 => {
            if v.excluded == Some(m.source as usize) {
                local.excluded += 1;
            }
            if let Some(k) = v.ssrcs.iter().position(|c| c.ssrc == ssrc) {
                if v.runs.len() <= k {
                    v.runs.resize_with(k + 1, RunSplit::default);
                }
                let samples = &mut local.samples;
                v.runs[k].on_packet(m.source as u32, m.send_ns, rx_ns, &mut |a| {
                    let (to, send, rx) = match a {
                        Arrival::Live { send_ns, rx_ns } => {
                            (&mut samples.latency_us, send_ns, rx_ns)
                        }
                        Arrival::Preroll { send_ns, rx_ns } => {
                            (&mut samples.preroll_us, send_ns, rx_ns)
                        }
                    };
                    match rx.checked_sub(send) {
                        Some(lat) if lat < MAX_LATENCY_NS => to.push((lat / 1000) as u32),
                        _ => {}
                    }
                });
            }
            if let Some(sw) = v.switch.as_mut() {
                if let Some(ns) = sw.on_packet(&cfg.matcher, &m, rx_ns) {
                    local.samples.switch_us.push((ns / 1000) as u32);
                }
            }
        }
        _ => local.unmatched += 1,
    }
}

/// Feeds one input to a peer and drains its output. Returns why the peer must end, if it must.
#[allow(clippy::too_many_arguments)]
fn drive_peer(
    p: &mut ClientPeer,
    input: Input<'_>,
    rx_ns: Option<u64>,
    cfg: &EngineConfig,
    local: &mut Local,
    stats: &ThreadStats,
    heap: &mut BinaryHeap<Reverse<(Instant, usize)>>,
    slot: usize,
) -> Option<String> {
    if let Err(e) = p.rtc.handle_input(input) {
        return Some(format!("str0m refused input: {e}"));
    }
    loop {
        if !p.rtc.is_alive() {
            return Some("the peer connection closed".into());
        }
        match p.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                if p.timeout != Some(t) {
                    p.timeout = Some(t);
                    heap.push(Reverse((t, slot)));
                }
                break;
            }
            Ok(Output::Transmit(t)) => {
                if let Err(e) = p.socket.send_to(&t.contents, t.destination) {
                    debug!(peer = p.label.as_str(), "udp send: {e}");
                }
            }
            Ok(Output::Event(ev)) => match ev {
                Event::Connected => {
                    let now = Instant::now();
                    if !p.connected {
                        local.connecting = local.connecting.saturating_sub(1);
                    }
                    p.connected = true;
                    if let Some(d) = p.done.take() {
                        let _ = d.send(Ok(now));
                    }
                    if let ClientRole::Viewer(v) = &mut p.role {
                        stats.connected_viewers.fetch_add(1, Ordering::Relaxed);
                        // The slot holds (material, profile, we were the DTLS client): the
                        // sender of what we open is the other side.
                        if let Some((material, profile, client)) =
                            v.keys.take().and_then(|k| k.take())
                        {
                            let mut g = stats.profiles.lock().unwrap_or_else(|e| e.into_inner());
                            *g.entry(format!("{profile:?}")).or_default() += 1;
                            drop(g);
                            if v.sampled && v.lean {
                                v.srtp = SrtpIn::new(&material, profile, !client);
                            }
                        }
                        if v.sampled {
                            v.switch = Some(SwitchTracker::new(cfg.sources.len(), realtime_ns()));
                        }
                    }
                    debug!(
                        peer = p.label.as_str(),
                        join_ms = now.duration_since(p.started).as_millis() as u64,
                        "connected"
                    );
                }
                Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    return Some("ICE disconnected (consent checks unanswered)".into());
                }
                Event::Closed => return Some("closed by the server".into()),
                Event::RtpPacket(pkt) => {
                    if let (ClientRole::Viewer(v), Some(rx)) = (&mut p.role, rx_ns) {
                        on_media(v, *pkt.header.ssrc, &pkt.payload, rx, cfg, local);
                    }
                }
                _ => {}
            },
            Err(e) => return Some(format!("str0m failed: {e}")),
        }
    }
    if !p.connected && p.started.elapsed() > cfg.join_timeout {
        return Some(format!(
            "ICE + DTLS did not complete within {:?}",
            cfg.join_timeout
        ));
    }
    None
}
