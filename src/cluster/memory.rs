//! The in-memory registry of a process without `--redis` (`chorus serve`, a lone origin): the
//! same records and leases as in Redis, with the same expiries, in a table that takes `now`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    mono_ms, Claim, Fence, NodeEntry, NodeRecord, Pending, Refresh, Registry, LEASE_TTL, NODE_TTL,
    VIEWERS_TTL,
};

/// The registry's state, sans-IO: every call takes the time (ms of the caller's clock).
#[derive(Debug, Default)]
pub(crate) struct Tables {
    /// id → (record, written at).
    nodes: HashMap<String, (NodeRecord, u64)>,
    /// stream → (holder, expires at).
    leases: HashMap<String, (String, u64)>,
    /// room → member → record (their expiry is the room service's business).
    rooms: HashMap<String, HashMap<String, String>>,
    /// stream → node → (viewers, written at).
    viewers: HashMap<String, HashMap<String, (u64, u64)>>,
}

impl Tables {
    pub(crate) fn put_node(&mut self, node: &NodeRecord, now: u64) {
        self.nodes.insert(node.id.clone(), (node.clone(), now));
    }

    /// Records written less than [`NODE_TTL`] ago, with their age.
    pub(crate) fn nodes(&mut self, now: u64) -> Vec<NodeEntry> {
        let ttl = NODE_TTL.as_millis() as u64;
        self.nodes
            .retain(|_, (_, at)| now.saturating_sub(*at) < ttl);
        let mut out: Vec<NodeEntry> = self
            .nodes
            .values()
            .map(|(r, at)| NodeEntry {
                record: r.clone(),
                age: Duration::from_millis(now.saturating_sub(*at)),
            })
            .collect();
        out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        out
    }

    fn live_holder(&mut self, stream: &str, now: u64) -> Option<&str> {
        if self
            .leases
            .get(stream)
            .is_some_and(|(_, until)| *until <= now)
        {
            self.leases.remove(stream);
        }
        self.leases.get(stream).map(|(h, _)| h.as_str())
    }

    /// SET NX PX: free (or already `holder`'s) → `holder`'s for [`LEASE_TTL`].
    pub(crate) fn claim(&mut self, stream: &str, holder: &str, now: u64) -> Claim {
        match self.live_holder(stream, now) {
            Some(h) if h != holder => Claim::Held(h.to_owned()),
            Some(_) => Claim::Won,
            None => {
                self.leases
                    .insert(stream.to_owned(), (holder.to_owned(), now + lease_ms()));
                Claim::Won
            }
        }
    }

    /// The compare-and-set refresh: only the holder extends; a lapsed, free lease is retaken.
    pub(crate) fn refresh(&mut self, stream: &str, holder: &str, now: u64) -> Refresh {
        match self.live_holder(stream, now) {
            Some(h) if h != holder => Refresh::Lost(h.to_owned()),
            Some(_) => {
                self.leases
                    .insert(stream.to_owned(), (holder.to_owned(), now + lease_ms()));
                Refresh::Kept
            }
            None => {
                self.leases
                    .insert(stream.to_owned(), (holder.to_owned(), now + lease_ms()));
                Refresh::Reclaimed
            }
        }
    }

    /// The compare-and-delete release: only by the holder.
    pub(crate) fn release(&mut self, stream: &str, holder: &str, now: u64) -> bool {
        if self.live_holder(stream, now) == Some(holder) {
            self.leases.remove(stream);
            return true;
        }
        false
    }

    /// The compare-and-set takeover: `to` gets the lease only if `from` still holds it.
    pub(crate) fn take_over(&mut self, stream: &str, from: &str, to: &str, now: u64) -> bool {
        if self.live_holder(stream, now) == Some(from) {
            self.leases
                .insert(stream.to_owned(), (to.to_owned(), now + lease_ms()));
            return true;
        }
        false
    }

    pub(crate) fn owner(&mut self, stream: &str, now: u64) -> Option<String> {
        self.live_holder(stream, now).map(str::to_owned)
    }

    pub(crate) fn owners(&mut self, now: u64) -> Vec<(String, String)> {
        self.leases.retain(|_, (_, until)| *until > now);
        let mut out: Vec<(String, String)> = self
            .leases
            .iter()
            .map(|(s, (h, _))| (s.clone(), h.clone()))
            .collect();
        out.sort();
        out
    }
}

