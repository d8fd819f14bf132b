//! The edge core's decisions, without sockets or peers (like quinn-proto's `Pair` tests): feed
//! inputs with a hand-held clock, read the ordered output.

use super::*;
use crate::media::rtp::{write_packet, HeaderFields};
use crate::relay::proto::TrackInfo;

const AUDIO: Kind = Kind::Audio;

fn core() -> EdgeCore {
    EdgeCore::new(Arc::default(), Arc::default(), 1)
}

fn mid(k: usize) -> Mid {
    Mid::from(format!("{}", k + 1).as_str())
}

fn source(index: u16, id: &str) -> SourceInfo {
    SourceInfo {
        index,
        source_id: Some(id.into()),
        tracks: vec![TrackInfo {
            media: "audio".into(),
            mid: "0".into(),
        }],
        audio_level: true,
    }
}

fn join(c: &mut EdgeCore, now: u64, id: u64, stream: &str, tracks: usize) {
    c.handle_join(
        now,
        PeerId(id),
        Join {
            stream: stream.into(),
            tracks: (0..tracks).map(mid).collect(),
            ..Join::default()
        },
    );
}

/// A relayed audio datagram of relay source `index` on `channel`, with an RFC 6464 level.
fn relayed(channel: u32, index: u16, seq: u16, level: u8, now: u64) -> Relayed {
    let mut data = Vec::new();
    DatagramHeader {
        channel,
        source: index,
        kind: AUDIO,
        sent_ms: 0,
    }
    .write(&mut data);
    let mut rtp = Vec::new();
    let hdr = HeaderFields {
        payload_type: 111,
        sequence_number: seq,
        timestamp: seq as u32 * 960,
        ssrc: 100 + index as u32,
        marker: false,
    };
    // Each packet's payload tells which it is (a pre-roll must replay the right bytes).
    let mut payload = [0x78; 60];
    payload[1..3].copy_from_slice(&seq.to_be_bytes());
    write_packet(&mut rtp, &hdr, &[(LEVEL_EXT_ID, &[level])], &payload);
    data.extend_from_slice(&rtp);
    Relayed {
        hdr: DatagramHeader {
            channel,
            source: index,
            kind: AUDIO,
            sent_ms: 0,
        },
        data: Bytes::from(data),
        arrived_us: now,
    }
}

/// Everything polled, as short strings: `e1 vad 1=ana`, `w1 mux0`, `link sub a`, ...
fn drain(c: &mut EdgeCore) -> Vec<String> {
    let mut log = Vec::new();
    while let Some(o) = c.poll_output() {
        log.push(match o {
            Output::Write(w) => {
                let t = match w.track {
                    TrackRef::MainAudio => "main".to_string(),
                    TrackRef::MainVideo => "video".to_string(),
                    TrackRef::Mux(k) => format!("mux{k}"),
                };
                format!("w{} {t}", w.viewer.0)
            }
            Output::Event(id, ev) => {
                let what = match &ev {
                    ViewerEvent::Vad { mid, source } => {
                        format!("vad {mid}={}", source.as_deref().unwrap_or("-"))
                    }
                    ViewerEvent::ViewerCount(n) => format!("viewercount {n}"),
                    ev => format!("{} {}", ev.name(), ev.source().unwrap_or("-")),
                };
                format!("e{} {what}", id.0)
            }
            Output::Link(r) => match r {
                LinkRequest::Subscribe(s) => format!("link sub {s}"),
                LinkRequest::Unsubscribe(s) => format!("link unsub {s}"),
                LinkRequest::Keyframe { stream, source } => {
                    format!("link keyframe {stream} {}", source.unwrap_or_default())
                }
                LinkRequest::Talking {
                    source, talking, ..
                } => format!("link talking {source} {talking}"),
                LinkRequest::Authorize { stream, .. } => format!("link authorize {stream}"),
            },
        });
    }
    log
}

/// Events for viewer `id` only, without the viewer counts.
fn events_of(log: &[String], id: u64) -> Vec<String> {
    let p = format!("e{id} ");
    log.iter()
        .filter(|l| l.starts_with(&p) && !l.contains("viewercount"))
        .map(|l| l[p.len()..].to_string())
        .collect()
}

