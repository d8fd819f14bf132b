//! Room state in Redis and stream-wide counts, with real processes and a real redis-server on a
//! free port: a demotion outlives its origin's death (the next owner reads the room back and
//! the demoted member's old publish JWT stays refused), a room outlives a restart of a
//! redis-server with AOF on, an origin that lost its lease changes nothing, and the audience
//! count sums the viewers of every edge.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::ws::{call, event, open, Ws};
use common::{post_json, Proc, Reaped, Redis};
use serde_json::{json, Value};

const PUBLISH: &str = "rooms-publish";
const CLUSTER: &str = "rooms-link";
const API_KEY: &str = "rooms-api-key";
/// Both origins derive the same keys: a room token or publish JWT of one works at the other.
const JWT_SECRET: &str = "rooms-jwt-secret";
const HOST_PERMISSIONS: [&str; 2] = ["room.member.promote", "room.member.demote"];

fn origin(redis_url: &str, id: &str) -> Proc {
    let ttl = ["--jwt-ttl", "10m"];
    common::cluster_origin(PUBLISH, CLUSTER, API_KEY, JWT_SECRET, redis_url, id, &ttl)
}

/// An edge linked to `origin`, in the registry as `id`.
fn edge(redis: &Redis, origin: &Proc, id: &str) -> Proc {
    let (link, url) = (origin.cluster(), redis.url());
    Proc::start(
        "edge",
        &[
            "edge",
            "--http",
            "127.0.0.1:0",
            "--media-workers",
            "1",
            "--origin",
            &link,
            "--origin-fingerprint",
            origin.info["fingerprint"].as_str().unwrap(),
            "--redis",
            &url,
            "--node-id",
            id,
        ],
        &[("CHORUS_CLUSTER_TOKEN", CLUSTER)],
    )
}

fn msg(v: &Value) -> String {
    v["data"]["message"].as_str().unwrap_or_default().to_owned()
}

struct Member {
    token: String,
    id: String,
}

fn room_token(a: SocketAddr, room: &str, user: &str, join_as: &str, perms: &[&str]) -> Member {
    let body = json!({"user_name": user, "join_as": join_as, "permissions": perms});
    let path = format!("/api/rooms/{room}/tokens");
    let (s, v) = post_json(a, &path, Some(API_KEY), &body.to_string());
    assert_eq!(s, 200, "{v}");
    Member {
        token: v["data"]["token"].as_str().unwrap().to_owned(),
        id: v["data"]["memberId"].as_str().unwrap().to_owned(),
    }
}

async fn room_socket(a: SocketAddr, room: &str, m: &Member) -> Ws {
    open(&format!("ws://{a}/api/rooms/{room}/ws?token={}", m.token))
        .await
        .unwrap_or_else(|e| panic!("room socket at {a}: {e:?}"))
}

fn cmd(id: u64, name: &str, data: Value) -> String {
    json!({"type": "cmd", "transId": id, "name": name, "data": data}).to_string()
}

/// The director's publish answer at `a` for `bearer`: (status, body).
fn director_publish(a: SocketAddr, bearer: &str, stream: &str) -> (u16, Value) {
    let body = json!({"streamName": stream, "streamType": "WebRtc"}).to_string();
    post_json(a, "/api/director/publish", Some(bearer), &body)
}

/// Runs a test's steps on a runtime of its own.
fn block_on(steps: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(steps)
}

fn ws_of(p: &Proc) -> String {
    format!("ws://{}/ws", p.http())
}

/// Waits until `p`'s registry lists every one of `ids` (`/api/cluster`); how long it took.
fn wait_registered(p: &Proc, ids: &[&str], within: Duration) -> Duration {
    let t0 = Instant::now();
    let auth = format!("Bearer {API_KEY}");
    common::wait_for("every node registered", within, || {
        let (status, _, body) = common::http(
            p.http(),
            "GET",
            "/api/cluster",
            &[("Authorization", &auth)],
            b"",
        );
        let v: Value = serde_json::from_slice(&body).ok()?;
        let nodes = v["data"]["nodes"].as_array()?.clone();
        (status == 200 && ids.iter().all(|id| nodes.iter().any(|n| n["id"] == *id))).then_some(())
    });
    t0.elapsed()
}

/// A member's record in Redis, as JSON (Null when absent).
fn stored(redis: &Redis, room: &str, member: &str) -> Value {
    let out = redis.cli(&["HGET", &format!("chorus:room:{room}"), member]);
    serde_json::from_str(&out).unwrap_or(Value::Null)
}

