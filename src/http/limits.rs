//! The HTTP and WebSocket surface's limits: every value stated here, with why, and the token
//! buckets and counters that enforce and count them. A refusal says which limit it hit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A client has this long to send a request's head (request line and headers), counted from
/// the connection's start or the end of its previous response: slowloris connections and idle
/// keep-alive connections are closed after it.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (body included) is answered within this long, or refused with 408: a body trickled
/// in byte by byte cannot hold a connection.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body: an SDP offer of 1 + 16 audio m-lines (the most WHEP takes) is about
/// 25 KiB; director and room bodies are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Default of `--max-connections`: open HTTP connections (WebSockets included) of the process.
/// A viewer or publisher holds one signalling socket; 10,000 is past one edge's capacity.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Default of `--max-connections-per-ip`: open connections from one IP. Enough for a large
/// office behind one NAT; an operator behind a reverse proxy (every peer the proxy's address)
/// raises it.
pub const MAX_CONNECTIONS_PER_IP: usize = 256;
/// Default of `--offers-per-sec`: SDP offers (WHIP, WHEP, signalling `publish` and `view`) the
/// process takes per second, all clients together; bursts of twice this pass. Each offer costs a
/// peer (about 90 KiB) that lives up to [`crate::rtc::peers::CONNECT_TIMEOUT`] unconnected, and
/// the media side caps those at [`crate::rtc::peers::MAX_UNCONNECTED_PEERS`].
pub const OFFERS_PER_SEC: u32 = 100;
/// Default of `--offers-per-sec-per-ip`: offers per second from one IP (bursts of 2.5 times
/// this pass: a page that publishes and views a few sources at once is never refused).
pub const OFFERS_PER_SEC_PER_IP: u32 = 20;
/// IPs whose offer rate is remembered at once; past it, only the global rate applies to
/// newcomers until old entries are forgotten (a bucket idle for a minute is).
const MAX_TRACKED_IPS: usize = 65_536;

/// Largest signalling WebSocket message and frame: an SDP offer (see [`MAX_BODY`]) in JSON.
/// A larger frame is refused from its header, before its payload is read.
pub(crate) const WS_MAX_MESSAGE: usize = 64 * 1024;
/// Messages queued to one socket's writer. A client that does not read fills it and is closed
/// ("not reading"): a socket never holds more than this in memory.
pub(crate) const WS_OUT_QUEUE: usize = 128;
/// One message to a socket must be written within this long, or the socket is closed: a peer
/// that stopped reading cannot hold a writer.
pub(crate) const WS_WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Commands per second one signalling socket may send (bursts of 2 times this pass); past it a
/// command is refused with an error (and counted as refused).
pub(crate) const WS_COMMANDS_PER_SEC: u32 = 20;
/// Refused commands after which a signalling or room socket is closed: a client that keeps
/// sending bad commands is broken or hostile.
pub(crate) const WS_MAX_REFUSED: u32 = 32;
/// The server pings each signalling socket this often (proxies close idle sockets: nginx after
/// 60 s)...
pub(crate) const WS_PING_EVERY: Duration = Duration::from_secs(20);
/// ...and closes one that sent nothing, not even a pong, for this long.
pub(crate) const WS_SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// Commands per second one room socket may send (bursts of 2 times this pass).
pub const ROOM_COMMANDS_PER_SEC: u32 = 10;

/// The limits a process runs with (flags; defaults above).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// `--max-connections` (default [`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// `--max-connections-per-ip` (default [`MAX_CONNECTIONS_PER_IP`]).
    pub max_connections_per_ip: usize,
    /// `--offers-per-sec` (default [`OFFERS_PER_SEC`]).
    pub offers_per_sec: u32,
    /// `--offers-per-sec-per-ip` (default [`OFFERS_PER_SEC_PER_IP`]).
    pub offers_per_sec_per_ip: u32,
    /// How often signalling sockets are pinged (default 20 s; tests shorten it, `--ws-ping-ms`).
    pub ws_ping_every: Duration,
    /// A signalling socket silent this long is closed (default 60 s; `--ws-silence-ms`).
    pub ws_silence_limit: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: MAX_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            offers_per_sec: OFFERS_PER_SEC,
            offers_per_sec_per_ip: OFFERS_PER_SEC_PER_IP,
            ws_ping_every: WS_PING_EVERY,
            ws_silence_limit: WS_SILENCE_LIMIT,
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one; else how long until there is.
    pub(crate) fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.max(1e-9),
            ))
        }
    }
}

/// Why an offer was refused: which rate, and when to retry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OfferRefused {
    #[error("too many offers from {ip}: at most {rate} per second from one address; retry in {}s", .retry.as_secs().max(1))]
    PerIp {
        ip: IpAddr,
        rate: u32,
        retry: Duration,
    },
    #[error("this server takes at most {rate} offers per second and is at it; retry in {}s", .retry.as_secs().max(1))]
    Global { rate: u32, retry: Duration },
}

impl OfferRefused {
    pub(crate) fn retry_after(&self) -> Duration {
        match self {
            OfferRefused::PerIp { retry, .. } | OfferRefused::Global { retry, .. } => *retry,
        }
    }
}

/// The offer rate limit: one bucket for the process, one per client IP.
pub(crate) struct OfferLimiter {
    rate: u32,
    per_ip: u32,
    global: Mutex<Bucket>,
    ips: Mutex<HashMap<IpAddr, Bucket>>,
}

