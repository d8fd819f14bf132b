//! Origin side of the relay: accepts edge connections, answers their control messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::proto::{encode_frame, EdgeMsg, FrameReader, OriginMsg};
use crate::auth::constant_time_eq;
use crate::auth::jwt::VerifyKey;
use crate::origin::{EdgeSink, Origin};

pub struct RelayServer {
    pub endpoint: quinn::Endpoint,
    pub fingerprint: String,
}

/// The origin's token policy, asked for an edge's viewers: the only truth about who may view
/// what, so a stream private at the origin is private at every edge.
pub trait SubscribePolicy: Send + Sync {
    /// A subscribe JWT for `stream` given the viewer's bearer, or the HTTP status and message
    /// of the refusal.
    fn authorize_subscribe(
        &self,
        stream: &str,
        token: Option<&str>,
    ) -> Result<String, (u16, String)>;
}

#[derive(Clone)]
pub struct RelayPolicy {
    /// Edges must present this in `Hello`; None = any edge may join (trusted network).
    pub cluster_token: Option<String>,
    /// Handed to edges so they can check viewers' JWTs: the public key only.
    pub jwt_key: VerifyKey,
    /// Set once the HTTP side is built; until then `Authorize` is answered 503.
    pub subscribe: Arc<OnceLock<Arc<dyn SubscribePolicy>>>,
}

impl RelayServer {
    /// Binds the relay with the origin's certificate (DER) and its PKCS#8 key.
    pub fn bind(addr: SocketAddr, cert: &[u8], key: &[u8]) -> Result<RelayServer, String> {
        let (cfg, fingerprint) = super::tls::server_config(cert, key)?;
        let endpoint =
            quinn::Endpoint::server(cfg, addr).map_err(|e| format!("QUIC bind {addr}: {e}"))?;
        Ok(RelayServer {
            endpoint,
            fingerprint,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    pub async fn run(self, origin: Arc<Origin>, policy: RelayPolicy) {
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
    ctl: mpsc::UnboundedSender<OriginMsg>,
}

impl EdgeSink for QuicSink {
    fn datagram(&self, d: Bytes) -> bool {
        self.conn.send_datagram(d).is_ok()
    }
    fn control(&self, msg: OriginMsg) {
        let _ = self.ctl.send(msg);
    }
}

async fn serve_edge(
    conn: quinn::Connection,
    id: u64,
    origin: &Arc<Origin>,
    policy: &RelayPolicy,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<OriginMsg>();
    let writer = tokio::spawn(async move {
        while let Some(msg) = ctl_rx.recv().await {
            if send.write_all(&encode_frame(&msg)).await.is_err() {
                break;
            }
        }
        // Let the last frame (a refusal, say) reach the edge before the connection closes.
        let _ = send.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
    });
    let sink: Arc<dyn EdgeSink> = Arc::new(QuicSink {
        conn: conn.clone(),
        ctl: ctl_tx.clone(),
    });
    let mut reader = FrameReader::default();
    let mut welcomed = false;
    let mut buf = vec![0u8; 16 * 1024];
    let result = loop {
        let n = match recv.read(&mut buf).await {
            Ok(Some(n)) => n,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        reader.push(&buf[..n]);
        let step = loop {
            match reader.next_msg::<EdgeMsg>() {
                Ok(Some(msg)) => {
                    if let Err(e) = handle(msg, id, origin, policy, &sink, &ctl_tx, &mut welcomed) {
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
    let _ = writer.await;
    if let Err(e) = &result {
        conn.close(1u32.into(), e.as_bytes());
    }
    result
}

fn handle(
    msg: EdgeMsg,
    id: u64,
    origin: &Arc<Origin>,
    policy: &RelayPolicy,
    sink: &Arc<dyn EdgeSink>,
    ctl: &mpsc::UnboundedSender<OriginMsg>,
    welcomed: &mut bool,
) -> Result<(), String> {
    match msg {
        EdgeMsg::Hello { token, ws_url } => {
            let ok = match (&policy.cluster_token, token) {
                (None, _) => true,
                (Some(want), Some(got)) => constant_time_eq(want.as_bytes(), got.as_bytes()),
                (Some(_), None) => false,
            };
            if !ok {
                let _ = ctl.send(OriginMsg::Refused {
                    reason: "wrong or missing cluster token".into(),
                });
                return Err("edge refused: wrong or missing cluster token".into());
            }
            *welcomed = true;
            if let Some(url) = ws_url {
                origin.register_edge(id, url);
            }
            let _ = ctl.send(OriginMsg::Welcome {
                jwt_key: policy.jwt_key.to_base64(),
                key_id: policy.jwt_key.kid.clone(),
            });
            // Room removals follow, for the edge to end the removed members' views.
            let mut removed = origin.revocations.subscribe();
            let ctl = ctl.clone();
            tokio::spawn(async move {
                loop {
                    // Ends with the edge's connection, not only at its next send.
                    let next = tokio::select! {
                        r = removed.recv() => r,
                        _ = ctl.closed() => return,
                    };
                    match next {
                        Ok((room, member)) => {
                            if ctl.send(OriginMsg::Revoke { room, member }).is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "edge link missed room removals")
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        _ if !*welcomed => return Err("edge sent a command before hello".into()),
        EdgeMsg::Subscribe { stream } => {
            origin.subscribe(&stream, id, sink.clone());
        }
        EdgeMsg::Unsubscribe { stream } => origin.unsubscribe(&stream, id),
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
            let _ = ctl.send(match answer {
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
