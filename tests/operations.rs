//! Running chorus like a service: what an operator's log shipper gets.
//! Needs scripts/setup-test-deps.sh (aiortc; scripts/test.sh runs it).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{tempdir, ws, Proc};
use serde_json::{json, Value};

const TOKEN: &str = "test-publish-token";

/// `--log-format json`: a publish and a view over WHIP/WHEP (aiortc) leave only JSON lines on
/// stderr, each naming this node, and the significant events carry their stream, source and
/// viewer ids as fields of their own.
#[test]
fn json_logs_name_the_node_stream_source_and_viewer_of_each_event() {
    let dir = tempdir("json-logs");
    let log_path = dir.join("chorus.log");
    let log = File::create(&log_path).unwrap();
    let mut p = Proc::start_logging_to(
        "serve",
        &["--log-format", "json", "serve", "--http", "127.0.0.1:0"],
        &[("CHORUS_PUBLISH_TOKEN", TOKEN)],
        Stdio::from(log),
    );
    let node = p.info["node"].as_str().unwrap().to_owned();
    let publisher = common::whip_command(p.http(), "logged", "ana", TOKEN, 14)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _publisher = common::Reaped(publisher);
    // ana first talks 5.2 s into her recording: 10 s of viewing hear her.
    let out = common::whep_command(p.http(), "logged", &["--tracks", "1", "--seconds", "10"])
        .output()
        .unwrap();
    common::assert_succeeded(&out, "whep_view.py");
    // The viewer's end is logged once its peer closes; then stop chorus to flush nothing late.
    common::wait_for(
        "the viewer's leave in the log",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log_path)
                .unwrap()
                .contains("\"viewer left\"")
                .then_some(())
        },
    );
    let _ = p.child.kill();
    let _ = p.child.wait();

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 10, "{text}");
    for l in &lines {
        assert_eq!(l["node"], node.as_str(), "{l}");
        for key in ["ts", "level", "target", "msg"] {
            assert!(l[key].is_string(), "{key} in {l}");
        }
    }
    let find = |msg: &str| {
        lines
            .iter()
            .find(|l| l["msg"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} line in {text}"))
    };
    let published = find("source published");
    assert_eq!(published["stream"], "logged", "{published}");
    assert_eq!(published["source"], "ana", "{published}");
    let joined = find("viewer joined");
    assert_eq!(joined["stream"], "logged", "{joined}");
    let viewer = joined["viewer"].as_str().unwrap();
    assert!(!viewer.is_empty(), "{joined}");
    let left = find("viewer left");
    assert_eq!(left["viewer"], viewer, "{left}");
    assert!(left["reason"].is_string(), "{left}");
}

/// One webhook POST as the receiver got it.
#[derive(Debug, Clone)]
struct Hook {
    signature: String,
    event_id: String,
    body: Vec<u8>,
    /// The status the receiver answered.
    answered: u16,
}

/// A webhook receiver on loopback: reads each POST (head, then `Content-Length` bytes) and
/// answers 500 to the first `fail_first` of them, 200 after. What it got, in order.
struct Receiver {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Hook>>>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Hook>>> = Arc::default();
        let sink = got.clone();
        // Ends with the test process (the listener is never closed by the test).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_owned());
                }
                let header = |name: &str| {
                    head.iter()
                        .find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                        })
                        .unwrap_or_default()
                };
                let len: usize = header("content-length").parse().unwrap_or(0);
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let mut g = sink.lock().unwrap();
                let answered = if g.len() < fail_first { 500 } else { 200 };
                assert!(head[0].starts_with("POST /hooks "), "{head:?}");
                g.push(Hook {
                    signature: header("x-chorus-signature"),
                    event_id: header("x-chorus-event-id"),
                    body,
                    answered,
                });
                drop(g);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {answered} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Receiver { addr, got }
    }

    /// The delivered events' bodies, parsed.
    fn delivered(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.answered == 200)
            .map(|h| serde_json::from_slice(&h.body).unwrap())
            .collect()
    }

    fn has(&self, kind: &str, event: &str, check: impl Fn(&Value) -> bool) -> bool {
        self.delivered()
            .iter()
            .any(|e| e["type"] == kind && e["event"] == event && check(&e["data"]))
    }
}

