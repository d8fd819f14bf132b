//! `POST /api/director/publish` and `/subscribe`: check a long-lived token, answer with the
//! signalling URL and a short-lived JWT bound to the stream, in Millicast's response shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{bearer, fail, App};
use crate::auth::jwt::Scope;

pub const ACCOUNT_ID: &str = "chorus";
/// Stream names are path segments and log fields: keep them plain.
pub const MAX_STREAM_NAME: usize = 128;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishReq {
    stream_name: Option<String>,
    #[serde(default)]
    stream_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscribeReq {
    stream_name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    stream_account_id: Option<String>,
}

pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_STREAM_NAME {
        return Err(format!(
            "streamName must be 1 to {MAX_STREAM_NAME} characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
    {
        return Err("streamName may only hold letters, digits and - _ . ~".into());
    }
    Ok(())
}

fn ws_url(app: &App, headers: &HeaderMap) -> String {
    if let Some(base) = &app.public_ws {
        return format!("{base}/ws");
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:8080");
    format!("ws://{host}/ws")
}

fn success(app: &App, headers: &HeaderMap, jwt: String) -> Response {
    Json(json!({
        "status": "success",
        "data": {
            "urls": [ws_url(app, headers)],
            "jwt": jwt,
            "streamAccountId": ACCOUNT_ID,
            "iceServers": [],
        }
    }))
    .into_response()
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(fail(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON body: {e}"),
        ))
    })
}

pub async fn publish(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if app.origin.is_none() {
        return fail(
            StatusCode::NOT_FOUND,
            "this is an edge: publish at the origin",
        );
    }
    let req: PublishReq = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let Some(stream) = req.stream_name else {
        return fail(StatusCode::BAD_REQUEST, "missing streamName");
    };
    if let Err(m) = check_stream_name(&stream) {
        return fail(StatusCode::BAD_REQUEST, m);
    }
    if let Some(t) = req.stream_type.as_deref() {
        if !t.eq_ignore_ascii_case("webrtc") {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("streamType {t:?} is not supported: use \"WebRtc\""),
            );
        }
    }
    if let Err(e) = app.tokens.check_publish(bearer(&headers), &stream) {
        return fail(StatusCode::UNAUTHORIZED, e.to_string());
    }
    success(&app, &headers, app.jwt.issue(&stream, Scope::Publish))
}

pub async fn subscribe(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if app.edge.is_none() {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "this origin serves no viewers: subscribe at an edge (chorus edge)",
        );
    }
    let req: SubscribeReq = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let Some(stream) = req.stream_name else {
        return fail(StatusCode::BAD_REQUEST, "missing streamName");
    };
    if let Err(m) = check_stream_name(&stream) {
        return fail(StatusCode::BAD_REQUEST, m);
    }
    if let Err(e) = app.tokens.check_subscribe(bearer(&headers), &stream) {
        return fail(StatusCode::UNAUTHORIZED, e.to_string());
    }
    success(&app, &headers, app.jwt.issue(&stream, Scope::Subscribe)).into_response()
}
