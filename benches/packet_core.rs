//! Per-packet and per-tick cost of the packet core.
//!
//! Every packet is a realistic Opus RTP packet as a browser sends it: 12-byte header, a 0xBEDE
//! one-byte extension block holding the RFC 6464 audio level at id 1, and an 80-byte Opus payload
//! whose TOC byte is 0x78 (hybrid, fullband, 20 ms, one frame): 100 bytes in all.
//!
//! Packets are prebuilt in a cycle (so the levels follow a speech pattern) and only their
//! sequence number and timestamp are patched in place on each iteration (6 stores), so the
//! sequence stays consecutive across the cycle as it does on the wire. Packet time advances by
//! 20 ms per packet.
//!
//! Groups:
//! - `parse_activity`: `RtpView::parse` + `VoiceActivity::observe_packet` (plus parse alone, a
//!   sender without the level extension, which takes the payload-size path, and a RED sender:
//!   the RED parse, the primary's activity and both per-viewer shapes).
//! - `rewrite`: `TrackRewriter::rewrite` + writing the result into a packet buffer in place with
//!   `RtpHeaderMut`; steady one source, and a track switching between two sources every 50.
//! - `on_packet`: the whole `StreamCore::on_packet` for a talker that holds a track in 1 and in
//!   10 groups (so 1 or 10 rewritten copies per packet), with a no-op sink.
//! - `selection_tick`: `StreamCore::tick` with 10 / 100 / 1000 live sources (5% talking, 10% in
//!   hangover, the rest room noise or DTX), with 1 group and with 50 distinct groups. The tick runs
//!   at a fixed packet time after a 2 s warm-up, i.e. the steady state of a tick that changes
//!   nothing, which is what almost every tick does.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use chorus::media::activity::{VadConfig, VoiceActivity};
use chorus::media::red::{write_red, RedLayout, RELAY_OPUS_PT, RELAY_RED_PT};
use chorus::media::rewrite::{Feed, InputPacket, TrackRewriter};
use chorus::media::rtp::{audio_level_byte, write_packet, HeaderFields, RtpHeaderMut, RtpView};
use chorus::media::selection::GroupKey;
use chorus::media::stream::{splitmix64, CoreConfig, Output, SourceConfig, StreamCore};
use chorus::media::SourceIdx;

const LEVEL_EXT_ID: u8 = 1;
const OPUS_PT: u8 = 111;
const FRAME_US: u64 = 20_000;
const FRAME_SAMPLES: u32 = 960;
const PAYLOAD_LEN: usize = 80;
/// Opus TOC: config 15 (hybrid fullband 20 ms), mono, code 0.
const TOC: u8 = 0x78;

fn opus_payload(salt: u64) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    for (i, b) in p.iter_mut().enumerate() {
        *b = splitmix64(salt ^ ((i as u64) << 20)) as u8;
    }
    p[0] = TOC;
    p
}

/// One packet with the RFC 6464 level (0 = loudest, 127 = silence) and V flag.
fn build_packet(ssrc: u32, seq: u16, ts: u32, level: u8, voice: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let hdr = HeaderFields {
        payload_type: OPUS_PT,
        sequence_number: seq,
        timestamp: ts,
        ssrc,
        marker: false,
    };
    let level_byte = [audio_level_byte(voice, level)];
    write_packet(&mut out, &hdr, &[(LEVEL_EXT_ID, &level_byte)], payload);
    out
}

/// Patches sequence number and timestamp in place (the only fields that change per packet).
#[inline(always)]
fn set_seq_ts(p: &mut [u8], seq: u16, ts: u32) {
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&ts.to_be_bytes());
}

/// A cycle of built packets replayed as one live source: each `next` patches the next packet's
/// sequence number and timestamp and advances the clock by a frame.
struct Replay {
    pkts: Vec<Vec<u8>>,
    i: usize,
    seq: u16,
    ts: u32,
    now: u64,
}

