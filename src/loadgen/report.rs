//! Step and summary reports: counters read at the edges of a step's steady part, turned into
//! one JSON line.
//!
//! A step line: `step`, `viewers` (asked for), `connected`, `secs` (the steady part, after the
//! step's joins), `received` / `lost` / `loss_pct` / `duplicates` (RTP header counts of all
//! viewers), `pkts_per_s`, `pkts_per_viewer_s`, `lat_{p50,p95,p99,max}_ms` and `lat_samples`
//! (publisher send to kernel receive time, sampled viewers, packets forwarded as they came),
//! `preroll_lat_{p50,max}_ms` and `preroll_lat_samples` (the packets a pre-roll replayed when
//! their source entered a track, late by design: see `matcher::RunSplit`), `switch_{p50,p95,max}_ms` and
//! `switch_samples` (a talk spurt's first packet sent to its source's first packet received),
//! `edge_cpu_s`, `edge_cpu_pct`, `edge_ns_per_pkt` (edge CPU per received packet),
//! `edge_rss_kib`, `loadgen_cpu_s`, `loadgen_ns_per_pkt`, `joins`, `joins_per_s`,
//! `join_{p50,p99,max}_ms`, `join_failures`, `join_errors` (message -> count),
//! `dropped_viewers` (connected, then lost), `decrypted` / `unmatched` (sampled packets),
//! `opened` / `open_failed` (of those, opened on the generator's own SRTP path, and the ones
//! that did not authenticate), the generator's own cost: `loadgen_cpu_pct`,
//! `loadgen_viewers_cpu_pct` / `loadgen_viewers_ns_per_pkt` (its viewers' threads),
//! `loadgen_publishers_cpu_pct`, `loadgen_control_cpu_pct` (joins), `pkts_per_recvmmsg`,
//! `loadgen_headroom_pct` (its core's share left), `origin_cpu_pct` (`--origin-pid`) and
//! `gen_core_headroom_pct` (what both leave of the core they share),
//! `excluded_received` (packets of a viewer's own excluded source: must be 0), `published`,
//! `str0m_timeouts_per_s` / `str0m_inputs_per_s` (the generator's own str0m work),
//! `viewer_ssrcs` (distinct viewer and SSRC pairs that brought RTP since the start: one per
//! track that carried anything), `srtp_profiles` (viewers connected per negotiated SRTP profile),
//! `corpus_ms` (the window in the corpus timeline, ms since the publishers' start, looping)
//! and `partial` when the hard stop cut the step.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::engine::{EngineHandle, Samples};
use super::procfs;
use crate::replay::truth::percentile;

/// Counters of every thread, the edge's /proc figures and our own CPU, at one instant.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub at: Option<Instant>,
    pub received: u64,
    pub expected: u64,
    pub duplicates: u64,
    pub decrypted: u64,
    pub unmatched: u64,
    pub excluded_received: u64,
    pub published: u64,
    pub truncated: u64,
    pub timeouts: u64,
    pub to_str0m: u64,
    pub connected: u64,
    pub dropped: u64,
    pub recv_calls: u64,
    pub opened: u64,
    pub open_failed: u64,
    pub viewer_ssrcs: u64,
    /// Viewers connected per negotiated SRTP profile.
    pub profiles: BTreeMap<String, u64>,
    pub edge_cpu_s: Option<f64>,
    pub edge_rss_kib: Option<u64>,
    /// The origin shares the generator's core in `scripts/loadtest.sh`: its CPU is part of
    /// what that core has left.
    pub origin_cpu_s: Option<f64>,
    pub self_cpu_s: f64,
    /// CPU of the threads that own the viewers (receive, count, decrypt the sampled ones).
    pub viewers_cpu_s: f64,
    /// CPU of the publishers' thread (str0m, SRTP, the 20 ms clock).
    pub publishers_cpu_s: f64,
}

/// The processes whose CPU and memory a snapshot reads from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pids {
    pub edge: Option<u32>,
    pub origin: Option<u32>,
}

