//! The views room participants hold at this edge, by (room, member id), so that removing a
//! member ends them: its signalling sessions are closed (their viewer with them) and its WHEP
//! viewers removed. A removed member's viewer JWTs, still within their life, are refused here
//! afterwards. Fed by the origin's removals over the link (`OriginMsg::Revoke`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::room::state::RoomError;
use crate::rtc::peers::PeerId;

/// Removed members remembered (to refuse their still-valid viewer JWTs); past it the oldest is
/// forgotten. A viewer JWT lives 60 s by default, and removals are rare.
pub(crate) const MAX_REVOKED: usize = 4096;

/// A view to end.
#[derive(Debug, Clone)]
pub(crate) enum HeldView {
    /// A signalling session (its id), told to close.
    Session(u64, Arc<Notify>),
    Whep(PeerId),
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    views: HashMap<Key, Vec<HeldView>>,
    revoked: VecDeque<Key>,
}

#[derive(Default)]
pub(crate) struct RoomViews {
    inner: Mutex<Inner>,
}

impl RoomViews {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member was removed from the room here: refused.
    pub(crate) fn check(&self, room: &str, member: &str) -> Result<(), RoomError> {
        let inner = self.lock();
        if inner.revoked.iter().any(|(r, m)| r == room && m == member) {
            return Err(RoomError::ViewRevoked(room.to_owned(), member.to_owned()));
        }
        Ok(())
    }

    /// A view of a room participant began.
    pub(crate) fn add(&self, room: &str, member: &str, view: HeldView) -> Result<(), RoomError> {
        self.check(room, member)?;
        self.lock()
            .views
            .entry((room.to_owned(), member.to_owned()))
            .or_default()
            .push(view);
        Ok(())
    }

    /// A signalling session ended by itself.
    pub(crate) fn remove_session(&self, room: &str, member: &str, sid: u64) {
        let mut inner = self.lock();
        let key = (room.to_owned(), member.to_owned());
        if let Some(v) = inner.views.get_mut(&key) {
            v.retain(|view| !matches!(view, HeldView::Session(s, _) if *s == sid));
            if v.is_empty() {
                inner.views.remove(&key);
            }
        }
    }

    /// The member was removed: its views, to end, and its JWTs refused from now on.
    pub(crate) fn revoke(&self, room: &str, member: &str) -> Vec<HeldView> {
        let mut inner = self.lock();
        let key = (room.to_owned(), member.to_owned());
        if inner.revoked.len() >= MAX_REVOKED {
            inner.revoked.pop_front();
        }
        inner.revoked.push_back(key.clone());
        inner.views.remove(&key).unwrap_or_default()
    }
}
