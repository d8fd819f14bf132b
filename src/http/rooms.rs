//! The HTTP face of rooms: `POST /api/rooms/{room}/tokens` (API key), the room socket
//! `/api/rooms/{room}/ws?token=<room token>`, and what the director, signalling and WHIP check
//! when a room token or a room member's publish JWT comes their way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info};

use super::limits::{
    Bucket, HttpMetrics, ROOM_COMMANDS_PER_SEC, WS_MAX_REFUSED, WS_OUT_QUEUE, WS_WRITE_DEADLINE,
};
use super::socket::{self, error_message, parse_command, response_message, Ending};
use super::{bearer, director, App, Refusal};
use crate::auth::jwt::{RoomBinding, Scope};
use crate::auth::AuthError;
use crate::millicast::check_stream_name;
use crate::room::state::{parse_permissions, Grant, Media, Role, RoomError};
use crate::room::{ConnMsg, ConnTx, RoomService};
use crate::rtc::offer::mlines;

/// Largest room socket message and frame: commands are small.
pub(crate) const MAX_ROOM_MESSAGE: usize = 16 * 1024;
pub(crate) const MAX_USER_NAME: usize = 64;
/// Room tokens live this long unless the request says otherwise (`ttl`, seconds).
pub(crate) const DEFAULT_TOKEN_TTL: u64 = 12 * 3600;
pub(crate) const MAX_TOKEN_TTL: u64 = 7 * 86_400;
/// The server pings each room socket this often (it also keeps proxies from closing it)...
const PING_EVERY: Duration = Duration::from_secs(20);
/// ...and closes one that sent nothing, not even a pong, for this long.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

fn rooms(app: &App) -> Result<&Arc<RoomService>, Refusal> {
    app.rooms.as_ref().ok_or_else(|| {
        Refusal(
            StatusCode::NOT_FOUND,
            "this is an edge: rooms live at the origin".into(),
        )
    })
}

fn forbidden(m: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::FORBIDDEN, m.to_string())
}

