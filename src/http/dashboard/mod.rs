//! The live dashboard: `GET /dashboard` (a plain page, `web/dashboard.*`) and its feed,
//! `GET /api/dashboard/events`, server-sent events behind the room API key.
//!
//! One producer task (started by the first client) reads the process's state every [`PERIOD`]
//! while a client is connected and publishes one JSON snapshot into a `watch` channel; every
//! client's stream sends the latest one. A client that reads slower than that skips snapshots
//! (counted), it never queues them; at most [`MAX_CLIENTS`] are connected at once.
//!
//! The key is an `Authorization: Bearer` header, also here: the page reads the feed with
//! `fetch` and a streamed body, not `EventSource` (which cannot set headers), so the key never
//! goes into a URL, where access logs, proxies and browser history would keep it.

pub(crate) mod snapshot;
pub(crate) mod timeline;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{fail, App};

/// A snapshot every 250 ms (4 Hz): a switch reaches the page within about one period.
pub(crate) const PERIOD: Duration = Duration::from_millis(250);
/// Dashboard clients connected at once, at most: each costs a snapshot's serialisation share
/// and a connection; a dashboard is for operators, not audiences.
pub(crate) const MAX_CLIENTS: usize = 8;
/// The registry's nodes are read every this many snapshots (1 s): their records change every
/// heartbeat (~2 s), and with Redis each read is a round trip.
const NODES_EVERY: u64 = 4;
/// An idle feed sends a comment this often, so proxies keep it open and a vanished client is
/// noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The latest snapshot: (sequence number, JSON).
type Published = Option<(u64, Arc<str>)>;

#[derive(Debug, Default)]
pub(crate) struct DashboardMetrics {
    /// Clients refused for [`MAX_CLIENTS`].
    pub refused: AtomicU64,
    /// Snapshots a slow client never got (it got a later one).
    pub skipped: AtomicU64,
    /// Snapshots made.
    pub snapshots: AtomicU64,
}

pub(crate) struct Dashboard {
    feed: watch::Sender<Published>,
    clients: AtomicUsize,
    producer: Once,
    pub metrics: DashboardMetrics,
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            feed: watch::channel(None).0,
            clients: AtomicUsize::new(0),
            producer: Once::new(),
            metrics: DashboardMetrics::default(),
        }
    }
}

impl Dashboard {
    /// Clients connected now.
    pub(crate) fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

/// A place for one more client, if there is one.
fn admit(app: &Arc<App>) -> Option<Client> {
    let d = &app.dashboard;
    let taken = d
        .clients
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < MAX_CLIENTS).then_some(n + 1)
        });
    if taken.is_err() {
        d.metrics.refused.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let mut feed = d.feed.subscribe();
    // The latest snapshot goes out at once, not a period later.
    feed.mark_changed();
    Some(Client {
        app: app.clone(),
        feed,
        last: 0,
    })
}

/// One connected client's feed; dropping it (the connection closed) frees its place.
struct Client {
    app: Arc<App>,
    feed: watch::Receiver<Published>,
    last: u64,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.app.dashboard.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Client {
    /// The next snapshot this client gets: the latest one, whatever it skipped meanwhile.
    async fn next(&mut self) -> Option<Arc<str>> {
        loop {
            self.feed.changed().await.ok()?;
            let Some((seq, json)) = self.feed.borrow_and_update().clone() else {
                continue;
            };
            if self.last != 0 && seq > self.last + 1 {
                let m = &self.app.dashboard.metrics;
                m.skipped.fetch_add(seq - self.last - 1, Ordering::Relaxed);
            }
            self.last = seq;
            return Some(json);
        }
    }
}

/// `GET /api/dashboard/events`: the snapshots as server-sent events (`event: snapshot`, the
/// JSON as data).
pub(crate) async fn events(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(refused) = super::cluster::operator(&app, &headers, "the dashboard") {
        return refused.into_response();
    }
    let Some(client) = admit(&app) else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("at most {MAX_CLIENTS} dashboard clients at once"),
        );
    };
    let producer = app.clone();
    app.dashboard
        .producer
        .call_once(|| drop(tokio::spawn(produce(producer))));
    info!(
        clients = app.dashboard.clients(),
        "dashboard client connected"
    );
    let stream = futures_util::stream::unfold(client, |mut c| async move {
        let json = c.next().await?;
        let ev = Event::default().event("snapshot").data(&*json);
        Some((Ok::<_, Infallible>(ev), c))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// The producer, for the life of the process once a client came: a snapshot every [`PERIOD`]
/// while a client is connected; otherwise it only tells the edge's media threads to stop
/// writing their boards.
async fn produce(app: Arc<App>) {
    let mut p = snapshot::Producer::default();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        let watched = app.dashboard.feed.receiver_count() > 0;
        if let Some(e) = &app.edge {
            e.boards().watch(watched);
        }
        if !watched {
            if ticks != 0 {
                info!("no dashboard client left: snapshots paused");
                // The next client must not be sent this one, taken long before it came.
                app.dashboard.feed.send_replace(None);
            }
            p.idle();
            ticks = 0;
            continue;
        }
        if ticks.is_multiple_of(NODES_EVERY) {
            match app.cluster.live_nodes().await {
                Ok(n) => {
                    p.nodes = n;
                    p.registry_error = None;
                }
                Err(e) => p.registry_error = Some(e.to_string()),
            }
        }
        ticks += 1;
        let snap = p.snapshot(&app, unix_ms());
        match serde_json::to_string(&snap) {
            Ok(json) => {
                app.dashboard
                    .metrics
                    .snapshots
                    .fetch_add(1, Ordering::Relaxed);
                app.dashboard
                    .feed
                    .send_replace(Some((snap.seq, json.into())));
            }
            Err(e) => warn!("dashboard snapshot not serialised: {e}"),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
