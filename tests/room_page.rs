//! The room page (`/rooms/{room}`, web/room.js) in headless Chromium, used as people would
//! (tests/browser/pages.mjs clicks its buttons and waits for what it shows): a host and a
//! listener who joins through dev mode's token helper, raises a hand, is brought on stage,
//! talks (the ring), is muted, sent back and removed. And the helper's refusals. The browser
//! test needs scripts/setup-test-deps.sh.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::room_tool::Live;
use common::{http, post_json};
use serde_json::{json, Value};

const ROOM: &str = "townhall";
const HOST_PERMISSIONS: [&str; 7] = [
    "room.member.promote",
    "room.member.demote",
    "room.member.remove",
    "room.member.audio_mute",
    "room.member.audio_unmute",
    "room.self.audio_mute",
    "room.self.audio_unmute",
];

/// tests/browser/pages.mjs: one Chromium whose fake microphone plays Ana's 6 s turn of the panel
/// corpus (then 0.8 s of silence), looped.
struct Pages {
    live: Live,
}

impl Pages {
    fn start() -> Pages {
        let (dir, script) = common::node_harness("pages.mjs");
        let mut c = Command::new("node");
        c.current_dir(&dir)
            .arg(script)
            .arg("--fake-audio")
            .arg(common::corpus().join("ana.opus"))
            .args(["--from", "5", "--to", "11.2", "--timeout", "90"]);
        let mut live = Live::spawn(c);
        live.next(Duration::from_secs(30), "chromium", |v| {
            v["event"] == "ready"
        });
        Pages { live }
    }

    /// Runs one command; its reply, which must say it worked.
    fn run(&mut self, cmd: Value) -> Value {
        self.live.send(&cmd.to_string());
        let r = self
            .live
            .next(Duration::from_secs(30), &format!("a reply to {cmd}"), |v| {
                v["event"] == "reply"
            });
        if r["ok"] != true {
            panic!("{cmd} failed: {r}; page console: {:#?}", self.console());
        }
        r
    }

    fn console(&mut self) -> Vec<Value> {
        self.live.drain();
        let seen = self.live.seen.iter();
        seen.filter(|v| v["event"] == "console").cloned().collect()
    }

    fn open(&mut self, page: &str, url: &str) {
        self.run(json!({"cmd": "open", "name": page, "url": url}));
    }

    fn click(&mut self, page: &str, selector: &str) {
        self.run(json!({"cmd": "click", "name": page, "selector": selector}));
    }

    /// Until `selector` is visible on `page` (at most `ms`): how long it took.
    fn wait(&mut self, page: &str, selector: &str, ms: u64) -> u64 {
        let r = self.run(json!({"cmd": "wait", "name": page, "selector": selector, "ms": ms}));
        r["ms"].as_u64().unwrap()
    }

    /// Until nothing matching `selector` is visible on `page` (at most `ms`).
    fn gone(&mut self, page: &str, selector: &str, ms: u64) -> u64 {
        let r = self.run(json!({"cmd": "gone", "name": page, "selector": selector, "ms": ms}));
        r["ms"].as_u64().unwrap()
    }

    fn count(&mut self, page: &str, selector: &str) -> u64 {
        let r = self.run(json!({"cmd": "count", "name": page, "selector": selector}));
        r["value"].as_u64().unwrap()
    }

    fn attr(&mut self, page: &str, selector: &str, attr: &str) -> String {
        let r = self.run(json!({"cmd": "attr", "name": page, "selector": selector, "attr": attr}));
        r["value"].as_str().unwrap().to_owned()
    }
}

/// The member's card on the stage of a page, with `more` (e.g. `.talking`).
fn card(member: &str, more: &str) -> String {
    format!("#stage li.member[data-member-id=\"{member}\"]{more}")
}

/// Does the origin hold a live publication of `source` in the room's stream?
fn publishing(a: std::net::SocketAddr, source: &str) -> bool {
    let (status, _, body) = http(a, "GET", &format!("/api/streams/{ROOM}"), &[], b"");
    status == 200 && String::from_utf8_lossy(&body).contains(&format!("\"{source}\""))
}

fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo().join("target"));
    target.join("room-page.png")
}