impl Replay {
    fn new(pkts: Vec<Vec<u8>>) -> Replay {
        Replay {
            pkts,
            i: 0,
            seq: 1000,
            ts: 77_000,
            now: 0,
        }
    }

    /// The next packet and the time it arrives (µs).
    #[inline(always)]
    fn next(&mut self) -> (&[u8], u64) {
        let at = self.i;
        self.i = if at + 1 == self.pkts.len() { 0 } else { at + 1 };
        let p = &mut self.pkts[at];
        set_seq_ts(p, self.seq, self.ts);
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(FRAME_SAMPLES);
        self.now += FRAME_US;
        (&p[..], self.now)
    }
}

/// Room noise around -66..-71 dBov.
fn room_level(r: u64) -> (u8, bool) {
    (66 + (r % 6) as u8, false)
}

/// A speaker taking turns: packet `i` of a 3 s cycle with 1.2 s of speech (syllables at
/// -18..-33 dBov with a short dip every 9 packets) and 1.8 s of room noise.
fn turn_taking_level(i: usize, salt: u64) -> (u8, bool) {
    let r = splitmix64(i as u64 ^ salt);
    let phase = i % 150;
    if phase < 60 {
        if phase % 9 == 8 {
            (48 + (r % 10) as u8, false)
        } else {
            (18 + (r % 16) as u8, true)
        }
    } else {
        room_level(r)
    }
}

/// A speaker who keeps talking: syllables with two packets of room noise between words every
/// 16 packets, so the noise floor stays at the room and the source never stops talking.
fn continuous_level(i: usize, salt: u64, loudness_offset: u8) -> (u8, bool) {
    let r = splitmix64(i as u64 ^ salt);
    // A 60 ms pause every 320 ms: the shortest gap the noise floor counts as room.
    if i % 16 >= 13 {
        room_level(r)
    } else {
        (18 + loudness_offset + (r % 14) as u8, true)
    }
}

fn config(c: Criterion) -> Criterion {
    c.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
}

fn bench_parse_activity(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_activity");
    let cfg = VadConfig::default();
    let payload = opus_payload(1);
    let cycle: Vec<Vec<u8>> = (0..150)
        .map(|i| {
            let (level, voice) = turn_taking_level(i, 0xA11CE);
            build_packet(0x1111_2222, 0, 0, level, voice, &payload)
        })
        .collect();

    g.bench_function("parse_only", |b| {
        let mut replay = Replay::new(cycle.clone());
        b.iter(|| {
            let (p, _) = replay.next();
            let v = RtpView::parse(black_box(p));
            black_box(v.map(|v| v.header_len()))
        })
    });

    g.bench_function("parse+observe_level_ext", |b| {
        let mut va = VoiceActivity::new(&cfg);
        let mut replay = Replay::new(cycle.clone());
        b.iter(|| {
            let (p, now) = replay.next();
            let t = match RtpView::parse(black_box(p)) {
                Ok(view) => Some(va.observe_packet(&cfg, now, &view, Some(LEVEL_EXT_ID))),
                Err(_) => None,
            };
            black_box(t)
        })
    });

    // Chrome's RED (one redundant block, the previous frame): the RTP parse, the RED parse, the
    // primary's activity, and the two shapes a packet takes for viewers with and without RED.
    g.bench_function("parse+red+observe_level_ext+shape", |b| {
        let mut red = Vec::new();
        write_red(&mut red, RELAY_OPUS_PT, &[(960, &payload[..])], &payload);
        let pkts: Vec<Vec<u8>> = (0..150)
            .map(|i| {
                let (level, voice) = turn_taking_level(i, 0xA11CE);
                let mut p = build_packet(0x1111_2222, 0, 0, level, voice, &red);
                p[1] = RELAY_RED_PT;
                p
            })
            .collect();
        let mut va = VoiceActivity::new(&cfg);
        let mut replay = Replay::new(pkts);
        b.iter(|| {
            let (p, now) = replay.next();
            let t = RtpView::parse(black_box(p)).ok().and_then(|view| {
                let l = RedLayout::parse(view.payload(), RELAY_OPUS_PT).ok()?;
                let opus = &view.payload()[l.primary()];
                let t = va.observe_opus(&cfg, now, &view, opus, Some(LEVEL_EXT_ID));
                Some((t, l.shape(true, 960).len(), l.shape(false, 960).len()))
            });
            black_box(t)
        })
    });

    // A sender without the level extension negotiated: activity from the payload size.
    g.bench_function("parse+observe_size_mode", |b| {
        let pkts: Vec<Vec<u8>> = (0..150)
            .map(|i| {
                let (level, _) = turn_taking_level(i, 0xA11CE);
                let len = if level < 40 { 80 } else { 60 };
                build_packet(0x1111_2222, 0, 0, level, false, &payload[..len])
            })
            .collect();
        let mut va = VoiceActivity::new(&cfg);
        let mut replay = Replay::new(pkts);
        b.iter(|| {
            let (p, now) = replay.next();
            let t = match RtpView::parse(black_box(p)) {
                Ok(view) => Some(va.observe_packet(&cfg, now, &view, None)),
                Err(_) => None,
            };
            black_box(t)
        })
    });
    g.finish();
}

