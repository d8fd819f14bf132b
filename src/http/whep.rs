//! WHEP viewing for clients outside the SDK: `POST /whep/{stream}?tracks=N&pinned=ID&exclude=a,b`
//! with the SDP offer (1 main + N multiplexed recvonly audio m-lines). No event channel: the
//! tracks carry audio only; `vad` needs the SDK's signalling.

use std::sync::Arc;

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::flow::{self, Ender, FlowError, ViewAsk};
use super::resources::Session;
use super::{bearer, fail, jwt_allows, relayed_refusal, sdp_offer, sdp_request, App};
use crate::auth::jwt::{RoomBinding, Scope};
use crate::edge::{ViewOptions, MAX_TRACKS};
use crate::rtc::offer::mlines;

#[derive(Deserialize)]
pub(crate) struct WhepQuery {
    tracks: Option<usize>,
    pinned: Option<String>,
    exclude: Option<String>,
}

pub(crate) async fn view(
    State(app): State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    Path(stream): Path<String>,
    Query(q): Query<WhepQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(edge) = &app.edge else {
        return FlowError::NotAnEdge.into_response();
    };
    let request = if app.origin.is_some() {
        sdp_request(&app, &headers, &stream, Scope::Subscribe, &body)
    } else {
        match edge_allows(&app, edge, &headers, &stream).await {
            Ok(room) => sdp_offer(&headers, &body).map(|o| (o, room)),
            Err(refusal) => Err(refusal),
        }
    };
    let (offer, room) = match request {
        Ok(o) => o,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(n) = q.tracks {
        let available = mlines(offer)
            .iter()
            .filter(|m| m.media == "audio")
            .count()
            .saturating_sub(1);
        if n > MAX_TRACKS || n > available {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("tracks={n}, but the offer has {available} audio m-lines after the main one (at most {MAX_TRACKS})"),
            );
        }
    }
    let excluded = q
        .exclude
        .map(|e| {
            e.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let opts = ViewOptions {
        pinned: q.pinned.filter(|p| !p.is_empty()),
        excluded,
        max_tracks: q.tracks,
    };
    // WHEP has no event channel: events have nowhere to go.
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    let ask = ViewAsk {
        stream: &stream,
        offer,
        opts,
        room: room.as_ref(),
        ender: Ender::Whep,
        peer: app.client_ip(super::listen::peer_ip(&peer), &headers),
        events,
    };
    let prepared = match flow::prepare_view(&app, ask) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let answer = prepared.pending.answer.clone();
    let id = prepared.commit();
    let resource = app.resources.create(Session::Whep(id), bearer(&headers));
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_owned()),
            (
                header::LOCATION,
                app.public.location(
                    super::listen::peer_ip(&peer),
                    &headers,
                    &format!("/whep/resource/{resource}"),
                ),
            ),
        ],
        answer,
    )
        .into_response()
}

/// At an edge without an origin: a subscribe JWT for the stream (checked with the origin's
/// public key), or else the origin's answer for the bearer (its token policy is the only truth).
async fn edge_allows(
    app: &App,
    edge: &crate::edge::Edge,
    headers: &HeaderMap,
    stream: &str,
) -> Result<Option<RoomBinding>, super::Refusal> {
    crate::millicast::check_stream_name(stream)
        .map_err(|e| super::Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
    let token = bearer(headers);
    if let Some(claims) = jwt_allows(app, token, stream, Scope::Subscribe)? {
        return Ok(claims.room);
    }
    let jwt = edge
        .authorize(stream, token)
        .await
        .map_err(relayed_refusal)?;
    // The origin binds a room participant's viewer JWT to it: keep that for its removal.
    Ok(app.jwt.verify(&jwt).ok().and_then(|c| c.room))
}

/// `DELETE /whep/resource/{id}` with the bearer that created it (none for an open stream's).
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match (app.resources.take(&id, false, bearer(&headers)), &app.edge) {
        (Ok(Session::Whep(peer)), Some(edge)) => {
            edge.remove(peer);
            StatusCode::OK.into_response()
        }
        (Err(refusal), _) => refusal.into_response(),
        _ => fail(StatusCode::NOT_FOUND, format!("no WHEP session {id:?}")),
    }
}
