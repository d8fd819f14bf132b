//! One stream's packet core: its sources, their voice activity, the shared selection and one
//! rewriter per (group, track). Plain data in, data out: time is an argument, output goes to a
//! callback in the order it must be acted on (a track change before the first packet it brings).
//! A packet is parsed once, by whoever received it: the core takes the [`RtpView`] and emits, per
//! (group, track) that carries it, only the rewritten header fields; the payload and extensions
//! stay where they are, in the caller's buffer.

use std::collections::HashMap;

use smallvec::SmallVec;

use super::activity::{Transition, VadConfig, Voice, VoiceActivity};
use super::frame_clock::DEFAULT_FRAME;
use super::opus;
use super::red::{RedLayout, RELAY_OPUS_PT, RELAY_RED_PT};
use super::rewrite::{Feed, InputPacket, RewriteDrop, Rewritten, TrackRewriter};
use super::rtp::{RtpError, RtpView};
use super::selection::{GroupId, GroupKey, SelectionConfig, Selector, Standing, TrackChange};
use super::SourceIdx;

/// Largest packet the core forwards: a UDP payload that fits a 1500-byte Ethernet MTU.
pub const MAX_PACKET: usize = 1472;

/// What the core needs to know of one source.
#[derive(Debug, Clone, Default)]
pub struct SourceConfig {
    /// RFC 6464 audio level extension id from the publisher's SDP, if negotiated.
    pub level_ext_id: Option<u8>,
}

/// A stream core's settings.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Voice activity detection: levels, hangover, onset rules.
    pub vad: VadConfig,
    /// How sources are ranked and switched into tracks.
    pub selection: SelectionConfig,
    /// Seeds the output SSRCs and starting sequence numbers / timestamps.
    pub seed: u64,
    /// How much of a source's recent audio a track it enters replays first (pre-roll), in
    /// packet-time µs; 0 = none. See [`PREROLL_US`].
    pub preroll_us: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            vad: VadConfig::default(),
            selection: SelectionConfig::default(),
            seed: 0,
            preroll_us: PREROLL_US,
        }
    }
}

/// The pre-roll's default reach: detection puts a talker into a track 30-40 ms after the loud
/// part of an onset starts, up to about 100 ms after a careful annotation's start (breath and a
/// soft "h" lead the loud part). 120 ms of replay covers that, and costs the listener at most
/// 120 ms of extra buffering at each switch-in, which the receiver's jitter buffer drains again.
pub const PREROLL_US: u64 = 120_000;

/// Packets each source keeps for pre-roll: 120 ms of 10 ms packets (or 240 ms of 20 ms ones,
/// of which the time limit takes 120). Fixed, so holding them never allocates.
pub(crate) const PREROLL_SLOTS: usize = 12;

/// Lost packets in a row a pre-roll steps over (see [`Held::run`]).
const PREROLL_MAX_LOST: u16 = 2;

/// A held packet counts as still flowing (for a switch-in outside a packet of its own) when it
/// arrived this recently: three 20 ms frames.
const PREROLL_FRESH_US: u64 = 60_000;

/// Why an incoming packet was not used. Every drop is counted in [`CoreStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a valid RTP packet.
    Malformed(RtpError),
    /// Longer than [`MAX_PACKET`] (its length).
    TooLarge(usize),
    /// The source index is not a live source of this stream.
    UnknownSource,
}

impl std::fmt::Display for Drop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drop::Malformed(e) => write!(f, "malformed RTP: {e}"),
            Drop::TooLarge(n) => write!(f, "packet of {n} bytes exceeds {MAX_PACKET}"),
            Drop::UnknownSource => write!(f, "packet for a source that is not live"),
        }
    }
}

/// What a stream core counted since it was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Packets of live sources taken in (before selection).
    pub packets_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Packets forwarded: one per (group, track) that carried a packet.
    pub packets_out: u64,
    /// Their bytes (whole packets, as received).
    pub bytes_out: u64,
    /// Drops of [`Drop::Malformed`].
    pub dropped_malformed: u64,
    /// Drops of [`Drop::TooLarge`].
    pub dropped_too_large: u64,
    /// Drops of [`Drop::UnknownSource`].
    pub dropped_unknown_source: u64,
    /// Packets of a track's source that arrived late, from before it was switched in.
    pub dropped_before_switch: u64,
    /// Track changes: a source switched into (or out of) a group's track.
    pub switches: u64,
    /// Times a source's voice activity started (onsets).
    pub onsets: u64,
    /// Silence frames that ended a track's audio when it emptied ([`Output::Ending`]).
    pub ending_frames: u64,
    /// Held packets replayed into a track its source entered ([`Output::Preroll`]).
    pub preroll_packets: u64,
}

/// What the core asks its driver to do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A track of a group changed source: tell that group's viewers (the `vad` event).
    Track(TrackChange),
    /// Send the packet being handled on `track` to every viewer of `group`, with these header
    /// fields (SSRC, sequence number, timestamp, marker) in place of its own.
    Packet {
        /// The group of viewers whose track it goes to.
        group: GroupId,
        /// The track's index in the group.
        track: u8,
        /// The header fields to send it with.
        header: Rewritten,
        /// Its audio duration in samples (what a further rewrite of this stream needs).
        samples: u32,
    },
    /// Send an Opus silence frame ([`opus::SILENCE_FRAME`], 20 ms) on `track` to every viewer of
    /// `group`, with these header fields: the track emptied, and its audio ends in silence so
    /// the viewer's decoder goes quiet instead of stretching the last frame it had.
    Ending {
        /// The group of viewers whose track it goes to.
        group: GroupId,
        /// The track's index in the group.
        track: u8,
        /// The header fields to send it with (continuing the track's numbering).
        header: Rewritten,
    },
    /// Send a packet `source` sent before it entered this track (its sequence number `seq`,
    /// as the driver received it) on `track` to every viewer of `group`, with these header
    /// fields: the start of the talkspurt that detection was still confirming, so the listener
    /// hears the first syllable. It comes after the [`Output::Track`] that put the source in the
    /// track, before the packet that follows it, oldest first, the first with the marker set.
    /// The driver keeps the payloads of each source's last [`PREROLL_SLOTS`] packets; the core
    /// names only those.
    Preroll {
        /// The group of viewers whose track it goes to.
        group: GroupId,
        /// The track's index in the group.
        track: u8,
        /// The header fields to send it with.
        header: Rewritten,
        /// Its audio duration in samples.
        samples: u32,
        /// The source that sent it.
        source: SourceIdx,
        /// Its sequence number as the source sent it (how the driver finds its payload).
        seq: u16,
    },
}