/// Applies a rewrite result to a packet buffer in place, as the core does.
#[inline(always)]
fn apply(buf: &mut [u8], ssrc: u32, seq: u16, ts: u32, marker: bool) {
    if let Ok(mut hdr) = RtpHeaderMut::new(buf) {
        hdr.set_ssrc(ssrc);
        hdr.set_sequence_number(seq);
        hdr.set_timestamp(ts);
        hdr.set_marker(marker);
    }
}

fn bench_rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("rewrite");
    let payload = opus_payload(2);

    g.bench_function("steady_source", |b| {
        let mut buf = build_packet(0xAAAA_0001, 0, 0, 25, true, &payload);
        let mut rw = TrackRewriter::new(0x5EED_0001, 4321, 99_000);
        let (mut seq, mut ts, mut now) = (1000u16, 5_000_000u32, 0u64);
        b.iter(|| {
            let input = InputPacket {
                source: Feed::Source(SourceIdx(3)),
                ssrc: 0xAAAA_0001,
                seq,
                ts,
                marker: false,
                samples: FRAME_SAMPLES,
            };
            if let Ok(h) = rw.rewrite(now, black_box(&input)) {
                apply(&mut buf, h.ssrc, h.seq, h.ts, h.marker);
            }
            black_box(&mut buf);
            seq = seq.wrapping_add(1);
            ts = ts.wrapping_add(FRAME_SAMPLES);
            now += FRAME_US;
        })
    });

    // Two sources send all the time; the track carries A for 50 packets, then B for 50, ...
    g.bench_function("switch_every_50", |b| {
        let mut buf = build_packet(0xAAAA_0001, 0, 0, 25, true, &payload);
        let mut rw = TrackRewriter::new(0x5EED_0002, 4321, 99_000);
        let ssrcs = [0xAAAA_0001u32, 0xBBBB_0002];
        let mut seqs = [1000u16, 60_000];
        let mut tss = [5_000_000u32, 3_000_000_000];
        let (mut n, mut now) = (0u32, 0u64);
        b.iter(|| {
            let s = ((n / 50) & 1) as usize;
            let input = InputPacket {
                source: Feed::Source(SourceIdx(s as u32)),
                ssrc: ssrcs[s],
                seq: seqs[s],
                ts: tss[s],
                marker: false,
                samples: FRAME_SAMPLES,
            };
            if let Ok(h) = rw.rewrite(now, black_box(&input)) {
                apply(&mut buf, h.ssrc, h.seq, h.ts, h.marker);
            }
            black_box(&mut buf);
            for k in 0..2 {
                seqs[k] = seqs[k].wrapping_add(1);
                tss[k] = tss[k].wrapping_add(FRAME_SAMPLES);
            }
            n = n.wrapping_add(1);
            now += FRAME_US;
        })
    });
    g.finish();
}

