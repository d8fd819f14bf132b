use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

use chorus::auth::tokens::{parse_ttl, TokenFile, TokenKind};
use chorus::http::forwarded::Cidr;
#[cfg(feature = "tools")]
use chorus::loadgen;
#[cfg(feature = "tools")]
use chorus::relay::client::LinkConfig;
#[cfg(feature = "tools")]
use chorus::replay::{self, ReplayOptions};
use chorus::server::{self, NodeKind, ServerOptions};

#[derive(Parser)]
#[command(
    name = "chorus",
    version,
    about = "Open real-time audio edge for interactive live streaming"
)]
struct Cli {
    /// Log lines on stderr: `text` for people, `json` (one object per line, with the node's
    /// id and each event's stream, source, session and peer ids) for a log shipper.
    #[arg(long, global = true, env = "CHORUS_LOG_FORMAT", default_value = "text")]
    log_format: chorus::logs::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Director, origin and edge in one process, on loopback, with embedded defaults.
    Serve(ServeArgs),
    /// An origin (with the director): takes publications, fans them out to edges over QUIC.
    Origin(OriginArgs),
    /// An edge: serves viewers, fed by an origin over QUIC.
    Edge(EdgeArgs),
    #[cfg(feature = "tools")]
    /// Subscribes to a stream at an origin like an edge would, and prints what arrives as JSON.
    Probe(ProbeArgs),
    /// Manages publish and subscribe tokens in a token file.
    #[command(subcommand)]
    Token(TokenCmd),
    #[cfg(feature = "tools")]
    /// Replays a speech corpus through the packet core and prints each track change as JSON.
    Replay(ReplayArgs),
    #[cfg(feature = "tools")]
    /// Load test: real WebRTC publishers and a ramp of viewers against a running chorus; one
    /// JSON line per step (packets, loss, latency, joins, edge CPU and memory) and a summary.
    Loadgen(LoadgenArgs),
}

