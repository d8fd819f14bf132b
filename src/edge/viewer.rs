//! One viewer's outgoing tracks: the last rewrite (per viewer, so a viewer that changes group,
//! or whose main source is republished, still sees one continuous stream) and the str0m write.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use str0m::media::{Mid, Pt};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo};
use str0m::Rtc;
use tokio::sync::mpsc::UnboundedSender;

use crate::media::rewrite::{InputPacket, TrackRewriter};
use crate::media::selection::GroupId;
use crate::media::SourceIdx;

/// One m-line the edge sends on.
pub struct OutTrack {
    pub mid: Mid,
    rw: TrackRewriter,
    /// Extended (ROC-carrying) sequence number of the last packet written.
    ext_seq: Option<u64>,
    pt: Option<Pt>,
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
            pt: None,
            packets: 0,
        }
    }

    /// The track's source changed (a switch, a projection, a new group): re-anchor.
    pub fn detach(&mut self) {
        self.rw.detach();
    }

    /// Rewrites one packet into this viewer's numbering and queues it on the peer.
    /// Returns false when the packet was not sent (late packet from before a switch, media
    /// not negotiated).
    pub fn write(
        &mut self,
        rtc: &mut Rtc,
        now_us: u64,
        wallclock: Instant,
        input: &InputPacket,
        level: Option<(bool, u8)>,
        payload: &Arc<[u8]>,
    ) -> bool {
        let Ok(h) = self.rw.rewrite(now_us, input) else {
            return false;
        };
        let pt = match self.pt {
            Some(pt) => pt,
            None => {
                let Some(pt) = rtc
                    .media(self.mid)
                    .and_then(|m| m.remote_pts().first().copied())
                else {
                    return false;
                };
                self.pt = Some(pt);
                pt
            }
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
                tracing::debug!(mid = %self.mid, gap = ext - l - 1, in_seq = input.seq, in_src = input.source.0, marker = h.marker, "output sequence gap");
            }
        }
        if self.ext_seq.is_none_or(|l| ext > l) {
            self.ext_seq = Some(ext);
        }
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(self.mid, None) else {
            return false;
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
        self.packets += 1;
        true
    }
}

/// A viewer as the edge's media thread knows it.
pub struct Viewer {
    pub stream: String,
    pub subscriber_id: String,
    pub tracks_n: u8,
    pub pinned: Option<String>,
    pub excluded: Vec<String>,
    /// (multiplexed track index, sourceId) the viewer projected.
    pub fixed: Vec<(u8, String)>,
    pub group: GroupId,
    /// The source in the main tracks: the pinned one, or the stream's main source.
    pub main_source: SourceIdx,
    pub main_audio: Option<OutTrack>,
    pub main_video: Option<OutTrack>,
    pub tracks: Vec<OutTrack>,
    pub events: UnboundedSender<Value>,
}

impl Viewer {
    pub fn send(&self, v: Value) {
        let _ = self.events.send(v);
    }
}
