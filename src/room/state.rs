//! The rooms' state machine, sans-IO: who is in which room, with which role and permissions,
//! whose hand is up, who talks; what each command changes and whom to tell. Plain data in, data
//! out: connections are numbers, time is an argument, and every outcome is a list of
//! [`Effect`]s for the driver (`super::RoomService`) to carry out.
//!
//! A participant is known by its member id (issued with its room token, also its sourceId). Its
//! record lives from its token's first use until the token expires, connected or not, so a
//! demotion or a removal outlives a reconnect. The audience is counted, not listed: members
//! (those on stage) and raised hands are what everyone sees.

mod stored;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Value};

pub(crate) use stored::Stored;

/// What a participant's token lets it do beyond its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// `room.member.promote`
    MemberPromote,
    /// `room.member.demote`
    MemberDemote,
    /// `room.member.remove`
    MemberRemove,
    /// `room.self.audio_mute`
    SelfAudioMute,
    /// `room.self.audio_unmute`
    SelfAudioUnmute,
    /// `room.member.audio_mute`: mute another member.
    MemberAudioMute,
    /// `room.member.audio_unmute`: unmute another member.
    MemberAudioUnmute,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 7] = [
        Permission::MemberPromote,
        Permission::MemberDemote,
        Permission::MemberRemove,
        Permission::SelfAudioMute,
        Permission::SelfAudioUnmute,
        Permission::MemberAudioMute,
        Permission::MemberAudioUnmute,
    ];

    /// Its name in tokens and commands.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::MemberPromote => "room.member.promote",
            Permission::MemberDemote => "room.member.demote",
            Permission::MemberRemove => "room.member.remove",
            Permission::SelfAudioMute => "room.self.audio_mute",
            Permission::SelfAudioUnmute => "room.self.audio_unmute",
            Permission::MemberAudioMute => "room.member.audio_mute",
            Permission::MemberAudioUnmute => "room.member.audio_unmute",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Permission, RoomError> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| RoomError::UnknownPermission(s.to_owned()))
    }
}

/// Parses a permission list: sorted, without duplicates.
pub(crate) fn parse_permissions<S: AsRef<str>>(list: &[S]) -> Result<Vec<Permission>, RoomError> {
    let mut out = list
        .iter()
        .map(|s| Permission::parse(s.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Reads an optional permission list from a command's data.
fn permissions_field(data: &Value) -> Result<Option<Vec<Permission>>, RoomError> {
    match data.get("permissions") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => {
            let names = a
                .iter()
                .map(|v| v.as_str().ok_or(RoomError::PermissionsNotStrings))
                .collect::<Result<Vec<_>, _>>()?;
            parse_permissions(&names).map(Some)
        }
        Some(_) => Err(RoomError::PermissionsNotStrings),
    }
}

/// Why a room refuses a token, a command or a publication: the message the participant reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
// Each variant reads as its `#[error]` message.
#[allow(missing_docs)]
pub enum RoomError {
    #[error("unknown permission {0:?}; valid permissions: {valid}", valid = Permission::ALL.map(Permission::as_str).join(", "))]
    UnknownPermission(String),
    #[error("permissions must be an array of strings")]
    PermissionsNotStrings,
    #[error("join_as must be \"audience\" or \"member\", not {0:?}")]
    BadRole(String),
    /// The JSON value given.
    #[error("mediaAllowed must be \"audio-only\" or \"all\", not {0}")]
    BadMedia(String),
    /// (permission, command)
    #[error("missing permission {0:?}: {1} is not allowed")]
    MissingPermission(&'static str, String),
    #[error("no participant {id:?} in room {room:?}")]
    NoParticipant { room: String, id: String },
    #[error("room token expired")]
    TokenExpired,
    #[error("member {member:?} was removed from room {room:?}")]
    Removed { room: String, member: String },
    #[error("this connection has left the room")]
    Left,
    /// The command's name.
    #[error("{0} needs data.memberId")]
    NeedsMemberId(String),
    #[error("a member is on stage already: only the audience raises a hand")]
    HandOnStage,
    #[error("{0:?} is a member already")]
    AlreadyMember(String),
    #[error(
        "{0:?} is not connected to the room: only a connected audience participant can be promoted"
    )]
    NotConnected(String),
    #[error("{0:?} is not a member (it is in the audience): only members can be demoted")]
    NotAMember(String),
    #[error("cmd without a name")]
    NoCommandName,
    #[error("unknown command {0:?}; commands: {list}", list = COMMANDS.join(", "))]
    UnknownCommand(String),
    /// (room, member)
    #[error("member {1:?} is unknown in room {0:?}")]
    UnknownMember(String, String),
    /// (room, member)
    #[error("member {1:?} was removed from room {0:?}: its publish token is revoked")]
    PublishRevoked(String, String),
    #[error("member {member:?} is in the audience of room {room:?}{why}: it may not publish", why = if *demoted { " (demoted: this publish token is revoked)" } else { "" })]
    InAudience {
        room: String,
        member: String,
        demoted: bool,
    },
    #[error("this server has no API key (--api-key or CHORUS_API_KEY): it issues no room tokens")]
    NoApiKey,
    #[error("missing API key: send Authorization: Bearer <api key>")]
    MissingApiKey,
    #[error("wrong API key")]
    WrongApiKey,
    /// The sourceId given, quoted, or "the main source".
    #[error("a member of room {room:?} publishes with sourceId {member:?} (its member id) only, not {given}")]
    NotItsSource {
        room: String,
        member: String,
        given: String,
    },
    #[error("member {0:?} may publish audio only (mediaAllowed \"audio-only\"): offer no video")]
    AudioOnly(String),
    #[error("this is an edge: publish at the origin")]
    NotAtOrigin,
    /// (room, member)
    #[error("member {1:?} was removed from room {0:?}: its viewer tokens no longer work")]
    ViewRevoked(String, String),
    /// The cluster did not take the command's write (room, why): nothing changed.
    #[error("room {room:?} was not changed: {why}")]
    NotStored { room: String, why: String },
}

/// Where a participant is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Listens only.
    Audience,
    /// On stage: may publish its own source.
    Member,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Audience => "audience",
            Role::Member => "member",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Role, RoomError> {
        match s {
            "audience" => Ok(Role::Audience),
            "member" => Ok(Role::Member),
            other => Err(RoomError::BadRole(other.to_owned())),
        }
    }
}

