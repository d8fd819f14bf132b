//! WHIP (RFC 9725) publishing for clients outside the SDK: `POST /whip/{stream}?sourceId=ID`
//! with the publish token (or a publish JWT) as bearer and the SDP offer as body.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::director::check_stream_name;
use super::signal::MAX_SOURCE_ID;
use super::{bearer, fail, App};
use crate::auth::jwt::Scope;
use crate::origin::Owner;
use crate::rtc::offer::OfferError;

#[derive(Deserialize)]
pub struct WhipQuery {
    #[serde(rename = "sourceId")]
    source_id: Option<String>,
}

fn authorized(app: &App, headers: &HeaderMap, stream: &str) -> Result<(), String> {
    let token = bearer(headers);
    // A publish JWT from the director works as well as the long-lived token.
    if let Some(claims) = token.and_then(|t| app.jwt.verify(t).ok()) {
        return if claims.scope == Scope::Publish && claims.millicast.stream_name == stream {
            Ok(())
        } else {
            Err(format!("this JWT does not allow publishing to {stream:?}"))
        };
    }
    app.tokens
        .check_publish(token, stream)
        .map_err(|e| e.to_string())
}

pub async fn publish(
    State(app): State<Arc<App>>,
    Path(stream): Path<String>,
    Query(q): Query<WhipQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(origin) = &app.origin else {
        return fail(
            StatusCode::NOT_FOUND,
            "this is an edge: publish at the origin",
        );
    };
    if let Err(m) = check_stream_name(&stream) {
        return fail(StatusCode::BAD_REQUEST, m);
    }
    if let Err(m) = authorized(&app, &headers, &stream) {
        return fail(StatusCode::UNAUTHORIZED, m);
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/sdp") {
        return fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "WHIP offers must be Content-Type: application/sdp",
        );
    }
    let source = q.source_id.filter(|s| !s.is_empty());
    if source
        .as_ref()
        .is_some_and(|s| s.len() > MAX_SOURCE_ID || s.chars().any(char::is_control))
    {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("sourceId must be at most {MAX_SOURCE_ID} printable characters"),
        );
    }
    let Ok(offer) = std::str::from_utf8(&body) else {
        return fail(StatusCode::BAD_REQUEST, "SDP offer is not UTF-8");
    };
    match origin.publish(&stream, source, offer, Owner::Whip) {
        Ok(p) => (
            StatusCode::CREATED,
            [
                (header::CONTENT_TYPE, "application/sdp".to_owned()),
                (
                    header::LOCATION,
                    format!("/whip/resource/{}", p.publisher_id),
                ),
            ],
            p.answer,
        )
            .into_response(),
        Err(
            e @ (OfferError::Malformed(_) | OfferError::Unacceptable(_) | OfferError::Rejected(_)),
        ) => fail(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub async fn delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if app.origin.as_ref().is_some_and(|o| o.unpublish_whip(&id)) {
        StatusCode::OK.into_response()
    } else {
        fail(StatusCode::NOT_FOUND, format!("no WHIP session {id:?}"))
    }
}

/// Trickle ICE and ICE restarts are not supported (RFC 9725 §4.3.1: answer 405).
pub async fn patch() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST, DELETE")],
    )
        .into_response()
}
