//! Abuse tests: the media threads (holes 6, 9 media part, 10, 12 media part, 14).
//!
//! Each attack runs against a real `chorus serve` while the honest pair of another stream (or
//! the same stream, for the routing attack) keeps listening; each test bounds its own time.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use str0m::ice::{StunMessage, TransId};

use crate::common;
use crate::honest::{assert_rss_below, rss_kib, Honest};

const TOKEN: &str = "media-abuse-token";
/// RSS bound of the serve process under each attack (a debug build with the honest pair).
const RSS_BOUND_KIB: u64 = 400 * 1024;

/// A real WHEP offer (aiortc, 1 + 1 audio m-lines): made once, posted many times.
fn offer() -> &'static str {
    static OFFER: OnceLock<String> = OnceLock::new();
    OFFER.get_or_init(|| {
        let out = Command::new(common::python())
            .arg(common::repo().join("tests/python/whep_view.py"))
            .args([
                "--url",
                "http://127.0.0.1:9/whep/x",
                "--tracks",
                "1",
                "--offer-only",
            ])
            .output()
            .expect("whep_view.py runs");
        common::assert_succeeded(&out, "whep_view.py --offer-only");
        // A JSON summary line comes first, then the SDP.
        let text = String::from_utf8(out.stdout).unwrap();
        let sdp = text.find("v=0").expect("an SDP offer");
        text[sdp..].to_owned()
    })
}

/// POSTs the offer to `/whep/{stream}?{query}`: (status, Location, body).
fn whep(addr: SocketAddr, stream: &str, query: &str) -> (u16, Option<String>, String) {
    let (status, head, body) = common::http(
        addr,
        "POST",
        &format!("/whep/{stream}?{query}"),
        &[("Content-Type", "application/sdp")],
        offer().as_bytes(),
    );
    let location = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location")
            .then(|| v.trim().to_owned())
    });
    (
        status,
        location,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    common::metric(addr, name).unwrap_or_else(|| panic!("{name} in /metrics")) as u64
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap()
}

/// Hole 6: one POST with thousands of exclusions used to intern them all on a media thread (never
/// freed, scanned every tick). Now a view names at most 64 sources, and what views name is
/// released when they end (DELETE or lapse).
#[test]
fn view_names_are_capped_and_released_with_the_view() {
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, common::LIFT_ADDRESS_LIMITS);
    let http = p.http();
    let h = Honest::start(Honest::at(http, TOKEN, "honest-names").seconds(26));
    let baseline = metric(http, "chorus_edge_interned_names");

    // As many distinct names as a request line takes (hyper answers 414 past 64 KiB of URI).
    let many: Vec<String> = (0..12_000).map(base36).collect();
    let t = Instant::now();
    let (status, _, body) = whep(
        http,
        "abuse-names",
        &format!("tracks=1&exclude={}", many.join(",")),
    );
    assert_eq!(status, 400, "12k exclusions: {body}");
    assert!(body.contains("at most 64"), "{body}");
    eprintln!("12k exclusions refused in {:?}", t.elapsed());
    let (status, _, body) = whep(
        http,
        "abuse-names",
        &format!("tracks=1&exclude={}", many[..65].join(",")),
    );
    assert_eq!(status, 400, "65 exclusions: {body}");
    let (status, _, body) = whep(
        http,
        "abuse-names",
        &format!("tracks=1&pinned={}", "p".repeat(129)),
    );
    assert_eq!(status, 400, "a 129-byte pinned sourceId: {body}");

    // 60 views, each excluding 64 names of 128 bytes no other view uses; half are DELETEd,
    // the other half never connect and lapse.
    let views = 60;
    let rss_before = rss_kib(p.child.id());
    let mut locations = Vec::new();
    for v in 0..views {
        let names: Vec<String> = (0..64)
            .map(|i| format!("{v:03}-{i:02}-{}", "n".repeat(121)))
            .collect();
        let (status, location, body) = whep(
            http,
            "abuse-names",
            &format!("tracks=1&exclude={}", names.join(",")),
        );
        assert_eq!(status, 201, "view {v}: {body}");
        locations.push(location.expect("Location"));
    }
    let held = common::wait_for("the views' names interned", Duration::from_secs(5), || {
        let n = metric(http, "chorus_edge_interned_names");
        (n >= baseline + views * 64).then_some(n)
    });
    let rss_held = rss_kib(p.child.id());
    eprintln!(
        "interned names: {baseline} before, {held} with {views} views; RSS {rss_before} -> {rss_held} KiB ({} KiB per unconnected view)",
        rss_held.saturating_sub(rss_before) / views
    );
    for l in &locations[..30] {
        let (status, _, _) = common::http(http, "DELETE", l, &[], b"");
        assert_eq!(status, 200, "DELETE {l}");
    }
    let lapsed = common::wait_for(
        "the 30 unconnected views to lapse",
        Duration::from_secs(20),
        || {
            let n = metric(
                http,
                "chorus_edge_peers_closed_total{reason=\"connect_timeout\"}",
            );
            (n >= 30).then_some(n)
        },
    );
    let after = common::wait_for("names released", Duration::from_secs(3), || {
        let n = metric(http, "chorus_edge_interned_names");
        (n <= baseline).then_some(n)
    });
    eprintln!("{lapsed} views lapsed; interned names back to {after}");
    // A second round with other names, all DELETEd: the memory of the first is reused.
    let rss_round1 = rss_kib(p.child.id());
    for v in 0..views {
        let names: Vec<String> = (0..64)
            .map(|i| format!("r2-{v:03}-{i:02}-{}", "m".repeat(118)))
            .collect();
        let (status, location, body) = whep(
            http,
            "abuse-names",
            &format!("tracks=1&exclude={}", names.join(",")),
        );
        assert_eq!(status, 201, "round 2, view {v}: {body}");
        let (status, _, _) = common::http(http, "DELETE", &location.unwrap(), &[], b"");
        assert_eq!(status, 200);
    }
    common::wait_for("round 2 released", Duration::from_secs(3), || {
        (metric(http, "chorus_edge_interned_names") <= baseline).then_some(())
    });
    let rss_round2 = rss_kib(p.child.id());
    eprintln!("RSS after round 1 {rss_round1} KiB, after round 2 {rss_round2} KiB");
    assert!(
        rss_round2 < rss_round1 + 4 * 1024,
        "a second round of names grew the RSS from {rss_round1} to {rss_round2} KiB"
    );
    assert_rss_below(
        p.child.id(),
        RSS_BOUND_KIB,
        "serve after 60 views of 64 names",
    );
    h.assert_gapless();
}

