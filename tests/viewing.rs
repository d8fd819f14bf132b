//! Viewing for real: the official SDK's View with multiplexed tracks in headless Chromium, aiortc
//! over WHEP, two edge processes on one origin, and viewers that misbehave.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use chorus::replay::{corpus as corpus_files, truth};
use common::hearing::{
    audible_concealment, corpus_clock, heard_by, inside, jitter_buffer, overlaps, vad_intervals,
    Heard,
};
use common::room_tool::{self, report, turns_at};
use common::{corpus, get_json, node_harness, wait_for, Proc};
use serde_json::{json, Value};

const TOKEN: &str = "test-publish-token";

fn serve() -> Proc {
    common::serve(TOKEN)
}

fn whip(http: std::net::SocketAddr, stream: &str, source: &str, seconds: u32) -> common::Reaped {
    let child = common::whip_command(http, stream, source, TOKEN, seconds)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::Reaped(child)
}

/// Checks one WHEP report: every track that carried media is one continuous, decodable stream.
fn assert_continuous(rep: &Value) -> u64 {
    let mut total = 0;
    for (mid, t) in rep["tracks"].as_object().unwrap() {
        let n = t["packets"].as_u64().unwrap();
        total += n;
        if n == 0 {
            continue;
        }
        assert_eq!(
            t["ssrcs"].as_array().map(Vec::len),
            Some(1),
            "mid {mid}: {t}"
        );
        for field in [
            "seq_gaps",
            "seq_duplicates",
            "ts_backwards",
            "decode_errors",
        ] {
            assert_eq!(t[field], 0, "mid {mid}: {field} in {t}");
        }
        assert!(
            t["decoded_frames"].as_u64().unwrap() + 10 >= n,
            "mid {mid}: frames not decoded: {t}"
        );
    }
    total
}

#[test]
fn aiortc_over_whep_gets_continuous_decodable_rewritten_tracks() {
    let _serial = common::serial();
    let p = serve();
    let _pubs = [
        whip(p.http(), "w", "ana", 25),
        whip(p.http(), "w", "bo", 25),
    ];
    // One track for two talkers in turn: the track switches source at least once.
    let out = common::whep_command(
        p.http(),
        "w",
        &["--tracks", "1", "--seconds", "16", "--check"],
    )
    .output()
    .unwrap();
    common::assert_succeeded(&out, "whep_view.py");
    let rep = report(&out);
    let total = assert_continuous(&rep);
    // Ana talks 5.2-11 s, bo 10.6-15 s: about 8 s of speech through the one track.
    assert!(total > 300, "{rep}");
}