impl Tables {
    /// The room write, fenced: only the live lease's holder writes.
    pub(crate) fn room_write(
        &mut self,
        room: &str,
        holder: &str,
        records: &[(String, String)],
        now: u64,
    ) -> Fence {
        match self.live_holder(room, now) {
            Some(h) if h == holder => {}
            other => return Fence::NotHolder(other.map(str::to_owned)),
        }
        let r = self.rooms.entry(room.to_owned()).or_default();
        for (member, json) in records {
            r.insert(member.clone(), json.clone());
        }
        Fence::Written
    }

    pub(crate) fn room_read(&self, room: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .rooms
            .get(room)
            .map(|r| r.iter().map(|(m, j)| (m.clone(), j.clone())).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Sets `node`'s count; the others' fresh counts together (stale ones are dropped).
    pub(crate) fn put_viewers(&mut self, stream: &str, node: &str, count: u64, now: u64) -> u64 {
        let s = self.viewers.entry(stream.to_owned()).or_default();
        if count == 0 {
            s.remove(node);
        } else {
            s.insert(node.to_owned(), (count, now));
        }
        let others = self.viewers(stream, now) - count;
        if self.viewers.get(stream).is_some_and(HashMap::is_empty) {
            self.viewers.remove(stream);
        }
        others
    }

    pub(crate) fn viewers(&mut self, stream: &str, now: u64) -> u64 {
        let ttl = VIEWERS_TTL.as_millis() as u64;
        let Some(s) = self.viewers.get_mut(stream) else {
            return 0;
        };
        s.retain(|_, (_, at)| now.saturating_sub(*at) < ttl);
        s.values().map(|(n, _)| n).sum()
    }
}

fn lease_ms() -> u64 {
    LEASE_TTL.as_millis() as u64
}

/// [`Tables`] behind a lock, on this process's clock.
pub(crate) struct MemoryRegistry {
    tables: Mutex<Tables>,
    epoch: Instant,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        MemoryRegistry {
            tables: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

impl MemoryRegistry {
    fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Tables, u64) -> T) -> Pending<'_, T> {
        let now = mono_ms(self.epoch);
        let out = f(
            &mut self.tables.lock().unwrap_or_else(|p| p.into_inner()),
            now,
        );
        Box::pin(std::future::ready(Ok(out)))
    }
}

impl Registry for MemoryRegistry {
    fn put_node<'a>(&'a self, node: &'a NodeRecord) -> Pending<'a, ()> {
        self.with(|t, now| t.put_node(node, now))
    }

    fn nodes(&self) -> Pending<'_, Vec<NodeEntry>> {
        self.with(|t, now| t.nodes(now))
    }

    fn claim<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, Claim> {
        self.with(|t, now| t.claim(stream, holder, now))
    }

    fn refresh<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, Refresh> {
        self.with(|t, now| t.refresh(stream, holder, now))
    }

    fn release<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, bool> {
        self.with(|t, now| t.release(stream, holder, now))
    }

    fn take_over<'a>(&'a self, stream: &'a str, from: &'a str, to: &'a str) -> Pending<'a, bool> {
        self.with(|t, now| t.take_over(stream, from, to, now))
    }

    fn owner<'a>(&'a self, stream: &'a str) -> Pending<'a, Option<String>> {
        self.with(|t, now| t.owner(stream, now))
    }

    fn owners(&self) -> Pending<'_, Vec<(String, String)>> {
        self.with(|t, now| t.owners(now))
    }

    fn room_write<'a>(
        &'a self,
        room: &'a str,
        holder: &'a str,
        records: &'a [(String, String)],
        _expires_at: u64,
    ) -> Pending<'a, Fence> {
        self.with(|t, now| t.room_write(room, holder, records, now))
    }

    fn room_read<'a>(&'a self, room: &'a str) -> Pending<'a, Vec<(String, String)>> {
        self.with(|t, _| t.room_read(room))
    }

    fn put_viewers<'a>(&'a self, stream: &'a str, node: &'a str, count: u64) -> Pending<'a, u64> {
        self.with(|t, now| t.put_viewers(stream, node, count, now))
    }

    fn viewers<'a>(&'a self, stream: &'a str) -> Pending<'a, u64> {
        self.with(|t, now| t.viewers(stream, now))
    }
}

