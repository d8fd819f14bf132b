//! Dev mode's room token helper for the room page (`POST /api/dev/rooms/{room}/tokens`): the
//! page's "join as host / join as listener" asks it instead of an app backend. It takes the body
//! of `POST /api/rooms/{room}/tokens` without the API key, so it answers only in dev mode and
//! only the page itself on this machine: a loopback client, a loopback `Host` (a rebound DNS
//! name is not) and, from a browser, the same origin (another site's script is refused).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::info;

use super::{rooms, App, Refusal};
use crate::auth::tokens::Tokens;

/// What the request looks like, for [`refusal`].
pub(crate) struct Asker<'a> {
    /// The TCP peer.
    pub peer: IpAddr,
    /// The client (a trusted proxy's forwarded one, else the peer).
    pub client: IpAddr,
    /// The host the client asked for (`Host`, or a trusted proxy's forwarded one).
    pub host: &'a str,
    /// The `Origin` header a browser sends with a POST.
    pub origin: Option<&'a str>,
}

/// Why the helper does not answer this request, if it does not.
pub(crate) fn refusal(dev: bool, a: &Asker<'_>) -> Option<Refusal> {
    if !dev {
        return Some(Refusal(
            StatusCode::NOT_FOUND,
            "no dev token helper: this server is not in dev mode; room tokens come from your \
             backend, which asks POST /api/rooms/{room}/tokens with the API key"
                .into(),
        ));
    }
    let forbid = |m: &str| Some(Refusal(StatusCode::FORBIDDEN, m.to_owned()));
    if !a.peer.is_loopback() || !a.client.is_loopback() {
        return forbid("the dev token helper answers clients on this machine only");
    }
    if !loopback_host(a.host) {
        return forbid(
            "the dev token helper answers requests for 127.0.0.1, [::1] or localhost only",
        );
    }
    match a.origin {
        Some(o) if !same_origin(o, a.host) => forbid(
            "the dev token helper answers the room page of this server only (cross-origin request)",
        ),
        _ => None,
    }
}

/// `127.0.0.1:8080`, `[::1]`, `localhost:80`: a name that reaches this machine only.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn same_origin(origin: &str, host: &str) -> bool {
    ["http://", "https://"]
        .iter()
        .any(|scheme| origin.strip_prefix(scheme) == Some(host))
}

/// `POST /api/dev/rooms/{room}/tokens`: as `POST /api/rooms/{room}/tokens`, without the key.
pub(crate) async fn issue(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dev = app.tokens.as_ref().is_some_and(Tokens::is_dev);
    let o = app.public.origin(peer.ip(), &headers);
    let asker = Asker {
        peer: peer.ip(),
        client: o.client,
        host: &o.host,
        origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
    };
    if let Some(r) = refusal(dev, &asker) {
        info!(room = room.as_str(), %peer, reason = r.1.as_str(), "dev token helper refused a request");
        return r.into_response();
    }
    match rooms::mint(&app, &room, &body) {
        Ok(data) => {
            info!(
                room = room.as_str(),
                "dev mode: the room page's helper issued a room token"
            );
            Json(json!({"status": "success", "data": data})).into_response()
        }
        Err(r) => r.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const LAN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 20));

    fn asker<'a>(client: IpAddr, host: &'a str, origin: Option<&'a str>) -> Asker<'a> {
        Asker {
            peer: LO,
            client,
            host,
            origin,
        }
    }

    fn status(dev: bool, a: &Asker<'_>) -> Option<StatusCode> {
        refusal(dev, a).map(|r| r.0)
    }

    #[test]
    fn the_page_itself_and_curl_on_this_machine_get_tokens() {
        let ok = [
            asker(LO, "127.0.0.1:8080", Some("http://127.0.0.1:8080")),
            asker(LO, "localhost:8080", Some("http://localhost:8080")),
            asker(LO, "[::1]:9000", Some("http://[::1]:9000")),
            asker(LO, "127.0.0.1:8080", None),
        ];
        for a in &ok {
            assert_eq!(status(true, a), None, "{} {:?}", a.host, a.origin);
        }
    }

    #[test]
    fn everything_else_is_refused() {
        let a = asker(LO, "127.0.0.1:8080", None);
        assert_eq!(status(false, &a), Some(StatusCode::NOT_FOUND));
        let refused = [
            // A client a trusted proxy forwarded from the network.
            asker(LAN, "127.0.0.1:8080", None),
            // A DNS name rebound to 127.0.0.1, by a page of that name.
            asker(LO, "evil.example:8080", Some("http://evil.example:8080")),
            asker(LO, "127.0.0.1.evil.example", None),
            // Another site's script, or another local port.
            asker(LO, "127.0.0.1:8080", Some("https://evil.example")),
            asker(LO, "127.0.0.1:8080", Some("http://127.0.0.1:3000")),
            asker(LO, "127.0.0.1:8080", Some("null")),
        ];
        for a in &refused {
            assert_eq!(
                status(true, a),
                Some(StatusCode::FORBIDDEN),
                "{} {:?}",
                a.host,
                a.origin
            );
        }
        let mut from_lan = asker(LO, "127.0.0.1:8080", None);
        from_lan.peer = LAN;
        assert_eq!(status(true, &from_lan), Some(StatusCode::FORBIDDEN));
    }
}
