//! The HTTP face of chorus: director API, signalling WebSocket, WHIP, stream introspection.

pub(crate) mod base_path;
pub(crate) mod cluster;
pub(crate) mod dashboard;
pub(crate) mod dev_room_tokens;
pub(crate) mod director;
pub(crate) mod flow;
pub mod forwarded;
pub(crate) mod health;
pub mod limits;
pub(crate) mod listen;
pub(crate) mod metrics;
pub mod public_url;
pub(crate) mod resources;
pub(crate) mod room_views;
pub(crate) mod rooms;
pub(crate) mod sessions;
pub(crate) mod signal;
// Crate-private but for the fuzz targets, which reach it through `crate::fuzzing` (feature
// `tools`): its `pub` items are unreachable in the server build alone, where the lint would
// flag them; the default build still checks them.
#[cfg_attr(not(feature = "tools"), allow(unreachable_pub))]
pub(crate) mod signal_cmd;
// Crate-private but for the fuzz targets, which reach it through `crate::fuzzing` (feature
// `tools`): its `pub` items are unreachable in the server build alone, where the lint would
// flag them; the default build still checks them.
#[cfg_attr(not(feature = "tools"), allow(unreachable_pub))]
pub(crate) mod socket;
pub(crate) mod web;
pub(crate) mod whep;
pub(crate) mod whip;

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::cors::{Any, CorsLayer};

use crate::auth::jwt::{Claims, JwtSigner, JwtVerifier, RoomBinding, Scope};
use crate::auth::tokens::Tokens;
use crate::cluster::Cluster;
use crate::edge::Edge;
use crate::origin::Origin;
use crate::room::RoomService;

/// Everything the HTTP handlers share.
pub(crate) struct App {
    /// This node's place in the cluster: the registry (in memory without `--redis`), its
    /// stream leases, its viewer placement.
    pub cluster: Arc<Cluster>,
    /// The token policy, where an origin runs (`serve`, `origin`). An edge has none: it asks
    /// its origin for every viewer.
    pub tokens: Option<Tokens>,
    /// Signs the director's JWTs: only where an origin runs.
    pub signer: Option<Arc<JwtSigner>>,
    /// Checks JWTs: the signer's public key, at an edge the one of the origin's last Welcome.
    pub jwt: Arc<JwtVerifier>,
    /// Present where publications are taken (`serve`, `origin`).
    pub origin: Option<Arc<Origin>>,
    /// Present where viewers are served (`serve`, `edge`).
    pub edge: Option<Arc<Edge>>,
    /// Present with the origin.
    pub rooms: Option<Arc<RoomService>>,
    /// Base URL put in director answers (`ws://host:port`); None = from the request's Host.
    pub public_ws: Option<String>,
    pub next_session: AtomicU64,
    /// WHIP and WHEP resources, for DELETE with the creating credential.
    pub(crate) resources: resources::Resources,
    pub limits: limits::HttpLimits,
    pub(crate) offers: limits::OfferLimiter,
    pub http_metrics: Arc<limits::HttpMetrics>,
    /// Room participants' views here, ended when the member is removed.
    pub(crate) room_views: room_views::RoomViews,
    /// `/metrics` and `/api/streams` are on the public listener too (dev mode on loopback,
    /// without `--admin-http`); otherwise only on the admin listener.
    pub admin_on_main: bool,
    /// How answers name this server: trusted proxies' forwarded headers, the base path.
    pub(crate) public: public_url::PublicUrls,
    /// Becomes true when the process drains (SIGTERM): every signalling session is told to
    /// move (`migrate`).
    pub(crate) drain: tokio::sync::watch::Sender<bool>,
    /// TURN servers put in director answers, with fresh credentials (`--turn-url`); None =
    /// `iceServers: []`.
    pub(crate) turn: Option<Arc<crate::auth::turn::TurnServers>>,
    /// The webhooks' delivery, for /metrics (off without `--webhook-url`).
    pub(crate) hooks: crate::webhooks::Hooks,
    /// Open signalling sessions, for the operator's disconnect.
    pub(crate) sessions: sessions::Sessions,
    /// The live dashboard's feed and clients.
    pub(crate) dashboard: dashboard::Dashboard,
}