/// Hole 9 (media part): answered peers that never connect are capped per process (here 8, set
/// for the test; 1000 by default) and lapse after 10 s, counted.
#[test]
fn unconnected_peers_are_capped_and_lapse() {
    let _serial = common::serial();
    let p = common::Proc::start(
        "serve",
        &["serve", "--http", "127.0.0.1:0"],
        &[
            ("CHORUS_PUBLISH_TOKEN", TOKEN),
            ("CHORUS_TEST_MAX_UNCONNECTED", "8"),
        ],
    );
    let http = p.http();
    let h = Honest::start(Honest::at(http, TOKEN, "honest-unconnected").seconds(16));
    let (mut created, mut refused) = (0, 0);
    for _ in 0..12 {
        let (status, _, body) = whep(http, "abuse-unconnected", "tracks=1");
        match status {
            201 => created += 1,
            503 => {
                assert!(body.contains("still connecting (at most 8)"), "{body}");
                refused += 1;
            }
            s => panic!("offer answered {s}: {body}"),
        }
    }
    assert!(
        created <= 8 && refused >= 4,
        "{created} answered, {refused} refused"
    );
    // The cap is per process: a publisher's offer is refused too, with the same words.
    let publish = offer().replace("a=recvonly", "a=sendonly");
    let (status, _, body) = common::http(
        http,
        "POST",
        "/whip/abuse-unconnected?sourceId=x",
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &format!("Bearer {TOKEN}")),
        ],
        publish.as_bytes(),
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "WHIP at the cap: {body}");
    assert!(body.contains("still connecting"), "{body}");
    assert!(metric(http, "chorus_unconnected_refused_total") >= 4);
    assert_eq!(metric(http, "chorus_unconnected_peers"), created);
    // 10 s later they have lapsed, counted, and offers are answered again.
    let t = Instant::now();
    common::wait_for("unconnected peers lapse", Duration::from_secs(16), || {
        (metric(http, "chorus_unconnected_peers") == 0).then_some(())
    });
    eprintln!("{created} unconnected peers lapsed after {:?}", t.elapsed());
    assert!(
        metric(
            http,
            "chorus_edge_peers_closed_total{reason=\"connect_timeout\"}"
        ) >= created
    );
    let (status, _, body) = whep(http, "abuse-unconnected", "tracks=1");
    assert_eq!(status, 201, "after the lapse: {body}");
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve at the unconnected cap");
    h.assert_gapless();
}

