//! Abuse tests: origin. The origin's control state (the publish race, source indices), its keys
//! (what an edge holds, who decides who views), and its persisted identity.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus::relay::client::{EdgeLink, LinkConfig, LinkHandler};
use chorus::relay::proto::{DatagramHeader, SourceInfo};
use serde_json::{json, Value};

use crate::common::{self, http, post_json, wait_for, Proc};
use crate::honest::{assert_rss_below, Honest};

const TOKEN: &str = "origin-abuse-token";
const CLUSTER: &str = "origin-abuse-cluster";
/// RSS bound of every process under attack here (KiB). A debug build serving the honest pair
/// measured 36-46 MiB through these attacks (256 unconnected publisher peers included).
const RSS_BOUND_KIB: u64 = 160 * 1024;

/// A publisher's offer str0m accepts (no ICE will follow: the peer lives until its timeout).
fn audio_offer() -> String {
    let fp = vec!["AB"; 32].join(":");
    format!(
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
         a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 {fp}\r\n\
         a=setup:actpass\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
         a=sendonly\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=ssrc:1234 cname:x\r\n"
    )
}

/// A viewer's WHEP offer: the main track and one multiplexed track.
fn view_offer() -> String {
    let fp = vec!["CD"; 32].join(":");
    let mut sdp = format!(
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
         a=ice-ufrag:wxyz\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 {fp}\r\n\
         a=setup:actpass\r\n"
    );
    for mid in 0..2 {
        sdp.push_str(&format!(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\na=recvonly\r\n\
             a=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n"
        ));
    }
    sdp
}

/// POST an SDP offer to `path`; (status, Location or body).
fn post_sdp(addr: SocketAddr, path: &str, bearer: Option<&str>, sdp: &str) -> (u16, String) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/sdp")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (status, head, body) = http(addr, "POST", path, &headers, sdp.as_bytes());
    let location = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("location:")
                .then(|| l[9..].trim().to_owned())
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    (status, location)
}

fn whip(addr: SocketAddr, stream: &str, source: &str, sdp: &str) -> (u16, String) {
    post_sdp(
        addr,
        &format!("/whip/{stream}?sourceId={source}"),
        Some(TOKEN),
        sdp,
    )
}

/// What a hand-spoken edge link hears: the last source list per stream.
#[derive(Default)]
struct Capture {
    sources: Mutex<Vec<SourceInfo>>,
}

impl LinkHandler for Capture {
    fn on_sources(&self, _stream: &str, _channel: u32, sources: &[SourceInfo]) {
        *self.sources.lock().unwrap() = sources.to_vec();
    }
    fn on_datagram(&self, _: DatagramHeader, _: bytes::Bytes, _: std::time::Duration) {}
    fn on_closed(&self, _: &str) {}
}

