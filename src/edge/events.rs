//! What a viewer is told, typed: the edge core decides these on the media thread; their
//! Millicast JSON ([`ViewerEvent::to_json`]) is built where the signalling socket writes them
//! (`http::signal`), off the media thread. Names are shared (`Arc<str>`): one event broadcast to a stream's viewers is a
//! reference count per viewer, not a string copy.

use std::sync::Arc;

use serde_json::{json, Value};

use str0m::media::Mid;

/// One event for one viewer, in the order the edge core emitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerEvent {
    /// A source of the stream is live (sent for every live source right after `view`).
    Active(Arc<ActiveSource>),
    /// A live source's tracks changed (Millicast's `updated`: a track added to or removed from
    /// a feed), with the tracks it has now.
    Updated(Arc<ActiveSource>),
    /// A source stopped (or the link that announced it is gone).
    Inactive {
        stream: Arc<str>,
        /// None: the stream's main source.
        source: Option<Arc<str>>,
    },
    /// A multiplexed track (by its mid) now carries this source; None: the track is empty.
    Vad { mid: Mid, source: Option<Arc<str>> },
    /// Viewers of the stream at this edge.
    ViewerCount(usize),
    /// The server ends this view (Millicast's "disconnected from the publisher"): sent just
    /// before the signalling socket closes, never because the stage went quiet.
    Stopped { stream: Arc<str> },
}

/// A live source as `active` announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSource {
    pub stream: Arc<str>,
    /// None: the stream's main source.
    pub source: Option<Arc<str>>,
    /// The media kinds of its tracks ("audio", "video").
    pub media: Vec<String>,
}

impl ViewerEvent {
    /// The source it names, if any (None also for the main source).
    #[cfg(test)]
    pub(crate) fn source(&self) -> Option<&str> {
        match self {
            ViewerEvent::Active(a) | ViewerEvent::Updated(a) => a.source.as_deref(),
            ViewerEvent::Inactive { source, .. } | ViewerEvent::Vad { source, .. } => {
                source.as_deref()
            }
            ViewerEvent::ViewerCount(_) | ViewerEvent::Stopped { .. } => None,
        }
    }

    /// The event as the Millicast SDK reads it. Called where the signalling socket writes it,
    /// never on the media thread that decided it.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let data = match self {
            ViewerEvent::Active(a) | ViewerEvent::Updated(a) => {
                let tracks: Vec<Value> = a
                    .media
                    .iter()
                    .map(|m| json!({"trackId": m, "media": m}))
                    .collect();
                json!({"streamId": &*a.stream, "sourceId": a.source.as_deref(), "tracks": tracks})
            }
            ViewerEvent::Inactive { stream, source } => {
                json!({"streamId": &**stream, "sourceId": source.as_deref()})
            }
            ViewerEvent::Vad { mid, source } => {
                json!({"mediaId": mid.to_string(), "sourceId": source.as_deref()})
            }
            ViewerEvent::ViewerCount(n) => json!({ "viewercount": n }),
            ViewerEvent::Stopped { stream } => json!({ "streamId": &**stream }),
        };
        json!({"type": "event", "name": self.name(), "data": data})
    }

    /// The event's Millicast name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            ViewerEvent::Active(_) => "active",
            ViewerEvent::Updated(_) => "updated",
            ViewerEvent::Inactive { .. } => "inactive",
            ViewerEvent::Vad { .. } => "vad",
            ViewerEvent::ViewerCount(_) => "viewercount",
            ViewerEvent::Stopped { .. } => "stopped",
        }
    }
}
