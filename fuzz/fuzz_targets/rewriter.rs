//! One `TrackRewriter` driven by an arbitrary script: up to 4 sources, each with its own SSRC and
//! seq/ts progression, with loss, reorder, duplicates, big jumps both ways, SSRC changes,
//! arbitrary raw headers, `detach()` (source switches) and increasing time.
//!
//! Checked for every packet, against a model written from the documented contract of
//! `rewrite.rs` (not from its code):
//! - never panics; the output SSRC is always the track's;
//! - a packet starts a new anchor iff it is the first one, or follows a `detach()`, or its
//!   (source, input SSRC) differs from the anchor's, or it jumps more than 3000 ahead of the
//!   anchor's highest input seq (a restart); a packet that is more than 3000 behind, or older
//!   than the anchor's first packet, is dropped (`BeforeSwitch`); everything else is forwarded;
//! - within an anchor the input->output mapping of seq and ts is one constant offset (so losses
//!   stay gaps and reorders stay reorders), and the marker is passed through;
//! - the first packet of an anchor has the marker, seq = highest output seq so far + 1, and ts =
//!   highest packet's ts + max(elapsed real time at 48 kHz, that packet's duration), which is an
//!   advance > 0 as an i32 wrapping difference; the very first packet gets (first_seq, first_ts);
//! - no two packets of different anchors get the same output seq (checked on 64-bit extended
//!   output seqs over a window of the last 1000 accepted packets: compared modulo 2^16 this would
//!   flag legitimate wrap-arounds, since in-anchor gaps of up to 3000 are kept and 22 such gaps
//!   wrap the 16-bit space);
//! - `last_sent()` and `current_source()` report the highest packet and the anchor's source.
//!
//! Also (unless CHORUS_FUZZ_LIVENESS=0): a source whose seq steps back by more than 3000 on the
//! same SSRC (a restart without a new SSRC) must not have its next in-order packets dropped.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use chorus::media::rewrite::{Feed, InputPacket, RewriteDrop, Rewritten, TrackRewriter};
use chorus::media::SourceIdx;
use libfuzzer_sys::fuzz_target;

const MAX_SEQ_JUMP: i64 = 3000;
const SAMPLES: [u32; 7] = [120, 240, 480, 960, 1920, 2880, 5760];

#[derive(Debug, Arbitrary)]
enum Op {
    /// Next packet of a source after `skip % 8` lost ones.
    Next {
        src: u8,
        skip: u8,
        dt_us: u16,
        marker: bool,
        dur: u8,
    },
    /// A burst of `n % 32` in-order packets, 20 ms apart.
    Burst { src: u8, n: u8 },
    /// Re-send (duplicate) or deliver late (reorder) the packet `back % 64 + 1` before the next.
    Late { src: u8, back: u8, dt_us: u16 },
    /// Move a source's next seq/ts by an arbitrary amount (restart, forward or backward).
    Jump { src: u8, dseq: u16, dts: u32 },
    /// The source starts a new SSRC (republish).
    NewSsrc { src: u8, ssrc: u32 },
    /// The track switched (or emptied): the next packet starts a new anchor.
    Detach,
    /// Time passes without packets.
    Sleep { dt_us: u32 },
    /// A fully arbitrary header on a source.
    Raw {
        src: u8,
        ssrc: u32,
        seq: u16,
        ts: u32,
        marker: bool,
        dur: u8,
    },
}

#[derive(Debug, Arbitrary)]
struct Script {
    ssrc: u32,
    first_seq: u16,
    first_ts: u32,
    starts: [(u32, u16, u32); 4],
    ops: Vec<Op>,
}

#[derive(Clone, Copy)]
struct Gen {
    ssrc: u32,
    seq: u16,
    ts: u32,
}

/// The model's view of the current anchor.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    id: u64,
    source: Feed,
    ssrc: u32,
    /// Extended input seq of the highest packet (the first one is 0) and its 16-bit value.
    highest_ext: i64,
    highest_seq: u16,
    seq_off: u16,
    ts_off: u32,
}

/// The highest output packet so far.
#[derive(Clone, Copy, Debug)]
struct Head {
    ext: i64,
    seq: u16,
    ts: u32,
    at_us: u64,
    samples: u32,
}

struct Model {
    track_ssrc: u32,
    first_seq: u16,
    first_ts: u32,
    anchor: Option<Anchor>,
    next_anchor: u64,
    head: Option<Head>,
    /// Last 1000 accepted packets: (extended output seq, anchor id).
    window: VecDeque<(i64, u64)>,
    owners: HashMap<i64, (u64, u32)>,
}

