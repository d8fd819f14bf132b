//! WHEP viewing for clients outside the SDK: `POST /whep/{stream}?tracks=N&pinned=ID&exclude=a,b`
//! with the SDP offer (1 main + N multiplexed recvonly audio m-lines). No event channel: the
//! tracks carry audio only; `vad` needs the SDK's signalling.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{
    bearer, fail, jwt_allows, offer_refused, relayed_refusal, sdp_offer, sdp_request, App,
};
use crate::auth::jwt::Scope;
use crate::edge::{ViewOptions, MAX_TRACKS};
use crate::rtc::offer::mlines;

#[derive(Deserialize)]
pub struct WhepQuery {
    tracks: Option<usize>,
    pinned: Option<String>,
    exclude: Option<String>,
}

pub async fn view(
    State(app): State<Arc<App>>,
    Path(stream): Path<String>,
    Query(q): Query<WhepQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(edge) = &app.edge else {
        return fail(
            StatusCode::NOT_FOUND,
            "this origin serves no viewers: view at an edge",
        );
    };
    let offer = if app.origin.is_some() {
        sdp_request(&app, &headers, &stream, Scope::Subscribe, &body).map(|(o, _)| o)
    } else {
        edge_allows(&app, edge, &headers, &stream)
            .await
            .and_then(|()| sdp_offer(&headers, &body))
    };
    let offer = match offer {
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
    let pending = match edge.prepare(&stream, offer, opts, events) {
        Ok(p) => p,
        Err(e) => return offer_refused(e),
    };
    let resource = pending.subscriber_id.clone();
    let answer = pending.answer.clone();
    let id = edge.commit(pending);
    app.whep
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(resource.clone(), id);
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_owned()),
            (header::LOCATION, format!("/whep/resource/{resource}")),
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
) -> Result<(), super::Refusal> {
    super::director::check_stream_name(stream)
        .map_err(|m| super::Refusal(StatusCode::BAD_REQUEST, m))?;
    let token = bearer(headers);
    if jwt_allows(app, token, stream, Scope::Subscribe)? {
        return Ok(());
    }
    edge.authorize(stream, token)
        .await
        .map(|_jwt| ())
        .map_err(relayed_refusal)
}

pub async fn delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let peer = app
        .whep
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    match (peer, &app.edge) {
        (Some(peer), Some(edge)) => {
            edge.remove(peer);
            StatusCode::OK.into_response()
        }
        _ => fail(StatusCode::NOT_FOUND, format!("no WHEP session {id:?}")),
    }
}