/// Feeds relay source `index` 20 ms packets from `t0` (1.2 s of room noise, then `speech`
/// packets of speech), ticking every 10 ms; returns the next time and the log.
fn talk(
    c: &mut EdgeCore,
    ch: u32,
    index: u16,
    t0: u64,
    seq0: u16,
    speech: usize,
) -> (u64, Vec<String>) {
    let mut log = Vec::new();
    let mut now = t0;
    for i in 0..60 + speech {
        let level = if i < 60 { 70 } else { 20 + (i % 5) as u8 };
        c.handle_packet(now, relayed(ch, index, seq0 + i as u16, level, now));
        c.handle_timeout(now + 10_000);
        log.extend(drain(c));
        now += 20_000;
    }
    (now, log)
}

#[test]
fn a_join_hears_active_and_the_current_tracks_before_any_packet() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 2);
    assert_eq!(drain(&mut c), ["link sub s", "e1 viewercount 1"]);
    c.handle_sources(0, "s", 7, vec![source(0, "ana"), source(1, "bo")]);
    assert_eq!(drain(&mut c), ["e1 active ana", "e1 active bo"]);
    let (now, log) = talk(&mut c, 7, 0, 0, 0, 5);
    assert!(log.contains(&"e1 vad 1=ana".to_string()), "{log:?}");
    // A second viewer: every live source, then what the tracks carry, then the count; packets
    // only after.
    join(&mut c, now, 2, "s", 2);
    c.handle_packet(now, relayed(7, 0, 200, 20, now));
    let log = drain(&mut c);
    assert_eq!(
        log,
        [
            "e2 active ana",
            "e2 active bo",
            "e2 vad 1=ana",
            "e2 viewercount 2",
            "w1 mux0",
            "w2 mux0"
        ]
    );
}

#[test]
fn a_track_change_is_announced_before_its_first_packet_whatever_the_round() {
    let mut c = core();
    for id in 1..=40 {
        join(&mut c, 0, id, "s", 1);
    }
    c.handle_sources(0, "s", 3, vec![source(0, "ana")]);
    drain(&mut c);
    // Nothing is drained for a whole talkspurt: the queue holds the round, in order.
    let mut now = 0;
    for i in 0..80u16 {
        let level = if i < 60 { 70 } else { 20 };
        c.handle_packet(now, relayed(3, 0, i, level, now));
        c.handle_timeout(now + 10_000);
        now += 20_000;
    }
    let log = drain(&mut c);
    for id in 1..=40 {
        let vad = log.iter().position(|l| *l == format!("e{id} vad 1=ana"));
        let first = log.iter().position(|l| *l == format!("w{id} mux0"));
        assert!(vad.is_some() && first.is_some(), "viewer {id}: {log:?}");
        assert!(vad < first, "viewer {id}: its first packet before its vad");
    }
    assert_eq!(c.metrics.vad_events.load(Ordering::Relaxed), 40);
}

#[test]
fn keyframe_requests_reach_the_origin_once_a_second_per_stream() {
    let mut c = core();
    let video = Mid::from("v");
    for id in [1, 2] {
        c.handle_join(
            0,
            PeerId(id),
            Join {
                stream: "s".into(),
                pinned: Some("cam".into()),
                main_video: Some(video),
                ..Join::default()
            },
        );
    }
    drain(&mut c);
    let asked = |c: &mut EdgeCore| drain(c).iter().filter(|l| l.contains("keyframe")).count();
    c.handle_keyframe_request(100, PeerId(1), video);
    assert_eq!(drain(&mut c), ["link keyframe s cam"]);
    c.handle_keyframe_request(500_000, PeerId(2), video);
    c.handle_keyframe_request(900_000, PeerId(1), video);
    assert_eq!(asked(&mut c), 0, "throttled per stream, whoever asks");
    // Not its main video: nothing.
    c.handle_keyframe_request(2_000_000, PeerId(1), Mid::from("a"));
    assert_eq!(asked(&mut c), 0);
    c.handle_keyframe_request(1_000_100, PeerId(2), video);
    assert_eq!(asked(&mut c), 1);
}

#[test]
fn viewercount_goes_to_a_newcomer_at_once_and_to_all_at_most_once_a_second() {
    let mut c = core();
    c.handle_timeout(0);
    for id in 1..=3 {
        join(&mut c, 1000 * id, id, "s", 1);
    }
    let log = drain(&mut c);
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("viewercount"))
            .collect::<Vec<_>>(),
        ["e1 viewercount 1", "e2 viewercount 2", "e3 viewercount 3"]
    );
    // The next tick tells everyone the count once; the ones within the second stay quiet.
    let counts = |c: &mut EdgeCore, now| {
        c.handle_timeout(now);
        drain(c)
            .into_iter()
            .filter(|l| l.contains("viewercount"))
            .count()
    };
    assert_eq!(counts(&mut c, 10_000), 3);
    join(&mut c, 20_000, 4, "s", 1);
    assert_eq!(drain(&mut c), ["e4 viewercount 4"]);
    let mut sent = 0;
    for t in 3..100 {
        sent += counts(&mut c, t * 10_000);
    }
    assert_eq!(sent, 0, "coalesced: the change waits for the interval");
    assert_eq!(counts(&mut c, 1_010_000), 4);
    assert_eq!(counts(&mut c, 2_500_000), 0, "unchanged: nothing");
}

