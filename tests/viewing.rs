//! Viewing for real: the official SDK's View with multiplexed tracks in headless Chromium, aiortc
//! over WHEP, two edge processes on one origin, and viewers that misbehave.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use chorus::replay::{corpus as corpus_files, truth};
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

/// The final `report` line of a tool's stdout.
fn report(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "report")
        .unwrap_or_else(|| {
            panic!(
                "no report; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
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

/// Levels-file turns of a corpus speaker, in wall-clock ms given when its playback started.
fn turns_at(speaker: &str, start_ms: f64) -> Vec<(f64, f64)> {
    let levels = corpus_files::read_levels(&corpus().join(format!("{speaker}.levels"))).unwrap();
    truth::turns(&levels)
        .into_iter()
        .map(|t| {
            (
                start_ms + t.first_frame as f64 * 20.0,
                start_ms + t.last_frame as f64 * 20.0 + 20.0,
            )
        })
        .collect()
}

/// (from, to, source) intervals of one mid from `begin` to `end`, from a viewer's vad events.
fn vad_intervals(
    events: &[Value],
    mid: &str,
    begin: f64,
    end: f64,
) -> Vec<(f64, f64, Option<String>)> {
    let mut out: Vec<(f64, f64, Option<String>)> = Vec::new();
    let mut cur: (f64, Option<String>) = (begin, None);
    for e in events
        .iter()
        .filter(|e| e["name"] == "vad" && e["data"]["mediaId"] == mid)
    {
        let t = e["t"].as_f64().unwrap();
        out.push((cur.0, t, cur.1.take()));
        cur = (t, e["data"]["sourceId"].as_str().map(str::to_owned));
    }
    out.push((cur.0, end, cur.1));
    out
}

fn inside(turns: &[(f64, f64)], a: f64, b: f64) -> bool {
    turns.iter().any(|&(s, e)| s <= a && b <= e)
}

fn overlaps(turns: &[(f64, f64)], a: f64, b: f64) -> bool {
    turns.iter().any(|&(s, e)| s < b && a < e)
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
    // Every page starts its corpus at one wall-clock instant; the corpus then loops every 30 s,
    // so only the first 29.5 s are checked.
    let start: BTreeMap<&str, f64> = speakers
        .iter()
        .map(|s| {
            let p = &parts[s]["publish"]["corpus"];
            let t = p["startedWall"].as_f64().or(rep["corpusStartAt"].as_f64());
            (*s, t.expect("corpus start time"))
        })
        .collect();
    let horizon = start.values().fold(f64::MAX, |a, b| a.min(*b)) + 29_500.0;
    let turns: BTreeMap<&str, Vec<(f64, f64)>> = speakers
        .iter()
        .map(|s| (*s, turns_at(s, start[s])))
        .collect();
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
            let Some(base) = s.get(3) else { continue };
            let conceal = |x: &Value| {
                x["concealedSamples"].as_f64().unwrap_or(0.0)
                    - x["silentConcealedSamples"].as_f64().unwrap_or(0.0)
            };
            let total = last["totalSamplesReceived"].as_f64().unwrap()
                - base["totalSamplesReceived"].as_f64().unwrap();
            let ratio = (conceal(last) - conceal(base)) / total.max(1.0);
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

#[test]
fn projected_source_keeps_its_track_and_unproject_keeps_a_talker_flowing() {
    let _serial = common::serial();
    use std::io::{BufRead, BufReader, Write};
    let p = serve();
    let spec = json!([
        {"name": "host", "publish": "host"},
        {"name": "ana", "publish": "ana"},
        {"name": "bo", "publish": "bo"},
        {"name": "listener", "view": {"tracks": 2}},
    ]);
    let (dir, script) = node_harness("room.mjs");
    let mut child = Command::new("node")
        .current_dir(&dir)
        .arg(script)
        .args([
            "--endpoint",
            &format!("http://{}", p.http()),
            "--stream",
            "pj",
            "--token",
            TOKEN,
        ])
        .arg("--corpus")
        .arg(corpus())
        .args(["--seconds", "20", "--spec", &spec.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Once the corpus plays: bo (silent until 10.6 s) is projected into mid 2 at ~5 s, and
    // unprojected at ~12 s while still talking.
    for line in lines.by_ref() {
        if line.unwrap().contains("\"corpus-start\"") {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(5));
    writeln!(stdin, "project listener bo 2").unwrap();
    std::thread::sleep(Duration::from_secs(7));
    writeln!(stdin, "unproject listener 2").unwrap();
    // Read to the end: closing the pipe early would break the harness's last writes.
    let rep: Value = lines
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter(|v| v["event"] == "report")
        .last()
        .expect("a report");
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let v = &rep["participants"]["listener"]["view"];
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
