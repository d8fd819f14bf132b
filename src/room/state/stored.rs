//! What of a room outlives its origin, sans-IO: each participant's record as the cluster stores
//! it (`chorus:room:{name}`, member id → this JSON), which records changed since they were last
//! written, the copy a command is undone from when its write is refused, the merge of a room
//! read back by a new owner, and the stream-wide viewer count the audience count follows.

use serde::{Deserialize, Serialize};

use super::{audience_count, Effect, Media, Participant, Role, Rooms};

/// A participant's record in the cluster: everything a new owner needs to hold the room to
/// what was decided (roles, demotions, removals, publish generations, hands), and nothing of
/// this origin's (its connection, its talking flag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Stored {
    pub(crate) user_name: String,
    pub(crate) role: String,
    pub(crate) permissions: Vec<String>,
    pub(crate) media_allowed: String,
    /// Publish JWTs of an older generation are revoked.
    pub(crate) generation: u32,
    pub(crate) hand: bool,
    pub(crate) muted: bool,
    pub(crate) removed: bool,
    /// Unix seconds: the token's expiry, after which the record is forgotten.
    pub(crate) expires: u64,
}

impl Participant {
    fn stored(&self) -> Stored {
        Stored {
            user_name: self.user_name.clone(),
            role: self.role.as_str().to_owned(),
            permissions: self
                .permissions
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            media_allowed: self.media.as_str().to_owned(),
            generation: self.generation,
            hand: self.hand,
            muted: self.muted,
            removed: self.removed,
            expires: self.expires,
        }
    }

    /// Takes a stored record's decisions, keeping this origin's connection and talking flag;
    /// None (nothing changed) if the record does not read.
    fn take_stored(&mut self, s: &Stored) -> Option<()> {
        let role = Role::parse(&s.role).ok()?;
        let permissions = super::parse_permissions(&s.permissions).ok()?;
        let media = Media::parse(&serde_json::Value::from(s.media_allowed.as_str())).ok()?;
        self.user_name.clone_from(&s.user_name);
        self.role = role;
        self.permissions = permissions;
        self.media = media;
        self.generation = s.generation;
        self.hand = s.hand;
        self.muted = s.muted;
        self.removed = s.removed;
        self.expires = s.expires;
        Some(())
    }
}

/// Copies of some participants of a room as they were before a command, to put back if the
/// cluster refuses its write.
pub(crate) struct Saved {
    room: String,
    people: Vec<(String, Option<Participant>)>,
}

impl Rooms {
    /// From now on, changed records are kept track of, to be written out.
    pub(crate) fn track_changes(&mut self) {
        self.track = true;
    }

