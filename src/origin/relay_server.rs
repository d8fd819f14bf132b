//! Origin side of the relay: accepts edge connections, answers their control messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{info, warn};

use super::{EdgeSink, Origin, RelayDrop};
use crate::auth::constant_time_eq;
use crate::auth::jwt::VerifyKey;
use crate::relay::client::CONTROL_WRITE_TIMEOUT;
use crate::relay::proto::{encode_frame, EdgeMsg, FrameReader, OriginMsg};
use crate::relay::tls::TlsError;

/// An edge must open its control stream and send `Hello` within this after the handshake, or it
/// is disconnected: a connection that never says who it is holds nothing for long.
pub(crate) const EDGE_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Control messages (source lists) queued at most for one edge. An edge whose queue is full has
/// stopped reading its control stream: it is disconnected (logged) rather than buffered for; it
/// relinks and gets every source list afresh.
pub(crate) const EDGE_CONTROL_QUEUE: usize = 1024;

pub(crate) struct RelayServer {
    pub endpoint: quinn::Endpoint,
    pub fingerprint: String,
}

/// The origin's token policy, asked for an edge's viewers: the only truth about who may view
/// what, so a stream private at the origin is private at every edge.
pub(crate) trait SubscribePolicy: Send + Sync {
    /// A subscribe JWT for `stream` given the viewer's bearer, or the HTTP status and message
    /// of the refusal.
    fn authorize_subscribe(
        &self,
        stream: &str,
        token: Option<&str>,
    ) -> Result<String, (u16, String)>;
}

#[derive(Clone)]
pub(crate) struct RelayPolicy {
    /// Edges must present this in `Hello`; None = any edge may join (trusted network).
    pub cluster_token: Option<String>,
    /// Handed to edges so they can check viewers' JWTs: the public key only.
    pub jwt_key: VerifyKey,
    /// Set once the HTTP side is built; until then `Authorize` is answered 503.
    pub subscribe: Arc<OnceLock<Arc<dyn SubscribePolicy>>>,
}

/// Why the relay could not listen.
#[derive(Debug, thiserror::Error)]
pub enum RelayBindError {
    /// The TLS configuration could not be made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("QUIC bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

impl RelayServer {
    /// Binds the relay with the origin's certificate (DER) and its PKCS#8 key.
    pub(crate) fn bind(
        addr: SocketAddr,
        cert: &[u8],
        key: &[u8],
    ) -> Result<RelayServer, RelayBindError> {
        let (cfg, fingerprint) = crate::relay::tls::server_config(cert, key)?;
        let endpoint = quinn::Endpoint::server(cfg, addr)
            .map_err(|source| RelayBindError::Bind { addr, source })?;
        Ok(RelayServer {
            endpoint,
            fingerprint,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    pub(crate) async fn run(self, origin: Arc<Origin>, policy: RelayPolicy) {
        static CONN_IDS: AtomicU64 = AtomicU64::new(1);
        while let Some(incoming) = self.endpoint.accept().await {
            let origin = origin.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => {
                        let id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
                        info!(%remote, conn = id, "edge connected");
                        if let Err(e) = serve_edge(conn, id, &origin, &policy).await {
                            warn!(%remote, conn = id, "edge link ended: {e}");
                        } else {
                            info!(%remote, conn = id, "edge disconnected");
                        }
                        origin.drop_conn(id);
                    }
                    Err(e) => warn!(%remote, "edge handshake failed: {e}"),
                }
            });
        }
    }
}

struct QuicSink {
    conn: quinn::Connection,
    id: u64,
    ctl: mpsc::Sender<OriginMsg>,
    /// Set once the edge was disconnected for a full control queue (logged once).
    stalled: AtomicBool,
}

impl EdgeSink for QuicSink {
    fn datagram(&self, d: Bytes) -> Result<(), RelayDrop> {
        // quinn makes room for a datagram by dropping the oldest queued ones: the freshest audio
        // goes first, and each such send is counted as an eviction.
        let evicts = self.conn.datagram_send_buffer_space() < d.len() + DATAGRAM_OVERHEAD;
        match self.conn.send_datagram(d) {
            Ok(()) if evicts => Err(RelayDrop::Evicted),
            Ok(()) => Ok(()),
            Err(quinn::SendDatagramError::TooLarge) => Err(RelayDrop::TooLarge),
            Err(quinn::SendDatagramError::ConnectionLost(_)) => Err(RelayDrop::ConnectionLost),
            Err(_) => Err(RelayDrop::Unsupported),
        }
    }
    fn control(&self, msg: OriginMsg) {
        match self.ctl.try_send(msg) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                if !self.stalled.swap(true, Ordering::Relaxed) {
                    warn!(
                        conn = self.id,
                        queued = EDGE_CONTROL_QUEUE,
                        "edge is not reading its control stream: disconnecting it"
                    );
                }
                self.conn.close(3u32.into(), b"control backlog");
            }
        }
    }
}