fn check_room_name(room: &str) -> Result<(), Refusal> {
    check_stream_name(room).map_err(|m| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("bad room name (it is also the stream's name): {m}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(alias = "userName")]
    user_name: Option<String>,
    #[serde(alias = "joinAs")]
    join_as: Option<String>,
    #[serde(default)]
    permissions: Vec<String>,
    /// Seconds.
    ttl: Option<u64>,
}

/// `POST /api/rooms/{room}/tokens`, bearer API key, `{user_name, join_as, permissions, ttl?}`:
/// a room token for a new participant, with its member id.
pub(crate) async fn issue_token(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match issue(&app, &room, &headers, &body) {
        Ok(data) => Json(json!({"status": "success", "data": data})).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

fn issue(app: &App, room: &str, headers: &HeaderMap, body: &[u8]) -> Result<Value, Refusal> {
    rooms(app)?
        .check_api_key(bearer(headers))
        .map_err(|e| Refusal(StatusCode::UNAUTHORIZED, e.to_string()))?;
    mint(app, room, body)
}

/// A room token for the participant `body` describes, its request already allowed (the API key,
/// or dev mode's page helper).
pub(crate) fn mint(app: &App, room: &str, body: &[u8]) -> Result<Value, Refusal> {
    let rooms = rooms(app)?;
    check_room_name(room)?;
    let bad = |m: String| Refusal(StatusCode::BAD_REQUEST, m);
    let req: TokenRequest =
        serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON body: {e}")))?;
    let user_name = req
        .user_name
        .ok_or_else(|| bad("missing user_name".into()))?;
    if user_name.trim().is_empty()
        || user_name.chars().count() > MAX_USER_NAME
        || user_name.chars().any(char::is_control)
    {
        return Err(bad(format!(
            "user_name must be 1 to {MAX_USER_NAME} printable characters"
        )));
    }
    let role = Role::parse(req.join_as.as_deref().unwrap_or("audience"))
        .map_err(|e| bad(e.to_string()))?;
    let permissions = parse_permissions(&req.permissions).map_err(|e| bad(e.to_string()))?;
    let ttl = req.ttl.unwrap_or(DEFAULT_TOKEN_TTL);
    if !(10..=MAX_TOKEN_TTL).contains(&ttl) {
        return Err(bad(format!("ttl must be 10 to {MAX_TOKEN_TTL} seconds")));
    }
    let (token, member, expires) = rooms.issue(room, &user_name, role, &permissions, ttl);
    Ok(json!({
        "token": token,
        "memberId": member,
        "room": room,
        "streamName": room,
        "userName": user_name,
        "role": role.as_str(),
        "permissions": permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "expiresAt": expires,
    }))
}

/// A room credential presented to the director, WHIP or WHEP as bearer: a room token (for its
/// room's stream: view, and publish while a member), or a member's publish JWT (publish again
/// while not demoted). None: the bearer is neither, check it as usual. Some(Ok(binding)): allowed;
/// a publication is then bound to the member (`binding`).
pub(crate) fn room_grant(
    app: &App,
    token: Option<&str>,
    stream: &str,
    scope: Scope,
) -> Option<Result<Option<RoomBinding>, Refusal>> {
    let rooms = app.rooms.as_ref()?;
    let token = token?;
    match rooms.verify(token) {
        Ok(g) => Some(grant_stream(rooms, &g, stream, scope)),
        // Signed with the room key, so a room token, but too old.
        Err(AuthError::Expired) => Some(Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "room token expired".into(),
        ))),
        Err(_) => {
            let claims = app.jwt.verify(token).ok()?;
            let b = claims.room.filter(|_| scope == Scope::Publish)?;
            if claims.scope != Scope::Publish {
                return None;
            }
            Some(if b.room != stream {
                Err(forbidden(format!(
                    "this publish token is for room {:?}, not stream {stream:?}",
                    b.room
                )))
            } else {
                check_binding(app, &b).map(|()| Some(b)).map_err(forbidden)
            })
        }
    }
}

fn grant_stream(
    rooms: &RoomService,
    g: &Grant,
    stream: &str,
    scope: Scope,
) -> Result<Option<RoomBinding>, Refusal> {
    if g.room != stream {
        return Err(forbidden(format!(
            "this room token is for room {:?}, not stream {stream:?}",
            g.room
        )));
    }
    rooms.admit(g).map_err(forbidden)?;
    match scope {
        // A view is bound to the member too, so that its removal ends it.
        Scope::Subscribe => Ok(Some(RoomBinding {
            room: g.room.clone(),
            member_id: g.member.clone(),
            generation: 0,
        })),
        Scope::Publish => {
            let right = rooms
                .may_publish(&g.room, &g.member, None)
                .map_err(forbidden)?;
            Ok(Some(RoomBinding {
                room: g.room.clone(),
                member_id: g.member.clone(),
                generation: right.generation,
            }))
        }
    }
}

/// A member's publish JWT still works: the member was neither demoted nor removed since.
pub(crate) fn check_binding(app: &App, b: &RoomBinding) -> Result<(), RoomError> {
    match &app.rooms {
        Some(rooms) => rooms
            .may_publish(&b.room, &b.member_id, Some(b.generation))
            .map(|_| ()),
        // An edge: nothing is published here anyway.
        None => Ok(()),
    }
}

/// Before a room member's publication: its own sourceId, still a member, and no video unless
/// allowed.
pub(crate) fn check_room_publish(
    app: &App,
    b: &RoomBinding,
    source: Option<&str>,
    offer: &str,
) -> Result<(), RoomError> {
    if source != Some(b.member_id.as_str()) {
        return Err(RoomError::NotItsSource {
            room: b.room.clone(),
            member: b.member_id.clone(),
            given: source.map_or("the main source".to_owned(), |s| format!("{s:?}")),
        });
    }
    let rooms = app.rooms.as_ref().ok_or(RoomError::NotAtOrigin)?;
    let right = rooms.may_publish(&b.room, &b.member_id, Some(b.generation))?;
    let sends_video = mlines(offer)
        .iter()
        .any(|m| m.media == "video" && matches!(m.direction.as_str(), "sendonly" | "sendrecv"));
    if sends_video && right.media == Media::AudioOnly {
        return Err(RoomError::AudioOnly(b.member_id.clone()));
    }
    Ok(())
}

/// After a room member's publication is in place: if the member was demoted meanwhile, it is
/// stopped again at once.
pub(crate) fn confirm_room_publish(app: &App, b: &RoomBinding) -> Result<(), RoomError> {
    let result = check_binding(app, b);
    if result.is_err() {
        if let Some(origin) = &app.origin {
            origin.unpublish_source(&b.room, &Some(b.member_id.clone()));
        }
    }
    result
}

#[derive(Deserialize)]
pub(crate) struct RoomQuery {
    token: Option<String>,
}

/// `GET /api/rooms/{room}/ws?token=<room token>`: the participant's room socket.
pub(crate) async fn upgrade(
    State(app): State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // With a shared registry, a room this origin does not own (or just took) is read back first.
    if let Some(r) = &app.rooms {
        r.ensure_loaded(&room).await;
    }
    let checked = (|| {
        let rooms = rooms(&app)?.clone();
        let token = q.token.as_deref().ok_or_else(|| {
            Refusal(
                StatusCode::UNAUTHORIZED,
                "missing ?token=<room token>".into(),
            )
        })?;
        let g = rooms.verify(token).map_err(|e| {
            let m = match e {
                AuthError::Expired => "room token expired".to_owned(),
                e => format!("not a room token of this server: {e}"),
            };
            Refusal(StatusCode::UNAUTHORIZED, m)
        })?;
        if g.room != room {
            return Err(forbidden(format!(
                "this room token is for room {:?}, not {room:?}",
                g.room
            )));
        }
        rooms.admit(&g).map_err(forbidden)?;
        Ok((rooms, g))
    })();
    let (rooms, g) = match checked {
        Ok(x) => x,
        Err(refusal) => return refusal.into_response(),
    };
    let ws_url = director::ws_url(&app, &peer, &headers);
    ws.max_message_size(MAX_ROOM_MESSAGE)
        .max_frame_size(MAX_ROOM_MESSAGE)
        .read_buffer_size(socket::WS_BUFFER)
        .write_buffer_size(socket::WS_BUFFER)
        .on_upgrade(move |socket| session(socket, app, rooms, g, ws_url))
}

async fn session(
    socket: WebSocket,
    app: Arc<App>,
    rooms: Arc<RoomService>,
    g: Grant,
    ws_url: String,
) {
    let metrics = app.http_metrics.clone();
    let (mut sink, mut source) = socket.split();
    let (tx, rx) = mpsc::channel::<ConnMsg>(WS_OUT_QUEUE);
    let overflow = Arc::new(Notify::new());
    let conn_tx = ConnTx {
        tx: tx.clone(),
        overflow: overflow.clone(),
    };
    let conn = match rooms.connect(&g, ws_url, conn_tx) {
        Ok(conn) => conn,
        Err(m) => {
            let text = error_message(None, m).to_string();
            let _ = tokio::time::timeout(WS_WRITE_DEADLINE, sink.send(Message::Text(text.into())))
                .await;
            let _ = tokio::time::timeout(WS_WRITE_DEADLINE, sink.close()).await;
            return;
        }
    };
    let mut writer = tokio::spawn(socket::write_loop(sink, rx, PING_EVERY, metrics.clone()));
    let send = |v: Value| {
        if tx.try_send(ConnMsg::Text(v.to_string().into())).is_err() {
            overflow.notify_one();
        }
    };
    let rate = f64::from(ROOM_COMMANDS_PER_SEC);
    let mut bucket = Bucket::full(2.0 * rate, Instant::now());
    let mut refused = 0u32;
    let mut refuse = |trans_id: Option<u64>, m: String| {
        refused += 1;
        if refused == 1 {
            info!(room = g.room.as_str(), member = g.member.as_str(), %m, "room command refused (further refusals of this socket at debug)");
        } else {
            debug!(room = g.room.as_str(), member = g.member.as_str(), %m, "room command refused");
        }
        send(error_message(trans_id, m));
        refused
    };
    let mut writer_done = false;
    let ending: Option<Ending> = loop {
        // A participant that vanished without closing (its pongs stopped) leaves the room.
        let msg = tokio::select! {
            msg = source.next() => msg,
            _ = tokio::time::sleep(SILENCE_LIMIT) => {
                info!(room = g.room.as_str(), member = g.member.as_str(), "room socket silent: closing it");
                break Some(socket::silent(&metrics, SILENCE_LIMIT));
            }
            _ = overflow.notified() => {
                info!(room = g.room.as_str(), member = g.member.as_str(), "room socket not reading: closing it");
                break Some(socket::not_reading(&metrics, WS_OUT_QUEUE));
            }
            _ = &mut writer => {
                writer_done = true;
                break None;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                let n = refuse(
                    None,
                    "binary messages are not supported: send JSON text".into(),
                );
                if n >= WS_MAX_REFUSED {
                    break Some(socket::too_many_refused(&metrics, n));
                }
                continue;
            }
            Some(Err(e)) => break socket::read_error(e, &metrics, MAX_ROOM_MESSAGE),
            Some(Ok(Message::Close(_))) | None => break None,
            Some(Ok(_)) => continue,
        };
        let n = if let Err(retry) = bucket.take(rate, 2.0 * rate, Instant::now()) {
            HttpMetrics::add(&metrics.ws_commands_limited);
            refuse(
                None,
                format!(
                    "too many room commands: at most {ROOM_COMMANDS_PER_SEC} per second; retry in {} ms",
                    retry.as_millis().max(1)
                ),
            )
        } else {
            match parse_command(text.as_str()) {
                Ok(Some(cmd)) => match rooms.command(conn, &cmd.name, &cmd.data).await {
                    Ok(data) => {
                        send(response_message(cmd.trans_id, data));
                        0
                    }
                    Err(e) => refuse(Some(cmd.trans_id), e.to_string()),
                },
                Ok(None) => 0,
                Err((trans_id, m)) => refuse(trans_id, m),
            }
        };
        if n >= WS_MAX_REFUSED {
            break Some(socket::too_many_refused(&metrics, n));
        }
    };
    rooms.disconnect(conn);
    if let Some(e) = &ending {
        info!(
            room = g.room.as_str(),
            member = g.member.as_str(),
            code = e.code,
            reason = e.reason.as_str(),
            "room socket closed by the server"
        );
    }
    if !writer_done {
        let closed_by_us = ending.is_some();
        socket::finish(tx, writer, ending).await;
        if closed_by_us {
            socket::linger(source).await;
        }
    }
}