#[test]
fn link_down_makes_sources_inactive_and_the_next_list_active_again() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    let (now, _) = talk(&mut c, 1, 0, 0, 0, 3);
    c.handle_link_down(now);
    assert_eq!(events_of(&drain(&mut c), 1), ["vad 1=-", "inactive ana"]);
    // The old channel is void: its datagrams are counted as unknown.
    c.handle_packet(now, relayed(1, 0, 500, 20, now));
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.metrics.dropped_unknown_channel.load(Ordering::Relaxed), 1);
    c.handle_sources(now, "s", 9, vec![source(4, "ana")]);
    assert_eq!(events_of(&drain(&mut c), 1), ["active ana"]);
    // Fresh voice activity: ana talks her way back into the track.
    let (_, log) = talk(&mut c, 9, 4, now, 600, 3);
    assert!(log.contains(&"e1 vad 1=ana".to_string()), "{log:?}");
}

#[test]
fn unknown_channels_sources_and_malformed_packets_are_counted_and_dropped() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    // Another thread's stream: its channel is known, its packets are not this thread's.
    c.handle_sources(0, "elsewhere", 2, vec![source(0, "zed")]);
    drain(&mut c);
    c.handle_packet(0, relayed(2, 0, 1, 20, 0));
    c.handle_packet(0, relayed(5, 0, 1, 20, 0));
    c.handle_packet(0, relayed(1, 3, 1, 20, 0));
    let mut bad = relayed(1, 0, 1, 20, 0);
    bad.data = bad.data.slice(..DATAGRAM_HEADER + 5);
    c.handle_packet(0, bad);
    let mut short = relayed(1, 0, 1, 20, 0);
    short.data = short.data.slice(..4);
    c.handle_packet(0, short);
    // Audio older than the relay's age limit.
    c.handle_packet(MAX_RELAY_AGE_US + 1, relayed(1, 0, 2, 20, 0));
    assert!(drain(&mut c).is_empty());
    let m = &c.metrics;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    assert_eq!(
        (
            n(&m.dropped_unknown_channel),
            n(&m.dropped_unknown),
            n(&m.dropped_malformed),
            n(&m.dropped_stale)
        ),
        (1, 1, 2, 1)
    );
}

#[test]
fn the_first_viewer_subscribes_and_the_last_one_out_unsubscribes() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    join(&mut c, 0, 2, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    let log = drain(&mut c);
    assert_eq!(log.iter().filter(|l| l.starts_with("link")).count(), 1);
    c.handle_leave(PeerId(1));
    assert!(drain(&mut c).is_empty());
    c.handle_leave(PeerId(2));
    assert_eq!(drain(&mut c), ["link unsub s"]);
    assert!(c.streams.is_empty() && c.channels.is_empty() && c.viewers.is_empty());
    assert_eq!(c.metrics.viewers.load(Ordering::Relaxed), 0);
    // A leave of a viewer that is gone changes nothing.
    c.handle_leave(PeerId(2));
    assert!(drain(&mut c).is_empty());
}

#[test]
fn a_projection_moves_the_viewer_and_tells_it_what_changed() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 2);
    join(&mut c, 0, 2, "s", 2);
    c.handle_sources(0, "s", 1, vec![source(0, "ana"), source(1, "bo")]);
    let (now, _) = talk(&mut c, 1, 0, 0, 0, 3);
    let p = Projection {
        fixed: vec![(1, "bo".to_string())],
        ..Projection::default()
    };
    c.handle_project(now, PeerId(1), &p);
    // The new group starts from the tracks it had (ana stays, nothing to tell); its next
    // ranking puts bo in the projected track, for this viewer only.
    assert!(drain(&mut c).is_empty());
    c.handle_timeout(now + 10_000);
    assert_eq!(events_of(&drain(&mut c), 1), ["vad 2=bo"]);
    let (g1, g2) = (c.viewers[&PeerId(1)].group, c.viewers[&PeerId(2)].group);
    assert_ne!(g1, g2);
    // One packet of ana: each group's own rewrite, fed to its viewers.
    c.handle_packet(now, relayed(1, 0, 100, 20, now));
    let mut log = drain(&mut c);
    log.sort();
    assert_eq!(log, ["w1 mux0", "w2 mux0"]);
}

