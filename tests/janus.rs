//! `scripts/loadtest.sh --peer janus` on a small ramp: after chorus's ramp, the same viewers
//! watch a Janus streaming mountpoint that Janus runs from the configuration the script writes.
//! Every viewer connects and gets every stream of the mountpoint with little loss and latency,
//! and the report puts Janus beside chorus. Janus comes from Debian's package, which
//! scripts/setup-test-deps.sh installs: without it this test fails and says so.

mod common;

use std::process::Command;

use serde_json::Value;

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn janus_side_by_side_on_a_small_ramp() {
    // `janus --version` exits 1 after printing it: --help is the probe that succeeds.
    let installed = Command::new("janus")
        .arg("--help")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        installed,
        "janus is not installed: scripts/setup-test-deps.sh installs Debian's janus, which this \
         test runs"
    );
    let _g = common::serial();
    let out = common::tempdir("janus-loadtest");
    let (viewers, tracks) = (20u64, 3u64);
    common::loadtest(
        &[
            "--peer",
            "janus",
            "--start",
            "20",
            "--max-viewers",
            "20",
            "--step-secs",
            "4",
            "--duration",
            "30",
            "--tracks",
            "3",
        ],
        &out,
    );

    let lines = json_lines(&out.join("janus-steps.jsonl"));
    let steps: Vec<&Value> = lines.iter().filter(|v| v.get("step").is_some()).collect();
    assert_eq!(steps.len(), 1, "one step of 20 viewers: {lines:?}");
    let s = steps[0];
    assert_eq!(s["connected"], viewers, "every viewer connected: {s}");
    assert_eq!(s["join_failures"], 0, "{s}");
    // Every viewer got RTP on every stream of the mountpoint (one SSRC each).
    assert_eq!(s["viewer_ssrcs"], viewers * tracks, "{s}");
    // Janus forwards every fed packet to every viewer: what the viewers counted is what the
    // feeds sent in the window, 20 times over (the window's edges shift it a little).
    let fed = s["published"].as_f64().unwrap();
    let received = s["received"].as_f64().unwrap();
    assert!(fed > 100.0, "the feeds sent: {s}");
    let want = fed * viewers as f64;
    assert!(
        received > 0.9 * want && received < 1.1 * want,
        "received {received}, the feeds sent {fed} to {viewers} viewers: {s}"
    );
    let loss = s["loss_pct"].as_f64().expect("loss measured");
    assert!(loss < 0.5, "loss {loss} %: {s}");
    let p99 = s["lat_p99_ms"].as_f64().expect("latency measured");
    assert!(p99 > 0.0 && p99 < 200.0, "latency p99 {p99} ms: {s}");
    assert!(s["lat_samples"].as_u64().unwrap() > 100, "{s}");
    // The sampled viewers opened Janus's SRTP themselves, every packet of it.
    assert_eq!(s["opened"], s["decrypted"], "{s}");
    assert_eq!(s["open_failed"], 0, "{s}");
    // Janus's own CPU and memory, from /proc.
    assert!(s["edge_cpu_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["edge_rss_kib"].as_u64().unwrap() > 1000, "{s}");
    let profiles = s["srtp_profiles"].as_object().expect("SRTP profiles");
    let counted: u64 = profiles.values().filter_map(Value::as_u64).sum();
    assert_eq!(counted, viewers, "one profile per viewer: {s}");
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["target"], "janus", "{summary}");

    // chorus ran the same step first.
    let chorus: Vec<Value> = json_lines(&out.join("steps.jsonl"))
        .into_iter()
        .filter(|v| v.get("step").is_some())
        .collect();
    assert_eq!(chorus.len(), 1);
    assert_eq!(chorus[0]["connected"], viewers, "{}", chorus[0]);

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let side = report
        .split("## Janus, the same ramp on the same core")
        .nth(1)
        .unwrap_or_else(|| panic!("no Janus section: {report}"));
    assert!(side.contains("chorus / Janus per pkt"), "{side}");
    assert!(side.contains("| 20 | 20 |"), "a row for the step: {side}");
    assert!(side.contains("SRTP negotiated: chorus "), "{side}");
    let cfg = std::fs::read_to_string(out.join("janus-config/janus.jcfg")).unwrap();
    assert!(cfg.contains("ice_enforce_list"), "{cfg}");
    let png = std::fs::read(out.join("report.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG plot");
}