/// A stream whose source 0 talks continuously and holds a track in `fanout` groups; sources
/// 1..=10 are live and send room noise. Returns the core, source 0's packet cycle with the
/// next seq / ts, and the next packet time.
struct FanoutSetup {
    core: StreamCore,
    pkts: Vec<Vec<u8>>,
    i: usize,
    seq: u16,
    ts: u32,
    now: u64,
}

fn fanout_setup(fanout: usize) -> FanoutSetup {
    let mut core = StreamCore::new(CoreConfig::default());
    let cfgs = SourceConfig {
        level_ext_id: Some(LEVEL_EXT_ID),
    };
    let srcs: Vec<SourceIdx> = (0..11)
        .map(|k| core.publish(&format!("src{k}"), cfgs.clone()))
        .collect();
    for gi in 0..fanout {
        let key = if fanout == 1 {
            GroupKey::new(3, None, [])
        } else {
            GroupKey::new(3, None, [srcs[gi + 1]])
        };
        core.join(key);
    }
    let payload = opus_payload(3);
    let pkts: Vec<Vec<u8>> = (0..160)
        .map(|i| {
            let (level, voice) = continuous_level(i, 0xB0B, 0);
            build_packet(0xCAFE_0000, 0, 0, level, voice, &payload)
        })
        .collect();
    let mut s = FanoutSetup {
        core,
        pkts,
        i: 0,
        seq: 30_000,
        ts: 1_000_000,
        now: 1_000_000,
    };
    let mut noise: Vec<Vec<u8>> = (1..11)
        .map(|k| build_packet(0xCAFE_0000 + k, 0, 0, 70, false, &payload))
        .collect();
    let mut sink = |o: Output| {
        black_box(o);
    };
    // 2 s of all sources, a tick every 20 ms.
    for step in 0..100u32 {
        on_packet_step(&mut s, &mut sink);
        for (k, p) in noise.iter_mut().enumerate() {
            set_seq_ts(p, step as u16, step * FRAME_SAMPLES);
            let _ = s.core.on_packet(s.now, srcs[k + 1], p, &mut sink);
        }
        s.core.tick(s.now, &mut sink);
    }
    assert_eq!(
        s.core.selector().placements(srcs[0]).len(),
        fanout,
        "the talker should hold a track in every group"
    );
    s
}

#[inline(always)]
fn on_packet_step(s: &mut FanoutSetup, sink: &mut impl FnMut(Output)) {
    let n = s.pkts.len();
    let p = &mut s.pkts[s.i];
    set_seq_ts(p, s.seq, s.ts);
    s.i = if s.i + 1 == n { 0 } else { s.i + 1 };
    s.seq = s.seq.wrapping_add(1);
    s.ts = s.ts.wrapping_add(FRAME_SAMPLES);
    s.now += FRAME_US;
    let r = s
        .core
        .on_packet(s.now, SourceIdx(0), black_box(&p[..]), sink);
    black_box(r).ok();
}

fn bench_on_packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("on_packet");
    for fanout in [1usize, 10] {
        g.bench_function(BenchmarkId::new("talker_groups", fanout), |b| {
            let mut s = fanout_setup(fanout);
            let before = s.core.stats().packets_out;
            let mut sink = |o: Output| {
                black_box(o);
            };
            b.iter(|| on_packet_step(&mut s, &mut sink));
            // Sanity: every measured packet went out to every group.
            let sent = s.core.stats().packets_out - before;
            assert!(sent > 0 && sent.is_multiple_of(fanout as u64));
        });
    }
    g.finish();
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Talker,
    Hangover,
    Dtx,
    Noise,
}

