//! WHIP and WHEP session resources (RFC 9725 §4.3): each is named by an unguessable id (128
//! random bits, never listed anywhere) and ended (DELETE) only with the credential that created
//! it, the same bearer. A resource created without a bearer (a WHEP viewer of an open stream)
//! is a capability URL: knowing the id is the credential.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::http::StatusCode;

use super::Refusal;
use crate::rtc::peers::PeerId;

/// Resources remembered at once; past it the oldest is forgotten (its session goes on, and ends
/// with its peer; only its DELETE then answers 404). Far above what one process serves.
pub(crate) const MAX_RESOURCES: usize = 65_536;

/// What a resource ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Session {
    /// A WHIP publication, by the origin's publisher id.
    Whip(String),
    /// A WHEP viewer.
    Whep(PeerId),
}

struct Resource {
    session: Session,
    /// SHA-256 of the creating bearer; None: created without one.
    credential: Option<[u8; 32]>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Resource>,
    order: VecDeque<String>,
}

#[derive(Default)]
pub(crate) struct Resources {
    inner: Mutex<Inner>,
}

fn digest(bearer: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bearer.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Resources {
    /// A new resource for `session`, created with `bearer`: its id.
    pub(crate) fn create(&self, session: Session, bearer: Option<&str>) -> String {
        let id = crate::auth::random_secret(16);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while inner.map.len() >= MAX_RESOURCES {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&old);
        }
        inner.map.insert(
            id.clone(),
            Resource {
                session,
                credential: bearer.map(digest),
            },
        );
        inner.order.push_back(id.clone());
        id
    }

    /// Takes the resource `id` of this kind for a DELETE with `bearer`; the refusal otherwise
    /// (404 unknown, 401 without the creating credential).
    pub(crate) fn take(
        &self,
        id: &str,
        whip: bool,
        bearer: Option<&str>,
    ) -> Result<Session, Refusal> {
        let what = if whip { "WHIP" } else { "WHEP" };
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = inner
            .map
            .get(id)
            .filter(|r| matches!(r.session, Session::Whip(_)) == whip)
        else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                format!("no {what} session {id:?}"),
            ));
        };
        if let Some(expected) = &r.credential {
            let ok = bearer
                .map(digest)
                .is_some_and(|got| crate::auth::constant_time_eq(&got, expected));
            if !ok {
                return Err(Refusal(
                    StatusCode::UNAUTHORIZED,
                    format!("this {what} session was created with a bearer token: end it with the same Authorization: Bearer"),
                ));
            }
        }
        let session = r.session.clone();
        inner.map.remove(id);
        inner.order.retain(|k| k != id);
        Ok(session)
    }

    /// Checks that `bearer` may act on the resource `id` (PATCH), without ending it.
    pub(crate) fn check(&self, id: &str, bearer: Option<&str>) -> Result<(), Refusal> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = inner.map.get(id) else {
            return Err(Refusal(StatusCode::NOT_FOUND, format!("no session {id:?}")));
        };
        match &r.credential {
            Some(expected)
                if !bearer
                    .map(digest)
                    .is_some_and(|got| crate::auth::constant_time_eq(&got, expected)) =>
            {
                Err(Refusal(
                    StatusCode::UNAUTHORIZED,
                    "this session was created with a bearer token: send the same Authorization: Bearer".into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_creating_bearer_ends_a_resource() {
        let r = Resources::default();
        let id = r.create(Session::Whip("pub-1".into()), Some("secret"));
        assert!(id.len() >= 21, "128 random bits: {id}");
        assert_eq!(
            r.take(&id, true, None).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            r.take(&id, true, Some("other")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            r.take(&id, false, Some("secret")).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            r.take(&id, true, Some("secret")).unwrap(),
            Session::Whip("pub-1".into())
        );
        assert_eq!(
            r.take(&id, true, Some("secret")).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        let open = r.create(Session::Whep(PeerId(7)), None);
        assert!(r.take(&open, false, None).is_ok());
    }
}
