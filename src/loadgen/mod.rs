//! `chorus loadgen`: real WebRTC publishers and viewers (str0m clients, the SDK's signalling)
//! against a running chorus, ramping viewers in steps and reporting, per step, what viewers
//! get (packets, loss, added and switch latency), how fast they join, and what the edge
//! process spends (CPU, memory from /proc). `chorus loadgen floor` measures the machine's own
//! cost of the same packets (SRTP-GCM and batched sends) with no chorus logic.
//!
//! With `--target janus` the same viewers watch a Janus streaming mountpoint instead
//! ([`janus`]), fed the same speakers as plain RTP ([`feed`]); [`janus_config`] writes that
//! Janus's configuration.
//!
//! Layout: [`signal`] (director + WebSocket), [`peer`] (str0m client offers and answers),
//! [`engine`] (the epoll threads that own the peers), [`counter`] (loss from clear RTP headers),
//! [`matcher`] (payload → send time, talk spurts), [`report`] (step JSON), [`floor`],
//! [`procfs`] (CPU and memory figures); sockets are [`crate::net`]'s.

pub(crate) mod counter;
pub mod engine;
pub(crate) mod feed;
pub mod floor;
pub(crate) mod janus;
pub mod janus_config;
pub(crate) mod matcher;
pub(crate) mod peer;
pub(crate) mod procfs;
pub(crate) mod report;
pub(crate) mod signal;
pub(crate) mod srtp_in;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{info, warn};

use crate::media::opus;
use crate::net::sockopt;
use crate::replay::{corpus, truth};
use engine::{EngineCmd, EngineConfig, EngineHandle, Frame, NewPeer};
use feed::PlainFeed;
use janus::JanusViewer;
use matcher::Matcher;
use peer::ClientCrypto;
use report::{Joins, Snapshot, StepInput};
use signal::{HttpBase, Signalling};

/// How often (ms) a viewer's sockets are read by default. A viewer gets about 57 packets/s (the
/// one or two tracks that carry a talker): at 5 ms each `recvmmsg` (and its epoll event) brought
/// 1.1 packets, a syscall per packet; reading less often lets several share one. But on loopback
/// the datagrams a viewer has not read yet are the edge's: its kernel allocated them, and at
/// 100 ms about 6 MB of them sat in a thousand receive queues before the other core freed them.
/// At 20 ms (about 1.1 MB) the edge spent 5-12 % less CPU per forwarded packet (steady 1000
/// viewers, three pairs: 2991 / 3075 / 3185 ns against 3305 / 3559 / 3341; 5 ms: 3088 / 3118),
/// its slab allocator's slow path fell by a third in a profile, and the generator's viewer
/// threads spent 2.3 instead of 1.8 µs per packet (its core still 82 % idle). A real viewer's
/// queue is on its own machine, and the floor's receiver drains at once, so the shorter wait
/// measures the edge more truly. Latency is unaffected (kernel receive timestamps), and ICE
/// consent and RTCP answered up to 20 ms later are harmless. Peers still connecting are read
/// every 1 ms, so join times measure the server.
pub const DEFAULT_POLL_MS: f64 = 20.0;

/// The server the viewers watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Target {
    /// chorus: publishers and viewers through its director and signalling.
    #[default]
    Chorus,
    /// A Janus streaming mountpoint; `url` is Janus's WebSocket API.
    Janus {
        /// The mountpoint's id.
        mountpoint: u64,
        /// Speaker i is sent as plain RTP to `rtp[i]`, the port of the mountpoint's stream i.
        rtp: Vec<SocketAddr>,
    },
}