fn liveness() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CHORUS_FUZZ_LIVENESS").is_none_or(|v| v != "0"))
}

impl Model {
    fn check(
        &mut self,
        r: &TrackRewriter,
        now: u64,
        p: &InputPacket,
        got: Result<Rewritten, RewriteDrop>,
    ) {
        let (anchor0, head0) = (self.anchor, self.head);
        let ctx = || format!("packet {p:?} at {now} us, anchor {anchor0:?}, head {head0:?}");
        let continues = match self.anchor {
            Some(a) if a.source == p.source && a.ssrc == p.ssrc => {
                let delta = p.seq.wrapping_sub(a.highest_seq) as i16 as i64;
                if delta.abs() > MAX_SEQ_JUMP {
                    // A restart of the sender's numbering, either way: a new anchor.
                    if liveness() {
                        assert!(
                            got.is_ok(),
                            "source restarted {delta} on the same SSRC: packet dropped; {}",
                            ctx()
                        );
                    }
                    None
                } else if a.highest_ext + delta < 0 {
                    assert_eq!(got, Err(RewriteDrop::BeforeSwitch), "{}", ctx());
                    return;
                } else {
                    Some((a, delta))
                }
            }
            _ => None,
        };
        let out = got.unwrap_or_else(|e| {
            panic!("dropped ({e:?}) a packet that must be forwarded: {}", ctx())
        });
        assert_eq!(out.ssrc, self.track_ssrc, "{}", ctx());

        let ext = match continues {
            Some((mut a, delta)) => {
                assert_eq!(
                    out.seq,
                    p.seq.wrapping_add(a.seq_off),
                    "seq mapping changed within an anchor: {}",
                    ctx()
                );
                assert_eq!(
                    out.ts,
                    p.ts.wrapping_add(a.ts_off),
                    "ts mapping changed within an anchor: {}",
                    ctx()
                );
                assert_eq!(out.marker, p.marker, "marker not passed through: {}", ctx());
                let head = self.head.expect("an anchor implies a head");
                let ext = head.ext + out.seq.wrapping_sub(head.seq) as i16 as i64;
                if delta > 0 {
                    a.highest_ext += delta;
                    a.highest_seq = p.seq;
                    self.head = Some(Head {
                        ext,
                        seq: out.seq,
                        ts: out.ts,
                        at_us: now,
                        samples: p.samples,
                    });
                }
                self.anchor = Some(a);
                ext
            }
            None => {
                assert!(
                    out.marker,
                    "no marker on the first packet of an anchor: {}",
                    ctx()
                );
                let ext = match self.head {
                    None => {
                        assert_eq!(
                            (out.seq, out.ts),
                            (self.first_seq, self.first_ts),
                            "{}",
                            ctx()
                        );
                        0
                    }
                    Some(h) => {
                        assert_eq!(
                            out.seq,
                            h.seq.wrapping_add(1),
                            "seq does not continue at a switch: {}",
                            ctx()
                        );
                        let adv = out.ts.wrapping_sub(h.ts);
                        assert!(
                            adv as i32 > 0,
                            "ts did not advance at a switch ({adv}): {}",
                            ctx()
                        );
                        let elapsed = (now.saturating_sub(h.at_us) as u128 * 48_000 / 1_000_000)
                            .min(u32::MAX as u128 / 2) as u32;
                        assert_eq!(
                            adv,
                            elapsed.max(h.samples),
                            "ts advance is not the elapsed time: {}",
                            ctx()
                        );
                        h.ext + 1
                    }
                };
                self.next_anchor += 1;
                self.anchor = Some(Anchor {
                    id: self.next_anchor,
                    source: p.source,
                    ssrc: p.ssrc,
                    highest_ext: 0,
                    highest_seq: p.seq,
                    seq_off: out.seq.wrapping_sub(p.seq),
                    ts_off: out.ts.wrapping_sub(p.ts),
                });
                self.head = Some(Head {
                    ext,
                    seq: out.seq,
                    ts: out.ts,
                    at_us: now,
                    samples: p.samples,
                });
                ext
            }
        };
        let id = self.anchor.unwrap().id;
        match self.owners.get(&ext) {
            Some(&(other, _)) if other != id => {
                panic!(
                    "output seq {} (ext {ext}) reused across anchors {other} and {id}: {}",
                    out.seq,
                    ctx()
                )
            }
            _ => {}
        }
        self.owners.entry(ext).or_insert((id, 0)).1 += 1;
        self.window.push_back((ext, id));
        if self.window.len() > 1000 {
            let (old, _) = self.window.pop_front().unwrap();
            if let Some(e) = self.owners.get_mut(&old) {
                e.1 -= 1;
                if e.1 == 0 {
                    self.owners.remove(&old);
                }
            }
        }
        let h = self.head.unwrap();
        assert_eq!(r.last_sent(), Some((h.seq, h.ts, h.at_us)), "{}", ctx());
        assert_eq!(r.current_source(), Some(p.source), "{}", ctx());
    }
}

