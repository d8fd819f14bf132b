//! The signalling WebSocket (`/ws?token=JWT`), Millicast's transaction protocol:
//! `{"type":"cmd","transId":N,"name":...,"data":{...}}` answered by `response` or `error` with
//! the same transId, plus server `event`s. Every bad message gets a clear `error` and the
//! session goes on; nothing a client sends can take the server down.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{fail, App};
use crate::auth::jwt::{Claims, Scope};
use crate::origin::Owner;

/// Largest signalling message: an SDP offer with many m-lines is a few tens of KiB.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// A session that sends more commands than this is misbehaving.
const MAX_COMMANDS: usize = 10_000;
pub const MAX_SOURCE_ID: usize = 128;

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
}

pub async fn upgrade(
    State(app): State<Arc<App>>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = q.token else {
        return fail(
            StatusCode::UNAUTHORIZED,
            "missing ?token=<jwt> from the director",
        );
    };
    let claims = match app.jwt.verify(&token) {
        Ok(c) => c,
        Err(e) => return fail(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    let sid = app.next_session.fetch_add(1, Ordering::Relaxed);
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, app, claims, sid))
}

/// Outgoing messages of one session.
type Out = mpsc::UnboundedSender<Value>;

async fn session(socket: WebSocket, app: Arc<App>, claims: Claims, sid: u64) {
    let stream = claims.millicast.stream_name.clone();
    info!(session = sid, stream, scope = ?claims.scope, "signalling session opened");
    let (mut sink, mut source) = socket.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            if sink
                .send(Message::Text(v.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut seen: HashSet<u64> = HashSet::new();
    while let Some(msg) = source.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Binary(_)) => {
                send_error(
                    &out,
                    None,
                    "binary messages are not supported: send JSON text",
                );
                continue;
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(e) => {
                info!(session = sid, "signalling socket error: {e}");
                break;
            }
        };
        if seen.len() >= MAX_COMMANDS {
            send_error(&out, None, "too many commands on one session");
            break;
        }
        handle_text(&app, &claims, sid, &out, &mut seen, text.as_str());
    }
    app.origin.drop_owner(Owner::Signalling(sid));
    drop(out);
    let _ = writer.await;
    info!(session = sid, "signalling session closed");
}

fn send_error(out: &Out, trans_id: Option<u64>, message: impl Into<String>) {
    let message = message.into();
    info!(trans_id, %message, "signalling command refused");
    let _ = out.send(json!({"type": "error", "transId": trans_id, "data": {"message": message}}));
}

fn handle_text(
    app: &Arc<App>,
    claims: &Claims,
    sid: u64,
    out: &Out,
    seen: &mut HashSet<u64>,
    text: &str,
) {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return send_error(out, None, format!("malformed JSON: {e}")),
    };
    if v.get("type").and_then(Value::as_str) != Some("cmd") {
        // Clients may send events (none are used) or stray responses: ignore those quietly,
        // refuse anything else.
        if matches!(
            v.get("type").and_then(Value::as_str),
            Some("event" | "response")
        ) {
            return;
        }
        return send_error(
            out,
            None,
            "expected {\"type\":\"cmd\",\"transId\":N,\"name\":...,\"data\":{...}}",
        );
    }
    let Some(trans_id) = v.get("transId").and_then(Value::as_u64) else {
        return send_error(out, None, "cmd without an integer transId");
    };
    if !seen.insert(trans_id) {
        return send_error(out, Some(trans_id), format!("duplicate transId {trans_id}"));
    }
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    let result = match name {
        "publish" => publish(app, claims, sid, &data),
        "unpublish" => unpublish(app, claims, sid, &data),
        "view" => Err("this server has no edge: view is not available".to_owned()),
        "" => Err("cmd without a name".to_owned()),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(data) => {
            let _ = out.send(json!({"type": "response", "transId": trans_id, "data": data}));
        }
        Err(message) => send_error(out, Some(trans_id), message),
    }
}

/// Reads an optional sourceId; "" and null both mean the main source.
pub fn source_id(data: &Value) -> Result<Option<String>, String> {
    match data.get("sourceId") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_SOURCE_ID && !s.chars().any(char::is_control) => {
            Ok(Some(s.clone()))
        }
        Some(Value::String(_)) => Err(format!(
            "sourceId must be at most {MAX_SOURCE_ID} printable characters"
        )),
        Some(_) => Err("sourceId must be a string".into()),
    }
}

/// The stream a command names must be the JWT's.
fn check_stream(claims: &Claims, data: &Value, field: &str) -> Result<(), String> {
    match data.get(field).and_then(Value::as_str) {
        Some(n) if n != claims.millicast.stream_name => Err(format!(
            "this token is for stream {:?}, not {n:?}",
            claims.millicast.stream_name
        )),
        _ => Ok(()),
    }
}

fn publish(app: &Arc<App>, claims: &Claims, sid: u64, data: &Value) -> Result<Value, String> {
    if claims.scope != Scope::Publish {
        return Err("this token may view, not publish".into());
    }
    check_stream(claims, data, "name")?;
    let sdp = data
        .get("sdp")
        .and_then(Value::as_str)
        .ok_or("publish needs data.sdp, the SDP offer")?;
    let source = source_id(data)?;
    let stream = &claims.millicast.stream_name;
    let published = app
        .origin
        .publish(stream, source.clone(), sdp, Owner::Signalling(sid))
        .map_err(|e| e.to_string())?;
    if published.replaced {
        warn!(stream, source = ?source, "a live publication of this sourceId was replaced");
    }
    Ok(json!({
        "sdp": published.answer,
        "publisherId": published.publisher_id,
        "clusterId": "chorus",
        "feedId": published.publisher_id,
        "uuid": published.publisher_id,
    }))
}

fn unpublish(app: &Arc<App>, claims: &Claims, sid: u64, data: &Value) -> Result<Value, String> {
    if claims.scope != Scope::Publish {
        return Err("this token may view, not publish".into());
    }
    let source = if data.get("sourceId").is_some() {
        Some(source_id(data)?)
    } else {
        None
    };
    let n = app.origin.unpublish(
        &claims.millicast.stream_name,
        source.as_ref(),
        Owner::Signalling(sid),
    );
    if n == 0 {
        return Err("nothing published on this session".into());
    }
    Ok(json!({"unpublished": n}))
}
