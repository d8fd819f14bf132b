//! Edge side of the relay: one QUIC connection to the origin, reference-counted stream
//! subscriptions (subscribe on the first viewer, unsubscribe after the last).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::proto::{
    encode_frame, DatagramHeader, EdgeMsg, FrameReader, LinkDelay, OriginMsg, SourceInfo,
};
use crate::auth::jwt::{JwtVerifier, VerifyKey};

/// How long a viewer at an edge waits for the origin to authorize it before a 503.
pub(crate) const AUTHORIZE_DEADLINE: Duration = Duration::from_secs(5);
/// Authorize requests one link has in flight at most; more are refused at once (503).
pub(crate) const MAX_PENDING_AUTHORIZE: usize = 1024;

/// The origin's answer to an authorize request: a subscribe JWT, or (HTTP status, message).
pub(crate) type AuthorizeAnswer = Result<String, (u16, String)>;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<AuthorizeAnswer>>>>;

/// The QUIC handshake with the origin must finish within this, or the attempt is given up (and
/// retried by [`manage_link`]): an origin that is down must not hold a connect for quinn's idle
/// timeout.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The origin must answer `Hello` (with `Welcome` or `Refused`) within this after the handshake.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Control messages to the origin queued at most; a full queue means the origin stopped reading
/// the control stream, and the link is closed (and retried) rather than grown.
pub(crate) const CONTROL_QUEUE: usize = 256;
/// One control frame must be written within this, or the link is closed: a peer that stopped
/// reading must not hold the writer (and, through the bounded queue, everything else) forever.
pub(crate) const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests of the media threads to the link manager queued at most (subscriptions, keyframe
/// requests, talking reports); beyond it they are dropped, counted and logged.
pub(crate) const LINK_REQUEST_QUEUE: usize = 4096;
/// A link that keeps sending malformed datagrams is logged at most this often (each is counted).
pub(crate) const MALFORMED_LOG_EVERY: Duration = Duration::from_secs(10);
/// Relink attempts start this soon after a loss and back off to at most [`RELINK_BACKOFF_MAX`].
pub(crate) const RELINK_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub(crate) const RELINK_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why the link to the origin could not be made (or was lost).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The client endpoint or its TLS configuration could not be made.
    #[error("cannot set up the QUIC endpoint: {0}")]
    Endpoint(String),
    /// The QUIC connection failed (no answer, or a certificate that is not the pinned one).
    #[error("cannot reach origin {origin}: {reason}")]
    Unreachable {
        /// The origin's relay address.
        origin: SocketAddr,
        /// What quinn said.
        reason: String,
    },
    /// The QUIC handshake took longer than `CONNECT_TIMEOUT`.
    #[error("origin {0} did not complete the QUIC handshake within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(SocketAddr),
    /// No `Welcome` or `Refused` within `HELLO_TIMEOUT` of the handshake.
    #[error("origin {0} did not answer hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout(SocketAddr),
    /// The origin answered `Refused` (its reason).
    #[error("origin refused this edge: {0}")]
    Refused(String),
    /// The control stream broke, or brought something else, before `Welcome` (what).
    #[error("origin link failed during hello: {0}")]
    Hello(String),
    /// The `Welcome` key is not an Ed25519 public key.
    #[error("origin sent a bad JWT key: {0}")]
    BadKey(String),
}

impl From<LinkError> for String {
    fn from(e: LinkError) -> String {
        e.to_string()
    }
}