fn link_config(cluster: &str, token: Option<&str>) -> LinkConfig {
    LinkConfig {
        origin: cluster.parse().unwrap(),
        fingerprint: None,
        cluster_token: token.map(str::to_owned),
        ws_url: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn healthy(p: &Proc) {
    assert_eq!(
        common::get_json(p.http(), "/healthz").0,
        200,
        "{} is up",
        p.name
    );
}

fn message(v: &Value) -> String {
    v["data"]["message"].as_str().unwrap_or_default().to_owned()
}

/// Hole 1: failing offers, WHIP publishes (and their DELETEs), edges subscribing, leaving and
/// disconnecting, all at once at one stream. Each used to be able to remove the stream between
/// a publish's two locks and panic the origin; now none may.
#[test]
fn publish_race_failing_offers_publishes_and_edge_churn_at_one_stream() {
    let _serial = common::serial();
    let origin = common::origin_with(TOKEN, CLUSTER, common::LIFT_ADDRESS_LIMITS, &[]);
    let edge = common::edge(&origin, CLUSTER);
    let h = Honest::start(
        Honest::at(origin.http(), TOKEN, "honest-stream")
            .view_at(edge.http())
            .seconds(12),
    );
    let a = origin.http();
    let cluster = origin.cluster();
    let rt = runtime();
    let started = Instant::now();
    let counts = std::thread::scope(|scope| {
        // Offers that fail on the media thread, i.e. between the two halves of a publish.
        let failing = scope.spawn(move || {
            let mut refused = 0;
            for i in 0..400 {
                let (s, _) = whip(a, "race", &format!("f{}", i % 5), "v=0\r\ngarbage");
                assert_eq!(s, 400, "a failing offer is a 400");
                refused += 1;
            }
            refused
        });
        // Offers that succeed (replacing each other), some ended at once with DELETE.
        let publishing = scope.spawn(move || {
            let offer = audio_offer();
            let mut ok = 0;
            for i in 0..150 {
                let (s, location) = whip(a, "race", &format!("p{}", i % 3), &offer);
                assert_eq!(s, 201, "{location}");
                ok += 1;
                if i % 2 == 0 {
                    let bearer = format!("Bearer {TOKEN}");
                    let _ = http(a, "DELETE", &location, &[("Authorization", &bearer)], b"");
                }
            }
            ok
        });
        // Edges subscribing and unsubscribing, and edge connections coming and going.
        let rt = &rt;
        let cluster = cluster.clone();
        let churn = scope.spawn(move || {
            rt.block_on(async {
                let mut cycles = 0;
                for _ in 0..6 {
                    let link = EdgeLink::connect(
                        &link_config(&cluster, Some(CLUSTER)),
                        Arc::new(Capture::default()),
                    )
                    .await
                    .expect("an edge with the cluster token joins");
                    for _ in 0..100 {
                        link.acquire("race");
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        link.release("race");
                        cycles += 1;
                    }
                    link.acquire("race");
                    // Dropped while subscribed: the origin drops the connection's subscriptions.
                    link.close().await;
                }
                cycles
            })
        });
        (
            failing.join().unwrap(),
            publishing.join().unwrap(),
            churn.join().unwrap(),
        )
    });
    eprintln!(
        "race: {} failing offers, {} publishes, {} edge (un)subscribes in {:?}",
        counts.0,
        counts.1,
        counts.2,
        started.elapsed()
    );
    // Still up, still consistent: the stream takes a publication and lists it.
    healthy(&origin);
    let (s, _) = whip(a, "race", "after", &audio_offer());
    assert_eq!(s, 201);
    let (s, v) = common::get_json(a, "/api/streams/race");
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["sourceId"].as_str())
        .collect();
    assert!(ids.contains(&"after"), "{v}");
    // An edge subscribing now gets a list whose indices are distinct.
    let cap = Arc::new(Capture::default());
    let link = rt
        .block_on(EdgeLink::connect(
            &link_config(&cluster, Some(CLUSTER)),
            cap.clone(),
        ))
        .unwrap();
    link.acquire("race");
    let listed = wait_for("the source list", Duration::from_secs(5), || {
        let s = cap.sources.lock().unwrap().clone();
        (!s.is_empty()).then_some(s)
    });
    let mut idx: Vec<u16> = listed.iter().map(|s| s.index).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), listed.len(), "{listed:?}");
    h.assert_gapless();
    assert_rss_below(origin.child.id(), RSS_BOUND_KIB, "origin after the race");
    assert_rss_below(edge.child.id(), RSS_BOUND_KIB, "edge after the race");
    healthy(&edge);
}