impl OfferLimiter {
    pub(crate) fn new(limits: &HttpLimits) -> OfferLimiter {
        let now = Instant::now();
        OfferLimiter {
            rate: limits.offers_per_sec.max(1),
            per_ip: limits.offers_per_sec_per_ip.max(1),
            global: Mutex::new(Bucket::full(
                2.0 * f64::from(limits.offers_per_sec.max(1)),
                now,
            )),
            ips: Mutex::new(HashMap::new()),
        }
    }

    /// One offer from `ip` (None: unknown, only the global rate applies).
    pub(crate) fn take(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), OfferRefused> {
        if let Some(ip) = ip {
            let (rate, burst) = (f64::from(self.per_ip), 2.5 * f64::from(self.per_ip));
            let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
            if ips.len() >= MAX_TRACKED_IPS && !ips.contains_key(&ip) {
                // Forget buckets that have refilled (idle a minute): they hold no state.
                ips.retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(60));
            }
            if ips.len() < MAX_TRACKED_IPS || ips.contains_key(&ip) {
                let b = ips.entry(ip).or_insert_with(|| Bucket::full(burst, now));
                b.take(rate, burst, now)
                    .map_err(|retry| OfferRefused::PerIp {
                        ip,
                        rate: self.per_ip,
                        retry,
                    })?;
            }
        }
        let (rate, burst) = (f64::from(self.rate), 2.0 * f64::from(self.rate));
        self.global
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(rate, burst, now)
            .map_err(|retry| OfferRefused::Global {
                rate: self.rate,
                retry,
            })
    }
}

/// What the HTTP surface refused or closed, by reason, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct HttpMetrics {
    pub refused_connections: AtomicU64,
    pub refused_connections_per_ip: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub request_timeouts: AtomicU64,
    pub offers_limited: AtomicU64,
    pub ws_frames_too_large: AtomicU64,
    pub ws_not_reading: AtomicU64,
    pub ws_write_timeouts: AtomicU64,
    pub ws_silent: AtomicU64,
    pub ws_commands_limited: AtomicU64,
    pub ws_too_many_refused: AtomicU64,
    pub connections: AtomicU64,
}

impl HttpMetrics {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of these counters.
    pub(crate) fn write(&self, out: &mut String) {
        use std::fmt::Write;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP chorus_http_connections Open HTTP connections (WebSockets included).\n# TYPE chorus_http_connections gauge\nchorus_http_connections {}",
            g(&self.connections)
        );
        let _ = writeln!(
            out,
            "# HELP chorus_http_refused_total Connections, requests and offers refused by a limit, by reason.\n# TYPE chorus_http_refused_total counter"
        );
        for (reason, v) in [
            ("connections", &self.refused_connections),
            ("connections_per_ip", &self.refused_connections_per_ip),
            ("header_timeout", &self.header_timeouts),
            ("request_timeout", &self.request_timeouts),
            ("offer_rate", &self.offers_limited),
        ] {
            let _ = writeln!(
                out,
                "chorus_http_refused_total{{reason=\"{reason}\"}} {}",
                g(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP chorus_ws_closed_total WebSockets closed by the server for misbehaving, and commands refused by rate, by reason.\n# TYPE chorus_ws_closed_total counter"
        );
        for (reason, v) in [
            ("frame_too_large", &self.ws_frames_too_large),
            ("not_reading", &self.ws_not_reading),
            ("write_timeout", &self.ws_write_timeouts),
            ("silent", &self.ws_silent),
            ("too_many_refused", &self.ws_too_many_refused),
        ] {
            let _ = writeln!(
                out,
                "chorus_ws_closed_total{{reason=\"{reason}\"}} {}",
                g(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP chorus_ws_commands_limited_total Socket commands refused for coming too fast.\n# TYPE chorus_ws_commands_limited_total counter\nchorus_ws_commands_limited_total {}",
            g(&self.ws_commands_limited)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(4.0, t0);
        for _ in 0..4 {
            assert!(b.take(2.0, 4.0, t0).is_ok());
        }
        let retry = b.take(2.0, 4.0, t0).unwrap_err();
        assert!(retry <= Duration::from_millis(500), "{retry:?}");
        assert!(b.take(2.0, 4.0, t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(2.0, 4.0, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn offers_are_limited_per_ip_and_globally() {
        let limits = HttpLimits {
            offers_per_sec: 10,
            offers_per_sec_per_ip: 2,
            ..HttpLimits::default()
        };
        let l = OfferLimiter::new(&limits);
        let t = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // 2.5 * 2 = 5 from one IP, then refused.
        for _ in 0..5 {
            l.take(Some(a), t).unwrap();
        }
        assert!(matches!(
            l.take(Some(a), t),
            Err(OfferRefused::PerIp { .. })
        ));
        // The global burst (20) is shared: 15 are left.
        for i in 0..15u8 {
            l.take(Some(IpAddr::from([10, 0, 1, i])), t).unwrap();
        }
        let e = l.take(Some("10.0.2.1".parse().unwrap()), t).unwrap_err();
        assert!(matches!(e, OfferRefused::Global { .. }), "{e}");
        assert!(e.to_string().contains("retry in"), "{e}");
    }
}