impl Snapshot {
    /// `engines`: the viewers' threads, then the publishers' thread last (as `run` spawns them).
    pub(crate) fn take(engines: &[EngineHandle], pids: Pids) -> Snapshot {
        let mut s = Snapshot {
            at: Some(Instant::now()),
            ..Snapshot::default()
        };
        for (i, e) in engines.iter().enumerate() {
            let tid = e.stats.tid.load(Ordering::Relaxed);
            let cpu = if tid > 0 {
                procfs::thread_cpu_seconds(tid).unwrap_or(0.0)
            } else {
                0.0
            };
            if i + 1 == engines.len() {
                s.publishers_cpu_s += cpu;
            } else {
                s.viewers_cpu_s += cpu;
            }
        }
        for e in engines {
            let t = &e.stats;
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            s.received += get(&t.received);
            s.expected += get(&t.expected);
            s.duplicates += get(&t.duplicates);
            s.decrypted += get(&t.decrypted);
            s.unmatched += get(&t.unmatched);
            s.excluded_received += get(&t.excluded_received);
            s.published += get(&t.published);
            s.truncated += get(&t.truncated);
            s.timeouts += get(&t.timeouts);
            s.to_str0m += get(&t.to_str0m);
            s.recv_calls += get(&t.recv_calls);
            s.opened += get(&t.opened);
            s.open_failed += get(&t.open_failed);
            s.connected += get(&t.connected_viewers);
            s.viewer_ssrcs += get(&t.viewer_ssrcs);
            let p = t.profiles.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in p.iter() {
                *s.profiles.entry(k.clone()).or_default() += v;
            }
            s.dropped += get(&t.dropped_viewers);
        }
        if let Some(pid) = pids.edge {
            s.edge_cpu_s = procfs::cpu_seconds(Some(pid)).ok();
            s.edge_rss_kib = procfs::rss_kib(Some(pid)).ok();
        }
        if let Some(pid) = pids.origin {
            s.origin_cpu_s = procfs::cpu_seconds(Some(pid)).ok();
        }
        s.self_cpu_s = procfs::cpu_seconds(None).unwrap_or(0.0);
        s
    }
}

/// Takes the latency samples gathered since the last call.
pub(crate) fn take_samples(engines: &[EngineHandle]) -> Samples {
    let mut out = Samples::default();
    for e in engines {
        let mut g = e.stats.samples.lock().unwrap_or_else(|p| p.into_inner());
        out.latency_us.append(&mut g.latency_us);
        out.preroll_us.append(&mut g.preroll_us);
        out.switch_us.append(&mut g.switch_us);
    }
    out
}

/// One step's joins.
#[derive(Debug, Default, Clone)]
pub(crate) struct Joins {
    pub attempted: usize,
    /// Join times (director request to connected) of the joins that succeeded.
    pub times: Vec<Duration>,
    pub errors: BTreeMap<String, usize>,
    /// From the step's first join request to its last join's end.
    pub span: Duration,
}

impl Joins {
    pub(crate) fn failures(&self) -> usize {
        self.errors.values().sum()
    }
}

fn ms(us: u64) -> Value {
    json!((us as f64 / 10.0).round() / 100.0)
}

fn ms_dur(d: Duration) -> Value {
    ms(d.as_micros() as u64)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// p50/p95/p99/max of microsecond samples, in ms, under `prefix_`.
pub(crate) fn percentiles(
    out: &mut Map<String, Value>,
    prefix: &str,
    us: &mut [u32],
    which: &[f64],
) {
    us.sort_unstable();
    let v: Vec<u64> = us.iter().map(|&x| x as u64).collect();
    for &p in which {
        let key = if p >= 100.0 {
            format!("{prefix}_max_ms")
        } else {
            format!("{prefix}_p{}_ms", p as u32)
        };
        out.insert(key, percentile(&v, p).map_or(Value::Null, ms));
    }
    out.insert(format!("{prefix}_samples"), json!(v.len()));
}

pub(crate) struct StepInput<'a> {
    pub step: usize,
    pub viewers: usize,
    pub a: &'a Snapshot,
    pub b: &'a Snapshot,
    pub samples: Samples,
    pub joins: &'a Joins,
    /// The steady window's position in the corpus timeline (ms since the publishers' start).
    pub corpus_ms: (u64, u64),
    pub partial: bool,
}