/// Silence frames sent when a track empties: one would do; three survive a lost packet and give
/// the receiver's jitter buffer 60 ms of real silence to drain into.
pub(crate) const ENDING_FRAMES: usize = 3;

#[derive(Debug)]
struct Source {
    live: bool,
    /// Groups whose key names this source (pinned, excluded or projected).
    refs: u32,
    cfg: SourceConfig,
    activity: VoiceActivity,
}

/// One held packet's header: what a pre-roll rewrite needs.
#[derive(Debug, Clone, Copy, Default)]
struct HeldPacket {
    valid: bool,
    marker: bool,
    seq: u16,
    ssrc: u32,
    ts: u32,
    samples: u32,
    at_us: u64,
}

/// A source's last packets, slotted by sequence number (so a reordered packet lands where it
/// belongs and a slot names the one packet it holds).
#[derive(Debug, Clone, Default)]
struct Held {
    slots: [HeldPacket; PREROLL_SLOTS],
    /// The highest sequence number held.
    newest: Option<u16>,
}

impl Held {
    fn slot(seq: u16) -> usize {
        seq as usize % PREROLL_SLOTS
    }

    fn get(&self, seq: u16) -> Option<&HeldPacket> {
        let h = &self.slots[Self::slot(seq)];
        (h.valid && h.seq == seq).then_some(h)
    }

    fn hold(&mut self, p: HeldPacket) {
        // A late packet of the same SSRC fills its slot without moving the newest.
        let late = self
            .newest
            .and_then(|n| self.get(n))
            .is_some_and(|n| n.ssrc == p.ssrc && (p.seq.wrapping_sub(n.seq) as i16) < 0);
        self.slots[Self::slot(p.seq)] = p;
        if !late {
            self.newest = Some(p.seq);
        }
    }

    /// The packets to replay into a track the source enters at `now_us`: the newest unbroken
    /// run (consecutive timestamps, one SSRC, short losses stepped over) that ends at the newest
    /// held packet and holds at most `reach_us` of audio, as (first sequence number, span of
    /// sequence numbers, the lost ones included); oldest first. `next` is the packet being handled, when it is this source's: the run must lead
    /// straight into it. Without it, the newest held packet must be fresh
    /// ([`PREROLL_FRESH_US`]): a source that stopped sending has nothing to lead into.
    fn run(&self, now_us: u64, reach_us: u64, next: Option<&InputPacket>) -> (u16, usize) {
        let Some(newest) = self.newest.and_then(|n| self.get(n)) else {
            return (0, 0);
        };
        let leads = match next {
            // Right after the newest held, or a few packets on (a loss), or a few before it
            // (arriving late, out of order): the timestamps must agree with the distance.
            Some(p) => {
                let d = p.seq.wrapping_sub(newest.seq) as i16;
                let expected = newest
                    .ts
                    .wrapping_add(newest.samples.wrapping_mul(d as i32 as u32));
                p.ssrc == newest.ssrc
                    && d != 0
                    && d.unsigned_abs() <= PREROLL_MAX_LOST + 1
                    && p.ts == expected
            }
            None => now_us.saturating_sub(newest.at_us) <= PREROLL_FRESH_US,
        };
        if !leads {
            return (0, 0);
        }
        // Counted in audio, not arrival times, which jitter.
        let reach = reach_us * opus::CLOCK_RATE as u64 / 1_000_000;
        let (mut first, mut audio) = (newest.seq, newest.samples as u64);
        if audio > reach {
            return (0, 0);
        }
        let mut later = newest;
        // Walk back over held packets; a lost one (up to PREROLL_MAX_LOST in a row) is stepped
        // over when the timestamps say no audio is missing beyond it: the receiver conceals
        // the loss as it would have anyway.
        'walk: while newest.seq.wrapping_sub(first) < PREROLL_SLOTS as u16 - 1 {
            for lost in 0..=PREROLL_MAX_LOST {
                let seq = first.wrapping_sub(1 + lost);
                if newest.seq.wrapping_sub(seq) >= PREROLL_SLOTS as u16 {
                    break 'walk;
                }
                let Some(h) = self.get(seq) else { continue };
                let gap = h.samples.wrapping_mul(lost as u32 + 1);
                let joins = h.ssrc == later.ssrc && later.ts == h.ts.wrapping_add(gap);
                if !joins || audio + h.samples as u64 * (lost as u64 + 1) > reach {
                    break 'walk;
                }
                audio += h.samples as u64 * (lost as u64 + 1);
                first = seq;
                later = h;
                continue 'walk;
            }
            break;
        }
        (first, newest.seq.wrapping_sub(first) as usize + 1)
    }
}

/// The sources a group's key names: they stay interned while the group exists.
type KeyNames = SmallVec<[SourceIdx; 8]>;

fn key_names(key: &GroupKey) -> KeyNames {
    let mut v: KeyNames = key.pinned().into_iter().collect();
    v.extend(key.excluded().iter().copied());
    v.extend(key.fixed().iter().map(|(_, s)| *s));
    v.sort_unstable();
    v.dedup();
    v
}

