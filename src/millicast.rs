//! What chorus says in Millicast's words, below the HTTP layer, the room service and the relay
//! that all speak it: the rules for stream and source names, the account id, and the data of a
//! director answer (what the SDK's tokenGenerator returns).

use serde_json::{json, Value};

use crate::auth::turn::TurnServers;
use crate::auth::unix_now;

/// The `streamAccountId` of every answer: one account per deployment.
pub(crate) const ACCOUNT_ID: &str = "chorus";
/// Stream names are path segments and log fields: keep them plain.
pub(crate) const MAX_STREAM_NAME: usize = 128;
/// A sourceId is a name a viewer may pin or exclude, kept by the edge per viewer: bounded so
/// that a view's names stay small (the edge's `MAX_EXCLUDED` of them per viewer).
pub(crate) const MAX_SOURCE_ID: usize = 128;

/// A stream (or room) name that chorus does not take, with the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than `MAX_STREAM_NAME`.
    #[error("streamName must be 1 to {MAX_STREAM_NAME} characters")]
    Length,
    /// Holds a character outside `[A-Za-z0-9-_.~]`.
    #[error("streamName may only hold letters, digits and - _ . ~")]
    Characters,
}

/// A stream name is 1 to [`MAX_STREAM_NAME`] of `[A-Za-z0-9-_.~]`.
pub fn check_stream_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_STREAM_NAME {
        return Err(NameError::Length);
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
    {
        return Err(NameError::Characters);
    }
    Ok(())
}

/// A sourceId is at most [`MAX_SOURCE_ID`] bytes with no control character.
pub(crate) fn source_id_ok(s: &str) -> bool {
    s.len() <= MAX_SOURCE_ID && !s.chars().any(char::is_control)
}

/// The data of a director answer: where to signal, the JWT to signal with, and this process's
/// TURN servers with fresh credentials for `stream` (their user part is the stream name: coturn's
/// log then says which stream relays). Every answer is built here, the director's and a promoted
/// room member's alike, so none goes out without the TURN servers a listener behind a firewall
/// needs.
pub(crate) fn director_answer(
    url: String,
    jwt: String,
    turn: Option<&TurnServers>,
    stream: &str,
) -> Value {
    let ice = turn.map_or_else(|| json!([]), |t| t.ice_servers(stream, unix_now()));
    json!({
        "urls": [url],
        "jwt": jwt,
        "streamAccountId": ACCOUNT_ID,
        "iceServers": ice,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_plain() {
        assert_eq!(check_stream_name("panel-1.a_b~"), Ok(()));
        assert_eq!(check_stream_name(""), Err(NameError::Length));
        assert_eq!(
            check_stream_name(&"a".repeat(MAX_STREAM_NAME + 1)),
            Err(NameError::Length)
        );
        assert_eq!(check_stream_name("a/b"), Err(NameError::Characters));
        assert!(source_id_ok("ana") && !source_id_ok("a\nb"));
    }
}