fn role(k: usize) -> Behaviour {
    match k % 20 {
        0 => Behaviour::Talker,
        1 | 2 => Behaviour::Hangover,
        3..=7 => Behaviour::Dtx,
        _ => Behaviour::Noise,
    }
}

/// `n` live sources fed 2 s of packets with a tick every 20 ms, `groups` distinct groups.
/// Returns the core and the packet time at which to tick.
fn tick_setup(n: usize, groups: usize) -> (StreamCore, u64) {
    let mut core = StreamCore::new(CoreConfig::default());
    let cfgs = SourceConfig {
        level_ext_id: Some(LEVEL_EXT_ID),
    };
    let srcs: Vec<SourceIdx> = (0..n)
        .map(|k| core.publish(&format!("src{k}"), cfgs.clone()))
        .collect();
    for gi in 0..groups {
        let key = if groups == 1 {
            GroupKey::new(3, None, [])
        } else {
            // Each group excludes a different source (for n < 50 some of them have not
            // published: a viewer may exclude a source before it publishes).
            GroupKey::new(3, None, [SourceIdx(gi as u32)])
        };
        core.join(key);
    }
    let payload = opus_payload(4);
    let dtx_payload = [TOC];
    let mut buf = Vec::with_capacity(128);
    let mut sink = |o: Output| {
        black_box(o);
    };
    let mut seqs = vec![0u16; n];
    let mut tss: Vec<u32> = (0..n).map(|k| splitmix64(k as u64) as u32).collect();
    let steps = 100usize;
    for step in 0..steps {
        let now = step as u64 * FRAME_US;
        for k in 0..n {
            let r = splitmix64((k * 1_000_003 + step) as u64);
            let (level, voice, dtx) = match role(k) {
                // Talkers start at 0.6 s, each with its own loudness so scores differ.
                Behaviour::Talker if step >= 30 => {
                    let (l, v) = continuous_level(step, k as u64, ((k / 20) % 10) as u8);
                    (l, v, false)
                }
                // Talking from 0.2 s to 1.4 s: about 0.6 s into their hangover at 2 s.
                Behaviour::Hangover if (10..70).contains(&step) => {
                    let (l, v) = continuous_level(step, k as u64, 4);
                    (l, v, false)
                }
                // Room noise until 0.5 s, then DTX: one frame every 400 ms.
                Behaviour::Dtx if step >= 25 => {
                    if (step + k) % 20 != 0 {
                        tss[k] = tss[k].wrapping_add(FRAME_SAMPLES);
                        continue;
                    }
                    (127, false, true)
                }
                _ => {
                    let (l, v) = room_level(r);
                    (l, v, false)
                }
            };
            let hdr = HeaderFields {
                payload_type: OPUS_PT,
                sequence_number: seqs[k],
                timestamp: tss[k],
                ssrc: 0xD000_0000 + k as u32,
                marker: false,
            };
            let pl: &[u8] = if dtx { &dtx_payload } else { &payload };
            write_packet(
                &mut buf,
                &hdr,
                &[(LEVEL_EXT_ID, &[audio_level_byte(voice, level)])],
                pl,
            );
            seqs[k] = seqs[k].wrapping_add(1);
            tss[k] = tss[k].wrapping_add(FRAME_SAMPLES);
            core.on_packet(now, srcs[k], &buf, &mut sink)
                .expect("well-formed packet of a live source");
        }
        core.tick(now, &mut sink);
    }
    let at = steps as u64 * FRAME_US - FRAME_US + 10_000;
    // Settle whatever this tick decides, so the measured ticks are the steady state.
    core.tick(at, &mut sink);
    let talking = srcs
        .iter()
        .filter(|&&s| core.voice(s, at) == chorus::media::activity::Voice::Talking)
        .count();
    assert_eq!(
        talking,
        n.div_ceil(20),
        "about 5% of the sources should be talking"
    );
    (core, at)
}

