//! A `StreamCore` with 3 published sources and 2 viewer groups, fed an arbitrary mix of
//! well-formed Opus RTP packets (with and without the RFC 6464 level extension, talking or
//! quiet), byte-mutated packets, fully arbitrary datagrams, ticks, unpublish / republish and
//! time jumps.
//!
//! Checked: never panics; every emitted packet (header fields only: the payload stays the
//! input's) keeps the input's marker, carries the SSRC of its group track's rewriter, and comes from the source that the last `Track` event put in that
//! track; `Track` events only name sources the group admits and never the same source in two
//! tracks of a group; the core's stats add up.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use chorus::fuzzing::StreamCoreFuzz;
use chorus::media::rtp::{write_packet, HeaderFields, RtpView};
use chorus::media::selection::{GroupId, GroupKey};
use chorus::media::stream::{CoreConfig, Drop, Output, SourceConfig, StreamCore, MAX_PACKET};
use chorus::media::SourceIdx;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    /// A well-formed packet: level in -dBov (None = no extension), payload size and TOC.
    Packet {
        src: u8,
        dt_us: u16,
        level: Option<u8>,
        len: u8,
        toc: u8,
        skip: u8,
        marker: bool,
    },
    /// A burst of `n % 16` talking packets 20 ms apart, ticking every other one.
    Talk {
        src: u8,
        n: u8,
        loud: u8,
    },
    /// A well-formed packet with some bytes overwritten.
    Mutated {
        src: u8,
        at: Vec<(u16, u8)>,
        truncate: Option<u16>,
    },
    /// An arbitrary datagram.
    Raw {
        src: u8,
        bytes: Vec<u8>,
    },
    Tick {
        dt_us: u16,
    },
    Sleep {
        dt_us: u32,
    },
    Unpublish {
        src: u8,
    },
    Republish {
        src: u8,
        with_level: bool,
    },
    /// The source restarts its RTP stream (new SSRC, seq, ts) without republishing.
    Restart {
        src: u8,
        ssrc: u32,
        seq: u16,
        ts: u32,
    },
}

#[derive(Debug, Arbitrary)]
struct Script {
    seed: u64,
    ops: Vec<Op>,
}

struct Src {
    idx: SourceIdx,
    ssrc: u32,
    seq: u16,
    ts: u32,
    /// Level extension id negotiated, when published with one.
    level_id: Option<u8>,
}

struct World {
    groups: Vec<(GroupId, GroupKey)>,
    /// Current source of each (group index, track), per the Track events seen.
    tracks: Vec<Vec<Option<SourceIdx>>>,
}

impl World {
    fn group_index(&self, g: GroupId) -> usize {
        self.groups
            .iter()
            .position(|(id, _)| *id == g)
            .expect("event for an unknown group")
    }

    fn on_output(
        &mut self,
        core_ssrc: &dyn Fn(GroupId, u8) -> Option<u32>,
        input: Option<(SourceIdx, &[u8])>,
        o: Output,
    ) {
        match o {
            Output::Track(tc) => {
                let gi = self.group_index(tc.group);
                let key = &self.groups[gi].1;
                let tracks = &mut self.tracks[gi];
                assert!(
                    (tc.track as usize) < tracks.len(),
                    "track {} out of range",
                    tc.track
                );
                if let Some(s) = tc.source {
                    assert!(
                        key.admits(s),
                        "{s:?} placed in a group that does not admit it"
                    );
                }
                tracks[tc.track as usize] = tc.source;
                let placed: Vec<_> = tracks.iter().flatten().collect();
                let mut dedup = placed.clone();
                dedup.sort();
                dedup.dedup();
                assert_eq!(
                    dedup.len(),
                    placed.len(),
                    "a source in two tracks of one group: {tracks:?}"
                );
            }
            Output::Packet {
                group,
                track,
                header,
                ..
            } => {
                let (from, orig) = input.expect("packet output outside on_packet");
                let gi = self.group_index(group);
                assert_eq!(
                    self.tracks[gi].get(track as usize).copied().flatten(),
                    Some(from),
                    "packet of {from:?} sent on group {group:?} track {track} that holds another source"
                );
                assert_eq!(
                    Some(header.ssrc),
                    core_ssrc(group, track),
                    "wrong SSRC for the group track"
                );
                let o = RtpView::parse(orig).unwrap();
                assert!(header.marker || !o.marker(), "input marker lost");
            }
            // A pre-roll follows the change that put its source in the track.
            Output::Preroll {
                group,
                track,
                header,
                source,
                ..
            } => {
                let gi = self.group_index(group);
                assert_eq!(
                    self.tracks[gi].get(track as usize).copied().flatten(),
                    Some(source),
                    "pre-roll of {source:?} on group {group:?} track {track} that holds another source"
                );
                assert_eq!(
                    Some(header.ssrc),
                    core_ssrc(group, track),
                    "wrong SSRC for the pre-roll"
                );
            }
            // A track's audio ends just before it is announced empty: it still holds a source.
            Output::Ending {
                group,
                track,
                header,
            } => {
                let gi = self.group_index(group);
                assert!(
                    self.tracks[gi]
                        .get(track as usize)
                        .copied()
                        .flatten()
                        .is_some(),
                    "ending on group {group:?} track {track}, which holds nothing"
                );
                assert_eq!(
                    Some(header.ssrc),
                    core_ssrc(group, track),
                    "wrong SSRC for the ending"
                );
            }
        }
    }
}

