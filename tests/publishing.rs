//! Publishing for real: the official Millicast SDK in headless Chromium, aiortc over WHIP, and
//! the QUIC link to a second process. Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{corpus, get_json, node_harness, wait_for, Proc};
use serde_json::Value;

const TOKEN: &str = "test-publish-token";

fn serve() -> Proc {
    common::serve(TOKEN)
}

/// Sources of a stream as the origin sees them, by sourceId.
fn sources(p: &Proc, stream: &str) -> BTreeMap<String, Value> {
    let (status, v) = get_json(p.http(), &format!("/api/streams/{stream}"));
    if status != 200 {
        return BTreeMap::new();
    }
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["sourceId"].as_str().unwrap_or("").to_owned(), s.clone()))
        .collect()
}

/// A child process whose stdout lines arrive on a channel; killed when dropped.
struct Tool {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines received while waiting for something else, in order.
    backlog: Vec<Value>,
}

impl Tool {
    fn spawn(mut cmd: Command) -> Tool {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tool starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("  tool: {line}");
                let _ = tx.send(line);
            }
        });
        Tool {
            child,
            lines,
            backlog: Vec::new(),
        }
    }

    /// Waits for a JSON line with this event (and sourceId, if given).
    fn expect(&mut self, event: &str, source: Option<&str>, timeout: Duration) -> Value {
        let wanted = |v: &Value| v["event"] == event && source.is_none_or(|s| v["sourceId"] == s);
        if let Some(i) = self.backlog.iter().position(wanted) {
            return self.backlog.remove(i);
        }
        let end = std::time::Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {event:?} {source:?} event within {timeout:?}"));
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == "error" {
                panic!("tool reported an error: {v}");
            }
            if wanted(&v) {
                return v;
            }
            self.backlog.push(v);
        }
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
    }

    fn wait_success(mut self, timeout: Duration) {
        let status = wait_for("tool exit", timeout, || self.child.try_wait().unwrap());
        assert!(status.success(), "tool failed: {status}");
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SDK publishing harness (tests/browser/publish.mjs) against `p`, playing the corpus.
fn sdk_publisher(p: &Proc, args: &[&str]) -> Tool {
    let (dir, script) = node_harness("publish.mjs");
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg(script)
        .args([
            "--endpoint",
            &format!("http://{}", p.http()),
            "--token",
            TOKEN,
        ])
        .args(args)
        .arg("--corpus")
        .arg(corpus());
    Tool::spawn(cmd)
}

fn whip(p: &Proc, stream: &str, source: &str, seconds: u32) -> Tool {
    Tool::spawn(common::whip_command(
        p.http(),
        stream,
        source,
        TOKEN,
        seconds,
    ))
}

#[test]
fn sdk_publishes_three_sources_into_one_stream_and_replaces_one() {
    let _serial = common::serial();
    let p = serve();
    let mut tool = sdk_publisher(
        &p,
        &[
            "--stream",
            "panel",
            "--sources",
            "host,ana,bo",
            "--seconds",
            "90",
        ],
    );
    for s in ["host", "ana", "bo"] {
        tool.expect("published", Some(s), Duration::from_secs(60));
    }
    // All three arrive at the origin, each with Chrome's own RFC 6464 levels.
    let first = wait_for("three sources with levels", Duration::from_secs(30), || {
        let s = sources(&p, "panel");
        let ok = s.len() == 3
            && s.values()
                .all(|v| v["audio"]["levelPackets"].as_u64() > Some(50));
        ok.then_some(s)
    });
    assert_eq!(first.keys().collect::<Vec<_>>(), ["ana", "bo", "host"]);
    for (id, v) in &first {
        let level = v["audio"]["lastLevel"].as_u64().unwrap_or(999);
        assert!(level <= 127, "{id}: {v}");
        assert_eq!(
            v["audio"]["packets"], v["audio"]["levelPackets"],
            "{id}: every audio packet has a level"
        );
    }
    // The host talks from 0 s: its level must have been loud at some point; sample a few times.
    let loud = wait_for(
        "a loud level from the host",
        Duration::from_secs(20),
        || {
            let s = sources(&p, "panel");
            let l = s.get("host")?["audio"]["lastLevel"].as_u64()?;
            (l < 50).then_some(l)
        },
    );
    assert!(loud < 50);

    // Republish ana: the origin keeps one "ana", now from the new publication.
    let old = first["ana"]["publisherId"].clone();
    tool.send("republish ana");
    tool.expect("published", Some("ana"), Duration::from_secs(60));
    let after = wait_for("ana replaced and flowing", Duration::from_secs(30), || {
        let s = sources(&p, "panel");
        let ana = s.get("ana")?;
        (ana["publisherId"] != old && ana["audio"]["packets"].as_u64() > Some(50)).then_some(s)
    });
    assert_eq!(
        after.len(),
        3,
        "replacement made a second source: {after:?}"
    );
    tool.send("quit");
    tool.wait_success(Duration::from_secs(30));
    wait_for(
        "stream gone after the publishers left",
        Duration::from_secs(15),
        || sources(&p, "panel").is_empty().then_some(()),
    );
}

#[test]
fn aiortc_publishes_over_whip_with_levels() {
    let _serial = common::serial();
    let p = serve();
    let mut tool = whip(&p, "whipped", "ana", 6);
    tool.expect("connected", None, Duration::from_secs(30));
    let s = wait_for("ana with levels", Duration::from_secs(20), || {
        let s = sources(&p, "whipped");
        (s.get("ana")?["audio"]["levelPackets"].as_u64()? > 50).then_some(s)
    });
    assert_eq!(s.len(), 1);
    tool.wait_success(Duration::from_secs(30));
    // DELETE at the end removes the source.
    wait_for("source removed by DELETE", Duration::from_secs(10), || {
        sources(&p, "whipped").is_empty().then_some(())
    });
}

fn probe(
    origin: &Proc,
    stream: &str,
    seconds: &str,
    fingerprint: &str,
    token: &str,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "probe",
            "--origin",
            &origin.cluster(),
            "--stream",
            stream,
            "--seconds",
            seconds,
        ])
        .args([
            "--origin-fingerprint",
            fingerprint,
            "--cluster-token",
            token,
        ])
        .output()
        .unwrap()
}