/// What a member may publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// Audio only (no video m-line).
    AudioOnly,
    /// Audio, and video on its main track.
    All,
}

impl Media {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Media::AudioOnly => "audio-only",
            Media::All => "all",
        }
    }

    pub(crate) fn parse(v: &Value) -> Result<Media, RoomError> {
        match v.as_str() {
            Some("audio-only") => Ok(Media::AudioOnly),
            Some("all") => Ok(Media::All),
            _ => Err(RoomError::BadMedia(v.to_string())),
        }
    }
}

/// What a checked room token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The room's name.
    pub room: String,
    /// The participant's member id (its sourceId too).
    pub member: String,
    /// Its display name.
    pub user_name: String,
    /// The role it joins as.
    pub role: Role,
    /// Its permissions.
    pub permissions: Vec<Permission>,
    /// Unix seconds.
    pub expires: u64,
}

#[derive(Debug, Clone)]
struct Participant {
    user_name: String,
    role: Role,
    permissions: Vec<Permission>,
    media: Media,
    /// Publish generation: publish JWTs carry it; a demotion or removal moves it on.
    generation: u32,
    hand: bool,
    muted: bool,
    talking: bool,
    /// The room socket, while connected.
    conn: Option<u64>,
    removed: bool,
    expires: u64,
}

impl Participant {
    fn view(&self, id: &str) -> Value {
        json!({
            "memberId": id,
            "userName": self.user_name,
            "role": self.role.as_str(),
            "permissions": self.permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "mediaAllowed": self.media.as_str(),
            "hand": self.hand,
            "muted": self.muted,
            "talking": self.talking,
        })
    }

    fn may(&self, p: Permission, command: &str) -> Result<(), RoomError> {
        if self.permissions.contains(&p) {
            Ok(())
        } else {
            Err(RoomError::MissingPermission(p.as_str(), command.to_owned()))
        }
    }
}

#[derive(Default)]
struct Room {
    people: BTreeMap<String, Participant>,
    /// Members whose stored record (see [`Stored`]) changed since it was last written out.
    dirty: BTreeSet<String>,
    /// The stream's viewers on every edge together (with a shared registry; else 0).
    edge_viewers: usize,
}

impl Room {
    /// Connections of everyone in the room but `except`.
    fn conns(&self, except: Option<u64>) -> Vec<u64> {
        self.people
            .values()
            .filter_map(|p| p.conn)
            .filter(|c| Some(*c) != except)
            .collect()
    }

    /// The audience's room sockets here, or, when more, the stream's viewers on every edge
    /// minus the members on stage (who listen too): an audience that views without a room
    /// socket, or whose socket is at another origin, still counts.
    fn audience_count(&self) -> usize {
        let (mut audience, mut members) = (0, 0);
        for p in self.people.values().filter(|p| p.conn.is_some()) {
            match p.role {
                Role::Audience => audience += 1,
                Role::Member => members += 1,
            }
        }
        audience.max(self.edge_viewers.saturating_sub(members))
    }

    fn snapshot(&self, name: &str, me: &str) -> Value {
        let connected = || self.people.iter().filter(|(_, p)| p.conn.is_some());
        let members: Vec<Value> = connected()
            .filter(|(_, p)| p.role == Role::Member)
            .map(|(id, p)| p.view(id))
            .collect();
        let hands: Vec<Value> = connected()
            .filter(|(_, p)| p.hand)
            .map(|(id, p)| json!({"memberId": id, "userName": p.user_name}))
            .collect();
        json!({
            "room": name,
            "streamName": name,
            "you": self.people.get(me).map(|p| p.view(me)),
            "members": members,
            "hands": hands,
            "audienceCount": self.audience_count(),
        })
    }

    fn get(&self, room: &str, id: &str) -> Result<&Participant, RoomError> {
        self.people
            .get(id)
            .filter(|p| !p.removed)
            .ok_or_else(|| RoomError::NoParticipant {
                room: room.to_owned(),
                id: id.to_owned(),
            })
    }
}

