//! Webhooks: signed JSON POSTs to the operator's backend when something an app cares about
//! happens (a feed starts or stops, a room member joins, is promoted, leaves..., viewer counts).
//!
//! Whatever emits an event (the origin's publish path, the room driver, the edge's count task)
//! only formats it and offers it to a bounded queue: a full queue drops it, counted, so a dead or
//! slow receiver can never slow media or signalling. One delivery task per process empties the
//! queue in order, retrying a failed POST with backoff ([`deliver`]).
//!
//! The body has Millicast's webhook shape (`type`, `event`, `timestamp`, `data`) plus an `id`
//! (unique per event, kept across retries, for the receiver to drop duplicates) and the sending
//! `node`. `X-Chorus-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact body bytes with
//! `--webhook-secret`.

mod deliver;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::warn;

/// Events waiting for delivery at most; beyond, new events are dropped and counted.
pub(crate) const WEBHOOK_QUEUE: usize = 1024;

/// Where the webhooks go: `--webhook-url`, `--webhook-secret`.
#[derive(Clone, Debug)]
pub(crate) struct HookTarget {
    /// `host:port` to connect to.
    pub authority: String,
    /// The request target (path and query), at least `/`.
    pub path: String,
    secret: Vec<u8>,
}

/// Why `--webhook-url` / `--webhook-secret` cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookConfigError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("--webhook-url {0:?}: expected http://host[:port][/path] (for https, put a local TLS forwarder in front: it is not built in yet)")]
    Url(String),
    /// A URL without a secret would send unsigned events.
    #[error(
        "--webhook-url needs --webhook-secret (or CHORUS_WEBHOOK_SECRET): every webhook is signed"
    )]
    NoSecret,
}

impl HookTarget {
    /// Checks the flags: a URL needs a secret; neither means no webhooks.
    pub(crate) fn from_flags(
        url: Option<&str>,
        secret: Option<&str>,
    ) -> Result<Option<HookTarget>, HookConfigError> {
        let Some(url) = url else { return Ok(None) };
        let secret = secret
            .filter(|s| !s.is_empty())
            .ok_or(HookConfigError::NoSecret)?;
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| HookConfigError::Url(url.to_owned()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host_ok = !authority.is_empty()
            && !authority.contains('@')
            && authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !host_ok
            || path
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(HookConfigError::Url(url.to_owned()));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Some(HookTarget {
            authority,
            path: path.to_owned(),
            secret: secret.as_bytes().to_vec(),
        }))
    }

    /// The `X-Chorus-Signature` value of `body`.
    pub(crate) fn signature(&self, body: &[u8]) -> String {
        sign(&self.secret, body)
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` with `secret`: what a receiver recomputes.
pub(crate) fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Webhook counters for /metrics.
#[derive(Default, Debug)]
pub(crate) struct HookMetrics {
    /// Events the receiver answered 2xx.
    pub delivered: AtomicU64,
    /// POSTs that failed (no connection, timeout, a 5xx, 408 or 429) and were retried or given up.
    pub failed_attempts: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Events dropped after the last retry failed.
    pub dropped_gave_up: AtomicU64,
    /// Events the receiver refused with another 4xx (not retried: resending would not help).
    pub dropped_rejected: AtomicU64,
}

/// One event on its way: its id and its body, formatted once.
struct Pending {
    id: String,
    body: String,
}

struct Shared {
    tx: mpsc::Sender<Pending>,
    node: String,
    seq: AtomicU64,
    metrics: Arc<HookMetrics>,
}

/// The handle everything that emits webhooks holds; cheap to clone. `Hooks::default()` sends
/// nothing (no `--webhook-url`).
#[derive(Clone, Default)]
pub(crate) struct Hooks(Option<Arc<Shared>>);

impl Hooks {
    /// Starts the delivery task (on the current tokio runtime) for `target`, events signed as
    /// coming from `node`.
    pub(crate) fn start(target: HookTarget, node: &str) -> Hooks {
        let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
        let metrics = Arc::new(HookMetrics::default());
        tokio::spawn(deliver::run(target, rx, metrics.clone()));
        Hooks(Some(Arc::new(Shared {
            tx,
            node: node.to_owned(),
            seq: AtomicU64::new(1),
            metrics,
        })))
    }

    /// Its counters, when webhooks are on.
    pub(crate) fn metrics(&self) -> Option<&HookMetrics> {
        self.0.as_deref().map(|s| &*s.metrics)
    }

    /// Whether events go anywhere (callers may skip building `data` otherwise).
    pub(crate) fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Offers one event (`type` `kind`, `event` `event`) to the queue, never waiting.
    pub(crate) fn emit(&self, kind: &str, event: &str, data: Value) {
        let Some(s) = &self.0 else { return };
        let id = format!("{}-{}", s.node, s.seq.fetch_add(1, Ordering::Relaxed));
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = json!({
            "id": id,
            "type": kind,
            "event": event,
            "timestamp": timestamp,
            "node": s.node,
            "data": data,
        })
        .to_string();
        if s.tx.try_send(Pending { id, body }).is_err() {
            let n = s.metrics.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            // A backed-up receiver drops many in a row: the first and every 1000th say so.
            if n % 1000 == 0 {
                warn!(kind, event, dropped = n + 1, "webhook queue full ({WEBHOOK_QUEUE}): event dropped (chorus_webhook_dropped_total{{reason=\"queue_full\"}})");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_need_a_secret_and_an_http_url() {
        assert!(HookTarget::from_flags(None, Some("s")).unwrap().is_none());
        assert!(matches!(
            HookTarget::from_flags(Some("http://h/x"), None),
            Err(HookConfigError::NoSecret)
        ));
        for bad in [
            "https://h/x",
            "ftp://h",
            "http://",
            "http://u@h/",
            "http://h/a b",
        ] {
            assert!(
                matches!(
                    HookTarget::from_flags(Some(bad), Some("s")),
                    Err(HookConfigError::Url(_))
                ),
                "{bad}"
            );
        }
        let t = HookTarget::from_flags(Some("http://127.0.0.1:9000/hooks?x=1"), Some("s"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:9000", "/hooks?x=1")
        );
        let t = HookTarget::from_flags(Some("http://example.com"), Some("s"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("example.com:80", "/")
        );
        let t = HookTarget::from_flags(Some("http://[::1]/h"), Some("s"))
            .unwrap()
            .unwrap();
        assert_eq!(t.authority, "[::1]:80");
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        // A receiver that never answers: the delivery task holds one event, the queue the next
        // WEBHOOK_QUEUE; everything after is dropped at once.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let hooks = Hooks::start(
            HookTarget::from_flags(Some(&url), Some("k"))
                .unwrap()
                .unwrap(),
            "n",
        );
        tokio::task::yield_now().await;
        let extra = 50;
        for i in 0..WEBHOOK_QUEUE + 1 + extra {
            hooks.emit("test", "e", json!({ "i": i }));
        }
        let dropped = hooks
            .metrics()
            .unwrap()
            .dropped_queue_full
            .load(Ordering::Relaxed);
        assert!(
            (extra as u64..=extra as u64 + 1).contains(&dropped),
            "dropped {dropped}"
        );
    }
}