/// A garbage publish on `jwt`'s signalling socket at `a`: the error message (past the room's
/// checks it is the SDP's), or the refused upgrade's.
async fn try_publish(a: SocketAddr, jwt: &str, source: &str) -> String {
    match open(&format!("ws://{a}/ws?token={jwt}")).await {
        Ok(mut ws) => {
            let c = cmd(
                1,
                "publish",
                json!({"name": "stage", "sdp": "garbage", "sourceId": source}),
            );
            msg(&call(&mut ws, &c).await)
        }
        Err((status, m)) => format!("{status} {m}"),
    }
}

/// test item 5: demote a member, SIGKILL the owner; the next publish through the other
/// origin's director claims the stream, the room is read back there, and the demoted member's
/// old publish JWT is still refused while the host's still works.
#[test]
fn a_demotion_outlives_the_owner_and_the_new_owner_still_refuses_the_old_jwt() {
    // One at a time: each starts several processes.
    let _serial = common::serial();
    block_on(a_demotion_outlives_the_owner_and_the_new_owner_still_refuses_the_old_jwt_steps());
}

async fn a_demotion_outlives_the_owner_and_the_new_owner_still_refuses_the_old_jwt_steps() {
    let redis = Redis::start();
    let o1 = origin(&redis.url(), "o1");
    let o2 = origin(&redis.url(), "o2");
    wait_registered(&o1, &["o1", "o2"], Duration::from_secs(10));
    let host = room_token(o1.http(), "stage", "Host", "member", &HOST_PERMISSIONS);
    let ana = room_token(o1.http(), "stage", "Ana", "member", &[]);

    // The host's publish claims the stream for one origin; both members get publish JWTs there.
    let (s, v) = director_publish(o1.http(), &host.token, "stage");
    assert_eq!(s, 200, "{v}");
    let url = v["data"]["urls"][0].as_str().unwrap().to_owned();
    let host_jwt = v["data"]["jwt"].as_str().unwrap().to_owned();
    let (owner, other, other_id) = if url == ws_of(&o1) {
        (o1, o2, "o2")
    } else {
        (o2, o1, "o1")
    };
    let (s, v) = director_publish(owner.http(), &ana.token, "stage");
    assert_eq!(s, 200, "{v}");
    let ana_jwt = v["data"]["jwt"].as_str().unwrap().to_owned();

    let mut h = room_socket(owner.http(), "stage", &host).await;
    let mut s_ana = room_socket(owner.http(), "stage", &ana).await;
    let r = call(&mut h, &cmd(1, "demote", json!({"memberId": ana.id}))).await;
    assert_eq!(r["data"]["role"], "audience", "{r}");
    event(&mut s_ana, "member.updated").await;
    // Acknowledged means written: the record is in Redis already.
    let rec = stored(&redis, "stage", &ana.id);
    assert_eq!(
        (rec["role"].as_str(), rec["generation"].as_u64()),
        (Some("audience"), Some(1)),
        "{rec}"
    );
    common::wait_for(
        "the host's record written behind",
        Duration::from_secs(3),
        || (stored(&redis, "stage", &host.id)["role"] == "member").then_some(()),
    );
    drop((h, s_ana));

    let killed = Instant::now();
    drop(owner); // SIGKILL
    let a = other.http();
    // The host's JWT through the other director: sent to the dead owner while its record
    // looks live, refused while its lease lives, then the stream is the other origin's.
    let mine = ws_of(&other);
    common::wait_for(
        "the other origin takes the stream",
        Duration::from_secs(20),
        || {
            let (s, v) = director_publish(a, &host_jwt, "stage");
            (s == 200 && v["data"]["urls"][0] == mine.as_str()).then_some(())
        },
    );
    let gap = killed.elapsed();
    eprintln!(
        "owner SIGKILLed: {other_id} took the stream after {} ms",
        gap.as_millis()
    );

    let revoked = format!(
        "member \"{}\" is in the audience of room \"stage\" (demoted: this publish token is revoked): it may not publish",
        ana.id
    );
    let (s, v) = director_publish(a, &ana_jwt, "stage");
    assert_eq!((s, msg(&v)), (403, revoked.clone()), "the demotion held");
    assert_eq!(
        try_publish(a, &ana_jwt, &ana.id).await,
        format!("403 {revoked}")
    );
    let (s, v) = director_publish(a, &ana.token, "stage");
    assert_eq!(s, 403, "nor with its room token: {v}");
    // The host, never demoted, still publishes with its old JWT (past the room's checks the
    // garbage SDP is what fails).
    let m = try_publish(a, &host_jwt, &host.id).await;
    assert!(m.contains("malformed SDP"), "{m}");
    // And the room, read back, is the same at the new owner.
    let mut h = room_socket(a, "stage", &host).await;
    let r = call(&mut h, &cmd(1, "state", json!({}))).await;
    let members: Vec<&str> = r["data"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["memberId"].as_str().unwrap())
        .collect();
    assert_eq!(members, [host.id.as_str()], "{r}");
}