/// Hole 7: thousands of distinct sourceIds come and go at one stream. Failed offers give their
/// index back, live sources never share one, a stream holds at most 256 sources and says so,
/// and an ended source's index is not handed to the next newcomer at once.
#[test]
fn distinct_source_id_churn_keeps_indices_exclusive_and_the_limit_clear() {
    let _serial = common::serial();
    let origin = common::origin_with(TOKEN, CLUSTER, common::LIFT_ADDRESS_LIMITS, &[]);
    let edge = common::edge(&origin, CLUSTER);
    let h = Honest::start(
        Honest::at(origin.http(), TOKEN, "honest-stream")
            .view_at(edge.http())
            .seconds(14),
    );
    let a = origin.http();
    let started = Instant::now();
    // Failed offers with distinct sourceIds: each would have taken an index for good.
    for i in 0..2000 {
        let (s, _) = whip(a, "churn", &format!("gone-{i}"), "v=0\r\ngarbage");
        assert_eq!(s, 400);
    }
    // 256 live sources: the stated limit.
    let offer = audio_offer();
    let mut locations = Vec::new();
    for i in 0..256 {
        let (s, location) = whip(a, "churn", &format!("live-{i}"), &offer);
        assert_eq!(s, 201, "source {i}: {location}");
        locations.push(location);
    }
    let (s, body) = whip(a, "churn", "one-too-many", &offer);
    assert_eq!(s, 503, "{body}");
    assert!(
        body.contains("already has 256 sources"),
        "a clear refusal: {body}"
    );
    assert_eq!(
        common::metric(
            a,
            "chorus_origin_publish_refused_total{reason=\"sources_per_stream\"}"
        ),
        Some(1.0)
    );
    eprintln!(
        "churn: 2000 failed offers and 257 publishes in {:?}",
        started.elapsed()
    );
    // What an edge is told: 256 sources, 256 distinct indices, all below 256 (the failed
    // offers took none for good).
    let rt = runtime();
    let cap = Arc::new(Capture::default());
    let link = rt
        .block_on(EdgeLink::connect(
            &link_config(&origin.cluster(), Some(CLUSTER)),
            cap.clone(),
        ))
        .unwrap();
    link.acquire("churn");
    let listed = wait_for("256 sources listed", Duration::from_secs(5), || {
        let s = cap.sources.lock().unwrap().clone();
        (s.len() == 256).then_some(s)
    });
    let mut idx: Vec<u16> = listed.iter().map(|s| s.index).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 256);
    assert!(idx.iter().all(|&i| i < 256), "{idx:?}");
    // Ten sources end; ten newcomers get indices, none of the ten just freed (quarantine).
    let bearer = format!("Bearer {TOKEN}");
    let mut freed = Vec::new();
    for (i, location) in locations.iter().take(10).enumerate() {
        let (s, _, _) = http(a, "DELETE", location, &[("Authorization", &bearer)], b"");
        assert_eq!(s, 200);
        let name = format!("live-{i}");
        freed.extend(
            listed
                .iter()
                .filter(|s| s.source_id.as_deref() == Some(&name))
                .map(|s| s.index),
        );
    }
    for i in 0..10 {
        let (s, body) = whip(a, "churn", &format!("new-{i}"), &offer);
        assert_eq!(s, 201, "{body}");
    }
    let listed = wait_for("the newcomers listed", Duration::from_secs(5), || {
        let s = cap.sources.lock().unwrap().clone();
        s.iter()
            .any(|s| s.source_id.as_deref() == Some("new-9"))
            .then_some(s)
    });
    assert_eq!(listed.len(), 256);
    let mut idx: Vec<u16> = listed.iter().map(|s| s.index).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 256, "live sources never share an index");
    for s in listed.iter().filter(|s| {
        s.source_id
            .as_deref()
            .is_some_and(|id| id.starts_with("new-"))
    }) {
        assert!(!freed.contains(&s.index), "{s:?} took a quarantined index");
    }
    h.assert_gapless();
    assert_rss_below(origin.child.id(), RSS_BOUND_KIB, "origin after the churn");
    healthy(&edge);
}