/// What an edge does with what the origin sends. Called from the link's tasks.
pub trait LinkHandler: Send + Sync + 'static {
    /// A subscribed stream's full source list, and the channel its datagrams carry.
    fn on_sources(&self, stream: &str, channel: u32, sources: &[SourceInfo]);
    /// `datagram` is the whole datagram; the RTP packet starts at [`DATAGRAM_HEADER`]. `queued`
    /// is how long it queued on the link before it was read (from its send stamp, see
    /// [`LinkDelay`]).
    fn on_datagram(&self, hdr: DatagramHeader, datagram: bytes::Bytes, queued: Duration);
    /// The link is closed (the reason, for the log); `manage_link` relinks.
    fn on_closed(&self, reason: &str);
    /// A room member was removed at the origin: end its views here.
    fn on_revoke(&self, _room: &str, _member: &str) {}
    /// A datagram without a valid relay header arrived (counted, dropped).
    fn on_malformed(&self) {}
    /// The link to the origin is gone: every channel and source index it announced is void.
    /// [`manage_link`] calls this before it relinks, so it comes before anything of the next link.
    fn on_link_down(&self) {}
}

/// An edge's QUIC connection to the origin: its control stream, its datagrams and the streams
/// it subscribed to (reference-counted).
pub struct EdgeLink {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    ctl: mpsc::Sender<EdgeMsg>,
    refs: Mutex<HashMap<String, usize>>,
    /// The origin's JWT verify key, from its `Welcome`.
    pub verify_key: VerifyKey,
    /// Authorize requests waiting for the origin's answer.
    pending: Pending,
    next_request: AtomicU64,
}

/// Where and how an edge links to its origin.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The origin's relay (QUIC) address.
    pub origin: SocketAddr,
    /// Hex SHA-256 of the origin's certificate; None = accept any (logged).
    pub fingerprint: Option<String>,
    /// Sent in `Hello` (`--cluster-token`); None = the origin wants none.
    pub cluster_token: Option<String>,
    /// This edge's signalling URL, announced so the origin's director can send viewers here.
    pub ws_url: Option<String>,
}