/// A stream's sourceIds are interned to [`SourceIdx`]es, and released again: a name stays while
/// it is live (published) or named by a group of viewers, then its index is reused. So the table
/// never holds more than the live sources plus what the current viewers name (each view names at
/// most its pinned source, its excluded ones and its projections), and the per-tick scans walk
/// only the live sources.
pub struct StreamCore {
    cfg: CoreConfig,
    names: Vec<String>,
    index: HashMap<String, SourceIdx>,
    sources: Vec<Source>,
    /// Each source's held packets for pre-roll, by index: apart from `sources`, whose scans
    /// (every tick walks the live ones) stay compact.
    held: Vec<Held>,
    /// Indices of released names, for reuse.
    free: Vec<u32>,
    /// The live sources, ascending (the order every scan used before).
    live: Vec<SourceIdx>,
    selector: Selector,
    /// Rewriters by group id, one per track.
    rewriters: Vec<SmallVec<[TrackRewriter; 4]>>,
    stats: CoreStats,
}

impl StreamCore {
    /// An empty core: no sources, no groups.
    pub fn new(cfg: CoreConfig) -> Self {
        StreamCore {
            selector: Selector::new(cfg.selection.clone()),
            cfg,
            names: Vec::new(),
            index: HashMap::new(),
            sources: Vec::new(),
            held: Vec::new(),
            free: Vec::new(),
            live: Vec::new(),
            rewriters: Vec::new(),
            stats: CoreStats::default(),
        }
    }