/// What the driver must do after a change, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send this `{"type":"event",...}` message to these room connections.
    Send {
        /// The room connections.
        to: Vec<u64>,
        /// The message.
        event: Value,
    },
    /// Send `member.promoted` with fresh publish credentials (generation `generation`) to `conn`.
    Credentials {
        /// The member's room connection.
        conn: u64,
        /// Its room.
        room: String,
        /// Its member id.
        member: String,
        /// The publish generation the credentials carry.
        generation: u32,
    },
    /// Close this room connection, telling it why.
    Close {
        /// The room connection.
        conn: u64,
        /// Why.
        reason: String,
    },
    /// Tell the operator's backend: a webhook of type `room`, event `event`.
    Hook {
        /// `member.joined`, `member.left`, `member.promoted`, `member.demoted`,
        /// `member.removed` or `hand.raised`.
        event: &'static str,
        /// Its data: `room`, `memberId`, and what the event adds (`role`, `by`, `userName`).
        data: Value,
    },
    /// Mute (or unmute) the member's audio at the origin: while muted, nothing it sends is
    /// relayed to any edge, so no viewer hears it.
    Mute {
        /// Its room.
        room: String,
        /// Its member id.
        member: String,
        /// Muted or not.
        muted: bool,
    },
    /// Stop the member's publication at the origin now.
    StopPublishing {
        /// Its room.
        room: String,
        /// Its member id.
        member: String,
    },
}

/// The origin forgets a member's mute (a demotion or promotion starts it unmuted).
fn unmute(room: &str, member: &str) -> Effect {
    Effect::Mute {
        room: room.to_owned(),
        member: member.to_owned(),
        muted: false,
    }
}

/// A room event message.
pub(crate) fn event(name: &str, data: Value) -> Value {
    json!({"type": "event", "name": name, "data": data})
}

/// What a publish JWT may do, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRight {
    /// The member's current publish generation.
    pub generation: u32,
    /// What it may publish.
    pub media: Media,
}

/// Room, participant and member counts of connected participants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Rooms with a connected participant.
    pub rooms: usize,
    /// Connected participants.
    pub participants: usize,
    /// Connected members (on stage).
    pub members: usize,
}

/// Command names the room socket takes.
pub const COMMANDS: [&str; 8] = [
    "hand.raise",
    "hand.lower",
    "promote",
    "demote",
    "remove",
    "audio.mute",
    "audio.unmute",
    "state",
];

/// Every room's state.
#[derive(Default)]
pub struct Rooms {
    rooms: HashMap<String, Room>,
    /// Keep track of changed records, to be written out (with a shared registry only).
    track: bool,
}

impl Rooms {
    /// Makes sure a token's participant has a record (made from the token on its first use)
    /// and may still come in: not removed, not expired.
    pub(crate) fn admit(&mut self, g: &Grant, now: u64) -> Result<(), RoomError> {
        if g.expires <= now {
            return Err(RoomError::TokenExpired);
        }
        let track = self.track;
        let room = self.rooms.entry(g.room.clone()).or_default();
        if track && !room.people.contains_key(&g.member) {
            room.dirty.insert(g.member.clone());
        }
        let p = room
            .people
            .entry(g.member.clone())
            .or_insert_with(|| Participant {
                user_name: g.user_name.clone(),
                role: g.role,
                permissions: g.permissions.clone(),
                media: Media::AudioOnly,
                generation: 0,
                hand: false,
                muted: false,
                talking: false,
                conn: None,
                removed: false,
                expires: g.expires,
            });
        if p.removed {
            return Err(RoomError::Removed {
                room: g.room.clone(),
                member: g.member.clone(),
            });
        }
        Ok(())
    }

    /// A participant's room socket `conn` opened: it gets the room's state, the others learn
    /// of it. A second socket of the same member takes over from the first, which is closed.
    pub fn join(&mut self, g: &Grant, conn: u64, now: u64) -> Result<Vec<Effect>, RoomError> {
        self.admit(g, now)?;
        let room = self.rooms.get_mut(&g.room).expect("admitted");
        let p = room.people.get_mut(&g.member).expect("admitted");
        let old = p.conn.replace(conn);
        let (role, view) = (p.role, p.view(&g.member));
        let mut fx = Vec::new();
        if let Some(old) = old {
            fx.push(Effect::Close {
                conn: old,
                reason: "another connection of this member took over".into(),
            });
        }
        fx.push(Effect::Send {
            to: vec![conn],
            event: event("room.state", room.snapshot(&g.room, &g.member)),
        });
        if old.is_none() {
            fx.push(Effect::Hook {
                event: "member.joined",
                data: json!({"room": g.room, "memberId": g.member, "role": role.as_str()}),
            });
            let others = room.conns(Some(conn));
            fx.push(match role {
                Role::Member => Effect::Send {
                    to: others,
                    event: event("member.joined", view),
                },
                Role::Audience => Effect::Send {
                    to: others,
                    event: audience_count(room),
                },
            });
        }
        Ok(fx)
    }

