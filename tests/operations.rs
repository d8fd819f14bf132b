//! Running chorus like a service: what an operator's log shipper gets.
//! Needs scripts/setup-test-deps.sh (aiortc; scripts/test.sh runs it).

mod common;

use std::fs::File;
use std::process::Stdio;

use common::{tempdir, Proc};
use serde_json::Value;

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
        std::time::Duration::from_secs(20),
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