#[derive(Args, Clone)]
struct CommonServer {
    /// TOML file of settings, keys named like these long flags (http = "127.0.0.1:8080",
    /// trusted-proxy = ["127.0.0.1"]); flags and environment variables override it.
    #[arg(long, env = "CHORUS_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// HTTP address: director API, signalling WebSocket, WHIP, demo page.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// IP the media (WebRTC) UDP socket binds.
    #[arg(long, default_value = "127.0.0.1")]
    media_ip: IpAddr,
    /// UDP port of the publishers' media socket (the origin's; 0 = any free port).
    #[arg(long, default_value_t = 0)]
    media_port: u16,
    /// First UDP port of the edge's media sockets (viewers' WebRTC), one per media worker:
    /// this port and the next --media-workers - 1 (0 = any free ports).
    #[arg(long, default_value_t = 0)]
    edge_media_port: u16,
    /// Edge media threads, each with its own UDP socket and share of the viewers (default: one
    /// per core).
    #[arg(long)]
    media_workers: Option<usize>,
    /// Address put in ICE candidates when deployed behind NAT or bound to 0.0.0.0.
    #[arg(long)]
    public_ip: Option<IpAddr>,
    /// Passive ICE-TCP candidates (RFC 6544) beside each media socket, for listeners whose
    /// network blocks UDP: `on` (the UDP port's number over TCP, any free port if taken),
    /// `off`, or a first port (each further media thread the next; 0 = any free ports).
    #[arg(
        long,
        env = "CHORUS_ICE_TCP",
        default_value = "on",
        value_name = "on|off|PORT"
    )]
    ice_tcp: chorus::rtc::tcp::IceTcp,
    /// Base of the signalling URL the director returns, e.g. wss://live.example.com.
    #[arg(long)]
    public_ws: Option<String>,
    /// Token file (see `chorus token create`). Without it: dev mode.
    #[arg(long, env = "CHORUS_TOKENS")]
    tokens: Option<PathBuf>,
    /// Dev mode publish token (default: a random one, printed at start).
    #[arg(long, env = "CHORUS_PUBLISH_TOKEN", hide_env_values = true)]
    publish_token: Option<String>,
    /// Secret the origin derives its JWT signing key (Ed25519) and room-token key from, instead
    /// of the key files of --data-dir (several origins may share it). Default: the data dir's
    /// keys, or new ones per start.
    #[arg(long, env = "CHORUS_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// How long a director JWT is valid to open the signalling socket.
    #[arg(long, default_value = "60s", value_parser = parse_ttl)]
    jwt_ttl: u64,
    /// Shared secret edges present to join this origin.
    #[arg(long, env = "CHORUS_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Address of /metrics and /api/streams (operators only). Without it they are served on
    /// --http only in dev mode on loopback.
    #[arg(long)]
    admin_http: Option<SocketAddr>,
    /// Let dev mode (no --tokens: every stream open) bind HTTP or media beyond loopback.
    #[arg(long)]
    dev_public: bool,
    /// Most open HTTP connections (WebSockets included).
    #[arg(long, default_value_t = chorus::http::limits::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most open HTTP connections from one IP (raise it behind a reverse proxy).
    #[arg(long, default_value_t = chorus::http::limits::MAX_CONNECTIONS_PER_IP)]
    max_connections_per_ip: usize,
    /// SDP offers (WHIP, WHEP, publish, view) taken per second, all clients together.
    #[arg(long, default_value_t = chorus::http::limits::OFFERS_PER_SEC)]
    offers_per_sec: u32,
    /// SDP offers taken per second from one IP.
    #[arg(long, default_value_t = chorus::http::limits::OFFERS_PER_SEC_PER_IP)]
    offers_per_sec_per_ip: u32,
    /// Tests only: ping signalling sockets this often (ms) instead of every 20 s.
    #[arg(long, hide = true)]
    ws_ping_ms: Option<u64>,
    /// Tests only: close a signalling socket silent this long (ms) instead of 60 s.
    #[arg(long, hide = true)]
    ws_silence_ms: Option<u64>,
    /// A reverse proxy (IP or CIDR range, repeatable) whose Forwarded / X-Forwarded-Proto /
    /// X-Forwarded-Host / X-Forwarded-For headers are believed; from any other peer they are
    /// ignored.
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    trusted_proxy: Vec<Cidr>,
    /// Path prefix every route lives under, e.g. /chorus (the proxy passes the path on
    /// unchanged). Default: the root.
    #[arg(long, default_value = "", env = "CHORUS_BASE_PATH")]
    base_path: String,
    /// A TURN server director answers hand out (repeatable, e.g.
    /// turn:turn.example.com:3478?transport=udp, ...?transport=tcp,
    /// turns:turn.example.com:5349?transport=tcp), with credentials signed by --turn-secret.
    #[arg(long = "turn-url", value_name = "URI")]
    turn_url: Vec<String>,
    /// The TURN server's shared secret (coturn: static-auth-secret, with use-auth-secret).
    #[arg(
        long,
        env = "CHORUS_TURN_SECRET",
        hide_env_values = true,
        conflicts_with = "turn_secret_file"
    )]
    turn_secret: Option<String>,
    /// A file holding the TURN shared secret (one line; kept out of the process list).
    #[arg(long, env = "CHORUS_TURN_SECRET_FILE", value_name = "PATH")]
    turn_secret_file: Option<PathBuf>,
    /// Where to POST webhooks (feeds started/stopped, room members, viewer counts):
    /// http://host[:port][/path]. Needs --webhook-secret.
    #[arg(long, env = "CHORUS_WEBHOOK_URL", value_name = "URL")]
    webhook_url: Option<String>,
    /// The secret that signs each webhook (X-Chorus-Signature: sha256=HMAC-SHA256 of the body).
    #[arg(
        long,
        env = "CHORUS_WEBHOOK_SECRET",
        hide_env_values = true,
        conflicts_with = "webhook_secret_file"
    )]
    webhook_secret: Option<String>,
    /// A file holding the webhook secret (one line; kept out of the process list).
    #[arg(long, env = "CHORUS_WEBHOOK_SECRET_FILE", value_name = "PATH")]
    webhook_secret_file: Option<PathBuf>,
}

