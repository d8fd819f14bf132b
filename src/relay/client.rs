//! Edge side of the relay: one QUIC connection to the origin, reference-counted stream
//! subscriptions (subscribe on the first viewer, unsubscribe after the last).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

pub use super::proto::DATAGRAM_HEADER;
use super::proto::{encode_frame, DatagramHeader, EdgeMsg, FrameReader, OriginMsg, SourceInfo};
use crate::auth::jwt::{JwtVerifier, VerifyKey};

/// How long a viewer at an edge waits for the origin to authorize it before a 503.
pub const AUTHORIZE_DEADLINE: Duration = Duration::from_secs(5);
/// Authorize requests one link has in flight at most; more are refused at once (503).
pub const MAX_PENDING_AUTHORIZE: usize = 1024;

/// The origin's answer to an authorize request: a subscribe JWT, or (HTTP status, message).
pub type AuthorizeAnswer = Result<String, (u16, String)>;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<AuthorizeAnswer>>>>;

/// What an edge does with what the origin sends. Called from the link's tasks.
pub trait LinkHandler: Send + Sync + 'static {
    fn on_sources(&self, stream: &str, channel: u32, sources: &[SourceInfo]);
    /// `datagram` is the whole datagram; the RTP packet starts at [`DATAGRAM_HEADER`].
    fn on_datagram(&self, hdr: DatagramHeader, datagram: bytes::Bytes);
    fn on_closed(&self, reason: &str);
    /// A room member was removed at the origin: end its views here.
    fn on_revoke(&self, _room: &str, _member: &str) {}
}

pub struct EdgeLink {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    ctl: mpsc::UnboundedSender<EdgeMsg>,
    refs: Mutex<HashMap<String, usize>>,
    /// The origin's JWT verify key, from its `Welcome`.
    pub verify_key: VerifyKey,
    /// Authorize requests waiting for the origin's answer.
    pending: Pending,
    next_request: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub origin: SocketAddr,
    /// Hex SHA-256 of the origin's certificate; None = accept any (logged).
    pub fingerprint: Option<String>,
    pub cluster_token: Option<String>,
    /// This edge's signalling URL, announced so the origin's director can send viewers here.
    pub ws_url: Option<String>,
}

