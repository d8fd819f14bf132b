//! Rooms: a stream (named like the room) with an audience that listens and members that speak,
//! raised hands, promotion and demotion, talking indicators. The decisions are in `state`
//! (sans-IO); this is its driver: the room sockets' connections, carrying out effects (events,
//! publish credentials, stopping a publication at the origin), the edges' talking reports and
//! the expiry of old records. It runs where the origin runs (`serve`, `origin`).

// Crate-private but for the fuzz targets, which reach it through `crate::fuzzing` (feature
// `tools`): its `pub` items are unreachable in the server build alone, where the lint would
// flag them; the default build still checks them.
#[cfg_attr(not(feature = "tools"), allow(unreachable_pub))]
pub(crate) mod state;
mod store;
pub(crate) mod token;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, Notify};
use tracing::{info, warn};

use crate::auth::jwt::{JwtSigner, RoomBinding, Scope};
use crate::auth::turn::TurnServers;
use crate::auth::{constant_time_eq, random_secret, unix_now, AuthError};
use crate::cluster::Cluster;
use crate::origin::talking::Talking;
use crate::origin::Origin;
use state::{Effect, Gauges, Grant, Permission, PublishRight, Role, RoomError, Rooms};
use token::RoomKeys;

/// What a room socket's writer gets (a close carries [`CLOSE_ROOM`] for the room's own ends).
#[derive(Debug)]
pub(crate) enum ConnMsg {
    Text(Utf8Bytes),
    /// A close frame with this code and reason, then the end.
    Close(u16, String),
}

/// The close code of a room's own ends (`room.removed`, a second socket taking over).
pub(crate) const CLOSE_ROOM: u16 = 4000;

/// A room socket's side of its connection: the bounded queue its writer drains, and what tells
/// it that the queue overflowed (the participant does not read: its socket is closed).
pub(crate) struct ConnTx {
    pub tx: mpsc::Sender<ConnMsg>,
    pub overflow: Arc<Notify>,
}

impl ConnTx {
    fn send(&self, m: ConnMsg) {
        if self.tx.try_send(m).is_err() {
            self.overflow.notify_one();
        }
    }
}

struct Conn {
    tx: ConnTx,
    room: String,
    member: String,
    /// Signalling URL for this participant's publish credentials (as its director would say).
    ws_url: String,
}

#[derive(Default)]
struct Inner {
    rooms: Rooms,
    conns: HashMap<u64, Conn>,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub(crate) struct RoomMetrics {
    pub joins: AtomicU64,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    pub removals: AtomicU64,
}

pub(crate) struct RoomService {
    inner: Mutex<Inner>,
    keys: RoomKeys,
    api_key: Option<String>,
    jwt: Arc<JwtSigner>,
    origin: Arc<Origin>,
    /// The TURN servers a promoted member's publish credentials carry, as a director's do.
    turn: Option<Arc<TurnServers>>,
    next_conn: AtomicU64,
    pub metrics: RoomMetrics,
    /// With a shared registry (`--redis`): where rooms are written through and read back.
    cluster: OnceLock<Arc<Cluster>>,
    /// One room write at a time: a command's write and the write-behind do not interleave.
    gate: tokio::sync::Mutex<()>,
    /// Rooms read back from the registry since this origin last held their stream's lease.
    loaded: Mutex<HashSet<String>>,
}

impl RoomService {
    /// Room tokens are signed with the origin's room-token key `room_key`; members' publish
    /// JWTs with `jwt` (the director's signer). Neither ever leaves the origin. Without an API
    /// key no room token can be issued.
    pub(crate) fn new(
        room_key: &[u8],
        jwt: Arc<JwtSigner>,
        api_key: Option<String>,
        origin: Arc<Origin>,
        turn: Option<Arc<TurnServers>>,
    ) -> Arc<RoomService> {
        Arc::new(RoomService {
            inner: Mutex::new(Inner::default()),
            keys: RoomKeys::new(room_key),
            api_key: api_key.filter(|k| !k.is_empty()),
            jwt,
            origin,
            turn,
            next_conn: AtomicU64::new(1),
            metrics: RoomMetrics::default(),
            cluster: OnceLock::new(),
            gate: tokio::sync::Mutex::new(()),
            loaded: Mutex::default(),
        })
    }

