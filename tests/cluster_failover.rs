//! The cluster surviving its parts, with real processes and a real redis-server on a free port:
//! edges with no `--origin` follow each stream's owner through the registry; viewers on both
//! edges hear an aiortc publisher, and hear it again on their existing sessions after the owner
//! is SIGKILLed and the publisher comes back through the other origin's director.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{post_json, Proc, Reaped, Redis};
use serde_json::Value;

const PUBLISH: &str = "failover-publish";
const CLUSTER: &str = "failover-link";
const API_KEY: &str = "failover-api-key";
/// The origins share their JWT keys: a JWT of any director is good at every edge.
const JWT_SECRET: &str = "failover-jwt-secret";

fn origin(redis: &Redis, id: &str) -> Proc {
    common::origin_with(
        PUBLISH,
        CLUSTER,
        &[
            "--redis",
            &redis.url(),
            "--node-id",
            id,
            "--api-key",
            API_KEY,
        ],
        &[("CHORUS_JWT_SECRET", JWT_SECRET)],
    )
}

/// An edge with no `--origin`: it finds each stream's owner in the registry.
fn edge(redis: &Redis, id: &str, extra: &[&str]) -> Proc {
    let url = redis.url();
    let mut args = vec![
        "edge",
        "--http",
        "127.0.0.1:0",
        "--media-workers",
        "1",
        "--redis",
        &url,
        "--node-id",
        id,
    ];
    args.extend_from_slice(extra);
    Proc::start("edge", &args, &[("CHORUS_CLUSTER_TOKEN", CLUSTER)])
}

fn cluster_view(p: &Proc) -> Option<Value> {
    let auth = format!("Bearer {API_KEY}");
    let (status, _, body) = common::http(
        p.http(),
        "GET",
        "/api/cluster",
        &[("Authorization", &auth)],
        b"",
    );
    (status == 200).then(|| serde_json::from_slice::<Value>(&body).unwrap()["data"].clone())
}

/// The state `/api/cluster` at `p` gives node `id`, if it lists it.
fn node_state(p: &Proc, id: &str) -> Option<String> {
    let view = cluster_view(p)?;
    view["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .and_then(|n| n["state"].as_str().map(str::to_owned))
}

fn wait_registered(p: &Proc, ids: &[&str]) {
    common::wait_for("every node registered", Duration::from_secs(10), || {
        ids.iter()
            .all(|id| node_state(p, id).is_some())
            .then_some(())
    });
}

/// A director's publish answer at `p`: the owner's signalling URL, or (status, message).
fn director_publish(p: &Proc, stream: &str) -> Result<String, (u16, String)> {
    let body = format!(r#"{{"streamName":"{stream}","streamType":"WebRtc"}}"#);
    let (status, v) = post_json(p.http(), "/api/director/publish", Some(PUBLISH), &body);
    if status == 200 {
        Ok(v["data"]["urls"][0].as_str().unwrap().to_owned())
    } else {
        Err((status, v.to_string()))
    }
}

/// The origin of `origins` whose signalling URL `url` is.
fn owner_of<'a>(origins: &[&'a Proc], url: &str) -> &'a Proc {
    origins
        .iter()
        .find(|o| url == format!("ws://{}/ws", o.http()))
        .unwrap_or_else(|| panic!("{url} is no origin's"))
}

/// An aiortc WHIP publisher of speaker ana at `p`.
fn publish(p: &Proc, stream: &str, seconds: u32) -> Reaped {
    Reaped(
        common::whip_command(p.http(), stream, "ana", PUBLISH, seconds)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// An aiortc WHEP viewer at an edge, pinning ana into its main track, checking continuity.
fn view(edge: &Proc, stream: &str, seconds: u32) -> std::process::Child {
    common::whep_command(
        edge.http(),
        stream,
        &[
            "--tracks",
            "1",
            "--pinned",
            "ana",
            "--seconds",
            &seconds.to_string(),
            "--check",
        ],
    )
    .spawn()
    .unwrap()
}

/// The `report` line of a viewer's output.
fn report(out: &std::process::Output) -> Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "report")
        .unwrap_or_else(|| panic!("no report: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn viewers_on_both_edges_hear_the_owner_and_hear_it_again_after_it_is_killed() {
    let _serial = common::serial();
    let redis = Redis::start();
    let o1 = origin(&redis, "o1");
    let o2 = origin(&redis, "o2");
    wait_registered(&o1, &["o1", "o2"]);
    let e1 = edge(&redis, "e1", &[]);
    let e2 = edge(&redis, "e2", &[]);
    wait_registered(&o1, &["e1", "e2"]);

    let url = director_publish(&o2, "panel").expect("a director names an owner");
    let owner = owner_of(&[&o1, &o2], &url);
    let (survivor, owner_id) = if std::ptr::eq(owner, &o1) {
        (&o2, "o1")
    } else {
        (&o1, "o2")
    };
    let first = publish(owner, "panel", 40);
    // Viewers on both edges, for long enough to span the kill and the republish.
    let viewers = [view(&e1, "panel", 34), view(&e2, "panel", 34)];
    let connected = Instant::now();
    std::thread::sleep(Duration::from_secs(8));

    // The owner dies: its publisher's session is gone with it.
    common::signal(owner, "KILL");
    let killed = Instant::now();
    drop(first);
    // The publisher reconnects through the other origin's director, as the SDK would.
    let url = common::wait_for(
        "the survivor's director names itself",
        Duration::from_secs(15),
        || match director_publish(survivor, "panel") {
            Ok(u) if u == format!("ws://{}/ws", survivor.http()) => Some(u),
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        },
    );
    let landed = killed.elapsed();
    eprintln!(
        "owner {owner_id} killed; the publisher landed on the other origin ({url}) after {} ms",
        landed.as_millis()
    );
    assert!(landed <= Duration::from_secs(10), "{landed:?}");
    let republished = connected.elapsed();
    let _second = publish(survivor, "panel", 30);

    for (i, v) in viewers.into_iter().enumerate() {
        let out = v.wait_with_output().unwrap();
        common::assert_succeeded(&out, "whep_view.py");
        let rep = report(&out);
        let main = &rep["tracks"]["0"];
        let packets = main["packets"].as_u64().unwrap();
        let last = main["last_arrival_s"].as_f64().unwrap();
        let gap = main["max_arrival_gap_ms"].as_f64().unwrap();
        eprintln!(
            "viewer on edge e{}: {packets} packets, the longest gap {gap:.0} ms (at {} s), last at {last:.1} s; republished at {:.1} s",
            i + 1,
            main["max_arrival_gap_at_s"],
            republished.as_secs_f64()
        );
        // Heard before the kill (8 s) and again after the republish, on one session: at
        // least 5 s of audio after it.
        assert!(
            last > republished.as_secs_f64() + 5.0,
            "edge e{}: nothing after the republish: {main}",
            i + 1
        );
        assert!(packets > 600, "edge e{}: {main}", i + 1);
        assert_eq!(main["ssrcs"].as_array().unwrap().len(), 1, "{main}");
        assert_eq!(main["seq_gaps"], 0, "numbering continuous: {main}");
    }
}
