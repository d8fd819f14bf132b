//! One viewer's outgoing tracks: the last rewrite (per viewer, so a viewer that changes group,
//! or whose main source is republished, still sees one continuous stream) and the one place a
//! packet leaves for a viewer: sealed by its lean state (`rtc::established`), or written to
//! str0m for the viewers that keep it (AES-CM profile, a main video track). One send path per
//! viewer, so whoever sends its sender reports counts every packet.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;
use str0m::media::{Mid, Pt};
use str0m::rtp::{Extension, ExtensionValues, RtpWrite, SeqNo};
use str0m::Rtc;
use tokio::sync::mpsc::UnboundedSender;

use super::events::ViewerEvent;
use crate::media::opus;
use crate::media::red::{RedLayout, Shape, RELAY_OPUS_PT};
use crate::media::rewrite::{InputPacket, TrackRewriter};
use crate::media::rtp::audio_level_byte;
use crate::rtc::established::{Parts, TrackSpec};
use crate::rtc::peers::{Peer, PeerOut};
use crate::rtc::srtp_out::KeySlot;

/// Why a packet for a viewer's track was not sent (each is counted in /metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// A late packet from before the track's last switch (its numbering moved on).
    BeforeSwitch,
    /// The viewer's m-line for it was not negotiated (rejected, no codec, no send stream).
    NotNegotiated,
    /// The lean path could not seal it (SRTP index exhausted or the buffer too small).
    Seal,
    /// RED whose blocks could not be read (end-to-end encrypted), for a viewer without RED.
    RedOpaque,
}

/// What became of a RED packet written to a viewer (counted in /metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedSent {
    /// Passed whole, as RED.
    Whole,
    /// As RED, without the redundant blocks of the track's previous feed (after a switch).
    Stripped,
    /// Its primary block alone, as plain Opus: the viewer did not negotiate RED.
    Unwrapped,
}

/// How a written packet left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Not sent, and why.
    Dropped(NotSent),
    /// Queued in str0m: the peer needs a flush.
    Str0m,
    /// Sealed and queued on the socket directly.
    Direct,
}

/// One m-line the edge sends on.
pub struct OutTrack {
    /// The m-line's mid.
    pub mid: Mid,
    rw: TrackRewriter,
    /// Extended (ROC-carrying) sequence number of the last packet written.
    ext_seq: Option<u64>,
    /// The payload type str0m negotiated (the str0m path).
    pt: Option<Pt>,
    /// And its RED payload type, if the viewer accepted RED (the str0m path).
    red_pt: Option<Pt>,
    /// This track's index in its viewer's lean state, once it went lean.
    pub lean: Option<usize>,
    clock_rate: u32,
    /// Packets written on it (either path).
    pub packets: u64,
}

impl OutTrack {
    pub(crate) fn new(mid: Mid, clock_rate: u32) -> Self {
        // The viewer's stream starts at a small sequence number: a fresh SRTP receiver assumes
        // ROC 0, and starting low keeps the first rollover far away.
        OutTrack {
            mid,
            rw: TrackRewriter::new(0, rand::random::<u16>() & 0x0FFF, rand::random())
                .with_clock_rate(clock_rate),
            ext_seq: None,
            pt: None,
            red_pt: None,
            lean: None,
            clock_rate,
            packets: 0,
        }
    }

    /// Where its next write likely lands in its viewer's lean state: the track's index there
    /// and the next extended sequence number (for `Established::prefetch_track`).
    pub(crate) fn next_slot(&self) -> Option<(usize, u64)> {
        Some((self.lean?, self.ext_seq.map_or(0, |s| s + 1)))
    }

    /// The track's source changed (a switch, a projection, a new group): re-anchor.
    pub fn detach(&mut self) {
        self.rw.detach();
    }

    /// Numbers one packet into this viewer's stream and sends it the one way the viewer has:
    /// sealed by its lean state into the send batch (counted, kept for NACK), or queued on
    /// its str0m peer. `payload` is the relay datagram's payload slice (a refcount, no copy).
    pub fn write(
        &mut self,
        out: PeerOut<'_>,
        now_us: u64,
        wallclock: Instant,
        input: &InputPacket,
        level: Option<(bool, u8)>,
        payload: &Bytes,
    ) -> Sent {
        self.write_red(
            out,
            now_us,
            wallclock,
            input,
            level,
            payload,
            None,
            u32::MAX,
        )
        .0
    }