    /// Copies `members` of `room` (absent ones as None).
    pub(crate) fn save<'a>(&self, room: &str, members: impl Iterator<Item = &'a str>) -> Saved {
        let r = self.rooms.get(room);
        let mut people: Vec<(String, Option<Participant>)> = Vec::new();
        for m in members {
            if people.iter().all(|(id, _)| id != m) {
                let p = r.and_then(|r| r.people.get(m)).cloned();
                people.push((m.to_owned(), p));
            }
        }
        Saved {
            room: room.to_owned(),
            people,
        }
    }

    /// Marks the saved participants whose record differs now as to be written.
    pub(super) fn mark_changed(&mut self, room: &str, before: &Saved) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        for (id, old) in &before.people {
            let now = r.people.get(id).map(Participant::stored);
            if now.is_some() && now != old.as_ref().map(Participant::stored) {
                r.dirty.insert(id.clone());
            }
        }
    }

    /// Puts the saved participants back as they were (the command's write was refused).
    pub(crate) fn restore(&mut self, saved: Saved) {
        let r = self.rooms.entry(saved.room).or_default();
        for (id, old) in saved.people {
            match old {
                Some(p) => {
                    r.people.insert(id, p);
                }
                None => {
                    r.people.remove(&id);
                }
            }
        }
    }

    /// The records of `room` still to be written.
    pub(crate) fn dirty_records(&self, room: &str) -> Vec<(String, Stored)> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        r.dirty
            .iter()
            .filter_map(|id| Some((id.clone(), r.people.get(id)?.stored())))
            .collect()
    }

    /// Rooms with records still to be written.
    pub(crate) fn dirty_rooms(&self) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| !r.dirty.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// These records were written: those unchanged since are no longer to be written.
    pub(crate) fn written(&mut self, room: &str, records: &[(String, Stored)]) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        for (id, s) in records {
            let same = r.people.get(id).is_none_or(|p| p.stored() == *s);
            if same {
                r.dirty.remove(id);
            }
        }
    }

    /// Merges the records read back from the cluster into `room`: theirs are the decisions
    /// (this origin's connections stay). Returns how many records were taken; unreadable ones
    /// are skipped.
    pub(crate) fn reload(&mut self, room: &str, records: &[(String, Stored)]) -> usize {
        if records.is_empty() {
            return 0;
        }
        let r = self.rooms.entry(room.to_owned()).or_default();
        let mut taken = 0;
        for (id, s) in records {
            let p = r.people.entry(id.clone()).or_insert_with(|| Participant {
                user_name: String::new(),
                role: Role::Audience,
                permissions: Vec::new(),
                media: Media::AudioOnly,
                generation: 0,
                hand: false,
                muted: false,
                talking: false,
                conn: None,
                removed: false,
                expires: 0,
            });
            if p.take_stored(s).is_some() {
                taken += 1;
                r.dirty.remove(id);
            }
        }
        // A record that did not read leaves an empty stand-in nobody may use: forgotten.
        r.people.retain(|_, p| p.expires > 0);
        taken
    }

    /// Rooms with a connected participant.
    pub(crate) fn connected_rooms(&self) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.people.values().any(|p| p.conn.is_some()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The stream's viewers on every edge are `n` now: the room hears its audience count
    /// again if that changed it.
    pub(crate) fn set_edge_viewers(&mut self, room: &str, n: usize) -> Vec<Effect> {
        let Some(r) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        let before = r.audience_count();
        r.edge_viewers = n;
        if r.audience_count() == before {
            return Vec::new();
        }
        vec![Effect::Send {
            to: r.conns(None),
            event: audience_count(r),
        }]
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{Grant, Permission};
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
            &[Permission::MemberPromote, Permission::MemberDemote],
        )
    }

    #[test]
    fn joins_and_commands_mark_records_and_a_new_owner_takes_them_back() {
        let mut r = Rooms::default();
        r.track_changes();
        r.join(&host(), 1, NOW).unwrap();
        r.join(&grant("a", Role::Member, &[]), 2, NOW).unwrap();
        let first = r.dirty_records("r");
        assert_eq!(
            first.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["a", "host"],
            "new records are to be written"
        );
        r.written("r", &first);
        assert!(r.dirty_records("r").is_empty());
        // A refused command is not a change.
        assert!(r
            .command("r", "a", 2, "demote", &json!({"memberId": "host"}))
            .is_err());
        assert!(r.dirty_records("r").is_empty());
        r.command("r", "host", 1, "demote", &json!({"memberId": "a"}))
            .unwrap();
        let demoted = r.dirty_records("r");
        assert_eq!(demoted.len(), 1);
        assert_eq!(
            (demoted[0].0.as_str(), demoted[0].1.role.as_str()),
            ("a", "audience")
        );
        assert_eq!(demoted[0].1.generation, 1);

        // Another origin reads the room back: the demotion holds, the host still publishes.
        let mut records = first.clone();
        records.retain(|(id, _)| id == "host");
        records.extend(demoted);
        let mut other = Rooms::default();
        assert_eq!(other.reload("r", &records), 2);
        assert!(other.may_publish("r", "host", Some(0)).is_ok());
        assert!(matches!(
            other.may_publish("r", "a", Some(0)),
            Err(super::super::RoomError::InAudience { demoted: true, .. })
        ));
        assert!(other.dirty_records("r").is_empty(), "read back, not dirty");
    }

    #[test]
    fn a_restored_command_leaves_the_room_as_it_was() {
        let mut r = Rooms::default();
        r.track_changes();
        r.join(&host(), 1, NOW).unwrap();
        r.join(&grant("a", Role::Member, &[]), 2, NOW).unwrap();
        r.written("r", &r.dirty_records("r"));
        let saved = r.save("r", ["host", "a"].into_iter());
        r.command("r", "host", 1, "demote", &json!({"memberId": "a"}))
            .unwrap();
        r.restore(saved);
        assert_eq!(
            r.may_publish("r", "a", Some(0)).map(|p| p.generation),
            Ok(0)
        );
        // Still dirty, but its record is what was written: writing it again changes nothing.
        let again = r.dirty_records("r");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.role, "member");
    }

    #[test]
    fn the_audience_count_follows_the_edges_viewers_less_the_members() {
        let mut r = Rooms::default();
        r.join(&host(), 1, NOW).unwrap();
        r.join(&grant("a", Role::Audience, &[]), 2, NOW).unwrap();
        // One member on stage, one audience socket: 5 viewers on the edges are 4 listening.
        let fx = r.set_edge_viewers("r", 5);
        match &fx[..] {
            [Effect::Send { to, event }] => {
                assert_eq!(event["name"], "room.audience_count");
                assert_eq!(event["data"]["count"], 4);
                assert_eq!(to.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(r.set_edge_viewers("r", 5).is_empty(), "no change, no event");
        // Fewer viewers than audience sockets: the sockets count.
        match &r.set_edge_viewers("r", 0)[..] {
            [Effect::Send { event, .. }] => assert_eq!(event["data"]["count"], 1),
            other => panic!("{other:?}"),
        }
    }
}
