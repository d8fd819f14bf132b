//! `chorus loadgen` against a real `chorus serve`: every viewer joins, gets what the corpus
//! says it should, with little loss and latency; `loadgen floor` reports sane figures; and a
//! refused or unreachable director is a clear error, not a panic.

mod common;

use std::process::{Command, Output, Stdio};

use chorus::replay::{corpus as corpus_files, truth};
use common::{corpus, Proc};
use serde_json::Value;

const TOKEN: &str = "loadgen-test-token";

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("loadgen")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("chorus loadgen runs")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Frames of `[from_ms, to_ms)` (corpus time since the publishers' start, looping) in which
/// the speaker is inside one of its turns.
fn talk_frames(levels: &[u8], from_ms: u64, to_ms: u64) -> u64 {
    let turns = truth::turns(levels);
    let n = levels.len() as u64;
    (from_ms / 20..to_ms / 20)
        .filter(|f| {
            let k = (f % n) as usize;
            turns
                .iter()
                .any(|t| (t.first_frame..=t.last_frame).contains(&k))
        })
        .count() as u64
}

#[test]
fn ramp_against_serve_measures_what_viewers_get() {
    let _serial = common::serial();
    let server = common::serve(TOKEN);
    let url = format!("http://{}", server.http());
    let pid = server.child.id().to_string();
    let sources = ["host", "ana"];
    let (viewers, tracks, sample_every) = (20usize, 3usize, 5usize);
    let out = loadgen(&[
        "--url",
        &url,
        "--publish-token",
        TOKEN,
        "--stream",
        "lgtest",
        "--corpus",
        corpus().to_str().unwrap(),
        "--sources",
        &sources.join(","),
        "--tracks",
        &tracks.to_string(),
        "--start",
        &viewers.to_string(),
        "--max-viewers",
        &viewers.to_string(),
        "--step-secs",
        "8",
        "--duration",
        "20",
        "--sample-every",
        &sample_every.to_string(),
        "--edge-pid",
        &pid,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {stderr}");
    let lines = json_lines(&out);
    assert_eq!(
        lines.len(),
        2,
        "one step and a summary: {lines:?}\n{stderr}"
    );
    let step = &lines[0];
    let summary = &lines[1]["summary"];
    eprintln!("step: {step}\nsummary: {summary}");

    assert_eq!(step["viewers"], viewers);
    assert_eq!(step["connected"], viewers, "{step}");
    assert_eq!(step["joins"], viewers);
    assert_eq!(step["join_failures"], 0, "{step}");
    assert!(
        step.get("partial").is_none(),
        "the step ran to its end: {step}"
    );

    // What each viewer may hear: the sources it does not exclude (round robin over sources,
    // sampled viewers rotating among themselves), at most `tracks` at once, 50 packets/s each
    // while the source talks. Ground truth: the corpus's turns over the measured window.
    let speakers = corpus_files::load(&corpus()).unwrap();
    let levels: Vec<&[u8]> = sources
        .iter()
        .map(|s| {
            speakers
                .iter()
                .find(|sp| sp.id == *s)
                .and_then(|sp| sp.levels.as_deref())
                .unwrap()
        })
        .collect();
    let (from, to) = (
        step["corpus_ms"][0].as_u64().unwrap(),
        step["corpus_ms"][1].as_u64().unwrap(),
    );
    let secs = step["secs"].as_f64().unwrap();
    let mut talk = 0u64;
    let mut most = 0f64;
    for i in 0..viewers {
        let excluded = if i % sample_every == 0 {
            (i / sample_every) % sources.len()
        } else {
            i % sources.len()
        };
        let heard: Vec<usize> = (0..sources.len()).filter(|&s| s != excluded).collect();
        talk += heard
            .iter()
            .map(|&s| talk_frames(levels[s], from, to))
            .sum::<u64>();
        most += heard.len().min(tracks) as f64 * 50.0 * secs;
    }
    let received = step["received"].as_u64().unwrap() as f64;
    assert!(talk > 0, "the window [{from}, {to}) ms holds no talk");
    // A track carries a source from its onset (tens of ms after the turn starts) until the
    // hangover ends (after the turn): at least most of the talk, at most 50 packets/s per slot.
    assert!(
        received >= 0.7 * talk as f64,
        "received {received} packets, the corpus talks {talk} frames in the window: {step}"
    );
    assert!(
        received <= 1.05 * most + 50.0,
        "received {received} packets, more than {most} possible: {step}"
    );

    let loss = step["loss_pct"].as_f64().expect("loss measured");
    assert!(loss < 1.0, "loss {loss} %: {step}");
    let p99 = step["lat_p99_ms"].as_f64().expect("latency p99 measured");
    assert!(p99 > 0.0 && p99 < 200.0, "latency p99 {p99} ms: {step}");
    assert!(step["lat_samples"].as_u64().unwrap() > 50, "{step}");
    assert!(
        summary["switch_samples"].as_u64().unwrap() >= 1,
        "no switch latency measured: {summary}"
    );
    let sw = summary["switch_p50_ms"].as_f64().unwrap();
    assert!(sw > 0.0 && sw < 1000.0, "switch latency {sw} ms");
    // The packets a pre-roll replays at a switch are told apart: late by design (up to its
    // 120 ms), and not in the added latency.
    let pre = summary["preroll_lat_samples"].as_u64().unwrap_or(0);
    let (pre_p50, lat_p50) = (
        summary["preroll_lat_p50_ms"].as_f64().unwrap_or(0.0),
        summary["lat_p50_ms"].as_f64().unwrap(),
    );
    assert!(pre >= 1 && pre_p50 > lat_p50, "pre-roll: {summary}");
    assert!(
        summary["preroll_lat_max_ms"].as_f64().unwrap() < 400.0,
        "{summary}"
    );
    assert!(
        step["edge_cpu_s"].as_f64().unwrap() > 0.0,
        "edge CPU not measured: {step}"
    );
    assert!(step["edge_rss_kib"].as_u64().unwrap() > 1000, "{step}");
    // The sampled viewers opened their SRTP on the generator's own path, every packet of it,
    // and the generator measured itself.
    assert_eq!(step["opened"], step["decrypted"], "{step}");
    assert_eq!(step["open_failed"], 0, "{step}");
    assert!(step["loadgen_cpu_pct"].as_f64().unwrap() > 0.0, "{step}");
    assert!(
        step["loadgen_viewers_ns_per_pkt"].as_f64().is_some(),
        "{step}"
    );
    assert!(step["pkts_per_recvmmsg"].as_f64().unwrap() > 0.0, "{step}");
    // Exclusion holds: no viewer ever got its own source.
    assert_eq!(step["excluded_received"], 0, "{step}");
    assert_eq!(summary["excluded_received"], 0, "{summary}");
    assert_eq!(summary["stopped_by"], "done");
    assert!(summary["secs"].as_f64().unwrap() < 20.0);
}

#[test]
fn floor_reports_sane_figures() {
    let out = loadgen(&[
        "floor",
        "--packets",
        "20000",
        "--viewers",
        "50",
        "--batch",
        "16",
    ]);
    common::assert_succeeded(&out, "chorus loadgen floor");
    let lines = json_lines(&out);
    let v = &lines[0];
    assert_eq!(v["packets"], 20000, "{v}");
    assert_eq!(v["viewers"], 50);
    assert_eq!(v["batch"], 16);
    assert_eq!(v["packet_bytes"], 128);
    for k in ["encrypt_ns_per_pkt", "send_ns_per_pkt", "both_ns_per_pkt"] {
        let ns = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!(ns > 0.0 && ns < 1e6, "{k} = {ns}: {v}");
    }
    assert!(v["secs"].as_f64().unwrap() > 0.0);
    // Loopback drops nothing at this size: what was sent arrived.
    assert!(v["received"].as_u64().unwrap() > 0, "{v}");
}

/// The run failed with a message containing `needle`, and without a panic.
fn assert_fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn refusals_and_unreachable_directors_are_clear_errors() {
    let _serial = common::serial();
    let corpus = corpus();
    let corpus = corpus.to_str().unwrap();
    // Nobody listens on port 9 of loopback.
    let out = loadgen(&["--url", "http://127.0.0.1:9", "--corpus", corpus]);
    assert_fails_with(&out, "cannot reach the director at 127.0.0.1:9");

    let server: Proc = common::serve(TOKEN);
    let url = format!("http://{}", server.http());
    let out = loadgen(&["--url", &url, "--publish-token", "nope", "--corpus", corpus]);
    assert_fails_with(&out, "director refused publish (HTTP 401)");

    let out = loadgen(&["--url", &url, "--corpus", "/nonexistent/corpus"]);
    assert_fails_with(&out, "corpus: /nonexistent/corpus");
    let out = loadgen(&["--url", &url, "--corpus", corpus, "--sources", "zed"]);
    assert_fails_with(&out, "no speaker \"zed\"");
    let out = loadgen(&["--url", &url, "--duration=-1"]);
    assert_fails_with(&out, "--duration must be a positive number");
}

/// `scripts/loadtest.sh`, the command users size deployments with, end to end on a small ramp
/// with this build: origin, pinned edge, loadgen steps, floor, report table and plot.
#[test]
fn loadtest_script_writes_its_report() {
    let _g = common::serial();
    let out = common::tempdir("loadtest");
    common::loadtest(
        &[
            "--start",
            "6",
            "--step",
            "6",
            "--max-viewers",
            "12",
            "--step-secs",
            "3",
            "--duration",
            "60",
        ],
        &out,
    );
    let steps: Vec<Value> = std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("step").is_some())
        .collect();
    assert_eq!(steps.len(), 2, "two steps: 6 then 12 viewers");
    for s in &steps {
        assert_eq!(s["connected"], s["viewers"], "every viewer connected: {s}");
        assert!(
            s["received"].as_u64().unwrap() > 0,
            "packets forwarded: {s}"
        );
        assert!(
            s["edge_cpu_s"].as_f64().unwrap() > 0.0,
            "edge CPU sampled: {s}"
        );
        // The script passes the origin's pid: its CPU and the shared core's headroom.
        assert!(s["origin_cpu_pct"].as_f64().is_some(), "origin CPU: {s}");
        assert!(s["gen_core_headroom_pct"].as_f64().is_some(), "{s}");
    }
    let floor: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("floor.json")).unwrap()).unwrap();
    assert!(floor["packets"].as_u64().unwrap() >= 100_000);
    assert!(floor["both_ns_per_pkt"].as_f64().unwrap() > 0.0);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| 6 | 6 |") && report.contains("| 12 | 12 |"),
        "{report}"
    );
    assert!(
        report.contains("x the floor") || report.contains("No step"),
        "{report}"
    );
    assert!(report.contains("gen core headroom %"), "{report}");
    let png = std::fs::read(out.join("report.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG plot");
}
