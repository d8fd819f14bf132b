//! The HTTP accept loop: a connection cap (total and per client IP), a deadline on every
//! request head (slowloris), and the client's address in each request (`ConnectInfo`), for the
//! per-IP offer rate. axum's own `serve` has neither a cap nor a header deadline.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tracing::warn;

use super::limits::{HttpLimits, HttpMetrics, HEADER_READ_TIMEOUT};

/// Open connections, total and per IP.
struct Table {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Which cap a refused connection hit.
enum Full {
    Total,
    PerIp,
}

struct Conns {
    table: Mutex<Table>,
    max: usize,
    max_per_ip: usize,
    metrics: Arc<HttpMetrics>,
}

impl Conns {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Full> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.total >= self.max {
            return Err(Full::Total);
        }
        let n = t.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Full::PerIp);
        }
        *n += 1;
        t.total += 1;
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            conns: self.clone(),
            ip,
        })
    }
}

/// One admitted connection; dropping it (when the socket closes, after a WebSocket upgrade too)
/// frees its place.
struct Permit {
    conns: Arc<Conns>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut t = self.conns.table.lock().unwrap_or_else(|p| p.into_inner());
        t.total -= 1;
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
        self.conns
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that holds its connection's place: the upgraded WebSocket owns it.
struct Counted {
    stream: TcpStream,
    _permit: Permit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Logs at most once per `every`: a flood is counted in /metrics, not logged line by line.
pub(crate) struct LogEvery {
    last_ms: AtomicU64,
    every: Duration,
}

impl LogEvery {
    pub(crate) const fn new(every: Duration) -> LogEvery {
        LogEvery {
            last_ms: AtomicU64::new(0),
            every,
        }
    }

    pub(crate) fn ready(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.every.as_millis() as u64)
            && self
                .last_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

static REFUSED_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));

fn refusal(message: &str) -> Vec<u8> {
    let body = serde_json::json!({"status": "fail", "data": {"message": message}}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until the process ends.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    metrics: Arc<HttpMetrics>,
) {
    let conns = Arc::new(Conns {
        table: Mutex::new(Table {
            total: 0,
            per_ip: HashMap::new(),
        }),
        max: limits.max_connections.max(1),
        max_per_ip: limits.max_connections_per_ip.max(1),
        metrics: metrics.clone(),
    });
    let (max, max_per_ip) = (conns.max, conns.max_per_ip);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                if REFUSED_LOG.ready() {
                    warn!("HTTP accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match conns.admit(peer.ip()) {
            Ok(p) => p,
            Err(full) => {
                let (counter, message) = match full {
                    Full::Total => (
                        &metrics.refused_connections,
                        format!("this server holds its maximum of {max} connections: retry later"),
                    ),
                    Full::PerIp => (
                        &metrics.refused_connections_per_ip,
                        format!(
                            "{} already holds {max_per_ip} connections to this server, the most one address may",
                            peer.ip()
                        ),
                    ),
                };
                HttpMetrics::add(counter);
                if REFUSED_LOG.ready() {
                    warn!(peer = %peer, "connection refused: {message} (counted in chorus_http_refused_total; logged at most every 10 s)");
                }
                // One non-blocking write: a refused client cannot make us wait.
                let _ = stream.try_write(&refusal(&message));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let io = TokioIo::new(Counted {
                stream,
                _permit: permit,
            });
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    HttpMetrics::add(&metrics.header_timeouts);
                }
            }
        });
    }
}

/// The client address axum's handlers see (put there by [`serve`]).
pub(crate) fn peer_ip(info: &ConnectInfo<SocketAddr>) -> IpAddr {
    info.0.ip()
}
