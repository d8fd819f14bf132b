//! `chorus replay`: packetizes a speech corpus as a browser would, passes it through a simulated
//! network (loss, jitter), runs it through the real packet core as an edge would, and reports
//! every track change plus a summary measured against the corpus's own ground truth.

pub mod corpus;
pub mod explain;
pub mod ogg;
pub mod truth;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::media::opus;
use crate::media::rtp::{write_packet, HeaderFields};
use crate::media::selection::GroupKey;
use crate::media::stream::{splitmix64, CoreConfig, CoreStats, Output, SourceConfig, StreamCore};
use crate::media::SourceIdx;
use corpus::Speaker;
use truth::{percentile, Turn};

/// The one-byte extension id the replay's "browser" uses for the RFC 6464 level.
pub(crate) const LEVEL_EXT_ID: u8 = 1;
/// One packet per 20 ms frame, as a browser sends Opus.
pub const FRAME_US: u64 = 20_000;
const OPUS_PT: u8 = 111;

/// What to replay and how: the view asked for and the network model.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Multiplexed tracks of the view (at least 1).
    pub tracks: u8,
    /// The speaker id pinned to the main track; None = none.
    pub pinned: Option<String>,
    /// Speaker ids the view excludes.
    pub exclude: Vec<String>,
    /// Put the RFC 6464 level in each packet (a browser does).
    pub levels: bool,
    /// Emulate the sender's DTX: quiet frames become one tiny packet every 400 ms.
    pub dtx: bool,
    /// Packet loss probability, 0..1.
    pub loss: f64,
    /// Each packet is delayed by a uniform 0..=jitter_ms.
    pub jitter_ms: u32,
    /// Seeds the network model and the core: the same seed gives the same run.
    pub seed: u64,
    /// Selection tick period.
    pub tick_ms: u32,
    /// Stop at this packet time (µs) and read the core's state there (`--explain`).
    pub until_us: Option<u64>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            tracks: 3,
            pinned: None,
            exclude: vec![],
            levels: true,
            dtx: false,
            loss: 0.0,
            jitter_ms: 0,
            seed: 1,
            tick_ms: 10,
            until_us: None,
        }
    }
}

/// One line of output: a track changed source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// When, in ms of packet time.
    pub t_ms: u64,
    /// The track's index.
    pub track: u8,
    /// The speaker now in it; None = it emptied.
    pub source: Option<String>,
}

/// A packet the core forwarded, with what the replay knows about it.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The track it went to.
    pub track: u8,
    /// The speaker's index (corpus order).
    pub source: u32,
    /// When the "browser" sent it (µs).
    pub send_us: u64,
    /// When it reached the core, after the jitter (µs).
    pub arrival_us: u64,
    /// Its rewritten sequence number.
    pub seq: u16,
    /// Its rewritten timestamp.
    pub ts: u32,
    /// Its rewritten marker bit.
    pub marker: bool,
    /// A silence frame that ended the track's audio as it emptied (`source` is then the source
    /// it ended, the times those of the packet or tick that emptied the track).
    pub silence: bool,
}

/// Percentiles of a latency, in ms.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// The median.
    pub p50: u64,
    /// The 95th percentile.
    pub p95: u64,
    /// The largest.
    pub max: u64,
}

/// p50, p95 and max in ms of sorted µs values; None if there are none.
fn percentiles_ms(sorted: &[u64]) -> Option<Latency> {
    (!sorted.is_empty()).then(|| Latency {
        p50: percentile(sorted, 50.0).unwrap_or(0) / 1000,
        p95: percentile(sorted, 95.0).unwrap_or(0) / 1000,
        max: sorted.last().copied().unwrap_or(0) / 1000,
    })
}

