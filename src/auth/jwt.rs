//! The short-lived JWT the director returns: bound to one stream and one scope. The SDK decodes
//! its payload and reads `millicast.streamName`, so that claim is laid out as Millicast does.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{unix_now, AuthError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MillicastClaims {
    pub stream_name: String,
    #[serde(default)]
    pub record: bool,
}

/// A publish JWT of a room member: it publishes that member's source only, and only while the
/// member's publish generation in the room is still this one (a demotion moves it on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomBinding {
    pub room: String,
    pub member_id: String,
    pub generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iat: u64,
    pub exp: u64,
    pub scope: Scope,
    pub millicast: MillicastClaims,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomBinding>,
}

/// Signs and checks JWTs with one HS256 secret.
#[derive(Clone)]
pub struct JwtKeys {
    enc: EncodingKey,
    dec: DecodingKey,
    pub ttl_secs: u64,
}

impl JwtKeys {
    pub fn new(secret: &[u8], ttl_secs: u64) -> Self {
        JwtKeys {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            ttl_secs,
        }
    }

    pub fn issue(&self, stream: &str, scope: Scope) -> String {
        self.issue_bound(stream, scope, None)
    }

    /// A JWT for `stream`, bound to a room member's source when `room` is given.
    pub fn issue_bound(&self, stream: &str, scope: Scope, room: Option<RoomBinding>) -> String {
        let now = unix_now();
        self.sign(&Claims {
            iat: now,
            exp: now + self.ttl_secs,
            scope,
            millicast: MillicastClaims {
                stream_name: stream.to_owned(),
                record: false,
            },
            room,
        })
    }

    pub fn sign(&self, claims: &Claims) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &self.enc)
            .expect("HS256 signing cannot fail")
    }

    /// Checks signature and expiry; the caller checks stream and scope against the request.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp"]);
        decode::<Claims>(token, &self.dec, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::BadJwt(e.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_expiry_and_tamper() {
        let k = JwtKeys::new(b"secret", 60);
        let t = k.issue("panel", Scope::Publish);
        let c = k.verify(&t).unwrap();
        assert_eq!(
            (c.scope, c.millicast.stream_name.as_str()),
            (Scope::Publish, "panel")
        );
        let expired = k.sign(&Claims {
            exp: unix_now() - 5,
            ..c.clone()
        });
        assert_eq!(k.verify(&expired), Err(AuthError::Expired));
        let other = JwtKeys::new(b"other", 60);
        assert!(matches!(other.verify(&t), Err(AuthError::BadJwt(_))));
        assert!(matches!(k.verify("not.a.jwt"), Err(AuthError::BadJwt(_))));
    }
}
