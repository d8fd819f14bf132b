//! The signalling WebSocket (`/ws?token=JWT`), Millicast's transaction protocol:
//! `{"type":"cmd","transId":N,"name":...,"data":{...}}` answered by `response` or `error` with
//! the same transId, plus server `event`s. Every bad message gets a clear `error` and the
//! session goes on; nothing a client sends can take the server down.

use std::cell::Cell;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use str0m::media::Mid;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::flow::{self, Ender, FlowError, PublishAsk, ViewAsk};
use super::limits::{
    Bucket, HttpMetrics, WS_COMMANDS_PER_SEC, WS_MAX_MESSAGE, WS_MAX_REFUSED, WS_OUT_QUEUE,
};
use super::signal_cmd::{
    self as cmd, CmdError, ProjectCmd, PublishCmd, Target, UnprojectCmd, UnpublishCmd, ViewCmd,
    ViewTracks,
};
use super::socket::{
    self, error_message, parse_command, response_message, Ending, WsCommand, WsOut,
};
use super::{fail, App};
use crate::auth::jwt::{Claims, Scope};
use crate::edge::core::Projection;
use crate::edge::events::ViewerEvent;
use crate::edge::ViewOptions;
use crate::origin::Owner;
use crate::recording::RecordAsk;
use crate::rtc::peers::PeerId;

/// Largest signalling message and frame (see [`WS_MAX_MESSAGE`]).
pub(crate) const MAX_MESSAGE: usize = WS_MAX_MESSAGE;
/// A session that sends more commands than this is misbehaving.
const MAX_COMMANDS: usize = 10_000;

#[derive(Deserialize)]
pub(crate) struct WsQuery {
    token: Option<String>,
}

pub(crate) async fn upgrade(
    State(app): State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
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
    // A room member's publish JWT stops working once the member is demoted or removed; a room
    // participant's viewer JWT once it is removed.
    if let Some(b) = &claims.room {
        if let Some(r) = &app.rooms {
            r.ensure_loaded(&b.room).await;
        }
        let checked = match claims.scope {
            Scope::Publish => super::rooms::check_binding(&app, b),
            Scope::Subscribe => app.room_views.check(&b.room, &b.member_id),
        };
        if let Err(e) = checked {
            return fail(StatusCode::FORBIDDEN, e);
        }
    }
    // Only the stream's owner takes its publications: the lease is this origin's, or free and
    // taken now; another origin's is a 409 naming it.
    let mut publishing = None;
    if claims.scope == Scope::Publish && app.origin.is_some() {
        let stream = &claims.millicast.stream_name;
        if let Err(e) = app.cluster.ensure_owner(stream).await {
            let super::Refusal(status, message) = super::cluster::refusal(e);
            return fail(status, message);
        }
        // The lease is kept while this session is open, published or not yet.
        publishing = Some(app.cluster.publisher_session(stream));
    }
    let sid = app.next_session.fetch_add(1, Ordering::Relaxed);
    let ip = app.client_ip(super::listen::peer_ip(&peer), &headers);
    // tungstenite's defaults (128 KiB read and 128 KiB write buffer) would be most of a
    // viewer's memory; signalling messages are small and few, and a large offer still fits
    // (the read buffer is only the chunk size). A frame over the limit is refused from its
    // header, before its payload is read.
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .read_buffer_size(socket::WS_BUFFER)
        .write_buffer_size(socket::WS_BUFFER)
        .on_upgrade(move |socket| async move {
            session(socket, app, claims, sid, ip).await;
            drop(publishing);
        })
}

/// Outgoing messages of one session: a bounded queue. A full queue means the client does not
/// read; the session then ends ([`Out::overflowed`]). Refusals are counted for the session's
/// limit and logged once.
pub(crate) struct Out {
    tx: mpsc::Sender<WsOut>,
    overflowed: Cell<bool>,
    refused: Cell<u32>,
    sid: u64,
}

