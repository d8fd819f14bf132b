//! Rooms against a real `chorus serve`: room tokens and the API key, the room socket, raise hand,
//! promote and demote, and every refusal (each with its message, the server serving on); the
//! whole story with the official SDK in headless Chromium; and `member.talking` across an origin
//! and an edge process (the last two need scripts/setup-test-deps.sh).

mod common;

use std::net::SocketAddr;

use common::room_tool::{energy, loudest, Live};
use common::ws::{call, call_seeing, connect, event, open, Ws};
use common::{get_json, http, jwt_payload, post_json, Proc};
use serde_json::{json, Value};

const API_KEY: &str = "test-room-api-key";
const TOKEN: &str = "test-publish-token";
const HOST_PERMISSIONS: [&str; 3] = [
    "room.member.promote",
    "room.member.demote",
    "room.member.remove",
];

/// `chorus serve` with an API key; director JWTs live 10 min (the e2e test outlasts 60 s).
fn serve() -> Proc {
    Proc::start(
        "serve",
        &["serve", "--http", "127.0.0.1:0", "--jwt-ttl", "10m"],
        &[("CHORUS_PUBLISH_TOKEN", TOKEN), ("CHORUS_API_KEY", API_KEY)],
    )
}

fn msg(v: &Value) -> String {
    v["data"]["message"].as_str().unwrap_or_default().to_owned()
}

/// A participant's room token and member id.
struct Member {
    token: String,
    id: String,
}

fn room_token(a: SocketAddr, room: &str, user: &str, join_as: &str, perms: &[&str]) -> Member {
    let body = json!({"user_name": user, "join_as": join_as, "permissions": perms});
    let (s, v) = post_json(
        a,
        &format!("/api/rooms/{room}/tokens"),
        Some(API_KEY),
        &body.to_string(),
    );
    assert_eq!(s, 200, "{v}");
    Member {
        token: v["data"]["token"].as_str().unwrap().to_owned(),
        id: v["data"]["memberId"].as_str().unwrap().to_owned(),
    }
}

async fn room_socket(a: SocketAddr, room: &str, m: &Member) -> Result<Ws, (u16, String)> {
    open(&format!("ws://{a}/api/rooms/{room}/ws?token={}", m.token)).await
}

fn cmd(id: u64, name: &str, data: Value) -> String {
    json!({"type": "cmd", "transId": id, "name": name, "data": data}).to_string()
}

/// POST to the director with `bearer` for `stream`: (status, body).
fn director(a: SocketAddr, kind: &str, bearer: &str, stream: &str) -> (u16, Value) {
    post_json(
        a,
        &format!("/api/director/{kind}"),
        Some(bearer),
        &json!({"streamName": stream, "streamAccountId": "chorus"}).to_string(),
    )
}

/// POST /whip/{stream}?sourceId=... with `bearer` and `sdp`: (status, body text).
fn whip(a: SocketAddr, stream: &str, source: &str, bearer: &str, sdp: &str) -> (u16, String) {
    let auth = format!("Bearer {bearer}");
    let (s, _, b) = http(
        a,
        "POST",
        &format!("/whip/{stream}?sourceId={source}"),
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &auth),
        ],
        sdp.as_bytes(),
    );
    (s, String::from_utf8_lossy(&b).into_owned())
}

