//! The rooms' state machine (`room::state::Rooms`, as `chorus::fuzzing::Rooms`) driven by an arbitrary script: up to
//! six participants in two rooms, with arbitrary roles, permissions and token lifetimes, joining
//! and leaving (also with stale connection ids), sending every room command with arbitrary
//! targets and data, or arbitrary text through the room socket's parser (`parse_command`), talking
//! reports for anyone, time passing and records expiring.
//!
//! Checked against a model of the connections (which the effects must agree with):
//! - nothing panics; a refused command changes nothing the model sees and says why;
//! - a connected participant is never told "this connection has left the room", and a stale
//!   connection always is; a join is refused iff the token expired or the member was removed;
//! - effects only address open connections, each at most once per message; `Close` only closes
//!   open ones (the model then forgets them); credentials go to the member's own connection with
//!   its current publish generation;
//! - after every step, in every room: the members on stage and the raised hands are disjoint,
//!   every one of them is connected, members + audience = connected participants, a connected
//!   participant may publish iff it is on stage, `gauges` add up over the rooms; and the own
//!   view of the participant the step was about says a role that agrees (a member has no raised
//!   hand, an audience participant is not talking);
//! - a removed member stays out (no join, no publishing), and once demoted or removed, every
//!   publish generation it was given before stays revoked.
#![no_main]

use std::collections::{HashMap, HashSet};

use arbitrary::{Arbitrary, Unstructured};
use chorus::fuzzing::{parse_command, Effect, Grant, Permission, Role, Rooms, COMMANDS};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const LEFT: &str = "this connection has left the room";
const ROOMS: [&str; 2] = ["r0", "r1"];
const START: u64 = 1_000;

#[derive(Debug, Arbitrary)]
struct Person {
    room: bool,
    member: bool,
    permissions: u8,
    ttl: u8,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Join {
        who: u8,
    },
    Leave {
        who: u8,
        stale: bool,
    },
    Cmd {
        who: u8,
        name: u8,
        target: u8,
        permissions: Option<Vec<u8>>,
        media: u8,
    },
    Raw {
        who: u8,
        text: String,
    },
    Talking {
        who: u8,
        talking: bool,
        other_room: bool,
    },
    Expire {
        dt: u8,
    },
    MayPublish {
        who: u8,
        generation: Option<u32>,
    },
}

struct Model {
    grants: Vec<Grant>,
    now: u64,
    next_conn: u64,
    /// Open connection -> participant index.
    open: HashMap<u64, usize>,
    /// Participant index -> its open connection.
    conn_of: HashMap<usize, u64>,
    removed: HashSet<usize>,
    /// Publish generations handed out, per participant, and those that must be revoked.
    issued: HashMap<usize, Vec<u32>>,
    revoked: HashMap<usize, Vec<u32>>,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(people) = u
        .arbitrary_iter::<Person>()
        .and_then(|i| i.take(6).collect::<Result<Vec<_>, _>>())
    else {
        return;
    };
    if people.is_empty() {
        return;
    }
    let grants = people
        .iter()
        .enumerate()
        .map(|(i, p)| Grant {
            room: ROOMS[usize::from(p.room)].into(),
            member: format!("m-{i}"),
            user_name: format!("User {i}"),
            role: if p.member {
                Role::Member
            } else {
                Role::Audience
            },
            permissions: Permission::ALL
                .into_iter()
                .enumerate()
                .filter(|(b, _)| p.permissions & (1 << b) != 0)
                .map(|(_, p)| p)
                .collect(),
            expires: START + u64::from(p.ttl),
        })
        .collect();
    let mut m = Model {
        grants,
        now: START,
        next_conn: 1,
        open: HashMap::new(),
        conn_of: HashMap::new(),
        removed: HashSet::new(),
        issued: HashMap::new(),
        revoked: HashMap::new(),
    };
    let mut rooms = Rooms::default();
    // Up to 200 steps, while the input lasts (an exhausted `Unstructured` yields defaults).
    for _ in 0..200 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.arbitrary::<Op>() else { break };
        let actor = m.actor(&op);
        m.step(&mut rooms, op);
        m.check(&mut rooms, actor);
    }
});

impl Model {
    fn who(&self, w: u8) -> usize {
        usize::from(w) % self.grants.len()
    }

    /// The participant an op is about (its own view is checked after the op).
    fn actor(&self, op: &Op) -> usize {
        match op {
            Op::Join { who }
            | Op::Leave { who, .. }
            | Op::Cmd { who, .. }
            | Op::Raw { who, .. }
            | Op::Talking { who, .. }
            | Op::MayPublish { who, .. } => self.who(*who),
            Op::Expire { dt } => self.who(*dt),
        }
    }