/// What a load run does (`chorus loadgen`'s flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// The director (and signalling) chorus answers at, e.g. http://127.0.0.1:8080; with
    /// [`Target::Janus`], Janus's WebSocket API (ws://...).
    pub url: String,
    /// chorus or Janus.
    pub target: Target,
    /// Where viewers ask for their signalling URL (default: `url`).
    pub view_url: Option<String>,
    /// The stream published and viewed.
    pub stream: String,
    /// Bearer token for the publish director, when the server needs one.
    pub publish_token: Option<String>,
    /// Bearer token for the subscribe director, when the stream needs one.
    pub subscribe_token: Option<String>,
    /// Directory of `<id>.opus` and `<id>.levels` files (see [`crate::replay::corpus`]).
    pub corpus: PathBuf,
    /// Corpus speakers to publish, in order (default: all, sorted).
    pub sources: Vec<String>,
    /// How many publishers (default: one per chosen speaker). More than speakers reuses them.
    pub publishers: Option<usize>,
    /// Multiplexed tracks per viewer (1 to 16).
    pub tracks: usize,
    /// Viewers of the first step.
    pub start: usize,
    /// Viewers added per step.
    pub step: usize,
    /// Length of each step's steady part (s), measured after its joins complete.
    pub step_secs: f64,
    /// The ramp stops at this many viewers.
    pub max_viewers: usize,
    /// Hard stop: the run ends within this many seconds.
    pub duration: f64,
    /// Joins in flight at once (director request to ICE + DTLS connected).
    pub join_concurrency: usize,
    /// Seconds a join may take before it counts as failed.
    pub join_timeout: f64,
    /// Every n-th viewer decrypts to measure latency (0: none).
    pub sample_every: usize,
    /// Threads owning the viewers (the publishers get one more).
    pub threads: usize,
    /// The process forwarding to viewers: its CPU and memory are read from /proc at each step.
    pub edge_pid: Option<u32>,
    /// The origin, when it shares the generator's core: its CPU is reported beside ours.
    pub origin_pid: Option<u32>,
    /// IP the peers' UDP sockets bind.
    pub local_ip: IpAddr,
    /// Sockets are read at most this often (ms).
    pub poll_ms: f64,
    /// Sampled viewers open their SRTP themselves once DTLS is up ([`srtp_in`]) instead of
    /// handing every packet to str0m.
    pub lean_rx: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            url: "http://127.0.0.1:8080".into(),
            target: Target::Chorus,
            view_url: None,
            stream: "loadgen".into(),
            publish_token: None,
            subscribe_token: None,
            corpus: PathBuf::from("tests/corpus/panel"),
            sources: vec![],
            publishers: None,
            tracks: 3,
            start: 10,
            step: 10,
            step_secs: 10.0,
            max_viewers: 100,
            duration: 120.0,
            join_concurrency: 50,
            join_timeout: 10.0,
            sample_every: 20,
            threads: 1,
            edge_pid: None,
            origin_pid: None,
            local_ip: IpAddr::from([127, 0, 0, 1]),
            poll_ms: DEFAULT_POLL_MS,
            lean_rx: true,
        }
    }
}

/// A publisher: which corpus frames it loops and under which sourceId.
struct Publication {
    source_id: String,
    frames: Vec<Frame>,
}