    /// The index of a sourceId, known to the stream whether live or not (so a viewer can exclude
    /// a source before it publishes). The name stays interned once it is published or named by a
    /// group ([`join`](Self::join)); an index interned for neither is released by
    /// [`release_if_unused`](Self::release_if_unused), or reused by the next name that is.
    pub(crate) fn intern(&mut self, name: &str) -> SourceIdx {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let fresh = Source {
            live: false,
            refs: 0,
            cfg: SourceConfig::default(),
            activity: VoiceActivity::new(&self.cfg.vad),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.names[i as usize] = name.to_owned();
                self.sources[i as usize] = fresh;
                self.held[i as usize] = Held::default();
                SourceIdx(i)
            }
            None => {
                self.names.push(name.to_owned());
                self.sources.push(fresh);
                self.held.push(Held::default());
                SourceIdx(self.names.len() as u32 - 1)
            }
        };
        self.index.insert(name.to_owned(), i);
        i
    }

    /// Releases `s` if it is neither live nor named by a group: its index may be reused.
    pub(crate) fn release_if_unused(&mut self, s: SourceIdx) {
        let Some(src) = self.sources.get(s.0 as usize) else {
            return;
        };
        if src.live || src.refs > 0 {
            return;
        }
        let name = std::mem::take(&mut self.names[s.0 as usize]);
        if self.index.get(&name) == Some(&s) {
            self.index.remove(&name);
            self.free.push(s.0);
        }
    }

    /// Interned names right now (live, named by a group, or not yet released).
    pub(crate) fn interned(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<SourceIdx> {
        self.index.get(name).copied()
    }

    /// The sourceId interned as `s` (panics on an index this core never gave).
    pub fn name(&self, s: SourceIdx) -> &str {
        &self.names[s.0 as usize]
    }

    /// Starts (or restarts, for a replacing publication) a source with fresh activity state.
    pub fn publish(&mut self, name: &str, cfg: SourceConfig) -> SourceIdx {
        let i = self.intern(name);
        let src = &mut self.sources[i.0 as usize];
        src.live = true;
        src.cfg = cfg;
        src.activity = VoiceActivity::new(&self.cfg.vad);
        self.held[i.0 as usize] = Held::default();
        if let Err(at) = self.live.binary_search(&i) {
            self.live.insert(at, i);
        }
        i
    }

    /// The source stopped: its tracks empty now, and its name is released unless a group names it.
    pub(crate) fn unpublish(&mut self, now_us: u64, s: SourceIdx, out: &mut impl FnMut(Output)) {
        if let Some(src) = self.sources.get_mut(s.0 as usize) {
            src.live = false;
        }
        if let Ok(at) = self.live.binary_search(&s) {
            self.live.remove(at);
        }
        self.selector.remove_source(now_us, s);
        self.flush_events(out, None);
        self.release_if_unused(s);
    }

    pub(crate) fn is_live(&self, s: SourceIdx) -> bool {
        self.sources.get(s.0 as usize).is_some_and(|s| s.live)
    }

    /// How long a source's packets last (samples), learnt from its timestamps: what a rewrite
    /// of its packets outside the core (a main track) needs.
    pub(crate) fn frame_samples(&self, s: SourceIdx) -> u32 {
        self.sources
            .get(s.0 as usize)
            .map_or(DEFAULT_FRAME, |src| src.activity.frame_samples())
    }

    pub(crate) fn live_sources(&self) -> impl Iterator<Item = SourceIdx> + '_ {
        self.live.iter().copied()
    }

    /// Adds a viewer with this key; viewers with equal keys share a group. A new group keeps the
    /// names its key uses interned until it is gone.
    pub fn join(&mut self, key: GroupKey) -> GroupId {
        let tracks = key.tracks();
        let names = key_names(&key);
        let gid = self.selector.join(key);
        if self.selector.refs(gid) == 1 {
            for s in names {
                if let Some(src) = self.sources.get_mut(s.0 as usize) {
                    src.refs += 1;
                }
            }
        }
        let gi = gid.0 as usize;
        if self.rewriters.len() <= gi {
            self.rewriters.resize_with(gi + 1, SmallVec::new);
        }
        if self.rewriters[gi].is_empty() {
            let seed = self.cfg.seed;
            self.rewriters[gi] = (0..tracks)
                .map(|t| {
                    let r = splitmix64(seed ^ ((gi as u64) << 8 | t as u64));
                    TrackRewriter::new(r as u32, (r >> 32) as u16, (r >> 48) as u32 * 7919)
                })
                .collect();
        }
        gid
    }

    /// Joins `key` for a viewer leaving a group whose tracks carried `from`: a group created
    /// now starts with those sources in the same tracks where they still fit.
    pub(crate) fn join_from(
        &mut self,
        now_us: u64,
        key: GroupKey,
        from: &[Option<SourceIdx>],
    ) -> GroupId {
        let gid = self.join(key);
        if self.selector.refs(gid) == 1 {
            let (sources, vad) = (&self.sources, &self.cfg.vad);
            self.selector
                .seed(gid, now_us, from, |x| standing_of(sources, vad, x, now_us));
        }
        gid
    }

    /// Removes a viewer from its group; the last one out ends the group and releases its names.
    pub(crate) fn leave(&mut self, gid: GroupId) {
        let names = match self.selector.group_key(gid) {
            Some(k) if self.selector.refs(gid) == 1 => key_names(k),
            _ => KeyNames::new(),
        };
        if self.selector.leave(gid) {
            self.rewriters[gid.0 as usize].clear();
            for s in names {
                if let Some(src) = self.sources.get_mut(s.0 as usize) {
                    src.refs = src.refs.saturating_sub(1);
                }
                self.release_if_unused(s);
            }
        }
    }

    /// The selection: groups, their tracks and who is in them.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// The rewriter of one track of a group, if both exist.
    pub fn rewriter(&self, gid: GroupId, track: u8) -> Option<&TrackRewriter> {
        self.rewriters.get(gid.0 as usize)?.get(track as usize)
    }

    /// What the core counted so far.
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Source `s`'s voice activity at `now_us`.
    pub fn voice(&self, s: SourceIdx, now_us: u64) -> Voice {
        self.standing(s, now_us).voice
    }

    /// Source `s`'s standing (voice, score, live) at `now_us`, as the selection sees it.
    pub fn standing(&self, s: SourceIdx, now_us: u64) -> Standing {
        standing_of(&self.sources, &self.cfg.vad, s, now_us)
    }

    /// Source `s`'s last packet's loudness over its noise floor ([`VoiceActivity::over_floor`]).
    pub fn over_floor(&self, s: SourceIdx) -> Option<i16> {
        self.sources.get(s.0 as usize)?.activity.over_floor()
    }

    /// One packet of source `s` arrived at `now_us`, as bytes: parsed here, then
    /// [`on_rtp`](Self::on_rtp). For callers that have not parsed it themselves (replay, fuzz).
    pub fn on_packet(
        &mut self,
        now_us: u64,
        s: SourceIdx,
        packet: &[u8],
        out: &mut impl FnMut(Output),
    ) -> Result<(), Drop> {
        match RtpView::parse(packet) {
            Ok(view) => {
                let red = match view.payload_type() {
                    RELAY_RED_PT => Some(
                        RedLayout::parse(view.payload(), RELAY_OPUS_PT)
                            .unwrap_or_else(|_| RedLayout::opaque(view.payload().len())),
                    ),
                    _ => None,
                };
                self.on_rtp(now_us, s, &view, red.as_ref(), out)
            }
            Err(e) => {
                let drop = if packet.len() > MAX_PACKET {
                    Drop::TooLarge(packet.len())
                } else {
                    Drop::Malformed(e)
                };
                self.count(drop);
                Err(drop)
            }
        }
    }

    /// One packet of source `s` arrived at `now_us`, parsed by the caller; `red` is its RED
    /// layout when it is RED (then its primary block is the Opus that voice activity reads).
    pub(crate) fn on_rtp(
        &mut self,
        now_us: u64,
        s: SourceIdx,
        view: &RtpView<'_>,
        red: Option<&RedLayout>,
        out: &mut impl FnMut(Output),
    ) -> Result<(), Drop> {
        let result = self.ingest(now_us, s, view, red, out);
        if let Err(d) = result {
            self.count(d);
        }
        result
    }

    fn count(&mut self, d: Drop) {
        match d {
            Drop::Malformed(_) => self.stats.dropped_malformed += 1,
            Drop::TooLarge(_) => self.stats.dropped_too_large += 1,
            Drop::UnknownSource => self.stats.dropped_unknown_source += 1,
        }
    }

    fn ingest(
        &mut self,
        now_us: u64,
        s: SourceIdx,
        view: &RtpView<'_>,
        red: Option<&RedLayout>,
        out: &mut impl FnMut(Output),
    ) -> Result<(), Drop> {
        let len = view.as_bytes().len();
        if len > MAX_PACKET {
            return Err(Drop::TooLarge(len));
        }
        let src = match self.sources.get_mut(s.0 as usize) {
            Some(src) if src.live => src,
            _ => return Err(Drop::UnknownSource),
        };
        self.stats.packets_in += 1;
        self.stats.bytes_in += len as u64;
        let opus = match red {
            Some(l) => &view.payload()[l.primary()],
            None => view.payload(),
        };
        let transition =
            src.activity
                .observe_opus(&self.cfg.vad, now_us, view, opus, src.cfg.level_ext_id);
        // From the timestamps: the payload may be end-to-end encrypted.
        let samples = src.activity.frame_samples();
        let input = InputPacket {
            source: Feed::Source(s),
            ssrc: view.ssrc(),
            seq: view.sequence_number(),
            ts: view.timestamp(),
            marker: view.marker(),
            samples,
        };
        if transition == Transition::Onset {
            self.stats.onsets += 1;
            let (sources, vad) = (&self.sources, &self.cfg.vad);
            self.selector
                .on_onset(now_us, s, |x| standing_of(sources, vad, x, now_us));
            self.flush_events(out, Some((s, &input)));
        }
        for &(gid, track) in self.selector.placements(s) {
            let Some(rw) = self
                .rewriters
                .get_mut(gid.0 as usize)
                .and_then(|r| r.get_mut(track as usize))
            else {
                continue;
            };
            match rw.rewrite(now_us, &input) {
                Ok(header) => {
                    self.stats.packets_out += 1;
                    self.stats.bytes_out += len as u64;
                    out(Output::Packet {
                        group: gid,
                        track,
                        header,
                        samples: input.samples,
                    });
                }
                Err(RewriteDrop::BeforeSwitch) => self.stats.dropped_before_switch += 1,
            }
        }
        // Held after it was handled: a pre-roll it triggered leads into it, not through it.
        self.held[s.0 as usize].hold(HeldPacket {
            valid: true,
            marker: input.marker,
            seq: input.seq,
            ssrc: input.ssrc,
            ts: input.ts,
            samples,
            at_us: now_us,
        });
        Ok(())
    }

    /// Re-ranks the stream and updates every group's tracks. Call every 10-20 ms of packet time.
    pub fn tick(&mut self, now_us: u64, out: &mut impl FnMut(Output)) {
        let (sources, vad) = (&self.sources, &self.cfg.vad);
        let live = self
            .live
            .iter()
            .map(|&s| (s, standing_of(sources, vad, s, now_us)));
        self.selector
            .tick(now_us, live, |x| standing_of(sources, vad, x, now_us));
        self.flush_events(out, None);
    }

    /// Acts on the selector's track changes, in order. `next` is the packet being handled (and
    /// its source), when a change comes from it: a pre-roll leads into it.
    fn flush_events(
        &mut self,
        out: &mut impl FnMut(Output),
        next: Option<(SourceIdx, &InputPacket)>,
    ) {
        let events = self.selector.events();
        self.stats.switches += events.len() as u64;
        for e in events.drain(..) {
            if let Some(rw) = self
                .rewriters
                .get_mut(e.group.0 as usize)
                .and_then(|r| r.get_mut(e.track as usize))
            {
                // The old source's last packet is out: end its audio before the track says it
                // is empty.
                if e.source.is_none() {
                    for _ in 0..ENDING_FRAMES {
                        let Some(header) = rw.follow_on(e.at_us, opus::SILENCE_SAMPLES) else {
                            break;
                        };
                        self.stats.ending_frames += 1;
                        out(Output::Ending {
                            group: e.group,
                            track: e.track,
                            header,
                        });
                    }
                }
                rw.detach();
                out(Output::Track(e));
                if let Some(x) = e.source {
                    let next = next.filter(|(n, _)| *n == x).map(|(_, p)| p);
                    let stats = &mut self.stats;
                    let (sources, held) = (&self.sources, &self.held);
                    preroll(sources, held, self.cfg.preroll_us, &e, rw, next, stats, out);
                }
            } else {
                out(Output::Track(e));
            }
        }
    }
}

