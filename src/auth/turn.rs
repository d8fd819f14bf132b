//! TURN servers in the director's answers, with short-lived credentials in the TURN REST API
//! scheme (draft-uberti-behave-turn-rest-00; coturn's `use-auth-secret`): the username is
//! `expiry:user` (expiry in Unix seconds) and the credential is
//! base64(HMAC-SHA1(shared secret, username)). The TURN server knows the secret too, so it
//! checks a credential without asking chorus, and refuses it once `expiry` has passed.
//!
//! Sans-IO: the time is an argument. The secret is never logged nor printed (no `Debug`).

use aws_lc_rs::hmac;
use base64::Engine;
use serde_json::{json, Value};

/// How long a TURN credential is valid: 24 hours. A relayed session keeps re-authenticating
/// its allocation's refreshes with the credential it started with, so it must outlast the
/// longest listen (a day-long town hall); the SDK asks the director again on every reconnect,
/// so a new session always has a fresh one. A credential that leaks is usable for a day at
/// most, and only to relay (the TURN server's own peer rules still apply). It is longer than
/// the director's JWT on purpose: the JWT only opens the signalling socket once.
pub(crate) const TURN_CREDENTIAL_TTL_SECS: u64 = 24 * 3600;

/// Why the TURN settings were refused at start.
#[derive(Debug, thiserror::Error)]
pub enum TurnConfigError {
    /// A `--turn-url` that is no `turn:` / `turns:` URI (RFC 7065).
    #[error("--turn-url {0:?}: expected turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT][?transport=tcp]")]
    BadUrl(String),
    /// `--turn-url` without a secret to sign credentials with.
    #[error("--turn-url needs --turn-secret (or --turn-secret-file, or CHORUS_TURN_SECRET): the TURN server's static-auth-secret")]
    NoSecret,
    /// A secret without any URL to use it for.
    #[error("--turn-secret is set but no --turn-url: give the TURN server's URLs")]
    NoUrl,
}

/// The TURN servers a director hands out, and the secret it signs their credentials with.
pub(crate) struct TurnServers {
    urls: Vec<String>,
    key: hmac::Key,
}

impl TurnServers {
    /// From the flags: None when neither is set; an error when only one is, or a URL is bad.
    pub(crate) fn from_flags(
        urls: &[String],
        secret: Option<&str>,
    ) -> Result<Option<TurnServers>, TurnConfigError> {
        let secret = secret.filter(|s| !s.is_empty());
        match (urls.is_empty(), secret) {
            (true, None) => return Ok(None),
            (true, Some(_)) => return Err(TurnConfigError::NoUrl),
            (false, None) => return Err(TurnConfigError::NoSecret),
            (false, Some(_)) => {}
        }
        if let Some(bad) = urls.iter().find(|u| !turn_url_ok(u)) {
            return Err(TurnConfigError::BadUrl(bad.clone()));
        }
        Ok(Some(TurnServers {
            urls: urls.to_vec(),
            key: hmac::Key::new(
                hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
                secret.expect("checked").as_bytes(),
            ),
        }))
    }

    /// The URLs handed out, in the operator's order (for the start log).
    pub(crate) fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The `iceServers` of a director answer for `user` at `now_unix` (seconds): one
    /// RTCIceServer with every URL and a credential valid [`TURN_CREDENTIAL_TTL_SECS`].
    pub(crate) fn ice_servers(&self, user: &str, now_unix: u64) -> Value {
        let username = format!("{}:{user}", now_unix + TURN_CREDENTIAL_TTL_SECS);
        let credential = credential(&self.key, &username);
        json!([{
            "urls": self.urls,
            "username": username,
            "credential": credential,
        }])
    }
}

/// base64(HMAC-SHA1(key, username)): the TURN REST API password.
fn credential(key: &hmac::Key, username: &str) -> String {
    let tag = hmac::sign(key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// `turn:` or `turns:`, a host, and at most a `transport` of udp or tcp (TLS runs over TCP).
fn turn_url_ok(url: &str) -> bool {
    let (tls, rest) = match url.split_once(':') {
        Some(("turn", rest)) => (false, rest),
        Some(("turns", rest)) => (true, rest),
        _ => return false,
    };
    let (host, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let transport_ok = match query {
        None => true,
        Some("transport=tcp") => true,
        Some("transport=udp") => !tls,
        Some(_) => false,
    };
    !host.is_empty()
        && !host.starts_with(':')
        && !host.contains(['/', '@', ' ', '\t', '\n'])
        && transport_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(urls: &[&str], secret: &str) -> TurnServers {
        let urls: Vec<String> = urls.iter().map(|s| s.to_string()).collect();
        TurnServers::from_flags(&urls, Some(secret))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn credentials_match_the_turn_rest_scheme() {
        // Expected values computed with openssl, independently of this code:
        //   echo -n "1700086400:panel" | openssl dgst -sha1 -hmac "north-shared-secret" -binary | base64
        //   echo -n "1433895918:alice" | openssl dgst -sha1 -hmac "secret" -binary | base64
        let key = |s: &str| hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, s.as_bytes());
        assert_eq!(
            credential(&key("north-shared-secret"), "1700086400:panel"),
            "Lxta7KidpNyQJuZCutv0OfzmYFI="
        );
        assert_eq!(
            credential(&key("secret"), "1433895918:alice"),
            "9FlGeCxuzk5viW4BIqwHUUUEvWw="
        );
        let t = servers(
            &[
                "turn:127.0.0.1:3478?transport=udp",
                "turn:127.0.0.1:3478?transport=tcp",
            ],
            "north-shared-secret",
        );
        let now = 1_700_086_400 - TURN_CREDENTIAL_TTL_SECS;
        assert_eq!(
            t.ice_servers("panel", now),
            json!([{
                "urls": ["turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3478?transport=tcp"],
                "username": "1700086400:panel",
                "credential": "Lxta7KidpNyQJuZCutv0OfzmYFI=",
            }])
        );
    }

    #[test]
    fn flags_are_checked() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(TurnServers::from_flags(&[], None).unwrap().is_none());
        assert!(TurnServers::from_flags(&[], Some("")).unwrap().is_none());
        assert!(matches!(
            TurnServers::from_flags(&[], Some("x")),
            Err(TurnConfigError::NoUrl)
        ));
        assert!(matches!(
            TurnServers::from_flags(&s(&["turn:a"]), None),
            Err(TurnConfigError::NoSecret)
        ));
        for good in [
            "turn:turn.example.com",
            "turn:192.0.2.1:3478?transport=udp",
            "turn:[2001:db8::1]:3478?transport=tcp",
            "turns:turn.example.com:5349?transport=tcp",
            "turns:turn.example.com:443",
        ] {
            assert!(turn_url_ok(good), "{good}");
        }
        for bad in [
            "stun:x",
            "turn:",
            "turn::3478",
            "http://x",
            "turn:x?transport=sctp",
            "turns:x?transport=udp",
            "turn:user@x",
        ] {
            assert!(
                matches!(
                    TurnServers::from_flags(&s(&[bad]), Some("k")),
                    Err(TurnConfigError::BadUrl(_))
                ),
                "{bad}"
            );
        }
    }
}