fn publications(opts: &Options) -> Result<Vec<Publication>, String> {
    let speakers = corpus::load(&opts.corpus).map_err(|e| format!("corpus: {e}"))?;
    let chosen: Vec<&corpus::Speaker> = if opts.sources.is_empty() {
        speakers.iter().collect()
    } else {
        opts.sources
            .iter()
            .map(|name| {
                speakers.iter().find(|s| &s.id == name).ok_or_else(|| {
                    let ids: Vec<&str> = speakers.iter().map(|s| s.id.as_str()).collect();
                    format!(
                        "no speaker {name:?} in {} (it has {ids:?})",
                        opts.corpus.display()
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    // A Janus mountpoint has one stream per track, each fed one speaker.
    let k = match &opts.target {
        Target::Janus { rtp, .. } => rtp.len(),
        Target::Chorus => opts.publishers.unwrap_or(chosen.len()),
    };
    if k == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let sp = chosen[i % chosen.len()];
        let round = i / chosen.len();
        let source_id = if round == 0 {
            sp.id.clone()
        } else {
            format!("{}-{round}", sp.id)
        };
        let levels = sp.levels.as_deref();
        let spurts = levels.map(matcher::spurt_starts);
        let limit = levels
            .and_then(truth::mode)
            .and_then(|m| m.checked_sub(truth::VOICED_DB));
        let frames = sp
            .packets
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.is_empty())
            .map(|(k, p)| {
                let level = levels.and_then(|l| l.get(k)).copied();
                Frame {
                    payload: Arc::from(p.as_slice()),
                    level,
                    voiced: matches!((level, limit), (Some(l), Some(m)) if l <= m),
                    spurt: spurts
                        .as_ref()
                        .and_then(|s| s.get(k))
                        .copied()
                        .unwrap_or(false),
                    samples: opus::packet_info(p).map_or(960, |i| i.samples),
                }
            })
            .collect();
        out.push(Publication { source_id, frames });
    }
    Ok(out)
}

fn check(opts: &Options) -> Result<(), String> {
    if !(1..=16).contains(&opts.tracks) {
        return Err("--tracks must be 1 to 16".into());
    }
    if opts.threads == 0 || opts.threads > 64 {
        return Err("--threads must be 1 to 64".into());
    }
    if opts.start == 0 || opts.max_viewers == 0 {
        return Err("--start and --max-viewers must be at least 1".into());
    }
    if opts.join_concurrency == 0 {
        return Err("--join-concurrency must be at least 1".into());
    }
    let week = 7.0 * 86_400.0;
    for (name, v) in [
        ("--duration", opts.duration),
        ("--step-secs", opts.step_secs),
        ("--join-timeout", opts.join_timeout),
    ] {
        if !(v > 0.0 && v <= week) {
            return Err(format!(
                "{name} must be a positive number of seconds, up to a week"
            ));
        }
    }
    if !(0.0..=100.0).contains(&opts.poll_ms) {
        return Err("--poll-ms must be 0 to 100".into());
    }
    if let Target::Janus { rtp, .. } = &opts.target {
        if !opts.url.starts_with("ws://") {
            return Err(format!(
                "--target janus: --url must be Janus's WebSocket API (ws://...), got {:?}",
                opts.url
            ));
        }
        if rtp.len() != opts.tracks {
            return Err(format!(
                "--target janus: {} RTP ports (--janus-rtp) for {} tracks: the mountpoint needs                  one stream per track",
                rtp.len(),
                opts.tracks
            ));
        }
    }
    Ok(())
}

/// What every join task needs.
struct Ctx {
    /// chorus's directors (None against Janus).
    publish_base: Option<HttpBase>,
    view_base: Option<HttpBase>,
    opts: Options,
    crypto: ClientCrypto,
    engines: Vec<EngineHandle>,
    source_ids: Vec<String>,
    http_timeout: Duration,
    join_timeout: Duration,
    /// Published frames whose payload is not unique (not matched to a send time).
    ambiguous: usize,
}

/// Runs the ramp and prints its report lines on stdout. Errors only when the run cannot start
/// (bad options, corpus, publishers refused); a run that starts ends with its report.
pub fn run(opts: Options) -> Result<(), String> {
    let started = Instant::now();
    check(&opts)?;
    let hard_deadline = started + Duration::from_secs_f64(opts.duration);
    // Room to stop the threads, close the sockets and print the summary.
    let margin = Duration::from_secs_f64((opts.duration * 0.05).clamp(0.3, 2.0));
    let deadline = hard_deadline - margin;
    let pubs = publications(&opts)?;
    let frames: Vec<Vec<Arc<[u8]>>> = pubs
        .iter()
        .map(|p| p.frames.iter().map(|f| f.payload.clone()).collect())
        .collect();
    let matcher = Arc::new(Matcher::new(&frames));
    let total: usize = frames.iter().map(Vec::len).sum();
    info!(
        publishers = pubs.len(),
        frames = total,
        ambiguous = matcher.ambiguous,
        "corpus loaded"
    );
    let need = (pubs.len() + opts.max_viewers) * 2 + 64;
    let limit = sockopt::raise_nofile();
    if (limit as usize) < need {
        return Err(format!(
            "{} viewers need about {need} open files (a UDP socket and a WebSocket each); \
             the limit is {limit}: raise it with ulimit -n",
            opts.max_viewers
        ));
    }
    let (publish_base, view_base) = match opts.target {
        Target::Chorus => (
            Some(HttpBase::parse(&opts.url)?),
            Some(HttpBase::parse(
                opts.view_url.as_deref().unwrap_or(&opts.url),
            )?),
        ),
        Target::Janus { .. } => (None, None),
    };
    let sources: Arc<Vec<Vec<Frame>>> = Arc::new(pubs.iter().map(|p| p.frames.clone()).collect());
    let mut engines = Vec::new();
    // The viewers' threads, then one for the publishers: their 20 ms clock keeps its pace
    // however busy the viewers get.
    for id in 0..=opts.threads {
        let h = engine::spawn(EngineConfig {
            id,
            sources: sources.clone(),
            matcher: matcher.clone(),
            deadline: hard_deadline,
            poll: Duration::from_secs_f64(if id == opts.threads {
                opts.poll_ms.min(1.0) / 1000.0
            } else {
                opts.poll_ms / 1000.0
            }),
            join_timeout: Duration::from_secs_f64(opts.join_timeout),
        })
        .map_err(|e| format!("cannot start a load generator thread: {e}"))?;
        engines.push(h);
    }
    let ctx = Arc::new(Ctx {
        publish_base,
        view_base,
        crypto: ClientCrypto::new()?,
        engines,
        source_ids: pubs.iter().map(|p| p.source_id.clone()).collect(),
        http_timeout: Duration::from_secs(10),
        join_timeout: Duration::from_secs_f64(opts.join_timeout),
        ambiguous: matcher.ambiguous,
        opts,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = rt.block_on(ramp(ctx.clone(), started, deadline));
    // Dropping the runtime closes every signalling socket: the server removes those viewers.
    rt.shutdown_timeout(Duration::from_millis(100));
    let mut ctx = Arc::try_unwrap(ctx).map_err(|_| "join tasks still hold the run".to_owned())?;
    for e in &mut ctx.engines {
        e.stop();
    }
    let summary = result?;
    emit(&json!({ "summary": summary }));
    Ok(())
}

/// One report line on stdout (a closed stdout is not worth a panic).
fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// A join's outcome, sent back to the ramp.
struct JoinResult {
    outcome: Result<Duration, String>,
    ended: Instant,
}

/// Which side of the signalling a peer joins.
enum Side {
    Publisher { source: usize },
    Viewer { index: usize },
}

/// What a joined viewer keeps open while it lives: its signalling socket.
enum Session {
    Chorus(Signalling),
    Janus(JanusViewer),
}

impl Session {
    async fn drain(self) -> String {
        match self {
            Session::Chorus(s) => s.drain().await,
            Session::Janus(j) => j.drain().await,
        }
    }
}

/// One peer's join, as the SDK does it: director request, offer, `publish` or `view` on the
/// signalling socket, answer; then the peer goes to its thread and this waits for ICE + DTLS.
/// Returns the signalling session (kept open while the peer lives) and the join time.
async fn join(ctx: &Ctx, side: Side, started: Instant) -> Result<(Signalling, Duration), String> {
    let o = &ctx.opts;
    let (base, kind, body, bearer) = match side {
        Side::Publisher { .. } => (
            &ctx.publish_base,
            "publish",
            json!({"streamName": o.stream, "streamType": "WebRtc"}),
            o.publish_token.as_deref(),
        ),
        Side::Viewer { .. } => (
            &ctx.view_base,
            "subscribe",
            json!({"streamName": o.stream, "streamAccountId": "chorus"}),
            o.subscribe_token.as_deref(),
        ),
    };
    let base = base.as_ref().ok_or("no chorus director to join through")?;
    let grant = signal::director(base, kind, &body, bearer, ctx.http_timeout).await?;
    let socket = sockopt::udp_socket(o.local_ip).map_err(|e| format!("UDP socket: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let (offer, name, data, label, engine, keys) = match side {
        Side::Publisher { source } => {
            let offer = peer::publisher_offer(&ctx.crypto, local)?;
            let data = json!({"name": o.stream, "sdp": offer.sdp, "codec": "opus",
                              "sourceId": ctx.source_ids[source]});
            let label = format!("publisher {}", ctx.source_ids[source]);
            (offer, "publish", data, label, ctx.opts.threads, None)
        }
        Side::Viewer { index } => {
            let (sampled, excluded) = viewer_role(o, ctx.source_ids.len(), index);
            if sampled {
                sockopt::enable_rx_timestamps(&socket)
                    .map_err(|e| format!("SO_TIMESTAMPNS: {e}"))?;
            }
            let keys = Some(Arc::default());
            let offer = peer::viewer_offer(&ctx.crypto, local, o.tracks, keys.clone())?;
            let data = json!({
                "streamId": o.stream,
                "sdp": offer.sdp,
                "pinnedSourceId": null,
                "excludedSourceIds": [ctx.source_ids[excluded]],
                "events": ["active", "inactive", "vad", "layers", "viewercount"],
            });
            (
                offer,
                "view",
                data,
                format!("viewer {index}"),
                index % o.threads,
                keys,
            )
        }
    };
    let mut sig = Signalling::connect(&grant, ctx.http_timeout).await?;
    let answer = sig.command(name, data, ctx.http_timeout).await?;
    let sdp = answer["sdp"]
        .as_str()
        .ok_or_else(|| format!("{name} response without data.sdp: {answer}"))?;
    let (rtc, mids) = peer::accept(offer, sdp)?;
    let (tx, rx) = oneshot::channel();
    let peer = Box::new(NewPeer {
        socket,
        rtc,
        mids,
        started,
        done: Some(tx),
        label,
        keys,
    });
    let cmd = match side {
        Side::Publisher { source } => EngineCmd::Publisher { peer, source },
        Side::Viewer { index } => {
            let (sampled, excluded) = viewer_role(o, ctx.source_ids.len(), index);
            EngineCmd::Viewer {
                peer,
                sampled,
                lean: o.lean_rx,
                excluded: Some(excluded),
            }
        }
    };
    let took = connected(ctx, engine, cmd, rx, started).await?;
    Ok((sig, took))
}

/// Hands a peer to its thread and waits until ICE + DTLS are up: the join time.
async fn connected(
    ctx: &Ctx,
    engine: usize,
    cmd: EngineCmd,
    rx: oneshot::Receiver<Result<Instant, String>>,
    started: Instant,
) -> Result<Duration, String> {
    ctx.engines[engine].send(cmd);
    let at = match tokio::time::timeout(ctx.join_timeout + Duration::from_secs(1), rx).await {
        Ok(Ok(r)) => r?,
        Ok(Err(_)) => return Err("the load generator thread ended".into()),
        Err(_) => {
            return Err(format!(
                "ICE + DTLS did not complete within {:?}",
                ctx.join_timeout
            ))
        }
    };
    Ok(at.duration_since(started))
}

/// A viewer of a Janus mountpoint, as janus.js joins one: open the API socket, create a
/// session, attach the streaming plugin, `watch` (Janus offers), answer and `start`; then
/// ICE + DTLS as against chorus. It excludes no source: Janus forwards every stream.
async fn join_janus(
    ctx: &Ctx,
    index: usize,
    mountpoint: u64,
    started: Instant,
) -> Result<(JanusViewer, Duration), String> {
    let o = &ctx.opts;
    let (sampled, _) = viewer_role(o, ctx.source_ids.len(), index);
    let socket = sockopt::udp_socket(o.local_ip).map_err(|e| format!("UDP socket: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    if sampled {
        sockopt::enable_rx_timestamps(&socket).map_err(|e| format!("SO_TIMESTAMPNS: {e}"))?;
    }
    let mut jv = JanusViewer::open(&o.url, ctx.http_timeout).await?;
    let offer = jv.watch(mountpoint, o.tracks, ctx.http_timeout).await?;
    let keys = Some(Arc::default());
    let (rtc, answer) = peer::viewer_answer(&ctx.crypto, local, &offer, keys.clone())?;
    jv.start(&answer, ctx.http_timeout).await?;
    let (tx, rx) = oneshot::channel();
    let peer = Box::new(NewPeer {
        socket,
        rtc,
        mids: Vec::new(),
        started,
        done: Some(tx),
        label: format!("janus viewer {index}"),
        keys,
    });
    let cmd = EngineCmd::Viewer {
        peer,
        sampled,
        lean: o.lean_rx,
        excluded: None,
    };
    let took = connected(ctx, index % o.threads, cmd, rx, started).await?;
    Ok((jv, took))
}

async fn join_viewer(
    ctx: &Ctx,
    index: usize,
    started: Instant,
) -> Result<(Session, Duration), String> {
    match &ctx.opts.target {
        Target::Chorus => join(ctx, Side::Viewer { index }, started)
            .await
            .map(|(s, d)| (Session::Chorus(s), d)),
        Target::Janus { mountpoint, .. } => join_janus(ctx, index, *mountpoint, started)
            .await
            .map(|(j, d)| (Session::Janus(j), d)),
    }
}

/// Viewer `i`: (decrypts to measure latency, index of the source it excludes). "Its own
/// voice" goes round robin over the sources; sampled viewers rotate among themselves so that
/// they do not all exclude the same source when the sampling period and the number of sources
/// share a factor.
fn viewer_role(o: &Options, sources: usize, i: usize) -> (bool, usize) {
    let sampled = o.sample_every > 0 && i.is_multiple_of(o.sample_every);
    let excluded = if sampled {
        (i / o.sample_every) % sources
    } else {
        i % sources
    };
    (sampled, excluded)
}

fn spawn_viewer(
    ctx: Arc<Ctx>,
    i: usize,
    sem: Arc<Semaphore>,
    results: mpsc::UnboundedSender<JoinResult>,
) {
    tokio::spawn(async move {
        let Ok(permit) = sem.acquire_owned().await else {
            return;
        };
        let started = Instant::now();
        match join_viewer(&ctx, i, started).await {
            Ok((sig, took)) => {
                drop(permit);
                let _ = results.send(JoinResult {
                    outcome: Ok(took),
                    ended: Instant::now(),
                });
                let why = sig.drain().await;
                warn!(viewer = i, "signalling {why}");
            }
            Err(e) => {
                drop(permit);
                let _ = results.send(JoinResult {
                    outcome: Err(e),
                    ended: Instant::now(),
                });
            }
        }
    });
}

/// Error messages carry addresses and ids; the report groups them by their gist.
fn error_kind(e: &str) -> String {
    let mut s: String = e.chars().take(160).collect();
    if let Some(i) = s.find(" peer-") {
        s.truncate(i);
    }
    s
}

async fn ramp(ctx: Arc<Ctx>, started: Instant, deadline: Instant) -> Result<Value, String> {
    let o = ctx.opts.clone();
    let tdeadline = tokio::time::Instant::from_std(deadline);
    // Publishers first, all connected before the common start; against Janus, the speakers'
    // plain RTP feeds.
    if let Target::Janus { rtp, .. } = &o.target {
        start_feeds(&ctx, rtp)?;
    }
    let mut pub_tasks = Vec::new();
    let publishers = match o.target {
        Target::Chorus => ctx.source_ids.len(),
        Target::Janus { .. } => 0,
    };
    for p in 0..publishers {
        let ctx = ctx.clone();
        pub_tasks.push(tokio::spawn(async move {
            join(&ctx, Side::Publisher { source: p }, Instant::now()).await
        }));
    }
    let mut sessions = Vec::new();
    for (p, t) in pub_tasks.into_iter().enumerate() {
        let r = tokio::time::timeout_at(tdeadline, t)
            .await
            .map_err(|_| "the run ended before the publishers connected".to_owned())?
            .map_err(|e| format!("publisher task failed: {e}"))?;
        match r {
            Ok((s, _)) => sessions.push(s),
            Err(e) => return Err(format!("publisher {}: {e}", ctx.source_ids[p])),
        }
    }
    for s in sessions {
        tokio::spawn(async move {
            let why = s.drain().await;
            warn!("publisher signalling {why}");
        });
    }
    let t0 = Instant::now() + Duration::from_millis(50);
    for e in &ctx.engines {
        e.send(EngineCmd::Start(t0));
    }
    info!(
        publishers = ctx.source_ids.len(),
        secs = started.elapsed().as_secs_f64(),
        "publishers connected and sending"
    );
    let corpus_ms =
        |at: Option<Instant>| at.map_or(0, |a| a.saturating_duration_since(t0).as_millis() as u64);

    let sem = Arc::new(Semaphore::new(o.join_concurrency));
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<JoinResult>();
    let mut joined = 0usize;
    let mut target = o.start.min(o.max_viewers);
    let mut all_joins = Joins::default();
    let mut all_samples = engine::Samples::default();
    let mut steps = 0usize;
    let mut first_rss: Option<(usize, u64)> = None;
    let mut last_rss: Option<(usize, u64)> = None;
    let mut stopped_by = "done";
    let pids = report::Pids {
        edge: o.edge_pid,
        origin: o.origin_pid,
    };
    let run_a = Snapshot::take(&ctx.engines, pids);
    let mut run_b = run_a.clone();
    for step in 0.. {
        // Joins of this step.
        let join_start = Instant::now();
        let mut joins = Joins {
            attempted: target - joined,
            ..Joins::default()
        };
        for i in joined..target {
            spawn_viewer(ctx.clone(), i, sem.clone(), res_tx.clone());
        }
        let mut pending = target - joined;
        let mut out_of_time = false;
        while pending > 0 {
            match tokio::time::timeout_at(tdeadline, res_rx.recv()).await {
                Ok(Some(r)) => {
                    pending -= 1;
                    joins.span = r.ended.duration_since(join_start);
                    match r.outcome {
                        Ok(d) => joins.times.push(d),
                        Err(e) => *joins.errors.entry(error_kind(&e)).or_default() += 1,
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    out_of_time = true;
                    break;
                }
            }
        }
        joined = target;
        if !joins.errors.is_empty() {
            warn!(step, errors = ?joins.errors, "some viewers did not join");
        }
        // The steady part: from the end of the joins to the end of the step.
        let a = Snapshot::take(&ctx.engines, pids);
        drop(report::take_samples(&ctx.engines));
        let end = (Instant::now() + Duration::from_secs_f64(o.step_secs)).min(deadline);
        if !out_of_time {
            tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
        }
        let b = Snapshot::take(&ctx.engines, pids);
        let samples = report::take_samples(&ctx.engines);
        all_samples
            .latency_us
            .extend_from_slice(&samples.latency_us);
        all_samples
            .preroll_us
            .extend_from_slice(&samples.preroll_us);
        all_samples.switch_us.extend_from_slice(&samples.switch_us);
        let partial = out_of_time || end >= deadline;
        let line = report::step_json(StepInput {
            step,
            viewers: target,
            a: &a,
            b: &b,
            samples,
            joins: &joins,
            corpus_ms: (corpus_ms(a.at), corpus_ms(b.at)),
            partial,
        });
        emit(&line);
        steps += 1;
        if let Some(r) = b.edge_rss_kib {
            let c = b.connected as usize;
            first_rss.get_or_insert((c, r));
            last_rss = Some((c, r));
        }
        all_joins.attempted += joins.attempted;
        all_joins.times.extend(joins.times.iter().copied());
        for (k, v) in joins.errors {
            *all_joins.errors.entry(k).or_default() += v;
        }
        all_joins.span += joins.span;
        run_b = b;
        if partial {
            stopped_by = "duration";
            break;
        }
        if target >= o.max_viewers || o.step == 0 {
            break;
        }
        target = (target + o.step).min(o.max_viewers);
    }
    let end = Snapshot::take(&ctx.engines, pids);
    let received = run_b.received - run_a.received;
    let expected = run_b.expected - run_a.expected;
    let mut sum = serde_json::Map::new();
    sum.insert(
        "target".into(),
        json!(match o.target {
            Target::Chorus => "chorus",
            Target::Janus { .. } => "janus",
        }),
    );
    sum.insert("steps".into(), json!(steps));
    sum.insert("viewers".into(), json!(joined));
    sum.insert("connected".into(), json!(end.connected));
    sum.insert("publishers".into(), json!(ctx.source_ids.len()));
    sum.insert("tracks".into(), json!(o.tracks));
    sum.insert(
        "secs".into(),
        json!((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
    );
    sum.insert("stopped_by".into(), json!(stopped_by));
    sum.insert("received".into(), json!(received));
    sum.insert(
        "loss_pct".into(),
        json!((expected > 0).then(|| {
            let lost = expected.saturating_sub(received) as f64;
            (100.0 * lost / expected as f64 * 1e4).round() / 1e4
        })),
    );
    report::percentiles(
        &mut sum,
        "lat",
        &mut all_samples.latency_us,
        &[50.0, 95.0, 99.0, 100.0],
    );
    report::percentiles(
        &mut sum,
        "preroll_lat",
        &mut all_samples.preroll_us,
        &[50.0, 100.0],
    );
    report::percentiles(
        &mut sum,
        "switch",
        &mut all_samples.switch_us,
        &[50.0, 95.0, 100.0],
    );
    let mut jt: Vec<u64> = all_joins
        .times
        .iter()
        .map(|d| d.as_micros() as u64)
        .collect();
    jt.sort_unstable();
    sum.insert("joins".into(), json!(jt.len()));
    sum.insert("join_failures".into(), json!(all_joins.failures()));
    let span = all_joins.span.as_secs_f64();
    sum.insert(
        "joins_per_s".into(),
        json!((span > 0.0).then(|| (jt.len() as f64 / span * 10.0).round() / 10.0)),
    );
    for (k, p) in [("join_p50_ms", 50.0), ("join_p99_ms", 99.0)] {
        sum.insert(
            k.into(),
            truth::percentile(&jt, p)
                .map_or(Value::Null, |us| report::join_ms(Duration::from_micros(us))),
        );
    }
    if !all_joins.errors.is_empty() {
        sum.insert("join_errors".into(), json!(all_joins.errors));
    }
    if let (Some((c0, r0)), Some((c1, r1))) = (first_rss, last_rss) {
        if c1 > c0 {
            sum.insert(
                "edge_kib_per_viewer".into(),
                json!(((r1 as f64 - r0 as f64) / (c1 - c0) as f64 * 10.0).round() / 10.0),
            );
        }
    }
    sum.insert(
        "edge_cpu_s".into(),
        json!(report_sub(run_a.edge_cpu_s, end.edge_cpu_s)),
    );
    sum.insert("edge_rss_kib".into(), json!(end.edge_rss_kib));
    sum.insert(
        "loadgen_cpu_s".into(),
        json!((end.self_cpu_s * 1000.0).round() / 1000.0),
    );
    sum.insert(
        "origin_cpu_s".into(),
        json!(report_sub(run_a.origin_cpu_s, end.origin_cpu_s)),
    );
    sum.insert("published".into(), json!(end.published - run_a.published));
    sum.insert("excluded_received".into(), json!(end.excluded_received));
    sum.insert("viewer_ssrcs".into(), json!(end.viewer_ssrcs));
    sum.insert("srtp_profiles".into(), json!(end.profiles));
    sum.insert("dropped_viewers".into(), json!(end.dropped));
    sum.insert("loadgen_rss_kib".into(), json!(procfs::rss_kib(None).ok()));
    sum.insert("ambiguous_frames".into(), json!(ctx.ambiguous));
    Ok(Value::Object(sum))
}

/// Speaker i as plain RTP to `rtp[i]`, on the publishers' thread (one socket for all).
fn start_feeds(ctx: &Ctx, rtp: &[SocketAddr]) -> Result<(), String> {
    let socket = sockopt::udp_socket(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        .map_err(|e| format!("UDP socket for the RTP feed: {e}"))?;
    for (i, dest) in rtp.iter().enumerate() {
        let s = socket
            .try_clone()
            .map_err(|e| format!("UDP socket for the RTP feed: {e}"))?;
        let f = PlainFeed::new(i, rtp.len(), s, *dest, janus_config::OPUS_PT, engine::FRAME);
        ctx.engines[ctx.opts.threads].send(EngineCmd::Feed(Box::new(f)));
    }
    Ok(())
}

fn report_sub(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(((b? - a?) * 1000.0).round() / 1000.0)
}