/// HS256 with `secret`.
fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Hole 4: whatever an edge holds (the cluster token, the key of the origin's Welcome, a
/// viewer's JWT its director handed out) signs no publish JWT and no room token the origin
/// takes.
#[test]
fn an_edge_cannot_mint_publish_jwts_or_room_tokens() {
    let _serial = common::serial();
    let origin = common::origin(TOKEN, CLUSTER);
    let edge = common::edge(&origin, CLUSTER);
    let h = Honest::start(
        Honest::at(origin.http(), TOKEN, "honest-stream")
            .view_at(edge.http())
            .seconds(10),
    );
    let a = origin.http();
    let api_key = origin.info["apiKey"].as_str().unwrap().to_owned();
    // The relay spoken by hand, as an edge: what the Welcome carries is a public key.
    let rt = runtime();
    let link = rt
        .block_on(EdgeLink::connect(
            &link_config(&origin.cluster(), Some(CLUSTER)),
            Arc::new(Capture::default()),
        ))
        .unwrap();
    let key = link.verify_key.clone();
    assert_eq!(key.ed25519.len(), 32, "an Ed25519 public key");
    let secrets: Vec<Vec<u8>> = vec![
        key.ed25519.clone(),
        key.to_base64().into_bytes(),
        CLUSTER.as_bytes().to_vec(),
    ];
    let t = now();
    let publish = json!({"iat": t, "exp": t + 60, "scope": "publish",
        "millicast": {"streamName": "stage"}});
    let member = json!({"iat": t, "exp": t + 60, "scope": "publish",
        "millicast": {"streamName": "stage"},
        "room": {"room": "stage", "memberId": "m-evil", "generation": 0}});
    let room = json!({"typ": "chorus-room", "iat": t, "exp": t + 3600, "room": "stage",
        "sub": "m-evil", "name": "Evil", "role": "member",
        "permissions": ["room.member.promote", "room.member.demote", "room.member.remove",
                        "room.self.audio_mute", "room.self.audio_unmute"]});
    for secret in &secrets {
        for forged in [hs256(&publish, secret), hs256(&member, secret)] {
            let (s, body) = whip(a, "stage", "m-evil", &audio_offer());
            assert_eq!(s, 201, "control: the real token publishes: {body}");
            let (s, body) = post_sdp(
                a,
                "/whip/stage?sourceId=m-evil",
                Some(&forged),
                &audio_offer(),
            );
            assert_eq!(s, 401, "forged publish JWT over WHIP: {body}");
            let refused = rt.block_on(common::ws::connect(a, &forged)).err();
            assert_eq!(refused, Some(401), "forged publish JWT on /ws");
        }
        let forged = hs256(&room, secret);
        for kind in ["publish", "subscribe"] {
            let (s, v) = post_json(
                a,
                &format!("/api/director/{kind}"),
                Some(&forged),
                r#"{"streamName":"stage"}"#,
            );
            if kind == "publish" {
                assert_eq!(s, 401, "forged room token at the director: {v}");
            } else {
                // dev mode: the stream is open; the forged token grants nothing more.
                assert!(v["data"]["memberId"].is_null(), "{v}");
            }
        }
        let url = format!("ws://{a}/api/rooms/stage/ws?token={forged}");
        let refused = rt.block_on(common::ws::open(&url)).err();
        assert_eq!(refused.map(|r| r.0), Some(401), "forged room token");
    }
    // Control: a room token from the API works, so the refusals are the signatures'.
    let (s, v) = post_json(
        a,
        "/api/rooms/stage/tokens",
        Some(&api_key),
        r#"{"user_name":"Ana","join_as":"member"}"#,
    );
    assert_eq!(s, 200, "{v}");
    let real = v["data"]["token"].as_str().unwrap().to_owned();
    let url = format!("ws://{a}/api/rooms/stage/ws?token={real}");
    assert!(rt.block_on(common::ws::open(&url)).is_ok());
    // A real edge's director: a subscribe JWT, good for viewing and for nothing else.
    let (s, v) = post_json(
        edge.http(),
        "/api/director/subscribe",
        None,
        r#"{"streamName":"stage"}"#,
    );
    assert_eq!(s, 200, "{v}");
    let jwt = v["data"]["jwt"].as_str().unwrap();
    assert_eq!(
        common::jwt_payload(jwt)["scope"],
        "subscribe",
        "the edge relays the origin's JWT"
    );
    let (s, body) = post_sdp(a, "/whip/stage?sourceId=x", Some(jwt), &audio_offer());
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("does not allow Publish"), "{body}");
    // The JWT is the origin's (EdDSA, its key id), not the edge's.
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
    h.assert_gapless();
    assert_rss_below(
        origin.child.id(),
        RSS_BOUND_KIB,
        "origin after the forgeries",
    );
    healthy(&edge);
}

fn token_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens.json");
    let file = json!({"tokens": [
        {"token": TOKEN, "stream": "*", "kind": "publish"},
        {"token": "sub-private", "stream": "private", "kind": "subscribe"},
    ]});
    std::fs::write(&path, file.to_string()).unwrap();
    path
}