fn packet(buf: &mut Vec<u8>, s: &mut Src, level: Option<u8>, len: usize, toc: u8, marker: bool) {
    let hdr = HeaderFields {
        payload_type: 111,
        sequence_number: s.seq,
        timestamp: s.ts,
        ssrc: s.ssrc,
        marker,
    };
    let mut payload = vec![0xA5u8; len];
    if let Some(b) = payload.first_mut() {
        *b = toc;
    }
    let lvl = [level.unwrap_or(0) & 0x7F | 0x80];
    let mut exts: Vec<(u8, &[u8])> = Vec::new();
    if let (Some(_), Some(id)) = (level, s.level_id) {
        exts.push((id, &lvl[..]));
    }
    write_packet(buf, &hdr, &exts, &payload);
    s.seq = s.seq.wrapping_add(1);
    s.ts = s.ts.wrapping_add(960);
}

/// The SSRC of each group track's rewriter now: what a packet or an ending on that track
/// carries (on a packet, a tick or an unpublish alike).
fn ssrc_lookup(
    core: &StreamCore,
    groups: &[(GroupId, GroupKey)],
) -> impl Fn(GroupId, u8) -> Option<u32> {
    let snapshot: Vec<Vec<u32>> = groups
        .iter()
        .map(|(g, k)| {
            (0..k.tracks())
                .map(|t| core.rewriter(*g, t).unwrap().ssrc())
                .collect()
        })
        .collect();
    let groups = groups.to_vec();
    move |g: GroupId, t: u8| {
        groups
            .iter()
            .position(|(id, _)| *id == g)
            .and_then(|gi| snapshot[gi].get(t as usize).copied())
    }
}

