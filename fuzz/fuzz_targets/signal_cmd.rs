//! The signalling socket's parsing (`http::socket::parse_command` for the
//! `{"type":"cmd","transId":N,"name":...,"data":{...}}` envelope, `http::signal_cmd` for each
//! command's data, through `chorus::fuzzing`) on arbitrary text, as `/ws` and the room socket receive it.
//!
//! 1. Nothing panics; every refusal has a message.
//! 2. The envelope: a `cmd` comes back only from a JSON object with `"type":"cmd"` and an integer
//!    `transId`, with that transId, name and data; events and responses are ignored (None).
//! 3. Each command's data, whatever the command's name (the handlers dispatch on it; here every
//!    parser sees every input): what is accepted is within the stated limits (sourceIds at most
//!    `MAX_SOURCE_ID` bytes, a main source never as `Some("")`, no control characters in a
//!    published sourceId, at most `MAX_SOURCE_LIST` exclusions, projections into the view's
//!    tracks, its main track, or added tracks with a valid mid), and re-encoding what was
//!    parsed parses back to the same.
#![no_main]

use chorus::fuzzing::{
    parse_command, ProjectCmd, PublishCmd, Target, UnprojectCmd, UnpublishCmd, ViewCmd,
    ViewTracks, MAX_SOURCE_ID, MAX_SOURCE_LIST,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_command(text) {
        Ok(Some(cmd)) => {
            let v: Value = serde_json::from_str(text).expect("parse_command accepted it");
            assert_eq!(v["type"], "cmd");
            assert_eq!(v["transId"].as_u64(), Some(cmd.trans_id));
            assert_eq!(
                v.get("name").and_then(Value::as_str).unwrap_or(""),
                cmd.name
            );
            assert_eq!(v.get("data").cloned().unwrap_or(Value::Null), cmd.data);
            let again =
                json!({"type": "cmd", "transId": cmd.trans_id, "name": cmd.name, "data": cmd.data});
            let back = parse_command(&again.to_string())
                .expect("re-encoded cmd")
                .expect("a cmd");
            assert_eq!(
                (back.trans_id, back.name, &back.data),
                (cmd.trans_id, cmd.name, &cmd.data)
            );
            commands(&cmd.data);
        }
        Ok(None) => {
            let v: Value = serde_json::from_str(text).expect("parse_command read it");
            assert!(matches!(v["type"].as_str(), Some("event" | "response")));
        }
        Err((trans_id, message)) => {
            assert!(trans_id.is_none());
            assert!(!message.is_empty());
            // Refused as an envelope; if it is JSON, try it as the data of each command too.
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                commands(&v);
            }
        }
    }
});

fn source_ok(s: &str) {
    assert!(!s.is_empty(), "a main source read as Some(\"\")");
    assert!(s.len() <= MAX_SOURCE_ID, "{} bytes", s.len());
    assert!(
        !s.chars().any(char::is_control),
        "control character in {s:?}"
    );
}

const TRACKS: [&str; 3] = ["0", "1", "7"];

fn commands(data: &Value) {
    match PublishCmd::parse(data) {
        Ok(p) => {
            if let Some(s) = &p.source {
                source_ok(s);
            }
            let again = json!({"sdp": p.sdp, "sourceId": p.source, "priority": p.priority, "events": p.events});
            assert_eq!(PublishCmd::parse(&again), Ok(p));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match UnpublishCmd::parse(data) {
        Ok(p) => {
            if let Some(Some(s)) = &p.source {
                source_ok(s);
            }
            let again = match &p.source {
                None => json!({}),
                Some(s) => json!({"sourceId": s}),
            };
            assert_eq!(UnpublishCmd::parse(&again), Ok(p));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match ViewCmd::parse(data) {
        Ok(v) => {
            assert!(v.pinned.as_ref().is_none_or(|s| s.len() <= MAX_SOURCE_ID));
            assert!(v.excluded.len() <= MAX_SOURCE_LIST);
            assert!(v.excluded.iter().all(|s| s.len() <= MAX_SOURCE_ID));
            let again = json!({"sdp": v.sdp, "pinnedSourceId": v.pinned, "excludedSourceIds": v.excluded, "events": v.events});
            assert_eq!(ViewCmd::parse(&again), Ok(v));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let view = ViewTracks {
        main_audio: Some("9".into()),
        main_video: None,
        tracks: TRACKS.iter().map(|t| t.to_string()).collect(),
    };
    match ProjectCmd::parse(data, &view) {
        Ok(p) => {
            if !p.source.is_empty() {
                source_ok(&p.source);
            }
            let n = data["mapping"].as_array().map(Vec::len);
            assert_eq!(n, Some(p.targets.len()));
            let mapping: Vec<Value> = p
                .targets
                .iter()
                .map(|t| match t {
                    Target::Main => json!({"media": "audio"}),
                    Target::Track(m) => {
                        assert!(view.tracks.contains(m), "{m:?}");
                        json!({"media": "audio", "mediaId": m})
                    }
                    Target::Added(m) => {
                        assert!(!view.tracks.contains(m) && (1..=16).contains(&m.len()));
                        assert!(!m.chars().any(|c| c.is_control() || c == ' '));
                        json!({"media": "audio", "mediaId": m})
                    }
                })
                .collect();
            let again = json!({"sourceId": p.source, "mapping": mapping});
            assert_eq!(ProjectCmd::parse(&again, &view), Ok(p));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match UnprojectCmd::parse(data) {
        Ok(p) => {
            assert_eq!(
                data["mediaIds"].as_array().map(Vec::len),
                Some(p.mids.len())
            );
            let again = json!({"mediaIds": p.mids});
            assert_eq!(UnprojectCmd::parse(&again), Ok(p));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
