//! The URLs chorus gives clients that name itself (the director's signalling URL, WHIP and WHEP
//! resource `Location`s), as the client sees this server: through a trusted TLS proxy that is
//! `wss://public-host/base-path/...`; reached directly, what it was before (`ws://` + `Host`).

use std::net::IpAddr;

use axum::http::{header, HeaderMap};

use super::forwarded::{Forwarded, TrustedProxies};

/// Longest `--base-path`.
pub(crate) const MAX_BASE_PATH: usize = 200;

/// Why a `--base-path` is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BasePathError {
    /// Not of the form `/name` or `/a/b`.
    #[error("--base-path {0:?} must start with '/', have no empty segment, no '.' or '..' segment, and use only letters, digits and -._~ (e.g. /chorus)")]
    Shape(String),
    /// Over [`MAX_BASE_PATH`] characters.
    #[error("--base-path is longer than {MAX_BASE_PATH} characters")]
    TooLong,
}

/// The path prefix every route lives under: `""` (the root, the default) or `/a/b` (no
/// trailing slash; `/` alone is the root).
pub fn check_base_path(p: &str) -> Result<String, BasePathError> {
    let p = p.trim();
    if p.is_empty() || p == "/" {
        return Ok(String::new());
    }
    if p.len() > MAX_BASE_PATH {
        return Err(BasePathError::TooLong);
    }
    let trimmed = p.strip_suffix('/').unwrap_or(p);
    let Some(rest) = trimmed.strip_prefix('/') else {
        return Err(BasePathError::Shape(p.to_owned()));
    };
    let ok = rest.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    });
    if !ok {
        return Err(BasePathError::Shape(p.to_owned()));
    }
    Ok(trimmed.to_owned())
}

/// How this server names itself to a client.
#[derive(Debug, Clone, Default)]
pub(crate) struct PublicUrls {
    /// Peers whose forwarded headers are believed (`--trusted-proxy`).
    pub trusted: TrustedProxies,
    /// `--base-path`, checked: `""` or `/a/b`.
    pub base_path: String,
}

/// How one request reached this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestOrigin {
    /// TLS at the client (the proxy said https).
    pub secure: bool,
    /// The host the client used (forwarded, else `Host`).
    pub host: String,
    /// A trusted proxy named the scheme or the host: URLs are given absolute.
    pub forwarded: bool,
    /// The client's address: the forwarded one behind a trusted proxy, else the peer.
    pub client: IpAddr,
}

impl PublicUrls {
    /// The scheme, host and client of a request from `peer`.
    pub(crate) fn origin(&self, peer: IpAddr, headers: &HeaderMap) -> RequestOrigin {
        let f = if self.trusted.is_empty() {
            Forwarded::default()
        } else {
            Forwarded::from_request(&self.trusted, peer, headers)
        };
        let forwarded = f.secure.is_some() || f.host.is_some();
        let host = f.host.unwrap_or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1:8080")
                .to_owned()
        });
        RequestOrigin {
            secure: f.secure.unwrap_or(false),
            host,
            forwarded,
            client: f.client.unwrap_or(peer),
        }
    }

    /// The signalling URL for this request: `--public-ws` + `/ws` when set (it names the
    /// public base itself, path included), else `ws[s]://host/base-path/ws`.
    pub(crate) fn ws_url(
        &self,
        public_ws: Option<&str>,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> String {
        if let Some(base) = public_ws {
            return format!("{base}/ws");
        }
        let o = self.origin(peer, headers);
        let scheme = if o.secure { "wss" } else { "ws" };
        format!("{scheme}://{}{}/ws", o.host, self.base_path)
    }

    /// The `Location` of a resource at `path` (`/whip/resource/ID`): under the base path, and
    /// absolute (`https://host/base/...`) when a trusted proxy said how the client reached us.
    pub(crate) fn location(&self, peer: IpAddr, headers: &HeaderMap, path: &str) -> String {
        let o = self.origin(peer, headers);
        if o.forwarded {
            let scheme = if o.secure { "https" } else { "http" };
            format!("{scheme}://{}{}{path}", o.host, self.base_path)
        } else {
            format!("{}{path}", self.base_path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::forwarded::test_headers as headers;
    use super::*;

    #[test]
    fn base_paths() {
        assert_eq!(check_base_path("").unwrap(), "");
        assert_eq!(check_base_path("/").unwrap(), "");
        assert_eq!(check_base_path("/chorus").unwrap(), "/chorus");
        assert_eq!(check_base_path("/chorus/").unwrap(), "/chorus");
        assert_eq!(check_base_path("/a/b-c_d.e~").unwrap(), "/a/b-c_d.e~");
        for bad in ["chorus", "/a//b", "/a/../b", "/{x}", "/a b", "/a?x", "/./a"] {
            assert!(check_base_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_base_path(&format!("/{}", "a".repeat(MAX_BASE_PATH))),
            Err(BasePathError::TooLong)
        );
    }

    #[test]
    fn defaults_name_the_host_header_as_before() {
        let u = PublicUrls::default();
        let h = headers(&[("host", "127.0.0.1:8080"), ("x-forwarded-proto", "https")]);
        let peer = "127.0.0.1".parse().unwrap();
        assert_eq!(u.ws_url(None, peer, &h), "ws://127.0.0.1:8080/ws");
        assert_eq!(u.location(peer, &h, "/whip/resource/x"), "/whip/resource/x");
        assert_eq!(
            u.ws_url(Some("wss://live.example.com/chorus"), peer, &h),
            "wss://live.example.com/chorus/ws"
        );
    }

    #[test]
    fn behind_a_trusted_tls_proxy_under_a_path() {
        let u = PublicUrls {
            trusted: TrustedProxies::new(vec!["127.0.0.1".parse().unwrap()]),
            base_path: "/chorus".into(),
        };
        let h = headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "live.example.com"),
        ]);
        let proxy = "127.0.0.1".parse().unwrap();
        assert_eq!(
            u.ws_url(None, proxy, &h),
            "wss://live.example.com/chorus/ws"
        );
        assert_eq!(
            u.location(proxy, &h, "/whep/resource/x"),
            "https://live.example.com/chorus/whep/resource/x"
        );
        // The same headers from another peer: the Host header, under the base path.
        let other = "192.0.2.1".parse().unwrap();
        assert_eq!(u.ws_url(None, other, &h), "ws://127.0.0.1:8080/chorus/ws");
        assert_eq!(
            u.location(other, &h, "/whep/resource/x"),
            "/chorus/whep/resource/x"
        );
    }
}