/// Replays the start of `e`'s source's talkspurt into the track it entered: its held packets
/// ([`Held::run`]) through the track's rewriter, so the track's numbering runs on gapless into
/// the packet that follows.
#[allow(clippy::too_many_arguments)]
fn preroll(
    sources: &[Source],
    held: &[Held],
    reach_us: u64,
    e: &TrackChange,
    rw: &mut TrackRewriter,
    next: Option<&InputPacket>,
    stats: &mut CoreStats,
    out: &mut impl FnMut(Output),
) {
    let Some(x) = e.source else { return };
    let live = sources.get(x.0 as usize).is_some_and(|s| s.live);
    let Some(held) = held.get(x.0 as usize).filter(|_| live && reach_us > 0) else {
        return;
    };
    let (first, span) = held.run(e.at_us, reach_us, next);
    for i in 0..span as u16 {
        // A loss inside the run: the numbering keeps its gap, as the source's own did.
        let Some(h) = held.get(first.wrapping_add(i)) else {
            continue;
        };
        let input = InputPacket {
            source: Feed::Source(x),
            ssrc: h.ssrc,
            seq: h.seq,
            ts: h.ts,
            marker: h.marker,
            samples: h.samples,
        };
        let Ok(header) = rw.rewrite(e.at_us, &input) else {
            break;
        };
        stats.preroll_packets += 1;
        out(Output::Preroll {
            group: e.group,
            track: e.track,
            header,
            samples: h.samples,
            source: x,
            seq: h.seq,
        });
    }
}

fn standing_of(sources: &[Source], vad: &VadConfig, s: SourceIdx, now_us: u64) -> Standing {
    match sources.get(s.0 as usize) {
        Some(src) if src.live => match src.activity.voice(vad, now_us) {
            // Selection never weighs a silent source's score: skip the decay (an exp) for
            // the many silent sources of a large stream.
            Voice::Silent => Standing::QUIET,
            voice => Standing {
                voice,
                score: src.activity.score_at(vad, now_us),
                live: true,
            },
        },
        _ => Standing::GONE,
    }
}

