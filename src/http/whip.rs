//! WHIP (RFC 9725) publishing for clients outside the SDK: `POST /whip/{stream}?sourceId=ID`
//! with the publish token (or a publish JWT) as bearer and the SDP offer as body.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::signal::MAX_SOURCE_ID;
use super::{fail, offer_refused, rooms, sdp_request, App};
use crate::auth::jwt::Scope;
use crate::origin::Owner;

#[derive(Deserialize)]
pub struct WhipQuery {
    #[serde(rename = "sourceId")]
    source_id: Option<String>,
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
    let (offer, room) = match sdp_request(&app, &headers, &stream, Scope::Publish, &body) {
        Ok(o) => o,
        Err(refusal) => return refusal.into_response(),
    };
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
    if let Some(b) = &room {
        if let Err(m) = rooms::check_room_publish(&app, b, source.as_deref(), offer) {
            return fail(StatusCode::FORBIDDEN, m);
        }
    }
    let published = origin.publish(&stream, source, offer, Owner::Whip);
    if let (Ok(_), Some(b)) = (&published, &room) {
        if let Err(m) = rooms::confirm_room_publish(&app, b) {
            return fail(StatusCode::FORBIDDEN, m);
        }
    }
    match published {
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
        Err(e) => offer_refused(e),
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