impl EdgeLink {
    /// Connects, says `Hello` and waits for `Welcome`; the link's tasks then feed `handler`.
    pub async fn connect(
        cfg: &LinkConfig,
        handler: Arc<dyn LinkHandler>,
    ) -> Result<Arc<EdgeLink>, LinkError> {
        if cfg.fingerprint.is_none() {
            warn!(origin = %cfg.origin, "origin certificate not pinned: pass --origin-fingerprint outside a trusted network");
        }
        let bind: SocketAddr = if cfg.origin.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| LinkError::Endpoint(e.to_string()))?;
        endpoint.set_default_client_config(
            super::tls::client_config(cfg.fingerprint.clone())
                .map_err(|e| LinkError::Endpoint(e.to_string()))?,
        );
        let unreachable = |reason: String| LinkError::Unreachable {
            origin: cfg.origin,
            reason,
        };
        let connecting = endpoint
            .connect(cfg.origin, crate::auth::identity::CERT_SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(c) => c.map_err(|e| unreachable(e.to_string()))?,
            Err(_) => {
                endpoint.close(0u32.into(), b"connect timeout");
                return Err(LinkError::ConnectTimeout(cfg.origin));
            }
        };
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let hello = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&encode_frame(&EdgeMsg::Hello {
                token: cfg.cluster_token.clone(),
                ws_url: cfg.ws_url.clone(),
            }))
            .await
            .map_err(|e| e.to_string())?;
            let welcome = loop {
                if let Some(msg) = reader.next_msg::<OriginMsg>().map_err(|e| e.to_string())? {
                    match msg {
                        OriginMsg::Welcome { jwt_key, key_id } => break (jwt_key, key_id),
                        OriginMsg::Refused { reason } => return Ok(Err(reason)),
                        other => return Err(format!("origin sent {other:?} before welcome")),
                    }
                }
                match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
                    Some(n) => reader.push(&buf[..n]),
                    None => return Err("origin closed the link during hello".into()),
                }
            };
            Ok(Ok((send, recv, welcome)))
        };
        let (mut send, mut recv, (jwt_key, key_id)) =
            match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
                Ok(Ok(Ok(linked))) => linked,
                Ok(Ok(Err(reason))) => return Err(LinkError::Refused(reason)),
                Ok(Err(e)) => {
                    conn.close(1u32.into(), b"hello failed");
                    return Err(LinkError::Hello(e));
                }
                Err(_) => {
                    conn.close(1u32.into(), b"no welcome in time");
                    return Err(LinkError::HelloTimeout(cfg.origin));
                }
            };
        let verify_key = VerifyKey::from_base64(&jwt_key).map_err(|e| {
            conn.close(1u32.into(), b"bad JWT key");
            LinkError::BadKey(e.to_string())
        })?;
        if verify_key.kid != key_id {
            warn!(
                sent = key_id,
                computed = verify_key.kid,
                "origin's key id does not match its key"
            );
        }
        info!(origin = %cfg.origin, "linked to origin");
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<EdgeMsg>(CONTROL_QUEUE);
        let wconn = conn.clone();
        tokio::spawn(async move {
            while let Some(msg) = ctl_rx.recv().await {
                match tokio::time::timeout(
                    CONTROL_WRITE_TIMEOUT,
                    send.write_all(&encode_frame(&msg)),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        warn!("origin did not take a control frame within {CONTROL_WRITE_TIMEOUT:?}: closing the link");
                        wconn.close(2u32.into(), b"control stream stalled");
                        break;
                    }
                }
            }
        });
        let h = handler.clone();
        let rconn = conn.clone();
        let pending: Pending = Arc::default();
        let answers = pending.clone();
        tokio::spawn(async move {
            let answer = |id: u64, a: AuthorizeAnswer| {
                let waiter = answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(w) = waiter {
                    let _ = w.send(a);
                }
            };
            let reason = loop {
                match reader.next_msg::<OriginMsg>() {
                    // A list still buffered when the link died is void: it must not follow the
                    // link-down its viewers were told of.
                    Ok(Some(OriginMsg::Sources { .. })) if rconn.close_reason().is_some() => {
                        break "origin link closed".into();
                    }
                    Ok(Some(OriginMsg::Sources {
                        stream,
                        channel,
                        sources,
                    })) => {
                        h.on_sources(&stream, channel, &sources);
                        continue;
                    }
                    Ok(Some(OriginMsg::Authorized { id, jwt })) => {
                        answer(id, Ok(jwt));
                        continue;
                    }
                    Ok(Some(OriginMsg::Unauthorized {
                        id,
                        status,
                        message,
                    })) => {
                        answer(id, Err((status, message)));
                        continue;
                    }
                    Ok(Some(OriginMsg::Revoke { room, member })) => {
                        h.on_revoke(&room, &member);
                        continue;
                    }
                    Ok(Some(other)) => {
                        debug!("ignoring {other:?}");
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => break e.to_string(),
                }
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => reader.push(&buf[..n]),
                    Ok(None) => break "origin closed the control stream".into(),
                    Err(e) => break e.to_string(),
                }
            };
            // Waiting viewers learn at once that no answer will come.
            answers.lock().unwrap_or_else(|p| p.into_inner()).clear();
            h.on_closed(&reason);
        });
        let dconn = conn.clone();
        tokio::spawn(async move {
            let mut malformed = 0u64;
            let mut logged: Option<std::time::Instant> = None;
            let mut delay = LinkDelay::default();
            let epoch = std::time::Instant::now();
            while let Ok(d) = dconn.read_datagram().await {
                match DatagramHeader::parse(&d).map(|(h, _)| h) {
                    Some(hdr) => {
                        let now_ms = epoch.elapsed().as_millis() as u64;
                        let queued = delay.age_ms(now_ms, hdr.sent_ms);
                        handler.on_datagram(hdr, d, Duration::from_millis(queued.into()))
                    }
                    None => {
                        handler.on_malformed();
                        malformed += 1;
                        // Counted in /metrics; logged at most every MALFORMED_LOG_EVERY.
                        if logged.is_none_or(|t| t.elapsed() >= MALFORMED_LOG_EVERY) {
                            logged = Some(std::time::Instant::now());
                            warn!(
                                malformed,
                                "malformed relay datagrams dropped (total on this link)"
                            );
                        }
                    }
                }
            }
        });
        Ok(Arc::new(EdgeLink {
            endpoint,
            conn,
            ctl: ctl_tx,
            refs: Mutex::new(HashMap::new()),
            verify_key,
            pending,
            next_request: AtomicU64::new(1),
        }))
    }

    /// Asks the origin whether a viewer with this bearer may view `stream`; the answer goes to
    /// `reply` (dropped unanswered when the link ends).
    pub(crate) fn authorize(
        &self,
        stream: String,
        token: Option<String>,
        reply: oneshot::Sender<AuthorizeAnswer>,
    ) {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() >= MAX_PENDING_AUTHORIZE {
                // Waiters that gave up (their deadline passed) free their place.
                p.retain(|_, w| !w.is_closed());
            }
            if p.len() >= MAX_PENDING_AUTHORIZE {
                let _ = reply.send(Err((
                    503,
                    format!("{MAX_PENDING_AUTHORIZE} viewers are already waiting for the origin: try again"),
                )));
                return;
            }
            p.insert(id, reply);
        }
        self.send_ctl(EdgeMsg::Authorize { id, stream, token });
    }

    /// Queues a control message; an origin that does not take them (full queue) is disconnected
    /// rather than buffered for, and [`manage_link`] relinks.
    fn send_ctl(&self, msg: EdgeMsg) {
        match self.ctl.try_send(msg) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                warn!(
                    queued = CONTROL_QUEUE,
                    "origin is not reading its control stream: closing the link"
                );
                self.conn.close(2u32.into(), b"control backlog");
            }
        }
    }

    /// A viewer of `stream` arrived: subscribes at the origin if it is the first.
    pub fn acquire(&self, stream: &str) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let n = refs.entry(stream.to_owned()).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.send_ctl(EdgeMsg::Subscribe {
                stream: stream.to_owned(),
            });
        }
    }

    /// A viewer left: unsubscribes after the last one.
    pub fn release(&self, stream: &str) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = refs.get_mut(stream) {
            *n -= 1;
            if *n == 0 {
                refs.remove(stream);
                self.send_ctl(EdgeMsg::Unsubscribe {
                    stream: stream.to_owned(),
                });
            }
        }
    }

    pub(crate) fn request_keyframe(&self, stream: &str, source: Option<String>) {
        self.send_ctl(EdgeMsg::Keyframe {
            stream: stream.to_owned(),
            source,
        });
    }

    pub(crate) fn talking(&self, stream: String, source: String, talking: bool) {
        self.send_ctl(EdgeMsg::Talking {
            stream,
            source,
            talking,
        });
    }

    /// Resolves when the connection to the origin is gone.
    pub(crate) async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Closes the link so the origin drops this edge's subscriptions at once rather than after
    /// the idle timeout.
    pub async fn close(&self) {
        // Give queued control messages (a last unsubscribe) a moment to leave.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        self.conn.close(0u32.into(), b"edge closing");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
    }
}