#[test]
fn a_host_brings_a_listener_on_stage_sees_her_talk_mutes_demotes_and_removes_her() {
    let _serial = common::serial();
    let began = Instant::now();
    let serve = common::serve("room-page-publish-token");
    let a = serve.http();
    let key = serve.info["apiKey"].as_str().unwrap().to_owned();
    // The host's token comes from "the backend" (the API key); the listener's from the page's
    // dev-mode join button.
    let body =
        json!({"user_name": "Hana Host", "join_as": "member", "permissions": HOST_PERMISSIONS});
    let (s, v) = post_json(
        a,
        &format!("/api/rooms/{ROOM}/tokens"),
        Some(&key),
        &body.to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let host_token = v["data"]["token"].as_str().unwrap();
    let host_id = v["data"]["memberId"].as_str().unwrap().to_owned();

    let mut p = Pages::start();
    p.open(
        "host",
        &format!("http://{a}/rooms/{ROOM}?token={host_token}"),
    );
    p.wait("host", "#me[data-state=\"on-stage\"]", 15_000);
    p.wait("host", "#listening[data-state=\"connected\"]", 15_000);
    assert!(
        publishing(a, &host_id),
        "the host's page publishes as its member id"
    );
    // The host mutes itself, so that the only voice on stage is the listener's.
    p.click("host", "#mute-me");
    p.wait("host", &card(&host_id, ".me.muted"), 5_000);
    p.wait("host", "#me-status:has-text(\"muted\")", 5_000);
    p.gone("host", &card(&host_id, ".talking"), 6_000);

    p.open("ana", &format!("http://{a}/rooms/{ROOM}"));
    p.run(json!({"cmd": "fill", "name": "ana", "selector": "#join-form input[name=name]", "text": "Ana Lima"}));
    p.click("ana", "#join-listener");
    p.wait("ana", "#me[data-state=\"audience\"]", 10_000);
    p.wait("ana", "#listening[data-state=\"connected\"]", 15_000);
    p.wait("host", "#audience-count:text-is(\"1\")", 5_000);
    // She sees the host on stage (muted), herself in the audience.
    p.wait("ana", &card(&host_id, ".muted:not(.me)"), 5_000);

    p.click("ana", "#raise-hand");
    p.wait("ana", "#lower-hand", 5_000);
    let hand = "#hands li[data-member-id] button[data-action=\"promote\"]";
    p.wait("host", hand, 5_000);
    let ana_id = p.attr("host", hand, "data-member-id");
    assert!(ana_id.starts_with("m-"), "{ana_id}");
    assert_eq!(
        p.count("ana", "#hands button"),
        0,
        "a listener gets no host buttons"
    );

    p.click("host", hand);
    let on_stage_ms = p.wait("ana", "#me[data-state=\"on-stage\"]", 15_000);
    p.wait("host", "#hands-empty", 5_000);
    p.wait("host", "#audience-count:text-is(\"0\")", 5_000);
    assert!(
        publishing(a, &ana_id),
        "her page publishes as her member id"
    );
    // The ring: on the host's page and her own, on her card only (the host is muted).
    let ring_ms = p.wait("host", &card(&ana_id, ".talking"), 10_000);
    p.wait("ana", &card(&ana_id, ".me.talking"), 10_000);
    assert_eq!(p.count("host", "#stage li.member.talking"), 1);
    p.run(json!({"cmd": "screenshot", "name": "host", "path": screenshot_path()}));
    let tracks = p.count("host", "#players audio");
    assert_eq!(tracks, 4, "the main track and 3 multiplexed tracks play");

    // Muted at the origin: both pages say so and her ring goes out while she talks on...
    p.click(
        "host",
        &card(&ana_id, " button[data-action=\"audio.mute\"]"),
    );
    p.wait("ana", "#me-status:has-text(\"muted\")", 5_000);
    p.wait("ana", &card(&ana_id, ".muted"), 5_000);
    let ring_off_ms = p.gone("host", &card(&ana_id, ".talking"), 6_000);
    // ...and comes back when she is unmuted.
    p.click(
        "host",
        &card(&ana_id, " button[data-action=\"audio.unmute\"]"),
    );
    let ring_back_ms = p.wait("host", &card(&ana_id, ".talking:not(.muted)"), 10_000);

    // Back to the audience: off both stages, her publication stopped, her hand free to rise.
    p.click("host", &card(&ana_id, " button[data-action=\"demote\"]"));
    p.gone("host", &card(&ana_id, ""), 5_000);
    p.gone("ana", &card(&ana_id, ""), 5_000);
    p.wait("ana", "#me[data-state=\"audience\"]", 5_000);
    p.wait("host", "#audience-count:text-is(\"1\")", 5_000);
    common::wait_for("her publication to end", Duration::from_secs(5), || {
        (!publishing(a, &ana_id)).then_some(())
    });

    // Removed from the raised hands' list: her page ends, the hand leaves the host's list.
    p.click("ana", "#raise-hand");
    let hand = format!("#hands li[data-member-id=\"{ana_id}\"] button[data-action=\"remove\"]");
    p.click("host", &hand);
    p.wait("ana", "#status:has-text(\"removed\")", 5_000);
    p.wait("ana", "#me[data-state=\"ended\"]", 5_000);
    p.wait("ana", "#listening[data-state=\"off\"]", 5_000);
    p.gone("host", &hand, 5_000);
    p.wait("host", "#audience-count:text-is(\"0\")", 5_000);
    p.wait("host", "#me[data-state=\"on-stage\"]", 1_000);

    let errors: Vec<Value> = p
        .console()
        .into_iter()
        .filter(|v| v["type"] == "pageerror")
        .collect();
    assert!(errors.is_empty(), "page errors: {errors:#?}");
    p.live.send(&json!({"cmd": "quit"}).to_string());
    p.live
        .next(Duration::from_secs(10), "the tool's exit", |v| {
            v["event"] == "exit"
        });
    eprintln!(
        "room page: promote click to on stage {on_stage_ms} ms, then ring {ring_ms} ms; \
         mute to ring off {ring_off_ms} ms, unmute to ring {ring_back_ms} ms; \
         whole test {:.1} s; screenshot {}",
        began.elapsed().as_secs_f64(),
        screenshot_path().display()
    );
}

/// The dev token helper: the page's own request on this machine gets a working room token;
/// another site's script does not; without dev mode there is no helper.
#[test]
fn the_dev_token_helper_serves_the_page_on_this_machine_only() {
    let serve = common::serve("room-page-publish-token");
    let a = serve.http();
    for (path, has) in [
        (format!("/rooms/{ROOM}"), "../room.js"),
        ("/room.js".to_owned(), "member.talking"),
        ("/room.css".to_owned(), ".talking"),
    ] {
        let (s, _, body) = http(a, "GET", &path, &[], b"");
        assert_eq!(s, 200, "{path}");
        assert!(String::from_utf8_lossy(&body).contains(has), "{path}");
    }
    let helper = format!("/api/dev/rooms/{ROOM}/tokens");
    let ask = |origin: &str, body: &str| {
        let (s, _, b) = http(
            a,
            "POST",
            &helper,
            &[("Origin", origin), ("Content-Type", "application/json")],
            body.as_bytes(),
        );
        (s, serde_json::from_slice::<Value>(&b).unwrap())
    };
    let (s, v) = ask(&format!("http://{a}"), r#"{"user_name":"Ana"}"#);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["role"], "audience");
    let token = v["data"]["token"].as_str().unwrap();
    let sub = json!({"streamName": ROOM, "streamAccountId": "chorus"}).to_string();
    let (s, v) = post_json(a, "/api/director/subscribe", Some(token), &sub);
    assert_eq!(s, 200, "the helper's token is a room token: {v}");
    let (s, v) = ask(&format!("http://{a}"), r#"{"user_name":""}"#);
    assert_eq!(s, 400, "the API's own checks: {v}");
    let (s, v) = ask("https://evil.example", r#"{"user_name":"Ana"}"#);
    assert_eq!(s, 403, "{v}");
    assert!(v["data"]["message"]
        .as_str()
        .unwrap()
        .contains("cross-origin"));
    drop(serve);

    let dir = common::tempdir("room-page");
    let tokens = dir.join("tokens.json");
    let file = json!({"tokens": [{"token": "pub", "stream": "*", "kind": "publish"}]});
    std::fs::write(&tokens, file.to_string()).unwrap();
    let prod = common::serve_token_file(&tokens, &["--api-key", "room-page-key"]);
    let (s, _, b) = http(prod.http(), "POST", &helper, &[], br#"{"user_name":"Ana"}"#);
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&b).contains("not in dev mode"));
    let _ = std::fs::remove_dir_all(dir);
}