impl App {
    /// The HTTP state of a process; the rest of the fields start empty.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        tokens: Option<Tokens>,
        signer: Option<Arc<JwtSigner>>,
        jwt: Arc<JwtVerifier>,
        origin: Option<Arc<Origin>>,
        edge: Option<Arc<Edge>>,
        rooms: Option<Arc<RoomService>>,
        public_ws: Option<String>,
        limits: limits::HttpLimits,
        admin_on_main: bool,
    ) -> App {
        App {
            cluster,
            tokens,
            signer,
            jwt,
            origin,
            edge,
            rooms,
            public_ws,
            next_session: AtomicU64::new(1),
            resources: resources::Resources::default(),
            room_views: room_views::RoomViews::default(),
            offers: limits::OfferLimiter::new(&limits),
            limits,
            http_metrics: Arc::new(limits::HttpMetrics::default()),
            admin_on_main,
            public: public_url::PublicUrls::default(),
            drain: tokio::sync::watch::channel(false).0,
            turn: None,
            hooks: crate::webhooks::Hooks::default(),
            sessions: sessions::Sessions::default(),
            dashboard: dashboard::Dashboard::default(),
        }
    }

    /// With TURN servers for the director's answers.
    pub(crate) fn with_turn(mut self, turn: Option<Arc<crate::auth::turn::TurnServers>>) -> App {
        self.turn = turn;
        self
    }

    /// With the process's webhooks (their counters go to /metrics).
    pub(crate) fn with_hooks(mut self, hooks: crate::webhooks::Hooks) -> App {
        self.hooks = hooks;
        self
    }

    /// Behind `--trusted-proxy` ranges and under `--base-path` (checked).
    pub(crate) fn with_public(mut self, public: public_url::PublicUrls) -> App {
        self.public = public;
        self
    }

    /// The address a request is counted against (per-IP offer rate): the client a trusted
    /// proxy forwarded, else the peer.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.public.origin(peer, headers).client
    }

    /// A room member was removed at the origin: its views here end.
    pub(crate) fn end_room_views(&self, room: &str, member: &str) {
        let views = self.room_views.revoke(room, member);
        tracing::info!(
            room,
            member,
            views = views.len(),
            "room member removed: its views end"
        );
        for v in views {
            match v {
                room_views::HeldView::Session(_, removed) => removed.notify_one(),
                room_views::HeldView::Whep(peer) => {
                    if let Some(edge) = &self.edge {
                        edge.remove(peer);
                    }
                }
            }
        }
    }

    /// One SDP offer from `ip`, against the offer rate limits.
    pub(crate) fn take_offer(&self, ip: IpAddr) -> Result<(), limits::OfferRefused> {
        let r = self.offers.take(Some(ip), Instant::now());
        if r.is_err() {
            limits::HttpMetrics::add(&self.http_metrics.offers_limited);
        }
        r
    }
}

/// Refusals are logged at info at most once a second (a flood of bad requests is not a flood
/// of log lines), the others at debug.
static REFUSAL_LOG: listen::LogEvery = listen::LogEvery::new(Duration::from_secs(1));

/// The `{"status":"fail"}` body the SDK expects, with a status code.
pub(crate) fn fail(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let message = message.to_string();
    if REFUSAL_LOG.ready() {
        tracing::info!(%status, %message, "request refused (further refusals this second at debug)");
    } else {
        tracing::debug!(%status, %message, "request refused");
    }
    (
        status,
        Json(json!({"status": "fail", "data": {"message": message}})),
    )
        .into_response()
}

/// A refusal, turned into a `fail` response where it is returned.
#[derive(Debug)]
pub(crate) struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        fail(self.0, self.1)
    }
}

/// The token of an `Authorization: Bearer ...` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What WHIP and WHEP check before looking at an offer: the stream name, the bearer (a director
/// JWT of `scope` for this stream, a room token, or a long-lived token of that kind), and an SDP
/// body. Returns the offer and, for a room member, what binds its publication; or the refusal.
pub(crate) fn sdp_request<'a>(
    app: &App,
    headers: &HeaderMap,
    stream: &str,
    scope: Scope,
    body: &'a [u8],
) -> Result<(&'a str, Option<RoomBinding>), Refusal> {
    crate::millicast::check_stream_name(stream)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
    let token = bearer(headers);
    let room = match rooms::room_grant(app, token, stream, scope) {
        Some(grant) => grant?,
        None => {
            match jwt_allows(app, token, stream, scope)? {
                // A room participant's viewer JWT keeps its binding (its removal ends the view).
                Some(claims) => claims.room.filter(|_| scope == Scope::Subscribe),
                None => {
                    let Some(tokens) = &app.tokens else {
                        return Err(Refusal(
                            StatusCode::UNAUTHORIZED,
                            "this edge takes only a director JWT here".into(),
                        ));
                    };
                    flow::check_policy(tokens, token, stream, scope)?;
                    None
                }
            }
        }
    };
    Ok((sdp_offer(headers, body)?, room))
}

/// The claims of the bearer when it is a director JWT of `scope` for `stream`: Ok(None) when it
/// is no valid JWT at all (the caller checks it as a token), a refusal when it is one for
/// something else.
pub(crate) fn jwt_allows(
    app: &App,
    token: Option<&str>,
    stream: &str,
    scope: Scope,
) -> Result<Option<Claims>, Refusal> {
    match token.and_then(|t| app.jwt.verify(t).ok()) {
        Some(claims) if claims.scope == scope && claims.millicast.stream_name == stream => {
            Ok(Some(claims))
        }
        Some(_) => Err(Refusal(
            StatusCode::UNAUTHORIZED,
            format!("this JWT does not allow {scope:?} on {stream:?}"),
        )),
        None => Ok(None),
    }
}