/// Hole 3: a stream private at the origin (a subscribe token) is private at an edge, whose
/// director and WHEP ask the origin; an edge refuses a token file of its own.
#[test]
fn a_private_stream_stays_private_at_an_edge() {
    let _serial = common::serial();
    let dir = common::tempdir("origin-private");
    let tokens = token_file(&dir);
    let origin = common::origin_with(TOKEN, CLUSTER, &["--tokens", tokens.to_str().unwrap()], &[]);
    let edge = common::edge(&origin, CLUSTER);
    let h = Honest::start(
        Honest::at(origin.http(), TOKEN, "honest-stream")
            .view_at(edge.http())
            .seconds(10),
    );
    let e = edge.http();
    let subscribe = |bearer: Option<&str>, stream: &str| {
        post_json(
            e,
            "/api/director/subscribe",
            bearer,
            &json!({"streamName": stream}).to_string(),
        )
    };
    let (s, v) = subscribe(None, "private");
    assert_eq!(s, 401, "{v}");
    assert!(message(&v).contains("missing token"), "{v}");
    let (s, v) = subscribe(Some("guess"), "private");
    assert_eq!(s, 401, "{v}");
    assert!(message(&v).contains("unknown token"), "{v}");
    let (s, v) = subscribe(Some("sub-private"), "private");
    assert_eq!(s, 200, "{v}");
    let jwt = v["data"]["jwt"].as_str().unwrap().to_owned();
    let (s, v) = subscribe(None, "open");
    assert_eq!(s, 200, "an open stream needs nothing: {v}");
    // WHEP at the edge: the same policy.
    let offer = view_offer();
    let (s, body) = post_sdp(e, "/whep/private?tracks=1", None, &offer);
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("missing token"), "{body}");
    let (s, body) = post_sdp(e, "/whep/private?tracks=1", Some("guess"), &offer);
    assert_eq!(s, 401, "{body}");
    let (s, body) = post_sdp(e, "/whep/private?tracks=1", Some("sub-private"), &offer);
    assert_eq!(s, 201, "the subscribe token views: {body}");
    let (s, body) = post_sdp(e, "/whep/private?tracks=1", Some(&jwt), &offer);
    assert_eq!(s, 201, "the origin's subscribe JWT views: {body}");
    let (s, body) = post_sdp(e, "/whep/open?tracks=1", None, &offer);
    assert_eq!(s, 201, "{body}");
    // And its signalling socket takes that JWT.
    let rt = runtime();
    assert!(rt.block_on(common::ws::connect(e, &jwt)).is_ok());
    // An edge with a token file of its own refuses to start, and says why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "edge",
            "--http",
            "127.0.0.1:0",
            "--origin",
            &origin.cluster(),
        ])
        .args(["--tokens", tokens.to_str().unwrap()])
        .env("CHORUS_CLUSTER_TOKEN", CLUSTER)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("an edge takes no --tokens"), "{err}");
    h.assert_gapless();
    assert_rss_below(edge.child.id(), RSS_BOUND_KIB, "edge");
    healthy(&origin);
}

/// Hole 4 (serve): its loopback QUIC port takes no edge without the random cluster token only
/// the process knows.
#[test]
fn serve_quic_port_refuses_a_client_without_the_cluster_token() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let h = Honest::start(Honest::at(p.http(), TOKEN, "honest-stream").seconds(6));
    let rt = runtime();
    for token in [None, Some(""), Some("guess"), Some(TOKEN)] {
        let joined = rt.block_on(EdgeLink::connect(
            &link_config(&p.cluster(), token),
            Arc::new(Capture::default()),
        ));
        let err = joined.err().expect("refused");
        assert!(
            err.to_string().contains("wrong or missing cluster token"),
            "{err}"
        );
    }
    h.assert_gapless();
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve");
}

