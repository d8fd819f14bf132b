//! Peers the server ended (unpublished, replaced, their signalling session closed or
//! disconnected by the operator), remembered for a few seconds by their ICE credentials, so that
//! the browser's next consent check gets an authenticated STUN error (403). libwebrtc fails a
//! candidate pair on such an error at once; without it Chromium only notices the peer is gone
//! after ~7 s of unanswered checks, and the SDK, which reconnects only once its
//! RTCPeerConnection leaves "connected", waits that long.
//!
//! Sans-IO: the time is an argument; the caller sends the bytes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use str0m::ice::{StunMessage, StunMessageBuilder};

use super::established::sha1_hmac;

/// How long an ended peer is remembered: Chromium sends a consent check every ~2.5 s on a
/// stable pair (more often on others), so 10 s catches every pair's next checks with margin.
pub(crate) const ENDED_MEMORY: Duration = Duration::from_secs(10);

/// Ended peers remembered per media thread at most: a burst of ends (a node drained) beyond
/// this forgets the oldest, whose browsers then take the slow way (unanswered checks).
pub(crate) const MAX_ENDED: usize = 4096;

/// The STUN error an ended peer's consent checks get: 403 Forbidden is no "retry" code for
/// libwebrtc (unlike 401, 420, 487 and 500).
const ENDED_ERROR: (u16, &str) = (403, "Forbidden: session ended");

/// Recently ended peers: local ufrag -> (local ICE password, ended at).
#[derive(Default)]
pub(crate) struct EndedPeers {
    by_ufrag: HashMap<String, (String, Instant)>,
    order: VecDeque<(String, Instant)>,
}

impl EndedPeers {
    /// A peer with these local ICE credentials ended at `now`.
    pub(crate) fn remember(&mut self, ufrag: &str, pwd: &str, now: Instant) {
        self.expire(now);
        while self.order.len() >= MAX_ENDED {
            self.forget_oldest();
        }
        self.by_ufrag
            .insert(ufrag.to_owned(), (pwd.to_owned(), now));
        self.order.push_back((ufrag.to_owned(), now));
    }

    fn forget_oldest(&mut self) {
        if let Some((u, at)) = self.order.pop_front() {
            // Only if it was not remembered again since.
            if self.by_ufrag.get(&u).is_some_and(|(_, t)| *t == at) {
                self.by_ufrag.remove(&u);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) >= ENDED_MEMORY)
        {
            self.forget_oldest();
        }
    }

    /// When `data` is a binding request for a remembered peer, with its MESSAGE-INTEGRITY:
    /// the length of the error response written into `buf`.
    pub(crate) fn answer(&mut self, data: &[u8], now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.expire(now);
        if self.by_ufrag.is_empty() {
            return None;
        }
        let msg = StunMessage::parse(data).ok()?;
        if !msg.is_binding_request() {
            return None;
        }
        let (local, _) = msg.split_username()?;
        let (pwd, _) = self.by_ufrag.get(local)?;
        if !msg.verify(pwd.as_bytes(), sha1_hmac) {
            return None;
        }
        let reply = StunMessageBuilder::new()
            .binding()
            .failure()
            .error_code(ENDED_ERROR.0, ENDED_ERROR.1)
            .build(msg.trans_id());
        reply.to_bytes(Some(pwd.as_bytes()), buf, sha1_hmac).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::ice::TransId;

    fn request(user: &str, pwd: &str) -> Vec<u8> {
        let msg = StunMessage::binding_request(user, TransId::new(), true, 0, 1, false);
        let mut buf = vec![0u8; 256];
        let n = msg
            .to_bytes(Some(pwd.as_bytes()), &mut buf, sha1_hmac)
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn an_ended_peers_checks_get_an_authenticated_403_for_a_while() {
        let mut e = EndedPeers::default();
        let t = Instant::now();
        let mut buf = [0u8; 256];
        let check = request("srv:browser", "server-pwd");
        assert_eq!(e.answer(&check, t, &mut buf), None, "nothing remembered");
        e.remember("srv", "server-pwd", t);
        let n = e
            .answer(&check, t + Duration::from_secs(3), &mut buf)
            .expect("answered");
        let reply = StunMessage::parse(&buf[..n]).unwrap();
        assert!(reply.is_failed_binding_response());
        assert_eq!(reply.error_code().map(|(c, _)| c), Some(403));
        assert!(
            reply.verify(b"server-pwd", sha1_hmac),
            "keyed like a success reply"
        );
        // Wrong integrity, another ufrag, or too late: nothing.
        assert_eq!(
            e.answer(&request("srv:browser", "guess"), t, &mut buf),
            None
        );
        assert_eq!(
            e.answer(&request("other:browser", "server-pwd"), t, &mut buf),
            None
        );
        assert_eq!(e.answer(&check, t + ENDED_MEMORY, &mut buf), None);
        // Bounded: the oldest goes first.
        for i in 0..=MAX_ENDED {
            e.remember(&format!("u{i}"), "p", t + ENDED_MEMORY);
        }
        assert!(e.by_ufrag.len() <= MAX_ENDED && !e.by_ufrag.contains_key("u0"));
    }
}