#[test]
fn quic_link_carries_sources_and_levels_to_a_second_process() {
    let _serial = common::serial();
    let origin = common::origin(TOKEN, "cluster-secret");
    let fp = origin.info["fingerprint"].as_str().unwrap().to_owned();
    // No edge serves viewers yet (a probe does not): the director says so.
    let (s, v) = common::post_json(
        origin.http(),
        "/api/director/subscribe",
        None,
        r#"{"streamName":"linked"}"#,
    );
    assert_eq!(s, 503, "{v}");
    assert!(
        v["data"]["message"].as_str().unwrap().contains("no edge"),
        "{v}"
    );
    let mut a = whip(&origin, "linked", "ana", 12);
    let mut b = whip(&origin, "linked", "bo", 12);
    a.expect("connected", None, Duration::from_secs(30));
    b.expect("connected", None, Duration::from_secs(30));
    wait_for(
        "both sources at the origin",
        Duration::from_secs(20),
        || (sources(&origin, "linked").len() == 2).then_some(()),
    );

    // Wrong certificate pin and wrong cluster token are refused with clear errors.
    let bad = probe(&origin, "linked", "1", &"00".repeat(32), "cluster-secret");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("fingerprint"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = probe(&origin, "linked", "1", &fp, "wrong");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("refused"));

    // A real second process subscribes over QUIC; the origin sees one edge while it listens.
    let handle = {
        let cluster = origin.cluster();
        let fp = fp.clone();
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_chorus"))
                .args([
                    "probe",
                    "--origin",
                    &cluster,
                    "--stream",
                    "linked",
                    "--seconds",
                    "3",
                ])
                .args([
                    "--origin-fingerprint",
                    &fp,
                    "--cluster-token",
                    "cluster-secret",
                ])
                .output()
                .unwrap()
        })
    };
    wait_for("the probe subscribed", Duration::from_secs(5), || {
        let (_, v) = get_json(origin.http(), "/api/streams/linked");
        (v["edges"] == 1).then_some(())
    });
    let out = handle.join().unwrap();
    common::assert_succeeded(&out, "chorus probe");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: BTreeMap<String, &Value> = report["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["sourceId"].as_str().unwrap().to_owned(), s))
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), ["ana", "bo"], "{report}");
    for (id, s) in got {
        let n = s["audioPackets"].as_u64().unwrap();
        // 3 s at 50 packets/s, less connection set-up.
        assert!(n > 100, "{id}: {s}");
        assert_eq!(
            s["levelPackets"].as_u64(),
            Some(n),
            "{id}: levels survive the relay"
        );
    }
    assert_eq!(report["foreignDatagrams"], 0);
    // The probe released the stream: the origin unsubscribed it.
    wait_for("edge unsubscribed", Duration::from_secs(5), || {
        let (_, v) = get_json(origin.http(), "/api/streams/linked");
        (v["edges"] == 0).then_some(())
    });
}

