//! Process wiring: `chorus serve`, `chorus origin` and `chorus probe`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use tracing::{info, warn};

use crate::auth::jwt::JwtKeys;
use crate::auth::random_secret;
use crate::auth::tokens::Tokens;
use crate::http::{router, App};
use crate::origin::Origin;
use crate::relay::client::{EdgeLink, LinkConfig, LinkHandler};
use crate::relay::proto::{DatagramHeader, Kind, SourceInfo, LEVEL_EXT_ID};
use crate::relay::server::{RelayPolicy, RelayServer};
use crate::rtc::host::{HostConfig, RtcHost};

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub http: SocketAddr,
    /// IP the media UDP socket binds.
    pub media_ip: IpAddr,
    pub media_port: u16,
    /// IP put in ICE candidates, when it differs from `media_ip`.
    pub public_ip: Option<IpAddr>,
    /// Base URL of the signalling socket in director answers, e.g. `wss://live.example.com`.
    pub public_ws: Option<String>,
    pub tokens: Option<PathBuf>,
    pub dev_publish_token: Option<String>,
    pub jwt_secret: Option<String>,
    pub jwt_ttl_secs: u64,
    /// QUIC address edges connect to.
    pub cluster: SocketAddr,
    pub cluster_token: Option<String>,
}

/// A running origin (with its director and HTTP API); `serve` adds an edge to it.
pub struct Running {
    pub http: SocketAddr,
    pub cluster: SocketAddr,
    pub fingerprint: String,
    pub origin: Arc<Origin>,
}

pub async fn start_origin(opts: &ServerOptions) -> Result<Running, String> {
    let tokens = match &opts.tokens {
        Some(path) => {
            let t = Tokens::file(path.clone())?;
            info!(path = %path.display(), "tokens from file");
            t
        }
        None => {
            let (token, from) = match &opts.dev_publish_token {
                Some(t) if !t.is_empty() => (t.clone(), "CHORUS_PUBLISH_TOKEN"),
                _ => (random_secret(18), "generated"),
            };
            warn!("DEV MODE: no --tokens file; every stream is open to viewers");
            warn!("DEV MODE: publish token ({from}): {token}");
            Tokens::dev(token)
        }
    };
    let secret = match &opts.jwt_secret {
        Some(s) if !s.is_empty() => s.clone(),
        _ => random_secret(32),
    };
    let jwt = JwtKeys::new(secret.as_bytes(), opts.jwt_ttl_secs);
    let host = RtcHost::start(
        &HostConfig {
            bind: SocketAddr::new(opts.media_ip, opts.media_port),
            public_ip: opts.public_ip,
        },
        "origin",
    )
    .map_err(|e| format!("media socket on {}: {e}", opts.media_ip))?;
    let origin = Origin::new(host);

    let relay = RelayServer::bind(opts.cluster)?;
    let cluster = relay.local_addr();
    let fingerprint = relay.fingerprint.clone();
    info!(%cluster, %fingerprint, "relay listening for edges (QUIC)");
    if opts.cluster_token.is_none() && !opts.cluster.ip().is_loopback() {
        warn!("relay is not on loopback and has no --cluster-token: any edge can join");
    }
    tokio::spawn(relay.run(
        origin.clone(),
        RelayPolicy {
            cluster_token: opts.cluster_token.clone(),
            jwt_secret: base64::engine::general_purpose::STANDARD.encode(secret.as_bytes()),
        },
    ));

    let app = Arc::new(App {
        tokens,
        jwt,
        origin: origin.clone(),
        public_ws: opts.public_ws.clone(),
        next_session: AtomicU64::new(1),
    });
    let listener = tokio::net::TcpListener::bind(opts.http)
        .await
        .map_err(|e| format!("HTTP on {}: {e}", opts.http))?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(app)).await {
            warn!("HTTP server stopped: {e}");
        }
    });
    info!("director and signalling on http://{http}");
    Ok(Running {
        http,
        cluster,
        fingerprint,
        origin,
    })
}

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

    fn on_datagram(&self, hdr: DatagramHeader, rtp: &[u8]) {
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
    pub every: Duration,
}

/// Subscribes to a stream at an origin over the relay, like an edge, and reports what arrives.
pub async fn probe(
    link: LinkConfig,
    stream: &str,
    seconds: u64,
    keyframes: Option<KeyframeRequests>,
) -> Result<serde_json::Value, String> {
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