impl Out {
    pub(crate) fn send(&self, v: Value) {
        if self.tx.try_send(WsOut::Text(v.to_string().into())).is_err() {
            self.overflowed.set(true);
        }
    }

    fn overflowed(&self) -> bool {
        self.overflowed.get()
    }

    fn refuse(&self, trans_id: Option<u64>, message: String) {
        let n = self.refused.get() + 1;
        self.refused.set(n);
        if n == 1 {
            info!(session = self.sid, trans_id, %message, "command refused (further refusals of this session at debug, counted at its close)");
        } else {
            debug!(session = self.sid, trans_id, %message, "command refused");
        }
        self.send(error_message(trans_id, message));
    }
}

async fn session(socket: WebSocket, app: Arc<App>, claims: Claims, sid: u64, peer: IpAddr) {
    let stream = claims.millicast.stream_name.clone();
    info!(session = sid, stream, scope = ?claims.scope, %peer, "signalling session opened");
    let metrics = app.http_metrics.clone();
    let (sink, mut source) = socket.split();
    let (tx, rx) = mpsc::channel::<WsOut>(WS_OUT_QUEUE);
    let mut writer = tokio::spawn(socket::write_loop(
        sink,
        rx,
        app.limits.ws_ping_every,
        metrics.clone(),
    ));
    // The edge's events for this session's viewer: drained into the bounded queue at once.
    let (events, mut events_rx) = mpsc::unbounded_channel::<ViewerEvent>();
    let out = Out {
        tx: tx.clone(),
        overflowed: Cell::new(false),
        refused: Cell::new(0),
        sid,
    };
    let mut session = Session {
        sid,
        peer,
        seen: HashSet::new(),
        viewer: None,
        events,
        removed: Arc::new(tokio::sync::Notify::new()),
        audience: None,
    };
    let mut audience_tick = tokio::time::interval(AUDIENCE_EVERY);
    audience_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rate = f64::from(WS_COMMANDS_PER_SEC);
    let mut bucket = Bucket::full(2.0 * rate, Instant::now());
    let silence = app.limits.ws_silence_limit;
    let mut writer_done = false;
    let mut drain = app.drain.subscribe();
    let mut told_to_move = false;
    let disconnect = app.sessions.open(sid, &stream, claims.scope);
    let ending: Option<Ending> = loop {
        let msg = tokio::select! {
            Ok(()) = drain.changed(), if !told_to_move => {
                // The SDK's Publish and View listen for `migrate` (and ask for it in `view`'s
                // events): reconnect through the director, then let this session go.
                told_to_move = true;
                if !session.wants("migrate") {
                    continue;
                }
                out.send(json!({
                    "type": "event",
                    "name": "migrate",
                    "data": {"streamId": stream, "reason": "draining"},
                }));
                info!(session = sid, stream, "told to move: this node is draining");
                continue;
            }
            m = tokio::time::timeout(silence, source.next()) => m,
            _ = disconnect.notified() => {
                session.stopped(&out, &stream);
                break Some(Ending {
                    code: super::sessions::CLOSE_DISCONNECTED,
                    reason: "disconnected by the operator: reconnect through the director".into(),
                });
            }
            _ = session.removed.notified() => {
                session.stopped(&out, &stream);
                let room = claims.room.as_ref().map_or("", |b| b.room.as_str());
                break Some(Ending {
                    code: crate::room::CLOSE_ROOM,
                    reason: format!("removed from room {room:?}: this view has ended"),
                });
            }
            _ = audience_tick.tick(), if session.audience.is_some() => {
                let n = viewers_of(&app, &stream).await;
                if let Some(a) = session.audience.as_mut() {
                    for ev in a.update(n, &stream) {
                        out.send(ev);
                    }
                }
                if out.overflowed() {
                    break Some(socket::not_reading(&metrics, WS_OUT_QUEUE));
                }
                continue;
            }
            Some(ev) = events_rx.recv() => {
                if !session.wants(ev.name()) {
                    continue;
                }
                out.send(ev.to_json());
                if out.overflowed() {
                    break Some(socket::not_reading(&metrics, WS_OUT_QUEUE));
                }
                continue;
            }
            _ = &mut writer => {
                writer_done = true;
                break None;
            }
        };
        let msg = match msg {
            Err(_) => break Some(socket::silent(&metrics, silence)),
            Ok(None) => break None,
            Ok(Some(m)) => m,
        };
        match msg {
            Ok(Message::Text(text)) => {
                if let Err(retry) = bucket.take(rate, 2.0 * rate, Instant::now()) {
                    HttpMetrics::add(&metrics.ws_commands_limited);
                    out.refuse(
                        None,
                        format!(
                            "too many commands: at most {WS_COMMANDS_PER_SEC} per second; retry in {} ms",
                            retry.as_millis().max(1)
                        ),
                    );
                } else if session.seen.len() >= MAX_COMMANDS {
                    out.refuse(None, "too many commands on one session".into());
                    break Some(socket::too_many_refused(&metrics, out.refused.get()));
                } else {
                    handle_text(&app, &claims, &out, &mut session, text.as_str());
                }
            }
            Ok(Message::Binary(_)) => out.refuse(
                None,
                "binary messages are not supported: send JSON text".into(),
            ),
            Ok(Message::Close(_)) => break None,
            Ok(_) => continue,
            Err(e) => {
                let ending = socket::read_error(e, &metrics, MAX_MESSAGE);
                if let Some(e) = &ending {
                    info!(session = sid, "{}", e.reason);
                }
                break ending;
            }
        }
        if out.overflowed() {
            break Some(socket::not_reading(&metrics, WS_OUT_QUEUE));
        }
        if out.refused.get() >= WS_MAX_REFUSED {
            break Some(socket::too_many_refused(&metrics, out.refused.get()));
        }
    };
    app.sessions.closed(sid);
    if let Some(origin) = &app.origin {
        origin.drop_owner(Owner::Signalling(sid));
    }
    if let (Some(edge), Some(v)) = (&app.edge, &session.viewer) {
        edge.remove(v.id);
    }
    if let (Some(b), Some(_)) = (&claims.room, &session.viewer) {
        app.room_views.remove_session(&b.room, &b.member_id, sid);
    }
    let refused = out.refused.get();
    match &ending {
        Some(e) => {
            info!(
                session = sid,
                refused,
                code = e.code,
                reason = e.reason.as_str(),
                "signalling session closed by the server"
            )
        }
        None => info!(session = sid, refused, "signalling session closed"),
    }
    drop(out);
    drop(session);
    if writer_done {
        return;
    }
    let closed_by_us = ending.is_some();
    socket::finish(tx, writer, ending).await;
    if closed_by_us {
        socket::linger(source).await;
    }
}