#[test]
fn a_projection_into_the_main_track_replaces_the_pinned_source_until_unprojected() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana"), source(1, "bo")]);
    let (now, _) = talk(&mut c, 1, 0, 0, 0, 3);
    let main = |s: Option<&str>| Projection {
        main: s.map(str::to_owned),
        ..Projection::default()
    };
    c.handle_project(now, PeerId(1), &main(Some("ana")));
    // ana leaves the multiplexed track (the main source is never in one) for the main track.
    assert_eq!(events_of(&drain(&mut c), 1), ["vad 1=-"]);
    c.handle_packet(now, relayed(1, 0, 200, 20, now));
    assert_eq!(drain(&mut c), ["w1 main"]);
    // Back to the pinned (main) source: ana is multiplexed again once it talks.
    c.handle_project(now, PeerId(1), &main(None));
    drain(&mut c);
    let (_, log) = talk(&mut c, 1, 0, now, 201, 3);
    assert!(!log.contains(&"w1 main".to_string()));
    assert!(log.contains(&"e1 vad 1=ana".to_string()), "{log:?}");
}

#[test]
fn a_projection_into_an_added_track_grows_the_viewers_tracks() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana"), source(1, "bo")]);
    let (now, _) = talk(&mut c, 1, 0, 0, 0, 3);
    drain(&mut c);
    let p = Projection {
        fixed: vec![(1, "bo".to_string())],
        added: vec![Mid::from("7")],
        ..Projection::default()
    };
    c.handle_project(now, PeerId(1), &p);
    assert_eq!(c.viewers[&PeerId(1)].tracks, [mid(0), Mid::from("7")]);
    c.handle_timeout(now + 10_000);
    assert_eq!(events_of(&drain(&mut c), 1), ["vad 7=bo"]);
    c.handle_packet(now, relayed(1, 1, 300, 20, now));
    assert_eq!(drain(&mut c), ["w1 mux1"]);
    // The same added mid again changes nothing.
    c.handle_project(now, PeerId(1), &p);
    assert_eq!(c.viewers[&PeerId(1)].tracks.len(), 2);
}

#[test]
fn a_live_source_whose_tracks_change_is_updated_not_active_again() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    drain(&mut c);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    assert!(events_of(&drain(&mut c), 1).is_empty());
    let mut with_video = source(0, "ana");
    with_video.tracks.push(TrackInfo {
        media: "video".into(),
        mid: "1".into(),
    });
    c.handle_sources(0, "s", 1, vec![with_video]);
    let log = drain(&mut c);
    assert_eq!(events_of(&log, 1), ["updated ana"]);
}

#[test]
fn a_write_carries_the_groups_header_and_a_slice_of_the_datagram() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    let (now, _) = talk(&mut c, 1, 0, 0, 0, 3);
    let p = relayed(1, 0, 100, 20, now);
    let data = p.data.clone();
    c.handle_packet(now, p);
    let Some(Output::Write(w)) = c.poll_output() else {
        panic!("a write");
    };
    let st = &c.streams["s"];
    let g = c.viewers[&PeerId(1)].group;
    let rw = st.core.rewriter(g, 0).unwrap();
    assert_eq!(w.input.source, Feed::Group(g, 0));
    assert_eq!(w.input.ssrc, rw.ssrc());
    assert_eq!(Some(w.input.seq), rw.last_sent().map(|l| l.0));
    assert_eq!(w.level, Some((false, 20)));
    assert_eq!(w.payload.len(), 60);
    assert_eq!(&w.payload[1..3], &100u16.to_be_bytes());
    // No copy: the payload is the datagram's own memory.
    assert_eq!(w.payload.as_ptr(), data[data.len() - 60..].as_ptr());
}

/// Feeds relay source 0 on channel 1 one packet of each level, 20 ms apart from `now` and
/// numbered from `seq0`, with a tick between; everything polled, in order.
fn outputs_of(c: &mut EdgeCore, now: &mut u64, seq0: u16, levels: &[u8]) -> Vec<Output> {
    let mut outs = Vec::new();
    for (i, &level) in levels.iter().enumerate() {
        c.handle_packet(*now, relayed(1, 0, seq0 + i as u16, level, *now));
        c.handle_timeout(*now + 10_000);
        while let Some(o) = c.poll_output() {
            outs.push(o);
        }
        *now += 20_000;
    }
    outs
}

