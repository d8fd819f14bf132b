//! Long-lived publish and subscribe tokens.
//!
//! Two sources: a JSON token file managed with `chorus token create`, re-read whenever it
//! changes on disk so new tokens work without a restart; or, with no file, dev mode: one publish
//! token for every stream and every stream open to viewers.
//! A stream needs a subscribe token exactly when the file holds one for it (or for `*`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{constant_time_eq, random_secret, unix_now, AuthError};

/// What a token in the token file lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Publish (WHIP, signalling `publish`).
    Publish,
    /// View (WHEP, signalling `view`).
    Subscribe,
}

impl TokenKind {
    /// The kind as the token file and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Publish => "publish",
            TokenKind::Subscribe => "subscribe",
        }
    }
}

/// One token of the token file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// The secret the bearer presents (24 random bytes, URL-safe base64).
    pub token: String,
    /// Stream name, or `*` for every stream.
    pub stream: String,
    /// What it lets the bearer do.
    pub kind: TokenKind,
    /// Unix seconds; none = never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// Unix seconds it was made at (0 when the file does not say).
    #[serde(default)]
    pub created: u64,
    /// A publish token whose feeds are recorded unless a publish says `record: false` (and
    /// that allows `record: true`), Millicast's token `record` setting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record: bool,
}

impl TokenEntry {
    fn covers(&self, stream: &str) -> bool {
        self.stream == "*" || self.stream == stream
    }
}

/// A token file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The token file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid token file.
    #[error("{}: {source}", .path.display())]
    Json {
        /// The token file.
        path: PathBuf,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
}

/// A `--ttl` that is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a duration: {0:?} (use e.g. 90s, 10m, 12h, 7d)")]
pub struct BadDuration(pub String);

/// The tokens a server accepts, as kept in the `--tokens` JSON file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFile {
    /// Every token, in the order they were made.
    pub tokens: Vec<TokenEntry>,
}

impl TokenFile {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<TokenFile, TokenFileError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| TokenFileError::Json {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(source) => Err(TokenFileError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes via a temporary file and a rename, so a server never reads half a file.
    pub fn save(&self, path: &Path) -> Result<(), TokenFileError> {
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self).expect("token file serializes");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|source| TokenFileError::Io {
                path: path.to_owned(),
                source,
            })
    }

    /// Adds a new random token and returns it.
    pub fn create(&mut self, stream: &str, kind: TokenKind, ttl_secs: Option<u64>) -> TokenEntry {
        let now = unix_now();
        let entry = TokenEntry {
            token: random_secret(24),
            stream: stream.to_owned(),
            kind,
            expires: ttl_secs.map(|t| now + t),
            created: now,
            record: false,
        };
        self.tokens.push(entry.clone());
        entry
    }

    fn check(
        &self,
        token: Option<&str>,
        stream: &str,
        kind: TokenKind,
        now: u64,
    ) -> Result<(), AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let entry = self
            .tokens
            .iter()
            .find(|e| constant_time_eq(e.token.as_bytes(), token.as_bytes()))
            .ok_or(AuthError::Unknown)?;
        if entry.kind != kind {
            return Err(AuthError::WrongKind {
                expected: kind.as_str(),
            });
        }
        if !entry.covers(stream) {
            return Err(AuthError::WrongStream {
                stream: stream.to_owned(),
            });
        }
        if entry.expires.is_some_and(|e| e <= now) {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    /// Whether a publish token that passes [`check`](Self::check) records.
    fn records(&self, token: &str) -> bool {
        self.tokens
            .iter()
            .any(|e| e.record && constant_time_eq(e.token.as_bytes(), token.as_bytes()))
    }

    fn needs_subscribe_token(&self, stream: &str) -> bool {
        self.tokens
            .iter()
            .any(|e| e.kind == TokenKind::Subscribe && e.covers(stream))
    }
}

/// Where the token policy comes from: dev mode's one publish token, or a token file.
enum TokenStore {
    Dev {
        publish_token: String,
    },
    File {
        path: PathBuf,
        cache: Mutex<(Option<SystemTime>, TokenFile)>,
    },
}

pub(crate) struct Tokens {
    source: TokenStore,
}

impl Tokens {
    pub(crate) fn dev(publish_token: String) -> Tokens {
        Tokens {
            source: TokenStore::Dev { publish_token },
        }
    }

    pub(crate) fn file(path: PathBuf) -> Result<Tokens, TokenFileError> {
        let file = TokenFile::load(&path)?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok(Tokens {
            source: TokenStore::File {
                path,
                cache: Mutex::new((mtime, file)),
            },
        })
    }

