//! The cluster through Redis, with real processes and a real redis-server on a free port: two
//! origins and two edges share one registry; the directors agree on a stream's owner, spread
//! viewers within the edges' capacity, and forget a killed edge.

mod common;

use std::time::{Duration, Instant};

use common::{post_json, Proc, Redis};
use serde_json::Value;

const PUBLISH: &str = "cluster-publish";
const CLUSTER: &str = "cluster-link";
const API_KEY: &str = "cluster-api-key";
/// Both origins derive the same JWT keys: a publish JWT from any director works at the owner.
const JWT_SECRET: &str = "cluster-jwt-secret";

fn origin(redis: &Redis, id: &str) -> Proc {
    common::cluster_origin(PUBLISH, CLUSTER, API_KEY, JWT_SECRET, &redis.url(), id, &[])
}

fn edge(redis: &Redis, origin: &Proc, id: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "edge",
        "--http",
        "127.0.0.1:0",
        "--media-workers",
        "1",
        "--origin",
    ];
    let link = origin.cluster();
    args.push(&link);
    args.extend_from_slice(&[
        "--origin-fingerprint",
        origin.info["fingerprint"].as_str().unwrap(),
    ]);
    let url = redis.url();
    args.extend_from_slice(&["--redis", &url, "--node-id", id]);
    args.extend_from_slice(extra);
    Proc::start("edge", &args, &[("CHORUS_CLUSTER_TOKEN", CLUSTER)])
}

/// `GET /api/cluster` at `p` with the API key: its data.
fn cluster_view(p: &Proc) -> Value {
    try_cluster_view(p).unwrap_or_else(|(status, body)| panic!("/api/cluster: {status} {body}"))
}