/// The fence: an origin whose lease was taken over (the key overwritten) gets a clear error
/// for a room command, and nothing changes, neither in Redis nor in its memory.
#[test]
fn an_origin_that_lost_the_lease_changes_nothing() {
    // One at a time: each starts several processes.
    let _serial = common::serial();
    block_on(an_origin_that_lost_the_lease_changes_nothing_steps());
}

async fn an_origin_that_lost_the_lease_changes_nothing_steps() {
    let redis = Redis::start();
    let o1 = origin(&redis.url(), "o1");
    wait_registered(&o1, &["o1"], Duration::from_secs(10));
    let a = o1.http();
    let host = room_token(a, "stage", "Host", "member", &HOST_PERMISSIONS);
    let ana = room_token(a, "stage", "Ana", "member", &[]);
    let mut h = room_socket(a, "stage", &host).await;
    let _s_ana = room_socket(a, "stage", &ana).await;
    // Room sockets alone take no lease; the first command that changes something takes the
    // free lease for this origin, and is written.
    assert_eq!(redis.cli(&["GET", "chorus:stream:stage"]), "");
    let r = call(&mut h, &cmd(2, "demote", json!({"memberId": host.id}))).await;
    assert_eq!(r["data"]["role"], "audience", "{r}");
    assert!(redis
        .cli(&["GET", "chorus:stream:stage"])
        .starts_with("o1/"));
    assert_eq!(stored(&redis, "stage", &host.id)["role"], "audience");

    // Someone else holds the stream now.
    assert_eq!(
        redis.cli(&["SET", "chorus:stream:stage", "o9/intruder", "PX", "60000"]),
        "OK"
    );
    let before = redis.cli(&["HGETALL", "chorus:room:stage"]);
    let r = call(&mut h, &cmd(3, "demote", json!({"memberId": ana.id}))).await;
    assert_eq!(r["type"], "error", "{r}");
    let m = msg(&r);
    assert!(
        m.starts_with("room \"stage\" was not changed: ") && m.contains("o9/intruder"),
        "{m}"
    );
    eprintln!("fenced: {m}");
    assert_eq!(
        redis.cli(&["HGETALL", "chorus:room:stage"]),
        before,
        "nothing written"
    );
    let r = call(&mut h, &cmd(4, "state", json!({}))).await;
    let ana_now = r["data"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["memberId"] == ana.id.as_str())
        .cloned();
    assert_eq!(
        ana_now.map(|m| m["role"].clone()),
        Some(json!("member")),
        "{r}"
    );
    assert_eq!(stored(&redis, "stage", &ana.id)["role"], "member");
}

/// test item 7: a redis-server with AOF on holds a room; SIGKILLed and restarted on the same
/// port and dir, it still has the room (an origin started afterwards reads it back), and the
/// nodes register again by themselves.
#[test]
fn a_room_survives_a_redis_restart_with_aof_and_nodes_reregister() {
    // One at a time: each starts several processes.
    let _serial = common::serial();
    block_on(a_room_survives_a_redis_restart_with_aof_and_nodes_reregister_steps());
}