#[test]
fn an_emptied_track_ends_with_silence_frames_before_its_vad() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    let (mut now, _) = talk(&mut c, 1, 0, 0, 0, 10);
    // Room noise past the hangover: the track empties.
    let outs = outputs_of(&mut c, &mut now, 70, &[70; 100]);
    let vad = outs
        .iter()
        .position(|o| matches!(o, Output::Event(_, ViewerEvent::Vad { source: None, .. })))
        .expect("the track empties");
    let silent: Vec<&Write> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Write(w) if w.payload[..] == opus::SILENCE_FRAME => Some(w),
            _ => None,
        })
        .collect();
    assert_eq!(silent.len(), crate::media::stream::ENDING_FRAMES);
    // They are the last writes before the vad, in one sequence, with the level of silence.
    let writes_before: Vec<&Write> = outs[..vad]
        .iter()
        .filter_map(|o| match o {
            Output::Write(w) => Some(w),
            _ => None,
        })
        .collect();
    let tail = &writes_before[writes_before.len() - silent.len()..];
    assert!(tail.iter().zip(&silent).all(|(a, b)| std::ptr::eq(*a, *b)));
    for w in tail.windows(2) {
        assert_eq!(w[1].input.seq, w[0].input.seq.wrapping_add(1));
    }
    assert!(silent.iter().all(|w| w.level == Some((false, 127))));
    assert!(outs[vad..].iter().all(|o| !matches!(o, Output::Write(_))));
}

#[test]
fn a_source_entering_a_track_replays_its_held_packets_before_the_onset_packet() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    join(&mut c, 0, 2, "s", 1);
    c.handle_sources(0, "s", 1, vec![source(0, "ana")]);
    let levels: Vec<u8> = (0..64).map(|i| if i < 60 { 70 } else { 20 }).collect();
    let outs = outputs_of(&mut c, &mut 0, 500, &levels);
    let vad = outs
        .iter()
        .position(|o| {
            matches!(
                o,
                Output::Event(
                    PeerId(1),
                    ViewerEvent::Vad {
                        source: Some(_),
                        ..
                    }
                )
            )
        })
        .expect("ana enters the track");
    assert!(
        outs[..vad].iter().all(|o| !matches!(o, Output::Write(_))),
        "nothing reaches the track before its vad"
    );
    let mine: Vec<&Write> = outs[vad..]
        .iter()
        .filter_map(|o| match o {
            Output::Write(w) if w.viewer == PeerId(1) => Some(w),
            _ => None,
        })
        .collect();
    // The six held packets (120 ms) of room noise and the first voiced one, their own bytes
    // and levels, then the onset packet (seq 561) and the rest: one numbering, the marker first.
    let sent: Vec<u16> = mine
        .iter()
        .map(|w| u16::from_be_bytes([w.payload[1], w.payload[2]]))
        .collect();
    assert_eq!(sent, (555..564).collect::<Vec<u16>>());
    assert_eq!(mine[0].level, Some((false, 70)));
    assert_eq!(mine[6].level, Some((false, 20)));
    assert!(mine[0].input.marker && mine[1..].iter().all(|w| !w.input.marker));
    for w in mine.windows(2) {
        assert_eq!(w[1].input.seq, w[0].input.seq.wrapping_add(1));
        assert_eq!(w[1].input.ts.wrapping_sub(w[0].input.ts), 960);
    }
    // Per group, counted once; the other viewer of the group got the same.
    assert_eq!(c.metrics.preroll_packets.load(Ordering::Relaxed), 6);
    let theirs = outs
        .iter()
        .filter(|o| matches!(o, Output::Write(w) if w.viewer == PeerId(2)))
        .count();
    assert_eq!(theirs, mine.len());
}