/// What one signalling session holds.
struct Session {
    sid: u64,
    peer: IpAddr,
    seen: HashSet<u64>,
    viewer: Option<ViewerState>,
    /// Where the edge sends this session's viewer events.
    events: mpsc::UnboundedSender<ViewerEvent>,
    /// Told when the room participant this session views for is removed.
    removed: Arc<tokio::sync::Notify>,
    /// A publisher's events about its audience, when its `publish` asked for them.
    audience: Option<Audience>,
}

impl Session {
    /// Whether this session's view asked for events of this name (all, without a list).
    fn wants(&self, name: &str) -> bool {
        match self.viewer.as_ref().and_then(|v| v.events.as_ref()) {
            Some(names) => names.iter().any(|n| n == name),
            None => true,
        }
    }

    /// The server ends this session's view: `stopped` first (Millicast's "the stream was
    /// disconnected"), so the app knows not to wait for a reconnect of it.
    fn stopped(&self, out: &Out, stream: &str) {
        if self.viewer.is_some() && self.wants("stopped") {
            let ev = ViewerEvent::Stopped {
                stream: Arc::from(stream),
            };
            out.send(ev.to_json());
        }
    }
}

/// How often a publisher that asked for audience events is told about its viewers: the
/// viewers' own `viewercount` pace.
const AUDIENCE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A publisher's audience events (Millicast's publisher events): `active` when the stream's
/// first viewer arrives, `inactive` when its last leaves, `viewercount` when the count changed,
/// each only if its `publish` named it.
struct Audience {
    active: bool,
    inactive: bool,
    viewercount: bool,
    /// The count last told (None: nothing yet).
    last: Option<u64>,
}

