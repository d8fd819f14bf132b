//! Property tests of the packet core: rewriting continuity under any switches, losses and
//! reorders; exclusion and pinning under any activity; steady noise never gets a slot; the RTP
//! view never panics and round-trips what the writer wrote.

use std::collections::HashSet;

use proptest::prelude::*;

use chorus::media::activity::{Measurement, VadConfig, VoiceActivity};
use chorus::media::rewrite::{Feed, InputPacket, TrackRewriter};
use chorus::media::rtp::{write_packet, HeaderFields, RtpView};
use chorus::media::selection::GroupKey;
use chorus::media::stream::{CoreConfig, Output, SourceConfig, StreamCore};
use chorus::media::SourceIdx;

#[derive(Debug, Clone)]
enum Op {
    /// The next packet of the track's current source: `skip` lost packets before it, and
    /// optionally delivered after its successor (reorder) or twice (duplicate).
    Packet { skip: u8, reorder: bool, dup: bool },
    /// The track switches to another source (the selection changed).
    Switch { to: u8, pause_ms: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, any::<bool>(), any::<bool>()).prop_map(|(skip, r, d)| Op::Packet {
            skip: if skip == 3 { 2 } else { 0 },
            reorder: r && skip == 0,
            dup: d && skip == 1,
        }),
        1 => (0u8..4, 0u16..2000).prop_map(|(to, pause_ms)| Op::Switch { to, pause_ms }),
    ]
}