#[test]
fn another_tracks_live_packets_pass_a_switchs_replay_and_the_switched_track_keeps_order() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 2);
    c.handle_sources(0, "s", 1, vec![source(0, "ana"), source(1, "bo")]);
    let (mut now, log) = talk(&mut c, 1, 0, 0, 0, 10);
    assert!(log.contains(&"e1 vad 1=ana".to_string()), "{log:?}");
    // Ana keeps talking in track 0 while bo starts: each round the driver takes only what is
    // live (a budget of 0), so bo's replay waits in its lane.
    let mut live = Vec::new();
    for i in 0..70u16 {
        c.handle_packet(now, relayed(1, 0, 10 + 60 + i, 20 + (i % 5) as u8, now));
        let level = if i < 60 { 70 } else { 20 };
        c.handle_packet(now, relayed(1, 1, 300 + i, level, now));
        c.handle_timeout(now + 10_000);
        while let Some(o) = c.poll_output_within(&mut 0) {
            live.push(o);
        }
        now += 20_000;
    }
    let vad = live
        .iter()
        .position(|o| {
            let bo = |s: &Option<Arc<str>>| s.as_deref() == Some("bo");
            matches!(o, Output::Event(_, ViewerEvent::Vad { mid: m, source }) if *m == mid(1) && bo(source))
        })
        .expect("bo enters track 1, and its vad is live");
    let after: Vec<&TrackRef> = live[vad..]
        .iter()
        .filter_map(|o| match o {
            Output::Write(w) => Some(&w.track),
            _ => None,
        })
        .collect();
    assert!(after.len() >= 5, "ana's packets kept coming: {after:?}");
    assert!(after.iter().all(|t| **t == TrackRef::Mux(0)), "{after:?}");
    assert!(c.replay_waiting());
    // Then the replay, and bo's packets after it, in one numbering, and only then.
    let mut rest = Vec::new();
    while let Some(o) = c.poll_output() {
        match o {
            Output::Write(w) => rest.push(w),
            other => panic!("only bo's writes waited: {other:?}"),
        }
    }
    assert!(!c.replay_waiting());
    assert!(
        rest.len() > 6,
        "the pre-roll and what followed it: {}",
        rest.len()
    );
    assert!(rest.iter().all(|w| w.track == TrackRef::Mux(1)));
    assert!(rest[0].input.marker);
    for w in rest.windows(2) {
        assert_eq!(w[1].input.seq, w[0].input.seq.wrapping_add(1));
    }
    // Once drained, bo's track is live again.
    c.handle_packet(now, relayed(1, 1, 370, 20, now));
    let mut budget = 0;
    let next = c.poll_output_within(&mut budget);
    assert!(matches!(next, Some(Output::Write(w)) if w.track == TrackRef::Mux(1)));
}

// The origin link's properties (channels, indices, relinks), moved from the media thread.

#[test]
fn a_restarted_origin_renumbering_channels_reaches_every_stream() {
    let mut c = core();
    join(&mut c, 0, 1, "a", 1);
    join(&mut c, 0, 2, "z", 1);
    drain(&mut c);
    // The old origin: z subscribed first.
    c.handle_sources(0, "z", 1, vec![source(0, "zed")]);
    c.handle_sources(0, "a", 2, vec![source(0, "ana"), source(1, "bo")]);
    let log = drain(&mut c);
    assert_eq!(events_of(&log, 1), ["active ana", "active bo"]);
    assert_eq!(events_of(&log, 2), ["active zed"]);
    // The link goes: every active source goes inactive, no `stopped`.
    c.handle_link_down(0);
    let log = drain(&mut c);
    assert_eq!(events_of(&log, 1), ["inactive ana", "inactive bo"]);
    assert_eq!(events_of(&log, 2), ["inactive zed"]);
    assert!(c.channels.is_empty() && c.known_channels.is_empty());
    // The new origin numbers the streams in name order, and bo published first this time.
    c.handle_sources(0, "a", 1, vec![source(0, "bo"), source(1, "ana")]);
    c.handle_sources(0, "z", 2, vec![source(0, "zed")]);
    let log = drain(&mut c);
    assert_eq!(events_of(&log, 1), ["active bo", "active ana"]);
    assert_eq!(events_of(&log, 2), ["active zed"]);
    assert_eq!(c.channels.get(&1).map(String::as_str), Some("a"));
    assert_eq!(c.channels.get(&2).map(String::as_str), Some("z"));
    let st = &c.streams["a"];
    let bo = st.core.lookup("bo").unwrap();
    let ana = st.core.lookup("ana").unwrap();
    assert_eq!(st.by_relay.get(&0), Some(&bo));
    assert_eq!(st.by_relay.get(&1), Some(&ana));
    assert!(st.core.is_live(bo) && st.core.is_live(ana));
}

#[test]
fn a_source_list_forgets_indices_it_no_longer_names() {
    let mut c = core();
    join(&mut c, 0, 1, "a", 1);
    c.handle_sources(0, "a", 1, vec![source(0, "ana"), source(1, "bo")]);
    drain(&mut c);
    c.handle_sources(0, "a", 1, vec![source(1, "bo")]);
    assert_eq!(events_of(&drain(&mut c), 1), ["inactive ana"]);
    let st = &c.streams["a"];
    assert_eq!(st.by_relay.get(&0), None);
    // Gone: not live, and (no view names it) its name released by the core.
    assert!(st.core.lookup("ana").is_none_or(|i| !st.core.is_live(i)));
    // The last source going is only its `inactive`: an empty stage is no `stopped`.
    c.handle_sources(0, "a", 1, vec![]);
    assert_eq!(events_of(&drain(&mut c), 1), ["inactive bo"]);
}