/// The SDP a `--print-sdp` run of whep_view.py wrote to stderr: (offer, answer).
fn printed_sdp(stderr: impl Read + Send + 'static) -> (String, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sdp = [String::new(), String::new()];
        let mut section = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let line = line.trim_end().to_owned();
            if line.starts_with("--- offer") {
                section = Some(0);
            } else if line.starts_with("--- answer") {
                section = Some(1);
            } else if let Some(i) = section {
                let sdp_line = line.len() > 2 && line.as_bytes()[1] == b'=';
                if sdp_line {
                    sdp[i].push_str(&line);
                    sdp[i].push('\n');
                } else if i == 1 && !sdp[1].is_empty() {
                    let _ = tx.send((sdp[0].clone(), sdp[1].clone()));
                    section = None;
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the viewer printed its offer and answer")
}

fn sdp_value<'a>(sdp: &'a str, key: &str) -> &'a str {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {sdp}"))
}

/// Hole 14: a STUN binding request with a viewer's ufrags but a bad MESSAGE-INTEGRITY, from
/// other sockets, used to put those sockets into the viewer's routes (evicting its own after 8).
/// Now it is refused and counted; the viewer keeps its route and hears every packet. Also
/// shows the counters of hole 12 that this scenario moves: switches, STUN refused, unroutable.
#[test]
fn spoofed_stun_does_not_divert_a_viewer() {
    let _serial = common::serial();
    // The publishers' socket on a known port, to aim at it too.
    let origin_media = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let port = origin_media.port().to_string();
    let p = common::serve_with(TOKEN, &["--media-port", &port]);
    let http = p.http();
    let h = Honest::start(Honest::at(http, TOKEN, "honest-stun").seconds(14));
    // The victim: a second viewer of the honest stream, its one multiplexed track following
    // who talks (the honest speaker), so its track switches.
    let mut victim = common::whep_command(
        http,
        h.stream(),
        &["--tracks", "1", "--seconds", "8", "--check", "--print-sdp"],
    )
    .stderr(Stdio::piped())
    .spawn()
    .expect("whep_view.py starts");
    let victim_stdout = victim.stdout.take().unwrap();
    let (offer_sdp, answer) = printed_sdp(victim.stderr.take().unwrap());
    let victim = common::Reaped(victim);
    let user = format!(
        "{}:{}",
        sdp_value(&answer, "a=ice-ufrag:"),
        sdp_value(&offer_sdp, "a=ice-ufrag:")
    );
    let cand = sdp_value(&answer, "a=candidate:");
    let port = cand.split(' ').nth(5).unwrap();
    let edge: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let hmac = |k: &[u8], d: &[&[u8]]| {
        str0m::crypto::from_feature_flags()
            .sha1_hmac_provider
            .sha1_hmac(k, d)
    };
    let origin_unroutable0 = metric(http, "chorus_origin_dropped_total{reason=\"unroutable\"}");
    let refused0 = metric(http, "chorus_edge_dropped_total{reason=\"stun_refused\"}");
    let unroutable0 = metric(http, "chorus_edge_dropped_total{reason=\"unroutable\"}");
    let spoofers: Vec<UdpSocket> = (0..20)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut buf = [0u8; 512];
    let mut sent = 0;
    for round in 0..10 {
        for s in &spoofers {
            let msg = StunMessage::binding_request(&user, TransId::new(), true, 7, 1 << 24, true);
            let n = msg
                .to_bytes(Some(b"a-guessed-password-of-22"), &mut buf, hmac)
                .unwrap();
            s.send_to(&buf[..n], edge).unwrap();
            s.send_to(&[0x17, 0xfe, 0xfd, round, 0, 0, 0], edge)
                .unwrap();
            s.send_to(&[0x17, 0xfe, 0xfd, round, 0, 0, 0], origin_media)
                .unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = common::wait_for("spoofed STUN counted", Duration::from_secs(3), || {
        let n = metric(http, "chorus_edge_dropped_total{reason=\"stun_refused\"}") - refused0;
        (n >= sent).then_some(n)
    });
    let unroutable = metric(http, "chorus_edge_dropped_total{reason=\"unroutable\"}") - unroutable0;
    assert!(
        unroutable >= sent,
        "{unroutable} unroutable of {sent} junk datagrams"
    );
    let at_origin =
        metric(http, "chorus_origin_dropped_total{reason=\"unroutable\"}") - origin_unroutable0;
    assert!(
        at_origin >= sent,
        "{at_origin} unroutable at the origin of {sent}"
    );
    eprintln!("{refused} spoofed STUN refused, {unroutable} junk datagrams unroutable at the edge, {at_origin} at the origin");

    // The victim heard its track to the end, without a gap.
    let mut victim = victim;
    let end = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = victim.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "victim viewer did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = BufReader::new(victim_stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .find(|v| v["event"] == "report")
        .expect("victim report");
    assert!(status.success(), "victim exited {status}: {report}");
    let track = &report["tracks"]["1"];
    assert!(track["packets"].as_u64().unwrap_or(0) > 50, "{track}");
    assert_eq!(track["seq_gaps"], 0, "{track}");
    assert!(metric(http, "chorus_edge_switches_total") > 0);
    // Every drop reason of the media threads is exported, moved or not.
    let (_, _, body) = common::http(http, "GET", "/metrics", &[], b"");
    let body = String::from_utf8_lossy(&body);
    for line in [
        "chorus_origin_dropped_total{reason=\"publisher_flood\"}",
        "chorus_origin_dropped_total{reason=\"undeclared_ssrc\"}",
        "chorus_origin_dropped_total{reason=\"stun_refused\"}",
        "chorus_origin_dropped_total{reason=\"udp_send\"}",
        "chorus_origin_peers_closed_total{reason=\"connect_timeout\"}",
        "chorus_edge_dropped_total{reason=\"viewer_before_switch\"}",
        "chorus_edge_dropped_total{reason=\"not_negotiated\"}",
        "chorus_edge_dropped_total{reason=\"seal\"}",
        "chorus_edge_dropped_total{reason=\"viewer_flood\"}",
        "chorus_edge_dropped_total{reason=\"udp_send\"}",
        "chorus_edge_peers_closed_total{reason=\"removed\"}",
        "chorus_edge_interned_names",
        "chorus_unconnected_peers",
        "chorus_unconnected_refused_total",
    ] {
        assert!(body.contains(line), "{line} in /metrics");
    }
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve after spoofed STUN");
    h.assert_gapless();
}

/// `chorus serve` with a media-thread fault: the child, its HTTP address, its stderr lines.
fn serve_with_fault(
    env: &[(&str, &str)],
) -> (
    common::Reaped,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
    cmd.args(["serve", "--http", "127.0.0.1:0"])
        .env("CHORUS_PUBLISH_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("chorus starts");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let info: Value = serde_json::from_str(&ready).expect("ready line");
    let http = info["http"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (common::Reaped(child), http, rx)
}

/// Hole 10: a panic on a media thread (the edge's or the origin's) used to stop its media while
/// HTTP kept answering and /healthz said ok. Now the process exits 70 with a log line naming
/// the thread, within a second of the panic.
#[test]
fn a_media_thread_panic_ends_the_process_loudly() {
    let _serial = common::serial();
    for thread in ["media-edge-0", "media-origin"] {
        let (mut child, _, lines) = serve_with_fault(&[
            ("CHORUS_TEST_PANIC_MEDIA_AFTER_MS", "1500"),
            ("CHORUS_TEST_FAULT_MEDIA_THREAD", thread),
        ]);
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(10) {
                panic!("{thread}: still running 10 s after its media thread should have panicked");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log: Vec<String> = lines.try_iter().collect();
        assert_eq!(
            status.code(),
            Some(70),
            "{thread}: exit status; log: {log:?}"
        );
        let wanted = format!("media thread {thread} panicked");
        assert!(
            log.iter().any(|l| l.contains(&wanted)),
            "{thread}: {wanted:?} in {log:?}"
        );
        eprintln!("{thread}: exited 70 {:?} after start", started.elapsed());
    }
}

/// Hole 10: a media thread that stops looping (a hang) makes /healthz answer 503 naming it, and
/// 200 again once it runs.
#[test]
fn a_stuck_media_thread_fails_healthz() {
    let _serial = common::serial();
    let (mut child, http, _lines) = serve_with_fault(&[
        ("CHORUS_TEST_STALL_MEDIA_AFTER_MS", "500"),
        ("CHORUS_TEST_FAULT_MEDIA_THREAD", "media-origin"),
    ]);
    let health = || {
        let (status, _, body) = common::http(http, "GET", "/healthz", &[], b"");
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = common::wait_for("healthz 503", Duration::from_secs(8), || {
        let r = health();
        (r.0 == 503).then_some(r)
    });
    assert!(
        body.contains("media thread media-origin silent"),
        "{status}: {body}"
    );
    eprintln!("healthz while stuck: {status} {body}");
    common::wait_for("healthz ok again", Duration::from_secs(15), || {
        (health().0 == 200).then_some(())
    });
    assert!(child.0.try_wait().unwrap().is_none(), "serve stays up");
    assert!(rss_kib(child.0.id()) < RSS_BOUND_KIB);
}