    /// [`write`](Self::write) of a packet that may be RED (`red`, its layout): a viewer that
    /// negotiated RED gets RED, without the blocks that point further back than `reach` (the
    /// group track's, see [`crate::media::rewrite::Rewritten::reach`]) or than this viewer's
    /// own stream of the feed goes; any other viewer gets the primary block as plain Opus.
    #[allow(clippy::too_many_arguments)]
    pub fn write_red(
        &mut self,
        out: PeerOut<'_>,
        now_us: u64,
        wallclock: Instant,
        input: &InputPacket,
        level: Option<(bool, u8)>,
        payload: &Bytes,
        red: Option<&RedLayout>,
        reach: u32,
    ) -> (Sent, Option<RedSent>) {
        let Ok(h) = self.rw.rewrite(now_us, input) else {
            return (Sent::Dropped(NotSent::BeforeSwitch), None);
        };
        let ext = match self.ext_seq {
            None => h.seq as u64,
            Some(last) => {
                let delta = h.seq.wrapping_sub(last as u16) as i16 as i64;
                (last as i64 + delta).max(0) as u64
            }
        };
        if let Some(l) = self.ext_seq {
            if ext > l + 1 {
                tracing::debug!(mid = %self.mid, gap = ext - l - 1, in_seq = input.seq, in_src = ?input.source, marker = h.marker, "output sequence gap");
            }
        }
        if self.ext_seq.is_none_or(|l| ext > l) {
            self.ext_seq = Some(ext);
        }
        let reach = reach.min(h.reach);
        match out {
            PeerOut::Lean {
                lean,
                mut sink,
                scratch,
            } => {
                let Some(track) = self.lean else {
                    return (Sent::Dropped(NotSent::NotNegotiated), None);
                };
                // RED blocks carry the relay's Opus payload type: RED only where it is the
                // viewer's too.
                let has_red = lean
                    .spec(track)
                    .is_some_and(|s| s.red_pt.is_some() && s.pt == RELAY_OPUS_PT);
                let (shaped, how) = shape(payload, red, has_red, reach);
                if shaped.tail.is_empty() {
                    return (Sent::Dropped(NotSent::RedOpaque), None);
                }
                let Some(parts) = Parts::new(shaped.red, payload, shaped.head, shaped.tail) else {
                    return (Sent::Dropped(NotSent::Seal), None);
                };
                let level = level.map(|(v, l)| audio_level_byte(v, l));
                if !lean.send_rtp_parts(
                    wallclock, track, ext, h.ts, h.marker, level, parts, scratch, &mut sink,
                ) {
                    return (Sent::Dropped(NotSent::Seal), None);
                }
                self.packets += 1;
                (Sent::Direct, how)
            }
            PeerOut::Str0m(rtc) => {
                if self.pt.is_none() {
                    self.pt = rtc
                        .media(self.mid)
                        .and_then(|m| m.remote_pts().first().copied());
                    self.red_pt = self.pt.and_then(|pt| red_pt_of(rtc, pt));
                }
                let Some(pt) = self.pt else {
                    return (Sent::Dropped(NotSent::NotNegotiated), None);
                };
                let has_red = self.red_pt.is_some() && *pt == RELAY_OPUS_PT;
                let (parts, how) = shape(payload, red, has_red, reach);
                if parts.tail.is_empty() {
                    return (Sent::Dropped(NotSent::RedOpaque), None);
                }
                let (head, tail) = (&payload[parts.head.clone()], &payload[parts.tail.clone()]);
                let pt = match self.red_pt {
                    Some(red_pt) if parts.red => red_pt,
                    _ => pt,
                };
                let mut api = rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(self.mid, None) else {
                    return (Sent::Dropped(NotSent::NotNegotiated), None);
                };
                let mut ext_vals = ExtensionValues::default();
                if let Some((voice, l)) = level {
                    ext_vals.audio_level = Some(-(l as i8));
                    ext_vals.voice_activity = Some(voice);
                }
                // str0m keeps its own copy (its NACK history): the fallback path's one
                // allocation per packet.
                let payload: Arc<[u8]> = if head.is_empty() {
                    Arc::from(tail)
                } else {
                    [head, tail].concat().into()
                };
                tx.write_rtp(
                    RtpWrite::new(pt, SeqNo::from(ext), h.ts, wallclock, payload)
                        .marker(h.marker)
                        .ext_vals(ext_vals)
                        .nackable(true),
                );
                self.packets += 1;
                (Sent::Str0m, how)
            }
        }
    }