fn bench_selection_tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("selection_tick");
    for groups in [1usize, 50] {
        for n in [10usize, 100, 1000] {
            let name = if groups == 1 { "1_group" } else { "50_groups" };
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                let (mut core, at) = tick_setup(n, groups);
                let switches = core.stats().switches;
                let mut sink = |o: Output| {
                    black_box(o);
                };
                b.iter(|| core.tick(black_box(at), &mut sink));
                assert_eq!(
                    core.stats().switches,
                    switches,
                    "steady-state ticks should change nothing"
                );
            });
        }
    }
    g.finish();
}

/// The edge core's whole packet path for one relayed datagram of a talker: one parse, the
/// packet core (activity, selection, one rewrite per group), then one `Write` per viewer of the
/// group, polled and dropped (the driver's seal and send are `edge_send`'s).
fn bench_edge_core(c: &mut Criterion) {
    use bytes::Bytes;
    use chorus::edge::core::{EdgeCore, Join, Output as EdgeOutput, Relayed};
    use chorus::relay::proto::{DatagramHeader, Kind, SourceInfo, TrackInfo};
    use chorus::rtc::peers::PeerId;

    let mut g = c.benchmark_group("edge_core");
    let payload = opus_payload(5);
    let hdr = DatagramHeader {
        channel: 1,
        source: 0,
        kind: Kind::Audio,
        sent_ms: 0,
    };
    // Prebuilt datagrams (a Bytes is immutable): 20 000 consecutive packets, then a restart.
    let datagrams: Vec<Bytes> = (0..20_000u32)
        .map(|i| {
            let (level, voice) = continuous_level(i as usize, 0xB0B, 0);
            let seq = i as u16;
            let mut d = Vec::with_capacity(128);
            hdr.write(&mut d);
            d.extend(build_packet(
                0xCAFE_0000,
                seq,
                i * FRAME_SAMPLES,
                level,
                voice,
                &payload,
            ));
            let b = Bytes::from(d);
            drop(b.clone());
            b
        })
        .collect();
    for viewers in [1u64, 100] {
        g.bench_function(BenchmarkId::new("handle_packet_viewers", viewers), |b| {
            let mut core = EdgeCore::new(Default::default(), Default::default(), 3);
            for id in 0..viewers {
                core.handle_join(
                    0,
                    PeerId(id),
                    Join {
                        stream: "s".into(),
                        tracks: ["1", "2", "3"].into_iter().map(Into::into).collect(),
                        ..Join::default()
                    },
                );
            }
            let info = SourceInfo {
                index: 0,
                source_id: Some("talker".into()),
                tracks: vec![TrackInfo {
                    media: "audio".into(),
                    mid: "0".into(),
                }],
                audio_level: true,
            };
            core.handle_sources(0, "s", 1, vec![info]);
            let (mut i, mut now) = (0usize, 0u64);
            let mut step = |core: &mut EdgeCore| {
                now += FRAME_US;
                let p = Relayed {
                    hdr,
                    data: datagrams[i].clone(),
                    arrived_us: now,
                };
                i = if i + 1 == datagrams.len() { 0 } else { i + 1 };
                core.handle_packet(now, p);
                core.handle_timeout(now);
                let mut n = 0;
                while let Some(o) = core.poll_output() {
                    if let EdgeOutput::Write(w) = o {
                        black_box(&w);
                        n += 1;
                    }
                }
                n
            };
            for _ in 0..100 {
                step(&mut core);
            }
            assert_eq!(
                step(&mut core),
                viewers,
                "the talker should reach every viewer"
            );
            b.iter(|| step(&mut core));
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config(Criterion::default());
    targets = bench_parse_activity, bench_rewrite, bench_on_packet, bench_selection_tick, bench_edge_core
}
criterion_main!(benches);
