//! The live dashboard end to end: `chorus serve` (dev mode), two corpus speakers published with
//! the SDK and a listener with one multiplexed track (tests/browser/room.mjs), and the dashboard
//! page in headless Chromium (tests/browser/dashboard.mjs). Each time the edge's `vad` event puts
//! a talker into the listener's track, the page must show that source in that track within a
//! second. The feed refuses a missing or wrong API key.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{node_harness, repo, room_tool, serial, serve, Reaped};
use serde_json::{json, Value};

const TOKEN: &str = "dash-token";

/// dashboard.mjs running against `http`, its JSON lines read on a thread of their own.
struct Dashboard {
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    _child: Reaped,
}

impl Dashboard {
    fn start(http: std::net::SocketAddr, key: &str, shot: &std::path::Path) -> Dashboard {
        let (dir, script) = node_harness("dashboard.mjs");
        let mut child = Command::new("node")
            .current_dir(dir)
            .arg(script)
            .args(["--endpoint", &format!("http://{http}"), "--key", key])
            .args(["--seconds", "60", "--screenshot"])
            .arg(shot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = room_tool::json_lines(child.stdout.take().unwrap());
        Dashboard {
            stdin,
            lines,
            seen: Vec::new(),
            _child: Reaped(child),
        }
    }

    /// Reads lines until one matches `pred`, within `limit`.
    fn until(&mut self, limit: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let v = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "dashboard.mjs: no {what} within {limit:?}; saw {:#?}",
                    self.seen
                )
            });
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }
}

fn get(http: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let auth = bearer.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let (status, _, body) = common::http(http, "GET", path, &headers, b"");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A feed opened and held: its status and the connection.
fn open_feed(http: std::net::SocketAddr, key: &str) -> (u16, std::net::TcpStream) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/dashboard/events HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap();
    (status, s)
}

#[test]
fn the_dashboard_shows_a_talker_in_its_track_within_a_second_of_the_switch() {
    let _serial = serial();
    let started = Instant::now();
    let p = serve(TOKEN);
    let http = p.http();
    let key = p.info["apiKey"]
        .as_str()
        .expect("dev mode prints its API key");

    let (status, body) = get(http, "/api/dashboard/events", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing API key"), "{body}");
    let (status, body) = get(http, "/api/dashboard/events", Some("not-the-key"));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("wrong API key"), "{body}");
    let (status, page) = get(http, "/dashboard", None);
    assert_eq!(status, 200);
    assert!(page.contains("dashboard.js"), "{page}");

    let shot = repo().join("target/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut dash = Dashboard::start(http, key, &shot);
    dash.until(Duration::from_secs(30), "a live feed", |v| {
        v["event"] == "status" && v["text"].as_str().is_some_and(|t| t.starts_with("live:"))
    });

    // The page is one client; seven more fill the cap, and the next is refused.
    let held: Vec<_> = (1..8).map(|_| open_feed(http, key)).collect();
    assert!(held.iter().all(|(status, _)| *status == 200));
    let (status, body) = get(http, "/api/dashboard/events", Some(key));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("at most 8 dashboard clients"), "{body}");
    let refused = "chorus_dashboard_snapshots_total{event=\"client_refused\"}";
    assert_eq!(common::metric(http, refused), Some(1.0));
    drop(held);
    common::wait_for(
        "the closed feeds' places freed",
        Duration::from_secs(5),
        || (common::metric(http, "chorus_dashboard_clients ") == Some(1.0)).then_some(()),
    );

    // host talks first (0-6 s of the corpus), ana from 5.2 s: one track, so it moves from the
    // one to the other.
    let spec = json!([
        {"name": "p-host", "publish": "host"},
        {"name": "p-ana", "publish": "ana"},
        {"name": "listener", "view": {"tracks": 1}},
    ]);
    let mut room = room_tool::Live::start(http, "panel", TOKEN, 12, &spec);
    let is_vad = |v: &Value, source: &str| {
        v["event"] == "broadcast"
            && v["name"] == "listener"
            && v["type"] == "vad"
            && v["data"]["sourceId"] == source
    };
    room.next(Duration::from_secs(45), "vad host", |v| is_vad(v, "host"));
    room.next(Duration::from_secs(15), "vad ana", |v| is_vad(v, "ana"));
    // The page gets a second to show it, then the screenshot is taken while both still publish.
    std::thread::sleep(Duration::from_millis(1500));
    writeln!(dash.stdin, "quit").unwrap();
    dash.until(Duration::from_secs(15), "the screenshot", |v| {
        v["event"] == "screenshot"
    });
    room.drain();

    // The listener's vad events (its one track), and what the page showed in a one-track group.
    let vads: Vec<(f64, Option<String>)> = room
        .seen
        .iter()
        .filter(|v| v["event"] == "broadcast" && v["name"] == "listener" && v["type"] == "vad")
        .map(|v| {
            let source = v["data"]["sourceId"].as_str().map(str::to_owned);
            (v["t"].as_f64().unwrap(), source)
        })
        .collect();
    let shown: Vec<(f64, Option<String>)> = dash
        .seen
        .iter()
        .filter(|v| v["event"] == "track" && v["stream"] == "panel" && v["tracks"] == 1)
        .map(|v| {
            let source = v["source"].as_str().map(str::to_owned);
            (v["t"].as_f64().unwrap(), source)
        })
        .collect();
    let end = dash.seen.last().and_then(|v| v["t"].as_f64()).unwrap();
    let mut checked = 0;
    let mut after = 0.0;
    for (i, (t, source)) in vads.iter().enumerate() {
        let Some(source) = source else { continue };
        // A talker that left again within the second is not what the page must show.
        let until = vads.get(i + 1).map_or(end, |n| n.0);
        if until - t < 1000.0 {
            println!("{source} at {t}: held {} ms only, not checked", until - t);
            continue;
        }
        let seen = shown
            .iter()
            .find(|(ts, s)| *ts > after && s.as_deref() == Some(source.as_str()))
            .unwrap_or_else(|| panic!("the page never showed {source} in the track: {shown:?}"));
        let lag = seen.0 - t;
        println!("switch to {source}: the page showed it {lag:.0} ms after the vad event");
        assert!(
            lag < 1000.0,
            "{source}: {lag} ms; page {shown:?}, vad {vads:?}"
        );
        after = seen.0;
        checked += 1;
    }
    assert!(checked >= 2, "host then ana: {vads:?}");
    for source in ["host", "ana"] {
        assert!(
            dash.seen
                .iter()
                .any(|v| v["event"] == "talking" && v["source"] == source && v["talking"] == true),
            "the page never marked {source} talking: {:?}",
            dash.seen
        );
    }
    let png = std::fs::read(&shot).expect("target/dashboard.png written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    room.send("quit");
    println!(
        "screenshot: {}; wall time {:.1} s",
        shot.display(),
        started.elapsed().as_secs_f64()
    );
}