/// What an edge asks of its origin link.
#[derive(Debug)]
pub enum LinkRequest {
    /// A media thread has a first viewer of this stream: subscribe on the edge's first.
    Subscribe(String),
    /// A media thread's last viewer of this stream left: unsubscribe after the edge's last.
    Unsubscribe(String),
    /// A viewer asks for a keyframe of this source's video.
    Keyframe {
        /// The stream's name.
        stream: String,
        /// The source's id; None = the main source.
        source: Option<String>,
    },
    /// A source's voice activity flipped (see [`crate::edge::talking`]).
    Talking {
        /// The stream's name.
        stream: String,
        /// The source's id.
        source: String,
        /// True when it started talking, false when it stopped.
        talking: bool,
    },
    /// A viewer asks to view: the origin's policy answers (see [`EdgeLink::authorize`]).
    Authorize {
        /// The stream the viewer asks for.
        stream: String,
        /// The viewer's bearer token or JWT; None = none given.
        token: Option<String>,
        /// Where the origin's answer goes (dropped unanswered when the link fails or times out).
        reply: oneshot::Sender<AuthorizeAnswer>,
    },
}

/// Sends requests to the link manager; usable from any thread, never blocks.
#[derive(Clone)]
pub(crate) struct LinkCtl {
    tx: mpsc::Sender<LinkRequest>,
    dropped: Arc<AtomicU64>,
}

