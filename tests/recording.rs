//! Recording that replays: a live SDK session published with `record: true` is written under
//! `--data-dir/recordings/`, and `chorus replay` of it switches tracks when the live edge did.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it) for the browser test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{post_json, wait_for};
use serde_json::{json, Value};

const TOKEN: &str = "test-publish-token";

/// How far apart a live `vad` switch and the replayed switch of the same source may be, ms.
/// Measured on this 2-core machine: see the README's "### Recording".
const TOLERANCE_MS: f64 = 120.0;

/// A WHIP publish with a bogus offer: (status, body).
fn whip(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, String) {
    let auth = format!("Bearer {token}");
    let (status, _, body) = common::http(
        addr,
        "POST",
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/sdp"),
        ],
        b"v=0\r\n",
    );
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn recording_is_refused_without_a_data_dir_or_a_token_that_allows_it() {
    let _serial = common::serial();
    // Dev mode allows recording, but there is nowhere to write it.
    let p = common::serve(TOKEN);
    let (s, body) = whip(p.http(), "/whip/r?record=true", TOKEN);
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("--data-dir"), "{body}");
    // Dev mode's JWT allows recording (the SDK checks it) but does not record by default.
    let req = r#"{"streamName":"r","streamType":"WebRtc"}"#;
    let (_, v) = post_json(p.http(), "/api/director/publish", Some(TOKEN), req);
    let claims = common::jwt_payload(v["data"]["jwt"].as_str().unwrap());
    assert_eq!(claims["millicast"]["record"], true, "{claims}");
    assert_eq!(claims["millicast"].get("recordByDefault"), None, "{claims}");
    drop(p);

    // A token file: one token records, one does not.
    let dir = common::tempdir("rec-tokens");
    let file = dir.join("tokens.json");
    let make = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["token", "create", "--stream", "r", "--kind", "publish"])
            .args(extra)
            .arg("--tokens")
            .arg(&file)
            .output()
            .unwrap();
        common::assert_succeeded(&out, "chorus token create");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let plain = make(&[]);
    let recording = make(&["--record"]);
    let data = dir.join("data");
    let p = common::serve_token_file(&file, &["--data-dir", data.to_str().unwrap()]);
    let (s, body) = whip(p.http(), "/whip/r?record=true", &plain);
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("does not allow recording"), "{body}");
    let (_, v) = post_json(p.http(), "/api/director/publish", Some(&recording), req);
    let claims = common::jwt_payload(v["data"]["jwt"].as_str().unwrap());
    assert_eq!(claims["millicast"]["record"], true, "{claims}");
    assert_eq!(claims["millicast"]["recordByDefault"], true, "{claims}");
    let (_, v) = post_json(p.http(), "/api/director/publish", Some(&plain), req);
    let claims = common::jwt_payload(v["data"]["jwt"].as_str().unwrap());
    assert_eq!(claims["millicast"]["record"], false, "{claims}");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A source entering (Some) or leaving (None... of `source`) a track at `t` ms.
#[derive(Debug, Clone, PartialEq)]
struct Switch {
    t: f64,
    source: String,
    enters: bool,
}

/// Entries and exits per source from (t, track, source-or-empty) changes in time order.
fn switches(changes: &[(f64, String, Option<String>)]) -> Vec<Switch> {
    let mut holder: std::collections::HashMap<String, String> = Default::default();
    let mut out = Vec::new();
    for (t, track, source) in changes {
        if let Some(old) = holder.remove(track) {
            out.push(Switch {
                t: *t,
                source: old,
                enters: false,
            });
        }
        if let Some(s) = source {
            holder.insert(track.clone(), s.clone());
            out.push(Switch {
                t: *t,
                source: s.clone(),
                enters: true,
            });
        }
    }
    out
}

/// For each of `a`, the distance (ms) to the nearest switch of `b` of the same source and kind.
fn distances(a: &[Switch], b: &[Switch]) -> Vec<(f64, Switch)> {
    a.iter()
        .map(|x| {
            let d = b
                .iter()
                .filter(|y| y.source == x.source && y.enters == x.enters)
                .map(|y| (x.t - y.t).abs())
                .fold(f64::INFINITY, f64::min);
            (d, x.clone())
        })
        .collect()
}

/// The one recording of `stream` under `data`, once its scenario says it ended.
fn finished_recording(data: &Path, stream: &str) -> (PathBuf, Value) {
    wait_for("the recording to finish", Duration::from_secs(10), || {
        let dirs: Vec<PathBuf> = std::fs::read_dir(data.join("recordings").join(stream))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let [dir] = dirs.as_slice() else { return None };
        let text = std::fs::read_to_string(dir.join("scenario.json")).ok()?;
        let sc: Value = serde_json::from_str(&text).ok()?;
        (!sc["duration_s"].is_null()).then(|| (dir.clone(), sc))
    })
}

