//! One viewer's outgoing tracks: the last rewrite (per viewer, so a viewer that changes group,
//! or whose main source is republished, still sees one continuous stream) and the str0m write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::media::{Mid, Pt};
use str0m::rtp::{Extension, ExtensionValues, RtpWrite, SeqNo};
use str0m::Rtc;
use tokio::sync::mpsc::UnboundedSender;

use super::events::ViewerEvent;
use crate::media::rewrite::{InputPacket, TrackRewriter};
use crate::media::rtp::{audio_level_byte, write_packet, HeaderFields};
use crate::rtc::peers::Sink;
use crate::rtc::srtp_out::{KeySlot, SrtpOut};

/// One packet in this many still goes through str0m, so its sender reports keep a fresh RTP to
/// wall-clock mapping (about one per second per track); the others are sealed and sent directly.
const VIA_STR0M_EVERY: u64 = 50;

/// Why a packet for a viewer's track was not sent (each is counted in /metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// A late packet from before the track's last switch (its numbering moved on).
    BeforeSwitch,
    /// The viewer's m-line for it was not negotiated (rejected, no codec, no send stream).
    NotNegotiated,
    /// The direct path could not seal it (SRTP index exhausted or the buffer too small).
    Seal,
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

/// What the direct path needs of a viewer: its SRTP session and where its media goes.
pub struct Direct<'a> {
    pub srtp: &'a SrtpOut,
    pub dest: SocketAddr,
    pub sink: Sink<'a>,
    pub scratch: &'a mut Vec<u8>,
}

/// What str0m negotiated for one track, read once.
struct Negotiated {
    pt: Pt,
    ssrc: u32,
    level_id: Option<u8>,
    mid_id: Option<u8>,
    mid: [u8; 16],
    mid_len: usize,
}

/// One m-line the edge sends on.
pub struct OutTrack {
    pub mid: Mid,
    rw: TrackRewriter,
    /// Extended (ROC-carrying) sequence number of the last packet written.
    ext_seq: Option<u64>,
    neg: Option<Negotiated>,
    audio: bool,
    pub packets: u64,
}

impl OutTrack {
    pub fn new(mid: Mid, clock_rate: u32) -> Self {
        // The viewer's stream starts at a small sequence number: a fresh SRTP receiver assumes
        // ROC 0, and starting low keeps the first rollover far away.
        OutTrack {
            mid,
            rw: TrackRewriter::new(0, rand::random::<u16>() & 0x0FFF, rand::random())
                .with_clock_rate(clock_rate),
            ext_seq: None,
            neg: None,
            audio: clock_rate == crate::media::opus::CLOCK_RATE,
            packets: 0,
        }
    }

    /// The track's source changed (a switch, a projection, a new group): re-anchor.
    pub fn detach(&mut self) {
        self.rw.detach();
    }

    /// Rewrites one packet into this viewer's numbering and sends it: sealed directly when the
    /// viewer has a direct path (audio only), else queued on the peer.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        rtc: &mut Rtc,
        now_us: u64,
        wallclock: Instant,
        input: &InputPacket,
        level: Option<(bool, u8)>,
        payload: &Arc<[u8]>,
        direct: Option<Direct<'_>>,
    ) -> Sent {
        let Ok(h) = self.rw.rewrite(now_us, input) else {
            return Sent::Dropped(NotSent::BeforeSwitch);
        };
        if self.neg.is_none() {
            let Some(neg) = self.negotiated(rtc) else {
                return Sent::Dropped(NotSent::NotNegotiated);
            };
            self.neg = Some(neg);
        }
        let neg = self.neg.as_ref().expect("set above");
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
        self.packets += 1;
        if let Some(d) =
            direct.filter(|_| self.audio && !self.packets.is_multiple_of(VIA_STR0M_EVERY))
        {
            let (mid, mid_len) = (&neg.mid, neg.mid_len);
            let level_byte = level.map(|(v, l)| [audio_level_byte(v, l)]);
            let mut exts: [(u8, &[u8]); 2] = [(0, &[]), (0, &[])];
            let mut n = 0;
            if let (Some(id), Some(b)) = (neg.level_id, level_byte.as_ref()) {
                exts[n] = (id, b);
                n += 1;
            }
            if let Some(id) = neg.mid_id.filter(|_| mid_len > 0) {
                exts[n] = (id, &mid[..mid_len]);
                n += 1;
            }
            let fields = HeaderFields {
                payload_type: *neg.pt,
                sequence_number: h.seq,
                timestamp: h.ts,
                ssrc: neg.ssrc,
                marker: h.marker,
            };
            let total = write_packet(d.scratch, &fields, &exts[..n], payload);
            let Direct {
                srtp,
                dest,
                mut sink,
                scratch,
            } = d;
            if srtp.protect(scratch, total - payload.len(), (ext >> 16) as u32) {
                sink.send(dest, scratch);
                return Sent::Direct;
            }
            return Sent::Dropped(NotSent::Seal);
        }
        let pt = neg.pt;
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(self.mid, None) else {
            return Sent::Dropped(NotSent::NotNegotiated);
        };
        let mut ext_vals = ExtensionValues::default();
        if let Some((voice, l)) = level {
            ext_vals.audio_level = Some(-(l as i8));
            ext_vals.voice_activity = Some(voice);
        }
        tx.write_rtp(
            RtpWrite::new(pt, SeqNo::from(ext), h.ts, wallclock, payload.clone())
                .marker(h.marker)
                .ext_vals(ext_vals)
                .nackable(true),
        );
        Sent::Str0m
    }

    fn negotiated(&self, rtc: &mut Rtc) -> Option<Negotiated> {
        let media = rtc.media(self.mid)?;
        let pt = media.remote_pts().first().copied()?;
        let map = media.remote_extmap();
        let level_id = map
            .id_of(Extension::AudioLevel)
            .filter(|id| (1..=14).contains(id));
        let mid_id = map
            .id_of(Extension::RtpMid)
            .filter(|id| (1..=14).contains(id));
        let ssrc = *rtc.direct_api().stream_tx_by_mid(self.mid, None)?.ssrc();
        let mut mid = [0u8; 16];
        let mid_str = self.mid.as_bytes();
        let mid_len = mid_str.len().min(16);
        mid[..mid_len].copy_from_slice(&mid_str[..mid_len]);
        Some(Negotiated {
            pt,
            ssrc,
            level_id,
            mid_id,
            mid,
            mid_len,
        })
    }
}

/// A viewer as the edge's media thread knows it: its peer's side. What it asked for and its
/// group are the edge core's (`edge::core`).
pub struct Viewer {
    pub stream: String,
    pub subscriber_id: String,
    pub main_audio: Option<OutTrack>,
    pub main_video: Option<OutTrack>,
    pub tracks: Vec<OutTrack>,
    pub events: UnboundedSender<ViewerEvent>,
    /// Filled by the DTLS handshake; turned into `srtp` once connected.
    pub keys: Arc<KeySlot>,
    /// The direct send path, when the negotiated SRTP profile allows it.
    pub srtp: Option<SrtpOut>,
}
