//! The delivery task: POSTs queued events one at a time, in order, retrying failures.
//!
//! An attempt fails when the receiver cannot be reached, does not answer within
//! [`ATTEMPT_TIMEOUT`], or answers 5xx, 408 or 429; it is tried again after [`BACKOFF`]
//! (doubling), at most [`MAX_ATTEMPTS`] times in all. Any other 4xx is the receiver refusing the
//! event (a bad signature, an unknown type): resending it would not help, so it is dropped and
//! counted. One connection per POST (`Connection: close`): webhooks are rare, and a receiver
//! that restarts between two of them is never reached through a stale connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{HookMetrics, HookTarget, Pending};

/// One POST (connect, send, the response's head) takes at most this long.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per event, the first included.
pub(crate) const MAX_ATTEMPTS: u32 = 5;
/// The wait after the first failed attempt; each later wait doubles (0.25, 0.5, 1, 2 s).
pub(crate) const BACKOFF: Duration = Duration::from_millis(250);

/// What one attempt came to.
enum Outcome {
    Delivered,
    /// Worth trying again: the reason, for the log.
    Retry(String),
    /// The receiver refused it for good.
    Rejected(StatusCode),
}

pub(super) async fn run(target: HookTarget, mut rx: mpsc::Receiver<Pending>, m: Arc<HookMetrics>) {
    // Logged at warn when the receiver starts failing, at info when it answers again; the
    // failures in between at debug (they are counted).
    let mut failing = false;
    while let Some(ev) = rx.recv().await {
        let mut wait = BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            match post(&target, &ev).await {
                Outcome::Delivered => {
                    m.delivered.fetch_add(1, Ordering::Relaxed);
                    if std::mem::take(&mut failing) {
                        info!(
                            target = target.authority.as_str(),
                            "webhook receiver answers again"
                        );
                    }
                    break;
                }
                Outcome::Rejected(status) => {
                    m.dropped_rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(id = ev.id.as_str(), %status, "webhook refused by the receiver: dropped (not retried)");
                    break;
                }
                Outcome::Retry(why) => {
                    m.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        warn!(
                            target = target.authority.as_str(),
                            id = ev.id.as_str(),
                            "webhook POST failed ({why}): retrying with backoff"
                        );
                        failing = true;
                    } else {
                        debug!(id = ev.id.as_str(), attempt, "webhook POST failed ({why})");
                    }
                    if attempt == MAX_ATTEMPTS {
                        m.dropped_gave_up.fetch_add(1, Ordering::Relaxed);
                        warn!(id = ev.id.as_str(), "webhook dropped after {MAX_ATTEMPTS} attempts (chorus_webhook_dropped_total{{reason=\"gave_up\"}})");
                    } else {
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
        }
    }
}

async fn post(target: &HookTarget, ev: &Pending) -> Outcome {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(target, ev)).await {
        Err(_) => Outcome::Retry(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
        Ok(Err(e)) => Outcome::Retry(e),
        Ok(Ok(s)) if s.is_success() => Outcome::Delivered,
        Ok(Ok(s))
            if s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS =>
        {
            Outcome::Retry(format!("status {s}"))
        }
        Ok(Ok(s)) => Outcome::Rejected(s),
    }
}

async fn attempt(target: &HookTarget, ev: &Pending) -> Result<StatusCode, String> {
    let tcp = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connect {}: {e}", target.authority))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // The connection's own future: ends with the response, and within the attempt's deadline
    // even when the receiver holds the connection open without answering (no task or socket
    // outlives its attempt).
    tokio::spawn(async move {
        let _ = tokio::time::timeout(ATTEMPT_TIMEOUT, conn).await;
    });
    let req = Request::post(&target.path)
        .header(HOST, &target.authority)
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("chorus/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close")
        .header("x-chorus-signature", target.signature(ev.body.as_bytes()))
        .header("x-chorus-event-id", &ev.id)
        .body(ev.body.clone())
        .map_err(|e| format!("request: {e}"))?;
    let res = send
        .send_request(req)
        .await
        .map_err(|e| format!("POST: {e}"))?;
    Ok(res.status())
}