    fn step(&mut self, rooms: &mut Rooms, op: Op) {
        match op {
            Op::Join { who } => {
                let i = self.who(who);
                let g = self.grants[i].clone();
                let conn = self.next_conn;
                self.next_conn += 1;
                let expected_ok = g.expires > self.now && !self.removed.contains(&i);
                match rooms.join(&g, conn, self.now) {
                    Ok(fx) => {
                        assert!(expected_ok, "joined although expired or removed: {g:?}");
                        let old = self.conn_of.get(&i).copied();
                        self.open.insert(conn, i);
                        let closes: Vec<u64> = fx
                            .iter()
                            .filter_map(|e| match e {
                                Effect::Close { conn, .. } => Some(*conn),
                                _ => None,
                            })
                            .collect();
                        assert_eq!(
                            closes,
                            old.into_iter().collect::<Vec<_>>(),
                            "take-over closes the old socket"
                        );
                        // The old socket (if any) is closed by the effects, then this one is
                        // the member's.
                        self.effects(rooms, &fx);
                        self.conn_of.insert(i, conn);
                    }
                    Err(e) => {
                        assert!(!expected_ok, "join refused: {e}");
                        assert!(!e.to_string().is_empty());
                    }
                }
            }
            Op::Leave { who, stale } => {
                let i = self.who(who);
                let g = &self.grants[i];
                let conn = match (stale, self.conn_of.get(&i)) {
                    (false, Some(&c)) => c,
                    _ => self.next_conn + 1000,
                };
                let fx = rooms.leave(&g.room.clone(), &g.member.clone(), conn);
                if self.open.remove(&conn).is_some() {
                    self.conn_of.remove(&i);
                    self.effects(rooms, &fx);
                } else {
                    assert!(fx.is_empty(), "a stale leave had effects: {fx:?}");
                }
            }
            Op::Cmd {
                who,
                name,
                target,
                permissions,
                media,
            } => {
                let name = match usize::from(name) % (COMMANDS.len() + 2) {
                    n if n < COMMANDS.len() => COMMANDS[n],
                    n if n == COMMANDS.len() => "",
                    _ => "bogus",
                };
                let mut data = json!({});
                if target != u8::MAX {
                    data["memberId"] = json!(self.grants[self.who(target)].member);
                } else {
                    data["memberId"] = json!("nobody");
                }
                if let Some(p) = permissions {
                    let list: Vec<Value> = p
                        .iter()
                        .map(|&b| match Permission::ALL.get(usize::from(b)) {
                            Some(p) => json!(p.as_str()),
                            None if b == 0xff => json!(1),
                            None => json!("room.everything"),
                        })
                        .collect();
                    data["permissions"] = Value::Array(list);
                }
                match media % 4 {
                    0 => {}
                    1 => data["mediaAllowed"] = json!("all"),
                    2 => data["mediaAllowed"] = json!("audio-only"),
                    _ => data["mediaAllowed"] = json!(["video"]),
                }
                self.command(rooms, who, name, &data);
            }
            Op::Raw { who, text } => {
                if let Ok(Some(cmd)) = parse_command(&text) {
                    self.command(rooms, who, &cmd.name, &cmd.data);
                }
            }
            Op::Talking {
                who,
                talking,
                other_room,
            } => {
                let g = &self.grants[self.who(who)];
                let room = if other_room {
                    ROOMS.iter().find(|r| **r != g.room).unwrap()
                } else {
                    g.room.as_str()
                };
                let fx = rooms.talking(room, &g.member.clone(), talking);
                self.effects(rooms, &fx);
            }
            Op::Expire { dt } => {
                self.now += u64::from(dt);
                rooms.expire(self.now);
            }
            Op::MayPublish { who, generation } => {
                let i = self.who(who);
                let g = &self.grants[i];
                if let Err(e) = rooms.may_publish(&g.room, &g.member, generation) {
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    fn command(&mut self, rooms: &mut Rooms, who: u8, name: &str, data: &Value) {
        let i = self.who(who);
        let g = self.grants[i].clone();
        let (conn, connected) = match self.conn_of.get(&i) {
            Some(&c) => (c, true),
            None => (self.next_conn + 1000, false),
        };
        match rooms.command(&g.room, &g.member, conn, name, data) {
            Ok((resp, fx)) => {
                assert!(connected, "a stale connection's {name} was taken");
                assert!(resp.is_object(), "{resp}");
                if name == "state" {
                    assert!(fx.is_empty());
                }
                self.effects(rooms, &fx);
                if matches!(name, "demote" | "remove") {
                    let id = data["memberId"].as_str().expect("a target");
                    let t = self
                        .grants
                        .iter()
                        .position(|g| g.member == id)
                        .expect("a known target");
                    if name == "remove" {
                        self.removed.insert(t);
                    }
                    let gens = self.issued.get(&t).cloned().unwrap_or_default();
                    self.revoked.entry(t).or_default().extend(gens);
                }
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!e.is_empty());
                assert_eq!(e == LEFT, !connected, "{name} {data} from {i}: {e}");
            }
        }
    }

    fn effects(&mut self, rooms: &Rooms, fx: &[Effect]) {
        for e in fx {
            match e {
                Effect::Send { to, event } => {
                    let set: HashSet<_> = to.iter().collect();
                    assert_eq!(
                        set.len(),
                        to.len(),
                        "{event} sent twice to one connection: {to:?}"
                    );
                    for c in to {
                        assert!(
                            self.open.contains_key(c),
                            "{event} sent to closed connection {c}"
                        );
                    }
                    assert_eq!(event["type"], "event");
                }
                Effect::Credentials {
                    conn,
                    room,
                    member,
                    generation,
                } => {
                    let i = *self
                        .open
                        .get(conn)
                        .expect("credentials to an open connection");
                    let g = &self.grants[i];
                    assert_eq!(
                        (&g.room, &g.member),
                        (room, member),
                        "credentials to someone else"
                    );
                    let right = rooms
                        .may_publish(room, member, None)
                        .expect("a promoted member may publish");
                    assert_eq!(right.generation, *generation);
                    assert!(rooms.may_publish(room, member, Some(*generation)).is_ok());
                    self.issued.entry(i).or_default().push(*generation);
                }
                Effect::Close { conn, .. } => {
                    let i = self.open.remove(conn).expect("closing an open connection");
                    assert_eq!(self.conn_of.remove(&i), Some(*conn));
                }
                Effect::StopPublishing { room, member } => {
                    assert!(
                        rooms.may_publish(room, member, None).is_err(),
                        "{member} stopped but may publish"
                    );
                }
                // A webhook names a room someone was let into, and a member id.
                Effect::Hook { data, .. } => {
                    assert!(
                        self.grants.iter().any(|g| data["room"] == g.room.as_str()),
                        "webhook for a room nobody joined: {data}"
                    );
                    assert!(data["memberId"].is_string(), "{data}");
                }
                // A mute names a participant of that room.
                Effect::Mute { room, member, .. } => {
                    assert!(
                        self.grants
                            .iter()
                            .any(|g| &g.room == room && &g.member == member),
                        "mute of {member}, not in room {room}"
                    );
                }
            }
        }
    }

    fn check(&self, rooms: &mut Rooms, actor: usize) {
        let (mut participants, mut members_total, mut busy_rooms) = (0, 0, 0);
        for room in ROOMS {
            let here: Vec<usize> = self
                .conn_of
                .keys()
                .copied()
                .filter(|&i| self.grants[i].room == room)
                .collect();
            let Some(&first) = here.first() else { continue };
            busy_rooms += 1;
            participants += here.len();
            let g = &self.grants[first];
            let (state, fx) = rooms
                .command(room, &g.member, self.conn_of[&first], "state", &json!({}))
                .expect("a connected participant gets the state");
            assert!(fx.is_empty());
            let ids = |field: &str| -> Vec<String> {
                state[field]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["memberId"].as_str().unwrap().to_owned())
                    .collect()
            };
            let (members, hands) = (ids("members"), ids("hands"));
            let here_ids: HashSet<&str> = here
                .iter()
                .map(|&i| self.grants[i].member.as_str())
                .collect();
            for id in members.iter().chain(&hands) {
                assert!(
                    here_ids.contains(id.as_str()),
                    "{id} listed in {room} but not connected: {state}"
                );
            }
            assert!(
                members.iter().all(|id| !hands.contains(id)),
                "on stage with a raised hand: {state}"
            );
            let audience = state["audienceCount"].as_u64().unwrap() as usize;
            assert_eq!(members.len() + audience, here.len(), "{state}");
            members_total += members.len();
            // Every connected participant's role, from the lists; the actor's own view too.
            for &i in &here {
                let g = &self.grants[i];
                let may = rooms.may_publish(room, &g.member, None);
                assert_eq!(
                    may.is_ok(),
                    members.contains(&g.member),
                    "{}: {may:?} but {state}",
                    g.member
                );
                if i != actor {
                    continue;
                }
                let (mine, _) = rooms
                    .command(room, &g.member, self.conn_of[&i], "state", &json!({}))
                    .expect("state");
                let you = &mine["you"];
                let role = you["role"].as_str().expect("a role");
                match role {
                    "member" => {
                        assert!(may.is_ok(), "member who may not publish: {may:?}");
                        assert!(members.contains(&g.member));
                        assert_eq!(you["hand"], false);
                    }
                    "audience" => {
                        assert!(may.is_err(), "audience that may publish");
                        assert!(!members.contains(&g.member));
                        assert_eq!(you["talking"], false, "audience talking: {you}");
                    }
                    other => panic!("role {other}"),
                }
            }
        }
        let gauges = rooms.gauges();
        assert_eq!(
            (gauges.rooms, gauges.participants, gauges.members),
            (busy_rooms, participants, members_total)
        );
        for &i in &self.removed {
            let g = &self.grants[i];
            assert!(rooms.may_publish(&g.room, &g.member, None).is_err());
            assert!(!self.conn_of.contains_key(&i));
        }
        for (&i, gens) in &self.revoked {
            let g = &self.grants[i];
            for &gen in gens {
                assert!(
                    rooms.may_publish(&g.room, &g.member, Some(gen)).is_err(),
                    "generation {gen} of {} revived",
                    g.member
                );
            }
        }
    }
}
