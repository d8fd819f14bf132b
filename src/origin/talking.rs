//! Who is talking in each stream, as the edges judge it from the Opus RTP they forward. Each edge
//! reports a source's flips over its link; a source talks while at least one edge says so.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

/// One source of one stream started or stopped talking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Talking {
    pub stream: String,
    pub source: String,
    pub talking: bool,
}

pub(crate) struct TalkingBoard {
    tx: broadcast::Sender<Talking>,
    /// (stream, source) -> the edge connections that say it talks.
    claims: Mutex<HashMap<(String, String), Vec<u64>>>,
}

impl Default for TalkingBoard {
    fn default() -> Self {
        TalkingBoard {
            tx: broadcast::channel(1024).0,
            claims: Mutex::new(HashMap::new()),
        }
    }
}

impl TalkingBoard {
    /// Every flip from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Talking> {
        self.tx.subscribe()
    }

    /// Edge connection `conn` says `source` of `stream` talks (or stopped).
    pub(crate) fn report(&self, conn: u64, stream: String, source: String, talking: bool) {
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        let key = (stream, source);
        let before = claims.get(&key).is_some_and(|c| !c.is_empty());
        if talking {
            let c = claims.entry(key.clone()).or_default();
            if !c.contains(&conn) {
                c.push(conn);
            }
        } else if let Some(c) = claims.get_mut(&key) {
            c.retain(|x| *x != conn);
            if c.is_empty() {
                claims.remove(&key);
            }
        }
        let after = claims.get(&key).is_some_and(|c| !c.is_empty());
        if before != after {
            let (stream, source) = key;
            let _ = self.tx.send(Talking {
                stream,
                source,
                talking: after,
            });
        }
    }

    /// The sources of `stream` that talk now (sourceIds; "" is the main source).
    pub(crate) fn talkers(&self, stream: &str) -> Vec<String> {
        let claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        claims
            .keys()
            .filter(|(s, _)| s == stream)
            .map(|(_, source)| source.clone())
            .collect()
    }

    /// An edge connection ended: what only it said talks stops.
    pub(crate) fn drop_conn(&self, conn: u64) {
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        let mut silent = Vec::new();
        claims.retain(|key, c| {
            c.retain(|x| *x != conn);
            if c.is_empty() {
                silent.push(key.clone());
                false
            } else {
                true
            }
        });
        for (stream, source) in silent {
            let _ = self.tx.send(Talking {
                stream,
                source,
                talking: false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_talks_while_any_edge_says_so() {
        let b = TalkingBoard::default();
        let mut rx = b.subscribe();
        let flip = |t: bool| Talking {
            stream: "r".into(),
            source: "m".into(),
            talking: t,
        };
        b.report(1, "r".into(), "m".into(), true);
        b.report(2, "r".into(), "m".into(), true);
        assert_eq!(rx.try_recv().unwrap(), flip(true));
        assert!(rx.try_recv().is_err(), "the second edge changes nothing");
        assert_eq!(b.talkers("r"), ["m"]);
        assert!(b.talkers("other").is_empty());
        b.report(1, "r".into(), "m".into(), false);
        assert!(rx.try_recv().is_err());
        b.drop_conn(2);
        assert_eq!(rx.try_recv().unwrap(), flip(false));
        b.report(3, "r".into(), "m".into(), false);
        assert!(rx.try_recv().is_err(), "silent already");
    }
}