    /// Follows the edges' talking reports and expires old records, for the life of the process.
    pub(crate) fn start(self: &Arc<Self>) {
        let mut talking = self.origin.talking.subscribe();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match talking.recv().await {
                    Ok(t) => me.talking(&t),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "rooms missed talking reports")
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                me.lock().rooms.expire(unix_now());
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn check_api_key(&self, bearer: Option<&str>) -> Result<(), RoomError> {
        match (&self.api_key, bearer) {
            (None, _) => Err(RoomError::NoApiKey),
            (Some(_), None) => Err(RoomError::MissingApiKey),
            (Some(k), Some(b)) if constant_time_eq(k.as_bytes(), b.as_bytes()) => Ok(()),
            (Some(_), Some(_)) => Err(RoomError::WrongApiKey),
        }
    }

    /// A room token for a new participant: (token, member id, expiry in Unix seconds).
    pub(crate) fn issue(
        &self,
        room: &str,
        user_name: &str,
        role: Role,
        permissions: &[Permission],
        ttl_secs: u64,
    ) -> (String, String, u64) {
        let member = format!("m-{}", random_secret(9));
        let (token, exp) = self
            .keys
            .issue(room, &member, user_name, role, permissions, ttl_secs);
        info!(
            room,
            member = member.as_str(),
            user_name,
            role = role.as_str(),
            "room token issued"
        );
        (token, member, exp)
    }

    pub(crate) fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        self.keys.verify(token)
    }

    /// The token's participant may use it (not removed from the room).
    pub(crate) fn admit(&self, g: &Grant) -> Result<(), RoomError> {
        self.lock().rooms.admit(g, unix_now())
    }

    pub(crate) fn may_publish(
        &self,
        room: &str,
        member: &str,
        generation: Option<u32>,
    ) -> Result<PublishRight, RoomError> {
        self.lock().rooms.may_publish(room, member, generation)
    }

    /// A participant's room socket opened, writing what it gets to `tx`: its connection id.
    pub(crate) fn connect(&self, g: &Grant, ws_url: String, tx: ConnTx) -> Result<u64, RoomError> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let fx = inner.rooms.join(g, conn, unix_now())?;
        inner.conns.insert(
            conn,
            Conn {
                tx,
                room: g.room.clone(),
                member: g.member.clone(),
                ws_url,
            },
        );
        self.metrics.joins.fetch_add(1, Ordering::Relaxed);
        info!(
            room = g.room.as_str(),
            member = g.member.as_str(),
            user_name = g.user_name.as_str(),
            role = g.role.as_str(),
            conn,
            "participant joined the room"
        );
        self.apply(inner, fx);
        Ok(conn)
    }

    /// A room socket closed.
    pub(crate) fn disconnect(&self, conn: u64) {
        let mut inner = self.lock();
        let Some(c) = inner.conns.remove(&conn) else {
            return;
        };
        let fx = inner.rooms.leave(&c.room, &c.member, conn);
        info!(
            room = c.room.as_str(),
            member = c.member.as_str(),
            conn,
            "participant left the room"
        );
        self.apply(inner, fx);
    }

    /// One command of a room socket: its response data, or why it was refused. With a shared
    /// registry a change is written through (fenced by the stream's lease) before it is
    /// acknowledged or told to anyone; a refused write leaves the room as it was.
    pub(crate) async fn command(
        &self,
        conn: u64,
        name: &str,
        data: &Value,
    ) -> Result<Value, RoomError> {
        match self.cluster.get() {
            Some(cluster) if name != "state" => {
                self.command_through(cluster, conn, name, data).await
            }
            _ => {
                let mut inner = self.lock();
                let (room, member) = Self::who(&inner, conn)?;
                let (resp, fx) = inner.rooms.command(&room, &member, conn, name, data)?;
                self.after_command(inner, &room, &member, name, data, fx);
                Ok(resp)
            }
        }
    }