/// `GET /api/cluster` at `p`: its data, or (status, body).
fn try_cluster_view(p: &Proc) -> Result<Value, (u16, String)> {
    let auth = format!("Bearer {API_KEY}");
    let (status, _, body) = common::http(
        p.http(),
        "GET",
        "/api/cluster",
        &[("Authorization", &auth)],
        b"",
    );
    if status != 200 {
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    Ok(serde_json::from_slice::<Value>(&body).unwrap()["data"].clone())
}

fn node_ids(view: &Value) -> Vec<String> {
    view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `p`'s registry lists every one of `ids`.
fn wait_registered(p: &Proc, ids: &[&str]) {
    common::wait_for("every node registered", Duration::from_secs(10), || {
        // A registry that just came back may refuse a call or two.
        let seen = node_ids(&try_cluster_view(p).ok()?);
        ids.iter()
            .all(|id| seen.iter().any(|s| s == id))
            .then_some(())
    });
}

/// The signalling URL a director answers a subscribe with, or (status, message).
fn subscribe(p: &Proc, stream: &str) -> Result<String, (u16, String)> {
    let body = format!(r#"{{"streamName":"{stream}","streamAccountId":"chorus"}}"#);
    let (status, v) = post_json(p.http(), "/api/director/subscribe", None, &body);
    if status == 200 {
        Ok(v["data"]["urls"][0].as_str().unwrap().to_owned())
    } else {
        Err((
            status,
            v["data"]["message"].as_str().unwrap_or("").to_owned(),
        ))
    }
}

/// A director's publish answer at `p`.
fn director_publish(p: &Proc, stream: &str) -> Value {
    let body = format!(r#"{{"streamName":"{stream}","streamType":"WebRtc"}}"#);
    let (status, v) = post_json(p.http(), "/api/director/publish", Some(PUBLISH), &body);
    assert_eq!(status, 200, "publish at {}: {v}", p.http());
    v["data"].clone()
}

fn publish_url(p: &Proc, stream: &str) -> String {
    director_publish(p, stream)["urls"][0]
        .as_str()
        .unwrap()
        .to_owned()
}

fn publish_jwt(p: &Proc, stream: &str) -> String {
    director_publish(p, stream)["jwt"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A WHIP publish of `stream` at `p` with a bogus offer: (status, body).
fn whip(p: &Proc, stream: &str) -> (u16, String) {
    let auth = format!("Bearer {PUBLISH}");
    let (status, _, body) = common::http(
        p.http(),
        "POST",
        &format!("/whip/{stream}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/sdp"),
        ],
        b"v=0\r\n",
    );
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn ws_of(p: &Proc) -> String {
    format!("ws://{}/ws", p.http())
}

/// A redis-server and two origins using it (o1, o2), one test at a time.
fn two_origins() -> (std::sync::MutexGuard<'static, ()>, Redis, Proc, Proc) {
    let serial = common::serial();
    let redis = Redis::start();
    let o1 = origin(&redis, "o1");
    let o2 = origin(&redis, "o2");
    (serial, redis, o1, o2)
}

#[test]
fn both_directors_name_one_owner_and_the_other_origin_refuses_the_stream() {
    let (_serial, _redis, o1, o2) = two_origins();
    wait_registered(&o1, &["o1", "o2"]);
    let first = publish_url(&o1, "panel");
    let second = publish_url(&o2, "panel");
    assert_eq!(first, second, "both directors name the same owner");
    assert!(
        first == ws_of(&o1) || first == ws_of(&o2),
        "{first} is an origin's"
    );
    let (owner, other, owner_id) = if first == ws_of(&o1) {
        (&o1, &o2, "o1")
    } else {
        (&o2, &o1, "o2")
    };
    // Asked again, and for the other origin's view: the same.
    assert_eq!(publish_url(other, "panel"), first);
    let streams = cluster_view(other)["streams"].clone();
    assert_eq!(
        streams
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == "panel")
            .unwrap()["owner"],
        owner_id,
        "{streams}"
    );
    // WHIP at the origin that does not own the stream: 409 naming the owner.
    let (status, body) = whip(other, "panel");
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(&format!("owned by origin \\\"{owner_id}\\\"")) && body.contains(&first),
        "{body}"
    );
    // At the owner the same request gets past ownership (and fails on the bogus offer).
    let (status, body) = whip(owner, "panel");
    assert_eq!(status, 400, "{body}");
    // The other director's publish JWT opens the owner's signalling socket (shared
    // --jwt-secret); the other origin refuses the upgrade with the owner's name.
    let jwt = publish_jwt(other, "panel");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert!(common::ws::connect(owner.http(), &jwt).await.is_ok());
        let refused = common::ws::open(&format!("{}?token={jwt}", ws_of(other))).await;
        let Err((status, message)) = refused else {
            panic!("the other origin opened a publish socket for the owner's stream")
        };
        assert_eq!(status, 409, "{message}");
        assert!(message.contains(owner_id), "{message}");
    });
    // Another stream: the least-loaded origin, named alike by both.
    assert_eq!(publish_url(&o2, "other"), publish_url(&o1, "other"));
}

#[test]
fn six_subscribes_split_three_and_three_and_the_seventh_is_refused() {
    let (_serial, redis, o1, o2) = two_origins();
    let e1 = edge(&redis, &o1, "e1", &["--capacity", "3", "--region", "eu"]);
    let e2 = edge(&redis, &o2, "e2", &["--capacity", "3", "--region", "us"]);
    wait_registered(&o1, &["o1", "o2", "e1", "e2"]);
    let mut split = [0; 2];
    for i in 0..6 {
        let url = subscribe(&o1, "panel").unwrap_or_else(|e| panic!("subscribe {i}: {e:?}"));
        match url {
            u if u == ws_of(&e1) => split[0] += 1,
            u if u == ws_of(&e2) => split[1] += 1,
            u => panic!("{u} is no edge's"),
        }
    }
    assert_eq!(split, [3, 3], "six subscribes over two edges of capacity 3");
    let (status, message) = subscribe(&o1, "panel").unwrap_err();
    assert_eq!(status, 503);
    assert!(message.contains("every serving edge is full"), "{message}");
    // The other director has sent nobody: a viewer asking for a region gets it.
    let body = r#"{"streamName":"panel","streamAccountId":"chorus","region":"us"}"#;
    let (status, v) = post_json(o2.http(), "/api/director/subscribe", None, body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["urls"][0], ws_of(&e2));
    let view = cluster_view(&o1);
    let e1_node = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "e1")
        .unwrap()
        .clone();
    assert_eq!(e1_node["kind"], "edge");
    assert_eq!(e1_node["state"], "serving");
    assert_eq!(e1_node["capacity"], 3);
    assert_eq!(e1_node["region"], "eu");
    assert!(e1_node["heartbeatAgeMs"].as_u64().unwrap() < 5000);
}

#[test]
fn a_killed_edge_is_named_by_no_director_within_six_seconds() {
    let (_serial, redis, o1, o2) = two_origins();
    let mut e1 = edge(&redis, &o1, "e1", &[]);
    let e2 = edge(&redis, &o2, "e2", &[]);
    wait_registered(&o1, &["o1", "o2", "e1", "e2"]);
    wait_registered(&o2, &["e1", "e2"]);
    let dead = ws_of(&e1);
    let named = |p: &Proc| (0..4).any(|_| subscribe(p, "panel").ok().as_deref() == Some(&dead));
    assert!(named(&o1), "a live e1 gets viewers");
    e1.child.kill().unwrap(); // SIGKILL: no goodbye
    let _ = e1.child.wait();
    let killed = Instant::now();
    let gone = common::wait_for(
        "e1 gone from both registries",
        Duration::from_secs(8),
        || {
            let listed = [&o1, &o2]
                .iter()
                .any(|p| node_ids(&cluster_view(p)).iter().any(|id| id == "e1"));
            (!listed).then(|| killed.elapsed())
        },
    );
    println!(
        "a SIGKILLed edge left the directors' view {} ms after the kill",
        gone.as_millis()
    );
    assert!(gone <= Duration::from_secs(6), "took {gone:?}");
    for p in [&o1, &o2] {
        for _ in 0..6 {
            assert_eq!(subscribe(p, "panel"), Ok(ws_of(&e2)), "only e2 is named");
        }
    }
}

#[test]
fn a_redis_outage_is_survived_and_every_node_registers_again_when_it_is_back() {
    let (_serial, redis, o1, o2) = two_origins();
    let e1 = edge(&redis, &o1, "e1", &[]);
    wait_registered(&o1, &["o1", "o2", "e1"]);
    let port = redis.port;
    drop(redis); // SIGKILL; nothing was persisted
    let body = r#"{"streamName":"panel","streamType":"WebRtc"}"#;
    let (status, v) = post_json(o1.http(), "/api/director/publish", Some(PUBLISH), body);
    assert_eq!(status, 503, "{v}");
    let message = v["data"]["message"].as_str().unwrap();
    assert!(message.contains("registry is unreachable"), "{message}");
    // Past a few heartbeats without Redis, every node still serves.
    std::thread::sleep(Duration::from_secs(3));
    for p in [&o1, &o2, &e1] {
        let (status, _, _) = common::http(p.http(), "GET", "/healthz", &[], b"");
        assert_eq!(status, 200, "{} survives the outage", p.name);
    }
    let _back = Redis::start_on(port);
    let back = Instant::now();
    wait_registered(&o2, &["o1", "o2", "e1"]);
    println!(
        "every node registered again {} ms after Redis came back (empty)",
        back.elapsed().as_millis()
    );
    assert_eq!(publish_url(&o2, "panel"), publish_url(&o1, "panel"));
}

/// The holder of `stream`'s lease as `p`'s `/api/cluster` lists it.
fn lease_owner(p: &Proc, stream: &str) -> Option<String> {
    cluster_view(p)["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == stream)
        .map(|s| s["owner"].as_str().unwrap().to_owned())
}

#[test]
fn a_published_stream_keeps_its_lease_past_its_ttl_and_gives_it_up_after() {
    let (_serial, _redis, o1, o2) = two_origins();
    wait_registered(&o1, &["o1", "o2"]);
    let url = publish_url(&o2, "live");
    let (owner, owner_id) = if url == ws_of(&o1) {
        (&o1, "o1")
    } else {
        (&o2, "o2")
    };
    let claimed = Instant::now();
    // aiortc publishes over WHIP at the owner for 14 s.
    let publisher = common::whip_command(owner.http(), "live", "ana", PUBLISH, 14)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _publisher = common::Reaped(publisher);
    common::wait_for(
        "the owner reports its publication",
        Duration::from_secs(10),
        || {
            let view = cluster_view(&o1);
            let node = view["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["id"] == owner_id)?
                .clone();
            (node["load"]["publications"].as_u64()? >= 1).then_some(())
        },
    );
    // Past the lease's 10 s: refreshed while published.
    std::thread::sleep(Duration::from_secs(12).saturating_sub(claimed.elapsed()));
    assert_eq!(lease_owner(&o1, "live").as_deref(), Some(owner_id));
    // The publication ends at about 14 s; the lease goes 10 s later, at the next upkeep round.
    let released = common::wait_for("the lease given up", Duration::from_secs(25), || {
        lease_owner(&o1, "live")
            .is_none()
            .then(|| claimed.elapsed())
    });
    println!(
        "a stream's lease was given up {} ms after its claim (published 14 s)",
        released.as_millis()
    );
    assert!(
        released >= Duration::from_secs(20),
        "released at {released:?}: too early"
    );
}
