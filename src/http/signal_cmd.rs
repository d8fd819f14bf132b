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
    #[error("only audio can be projected into a multiplexed track")]
    NotAudio,
    #[error("each mapping needs a mediaId")]
    MissingMediaId,
    #[error("mediaId {mid:?} is not one of this view's multiplexed tracks {tracks:?}")]
    NotATrack { mid: String, tracks: Vec<String> },
    #[error("unproject needs data.mediaIds")]
    MissingMediaIds,
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

/// `publish {sdp, sourceId?, priority?}` (the stream `name` is checked against the token by the
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
        Ok(PublishCmd {
            sdp,
            source: source_id(data)?,
            priority,
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

/// `view {sdp, pinnedSourceId?, excludedSourceIds?}` (`streamId` is checked by the handler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewCmd<'a> {
    /// The SDP offer.
    pub sdp: &'a str,
    /// `pinnedSourceId`: the source on the main track (None: the main source).
    pub pinned: Option<String>,
    /// `excludedSourceIds`: sources never forwarded to this viewer.
    pub excluded: Vec<String>,
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
        })
    }
}

/// `project {sourceId, mapping: [{trackId|media, mediaId}]}` into a view whose multiplexed
/// tracks have the mids `tracks`: the source ("" = main) and the mids it goes to, each one of
/// `tracks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectCmd {
    /// The projected source ("" = main).
    pub source: String,
    /// The multiplexed tracks it goes to.
    pub mids: Vec<String>,
}

impl ProjectCmd {
    /// Reads the command's `data` for a view with these multiplexed tracks.
    pub fn parse(data: &Value, tracks: &[String]) -> Result<Self, CmdError> {
        let source = source_id(data)?.unwrap_or_default();
        let mapping = data
            .get("mapping")
            .and_then(Value::as_array)
            .ok_or(CmdError::MissingMapping)?;
        let mut mids = Vec::new();
        for m in mapping {
            if m.get("media")
                .and_then(Value::as_str)
                .is_some_and(|k| k != "audio")
            {
                return Err(CmdError::NotAudio);
            }
            let mid = match m.get("mediaId") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(CmdError::MissingMediaId),
            };
            if !tracks.contains(&mid) {
                return Err(CmdError::NotATrack {
                    mid,
                    tracks: tracks.to_vec(),
                });
            }
            mids.push(mid);
        }
        Ok(ProjectCmd { source, mids })
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
            })
        );
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
    fn project_checks_media_and_tracks_in_order() {
        let tracks = vec!["0".to_owned(), "1".to_owned()];
        let d = json!({"sourceId": "ana", "mapping": [{"media": "audio", "mediaId": "1"}, {"mediaId": 0}]});
        assert_eq!(
            ProjectCmd::parse(&d, &tracks),
            Ok(ProjectCmd {
                source: "ana".into(),
                mids: vec!["1".into(), "0".into()]
            })
        );
        assert_eq!(
            ProjectCmd::parse(&json!({"sourceId": "ana"}), &tracks)
                .unwrap_err()
                .to_string(),
            "project needs data.mapping, a list of {media, mediaId}"
        );
        // The first bad mapping entry decides the error, as the handler always did.
        let d = json!({"mapping": [{"mediaId": "7"}, {"media": "video", "mediaId": "0"}]});
        assert_eq!(
            ProjectCmd::parse(&d, &tracks).unwrap_err().to_string(),
            r#"mediaId "7" is not one of this view's multiplexed tracks ["0", "1"]"#
        );
        let d = json!({"mapping": [{"media": "video", "mediaId": "7"}]});
        assert_eq!(ProjectCmd::parse(&d, &tracks), Err(CmdError::NotAudio));
        let d = json!({"mapping": [{"media": "audio"}]});
        assert_eq!(
            ProjectCmd::parse(&d, &tracks),
            Err(CmdError::MissingMediaId)
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
