//! What the signalling and room sockets share: a bounded outgoing queue, a writer that pings and
//! gives each write a deadline, and how a read error or a misbehaving client ends a socket.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;

use super::limits::{HttpMetrics, WS_WRITE_DEADLINE};
use crate::room::ConnMsg;

/// WebSocket close codes (RFC 6455 §7.4.1).
pub(crate) const CLOSE_POLICY: u16 = 1008;
pub(crate) const CLOSE_TOO_BIG: u16 = 1009;
pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;

/// Read and write buffer of a signalling or room socket: tungstenite's defaults (128 KiB each)
/// would be most of a viewer's memory, and the messages are small and few.
pub(crate) const WS_BUFFER: usize = 4096;

/// What a socket's writer sends.
#[derive(Debug)]
pub(crate) enum WsOut {
    Text(Utf8Bytes),
    /// A close frame with this code and reason, then the end.
    Close(u16, String),
}

/// An `error` answer (logged by its socket: once per session at info).
pub(crate) fn error_message(trans_id: Option<u64>, message: impl std::fmt::Display) -> Value {
    let message = message.to_string();
    json!({"type": "error", "transId": trans_id, "data": {"message": message}})
}

/// A `response` answer.
pub(crate) fn response_message(trans_id: u64, data: Value) -> Value {
    json!({"type": "response", "transId": trans_id, "data": data})
}

/// A client command: `{"type":"cmd","transId":N,"name":...,"data":{...}}`.
pub struct WsCommand {
    /// `transId`: the response carries it back.
    pub trans_id: u64,
    /// The command's name ("" if none).
    pub name: String,
    /// Its `data` (null if none).
    pub data: Value,
}

/// Reads one client message. Ok(None): a client event or stray response, ignored quietly.
/// Err: the transId (if any) and why the message is refused.
pub fn parse_command(text: &str) -> Result<Option<WsCommand>, (Option<u64>, String)> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| (None, format!("malformed JSON: {e}")))?;
    match v.get("type").and_then(Value::as_str) {
        Some("cmd") => {}
        Some("event" | "response") => return Ok(None),
        _ => {
            return Err((
                None,
                "expected {\"type\":\"cmd\",\"transId\":N,\"name\":...,\"data\":{...}}".into(),
            ))
        }
    }
    let Some(trans_id) = v.get("transId").and_then(Value::as_u64) else {
        return Err((None, "cmd without an integer transId".into()));
    };
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    Ok(Some(WsCommand {
        trans_id,
        name,
        data,
    }))
}

/// A room connection's queue carries the same two kinds of message.
impl From<ConnMsg> for WsOut {
    fn from(m: ConnMsg) -> WsOut {
        match m {
            ConnMsg::Text(t) => WsOut::Text(t),
            ConnMsg::Close(code, reason) => WsOut::Close(code, reason),
        }
    }
}

impl From<WsOut> for ConnMsg {
    fn from(m: WsOut) -> ConnMsg {
        match m {
            WsOut::Text(t) => ConnMsg::Text(t),
            WsOut::Close(code, reason) => ConnMsg::Close(code, reason),
        }
    }
}

/// Why the server ends a socket: the close frame it sends, and the counter it moves.
pub(crate) struct Ending {
    pub code: u16,
    pub reason: String,
}

/// The socket writer: queued messages in order, a ping every `ping_every`, each write within
/// [`WS_WRITE_DEADLINE`] (a peer that stopped reading ends the socket, it cannot hold the
/// writer). Returns when the queue closes, a write fails or times out, or after a close frame.
pub(crate) async fn write_loop<M: Into<WsOut>>(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<M>,
    ping_every: Duration,
    metrics: Arc<HttpMetrics>,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m.map(Into::into) {
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
pub(crate) async fn finish<M: From<WsOut>>(
    tx: mpsc::Sender<M>,
    mut writer: tokio::task::JoinHandle<()>,
    ending: Option<Ending>,
) {
    if let Some(e) = ending {
        let _ = tokio::time::timeout(
            WS_WRITE_DEADLINE,
            tx.send(WsOut::Close(e.code, e.reason).into()),
        )
        .await;
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