/// Streams one edge connection may hold subscribed at once. A real edge holds one subscription
/// per stream its viewers watch; subscriptions past this are ignored (logged once per
/// connection), as each costs the origin a stream entry and a source list.
pub const MAX_EDGE_SUBSCRIPTIONS: usize = 10_000;

/// What the origin knows of one edge connection while it lasts.
#[derive(Default)]
struct EdgeSession {
    welcomed: bool,
    subscribed: std::collections::HashSet<String>,
    /// The subscription limit was hit (logged once).
    over_limit: bool,
}

/// What quinn counts against the datagram send buffer per queued datagram besides its bytes (an
/// estimate: a `Bytes` handle).
const DATAGRAM_OVERHEAD: usize = 32;

async fn serve_edge(
    conn: quinn::Connection,
    id: u64,
    origin: &Arc<Origin>,
    policy: &RelayPolicy,
) -> Result<(), String> {
    let (mut send, mut recv) =
        match tokio::time::timeout(EDGE_HELLO_TIMEOUT, conn.accept_bi()).await {
            Ok(s) => s.map_err(|e| e.to_string())?,
            Err(_) => {
                conn.close(1u32.into(), b"no hello in time");
                return Err(format!(
                    "edge opened no control stream within {EDGE_HELLO_TIMEOUT:?}"
                ));
            }
        };
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<OriginMsg>(EDGE_CONTROL_QUEUE);
    let wconn = conn.clone();
    let writer = tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                msg = ctl_rx.recv() => msg,
                // The subscriptions (which hold senders) outlive a lost connection until the
                // caller drops them: do not wait for them to notice.
                _ = wconn.closed() => return,
            };
            let Some(msg) = msg else { break };
            match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, send.write_all(&encode_frame(&msg)))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    warn!(conn = id, "edge did not take a control frame within {CONTROL_WRITE_TIMEOUT:?}: disconnecting it");
                    wconn.close(3u32.into(), b"control stream stalled");
                    return;
                }
            }
        }
        // Let the last frame (a refusal, say) reach the edge before the connection closes.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    });
    let sink: Arc<dyn EdgeSink> = Arc::new(QuicSink {
        conn: conn.clone(),
        id,
        ctl: ctl_tx.clone(),
        stalled: AtomicBool::new(false),
    });
    let mut reader = FrameReader::default();
    let mut session = EdgeSession::default();
    let mut buf = vec![0u8; 16 * 1024];
    let hello_by = tokio::time::Instant::now() + EDGE_HELLO_TIMEOUT;
    let result = loop {
        let read = recv.read(&mut buf);
        let read = if session.welcomed {
            read.await
        } else {
            match tokio::time::timeout_at(hello_by, read).await {
                Ok(r) => r,
                Err(_) => break Err(format!("edge sent no hello within {EDGE_HELLO_TIMEOUT:?}")),
            }
        };
        let n = match read {
            Ok(Some(n)) => n,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        reader.push(&buf[..n]);
        let step = loop {
            // Backpressure on the edge's own requests (each subscription is answered with a
            // source list): an edge that asks faster than its queue drains waits here, so only a
            // peer that stops reading fills the queue.
            if let Err(e) = room_to_answer(&ctl_tx, &conn).await {
                break Err(e);
            }
            match reader.next_msg::<EdgeMsg>() {
                Ok(Some(msg)) => {
                    if let Err(e) = handle(msg, id, origin, policy, &sink, &ctl_tx, &mut session) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            }
        };
        if let Err(e) = step {
            break Err(e);
        }
    };
    drop(ctl_tx);
    drop(sink);
    // The origin's subscriptions still hold the sink (they go with `drop_conn` after this), so
    // the writer may not see its queue close: give it a moment for a last frame, no more.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    if let Err(e) = &result {
        conn.close(1u32.into(), e.as_bytes());
    }
    result
}

