//! The HTTP face of chorus: director API, signalling WebSocket, WHIP, stream introspection.

pub mod director;
pub mod metrics;
pub mod rooms;
pub mod signal;
pub mod signal_cmd;
pub mod web;
pub mod whep;
pub mod whip;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::cors::{Any, CorsLayer};

use crate::auth::jwt::{JwtKeys, RoomBinding, Scope};
use crate::auth::tokens::Tokens;
use crate::edge::Edge;
use crate::origin::Origin;
use crate::room::RoomService;
use crate::rtc::offer::OfferError;
use crate::rtc::peers::PeerId;

/// Everything the HTTP handlers share.
pub struct App {
    pub tokens: Tokens,
    pub jwt: JwtKeys,
    /// Present where publications are taken (`serve`, `origin`).
    pub origin: Option<Arc<Origin>>,
    /// Present where viewers are served (`serve`, `edge`).
    pub edge: Option<Arc<Edge>>,
    /// Present with the origin.
    pub rooms: Option<Arc<RoomService>>,
    /// Base URL put in director answers (`ws://host:port`); None = from the request's Host.
    pub public_ws: Option<String>,
    pub next_session: AtomicU64,
    /// WHEP resource id -> viewer peer, for DELETE.
    pub whep: Mutex<HashMap<String, PeerId>>,
}

/// The `{"status":"fail"}` body the SDK expects, with a status code.
pub fn fail(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    tracing::info!(%status, %message, "request refused");
    (
        status,
        Json(json!({"status": "fail", "data": {"message": message}})),
    )
        .into_response()
}

/// A refusal, turned into a `fail` response where it is returned.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        fail(self.0, self.1)
    }
}

/// The token of an `Authorization: Bearer ...` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What WHIP and WHEP check before looking at an offer: the stream name, the bearer (a director
/// JWT of `scope` for this stream, a room token, or a long-lived token of that kind), and an SDP
/// body. Returns the offer and, for a room member, what binds its publication; or the refusal.
pub fn sdp_request<'a>(
    app: &App,
    headers: &HeaderMap,
    stream: &str,
    scope: Scope,
    body: &'a [u8],
) -> Result<(&'a str, Option<RoomBinding>), Refusal> {
    director::check_stream_name(stream).map_err(|m| Refusal(StatusCode::BAD_REQUEST, m))?;
    let token = bearer(headers);
    let room = match rooms::room_grant(app, token, stream, scope) {
        Some(grant) => grant?,
        None => {
            let allowed = match token.and_then(|t| app.jwt.verify(t).ok()) {
                Some(claims) if claims.scope == scope && claims.millicast.stream_name == stream => {
                    Ok(())
                }
                Some(_) => Err(format!("this JWT does not allow {scope:?} on {stream:?}")),
                None => match scope {
                    Scope::Publish => app.tokens.check_publish(token, stream),
                    Scope::Subscribe => app.tokens.check_subscribe(token, stream),
                }
                .map_err(|e| e.to_string()),
            };
            allowed.map_err(|m| Refusal(StatusCode::UNAUTHORIZED, m))?;
            None
        }
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/sdp") {
        return Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "offers must be Content-Type: application/sdp".into(),
        ));
    }
    let offer = std::str::from_utf8(body)
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "SDP offer is not UTF-8".into()))?;
    Ok((offer, room))
}

/// A refused offer: the client's fault (400) unless something broke on our side.
pub fn offer_refused(e: OfferError) -> Response {
    match e {
        OfferError::Malformed(_) | OfferError::Unacceptable(_) | OfferError::Rejected(_) => {
            fail(StatusCode::BAD_REQUEST, e.to_string())
        }
        OfferError::Internal(_) => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub fn router(app: Arc<App>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(Any)
        // `*` does not cover Authorization in the Fetch spec: name the headers clients send.
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
        ])
        .expose_headers([header::LOCATION, header::ETAG]);
    Router::new()
        .route("/", get(web::index))
        .route("/demo.js", get(web::demo_js))
        .route("/demo.css", get(web::demo_css))
        .route("/sdk/millicast.umd.js", get(web::sdk))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/director/publish", post(director::publish))
        .route("/api/director/subscribe", post(director::subscribe))
        .route("/api/streams/{name}", get(stream_view))
        .route("/ws", get(signal::upgrade))
        .route("/api/rooms/{room}/tokens", post(rooms::issue_token))
        .route("/api/rooms/{room}/ws", get(rooms::upgrade))
        .route("/whip/{stream}", post(whip::publish))
        .route(
            "/whip/resource/{id}",
            delete(whip::delete).patch(whip::patch),
        )
        .route("/whep/{stream}", post(whep::view))
        .route(
            "/whep/resource/{id}",
            delete(whep::delete).patch(whip::patch),
        )
        .layer(cors)
        .with_state(app)
}

async fn stream_view(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Some(origin) = &app.origin else {
        return fail(
            StatusCode::NOT_FOUND,
            "this is an edge: stream state is at the origin",
        );
    };
    match origin.stream_view(&name) {
        Some(v) => Json(v).into_response(),
        None => fail(StatusCode::NOT_FOUND, format!("no stream {name:?} is live")),
    }
}
