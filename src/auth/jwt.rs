//! The short-lived JWT the director returns: bound to one stream and one scope. The SDK decodes
//! its payload and reads `millicast.streamName`, so that claim is laid out as Millicast does.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::{unix_now, AuthError};

/// What a JWT lets its bearer do with its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Publish to the stream (WHIP, signalling `publish`).
    Publish,
    /// View the stream (WHEP, signalling `view`).
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MillicastClaims {
    pub stream_name: String,
    /// Recording allowed (the SDK refuses `publish({record: true})` without it).
    #[serde(default)]
    pub record: bool,
    /// chorus's own: a publish that does not say is recorded (the token's `record`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_by_default: bool,
}

/// A publish JWT of a room member: it publishes that member's source only, and only while the
/// member's publish generation in the room is still this one (a demotion moves it on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RoomBinding {
    pub room: String,
    pub member_id: String,
    pub generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub iat: u64,
    pub exp: u64,
    pub scope: Scope,
    pub millicast: MillicastClaims,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomBinding>,
}

/// A key a JWT or a key file was refused for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A private key that is not Ed25519 PKCS#8 (the parser's message).
    #[error("not an Ed25519 PKCS#8 private key: {0}")]
    BadPrivateKey(String),
    /// A public key that is not base64 of 32 bytes.
    #[error("not an Ed25519 public key (base64 of 32 bytes): {0}")]
    BadPublicKey(String),
}

/// The public half of the origin's JWT key: what an edge receives to check viewers' JWTs. It
/// cannot sign anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyKey {
    /// Names the key in the JWT header (`kid`): the first 8 bytes of its SHA-256, in hex.
    pub kid: String,
    /// The raw 32-byte Ed25519 public key.
    pub ed25519: Vec<u8>,
}

impl VerifyKey {
    pub(crate) fn new(ed25519: Vec<u8>) -> Result<VerifyKey, KeyError> {
        if ed25519.len() != 32 {
            return Err(KeyError::BadPublicKey(format!("{} bytes", ed25519.len())));
        }
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &ed25519);
        let kid = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(VerifyKey { kid, ed25519 })
    }

    /// Base64 of the raw key, as the relay's `Welcome` carries it.
    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&self.ed25519)
    }

    pub(crate) fn from_base64(b64: &str) -> Result<VerifyKey, KeyError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| KeyError::BadPublicKey(e.to_string()))?;
        VerifyKey::new(raw)
    }
}

/// Signs the director's JWTs (viewers' and publishers', members' publish JWTs) with the
/// origin's Ed25519 key (EdDSA). Only an origin holds one; edges get its [`VerifyKey`].
pub struct JwtSigner {
    enc: EncodingKey,
    public: VerifyKey,
    /// Lifetime of the JWTs it issues, in seconds.
    pub ttl_secs: u64,
}

impl JwtSigner {
    /// A new random key, as PKCS#8 (what `--data-dir` stores).
    pub fn generate_pkcs8() -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("Ed25519 key generation cannot fail")
            .as_ref()
            .to_vec()
    }

    /// The key of a 32-byte seed (derived from `--jwt-secret`), as PKCS#8.
    pub(crate) fn pkcs8_from_seed(seed: &[u8]) -> Result<Vec<u8>, KeyError> {
        use aws_lc_rs::signature::Ed25519KeyPair;
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        let doc = pair
            .to_pkcs8()
            .map_err(|_| KeyError::BadPrivateKey("cannot encode".into()))?;
        Ok(doc.as_ref().to_vec())
    }

    /// A signer of this PKCS#8 Ed25519 key whose JWTs live `ttl_secs` seconds.
    pub fn from_pkcs8(der: &[u8], ttl_secs: u64) -> Result<JwtSigner, KeyError> {
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
        let pair =
            Ed25519KeyPair::from_pkcs8(der).map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        Ok(JwtSigner {
            enc: EncodingKey::from_ed_der(der),
            public: VerifyKey::new(pair.public_key().as_ref().to_vec())?,
            ttl_secs,
        })
    }

    /// The public half of the key, for edges and verifiers.
    pub fn verify_key(&self) -> &VerifyKey {
        &self.public
    }

    /// A verifier of this signer's JWTs.
    pub fn verifier(&self) -> JwtVerifier {
        JwtVerifier::new(&self.public)
    }

    /// A JWT for `stream` with `scope`, bound to no room member.
    pub fn issue(&self, stream: &str, scope: Scope) -> String {
        self.issue_bound(stream, scope, None)
    }

    /// A JWT for `stream`, bound to a room member's source when `room` is given.
    pub(crate) fn issue_bound(
        &self,
        stream: &str,
        scope: Scope,
        room: Option<RoomBinding>,
    ) -> String {
        self.issue_recording(stream, scope, room, (false, false))
    }

    /// A JWT as [`issue_bound`](Self::issue_bound) makes, with the recording grant (allowed,
    /// by default) of the token it was issued for.
    pub(crate) fn issue_recording(
        &self,
        stream: &str,
        scope: Scope,
        room: Option<RoomBinding>,
        (record, record_by_default): (bool, bool),
    ) -> String {
        let now = unix_now();
        self.sign(&Claims {
            iat: now,
            exp: now + self.ttl_secs,
            scope,
            millicast: MillicastClaims {
                stream_name: stream.to_owned(),
                record,
                record_by_default,
            },
            room,
        })
    }

    pub(crate) fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.public.kid.clone());
        encode(&header, claims, &self.enc).expect("EdDSA signing with a checked key cannot fail")
    }
}

