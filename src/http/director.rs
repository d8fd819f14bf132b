//! `POST /api/director/publish` and `/subscribe`: check a long-lived token, answer with the
//! signalling URL and a short-lived JWT bound to the stream, in Millicast's response shape.

use std::sync::Arc;

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::listen::peer_ip;
use super::{bearer, fail, flow, relayed_refusal, App, Refusal};
use crate::auth::jwt::{RoomBinding, Scope};
use crate::millicast::{check_stream_name, director_answer};
use crate::origin::relay_server::SubscribePolicy;

/// The body of both director calls (`streamAccountId` and other fields are not used).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DirectorReq {
    stream_name: Option<String>,
    #[serde(default)]
    stream_type: Option<String>,
    /// The region a viewer would rather be served in (cluster placement; optional).
    #[serde(default)]
    region: Option<String>,
}

/// The signalling URL to give a client that asked from `peer` with these headers: see
/// [`super::public_url::PublicUrls::ws_url`].
pub(crate) fn ws_url(app: &App, peer: &ConnectInfo<SocketAddr>, headers: &HeaderMap) -> String {
    app.public
        .ws_url(app.public_ws.as_deref(), peer_ip(peer), headers)
}

/// A director answer for `stream` (with this process's TURN servers); a room member's also says
/// which sourceId it must publish.
fn success(
    app: &App,
    stream: &str,
    url: String,
    jwt: String,
    room: Option<&RoomBinding>,
) -> Response {
    let mut data = director_answer(url, jwt, app.turn.as_deref(), stream);
    if let Some(b) = room {
        data["sourceId"] = json!(b.member_id);
        data["memberId"] = json!(b.member_id);
    }
    Json(json!({"status": "success", "data": data})).into_response()
}

/// The request and its checked stream name, or the refusal to send.
fn parse_request(body: &[u8]) -> Result<(DirectorReq, String), Refusal> {
    let req: DirectorReq = serde_json::from_slice(body)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))?;
    let stream = req
        .stream_name
        .clone()
        .ok_or_else(|| Refusal(StatusCode::BAD_REQUEST, "missing streamName".into()))?;
    check_stream_name(&stream).map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok((req, stream))
}

pub(crate) async fn publish(
    State(app): State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if app.origin.is_none() {
        return fail(
            StatusCode::NOT_FOUND,
            "this is an edge: publish at the origin",
        );
    }
    let (req, stream) = match parse_request(&body) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(t) = req.stream_type.as_deref() {
        if !t.eq_ignore_ascii_case("webrtc") {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("streamType {t:?} is not supported: use \"WebRtc\""),
            );
        }
    }
    let (Some(tokens), Some(signer)) = (&app.tokens, &app.signer) else {
        return fail(
            StatusCode::NOT_FOUND,
            "this is an edge: publish at the origin",
        );
    };
    let token = bearer(&headers);
    // With a shared registry the room's decisions (demotions, removals) are read back first.
    if let Some(r) = &app.rooms {
        r.ensure_loaded(&stream).await;
    }
    let room = match flow::authorize(&app, tokens, token, &stream, Scope::Publish) {
        Ok(room) => room,
        Err(refusal) => return refusal.into_response(),
    };
    // The stream's owner takes its publications: this origin, or the lease holder's URL
    // (the least-loaded origin takes a free stream).
    let url = match app
        .cluster
        .publish_target(&stream, &ws_url(&app, &peer, &headers))
        .await
    {
        Ok(url) => url,
        Err(e) => return super::cluster::refusal(e).into_response(),
    };
    // A room member's credential carries no recording grant: a room records nothing.
    let grant = match room {
        Some(_) => (false, false),
        None => tokens.record_grant(token),
    };
    let jwt = signer.issue_recording(&stream, Scope::Publish, room.clone(), grant);
    success(&app, &stream, url, jwt, room.as_ref())
}

pub(crate) async fn subscribe(
    State(app): State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (stream, region) = match parse_request(&body) {
        Ok((req, stream)) => (stream, req.region),
        Err(refusal) => return refusal.into_response(),
    };
    // Viewers go to this process's edge; in a cluster (--redis) to the edge placement picks;
    // else to a linked edge, in turn.
    let url = match (&app.edge, &app.origin) {
        (Some(_), _) => ws_url(&app, &peer, &headers),
        (None, Some(_)) if app.cluster.shared => {
            match app.cluster.place_viewer(&stream, region.as_deref()).await {
                Ok(url) => url,
                Err(e) => return super::cluster::refusal(e).into_response(),
            }
        }
        (None, Some(origin)) => match origin.pick_edge() {
            Some(url) => url,
            None => {
                return fail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no edge is linked to this origin to serve viewers (start chorus edge)",
                )
            }
        },
        (None, None) => unreachable!("a process runs an origin, an edge or both"),
    };
    let token = bearer(&headers);
    if let Some(r) = &app.rooms {
        r.ensure_loaded(&stream).await;
    }
    let jwt = match (&app.origin, &app.edge) {
        (Some(_), _) => authorize_subscribe(&app, token, &stream),
        // An edge signs nothing: the origin's policy decides and signs.
        (None, Some(edge)) => edge
            .authorize(&stream, token)
            .await
            .map_err(relayed_refusal),
        (None, None) => unreachable!("a process runs an origin, an edge or both"),
    };
    match jwt {
        Ok(jwt) => success(&app, &stream, url, jwt, None),
        Err(refusal) => refusal.into_response(),
    }
}

/// Decides a viewer where the origin runs: a room token for the stream's room, or the token
/// policy (a subscribe token when the stream has one). Its subscribe JWT, or the refusal.
pub(crate) fn authorize_subscribe(
    app: &App,
    token: Option<&str>,
    stream: &str,
) -> Result<String, Refusal> {
    let (Some(tokens), Some(signer)) = (&app.tokens, &app.signer) else {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "this process holds no token policy".into(),
        ));
    };
    let room = flow::authorize(app, tokens, token, stream, Scope::Subscribe)?;
    // A room participant's viewer JWT names it: its removal ends the view at every edge.
    Ok(signer.issue_bound(stream, Scope::Subscribe, room))
}

/// The relay asks this for viewers at linked edges.
impl SubscribePolicy for App {
    fn authorize_subscribe(
        &self,
        stream: &str,
        token: Option<&str>,
    ) -> Result<String, (u16, String)> {
        check_stream_name(stream).map_err(|e| (400, e.to_string()))?;
        authorize_subscribe(self, token, stream).map_err(|Refusal(s, m)| (s.as_u16(), m))
    }
}
