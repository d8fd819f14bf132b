//! The packet path does not allocate: once a stream is warmed up (sources published, groups
//! joined, tracks assigned, every buffer grown), `StreamCore::on_packet` and `StreamCore::tick`
//! perform zero heap allocations, whatever the packets: forwarded to one or several groups,
//! switching tracks, late, in DTX, or dropped as malformed, too large or of an unknown source.
//!
//! A counting global allocator counts only while this test thread has armed it, and only inside
//! the core calls (building the input packets is the driver's business). The first few
//! allocations it sees print a backtrace, so a failure names the exact place.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chorus::media::rtp::{audio_level_byte, write_packet, HeaderFields};
use chorus::media::selection::GroupKey;
use chorus::media::stream::{CoreConfig, Output, SourceConfig, StreamCore};
use chorus::media::SourceIdx;

struct CountingAlloc;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static ALLOC_BYTES: AtomicUsize = AtomicUsize::new(0);
static FREES: AtomicUsize = AtomicUsize::new(0);
static BACKTRACES: AtomicUsize = AtomicUsize::new(0);
/// Print a backtrace for the first allocations (set for the measured phase only).
static TRACE: AtomicBool = AtomicBool::new(false);
const MAX_BACKTRACES: usize = 3;

thread_local! {
    /// Counting is on for this thread only while set.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

fn armed() -> bool {
    ARMED.try_with(Cell::get).unwrap_or(false)
}

fn on_alloc(size: usize, what: &str) {
    if !armed() {
        return;
    }
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    ALLOC_BYTES.fetch_add(size, Ordering::Relaxed);
    if TRACE.load(Ordering::Relaxed) && BACKTRACES.fetch_add(1, Ordering::Relaxed) < MAX_BACKTRACES
    {
        // Disarmed while capturing and printing: their own allocations are not counted.
        ARMED.with(|a| a.set(false));
        let bt = std::backtrace::Backtrace::force_capture();
        eprintln!("no_alloc: {what} of {size} bytes on the packet path:\n{bt}");
        ARMED.with(|a| a.set(true));
    }
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size(), "alloc");
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size(), "alloc_zeroed");
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_alloc(new_size, "realloc");
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if armed() {
            FREES.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The counters are global: the tests of this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with allocation counting armed on this thread.
#[inline(never)]
fn counted<R>(f: impl FnOnce() -> R) -> R {
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    r
}

const LEVEL_EXT_ID: u8 = 1;
const FRAME_US: u64 = 20_000;
const FRAME_SAMPLES: u32 = 960;
/// The talk script repeats every 2 s (100 frames).
const PERIOD_FRAMES: u64 = 100;

fn mix(x: u64) -> u64 {
    chorus::media::stream::splitmix64(x)
}

/// Is source `k` talking in frame `f` of the 2 s script? Overlapping turns, so that the 2-track
/// group has contention and the 3-track groups fill up.
fn talking(k: usize, f: u64) -> bool {
    let p = f % PERIOD_FRAMES;
    match k {
        0 => p < 60,
        1 => (40..90).contains(&p),
        2 => (20..46).contains(&p) || (70..96).contains(&p),
        3 => p >= 50,
        4 => (10..15).contains(&p),
        5 => p < 30,
        _ => false,
    }
}

/// Source 4 goes into DTX for the second half of the script: one frame every 400 ms.
fn in_dtx(k: usize, f: u64) -> bool {
    k == 4 && f % PERIOD_FRAMES >= 50
}

struct Source {
    idx: SourceIdx,
    ssrc: u32,
    seq: u16,
    ts: u32,
    buf: Vec<u8>,
    /// Previous packet held back to be delivered after its successor (reordering).
    held: Vec<u8>,
}

struct Driver {
    core: StreamCore,
    sources: Vec<Source>,
    payload: [u8; 80],
    malformed: Vec<Vec<u8>>,
    too_large: Vec<u8>,
    /// Per on_packet call: how many packets went out and to which groups.
    out_packets: usize,
    out_groups: u64,
    calls: usize,
    calls_multi_group: usize,
    track_changes: usize,
}

impl Driver {
    /// Builds (outside the counted region) source `k`'s packet for frame `f`, or None when it
    /// sends nothing in that frame (DTX).
    fn build(&mut self, k: usize, f: u64) -> bool {
        let r = mix(f << 8 | k as u64);
        let s = &mut self.sources[k];
        let seq = s.seq;
        let ts = s.ts;
        s.ts = s.ts.wrapping_add(FRAME_SAMPLES);
        if in_dtx(k, f) && !f.is_multiple_of(20) {
            return false;
        }
        s.seq = s.seq.wrapping_add(1);
        let (level, voice, payload_len) = if in_dtx(k, f) {
            (127, false, 1)
        } else if talking(k, f) && f % 16 < 14 {
            (
                18 + (r % 16) as u8,
                true,
                if k == 5 { 80 } else { 72 + (r % 9) as usize },
            )
        } else {
            (
                66 + (r % 6) as u8,
                false,
                if k == 5 { 58 + (r % 4) as usize } else { 40 },
            )
        };
        let hdr = HeaderFields {
            payload_type: 111,
            sequence_number: seq,
            timestamp: ts,
            ssrc: s.ssrc,
            marker: false,
        };
        let level_byte = [audio_level_byte(voice, level)];
        let cap = s.buf.capacity();
        write_packet(
            &mut s.buf,
            &hdr,
            &[(LEVEL_EXT_ID, &level_byte)],
            &self.payload[..payload_len],
        );
        debug_assert_eq!(cap, s.buf.capacity());
        true
    }

    /// One on_packet call, counted; records what it sent.
    fn deliver(&mut self, now_us: u64, s: SourceIdx, packet: &[u8]) {
        let (mut n, mut groups, mut tracks) = (0usize, 0u64, 0usize);
        let core = &mut self.core;
        let _ = counted(|| {
            core.on_packet(now_us, s, packet, &mut |o: Output| match o {
                Output::Packet { group, header, .. } => {
                    std::hint::black_box(header);
                    n += 1;
                    groups |= 1 << (group.0 % 64);
                }
                Output::Track(_) => tracks += 1,
                Output::Ending { header, .. } | Output::Preroll { header, .. } => {
                    std::hint::black_box(header);
                }
            })
        });
        self.out_packets += n;
        self.out_groups |= groups;
        self.calls += 1;
        if groups.count_ones() >= 2 {
            self.calls_multi_group += 1;
        }
        self.track_changes += tracks;
    }

    fn tick(&mut self, now_us: u64) {
        let mut tracks = 0usize;
        let core = &mut self.core;
        counted(|| {
            core.tick(now_us, &mut |o: Output| {
                if let Output::Track(_) = o {
                    tracks += 1;
                }
            })
        });
        self.track_changes += tracks;
    }

    /// Frame `f`: every source's packet, spread over the 20 ms, with a tick every 10 ms; one
    /// reordered pair every so often, and a bad packet every 7th frame. Stops after `limit`
    /// on_packet calls.
    fn frame(&mut self, f: u64, limit: usize) {
        let t0 = f * FRAME_US;
        for half in 0..2u64 {
            for k in (0..self.sources.len()).filter(|k| *k as u64 % 2 == half) {
                if self.calls >= limit {
                    return;
                }
                let now = t0 + half * 10_000 + k as u64 * 1_500 + mix(f ^ k as u64) % 1_000;
                if !self.build(k, f) {
                    continue;
                }
                let idx = self.sources[k].idx;
                // Source 2: every 23rd packet is held back and delivered after the next one.
                if k == 2 && f.is_multiple_of(23) {
                    let s = &mut self.sources[k];
                    std::mem::swap(&mut s.buf, &mut s.held);
                    continue;
                }
                let buf = std::mem::take(&mut self.sources[k].buf);
                self.deliver(now, idx, &buf);
                self.sources[k].buf = buf;
                if k == 2 && f % 23 == 1 && self.calls < limit {
                    let held = std::mem::take(&mut self.sources[k].held);
                    self.deliver(now + 200, idx, &held);
                    self.sources[k].held = held;
                }
            }
            if f % 7 == 3 && half == 1 && self.calls < limit {
                // Malformed (cycling through the kinds), too large, or of an unknown source.
                let which = (f / 7) as usize % (self.malformed.len() + 2);
                let now = t0 + 15_000;
                if which < self.malformed.len() {
                    let bad = std::mem::take(&mut self.malformed[which]);
                    self.deliver(now, SourceIdx((f % 6) as u32), &bad);
                    self.malformed[which] = bad;
                } else if which == self.malformed.len() {
                    let big = std::mem::take(&mut self.too_large);
                    self.deliver(now, SourceIdx(1), &big);
                    self.too_large = big;
                } else {
                    let mut good = std::mem::take(&mut self.sources[0].buf);
                    good[0] = 0x90;
                    self.deliver(now, SourceIdx(4242), &good);
                    self.sources[0].buf = good;
                }
            }
            self.tick(t0 + half * 10_000 + 10_000);
        }
    }
}

#[test]
fn packet_path_does_not_allocate_once_warm() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    ALLOCS.store(0, Ordering::Relaxed);
    ALLOC_BYTES.store(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
    let mut core = StreamCore::new(CoreConfig {
        seed: 7,
        ..Default::default()
    });
    let names = ["host", "ana", "bo", "cy", "dee", "eli"];
    let mut sources = Vec::new();
    for (k, name) in names.iter().enumerate() {
        // "eli" did not negotiate the level extension: size mode.
        let level_ext_id = (k != 5).then_some(LEVEL_EXT_ID);
        let idx = core.publish(name, SourceConfig { level_ext_id });
        sources.push(Source {
            idx,
            ssrc: 0x5000_0000 + k as u32,
            seq: mix(k as u64) as u16,
            ts: mix(k as u64 + 100) as u32,
            buf: Vec::with_capacity(256),
            held: Vec::with_capacity(256),
        });
    }
    let host = sources[0].idx;
    let ana = sources[1].idx;
    let eli = sources[5].idx;
    // Everyone, 3 tracks (two viewers share it); the host pinned, eli excluded, 2 tracks;
    // ana's own view: 3 tracks without herself.
    let everyone = core.join(GroupKey::new(3, None, []));
    assert_eq!(core.join(GroupKey::new(3, None, [])), everyone);
    core.join(GroupKey::new(2, Some(host), [eli]));
    core.join(GroupKey::new(3, None, [ana]));

    let mut payload = [0u8; 80];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = mix(i as u64) as u8;
    }
    payload[0] = 0x78;

    let malformed = vec![
        // Shorter than the fixed header.
        vec![0x80, 111, 0, 1, 0, 0],
        // Version 1.
        vec![0x40, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0x78, 1, 2],
        // Three CSRCs announced, none present.
        vec![0x83, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3],
        // Extension block of 9 words, 2 bytes present.
        vec![
            0x90, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xBE, 0xDE, 0, 9, 0x10, 0x40,
        ],
        // Padding count of zero.
        vec![0xA0, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0x78, 1, 0],
    ];

    let mut d = Driver {
        core,
        sources,
        payload,
        malformed,
        too_large: vec![0x80; 1500],
        out_packets: 0,
        out_groups: 0,
        calls: 0,
        calls_multi_group: 0,
        track_changes: 0,
    };

    // The counter sees an allocation made on this thread while armed, and only then.
    let boxed = counted(|| Box::new(std::hint::black_box(42u64)));
    drop(boxed);
    assert_eq!(
        ALLOCS.swap(0, Ordering::Relaxed),
        1,
        "the counting allocator is not in use"
    );

    // Warm-up: one full period of the script (2 s), so tracks are assigned and every buffer
    // has grown to what the script needs. Counted, but not held against the core.
    let mut f = 0u64;
    while f < PERIOD_FRAMES {
        d.frame(f, usize::MAX);
        f += 1;
    }
    let warm_allocs = ALLOCS.swap(0, Ordering::Relaxed);
    let warm_bytes = ALLOC_BYTES.swap(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
    eprintln!(
        "no_alloc: warm-up of {} calls: {warm_allocs} allocations ({warm_bytes} bytes) while \
         the core's buffers grew",
        d.calls
    );
    TRACE.store(true, Ordering::Relaxed);
    assert!(d.out_packets > 0, "warm-up forwarded nothing");
    assert!(
        d.core.selector().tracks(everyone).any(|t| t.is_some()),
        "no track assigned after warm-up"
    );

    let stats0 = d.core.stats().clone();
    let (out0, calls0, multi0, changes0) =
        (d.out_packets, d.calls, d.calls_multi_group, d.track_changes);
    let limit = calls0 + 10_000;
    while d.calls < limit {
        d.frame(f, limit);
        f += 1;
    }
    let allocs = ALLOCS.load(Ordering::Relaxed);
    let bytes = ALLOC_BYTES.load(Ordering::Relaxed);
    let frees = FREES.load(Ordering::Relaxed);
    let stats = d.core.stats().clone();

    let calls = d.calls - calls0;
    let forwarded = d.out_packets - out0;
    let multi = d.calls_multi_group - multi0;
    let changes = d.track_changes - changes0;
    eprintln!(
        "no_alloc: {calls} on_packet calls over {:.1} s of packet time: {forwarded} packets out, \
         {multi} calls forwarded to 2+ groups, {changes} track changes, {} onsets, \
         {} malformed, {} too large, {} unknown source, {} late before a switch; \
         {allocs} allocations ({bytes} bytes), {frees} frees",
        (f - PERIOD_FRAMES) as f64 * FRAME_US as f64 / 1e6,
        stats.onsets - stats0.onsets,
        stats.dropped_malformed - stats0.dropped_malformed,
        stats.dropped_too_large - stats0.dropped_too_large,
        stats.dropped_unknown_source - stats0.dropped_unknown_source,
        stats.dropped_before_switch - stats0.dropped_before_switch,
    );

    // The run exercised what it claims to.
    assert_eq!(calls, 10_000);
    assert!(
        multi > 1_000,
        "too few packets forwarded to several groups: {multi}"
    );
    assert!(changes > 20, "too few track changes: {changes}");
    assert!(stats.onsets > stats0.onsets);
    assert!(stats.dropped_malformed - stats0.dropped_malformed >= 50);
    assert!(stats.dropped_too_large > stats0.dropped_too_large);
    assert!(stats.dropped_unknown_source > stats0.dropped_unknown_source);

    assert_eq!(
        (allocs, frees),
        (0, 0),
        "the packet path allocated {allocs} times ({bytes} bytes) and freed {frees} times; \
         see the backtraces printed above"
    );
}

/// The edge's lean send path per viewer: rewrite, header, AES-GCM seal, counts and NACK
/// history (a refcount on the payload), queue on the send batch (and its sendmmsg when the
/// batch fills) allocates nothing once warm.
#[test]
fn direct_send_path_does_not_allocate_once_warm() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    ALLOCS.store(0, Ordering::Relaxed);
    ALLOC_BYTES.store(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
    use chorus::edge::loopback::pair;
    use chorus::edge::viewer::Sent;
    use chorus::media::rewrite::{Feed, InputPacket};
    use chorus::net::send::SendBatch;
    use chorus::rtc::peers::{PeerOut, Sink};
    use std::time::Instant;

    let mut p = pair(9, 3, false);
    let now = Instant::now();
    let mut lean = p.go_lean(now).expect("AES-GCM negotiated");
    // Nobody listens at the client's address: the kernel drops it, the sends still happen.
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut batch = SendBatch::default();
    let mut scratch = Vec::with_capacity(1500);
    let payload = bytes::Bytes::from(vec![0x78u8; 80]);
    // Every other packet RED (this viewer did not negotiate it: its primary, unwrapped).
    let mut red = Vec::new();
    chorus::media::red::write_red(&mut red, 111, &[(960, &[0x78; 80])], &[0x78; 80]);
    let red = bytes::Bytes::from(red);
    let layout = chorus::media::red::RedLayout::parse(&red, 111).unwrap();
    let (mut direct, mut direct_allocs, mut direct_frees) = (0u32, 0usize, 0usize);
    for i in 0..6_000u16 {
        let input = InputPacket {
            source: Feed::Source(SourceIdx(1)),
            ssrc: 5,
            seq: i,
            ts: i as u32 * 960,
            marker: false,
            samples: 960,
        };
        let t = &mut p.tracks[(i % 3) as usize];
        let d = PeerOut::Lean {
            lean: &mut lean,
            sink: Sink::new(&tx, &mut batch),
            scratch: &mut scratch,
        };
        let (a0, f0) = (
            ALLOCS.load(Ordering::Relaxed),
            FREES.load(Ordering::Relaxed),
        );
        let sent = counted(|| {
            if i % 2 == 0 {
                t.write(
                    d,
                    i as u64 * 20_000,
                    now,
                    &input,
                    Some((true, 40)),
                    &payload,
                )
            } else {
                let at = i as u64 * 20_000;
                let reach = (i % 4) as u32 * 480;
                t.write_red(
                    d,
                    at,
                    now,
                    &input,
                    Some((true, 40)),
                    &red,
                    Some(&layout),
                    reach,
                )
                .0
            }
        });
        // Warm-up: the first packets read what str0m negotiated and set the anchors.
        if sent == Sent::Direct && i >= 300 {
            direct += 1;
            direct_allocs += ALLOCS.load(Ordering::Relaxed) - a0;
            direct_frees += FREES.load(Ordering::Relaxed) - f0;
        }
    }
    assert!(direct > 5_600, "too few direct packets: {direct}");
    assert_eq!(
        (direct_allocs, direct_frees),
        (0, 0),
        "the direct path allocated"
    );
}

/// The edge core's packet path: a relayed datagram parsed once, its main-track writes, the
/// packet core's group rewrites and a write per viewer of each group, drained by a driver that
/// drops them, allocates nothing once warm (the payload is a slice of the datagram, the output
/// queue keeps its capacity, a `vad` shares its names). Ticks are not counted: a talking flip
/// builds the origin's `Talking` request (its strings), once per flip, not per packet.
#[test]
fn edge_core_packet_path_does_not_allocate_once_warm() {
    use bytes::Bytes;
    use chorus::edge::core::{EdgeCore, Join, Output as EdgeOutput, Relayed};
    use chorus::relay::proto::{DatagramHeader, Kind, SourceInfo, TrackInfo};
    use chorus::rtc::peers::PeerId;
    use str0m::media::Mid;

    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    ALLOCS.store(0, Ordering::Relaxed);
    ALLOC_BYTES.store(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
    let mut core = EdgeCore::new(Default::default(), Default::default(), 7);
    let names = ["host", "ana", "bo", "cy", "dee", "eli"];
    let mids: Vec<Mid> = ["1", "2", "3"].into_iter().map(Mid::from).collect();
    // 60 viewers in three groups: everyone (3 tracks), the host pinned (2 tracks, eli
    // excluded), ana's own view.
    for id in 0..60u64 {
        let (pinned, excluded, n) = match id % 3 {
            0 => (None, vec![], 3),
            1 => (Some("host".to_string()), vec!["eli".to_string()], 2),
            _ => (None, vec!["ana".to_string()], 3),
        };
        core.handle_join(
            0,
            PeerId(id),
            Join {
                stream: "panel".into(),
                pinned,
                excluded,
                main_video: None,
                tracks: mids[..n].to_vec(),
            },
        );
    }
    let sources: Vec<SourceInfo> = names
        .iter()
        .enumerate()
        .map(|(k, n)| SourceInfo {
            index: k as u16,
            source_id: Some(n.to_string()),
            tracks: vec![TrackInfo {
                media: "audio".into(),
                mid: "0".into(),
            }],
            audio_level: k != 5,
        })
        .collect();
    core.handle_sources(0, "panel", 1, sources);
    while core.poll_output().is_some() {}

    let mut payload = [0u8; 80];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = mix(i as u64) as u8;
    }
    payload[0] = 0x78;
    let mut seqs = [0u16; 6];
    // Every datagram is kept until the end: its memory is the driver's, not the core's.
    let mut keep: Vec<Bytes> = Vec::with_capacity(8 * PERIOD_FRAMES as usize * 6);
    let (mut writes, mut events) = (0usize, 0usize);
    let mut step = |core: &mut EdgeCore, f: u64, keep: &mut Vec<Bytes>| {
        let (mut writes, mut events) = (0usize, 0usize);
        let t0 = f * FRAME_US;
        for (k, seq) in seqs.iter_mut().enumerate() {
            let now = t0 + k as u64 * 1_500;
            let mut data = Vec::with_capacity(128);
            let hdr = DatagramHeader {
                channel: 1,
                source: k as u16,
                kind: Kind::Audio,
                sent_ms: 0,
            };
            hdr.write(&mut data);
            let (level, voice) = if talking(k, f) && f % 16 < 14 {
                (18 + (mix(f << 8 | k as u64) % 16) as u8, true)
            } else {
                (66 + (mix(f ^ k as u64) % 6) as u8, false)
            };
            let fields = HeaderFields {
                payload_type: 111,
                sequence_number: *seq,
                timestamp: *seq as u32 * FRAME_SAMPLES,
                ssrc: 0x5000_0000 + k as u32,
                marker: false,
            };
            *seq = seq.wrapping_add(1);
            let mut rtp = Vec::with_capacity(128);
            let level_byte = [audio_level_byte(voice, level)];
            write_packet(&mut rtp, &fields, &[(LEVEL_EXT_ID, &level_byte)], &payload);
            data.extend_from_slice(&rtp);
            let data = Bytes::from(data);
            keep.push(data.clone());
            let p = Relayed {
                hdr,
                data,
                arrived_us: now,
            };
            counted(|| {
                core.handle_packet(now, p);
                while let Some(o) = core.poll_output() {
                    match o {
                        EdgeOutput::Write(w) => {
                            std::hint::black_box(&w);
                            writes += 1;
                        }
                        EdgeOutput::Event(..) => events += 1,
                        EdgeOutput::Link(_) => {}
                    }
                }
            });
        }
        for half in 1..=2 {
            core.handle_timeout(t0 + half * 10_000);
            while core.poll_output().is_some() {}
        }
        (writes, events)
    };
    for f in 0..2 * PERIOD_FRAMES {
        let (w, e) = step(&mut core, f, &mut keep);
        (writes, events) = (writes + w, events + e);
    }
    // The warm-up's datagrams stay kept too: the core's pre-roll slots still hold some, and
    // their memory is freed by whoever drops the last reference (the driver, not the core).
    let warm = ALLOCS.swap(0, Ordering::Relaxed);
    ALLOC_BYTES.store(0, Ordering::Relaxed);
    FREES.store(0, Ordering::Relaxed);
    eprintln!("no_alloc: edge core warm-up: {warm} allocations while its queue grew");
    assert!(writes > 0, "warm-up wrote nothing");
    TRACE.store(true, Ordering::Relaxed);
    let (w0, e0) = (writes, events);
    for f in 2 * PERIOD_FRAMES..8 * PERIOD_FRAMES {
        let (w, e) = step(&mut core, f, &mut keep);
        (writes, events) = (writes + w, events + e);
    }
    TRACE.store(false, Ordering::Relaxed);
    let (allocs, bytes, frees) = (
        ALLOCS.load(Ordering::Relaxed),
        ALLOC_BYTES.load(Ordering::Relaxed),
        FREES.load(Ordering::Relaxed),
    );
    let (writes, events) = (writes - w0, events - e0);
    eprintln!(
        "no_alloc: edge core: {} relayed packets, {writes} viewer writes, {events} events; \
         {allocs} allocations ({bytes} bytes), {frees} frees",
        6 * 6 * PERIOD_FRAMES
    );
    assert!(writes > 10_000, "too few writes: {writes}");
    assert!(events > 20, "too few events (track changes): {events}");
    assert_eq!(
        (allocs, frees),
        (0, 0),
        "the edge core's packet path allocated {allocs} times ({bytes} bytes)"
    );
}
