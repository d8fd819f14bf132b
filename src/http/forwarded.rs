//! What a trusted reverse proxy says about the request it forwards: `Forwarded` (RFC 7239) or
//! `X-Forwarded-Proto` / `-Host` / `-For`. Those headers are believed only from a peer inside a
//! `--trusted-proxy` range: from anyone else they are a client's claim about itself, and
//! believing them would let it choose the host chorus names in its answers and the address the
//! per-IP offer rate counts.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// Most `--trusted-proxy` ranges: each request's peer is checked against every one.
pub(crate) const MAX_TRUSTED_PROXIES: usize = 64;

/// Most elements of a `Forwarded` (or addresses of an `X-Forwarded-For`) header looked at: a
/// chain of proxies is a few hops, a longer list is a client padding the header.
pub(crate) const MAX_FORWARDED_ELEMENTS: usize = 16;

/// Longest forwarded host taken (a DNS name is at most 253 characters, plus a port).
pub(crate) const MAX_FORWARDED_HOST: usize = 260;

/// An IP range: `10.0.0.0/8`, `fd00::/8`, or one address (`127.0.0.1` = `/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

/// Why a `--trusted-proxy` value is not an IP range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// The address part is no IP address.
    #[error("{0:?} is not an IP address or range (e.g. 127.0.0.1, 10.0.0.0/8, fd00::/8)")]
    Address(String),
    /// The prefix length is no number or too long for the family.
    #[error("{0:?}: the prefix length must be 0..=32 for IPv4 and 0..=128 for IPv6")]
    Prefix(String),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| CidrError::Address(s.to_owned()))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| CidrError::Prefix(s.to_owned()))?,
        };
        Ok(Cidr { net, bits })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

impl Cidr {
    /// Whether `ip` is in this range (an IPv4-mapped IPv6 peer counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn under(a: u128, b: u128, bits: u32, width: u32) -> bool {
            bits == 0 || (a ^ b) >> (width - bits) == 0
        }
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => under(
                u32::from(n).into(),
                u32::from(i).into(),
                self.bits.into(),
                32,
            ),
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                under(u128::from(n), u128::from(i), self.bits.into(), 128)
            }
            _ => false,
        }
    }
}

/// The `--trusted-proxy` ranges; empty (the default) = forwarded headers are never believed.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// At most [`MAX_TRUSTED_PROXIES`] ranges (checked where the flags are read).
    pub(crate) fn new(ranges: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies(ranges)
    }

    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a trusted proxy said about the client's request. Empty fields: it did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Forwarded {
    /// `https` (or `wss`) at the proxy: this server's URLs are `https://` and `wss://` there.
    pub secure: Option<bool>,
    /// The host (and port) the client asked the proxy for.
    pub host: Option<String>,
    /// The client's address, as the first proxy of the trusted chain saw it.
    pub client: Option<IpAddr>,
}