const SECRET: &str = "webhook-test-secret";
const API_KEY: &str = "test-api-key";

fn room_token(
    a: std::net::SocketAddr,
    user: &str,
    join_as: &str,
    perms: &[&str],
) -> (String, String) {
    let body = json!({"user_name": user, "join_as": join_as, "permissions": perms});
    let (s, v) = common::post_json(
        a,
        "/api/rooms/stage/tokens",
        Some(API_KEY),
        &body.to_string(),
    );
    assert_eq!(s, 200, "{v}");
    (
        v["data"]["token"].as_str().unwrap().to_owned(),
        v["data"]["memberId"].as_str().unwrap().to_owned(),
    )
}

fn cmd(id: u64, name: &str, data: Value) -> String {
    json!({"type": "cmd", "transId": id, "name": name, "data": data}).to_string()
}

/// `--webhook-url`: a feed's start and stop (aiortc over WHIP), a viewer's count (WHEP) and a
/// room's joins, raised hand, promotion, demotion, removal and leaves reach a local receiver as
/// signed POSTs in Millicast's shape; the first POST is answered 500 and is delivered on retry,
/// with the same event id.
#[test]
fn webhooks_are_signed_retried_and_cover_feeds_viewers_and_rooms() {
    let recv = Receiver::start(1);
    let url = format!("http://{}/hooks", recv.addr);
    let data = common::tempdir("hooks-data");
    let p = Proc::start(
        "serve",
        &[
            "serve",
            "--http",
            "127.0.0.1:0",
            "--webhook-url",
            &url,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[
            ("CHORUS_PUBLISH_TOKEN", TOKEN),
            ("CHORUS_API_KEY", API_KEY),
            ("CHORUS_WEBHOOK_SECRET", SECRET),
        ],
    );
    let a = p.http();
    let node = p.info["node"].as_str().unwrap().to_owned();
    // Recorded (WHIP's `record=true`; the tool adds its sourceId to the query), so that the
    // recording's end is told too.
    let publisher = common::whip_command(a, "hooked?record=true", "ana", TOKEN, 12)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _publisher = common::Reaped(publisher);
    let viewer = common::whep_command(a, "hooked", &["--tracks", "1", "--seconds", "8"])
        .spawn()
        .unwrap();
    let _viewer = common::Reaped(viewer);

    // A room: the host and an audience member come in; she raises her hand, is promoted,
    // demoted, then removed; the host leaves.
    let (host_token, host) = room_token(
        a,
        "Host",
        "member",
        &[
            "room.member.promote",
            "room.member.demote",
            "room.member.remove",
        ],
    );
    let (ana_token, ana) = room_token(a, "Ana", "audience", &[]);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let room = |t: &str| format!("ws://{a}/api/rooms/stage/ws?token={t}");
        let mut h = ws::open(&room(&host_token)).await.unwrap();
        ws::event(&mut h, "room.state").await;
        let mut s = ws::open(&room(&ana_token)).await.unwrap();
        ws::event(&mut s, "room.state").await;
        let r = ws::call(&mut s, &cmd(1, "hand.raise", json!({}))).await;
        assert_eq!(r["type"], "response", "{r}");
        for (i, name) in ["promote", "demote", "remove"].into_iter().enumerate() {
            let r = ws::call(&mut h, &cmd(i as u64 + 1, name, json!({"memberId": ana}))).await;
            assert_eq!(r["type"], "response", "{name}: {r}");
        }
        drop(h);
    });

    let member = |id: &str| {
        let id = id.to_owned();
        move |d: &Value| d["room"] == "stage" && d["memberId"] == id.as_str()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let all = [
            recv.has("feeds", "started", |d| {
                d["streamName"] == "hooked" && d["sourceId"] == "ana" && d["standby"] == false
            }),
            recv.has("feeds", "stopped", |d| {
                d["streamName"] == "hooked" && d["sourceId"] == "ana"
            }),
            recv.has("recording", "ready", |d| {
                let dir = std::path::Path::new(d["path"].as_str().unwrap_or_default());
                d["streamName"] == "hooked"
                    && d["sources"] == json!(["ana"])
                    && d["durationS"].as_f64().unwrap_or(0.0) > 5.0
                    && dir.starts_with(&data)
                    && dir.join("ana.opus").is_file()
                    && dir.join("scenario.json").is_file()
            }),
            recv.has("viewers", "count", |d| {
                d["streamName"] == "hooked" && d["viewers"] == 1
            }),
            recv.has("viewers", "count", |d| {
                d["streamName"] == "hooked" && d["viewers"] == 0
            }),
            recv.has("room", "member.joined", member(&host)),
            recv.has("room", "member.joined", |d| {
                member(&ana)(d) && d["role"] == "audience"
            }),
            recv.has("room", "hand.raised", member(&ana)),
            recv.has("room", "member.promoted", |d| {
                member(&ana)(d) && d["by"] == host.as_str()
            }),
            recv.has("room", "member.demoted", member(&ana)),
            recv.has("room", "member.removed", member(&ana)),
            recv.has("room", "member.left", member(&host)),
        ];
        let missing: Vec<usize> = (0..all.len()).filter(|&i| !all[i]).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "webhooks missing (by position) {missing:?}; delivered: {:#?}",
            recv.delivered()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let got = recv.got.lock().unwrap().clone();
    for h in &got {
        // Every POST is signed over its exact body, and names its event.
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
        let hex = h
            .signature
            .strip_prefix("sha256=")
            .unwrap_or_else(|| panic!("{h:?}"));
        let tag: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert!(
            aws_lc_rs::hmac::verify(&key, &h.body, &tag).is_ok(),
            "{h:?}"
        );
        let v: Value = serde_json::from_slice(&h.body).unwrap();
        assert_eq!(v["id"], h.event_id.as_str());
        assert_eq!(v["node"], node.as_str());
        assert!(v["timestamp"].as_u64().unwrap() > 1_700_000_000_000, "{v}");
    }
    // The refused first POST came again, same id, and was delivered; nothing else twice.
    assert_eq!(got[0].answered, 500);
    let retried = got.iter().filter(|h| h.event_id == got[0].event_id).count();
    assert_eq!(retried, 2, "{got:?}");
    let mut ids: Vec<&str> = got.iter().map(|h| h.event_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len() - 1);
    assert!(common::metric(a, "chorus_webhook_failed_attempts_total").unwrap() >= 1.0);
}

