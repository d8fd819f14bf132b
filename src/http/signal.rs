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

use super::signal_cmd::{Project, Publish, Unproject, Unpublish, View};
use super::{fail, App};
use crate::auth::jwt::{Claims, Scope};
use crate::edge::ViewOptions;
use crate::origin::Owner;
use crate::rtc::peers::PeerId;

/// Largest signalling message: an SDP offer with many m-lines is a few tens of KiB.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// A session that sends more commands than this is misbehaving.
const MAX_COMMANDS: usize = 10_000;
pub const MAX_SOURCE_ID: usize = 128;
/// Read and write buffer of a signalling socket.
pub const WS_BUFFER: usize = 4096;

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
    // A room member's publish JWT stops working once the member is demoted or removed.
    if let Some(b) = &claims.room {
        if let Err(m) = super::rooms::check_binding(&app, b) {
            return fail(StatusCode::FORBIDDEN, m);
        }
    }
    let sid = app.next_session.fetch_add(1, Ordering::Relaxed);
    // tungstenite's defaults (128 KiB read and 128 KiB write buffer) would be most of a
    // viewer's memory; signalling messages are small and few, and a large offer still fits
    // (the read buffer is only the chunk size).
    ws.max_message_size(MAX_MESSAGE)
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
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
    let mut session = Session {
        sid,
        seen: HashSet::new(),
        viewer: None,
    };
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
        if session.seen.len() >= MAX_COMMANDS {
            send_error(&out, None, "too many commands on one session");
            break;
        }
        handle_text(&app, &claims, &out, &mut session, text.as_str());
    }
    if let Some(origin) = &app.origin {
        origin.drop_owner(Owner::Signalling(sid));
    }
    if let (Some(edge), Some(v)) = (&app.edge, &session.viewer) {
        edge.remove(v.id);
    }
    drop(out);
    let _ = writer.await;
    info!(session = sid, "signalling session closed");
}

fn send_error(out: &Out, trans_id: Option<u64>, message: impl Into<String>) {
    let _ = out.send(error_message(trans_id, message));
}

/// An `error` answer (logged).
pub fn error_message(trans_id: Option<u64>, message: impl Into<String>) -> Value {
    let message = message.into();
    info!(trans_id, %message, "command refused");
    json!({"type": "error", "transId": trans_id, "data": {"message": message}})
}

/// A `response` answer.
pub fn response_message(trans_id: u64, data: Value) -> Value {
    json!({"type": "response", "transId": trans_id, "data": data})
}

/// A client command: `{"type":"cmd","transId":N,"name":...,"data":{...}}`.
pub struct Cmd {
    pub trans_id: u64,
    pub name: String,
    pub data: Value,
}

/// Reads one client message. Ok(None): a client event or stray response, ignored quietly.
/// Err: the transId (if any) and why the message is refused.
pub fn parse_cmd(text: &str) -> Result<Option<Cmd>, (Option<u64>, String)> {
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
    Ok(Some(Cmd {
        trans_id,
        name,
        data,
    }))
}

/// What one signalling session holds.
struct Session {
    sid: u64,
    seen: HashSet<u64>,
    viewer: Option<ViewerState>,
}

struct ViewerState {
    id: PeerId,
    /// mids of the multiplexed tracks, in order.
    tracks: Vec<String>,
    /// Projections: mid -> sourceId.
    projected: Vec<(String, String)>,
}

