//! `chorus probe` (a tool, feature `tools`): subscribes to a stream at an origin over the relay,
//! like an edge, and reports what arrives per source, optionally asking for keyframes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::client::{EdgeLink, LinkConfig, LinkError, LinkHandler};
use super::proto::{DatagramHeader, Kind, SourceInfo, DATAGRAM_HEADER, LEVEL_EXT_ID};

/// Per-source counters a probe keeps.
#[derive(Default, Clone)]
struct ProbeSource {
    source_id: Option<String>,
    audio: u64,
    with_level: u64,
    last_level: Option<u8>,
    video: u64,
}

#[derive(Default)]
struct ProbeState {
    channel: Option<u32>,
    sources: BTreeMap<u16, ProbeSource>,
    snapshots: u64,
    foreign: u64,
    closed: Option<String>,
}

struct Probe {
    state: Mutex<ProbeState>,
}

impl LinkHandler for Probe {
    fn on_sources(&self, _stream: &str, channel: u32, sources: &[SourceInfo]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.channel = Some(channel);
        st.snapshots += 1;
        for s in sources {
            st.sources.entry(s.index).or_default().source_id = s.source_id.clone();
        }
    }

    fn on_datagram(&self, hdr: DatagramHeader, datagram: bytes::Bytes, _queued: Duration) {
        let rtp = &datagram[DATAGRAM_HEADER..];
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.channel != Some(hdr.channel) {
            st.foreign += 1;
            return;
        }
        let s = st.sources.entry(hdr.source).or_default();
        match hdr.kind {
            Kind::Audio => {
                s.audio += 1;
                if let Some(l) = crate::media::rtp::RtpView::parse(rtp)
                    .ok()
                    .and_then(|v| v.extension(LEVEL_EXT_ID))
                    .and_then(crate::media::rtp::parse_audio_level)
                {
                    s.with_level += 1;
                    s.last_level = Some(l.1);
                }
            }
            Kind::Video => s.video += 1,
        }
    }

    fn on_closed(&self, reason: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = Some(reason.to_owned());
    }
}

/// Keyframe requests a probe sends, as a viewer's PLI would.
#[derive(Debug, Clone)]
pub struct KeyframeRequests {
    /// None = the main source.
    pub source: Option<String>,
    /// How often one is sent.
    pub every: Duration,
}

/// Subscribes to a stream at an origin over the relay, like an edge, and reports what arrives.
pub async fn probe(
    link: LinkConfig,
    stream: &str,
    seconds: u64,
    keyframes: Option<KeyframeRequests>,
) -> Result<serde_json::Value, LinkError> {
    let probe = Arc::new(Probe {
        state: Mutex::new(ProbeState::default()),
    });
    let edge = EdgeLink::connect(&link, probe.clone()).await?;
    edge.acquire(stream);
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut requests = 0u64;
    if let Some(k) = &keyframes {
        let mut tick = tokio::time::interval(k.every);
        tick.tick().await;
        while tokio::time::Instant::now() + k.every <= end {
            tick.tick().await;
            edge.request_keyframe(stream, k.source.clone());
            requests += 1;
        }
    }
    tokio::time::sleep_until(end).await;
    edge.release(stream);
    // Read before closing: the link's own close is not a failure worth reporting.
    let report = {
        let st = probe.state.lock().unwrap_or_else(|p| p.into_inner());
        let sources: Vec<_> = st
            .sources
            .values()
            .map(|s| {
                json!({
                    "sourceId": s.source_id,
                    "audioPackets": s.audio,
                    "levelPackets": s.with_level,
                    "lastLevel": s.last_level,
                    "videoPackets": s.video,
                })
            })
            .collect();
        json!({
            "stream": stream,
            "origin": link.origin.to_string(),
            "snapshots": st.snapshots,
            "foreignDatagrams": st.foreign,
            "linkClosed": st.closed,
            "keyframeRequests": requests,
            "sources": sources,
        })
    };
    edge.close().await;
    Ok(report)
}