fn run(s: Script) {
    let mut r = TrackRewriter::new(s.ssrc, s.first_seq, s.first_ts);
    assert_eq!(r.ssrc(), s.ssrc);
    assert_eq!(r.last_sent(), None);
    let mut m = Model {
        track_ssrc: s.ssrc,
        first_seq: s.first_seq,
        first_ts: s.first_ts,
        anchor: None,
        next_anchor: 0,
        head: None,
        window: VecDeque::new(),
        owners: HashMap::new(),
    };
    let mut gens: Vec<Gen> = s
        .starts
        .iter()
        .map(|&(ssrc, seq, ts)| Gen { ssrc, seq, ts })
        .collect();
    let mut now: u64 = 0;
    let feed = |r: &mut TrackRewriter, m: &mut Model, now: u64, p: InputPacket| {
        let got = r.rewrite(now, &p);
        m.check(r, now, &p, got);
    };
    // Builds the next packet of a source and advances it.
    let next = |g: &mut Gen, src: usize, marker: bool, samples: u32| {
        let p = InputPacket {
            source: Feed::Source(SourceIdx(src as u32)),
            ssrc: g.ssrc,
            seq: g.seq,
            ts: g.ts,
            marker,
            samples,
        };
        g.seq = g.seq.wrapping_add(1);
        g.ts = g.ts.wrapping_add(samples);
        p
    };
    for op in s.ops.into_iter().take(4096) {
        match op {
            Op::Next {
                src,
                skip,
                dt_us,
                marker,
                dur,
            } => {
                let i = src as usize % 4;
                let samples = SAMPLES[dur as usize % SAMPLES.len()];
                let g = &mut gens[i];
                let skip = (skip % 8) as u16;
                g.seq = g.seq.wrapping_add(skip);
                g.ts = g.ts.wrapping_add(samples * skip as u32);
                now += dt_us as u64;
                let p = next(g, i, marker, samples);
                feed(&mut r, &mut m, now, p);
            }
            Op::Burst { src, n } => {
                let i = src as usize % 4;
                for _ in 0..n % 32 {
                    now += 20_000;
                    let p = next(&mut gens[i], i, false, 960);
                    feed(&mut r, &mut m, now, p);
                }
            }
            Op::Late { src, back, dt_us } => {
                let i = src as usize % 4;
                let g = gens[i];
                let back = back as u16 % 64 + 1;
                now += dt_us as u64;
                let p = InputPacket {
                    source: Feed::Source(SourceIdx(i as u32)),
                    ssrc: g.ssrc,
                    seq: g.seq.wrapping_sub(back),
                    ts: g.ts.wrapping_sub(960 * back as u32),
                    marker: false,
                    samples: 960,
                };
                feed(&mut r, &mut m, now, p);
            }
            Op::Jump { src, dseq, dts } => {
                let g = &mut gens[src as usize % 4];
                g.seq = g.seq.wrapping_add(dseq);
                g.ts = g.ts.wrapping_add(dts);
            }
            Op::NewSsrc { src, ssrc } => gens[src as usize % 4].ssrc = ssrc,
            Op::Detach => {
                r.detach();
                m.anchor = None;
                assert_eq!(r.current_source(), None);
            }
            Op::Sleep { dt_us } => now += dt_us as u64,
            Op::Raw {
                src,
                ssrc,
                seq,
                ts,
                marker,
                dur,
            } => {
                let p = InputPacket {
                    source: Feed::Source(SourceIdx(src as u32 % 4)),
                    ssrc,
                    seq,
                    ts,
                    marker,
                    samples: SAMPLES[dur as usize % SAMPLES.len()],
                };
                feed(&mut r, &mut m, now, p);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Script::arbitrary_take_rest(Unstructured::new(data)) {
        run(s);
    }
});
