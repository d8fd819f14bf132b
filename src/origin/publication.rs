//! One publication's packet path, on the media thread: count, normalize, relay to every edge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use str0m::media::MediaKind;
use tracing::debug;

use super::media_thread::{MediaIn, PeerEvent, PeerHandler};
use super::{relay_kind, Fanout, Origin, OriginMetrics, SourceKey, SourceStats};
use crate::media::red::{set_block_pts, RedLayout, RELAY_OPUS_PT, RELAY_RED_PT};
use crate::media::rtp::{audio_level_byte, write_packet, HeaderFields};
use crate::recording::RecTap;
use crate::relay::proto::{origin_clock_ms, DatagramHeader, LEVEL_EXT_ID};
use crate::rtc::peers::PeerId;

/// Which source of which stream a publication feeds.
pub(crate) struct Route {
    pub stream: String,
    pub source: SourceKey,
    pub publication: u64,
    /// The source's index on the relay.
    pub index: u16,
}

pub(crate) struct PublicationHandler {
    origin: Weak<Origin>,
    stream: String,
    source: SourceKey,
    publication: u64,
    index: u16,
    fanout: Arc<Fanout>,
    stats: Arc<SourceStats>,
    metrics: Arc<OriginMetrics>,
    rtp: Vec<u8>,
    last_seq: Option<u16>,
    /// False while this feed is a standby (redundant ingest): counted, not relayed.
    playing: Arc<AtomicBool>,
    /// True while its room member is muted: counted, not relayed.
    muted: Arc<AtomicBool>,
    /// Where its audio is recorded, when it is (what plays and is not muted: what edges get).
    rec: Option<RecTap>,
}

impl PublicationHandler {
    pub(crate) fn new(
        origin: Weak<Origin>,
        route: Route,
        fanout: Arc<Fanout>,
        stats: Arc<SourceStats>,
        metrics: Arc<OriginMetrics>,
        playing: Arc<AtomicBool>,
        muted: Arc<AtomicBool>,
    ) -> Self {
        PublicationHandler {
            origin,
            stream: route.stream,
            source: route.source,
            publication: route.publication,
            index: route.index,
            fanout,
            stats,
            metrics,
            rtp: Vec::with_capacity(1500),
            last_seq: None,
            playing,
            muted,
            rec: None,
        }
    }

    /// Records what it relays through `tap` (None: not recorded).
    pub(crate) fn recorded(mut self, tap: Option<RecTap>) -> Self {
        self.rec = tap;
        self
    }
}