const VIDEO_AND_AUDIO: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_tokens_need_the_api_key_and_a_valid_request() {
    let p = serve();
    let a = p.http();
    let good = r#"{"user_name":"Ana","join_as":"member","permissions":["room.member.promote"]}"#;
    let cases = [
        (None, "stage", good, 401, "missing API key"),
        (Some("nope"), "stage", good, 401, "wrong API key"),
        (
            Some(API_KEY),
            "stage",
            r#"{"user_name":"Ana","permissions":["room.member.fly"]}"#,
            400,
            "unknown permission \"room.member.fly\"; valid permissions: room.member.promote, room.member.demote, room.member.remove, room.self.audio_mute, room.self.audio_unmute, room.member.audio_mute, room.member.audio_unmute",
        ),
        (
            Some(API_KEY),
            "stage",
            r#"{"user_name":"Ana","join_as":"host"}"#,
            400,
            "join_as must be \"audience\" or \"member\"",
        ),
        (Some(API_KEY), "stage", r#"{"join_as":"member"}"#, 400, "missing user_name"),
        (Some(API_KEY), "stage", r#"{"user_name":""}"#, 400, "user_name must be"),
        (
            Some(API_KEY),
            "stage",
            r#"{"user_name":"Ana","joinas":"member"}"#,
            400,
            "unknown field `joinas`",
        ),
        (Some(API_KEY), "stage", r#"{"user_name":"Ana","ttl":5}"#, 400, "ttl must be"),
        (Some(API_KEY), "stage", "{not json", 400, "malformed JSON"),
        (Some(API_KEY), "bad!room", good, 400, "bad room name"),
    ];
    for (key, room, body, status, text) in cases {
        let (s, v) = post_json(a, &format!("/api/rooms/{room}/tokens"), key, body);
        assert_eq!(
            (s, v["status"].as_str()),
            (status, Some("fail")),
            "{body}: {v}"
        );
        assert!(msg(&v).contains(text), "{body}: {v}");
    }
    // A good request: a member id (fresh each time) and a token saying who and what it is.
    let (s, v) = post_json(a, "/api/rooms/stage/tokens", Some(API_KEY), good);
    assert_eq!(s, 200, "{v}");
    let d = &v["data"];
    let id = d["memberId"].as_str().unwrap();
    assert!(id.starts_with("m-"), "{v}");
    assert_eq!(
        (
            d["room"].as_str(),
            d["streamName"].as_str(),
            d["role"].as_str()
        ),
        (Some("stage"), Some("stage"), Some("member"))
    );
    let claims = jwt_payload(d["token"].as_str().unwrap());
    assert_eq!(claims["sub"], id);
    assert_eq!(claims["room"], "stage");
    assert_eq!(claims["permissions"], json!(["room.member.promote"]));
    assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap() + 3600);
    let other = room_token(a, "stage", "Ana", "audience", &[]);
    assert_ne!(other.id, id, "member ids are unique");
    // A room token is no signalling JWT, and no publish token.
    assert_eq!(connect(a, &other.token).await.err(), Some(401));
    let (s, v) = director(a, "publish", &other.token, "stage");
    assert_eq!(s, 403, "{v}");
    assert_eq!(get_json(a, "/healthz").0, 200);

    // Dev mode without a key makes one and prints it; a token file without a key issues none.
    let dev = Proc::start("serve", &["serve", "--http", "127.0.0.1:0"], &[]);
    let key = dev.info["apiKey"]
        .as_str()
        .expect("dev mode prints its API key");
    let (s, v) = post_json(
        dev.http(),
        "/api/rooms/r/tokens",
        Some(key),
        r#"{"user_name":"x"}"#,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["data"]["role"], "audience",
        "join_as defaults to audience"
    );
    let file = common::tempdir("rooms").join("tokens.json");
    std::fs::write(&file, r#"{"tokens":[]}"#).unwrap();
    let prod = common::serve_token_file(&file, &[]);
    assert!(prod.info["apiKey"].is_null());
    let (s, v) = post_json(
        prod.http(),
        "/api/rooms/r/tokens",
        Some(key),
        r#"{"user_name":"x"}"#,
    );
    assert_eq!(s, 401);
    assert!(msg(&v).contains("no API key"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_socket_refuses_what_a_participant_may_not_do() {
    let p = serve();
    let a = p.http();
    let host = room_token(a, "stage", "Host", "member", &HOST_PERMISSIONS);
    let ana = room_token(a, "stage", "Ana", "audience", &[]);
    let stranger = room_token(a, "other", "Stranger", "member", &HOST_PERMISSIONS);

    // Tokens of another room, no token, not a room token: refused before the upgrade.
    let (s, m) = room_socket(a, "stage", &stranger).await.err().unwrap();
    assert_eq!(
        (s, m.as_str()),
        (403, "this room token is for room \"other\", not \"stage\"")
    );
    let (s, m) = room_socket(a, "other", &host).await.err().unwrap();
    assert_eq!(s, 403, "{m}");
    let (s, m) = open(&format!("ws://{a}/api/rooms/stage/ws"))
        .await
        .err()
        .unwrap();
    assert_eq!((s, m.as_str()), (401, "missing ?token=<room token>"));
    let (_, v) = director(a, "subscribe", TOKEN, "stage");
    let jwt = v["data"]["jwt"].as_str().unwrap();
    let (s, m) = open(&format!("ws://{a}/api/rooms/stage/ws?token={jwt}"))
        .await
        .err()
        .unwrap();
    assert_eq!(s, 401);
    assert!(m.contains("not a room token"), "{m}");

    // The host comes in, then the audience: the host sees the count, not a list.
    let mut h = room_socket(a, "stage", &host).await.unwrap();
    let state = event(&mut h, "room.state").await;
    assert_eq!(state["you"]["memberId"], host.id.as_str());
    assert_eq!(state["you"]["role"], "member");
    assert_eq!(state["audienceCount"], 0);
    let mut s_ana = room_socket(a, "stage", &ana).await.unwrap();
    let state = event(&mut s_ana, "room.state").await;
    assert_eq!(state["members"][0]["memberId"], host.id.as_str());
    assert_eq!(event(&mut h, "room.audience_count").await["count"], 1);

    // Malformed JSON and unknown commands: an error each, the socket answers on.
    let r = call(&mut s_ana, "{nope").await;
    assert!(msg(&r).contains("malformed JSON"), "{r}");
    let r = call(&mut s_ana, &cmd(1, "fly", json!({}))).await;
    assert_eq!(
        (r["type"].as_str(), r["transId"].as_u64()),
        (Some("error"), Some(1))
    );
    assert!(msg(&r).contains("unknown command \"fly\""), "{r}");
    // Promote without the permission.
    let r = call(&mut s_ana, &cmd(2, "promote", json!({"memberId": ana.id}))).await;
    assert_eq!(
        msg(&r),
        "missing permission \"room.member.promote\": promote is not allowed"
    );
    let r = call(&mut s_ana, &cmd(3, "demote", json!({"memberId": host.id}))).await;
    assert!(msg(&r).contains("\"room.member.demote\""), "{r}");
    let r = call(&mut s_ana, &cmd(4, "audio.mute", json!({}))).await;
    assert!(msg(&r).contains("\"room.self.audio_mute\""), "{r}");
    // Demote of a non-member: the audience, and nobody.
    let r = call(&mut h, &cmd(1, "demote", json!({"memberId": ana.id}))).await;
    assert!(
        msg(&r).contains("is not a member (it is in the audience)"),
        "{r}"
    );
    let r = call(&mut h, &cmd(2, "demote", json!({"memberId": "m-nobody"}))).await;
    assert_eq!(msg(&r), "no participant \"m-nobody\" in room \"stage\"");
    let r = call(
        &mut h,
        &cmd(
            3,
            "promote",
            json!({"memberId": ana.id, "permissions": ["room.fly"]}),
        ),
    )
    .await;
    assert!(msg(&r).contains("unknown permission \"room.fly\""), "{r}");
    let r = call(&mut h, &cmd(4, "hand.raise", json!({}))).await;
    assert!(msg(&r).contains("only the audience raises a hand"), "{r}");

    // Hands go up and down; the host sees both.
    let r = call(&mut s_ana, &cmd(5, "hand.raise", json!({}))).await;
    assert_eq!(r["type"], "response", "{r}");
    let raised = event(&mut h, "hand.raised").await;
    assert_eq!(
        (raised["memberId"].as_str(), raised["userName"].as_str()),
        (Some(ana.id.as_str()), Some("Ana"))
    );
    call(&mut s_ana, &cmd(6, "hand.lower", json!({}))).await;
    assert_eq!(
        event(&mut h, "hand.lowered").await["memberId"],
        ana.id.as_str()
    );

    // Removal: told, closed, and the token no longer opens the room.
    let r = call(&mut h, &cmd(5, "remove", json!({"memberId": ana.id}))).await;
    assert_eq!(r["data"]["removed"], true, "{r}");
    assert_eq!(
        event(&mut s_ana, "room.removed").await["by"],
        host.id.as_str()
    );
    let (s, m) = room_socket(a, "stage", &ana).await.err().unwrap();
    assert_eq!(s, 403);
    assert!(m.contains("was removed from room \"stage\""), "{m}");
    let (s, v) = director(a, "subscribe", &ana.token, "stage");
    assert_eq!(s, 403, "{v}");
    assert_eq!(get_json(a, "/healthz").0, 200);
    assert_eq!(common::metric(a, "chorus_rooms "), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rights_follow_the_room_role_and_a_demotion_revokes_them() {
    let p = serve();
    let a = p.http();
    let host = room_token(a, "stage", "Host", "member", &HOST_PERMISSIONS);
    let ana = room_token(a, "stage", "Ana", "audience", &[]);
    let stranger = room_token(a, "other", "Stranger", "member", &[]);

    // The audience views, and may not publish: not at the director, not over WHIP, not with the
    // viewer's JWT on the signalling socket.
    let (s, v) = director(a, "publish", &ana.token, "stage");
    assert_eq!(s, 403, "{v}");
    assert!(
        msg(&v).contains("is in the audience of room \"stage\": it may not publish"),
        "{v}"
    );
    let (s, body) = whip(a, "stage", &ana.id, &ana.token, VIDEO_AND_AUDIO);
    assert_eq!(s, 403, "{body}");
    let (s, v) = director(a, "subscribe", &ana.token, "stage");
    assert_eq!(s, 200, "{v}");
    let mut viewer = connect(a, v["data"]["jwt"].as_str().unwrap())
        .await
        .unwrap();
    let r = call(
        &mut viewer,
        &cmd(1, "publish", json!({"sdp": "x", "sourceId": ana.id})),
    )
    .await;
    assert!(msg(&r).contains("may view, not publish"), "{r}");
    // Tokens of another room: nothing on this room's stream.
    for kind in ["publish", "subscribe"] {
        let (s, v) = director(a, kind, &stranger.token, "stage");
        assert_eq!(s, 403, "{v}");
        assert_eq!(
            msg(&v),
            "this room token is for room \"other\", not stream \"stage\""
        );
    }

    // A member publishes its own source only.
    let (s, v) = director(a, "publish", &host.token, "stage");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["sourceId"], host.id.as_str());
    let jwt = v["data"]["jwt"].as_str().unwrap();
    assert_eq!(
        jwt_payload(jwt)["room"],
        json!({"room": "stage", "memberId": host.id, "generation": 0})
    );
    let mut sig = connect(a, jwt).await.unwrap();
    let publish = |id: u64, source: Option<&str>, sdp: &str| {
        cmd(
            id,
            "publish",
            json!({"name": "stage", "sdp": sdp, "sourceId": source}),
        )
    };
    let r = call(&mut sig, &publish(1, Some("someone-else"), "x")).await;
    assert!(
        msg(&r).contains(&format!(
            "publishes with sourceId \"{}\" (its member id) only, not \"someone-else\"",
            host.id
        )),
        "{r}"
    );
    let r = call(&mut sig, &publish(2, None, "x")).await;
    assert!(msg(&r).contains("only, not the main source"), "{r}");
    let r = call(&mut sig, &publish(3, Some(&host.id), VIDEO_AND_AUDIO)).await;
    assert!(msg(&r).contains("may publish audio only"), "{r}");
    // Its own sourceId passes the room's checks (and fails on the SDP).
    let r = call(&mut sig, &publish(4, Some(&host.id), "garbage")).await;
    assert!(msg(&r).contains("malformed SDP"), "{r}");
    let (s, body) = whip(a, "stage", "someone-else", &host.token, VIDEO_AND_AUDIO);
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("(its member id) only"), "{body}");
    let (s, body) = whip(a, "stage", &host.id, jwt, "garbage");
    assert_eq!(s, 400, "{body}");

    // Promotion: the promoted participant gets what the SDK's tokenGenerator must return.
    let mut h = room_socket(a, "stage", &host).await.unwrap();
    let mut s_ana = room_socket(a, "stage", &ana).await.unwrap();
    call(&mut s_ana, &cmd(1, "hand.raise", json!({}))).await;
    event(&mut h, "hand.raised").await;
    let (r, seen) = call_seeing(&mut h, &cmd(1, "promote", json!({"memberId": ana.id}))).await;
    assert_eq!(r["data"]["role"], "member", "{r}");
    let names: Vec<&str> = seen.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["hand.lowered", "member.updated", "room.audience_count"]
    );
    assert_eq!(seen[0]["data"]["memberId"], ana.id.as_str());
    let creds = event(&mut s_ana, "member.promoted").await;
    assert_eq!(creds["sourceId"], ana.id.as_str());
    assert_eq!(creds["streamName"], "stage");
    assert_eq!(creds["urls"][0], format!("ws://{a}/ws"));
    let old_jwt = creds["jwt"].as_str().unwrap().to_owned();
    assert_eq!(jwt_payload(&old_jwt)["millicast"]["streamName"], "stage");
    let mut sig_ana = connect(a, &old_jwt)
        .await
        .expect("the promoted JWT connects");
    let (s, v) = director(a, "publish", &ana.token, "stage");
    assert_eq!(s, 200, "a member now: {v}");
    let r = call(&mut sig_ana, &publish(1, Some(&ana.id), "garbage")).await;
    assert!(msg(&r).contains("malformed SDP"), "{r}");

    // Demotion: every publish JWT of before stops working, wherever it is shown.
    let r = call(&mut h, &cmd(2, "demote", json!({"memberId": ana.id}))).await;
    assert_eq!(r["data"]["role"], "audience", "{r}");
    let updated = event(&mut s_ana, "member.updated").await;
    assert_eq!(
        (updated["memberId"].as_str(), updated["role"].as_str()),
        (Some(ana.id.as_str()), Some("audience"))
    );
    let revoked = format!(
        "member \"{}\" is in the audience of room \"stage\" (demoted: this publish token is revoked): it may not publish",
        ana.id
    );
    let r = call(&mut sig_ana, &publish(2, Some(&ana.id), "garbage")).await;
    assert_eq!(msg(&r), revoked);
    let (s, m) = open(&format!("ws://{a}/ws?token={old_jwt}"))
        .await
        .err()
        .unwrap();
    assert_eq!((s, m.as_str()), (403, revoked.as_str()));
    let (s, v) = director(a, "publish", &old_jwt, "stage");
    assert_eq!((s, msg(&v)), (403, revoked.clone()));
    let (s, v) = director(a, "publish", &ana.token, "stage");
    assert_eq!(s, 403, "{v}");
    let (s, body) = whip(a, "stage", &ana.id, &old_jwt, "garbage");
    assert_eq!(s, 403, "{body}");
    // Still in the room, as audience: it views, and may ask again.
    assert_eq!(director(a, "subscribe", &ana.token, "stage").0, 200);
    let r = call(&mut s_ana, &cmd(2, "hand.raise", json!({}))).await;
    assert_eq!(r["type"], "response", "{r}");
    assert_eq!(
        common::metric(a, "chorus_room_role_changes_total{change=\"demote\"}"),
        Some(1.0)
    );
}

fn is(v: &Value, event: &str, name: &str, kind: &str) -> bool {
    v["event"] == event && v["name"] == name && (kind.is_empty() || v["type"] == kind)
}

/// The room events (name, data) one participant's page received.
fn room_events(report: &Value, who: &str) -> Vec<(String, Value)> {
    report["participants"][who]["room"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["data"].clone()))
        .collect()
}

/// How long a room.mjs line the test waits for may take (the tool's `--seconds` bound it too).
const LINE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

#[test]
fn sdk_audience_raises_a_hand_is_promoted_heard_by_the_others_and_demoted() {
    use std::time::{Duration, Instant};
    let _serial = common::serial();
    let began = Instant::now();
    let p = serve();
    let a = p.http();
    let host = room_token(a, "stage", "Host", "member", &HOST_PERMISSIONS);
    let ana = room_token(a, "stage", "Ana", "audience", &[]);
    let bo = room_token(a, "stage", "Bo", "audience", &[]);
    // Everyone uses only its room token, with the SDK unmodified: the host publishes the corpus
    // host; Ana and Bo view with two multiplexed tracks (the host pinned in the main one); Ana
    // publishes the corpus host's opening turn once promoted.
    let view = |me: &Member| json!({"tracks": 2, "pinned": host.id, "exclude": [me.id]});
    let spec = json!([
        {"name": "host", "publish": "host", "sourceId": host.id, "token": host.token, "room": host.token},
        {"name": "ana", "publish": "host", "sourceId": ana.id, "token": ana.token, "publishLater": true,
         "room": ana.token, "subscribeToken": ana.token, "view": view(&ana)},
        {"name": "bo", "room": bo.token, "subscribeToken": bo.token, "view": view(&bo)},
    ]);
    let mut tool = Live::start(a, "stage", TOKEN, 45, &spec);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    tool.next(LINE_LIMIT, "setup", |v| is(v, "corpus-start", "host", ""));
    let setup_s = began.elapsed().as_secs_f64();
    tool.send("room ana hand.raise");
    let raised = tool.next(LINE_LIMIT, "the host sees the hand", |v| {
        is(v, "room", "host", "hand.raised")
    });
    assert_eq!(raised["data"]["memberId"], ana.id.as_str());
    let promote_at = common::unix_ms();
    tool.send(&format!(
        "room host promote {}",
        json!({"memberId": ana.id})
    ));
    let promoted = tool.next(LINE_LIMIT, "member.promoted", |v| {
        is(v, "room", "ana", "member.promoted")
    });
    assert_eq!(promoted["data"]["sourceId"], ana.id.as_str());
    let old_jwt = promoted["data"]["jwt"].as_str().unwrap().to_owned();
    // A signalling socket opened with it now, to try it again after the demotion.
    let mut old_socket = rt.block_on(connect(a, &old_jwt)).unwrap();
    tool.send("publish ana");
    let heard = tool.next(LINE_LIMIT, "bo's vad naming ana", |v| {
        is(v, "broadcast", "bo", "vad") && v["data"]["sourceId"] == ana.id.as_str()
    });
    let heard_at = heard["t"].as_f64().unwrap();
    let mid = heard["data"]["mediaId"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(3));
    let demote_at = common::unix_ms();
    tool.send(&format!("room host demote {}", json!({"memberId": ana.id})));
    let gone = tool.next(LINE_LIMIT, "bo's inactive for ana", |v| {
        is(v, "broadcast", "bo", "inactive") && v["data"]["sourceId"] == ana.id.as_str()
    });
    let gone_at = gone["t"].as_f64().unwrap();

    // The old publish JWT is refused everywhere: on the socket opened before, at a new socket,
    // at the director; Ana's room token no longer publishes either.
    let r = rt.block_on(call(
        &mut old_socket,
        &cmd(1, "publish", json!({"sdp": "x", "sourceId": ana.id})),
    ));
    assert!(
        msg(&r).contains("demoted: this publish token is revoked"),
        "{r}"
    );
    let refused = rt.block_on(open(&format!("ws://{a}/ws?token={old_jwt}")));
    assert_eq!(refused.err().map(|e| e.0), Some(403));
    let (s, v) = director(a, "publish", &old_jwt, "stage");
    assert!(s == 403 && msg(&v).contains("revoked"), "{v}");
    let (s, v) = director(a, "publish", &ana.token, "stage");
    assert_eq!(s, 403, "{v}");

    std::thread::sleep(Duration::from_millis(2500));
    tool.send("room host state");
    let state = tool.next(LINE_LIMIT, "the room's state", |v| {
        v["event"] == "room-response" && v["name"] == "host" && v["command"] == "state"
    });
    tool.send("quit");
    let report = tool.finish(LINE_LIMIT);

    // Still in the room, as audience: two in the audience, the host alone on stage.
    let state = &state["data"];
    assert_eq!(state["audienceCount"], 2, "{state}");
    assert_eq!(state["members"].as_array().unwrap().len(), 1, "{state}");
    let parts = &report["participants"];
    assert!(parts["ana"]["room"]["closedAt"].is_null());
    assert_eq!(parts["ana"]["publish"]["stoppedBy"], "demoted");
    // Ana's view ran on through it all.
    let ana_view = &parts["ana"]["view"];
    assert!(
        ana_view["errors"].as_array().unwrap().is_empty(),
        "{ana_view}"
    );
    assert!(ana_view["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "inactive" && e["t"].as_f64().unwrap() >= demote_at));

    // The host saw the hand go up and down, Ana come on stage, talk and go back.
    let host_saw = room_events(&report, "host");
    let about_ana = |n: &str, key: &str, val: Value| {
        host_saw
            .iter()
            .position(|(name, d)| name == n && d["memberId"] == ana.id.as_str() && d[key] == val)
            .unwrap_or_else(|| panic!("host never got {n} {key}={val}: {host_saw:?}"))
    };
    let order = [
        about_ana("hand.raised", "userName", json!("Ana")),
        about_ana("hand.lowered", "memberId", json!(ana.id)),
        about_ana("member.updated", "role", json!("member")),
        about_ana("member.talking", "talking", json!(true)),
        about_ana("member.talking", "talking", json!(false)),
        about_ana("member.updated", "role", json!("audience")),
    ];
    assert!(order[..4].windows(2).all(|w| w[0] < w[1]), "{host_saw:?}");
    assert!(order[4] > order[3] && order[5] > order[3], "{host_saw:?}");
    assert!(
        host_saw
            .iter()
            .any(|(n, d)| n == "member.talking" && d["memberId"] == host.id.as_str()),
        "the host's own talking is told too"
    );
    assert!(room_events(&report, "bo")
        .iter()
        .all(|(n, d)| n != "member.left" || d["memberId"] != ana.id.as_str()));

    // Bo heard Ana in the track vad named, and nothing there once she was sent back.
    let bo_view = &parts["bo"]["view"];
    let e = energy(bo_view, &mid);
    let while_on = loudest(&e, heard_at + 400.0, demote_at);
    assert!(while_on > 0.02, "Ana not heard on mid {mid}: {while_on}");
    let vads: Vec<&Value> = bo_view["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "vad")
        .collect();
    assert!(vads
        .iter()
        .all(|e| e["t"].as_f64().unwrap() < gone_at || e["data"]["sourceId"] != ana.id.as_str()));
    let emptied = vads
        .iter()
        .find(|e| e["data"]["mediaId"] == mid.as_str() && e["t"].as_f64().unwrap() >= demote_at)
        .expect("a vad for Ana's track after the demotion");
    assert!(emptied["data"]["sourceId"].is_null(), "{emptied}");
    let end = e.last().unwrap().0;
    for m in ["1", "2"] {
        let after = loudest(&energy(bo_view, m), gone_at + 800.0, end);
        assert!(
            after < 0.005,
            "mid {m} still sounds after the demotion: {after}"
        );
    }
    eprintln!(
        "rooms e2e: setup {setup_s:.1} s, promote -> bo's vad {:.0} ms, demote -> bo's inactive {:.0} ms, Ana on mid {mid} peak {while_on:.3}, total {:.1} s",
        heard_at - promote_at,
        gone_at - demote_at,
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn member_talking_crosses_the_origin_edge_link_in_a_split_deployment() {
    let _serial = common::serial();
    let origin = common::origin_with(
        TOKEN,
        "cluster-secret",
        &["--jwt-ttl", "10m"],
        &[("CHORUS_API_KEY", API_KEY)],
    );
    let edge = common::edge(&origin, "cluster-secret");
    let a = origin.http();
    let host = room_token(a, "stage", "Host", "member", &HOST_PERMISSIONS);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut h = rt.block_on(room_socket(a, "stage", &host)).unwrap();
    rt.block_on(event(&mut h, "room.state"));
    // A viewer at the edge, the host publishing over WHIP at the origin with its room token.
    let _viewer = common::Reaped(
        common::whep_command(edge.http(), "stage", &["--tracks", "1", "--seconds", "14"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _publisher = common::Reaped(
        common::whip_command_as(a, "stage", &host.id, "host", &host.token, 14)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The corpus host talks for its first 6 s: the edge's voice activity says so, then says
    // it stopped, and the room at the origin tells its participants.
    let mut talking = |want: bool| {
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(20), async {
                loop {
                    let d = event(&mut h, "member.talking").await;
                    if d["memberId"] == host.id.as_str() && d["talking"] == want {
                        return;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no member.talking {want} for the host"))
        })
    };
    talking(true);
    talking(false);
}

#[test]
fn sdk_a_muted_member_is_heard_by_nobody_until_unmuted() {
    use std::time::Duration;
    let _serial = common::serial();
    let p = serve();
    let a = p.http();
    let mods = ["room.member.audio_mute", "room.member.audio_unmute"];
    let host = room_token(a, "stage", "Host", "member", &mods);
    let ana = room_token(a, "stage", "Ana", "member", &[]);
    let bo = room_token(a, "stage", "Bo", "audience", &[]);
    // Ana publishes the corpus speaker ana (her turn: 5.2-11 s); Bo listens with two tracks.
    let spec = json!([
        {"name": "host", "room": host.token},
        {"name": "ana", "publish": "ana", "sourceId": ana.id, "token": ana.token, "room": ana.token},
        {"name": "bo", "room": bo.token, "subscribeToken": bo.token, "view": {"tracks": 2}},
    ]);
    let mut tool = Live::start(a, "stage", TOKEN, 30, &spec);
    let heard = tool.next(LINE_LIMIT, "bo's vad naming ana", |v| {
        is(v, "broadcast", "bo", "vad") && v["data"]["sourceId"] == ana.id.as_str()
    });
    let mid = heard["data"]["mediaId"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(1000));
    // Without the permission, Bo cannot mute anyone (an audience member cannot even mute
    // itself: it has nothing to mute).
    tool.send(&format!(
        "room bo audio.mute {}",
        json!({"memberId": ana.id})
    ));
    let refused = tool.next(LINE_LIMIT, "bo's refusal", |v| {
        v["event"] == "room-response" && v["name"] == "bo"
    });
    assert!(refused["ok"] == false, "{refused}");
    let mute_at = common::unix_ms();
    tool.send(&format!(
        "room host audio.mute {}",
        json!({"memberId": ana.id})
    ));
    let updated = tool.next(LINE_LIMIT, "member.updated muted", |v| {
        is(v, "room", "bo", "member.updated") && v["data"]["muted"] == true
    });
    assert_eq!(updated["data"]["memberId"], ana.id.as_str());
    std::thread::sleep(Duration::from_millis(2500));
    let unmute_at = common::unix_ms();
    tool.send(&format!(
        "room host audio.unmute {}",
        json!({"memberId": ana.id})
    ));
    let back = tool.next(LINE_LIMIT, "bo's vad naming ana again", |v| {
        is(v, "broadcast", "bo", "vad")
            && v["data"]["sourceId"] == ana.id.as_str()
            && v["t"].as_f64().unwrap() > unmute_at
    });
    let back_at = back["t"].as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let dropped = common::metric(a, "chorus_origin_dropped_total{reason=\"muted\"}").unwrap_or(0.0);
    tool.send("quit");
    let report = tool.finish(LINE_LIMIT);
    let bo_view = &report["participants"]["bo"]["view"];
    let e = energy(bo_view, &mid);
    let before = loudest(&e, heard["t"].as_f64().unwrap() + 300.0, mute_at);
    // Muted: nothing of Ana reaches Bo on any track (after the packets already in flight and
    // the receiver's buffer), while she goes on talking.
    let muted = ["1", "2"]
        .map(|m| loudest(&energy(bo_view, m), mute_at + 400.0, unmute_at))
        .into_iter()
        .fold(0.0, f64::max);
    let after = loudest(&e, back_at + 200.0, back_at + 1000.0).max(loudest(
        &energy(bo_view, if mid == "1" { "2" } else { "1" }),
        back_at + 200.0,
        back_at + 1000.0,
    ));
    eprintln!(
        "mute: before {before:.3}, muted {muted:.4}, after {after:.3}; unmute -> vad {:.0} ms; {dropped} packets held back",
        back_at - unmute_at
    );
    assert!(before > 0.02, "Ana not heard before the mute: {before}");
    assert!(muted < 0.005, "Ana heard while muted: {muted}");
    assert!(after > 0.02, "Ana not heard after the unmute: {after}");
    assert!(
        back_at - unmute_at < 1000.0,
        "unmute took {} ms",
        back_at - unmute_at
    );
    assert!(dropped > 50.0, "the origin held back {dropped} packets");
}