fn opt_sub(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

pub(crate) fn step_json(s: StepInput<'_>) -> Value {
    let mut o = Map::new();
    let (a, b) = (s.a, s.b);
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64(),
        _ => 0.0,
    };
    let received = b.received - a.received;
    let expected = b.expected - a.expected;
    let lost = expected.saturating_sub(received);
    o.insert("step".into(), json!(s.step));
    o.insert("viewers".into(), json!(s.viewers));
    o.insert("connected".into(), json!(b.connected));
    o.insert("secs".into(), json!(round(secs, 3)));
    o.insert("received".into(), json!(received));
    o.insert("lost".into(), json!(lost));
    let per_s = |x: f64| if secs > 0.0 { Some(x / secs) } else { None };
    o.insert(
        "pkts_per_s".into(),
        json!(per_s(received as f64).map(|x| round(x, 1))),
    );
    o.insert(
        "pkts_per_viewer_s".into(),
        json!(per_s(received as f64)
            .filter(|_| b.connected > 0)
            .map(|x| round(x / b.connected as f64, 2))),
    );
    o.insert(
        "loss_pct".into(),
        json!((expected > 0).then(|| round(100.0 * lost as f64 / expected as f64, 4))),
    );
    o.insert("duplicates".into(), json!(b.duplicates - a.duplicates));
    let mut samples = s.samples;
    percentiles(
        &mut o,
        "lat",
        &mut samples.latency_us,
        &[50.0, 95.0, 99.0, 100.0],
    );
    percentiles(
        &mut o,
        "preroll_lat",
        &mut samples.preroll_us,
        &[50.0, 100.0],
    );
    percentiles(
        &mut o,
        "switch",
        &mut samples.switch_us,
        &[50.0, 95.0, 100.0],
    );
    let edge_cpu = opt_sub(a.edge_cpu_s, b.edge_cpu_s);
    o.insert("edge_cpu_s".into(), json!(edge_cpu.map(|x| round(x, 3))));
    o.insert(
        "edge_cpu_pct".into(),
        json!(edge_cpu.and_then(per_s).map(|x| round(100.0 * x, 1))),
    );
    o.insert(
        "edge_ns_per_pkt".into(),
        json!(edge_cpu
            .filter(|_| received > 0)
            .map(|c| round(c * 1e9 / received as f64, 0))),
    );
    o.insert("edge_rss_kib".into(), json!(b.edge_rss_kib));
    let own = b.self_cpu_s - a.self_cpu_s;
    let pct = |cpu: f64| per_s(cpu).map(|x| round(100.0 * x, 1));
    let ns_per_pkt = |cpu: f64| (received > 0).then(|| round(cpu * 1e9 / received as f64, 0));
    o.insert("loadgen_cpu_s".into(), json!(round(own, 3)));
    o.insert("loadgen_cpu_pct".into(), json!(pct(own)));
    o.insert("loadgen_ns_per_pkt".into(), json!(ns_per_pkt(own)));
    // Where the generator's CPU goes: the viewers' threads (per received packet: the cost
    // that grows with the measurement), the publishers' thread, and the rest (joins: HTTP,
    // WebSocket, offers on the control thread).
    let viewers_cpu = b.viewers_cpu_s - a.viewers_cpu_s;
    let publishers_cpu = b.publishers_cpu_s - a.publishers_cpu_s;
    o.insert("loadgen_viewers_cpu_pct".into(), json!(pct(viewers_cpu)));
    o.insert(
        "loadgen_viewers_ns_per_pkt".into(),
        json!(ns_per_pkt(viewers_cpu)),
    );
    o.insert(
        "loadgen_publishers_cpu_pct".into(),
        json!(pct(publishers_cpu)),
    );
    o.insert(
        "loadgen_control_cpu_pct".into(),
        json!(pct((own - viewers_cpu - publishers_cpu).max(0.0))),
    );
    let calls = b.recv_calls - a.recv_calls;
    o.insert(
        "pkts_per_recvmmsg".into(),
        json!((calls > 0).then(|| round(received as f64 / calls as f64, 2))),
    );
    let origin_cpu = opt_sub(a.origin_cpu_s, b.origin_cpu_s);
    o.insert("origin_cpu_pct".into(), json!(origin_cpu.and_then(pct)));
    // The share of one core the generator leaves: itself alone, and with the origin that
    // scripts/loadtest.sh pins beside it. Near 0 the generator bounds the measurement.
    let loadgen_pct = pct(own);
    o.insert(
        "loadgen_headroom_pct".into(),
        json!(loadgen_pct.map(|p| round(100.0 - p, 1))),
    );
    o.insert(
        "gen_core_headroom_pct".into(),
        json!(loadgen_pct
            .zip(origin_cpu.and_then(pct))
            .map(|(l, o)| round(100.0 - l - o, 1))),
    );
    let j = s.joins;
    o.insert("joins".into(), json!(j.times.len()));
    let span = j.span.as_secs_f64();
    o.insert(
        "joins_per_s".into(),
        json!((span > 0.0 && !j.times.is_empty()).then(|| round(j.times.len() as f64 / span, 1))),
    );
    let mut jt: Vec<u64> = j.times.iter().map(|d| d.as_micros() as u64).collect();
    jt.sort_unstable();
    o.insert(
        "join_p50_ms".into(),
        percentile(&jt, 50.0).map_or(Value::Null, ms),
    );
    o.insert(
        "join_p99_ms".into(),
        percentile(&jt, 99.0).map_or(Value::Null, ms),
    );
    o.insert(
        "join_max_ms".into(),
        jt.last().map_or(Value::Null, |&x| ms(x)),
    );
    o.insert("join_failures".into(), json!(j.failures()));
    if !j.errors.is_empty() {
        o.insert("join_errors".into(), json!(j.errors));
    }
    o.insert(
        "dropped_viewers".into(),
        json!(b.dropped.saturating_sub(a.dropped)),
    );
    o.insert("decrypted".into(), json!(b.decrypted - a.decrypted));
    o.insert("unmatched".into(), json!(b.unmatched - a.unmatched));
    o.insert("opened".into(), json!(b.opened - a.opened));
    o.insert("open_failed".into(), json!(b.open_failed - a.open_failed));
    o.insert(
        "excluded_received".into(),
        json!(b.excluded_received - a.excluded_received),
    );
    o.insert("published".into(), json!(b.published - a.published));
    // The generator's own str0m work: timeouts driven and datagrams decrypted or answered.
    o.insert(
        "str0m_timeouts_per_s".into(),
        json!(per_s((b.timeouts - a.timeouts) as f64).map(|x| round(x, 0))),
    );
    o.insert(
        "str0m_inputs_per_s".into(),
        json!(per_s((b.to_str0m - a.to_str0m) as f64).map(|x| round(x, 0))),
    );
    o.insert("viewer_ssrcs".into(), json!(b.viewer_ssrcs));
    o.insert("srtp_profiles".into(), json!(b.profiles));
    o.insert("corpus_ms".into(), json!([s.corpus_ms.0, s.corpus_ms.1]));
    if s.partial {
        o.insert("partial".into(), json!(true));
    }
    Value::Object(o)
}