    /// Room socket `conn` of `member` closed. Its publication (if any) is not touched: it
    /// belongs to the member's signalling session.
    pub fn leave(&mut self, room_name: &str, member: &str, conn: u64) -> Vec<Effect> {
        let Some(room) = self.rooms.get_mut(room_name) else {
            return Vec::new();
        };
        let Some(p) = room.people.get_mut(member).filter(|p| p.conn == Some(conn)) else {
            return Vec::new();
        };
        p.conn = None;
        let hand = std::mem::take(&mut p.hand);
        let role = p.role;
        if hand && self.track {
            room.dirty.insert(member.to_owned());
        }
        let mut fx = Vec::new();
        let to = room.conns(None);
        if hand {
            fx.push(Effect::Send {
                to: to.clone(),
                event: event("hand.lowered", json!({"memberId": member})),
            });
        }
        fx.push(Effect::Send {
            event: match role {
                Role::Member => event("member.left", json!({"memberId": member})),
                Role::Audience => audience_count(room),
            },
            to,
        });
        fx.push(Effect::Hook {
            event: "member.left",
            data: json!({"room": room_name, "memberId": member, "role": role.as_str()}),
        });
        fx
    }

    /// One command of `member`'s room socket `conn`: the response data and the effects. The
    /// records it changed (the member's own, its target's) are marked to be written out.
    pub fn command(
        &mut self,
        room_name: &str,
        member: &str,
        conn: u64,
        name: &str,
        data: &Value,
    ) -> Result<(Value, Vec<Effect>), RoomError> {
        if !self.track {
            return self.run_command(room_name, member, conn, name, data);
        }
        let touched = [Some(member), data.get("memberId").and_then(Value::as_str)];
        let before = self.save(room_name, touched.iter().flatten().copied());
        let out = self.run_command(room_name, member, conn, name, data)?;
        self.mark_changed(room_name, &before);
        Ok(out)
    }