impl EdgeLink {
    pub async fn connect(
        cfg: &LinkConfig,
        handler: Arc<dyn LinkHandler>,
    ) -> Result<Arc<EdgeLink>, String> {
        if cfg.fingerprint.is_none() {
            warn!(origin = %cfg.origin, "origin certificate not pinned: pass --origin-fingerprint outside a trusted network");
        }
        let bind: SocketAddr = if cfg.origin.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(super::tls::client_config(cfg.fingerprint.clone())?);
        let conn = endpoint
            .connect(cfg.origin, super::tls::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("cannot reach origin {}: {e}", cfg.origin))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&encode_frame(&EdgeMsg::Hello {
            token: cfg.cluster_token.clone(),
            ws_url: cfg.ws_url.clone(),
        }))
        .await
        .map_err(|e| e.to_string())?;
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let verify_key = loop {
            if let Some(msg) = reader.next_msg::<OriginMsg>().map_err(|e| e.to_string())? {
                match msg {
                    OriginMsg::Welcome { jwt_key, key_id } => {
                        let key = VerifyKey::from_base64(&jwt_key)
                            .map_err(|e| format!("origin sent a bad JWT key: {e}"))?;
                        if key.kid != key_id {
                            warn!(
                                sent = key_id,
                                computed = key.kid,
                                "origin's key id does not match its key"
                            );
                        }
                        break key;
                    }
                    OriginMsg::Refused { reason } => {
                        return Err(format!("origin refused this edge: {reason}"))
                    }
                    other => return Err(format!("origin sent {other:?} before welcome")),
                }
            }
            match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
                Some(n) => reader.push(&buf[..n]),
                None => return Err("origin closed the link during hello".into()),
            }
        };
        info!(origin = %cfg.origin, "linked to origin");
        let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<EdgeMsg>();
        tokio::spawn(async move {
            while let Some(msg) = ctl_rx.recv().await {
                if send.write_all(&encode_frame(&msg)).await.is_err() {
                    break;
                }
            }
        });
        let h = handler.clone();
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
            while let Ok(d) = dconn.read_datagram().await {
                match DatagramHeader::parse(&d).map(|(h, _)| h) {
                    Some(hdr) => handler.on_datagram(hdr, d),
                    None => {
                        malformed += 1;
                        debug!(malformed, "malformed relay datagram dropped");
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
    pub fn authorize(
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
        if self
            .ctl
            .send(EdgeMsg::Authorize { id, stream, token })
            .is_err()
        {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }

    /// A viewer of `stream` arrived: subscribes at the origin if it is the first.
    pub fn acquire(&self, stream: &str) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let n = refs.entry(stream.to_owned()).or_insert(0);
        *n += 1;
        if *n == 1 {
            let _ = self.ctl.send(EdgeMsg::Subscribe {
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
                let _ = self.ctl.send(EdgeMsg::Unsubscribe {
                    stream: stream.to_owned(),
                });
            }
        }
    }

    pub fn request_keyframe(&self, stream: &str, source: Option<String>) {
        let _ = self.ctl.send(EdgeMsg::Keyframe {
            stream: stream.to_owned(),
            source,
        });
    }

    pub fn talking(&self, stream: String, source: String, talking: bool) {
        let _ = self.ctl.send(EdgeMsg::Talking {
            stream,
            source,
            talking,
        });
    }

    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Resolves when the connection to the origin is gone.
    pub async fn closed(&self) {
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
    Subscribe(String),
    Unsubscribe(String),
    Keyframe {
        stream: String,
        source: Option<String>,
    },
    /// A source's voice activity flipped (see [`crate::edge::talking`]).
    Talking {
        stream: String,
        source: String,
        talking: bool,
    },
    /// A viewer asks to view: the origin's policy answers (see [`EdgeLink::authorize`]).
    Authorize {
        stream: String,
        token: Option<String>,
        reply: oneshot::Sender<AuthorizeAnswer>,
    },
}

/// Sends requests to the link manager; usable from any thread.
#[derive(Clone)]
pub struct LinkCtl {
    tx: mpsc::UnboundedSender<LinkRequest>,
}

impl LinkCtl {
    pub fn send(&self, r: LinkRequest) {
        let _ = self.tx.send(r);
    }

    /// The origin's answer for a viewer of `stream` with this bearer, within
    /// [`AUTHORIZE_DEADLINE`]; a 503 when the link is down or the origin is slow.
    pub async fn authorize(&self, stream: &str, token: Option<&str>) -> AuthorizeAnswer {
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
pub async fn manage_link(
    cfg: LinkConfig,
    handler: Arc<dyn LinkHandler>,
    keys: Arc<JwtVerifier>,
) -> Result<LinkCtl, String> {
    let first = EdgeLink::connect(&cfg, handler.clone()).await?;
    take_key(&keys, &first);
    let (tx, mut rx) = mpsc::unbounded_channel::<LinkRequest>();
    tokio::spawn(async move {
        // Several media threads share the link: a stream is held at the origin while any of them
        // wants it, and a source talks while any of them says so.
        let mut wanted: std::collections::BTreeMap<String, usize> = Default::default();
        let mut talking: std::collections::BTreeMap<(String, String), usize> = Default::default();
        let mut link = Some(first);
        let mut backoff = std::time::Duration::from_millis(250);
        loop {
            let Some(l) = link.clone() else {
                tokio::time::sleep(backoff).await;
                match EdgeLink::connect(&cfg, handler.clone()).await {
                    Ok(l) => {
                        info!(origin = %cfg.origin, streams = wanted.len(), "relinked to origin");
                        take_key(&keys, &l);
                        for s in wanted.keys() {
                            l.acquire(s);
                        }
                        link = Some(l);
                        backoff = std::time::Duration::from_millis(250);
                    }
                    Err(e) => {
                        warn!("origin link: {e}; retrying in {backoff:?}");
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    }
                }
                continue;
            };
            tokio::select! {
                req = rx.recv() => {
                    let Some(req) = req else { return };
                    match req {
                        LinkRequest::Subscribe(s) => {
                            let n = wanted.entry(s.clone()).or_default();
                            *n += 1;
                            if *n == 1 {
                                l.acquire(&s);
                            }
                        }
                        LinkRequest::Unsubscribe(s) => {
                            if let Some(n) = wanted.get_mut(&s) {
                                *n -= 1;
                                if *n == 0 {
                                    wanted.remove(&s);
                                    l.release(&s);
                                }
                            }
                        }
                        LinkRequest::Keyframe { stream, source } => l.request_keyframe(&stream, source),
                        LinkRequest::Authorize { stream, token, reply } => l.authorize(stream, token, reply),
                        LinkRequest::Talking { stream, source, talking: on } => {
                            let key = (stream, source);
                            let n = talking.entry(key.clone()).or_default();
                            let before = *n;
                            *n = if on { before + 1 } else { before.saturating_sub(1) };
                            let after = *n;
                            if after == 0 {
                                talking.remove(&key);
                            }
                            if (before == 0) != (after == 0) {
                                l.talking(key.0, key.1, on);
                            }
                        }
                    }
                }
                _ = l.closed() => {
                    warn!(origin = %cfg.origin, "origin link lost");
                    link = None;
                }
            }
        }
    });
    Ok(LinkCtl { tx })
}