#[test]
fn sdk_viewers_hear_who_talks_in_the_track_vad_names_and_never_themselves() {
    let _serial = common::serial();
    let p = serve();
    let speakers = ["host", "ana", "bo", "dee"];
    let spec: Vec<Value> = speakers
        .iter()
        .map(|s| json!({"name": s, "publish": s, "view": {"tracks": 3, "pinned": "host", "exclude": [s]}}))
        .collect();
    let (dir, script) = node_harness("room.mjs");
    let kernel_drops_before = common::udp_rcvbuf_errors();
    let out = Command::new("node")
        .current_dir(&dir)
        .arg(script)
        .args([
            "--endpoint",
            &format!("http://{}", p.http()),
            "--stream",
            "panel",
            "--token",
            TOKEN,
        ])
        .arg("--corpus")
        .arg(corpus())
        .args(["--seconds", "31", "--spec", &Value::from(spec).to_string()])
        .output()
        .unwrap();
    common::assert_succeeded(&out, "room.mjs");
    // Losses someone counted: chorus's own drops, and the kernel's for full receive buffers
    // (a browser or chorus that fell behind on this 2-core machine). A gap a viewer sees
    // beyond those is a packet chorus lost without saying so.
    let counted = common::media_drops(p.http());
    let kernel = common::udp_rcvbuf_errors().saturating_sub(kernel_drops_before);
    if counted + kernel > 0 {
        eprintln!("losses during the room: {counted} counted by chorus, {kernel} by the kernel");
    }
    let rep = report(&out);
    let parts = &rep["participants"];
    let (start, horizon, turns) = corpus_clock(&rep, &speakers, turns_at);
    for me in speakers {
        let v = &parts[me]["view"];
        let events = v["events"].as_array().unwrap();
        let tracks = v["tracks"].as_object().unwrap();
        let mut mids: Vec<&String> = tracks.keys().collect();
        mids.sort_by_key(|m| m.parse::<u32>().unwrap_or(u32::MAX));
        let (main, multiplexed) = mids.split_first().unwrap();
        assert_eq!(multiplexed.len(), 3, "{me}: tracks {mids:?}");
        let end = horizon;
        // The pinned host and the viewer itself never get a multiplexed track.
        for e in events
            .iter()
            .filter(|e| e["name"] == "vad" && e["t"].as_f64().unwrap() < horizon)
        {
            let s = e["data"]["sourceId"].as_str();
            assert!(s != Some(me) && s != Some("host"), "{me} got vad {e}");
            assert!(
                multiplexed
                    .iter()
                    .any(|m| e["data"]["mediaId"] == m.as_str()),
                "{me}: {e}"
            );
        }
        // Every turn of every other panelist is announced within 0.5 s of its start.
        for other in speakers.iter().filter(|s| **s != me && **s != "host") {
            for &(s, _) in &turns[other] {
                let announced = events.iter().any(|e| {
                    let t = e["t"].as_f64().unwrap();
                    e["name"] == "vad"
                        && e["data"]["sourceId"] == *other
                        && t >= s - 300.0
                        && t <= s + 500.0
                });
                assert!(announced, "{me}: turn of {other} at {s} not announced");
            }
        }
        // Energy follows vad: a track is loud while the source it carries talks, and silent
        // while it carries nobody (after the jitter buffer drains).
        for mid in multiplexed {
            let energy: Vec<(f64, f64)> = tracks[mid.as_str()]["energy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| (x[0].as_f64().unwrap(), x[1].as_f64().unwrap()))
                .collect();
            let window_max = |a: f64, b: f64| {
                energy
                    .iter()
                    .filter(|(t, _)| *t >= a && *t < b)
                    .map(|x| x.1)
                    .fold(0.0, f64::max)
            };
            let begin = energy.first().map_or(end, |e| e.0);
            for (from, to, src) in vad_intervals(events, mid, begin, end) {
                let mut w = from + 400.0;
                while w + 500.0 <= to {
                    let m = window_max(w, w + 500.0);
                    match &src {
                        Some(s) if inside(&turns[s.as_str()], w - 200.0, w + 700.0) => {
                            assert!(
                                m > 0.02,
                                "{me} mid {mid}: silent at {w} while {s} talks in it"
                            );
                        }
                        None => assert!(
                            m < 0.005,
                            "{me} mid {mid}: sound at {w} while the track is empty ({m})"
                        ),
                        _ => {}
                    }
                    w += 500.0;
                }
            }
        }
        // The main track carries the pinned host: loud in the host's turns, silent between.
        // The host excludes itself, and exclusion wins over pinning: it hears nothing there.
        let energy = tracks[main.as_str()]["energy"].as_array().unwrap();
        let loud_in_turns = energy.iter().any(|x| {
            let t = x[0].as_f64().unwrap();
            inside(&turns["host"], t - 100.0, t + 100.0) && x[1].as_f64().unwrap() > 0.05
        });
        assert_eq!(loud_in_turns, me != "host", "{me}: host on the main track");
        for x in energy {
            let t = x[0].as_f64().unwrap();
            let quiet = me == "host" || !overlaps(&turns["host"], t - 1500.0, t + 500.0);
            if quiet && t > start["host"] + 2000.0 && t < horizon {
                assert!(
                    x[1].as_f64().unwrap() < 0.005,
                    "{me}: main track loud at {t} outside the host's turns"
                );
            }
        }
        // Chrome's own receive stats: nothing lost that nobody counted, little concealment
        // (past the first seconds).
        for (mid, series) in v["stats"].as_object().unwrap() {
            let s = series.as_array().unwrap();
            let last = s.last().unwrap();
            // Negative when duplicates arrived (RFC 3550's cumulative count): nothing lost.
            let lost = last["packetsLost"].as_i64().expect("packetsLost").max(0) as u64;
            assert!(
                lost <= counted + kernel,
                "{me} mid {mid}: {lost} lost, {counted} counted by chorus, {kernel} by the kernel: {last}"
            );
            let Some(ratio) = audible_concealment(s) else {
                continue;
            };
            let jb = jitter_buffer(s);
            eprintln!(
                "{me} mid {mid}: audible concealment {:.2} %, jitter buffer {jb:?}",
                ratio * 100.0
            );
            // Each pre-roll lands up to 120 ms of audio at once; the receiver drains it again
            // instead of keeping the delay.
            if let Some(j) = jb {
                assert!(
                    j.settled(),
                    "{me} mid {mid}: the jitter buffer did not settle: {j:?}"
                );
            }
            assert!(
                ratio < 0.05,
                "{me} mid {mid}: {:.1} % of samples concealed",
                ratio * 100.0
            );
        }
    }
}

#[test]
fn two_edges_on_one_origin_serve_their_own_viewers() {
    let _serial = common::serial();
    let origin = common::origin(TOKEN, "cluster-secret");
    let edge = |_: u8| common::edge(&origin, "cluster-secret");
    let (e1, e2) = (edge(1), edge(2));
    // Publishing is the origin's job, viewing the edges'.
    let (s, v) = common::post_json(
        e1.http(),
        "/api/director/publish",
        Some(TOKEN),
        r#"{"streamName":"x"}"#,
    );
    assert_eq!(s, 404, "{v}");
    // The origin's director sends viewers to its linked edges, in turn.
    let edge_urls = [e1.http(), e2.http()].map(|a| format!("ws://{a}/ws"));
    let picked: Vec<String> = (0..2)
        .map(|_| {
            let (s, v) = common::post_json(
                origin.http(),
                "/api/director/subscribe",
                None,
                r#"{"streamName":"x"}"#,
            );
            assert_eq!(s, 200, "{v}");
            v["data"]["urls"][0].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(picked.iter().all(|u| edge_urls.contains(u)), "{picked:?}");
    assert_ne!(picked[0], picked[1], "both edges get viewers");
    let _pubs = [
        whip(origin.http(), "two", "ana", 25),
        whip(origin.http(), "two", "bo", 25),
    ];
    let v1 = common::whep_command(
        e1.http(),
        "two",
        &["--tracks", "2", "--seconds", "15", "--check"],
    )
    .spawn()
    .unwrap();
    let o2 = common::whep_command(
        e2.http(),
        "two",
        &["--tracks", "2", "--seconds", "15", "--check"],
    )
    .output()
    .unwrap();
    let o1 = v1.wait_with_output().unwrap();
    for (name, out) in [("edge 1", &o1), ("edge 2", &o2)] {
        common::assert_succeeded(out, name);
    }
    assert!(assert_continuous(&report(&o2)) > 300);
    // Each edge subscribed once at the origin; both let go once their viewer left.
    let metric = |p: &Proc, name: &str| common::metric(p.http(), name).unwrap_or(-1.0);
    assert_eq!(metric(&e1, "chorus_edge_viewers_total"), 1.0);
    assert_eq!(metric(&e2, "chorus_edge_viewers_total"), 1.0);
    assert!(metric(&e2, "chorus_edge_relay_packets_total") > 300.0);
    wait_for("edges unsubscribed", Duration::from_secs(10), || {
        (metric(&origin, "chorus_origin_edge_subscriptions") == 0.0).then_some(())
    });
}

#[test]
fn a_viewer_of_a_stream_not_yet_published_gets_it_when_it_starts() {
    let _serial = common::serial();
    let p = serve();
    let viewer = common::whep_command(
        p.http(),
        "later",
        &["--tracks", "1", "--seconds", "14", "--check"],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _publisher = whip(p.http(), "later", "ana", 20);
    let out = viewer.wait_with_output().unwrap();
    common::assert_succeeded(&out, "whep_view.py");
    assert!(assert_continuous(&report(&out)) > 100);
}

#[test]
fn vanishing_and_flooding_viewers_do_not_disturb_the_others() {
    let _serial = common::serial();
    let p = serve();
    let _pubs = [
        whip(p.http(), "rude", "ana", 30),
        whip(p.http(), "rude", "bo", 30),
    ];
    let good = common::whep_command(
        p.http(),
        "rude",
        &["--tracks", "2", "--seconds", "16", "--check"],
    )
    .spawn()
    .unwrap();
    let mut vanishing =
        common::whep_command(p.http(), "rude", &["--tracks", "2", "--seconds", "30"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let flood = common::whep_command(
        p.http(),
        "rude",
        &["--tracks", "2", "--seconds", "12", "--rtcp-flood", "5000"],
    )
    .stdout(std::process::Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    vanishing.kill().unwrap();
    let _ = vanishing.wait();
    let out = good.wait_with_output().unwrap();
    common::assert_succeeded(&out, "whep_view.py");
    assert!(assert_continuous(&report(&out)) > 300);
    let _ = flood.wait_with_output();
    let flooded = common::metric(
        p.http(),
        "chorus_edge_dropped_total{reason=\"viewer_flood\"}",
    )
    .unwrap();
    assert!(flooded > 0.0, "no viewer datagram was dropped for flooding");
    // The vanished viewer is dropped by ICE timeout: eventually no viewer is left.
    wait_for("all viewers gone", Duration::from_secs(30), || {
        (common::metric(p.http(), "chorus_edge_viewers ") == Some(0.0)).then_some(())
    });
    let _ = get_json(p.http(), "/healthz");
}

/// room.mjs on `stream` for `seconds`, taking commands on its stdin: returned once its corpus
/// plays.
fn room_with_commands(p: &Proc, stream: &str, seconds: u64, spec: &Value) -> room_tool::Live {
    let mut tool = room_tool::Live::start(p.http(), stream, TOKEN, seconds, spec);
    tool.next(Duration::from_secs(60), "the corpus start", |v| {
        v["event"] == "corpus-start"
    });
    tool
}

/// With two media threads, viewers are dealt to both (ids in turn): each gets the stream, one
/// leaving does not disturb the other, and the edge holds one subscription at the origin until
/// the last of them is gone.
#[test]
fn viewers_on_two_media_threads_share_one_origin_subscription() {
    let _serial = common::serial();
    let p = Proc::start(
        "serve",
        &["serve", "--http", "127.0.0.1:0", "--media-workers", "2"],
        &[("CHORUS_PUBLISH_TOKEN", TOKEN)],
    );
    let _pubs = [
        whip(p.http(), "lanes", "ana", 30),
        whip(p.http(), "lanes", "bo", 30),
    ];
    let first = common::whep_command(
        p.http(),
        "lanes",
        &["--tracks", "2", "--seconds", "10", "--check"],
    )
    .spawn()
    .unwrap();
    let second = common::whep_command(
        p.http(),
        "lanes",
        &["--tracks", "2", "--seconds", "20", "--check"],
    )
    .spawn()
    .unwrap();
    wait_for("both viewers connected", Duration::from_secs(15), || {
        (common::metric(p.http(), "chorus_edge_viewers ") == Some(2.0)).then_some(())
    });
    let edges = |p: &Proc| get_json(p.http(), "/api/streams/lanes").1["edges"].as_u64();
    assert_eq!(edges(&p), Some(1), "one subscription for both threads");
    let out = first.wait_with_output().unwrap();
    common::assert_succeeded(&out, "whep_view.py (first)");
    let rep = report(&out);
    // The corpus talks from about 5 s in.
    assert!(assert_continuous(&rep) > 50, "first viewer: {rep}");
    assert_eq!(
        edges(&p),
        Some(1),
        "still subscribed for the other thread's viewer"
    );
    let out = second.wait_with_output().unwrap();
    common::assert_succeeded(&out, "whep_view.py (second)");
    assert!(
        assert_continuous(&report(&out)) > 300,
        "the second viewer kept its stream"
    );
    wait_for("the origin let go", Duration::from_secs(15), || {
        (edges(&p) == Some(0)).then_some(())
    });
    assert_eq!(
        common::metric(
            p.http(),
            "chorus_edge_dropped_total{reason=\"unknown_source\"}"
        ),
        Some(0.0),
        "a thread without viewers of the stream ignores its packets without counting drops"
    );
}

/// (frames, failures) of a page's encoded transforms on one side ("send" or "recv").
fn e2ee_counts(report: &Value, side: &str) -> (u64, u64) {
    let all = report.as_object().into_iter().flatten();
    all.filter(|(_, c)| c["side"] == side)
        .fold((0, 0), |(f, x), (_, c)| {
            (
                f + c["frames"].as_u64().unwrap_or(0),
                x + c["failed"].as_u64().unwrap_or(0),
            )
        })
}

/// Runs three publishers (`ana`, `bo`, `dee`) and the viewers `keyed` (3 tracks, the key) and
/// `keyless` (3 tracks, no key) for 31 s. `e2ee`: the publishers encrypt their payloads end to
/// end with a key chorus never sees; `level`: their offers keep the RFC 6464 extension.
fn e2ee_room(e2ee: bool, level: bool) -> BTreeMap<String, Heard> {
    const KEY: &str = "000102030405060708090a0b0c0d0e0f";
    let p = serve();
    let speakers = ["ana", "bo", "dee"];
    let mut spec: Vec<Value> = speakers
        .iter()
        .map(|s| {
            let mut v = json!({"name": s, "publish": s, "noLevel": !level});
            if e2ee {
                v["e2ee"] = json!(KEY);
            }
            v
        })
        .collect();
    let mut keyed = json!({"name": "keyed", "view": {"tracks": 3}});
    if e2ee {
        keyed["e2ee"] = json!(KEY);
    }
    spec.push(keyed);
    spec.push(json!({"name": "keyless", "view": {"tracks": 3}}));
    let rep = room(&p, "sealed", &corpus(), spec);
    // Chromium publishes RED (chorus answers it first) and its viewers take it; under an
    // encoded transform the envelope is sealed too, and the origin relays it opaque.
    let red = |m: &str| common::metric(p.http(), m).unwrap_or(0.0);
    let (relayed, opaque) = (
        red("chorus_origin_red_packets_total "),
        red("chorus_origin_red_packets_total{kind=\"opaque\"}"),
    );
    let to_red_viewers = red("chorus_edge_red_packets_total{how=\"red\"}")
        + red("chorus_edge_red_packets_total{how=\"opaque\"}");
    eprintln!(
        "e2ee={e2ee}: RED relayed {relayed}, opaque {opaque}, to RED viewers {to_red_viewers}"
    );
    assert!(
        relayed > 1000.0 && to_red_viewers > 1000.0,
        "{relayed} {to_red_viewers}"
    );
    assert_eq!(opaque > 0.9 * relayed, e2ee, "opaque {opaque} of {relayed}");
    let parts = &rep["participants"];
    for s in speakers {
        // The offer really had (or lacked) the level extension.
        let sdp = parts[s]["publish"]["offerSdp"].as_str().unwrap_or_default();
        assert_eq!(sdp.contains("ssrc-audio-level"), level, "{s}: offer {sdp}");
        if e2ee {
            let (sealed, failed) = e2ee_counts(&parts[s]["e2ee"], "send");
            assert!(sealed > 1000 && failed == 0, "{s}: {}", parts[s]["e2ee"]);
        }
    }
    if e2ee {
        // The keyed viewer opened what it got; the keyless one had no transform at all.
        let (opened, failed) = e2ee_counts(&parts["keyed"]["e2ee"], "recv");
        assert!(
            opened > 300 && failed == 0,
            "keyed: {}",
            parts["keyed"]["e2ee"]
        );
        assert_eq!(e2ee_counts(&parts["keyless"]["e2ee"], "recv"), (0, 0));
    }
    let (start, horizon, turns) = corpus_clock(&rep, &speakers, turns_at);
    let mut heard = BTreeMap::new();
    for me in ["keyed", "keyless"] {
        let h = heard_by(
            &rep["participants"][me]["view"],
            &speakers,
            &start,
            horizon,
            &turns,
        );
        eprintln!("e2ee={e2ee} level={level} {me}: {h:?}");
        heard.insert(me.to_owned(), h);
    }
    heard
}

#[test]
fn end_to_end_encrypted_payloads_are_selected_and_forwarded_untouched() {
    let _serial = common::serial();
    let plain = e2ee_room(false, true);
    let sealed = e2ee_room(true, true);
    let sizes = e2ee_room(true, false);
    eprintln!("plain: {plain:?}\nsealed: {sealed:?}\nsealed, no level: {sizes:?}");
    let base = &plain["keyed"];
    for (run, h) in [
        ("plain", &plain),
        ("sealed", &sealed),
        ("sealed, no level", &sizes),
    ] {
        let k = &h["keyed"];
        // Selection follows the talkers as well as on plaintext (within a few points), and the
        // key holder hears each track's source: loud while it talks, silent when it does not.
        assert!(
            k.vad_agreement > 0.9 && k.vad_agreement > base.vad_agreement - 0.05,
            "{run}: {k:?} against plaintext {base:?}"
        );
        assert!(k.missed_turns <= 1, "{run}: {k:?}");
        assert!(k.talk_loud > 0.6 && k.quiet_energy < 0.005, "{run}: {k:?}");
        // An emptied track ends in silence frames: the decoder goes quiet instead of
        // stretching (issue 13 asks at most 0.5 %; 1 % leaves room for a loaded machine).
        assert!(k.concealed < 0.01, "{run}: {k:?}");
    }
    // Without the key the talkers are not heard: what chorus forwarded was ciphertext,
    // untouched. Chromium seals the whole RED payload (its envelope too), so a keyless decoder
    // finds no redundancy or Opus it can split, and plays near silence (when an encoded
    // transform sealed plain Opus, the same decoder concealed garbage instead). With
    // plaintext, the same viewer hears like the other.
    for h in [&sealed["keyless"], &sizes["keyless"]] {
        assert!(h.talk_loud < 0.25, "keyless: {h:?}");
    }
    let k = &plain["keyless"];
    assert!(k.concealed < 0.05 && k.talk_loud > 0.6, "{k:?}");
}

/// Runs room.mjs for 31 s against `p` on `stream`, the publishers playing `corpus_dir`'s
/// speakers; its report.
fn room(p: &Proc, stream: &str, corpus_dir: &std::path::Path, spec: Vec<Value>) -> Value {
    let (dir, script) = node_harness("room.mjs");
    let out = Command::new("node")
        .current_dir(&dir)
        .arg(script)
        .args(["--endpoint", &format!("http://{}", p.http())])
        .args(["--stream", stream, "--token", TOKEN])
        .arg("--corpus")
        .arg(corpus_dir)
        .args(["--seconds", "31", "--spec", &Value::from(spec).to_string()])
        .output()
        .unwrap();
    common::assert_succeeded(&out, "room.mjs");
    report(&out)
}

/// The real-speech corpus: a telephone call (tests/corpus/call), one source per talker.
fn call_corpus() -> std::path::PathBuf {
    common::repo().join("tests/corpus/call")
}

/// A talker's hand-marked turns (`<id>.turns`, merged over short pauses as replay merges
/// them), in wall-clock ms given when its playback started.
fn annotated_turns_at(speaker: &str, start_ms: f64) -> Vec<(f64, f64)> {
    let sp = corpus_files::load(&call_corpus()).unwrap();
    let annotated = sp
        .iter()
        .find(|s| s.id == speaker)
        .and_then(|s| s.turns.clone())
        .unwrap_or_default();
    truth::merge(&annotated)
        .into_iter()
        .map(|(a, b)| (start_ms + a as f64 / 1000.0, start_ms + b as f64 / 1000.0))
        .collect()
}

#[test]
fn sdk_listeners_hear_a_real_telephone_call_from_its_first_syllable() {
    let _serial = common::serial();
    let p = serve();
    let speakers = ["diane", "sheila", "line"];
    let mut spec: Vec<Value> = speakers
        .iter()
        .map(|s| json!({"name": s, "publish": s}))
        .collect();
    spec.push(json!({"name": "listener", "view": {"tracks": 2}}));
    let kernel_drops_before = common::udp_rcvbuf_errors();
    let rep = room(&p, "call", &call_corpus(), spec);
    let counted = common::media_drops(p.http());
    let kernel = common::udp_rcvbuf_errors().saturating_sub(kernel_drops_before);
    let (start, horizon, turns) = corpus_clock(&rep, &speakers, annotated_turns_at);
    let h = heard_by(
        &rep["participants"]["listener"]["view"],
        &speakers,
        &start,
        horizon,
        &turns,
    );
    eprintln!(
        "real call, listener: {h:?} (losses: {counted} counted by chorus, {kernel} by the kernel)"
    );
    let events = rep["participants"]["listener"]["view"]["events"]
        .as_array()
        .unwrap();
    // The line's noise never takes a track.
    assert!(
        events
            .iter()
            .all(|e| e["name"] != "vad" || e["data"]["sourceId"] != "line"),
        "line got a track"
    );
    // Every hand-marked turn is announced, soon after the annotation's start (end to end:
    // the browsers' capture and the network included).
    assert_eq!(h.missed_turns, 0, "{h:?}");
    assert!(h.onset_p95_ms < 250.0, "{h:?}");
    assert!(h.vad_agreement > 0.9, "{h:?}");
    // Sound while the track's talker talks, quiet when nobody does (a telephone call is
    // quieter than the synthetic panel: compared with its own quiet, not the panel's 0.02).
    assert!(
        h.talk_energy > 0.005 && h.talk_energy > 50.0 * h.quiet_energy,
        "{h:?}"
    );
    // Clean endings and pre-rolls: little audible concealment, no loss nobody counted, and the
    // jitter buffer settles after each pre-roll.
    assert!(h.concealed < 0.01, "{h:?}");
    assert!(h.lost <= counted + kernel, "{h:?}");
    assert!(h.jitter_buffer.settled(), "{h:?}");
}

/// The loudest energy sample of a viewer's track `mid` between `a` and `b` s of the corpus.
fn loudest(view: &Value, mid: &str, c0: f64, a: f64, b: f64) -> f64 {
    view["tracks"][mid]["energy"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter(|x| {
            let t = (x[0].as_f64().unwrap() - c0) / 1000.0;
            t >= a && t < b
        })
        .map(|x| x[1].as_f64().unwrap())
        .fold(0.0, f64::max)
}

/// The SDK's projection and selection as apps use them, one chorus and one page per
/// participant, two views whose checks are independent (one room setup for both):
/// - `proj`: a source projected while silent keeps its track, and `unproject` while it talks
///   leaves it flowing until it stops ([`check_projection_of_a_silent_source`]);
/// - `sel`: `project` without a mediaId plays ana in the main track, `addRemoteTrack` +
///   `project` plays bo in a track the offer never had, `select {}` is answered and a named
///   layer refused with the reason, the view's `events` list keeps `viewercount` away, a
///   publisher that asked gets `active` and `viewercount`, and the stage going empty is
///   `inactive`, not `stopped`: the view stays ([`check_projection_and_selection`]).
#[test]
fn sdk_projection_selection_and_events_work_as_apps_use_them() {
    let _serial = common::serial();
    let p = serve();
    let spec = json!([
        {"name": "host", "publish": "host", "publishEvents": ["active", "viewercount"]},
        {"name": "ana", "publish": "ana"},
        {"name": "bo", "publish": "bo"},
        {"name": "proj", "view": {"tracks": 2}},
        {"name": "sel", "view": {"tracks": 1, "events": ["active", "inactive", "vad", "stopped"]}},
    ]);
    let mut tool = room_with_commands(&p, "sel", 20, &spec);
    // Once the corpus plays: sel's projections and selections at ~1 s; bo (silent until
    // 10.6 s) projected into proj's mid 2 at ~5 s and unprojected there at ~12 s while still
    // talking; after bo's turn (15 s) the whole stage leaves.
    std::thread::sleep(Duration::from_secs(1));
    tool.send("project sel ana main");
    tool.send("project sel bo +");
    tool.send("select sel");
    tool.send(r#"select sel {"encodingId":"h"}"#);
    std::thread::sleep(Duration::from_secs(4));
    tool.send("project proj bo 2");
    std::thread::sleep(Duration::from_secs(7));
    tool.send("unproject proj 2");
    std::thread::sleep(Duration::from_secs(4));
    for who in ["host", "ana", "bo"] {
        tool.send(&format!("unpublish {who}"));
    }
    let rep = tool.finish(Duration::from_secs(60));
    check_projection_of_a_silent_source(&rep, "proj");
    check_projection_and_selection(&rep, "sel");
}

/// View `me` had bo projected into its mid 2 at ~5 s (bo silent until 10.6 s) and unprojected
/// at ~12 s, while bo still talked.
fn check_projection_of_a_silent_source(rep: &Value, me: &str) {
    let v = &rep["participants"][me]["view"];
    let c0 = rep["corpusStartAt"].as_f64().unwrap();
    let vad: Vec<(f64, &str, Option<&str>)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "vad")
        .map(|e| {
            (
                (e["t"].as_f64().unwrap() - c0) / 1000.0,
                e["data"]["mediaId"].as_str().unwrap(),
                e["data"]["sourceId"].as_str(),
            )
        })
        .collect();
    // Projected at once although bo is silent; bo is never announced anywhere else.
    let proj = vad
        .iter()
        .find(|(_, m, s)| *m == "2" && *s == Some("bo"))
        .expect("bo projected");
    assert!((4.0..7.0).contains(&proj.0), "{vad:?}");
    assert!(
        vad.iter().all(|(_, m, s)| *s != Some("bo") || *m == "2"),
        "{vad:?}"
    );
    // Unprojected while talking: no track change until bo stops (after 13.8 s + hangover).
    let next = vad
        .iter()
        .find(|(t, m, _)| *m == "2" && *t > proj.0)
        .expect("mid 2 changes later");
    assert!(next.0 > 14.0 && next.2.is_none(), "{vad:?}");
    // And bo is heard in mid 2 all through its turn, before and after the unproject.
    let energy = v["tracks"]["2"]["energy"].as_array().unwrap();
    for sec in [11.0, 12.5, 13.2] {
        let m = energy
            .iter()
            .filter(|x| {
                let t = (x[0].as_f64().unwrap() - c0) / 1000.0;
                t >= sec && t < sec + 0.5
            })
            .map(|x| x[1].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!(m > 0.02, "mid 2 silent at {sec} s while bo talks");
    }
}

/// View `me` (one track) had ana projected into its main track and bo into an added one,
/// selected `{}` and a named layer, and saw the stage leave at ~16 s.
fn check_projection_and_selection(rep: &Value, me: &str) {
    let v = &rep["participants"][me]["view"];
    let c0 = rep["corpusStartAt"].as_f64().unwrap();
    let commands = v["commands"].as_array().unwrap();
    let projects: Vec<&Value> = commands.iter().filter(|c| c["name"] == "project").collect();
    assert!(projects.iter().all(|c| c["ok"] == true), "{projects:?}");
    let added = projects[1]["mid"].as_str().expect("the added track's mid");
    assert!(!["0", "1"].contains(&added), "added mid {added}");
    // Nothing is published without a sourceId: the main track is ana's alone.
    let main_ana = loudest(v, "0", c0, 6.0, 10.5);
    assert!(
        main_ana > 0.02,
        "main track silent while ana talks: {main_ana}"
    );
    assert!(
        loudest(v, "0", c0, 12.0, 14.5) < 0.005,
        "main track not ana's only"
    );
    // bo in the added track, announced there and nowhere else.
    let in_added = loudest(v, added, c0, 11.5, 14.5);
    assert!(in_added > 0.02, "added track {added} silent while bo talks");
    let events = v["events"].as_array().unwrap();
    let vads: Vec<(&str, Option<&str>)> = events
        .iter()
        .filter(|e| e["name"] == "vad")
        .map(|e| {
            (
                e["data"]["mediaId"].as_str().unwrap(),
                e["data"]["sourceId"].as_str(),
            )
        })
        .collect();
    assert!(vads.contains(&(added, Some("bo"))), "{vads:?}");
    assert!(
        vads.iter().all(|(m, s)| *s != Some("bo") || *m == added),
        "{vads:?}"
    );
    assert!(vads.iter().all(|(_, s)| *s != Some("ana")), "{vads:?}");
    // select: {} answered, a layer refused with the reason.
    let selects: Vec<&Value> = commands.iter().filter(|c| c["name"] == "select").collect();
    assert_eq!(selects.len(), 2, "{selects:?}");
    assert_eq!(selects[0]["ok"], true, "{selects:?}");
    assert_eq!(selects[1]["ok"], false, "{selects:?}");
    assert!(
        selects[1]["message"]
            .as_str()
            .unwrap_or("")
            .contains("simulcast"),
        "{selects:?}"
    );
    // The events filter: no viewercount for this view; the stage leaving is three inactive
    // and no stopped, and the view stays connected.
    let names: Vec<&str> = events.iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(!names.contains(&"viewercount"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| **n == "inactive").count(),
        3,
        "{names:?}"
    );
    assert!(!names.contains(&"stopped"), "{names:?}");
    assert!(
        v["errors"].as_array().unwrap().is_empty(),
        "{}",
        v["errors"]
    );
    // The publisher that asked hears its audience: the room's two viewers.
    let host: Vec<&Value> = rep["participants"]["host"]["publish"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(host.iter().any(|e| e["name"] == "active"), "{host:?}");
    assert!(
        host.iter()
            .any(|e| e["name"] == "viewercount" && e["data"]["viewercount"] == 2),
        "{host:?}"
    );
    let ana = &rep["participants"]["ana"]["publish"]["events"];
    assert!(ana.as_array().is_none_or(Vec::is_empty), "unasked: {ana}");
}
