//! Every refusal of the director, the signalling socket and WHIP, against a real `chorus serve`:
//! each gets a clear error, and the server keeps serving everyone else.

mod common;

use std::time::Duration;

use common::ws::{call, connect, next_json, Ws};
use common::{get_json, http, jwt_payload, post_json, tempdir, Proc};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "refusal-test-secret";

fn serve_with_tokens(dir: &std::path::Path) -> (Proc, Value) {
    let tokens = dir.join("tokens.json");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let file = json!({"tokens": [
        {"token": "pub-panel", "stream": "panel", "kind": "publish"},
        {"token": "pub-expired", "stream": "panel", "kind": "publish", "expires": now - 10},
        {"token": "pub-other", "stream": "other", "kind": "publish"},
        {"token": "sub-secret", "stream": "secret", "kind": "subscribe"},
    ]});
    std::fs::write(&tokens, file.to_string()).unwrap();
    let p = common::serve_token_file(&tokens, &["--jwt-secret", SECRET]);
    (p, file)
}

fn msg(v: &Value) -> String {
    v["data"]["message"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn director_refuses_bad_tokens_and_bodies_with_fail_json() {
    let dir = tempdir("director");
    let (p, _) = serve_with_tokens(&dir);
    let a = p.http();
    let body = r#"{"streamName":"panel","streamType":"WebRtc"}"#;
    let cases = [
        (None, body, 401, "missing token"),
        (Some("nope"), body, 401, "unknown token"),
        (Some("pub-expired"), body, 401, "expired"),
        (
            Some("pub-other"),
            body,
            401,
            "not valid for stream \"panel\"",
        ),
        (Some("sub-secret"), body, 401, "not a publish token"),
        (Some("pub-panel"), "{not json", 400, "malformed JSON"),
        (Some("pub-panel"), "{}", 400, "missing streamName"),
        (
            Some("pub-panel"),
            r#"{"streamName":"a/b"}"#,
            400,
            "streamName may only",
        ),
    ];
    for (token, body, status, text) in cases {
        let (s, v) = post_json(a, "/api/director/publish", token, body);
        assert_eq!(s, status, "{token:?} {body}: {v}");
        assert_eq!(v["status"], "fail");
        assert!(msg(&v).contains(text), "{token:?} {body}: {v}");
    }
    // Subscribe: open streams need nothing, protected ones their token.
    let (s, v) = post_json(
        a,
        "/api/director/subscribe",
        None,
        r#"{"streamName":"panel","streamAccountId":"x"}"#,
    );
    assert_eq!((s, v["status"].as_str()), (200, Some("success")));
    let (s, v) = post_json(
        a,
        "/api/director/subscribe",
        None,
        r#"{"streamName":"secret","streamAccountId":"x"}"#,
    );
    assert_eq!(s, 401, "{v}");
    let (s, _) = post_json(
        a,
        "/api/director/subscribe",
        Some("sub-secret"),
        r#"{"streamName":"secret"}"#,
    );
    assert_eq!(s, 200);
    // After all that, the good token still works and yields a JWT bound to the stream.
    let (s, v) = post_json(a, "/api/director/publish", Some("pub-panel"), body);
    assert_eq!(s, 200, "{v}");
    let claims = jwt_payload(v["data"]["jwt"].as_str().unwrap());
    assert_eq!(claims["millicast"]["streamName"], "panel");
    assert_eq!(claims["scope"], "publish");
    assert!(v["data"]["urls"][0].as_str().unwrap().starts_with("ws://"));
    assert_eq!(get_json(a, "/healthz").0, 200);
}

#[test]
fn new_tokens_work_without_restart() {
    let dir = tempdir("reload");
    let (p, mut file) = serve_with_tokens(&dir);
    let body = r#"{"streamName":"late"}"#;
    assert_eq!(
        post_json(p.http(), "/api/director/publish", Some("pub-late"), body).0,
        401
    );
    std::thread::sleep(Duration::from_millis(1100)); // coarse mtime resolution
    file["tokens"]
        .as_array_mut()
        .unwrap()
        .push(json!({"token": "pub-late", "stream": "late", "kind": "publish"}));
    std::fs::write(dir.join("tokens.json"), file.to_string()).unwrap();
    assert_eq!(
        post_json(p.http(), "/api/director/publish", Some("pub-late"), body).0,
        200
    );
}

/// A signalling socket opened with a viewer's JWT for stream "panel".
async fn viewer_socket(a: std::net::SocketAddr) -> Ws {
    let (_, v) = post_json(
        a,
        "/api/director/subscribe",
        None,
        r#"{"streamName":"panel"}"#,
    );
    connect(a, v["data"]["jwt"].as_str().unwrap())
        .await
        .unwrap()
}

fn sign(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

const VIDEO_ONLY: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalling_refuses_bad_jwts_and_commands_and_keeps_serving() {
    let dir = tempdir("ws");
    let (p, _) = serve_with_tokens(&dir);
    let a = p.http();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |exp: u64, scope: &str| json!({"iat": now, "exp": exp, "scope": scope, "millicast": {"streamName": "panel"}});
    // Expired JWT, JWT of another signer, no JWT: refused before the upgrade.
    assert_eq!(
        connect(a, &sign(claims(now - 1, "publish"), SECRET))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        connect(a, &sign(claims(now + 60, "publish"), "wrong-secret"))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(connect(a, "garbage").await.err(), Some(401));

    let (_, v) = post_json(
        a,
        "/api/director/publish",
        Some("pub-panel"),
        r#"{"streamName":"panel"}"#,
    );
    let jwt = v["data"]["jwt"].as_str().unwrap().to_owned();
    let mut ws = connect(a, &jwt).await.expect("valid JWT connects");

    let r = call(&mut ws, "{not json").await;
    assert_eq!(r["type"], "error");
    assert!(msg(&r).contains("malformed JSON"), "{r}");

    let r = call(
        &mut ws,
        r#"{"type":"cmd","transId":1,"name":"dance","data":{}}"#,
    )
    .await;
    assert_eq!(
        (r["type"].as_str(), r["transId"].as_u64()),
        (Some("error"), Some(1))
    );
    assert!(msg(&r).contains("unknown command \"dance\""), "{r}");

    let r = call(
        &mut ws,
        r#"{"type":"cmd","transId":1,"name":"publish","data":{}}"#,
    )
    .await;
    assert!(msg(&r).contains("duplicate transId 1"), "{r}");

    let cmd =
        json!({"type":"cmd","transId":2,"name":"publish","data":{"name":"other","sdp":VIDEO_ONLY}});
    let r = call(&mut ws, &cmd.to_string()).await;
    assert!(
        msg(&r).contains("this token is for stream \"panel\", not \"other\""),
        "{r}"
    );

    let cmd = json!({"type":"cmd","transId":3,"name":"publish","data":{"name":"panel","sdp":VIDEO_ONLY,"sourceId":"a"}});
    let r = call(&mut ws, &cmd.to_string()).await;
    assert_eq!(
        (r["type"].as_str(), r["transId"].as_u64()),
        (Some("error"), Some(3))
    );
    assert!(msg(&r).contains("no audio m-line"), "{r}");

    let cmd =
        json!({"type":"cmd","transId":4,"name":"publish","data":{"name":"panel","sdp":"hello"}});
    assert!(msg(&call(&mut ws, &cmd.to_string()).await).contains("malformed SDP"));

    let cmd = json!({"type":"cmd","transId":5,"name":"publish","data":{"name":"panel"}});
    assert!(msg(&call(&mut ws, &cmd.to_string()).await).contains("needs data.sdp"));

    let cmd =
        json!({"type":"cmd","transId":6,"name":"publish","data":{"sdp":VIDEO_ONLY,"sourceId":7}});
    assert!(msg(&call(&mut ws, &cmd.to_string()).await).contains("sourceId must be a string"));

    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert!(msg(&next_json(&mut ws).await).contains("binary"));

    // A viewer's JWT cannot publish.
    let mut viewer = viewer_socket(a).await;
    let cmd = json!({"type":"cmd","transId":0,"name":"publish","data":{"sdp":VIDEO_ONLY}});
    assert!(msg(&call(&mut viewer, &cmd.to_string()).await).contains("may view, not publish"));

    // An oversized message ends only that session.
    let mut big = connect(a, &jwt).await.unwrap();
    let huge = format!(
        r#"{{"type":"cmd","transId":1,"name":"publish","data":{{"sdp":"{}"}}}}"#,
        "x".repeat(400_000)
    );
    let _ = big.send(Message::Text(huge.into())).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), big.next())
        .await
        .unwrap();
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_)))),
        "oversized message was answered: {ended:?}"
    );

    // The first session still answers, in order, after every refusal.
    let r = call(
        &mut ws,
        r#"{"type":"cmd","transId":99,"name":"unpublish","data":{}}"#,
    )
    .await;
    assert_eq!(r["transId"], 99);
    assert!(msg(&r).contains("nothing published"), "{r}");
    assert_eq!(get_json(a, "/healthz").0, 200);
}