/// Hole 15 (identity): an origin restarted on its --data-dir keeps its certificate (the pinned
/// edge relinks) and its keys (a JWT issued before the restart still works).
#[test]
fn a_restarted_origin_keeps_its_identity_and_the_pinned_edge_relinks() {
    let _serial = common::serial();
    let dir = common::tempdir("origin-identity");
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let start = |cluster: &str| {
        Proc::start(
            "origin",
            &["origin", "--http", "127.0.0.1:0", "--cluster", cluster],
            &[
                ("CHORUS_PUBLISH_TOKEN", TOKEN),
                ("CHORUS_CLUSTER_TOKEN", CLUSTER),
                ("CHORUS_DATA_DIR", data.to_str().unwrap()),
            ],
        )
    };
    let mut origin = start("127.0.0.1:0");
    let cluster = origin.cluster();
    let fingerprint = origin.info["fingerprint"].as_str().unwrap().to_owned();
    let edge = common::edge(&origin, CLUSTER);
    let (s, v) = post_json(
        origin.http(),
        "/api/director/subscribe",
        None,
        r#"{"streamName":"open"}"#,
    );
    assert_eq!(s, 200, "{v}");
    let before = v["data"]["jwt"].as_str().unwrap().to_owned();
    let (s, v) = post_json(
        origin.http(),
        "/api/rooms/stage/tokens",
        origin.info["apiKey"].as_str(),
        r#"{"user_name":"Ana","join_as":"member"}"#,
    );
    assert_eq!(s, 200, "{v}");
    let room_token = v["data"]["token"].as_str().unwrap().to_owned();
    // SIGKILL, and the same data dir and QUIC port again.
    origin.child.kill().unwrap();
    origin.child.wait().unwrap();
    drop(origin);
    // Meanwhile the edge cannot ask: a clear 503 within the deadline (5 s), not a hang.
    let asked = Instant::now();
    let (s, v) = post_json(
        edge.http(),
        "/api/director/subscribe",
        None,
        r#"{"streamName":"open"}"#,
    );
    assert_eq!(s, 503, "{v}");
    assert!(message(&v).contains("try again shortly"), "{v}");
    assert!(
        asked.elapsed() < Duration::from_secs(7),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        common::metric(
            edge.http(),
            "chorus_edge_authorize_total{result=\"unavailable\"}"
        ),
        Some(1.0)
    );
    let origin = start(&cluster);
    assert_eq!(origin.info["fingerprint"], fingerprint.as_str());
    let started = Instant::now();
    wait_for("the pinned edge relinks", Duration::from_secs(20), || {
        let (s, _) = post_json(
            edge.http(),
            "/api/director/subscribe",
            None,
            r#"{"streamName":"open"}"#,
        );
        (s == 200).then_some(())
    });
    eprintln!("edge relinked {:?} after the restart", started.elapsed());
    // The JWT of the first life still opens the edge's signalling socket (checked with the
    // key alone: no fallback to the origin's policy there).
    let rt = runtime();
    assert!(rt
        .block_on(common::ws::connect(edge.http(), &before))
        .is_ok());
    // So does its room token, at the origin's room socket.
    let url = format!(
        "ws://{}/api/rooms/stage/ws?token={room_token}",
        origin.http()
    );
    assert!(rt.block_on(common::ws::open(&url)).is_ok());
    let h = Honest::start(
        Honest::at(origin.http(), TOKEN, "honest-stream")
            .view_at(edge.http())
            .seconds(6),
    );
    h.assert_gapless();
    assert_rss_below(origin.child.id(), RSS_BOUND_KIB, "restarted origin");
}

/// Hole 15 (keys): an origin restarted without a data dir has a new signing key; the edge
/// (unpinned here, the certificate being new too) takes it from the new Welcome on relink, so
/// the new origin's JWTs work at the edge and the old ones stop.
#[test]
fn an_edge_takes_a_restarted_origin_s_new_key_on_relink() {
    let _serial = common::serial();
    let start = |cluster: &str| {
        Proc::start(
            "origin",
            &["origin", "--http", "127.0.0.1:0", "--cluster", cluster],
            &[
                ("CHORUS_PUBLISH_TOKEN", TOKEN),
                ("CHORUS_CLUSTER_TOKEN", CLUSTER),
            ],
        )
    };
    // The origin's director answers viewers once an edge is linked to it.
    let jwt_of = |p: &Proc| {
        wait_for("a linked edge", Duration::from_secs(25), || {
            let (s, v) = post_json(
                p.http(),
                "/api/director/subscribe",
                None,
                r#"{"streamName":"open"}"#,
            );
            (s == 200).then(|| v["data"]["jwt"].as_str().unwrap().to_owned())
        })
    };
    let mut origin = start("127.0.0.1:0");
    let cluster = origin.cluster();
    let edge = Proc::start(
        "edge",
        &["edge", "--http", "127.0.0.1:0", "--origin", &cluster],
        &[("CHORUS_CLUSTER_TOKEN", CLUSTER)],
    );
    let before = jwt_of(&origin);
    let rt = runtime();
    assert!(rt
        .block_on(common::ws::connect(edge.http(), &before))
        .is_ok());
    origin.child.kill().unwrap();
    origin.child.wait().unwrap();
    drop(origin);
    let origin = start(&cluster);
    let after = jwt_of(&origin);
    assert_ne!(
        jsonwebtoken::decode_header(&before).unwrap().kid,
        jsonwebtoken::decode_header(&after).unwrap().kid,
        "a new key"
    );
    wait_for(
        "the edge takes the new key",
        Duration::from_secs(25),
        || {
            rt.block_on(common::ws::connect(edge.http(), &after))
                .is_ok()
                .then_some(())
        },
    );
    assert_eq!(
        rt.block_on(common::ws::connect(edge.http(), &before)).err(),
        Some(401),
        "the old key is gone"
    );
    let h = Honest::start(
        Honest::at(origin.http(), TOKEN, "honest-stream")
            .view_at(edge.http())
            .seconds(6),
    );
    h.assert_gapless();
    assert_rss_below(edge.child.id(), RSS_BOUND_KIB, "edge after the relink");
}