/// A replay's figures, measured against the corpus's ground truth ([`truth`]).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Multiplexed tracks of the view.
    pub tracks: u8,
    /// Speakers in the corpus.
    pub sources: usize,
    /// Track changes, including a track emptying.
    pub switches: usize,
    /// Turns of sources this viewer may hear (not pinned, not excluded).
    pub turns: usize,
    /// Of those, turns that reached a track.
    pub turns_heard: usize,
    /// From a turn's first voiced packet (send time) to the first packet of it in a track.
    pub latency_ms: Option<Latency>,
    /// Speech of a turn that never reached a track: from its first voiced packet to the first
    /// packet of it forwarded (send times), per turn heard. What the listener never hears.
    pub clipped_ms: Option<Latency>,
    /// A source lost its track inside one of its turns while at most N sources were talking.
    pub cut_while_talking: usize,
    /// Time each source held a track.
    pub held_ms: BTreeMap<String, u64>,
    /// Time each source held a track outside its turns (plus a second of grace after each).
    pub held_outside_turns_ms: BTreeMap<String, u64>,
    /// Forwarded packets whose sequence number did not follow the previous one in the track.
    pub seq_discontinuities: usize,
    /// First packets after a switch whose timestamp did not advance past the track's last one.
    pub ts_backwards_at_switch: usize,
    /// Packets the "browsers" sent, the lost included.
    pub packets_sent: u64,
    /// Packets the network model lost.
    pub packets_lost: u64,
    /// Packets the core took in ([`CoreStats::packets_in`]).
    pub packets_in: u64,
    /// Packets the core forwarded, to any track ([`CoreStats::packets_out`]).
    pub packets_out: u64,
    /// Late packets from before a switch, not forwarded.
    pub dropped_before_switch: u64,
    /// Held packets replayed into a track as its source entered it ([`CoreStats::preroll_packets`]).
    pub preroll_packets: u64,
}

/// Everything a replay produced.
#[derive(Debug)]
pub struct ReplayResult {
    /// Every track change of the view's group, in order.
    pub changes: Vec<Change>,
    /// Every packet forwarded to the view's group, in order.
    pub forwarded: Vec<Forwarded>,
    /// The figures.
    pub summary: Summary,
    /// The core's own counters.
    pub stats: CoreStats,
    /// The core's state at [`ReplayOptions::until_us`], when asked.
    pub explained: Option<explain::Explained>,
}

struct Sent {
    arrival_us: u64,
    send_us: u64,
    source: u32,
    packet: Vec<u8>,
}

/// Tiny deterministic PRNG (splitmix64 stream): reproducible across platforms and versions.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Packetized {
    sent: Vec<Sent>,
    lost: u64,
    /// Each source's send-time offset within a frame.
    phase_us: Vec<u64>,
}

/// Packetizes every speaker as a browser would and applies the network model.
fn packetize(speakers: &[Speaker], opts: &ReplayOptions, rng: &mut Rng) -> Packetized {
    let mut sent = Vec::new();
    let mut lost = 0;
    let mut phases = Vec::new();
    let mut buf = Vec::with_capacity(1500);
    for (si, sp) in speakers.iter().enumerate() {
        let ssrc = rng.next_u64() as u32;
        let mut seq = rng.next_u64() as u16;
        let ts0 = rng.next_u64() as u32;
        // Sources are not frame-aligned in reality.
        let phase_us = rng.next_u64() % FRAME_US;
        phases.push(phase_us);
        let mut ts = ts0;
        let mut since_sent = u32::MAX;
        for (k, payload) in sp.packets.iter().enumerate() {
            let level = sp.levels.as_ref().and_then(|l| l.get(k)).copied();
            let samples = opus::packet_info(payload).map_or(960, |i| i.samples);
            let frame_ts = ts;
            ts = ts.wrapping_add(samples);
            let send_us = phase_us + k as u64 * FRAME_US;
            let mut body: &[u8] = payload;
            let quiet = level.is_some_and(|l| l >= 60);
            if opts.dtx && quiet {
                if since_sent < 19 {
                    since_sent += 1;
                    continue;
                }
                // The DTX keep-alive: just the TOC byte.
                body = &payload[..payload.len().min(1)];
            }
            since_sent = 0;
            let hdr = HeaderFields {
                payload_type: OPUS_PT,
                sequence_number: seq,
                timestamp: frame_ts,
                ssrc,
                marker: false,
            };
            seq = seq.wrapping_add(1);
            let level_byte = [level.unwrap_or(127)];
            let exts: &[(u8, &[u8])] = if opts.levels && level.is_some() {
                &[(LEVEL_EXT_ID, &level_byte)]
            } else {
                &[]
            };
            write_packet(&mut buf, &hdr, exts, body);
            if rng.unit() < opts.loss {
                lost += 1;
                continue;
            }
            let jitter = if opts.jitter_ms > 0 {
                rng.next_u64() % (opts.jitter_ms as u64 * 1000 + 1)
            } else {
                0
            };
            sent.push(Sent {
                arrival_us: send_us + jitter,
                send_us,
                source: si as u32,
                packet: buf.clone(),
            });
        }
    }
    sent.sort_by_key(|s| (s.arrival_us, s.source));
    Packetized {
        sent,
        lost,
        phase_us: phases,
    }
}