    /// What the lean path needs of this track, read from str0m's negotiation.
    pub(crate) fn lean_spec(&self, rtc: &mut Rtc) -> Option<TrackSpec> {
        let media = rtc.media(self.mid)?;
        let pt = *media.remote_pts().first().copied()?;
        let map = media.remote_extmap();
        let level_id = map
            .id_of(Extension::AudioLevel)
            .filter(|id| (1..=14).contains(id));
        let mid_id = map
            .id_of(Extension::RtpMid)
            .filter(|id| (1..=14).contains(id));
        let ssrc = *rtc.direct_api().stream_tx_by_mid(self.mid, None)?.ssrc();
        let mid_str = self.mid.as_bytes();
        let mid = SmallVec::from_slice(&mid_str[..mid_str.len().min(16)]);
        Some(TrackSpec {
            ssrc,
            pt,
            red_pt: red_pt_of(rtc, pt.into()).map(|p| *p),
            clock_rate: self.clock_rate,
            level_id,
            mid_id,
            mid,
        })
    }
}

/// The RED payload type the viewer accepted for `pt`, if it did.
fn red_pt_of(rtc: &Rtc, pt: Pt) -> Option<Pt> {
    rtc.codec_config().find(|p| p.pt() == pt)?.red()
}

/// One viewer's payload of a packet that may be RED (the [`crate::media::red::Shape`] of it,
/// or the payload whole) and what became of the RED (none for a plain packet). An empty tail:
/// nothing to send.
fn shape(
    payload: &Bytes,
    red: Option<&RedLayout>,
    has_red: bool,
    reach: u32,
) -> (Shape, Option<RedSent>) {
    let Some(l) = red else {
        let whole = Shape {
            red: false,
            head: 0..0,
            tail: 0..payload.len(),
        };
        return (whole, None);
    };
    let s = l.shape(has_red, reach);
    if s.is_empty() {
        let nothing = Shape {
            red: false,
            head: 0..0,
            tail: 0..0,
        };
        return (nothing, None);
    }
    let how = match (s.red, s.head.is_empty()) {
        (false, _) => RedSent::Unwrapped,
        (true, true) => RedSent::Whole,
        (true, false) => RedSent::Stripped,
    };
    (s, Some(how))
}

/// On `Connected`: a viewer with no main video whose handshake chose an AES-GCM profile
/// leaves str0m for its media (see `rtc::established`). True if it did; otherwise every
/// packet keeps going through str0m.
pub fn go_lean(peer: &mut Peer<Viewer>, now: Instant) -> bool {
    let v = &mut peer.data;
    let Some((km, profile, client)) = v.keys.take() else {
        return false;
    };
    if v.main_video.is_some() {
        return false;
    }
    let Some(rtc) = peer.rtc.get_mut() else {
        return false;
    };
    let mut specs: SmallVec<[TrackSpec; 4]> = SmallVec::new();
    let mut unknown = Vec::new();
    for (i, t) in v
        .main_audio
        .iter_mut()
        .chain(v.tracks.iter_mut())
        .enumerate()
    {
        if rtc.media(t.mid).is_none() {
            unknown.push(i);
            continue;
        }
        t.lean = t.lean_spec(rtc).map(|s| {
            specs.push(s);
            specs.len() - 1
        });
    }
    // Tracks added before the handshake ended ([`add_track`]): sent like the negotiated ones.
    if let Some(template) = specs.first().cloned() {
        for i in unknown {
            if let Some(t) = v.main_audio.iter_mut().chain(v.tracks.iter_mut()).nth(i) {
                specs.push(added_spec(&template, t.mid, &specs));
                t.lean = Some(specs.len() - 1);
            }
        }
    }
    if peer.go_lean(&km, profile, client, specs, now) {
        return true;
    }
    let v = &mut peer.data;
    for t in v.main_audio.iter_mut().chain(v.tracks.iter_mut()) {
        t.lean = None;
    }
    false
}

