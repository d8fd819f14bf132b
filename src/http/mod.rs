//! The HTTP face of chorus: director API, signalling WebSocket, WHIP, stream introspection.

pub mod director;
pub mod metrics;
pub mod signal;
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

use crate::auth::jwt::JwtKeys;
use crate::auth::tokens::Tokens;
use crate::edge::Edge;
use crate::origin::Origin;
use crate::rtc::peers::PeerId;

/// Everything the HTTP handlers share.
pub struct App {
    pub tokens: Tokens,
    pub jwt: JwtKeys,
    /// Present where publications are taken (`serve`, `origin`).
    pub origin: Option<Arc<Origin>>,
    /// Present where viewers are served (`serve`, `edge`).
    pub edge: Option<Arc<Edge>>,
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