/// Deterministic 64-bit mixer for seeding output SSRCs and sequence numbers.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::{write_packet, HeaderFields};

    fn packet(seq: u16, level: u8) -> Vec<u8> {
        packet_at(seq, seq as u32 * 960, level)
    }

    fn packet_at(seq: u16, ts: u32, level: u8) -> Vec<u8> {
        let mut buf = Vec::new();
        let hdr = HeaderFields {
            payload_type: 111,
            sequence_number: seq,
            timestamp: ts,
            ssrc: 5,
            marker: false,
        };
        write_packet(&mut buf, &hdr, &[(1, &[level])], &[0x78; 70]);
        buf
    }

    fn levelled() -> SourceConfig {
        SourceConfig {
            level_ext_id: Some(1),
        }
    }

    /// 1.2 s of room noise, then `speech`: the log of what the speech frames caused.
    fn room_then_speech(
        core: &mut StreamCore,
        s: SourceIdx,
        t0: u64,
        seq0: u16,
        speech: &[u8],
    ) -> Vec<String> {
        feed(core, s, t0, seq0, &[70; 60]);
        feed(core, s, t0 + 1_200_000, seq0 + 60, speech)
    }

    /// The log of source 0 entering track 0 after room noise: the change, the pre-roll (the
    /// 120 ms of 20 ms packets before the onset packet), then `then`.
    fn entered(then: &[&str]) -> Vec<String> {
        let pre = (PREROLL_US / 20_000) as usize;
        std::iter::once("track0=Some(0)")
            .chain(std::iter::repeat_n("pre0", pre))
            .chain(then.iter().copied())
            .map(String::from)
            .collect()
    }

    /// Feeds `levels` from one source at 20 ms steps, ticking each 10 ms; collects outputs.
    fn feed(core: &mut StreamCore, s: SourceIdx, t0: u64, seq0: u16, levels: &[u8]) -> Vec<String> {
        let mut log = Vec::new();
        for (i, &l) in levels.iter().enumerate() {
            let now = t0 + i as u64 * 20_000;
            let mut sink = |o: Output| {
                log.push(match o {
                    Output::Track(c) => format!("track{}={:?}", c.track, c.source.map(|s| s.0)),
                    Output::Packet { track, .. } => format!("pkt{track}"),
                    Output::Ending { track, .. } => format!("end{track}"),
                    Output::Preroll { track, .. } => format!("pre{track}"),
                })
            };
            core.on_packet(now, s, &packet(seq0 + i as u16, l), &mut sink)
                .unwrap();
            core.tick(now + 10_000, &mut sink);
        }
        log
    }

    /// A packet of `len` Opus bytes (hybrid FB 20 ms), plain or RED-wrapped with the previous
    /// frame as one redundant block; no level extension, so activity reads payload sizes.
    fn sized(seq: u16, len: usize, red: bool) -> Vec<u8> {
        let frame = vec![0x78; len];
        let mut payload = Vec::new();
        if red {
            crate::media::red::write_red(&mut payload, RELAY_OPUS_PT, &[(960, &frame)], &frame);
        } else {
            payload = frame;
        }
        let hdr = HeaderFields {
            payload_type: if red { RELAY_RED_PT } else { RELAY_OPUS_PT },
            sequence_number: seq,
            timestamp: seq as u32 * 960,
            ssrc: 5,
            marker: false,
        };
        let mut buf = Vec::new();
        write_packet(&mut buf, &hdr, &[], &payload);
        buf
    }

    #[test]
    fn red_packets_drive_activity_and_switches_as_their_primary_would() {
        // Room noise in small frames, speech in large ones, silence, speech again.
        let lens: Vec<usize> = (0..300u16)
            .map(|i| match i {
                60..110 | 200..240 => 90,
                _ => 12,
            })
            .collect();
        let run = |red: bool| {
            let mut core = StreamCore::new(CoreConfig::default());
            let a = core.publish("a", SourceConfig::default());
            core.join(GroupKey::new(1, None, []));
            let mut log = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                let now = i as u64 * 20_000;
                let mut sink = |o: Output| {
                    log.push(match o {
                        Output::Track(c) => format!("{}track={:?}", i, c.source),
                        Output::Packet { header, .. } => format!("pkt reach {}", header.reach),
                        Output::Ending { .. } => "end".into(),
                        Output::Preroll { header, .. } => format!("pre reach {}", header.reach),
                    })
                };
                core.on_packet(now, a, &sized(i as u16, len, red), &mut sink)
                    .unwrap();
                core.tick(now + 10_000, &mut sink);
            }
            (log, core.stats().onsets, core.stats().switches)
        };
        let (plain, red) = (run(false), run(true));
        assert_eq!(plain, red);
        // It did talk twice, and each entry into the track starts its reach anew.
        assert_eq!(red.1, 2, "{:?}", red.0);
        let entries: Vec<usize> = red
            .0
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("track=Some"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(entries.len(), 2, "{:?}", red.0);
        for at in entries {
            assert!(
                red.0[at + 1].ends_with("reach 0"),
                "{:?}",
                &red.0[at..at + 3]
            );
            assert!(
                red.0[at + 2].ends_with("reach 960"),
                "{:?}",
                &red.0[at..at + 3]
            );
        }
    }

    #[test]
    fn a_red_packet_that_does_not_parse_is_taken_whole() {
        // End-to-end encrypted RED looks like this: the core reads its size, as it reads an
        // encrypted Opus payload's, and forwards it.
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", SourceConfig::default());
        let mut p = sized(1, 40, true);
        p[12 + 3] = 0xFF;
        p[12 + 2] |= 0x03;
        assert_eq!(core.on_packet(0, a, &p, &mut |_| {}), Ok(()));
        assert_eq!(core.stats().packets_in, 1);
    }

    #[test]
    fn an_emptied_track_ends_in_silence_frames_that_continue_its_numbering() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        core.join(GroupKey::new(1, None, []));
        let mut headers: Vec<(char, Rewritten)> = Vec::new();
        let mut order = Vec::new();
        for i in 0..200u16 {
            let now = i as u64 * 20_000;
            // 1.2 s of room noise, 1 s of speech, then room noise past the hangover.
            let level = if (60..110).contains(&i) { 20 } else { 70 };
            let mut sink = |o: Output| match o {
                Output::Packet { header, .. } => headers.push(('p', header)),
                Output::Preroll { header, .. } => headers.push(('r', header)),
                Output::Ending { header, .. } => {
                    headers.push(('e', header));
                    order.push("end");
                }
                Output::Track(c) => order.push(if c.source.is_some() { "in" } else { "out" }),
            };
            core.on_packet(now, a, &packet(i, level), &mut sink)
                .unwrap();
            core.tick(now + 10_000, &mut sink);
        }
        // In, then the silence frames, then the vad that empties the track.
        assert_eq!(order, ["in", "end", "end", "end", "out"]);
        let ends: Vec<_> = headers.iter().filter(|(k, _)| *k == 'e').collect();
        assert_eq!(ends.len(), ENDING_FRAMES);
        // One gapless sequence: seq +1 and ts +960 (20 ms) from the last packet on.
        for w in headers.windows(2) {
            let (a, b) = (w[0].1, w[1].1);
            assert_eq!(b.seq, a.seq.wrapping_add(1), "{headers:?}");
            assert_eq!(b.ts.wrapping_sub(a.ts), 960, "{headers:?}");
            assert_eq!(b.ssrc, a.ssrc);
        }
        assert_eq!(headers.last().unwrap().0, 'e');
        assert_eq!(core.stats().ending_frames, ENDING_FRAMES as u64);
    }

    /// What a pre-roll test sees: ('r' pre-roll | 'p' packet, its input seq, the header).
    type Sent = Vec<(char, u16, Rewritten)>;

    /// Feeds (seq, ts, level) packets 20 ms apart from `a`, ticking between them.
    fn feed_at(core: &mut StreamCore, a: SourceIdx, t0: u64, pkts: &[(u16, u32, u8)]) -> Sent {
        let mut sent = Vec::new();
        for (i, &(seq, ts, level)) in pkts.iter().enumerate() {
            let now = t0 + i as u64 * 20_000;
            let mut sink = |o: Output| match o {
                Output::Preroll { header, seq, .. } => sent.push(('r', seq, header)),
                Output::Packet { header, .. } => sent.push(('p', seq, header)),
                _ => {}
            };
            core.on_packet(now, a, &packet_at(seq, ts, level), &mut sink)
                .unwrap();
            core.tick(now + 10_000, &mut sink);
        }
        sent
    }

    /// 1.2 s of room noise then speech, every packet 20 ms of audio.
    fn noise_then_speech(speech: u16) -> Vec<(u16, u32, u8)> {
        (0..60 + speech)
            .map(|i| (i, i as u32 * 960, if i < 60 { 70 } else { 20 }))
            .collect()
    }

    #[test]
    fn a_source_entering_a_track_replays_its_last_120_ms_gapless_into_the_onset() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        core.join(GroupKey::new(1, None, []));
        let sent = feed_at(&mut core, a, 0, &noise_then_speech(4));
        // The onset is the second voiced packet (seq 61): the six before it come first.
        let pre: Vec<u16> = sent.iter().filter(|x| x.0 == 'r').map(|x| x.1).collect();
        assert_eq!(pre, [55, 56, 57, 58, 59, 60]);
        assert_eq!(sent[6].0, 'p');
        assert_eq!(core.stats().preroll_packets, 6);
        // One continuous stream: seq +1, ts +960, the marker on the first only.
        assert!(sent[0].2.marker);
        assert!(sent[1..].iter().all(|x| !x.2.marker), "{sent:?}");
        for w in sent.windows(2) {
            assert_eq!(w[1].2.seq, w[0].2.seq.wrapping_add(1), "{sent:?}");
            assert_eq!(w[1].2.ts.wrapping_sub(w[0].2.ts), 960, "{sent:?}");
        }
    }

    #[test]
    fn a_pre_roll_starts_no_earlier_than_the_talkspurt() {
        // DTX: the room is silent, the sender sends nothing until two frames before the onset
        // (a timestamp jump), so only those two lead into it.
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        core.join(GroupKey::new(1, None, []));
        let mut pkts = noise_then_speech(0);
        pkts.extend([(60, 200_000, 70), (61, 200_960, 70)]);
        pkts.extend((62..66).map(|s| (s, 200_000 + (s as u32 - 60) * 960, 20)));
        let sent = feed_at(&mut core, a, 0, &pkts);
        let pre: Vec<u16> = sent.iter().filter(|x| x.0 == 'r').map(|x| x.1).collect();
        assert_eq!(pre, [60, 61, 62]);
    }

    #[test]
    fn a_pre_roll_steps_over_short_losses_and_holds_a_late_packet_in_place() {
        let run = |lost: &[u16]| {
            let mut core = StreamCore::new(CoreConfig::default());
            let a = core.publish("a", levelled());
            core.join(GroupKey::new(1, None, []));
            let mut pkts = noise_then_speech(4);
            pkts.retain(|p| !lost.contains(&p.0));
            // 58 (if not lost) arrives after 59.
            if let Some(at) = pkts.iter().position(|p| p.0 == 58) {
                pkts.swap(at, at + 1);
            }
            let sent = feed_at(&mut core, a, 0, &pkts);
            let pre: Vec<u16> = sent.iter().filter(|x| x.0 == 'r').map(|x| x.1).collect();
            // The output numbering keeps the input's gaps: seq offsets equal input offsets.
            for w in sent.windows(2) {
                assert_eq!(
                    w[1].2.seq.wrapping_sub(w[0].2.seq),
                    w[1].1 - w[0].1,
                    "{sent:?}"
                );
            }
            pre
        };
        // One lost (56), then two in a row (55, 56): stepped over, still 120 ms of audio.
        assert_eq!(run(&[56]), [55, 57, 58, 59, 60]);
        assert_eq!(run(&[55, 56]), [57, 58, 59, 60]);
        // Three in a row end the run.
        assert_eq!(run(&[54, 55, 56]), [57, 58, 59, 60]);
        assert_eq!(run(&[56, 57, 58]), [59, 60]);
    }

    #[test]
    fn an_onset_packet_that_overtook_its_predecessor_still_gets_its_pre_roll() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        core.join(GroupKey::new(1, None, []));
        let mut pkts = noise_then_speech(4);
        // 62 arrives before 61: the onset comes with 62, two after the newest held (60).
        pkts.swap(61, 62);
        let sent = feed_at(&mut core, a, 0, &pkts);
        let order: Vec<(char, u16)> = sent.iter().map(|x| (x.0, x.1)).take(9).collect();
        let mut want: Vec<(char, u16)> = (55..61).map(|s| ('r', s)).collect();
        want.extend([('p', 62), ('p', 61), ('p', 63)]);
        assert_eq!(order, want);
        // The late one takes its own place in the numbering.
        let base = sent[0].2.seq;
        for x in &sent {
            assert_eq!(x.2.seq.wrapping_sub(base), x.1 - 55, "{sent:?}");
        }
    }

    #[test]
    fn no_pre_roll_when_turned_off() {
        let mut core = StreamCore::new(CoreConfig {
            preroll_us: 0,
            ..CoreConfig::default()
        });
        let a = core.publish("a", levelled());
        core.join(GroupKey::new(1, None, []));
        let sent = feed_at(&mut core, a, 0, &noise_then_speech(4));
        assert!(sent.iter().all(|x| x.0 == 'p'));
        assert_eq!(core.stats().preroll_packets, 0);
    }

    #[test]
    fn a_track_never_fed_ends_without_silence_frames() {
        // An empty track that is emptied again (nothing was ever sent on it) sends nothing.
        let mut t = TrackRewriter::new(1, 100, 0);
        assert!(t.follow_on(0, 960).is_none());
    }

    #[test]
    fn vad_event_comes_before_the_first_packet_it_brings() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        core.join(GroupKey::new(2, None, []));
        let log = room_then_speech(&mut core, a, 0, 0, &[20, 20, 20]);
        assert_eq!(log, entered(&["pkt0", "pkt0"]));
    }

    #[test]
    fn bad_packets_are_counted_and_dropped_without_disturbing_others() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        let ghost = core.intern("ghost");
        core.join(GroupKey::new(1, None, []));
        let mut n = 0;
        let mut sink = |_: Output| n += 1;
        assert_eq!(
            core.on_packet(0, a, &[0x80, 0], &mut sink),
            Err(Drop::Malformed(RtpError::TooShort))
        );
        assert_eq!(
            core.on_packet(0, a, &[0u8; 2000], &mut sink),
            Err(Drop::TooLarge(2000))
        );
        assert_eq!(
            core.on_packet(0, ghost, &packet(1, 20), &mut sink),
            Err(Drop::UnknownSource)
        );
        assert_eq!(
            core.on_packet(0, SourceIdx(99), &packet(1, 20), &mut sink),
            Err(Drop::UnknownSource)
        );
        let st = core.stats();
        assert_eq!(
            (
                st.dropped_malformed,
                st.dropped_too_large,
                st.dropped_unknown_source,
                st.packets_in
            ),
            (1, 1, 2, 0)
        );
        let log = room_then_speech(&mut core, a, 0, 0, &[20, 20]);
        assert_eq!(log, entered(&["pkt0"]));
    }

    #[test]
    fn unpublish_empties_tracks_and_republish_starts_fresh() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        let g = core.join(GroupKey::new(1, None, []));
        room_then_speech(&mut core, a, 0, 0, &[20, 20, 20]);
        let mut log = Vec::new();
        core.unpublish(1_300_000, a, &mut |o| {
            if let Output::Track(c) = o {
                log.push((c.track, c.source))
            }
        });
        assert_eq!(log, [(0, None)]);
        assert!(!core.is_live(a));
        assert_eq!(core.selector().tracks(g).collect::<Vec<_>>(), [None]);
        // The same sourceId published again gets the same index, and talks again.
        assert_eq!(core.publish("a", levelled()), a);
        let log = room_then_speech(&mut core, a, 2_000_000, 500, &[20, 20]);
        assert_eq!(log, entered(&["pkt0"]));
    }

    #[test]
    fn groups_share_selection_and_leaving_frees_them() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        let me = core.intern("me");
        let k = GroupKey::new(2, None, [me]);
        let g1 = core.join(k.clone());
        let g2 = core.join(k);
        assert_eq!(g1, g2);
        let other = core.join(GroupKey::new(2, None, []));
        assert_ne!(g1, other);
        let log = room_then_speech(&mut core, a, 0, 0, &[20, 20]);
        // One change and one packet per group, not per viewer.
        assert_eq!(log.iter().filter(|l| l.starts_with("pkt")).count(), 2);
        core.leave(g1);
        assert!(core.rewriter(g1, 0).is_some());
        core.leave(g2);
        assert!(core.rewriter(g1, 0).is_none());
        let log = feed(&mut core, a, 1_240_000, 62, &[20]);
        assert_eq!(log, ["pkt0"]);
    }

    #[test]
    fn names_are_released_with_the_last_group_that_names_them() {
        let mut core = StreamCore::new(CoreConfig::default());
        let a = core.publish("a", levelled());
        let main = core.intern("");
        let base = core.join(GroupKey::new(1, Some(main), []));
        assert_eq!(core.interned(), 2);
        // Many viewers, each excluding names no publisher has, come and go.
        for round in 0..50 {
            let excluded: Vec<SourceIdx> = (0..64)
                .map(|i| core.intern(&format!("ghost-{round}-{i}")))
                .collect();
            let g = core.join(GroupKey::new(1, Some(main), excluded.clone()));
            let g2 = core.join(GroupKey::new(1, Some(main), excluded));
            assert_eq!(g, g2);
            assert_eq!(core.interned(), 66);
            core.leave(g);
            assert_eq!(core.interned(), 66, "still named by the second viewer");
            core.leave(g2);
            assert_eq!(core.interned(), 2);
        }
        assert!(
            core.names.len() <= 66,
            "indices are reused: {}",
            core.names.len()
        );
        // A live source excluded by a group that ends stays; one unpublished and named by
        // nobody goes, and its index comes back fresh for another name.
        let g = core.join(GroupKey::new(1, Some(main), [a]));
        core.leave(g);
        assert_eq!(core.lookup("a"), Some(a));
        core.unpublish(0, a, &mut |_| {});
        assert_eq!(core.lookup("a"), None);
        let b = core.publish("b", levelled());
        assert_eq!(b, a, "index reused");
        assert_eq!(core.name(b), "b");
        assert_eq!(core.live_sources().collect::<Vec<_>>(), [b]);
        let log = room_then_speech(&mut core, b, 0, 0, &[20, 20]);
        assert_eq!(log, entered(&["pkt0"]));
        core.leave(base);
    }
}
