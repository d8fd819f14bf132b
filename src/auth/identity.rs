//! The origin's identity: its QUIC certificate and key (edges pin the certificate's
//! fingerprint), its JWT signing key (Ed25519) and its room-token key. Only the origin holds
//! the private parts; an edge receives the JWT key's public half and nothing else.
//!
//! With `--data-dir DIR` they are made on first start (files of mode 0600 in a directory of
//! mode 0700) and reused after, so a restarted origin keeps its pinned fingerprint and the JWTs
//! and room tokens it issued before keep working. Without, they are new at every start.
//! `--jwt-secret` derives the two signing keys from a shared secret instead of the files (so
//! several origins, or a restart without a data dir, share them); the certificate still comes
//! from the data dir.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::jwt::JwtSigner;

pub(crate) const CERT_FILE: &str = "relay-cert.der";
pub(crate) const CERT_KEY_FILE: &str = "relay-key.pk8";
/// File name of the JWT signing key (Ed25519, PKCS#8) in the data dir.
pub const JWT_KEY_FILE: &str = "jwt-ed25519.pk8";
/// The name the QUIC certificate is issued for, which edges ask for when they connect (they
/// pin the certificate's fingerprint, not a CA: the name only has to agree).
pub const CERT_SERVER_NAME: &str = "chorus-origin";
pub(crate) const ROOM_KEY_FILE: &str = "room-token.key";
/// Length of a generated room-token key (HS256 secret).
pub(crate) const ROOM_KEY_BYTES: usize = 32;

/// An identity file that cannot be read, written or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or the data dir could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A key that does not parse or is too short, or a certificate without its key.
    #[error("{}: {message}", path.display())]
    Bad {
        /// The file or directory (`--jwt-secret` for a key derived from it).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The QUIC certificate could not be generated (the generator's message).
    #[error("cannot make the relay certificate: {0}")]
    Cert(String),
}

