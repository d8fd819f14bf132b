//! WHIP (RFC 9725) publishing for clients outside the SDK: `POST /whip/{stream}?sourceId=ID`
//! (`&record=true|false`: Millicast's WHIP has no such parameter, its token decides; here it
//! is the signalling `record`) with the publish token (or a publish JWT) as bearer and the SDP
//! offer as body.

use std::sync::Arc;

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::flow::{self, FlowError, PublishAsk};
use super::resources::Session;
use super::{bearer, fail, sdp_request, App};
use crate::auth::jwt::Scope;
use crate::millicast::{source_id_ok, MAX_SOURCE_ID};
use crate::origin::Owner;
use crate::recording::RecordAsk;

#[derive(Deserialize)]
pub(crate) struct WhipQuery {
    #[serde(rename = "sourceId")]
    source_id: Option<String>,
    record: Option<bool>,
}

/// The bearer's recording grant (allowed, by default): a director JWT's claims, else the
/// token file's entry; a room member's credential has none.
fn record_grant(app: &App, token: Option<&str>, stream: &str, room: bool) -> (bool, bool) {
    if room {
        return (false, false);
    }
    if let Ok(Some(c)) = super::jwt_allows(app, token, stream, Scope::Publish) {
        return (c.millicast.record, c.millicast.record_by_default);
    }
    app.tokens
        .as_ref()
        .map_or((false, false), |t| t.record_grant(token))
}

pub(crate) async fn publish(
    State(app): State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    Path(stream): Path<String>,
    Query(q): Query<WhipQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if app.origin.is_none() {
        return FlowError::NotAnOrigin.into_response();
    }
    if let Some(r) = &app.rooms {
        r.ensure_loaded(&stream).await;
    }
    let (offer, room) = match sdp_request(&app, &headers, &stream, Scope::Publish, &body) {
        Ok(o) => o,
        Err(refusal) => return refusal.into_response(),
    };
    if let Err(e) = app.cluster.ensure_owner(&stream).await {
        return super::cluster::refusal(e).into_response();
    }
    let source = q.source_id.filter(|s| !s.is_empty());
    if source.as_ref().is_some_and(|s| !source_id_ok(s)) {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("sourceId must be at most {MAX_SOURCE_ID} printable characters"),
        );
    }
    let (allowed, by_default) = record_grant(&app, bearer(&headers), &stream, room.is_some());
    let published = flow::publish(
        &app,
        PublishAsk {
            stream: &stream,
            source,
            offer,
            room: room.as_ref(),
            owner: Owner::Whip,
            peer: app.client_ip(super::listen::peer_ip(&peer), &headers),
            // WHIP has no priority: a WHIP feed of a sourceId plays when it is the newest.
            priority: 0,
            record: RecordAsk {
                asked: q.record,
                allowed,
                by_default,
            },
        },
    );
    match published {
        Ok(p) => {
            // The resource id is not the publisher id (which operators see in /api/streams):
            // 128 random bits, ended only with the bearer that created it.
            let id = app
                .resources
                .create(Session::Whip(p.publisher_id), bearer(&headers));
            (
                StatusCode::CREATED,
                [
                    (header::CONTENT_TYPE, "application/sdp".to_owned()),
                    (
                        header::LOCATION,
                        app.public.location(
                            super::listen::peer_ip(&peer),
                            &headers,
                            &format!("/whip/resource/{id}"),
                        ),
                    ),
                ],
                p.answer,
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `DELETE /whip/resource/{id}` with the bearer that created it (RFC 9725 §4.2).
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match app.resources.take(&id, true, bearer(&headers)) {
        Ok(Session::Whip(publisher)) => {
            // Already gone (replaced, or its peer ended) is still a successful end.
            let _ = app.origin.as_ref().map(|o| o.unpublish_whip(&publisher));
            StatusCode::OK.into_response()
        }
        Ok(Session::Whep(_)) => fail(StatusCode::NOT_FOUND, format!("no WHIP session {id:?}")),
        Err(refusal) => refusal.into_response(),
    }
}

/// Trickle ICE and ICE restarts are not supported (RFC 9725 §4.3.1: answer 405), to the holder
/// of the resource's credential; others get 404 or 401 as for DELETE.
pub(crate) async fn patch(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = app.resources.check(&id, bearer(&headers)) {
        return refusal.into_response();
    }
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST, DELETE")],
    )
        .into_response()
}