/// The spec of a track the viewer added after its offer: `template`'s payload type and
/// extensions (the SDK's local renegotiation copies them from the first audio m-line of the
/// answer), a fresh SSRC none of `taken` has, and its own mid.
fn added_spec(template: &TrackSpec, mid: Mid, taken: &[TrackSpec]) -> TrackSpec {
    let mut ssrc = rand::random::<u32>();
    while ssrc == 0 || taken.iter().any(|t| t.ssrc == ssrc) {
        ssrc = rand::random();
    }
    let bytes = mid.as_bytes();
    TrackSpec {
        ssrc,
        mid: SmallVec::from_slice(&bytes[..bytes.len().min(16)]),
        ..template.clone()
    }
}

/// A track the viewer added after its offer (the SDK's `addRemoteTrack`): a new multiplexed
/// track `mid`, sent on the lean path only (str0m never negotiated it). A lean viewer gets
/// it at once; one still in its handshake when [`go_lean`] runs. False if the viewer has as
/// many tracks as it may, or keeps str0m for its media (main video, AES-CM).
pub(crate) fn add_track(peer: &mut Peer<Viewer>, mid: Mid) -> bool {
    if peer.data.tracks.iter().any(|t| t.mid == mid) {
        return true;
    }
    if peer.data.tracks.len() >= super::MAX_TRACKS || peer.data.main_video.is_some() {
        return false;
    }
    let mut t = OutTrack::new(mid, opus::CLOCK_RATE);
    if let Some(lean) = peer.lean_mut() {
        let existing: SmallVec<[TrackSpec; 4]> =
            (0..).map_while(|i| lean.spec(i).cloned()).collect();
        let Some(template) = existing.first() else {
            return false;
        };
        let spec = added_spec(template, mid, &existing);
        t.lean = Some(lean.add_track(spec));
    } else if peer.connected {
        // Connected but not lean: str0m carries its media and cannot send this track.
        return false;
    }
    peer.data.tracks.push(t);
    true
}

/// A viewer as the edge's media thread knows it: its peer's side. What it asked for and its
/// group are the edge core's (`edge::core`).
pub struct Viewer {
    /// The stream it views.
    pub stream: String,
    /// The id the edge gave it (`sub-N-...`), returned with its answer.
    pub subscriber_id: String,
    /// Its main audio m-line, if negotiated.
    pub main_audio: Option<OutTrack>,
    /// Its main video m-line, if negotiated.
    pub main_video: Option<OutTrack>,
    /// Its multiplexed audio m-lines, in order.
    pub tracks: Vec<OutTrack>,
    /// Events for its signalling socket.
    pub events: UnboundedSender<ViewerEvent>,
    /// Filled by the DTLS handshake; taken by [`go_lean`] once connected.
    pub keys: Arc<KeySlot>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::red::write_red;

    #[test]
    fn a_red_packet_is_shaped_by_the_viewers_negotiation_and_the_reach() {
        let mut p = Vec::new();
        write_red(&mut p, 111, &[(960, b"before")], b"opus-now");
        let payload = Bytes::from(p);
        let l = RedLayout::parse(&payload, 111).unwrap();
        let bytes = |s: &Shape| [&payload[s.head.clone()], &payload[s.tail.clone()]].concat();
        let (s, how) = shape(&payload, Some(&l), false, u32::MAX);
        assert_eq!(
            (s.red, bytes(&s), how),
            (false, b"opus-now".to_vec(), Some(RedSent::Unwrapped))
        );
        let (s, how) = shape(&payload, Some(&l), true, 960);
        assert_eq!(
            (s.red, bytes(&s), how),
            (true, payload.to_vec(), Some(RedSent::Whole))
        );
        let (s, how) = shape(&payload, Some(&l), true, 0);
        assert_eq!((s.red, how), (true, Some(RedSent::Stripped)));
        assert_eq!(bytes(&s), [&[111][..], b"opus-now"].concat());
        // A plain packet passes whole, whatever the viewer negotiated.
        let (s, how) = shape(&payload, None, true, 0);
        assert_eq!((s.red, bytes(&s), how), (false, payload.to_vec(), None));
    }
}