/// Waits until at least half of an edge's control queue is free (its writer drains it), for at
/// most [`CONTROL_WRITE_TIMEOUT`].
async fn room_to_answer(
    ctl: &mpsc::Sender<OriginMsg>,
    conn: &quinn::Connection,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + CONTROL_WRITE_TIMEOUT;
    while ctl.capacity() < EDGE_CONTROL_QUEUE / 2 {
        if conn.close_reason().is_some() {
            return Err("connection closed".into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "edge is not reading its control stream ({CONTROL_WRITE_TIMEOUT:?} without room in its queue)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn handle(
    msg: EdgeMsg,
    id: u64,
    origin: &Arc<Origin>,
    policy: &RelayPolicy,
    sink: &Arc<dyn EdgeSink>,
    ctl: &mpsc::Sender<OriginMsg>,
    session: &mut EdgeSession,
) -> Result<(), String> {
    match msg {
        EdgeMsg::Hello { token, ws_url } => {
            let ok = match (&policy.cluster_token, token) {
                (None, _) => true,
                (Some(want), Some(got)) => constant_time_eq(want.as_bytes(), got.as_bytes()),
                (Some(_), None) => false,
            };
            if !ok {
                let _ = ctl.try_send(OriginMsg::Refused {
                    reason: "wrong or missing cluster token".into(),
                });
                return Err("edge refused: wrong or missing cluster token".into());
            }
            session.welcomed = true;
            if let Some(url) = ws_url {
                origin.register_edge(id, url);
            }
            let _ = ctl.try_send(OriginMsg::Welcome {
                jwt_key: policy.jwt_key.to_base64(),
                key_id: policy.jwt_key.kid.clone(),
            });
            // Room removals follow, for the edge to end the removed members' views.
            let mut removed = origin.revocations.subscribe();
            let (ctl, sink) = (ctl.clone(), sink.clone());
            tokio::spawn(async move {
                loop {
                    // Ends with the edge's connection, not only at its next send.
                    let next = tokio::select! {
                        r = removed.recv() => r,
                        _ = ctl.closed() => return,
                    };
                    match next {
                        // Through the sink: an edge that stopped reading is disconnected.
                        Ok((room, member)) => sink.control(OriginMsg::Revoke { room, member }),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "edge link missed room removals")
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        _ if !session.welcomed => return Err("edge sent a command before hello".into()),
        EdgeMsg::Subscribe { stream } => {
            // Refused subscriptions are ignored, not punished with a disconnect: the link also
            // carries every other stream this edge's viewers watch.
            if let Err(e) = crate::millicast::check_stream_name(&stream) {
                warn!(conn = id, "edge subscription ignored: {e}");
                return Ok(());
            }
            if session.subscribed.contains(&stream) {
                // Already subscribed: a second subscription would relay every packet twice.
                return Ok(());
            }
            if session.subscribed.len() >= MAX_EDGE_SUBSCRIPTIONS {
                if !session.over_limit {
                    session.over_limit = true;
                    warn!(
                        conn = id,
                        "edge subscribes to more than {MAX_EDGE_SUBSCRIPTIONS} streams: further subscriptions ignored"
                    );
                }
                return Ok(());
            }
            origin.subscribe(&stream, id, sink.clone());
            session.subscribed.insert(stream);
        }
        EdgeMsg::Unsubscribe { stream } => {
            if session.subscribed.remove(&stream) {
                origin.unsubscribe(&stream, id);
            }
        }
        EdgeMsg::Keyframe { stream, source } => {
            origin.request_keyframe(&stream, &source);
        }
        EdgeMsg::Talking {
            stream,
            source,
            talking,
        } => origin.talking.report(id, stream, source, talking),
        EdgeMsg::Authorize { id, stream, token } => {
            let answer = match policy.subscribe.get() {
                Some(p) => p.authorize_subscribe(&stream, token.as_deref()),
                None => Err((503, "the origin is still starting: try again".into())),
            };
            // Through the sink: an edge that stopped reading is disconnected.
            sink.control(match answer {
                Ok(jwt) => OriginMsg::Authorized { id, jwt },
                Err((status, message)) => OriginMsg::Unauthorized {
                    id,
                    status,
                    message,
                },
            });
        }
    }
    Ok(())
}