#[test]
fn whip_refusals() {
    let dir = tempdir("whip");
    let (p, _) = serve_with_tokens(&dir);
    let a = p.http();
    let sdp = [("Content-Type", "application/sdp")];
    let auth = |t: &'static str| [("Content-Type", "application/sdp"), ("Authorization", t)];
    let (s, _, b) = http(
        a,
        "POST",
        "/whip/panel?sourceId=x",
        &sdp,
        VIDEO_ONLY.as_bytes(),
    );
    assert_eq!(s, 401, "{}", String::from_utf8_lossy(&b));
    let (s, _, _) = http(
        a,
        "POST",
        "/whip/panel",
        &auth("Bearer pub-other"),
        VIDEO_ONLY.as_bytes(),
    );
    assert_eq!(s, 401);
    let (s, _, _) = http(
        a,
        "POST",
        "/whip/panel",
        &[
            ("Content-Type", "text/plain"),
            ("Authorization", "Bearer pub-panel"),
        ],
        VIDEO_ONLY.as_bytes(),
    );
    assert_eq!(s, 415);
    let (s, _, b) = http(
        a,
        "POST",
        "/whip/panel?sourceId=x",
        &auth("Bearer pub-panel"),
        VIDEO_ONLY.as_bytes(),
    );
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&b).contains("no audio m-line"));
    let (s, _, _) = http(
        a,
        "POST",
        "/whip/panel",
        &auth("Bearer pub-panel"),
        b"\xff\xfe",
    );
    assert_eq!(s, 400);
    assert_eq!(
        http(a, "DELETE", "/whip/resource/pub-1-nothing", &[], b"").0,
        404
    );
    // A PATCH names a resource too: an unknown one is 404 (a known one is 405, tests/abuse/http.rs).
    assert_eq!(
        http(a, "PATCH", "/whip/resource/pub-1-nothing", &[], b"").0,
        404
    );
    // With a token file, stream state is on --admin-http only.
    assert_eq!(get_json(a, "/api/streams/panel").0, 404);
}