#[test]
fn swapped_channels_keep_both_streams_mapped_even_without_a_link_down() {
    let mut c = core();
    join(&mut c, 0, 1, "a", 1);
    join(&mut c, 0, 2, "z", 1);
    c.handle_sources(0, "z", 1, vec![source(0, "zed")]);
    c.handle_sources(0, "a", 2, vec![source(0, "ana")]);
    // a takes 1 from z, then z takes 2 from a: neither may unmap the other's new channel.
    c.handle_sources(0, "a", 1, vec![source(0, "ana")]);
    c.handle_sources(0, "z", 2, vec![source(0, "zed")]);
    assert_eq!(c.channels.get(&1).map(String::as_str), Some("a"));
    assert_eq!(c.channels.get(&2).map(String::as_str), Some("z"));
}

#[test]
fn typed_events_serialize_to_the_millicast_json_sent_before() {
    use serde_json::json;
    let stream: Arc<str> = "panel".into();
    let ana: Option<Arc<str>> = Some("ana".into());
    let active = ViewerEvent::Active(Arc::new(ActiveSource {
        stream: stream.clone(),
        source: None,
        media: vec!["audio".into(), "video".into()],
    }));
    assert_eq!(
        active.to_json(),
        json!({"type": "event", "name": "active", "data": {"streamId": "panel", "sourceId": null,
            "tracks": [{"trackId": "audio", "media": "audio"}, {"trackId": "video", "media": "video"}]}})
    );
    let inactive = ViewerEvent::Inactive {
        stream: stream.clone(),
        source: ana.clone(),
    };
    assert_eq!(
        inactive.to_json(),
        json!({"type": "event", "name": "inactive", "data": {"streamId": "panel", "sourceId": "ana"}})
    );
    let vad = ViewerEvent::Vad {
        mid: Mid::from("2"),
        source: ana,
    };
    assert_eq!(
        vad.to_json(),
        json!({"type": "event", "name": "vad", "data": {"mediaId": "2", "sourceId": "ana"}})
    );
    let empty = ViewerEvent::Vad {
        mid: Mid::from("3"),
        source: None,
    };
    assert_eq!(
        empty.to_json(),
        json!({"type": "event", "name": "vad", "data": {"mediaId": "3", "sourceId": null}})
    );
    assert_eq!(
        ViewerEvent::ViewerCount(12).to_json(),
        json!({"type": "event", "name": "viewercount", "data": {"viewercount": 12}})
    );
    assert_eq!(
        ViewerEvent::Stopped { stream }.to_json(),
        json!({"type": "event", "name": "stopped", "data": {"streamId": "panel"}})
    );
}

#[test]
fn streams_down_voids_only_the_named_streams_and_they_come_back_active() {
    let mut c = core();
    join(&mut c, 0, 1, "a", 1);
    join(&mut c, 0, 2, "z", 1);
    c.handle_sources(0, "a", 1, vec![source(0, "ana")]);
    c.handle_sources(0, "z", (2 << 24) | 1, vec![source(0, "zed")]);
    drain(&mut c);
    // a's owner moved: only a's sources go, and only its channel is forgotten.
    c.handle_streams_down(0, &["a".to_string()]);
    let log = drain(&mut c);
    assert_eq!(events_of(&log, 1), ["inactive ana"]);
    assert!(events_of(&log, 2).is_empty(), "{log:?}");
    assert_eq!(c.channels.get(&1), None);
    assert_eq!(
        c.channels.get(&((2 << 24) | 1)).map(String::as_str),
        Some("z")
    );
    // The new owner's list (another link's slot) brings ana back.
    c.handle_sources(0, "a", (3 << 24) | 1, vec![source(0, "ana")]);
    assert_eq!(events_of(&drain(&mut c), 1), ["active ana"]);
}

