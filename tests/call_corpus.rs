//! The packet core against real recorded speech: `tests/corpus/call`, a telephone call between
//! two people (pyannote.audio's sample from PyPI, MIT), one source per talker, measured against
//! the turns a person marked by hand (`<id>.turns`), plus `line`, the call's own background
//! noise, which never talks. How it is built: `tests/corpus/build_call.py`.

use std::path::Path;

use chorus::replay::{corpus, run, ReplayOptions, ReplayResult};

fn speakers() -> Vec<corpus::Speaker> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/call");
    corpus::load(&dir).expect("call corpus loads")
}

fn replay(tracks: u8, levels: bool, exclude: &[&str]) -> ReplayResult {
    let o = ReplayOptions {
        tracks,
        levels,
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        ..ReplayOptions::default()
    };
    run(&speakers(), &o).expect("replay runs")
}

/// Share of the run's time `line` (noise) held a track.
fn noise_share(r: &ReplayResult) -> f64 {
    r.summary.held_ms["line"] as f64 / 30_000.0
}

#[test]
fn the_corpus_holds_two_annotated_talkers_and_the_line() {
    let sp = speakers();
    let ids: Vec<&str> = sp.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["diane", "line", "sheila"]);
    for s in &sp {
        assert!(s.levels.is_some(), "{}: levels", s.id);
        // 30 s of 20 ms packets.
        assert!(
            (1495..=1505).contains(&s.packets.len()),
            "{}",
            s.packets.len()
        );
    }
    let turns = |id: &str| {
        sp.iter()
            .find(|s| s.id == id)
            .unwrap()
            .turns
            .clone()
            .unwrap()
    };
    assert_eq!(turns("diane").len(), 5);
    assert_eq!(turns("sheila").len(), 5);
    assert!(turns("line").is_empty());
}

#[test]
fn real_talkers_are_heard_within_100ms_of_the_annotation_and_nothing_is_clipped() {
    for (tracks, levels) in [(2, true), (3, true), (2, false)] {
        let r = replay(tracks, levels, &[]);
        let s = &r.summary;
        let what = format!("tracks={tracks} levels={levels}: {s:?}");
        assert_eq!(s.turns_heard, s.turns, "{what}");
        let lat = s.latency_ms.as_ref().expect("turns heard");
        assert!(lat.p95 <= 100, "{what}");
        // The pre-roll replays each turn's start: at most the part of one frame before it.
        let clip = s.clipped_ms.as_ref().expect("turns heard");
        assert!(clip.p95 <= 20, "{what}");
        assert_eq!(s.cut_while_talking, 0, "{what}");
        assert!(noise_share(&r) < 0.005, "{what}");
        assert!(s.held_outside_turns_ms.values().all(|&v| v == 0), "{what}");
        assert_eq!(s.seq_discontinuities, 0, "{what}");
        assert_eq!(s.ts_backwards_at_switch, 0, "{what}");
    }
}

#[test]
fn an_excluded_talker_never_reaches_a_track() {
    let r = replay(2, true, &["sheila"]);
    assert!(r
        .changes
        .iter()
        .all(|c| c.source.as_deref() != Some("sheila")));
    assert_eq!(r.summary.held_ms["sheila"], 0);
    let lat = r.summary.latency_ms.as_ref().expect("diane heard");
    assert!(lat.p95 <= 100, "{:?}", r.summary);
}