struct SourceGen {
    ssrc: u32,
    seq: u16,
    ts: u32,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rewriting_is_continuous_across_switches_losses_and_reorders(
        ops in prop::collection::vec(op(), 1..300),
        starts in prop::collection::vec((any::<u32>(), any::<u16>(), any::<u32>()), 4),
        first_seq in any::<u16>(),
        first_ts in any::<u32>(),
    ) {
        let mut gens: Vec<SourceGen> = starts.iter().map(|&(ssrc, seq, ts)| SourceGen { ssrc, seq, ts }).collect();
        let mut r = TrackRewriter::new(0xC0FFEE, first_seq, first_ts);
        let mut current = 0usize;
        let mut now = 0u64;
        // Output packets in send order: (period, out_seq, out_ts, in_seq, in_ts, marker).
        let mut out: Vec<(usize, u16, u32, u16, u32, bool)> = Vec::new();
        let mut period = 0usize;
        let mut pending: Option<InputPacket> = None;
        let feed = |r: &mut TrackRewriter, now: u64, p: &InputPacket, period: usize, out: &mut Vec<_>| {
            if let Ok(h) = r.rewrite(now, p) {
                assert_eq!(h.ssrc, 0xC0FFEE);
                out.push((period, h.seq, h.ts, p.seq, p.ts, h.marker));
            }
        };
        for op in ops {
            match op {
                Op::Switch { to, pause_ms } => {
                    if let Some(p) = pending.take() {
                        feed(&mut r, now, &p, period, &mut out);
                    }
                    current = to as usize;
                    now += pause_ms as u64 * 1000;
                    r.detach();
                    period += 1;
                }
                Op::Packet { skip, reorder, dup } => {
                    let g = &mut gens[current];
                    g.seq = g.seq.wrapping_add(skip as u16);
                    g.ts = g.ts.wrapping_add(960 * skip as u32);
                    let p = InputPacket { source: Feed::Source(SourceIdx(current as u32)), ssrc: g.ssrc, seq: g.seq, ts: g.ts, marker: false, samples: 960 };
                    g.seq = g.seq.wrapping_add(1);
                    g.ts = g.ts.wrapping_add(960);
                    now += 20_000;
                    if reorder && pending.is_none() {
                        pending = Some(p);
                        continue;
                    }
                    feed(&mut r, now, &p, period, &mut out);
                    if dup {
                        feed(&mut r, now, &p, period, &mut out);
                    }
                    if let Some(p) = pending.take() {
                        feed(&mut r, now, &p, period, &mut out);
                    }
                }
            }
        }
        // Per period: one constant mapping from input to output (losses stay gaps, reorders
        // stay reorders); the first packet carries the marker; periods follow each other with
        // the next sequence number and a timestamp that moved forward.
        let mut highest: Option<(u16, u32)> = None;
        let mut seen_ext: HashSet<i64> = HashSet::new();
        let mut ext_base: i64 = 0;
        let mut last_seq: Option<u16> = None;
        for (i, &(per, oseq, ots, iseq, its, marker)) in out.iter().enumerate() {
            let first_of_period = i == 0 || out[i - 1].0 != per;
            if first_of_period {
                prop_assert!(marker, "no marker after a switch");
                if let Some((hs, hts)) = highest {
                    prop_assert_eq!(oseq, hs.wrapping_add(1), "sequence gap or overlap at a switch");
                    prop_assert!(ots.wrapping_sub(hts) as i32 > 0, "timestamp did not advance at a switch");
                }
            } else {
                let (_, pseq, pts, piseq, pits, _) = out[i - 1];
                prop_assert_eq!(oseq.wrapping_sub(pseq), iseq.wrapping_sub(piseq));
                prop_assert_eq!(ots.wrapping_sub(pts), its.wrapping_sub(pits));
            }
            // Unique output numbers over the run (extended to 64 bits).
            let ext = match last_seq {
                None => oseq as i64,
                Some(l) => ext_base + (oseq.wrapping_sub(l) as i16) as i64,
            };
            let dup_input = i > 0 && out[i - 1].3 == iseq && out[i - 1].0 == per;
            prop_assert!(seen_ext.insert(ext) || dup_input, "output seq {} reused", oseq);
            if last_seq.is_none_or(|l| (oseq.wrapping_sub(l) as i16) > 0) {
                ext_base = ext;
                last_seq = Some(oseq);
                highest = Some((oseq, ots));
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // seg indexes every source's script
    fn exclusion_and_pinning_are_never_violated(
        activity in prop::collection::vec(prop::collection::vec(any::<bool>(), 40), 6),
        keys in prop::collection::vec((1u8..4, prop::option::of(0u32..6), prop::collection::vec(0u32..6, 0..3)), 1..5),
    ) {
        let mut core = StreamCore::new(CoreConfig::default());
        let srcs: Vec<SourceIdx> = (0..6).map(|i| core.publish(&format!("s{i}"), SourceConfig { level_ext_id: Some(1) })).collect();
        let groups: Vec<_> = keys
            .iter()
            .map(|(n, pinned, excl)| {
                let key = GroupKey::new(*n, pinned.map(SourceIdx), excl.iter().map(|&e| SourceIdx(e)));
                (core.join(key.clone()), key)
            })
            .collect();
        let mut buf = Vec::new();
        let mut seqs = [0u16; 6];
        let mut forwarded = [0usize; 8];
        // 40 segments of 200 ms; in each, a source talks (loud, modulated) or sits in room noise.
        for seg in 0..40 {
            for frame in 0..10u64 {
                let now = seg as u64 * 200_000 + frame * 20_000;
                for (si, &s) in srcs.iter().enumerate() {
                    let level = if activity[si][seg] { [20u8, 30, 15, 25][frame as usize % 4] } else { 70 };
                    let hdr = HeaderFields { payload_type: 111, sequence_number: seqs[si], timestamp: seqs[si] as u32 * 960, ssrc: si as u32, marker: false };
                    seqs[si] = seqs[si].wrapping_add(1);
                    write_packet(&mut buf, &hdr, &[(1, &[level])], &[0x78; 60]);
                    let pkt = buf.clone();
                    let mut bad = None;
                    core.on_packet(now + si as u64 * 1000, s, &pkt, &mut |o| {
                        if let Output::Packet { group, .. } = o {
                            forwarded[group.0 as usize] += 1;
                        }
                        check(&groups, &pkt, s, o, &mut bad)
                    }).unwrap();
                    prop_assert!(bad.is_none(), "{:?}", bad);
                }
                let mut bad = None;
                core.tick(now + 10_000, &mut |o| check(&groups, &[], SourceIdx(u32::MAX), o, &mut bad));
                prop_assert!(bad.is_none(), "{:?}", bad);
            }
        }
        for (g, key) in &groups {
            // Not vacuous: a group hears something exactly when an admitted source talked.
            let someone_talked = (0..6).any(|si| key.admits(SourceIdx(si as u32)) && activity[si].iter().any(|&a| a));
            prop_assert_eq!(forwarded[g.0 as usize] > 0, someone_talked);
            let tracks: Vec<_> = core.selector().tracks(*g).flatten().collect();
            let unique: HashSet<_> = tracks.iter().collect();
            prop_assert_eq!(unique.len(), tracks.len(), "a source in two tracks of one group");
            prop_assert!(tracks.iter().all(|&s| key.admits(s)));
        }
    }

    /// End-to-end encryption: the payload is ciphertext (its first byte too), so nothing the
    /// core decides may depend on its bytes, only on the header and the payload's size. Two cores
    /// fed the same headers and sizes, one with Opus-like payloads and one with arbitrary bytes
    /// (with or without the level extension), must decide the same.
    #[test]
    #[allow(clippy::needless_range_loop)] // si and seg index every source's script
    fn payload_bytes_decide_nothing(
        activity in prop::collection::vec(prop::collection::vec(any::<bool>(), 20), 4),
        noise in prop::collection::vec(any::<u8>(), 64),
        with_level in any::<bool>(),
        tracks in 1u8..4,
    ) {
        let ext = with_level.then_some(1u8);
        let mut cores: Vec<StreamCore> = (0..2).map(|_| StreamCore::new(CoreConfig::default())).collect();
        let mut outs: Vec<Vec<Output>> = vec![Vec::new(), Vec::new()];
        for core in &mut cores {
            for i in 0..4 {
                core.publish(&format!("s{i}"), SourceConfig { level_ext_id: ext });
            }
            core.join(GroupKey::new(tracks, None, []));
        }
        let mut buf = Vec::new();
        for seg in 0..20 {
            for frame in 0..10u64 {
                let now = seg as u64 * 200_000 + frame * 20_000;
                for si in 0..4usize {
                    let talking = activity[si][seg];
                    let level = if talking { [20u8, 30, 15, 25][frame as usize % 4] } else { 70 };
                    // A VBR encoder's sizes: speech larger than room noise; 28 bytes of AES-GCM
                    // overhead on top, as an encoded transform adds.
                    let size = 28 + if talking { 80 + (frame as usize * 7) % 40 } else { 50 + (frame as usize * 3) % 12 };
                    let n = (seg * 10 + frame as usize) as u16;
                    let hdr = HeaderFields { payload_type: 111, sequence_number: n, timestamp: n as u32 * 960, ssrc: si as u32, marker: false };
                    let level_byte = [level];
                    let exts: Vec<(u8, &[u8])> = ext.map(|id| (id, &level_byte[..])).into_iter().collect();
                    for (c, core) in cores.iter_mut().enumerate() {
                        let payload: Vec<u8> = if c == 0 {
                            std::iter::once(0x78).chain(std::iter::repeat_n(0x55, size - 1)).collect()
                        } else {
                            (0..size).map(|k| noise[(k + si * 13 + n as usize) % noise.len()] ^ (k as u8)).collect()
                        };
                        write_packet(&mut buf, &hdr, &exts, &payload);
                        let out = &mut outs[c];
                        core.on_packet(now + si as u64 * 1000, SourceIdx(si as u32), &buf, &mut |o| out.push(o)).unwrap();
                    }
                }
                for (c, core) in cores.iter_mut().enumerate() {
                    let out = &mut outs[c];
                    core.tick(now + 10_000, &mut |o| out.push(o));
                }
            }
        }
        // Not vacuous: something was forwarded when someone talked.
        let talked = activity.iter().any(|a| a.iter().any(|&x| x));
        prop_assert_eq!(outs[0].iter().any(|o| matches!(o, Output::Packet { .. })), talked);
        prop_assert_eq!(&outs[0], &outs[1]);
    }

    #[test]
    fn steady_noise_never_reads_as_speech(
        base in 20u8..100,
        flutter in 0u8..3,
        pattern in prop::collection::vec(0u8..5, 500..1000),
    ) {
        let cfg = VadConfig::default();
        let mut a = VoiceActivity::new(&cfg);
        for (i, p) in pattern.iter().enumerate() {
            let level = base + (p % (2 * flutter + 1));
            let m = Measurement::Level { loudness: 127 - level, voice: i % 2 == 0 };
            let t = a.observe(&cfg, i as u64 * 20_000, m);
            prop_assert_eq!(t, chorus::media::activity::Transition::None, "onset on steady noise at packet {}", i);
        }
    }

    #[test]
    fn rtp_view_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(v) = RtpView::parse(&bytes) {
            let _ = (v.marker(), v.payload_type(), v.sequence_number(), v.timestamp(), v.ssrc());
            let n = v.csrcs().count();
            prop_assert_eq!(n, v.csrc_count());
            for e in v.extensions() {
                let _ = e;
            }
            prop_assert!(v.header_len() + v.payload().len() + v.padding_len() == bytes.len());
        }
    }

    #[test]
    fn written_packets_parse_back(
        pt in 0u8..128, seq in any::<u16>(), ts in any::<u32>(), ssrc in any::<u32>(), marker in any::<bool>(),
        exts in prop::collection::vec((1u8..15, prop::collection::vec(any::<u8>(), 1..17)), 0..4),
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut ids = HashSet::new();
        let exts: Vec<_> = exts.into_iter().filter(|(id, _)| ids.insert(*id)).collect();
        let refs: Vec<(u8, &[u8])> = exts.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        let mut buf = Vec::new();
        let hdr = HeaderFields { payload_type: pt, sequence_number: seq, timestamp: ts, ssrc, marker };
        write_packet(&mut buf, &hdr, &refs, &payload);
        let v = RtpView::parse(&buf).unwrap();
        prop_assert_eq!((v.payload_type(), v.sequence_number(), v.timestamp(), v.ssrc(), v.marker()), (pt, seq, ts, ssrc, marker));
        prop_assert_eq!(v.payload(), &payload[..]);
        for (id, data) in &exts {
            prop_assert_eq!(v.extension(*id), Some(&data[..]));
        }
    }
}

/// Checks one core output against the groups' keys; records the first violation.
fn check(
    groups: &[(chorus::media::selection::GroupId, GroupKey)],
    pkt: &[u8],
    from: SourceIdx,
    o: Output,
    bad: &mut Option<String>,
) {
    let key_of = |g| groups.iter().find(|(id, _)| *id == g).map(|(_, k)| k);
    match o {
        Output::Track(c) => {
            if let (Some(s), Some(k)) = (c.source, key_of(c.group)) {
                if !k.admits(s) {
                    *bad = Some(format!("track change gave {s:?} to {k:?}"));
                }
            }
        }
        Output::Packet { group, header, .. } => {
            if let Some(k) = key_of(group) {
                if !k.admits(from) {
                    *bad = Some(format!("packet of {from:?} sent to {k:?}"));
                }
            }
            // The header fields are all the core emits: the payload and extensions stay in the
            // caller's buffer, untouched by construction. The marker it carried is kept.
            if pkt.len() > 1 && pkt[1] & 0x80 != 0 && !header.marker {
                *bad = Some("input marker lost".into());
            }
        }
        // A pre-roll replays a source the group admits (the one its track just took).
        Output::Preroll { group, source, .. } => {
            if let Some(k) = key_of(group) {
                if !k.admits(source) {
                    *bad = Some(format!("pre-roll of {source:?} sent to {k:?}"));
                }
            }
        }
        // An ending belongs to the group's track; it carries no source's audio.
        Output::Ending { group, .. } => {
            if key_of(group).is_none() {
                *bad = Some(format!("ending for unknown group {group:?}"));
            }
        }
    }
}