#[cfg(test)]
mod tests {
    use super::super::node::{Load, NodeKind, NodeState};
    use super::*;

    const TTL: u64 = LEASE_TTL.as_millis() as u64;

    #[test]
    fn a_lease_is_claimed_once_refreshed_and_released_only_by_its_holder() {
        let mut t = Tables::default();
        assert_eq!(t.claim("s", "a/1", 0), Claim::Won);
        assert_eq!(t.claim("s", "b/1", 1), Claim::Held("a/1".into()));
        assert_eq!(
            t.claim("s", "a/1", 2),
            Claim::Won,
            "the holder may claim again"
        );
        assert_eq!(t.refresh("s", "b/1", 3), Refresh::Lost("a/1".into()));
        assert!(!t.release("s", "b/1", 4), "not b's to release");
        assert_eq!(t.owner("s", 5).as_deref(), Some("a/1"));
        assert_eq!(t.refresh("s", "a/1", TTL - 1), Refresh::Kept);
        assert_eq!(
            t.owner("s", 2 * TTL - 2).as_deref(),
            Some("a/1"),
            "extended"
        );
        assert!(t.release("s", "a/1", 2 * TTL - 2));
        assert_eq!(t.owner("s", 2 * TTL - 2), None);
    }

    #[test]
    fn an_unrefreshed_lease_lapses_and_goes_to_the_next_claimant() {
        let mut t = Tables::default();
        assert_eq!(t.claim("s", "a/1", 0), Claim::Won);
        assert_eq!(t.claim("s", "b/1", TTL - 1), Claim::Held("a/1".into()));
        assert_eq!(t.claim("s", "b/1", TTL), Claim::Won);
        assert_eq!(t.refresh("s", "a/1", TTL + 1), Refresh::Lost("b/1".into()));
        assert_eq!(t.owners(TTL + 1), vec![("s".into(), "b/1".into())]);
        // Lapsed and free: the old holder's refresh retakes it.
        assert_eq!(t.refresh("x", "a/1", 0), Refresh::Reclaimed);
    }

    #[test]
    fn room_writes_are_fenced_by_the_lease_and_viewer_counts_lapse() {
        let mut t = Tables::default();
        let rec = [("m1".to_owned(), "{}".to_owned())];
        assert_eq!(
            t.room_write("r", "a/1", &rec, 0),
            Fence::NotHolder(None),
            "nobody's lease"
        );
        t.claim("r", "b/1", 0);
        assert_eq!(
            t.room_write("r", "a/1", &rec, 1),
            Fence::NotHolder(Some("b/1".into()))
        );
        assert!(t.room_read("r").is_empty(), "nothing written");
        assert_eq!(t.room_write("r", "b/1", &rec, 2), Fence::Written);
        assert_eq!(t.room_read("r"), rec.to_vec());

        assert_eq!(t.put_viewers("s", "e1", 3, 0), 0);
        assert_eq!(t.put_viewers("s", "e2", 4, 500), 3);
        assert_eq!(t.viewers("s", 600), 7);
        let ttl = VIEWERS_TTL.as_millis() as u64;
        assert_eq!(t.put_viewers("s", "e2", 4, ttl), 0, "e1 went quiet");
        assert_eq!(t.put_viewers("s", "e2", 0, ttl + 1), 0);
        assert_eq!(t.viewers("s", ttl + 1), 0);
    }

    #[test]
    fn a_node_vanishes_once_its_heartbeats_stop_for_the_ttl() {
        let mut t = Tables::default();
        let r = NodeRecord {
            id: "e1".into(),
            kind: NodeKind::Edge,
            boot: "b".into(),
            http: "http://e1".into(),
            ws: "ws://e1/ws".into(),
            relay: None,
            fingerprint: None,
            region: None,
            capacity: Some(3),
            load: Load::default(),
            streams: vec![],
            state: NodeState::Serving,
        };
        t.put_node(&r, 1000);
        let ttl = NODE_TTL.as_millis() as u64;
        let seen = t.nodes(1000 + ttl - 1);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].age, Duration::from_millis(ttl - 1));
        assert!(t.nodes(1000 + ttl).is_empty());
    }
}
