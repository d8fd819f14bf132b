//! Process wiring: `chorus serve`, `chorus origin` and `chorus edge`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tracing::{info, warn};

use crate::auth::identity::{Identity, IdentityError};
use crate::auth::jwt::{JwtSigner, JwtVerifier};
use crate::auth::random_secret;
use crate::auth::tokens::{TokenFileError, Tokens};
use crate::auth::turn::{TurnConfigError, TurnServers, TURN_CREDENTIAL_TTL_SECS};
use crate::cluster::{self, Cluster, Load, NodeRecord, NodeState};
use crate::edge::follow::RouterConfig;
use crate::edge::{Edge, Uplink};
use crate::http::forwarded::{Cidr, TrustedProxies, MAX_TRUSTED_PROXIES};
use crate::http::limits::HttpLimits;
use crate::http::public_url::{check_base_path, BasePathError, PublicUrls};
use crate::http::{admin_router, router, App};
use crate::origin::media_thread::{MediaThread, MediaThreadConfig};
use crate::origin::relay_server::{RelayBindError, RelayPolicy, RelayServer, SubscribePolicy};
use crate::origin::Origin;
use crate::recording::Recorder;
use crate::relay::client::LinkConfig;
use crate::room::RoomService;
use crate::webhooks::{HookTarget, Hooks};

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Director + origin + edge in one process (the edge linked to the origin over loopback QUIC).
    Serve,
    /// Director + origin: publications, fan-out to edges.
    Origin,
    /// Viewers, fed by an origin over QUIC.
    Edge,
}

/// How a process is set up: its role and what its flags say.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// What the process runs.
    pub role: NodeKind,
    /// The HTTP address (`--http`): director, WHIP, WHEP, signalling.
    pub http: SocketAddr,
    /// IP the media UDP sockets bind.
    pub media_ip: IpAddr,
    /// UDP port of the publishers' socket.
    pub media_port: u16,
    /// First UDP port of the edge's media sockets, one per worker (`--edge-media-port`);
    /// 0 = any free ports.
    pub edge_media_port: u16,
    /// Edge media threads (at least 1).
    pub media_workers: usize,
    /// IP put in ICE candidates, when it differs from `media_ip`.
    pub public_ip: Option<IpAddr>,
    /// Passive TCP candidates beside the media sockets (`--ice-tcp`).
    pub ice_tcp: crate::rtc::tcp::IceTcp,
    /// Base URL of the signalling socket in director answers, e.g. `wss://live.example.com`.
    pub public_ws: Option<String>,
    /// Token file (`--tokens`); None = dev mode (every stream open to viewers).
    pub tokens: Option<PathBuf>,
    /// The dev mode publish token (`--publish-token`); None or empty = a random one.
    pub dev_publish_token: Option<String>,
    /// Key of the room API (`POST /api/rooms/{room}/tokens`); dev mode makes one when absent.
    pub api_key: Option<String>,
    /// Seeds the JWT signing and room-token keys (instead of `data_dir`'s key files).
    pub jwt_secret: Option<String>,
    /// How long a director JWT is valid, in seconds (`--jwt-ttl`).
    pub jwt_ttl_secs: u64,
    /// Where the origin keeps its identity (certificate, signing keys); None = new each start.
    pub data_dir: Option<PathBuf>,
    /// QUIC address edges connect to (origin and serve).
    pub cluster: SocketAddr,
    /// Secret edges present to join the origin (`--cluster-token`); serve makes one when None.
    pub cluster_token: Option<String>,
    /// The origin an edge links to (edge only); None with `redis`: each stream's owner.
    pub origin: Option<SocketAddr>,
    /// Hex SHA-256 of the origin's certificate the edge pins; None = accept any (logged).
    pub origin_fingerprint: Option<String>,
    /// Where `/metrics` and `/api/streams` are served (`--admin-http`); without it they are on
    /// the main HTTP address only in dev mode on loopback.
    pub admin_http: Option<SocketAddr>,
    /// Dev mode (no token file) may bind beyond loopback (`--dev-public`).
    pub dev_public: bool,
    /// The HTTP and WebSocket limits (flags).
    pub limits: HttpLimits,
    /// The cluster's Redis (`--redis URL`); None = an in-memory registry of this process alone.
    pub redis: Option<String>,
    /// This node's id in the cluster (`--node-id`); None = generated.
    pub node_id: Option<String>,
    /// The edge's region (`--region`), which viewers may ask for.
    pub region: Option<String>,
    /// Most viewers the director sends this edge (`--capacity`); None = no limit.
    pub capacity: Option<u32>,
    /// Peers whose `Forwarded` / `X-Forwarded-*` headers are believed (`--trusted-proxy`).
    pub trusted_proxies: Vec<Cidr>,
    /// Path prefix of every route (`--base-path`, e.g. `/chorus`); empty = the root.
    pub base_path: String,
    /// TURN URIs put in director answers (`--turn-url`, repeatable).
    pub turn_urls: Vec<String>,
    /// The TURN server's shared secret (`--turn-secret`) that signs their credentials.
    pub turn_secret: Option<String>,
    /// Where webhooks are POSTed (`--webhook-url`, `http://host[:port][/path]`).
    pub webhook_url: Option<String>,
    /// The secret that signs them (`--webhook-secret`).
    pub webhook_secret: Option<String>,
}