/// Replays `speakers` through one stream core with one view; an error for a bad option.
pub fn run(speakers: &[Speaker], opts: &ReplayOptions) -> Result<ReplayResult, String> {
    if opts.tracks == 0 {
        return Err("--tracks must be at least 1".into());
    }
    for name in opts.pinned.iter().chain(&opts.exclude) {
        if !speakers.iter().any(|s| &s.id == name) {
            return Err(format!("no source {name:?} in the corpus"));
        }
    }
    let mut rng = Rng(opts.seed);
    let mut core = StreamCore::new(CoreConfig {
        seed: opts.seed,
        ..CoreConfig::default()
    });
    // Source indices follow speaker order: publish in that order.
    for sp in speakers {
        let level_ext_id = opts.levels.then_some(LEVEL_EXT_ID);
        core.publish(&sp.id, SourceConfig { level_ext_id });
    }
    let pinned = opts.pinned.as_deref().and_then(|p| core.lookup(p));
    let excluded: Vec<SourceIdx> = opts.exclude.iter().filter_map(|e| core.lookup(e)).collect();
    let group = core.join(GroupKey::new(opts.tracks, pinned, excluded));

    let Packetized {
        sent,
        lost,
        phase_us,
    } = packetize(speakers, opts, &mut rng);
    let names: Vec<String> = speakers.iter().map(|s| s.id.clone()).collect();
    let mut changes = Vec::new();
    let mut forwarded = Vec::new();
    let tick_us = opts.tick_ms.max(1) as u64 * 1000;
    let mut next_tick = 0u64;
    // When each (source, sequence number) was sent, for the packets a pre-roll replays: the
    // newest of each number (a long corpus wraps them).
    let mut sent_at: HashMap<(u32, u16), u64> = HashMap::new();
    for s in &sent {
        // `now_us`: the time of the packet or tick being handled; `current`: the packet.
        let mut sink = |o: Output, now_us: u64, current: Option<(u32, u64, u64)>| match o {
            Output::Track(c) if c.group == group => changes.push(Change {
                t_ms: c.at_us / 1000,
                track: c.track,
                source: c.source.map(|x| names[x.0 as usize].clone()),
            }),
            Output::Packet {
                group: g,
                track,
                header,
                ..
            } if g == group => {
                let (source, send_us, arrival_us) =
                    current.expect("packets only come from on_packet");
                forwarded.push(Forwarded {
                    track,
                    source,
                    send_us,
                    arrival_us,
                    seq: header.seq,
                    ts: header.ts,
                    marker: header.marker,
                    silence: false,
                });
            }
            // Sent when the source sent it, forwarded now: clipped_ms sees the speech it saves,
            // the latency still the time until the track took the source.
            Output::Preroll {
                group: g,
                track,
                header,
                source,
                seq,
                ..
            } if g == group => forwarded.push(Forwarded {
                track,
                source: source.0,
                send_us: sent_at.get(&(source.0, seq)).copied().unwrap_or(now_us),
                arrival_us: now_us,
                seq: header.seq,
                ts: header.ts,
                marker: header.marker,
                silence: false,
            }),
            // Part of the track's numbering: the continuity check sees it.
            Output::Ending {
                group: g,
                track,
                header,
            } if g == group => {
                let at = now_us;
                // The source whose audio it ends: the track's holder until the change after it.
                let holder = changes
                    .iter()
                    .rev()
                    .find(|c: &&Change| c.track == track)
                    .and_then(|c| c.source.as_ref())
                    .and_then(|n| names.iter().position(|x| x == n));
                forwarded.push(Forwarded {
                    track,
                    source: holder.map_or(0, |i| i as u32),
                    send_us: at,
                    arrival_us: at,
                    seq: header.seq,
                    ts: header.ts,
                    marker: header.marker,
                    silence: true,
                });
            }
            _ => {}
        };
        let stop = opts.until_us.is_some_and(|t| s.arrival_us > t);
        let tick_to = if stop {
            opts.until_us.unwrap_or(s.arrival_us)
        } else {
            s.arrival_us
        };
        while next_tick <= tick_to {
            core.tick(next_tick, &mut |o| sink(o, next_tick, None));
            next_tick += tick_us;
        }
        if stop {
            break;
        }
        let cur = Some((s.source, s.send_us, s.arrival_us));
        // A replayed corpus is well formed; a drop here would be a core bug worth surfacing.
        core.on_packet(s.arrival_us, SourceIdx(s.source), &s.packet, &mut |o| {
            sink(o, s.arrival_us, cur)
        })
        .map_err(|e| format!("core dropped a replayed packet: {e}"))?;
        let seq = u16::from_be_bytes([s.packet[2], s.packet[3]]);
        sent_at.insert((s.source, seq), s.send_us);
    }
    let last_us = sent.last().map_or(0, |s| s.arrival_us);
    let end_us = opts.until_us.map_or(last_us, |t| t.min(last_us));
    let explained = opts
        .until_us
        .map(|t| explain::explain(&core, group, speakers, &phase_us, t));
    let run = Run {
        names: &names,
        phase_us: &phase_us,
        changes: &changes,
        forwarded: &forwarded,
        end_us,
        stats: core.stats(),
        packets_sent: sent.len() as u64 + lost,
        packets_lost: lost,
    };
    let summary = summarize(speakers, opts, &run);
    Ok(ReplayResult {
        changes,
        forwarded,
        summary,
        stats: core.stats().clone(),
        explained,
    })
}

