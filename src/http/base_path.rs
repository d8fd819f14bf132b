//! chorus under a path prefix (`--base-path /chorus`): every route moves under it, and the one
//! URL the SDK calls for both director requests when its endpoint has a path is answered.
//!
//! `Director.setEndpoint('https://host/chorus')` makes the SDK (0.6) POST both
//! `getPublisher` and `getSubscriber` to `https://host/chorus` itself (it appends
//! `/api/director/{publish,subscribe}` only to an endpoint without a path). So `POST {base}`
//! is routed by its body: `streamAccountId` (what `getSubscriber` sends) or no bearer (a
//! publish always has one) is a subscribe, anything else a publish.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Router;

use super::{bearer, fail, limits, App};

/// `router` served under `app.public.base_path` (checked, non-empty): requests outside it get
/// 404.
pub(crate) fn mount(router: Router, app: Arc<App>) -> Router {
    Router::new()
        .fallback_service(router)
        .layer(axum::middleware::from_fn_with_state(app, strip))
}

/// Strips the base path before the inner router routes the request.
async fn strip(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let base = app.public.base_path.as_str();
    let path = req.uri().path();
    let rest = if path == base {
        ""
    } else if let Some(rest) = path.strip_prefix(base).filter(|r| r.starts_with('/')) {
        rest
    } else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("chorus is served under {base}/ here (--base-path)"),
        );
    };
    if rest.is_empty() {
        if req.method() == Method::POST {
            return director(req, next).await;
        }
        // The demo page's asset URLs are relative: they need the trailing slash.
        return Redirect::permanent(&format!("{base}/")).into_response();
    }
    let rest = rest.to_owned();
    forward(req, &rest, next).await
}

/// The request with its path replaced by `path` (the query kept), to the inner router.
async fn forward(mut req: Request, path: &str, next: Next) -> Response {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = match pq.parse() {
        Ok(pq) => Some(pq),
        Err(_) => return fail(StatusCode::BAD_REQUEST, "malformed request path"),
    };
    match Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return fail(StatusCode::BAD_REQUEST, "malformed request path"),
    }
    next.run(req).await
}

/// `POST {base}`: the SDK's director call, sent on to `/api/director/publish` or `/subscribe`.
async fn director(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    // Read here, before the inner router's deadline applies: the same deadline, the same cap.
    let read = tokio::time::timeout(limits::REQUEST_TIMEOUT, to_bytes(body, limits::MAX_BODY));
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a director request is at most {} bytes", limits::MAX_BODY),
            )
        }
        Err(_) => {
            return fail(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not complete within {} s",
                    limits::REQUEST_TIMEOUT.as_secs()
                ),
            )
        }
    };
    let which = director_kind(&bytes, bearer(&parts.headers).is_some());
    let mut req = Request::from_parts(parts, Body::from(bytes));
    // The body was read here: its length is known again.
    req.headers_mut().remove(header::TRANSFER_ENCODING);
    forward(req, &format!("/api/director/{which}"), next).await
}

/// `subscribe` or `publish` for a director body (see the module doc).
fn director_kind(body: &[u8], has_bearer: bool) -> &'static str {
    let account = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("streamAccountId").is_some());
    if account || !has_bearer {
        "subscribe"
    } else {
        "publish"
    }
}

#[cfg(test)]
mod tests {
    use super::director_kind;

    #[test]
    fn the_sdk_director_calls_are_told_apart() {
        // getPublisher({token, streamName}): a bearer, no account.
        assert_eq!(director_kind(br#"{"streamName":"s"}"#, true), "publish");
        assert_eq!(
            director_kind(br#"{"streamName":"s","streamType":"WebRtc"}"#, true),
            "publish"
        );
        // getSubscriber({streamName, streamAccountId, subscriberToken?}).
        assert_eq!(
            director_kind(br#"{"streamAccountId":"chorus","streamName":"s"}"#, true),
            "subscribe"
        );
        assert_eq!(director_kind(br#"{"streamName":"s"}"#, false), "subscribe");
        assert_eq!(director_kind(b"garbage", false), "subscribe");
    }
}
