//! `/healthz`: 200 `ok` while every media thread is alive, 503 naming the ones that are not.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::rtc::supervise;

pub(crate) async fn healthz() -> Response {
    let stale = supervise::stale();
    if stale.is_empty() {
        return "ok".into_response();
    }
    let list: Vec<String> = stale
        .iter()
        .map(|(name, silent)| {
            format!(
                "media thread {name} silent for {:.1} s",
                silent.as_secs_f64()
            )
        })
        .collect();
    (StatusCode::SERVICE_UNAVAILABLE, list.join("\n")).into_response()
}