/// Join time as JSON ms (helper for the summary).
pub(crate) fn join_ms(d: Duration) -> Value {
    ms_dur(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_json_has_every_field_and_sane_values() {
        let t = Instant::now();
        let a = Snapshot {
            at: Some(t),
            received: 100,
            expected: 100,
            edge_cpu_s: Some(1.0),
            origin_cpu_s: Some(2.0),
            self_cpu_s: 0.5,
            viewers_cpu_s: 0.1,
            publishers_cpu_s: 0.1,
            recv_calls: 10,
            ..Snapshot::default()
        };
        let b = Snapshot {
            at: Some(t + Duration::from_secs(2)),
            received: 1100,
            expected: 1110,
            connected: 10,
            edge_cpu_s: Some(1.5),
            edge_rss_kib: Some(2048),
            origin_cpu_s: Some(2.2),
            self_cpu_s: 0.7,
            viewers_cpu_s: 0.2,
            publishers_cpu_s: 0.15,
            recv_calls: 260,
            ..Snapshot::default()
        };
        let joins = Joins {
            attempted: 10,
            times: (1..=10).map(|i| Duration::from_millis(i * 10)).collect(),
            errors: BTreeMap::new(),
            span: Duration::from_millis(500),
        };
        let v = step_json(StepInput {
            step: 0,
            viewers: 10,
            a: &a,
            b: &b,
            samples: Samples {
                latency_us: vec![1000, 2000, 3000],
                preroll_us: vec![90_000, 110_000],
                switch_us: vec![30_000],
            },
            joins: &joins,
            corpus_ms: (1000, 3000),
            partial: false,
        });
        assert_eq!(v["received"], 1000);
        assert_eq!(v["pkts_per_s"], 500.0);
        assert_eq!(v["pkts_per_viewer_s"], 50.0);
        assert_eq!(v["loss_pct"], 0.9901);
        assert_eq!(v["lat_p50_ms"], 2.0);
        assert_eq!(v["lat_max_ms"], 3.0);
        assert_eq!(v["switch_p95_ms"], 30.0);
        // Pre-roll packets are reported apart, not in the added latency (its max is 3 ms).
        assert_eq!(
            (&v["preroll_lat_max_ms"], &v["preroll_lat_samples"]),
            (&json!(110.0), &json!(2))
        );
        assert_eq!(v["edge_cpu_s"], 0.5);
        assert_eq!(v["edge_cpu_pct"], 25.0);
        assert_eq!(v["joins_per_s"], 20.0);
        assert_eq!(v["join_p50_ms"], 50.0);
        assert_eq!(v["join_failures"], 0);
        // The generator: 0.2 s of 2 s (10 %), 0.1 s of it in the viewers' threads (100 µs per
        // packet of 1000), 0.05 s publishers, the rest control; the origin 10 %: 80 % left.
        assert_eq!(v["loadgen_cpu_pct"], 10.0);
        assert_eq!(v["loadgen_headroom_pct"], 90.0);
        assert_eq!(v["loadgen_viewers_cpu_pct"], 5.0);
        assert_eq!(v["loadgen_viewers_ns_per_pkt"], 100_000.0);
        assert_eq!(v["loadgen_publishers_cpu_pct"], 2.5);
        assert_eq!(v["loadgen_control_cpu_pct"], 2.5);
        assert_eq!(v["pkts_per_recvmmsg"], 4.0);
        assert_eq!(v["origin_cpu_pct"], 10.0);
        assert_eq!(v["gen_core_headroom_pct"], 80.0);
        for k in [
            "step",
            "viewers",
            "connected",
            "secs",
            "lat_p95_ms",
            "lat_p99_ms",
            "switch_p50_ms",
            "edge_rss_kib",
            "join_p99_ms",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
    }
}