#[test]
fn token_cli_creates_tokens_the_server_accepts() {
    let dir = tempdir("cli");
    let file = dir.join("tokens.json");
    let _ = std::fs::remove_file(&file);
    let create = |stream: &str, kind: &str, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args([
                "token", "create", "--stream", stream, "--kind", kind, "--tokens",
            ])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap();
        common::assert_succeeded(&out, "chorus token create");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let publish = create("panel", "publish", &[]);
    let short = create("panel", "publish", &["--ttl", "1s"]);
    let sub = create("panel", "subscribe", &["--ttl", "1h"]);
    assert_ne!(publish, short);
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "token", "create", "--stream", "a b", "--kind", "publish", "--tokens",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let p = common::serve_token_file(&file, &[]);
    let a = p.http();
    let body = r#"{"streamName":"panel"}"#;
    assert_eq!(
        post_json(a, "/api/director/publish", Some(&publish), body).0,
        200
    );
    assert_eq!(
        post_json(
            a,
            "/api/director/publish",
            Some(&publish),
            r#"{"streamName":"else"}"#
        )
        .0,
        401
    );
    // The stream now needs a subscribe token.
    assert_eq!(post_json(a, "/api/director/subscribe", None, body).0, 401);
    assert_eq!(
        post_json(a, "/api/director/subscribe", Some(&sub), body).0,
        200
    );
    std::thread::sleep(Duration::from_millis(2100));
    let (s, v) = post_json(a, "/api/director/publish", Some(&short), body);
    assert_eq!(s, 401);
    assert!(msg(&v).contains("expired"));
}