    fn run_command(
        &mut self,
        room_name: &str,
        member: &str,
        conn: u64,
        name: &str,
        data: &Value,
    ) -> Result<(Value, Vec<Effect>), RoomError> {
        let room = self.rooms.get_mut(room_name).ok_or(RoomError::Left)?;
        let me = room
            .people
            .get(member)
            .filter(|p| p.conn == Some(conn) && !p.removed)
            .ok_or(RoomError::Left)?;
        let target = || -> Result<String, RoomError> {
            data.get("memberId")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| RoomError::NeedsMemberId(name.to_owned()))
        };
        match name {
            "state" => Ok((room.snapshot(room_name, member), Vec::new())),
            "hand.raise" => {
                if me.role == Role::Member {
                    return Err(RoomError::HandOnStage);
                }
                let p = room.people.get_mut(member).expect("checked");
                if p.hand {
                    return Ok((json!({"hand": true}), Vec::new()));
                }
                p.hand = true;
                let data = json!({"memberId": member, "userName": p.user_name});
                let mut hook = data.clone();
                hook["room"] = json!(room_name);
                let fx = vec![
                    Effect::Send {
                        to: room.conns(None),
                        event: event("hand.raised", data),
                    },
                    Effect::Hook {
                        event: "hand.raised",
                        data: hook,
                    },
                ];
                Ok((json!({"hand": true}), fx))
            }
            "hand.lower" => {
                let p = room.people.get_mut(member).expect("checked");
                if !std::mem::take(&mut p.hand) {
                    return Ok((json!({"hand": false}), Vec::new()));
                }
                let fx = vec![Effect::Send {
                    to: room.conns(None),
                    event: event("hand.lowered", json!({"memberId": member})),
                }];
                Ok((json!({"hand": false}), fx))
            }
            "promote" => {
                me.may(Permission::MemberPromote, "promote")?;
                let id = target()?;
                let permissions = permissions_field(data)?.unwrap_or_else(|| {
                    vec![Permission::SelfAudioMute, Permission::SelfAudioUnmute]
                });
                let media = match data.get("mediaAllowed") {
                    None | Some(Value::Null) => Media::AudioOnly,
                    Some(v) => Media::parse(v)?,
                };
                let t = room.get(room_name, &id)?;
                if t.role == Role::Member {
                    return Err(RoomError::AlreadyMember(id));
                }
                let Some(t_conn) = t.conn else {
                    return Err(RoomError::NotConnected(id));
                };
                let t = room.people.get_mut(&id).expect("found above");
                t.role = Role::Member;
                t.permissions = permissions;
                t.media = media;
                let was_muted = std::mem::take(&mut t.muted);
                let hand = std::mem::take(&mut t.hand);
                let (generation, view) = (t.generation, t.view(&id));
                let to = room.conns(None);
                let mut fx = Vec::new();
                if was_muted {
                    fx.push(unmute(room_name, &id));
                }
                if hand {
                    fx.push(Effect::Send {
                        to: to.clone(),
                        event: event("hand.lowered", json!({"memberId": id})),
                    });
                }
                fx.push(Effect::Send {
                    to: to.clone(),
                    event: event("member.updated", view),
                });
                fx.push(Effect::Send {
                    to,
                    event: audience_count(room),
                });
                fx.push(Effect::Credentials {
                    conn: t_conn,
                    room: room_name.to_owned(),
                    member: id.clone(),
                    generation,
                });
                fx.push(Effect::Hook {
                    event: "member.promoted",
                    data: json!({"room": room_name, "memberId": id, "by": member}),
                });
                Ok((json!({"memberId": id, "role": "member"}), fx))
            }
            "demote" => {
                let id = target()?;
                // Leaving the stage is every member's right; sending others back is not.
                if id != member {
                    me.may(Permission::MemberDemote, "demote")?;
                }
                let t = room.get(room_name, &id)?;
                if t.role != Role::Member {
                    return Err(RoomError::NotAMember(id));
                }
                let t = room.people.get_mut(&id).expect("found above");
                t.role = Role::Audience;
                t.generation += 1;
                let was_muted = std::mem::take(&mut t.muted);
                let was_talking = std::mem::take(&mut t.talking);
                let (connected, view) = (t.conn.is_some(), t.view(&id));
                let to = room.conns(None);
                let mut fx = vec![Effect::StopPublishing {
                    room: room_name.to_owned(),
                    member: id.clone(),
                }];
                if was_muted {
                    fx.push(unmute(room_name, &id));
                }
                if was_talking {
                    fx.push(Effect::Send {
                        to: to.clone(),
                        event: event("member.talking", json!({"memberId": id, "talking": false})),
                    });
                }
                fx.push(Effect::Send {
                    to: to.clone(),
                    event: event("member.updated", view),
                });
                if connected {
                    fx.push(Effect::Send {
                        to,
                        event: audience_count(room),
                    });
                }
                fx.push(Effect::Hook {
                    event: "member.demoted",
                    data: json!({"room": room_name, "memberId": id, "by": member}),
                });
                Ok((json!({"memberId": id, "role": "audience"}), fx))
            }
            "remove" => {
                me.may(Permission::MemberRemove, "remove")?;
                let id = target()?;
                room.get(room_name, &id)?;
                let t = room.people.get_mut(&id).expect("found above");
                t.removed = true;
                t.generation += 1;
                let hand = std::mem::take(&mut t.hand);
                t.talking = false;
                let role = t.role;
                let gone = t.conn.take();
                let to = room.conns(None);
                let mut fx = vec![Effect::StopPublishing {
                    room: room_name.to_owned(),
                    member: id.clone(),
                }];
                // Removing a listener with a raised hand (the only listeners a page lists) must
                // take the hand off everyone's list.
                if hand {
                    fx.push(Effect::Send {
                        to: to.clone(),
                        event: event("hand.lowered", json!({"memberId": id})),
                    });
                }
                if let Some(c) = gone {
                    fx.push(Effect::Send {
                        to: vec![c],
                        event: event("room.removed", json!({"memberId": id, "by": member})),
                    });
                    fx.push(Effect::Close {
                        conn: c,
                        reason: "removed from the room".into(),
                    });
                }
                fx.push(Effect::Send {
                    event: match role {
                        Role::Member => {
                            event("member.left", json!({"memberId": id, "removed": true}))
                        }
                        Role::Audience => audience_count(room),
                    },
                    to,
                });
                fx.push(Effect::Hook {
                    event: "member.removed",
                    data: json!({"room": room_name, "memberId": id, "by": member}),
                });
                Ok((json!({"memberId": id, "removed": true}), fx))
            }
            "audio.mute" | "audio.unmute" => {
                let mute = name == "audio.mute";
                // Without a memberId (or with one's own): oneself; another member needs the
                // room.member.* permission.
                let id = match data.get("memberId").and_then(Value::as_str) {
                    Some(id) if id != member => id.to_owned(),
                    _ => member.to_owned(),
                };
                let need = match (id == member, mute) {
                    (true, true) => Permission::SelfAudioMute,
                    (true, false) => Permission::SelfAudioUnmute,
                    (false, true) => Permission::MemberAudioMute,
                    (false, false) => Permission::MemberAudioUnmute,
                };
                me.may(need, name)?;
                room.get(room_name, &id)?;
                let p = room.people.get_mut(&id).expect("found above");
                if p.muted == mute {
                    return Ok((json!({"memberId": id, "muted": mute}), Vec::new()));
                }
                p.muted = mute;
                let fx = vec![
                    Effect::Mute {
                        room: room_name.to_owned(),
                        member: id.clone(),
                        muted: mute,
                    },
                    Effect::Send {
                        event: event("member.updated", p.view(&id)),
                        to: room.conns(None),
                    },
                ];
                Ok((json!({"memberId": id, "muted": mute}), fx))
            }
            "" => Err(RoomError::NoCommandName),
            other => Err(RoomError::UnknownCommand(other.to_owned())),
        }
    }

    /// A source of the stream `room_name` started or stopped talking (the edges' voice
    /// activity). Only members' flips are told, each once.
    pub fn talking(&mut self, room_name: &str, source: &str, talking: bool) -> Vec<Effect> {
        let Some(room) = self.rooms.get_mut(room_name) else {
            return Vec::new();
        };
        let Some(p) = room.people.get_mut(source) else {
            return Vec::new();
        };
        if p.removed || p.talking == talking || (talking && p.role != Role::Member) {
            return Vec::new();
        }
        p.talking = talking;
        vec![Effect::Send {
            to: room.conns(None),
            event: event(
                "member.talking",
                json!({"memberId": source, "talking": talking}),
            ),
        }]
    }

    /// May `member` publish in `room_name` now, with a JWT of `generation` (None: asking for a
    /// new one)?
    pub fn may_publish(
        &self,
        room_name: &str,
        member: &str,
        generation: Option<u32>,
    ) -> Result<PublishRight, RoomError> {
        let who = || (room_name.to_owned(), member.to_owned());
        let p = self
            .rooms
            .get(room_name)
            .and_then(|r| r.people.get(member))
            .ok_or_else(|| RoomError::UnknownMember(who().0, who().1))?;
        if p.removed {
            return Err(RoomError::PublishRevoked(who().0, who().1));
        }
        if generation.is_some_and(|g| g != p.generation) || p.role != Role::Member {
            let (room, member) = who();
            return Err(RoomError::InAudience {
                room,
                member,
                demoted: generation.is_some(),
            });
        }
        Ok(PublishRight {
            generation: p.generation,
            media: p.media,
        })
    }

    /// Forgets participants whose token expired and who are not connected, and empty rooms.
    pub fn expire(&mut self, now: u64) {
        for room in self.rooms.values_mut() {
            room.people
                .retain(|_, p| p.conn.is_some() || p.expires > now);
        }
        self.rooms.retain(|_, r| !r.people.is_empty());
    }

    /// Counts of connected participants, for the metrics.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for room in self.rooms.values() {
            let connected = room.people.values().filter(|p| p.conn.is_some());
            let (mut n, mut members) = (0, 0);
            for p in connected {
                n += 1;
                members += usize::from(p.role == Role::Member);
            }
            g.rooms += usize::from(n > 0);
            g.participants += n;
            g.members += members;
        }
        g
    }
}