#[test]
fn a_watched_core_shows_its_groups_and_their_tracks_and_an_unwatched_one_nothing() {
    let shared: Arc<Shared> = Arc::default();
    let mut c = EdgeCore::new(Arc::default(), shared.clone(), 1);
    join(&mut c, 0, 1, "s", 2);
    join(&mut c, 0, 2, "s", 2);
    c.handle_sources(0, "s", 7, vec![source(0, "ana"), source(1, "bo")]);
    let (now, _) = talk(&mut c, 7, 0, 0, 0, 5);
    assert!(shared.boards.read().is_empty(), "nobody watches: no board");
    shared.boards.watch(true);
    c.handle_timeout(now);
    let boards = shared.boards.read();
    assert_eq!(boards.len(), 1, "{boards:?}");
    let (_, b) = &boards[0];
    assert_eq!(&*b.stream, "s");
    assert_eq!(b.groups.len(), 1, "both viewers share a group: {b:?}");
    let g = &b.groups[0];
    assert_eq!((g.viewers, g.main.clone(), g.excluded), (2, None, 0));
    assert_eq!(
        g.tracks,
        vec![
            TrackBoard::Source(Some(Arc::from("ana"))),
            TrackBoard::Empty
        ]
    );
    // The next board comes a period later, not every tick.
    c.handle_leave(PeerId(2));
    c.handle_timeout(now + BOARD_EVERY_US - 10_000);
    assert_eq!(shared.boards.read()[0].1.groups[0].viewers, 2);
    c.handle_timeout(now + BOARD_EVERY_US);
    assert_eq!(shared.boards.read()[0].1.groups[0].viewers, 1);
    // Unwatched: cleared, so a later watcher reads nothing stale.
    shared.boards.watch(false);
    assert!(shared.boards.read().is_empty());
}

/// [`relayed`] as RED: the packet's frame as primary, the previous one as a redundant block.
fn relayed_red(channel: u32, index: u16, seq: u16, level: u8, now: u64) -> Relayed {
    let plain = relayed(channel, index, seq, level, now);
    let view = RtpView::parse(&plain.data[DATAGRAM_HEADER..]).unwrap();
    let mut payload = Vec::new();
    let frame = view.payload().to_vec();
    crate::media::red::write_red(&mut payload, RELAY_OPUS_PT, &[(960, &frame)], &frame);
    let mut rtp = Vec::new();
    let hdr = HeaderFields {
        payload_type: RELAY_RED_PT,
        sequence_number: seq,
        timestamp: seq as u32 * 960,
        ssrc: 100 + index as u32,
        marker: false,
    };
    write_packet(&mut rtp, &hdr, &[(LEVEL_EXT_ID, &[level])], &payload);
    let mut data = plain.data[..DATAGRAM_HEADER].to_vec();
    data.extend_from_slice(&rtp);
    Relayed {
        data: Bytes::from(data),
        ..plain
    }
}

#[test]
fn red_writes_carry_their_layout_and_the_reach_of_the_tracks_feed() {
    let mut c = core();
    join(&mut c, 0, 1, "s", 1);
    c.handle_sources(0, "s", 3, vec![source(0, "ana")]);
    drain(&mut c);
    let mut writes = Vec::new();
    let mut now = 0;
    for i in 0..70u16 {
        let level = if i < 60 { 70 } else { 20 };
        c.handle_packet(now, relayed_red(3, 0, i, level, now));
        c.handle_timeout(now + 10_000);
        now += 20_000;
        while let Some(o) = c.poll_output() {
            if let Output::Write(w) = o {
                writes.push(w);
            }
        }
    }
    assert!(writes.len() > 5, "{}", writes.len());
    // The first write into the track (the pre-roll's first) has no audio of its feed before
    // it; each later one a frame more.
    for (k, w) in writes.iter().enumerate() {
        let l = w.red.expect("a RED write carries its layout");
        assert_eq!(l.offsets(), [960]);
        assert_eq!(
            (w.payload[l.primary()].len(), w.payload[l.primary()][0]),
            (60, 0x78)
        );
        assert_eq!(w.reach, 960 * k as u32, "write {k}");
    }
    // One that does not parse (end-to-end encrypted) is taken whole, opaque.
    let mut bad = relayed_red(3, 0, 70, 20, now).data.to_vec();
    bad[DATAGRAM_HEADER + 20] ^= 0x7F;
    let bad = Relayed {
        data: Bytes::from(bad),
        ..relayed(3, 0, 70, 20, now)
    };
    c.handle_packet(now, bad);
    let mut opaque = 0;
    while let Some(o) = c.poll_output() {
        if let Output::Write(w) = o {
            assert!(w.red.is_some_and(|l| l.is_opaque()));
            opaque += 1;
        }
    }
    assert_eq!(opaque, 1);
    assert_eq!(c.metrics.red_opaque.load(Ordering::Relaxed), 1);
}