/// A running process's addresses, printed as one JSON line when ready.
pub struct Running {
    /// Where HTTP is served.
    pub http: SocketAddr,
    /// The admin listener, when there is one.
    pub admin: Option<SocketAddr>,
    /// The origin's relay (QUIC) address; None on an edge.
    pub cluster: Option<SocketAddr>,
    /// Hex SHA-256 of the relay certificate, for edges to pin; None on an edge.
    pub fingerprint: Option<String>,
    /// The room API key, when dev mode made it (printed in the ready line).
    pub dev_api_key: Option<String>,
    /// This node's id in the cluster.
    pub node_id: String,
    /// Drains the node (SIGTERM).
    pub drainer: crate::drain::Drainer,
}

impl Running {
    /// Closes every open recording (files finalized): call once the node stops serving.
    pub fn finish_recordings(&self) {
        if let Some(r) = self.drainer.app.origin.as_ref().and_then(|o| o.recorder()) {
            r.finish();
        }
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--tokens` given to an edge.
    #[error("an edge takes no --tokens (nor CHORUS_TOKENS): the origin's token policy decides who views what, and the edge asks its origin for every viewer; give the token file to chorus origin")]
    EdgeTokens,
    /// An edge without `--origin`.
    #[error("an edge needs --origin HOST:PORT, or --redis URL to follow each stream's owner")]
    NoOrigin,
    /// The token file could not be read.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    /// What is beyond loopback ("HTTP on ... and media on ...").
    #[error("refusing to start: dev mode (no --tokens) opens every stream to viewers, and {0} is beyond loopback, \
         so anyone who reaches it could view every stream. Give --tokens FILE (see `chorus token create`), \
         bind to 127.0.0.1, or pass --dev-public to expose dev mode on purpose")]
    DevExposed(String),
    /// What could not be bound or read ("HTTP on 127.0.0.1:8080").
    #[error("{what}: {source}")]
    Io {
        /// What it was ("HTTP on 127.0.0.1:8080").
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The origin's identity could not be loaded or made.
    #[error("origin identity: {0}")]
    Identity(#[from] IdentityError),
    /// The JWT signing key was refused (the reason).
    #[error("JWT signing key: {0}")]
    JwtKey(String),
    /// The relay could not listen.
    #[error(transparent)]
    Relay(#[from] RelayBindError),
    /// The edge's own start (its media sockets, its link).
    #[error("{0}")]
    Edge(String),
    /// `--redis` or `--node-id` refused (why).
    #[error("cluster: {0}")]
    Cluster(String),
    /// `--base-path` is not a path prefix.
    #[error(transparent)]
    BasePath(#[from] BasePathError),
    /// More `--trusted-proxy` ranges than [`MAX_TRUSTED_PROXIES`].
    #[error("at most {MAX_TRUSTED_PROXIES} --trusted-proxy ranges (got {0}); use wider ranges")]
    TooManyProxies(usize),
    /// `--turn-url` / `--turn-secret` refused.
    #[error(transparent)]
    Turn(#[from] TurnConfigError),
    /// `--webhook-url` / `--webhook-secret` refused (why).
    #[error("{0}")]
    Webhook(String),
}

/// The webhooks' delivery (`--webhook-url`, `--webhook-secret`), or none.
fn webhooks(opts: &ServerOptions, node: &str) -> Result<Hooks, StartError> {
    let target =
        HookTarget::from_flags(opts.webhook_url.as_deref(), opts.webhook_secret.as_deref())
            .map_err(|e| StartError::Webhook(e.to_string()))?;
    Ok(match target {
        Some(t) => {
            info!(
                to = t.authority.as_str(),
                path = t.path.as_str(),
                "webhooks on (signed with HMAC-SHA256)"
            );
            Hooks::start(t, node)
        }
        None => Hooks::default(),
    })
}

/// The checked TURN settings (`--turn-url`, `--turn-secret`); the start log names the URLs,
/// never the secret.
fn turn_servers(opts: &ServerOptions) -> Result<Option<TurnServers>, StartError> {
    let turn = TurnServers::from_flags(&opts.turn_urls, opts.turn_secret.as_deref())?;
    match &turn {
        Some(t) => info!(
            urls = t.urls().join(" ").as_str(),
            ttl_secs = TURN_CREDENTIAL_TTL_SECS,
            "director answers carry these TURN servers with short-lived credentials"
        ),
        None => info!("no --turn-url: director answers carry no TURN servers (iceServers: [])"),
    }
    Ok(turn)
}

/// The checked `--trusted-proxy` ranges and `--base-path`.
fn public_urls(opts: &ServerOptions) -> Result<PublicUrls, StartError> {
    if opts.trusted_proxies.len() > MAX_TRUSTED_PROXIES {
        return Err(StartError::TooManyProxies(opts.trusted_proxies.len()));
    }
    let urls = PublicUrls {
        trusted: TrustedProxies::new(opts.trusted_proxies.clone()),
        base_path: check_base_path(&opts.base_path)?,
    };
    if !opts.trusted_proxies.is_empty() {
        let ranges: Vec<String> = opts.trusted_proxies.iter().map(|c| c.to_string()).collect();
        info!(
            ranges = ranges.join(" ").as_str(),
            "forwarded headers believed from these peers only"
        );
    }
    if !urls.base_path.is_empty() {
        info!(
            base_path = urls.base_path.as_str(),
            "every route is under the base path"
        );
    }
    Ok(urls)
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Io {
        what: what.to_string(),
        source,
    }
}

fn load_tokens(opts: &ServerOptions) -> Result<Option<Tokens>, StartError> {
    if opts.role == NodeKind::Edge {
        if opts.jwt_secret.as_deref().is_some_and(|s| !s.is_empty()) {
            warn!("an edge signs nothing: --jwt-secret (CHORUS_JWT_SECRET) is ignored here; viewers' JWTs are checked with the public key the origin sends");
        }
        if opts.tokens.is_some() {
            return Err(StartError::EdgeTokens);
        }
        return Ok(None);
    }
    Ok(Some(match &opts.tokens {
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
    }))
}

/// Dev mode opens every stream to viewers and prints its publish token: on an address others
/// reach, that is a server anyone can publish to and view. Refused unless asked for.
fn check_dev_exposure(opts: &ServerOptions) -> Result<(), StartError> {
    if opts.tokens.is_some() || opts.role == NodeKind::Edge {
        return Ok(());
    }
    let mut exposed = Vec::new();
    if !opts.http.ip().is_loopback() {
        exposed.push(format!("HTTP on {}", opts.http));
    }
    if !opts.media_ip.is_loopback() {
        exposed.push(format!("media on {}", opts.media_ip));
    }
    if exposed.is_empty() {
        return Ok(());
    }
    let what = exposed.join(" and ");
    if opts.dev_public {
        warn!("DEV MODE ON A PUBLIC ADDRESS (--dev-public): {what}; every stream is open to anyone who reaches it");
        return Ok(());
    }
    Err(StartError::DevExposed(what))
}

/// Longest `--node-id`: ids are part of every key and lease holder.
pub(crate) const MAX_NODE_ID: usize = 64;

fn node_kind(role: NodeKind) -> cluster::NodeKind {
    match role {
        NodeKind::Serve => cluster::NodeKind::Serve,
        NodeKind::Origin => cluster::NodeKind::Origin,
        NodeKind::Edge => cluster::NodeKind::Edge,
    }
}

/// This node's id: `--node-id` checked, or one generated for this start.
fn node_id(opts: &ServerOptions) -> Result<String, StartError> {
    let kind = node_kind(opts.role);
    Ok(match &opts.node_id {
        Some(id) => {
            let ok = !id.is_empty()
                && id.len() <= MAX_NODE_ID
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(StartError::Cluster(format!(
                    "--node-id must be 1 to {MAX_NODE_ID} letters, digits, '-', '_' or '.'"
                )));
            }
            id.clone()
        }
        None => format!("{}-{}", kind.as_str(), random_secret(6)),
    })
}

/// The node's place in the cluster (in memory without `--redis`): its id and registry. Made
/// before the edge starts, which follows stream owners through it.
fn join_cluster(opts: &ServerOptions, id: String) -> Result<Arc<Cluster>, StartError> {
    let registry: Arc<dyn cluster::Registry> = match &opts.redis {
        Some(url) => Arc::new(
            cluster::redis::RedisRegistry::open(url)
                // The URL may carry a password: not repeated in the error.
                .map_err(|e| StartError::Cluster(format!("--redis: {e}")))?,
        ),
        None => Arc::new(cluster::memory::MemoryRegistry::default()),
    };
    let c = Cluster::new(registry, opts.redis.is_some(), id);
    if opts.redis.is_some() {
        info!(
            id = c.id.as_str(),
            boot = c.boot.as_str(),
            "cluster node with a Redis registry"
        );
    }
    Ok(c)
}

/// The node's heartbeat and, where an origin runs, its lease upkeep.
fn start_cluster(
    c: Arc<Cluster>,
    opts: &ServerOptions,
    http: SocketAddr,
    relay: Option<SocketAddr>,
    fingerprint: Option<String>,
    origin: &Option<Arc<Origin>>,
    edge: &Option<Arc<Edge>>,
) -> Result<Arc<Cluster>, StartError> {
    let kind = node_kind(opts.role);
    let ws = match &opts.public_ws {
        Some(base) => format!("{base}/ws"),
        None => format!(
            "ws://{}/ws",
            SocketAddr::new(opts.public_ip.unwrap_or(http.ip()), http.port())
        ),
    };
    let base = NodeRecord {
        id: c.id.clone(),
        kind,
        boot: c.boot.clone(),
        http: format!("http://{http}"),
        ws,
        relay: relay.map(|a| a.to_string()),
        fingerprint,
        region: opts.region.clone(),
        capacity: opts.capacity,
        load: Load::default(),
        streams: Vec::new(),
        state: NodeState::Serving,
    };
    let (o, e) = (origin.clone(), edge.clone());
    cluster::spawn_heartbeat(c.clone(), move || {
        let mut r = base.clone();
        if let Some(o) = &o {
            r.load.publications = o.gauges().1 as u64;
        }
        if let Some(e) = &e {
            let (viewers, streams) = e.load(cluster::MAX_ADVERTISED_STREAMS);
            r.load.viewers = viewers;
            r.streams = streams;
        }
        r
    });
    if let Some(o) = origin.clone() {
        cluster::spawn_lease_keeper(c.clone(), move || o.live_streams());
    }
    Ok(c)
}

/// Starts what `opts.role` asks for and its HTTP server; returns once everything listens.
pub async fn start(opts: &ServerOptions) -> Result<Running, StartError> {
    // Known first, so every log line of this start names the node.
    let node_id = node_id(opts)?;
    crate::logs::set_node(&node_id);
    let hooks = webhooks(opts, &node_id)?;
    check_dev_exposure(opts)?;
    let public = public_urls(opts)?;
    let turn = turn_servers(opts)?.map(Arc::new);
    let tokens = load_tokens(opts)?;
    // Bound first: an edge announces its signalling URL to the origin when it links.
    let listener = tokio::net::TcpListener::bind(opts.http)
        .await
        .map_err(io(format!("HTTP on {}", opts.http)))?;
    let http = listener.local_addr().map_err(io("HTTP address"))?;

    let mut origin = None;
    let mut cluster = None;
    let mut fingerprint = None;
    let mut signer = None;
    let mut room_key = Vec::new();
    // An edge's verifier starts empty and takes the origin's key from its Welcome.
    let mut verifier = Arc::new(JwtVerifier::default());
    let subscribe_policy: Arc<OnceLock<Arc<dyn SubscribePolicy>>> = Arc::default();
    // serve's internal link is on loopback, but any local user could reach it: without a
    // cluster token of the operator's, it gets a random one only the process knows.
    let cluster_token = match (&opts.cluster_token, opts.role) {
        (Some(t), _) if !t.is_empty() => Some(t.clone()),
        (_, NodeKind::Serve) => Some(random_secret(24)),
        _ => None,
    };
    if opts.role != NodeKind::Edge {
        let secret = opts.jwt_secret.as_deref().filter(|s| !s.is_empty());
        let id = Identity::load(opts.data_dir.as_deref(), secret.map(str::as_bytes))?;
        match (&id.dir, secret) {
            (Some(dir), None) => info!(dir = %dir.display(), "identity (relay certificate, signing keys) kept in the data dir"),
            (Some(dir), Some(_)) => info!(dir = %dir.display(), "relay certificate kept in the data dir; signing keys derived from --jwt-secret (the dir's key files are not used)"),
            (None, Some(_)) => warn!("no --data-dir: this start has a new relay certificate; edges pinning the last one's fingerprint will not relink (signing keys derived from --jwt-secret)"),
            (None, None) => warn!("no --data-dir: this start has a new relay certificate and new signing keys; pinned edges, JWTs and room tokens of an earlier start stop working"),
        }
        let s = Arc::new(
            JwtSigner::from_pkcs8(&id.jwt_pkcs8, opts.jwt_ttl_secs)
                .map_err(|e| StartError::JwtKey(e.to_string()))?,
        );
        verifier = Arc::new(s.verifier());
        room_key = id.room_key.clone();
        let host = MediaThread::start(
            &MediaThreadConfig {
                bind: SocketAddr::new(opts.media_ip, opts.media_port),
                public_ip: opts.public_ip,
                ice_tcp: opts.ice_tcp,
            },
            "origin",
        )
        .map_err(io(format!("media socket on {}", opts.media_ip)))?;
        let o = Origin::new(host, hooks.clone());
        match opts.data_dir.as_deref() {
            Some(dir) => {
                let r = Recorder::start(dir, hooks.clone())
                    .map_err(io(format!("recordings directory in {}", dir.display())))?;
                o.set_recorder(r);
            }
            None => info!("no --data-dir: publishes asking to record are refused"),
        }
        let relay = RelayServer::bind(opts.cluster, &id.cert_der, &id.cert_key_der)?;
        let addr = relay.local_addr();
        info!(cluster = %addr, fingerprint = relay.fingerprint.as_str(), "relay listening for edges (QUIC)");
        if cluster_token.is_none() && !opts.cluster.ip().is_loopback() {
            warn!("relay is not on loopback and has no --cluster-token: any edge can join");
        }
        fingerprint = Some(relay.fingerprint.clone());
        cluster = Some(addr);
        tokio::spawn(relay.run(
            o.clone(),
            RelayPolicy {
                cluster_token: cluster_token.clone(),
                jwt_key: s.verify_key().clone(),
                subscribe: subscribe_policy.clone(),
            },
        ));
        signer = Some(s);
        origin = Some(o);
    }
    let node = join_cluster(opts, node_id)?;
    let mut edge = None;
    if opts.role != NodeKind::Origin {
        let ws_url = Some(match &opts.public_ws {
            Some(base) => format!("{base}/ws"),
            None => format!("ws://{http}{}/ws", public.base_path),
        });
        let link = match (opts.role, opts.origin, &opts.redis) {
            (NodeKind::Serve, _, _) => Uplink::Fixed(LinkConfig {
                origin: cluster.expect("serve runs an origin"),
                fingerprint: fingerprint.clone(),
                cluster_token: cluster_token.clone(),
                ws_url: None,
            }),
            (_, Some(origin), _) => Uplink::Fixed(LinkConfig {
                origin,
                fingerprint: opts.origin_fingerprint.clone(),
                cluster_token: cluster_token.clone(),
                ws_url,
            }),
            (_, None, Some(_)) => {
                info!(
                    "no --origin: each stream's owner is looked up in the registry and linked to"
                );
                Uplink::Follow(RouterConfig {
                    cluster: node.clone(),
                    template: LinkConfig {
                        // Replaced by each owner's relay address and fingerprint.
                        origin: SocketAddr::from(([127, 0, 0, 1], 0)),
                        fingerprint: None,
                        cluster_token: cluster_token.clone(),
                        ws_url,
                    },
                    keys: verifier.clone(),
                })
            }
            (_, None, None) => return Err(StartError::NoOrigin),
        };
        // Viewers' JWTs are signed with the origin's key: the edge checks them with its public
        // half, taken from the origin's Welcome (in serve, the same key).
        let e = Edge::start(
            SocketAddr::new(opts.media_ip, opts.edge_media_port),
            opts.public_ip,
            link,
            opts.media_workers,
            opts.ice_tcp,
            verifier.clone(),
        )
        .await
        .map_err(StartError::Edge)?;
        edge = Some(e);
    }
    let mut dev_api_key = None;
    let rooms = match (&origin, &signer) {
        (Some(o), Some(signer)) => {
            let api_key = match &opts.api_key {
                Some(k) if !k.is_empty() => Some(k.clone()),
                _ if tokens.as_ref().is_some_and(Tokens::is_dev) => {
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
            let rooms =
                RoomService::new(&room_key, signer.clone(), api_key, o.clone(), turn.clone());
            rooms.start();
            Some(rooms)
        }
        _ => None,
    };
    // Operators' endpoints (per-source state with publisher ids, counters) stay off the public
    // listener: on --admin-http, or on the main one in dev mode on loopback.
    // An edge holds no token policy: on loopback it is as local as dev mode.
    let admin_on_main = opts.admin_http.is_none()
        && (tokens.as_ref().is_some_and(Tokens::is_dev) || opts.role == NodeKind::Edge)
        && http.ip().is_loopback();
    let mut admin = None;
    let admin_listener = match opts.admin_http {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("admin HTTP on {addr}")))?;
            admin = Some(l.local_addr().map_err(io("admin HTTP address"))?);
            Some(l)
        }
        None => {
            if !admin_on_main {
                warn!("no --admin-http: /metrics and /api/streams are not served");
            }
            None
        }
    };
    let node = start_cluster(
        node,
        opts,
        http,
        cluster,
        fingerprint.clone(),
        &origin,
        &edge,
    )?;
    if let Some(r) = &rooms {
        r.attach_cluster(node.clone());
    }
    if let (Some(e), true) = (&edge, node.shared) {
        crate::edge::stream_counts::spawn_edge_counts(node.clone(), e.clone());
    }
    if let (Some(e), true) = (&edge, hooks.on()) {
        crate::edge::stream_counts::spawn_viewer_hooks(hooks.clone(), e.clone());
    }
    let node_id = node.id.clone();
    let base = public.base_path.clone();
    let app = Arc::new(
        App::new(
            node,
            tokens,
            signer,
            verifier,
            origin,
            edge,
            rooms,
            opts.public_ws.clone(),
            opts.limits.clone(),
            admin_on_main,
        )
        .with_public(public)
        .with_turn(turn)
        .with_hooks(hooks.clone()),
    );
    if app.origin.is_some() {
        let policy: Arc<dyn SubscribePolicy> = app.clone();
        let _ = subscribe_policy.set(policy);
    }
    if let Some(edge) = &app.edge {
        // Room removals the origin sends over the link end the removed members' views here.
        let mut removed = edge.revocations.subscribe();
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                match removed.recv().await {
                    Ok((room, member)) => app.end_room_views(&room, &member),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "missed room removals")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    if let (Some(l), Some(addr)) = (admin_listener, admin) {
        info!(admin = %addr, "/metrics and /api/streams on the admin address");
        let (router, limits, metrics) = (
            admin_router(app.clone()),
            opts.limits.clone(),
            app.http_metrics.clone(),
        );
        tokio::spawn(async move { crate::http::listen::serve(l, router, &limits, metrics).await });
    }
    let (router, limits, metrics) = (
        router(app.clone()),
        opts.limits.clone(),
        app.http_metrics.clone(),
    );
    tokio::spawn(
        async move { crate::http::listen::serve(listener, router, &limits, metrics).await },
    );
    match opts.role {
        NodeKind::Serve => {
            info!("chorus serving on http://{http}{base}/ (demo page), director and signalling there too")
        }
        NodeKind::Origin => info!("origin: director and signalling on http://{http}{base}"),
        NodeKind::Edge => info!("edge: viewers' signalling on http://{http}{base}"),
    }
    Ok(Running {
        http,
        admin,
        cluster,
        fingerprint,
        dev_api_key,
        node_id,
        drainer: crate::drain::Drainer { app },
    })
}