#[test]
fn a_publisher_that_vanishes_is_removed_after_ice_timeout() {
    let _serial = common::serial();
    let p = serve();
    let mut tool = whip(&p, "vanish", "ana", 60);
    tool.expect("connected", None, Duration::from_secs(30));
    wait_for("ana live", Duration::from_secs(10), || {
        sources(&p, "vanish").contains_key("ana").then_some(())
    });
    // SIGKILL: no DELETE, no DTLS close; only the end of consent checks tells.
    tool.child.kill().unwrap();
    let gone = std::time::Instant::now();
    wait_for(
        "source removed by ICE timeout",
        Duration::from_secs(30),
        || sources(&p, "vanish").is_empty().then_some(()),
    );
    assert!(
        gone.elapsed() >= Duration::from_secs(2),
        "removed before any timeout could run"
    );
}

#[test]
fn keyframe_requests_travel_back_to_the_publisher_and_video_is_relayed() {
    let _serial = common::serial();
    // serve's QUIC port takes only edges with its cluster token: the probe gets it too.
    let p = common::serve_with(TOKEN, &["--cluster-token", "kf-cluster"]);
    // `_` publishes without a sourceId: the stream's main source, with video.
    let mut tool = sdk_publisher(
        &p,
        &[
            "--stream",
            "kf",
            "--sources",
            "_",
            "--video",
            "_",
            "--seconds",
            "60",
        ],
    );
    tool.expect("published", None, Duration::from_secs(60));
    let pli_before = video_stat(&mut tool, "pliCount");
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "probe",
            "--origin",
            &p.cluster(),
            "--stream",
            "kf",
            "--seconds",
            "4",
            "--keyframe-every",
            "1",
            "--cluster-token",
            "kf-cluster",
        ])
        .output()
        .unwrap();
    common::assert_succeeded(&out, "chorus probe");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let main = &report["sources"][0];
    assert_eq!(main["sourceId"], Value::Null, "{report}");
    assert!(main["videoPackets"].as_u64() > Some(20), "{report}");
    assert!(main["audioPackets"].as_u64() > Some(100), "{report}");
    let requests = report["keyframeRequests"].as_u64().unwrap();
    assert!(requests >= 2, "{report}");
    // Chrome counts the PLIs the origin sent it for those requests.
    let pli_after = wait_for("PLIs at the publisher", Duration::from_secs(10), || {
        let n = video_stat(&mut tool, "pliCount");
        (n >= pli_before + 2).then_some(n)
    });
    assert!(
        pli_after <= pli_before + requests + 1,
        "more PLIs than requests: {pli_after}"
    );
    tool.send("quit");
}

/// Asks the harness for stats and returns one field of the main source's outbound video.
fn video_stat(tool: &mut Tool, field: &str) -> u64 {
    tool.send("stats");
    let v = tool.expect("stats", None, Duration::from_secs(10));
    v["video"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no video.{field} in {v}"))
}