impl Forwarded {
    /// What the headers say, when `peer` is a trusted proxy; nothing otherwise (logged at
    /// debug when the headers were there). `Forwarded` wins over `X-Forwarded-*`.
    pub(crate) fn from_request(
        trusted: &TrustedProxies,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Forwarded {
        let has = |h: &str| headers.contains_key(h);
        let any = has("forwarded")
            || has("x-forwarded-proto")
            || has("x-forwarded-host")
            || has("x-forwarded-for");
        if !any {
            return Forwarded::default();
        }
        if !trusted.trusts(peer) {
            tracing::debug!(%peer, "forwarded headers from a peer that is no --trusted-proxy: ignored");
            return Forwarded::default();
        }
        let rfc = rfc7239(trusted, headers);
        let x = x_forwarded(trusted, headers);
        Forwarded {
            secure: rfc.secure.or(x.secure),
            host: rfc.host.or(x.host),
            client: rfc.client.or(x.client),
        }
    }
}

/// The values of every instance of header `name`, split at commas outside quotes.
fn list<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for v in headers.get_all(name) {
        let Ok(v) = v.to_str() else { continue };
        let (mut start, mut quoted) = (0, false);
        for (i, c) in v.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    out.push(v[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(v[start..].trim());
    }
    out.retain(|e| !e.is_empty());
    // Only the last elements matter (the ones our side of the chain added).
    let skip = out.len().saturating_sub(MAX_FORWARDED_ELEMENTS);
    out.drain(..skip);
    out
}

/// The element to believe among those the chain appended (oldest first): the one added by
/// the first trusted proxy, found by walking back from ours while the hop before is trusted.
fn believed<T>(
    elements: &[T],
    hop: impl Fn(&T) -> Option<IpAddr>,
    trusted: &TrustedProxies,
) -> usize {
    let mut i = elements.len() - 1;
    while i > 0 && hop(&elements[i]).is_some_and(|ip| trusted.trusts(ip)) {
        i -= 1;
    }
    i
}

/// `Forwarded: for=192.0.2.60;proto=https;host=example.com, for=...` (RFC 7239).
fn rfc7239(trusted: &TrustedProxies, headers: &HeaderMap) -> Forwarded {
    let elements: Vec<Vec<(String, String)>> = list(headers, "forwarded")
        .into_iter()
        .map(|e| {
            e.split(';')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    let v = v.trim();
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(v);
                    Some((k.trim().to_ascii_lowercase(), v.to_owned()))
                })
                .collect()
        })
        .collect();
    if elements.is_empty() {
        return Forwarded::default();
    }
    let get = |e: &Vec<(String, String)>, k: &str| {
        e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let i = believed(
        &elements,
        |e| get(e, "for").and_then(|f| node_ip(&f)),
        trusted,
    );
    let e = &elements[i];
    Forwarded {
        secure: get(e, "proto").and_then(|p| secure_proto(&p)),
        host: get(e, "host").and_then(|h| checked_host(&h)),
        client: get(e, "for").and_then(|f| node_ip(&f)),
    }
}

/// `X-Forwarded-Proto`, `-Host` (the last value: what our proxy says; most proxies replace
/// them, and a client's own earlier value is not to be believed) and `-For` (walked like
/// `Forwarded`'s `for`).
fn x_forwarded(trusted: &TrustedProxies, headers: &HeaderMap) -> Forwarded {
    let last = |name: &str| list(headers, name).last().map(|s| s.to_string());
    let fors: Vec<Option<IpAddr>> = list(headers, "x-forwarded-for")
        .into_iter()
        .map(node_ip)
        .collect();
    let client = if fors.is_empty() {
        None
    } else {
        fors[believed(&fors, |f| *f, trusted)]
    };
    Forwarded {
        secure: last("x-forwarded-proto").and_then(|p| secure_proto(&p)),
        host: last("x-forwarded-host").and_then(|h| checked_host(&h)),
        client,
    }
}

/// `https`/`wss` = secure, `http`/`ws` = not; anything else is ignored.
fn secure_proto(p: &str) -> Option<bool> {
    match p.to_ascii_lowercase().as_str() {
        "https" | "wss" => Some(true),
        "http" | "ws" => Some(false),
        _ => None,
    }
}

/// A node of `for=`: `192.0.2.60`, `192.0.2.60:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711`, a
/// bare IPv6 address (X-Forwarded-For); `unknown` and obfuscated names are no address.
fn node_ip(n: &str) -> Option<IpAddr> {
    let n = n.trim();
    if let Ok(ip) = n.parse() {
        return Some(ip);
    }
    if let Some(rest) = n.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    n.rsplit_once(':')?.0.parse().ok()
}

/// A host the client may be sent to: a DNS name, an IPv4 or a bracketed IPv6 address, with an
/// optional port; nothing that could end the authority of a URL (`/`, `@`, `?`, spaces).
fn checked_host(h: &str) -> Option<String> {
    let ok = !h.is_empty()
        && h.len() <= MAX_FORWARDED_HOST
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    ok.then(|| h.to_ascii_lowercase())
}

/// Test requests' headers from (name, value) pairs.
#[cfg(test)]
pub(crate) fn test_headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, v.parse().unwrap());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::test_headers as headers;
    use super::*;

    fn trusted(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies::new(ranges.iter().map(|r| r.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_contain() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.200.1.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped peers");
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(!one.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "example.com".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let h = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4;proto=https;host=evil.example"),
        ]);
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            Forwarded::from_request(&t, ip("192.0.2.1"), &h),
            Forwarded::default()
        );
        let none = TrustedProxies::default();
        assert_eq!(
            Forwarded::from_request(&none, ip("10.0.0.1"), &h),
            Forwarded::default()
        );
    }

    #[test]
    fn x_forwarded_from_a_trusted_peer() {
        let h = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "Live.Example.com"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        let f = Forwarded::from_request(&trusted(&["127.0.0.1"]), ip("127.0.0.1"), &h);
        assert_eq!(f.secure, Some(true));
        assert_eq!(f.host.as_deref(), Some("live.example.com"));
        assert_eq!(f.client, Some(ip("203.0.113.9")));
    }

    #[test]
    fn rfc7239_wins_and_walks_the_trusted_chain() {
        // client 203.0.113.9 -> cdn 198.51.100.7 (trusted) -> nginx 10.0.0.2 (trusted) -> us
        let h = headers(&[
            (
                "forwarded",
                "for=203.0.113.9;proto=https;host=live.example.com, for=198.51.100.7;proto=http;host=inner",
            ),
            ("x-forwarded-proto", "http"),
        ]);
        let t = trusted(&["10.0.0.0/8", "198.51.100.0/24"]);
        let f = Forwarded::from_request(&t, ip("10.0.0.2"), &h);
        assert_eq!(f.secure, Some(true));
        assert_eq!(f.host.as_deref(), Some("live.example.com"));
        assert_eq!(f.client, Some(ip("203.0.113.9")));
        // A client-made element before an untrusted hop is not believed.
        let h = headers(&[(
            "forwarded",
            "for=1.1.1.1;host=evil.example, for=\"[2001:db8::1]:4711\";proto=https;host=live.example.com",
        )]);
        let f = Forwarded::from_request(&trusted(&["10.0.0.0/8"]), ip("10.0.0.2"), &h);
        assert_eq!(f.host.as_deref(), Some("live.example.com"));
        assert_eq!(f.client, Some(ip("2001:db8::1")));
    }

    #[test]
    fn hosts_that_would_break_a_url_are_refused() {
        for bad in ["a/b", "user@host", "host?x", "ho st", ""] {
            assert_eq!(checked_host(bad), None, "{bad:?}");
        }
        assert_eq!(checked_host("[::1]:8443").as_deref(), Some("[::1]:8443"));
    }
}