    fn who(inner: &Inner, conn: u64) -> Result<(String, String), RoomError> {
        match inner.conns.get(&conn) {
            Some(c) => Ok((c.room.clone(), c.member.clone())),
            None => Err(RoomError::Left),
        }
    }

    /// A command's outcome carried out: counters, removals told to the edges, effects.
    fn after_command(
        &self,
        inner: MutexGuard<'_, Inner>,
        room: &str,
        member: &str,
        name: &str,
        data: &Value,
        fx: Vec<Effect>,
    ) {
        let room = room.to_owned();
        let change = match name {
            "promote" => Some((&self.metrics.promotions, "member promoted")),
            "demote" => Some((&self.metrics.demotions, "member demoted")),
            "remove" => Some((&self.metrics.removals, "member removed")),
            _ => None,
        };
        if let Some((counter, what)) = change {
            counter.fetch_add(1, Ordering::Relaxed);
            let target = data.get("memberId").and_then(Value::as_str).unwrap_or("");
            if name == "remove" {
                // Every edge (this process's too, over its link) ends the member's views.
                let _ = self
                    .origin
                    .revocations
                    .send((room.clone(), target.to_owned()));
            }
            info!(room = room.as_str(), by = member, member = target, "{what}");
        }
        self.apply(inner, fx);
    }

    fn talking(&self, t: &Talking) {
        let mut inner = self.lock();
        let fx = inner.rooms.talking(&t.stream, &t.source, t.talking);
        self.apply(inner, fx);
    }

    pub(crate) fn gauges(&self) -> Gauges {
        self.lock().rooms.gauges()
    }

    /// Carries out effects: messages while the lock is held (queueing never blocks), the origin
    /// after it is released.
    fn apply(&self, inner: MutexGuard<'_, Inner>, fx: Vec<Effect>) {
        let mut stops = Vec::new();
        let mut mutes = Vec::new();
        for e in fx {
            match e {
                Effect::Send { to, event } => {
                    let text = Utf8Bytes::from(event.to_string());
                    for c in to {
                        if let Some(conn) = inner.conns.get(&c) {
                            conn.tx.send(ConnMsg::Text(text.clone()));
                        }
                    }
                }
                Effect::Credentials {
                    conn,
                    room,
                    member,
                    generation,
                } => {
                    let Some(c) = inner.conns.get(&conn) else {
                        continue;
                    };
                    let jwt = self.jwt.issue_bound(
                        &room,
                        Scope::Publish,
                        Some(RoomBinding {
                            room: room.clone(),
                            member_id: member.clone(),
                            generation,
                        }),
                    );
                    let mut data = crate::millicast::director_answer(
                        c.ws_url.clone(),
                        jwt,
                        self.turn.as_deref(),
                        &room,
                    );
                    data["streamName"] = json!(room);
                    data["sourceId"] = json!(member);
                    data["memberId"] = json!(member);
                    let event = state::event("member.promoted", data);
                    c.tx.send(ConnMsg::Text(event.to_string().into()));
                }
                Effect::Close { conn, reason } => {
                    if let Some(c) = inner.conns.get(&conn) {
                        c.tx.send(ConnMsg::Close(CLOSE_ROOM, reason));
                    }
                }
                Effect::StopPublishing { room, member } => stops.push((room, member)),
                // Only queued (never waits), so it may go out under the lock.
                Effect::Hook { event, data } => self.origin.hooks.emit("room", event, data),
                Effect::Mute {
                    room,
                    member,
                    muted,
                } => mutes.push((room, member, muted)),
            }
        }
        drop(inner);
        for (room, member, muted) in mutes {
            let feeds = self.origin.set_muted(&room, &Some(member.clone()), muted);
            info!(
                room = room.as_str(),
                member = member.as_str(),
                muted,
                feeds,
                "member's mute applied at the origin"
            );
        }
        for (room, member) in stops {
            let stopped = self.origin.unpublish_source(&room, &Some(member.clone()));
            info!(
                room = room.as_str(),
                member = member.as_str(),
                stopped,
                "member's publication stopped"
            );
        }
    }
}