/// A receiver that accepts and never answers: publishing and viewing go on as if there were no
/// webhooks (the viewer's track is continuous), and the failures are counted.
#[test]
fn a_receiver_that_never_answers_does_not_slow_publish_or_view() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks", silent.local_addr().unwrap());
    let p = Proc::start(
        "serve",
        &["serve", "--http", "127.0.0.1:0", "--webhook-url", &url],
        &[
            ("CHORUS_PUBLISH_TOKEN", TOKEN),
            ("CHORUS_WEBHOOK_SECRET", SECRET),
        ],
    );
    let a = p.http();
    let started = Instant::now();
    let publisher = common::whip_command(a, "quiet", "ana", TOKEN, 14)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _publisher = common::Reaped(publisher);
    let out = common::whep_command(a, "quiet", &["--tracks", "1", "--seconds", "10", "--check"])
        .output()
        .unwrap();
    common::assert_succeeded(&out, "whep_view.py");
    let rep = common::room_tool::report(&out);
    let packets: u64 = rep["tracks"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| {
            assert_eq!(t["seq_gaps"], 0, "{t}");
            t["packets"].as_u64().unwrap()
        })
        .sum();
    assert!(packets > 150, "{rep}");
    // The first POST timed out after 5 s while all this went on.
    assert!(started.elapsed() > Duration::from_secs(6));
    assert!(common::metric(a, "chorus_webhook_failed_attempts_total").unwrap() >= 1.0);
    assert_eq!(
        common::metric(a, "chorus_webhook_delivered_total"),
        Some(0.0)
    );
    drop(silent);
}