impl LinkCtl {
    pub(crate) fn send(&self, r: LinkRequest) {
        if let Err(TrySendError::Full(r)) = self.tx.try_send(r) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 1000 == 1 {
                warn!(dropped = n, request = ?r, "link manager queue full ({LINK_REQUEST_QUEUE}): request dropped");
            }
        }
    }

    /// The same requests, counting drops in `counter` (a /metrics counter).
    pub(crate) fn counting_drops_in(mut self, counter: Arc<AtomicU64>) -> LinkCtl {
        self.dropped = counter;
        self
    }

    /// A `LinkCtl` whose requests go to the returned queue instead of a link manager (a
    /// router of several, or a test).
    pub(crate) fn channel() -> (LinkCtl, mpsc::Receiver<LinkRequest>) {
        let (tx, rx) = mpsc::channel(LINK_REQUEST_QUEUE);
        let ctl = LinkCtl {
            tx,
            dropped: Arc::default(),
        };
        (ctl, rx)
    }

    /// The origin's answer for a viewer of `stream` with this bearer, within
    /// [`AUTHORIZE_DEADLINE`]; a 503 when the link is down or the origin is slow.
    pub(crate) async fn authorize(&self, stream: &str, token: Option<&str>) -> AuthorizeAnswer {
        let (reply, answer) = oneshot::channel();
        self.send(LinkRequest::Authorize {
            stream: stream.to_owned(),
            token: token.map(str::to_owned),
            reply,
        });
        match tokio::time::timeout(AUTHORIZE_DEADLINE, answer).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => Err((
                503,
                "this edge lost its origin link: try again shortly".into(),
            )),
            Err(_) => Err((
                503,
                format!(
                    "the origin did not answer within {}s: try again shortly",
                    AUTHORIZE_DEADLINE.as_secs()
                ),
            )),
        }
    }
}

/// Takes the verify key of a new `Welcome`, saying when it changed.
fn take_key(keys: &JwtVerifier, link: &EdgeLink) {
    let before = keys.key();
    if keys.set(&link.verify_key) {
        match before {
            Some(old) => info!(
                old = old.kid,
                new = link.verify_key.kid,
                "origin's JWT key changed: viewers' JWTs are checked with the new one"
            ),
            None => info!(kid = link.verify_key.kid, "origin's JWT key received"),
        }
    }
}

