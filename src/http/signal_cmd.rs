//! The pure parse step of the signalling commands' `data` (`publish`, `unpublish`, `view`,
//! `project`, `unproject`): what a command asks for, or why it is refused. The handlers in
//! [`super::signal`] check the token and the session first, then call these and act. Kept apart
//! from the handlers so the parsing can be unit-tested and fuzzed without a server
//! (`fuzz/fuzz_targets/signal_cmd.rs`).

use serde_json::Value;

use crate::millicast::MAX_SOURCE_ID;

/// Most sourceIds one `excludedSourceIds` list may name: the edge's per-view bound.
pub const MAX_SOURCE_LIST: usize = crate::edge::MAX_EXCLUDED;

/// Why a command's data is refused; the message goes back to the client in its `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
// Each variant reads as its `#[error]` message.
#[allow(missing_docs)]
pub enum CmdError {
    #[error("{0} needs data.sdp, the SDP offer")]
    MissingSdp(&'static str),
    #[error("sourceId must be at most {MAX_SOURCE_ID} printable characters")]
    BadSourceId,
    #[error("sourceId must be a string")]
    SourceIdNotString,
    #[error("pinnedSourceId must be a string")]
    BadPinned,
    #[error("{0} must hold sourceId strings")]
    BadSourceListItem(&'static str),
    #[error("{0} must be an array of at most {MAX_SOURCE_LIST} sourceIds")]
    BadSourceList(&'static str),
    #[error("project needs data.mapping, a list of {{media, mediaId}}")]
    MissingMapping,
    #[error("only audio can be projected: chorus streams are audio; a main source's video plays only in the main video track, with its audio (project into the main track with {{media: \"audio\"}} and no mediaId)")]
    NotAudio,
    #[error("unknown trackId {0:?}: the tracks of a source are \"audio\" and \"video\", as its active event says")]
    UnknownTrack(String),
    #[error("mediaId must be a mid string")]
    MissingMediaId,
    #[error("mediaId {0:?} is not a mid (1 to 16 token characters)")]
    BadMid(String),
    #[error(
        "a view with video cannot add tracks (addRemoteTrack): project into its offer's tracks"
    )]
    AddedWithVideo,
    #[error(
        "at most {} multiplexed tracks per view, added ones included",
        crate::edge::MAX_TRACKS
    )]
    TooManyTracks,
    #[error("select picks a simulcast or SVC layer of the main video; chorus has none to pick (Opus audio, video forwarded as published): only automatic selection, layer {{}}, is possible")]
    NoLayers,
    #[error("layer must be an object (LayerInfo), or {{}} for automatic selection")]
    BadLayer,
    #[error("events must be an array of at most {MAX_EVENT_NAMES} event names")]
    BadEvents,
    #[error("unproject needs data.mediaIds")]
    MissingMediaIds,
    #[error("record must be true or false")]
    BadRecord,
    #[error("priority must be an integer from -2147483648 to 2147483647")]
    BadPriority,
}

/// Reads an optional sourceId; "" and null both mean the main source.
pub(crate) fn source_id(data: &Value) -> Result<Option<String>, CmdError> {
    match data.get("sourceId") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_SOURCE_ID && !s.chars().any(char::is_control) => {
            Ok(Some(s.clone()))
        }
        Some(Value::String(_)) => Err(CmdError::BadSourceId),
        Some(_) => Err(CmdError::SourceIdNotString),
    }
}

/// Reads a list of sourceIds (`excludedSourceIds`); null and "" mean the main source.
pub(crate) fn source_list(data: &Value, field: &'static str) -> Result<Vec<String>, CmdError> {
    match data.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) if a.len() <= MAX_SOURCE_LIST => a
            .iter()
            .map(|v| match v {
                Value::Null => Ok(String::new()),
                Value::String(s) if s.len() <= MAX_SOURCE_ID => Ok(s.clone()),
                _ => Err(CmdError::BadSourceListItem(field)),
            })
            .collect(),
        Some(_) => Err(CmdError::BadSourceList(field)),
    }
}