fn run(script: Script) {
    let mut core = StreamCore::new(CoreConfig {
        seed: script.seed,
        ..Default::default()
    });
    let mut srcs: Vec<Src> = (0..3u32)
        .map(|i| {
            let level_id = (i != 2).then_some(1 + i as u8);
            let idx = core.publish(
                &format!("s{i}"),
                SourceConfig {
                    level_ext_id: level_id,
                },
            );
            Src {
                idx,
                ssrc: 0x1000 + i,
                seq: (i as u16) * 20_000,
                ts: i * 1_000_000,
                level_id,
            }
        })
        .collect();
    let keys = [
        GroupKey::new(2, None, []),
        GroupKey::new(3, Some(SourceIdx(0)), [SourceIdx(2)]),
    ];
    let mut world = World {
        groups: Vec::new(),
        tracks: Vec::new(),
    };
    for k in keys {
        let g = core.join(k.clone());
        world.tracks.push(vec![None; k.tracks() as usize]);
        world.groups.push((g, k));
    }
    // A third viewer with the first key shares its group.
    assert_eq!(core.join(GroupKey::new(2, None, [])), world.groups[0].0);

    let mut now: u64 = 1_000;
    let mut buf = Vec::with_capacity(MAX_PACKET);
    let mut accepted = 0u64;
    let mut malformed = 0u64;

    macro_rules! send {
        ($src:expr, $bytes:expr) => {{
            let bytes: &[u8] = $bytes;
            let s: SourceIdx = $src;
            let mut w = std::mem::replace(
                &mut world,
                World {
                    groups: Vec::new(),
                    tracks: Vec::new(),
                },
            );
            let ssrc_of = ssrc_lookup(&core, &w.groups);
            let r = core.on_packet(now, s, bytes, &mut |o| {
                w.on_output(&ssrc_of, Some((s, bytes)), o)
            });
            world = w;
            match r {
                Ok(()) => accepted += 1,
                Err(Drop::Malformed(_)) => {
                    assert!(RtpView::parse(bytes).is_err());
                    malformed += 1
                }
                Err(Drop::TooLarge(n)) => assert!(n > MAX_PACKET),
                Err(Drop::UnknownSource) => assert!(!core.is_live(s)),
            }
        }};
    }
    macro_rules! tick {
        () => {{
            let mut w = std::mem::replace(
                &mut world,
                World {
                    groups: Vec::new(),
                    tracks: Vec::new(),
                },
            );
            let ssrc_of = ssrc_lookup(&core, &w.groups);
            core.tick(now, &mut |o| w.on_output(&ssrc_of, None, o));
            world = w;
        }};
    }

    for op in script.ops.into_iter().take(2048) {
        match op {
            Op::Packet {
                src,
                dt_us,
                level,
                len,
                toc,
                skip,
                marker,
            } => {
                now += dt_us as u64;
                let s = &mut srcs[src as usize % 3];
                s.seq = s.seq.wrapping_add((skip % 4) as u16);
                packet(&mut buf, s, level, len as usize, toc, marker);
                let idx = s.idx;
                let pkt = buf.clone();
                send!(idx, &pkt);
            }
            Op::Talk { src, n, loud } => {
                for k in 0..n % 16 {
                    now += 20_000;
                    let s = &mut srcs[src as usize % 3];
                    let level = [10u8, 25, 15, 30][(k as usize + loud as usize) % 4];
                    packet(
                        &mut buf,
                        s,
                        Some(level),
                        40 + (loud as usize % 80),
                        0x78,
                        false,
                    );
                    let idx = s.idx;
                    let pkt = buf.clone();
                    send!(idx, &pkt);
                    if k % 2 == 1 {
                        tick!();
                    }
                }
            }
            Op::Mutated { src, at, truncate } => {
                let s = &mut srcs[src as usize % 3];
                packet(&mut buf, s, Some(40), 60, 0x78, false);
                let mut pkt = buf.clone();
                for (i, b) in at.into_iter().take(8) {
                    let n = pkt.len();
                    pkt[i as usize % n] = b;
                }
                if let Some(t) = truncate {
                    pkt.truncate(t as usize % (pkt.len() + 1));
                }
                let idx = s.idx;
                now += 20_000;
                send!(idx, &pkt);
            }
            Op::Raw { src, bytes } => {
                // Index 3 is never published: UnknownSource.
                send!(SourceIdx(src as u32 % 4), &bytes);
            }
            Op::Tick { dt_us } => {
                now += dt_us as u64;
                tick!();
            }
            Op::Sleep { dt_us } => now += dt_us as u64,
            Op::Unpublish { src } => {
                let idx = srcs[src as usize % 3].idx;
                let mut w = std::mem::replace(
                    &mut world,
                    World {
                        groups: Vec::new(),
                        tracks: Vec::new(),
                    },
                );
                let ssrc_of = ssrc_lookup(&core, &w.groups);
                core.unpublish(now, idx, &mut |o| w.on_output(&ssrc_of, None, o));
                world = w;
                assert!(!core.is_live(idx));
                for t in &world.tracks {
                    assert!(
                        !t.contains(&Some(idx)),
                        "unpublished source still holds a track"
                    );
                }
            }
            Op::Republish { src, with_level } => {
                let s = &mut srcs[src as usize % 3];
                s.level_id = with_level.then_some(1 + (src % 14));
                let idx = core.publish(
                    &format!("s{}", src % 3),
                    SourceConfig {
                        level_ext_id: s.level_id,
                    },
                );
                assert_eq!(idx, s.idx);
            }
            Op::Restart { src, ssrc, seq, ts } => {
                let s = &mut srcs[src as usize % 3];
                (s.ssrc, s.seq, s.ts) = (ssrc, seq, ts);
            }
        }
        // The selector agrees with the events we saw.
        for (gi, (g, _)) in world.groups.iter().enumerate() {
            let now_tracks: Vec<_> = core.selector().tracks(*g).collect();
            assert_eq!(
                now_tracks, world.tracks[gi],
                "selector state differs from its events"
            );
        }
    }
    let st = core.stats();
    assert_eq!(st.packets_in, accepted);
    assert_eq!(st.dropped_malformed, malformed);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Script::arbitrary_take_rest(Unstructured::new(data)) {
        run(s);
    }
});
