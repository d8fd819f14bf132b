//! What the signalling and room sockets share: a bounded outgoing queue, a writer that pings and
//! gives each write a deadline, and how a read error or a misbehaving client ends a socket.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;

use super::limits::{HttpMetrics, WS_WRITE_DEADLINE};

/// WebSocket close codes (RFC 6455 §7.4.1).
pub(crate) const CLOSE_POLICY: u16 = 1008;
pub(crate) const CLOSE_TOO_BIG: u16 = 1009;
pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;

/// What a socket's writer sends.
#[derive(Debug)]
pub enum WsOut {
    Text(Utf8Bytes),
    /// A close frame with this code and reason, then the end.
    Close(u16, String),
}

/// Why the server ends a socket: the close frame it sends, and the counter it moves.
pub(crate) struct Ending {
    pub code: u16,
    pub reason: String,
}

/// The socket writer: queued messages in order, a ping every `ping_every`, each write within
/// [`WS_WRITE_DEADLINE`] (a peer that stopped reading ends the socket, it cannot hold the
/// writer). Returns when the queue closes, a write fails or times out, or after a close frame.
pub(crate) async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<WsOut>,
    ping_every: Duration,
    metrics: Arc<HttpMetrics>,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(WsOut::Text(t)) => Message::Text(t),
                Some(WsOut::Close(code, reason)) => {
                    let frame = CloseFrame { code, reason: reason.into() };
                    let _ = tokio::time::timeout(WS_WRITE_DEADLINE, sink.send(Message::Close(Some(frame)))).await;
                    return;
                }
                None => break,
            },
            _ = ping.tick() => Message::Ping(Bytes::new()),
        };
        match tokio::time::timeout(WS_WRITE_DEADLINE, sink.send(m)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                HttpMetrics::add(&metrics.ws_write_timeouts);
                tracing::info!(
                    "socket write took over {} s (the peer does not read): closing it",
                    WS_WRITE_DEADLINE.as_secs()
                );
                return;
            }
        }
    }
    let _ = tokio::time::timeout(WS_WRITE_DEADLINE, sink.close()).await;
}

/// A read error: a frame or message over `max` (`WS_MAX_MESSAGE` for signalling) ends the socket with 1009 and is
/// counted; any other error just ends it.
pub(crate) fn read_error(e: axum::Error, metrics: &HttpMetrics, max: usize) -> Option<Ending> {
    // axum's tungstenite (not the version this crate's client uses) says "Space limit exceeded:
    // Message too long: N > MAX" for a frame or message over the limits: matched by its text, so
    // that no second tungstenite has to be named here.
    let too_big = e.to_string().contains("Message too long");
    too_big.then(|| {
        HttpMetrics::add(&metrics.ws_frames_too_large);
        Ending {
            code: CLOSE_TOO_BIG,
            reason: format!("message too large: at most {max} bytes"),
        }
    })
}

/// A client the server stopped reading from because its queue is full.
pub(crate) fn not_reading(metrics: &HttpMetrics, queued: usize) -> Ending {
    HttpMetrics::add(&metrics.ws_not_reading);
    Ending {
        code: CLOSE_POLICY,
        reason: format!("not reading: {queued} messages queued to this socket"),
    }
}

/// A client that stayed silent (no message, no pong) past the limit.
pub(crate) fn silent(metrics: &HttpMetrics, limit: Duration) -> Ending {
    HttpMetrics::add(&metrics.ws_silent);
    Ending {
        code: CLOSE_GOING_AWAY,
        reason: format!("silent for {} s: no message, no pong", limit.as_secs_f64()),
    }
}

/// A client whose commands were refused too often.
pub(crate) fn too_many_refused(metrics: &HttpMetrics, refused: u32) -> Ending {
    HttpMetrics::add(&metrics.ws_too_many_refused);
    Ending {
        code: CLOSE_POLICY,
        reason: format!("{refused} commands refused: closing"),
    }
}

/// Queues the close frame (waiting a write deadline at most for room), then lets the writer end
/// (it ends by itself within its own deadlines; past twice that it is aborted).
pub(crate) async fn finish(
    tx: mpsc::Sender<WsOut>,
    mut writer: tokio::task::JoinHandle<()>,
    ending: Option<Ending>,
) {
    if let Some(e) = ending {
        let _ =
            tokio::time::timeout(WS_WRITE_DEADLINE, tx.send(WsOut::Close(e.code, e.reason))).await;
    }
    drop(tx);
    if tokio::time::timeout(2 * WS_WRITE_DEADLINE + Duration::from_secs(1), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// After the server closed a socket: how long it goes on reading (and discarding) what the
/// client still sends, so that the kernel ends the connection with a FIN after the close frame
/// rather than a reset that would discard it (a lingering close).
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Reads and discards until the client closes, an error, or [`LINGER`] passes.
pub(crate) async fn linger(mut source: SplitStream<WebSocket>) {
    let end = tokio::time::Instant::now() + LINGER;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(end, source.next()).await {}
}