impl Audience {
    fn new(names: &[String]) -> Option<Self> {
        let has = |n: &str| names.iter().any(|x| x == n);
        let a = Audience {
            active: has("active"),
            inactive: has("inactive"),
            viewercount: has("viewercount"),
            last: None,
        };
        (a.active || a.inactive || a.viewercount).then_some(a)
    }

    /// The events that `n` viewers now make, in order.
    fn update(&mut self, n: u64, stream: &str) -> Vec<Value> {
        let mut evs = Vec::new();
        if self.last == Some(n) {
            return evs;
        }
        let was = self.last.unwrap_or(0);
        let ev = |name: &str, data: Value| json!({"type": "event", "name": name, "data": data});
        if self.active && was == 0 && n > 0 {
            evs.push(ev("active", json!({"streamId": stream})));
        }
        if self.inactive && was > 0 && n == 0 {
            evs.push(ev("inactive", json!({"streamId": stream})));
        }
        if self.viewercount {
            evs.push(ev("viewercount", json!({"viewercount": n})));
        }
        self.last = Some(n);
        evs
    }
}

/// The stream's viewers: every edge's, from the registry when it is shared; else this
/// process's edge (`chorus serve`).
async fn viewers_of(app: &App, stream: &str) -> u64 {
    if app.cluster.shared {
        return app.cluster.registry().viewers(stream).await.unwrap_or(0);
    }
    app.edge.as_ref().map_or(0, |e| e.viewers_of(stream) as u64)
}

struct ViewerState {
    id: PeerId,
    /// Its main and multiplexed tracks by mid; added tracks join the multiplexed ones.
    view: ViewTracks,
    /// Projections into multiplexed tracks: mid -> sourceId.
    projected: Vec<(String, String)>,
    /// The source projected into the main tracks (None: the pinned one).
    main: Option<String>,
    /// Tracks added by `project` (the SDK's `addRemoteTrack`), by mid.
    added: Vec<String>,
    /// The view's `events` list (None: every event).
    events: Option<Vec<String>>,
}

fn handle_text(app: &Arc<App>, claims: &Claims, out: &Out, session: &mut Session, text: &str) {
    let sid = session.sid;
    let WsCommand {
        trans_id,
        name,
        data,
    } = match parse_command(text) {
        Ok(Some(cmd)) => cmd,
        // Clients may send events (none are used) or stray responses.
        Ok(None) => return,
        Err((trans_id, message)) => return out.refuse(trans_id, message),
    };
    if !session.seen.insert(trans_id) {
        return out.refuse(Some(trans_id), format!("duplicate transId {trans_id}"));
    }
    let result = match name.as_str() {
        "publish" => publish(app, claims, session, &data),
        "unpublish" => unpublish(app, claims, sid, &data),
        "view" => match view(app, claims, &data, out, session, trans_id) {
            // The answer is already sent, ahead of the viewer's first events.
            Ok(()) => return,
            Err(e) => Err(e),
        },
        "project" => project(app, &data, session),
        "unproject" => unproject(app, &data, session),
        "select" => select(&data, session),
        "" => Err(CommandError::NoName),
        other => Err(CommandError::Unknown(other.to_owned())),
    };
    match result {
        Ok(data) => out.send(response_message(trans_id, data)),
        Err(e) => out.refuse(Some(trans_id), e.to_string()),
    }
}