/// Keeps an edge linked to its origin: connects, re-subscribes what viewers want after a
/// reconnect, and retries with backoff while the origin is away. `keys` takes the origin's JWT
/// verify key from every `Welcome`. Returns once the first connection is up.
pub(crate) async fn manage_link(
    cfg: LinkConfig,
    handler: Arc<dyn LinkHandler>,
    keys: Arc<JwtVerifier>,
) -> Result<LinkCtl, LinkError> {
    let first = EdgeLink::connect(&cfg, handler.clone()).await?;
    take_key(&keys, &first);
    let (tx, mut rx) = mpsc::channel::<LinkRequest>(LINK_REQUEST_QUEUE);
    tokio::spawn(async move {
        let mut wants = Wants::default();
        let mut link = Some(first);
        let mut backoff = RELINK_BACKOFF_MIN;
        loop {
            let Some(l) = link.clone() else {
                // While the origin is away, requests still update what is wanted (so the queue
                // drains and the next link subscribes the right streams).
                let retry = tokio::time::sleep(backoff);
                tokio::pin!(retry);
                loop {
                    tokio::select! {
                        req = rx.recv() => match req {
                            Some(req) => wants.apply(req, None),
                            None => return,
                        },
                        _ = &mut retry => break,
                    }
                }
                match EdgeLink::connect(&cfg, handler.clone()).await {
                    Ok(l) => {
                        info!(origin = %cfg.origin, streams = wants.streams.len(), "relinked to origin");
                        take_key(&keys, &l);
                        for s in wants.streams.keys() {
                            l.acquire(s);
                        }
                        link = Some(l);
                        backoff = RELINK_BACKOFF_MIN;
                    }
                    Err(e) => {
                        warn!("origin link: {e}; retrying in {backoff:?}");
                        backoff = (backoff * 2).min(RELINK_BACKOFF_MAX);
                    }
                }
                continue;
            };
            tokio::select! {
                req = rx.recv() => match req {
                    Some(req) => wants.apply(req, Some(&l)),
                    None => {
                        // Nobody needs this link any more (an edge following stream owners
                        // dropped it): the origin forgets this edge's subscriptions at once.
                        info!(origin = %cfg.origin, "origin link no longer needed: closing it");
                        l.close().await;
                        return;
                    }
                },
                _ = l.closed() => {
                    let why = l.conn.close_reason().map(|r| r.to_string()).unwrap_or_default();
                    warn!(origin = %cfg.origin, streams = wants.streams.len(), "origin link lost: {why}; viewers are told their sources are inactive");
                    // Channels and source indices were the old link's: void them before the
                    // next link announces its own.
                    handler.on_link_down();
                    // The next origin knows nothing of who talks: reports start over.
                    wants.talking.clear();
                    link = None;
                }
            }
        }
    });
    Ok(LinkCtl {
        tx,
        dropped: Arc::default(),
    })
}

/// What the edge's media threads want of the origin. Several share the link: a stream is held at
/// the origin while any of them wants it, and a source talks while any of them says so.
#[derive(Default)]
struct Wants {
    streams: std::collections::BTreeMap<String, usize>,
    talking: std::collections::BTreeMap<(String, String), usize>,
}

impl Wants {
    /// Applies one request; tells the origin over `link` when the edge-wide answer changes.
    fn apply(&mut self, req: LinkRequest, link: Option<&EdgeLink>) {
        match req {
            LinkRequest::Subscribe(s) => {
                let n = self.streams.entry(s.clone()).or_default();
                *n += 1;
                if *n == 1 {
                    if let Some(l) = link {
                        l.acquire(&s);
                    }
                }
            }
            LinkRequest::Unsubscribe(s) => {
                if let Some(n) = self.streams.get_mut(&s) {
                    *n -= 1;
                    if *n == 0 {
                        self.streams.remove(&s);
                        if let Some(l) = link {
                            l.release(&s);
                        }
                    }
                }
            }
            LinkRequest::Keyframe { stream, source } => {
                if let Some(l) = link {
                    l.request_keyframe(&stream, source)
                }
            }
            LinkRequest::Talking {
                stream,
                source,
                talking: on,
            } => {
                let key = (stream, source);
                let n = self.talking.entry(key.clone()).or_default();
                let before = *n;
                *n = if on {
                    before + 1
                } else {
                    before.saturating_sub(1)
                };
                let after = *n;
                if after == 0 {
                    self.talking.remove(&key);
                }
                if (before == 0) != (after == 0) {
                    if let Some(l) = link {
                        l.talking(key.0, key.1, on);
                    }
                }
            }
            LinkRequest::Authorize {
                stream,
                token,
                reply,
            } => match link {
                Some(l) => l.authorize(stream, token, reply),
                None => {
                    let _ = reply.send(Err((
                        503,
                        "this edge has no link to its origin right now: try again shortly".into(),
                    )));
                }
            },
        }
    }
}