fn replay(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    common::assert_succeeded(&out, "chorus replay");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_recorded_sdk_session_replays_with_the_live_switches() {
    let _serial = common::serial();
    let data = common::tempdir("rec-live");
    let _ = std::fs::remove_dir_all(data.join("recordings"));
    let p = common::serve_with(TOKEN, &["--data-dir", data.to_str().unwrap()]);
    // Three panelists recorded, one listener with two tracks: ana (5.2-11 s), chen and bo
    // (10.6-15 s) overlap, so tracks switch.
    let mut spec: Vec<Value> = ["ana", "bo", "chen"]
        .iter()
        .map(|s| json!({"name": format!("p-{s}"), "publish": s, "record": true}))
        .collect();
    spec.push(json!({"name": "listener", "view": {"tracks": 2}}));
    let out = common::room_tool::command(p.http(), "rec", TOKEN, 16, &Value::from(spec))
        .arg("--no-loop")
        .output()
        .unwrap();
    common::assert_succeeded(&out, "room.mjs");
    let rep = common::room_tool::report(&out);
    let (rec_dir, sc) = finished_recording(&data, "rec");
    let ids: Vec<&str> = sc["speakers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ana", "bo", "chen"], "{sc}");
    let started = sc["started_unix_ms"].as_f64().unwrap();
    let duration_ms = sc["duration_s"].as_f64().unwrap() * 1000.0;
    for s in sc["speakers"].as_array().unwrap() {
        // Every file runs the whole recording, one frame per 20 ms.
        let frames = s["frames"].as_f64().unwrap();
        assert!(
            (frames * 20.0 - duration_ms).abs() <= 40.0,
            "{s} vs {duration_ms} ms"
        );
        let (a, b) = (&s["published"][0][0], &s["published"][0][1]);
        assert!(a.as_f64().unwrap() < 15.0 && b.as_f64().is_some(), "{s}");
    }

    // The live switches, in ms from the recording's start.
    let events = rep["participants"]["listener"]["view"]["events"]
        .as_array()
        .unwrap();
    let live: Vec<(f64, String, Option<String>)> = events
        .iter()
        .filter(|e| e["name"] == "vad")
        .map(|e| {
            (
                e["t"].as_f64().unwrap() - started,
                e["data"]["mediaId"].to_string(),
                e["data"]["sourceId"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let replayed: Vec<(f64, String, Option<String>)> =
        replay(&["--corpus", rec_dir.to_str().unwrap(), "--tracks", "2"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("t_ms").is_some())
            .map(|v| {
                (
                    v["t_ms"].as_f64().unwrap(),
                    v["track"].to_string(),
                    v["source"].as_str().map(str::to_owned),
                )
            })
            .collect();
    // The publishers stop at the end: switches in the last second are the session ending, not
    // checked (but a counterpart may be there, just past the horizon).
    let horizon = duration_ms - 1000.0;
    let (live_all, replayed_all) = (switches(&live), switches(&replayed));
    let keep =
        |v: &[Switch]| -> Vec<Switch> { v.iter().filter(|s| s.t < horizon).cloned().collect() };
    let (live, replayed) = (keep(&live_all), keep(&replayed_all));
    assert!(
        live.iter().filter(|s| s.enters).count() >= 3,
        "too few live switches to compare: {live:?}"
    );
    let there = distances(&live, &replayed_all);
    let back = distances(&replayed, &live_all);
    let worst = there.iter().chain(&back).map(|x| x.0).fold(0.0, f64::max);
    eprintln!(
        "recording: {} live switches, {} replayed, worst distance {worst:.0} ms; live→replay {:?}",
        live.len(),
        replayed.len(),
        there.iter().map(|x| x.0.round()).collect::<Vec<_>>()
    );
    for (d, s) in there.iter().chain(&back) {
        assert!(
            *d <= TOLERANCE_MS,
            "{s:?} has no counterpart within {TOLERANCE_MS} ms (nearest {d} ms)\nlive {live:?}\nreplayed {replayed:?}"
        );
    }

    // --explain half a second into a live entry names that source talking, in a track.
    let entry = live.iter().find(|s| s.enters).unwrap();
    let at = format!("{}ms", (entry.t + 500.0).round());
    let text = replay(&[
        "--corpus",
        rec_dir.to_str().unwrap(),
        "--tracks",
        "2",
        "--explain",
        &at,
    ]);
    let row: Vec<&str> = text
        .lines()
        .map(str::split_whitespace)
        .map(Iterator::collect::<Vec<&str>>)
        .find(|cols| cols.get(1) == Some(&entry.source.as_str()))
        .unwrap_or_else(|| panic!("no row of {}: {text}", entry.source));
    assert_ne!(row[0], "-", "ranked: {text}");
    assert_eq!(row[2], "talking", "{text}");
    assert_ne!(row[6], "-", "in a track: {text}");
    drop(p);
    let _ = std::fs::remove_dir_all(&data);
}