/// Why a signalling command was refused: the message of its `error` answer.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("cmd without a name")]
    NoName,
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("this token may view, not publish")]
    ViewToken,
    #[error("this token may publish, not view: get one from /api/director/subscribe")]
    PublishToken,
    #[error("this token is for stream {token:?}, not {asked:?}")]
    OtherStream { token: String, asked: String },
    #[error(transparent)]
    Data(#[from] CmdError),
    #[error(transparent)]
    Flow(#[from] FlowError),
    #[error("nothing published on this session")]
    NothingPublished,
    #[error("this session already views: open another socket for another view")]
    AlreadyViewing,
    /// The command.
    #[error("{0} needs a view on this session first")]
    NoView(&'static str),
}

/// The stream a command names must be the JWT's.
fn check_stream(claims: &Claims, data: &Value, field: &str) -> Result<(), CommandError> {
    match data.get(field).and_then(Value::as_str) {
        Some(n) if n != claims.millicast.stream_name => Err(CommandError::OtherStream {
            token: claims.millicast.stream_name.clone(),
            asked: n.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn publish(
    app: &Arc<App>,
    claims: &Claims,
    session: &mut Session,
    data: &Value,
) -> Result<Value, CommandError> {
    let (sid, peer) = (session.sid, session.peer);
    if claims.scope != Scope::Publish {
        return Err(CommandError::ViewToken);
    }
    check_stream(claims, data, "name")?;
    let PublishCmd {
        sdp,
        source,
        priority,
        events,
        record,
    } = PublishCmd::parse(data)?;
    let published = flow::publish(
        app,
        PublishAsk {
            stream: &claims.millicast.stream_name,
            source,
            offer: sdp,
            room: claims.room.as_ref(),
            owner: Owner::Signalling(sid),
            peer,
            priority,
            record: RecordAsk {
                asked: record,
                allowed: claims.millicast.record,
                by_default: claims.millicast.record_by_default,
            },
        },
    )?;
    // The last publish's list decides, as a reconnect's publish starts a new session anyway.
    if let Some(names) = events {
        session.audience = Audience::new(&names);
    }
    Ok(json!({
        "sdp": published.answer,
        "publisherId": published.publisher_id,
        "clusterId": "chorus",
        "feedId": published.publisher_id,
        "uuid": published.publisher_id,
    }))
}

fn unpublish(
    app: &Arc<App>,
    claims: &Claims,
    sid: u64,
    data: &Value,
) -> Result<Value, CommandError> {
    if claims.scope != Scope::Publish {
        return Err(CommandError::ViewToken);
    }
    let UnpublishCmd { source } = UnpublishCmd::parse(data)?;
    let origin = app.origin.as_ref().ok_or(FlowError::NotAnOrigin)?;
    let n = origin.unpublish(
        &claims.millicast.stream_name,
        source.as_ref(),
        Owner::Signalling(sid),
    );
    if n == 0 {
        return Err(CommandError::NothingPublished);
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
) -> Result<(), CommandError> {
    if app.edge.is_none() {
        return Err(FlowError::NotAnEdge.into());
    }
    if claims.scope != Scope::Subscribe {
        return Err(CommandError::PublishToken);
    }
    if session.viewer.is_some() {
        return Err(CommandError::AlreadyViewing);
    }
    check_stream(claims, data, "streamId")?;
    let ViewCmd {
        sdp,
        pinned,
        excluded,
        events,
    } = ViewCmd::parse(data)?;
    let stream = &claims.millicast.stream_name;
    let prepared = flow::prepare_view(
        app,
        ViewAsk {
            stream,
            offer: sdp,
            opts: ViewOptions {
                pinned,
                excluded,
                max_tracks: None,
            },
            room: claims.room.as_ref(),
            ender: Ender::Session(session.sid, session.removed.clone()),
            peer: session.peer,
            events: session.events.clone(),
        },
    )?;
    let pending = &prepared.pending;
    out.send(response_message(
        trans_id,
        json!({
            "sdp": pending.answer,
            "subscriberId": pending.subscriber_id,
            "streamViewId": pending.subscriber_id,
            "clusterId": "chorus",
            "streamId": stream,
        }),
    ));
    let view = ViewTracks {
        main_audio: pending.main_audio.clone(),
        main_video: pending.main_video.clone(),
        tracks: pending.tracks.clone(),
    };
    // Set before the viewer goes live: its first events are filtered too.
    session.viewer = Some(ViewerState {
        id: pending.id(),
        view,
        projected: Vec::new(),
        main: None,
        added: Vec::new(),
        events,
    });
    prepared.commit();
    Ok(())
}

fn push_projections(app: &Arc<App>, v: &ViewerState) {
    if let Some(edge) = &app.edge {
        let fixed = v
            .projected
            .iter()
            .filter_map(|(mid, src)| {
                v.view
                    .tracks
                    .iter()
                    .position(|m| m == mid)
                    .map(|t| (t as u8, src.clone()))
            })
            .collect();
        let added = v.added.iter().map(|m| Mid::from(m.as_str())).collect();
        edge.project(
            v.id,
            Projection {
                fixed,
                main: v.main.clone(),
                added,
            },
        );
    }
}

/// `project {sourceId, mapping: [{trackId|media, mediaId?}]}`: the source plays in those
/// tracks until unprojected; the other tracks keep following voice activity. No `mediaId` (or
/// the main audio's) is the main track; a mid the offer did not have is a track the SDK added
/// (`addRemoteTrack`), added here as a multiplexed track.
fn project(app: &Arc<App>, data: &Value, session: &mut Session) -> Result<Value, CommandError> {
    let v = session
        .viewer
        .as_mut()
        .ok_or(CommandError::NoView("project"))?;
    let ProjectCmd { source, targets } = ProjectCmd::parse(data, &v.view)?;
    let mut said = Vec::new();
    for t in targets {
        let mid = match t {
            Target::Main => {
                v.main = Some(source.clone());
                said.push(json!({"media": "audio", "mediaId": v.view.main_audio, "main": true}));
                continue;
            }
            Target::Track(mid) => mid,
            Target::Added(mid) => {
                v.view.tracks.push(mid.clone());
                v.added.push(mid.clone());
                mid
            }
        };
        // One source in one multiplexed track: projecting it elsewhere moves it.
        v.projected.retain(|(m, s)| *m != mid && *s != source);
        v.projected.push((mid.clone(), source.clone()));
        said.push(json!({"media": "audio", "mediaId": mid}));
    }
    push_projections(app, v);
    Ok(json!({"sourceId": source, "mapping": said}))
}

fn unproject(app: &Arc<App>, data: &Value, session: &mut Session) -> Result<Value, CommandError> {
    let v = session
        .viewer
        .as_mut()
        .ok_or(CommandError::NoView("unproject"))?;
    let UnprojectCmd { mids } = UnprojectCmd::parse(data)?;
    v.projected.retain(|(m, _)| !mids.contains(m));
    if v.view.main_audio.as_ref().is_some_and(|m| mids.contains(m)) {
        v.main = None;
    }
    push_projections(app, v);
    Ok(json!({}))
}

/// `select {layer}` (see [`cmd::select_layer`]): `{}` is answered with what plays, a named
/// layer is refused, saying why.
fn select(data: &Value, session: &Session) -> Result<Value, CommandError> {
    if session.viewer.is_none() {
        return Err(CommandError::NoView("select"));
    }
    cmd::select_layer(data)?;
    Ok(json!({"layer": {}, "selected": "automatic: the only layer there is"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_marks_the_session_as_not_reading_and_refusals_are_counted() {
        let (tx, _rx) = mpsc::channel(2);
        let out = Out {
            tx,
            overflowed: Cell::new(false),
            refused: Cell::new(0),
            sid: 1,
        };
        out.send(json!({}));
        out.refuse(Some(1), "no".into());
        assert!(!out.overflowed());
        out.send(json!({}));
        assert!(
            out.overflowed(),
            "the third message does not fit a queue of two"
        );
        assert_eq!(out.refused.get(), 1);
    }
}
