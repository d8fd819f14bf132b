//! Room tokens: HS256 JWTs naming one participant of one room (its member id, name, role and
//! permissions). They are signed and checked only at the origin, with its room-token key (kept
//! in `--data-dir`, or derived from `--jwt-secret`): no edge ever holds it. A room token can never
//! pass for a signalling JWT (EdDSA, the origin's other key) nor the other way round.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::state::{parse_permissions, Grant, Permission, Role};
use crate::auth::{unix_now, AuthError};

/// The `typ` claim of room tokens.
pub(crate) const TYP: &str = "chorus-room";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RoomClaims {
    pub typ: String,
    pub iat: u64,
    pub exp: u64,
    pub room: String,
    /// The member id: also the sourceId it publishes as.
    pub sub: String,
    pub name: String,
    pub role: String,
    pub permissions: Vec<String>,
}

pub(crate) struct RoomKeys {
    enc: EncodingKey,
    dec: DecodingKey,
}

impl RoomKeys {
    /// Keys of the origin's room-token secret (see [`crate::auth::identity`]).
    pub(crate) fn new(secret: &[u8]) -> RoomKeys {
        RoomKeys {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
        }
    }

    /// A token for a new participant, valid `ttl_secs`.
    pub(crate) fn issue(
        &self,
        room: &str,
        member: &str,
        user_name: &str,
        role: Role,
        permissions: &[Permission],
        ttl_secs: u64,
    ) -> (String, u64) {
        let now = unix_now();
        let claims = RoomClaims {
            typ: TYP.into(),
            iat: now,
            exp: now + ttl_secs,
            room: room.into(),
            sub: member.into(),
            name: user_name.into(),
            role: role.as_str().into(),
            permissions: permissions.iter().map(|p| p.as_str().into()).collect(),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .expect("HS256 signing cannot fail");
        (token, claims.exp)
    }

    /// Checks signature, expiry and shape.
    pub(crate) fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp"]);
        let c = decode::<RoomClaims>(token, &self.dec, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::BadJwt(e.to_string()),
            })?;
        if c.typ != TYP {
            return Err(AuthError::BadJwt("not a room token".into()));
        }
        Ok(Grant {
            role: Role::parse(&c.role).map_err(|e| AuthError::BadJwt(e.to_string()))?,
            permissions: parse_permissions(&c.permissions)
                .map_err(|e| AuthError::BadJwt(e.to_string()))?,
            room: c.room,
            member: c.sub,
            user_name: c.name,
            expires: c.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::{JwtSigner, Scope};

    #[test]
    fn room_tokens_and_signalling_jwts_do_not_mix() {
        let keys = RoomKeys::new(b"secret");
        let (t, exp) = keys.issue(
            "stage",
            "m-1",
            "Ana",
            Role::Member,
            &[Permission::MemberPromote],
            60,
        );
        let g = keys.verify(&t).unwrap();
        assert_eq!(
            (g.room.as_str(), g.member.as_str(), g.role, g.expires),
            ("stage", "m-1", Role::Member, exp)
        );
        assert_eq!(g.permissions, [Permission::MemberPromote]);
        // A signalling JWT is not a room token, and a room token is not a signalling JWT.
        let jwt = JwtSigner::from_pkcs8(&JwtSigner::generate_pkcs8(), 60).unwrap();
        assert!(keys.verify(&jwt.issue("stage", Scope::Publish)).is_err());
        assert!(jwt.verifier().verify(&t).is_err());
        assert!(RoomKeys::new(b"other").verify(&t).is_err());
    }
}
