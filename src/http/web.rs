//! The demo page and the room page (built on the Millicast SDK, so they double as examples) and
//! the SDK itself.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

const INDEX: &str = include_str!("../../web/index.html");
const DEMO_JS: &str = include_str!("../../web/demo.js");
const BASE_CSS: &str = include_str!("../../web/base.css");
const DEMO_CSS: &str = include_str!("../../web/demo.css");
const ROOM_HTML: &str = include_str!("../../web/room.html");
const ROOM_JS: &str = include_str!("../../web/room.js");
const ROOM_CSS: &str = include_str!("../../web/room.css");
const DASHBOARD: &str = include_str!("../../web/dashboard.html");
const DASHBOARD_JS: &str = include_str!("../../web/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../web/dashboard.css");

/// The SDK version the demo and the tests are written against.
pub(crate) const SDK_VERSION: &str = "0.6.1";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type)], body)
}

pub(crate) async fn index() -> impl IntoResponse {
    file(HTML, INDEX)
}

pub(crate) async fn demo_js() -> impl IntoResponse {
    file(JS, DEMO_JS)
}

/// The styles both pages share.
pub(crate) async fn base_css() -> impl IntoResponse {
    file(CSS, BASE_CSS)
}

pub(crate) async fn demo_css() -> impl IntoResponse {
    file(CSS, DEMO_CSS)
}

/// `/rooms/{room}`: one page for every room (its script reads the room from the path).
pub(crate) async fn room_page() -> impl IntoResponse {
    file(HTML, ROOM_HTML)
}

pub(crate) async fn room_js() -> impl IntoResponse {
    file(JS, ROOM_JS)
}

pub(crate) async fn room_css() -> impl IntoResponse {
    file(CSS, ROOM_CSS)
}

/// The dashboard page: no secret in it (its feed asks for the API key).
pub(crate) async fn dashboard() -> impl IntoResponse {
    file(HTML, DASHBOARD)
}

pub(crate) async fn dashboard_js() -> impl IntoResponse {
    file(JS, DASHBOARD_JS)
}

pub(crate) async fn dashboard_css() -> impl IntoResponse {
    file(CSS, DASHBOARD_CSS)
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
        Some(Ok(body)) => (StatusCode::OK, [(header::CONTENT_TYPE, JS)], body).into_response(),
        _ => Redirect::temporary(&format!(
            "https://cdn.jsdelivr.net/npm/@millicast/sdk@{SDK_VERSION}/dist/millicast.umd.js"
        ))
        .into_response(),
    }
}
