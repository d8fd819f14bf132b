//! The demo page (built on the Millicast SDK, so it doubles as an example) and the SDK itself.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

const INDEX: &str = include_str!("../../web/index.html");
const DEMO_JS: &str = include_str!("../../web/demo.js");
const DEMO_CSS: &str = include_str!("../../web/demo.css");
const DASHBOARD: &str = include_str!("../../web/dashboard.html");
const DASHBOARD_JS: &str = include_str!("../../web/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../web/dashboard.css");

/// The SDK version the demo and the tests are written against.
pub(crate) const SDK_VERSION: &str = "0.6.1";

fn html(body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body)
}

fn js(body: &'static str) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        body,
    )
}

fn css(body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], body)
}

pub(crate) async fn index() -> impl IntoResponse {
    html(INDEX)
}

pub(crate) async fn demo_js() -> impl IntoResponse {
    js(DEMO_JS)
}

pub(crate) async fn demo_css() -> impl IntoResponse {
    css(DEMO_CSS)
}

/// The dashboard page: no secret in it (its feed asks for the API key).
pub(crate) async fn dashboard() -> impl IntoResponse {
    html(DASHBOARD)
}

pub(crate) async fn dashboard_js() -> impl IntoResponse {
    js(DASHBOARD_JS)
}

pub(crate) async fn dashboard_css() -> impl IntoResponse {
    css(DASHBOARD_CSS)
}

/// Where a local copy of the SDK's UMD build may be: `CHORUS_SDK` (a file), or the npm install
/// of the test harness in this repository.
fn local_sdk() -> Option<std::path::PathBuf> {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("CHORUS_SDK") {
        candidates.push(p.into());
    }
    let rel = "tests/browser/node_modules/@millicast/sdk/dist/millicast.umd.js";
    candidates.push(rel.into());
    candidates.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel));
    candidates.into_iter().find(|p| p.is_file())
}

/// Serves the SDK from a local npm install when there is one, otherwise sends the browser to
/// the package on a public CDN (the page then needs the internet, the server does not).
pub(crate) async fn sdk() -> Response {
    match local_sdk().map(std::fs::read) {
        Some(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            body,
        )
            .into_response(),
        _ => Redirect::temporary(&format!(
            "https://cdn.jsdelivr.net/npm/@millicast/sdk@{SDK_VERSION}/dist/millicast.umd.js"
        ))
        .into_response(),
    }
}
