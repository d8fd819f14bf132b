//! A second browser engine: the official SDK in Debian's Firefox ESR (puppeteer-core over
//! WebDriver BiDi) publishes and views against chorus, next to Chromium.
//!
//! Firefox gathers no ICE candidate on loopback and none at all on a host without a default
//! route, so the test makes a network namespace of its own: a veth pair with a private
//! address and a default route through it, chorus's media bound to that address, chorus,
//! Chromium and Firefox all inside (signalling stays on the namespace's 127.0.0.1, a secure
//! context). Firefox's AudioContext never starts without an audio output: a pulseaudio with a
//! null sink, started here, is its output.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it) and root (network namespaces).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::room_tool::{energy, loudest, report, turns_at};
use common::{corpus, node_harness, Proc, Reaped};
use serde_json::{json, Value};

const TOKEN: &str = "test-publish-token";
/// chorus's media address inside the namespace (the namespace is the test's own, so a fixed
/// address collides with nothing).
const MEDIA_IP: &str = "10.213.0.1";

/// A namespace of the test's own with a veth pair inside: MEDIA_IP/24 on one end and a default
/// route through it (without a default route Firefox gathers nothing, not even on ff0).
fn media_namespace() -> NetNs {
    let ns = NetNs::create("ff");
    ns.ip(&["link", "add", "ff0", "type", "veth", "peer", "name", "ff1"]);
    ns.address("ff0", &format!("{MEDIA_IP}/24"));
    ns.ip(&["link", "set", "ff1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.213.0.2", "dev", "ff0"]);
    ns
}

/// A pulseaudio of the test's own with a null sink and an anonymous socket in a temporary
/// directory (the browsers reach it through PULSE_SERVER); killed when dropped.
struct Pulse {
    _child: Reaped,
    server: String,
}