/// The SDP offer of a WHIP or WHEP request.
pub(crate) fn sdp_offer<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<&'a str, Refusal> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/sdp") {
        return Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "offers must be Content-Type: application/sdp".into(),
        ));
    }
    std::str::from_utf8(body)
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "SDP offer is not UTF-8".into()))
}

/// An origin's refusal relayed by an edge, as an HTTP refusal.
pub(crate) fn relayed_refusal((status, message): (u16, String)) -> Refusal {
    Refusal(
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        message,
    )
}

/// 429 with Retry-After: an offer over the rate limit.
pub(crate) fn too_many_offers(e: limits::OfferRefused) -> Response {
    let retry = e.retry_after().as_secs().max(1).to_string();
    let mut r = fail(StatusCode::TOO_MANY_REQUESTS, e.to_string());
    if let Ok(v) = header::HeaderValue::from_str(&retry) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Every request is answered within [`limits::REQUEST_TIMEOUT`] (its body read included) or
/// refused with 408.
async fn deadline(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limits::REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            limits::HttpMetrics::add(&app.http_metrics.request_timeouts);
            fail(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not complete within {} s",
                    limits::REQUEST_TIMEOUT.as_secs()
                ),
            )
        }
    }
}

pub(crate) fn router(app: Arc<App>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(Any)
        // `*` does not cover Authorization in the Fetch spec: name the headers clients send.
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
        ])
        .expose_headers([header::LOCATION, header::ETAG]);
    let mut r = Router::new()
        .route("/", get(web::index))
        .route("/demo.js", get(web::demo_js))
        .route("/demo.css", get(web::demo_css))
        .route("/base.css", get(web::base_css))
        .route("/sdk/millicast.umd.js", get(web::sdk))
        .route("/rooms/{room}", get(web::room_page))
        .route("/room.js", get(web::room_js))
        .route("/room.css", get(web::room_css))
        .route("/dashboard", get(web::dashboard))
        .route("/dashboard.js", get(web::dashboard_js))
        .route("/dashboard.css", get(web::dashboard_css))
        .route("/api/dashboard/events", get(dashboard::events))
        .route("/healthz", get(health::healthz))
        .route("/api/director/publish", post(director::publish))
        .route("/api/director/subscribe", post(director::subscribe))
        .route("/ws", get(signal::upgrade))
        .route("/api/rooms/{room}/tokens", post(rooms::issue_token))
        .route("/api/dev/rooms/{room}/tokens", post(dev_room_tokens::issue))
        .route("/api/cluster", get(cluster::view))
        .route("/api/rooms/{room}/ws", get(rooms::upgrade))
        .route("/whip/{stream}", post(whip::publish))
        .route(
            "/whip/resource/{id}",
            delete(whip::delete).patch(whip::patch),
        )
        .route("/whep/{stream}", post(whep::view))
        .route(
            "/whep/resource/{id}",
            delete(whep::delete).patch(whip::patch),
        );
    if app.admin_on_main {
        r = r.merge(admin_routes());
    }
    let r = r
        .layer(cors)
        .layer(DefaultBodyLimit::max(limits::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(app.clone(), deadline))
        .with_state(app.clone());
    if app.public.base_path.is_empty() {
        r
    } else {
        base_path::mount(r, app)
    }
}

/// What only operators see: per-source state (with publisher ids) and counters.
fn admin_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .route("/api/streams/{name}", get(stream_view))
        .route("/api/streams/{name}/disconnect", post(disconnect))
}

/// `?scope=publish|subscribe` of a disconnect (default: both).
#[derive(serde::Deserialize)]
struct DisconnectQuery {
    scope: Option<crate::auth::jwt::Scope>,
}

/// Ends the stream's signalling sessions here (publishers', viewers' or both): their clients
/// reconnect through the director, as the SDK does by itself.
async fn disconnect(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<DisconnectQuery>,
) -> Response {
    let n = app.sessions.disconnect(&name, q.scope);
    tracing::info!(stream = name.as_str(), scope = ?q.scope, sessions = n, "operator disconnects the stream's signalling sessions");
    Json(serde_json::json!({"disconnected": n})).into_response()
}

/// The admin listener's router (`--admin-http`): no CORS (no web page reads it), health too.
pub(crate) fn admin_router(app: Arc<App>) -> Router {
    admin_routes()
        .route("/healthz", get(health::healthz))
        .layer(axum::middleware::from_fn_with_state(app.clone(), deadline))
        .with_state(app)
}

async fn stream_view(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Some(origin) = &app.origin else {
        return fail(
            StatusCode::NOT_FOUND,
            "this is an edge: stream state is at the origin",
        );
    };
    match origin.stream_view(&name) {
        Some(v) => Json(v).into_response(),
        None => fail(StatusCode::NOT_FOUND, format!("no stream {name:?} is live")),
    }
}
