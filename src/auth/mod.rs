//! Who may publish or view what: long-lived tokens (a token file, or the dev-mode token) checked
//! by the director, and the short-lived JWTs it hands out for the signalling socket.

pub mod identity;
pub mod jwt;
pub mod tokens;
pub mod turn;

/// Why a request was refused. Every variant maps to a 401 with a `fail` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthError {
    Missing,
    Unknown,
    Expired,
    WrongStream { stream: String },
    WrongKind { expected: &'static str },
    BadJwt(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => write!(f, "missing token: send Authorization: Bearer <token>"),
            AuthError::Unknown => write!(f, "unknown token"),
            AuthError::Expired => write!(f, "token expired"),
            AuthError::WrongStream { stream } => {
                write!(f, "token is not valid for stream {stream:?}")
            }
            AuthError::WrongKind { expected } => write!(f, "not a {expected} token"),
            AuthError::BadJwt(m) => write!(f, "invalid JWT: {m}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compares secrets without an early exit, so timing does not leak how much matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random secret, URL-safe base64 of `bytes` random bytes.
pub(crate) fn random_secret(bytes: usize) -> String {
    use base64::Engine;
    let buf: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}