async fn a_room_survives_a_redis_restart_with_aof_and_nodes_reregister_steps() {
    let dir = common::tempdir("redis-aof");
    let _ = std::fs::remove_dir_all(dir.join("appendonlydir"));
    let port = common::free_port();
    let aof = ["--appendonly", "yes", "--appendfsync", "everysec"];
    let redis = Redis::start_persistent(port, &dir, &aof);
    let url = redis.url();
    let o1 = origin(&url, "o1");
    wait_registered(&o1, &["o1"], Duration::from_secs(10));
    let a = o1.http();
    let host = room_token(a, "stage", "Host", "member", &HOST_PERMISSIONS);
    let ana = room_token(a, "stage", "Ana", "member", &[]);
    let (s, v) = director_publish(a, &ana.token, "stage");
    assert_eq!(s, 200, "{v}");
    let ana_jwt = v["data"]["jwt"].as_str().unwrap().to_owned();
    let mut h = room_socket(a, "stage", &host).await;
    let _s_ana = room_socket(a, "stage", &ana).await;
    let r = call(&mut h, &cmd(1, "demote", json!({"memberId": ana.id}))).await;
    assert_eq!(r["data"]["role"], "audience", "{r}");
    // appendfsync everysec: a write is on disk within about a second.
    std::thread::sleep(Duration::from_millis(1500));
    drop(redis); // SIGKILL
    let down = Instant::now();
    // Redis gone mid-session: a command is refused, and undone.
    let r = call(&mut h, &cmd(2, "promote", json!({"memberId": ana.id}))).await;
    let refused_after = down.elapsed();
    assert_eq!(r["type"], "error", "{r}");
    let m = msg(&r);
    assert!(m.starts_with("room \"stage\" was not changed: "), "{m}");
    eprintln!(
        "redis down: promote refused after {} ms: {m}",
        refused_after.as_millis()
    );
    let r = call(&mut h, &cmd(3, "state", json!({}))).await;
    assert_eq!(
        r["data"]["members"].as_array().unwrap().len(),
        1,
        "still only the host: {r}"
    );
    drop(h);
    std::thread::sleep(Duration::from_millis(500));
    let redis = Redis::start_persistent(port, &dir, &aof);
    let back = down.elapsed();
    assert_eq!(
        stored(&redis, "stage", &ana.id)["role"],
        "audience",
        "the room survived"
    );
    let again = wait_registered(&o1, &["o1"], Duration::from_secs(10));
    eprintln!(
        "redis down {} ms; o1 registered again {} ms after its return",
        back.as_millis(),
        again.as_millis()
    );
    // Read back through the API by an origin that never saw the room.
    let o2 = origin(&url, "o2");
    wait_registered(&o2, &["o1", "o2"], Duration::from_secs(10));
    let (s, v) = director_publish(o2.http(), &ana_jwt, "stage");
    assert_eq!(s, 403, "{v}");
    assert!(
        msg(&v).contains("(demoted: this publish token is revoked)"),
        "{v}"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Viewers on two edges: the room's audience count is their total within about 2 s.
#[test]
fn the_audience_count_sums_the_viewers_of_every_edge() {
    // One at a time: each starts several processes.
    let _serial = common::serial();
    block_on(the_audience_count_sums_the_viewers_of_every_edge_steps());
}

async fn the_audience_count_sums_the_viewers_of_every_edge_steps() {
    let redis = Redis::start();
    let o1 = origin(&redis.url(), "o1");
    let e1 = edge(&redis, &o1, "e1");
    let e2 = edge(&redis, &o1, "e2");
    wait_registered(&o1, &["o1", "e1", "e2"], Duration::from_secs(10));
    let host = room_token(o1.http(), "stage", "Host", "member", &HOST_PERMISSIONS);
    let mut h = room_socket(o1.http(), "stage", &host).await;
    let r = call(&mut h, &cmd(1, "state", json!({}))).await;
    assert_eq!(r["data"]["audienceCount"], 0, "{r}");

    // Two viewers on e1, one on e2 (aiortc over WHEP).
    let mut viewers = Vec::new();
    // When each viewer's WHEP offer was answered (it is an edge's viewer from then on).
    let (answered_tx, answered) = std::sync::mpsc::channel::<Instant>();
    for e in [&e1, &e1, &e2] {
        let mut c = common::whep_command(e.http(), "stage", &["--seconds", "20", "--tracks", "1"]);
        c.env("CHORUS_VIEW_TOKEN", &host.token)
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().expect("whep_view.py runs");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let tx = answered_tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in out.lines().map_while(Result::ok) {
                if line.contains(r#""event": "answer""#) || line.contains(r#""event":"answer""#) {
                    let _ = tx.send(Instant::now());
                }
            }
        });
        viewers.push(Reaped(child));
    }
    // The host on stage listens too: 3 viewers are 2 in the audience.
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut counts = Vec::new();
    while counts.last() != Some(&2) {
        assert!(
            Instant::now() < deadline,
            "audience counts seen: {counts:?}"
        );
        let v = common::ws::next_json(&mut h).await;
        if v["name"] == "room.audience_count" {
            counts.push(v["data"]["count"].as_u64().unwrap());
        }
    }
    let seen = Instant::now();
    let last_answer = answered
        .try_iter()
        .max()
        .expect("the viewers were answered");
    let lag = seen.saturating_duration_since(last_answer);
    let r = call(&mut h, &cmd(2, "state", json!({}))).await;
    assert_eq!(r["data"]["audienceCount"], 2, "{r}");
    eprintln!(
        "audience count 2 (3 viewers on two edges) {} ms after the last viewer's answer; counts seen {counts:?}",
        lag.as_millis()
    );
    // Edges write every second and the origin reads every second.
    assert!(lag < Duration::from_millis(2500), "{lag:?}");

    // A dead edge's viewers leave the count once its last write is 3 s old.
    let killed = Instant::now();
    drop(e2); // SIGKILL
    let deadline = killed + Duration::from_secs(8);
    while counts.last() != Some(&1) {
        assert!(
            Instant::now() < deadline,
            "audience counts seen: {counts:?}"
        );
        let v = common::ws::next_json(&mut h).await;
        if v["name"] == "room.audience_count" {
            counts.push(v["data"]["count"].as_u64().unwrap());
        }
    }
    eprintln!(
        "edge e2 SIGKILLed: its viewer left the audience count after {} ms",
        killed.elapsed().as_millis()
    );
    drop(viewers);
}
