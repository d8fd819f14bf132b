//! `GET /api/cluster` (room API key): the registry's nodes and stream owners; and how the
//! cluster's refusals become HTTP.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{bearer, fail, App, Refusal};
use crate::cluster::ClusterError;

/// The status a cluster refusal is answered with.
pub(crate) fn refusal(e: ClusterError) -> Refusal {
    let status = match &e {
        ClusterError::OwnedElsewhere { .. } => StatusCode::CONFLICT,
        ClusterError::Registry(_)
        | ClusterError::OwnerGone { .. }
        | ClusterError::Placement(_)
        | ClusterError::Draining(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    Refusal(status, e.to_string())
}

/// An operator's request (`what`) carries the room API key: else its refusal, 404 at an edge
/// (which holds no key).
pub(crate) fn operator(app: &App, headers: &HeaderMap, what: &str) -> Result<(), Refusal> {
    let Some(rooms) = &app.rooms else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("this is an edge: ask an origin for {what}"),
        ));
    };
    rooms
        .check_api_key(bearer(headers))
        .map_err(|e| Refusal(StatusCode::UNAUTHORIZED, format!("{what}: {e}")))
}

pub(crate) async fn view(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(refused) = operator(&app, &headers, "/api/cluster") {
        return refused.into_response();
    }
    let c = &app.cluster;
    // The nodes placement and ownership see: records with a recent heartbeat.
    let (nodes, owners) = match (c.live_nodes().await, c.registry().owners().await) {
        (Ok(n), Ok(o)) => (n, o),
        (Err(e), _) | (_, Err(e)) => {
            c.outage.failed("reading /api/cluster", &e);
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the cluster registry is unreachable: {e}"),
            );
        }
    };
    let nodes: Vec<_> = nodes
        .iter()
        .map(|n| {
            let r = &n.record;
            json!({
                "id": r.id,
                "kind": r.kind,
                "state": r.state,
                "boot": r.boot,
                "http": r.http,
                "ws": r.ws,
                "relay": r.relay,
                "fingerprint": r.fingerprint,
                "region": r.region,
                "capacity": r.capacity,
                "load": r.load,
                "streams": r.streams,
                "heartbeatAgeMs": n.age.as_millis() as u64,
            })
        })
        .collect();
    let streams: Vec<_> = owners
        .iter()
        .map(|(stream, holder)| {
            let (owner, boot) = holder.split_once('/').unwrap_or((holder.as_str(), ""));
            json!({"stream": stream, "owner": owner, "boot": boot})
        })
        .collect();
    Json(json!({
        "status": "success",
        "data": {
            "node": c.id,
            "redis": c.shared,
            "nodes": nodes,
            "streams": streams,
        }
    }))
    .into_response()
}