#[derive(Args, Clone, Default)]
struct OriginSideArgs {
    /// Key of the room API (POST /api/rooms/{room}/tokens). Dev mode makes one when absent.
    #[arg(long, env = "CHORUS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Directory holding the origin's identity: its QUIC certificate (so a pinned
    /// --origin-fingerprint survives a restart), JWT signing key and room-token key; made on
    /// first start (files of mode 0600). Default: a new identity per start.
    #[arg(long, env = "CHORUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Joining a cluster (`chorus origin` and `chorus edge`).
#[derive(Args, Clone, Default)]
struct ClusterArgs {
    /// The cluster's Redis, e.g. redis://127.0.0.1:6379: membership, stream ownership, viewer
    /// placement. Without it this process is alone (an in-memory registry).
    #[arg(long, env = "CHORUS_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// This node's id in the cluster (letters, digits, '-', '_', '.'; default: generated).
    #[arg(long)]
    node_id: Option<String>,
    /// On SIGTERM, wait at most this many seconds for viewers (edge) or publishers (origin) to
    /// move before exiting (Ctrl-C stops at once).
    #[arg(long, default_value_t = chorus::drain::DRAIN_TIMEOUT.as_secs())]
    drain_timeout: u64,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonServer,
    #[command(flatten)]
    rooms: OriginSideArgs,
}

#[derive(Args)]
struct OriginArgs {
    #[command(flatten)]
    common: CommonServer,
    #[command(flatten)]
    rooms: OriginSideArgs,
    /// QUIC address edges connect to.
    #[arg(long, default_value = "127.0.0.1:7400")]
    cluster: SocketAddr,
    #[command(flatten)]
    join: ClusterArgs,
}

#[derive(Args)]
struct EdgeArgs {
    #[command(flatten)]
    common: CommonServer,
    /// The origin's QUIC address (its --cluster). Not needed with --redis: the edge then links
    /// to each stream's owner, found in the registry.
    #[arg(long)]
    origin: Option<SocketAddr>,
    /// Hex SHA-256 of the origin certificate (printed by the origin at start).
    #[arg(long)]
    origin_fingerprint: Option<String>,
    #[command(flatten)]
    join: ClusterArgs,
    /// The region this edge serves (viewers may ask the director for one).
    #[arg(long)]
    region: Option<String>,
    /// Most viewers directors send this edge (default: no limit).
    #[arg(long)]
    capacity: Option<u32>,
}

/// Where a node sits in the cluster: what `run_server` passes on from the flags.
#[derive(Default)]
struct Placement {
    join: ClusterArgs,
    region: Option<String>,
    capacity: Option<u32>,
}

#[cfg(feature = "tools")]
#[derive(Args)]
struct ProbeArgs {
    /// The origin's QUIC address (its --cluster).
    #[arg(long)]
    origin: SocketAddr,
    #[arg(long)]
    stream: String,
    /// How long to listen.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Hex SHA-256 of the origin certificate (printed by the origin at start).
    #[arg(long)]
    origin_fingerprint: Option<String>,
    #[arg(long, env = "CHORUS_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Ask the publisher for a video keyframe this often (seconds), as a viewer's PLI does.
    #[arg(long)]
    keyframe_every: Option<u64>,
    /// Source whose keyframes to request (default: the main source).
    #[arg(long)]
    keyframe_source: Option<String>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Adds a token to the token file and prints it.
    Create {
        /// Stream name, or * for every stream.
        #[arg(long)]
        stream: String,
        #[arg(long, value_parser = ["publish", "subscribe"])]
        kind: String,
        /// Lifetime, e.g. 3600, 30m, 12h, 7d (default: no expiry).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// A publish token that records its feeds (unless a publish says `record: false`) and
        /// allows `record: true` (needs the origin's --data-dir).
        #[arg(long)]
        record: bool,
        #[arg(long, env = "CHORUS_TOKENS", default_value = "chorus-tokens.json")]
        tokens: PathBuf,
    },
}

#[cfg(feature = "tools")]
#[derive(Args)]
struct ReplayArgs {
    /// Directory of <id>.opus (Ogg Opus) and optional <id>.levels files.
    #[arg(long)]
    corpus: PathBuf,
    /// Number of multiplexed tracks.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    tracks: u8,
    /// sourceId played in the main track, never in the multiplexed ones.
    #[arg(long)]
    pinned: Option<String>,
    /// Comma-separated sourceIds this viewer must never receive.
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Send no RFC 6464 level: activity is estimated from the Opus payload alone.
    #[arg(long)]
    no_levels: bool,
    /// Emulate sender DTX: quiet frames become one 1-byte packet every 400 ms.
    #[arg(long)]
    dtx: bool,
    /// Packet loss probability (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Uniform random extra delay of 0 to J ms per packet.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u32,
    /// Seed of the network model and of the stream's SSRCs and sequence numbers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run to T (seconds, or ms with an `ms` suffix) and print the track changes up to T and
    /// what the core held at T: its ranking, each source's voice, score, level and track.
    #[arg(long, value_parser = replay::explain::parse_time)]
    explain: Option<u64>,
}

#[cfg(feature = "tools")]
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LoadgenArgs {
    #[command(subcommand)]
    sub: Option<LoadgenCmd>,
    /// The director of chorus (`chorus serve` prints it), where publishers (and, unless
    /// --view-url, viewers) get their signalling URL; with --target janus, Janus's WebSocket
    /// API (`chorus loadgen janus-config` prints it).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server viewers watch: chorus, or a Janus streaming mountpoint (Janus offers, the
    /// viewers answer; the speakers go to --janus-rtp as plain RTP, one per track).
    #[arg(long, value_enum, default_value_t = TargetArg::Chorus)]
    target: TargetArg,
    /// --target janus: the mountpoint's id.
    #[arg(long, default_value_t = loadgen::janus_config::MOUNTPOINT)]
    janus_mountpoint: u64,
    /// --target janus: the RTP address of each of the mountpoint's streams, comma-separated,
    /// one per track.
    #[arg(long, value_delimiter = ',')]
    janus_rtp: Vec<SocketAddr>,
    /// Where viewers ask the director (e.g. one edge); default: --url.
    #[arg(long)]
    view_url: Option<String>,
    #[arg(long, default_value = "loadgen")]
    stream: String,
    #[arg(long, env = "CHORUS_PUBLISH_TOKEN", hide_env_values = true)]
    publish_token: Option<String>,
    /// Bearer token for /api/director/subscribe, when the stream needs one.
    #[arg(long, env = "CHORUS_SUBSCRIBE_TOKEN", hide_env_values = true)]
    subscribe_token: Option<String>,
    /// Directory of <id>.opus and <id>.levels files (see `chorus replay`).
    #[arg(long, default_value = "tests/corpus/panel")]
    corpus: PathBuf,
    /// Comma-separated corpus speakers to publish, in order (default: all).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    /// Publishers (default: one per speaker); more than speakers reuses them as <id>-1, ...
    #[arg(long)]
    publishers: Option<usize>,
    /// Multiplexed tracks per viewer.
    #[arg(long, default_value_t = 3)]
    tracks: usize,
    /// Viewers of the first step.
    #[arg(long, default_value_t = 10)]
    start: usize,
    /// Viewers added per step.
    #[arg(long, default_value_t = 10)]
    step: usize,
    /// Length of each step's steady part, measured after its joins complete.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    #[arg(long, default_value_t = 100)]
    max_viewers: usize,
    /// Hard stop: the whole run ends within this many seconds, report included.
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Joins in flight at once (director request to ICE + DTLS connected).
    #[arg(long, default_value_t = 50)]
    join_concurrency: usize,
    /// Seconds a join may take before it counts as failed.
    #[arg(long, default_value_t = 10.0)]
    join_timeout: f64,
    /// Every n-th viewer decrypts its media to measure latency (0: none).
    #[arg(long, default_value_t = 20)]
    sample_every: usize,
    /// Threads owning the peers.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The process forwarding to viewers (`chorus serve` or `chorus edge`): its CPU and memory
    /// are sampled from /proc at each step's bounds.
    #[arg(long)]
    edge_pid: Option<u32>,
    /// The origin, when it shares this generator's core: its CPU is reported per step beside
    /// the generator's own, and the core's headroom is what both leave.
    #[arg(long)]
    origin_pid: Option<u32>,
    /// IP the peers' UDP sockets bind.
    #[arg(long, default_value = "127.0.0.1")]
    local_ip: IpAddr,
    /// Read the sockets at most every this many ms (datagrams pile up into batches; kernel
    /// receive timestamps keep the latency exact). The default lets about 6 packets share one
    /// recvmmsg; peers still connecting are read every 1 ms.
    #[arg(long, default_value_t = loadgen::DEFAULT_POLL_MS)]
    poll_ms: f64,
    /// Sampled viewers hand every packet to str0m to decrypt (the generator's former receive
    /// path, dearer), instead of opening their SRTP themselves once DTLS is up.
    #[arg(long)]
    decrypt_with_str0m: bool,
}

#[cfg(feature = "tools")]
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetArg {
    Chorus,
    Janus,
}

#[cfg(feature = "tools")]
#[derive(Subcommand)]
enum LoadgenCmd {
    /// Writes a complete, minimal Janus configuration into --dir (the streaming plugin with one
    /// mountpoint of --tracks Opus streams, the WebSocket transport, free loopback ports) and
    /// prints one JSON line: the WebSocket URL, the mountpoint, its RTP addresses and the
    /// arguments to run Janus with (`janus -F DIR -C DIR/janus.jcfg`).
    JanusConfig {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        tracks: usize,
        /// Janus's library folder (holding plugins/ and transports/); default: where Debian's
        /// package puts it.
        #[arg(long)]
        janus_lib: Option<PathBuf>,
        /// The address of Janus's ICE candidates (Janus skips loopback); default: the first
        /// IPv4 address of an interface that is up.
        #[arg(long)]
        ice_ip: Option<IpAddr>,
        /// Janus's static event loops, the threads that do every handle's media (0: Janus's
        /// default, a thread per handle).
        #[arg(long, default_value_t = 1)]
        event_loops: usize,
    },
    /// The machine's floor: SRTP AES-128-GCM sealing and batched sendmmsg of the same packets
    /// to many loopback sockets, with no chorus logic. Prints one JSON line.
    Floor {
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Destination sockets (round robin), each with its own key.
        #[arg(long, default_value_t = 1000)]
        viewers: usize,
        /// Packets per sendmmsg.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Opus payload bytes per packet.
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
}

fn main() -> ExitCode {
    let argv =
        match chorus::config_file::with_config(&Cli::command(), std::env::args_os().collect()) {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("chorus: {e}");
                return ExitCode::FAILURE;
            }
        };
    let cli = Cli::parse_from(argv);
    chorus::logs::init(cli.log_format);
    let (what, result) = match cli.command {
        Command::Serve(a) => (
            "serve",
            run_server(
                a.common,
                a.rooms,
                NodeKind::Serve,
                "127.0.0.1:0".parse().expect("valid"),
                None,
                None,
                Placement::default(),
            ),
        ),
        Command::Origin(a) => (
            "origin",
            run_server(
                a.common,
                a.rooms,
                NodeKind::Origin,
                a.cluster,
                None,
                None,
                Placement {
                    join: a.join,
                    ..Placement::default()
                },
            ),
        ),
        Command::Edge(a) => (
            "edge",
            run_server(
                a.common,
                OriginSideArgs::default(),
                NodeKind::Edge,
                "127.0.0.1:0".parse().expect("valid"),
                a.origin,
                a.origin_fingerprint,
                Placement {
                    join: a.join,
                    region: a.region,
                    capacity: a.capacity,
                },
            ),
        ),
        #[cfg(feature = "tools")]
        Command::Probe(a) => ("probe", probe_cmd(a)),
        Command::Token(t) => ("token", token_cmd(t)),
        #[cfg(feature = "tools")]
        Command::Replay(a) => ("replay", replay_cmd(a)),
        #[cfg(feature = "tools")]
        Command::Loadgen(a) => ("loadgen", loadgen_cmd(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A secret given inline or kept in a file (`file_flag`, clap lets only one of them be set):
/// the file's first line, without the line ending.
fn secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    file_flag: &str,
) -> Result<Option<String>, String> {
    let Some(path) = file.filter(|_| inline.is_none()) else {
        return Ok(inline);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{file_flag} {}: {e}", path.display()))?;
    Ok(Some(text.lines().next().unwrap_or("").trim().to_owned()))
}

fn run_server(
    c: CommonServer,
    rooms: OriginSideArgs,
    role: NodeKind,
    cluster: SocketAddr,
    origin: Option<SocketAddr>,
    origin_fingerprint: Option<String>,
    place: Placement,
) -> Result<(), String> {
    if let Some(path) = &c.config {
        tracing::info!(path = %path.display(), "settings from the config file (flags and environment override it)");
    }
    let drain_timeout = std::time::Duration::from_secs(place.join.drain_timeout);
    let opts = ServerOptions {
        redis: place.join.redis,
        node_id: place.join.node_id,
        region: place.region,
        capacity: place.capacity,
        role,
        origin,
        origin_fingerprint,
        http: c.http,
        media_ip: c.media_ip,
        media_port: c.media_port,
        edge_media_port: c.edge_media_port,
        media_workers: c
            .media_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        public_ip: c.public_ip,
        ice_tcp: c.ice_tcp,
        public_ws: c.public_ws,
        tokens: c.tokens,
        dev_publish_token: c.publish_token,
        api_key: rooms.api_key,
        jwt_secret: c.jwt_secret,
        jwt_ttl_secs: c.jwt_ttl,
        data_dir: rooms.data_dir,
        cluster,
        cluster_token: c.cluster_token,
        admin_http: c.admin_http,
        dev_public: c.dev_public,
        limits: {
            use std::time::Duration;
            let d = chorus::http::limits::HttpLimits::default();
            chorus::http::limits::HttpLimits {
                max_connections: c.max_connections,
                max_connections_per_ip: c.max_connections_per_ip,
                offers_per_sec: c.offers_per_sec,
                offers_per_sec_per_ip: c.offers_per_sec_per_ip,
                ws_ping_every: c.ws_ping_ms.map_or(d.ws_ping_every, Duration::from_millis),
                ws_silence_limit: c
                    .ws_silence_ms
                    .map_or(d.ws_silence_limit, Duration::from_millis),
            }
        },
        trusted_proxies: c.trusted_proxy,
        base_path: c.base_path,
        turn_urls: c.turn_url,
        turn_secret: secret(c.turn_secret, c.turn_secret_file, "--turn-secret-file")?,
        webhook_url: c.webhook_url,
        webhook_secret: secret(
            c.webhook_secret,
            c.webhook_secret_file,
            "--webhook-secret-file",
        )?,
    };
    runtime()?.block_on(async {
        let running = server::start(&opts).await.map_err(|e| e.to_string())?;
        println!(
            "{}",
            serde_json::json!({
                "http": format!("http://{}", running.http),
                "admin": running.admin.map(|a| format!("http://{a}")),
                "cluster": running.cluster.map(|c| c.to_string()),
                "fingerprint": running.fingerprint,
                "apiKey": running.dev_api_key,
                "node": running.node_id,
            })
        );
        let _ = std::io::stdout().flush();
        if role == NodeKind::Serve {
            tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
            tracing::info!("interrupted: shutting down");
            running.finish_recordings();
            return Ok(());
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.map_err(|e| e.to_string())?;
                tracing::info!("interrupted: shutting down");
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining");
                running.drainer.drain(drain_timeout).await;
            }
        }
        running.finish_recordings();
        Ok(())
    })
}

#[cfg(feature = "tools")]
fn probe_cmd(a: ProbeArgs) -> Result<(), String> {
    let link = LinkConfig {
        origin: a.origin,
        fingerprint: a.origin_fingerprint,
        cluster_token: a.cluster_token,
        ws_url: None,
    };
    let keyframes = a
        .keyframe_every
        .map(|secs| chorus::relay::probe::KeyframeRequests {
            source: a.keyframe_source,
            every: std::time::Duration::from_secs(secs.max(1)),
        });
    let report = runtime()?.block_on(chorus::relay::probe::probe(
        link, &a.stream, a.seconds, keyframes,
    ))?;
    println!("{report}");
    Ok(())
}

fn token_cmd(t: TokenCmd) -> Result<(), String> {
    match t {
        TokenCmd::Create {
            stream,
            kind,
            ttl,
            record,
            tokens,
        } => {
            if record && kind != "publish" {
                return Err("--record is for publish tokens".into());
            }
            if stream != "*" {
                chorus::millicast::check_stream_name(&stream).map_err(|e| e.to_string())?;
            }
            let kind = if kind == "publish" {
                TokenKind::Publish
            } else {
                TokenKind::Subscribe
            };
            let mut file = TokenFile::load(&tokens).map_err(|e| e.to_string())?;
            let mut entry = file.create(&stream, kind, ttl);
            if record {
                entry.record = true;
                if let Some(e) = file.tokens.last_mut() {
                    e.record = true;
                }
            }
            file.save(&tokens).map_err(|e| e.to_string())?;
            eprintln!(
                "added a {} token for stream {stream:?} to {}{}{}",
                kind.as_str(),
                tokens.display(),
                ttl.map(|t| format!(", valid {t} s")).unwrap_or_default(),
                if record { ", recording its feeds" } else { "" }
            );
            println!("{}", entry.token);
            Ok(())
        }
    }
}

#[cfg(feature = "tools")]
fn replay_cmd(a: ReplayArgs) -> Result<(), String> {
    if !(0.0..=1.0).contains(&a.loss) {
        return Err(format!("--loss must be between 0 and 1, got {}", a.loss));
    }
    let speakers = replay::corpus::load(&a.corpus).map_err(|e| e.to_string())?;
    let opts = ReplayOptions {
        tracks: a.tracks,
        pinned: a.pinned,
        exclude: a.exclude.into_iter().filter(|e| !e.is_empty()).collect(),
        levels: !a.no_levels,
        dtx: a.dtx,
        loss: a.loss,
        jitter_ms: a.jitter_ms,
        seed: a.seed,
        until_us: a.explain,
        ..ReplayOptions::default()
    };
    let result = replay::run(&speakers, &opts)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let io = |e: std::io::Error| e.to_string();
    if let Some(e) = &result.explained {
        let text = replay::explain::render(e, &result.changes, opts.tracks);
        return write!(out, "{text}").map_err(io);
    }
    for c in &result.changes {
        writeln!(
            out,
            "{}",
            serde_json::to_string(c).map_err(|e| e.to_string())?
        )
        .map_err(io)?;
    }
    let summary = serde_json::json!({ "summary": result.summary });
    writeln!(out, "{summary}").map_err(io)?;
    Ok(())
}

#[cfg(feature = "tools")]
fn loadgen_cmd(a: LoadgenArgs) -> Result<(), String> {
    match a.sub {
        Some(LoadgenCmd::Floor {
            packets,
            viewers,
            batch,
            payload,
        }) => {
            let out = loadgen::floor::run(&loadgen::floor::FloorOptions {
                packets,
                viewers,
                batch,
                payload,
            })?;
            println!("{out}");
            return Ok(());
        }
        Some(LoadgenCmd::JanusConfig {
            dir,
            tracks,
            janus_lib,
            ice_ip,
            event_loops,
        }) => {
            let out = loadgen::janus_config::write(
                &dir,
                tracks,
                janus_lib.as_deref(),
                ice_ip,
                event_loops,
            )?;
            println!("{out}");
            return Ok(());
        }
        None => {}
    }
    let target = match a.target {
        TargetArg::Chorus => loadgen::Target::Chorus,
        TargetArg::Janus => loadgen::Target::Janus {
            mountpoint: a.janus_mountpoint,
            rtp: a.janus_rtp,
        },
    };
    loadgen::run(loadgen::Options {
        url: a.url,
        target,
        view_url: a.view_url,
        stream: a.stream,
        publish_token: a.publish_token,
        subscribe_token: a.subscribe_token,
        corpus: a.corpus,
        sources: a.sources.into_iter().filter(|s| !s.is_empty()).collect(),
        publishers: a.publishers,
        tracks: a.tracks,
        start: a.start,
        step: a.step,
        step_secs: a.step_secs,
        max_viewers: a.max_viewers,
        duration: a.duration,
        join_concurrency: a.join_concurrency,
        join_timeout: a.join_timeout,
        sample_every: a.sample_every,
        threads: a.threads,
        edge_pid: a.edge_pid,
        origin_pid: a.origin_pid,
        local_ip: a.local_ip,
        poll_ms: a.poll_ms,
        lean_rx: !a.decrypt_with_str0m,
    })
}