/// `publish {sdp, sourceId?, priority?, events?, record?}` (the stream `name` is checked against the token by the
/// handler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishCmd<'a> {
    /// The SDP offer.
    pub sdp: &'a str,
    /// The sourceId (None: the main source).
    pub source: Option<String>,
    /// Redundant ingest: of a sourceId's feeds the highest priority plays (the SDK's
    /// `publish({priority})`, Millicast's "backup publishing"; 0 when absent, as the SDK sends
    /// none for 0).
    pub priority: i32,
    /// `events`: which publisher events it wants (`active`, `inactive`, `viewercount`);
    /// None: none, as the SDK sends no list unless the app asked.
    pub events: Option<Vec<String>>,
    /// `record`: record this feed (None: as the token says).
    pub record: Option<bool>,
}

impl<'a> PublishCmd<'a> {
    /// Reads the command's `data`.
    pub fn parse(data: &'a Value) -> Result<Self, CmdError> {
        let sdp = data
            .get("sdp")
            .and_then(Value::as_str)
            .ok_or(CmdError::MissingSdp("publish"))?;
        let priority = match data.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or(CmdError::BadPriority)?,
        };
        let record = match data.get("record") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_bool().ok_or(CmdError::BadRecord)?),
        };
        Ok(PublishCmd {
            sdp,
            source: source_id(data)?,
            priority,
            events: event_names(data)?,
            record,
        })
    }
}

/// `unpublish {sourceId?}`: `source` None stops every publication of the session, Some(None)
/// the main source's, Some(Some(id)) that sourceId's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishCmd {
    /// Which publication stops (see the type).
    pub source: Option<Option<String>>,
}

impl UnpublishCmd {
    /// Reads the command's `data`.
    pub fn parse(data: &Value) -> Result<Self, CmdError> {
        let source = if data.get("sourceId").is_some() {
            Some(source_id(data)?)
        } else {
            None
        };
        Ok(UnpublishCmd { source })
    }
}

/// `view {sdp, pinnedSourceId?, excludedSourceIds?, events?}` (`streamId` is checked by the
/// handler; `layer` asks for what chorus always does, automatic selection, see
/// [`select_layer`]; `vad` is implied by the multiplexed tracks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewCmd<'a> {
    /// The SDP offer.
    pub sdp: &'a str,
    /// `pinnedSourceId`: the source on the main track (None: the main source).
    pub pinned: Option<String>,
    /// `excludedSourceIds`: sources never forwarded to this viewer.
    pub excluded: Vec<String>,
    /// `events`: the only events it is sent; None: all of them.
    pub events: Option<Vec<String>>,
}

impl<'a> ViewCmd<'a> {
    /// Reads the command's `data`.
    pub fn parse(data: &'a Value) -> Result<Self, CmdError> {
        let sdp = data
            .get("sdp")
            .and_then(Value::as_str)
            .ok_or(CmdError::MissingSdp("view"))?;
        let pinned = match data.get("pinnedSourceId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= MAX_SOURCE_ID => Some(s.clone()),
            Some(_) => return Err(CmdError::BadPinned),
        };
        let excluded = source_list(data, "excludedSourceIds")?;
        Ok(ViewCmd {
            sdp,
            pinned,
            excluded,
            events: event_names(data)?,
        })
    }
}

/// The tracks of one view that `project` may name, by mid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewTracks {
    /// The main audio track (the first audio m-line of the offer).
    pub main_audio: Option<String>,
    /// The main video track, if the offer had one.
    pub main_video: Option<String>,
    /// The multiplexed tracks: the offer's, then those added since.
    pub tracks: Vec<String>,
}

/// Where one mapping of a `project` puts its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The main tracks (a mapping without `mediaId`, or naming the main audio's mid): the
    /// source replaces the pinned one there, its video too when the view has video.
    Main,
    /// One of the view's multiplexed tracks.
    Track(String),
    /// A mid the offer did not have: a track the SDK's `addRemoteTrack` added with a local
    /// renegotiation, which the server never sees. It becomes a multiplexed track.
    Added(String),
}

/// `project {sourceId, mapping: [{trackId|media, mediaId}]}`: the source ("" = main) and
/// where it goes, one [`Target`] per mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectCmd {
    /// The projected source ("" = main).
    pub source: String,
    /// Where it goes.
    pub targets: Vec<Target>,
}