/// What a replay run produced, for the summary.
struct Run<'a> {
    names: &'a [String],
    phase_us: &'a [u64],
    changes: &'a [Change],
    forwarded: &'a [Forwarded],
    end_us: u64,
    stats: &'a CoreStats,
    packets_sent: u64,
    packets_lost: u64,
}

fn summarize(speakers: &[Speaker], opts: &ReplayOptions, run: &Run<'_>) -> Summary {
    let Run {
        names,
        phase_us: phase,
        changes,
        forwarded,
        end_us,
        stats,
        packets_sent,
        packets_lost,
    } = *run;
    let admitted =
        |id: &str| opts.pinned.as_deref() != Some(id) && !opts.exclude.iter().any(|e| e == id);
    // Turns in send-time microseconds, per source: annotated where the corpus has them,
    // else from the levels.
    let turns: Vec<Vec<(u64, u64)>> = speakers
        .iter()
        .enumerate()
        .map(|(si, sp)| match &sp.turns {
            Some(annotated) => truth::merge(annotated)
                .into_iter()
                .map(|(a, b)| (phase[si] + a, phase[si] + b))
                .collect(),
            None => {
                let ts = sp.levels.as_deref().map(truth::turns).unwrap_or_default();
                ts.iter()
                    .map(|t: &Turn| {
                        (
                            phase[si] + t.first_frame as u64 * FRAME_US,
                            phase[si] + t.last_frame as u64 * FRAME_US,
                        )
                    })
                    .collect()
            }
        })
        .collect();
    let in_turn = |si: usize, t_us: u64| turns[si].iter().any(|&(a, b)| a <= t_us && t_us <= b);

    // Latency from each admitted turn's first voiced packet to its first forwarded packet.
    let mut latencies = Vec::new();
    let mut clipped = Vec::new();
    let mut n_turns = 0;
    for (si, sp) in speakers.iter().enumerate() {
        if !admitted(&sp.id) {
            continue;
        }
        for &(first, last) in &turns[si] {
            n_turns += 1;
            let of_turn = || {
                forwarded.iter().filter(|f| {
                    !f.silence && f.source == si as u32 && f.send_us >= first && f.send_us <= last
                })
            };
            if let Some(h) = of_turn().map(|f| f.arrival_us).min() {
                latencies.push(h.saturating_sub(first));
            }
            if let Some(s) = of_turn().map(|f| f.send_us).min() {
                clipped.push(s - first);
            }
        }
    }
    latencies.sort_unstable();
    let latency_ms = percentiles_ms(&latencies);
    clipped.sort_unstable();
    let clipped_ms = percentiles_ms(&clipped);

    // Replay the change log: time held, and cuts while talking.
    let index = |n: &str| names.iter().position(|x| x == n);
    let mut holder: Vec<Option<(usize, u64)>> = vec![None; opts.tracks as usize];
    let mut held = vec![0u64; names.len()];
    let mut held_outside = vec![0u64; names.len()];
    let mut cuts = 0;
    let grace_us = 1_000_000;
    let outside = |si: usize, from: u64, to: u64| -> u64 {
        // Sample each 10 ms: exact enough for a report.
        (from..to)
            .step_by(10_000)
            .filter(|&t| {
                !turns[si]
                    .iter()
                    .any(|&(a, b)| a.saturating_sub(grace_us) <= t && t <= b + grace_us)
            })
            .count() as u64
            * 10_000
    };
    let close =
        |h: Option<(usize, u64)>, t: u64, held: &mut Vec<u64>, held_outside: &mut Vec<u64>| {
            if let Some((si, since)) = h {
                held[si] += t.saturating_sub(since);
                held_outside[si] += outside(si, since, t);
            }
        };
    for c in changes {
        let t_us = c.t_ms * 1000;
        let tr = c.track as usize;
        if let Some((prev, _)) = holder[tr] {
            let talking_now = (0..names.len())
                .filter(|&s| admitted(&names[s]) && in_turn(s, t_us))
                .count();
            if in_turn(prev, t_us) && talking_now <= opts.tracks as usize {
                cuts += 1;
            }
        }
        close(holder[tr], t_us, &mut held, &mut held_outside);
        holder[tr] = c.source.as_deref().and_then(index).map(|si| (si, t_us));
    }
    for h in holder {
        close(h, end_us, &mut held, &mut held_outside);
    }

    // Continuity per track, in arrival order.
    let mut seq_discontinuities = 0;
    let mut ts_backwards = 0;
    let mut last: Vec<Option<(u16, u32)>> = vec![None; opts.tracks as usize];
    for f in forwarded {
        let l = &mut last[f.track as usize];
        if let Some((s, ts)) = *l {
            if f.seq != s.wrapping_add(1) {
                seq_discontinuities += 1;
            }
            if f.marker && (f.ts.wrapping_sub(ts) as i32) <= 0 {
                ts_backwards += 1;
            }
        }
        let newer = l.is_none_or(|(s, _)| (f.seq.wrapping_sub(s) as i16) > 0);
        if newer {
            *l = Some((f.seq, f.ts));
        }
    }

    let by_name = |v: &[u64]| {
        names
            .iter()
            .cloned()
            .zip(v.iter().map(|us| us / 1000))
            .collect()
    };
    Summary {
        tracks: opts.tracks,
        sources: speakers.len(),
        switches: changes.len(),
        turns: n_turns,
        turns_heard: latencies.len(),
        latency_ms,
        clipped_ms,
        cut_while_talking: cuts,
        held_ms: by_name(&held),
        held_outside_turns_ms: by_name(&held_outside),
        seq_discontinuities,
        ts_backwards_at_switch: ts_backwards,
        packets_sent,
        packets_lost,
        packets_in: stats.packets_in,
        packets_out: stats.packets_out,
        dropped_before_switch: stats.dropped_before_switch,
        preroll_packets: stats.preroll_packets,
    }
}
