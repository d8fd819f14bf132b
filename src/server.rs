//! Process wiring: `chorus serve`, `chorus origin`, `chorus edge` and `chorus probe`.

use std::collections::{BTreeMap, HashMap};
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
use crate::edge::Edge;
use crate::http::{router, App};
use crate::origin::Origin;
use crate::relay::client::{EdgeLink, LinkConfig, LinkHandler};
use crate::relay::proto::{DatagramHeader, Kind, SourceInfo, LEVEL_EXT_ID};
use crate::relay::server::{RelayPolicy, RelayServer};
use crate::room::RoomService;
use crate::rtc::host::{HostConfig, RtcHost};

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Director + origin + edge in one process (the edge linked to the origin over loopback QUIC).
    Serve,
    /// Director + origin: publications, fan-out to edges.
    Origin,
    /// Viewers, fed by an origin over QUIC.
    Edge,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub role: Role,
    pub http: SocketAddr,
    /// IP the media UDP sockets bind.
    pub media_ip: IpAddr,
    /// UDP port of the publishers' socket (the edge takes any free port).
    pub media_port: u16,
    /// Edge media threads (at least 1).
    pub media_workers: usize,
    /// IP put in ICE candidates, when it differs from `media_ip`.
    pub public_ip: Option<IpAddr>,
    /// Base URL of the signalling socket in director answers, e.g. `wss://live.example.com`.
    pub public_ws: Option<String>,
    pub tokens: Option<PathBuf>,
    pub dev_publish_token: Option<String>,
    /// Key of the room API (`POST /api/rooms/{room}/tokens`); dev mode makes one when absent.
    pub api_key: Option<String>,
    pub jwt_secret: Option<String>,
    pub jwt_ttl_secs: u64,
    /// QUIC address edges connect to (origin and serve).
    pub cluster: SocketAddr,
    pub cluster_token: Option<String>,
    /// The origin an edge links to (edge only).
    pub origin: Option<SocketAddr>,
    pub origin_fingerprint: Option<String>,
}

/// A running process's addresses, printed as one JSON line when ready.
pub struct Running {
    pub http: SocketAddr,
    pub cluster: Option<SocketAddr>,
    pub fingerprint: Option<String>,
    /// The room API key, when dev mode made it (printed in the ready line).
    pub dev_api_key: Option<String>,
}

fn load_tokens(opts: &ServerOptions) -> Result<Tokens, String> {
    Ok(match &opts.tokens {
        Some(path) => {
            let t = Tokens::file(path.clone())?;
            info!(path = %path.display(), "tokens from file");
            t
        }
        None if opts.role == Role::Edge => {
            warn!("no --tokens file: every stream is open to viewers at this edge");
            Tokens::dev(random_secret(18))
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
    })
}

/// Starts what `opts.role` asks for and its HTTP server; returns once everything listens.
pub async fn start(opts: &ServerOptions) -> Result<Running, String> {
    let tokens = load_tokens(opts)?;
    // Bound first: an edge announces its signalling URL to the origin when it links.
    let listener = tokio::net::TcpListener::bind(opts.http)
        .await
        .map_err(|e| format!("HTTP on {}: {e}", opts.http))?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;

    let mut origin = None;
    let mut cluster = None;
    let mut fingerprint = None;
    let mut secret = match &opts.jwt_secret {
        Some(s) if !s.is_empty() => s.clone().into_bytes(),
        _ => random_secret(32).into_bytes(),
    };
    if opts.role != Role::Edge {
        let host = RtcHost::start(
            &HostConfig {
                bind: SocketAddr::new(opts.media_ip, opts.media_port),
                public_ip: opts.public_ip,
            },
            "origin",
        )
        .map_err(|e| format!("media socket on {}: {e}", opts.media_ip))?;
        let o = Origin::new(host);
        let relay = RelayServer::bind(opts.cluster)?;
        let addr = relay.local_addr();
        info!(cluster = %addr, fingerprint = relay.fingerprint.as_str(), "relay listening for edges (QUIC)");
        if opts.cluster_token.is_none() && !opts.cluster.ip().is_loopback() {
            warn!("relay is not on loopback and has no --cluster-token: any edge can join");
        }
        fingerprint = Some(relay.fingerprint.clone());
        cluster = Some(addr);
        tokio::spawn(relay.run(
            o.clone(),
            RelayPolicy {
                cluster_token: opts.cluster_token.clone(),
                jwt_secret: base64::engine::general_purpose::STANDARD.encode(&secret),
            },
        ));
        origin = Some(o);
    }
    let mut edge = None;
    if opts.role != Role::Origin {
        let link = match opts.role {
            Role::Serve => LinkConfig {
                origin: cluster.expect("serve runs an origin"),
                fingerprint: fingerprint.clone(),
                cluster_token: opts.cluster_token.clone(),
                ws_url: None,
            },
            _ => LinkConfig {
                origin: opts.origin.ok_or("an edge needs --origin HOST:PORT")?,
                fingerprint: opts.origin_fingerprint.clone(),
                cluster_token: opts.cluster_token.clone(),
                ws_url: Some(match &opts.public_ws {
                    Some(base) => format!("{base}/ws"),
                    None => format!("ws://{http}/ws"),
                }),
            },
        };
        let (e, origin_secret) = Edge::start(
            SocketAddr::new(opts.media_ip, 0),
            opts.public_ip,
            link,
            opts.media_workers,
        )
        .await?;
        if opts.role == Role::Edge {
            // Viewers' JWTs are signed with the origin's key: the edge checks them with it.
            secret = base64::engine::general_purpose::STANDARD
                .decode(origin_secret)
                .map_err(|e| format!("origin sent a bad JWT secret: {e}"))?;
        }
        edge = Some(e);
    }
    let jwt = JwtKeys::new(&secret, opts.jwt_ttl_secs);
    let mut dev_api_key = None;
    let rooms = origin.as_ref().map(|o| {
        let api_key = match &opts.api_key {
            Some(k) if !k.is_empty() => Some(k.clone()),
            _ if tokens.is_dev() => {
                let k = random_secret(18);
                warn!("DEV MODE: room API key (generated): {k}");
                dev_api_key = Some(k.clone());
                Some(k)
            }
            _ => {
                warn!("no --api-key: the room API issues no room tokens");
                None
            }
        };
        let rooms = RoomService::new(&secret, jwt.clone(), api_key, o.clone());
        rooms.start();
        rooms
    });
    let app = Arc::new(App {
        tokens,
        jwt,
        origin,
        edge,
        rooms,
        public_ws: opts.public_ws.clone(),
        next_session: AtomicU64::new(1),
        whep: Mutex::new(HashMap::new()),
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(app)).await {
            warn!("HTTP server stopped: {e}");
        }
    });
    match opts.role {
        Role::Serve => {
            info!("chorus serving on http://{http}/ (demo page), director and signalling there too")
        }
        Role::Origin => info!("origin: director and signalling on http://{http}"),
        Role::Edge => info!("edge: viewers' signalling on http://{http}"),
    }
    Ok(Running {
        http,
        cluster,
        fingerprint,
        dev_api_key,
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

    fn on_datagram(&self, hdr: DatagramHeader, datagram: bytes::Bytes, _queued: Duration) {
        let rtp = &datagram[crate::relay::proto::DATAGRAM_HEADER..];
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