/// A real recvonly offer (1 main + `tracks` multiplexed audio m-lines) made by str0m.
fn view_offer(tracks: usize) -> String {
    use str0m::media::{Direction, MediaKind};
    let mut rtc = str0m::Rtc::builder().build(std::time::Instant::now());
    let mut api = rtc.sdp_api();
    for _ in 0..=tracks {
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    }
    let (offer, _pending) = api.apply().expect("an offer");
    offer.to_sdp_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_refusals_are_clear_and_the_session_goes_on() {
    let p = Proc::start(
        "serve",
        &["serve", "--http", "127.0.0.1:0"],
        &[("CHORUS_PUBLISH_TOKEN", "pt")],
    );
    let a = p.http();
    let mut ws = viewer_socket(a).await;
    let cmd = |id: u64, name: &str, data: Value| {
        json!({"type":"cmd","transId":id,"name":name,"data":data}).to_string()
    };

    let r = call(
        &mut ws,
        &cmd(
            1,
            "project",
            json!({"sourceId":"a","mapping":[{"media":"audio","mediaId":"1"}]}),
        ),
    )
    .await;
    assert!(msg(&r).contains("needs a view"), "{r}");
    let r = call(
        &mut ws,
        &cmd(2, "view", json!({"streamId":"other","sdp":view_offer(2)})),
    )
    .await;
    assert!(
        msg(&r).contains("this token is for stream \"panel\""),
        "{r}"
    );
    let r = call(&mut ws, &cmd(3, "view", json!({"sdp":"garbage"}))).await;
    assert!(msg(&r).contains("malformed SDP"), "{r}");
    let r = call(&mut ws, &cmd(4, "view", json!({"sdp": VIDEO_ONLY}))).await;
    assert!(msg(&r).contains("no audio m-line to receive"), "{r}");
    let r = call(
        &mut ws,
        &cmd(
            5,
            "view",
            json!({"sdp":view_offer(2),"excludedSourceIds":"ana"}),
        ),
    )
    .await;
    assert!(
        msg(&r).contains("excludedSourceIds must be an array"),
        "{r}"
    );
    let r = call(&mut ws, &cmd(6, "view", json!({"sdp":view_offer(17)}))).await;
    assert!(msg(&r).contains("at most 16"), "{r}");

    // A good view: answered with an SDP whose m-lines send.
    let r = call(
        &mut ws,
        &cmd(
            7,
            "view",
            json!({"streamId":"panel","sdp":view_offer(2),"excludedSourceIds":["me"]}),
        ),
    )
    .await;
    assert_eq!(r["type"], "response", "{r}");
    assert!(r["data"]["sdp"].as_str().unwrap().contains("a=sendonly"));
    assert!(r["data"]["subscriberId"].is_string());
    let r = call(&mut ws, &cmd(8, "view", json!({"sdp":view_offer(2)}))).await;
    assert!(msg(&r).contains("already views"), "{r}");
    let r = call(
        &mut ws,
        &cmd(
            9,
            "project",
            json!({"sourceId":"a","mapping":[{"media":"audio","mediaId":"x y"}]}),
        ),
    )
    .await;
    assert!(msg(&r).contains("is not a mid"), "{r}");
    // A mid the offer did not have is a track the app added (addRemoteTrack), answered.
    let r = call(
        &mut ws,
        &cmd(
            11,
            "project",
            json!({"sourceId":"a","mapping":[{"media":"audio","mediaId":"9"}]}),
        ),
    )
    .await;
    assert_eq!(r["data"]["mapping"][0]["mediaId"], "9", "{r}");
    let r = call(
        &mut ws,
        &cmd(12, "select", json!({"layer":{"encodingId":"h"}})),
    )
    .await;
    assert!(msg(&r).contains("none to pick"), "{r}");
    let r = call(&mut ws, &cmd(13, "select", json!({"layer":{}}))).await;
    assert_eq!(r["type"], "response", "{r}");
    let r = call(
        &mut ws,
        &cmd(
            10,
            "project",
            json!({"sourceId":"a","mapping":[{"media":"video","mediaId":"1"}]}),
        ),
    )
    .await;
    assert!(msg(&r).contains("only audio"), "{r}");

    // A publish JWT cannot view.
    let (_, v) = post_json(
        a,
        "/api/director/publish",
        Some("pt"),
        r#"{"streamName":"panel"}"#,
    );
    let mut publisher = connect(a, v["data"]["jwt"].as_str().unwrap())
        .await
        .unwrap();
    let r = call(
        &mut publisher,
        &cmd(1, "view", json!({"sdp":view_offer(1)})),
    )
    .await;
    assert!(msg(&r).contains("may publish, not view"), "{r}");

    // WHEP refusals.
    let sdp_ct = [("Content-Type", "application/sdp")];
    assert_eq!(
        http(
            a,
            "POST",
            "/whep/panel",
            &[("Content-Type", "text/plain")],
            b"x"
        )
        .0,
        415
    );
    assert_eq!(http(a, "POST", "/whep/panel", &sdp_ct, b"garbage").0, 400);
    let (s, _, b) = http(
        a,
        "POST",
        "/whep/panel?tracks=5",
        &sdp_ct,
        view_offer(1).as_bytes(),
    );
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&b).contains("tracks=5"));
    let (s, head, _) = http(
        a,
        "POST",
        "/whep/panel?tracks=1",
        &sdp_ct,
        view_offer(1).as_bytes(),
    );
    assert_eq!(s, 201);
    assert!(head
        .to_ascii_lowercase()
        .contains("location: /whep/resource/"));
    assert_eq!(http(a, "DELETE", "/whep/resource/nothing", &[], b"").0, 404);
    assert_eq!(get_json(a, "/healthz").0, 200);
}