impl Pulse {
    fn start() -> Pulse {
        let dir = common::tempdir("pulse");
        let socket = dir.join("native");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("pulseaudio")
            .args([
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disable-shm=yes",
                "-n",
                "--load=module-null-sink sink_name=null",
            ])
            .arg(format!(
                "--load=module-native-protocol-unix auth-anonymous=1 socket={}",
                socket.display()
            ))
            .env("HOME", &dir)
            .env("XDG_RUNTIME_DIR", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pulseaudio starts (scripts/setup-test-deps.sh installs it)");
        let child = Reaped(child);
        common::wait_for("pulseaudio's socket", Duration::from_secs(10), || {
            socket.exists().then_some(())
        });
        Pulse {
            _child: child,
            server: format!("unix:{}", socket.display()),
        }
    }
}

/// The source the viewer's vad events last put into `mid` at or before `t`.
fn carrier(events: &[Value], mid: &str, t: f64) -> Option<String> {
    events
        .iter()
        .filter(|e| e["name"] == "vad" && e["data"]["mediaId"] == mid)
        .take_while(|e| e["t"].as_f64().unwrap() <= t)
        .last()
        .and_then(|e| e["data"]["sourceId"].as_str().map(str::to_owned))
}

/// The vad events of one viewer, its tracks' energy and what it negotiated, checked against
/// the publishers' turns: every turn announced in a multiplexed mid, that mid loud while it
/// carries the speaker, the empty multiplexed mids and the main track quiet.
fn check_viewer(rep: &Value, viewer: &str, speakers: &[&str], horizon: f64) {
    let v = &rep["participants"][viewer]["view"];
    let events = v["events"].as_array().unwrap();
    let mut mids: Vec<&String> = v["tracks"].as_object().unwrap().keys().collect();
    mids.sort();
    assert_eq!(mids, ["0", "1", "2", "3"], "{viewer}: tracks");
    // Chromium offers RED (RFC 2198) for Opus and gets it; Firefox offers none and gets Opus.
    let want = if viewer.starts_with("cr-") {
        json!(["red", "opus"])
    } else {
        json!(["opus"])
    };
    for m in v["answer"].as_array().unwrap() {
        assert_eq!(m["codecs"], want, "{viewer}: answer {m}");
    }
    for e in events.iter().filter(|e| e["name"] == "vad") {
        let s = &e["data"]["sourceId"];
        assert!(
            s.is_null() || speakers.iter().any(|p| s == p),
            "{viewer}: {e}"
        );
        assert!(
            ["1", "2", "3"].iter().any(|m| e["data"]["mediaId"] == *m),
            "{viewer}: {e}"
        );
    }
    let start = rep["corpusStartAt"].as_f64().unwrap();
    for speaker in speakers {
        for (s, e) in turns_at(speaker, start) {
            if s + 1500.0 > horizon {
                continue;
            }
            let vad = events
                .iter()
                .find(|x| {
                    let t = x["t"].as_f64().unwrap();
                    x["name"] == "vad"
                        && x["data"]["sourceId"] == *speaker
                        && t >= s - 300.0
                        && t <= s + 700.0
                })
                .unwrap_or_else(|| panic!("{viewer}: turn of {speaker} at {s} not announced"));
            let t = vad["t"].as_f64().unwrap();
            let mid = vad["data"]["mediaId"].as_str().unwrap();
            // Loud in its mid while the mid still carries it, from 400 ms on (jitter buffer).
            let until = (t + 2400.0).min(e).min(horizon);
            let moved = events.iter().find(|x| {
                x["name"] == "vad" && x["data"]["mediaId"] == mid && x["t"].as_f64().unwrap() > t
            });
            let until = moved.map_or(until, |x| until.min(x["t"].as_f64().unwrap()));
            let peak = loudest(&energy(v, mid), t + 400.0, until);
            eprintln!(
                "{viewer}: {speaker}'s turn at {:+.0} ms announced {:+.0} ms later in mid {mid}, peak {peak}",
                s - start,
                t - s
            );
            assert!(
                peak > 0.02,
                "{viewer}: {speaker} silent in mid {mid} ({peak}) from {t}"
            );
            // A multiplexed mid that carried nobody for a while is silent meanwhile.
            for other in ["1", "2", "3"].into_iter().filter(|m| *m != mid) {
                let empty = carrier(events, other, t - 1500.0).is_none()
                    && carrier(events, other, until).is_none()
                    && !events.iter().any(|x| {
                        let tx = x["t"].as_f64().unwrap();
                        x["name"] == "vad"
                            && x["data"]["mediaId"] == other
                            && tx > t - 1500.0
                            && tx < until
                    });
                if empty {
                    let p = loudest(&energy(v, other), t + 400.0, until);
                    assert!(
                        p < 0.005,
                        "{viewer}: empty mid {other} loud ({p}) while {speaker} talks in {mid}"
                    );
                }
            }
        }
    }
    // Every publisher has a sourceId: the main track carries no one.
    let main = loudest(&energy(v, "0"), start, horizon);
    assert!(main < 0.005, "{viewer}: main track loud ({main})");
}

#[test]
fn sdk_in_firefox_publishes_and_views_multiplexed_tracks_with_vad_next_to_chromium() {
    let _serial = common::serial();
    let began = Instant::now();
    assert!(
        PathBuf::from("/usr/bin/firefox-esr").exists(),
        "firefox-esr missing: run scripts/setup-test-deps.sh"
    );
    // Dropped last: the namespace outlives everything started in it.
    let ns = media_namespace();
    let pulse = Pulse::start();
    let mut serve = ns.command(env!("CARGO_BIN_EXE_chorus"));
    serve
        .args(["serve", "--http", "127.0.0.1:0", "--media-ip", MEDIA_IP])
        // UDP only: this test checks the UDP path in each engine. With ICE-TCP on, Firefox once
        // nominated the passive TCP pair although UDP worked (CI, stop 25); TCP is
        // tests/ice_tcp.rs's to check.
        .args(["--ice-tcp", "off"])
        .arg("--dev-public")
        .env("CHORUS_PUBLISH_TOKEN", TOKEN);
    let p = Proc::spawn("serve", serve);
    // Firefox publishes ana and bo, Chromium dee; one viewer in each engine.
    let speakers = ["ana", "bo", "dee"];
    let spec = json!([
        {"name": "ff-ana", "browser": "firefox", "publish": "ana"},
        {"name": "ff-bo", "browser": "firefox", "publish": "bo"},
        {"name": "cr-dee", "browser": "chromium", "publish": "dee"},
        {"name": "ff-listener", "browser": "firefox", "view": {"tracks": 3}},
        {"name": "cr-listener", "browser": "chromium", "view": {"tracks": 3}},
    ]);
    let seconds = 21;
    let (dir, script) = node_harness("room.mjs");
    let out = ns
        .command("node")
        .current_dir(&dir)
        .arg(script)
        .args(["--endpoint", &format!("http://{}", p.http())])
        .args(["--stream", "ff", "--token", TOKEN])
        .arg("--corpus")
        .arg(corpus())
        .args(["--seconds", &seconds.to_string(), "--setup-timeout", "45"])
        .args(["--spec", &spec.to_string()])
        .env("PULSE_SERVER", &pulse.server)
        .output()
        .unwrap();
    common::assert_succeeded(&out, "room.mjs");
    let rep = report(&out);
    let browsers: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "browser")
        .collect();
    eprintln!("browsers: {browsers:?}");
    let parts = &rep["participants"];
    // What Firefox offers when it publishes (codecs, header extensions, candidates).
    let offer = parts["ff-ana"]["publish"]["offerSdp"]
        .as_str()
        .unwrap_or_default();
    for l in offer.lines().filter(|l| {
        l.starts_with("a=rtpmap") || l.starts_with("a=extmap") || l.starts_with("a=candidate")
    }) {
        eprintln!("ff-ana offer: {l}");
    }
    // Every peer connection runs over a host pair to chorus's veth address; Firefox's end is on
    // it too (Chromium may use its 127.0.0.1 candidate: the namespace routes it locally).
    for name in ["ff-ana", "ff-bo", "cr-dee", "ff-listener", "cr-listener"] {
        let role = if name.ends_with("listener") {
            "view"
        } else {
            "publish"
        };
        let pair = &parts[name][role]["pair"];
        eprintln!("{name} {role}: pair {pair}");
        if name.starts_with("ff-") {
            assert_eq!(pair["local"]["address"], MEDIA_IP, "{name}: {pair}");
        }
        assert_eq!(pair["remote"]["address"], MEDIA_IP, "{name}: {pair}");
        assert_eq!(pair["local"]["protocol"], "udp", "{name}: {pair}");
    }
    let horizon = rep["corpusStartAt"].as_f64().unwrap() + f64::from(seconds) * 1000.0;
    for viewer in ["ff-listener", "cr-listener"] {
        check_viewer(&rep, viewer, &speakers, horizon);
    }
    drop(p);
    drop(pulse);
    drop(ns);
    eprintln!("firefox test: {:.1} s", began.elapsed().as_secs_f64());
}