fn handle_text(app: &Arc<App>, claims: &Claims, out: &Out, session: &mut Session, text: &str) {
    let sid = session.sid;
    let Cmd {
        trans_id,
        name,
        data,
    } = match parse_cmd(text) {
        Ok(Some(cmd)) => cmd,
        // Clients may send events (none are used) or stray responses.
        Ok(None) => return,
        Err((trans_id, message)) => return send_error(out, trans_id, message),
    };
    if !session.seen.insert(trans_id) {
        return send_error(out, Some(trans_id), format!("duplicate transId {trans_id}"));
    }
    let result = match name.as_str() {
        "publish" => publish(app, claims, sid, &data),
        "unpublish" => unpublish(app, claims, sid, &data),
        "view" => match view(app, claims, &data, out, session, trans_id) {
            // The answer is already sent, ahead of the viewer's first events.
            Ok(()) => return,
            Err(e) => Err(e),
        },
        "project" => project(app, &data, session),
        "unproject" => unproject(app, &data, session),
        "" => Err("cmd without a name".to_owned()),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(data) => {
            let _ = out.send(response_message(trans_id, data));
        }
        Err(message) => send_error(out, Some(trans_id), message),
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
    let Publish { sdp, source } = Publish::parse(data).map_err(|e| e.to_string())?;
    if let Some(b) = &claims.room {
        super::rooms::check_room_publish(app, b, source.as_deref(), sdp)?;
    }
    let stream = &claims.millicast.stream_name;
    let origin = app
        .origin
        .as_ref()
        .ok_or("this is an edge: publish at the origin")?;
    let published = origin
        .publish(stream, source.clone(), sdp, Owner::Signalling(sid))
        .map_err(|e| e.to_string())?;
    if let Some(b) = &claims.room {
        super::rooms::confirm_room_publish(app, b)?;
    }
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
    let Unpublish { source } = Unpublish::parse(data).map_err(|e| e.to_string())?;
    let origin = app
        .origin
        .as_ref()
        .ok_or("this is an edge: publish at the origin")?;
    let n = origin.unpublish(
        &claims.millicast.stream_name,
        source.as_ref(),
        Owner::Signalling(sid),
    );
    if n == 0 {
        return Err("nothing published on this session".into());
    }
    Ok(json!({"unpublished": n}))
}

fn view(
    app: &Arc<App>,
    claims: &Claims,
    data: &Value,
    out: &Out,
    session: &mut Session,
    trans_id: u64,
) -> Result<(), String> {
    let edge = app
        .edge
        .as_ref()
        .ok_or("this origin serves no viewers: view at an edge (chorus edge)")?;
    if claims.scope != Scope::Subscribe {
        return Err(
            "this token may publish, not view: get one from /api/director/subscribe".into(),
        );
    }
    if session.viewer.is_some() {
        return Err("this session already views: open another socket for another view".into());
    }
    check_stream(claims, data, "streamId")?;
    let View {
        sdp,
        pinned,
        excluded,
    } = View::parse(data).map_err(|e| e.to_string())?;
    let stream = &claims.millicast.stream_name;
    let pending = edge
        .prepare(
            stream,
            sdp,
            ViewOptions {
                pinned,
                excluded,
                max_tracks: None,
            },
            out.clone(),
        )
        .map_err(|e| e.to_string())?;
    let _ = out.send(json!({"type": "response", "transId": trans_id, "data": {
        "sdp": pending.answer,
        "subscriberId": pending.subscriber_id,
        "streamViewId": pending.subscriber_id,
        "clusterId": "chorus",
        "streamId": stream,
    }}));
    let tracks = pending.tracks.clone();
    let id = edge.commit(pending);
    session.viewer = Some(ViewerState {
        id,
        tracks,
        projected: Vec::new(),
    });
    Ok(())
}

fn push_projections(app: &Arc<App>, v: &ViewerState) {
    if let Some(edge) = &app.edge {
        let fixed = v
            .projected
            .iter()
            .filter_map(|(mid, src)| {
                v.tracks
                    .iter()
                    .position(|m| m == mid)
                    .map(|t| (t as u8, src.clone()))
            })
            .collect();
        edge.project(v.id, fixed);
    }
}

/// `project {sourceId, mapping: [{trackId|media, mediaId}]}`: the source plays in that track
/// until unprojected; the other tracks keep following voice activity.
fn project(app: &Arc<App>, data: &Value, session: &mut Session) -> Result<Value, String> {
    let v = session
        .viewer
        .as_mut()
        .ok_or("project needs a view on this session first")?;
    let Project { source, mids } = Project::parse(data, &v.tracks).map_err(|e| e.to_string())?;
    for mid in mids {
        v.projected.retain(|(m, s)| *m != mid && *s != source);
        v.projected.push((mid, source.clone()));
    }
    push_projections(app, v);
    Ok(json!({}))
}

fn unproject(app: &Arc<App>, data: &Value, session: &mut Session) -> Result<Value, String> {
    let v = session
        .viewer
        .as_mut()
        .ok_or("unproject needs a view on this session first")?;
    let Unproject { mids } = Unproject::parse(data).map_err(|e| e.to_string())?;
    v.projected.retain(|(m, _)| !mids.contains(m));
    push_projections(app, v);
    Ok(json!({}))
}
