//! Redundant ingest with the official SDK in headless Chromium: two publishers of one sourceId
//! (a member on two devices) do not replace each other in a loop; the one of higher
//! `priority` plays, the other stands by, and takes over at once when the playing one leaves,
//! without the viewers seeing a change of track or source.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::time::{Duration, Instant};

use common::{get_json, room_tool, Proc};
use serde_json::{json, Value};

const TOKEN: &str = "test-publish-token";
/// How long both feeds stay up before the playing one leaves: the flip-flop this replaces
/// cycled every ~1.5 s, so 30 s shows it is gone.
const STABLE: Duration = Duration::from_secs(30);

/// (playing publisherId, standby publisherIds) of source `m`, from the origin's view.
fn feeds(p: &Proc) -> Option<(String, Vec<String>)> {
    let (status, v) = get_json(p.http(), "/api/streams/dup");
    if status != 200 {
        return None;
    }
    let s = v["sources"]
        .as_array()?
        .iter()
        .find(|s| s["sourceId"] == "m")?;
    let standby = s["standby"]
        .as_array()?
        .iter()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect();
    Some((s["publisherId"].as_str()?.to_owned(), standby))
}

#[test]
fn two_sdk_publishers_of_one_source_stand_by_and_take_over_within_a_second() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    // "main" publishes with priority 10; "backup", later and newer, with none (0): main
    // keeps playing. Both play the host's voice as sourceId m, in step (two devices of one
    // member hearing the same room).
    let spec = json!([
        {"name": "main", "publish": "host", "sourceId": "m", "priority": 10},
        {"name": "backup", "publish": "host", "sourceId": "m", "publishLater": true, "inSync": true},
        {"name": "listener", "view": {"tracks": 2}},
    ]);
    let seconds = STABLE.as_secs() + 20;
    let mut tool = room_tool::Live::start(p.http(), "dup", TOKEN, seconds, &spec);
    let published =
        |name: &'static str| move |v: &Value| v["event"] == "published" && v["name"] == name;
    let main = tool.next(Duration::from_secs(60), "main published", published("main"));
    let corpus_start = tool.next(Duration::from_secs(60), "corpus start", |v| {
        v["event"] == "corpus-start"
    })["startedWall"]
        .as_f64()
        .unwrap();
    tool.send("publish backup");
    let backup = tool.next(
        Duration::from_secs(30),
        "backup published",
        published("backup"),
    );
    let (main_id, backup_id) = (
        main["publisherId"].as_str().unwrap().to_owned(),
        backup["publisherId"].as_str().unwrap().to_owned(),
    );

    // Both stay up for STABLE: main plays all along, backup stands by, nobody reconnects.
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < STABLE {
        let (playing, standby) = feeds(&p).expect("source m at the origin");
        assert_eq!(
            (playing.as_str(), standby.as_slice()),
            (main_id.as_str(), [backup_id.clone()].as_slice()),
            "after {:?}",
            start.elapsed()
        );
        samples += 1;
        tool.drain();
        std::thread::sleep(Duration::from_millis(500));
    }
    let flips: Vec<&Value> = tool
        .seen
        .iter()
        .filter(|v| {
            (v["event"] == "pc-state"
                && v["role"] == "publish"
                && v["state"] != "connecting"
                && v["state"] != "connected")
                || v["event"] == "error"
        })
        .collect();
    let publishes = tool
        .seen
        .iter()
        .filter(|v| v["event"] == "published")
        .count();
    assert!(
        flips.is_empty() && publishes == 2,
        "{flips:?} ({publishes} publishes)"
    );
    eprintln!("{samples} samples over {STABLE:?}: main played, backup stood by, 2 publishes");

    // main leaves abruptly (its page closes), 3 s into the host's first turn of the second
    // loop (it talks 0-6 s): backup plays within 1 s, and the viewer's track does not notice.
    let leave_wall = corpus_start + 33_000.0;
    let wait = leave_wall - common::unix_ms();
    assert!(wait > 0.0, "the stable phase overran: {wait} ms");
    std::thread::sleep(Duration::from_millis(wait as u64));
    let left_at = Instant::now();
    let left_wall = common::unix_ms();
    tool.send("leave main");
    let takeover = loop {
        if let Some((playing, standby)) = feeds(&p) {
            if playing == backup_id {
                assert!(standby.is_empty(), "{standby:?}");
                break left_at.elapsed();
            }
        }
        assert!(
            left_at.elapsed() < Duration::from_secs(5),
            "backup never took over"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "takeover {} ms after the leave command",
        takeover.as_millis()
    );
    assert!(takeover < Duration::from_secs(1), "{takeover:?}");

    let rep = tool.next(Duration::from_secs(seconds + 30), "report", |v| {
        v["event"] == "report"
    });
    drop(tool);
    let v = &rep["participants"]["listener"]["view"];
    let events = v["events"].as_array().unwrap();
    // vad follows the host's turns in one track (m while it talks, empty in its pauses), and
    // the takeover adds no change of its own: none from 0.5 s before the leave to 2 s after,
    // and m never inactive.
    let vad: Vec<&Value> = events.iter().filter(|e| e["name"] == "vad").collect();
    let first = vad.first().expect("m announced");
    let mid = first["data"]["mediaId"].as_str().unwrap();
    for e in &vad {
        assert!(
            e["data"]["mediaId"] == mid
                && (e["data"]["sourceId"] == "m" || e["data"]["sourceId"].is_null()),
            "{e}"
        );
    }
    let around: Vec<f64> = vad
        .iter()
        .map(|e| e["t"].as_f64().unwrap() - left_wall)
        .filter(|dt| (-500.0..2000.0).contains(dt))
        .collect();
    assert!(
        around.is_empty(),
        "vad changed around the takeover (ms from the leave): {around:?}"
    );
    assert!(
        !events.iter().any(|e| e["name"] == "inactive"),
        "{events:?}"
    );
    // The track goes on sounding with the backup's voice (the host talks 0-6 s, 14-17 s and
    // 25-29.5 s of every 30 s, so in any 10 s).
    let energy = common::room_tool::energy(v, mid);
    let loud = common::room_tool::loudest(&energy, left_wall + 1000.0, left_wall + 11_000.0);
    assert!(loud > 0.02, "track {mid} silent after the takeover: {loud}");
}