fn audience_count(room: &Room) -> Value {
    event(
        "room.audience_count",
        json!({"count": room.audience_count()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;

    fn grant(member: &str, role: Role, permissions: &[Permission]) -> Grant {
        Grant {
            room: "r".into(),
            member: member.into(),
            user_name: member.to_uppercase(),
            role,
            permissions: permissions.to_vec(),
            expires: NOW + 100,
        }
    }

    fn host() -> Grant {
        grant(
            "host",
            Role::Member,
            &[
                Permission::MemberPromote,
                Permission::MemberDemote,
                Permission::MemberRemove,
            ],
        )
    }

    /// The names of the events sent to `conn`, in order.
    fn names_to(fx: &[Effect], conn: u64) -> Vec<String> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send { to, event } if to.contains(&conn) => {
                    Some(event["name"].as_str().unwrap().to_owned())
                }
                _ => None,
            })
            .collect()
    }

    fn sent<'a>(fx: &'a [Effect], name: &str) -> &'a Value {
        fx.iter()
            .find_map(|e| match e {
                Effect::Send { event, .. } if event["name"] == name => Some(&event["data"]),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {name} in {fx:?}"))
    }

    /// A room with the host (conn 1) and audience a (conn 2) and b (conn 3).
    fn room() -> Rooms {
        let mut r = Rooms::default();
        r.join(&host(), 1, NOW).unwrap();
        r.join(&grant("a", Role::Audience, &[]), 2, NOW).unwrap();
        r.join(&grant("b", Role::Audience, &[]), 3, NOW).unwrap();
        r
    }

    #[test]
    fn joining_sends_a_snapshot_and_tells_the_others() {
        let mut r = room();
        let fx = r.join(&grant("c", Role::Member, &[]), 4, NOW).unwrap();
        assert_eq!(names_to(&fx, 4), ["room.state"]);
        assert_eq!(names_to(&fx, 1), ["member.joined"]);
        let state = sent(&fx, "room.state");
        assert_eq!(state["audienceCount"], 2);
        assert_eq!(state["you"]["role"], "member");
        let members: Vec<&str> = state["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["memberId"].as_str().unwrap())
            .collect();
        assert_eq!(members, ["c", "host"]);
        // The audience is counted, not listed.
        let fx = r.join(&grant("d", Role::Audience, &[]), 5, NOW).unwrap();
        assert_eq!(sent(&fx, "room.audience_count")["count"], 3);
        assert_eq!(
            r.gauges(),
            Gauges {
                rooms: 1,
                participants: 5,
                members: 2
            }
        );
    }

    #[test]
    fn raise_promote_and_demote() {
        let mut r = room();
        let (_, fx) = r.command("r", "a", 2, "hand.raise", &json!({})).unwrap();
        assert_eq!(sent(&fx, "hand.raised")["memberId"], "a");
        assert_eq!(names_to(&fx, 1), ["hand.raised"]);
        // Raising twice says nothing new.
        assert!(r
            .command("r", "a", 2, "hand.raise", &json!({}))
            .unwrap()
            .1
            .is_empty());
        let (resp, fx) = r
            .command("r", "host", 1, "promote", &json!({"memberId": "a"}))
            .unwrap();
        assert_eq!(resp["role"], "member");
        assert_eq!(
            names_to(&fx, 3),
            ["hand.lowered", "member.updated", "room.audience_count"]
        );
        assert_eq!(sent(&fx, "member.updated")["role"], "member");
        assert_eq!(sent(&fx, "room.audience_count")["count"], 1);
        assert!(fx.contains(&Effect::Credentials {
            conn: 2,
            room: "r".into(),
            member: "a".into(),
            generation: 0
        }));
        let right = r.may_publish("r", "a", Some(0)).unwrap();
        assert_eq!(right.media, Media::AudioOnly);
        assert!(r
            .may_publish("r", "b", None)
            .unwrap_err()
            .to_string()
            .contains("audience"));
        // A talks, then is demoted: its publication stops, its JWT of generation 0 is revoked.
        assert_eq!(r.talking("r", "a", true).len(), 1);
        assert!(r.talking("r", "a", true).is_empty());
        let (_, fx) = r
            .command("r", "host", 1, "demote", &json!({"memberId": "a"}))
            .unwrap();
        assert_eq!(
            fx[0],
            Effect::StopPublishing {
                room: "r".into(),
                member: "a".into()
            }
        );
        assert_eq!(sent(&fx, "member.talking")["talking"], false);
        assert_eq!(sent(&fx, "member.updated")["role"], "audience");
        assert_eq!(sent(&fx, "room.audience_count")["count"], 2);
        let err = r.may_publish("r", "a", Some(0)).unwrap_err().to_string();
        assert!(err.contains("revoked"), "{err}");
        assert!(r.may_publish("r", "a", None).is_err());
        // Still in the room, as audience: it may raise its hand again, and be promoted again
        // with a new generation.
        assert!(r.command("r", "a", 2, "hand.raise", &json!({})).is_ok());
        let (_, fx) = r
            .command(
                "r",
                "host",
                1,
                "promote",
                &json!({"memberId": "a", "mediaAllowed": "all", "permissions": ["room.self.audio_mute"]}),
            )
            .unwrap();
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Credentials { generation: 1, .. })));
        assert_eq!(r.may_publish("r", "a", Some(1)).unwrap().media, Media::All);
        assert!(r.may_publish("r", "a", Some(0)).is_err());
        // Talking from the audience is not told.
        assert!(r.talking("r", "b", true).is_empty());
    }

    #[test]
    fn refusals_name_what_is_missing() {
        let mut r = room();
        let err = r
            .command("r", "a", 2, "promote", &json!({"memberId": "b"}))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "missing permission \"room.member.promote\": promote is not allowed"
        );
        let err = r
            .command("r", "a", 2, "demote", &json!({"memberId": "host"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("room.member.demote"), "{err}");
        let err = r
            .command("r", "host", 1, "demote", &json!({"memberId": "b"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a member"), "{err}");
        let err = r
            .command("r", "host", 1, "demote", &json!({"memberId": "nobody"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no participant \"nobody\""), "{err}");
        let err = r
            .command("r", "host", 1, "promote", &json!({"memberId": "host"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("member already"), "{err}");
        let err = r
            .command("r", "host", 1, "promote", &json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs data.memberId"), "{err}");
        let err = r
            .command(
                "r",
                "host",
                1,
                "promote",
                &json!({"memberId": "a", "permissions": ["room.fly"]}),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown permission \"room.fly\"") && err.contains("room.member.promote")
        );
        let err = r
            .command(
                "r",
                "host",
                1,
                "promote",
                &json!({"memberId": "a", "mediaAllowed": "smell"}),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("mediaAllowed"), "{err}");
        let err = r
            .command("r", "host", 1, "hand.raise", &json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only the audience"), "{err}");
        let err = r
            .command("r", "a", 2, "audio.mute", &json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("room.self.audio_mute"), "{err}");
        let err = r
            .command("r", "a", 2, "dance", &json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown command \"dance\""), "{err}");
        // Not connected: cannot be promoted.
        r.leave("r", "b", 3);
        let err = r
            .command("r", "host", 1, "promote", &json!({"memberId": "b"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not connected"), "{err}");
        // Nothing changed.
        assert_eq!(r.gauges().members, 1);
    }

    #[test]
    fn a_moderator_mutes_others_and_the_origin_is_told() {
        let mut r = Rooms::default();
        let m = [Permission::MemberAudioMute, Permission::MemberAudioUnmute];
        r.join(&grant("mod", Role::Member, &m), 1, NOW).unwrap();
        r.join(&grant("a", Role::Member, &[]), 2, NOW).unwrap();
        r.join(&grant("b", Role::Member, &[]), 3, NOW).unwrap();
        let mute = |muted| Effect::Mute {
            room: "r".into(),
            member: "a".into(),
            muted,
        };
        // Another member without room.member.audio_mute: refused, nothing changes.
        let err = r
            .command("r", "b", 3, "audio.mute", &json!({"memberId": "a"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("room.member.audio_mute"), "{err}");
        let (resp, fx) = r
            .command("r", "mod", 1, "audio.mute", &json!({"memberId": "a"}))
            .unwrap();
        assert_eq!(resp, json!({"memberId": "a", "muted": true}));
        assert!(fx.contains(&mute(true)), "{fx:?}");
        assert_eq!(sent(&fx, "member.updated")["muted"], true);
        // a cannot unmute itself without room.self.audio_unmute; the moderator can.
        assert!(r.command("r", "a", 2, "audio.unmute", &json!({})).is_err());
        let (_, fx) = r
            .command("r", "mod", 1, "audio.unmute", &json!({"memberId": "a"}))
            .unwrap();
        assert!(fx.contains(&mute(false)), "{fx:?}");
        // Muted, then sent back to the audience: the origin forgets the mute with it.
        r.command("r", "mod", 1, "audio.mute", &json!({"memberId": "a"}))
            .unwrap();
        let (_, fx) = r
            .command("r", "a", 2, "demote", &json!({"memberId": "a"}))
            .unwrap();
        assert!(fx.contains(&mute(false)), "{fx:?}");
        let err = r
            .command("r", "mod", 1, "audio.mute", &json!({"memberId": "ghost"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ghost"), "{err}");
    }

    #[test]
    fn a_removed_listener_s_raised_hand_goes_down_for_everyone() {
        let mut r = room();
        r.command("r", "a", 2, "hand.raise", &json!({})).unwrap();
        let (_, fx) = r
            .command("r", "host", 1, "remove", &json!({"memberId": "a"}))
            .unwrap();
        for conn in [1, 3] {
            assert_eq!(names_to(&fx, conn), ["hand.lowered", "room.audience_count"]);
        }
        assert_eq!(sent(&fx, "hand.lowered")["memberId"], "a");
        assert_eq!(sent(&fx, "room.audience_count")["count"], 1);
        let (state, _) = r.command("r", "host", 1, "state", &json!({})).unwrap();
        assert_eq!(state["hands"], json!([]));
    }

    #[test]
    fn members_leave_step_down_mute_and_get_removed() {
        let mut r = room();
        r.command("r", "host", 1, "promote", &json!({"memberId": "a"}))
            .unwrap();
        let (_, fx) = r.command("r", "a", 2, "audio.mute", &json!({})).unwrap();
        assert_eq!(sent(&fx, "member.updated")["muted"], true);
        assert!(r
            .command("r", "a", 2, "audio.mute", &json!({}))
            .unwrap()
            .1
            .is_empty());
        // A member steps down by itself, without room.member.demote.
        let (resp, _) = r
            .command("r", "a", 2, "demote", &json!({"memberId": "a"}))
            .unwrap();
        assert_eq!(resp["role"], "audience");
        // The audience's hand goes down when it leaves; a member's leaving is told.
        r.command("r", "b", 3, "hand.raise", &json!({})).unwrap();
        let fx = r.leave("r", "b", 3);
        assert_eq!(names_to(&fx, 1), ["hand.lowered", "room.audience_count"]);
        assert!(r.leave("r", "b", 3).is_empty(), "left already");
        let fx = r.join(&grant("c", Role::Member, &[]), 4, NOW).unwrap();
        assert_eq!(names_to(&fx, 1), ["member.joined"]);
        let fx = r.leave("r", "c", 4);
        assert_eq!(sent(&fx, "member.left")["memberId"], "c");
        // Removal: its socket is told and closed, its token no longer admits it.
        let (_, fx) = r
            .command("r", "host", 1, "remove", &json!({"memberId": "a"}))
            .unwrap();
        assert!(fx.contains(&Effect::Close {
            conn: 2,
            reason: "removed from the room".into()
        }));
        assert_eq!(names_to(&fx, 2), ["room.removed"]);
        assert!(fx.contains(&Effect::StopPublishing {
            room: "r".into(),
            member: "a".into()
        }));
        let err = r
            .join(&grant("a", Role::Audience, &[]), 9, NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("removed"), "{err}");
        assert!(r
            .may_publish("r", "a", None)
            .unwrap_err()
            .to_string()
            .contains("removed"));
        assert!(r
            .command("r", "a", 2, "hand.raise", &json!({}))
            .unwrap_err()
            .to_string()
            .contains("left the room"));
    }

    #[test]
    fn a_second_socket_takes_over_and_records_expire() {
        let mut r = room();
        let fx = r.join(&grant("a", Role::Audience, &[]), 7, NOW).unwrap();
        assert_eq!(
            fx[0],
            Effect::Close {
                conn: 2,
                reason: "another connection of this member took over".into()
            }
        );
        // The others see nothing: the participant never left.
        assert_eq!(names_to(&fx, 1), Vec::<String>::new());
        assert!(
            r.leave("r", "a", 2).is_empty(),
            "the old socket's end changes nothing"
        );
        assert!(r.command("r", "a", 2, "hand.raise", &json!({})).is_err());
        assert!(r.command("r", "a", 7, "hand.raise", &json!({})).is_ok());
        // Expired tokens do not come in; records of gone participants expire with them.
        let mut old = grant("z", Role::Audience, &[]);
        old.expires = NOW;
        assert_eq!(
            r.join(&old, 8, NOW).unwrap_err().to_string(),
            "room token expired"
        );
        r.leave("r", "b", 3);
        r.expire(NOW + 100);
        assert_eq!(r.gauges().participants, 2);
        assert!(r
            .may_publish("r", "b", None)
            .unwrap_err()
            .to_string()
            .contains("unknown"));
        r.leave("r", "host", 1);
        r.leave("r", "a", 7);
        r.expire(NOW + 100);
        assert!(r.rooms.is_empty());
    }

    #[test]
    fn permissions_parse_sorted_and_unique() {
        let p = parse_permissions(&[
            "room.self.audio_mute",
            "room.member.promote",
            "room.self.audio_mute",
        ])
        .unwrap();
        assert_eq!(p, [Permission::MemberPromote, Permission::SelfAudioMute]);
        assert!(parse_permissions(&["room.member.fly"]).is_err());
        assert_eq!(Role::parse("member"), Ok(Role::Member));
        assert!(Role::parse("host")
            .unwrap_err()
            .to_string()
            .contains("join_as"));
    }
}
