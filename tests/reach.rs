//! Reaching listeners whose network blocks direct UDP: TURN through a real coturn (Debian
//! `coturn`'s turnserver, started here on free loopback ports with `use-auth-secret`), the
//! official SDK in headless Chromium forced to relay only, over UDP and over TCP.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{post_json, room_tool, Proc, Reaped};
use serde_json::{json, Value};

const TOKEN: &str = "test-publish-token";
const SECRET: &str = "reach-test-static-auth-secret";
const API_KEY: &str = "reach-test-room-api-key";
/// The TURN credential lifetime chorus hands out (its TURN_CREDENTIAL_TTL_SECS).
const CREDENTIAL_TTL: u64 = 24 * 3600;

/// A turnserver of the test's own on a free loopback port (UDP and TCP), TURN REST API
/// credentials with [`SECRET`], relaying to loopback peers, logging verbosely to its own file;
/// killed when dropped.
struct Coturn {
    _child: Reaped,
    port: u16,
    log: PathBuf,
}

impl Coturn {
    fn start(name: &str) -> Coturn {
        let dir = common::tempdir(&format!("coturn-{name}"));
        let log = dir.join("turn.log");
        let _ = std::fs::remove_file(&log);
        let port = common::free_port();
        // Relay ports: a range of 200 just above a free port (collisions only cost a retry
        // inside coturn, which picks another port of the range).
        let relay = common::free_port().clamp(20_000, 65_000);
        let child = Command::new("turnserver")
            .args([
                "-n",
                "-v",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--simple-log",
            ])
            .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
            .args(["--listening-port", &port.to_string()])
            .args(["--min-port", &relay.to_string()])
            .args(["--max-port", &(relay + 200).to_string()])
            .args(["--use-auth-secret", "--static-auth-secret", SECRET])
            .args(["--realm", "chorus.test", "--allow-loopback-peers"])
            .arg("--log-file")
            .arg(&log)
            .arg("--pidfile")
            .arg(dir.join("turn.pid"))
            .arg("--userdb")
            .arg(dir.join("turn.db"))
            .arg("--no-stdout-log")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver runs (scripts/setup-test-deps.sh installs Debian's coturn)");
        let child = Reaped(child);
        common::wait_listening(port, "turnserver");
        Coturn {
            _child: child,
            port,
            log,
        }
    }

    fn url(&self, transport: &str) -> String {
        format!("turn:127.0.0.1:{}?transport={transport}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `chorus serve` in dev mode handing out these TURN URLs.
fn serve_with_turn(urls: &[String]) -> Proc {
    let mut args = vec!["serve", "--http", "127.0.0.1:0"];
    for u in urls {
        args.extend(["--turn-url", u.as_str()]);
    }
    Proc::start(
        "serve",
        &args,
        &[
            ("CHORUS_PUBLISH_TOKEN", TOKEN),
            ("CHORUS_TURN_SECRET", SECRET),
            ("CHORUS_API_KEY", API_KEY),
        ],
    )
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks one director answer's iceServers: these URLs, a username `expiry:stream` with
/// expiry a day ahead, and the credential the TURN REST API scheme gives (checked with
/// openssl, independently of chorus).
fn assert_turn_credentials(answer: &Value, urls: &[String], stream: &str) {
    let servers = answer["data"]["iceServers"].as_array().expect("iceServers");
    assert_eq!(servers.len(), 1, "{answer}");
    let s = &servers[0];
    assert_eq!(s["urls"], json!(urls), "{answer}");
    let username = s["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, stream);
    let expiry: u64 = expiry.parse().unwrap();
    let now = now_unix();
    assert!(
        expiry >= now + CREDENTIAL_TTL - 60 && expiry <= now + CREDENTIAL_TTL + 1,
        "{username}"
    );
    let openssl = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf %s '{username}' | openssl dgst -sha1 -hmac '{SECRET}' -binary | base64"
        ))
        .output()
        .expect("openssl runs");
    assert_eq!(
        s["credential"].as_str().unwrap(),
        String::from_utf8_lossy(&openssl.stdout).trim(),
        "{answer}"
    );
}

/// A room token for `user` of room `stage`: (token, member id).
fn room_token(p: &Proc, user: &str, join_as: &str, perms: &[&str]) -> (String, String) {
    let body = json!({"user_name": user, "join_as": join_as, "permissions": perms});
    let (s, v) = post_json(
        p.http(),
        "/api/rooms/stage/tokens",
        Some(API_KEY),
        &body.to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let data = &v["data"];
    (
        data["token"].as_str().unwrap().to_owned(),
        data["memberId"].as_str().unwrap().to_owned(),
    )
}

/// A listener brought on stage publishes with the credentials of `member.promoted`, not through
/// the director: they must carry the TURN servers too, or a promoted listener behind a firewall
/// that blocks UDP could listen but never speak.
#[tokio::test]
async fn a_promoted_room_member_s_credentials_carry_the_turn_servers() {
    use common::ws::{call, event, open};
    let urls = vec!["turn:127.0.0.1:3478?transport=udp".to_owned()];
    let p = serve_with_turn(&urls);
    let a = p.http();
    let (host, _) = room_token(&p, "Host", "member", &["room.member.promote"]);
    let (ana, ana_id) = room_token(&p, "Ana", "audience", &[]);
    let room = |token: String| format!("ws://{a}/api/rooms/stage/ws?token={token}");
    let mut h = open(&room(host)).await.expect("the host's room socket");
    let mut s_ana = open(&room(ana)).await.expect("Ana's room socket");
    let promote = json!({"type": "cmd", "transId": 1, "name": "promote",
        "data": {"memberId": ana_id}});
    let r = call(&mut h, &promote.to_string()).await;
    assert_eq!(r["data"]["role"], "member", "{r}");
    let creds = event(&mut s_ana, "member.promoted").await;
    assert_turn_credentials(&json!({ "data": creds }), &urls, "stage");
}

#[test]
fn director_answers_carry_turn_credentials_from_flags_and_config() {
    let urls = vec![
        "turn:127.0.0.1:3478?transport=udp".to_owned(),
        "turns:turn.example.com:5349?transport=tcp".to_owned(),
    ];
    let p = serve_with_turn(&urls);
    let body = r#"{"streamName":"panel"}"#;
    let (status, sub) = post_json(p.http(), "/api/director/subscribe", None, body);
    assert_eq!(status, 200, "{sub}");
    assert_turn_credentials(&sub, &urls, "panel");
    let (status, publ) = post_json(p.http(), "/api/director/publish", Some(TOKEN), body);
    assert_eq!(status, 200, "{publ}");
    assert_turn_credentials(&publ, &urls, "panel");
    drop(p);

    // The same from a config file, the secret in a file of its own.
    let dir = common::tempdir("reach-config");
    std::fs::write(dir.join("turn-secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(
        dir.join("chorus.toml"),
        format!(
            "turn-url = [\"{}\", \"{}\"]\nturn-secret-file = \"{}\"\n",
            urls[0],
            urls[1],
            dir.join("turn-secret").display()
        ),
    )
    .unwrap();
    let config = dir.join("chorus.toml");
    let p = Proc::start(
        "serve",
        &[
            "serve",
            "--http",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[("CHORUS_PUBLISH_TOKEN", TOKEN)],
    );
    let (status, sub) = post_json(p.http(), "/api/director/subscribe", None, body);
    assert_eq!(status, 200, "{sub}");
    assert_turn_credentials(&sub, &urls, "panel");
    drop(p);

    // Without TURN: an empty list, as before.
    let p = common::serve(TOKEN);
    let (_, sub) = post_json(p.http(), "/api/director/subscribe", None, body);
    assert_eq!(sub["data"]["iceServers"], json!([]), "{sub}");
    drop(p);

    // Half a setting is refused at start, and says what is missing; the secret is never shown.
    for (args, env, want) in [
        (
            vec!["--turn-url", "turn:127.0.0.1:3478"],
            vec![],
            "needs --turn-secret",
        ),
        (
            vec!["--turn-url", "stun:127.0.0.1:3478"],
            vec![("CHORUS_TURN_SECRET", SECRET)],
            "expected turn:HOST",
        ),
        (
            vec![],
            vec![("CHORUS_TURN_SECRET", SECRET)],
            "no --turn-url",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["serve", "--http", "127.0.0.1:0"])
            .args(&args)
            .envs(env)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(!err.contains(SECRET), "{err}");
    }
}

/// Two SDK publishers and one SDK viewer, all relay only, through a coturn reached over
/// `transport`: everyone's selected candidate pair is a relay one of that transport, coturn
/// logs their allocations under the credentials chorus signed, the viewer gets `vad` for both
/// talkers and hears the track that names them.
fn relay_only_room(transport: &str) {
    let _serial = common::serial();
    let turn = Coturn::start(transport);
    let p = serve_with_turn(&[turn.url(transport)]);
    let spec = json!([
        {"name": "p-ana", "publish": "ana", "relay": true},
        {"name": "p-bo", "publish": "bo", "relay": true},
        {"name": "listener", "view": {"tracks": 2}, "relay": true},
    ]);
    let started = Instant::now();
    let rep = room_tool::run(p.http(), "panel", TOKEN, 16, &spec);
    eprintln!(
        "relay-only room over {transport}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let parts = &rep["participants"];
    for (name, role) in [
        ("p-ana", "publish"),
        ("p-bo", "publish"),
        ("listener", "view"),
    ] {
        let r = &parts[name][role];
        let pair = &r["pair"];
        assert_eq!(pair["local"]["type"], "relay", "{name}: {pair}");
        assert_eq!(pair["local"]["relayProtocol"], transport, "{name}: {pair}");
        assert_eq!(pair["remote"]["type"], "host", "{name}: {pair}");
        assert_eq!(r["iceServers"][0]["urls"], json!([turn.url(transport)]));
    }
    // coturn accepted chorus's credentials: an allocation per peer connection, under the
    // stream's user name.
    let log = turn.log();
    let allocations = log
        .lines()
        .filter(|l| l.contains(":panel>: incoming packet ALLOCATE processed, success"))
        .count();
    assert!(allocations >= 3, "{allocations} allocations in:\n{log}");
    // vad names both talkers, and the track carrying each is loud while it does.
    room_tool::assert_vad_and_sound(&parts["listener"]["view"], &["ana", "bo"]);
}

#[test]
fn sdk_publishes_and_views_relay_only_through_coturn_over_udp() {
    relay_only_room("udp");
}

#[test]
fn sdk_publishes_and_views_relay_only_through_coturn_over_tcp() {
    relay_only_room("tcp");
}

/// The wall time (ms) of the first `pc-state connected` of `role` after `after`.
fn connected_after(tool: &mut room_tool::Live, role: &str, after: f64) -> f64 {
    tool.next(
        std::time::Duration::from_secs(30),
        &format!("{role} connected again"),
        |v| {
            v["event"] == "pc-state"
                && v["role"] == role
                && v["state"] == "connected"
                && v["t"].as_f64().unwrap() > after
        },
    )["t"]
        .as_f64()
        .unwrap()
}

/// The operator ends a viewer's and then a publisher's signalling session
/// (`POST /api/streams/{name}/disconnect?scope=...`): the SDK, with its own autoReconnect,
/// comes back through the director by itself within 5 s, from the disconnect to the new peer
/// connection's `connected`; the operator's end is counted as answered consent checks.
#[test]
fn sdk_reconnects_by_itself_after_the_operator_ends_its_sessions() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let spec = json!([
        {"name": "p", "publish": "host", "autoReconnect": true},
        {"name": "v", "view": {"tracks": 2}, "autoReconnect": true},
    ]);
    let mut tool = room_tool::Live::start(p.http(), "rc", TOKEN, 45, &spec);
    tool.next(Duration::from_secs(60), "corpus start", |v| {
        v["event"] == "corpus-start"
    });
    let mut took = Vec::new();
    for (scope, role) in [("subscribe", "view"), ("publish", "publish")] {
        std::thread::sleep(Duration::from_secs(2));
        let at = common::unix_ms();
        let (status, v) = post_json(
            p.http(),
            &format!("/api/streams/rc/disconnect?scope={scope}"),
            None,
            "",
        );
        assert_eq!((status, &v), (200, &json!({"disconnected": 1})));
        let back = connected_after(&mut tool, role, at);
        eprintln!("{role}: back {:.0} ms after the disconnect", back - at);
        took.push((role, back - at));
    }
    for name in ["chorus_edge_dropped_total", "chorus_origin_dropped_total"] {
        let told = common::metric(p.http(), &format!("{name}{{reason=\"stun_ended\"}}"));
        assert!(
            told > Some(0.0),
            "{name}: {told:?} ended peers' checks answered"
        );
    }
    // The publication is back at the origin, and the viewer hears it again.
    common::wait_for("host published again", Duration::from_secs(10), || {
        let (_, v) = common::get_json(p.http(), "/api/streams/rc");
        (v["sources"][0]["audio"]["packets"].as_u64() > Some(50)).then_some(())
    });
    let reconnected_at = common::unix_ms();
    std::thread::sleep(Duration::from_secs(8));
    tool.send("quit");
    let rep = tool.next(Duration::from_secs(30), "report", |v| {
        v["event"] == "report"
    });
    let parts = &rep["participants"];
    for (name, role) in [("p", "publish"), ("v", "view")] {
        let n = parts[name][role]["reconnects"].as_array().unwrap().len();
        assert!(n >= 1, "{name}: no reconnect recorded");
    }
    let v = &parts["v"]["view"];
    let loud = v["tracks"]
        .as_object()
        .unwrap()
        .keys()
        .map(|mid| room_tool::loudest(&room_tool::energy(v, mid), reconnected_at, f64::MAX))
        .fold(0.0, f64::max);
    assert!(loud > 0.02, "silent after the reconnects: {loud}");
    // SDK 0.6.1 reconnects only once its RTCPeerConnection leaves "connected": the STUN 403
    // chorus gives an ended peer's consent checks makes Chromium drop the pair at the next
    // check (every ~2.5 s) instead of after ~7 s of silence.
    for (role, ms) in took {
        assert!(ms < 5_000.0, "{role} took {ms} ms to come back");
    }
}