/// A mid as SDP carries it (RFC 8843 §5: a token) and the mid header extension can (16 bytes).
fn valid_mid(mid: &str) -> bool {
    (1..=16).contains(&mid.len())
        && mid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`{|}~".contains(&b))
}

impl ProjectCmd {
    /// Reads the command's `data` for a view with these tracks.
    pub fn parse(data: &Value, view: &ViewTracks) -> Result<Self, CmdError> {
        let source = source_id(data)?.unwrap_or_default();
        let mapping = data
            .get("mapping")
            .and_then(Value::as_array)
            .ok_or(CmdError::MissingMapping)?;
        let mut targets = Vec::new();
        let mut added = 0;
        for m in mapping {
            // The SDK names the source's track by `trackId` (chorus's `active` gives each
            // track its kind as id) or by `media`.
            let kind = m
                .get("media")
                .or_else(|| m.get("trackId"))
                .and_then(Value::as_str);
            match kind {
                None | Some("audio") => {}
                Some("video") => return Err(CmdError::NotAudio),
                Some(other) => return Err(CmdError::UnknownTrack(other.to_owned())),
            }
            let mid = match m.get("mediaId") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(_) => return Err(CmdError::MissingMediaId),
            };
            let target = match mid {
                None => Target::Main,
                Some(mid) if view.main_audio.as_deref() == Some(&mid) => Target::Main,
                Some(mid) if view.main_video.as_deref() == Some(&mid) => {
                    return Err(CmdError::NotAudio)
                }
                Some(mid) if view.tracks.contains(&mid) => Target::Track(mid),
                Some(mid) if !valid_mid(&mid) => return Err(CmdError::BadMid(mid)),
                Some(_) if view.main_video.is_some() => return Err(CmdError::AddedWithVideo),
                Some(mid) => {
                    added += 1;
                    if view.tracks.len() + added > crate::edge::MAX_TRACKS {
                        return Err(CmdError::TooManyTracks);
                    }
                    Target::Added(mid)
                }
            };
            targets.push(target);
        }
        Ok(ProjectCmd { source, targets })
    }
}

/// `select {layer}`: Millicast picks a simulcast or SVC layer of the main video with it. chorus
/// has no layers to pick (audio is one Opus stream per source; a main video is forwarded as
/// published, one encoding): automatic selection (`{}` or no layer) is what it already does,
/// and a named layer is refused, saying so.
pub(crate) fn select_layer(data: &Value) -> Result<(), CmdError> {
    match data.get("layer") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(o)) if o.is_empty() => Ok(()),
        Some(Value::Object(_)) => Err(CmdError::NoLayers),
        Some(_) => Err(CmdError::BadLayer),
    }
}

/// Most names an `events` list may hold (Millicast has nine events).
pub(crate) const MAX_EVENT_NAMES: usize = 16;

/// Reads an optional `events` list (`view` and `publish`): None when absent (the default set).
/// Names chorus does not know are kept and never match: a newer client's list still works.
pub(crate) fn event_names(data: &Value) -> Result<Option<Vec<String>>, CmdError> {
    match data.get("events") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.len() <= MAX_EVENT_NAMES => a
            .iter()
            .map(|v| match v {
                Value::String(s) if s.len() <= 32 => Ok(s.clone()),
                _ => Err(CmdError::BadEvents),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(CmdError::BadEvents),
    }
}

/// `unproject {mediaIds}`: the mids whose projection ends (numbers and other values read as
/// their JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnprojectCmd {
    /// The mids whose projection ends.
    pub mids: Vec<String>,
}

impl UnprojectCmd {
    /// Reads the command's `data`.
    pub fn parse(data: &Value) -> Result<Self, CmdError> {
        let mids = data
            .get("mediaIds")
            .and_then(Value::as_array)
            .ok_or(CmdError::MissingMediaIds)?
            .iter()
            .map(|m| match m {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        Ok(UnprojectCmd { mids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn publish_and_unpublish_read_sdp_and_source() {
        let d = json!({"sdp": "v=0", "sourceId": "ana"});
        assert_eq!(
            PublishCmd::parse(&d),
            Ok(PublishCmd {
                sdp: "v=0",
                source: Some("ana".into()),
                priority: 0,
                events: None,
                record: None,
            })
        );
        let r = |v: Value| PublishCmd::parse(&json!({"sdp": "v=0", "record": v})).map(|c| c.record);
        assert_eq!(r(json!(true)), Ok(Some(true)));
        assert_eq!(r(json!(false)), Ok(Some(false)));
        assert_eq!(r(json!(null)), Ok(None));
        assert_eq!(r(json!("yes")), Err(CmdError::BadRecord));
        let p =
            |v: Value| PublishCmd::parse(&json!({"sdp": "v=0", "priority": v})).map(|c| c.priority);
        assert_eq!(p(json!(7)), Ok(7));
        assert_eq!(p(json!(-2147483648i64)), Ok(i32::MIN));
        assert_eq!(p(json!(null)), Ok(0));
        for bad in [json!(2147483648i64), json!(1.5), json!("1"), json!(true)] {
            assert_eq!(p(bad), Err(CmdError::BadPriority));
        }
        let main = json!({"sdp": "v=0", "sourceId": ""});
        assert_eq!(PublishCmd::parse(&main).unwrap().source, None);
        assert_eq!(
            PublishCmd::parse(&json!({"sourceId": "ana"}))
                .unwrap_err()
                .to_string(),
            "publish needs data.sdp, the SDP offer"
        );
        let long = json!({"sdp": "v=0", "sourceId": "x".repeat(MAX_SOURCE_ID + 1)});
        assert_eq!(PublishCmd::parse(&long), Err(CmdError::BadSourceId));
        let ctl = json!({"sdp": "v=0", "sourceId": "a\u{7}"});
        assert_eq!(PublishCmd::parse(&ctl), Err(CmdError::BadSourceId));
        let num = json!({"sdp": "v=0", "sourceId": 7});
        assert_eq!(
            PublishCmd::parse(&num).unwrap_err().to_string(),
            "sourceId must be a string"
        );
        assert_eq!(UnpublishCmd::parse(&json!({})).unwrap().source, None);
        assert_eq!(
            UnpublishCmd::parse(&json!({"sourceId": null}))
                .unwrap()
                .source,
            Some(None)
        );
        assert_eq!(
            UnpublishCmd::parse(&json!({"sourceId": "bo"}))
                .unwrap()
                .source,
            Some(Some("bo".into()))
        );
        assert!(UnpublishCmd::parse(&json!({"sourceId": []})).is_err());
    }

    #[test]
    fn view_reads_pinned_and_bounded_exclusions() {
        let d = json!({"sdp": "v=0", "pinnedSourceId": "ana", "excludedSourceIds": [null, "bo"]});
        assert_eq!(
            ViewCmd::parse(&d),
            Ok(ViewCmd {
                sdp: "v=0",
                pinned: Some("ana".into()),
                excluded: vec![String::new(), "bo".into()],
                events: None,
            })
        );
        assert_eq!(
            ViewCmd::parse(&json!({})).unwrap_err().to_string(),
            "view needs data.sdp, the SDP offer"
        );
        let pinned = json!({"sdp": "v=0", "pinnedSourceId": 1});
        assert_eq!(ViewCmd::parse(&pinned), Err(CmdError::BadPinned));
        let many = json!({"sdp": "v=0", "excludedSourceIds": vec!["a"; MAX_SOURCE_LIST + 1]});
        assert_eq!(
            ViewCmd::parse(&many).unwrap_err().to_string(),
            "excludedSourceIds must be an array of at most 64 sourceIds"
        );
        let bad = json!({"sdp": "v=0", "excludedSourceIds": [1]});
        assert_eq!(
            ViewCmd::parse(&bad).unwrap_err().to_string(),
            "excludedSourceIds must hold sourceId strings"
        );
    }

    #[test]
    fn project_finds_the_main_track_added_tracks_and_refuses_video() {
        let view = ViewTracks {
            main_audio: Some("0".into()),
            main_video: None,
            tracks: vec!["1".to_owned(), "2".to_owned()],
        };
        let d = json!({"sourceId": "ana", "mapping": [
            {"media": "audio", "mediaId": "2"}, {"trackId": "audio", "mediaId": 1},
            {"media": "audio"}, {"media": "audio", "mediaId": "0"}, {"media": "audio", "mediaId": "5"}]});
        assert_eq!(
            ProjectCmd::parse(&d, &view),
            Ok(ProjectCmd {
                source: "ana".into(),
                targets: vec![
                    Target::Track("2".into()),
                    Target::Track("1".into()),
                    Target::Main,
                    Target::Main,
                    Target::Added("5".into()),
                ]
            })
        );
        assert_eq!(
            ProjectCmd::parse(&json!({"sourceId": "ana"}), &view)
                .unwrap_err()
                .to_string(),
            "project needs data.mapping, a list of {media, mediaId}"
        );
        // The first bad mapping entry decides the error.
        let d = json!({"mapping": [{"media": "video"}, {"mediaId": "x y"}]});
        assert_eq!(ProjectCmd::parse(&d, &view), Err(CmdError::NotAudio));
        assert!(CmdError::NotAudio
            .to_string()
            .starts_with("only audio can be projected"));
        let d = json!({"mapping": [{"mediaId": "x y"}]});
        assert_eq!(
            ProjectCmd::parse(&d, &view),
            Err(CmdError::BadMid("x y".into()))
        );
        let d = json!({"mapping": [{"trackId": "screen", "mediaId": "1"}]});
        assert_eq!(
            ProjectCmd::parse(&d, &view),
            Err(CmdError::UnknownTrack("screen".into()))
        );
        let d = json!({"mapping": [{"media": "audio", "mediaId": true}]});
        assert_eq!(ProjectCmd::parse(&d, &view), Err(CmdError::MissingMediaId));
        // A view with video keeps str0m for its media: no added tracks; its video mid is video.
        let video = ViewTracks {
            main_video: Some("v".into()),
            ..view.clone()
        };
        let d = json!({"mapping": [{"mediaId": "5"}]});
        assert_eq!(ProjectCmd::parse(&d, &video), Err(CmdError::AddedWithVideo));
        let d = json!({"mapping": [{"mediaId": "v"}]});
        assert_eq!(ProjectCmd::parse(&d, &video), Err(CmdError::NotAudio));
        // Added tracks count against the view's bound.
        let full = ViewTracks {
            tracks: (0..crate::edge::MAX_TRACKS)
                .map(|i| format!("m{i}"))
                .collect(),
            ..view
        };
        assert_eq!(ProjectCmd::parse(&d, &full), Err(CmdError::TooManyTracks));
    }

    #[test]
    fn select_takes_only_automatic_selection_and_events_lists_are_bounded() {
        assert_eq!(select_layer(&json!({})), Ok(()));
        assert_eq!(select_layer(&json!({"layer": {}})), Ok(()));
        assert_eq!(
            select_layer(&json!({"layer": {"encodingId": "h"}})),
            Err(CmdError::NoLayers)
        );
        assert_eq!(select_layer(&json!({"layer": 2})), Err(CmdError::BadLayer));
        assert_eq!(event_names(&json!({})), Ok(None));
        assert_eq!(
            event_names(&json!({"events": ["vad", "future"]})),
            Ok(Some(vec!["vad".to_owned(), "future".into()]))
        );
        assert_eq!(
            event_names(&json!({"events": [1]})),
            Err(CmdError::BadEvents)
        );
        let many = json!({"events": vec!["vad"; MAX_EVENT_NAMES + 1]});
        assert_eq!(event_names(&many), Err(CmdError::BadEvents));
        let d = json!({"sdp": "v=0", "events": ["active"]});
        assert_eq!(
            ViewCmd::parse(&d).unwrap().events,
            Some(vec!["active".to_owned()])
        );
        let d = json!({"sdp": "v=0", "events": ["viewercount"]});
        assert_eq!(
            PublishCmd::parse(&d).unwrap().events,
            Some(vec!["viewercount".to_owned()])
        );
    }

    #[test]
    fn unproject_reads_media_ids_as_text() {
        let d = json!({"mediaIds": ["1", 2, null]});
        assert_eq!(
            UnprojectCmd::parse(&d).unwrap().mids,
            vec!["1".to_owned(), "2".into(), "null".into()]
        );
        assert_eq!(
            UnprojectCmd::parse(&json!({})),
            Err(CmdError::MissingMediaIds)
        );
    }
}