    pub(crate) fn is_dev(&self) -> bool {
        matches!(self.source, TokenStore::Dev { .. })
    }

    pub(crate) fn check_publish(&self, token: Option<&str>, stream: &str) -> Result<(), AuthError> {
        match &self.source {
            TokenStore::Dev { publish_token } => {
                let t = token.ok_or(AuthError::Missing)?;
                if constant_time_eq(t.as_bytes(), publish_token.as_bytes()) {
                    Ok(())
                } else {
                    Err(AuthError::Unknown)
                }
            }
            TokenStore::File { .. } => {
                self.with_file(|f| f.check(token, stream, TokenKind::Publish, unix_now()))
            }
        }
    }

    /// What a checked publish token says about recording: (allowed, by default). Dev mode
    /// allows it when asked; a token file's entry records when it has `record`.
    pub(crate) fn record_grant(&self, token: Option<&str>) -> (bool, bool) {
        match &self.source {
            TokenStore::Dev { .. } => (true, false),
            TokenStore::File { .. } => {
                let r = token.is_some_and(|t| self.with_file(|f| f.records(t)));
                (r, r)
            }
        }
    }

    pub(crate) fn check_subscribe(
        &self,
        token: Option<&str>,
        stream: &str,
    ) -> Result<(), AuthError> {
        match &self.source {
            TokenStore::Dev { .. } => Ok(()),
            TokenStore::File { .. } => self.with_file(|f| {
                if f.needs_subscribe_token(stream) {
                    f.check(token, stream, TokenKind::Subscribe, unix_now())
                } else {
                    Ok(())
                }
            }),
        }
    }

    fn with_file<T>(&self, f: impl FnOnce(&TokenFile) -> T) -> T {
        let TokenStore::File { path, cache } = &self.source else {
            unreachable!("only called for file sources")
        };
        let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime != guard.0 {
            match TokenFile::load(path) {
                Ok(file) => {
                    tracing::info!(path = %path.display(), tokens = file.tokens.len(), "token file reloaded");
                    *guard = (mtime, file);
                }
                // Keep serving with the last good file rather than locking everyone out.
                Err(e) => tracing::warn!("token file not reloaded: {e}"),
            }
        }
        f(&guard.1)
    }
}

/// Parses a duration like `90`, `30s`, `10m`, `12h` or `7d` into seconds.
pub fn parse_ttl(s: &str) -> Result<u64, BadDuration> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| BadDuration(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tokens_check_kind_stream_and_expiry() {
        let mut f = TokenFile::default();
        let p = f.create("panel", TokenKind::Publish, None);
        let any = f.create("*", TokenKind::Publish, None);
        let old = f.create("panel", TokenKind::Publish, Some(10));
        let s = f.create("panel", TokenKind::Subscribe, None);
        let now = unix_now();
        assert_eq!(
            f.check(Some(&p.token), "panel", TokenKind::Publish, now),
            Ok(())
        );
        assert_eq!(
            f.check(Some(&any.token), "other", TokenKind::Publish, now),
            Ok(())
        );
        assert_eq!(
            f.check(Some(&p.token), "other", TokenKind::Publish, now),
            Err(AuthError::WrongStream {
                stream: "other".into()
            })
        );
        assert_eq!(
            f.check(Some(&s.token), "panel", TokenKind::Publish, now),
            Err(AuthError::WrongKind {
                expected: "publish"
            })
        );
        assert_eq!(
            f.check(Some(&old.token), "panel", TokenKind::Publish, now + 11),
            Err(AuthError::Expired)
        );
        assert_eq!(
            f.check(Some("nope"), "panel", TokenKind::Publish, now),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            f.check(None, "panel", TokenKind::Publish, now),
            Err(AuthError::Missing)
        );
        assert!(f.needs_subscribe_token("panel"));
        assert!(!f.needs_subscribe_token("open"));
    }

    #[test]
    fn file_is_reloaded_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("chorus-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.json");
        let _ = std::fs::remove_file(&path);
        let tokens = Tokens::file(path.clone()).unwrap();
        assert_eq!(
            tokens.check_publish(Some("x"), "s"),
            Err(AuthError::Unknown)
        );
        let mut f = TokenFile::default();
        let e = f.create("s", TokenKind::Publish, None);
        // Make sure the modification time differs from the (absent) one cached.
        f.save(&path).unwrap();
        assert_eq!(tokens.check_publish(Some(&e.token), "s"), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("10m"), Ok(600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0").is_err() && parse_ttl("x").is_err() && parse_ttl("").is_err());
    }
}