/// Checks the director's JWTs with the origin's public key. An edge's verifier starts empty
/// and takes the key of each `Welcome` (an origin restarted with a new key is followed on
/// relink); shared behind an `Arc` by the HTTP handlers and the origin link.
#[derive(Default)]
pub struct JwtVerifier {
    key: RwLock<Option<(VerifyKey, DecodingKey)>>,
}

impl JwtVerifier {
    pub(crate) fn new(key: &VerifyKey) -> JwtVerifier {
        let v = JwtVerifier::default();
        v.set(key);
        v
    }

    /// Takes `key` from now on; true when it differs from the one held.
    pub(crate) fn set(&self, key: &VerifyKey) -> bool {
        let mut held = self.key.write().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_some_and(|(k, _)| k == key) {
            return false;
        }
        *held = Some((key.clone(), DecodingKey::from_ed_der(&key.ed25519)));
        true
    }

    /// The key held now.
    pub(crate) fn key(&self) -> Option<VerifyKey> {
        let held = self.key.read().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|(k, _)| k.clone())
    }

    /// Checks signature (EdDSA only: an HS256 or `none` JWT is refused) and expiry; the caller
    /// checks stream and scope against the request.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let held = self.key.read().unwrap_or_else(|p| p.into_inner());
        let Some((_, dec)) = held.as_ref() else {
            return Err(AuthError::BadJwt("no origin key yet".into()));
        };
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp"]);
        decode::<Claims>(token, dec, &v)
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

    fn signer() -> JwtSigner {
        JwtSigner::from_pkcs8(&JwtSigner::generate_pkcs8(), 60).unwrap()
    }

    #[test]
    fn round_trip_expiry_and_tamper() {
        let k = signer();
        let v = k.verifier();
        let t = k.issue("panel", Scope::Publish);
        let c = v.verify(&t).unwrap();
        assert_eq!(
            (c.scope, c.millicast.stream_name.as_str()),
            (Scope::Publish, "panel")
        );
        let expired = k.sign(&Claims {
            exp: unix_now() - 5,
            ..c.clone()
        });
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(
            signer().verifier().verify(&t),
            Err(AuthError::BadJwt(_))
        ));
        assert!(matches!(v.verify("not.a.jwt"), Err(AuthError::BadJwt(_))));
    }

    #[test]
    fn what_an_edge_holds_signs_nothing_the_verifier_takes() {
        let k = signer();
        let v = k.verifier();
        let public = k.verify_key().clone();
        let claims = v.verify(&k.issue("panel", Scope::Publish)).unwrap();
        // HS256 with the public key (or its base64, what Welcome carries) as the secret: the
        // classic algorithm confusion. Refused.
        for secret in [public.ed25519.clone(), public.to_base64().into_bytes()] {
            let forged = encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(&secret),
            )
            .unwrap();
            assert!(v.verify(&forged).is_err());
        }
        // alg none.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(v.verify(&none).is_err());
        // The wire form of the key round-trips, and the header names it.
        assert_eq!(VerifyKey::from_base64(&public.to_base64()).unwrap(), public);
        let t = k.issue("panel", Scope::Subscribe);
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().kid,
            Some(public.kid.clone())
        );
    }

    #[test]
    fn a_verifier_follows_a_new_key() {
        let (a, b) = (signer(), signer());
        let v = JwtVerifier::default();
        assert!(v.verify(&a.issue("s", Scope::Subscribe)).is_err());
        assert!(v.set(a.verify_key()));
        assert!(!v.set(a.verify_key()));
        assert!(v.verify(&a.issue("s", Scope::Subscribe)).is_ok());
        assert!(v.set(b.verify_key()));
        assert!(v.verify(&a.issue("s", Scope::Subscribe)).is_err());
        assert!(v.verify(&b.issue("s", Scope::Subscribe)).is_ok());
    }

    #[test]
    fn a_seed_gives_the_same_key_every_time() {
        let seed = [7u8; 32];
        let a = JwtSigner::from_pkcs8(&JwtSigner::pkcs8_from_seed(&seed).unwrap(), 60).unwrap();
        let b = JwtSigner::from_pkcs8(&JwtSigner::pkcs8_from_seed(&seed).unwrap(), 60).unwrap();
        assert_eq!(a.verify_key(), b.verify_key());
        assert!(b.verifier().verify(&a.issue("s", Scope::Publish)).is_ok());
    }
}