impl PeerHandler for PublicationHandler {
    fn on_event(&mut self, peer: PeerId, ev: PeerEvent<'_>) {
        match ev {
            PeerEvent::Connected => {
                debug!(%peer, stream = self.stream.as_str(), source = ?self.source, "publisher connected")
            }
            // Padding-only packets (bandwidth probes) carry no media: not counted, not relayed.
            PeerEvent::Media(m) if m.payload.is_empty() => {
                self.metrics.padding_dropped.fetch_add(1, Ordering::Relaxed);
            }
            PeerEvent::Media(m) => {
                match m.kind {
                    MediaKind::Audio => {
                        if let Some(l) = self.last_seq {
                            if m.seq != l.wrapping_add(1) {
                                debug!(source = ?self.source, last = l, seq = m.seq, "publisher audio sequence jump");
                            }
                        }
                        self.last_seq = Some(m.seq);
                        self.stats.audio_packets.fetch_add(1, Ordering::Relaxed);
                        self.metrics.audio_packets.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .audio_bytes
                            .fetch_add(m.payload.len() as u64, Ordering::Relaxed);
                        if let Some(l) = m.audio_level {
                            self.stats.level_packets.fetch_add(1, Ordering::Relaxed);
                            self.stats.last_level.store(l as u32 + 1, Ordering::Relaxed);
                        }
                    }
                    MediaKind::Video => {
                        self.stats.video_packets.fetch_add(1, Ordering::Relaxed);
                        self.metrics.video_packets.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.metrics
                    .bytes_in
                    .fetch_add(m.payload.len() as u64, Ordering::Relaxed);
                if !self.playing.load(Ordering::Relaxed) {
                    return;
                }
                if self.muted.load(Ordering::Relaxed) {
                    self.metrics.muted_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if let (Some(tap), MediaKind::Audio) = (&self.rec, m.kind) {
                    tap.packet(m.ts, m.audio_level, recorded_opus(&m));
                }
                let subs = self.fanout.subs.read().unwrap_or_else(|p| p.into_inner());
                if subs.is_empty() {
                    return;
                }
                // Re-serialize with one canonical layout: edges need not know each publisher's
                // negotiated extension ids.
                let level = m
                    .audio_level
                    .map(|l| [audio_level_byte(m.voice == Some(true), l)]);
                let exts: &[(u8, &[u8])] = match &level {
                    Some(b) if m.kind == MediaKind::Audio => &[(LEVEL_EXT_ID, b)],
                    _ => &[],
                };
                // Canonical payload types on the relay too: Opus, or RED of Opus.
                let payload_type = match (m.kind, m.red_of) {
                    (MediaKind::Audio, Some(_)) => RELAY_RED_PT,
                    (MediaKind::Audio, None) => RELAY_OPUS_PT,
                    (MediaKind::Video, _) => m.pt,
                };
                let hdr = HeaderFields {
                    payload_type,
                    sequence_number: m.seq,
                    timestamp: m.ts,
                    ssrc: m.ssrc,
                    marker: m.marker,
                };
                let len = write_packet(&mut self.rtp, &hdr, exts, m.payload);
                if let Some(opus_pt) = m.red_of.filter(|_| m.kind == MediaKind::Audio) {
                    let at = len - m.payload.len();
                    match RedLayout::parse(&self.rtp[at..], opus_pt) {
                        Ok(l) => set_block_pts(&mut self.rtp[at..], &l, RELAY_OPUS_PT),
                        // An encoded transform may have encrypted the block headers too.
                        Err(e) => {
                            let n = self.metrics.red_malformed.fetch_add(1, Ordering::Relaxed);
                            if n.is_power_of_two() {
                                debug!(source = ?self.source, "publisher RED relayed opaque: {e}");
                            }
                        }
                    }
                    self.metrics.red_packets.fetch_add(1, Ordering::Relaxed);
                }
                let sent_ms = origin_clock_ms();
                for sub in subs.iter() {
                    let mut d =
                        Vec::with_capacity(crate::relay::proto::DATAGRAM_HEADER + self.rtp.len());
                    DatagramHeader {
                        channel: sub.channel,
                        source: self.index,
                        kind: relay_kind(m.kind),
                        sent_ms,
                    }
                    .write(&mut d);
                    d.extend_from_slice(&self.rtp);
                    self.metrics.relay_datagrams.fetch_add(1, Ordering::Relaxed);
                    if let Err(why) = sub.sink.datagram(Bytes::from(d)) {
                        self.stats.relay_drops.fetch_add(1, Ordering::Relaxed);
                        self.metrics.relay_drops.fetch_add(1, Ordering::Relaxed);
                        self.metrics.relay_drops_by[why as usize].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            PeerEvent::Closed(reason) => {
                if let Some(o) = self.origin.upgrade() {
                    o.publication_closed(&self.stream, &self.source, self.publication, reason);
                }
            }
        }
    }
}

/// What a recording keeps of an audio packet: an Ogg Opus file holds Opus, so of RED only the
/// primary block (the redundant ones repeat earlier packets). RED that does not parse (sealed
/// by an end-to-end encrypting sender) is kept whole: it is ciphertext either way.
fn recorded_opus<'a>(m: &MediaIn<'a>) -> &'a [u8] {
    match m.red_of.map(|opus_pt| RedLayout::parse(m.payload, opus_pt)) {
        Some(Ok(l)) => &m.payload[l.primary()],
        _ => m.payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audio(payload: &[u8], red_of: Option<u8>) -> MediaIn<'_> {
        MediaIn {
            kind: MediaKind::Audio,
            ssrc: 1,
            seq: 1,
            ts: 960,
            marker: false,
            pt: if red_of.is_some() { 63 } else { 111 },
            red_of,
            audio_level: None,
            voice: None,
            payload,
        }
    }

    /// A recording's Ogg Opus file gets Opus: RED's primary block, plain Opus as it is, and RED
    /// that does not parse (sealed) whole.
    #[test]
    fn a_recording_keeps_the_primary_opus_block_of_red() {
        let mut red = Vec::new();
        crate::media::red::write_red(&mut red, 111, &[(960, b"before")], b"opus-now");
        assert_eq!(recorded_opus(&audio(&red, Some(111))), b"opus-now");
        assert_eq!(recorded_opus(&audio(b"plain", None)), b"plain");
        let sealed = [0xffu8; 40];
        assert_eq!(recorded_opus(&audio(&sealed, Some(111))), &sealed[..]);
    }
}
