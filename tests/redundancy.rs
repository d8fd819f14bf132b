//! RFC 2198 RED through chorus for real: the SDK publishing in headless Chromium (which offers
//! RED, so chorus's answer takes it and Chrome sends RED) and an aiortc viewer over WHEP (which
//! does not offer RED, so it gets each packet's primary block as plain Opus).
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::process::Command;
use std::time::Duration;

use common::room_tool::report;
use common::{corpus, node_harness, wait_for};

const TOKEN: &str = "test-publish-token";

#[test]
fn a_chrome_publisher_sends_red_and_a_viewer_without_red_gets_plain_decodable_opus() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let (dir, script) = node_harness("publish.mjs");
    let mut publisher = Command::new("node");
    publisher
        .current_dir(&dir)
        .arg(script)
        .args(["--endpoint", &format!("http://{}", p.http())])
        .args(["--token", TOKEN, "--stream", "r", "--sources", "ana"])
        .args(["--seconds", "20"])
        .arg("--corpus")
        .arg(corpus())
        .stdout(std::process::Stdio::null());
    let _publisher = common::Reaped(publisher.spawn().unwrap());
    // Ana talks from 5.2 s of the corpus on: 14 s of viewing hear her. The origin relays (and
    // counts) RED only while someone views, so the viewer comes first.
    let viewer = common::whep_command(
        p.http(),
        "r",
        &["--tracks", "1", "--seconds", "14", "--check"],
    )
    .spawn()
    .unwrap();
    let red = "chorus_origin_red_packets_total ";
    wait_for("the publisher's RED", Duration::from_secs(20), || {
        common::metric(p.http(), red).filter(|n| *n > 0.0)
    });
    let out = viewer.wait_with_output().unwrap();
    common::assert_succeeded(&out, "whep_view.py");
    let rep = report(&out);
    let (mut packets, mut decoded) = (0, 0);
    for (mid, t) in rep["tracks"].as_object().unwrap() {
        packets += t["packets"].as_u64().unwrap();
        decoded += t["decoded_frames"].as_u64().unwrap();
        assert_eq!(t["decode_errors"], 0, "mid {mid}: {t}");
    }
    assert!(packets > 250 && decoded + 10 >= packets, "{rep}");
    let unwrapped = common::metric(p.http(), "chorus_edge_red_packets_total{how=\"unwrapped\"}");
    // Each of its packets but the silence that ends an emptied track came as RED.
    assert!(
        unwrapped >= Some(packets as f64 * 0.9),
        "{unwrapped:?} for {packets}"
    );
    let opaque = common::metric(p.http(), "chorus_edge_red_packets_total{how=\"opaque\"}");
    assert_eq!(opaque, Some(0.0));
}
