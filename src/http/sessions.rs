//! The open signalling sessions of this process, by stream, so an operator can end them
//! (`POST /api/streams/{name}/disconnect` on the admin address): before taking a node out of
//! service, or to make clients place themselves again through the director. The SDK then
//! reconnects by itself (see the README, "Reaching every listener").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::auth::jwt::Scope;

/// The WebSocket close code of a session the operator ended: 1012 "Service Restart" (RFC
/// 6455 registry), which says "come back", unlike a policy close.
pub(crate) const CLOSE_DISCONNECTED: u16 = 1012;

struct Entry {
    stream: String,
    scope: Scope,
    end: Arc<Notify>,
}

/// Open sessions (their number is bounded by the HTTP connection limits).
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<HashMap<u64, Entry>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Session `sid` opened on `stream`: what it waits on to be ended.
    pub(crate) fn open(&self, sid: u64, stream: &str, scope: Scope) -> Arc<Notify> {
        let end = Arc::new(Notify::new());
        self.lock().insert(
            sid,
            Entry {
                stream: stream.to_owned(),
                scope,
                end: end.clone(),
            },
        );
        end
    }

    /// Session `sid` closed.
    pub(crate) fn closed(&self, sid: u64) {
        self.lock().remove(&sid);
    }

    /// Ends the sessions of `stream` (of one scope, or all): how many were told.
    pub(crate) fn disconnect(&self, stream: &str, scope: Option<Scope>) -> usize {
        let open = self.lock();
        let mut n = 0;
        for e in open
            .values()
            .filter(|e| e.stream == stream && scope.is_none_or(|s| s == e.scope))
        {
            // A permit is kept if the session is not waiting right now: it ends at its next turn.
            e.end.notify_one();
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn disconnect_ends_the_sessions_of_one_stream_and_scope() {
        let s = Sessions::default();
        let viewer = s.open(1, "panel", Scope::Subscribe);
        let publisher = s.open(2, "panel", Scope::Publish);
        let other = s.open(3, "other", Scope::Subscribe);
        assert_eq!(s.disconnect("panel", Some(Scope::Publish)), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), publisher.notified())
            .await
            .expect("the publisher is told");
        assert_eq!(s.disconnect("panel", None), 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), viewer.notified())
            .await
            .expect("the viewer is told");
        s.closed(1);
        s.closed(2);
        assert_eq!(s.disconnect("panel", None), 0);
        assert_eq!(s.disconnect("other", None), 1);
        drop(other);
    }
}
