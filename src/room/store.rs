//! Rooms in the cluster's registry (with `--redis`): each command's changed records are written
//! through to `chorus:room:{name}`, fenced by the stream's lease, before it is acknowledged;
//! records changed outside commands (a token's first use, a hand lowered by a leave) are
//! written behind within [`WRITE_BEHIND_EVERY`] while this origin holds the lease; a room is
//! read back whenever this origin does not (or no longer) hold its stream's lease, so a new
//! owner decides on what the old one decided; and the rooms' audience counts follow the
//! stream's viewers on every edge. Without `--redis` none of this runs.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::{debug, info, warn};

use super::state::{RoomError, Stored};
use super::RoomService;
use crate::cluster::MAX_COUNTED_STREAMS;
use crate::cluster::{Cluster, Fence, VIEWERS_EVERY};

/// How often records changed outside commands are written out: a member created by its
/// token's first use is in the registry well before a failover could need it.
pub(crate) const WRITE_BEHIND_EVERY: Duration = Duration::from_millis(500);

/// Most room names remembered as read back: past it the memory is cleared, which only costs
/// a read per room on its next use.
pub(crate) const MAX_LOADED: usize = 10_000;

impl RoomService {
    /// Puts rooms in `cluster`'s registry if it is shared (`--redis`); else rooms stay as they
    /// are, in memory only.
    pub(crate) fn attach_cluster(self: &Arc<Self>, cluster: Arc<Cluster>) {
        if !cluster.shared || self.cluster.set(cluster).is_err() {
            return;
        }
        self.lock().rooms.track_changes();
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WRITE_BEHIND_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.write_behind().await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VIEWERS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.follow_viewers().await;
            }
        });
    }

    /// Before a decision on `room` (a room socket, a publish, a subscribe): reads the room back
    /// from the registry unless this origin holds its stream's lease and read it since.
    pub(crate) async fn ensure_loaded(&self, room: &str) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        let seen = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(room);
        if seen && cluster.holds_now(room) {
            return;
        }
        let rows = match cluster.registry().room_read(room).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(room, error = %e, "room not read back from the cluster registry: deciding on what this origin knows");
                return;
            }
        };
        let records: Vec<(String, Stored)> = rows
            .iter()
            .filter_map(|(m, j)| match serde_json::from_str(j) {
                Ok(s) => Some((m.clone(), s)),
                Err(e) => {
                    warn!(room, member = m.as_str(), error = %e, "unreadable room record skipped");
                    None
                }
            })
            .collect();
        let taken = self.lock().rooms.reload(room, &records);
        // The mutes come with the room: this origin relays nothing of a muted member either.
        for (member, s) in &records {
            self.origin.set_muted(room, &Some(member.clone()), s.muted);
        }
        if taken > 0 && !seen {
            info!(
                room,
                records = taken,
                "room read back from the cluster registry"
            );
        } else {
            debug!(room, records = taken, "room read back");
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.len() >= MAX_LOADED {
            loaded.clear();
        }
        loaded.insert(room.to_owned());
    }

    /// A command with a shared registry: this origin must hold (or take) the stream's lease,
    /// and the registry must take the changed records, before the command counts.
    pub(super) async fn command_through(
        &self,
        cluster: &Cluster,
        conn: u64,
        name: &str,
        data: &Value,
    ) -> Result<Value, RoomError> {
        let room = Self::who(&self.lock(), conn)?.0;
        let _gate = self.gate.lock().await;
        self.ensure_loaded(&room).await;
        if let Err(e) = cluster.ensure_owner(&room).await {
            return Err(RoomError::NotStored {
                room,
                why: format!("this origin may not decide for it: {e}"),
            });
        }
        let (room, member, saved, resp, fx, records) = {
            let mut inner = self.lock();
            let (room, member) = Self::who(&inner, conn)?;
            let touched = [
                Some(member.as_str()),
                data.get("memberId").and_then(Value::as_str),
            ];
            let saved = inner.rooms.save(&room, touched.iter().flatten().copied());
            let (resp, fx) = inner.rooms.command(&room, &member, conn, name, data)?;
            let records = inner.rooms.dirty_records(&room);
            if records.is_empty() {
                self.after_command(inner, &room, &member, name, data, fx);
                return Ok(resp);
            }
            (room, member, saved, resp, fx, records)
        };
        match write(cluster, &room, &records).await {
            Ok(()) => {
                let mut inner = self.lock();
                inner.rooms.written(&room, &records);
                self.after_command(inner, &room, &member, name, data, fx);
                Ok(resp)
            }
            Err(why) => {
                self.lock().rooms.restore(saved);
                warn!(
                    room = room.as_str(),
                    by = member.as_str(),
                    command = name,
                    why = why.as_str(),
                    "room command not written to the cluster registry: undone"
                );
                Err(RoomError::NotStored { room, why })
            }
        }
    }

    /// Writes out the records changed outside commands, of the rooms whose lease this origin
    /// holds (elsewhere the owner decides, and makes the records from the tokens again).
    async fn write_behind(&self) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        let rooms = self.lock().rooms.dirty_rooms();
        for room in rooms.iter().filter(|r| cluster.holds_now(r)) {
            let _gate = self.gate.lock().await;
            let records = self.lock().rooms.dirty_records(room);
            if records.is_empty() {
                continue;
            }
            match write(cluster, room, &records).await {
                Ok(()) => self.lock().rooms.written(room, &records),
                Err(why) => debug!(room, why, "room records not written behind: next round"),
            }
        }
    }

    /// The audience counts of rooms with a connected participant follow their stream's viewers
    /// on every edge.
    async fn follow_viewers(&self) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        let mut rooms = self.lock().rooms.connected_rooms();
        rooms.truncate(MAX_COUNTED_STREAMS);
        for room in rooms {
            let r = cluster.registry().viewers(&room).await;
            let Ok(n) = cluster.outage.note("reading viewer counts", r) else {
                continue;
            };
            let mut inner = self.lock();
            let fx = inner.rooms.set_edge_viewers(&room, n as usize);
            self.apply(inner, fx);
        }
    }
}

/// Writes `records` of `room`, fenced by this origin's lease: Err says why not, for the
/// participant.
async fn write(cluster: &Cluster, room: &str, records: &[(String, Stored)]) -> Result<(), String> {
    let json: Vec<(String, String)> = records
        .iter()
        .map(|(m, s)| (m.clone(), serde_json::to_string(s).unwrap_or_default()))
        .collect();
    let expires_at = records.iter().map(|(_, s)| s.expires).max().unwrap_or(0);
    let r = cluster
        .registry()
        .room_write(room, &cluster.holder, &json, expires_at)
        .await;
    match cluster.outage.note("writing a room", r) {
        Ok(Fence::Written) => Ok(()),
        Ok(Fence::NotHolder(Some(h))) => Err(format!(
            "this origin ({}) no longer holds the lease of stream {room:?} ({h} does): send room commands to the stream's owner",
            cluster.id
        )),
        Ok(Fence::NotHolder(None)) => Err(format!(
            "this origin ({}) no longer holds the lease of stream {room:?} (nobody does): try again",
            cluster.id
        )),
        Err(e) => Err(format!(
            "the cluster registry did not take the write ({e}): try again"
        )),
    }
}