/// What an origin signs and proves itself with.
pub struct Identity {
    /// The QUIC certificate (DER) and its PKCS#8 key.
    pub cert_der: Vec<u8>,
    /// The certificate's private key (PKCS#8, DER).
    pub cert_key_der: Vec<u8>,
    /// The JWT signing key (Ed25519, PKCS#8).
    pub jwt_pkcs8: Vec<u8>,
    /// The room-token key (HS256 secret).
    pub room_key: Vec<u8>,
    /// Where it is kept; None = made for this start only.
    pub dir: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

fn hmac(secret: &[u8], label: &[u8]) -> Vec<u8> {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::sign(&key, label).as_ref().to_vec()
}

/// Writes a new secret file readable by its owner only; refuses to overwrite.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::read(path) {
        Ok(b) => {
            let mode = std::fs::metadata(path)
                .map_err(io(path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "secret file is readable by others: chmod 600 it");
            }
            Ok(Some(b))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Reads `path`, or makes it with `make` when it does not exist yet.
fn load_or_make(
    path: &Path,
    make: impl FnOnce() -> Vec<u8>,
) -> Result<(Vec<u8>, bool), IdentityError> {
    match read(path)? {
        Some(b) => Ok((b, false)),
        None => {
            let b = make();
            write_new(path, &b)?;
            Ok((b, true))
        }
    }
}

fn new_cert() -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
    let cert = rcgen::generate_simple_self_signed(vec![CERT_SERVER_NAME.to_owned()])
        .map_err(|e| IdentityError::Cert(e.to_string()))?;
    Ok((cert.cert.der().to_vec(), cert.signing_key.serialize_der()))
}

impl Identity {
    /// The identity kept in `dir` (made there on first use), or a fresh one for this start.
    /// `jwt_secret`, when given, derives both signing keys instead.
    pub fn load(dir: Option<&Path>, jwt_secret: Option<&[u8]>) -> Result<Identity, IdentityError> {
        let derived = jwt_secret.map(|s| {
            (
                hmac(s, b"chorus jwt signing v1"),
                hmac(s, b"chorus room tokens v1"),
            )
        });
        let derived = match derived {
            Some((seed, room)) => Some((
                JwtSigner::pkcs8_from_seed(&seed).map_err(|e| IdentityError::Bad {
                    path: "--jwt-secret".into(),
                    message: e.to_string(),
                })?,
                room,
            )),
            None => None,
        };
        let Some(dir) = dir else {
            let (cert_der, cert_key_der) = new_cert()?;
            let (jwt_pkcs8, room_key) = derived
                .unwrap_or_else(|| (JwtSigner::generate_pkcs8(), random_bytes(ROOM_KEY_BYTES)));
            return Ok(Identity {
                cert_der,
                cert_key_der,
                jwt_pkcs8,
                room_key,
                dir: None,
            });
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(CERT_KEY_FILE));
        let (cert_der, cert_key_der) = match (read(&cert_path)?, read(&key_path)?) {
            (Some(c), Some(k)) => (c, k),
            (None, None) => {
                let (c, k) = new_cert()?;
                write_new(&key_path, &k)?;
                write_new(&cert_path, &c)?;
                tracing::info!(dir = %dir.display(), "made a new relay certificate");
                (c, k)
            }
            _ => {
                return Err(IdentityError::Bad {
                    path: dir.to_owned(),
                    message: format!(
                        "{CERT_FILE} and {CERT_KEY_FILE} go together: one is missing (remove both to make a new certificate)"
                    ),
                })
            }
        };
        let (jwt_pkcs8, room_key) = match derived {
            Some(d) => d,
            None => {
                let jwt_path = dir.join(JWT_KEY_FILE);
                let (jwt, made) = load_or_make(&jwt_path, JwtSigner::generate_pkcs8)?;
                JwtSigner::from_pkcs8(&jwt, 60).map_err(|e| IdentityError::Bad {
                    path: jwt_path.clone(),
                    message: e.to_string(),
                })?;
                let room_path = dir.join(ROOM_KEY_FILE);
                let (room, made_room) = load_or_make(&room_path, || random_bytes(ROOM_KEY_BYTES))?;
                if room.len() < ROOM_KEY_BYTES {
                    return Err(IdentityError::Bad {
                        path: room_path,
                        message: format!("a room-token key has at least {ROOM_KEY_BYTES} bytes"),
                    });
                }
                if made || made_room {
                    tracing::info!(dir = %dir.display(), "made new signing keys");
                }
                (jwt, room)
            }
        };
        Ok(Identity {
            cert_der,
            cert_key_der,
            jwt_pkcs8,
            room_key,
            dir: Some(dir.to_owned()),
        })
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::Scope;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("chorus-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn two_starts_on_one_dir_share_the_identity() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir("reuse");
        let a = Identity::load(Some(&dir), None).unwrap();
        let b = Identity::load(Some(&dir), None).unwrap();
        // (That the relay's TLS takes this certificate is tested in `relay::tls`.)
        let fp = |i: &Identity| i.cert_der.clone();
        assert_eq!(fp(&a), fp(&b));
        assert_eq!(a.cert_key_der, b.cert_key_der);
        let (sa, sb) = (
            JwtSigner::from_pkcs8(&a.jwt_pkcs8, 60).unwrap(),
            JwtSigner::from_pkcs8(&b.jwt_pkcs8, 60).unwrap(),
        );
        assert!(sb.verifier().verify(&sa.issue("s", Scope::Publish)).is_ok());
        assert_eq!(a.room_key, b.room_key);
        for f in [CERT_FILE, CERT_KEY_FILE, JWT_KEY_FILE, ROOM_KEY_FILE] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // Another dir, or none: another identity.
        let c = Identity::load(None, None).unwrap();
        assert_ne!(fp(&a), fp(&c));
        assert!(JwtSigner::from_pkcs8(&c.jwt_pkcs8, 60)
            .unwrap()
            .verifier()
            .verify(&sa.issue("s", Scope::Publish))
            .is_err());
        // Half a certificate is refused, not silently replaced.
        std::fs::remove_file(dir.join(CERT_KEY_FILE)).unwrap();
        assert!(Identity::load(Some(&dir), None)
            .err()
            .unwrap()
            .to_string()
            .contains("go together"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_jwt_secret_derives_the_same_keys_everywhere() {
        let a = Identity::load(None, Some(b"shared")).unwrap();
        let b = Identity::load(None, Some(b"shared")).unwrap();
        assert_eq!((&a.jwt_pkcs8, &a.room_key), (&b.jwt_pkcs8, &b.room_key));
        let c = Identity::load(None, Some(b"other")).unwrap();
        assert_ne!(a.room_key, c.room_key);
    }
}
