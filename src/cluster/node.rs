//! A node's record in the registry (`chorus:node:{id}`), as JSON.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NodeKind {
    /// Takes publications (and answers directors' calls).
    Origin,
    /// Serves viewers.
    Edge,
    /// `chorus serve`: both, alone.
    Serve,
}

impl NodeKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NodeKind::Origin => "origin",
            NodeKind::Edge => "edge",
            NodeKind::Serve => "serve",
        }
    }
}

/// Whether a node takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NodeState {
    Serving,
    /// Finishing what it has; directors send it nothing new.
    Draining,
}

/// What a node carries right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Load {
    /// Viewers (edges).
    pub viewers: u64,
    /// Live publications, one per source (origins).
    pub publications: u64,
}

/// One node's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    pub id: String,
    pub kind: NodeKind,
    /// New at every start: a lease holder is `{id}/{boot}`.
    pub boot: String,
    /// The director's base URL (`http://host:port`).
    pub http: String,
    /// The signalling URL publishers (origins) or viewers (edges) are sent to.
    pub ws: String,
    /// The QUIC relay address edges link to (origins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Hex SHA-256 of the relay certificate (origins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Most viewers (edges); None = no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    pub load: Load,
    /// Streams with viewers here (edges), at most `MAX_ADVERTISED_STREAMS`.
    #[serde(default)]
    pub streams: Vec<String>,
    pub state: NodeState,
}

impl NodeRecord {
    /// What this node's leases hold.
    pub(crate) fn holder(&self) -> String {
        format!("{}/{}", self.id, self.boot)
    }
}

/// A node's record as read back, with the age of its last heartbeat.
#[derive(Debug, Clone)]
pub(crate) struct NodeEntry {
    pub record: NodeRecord,
    pub age: Duration,
}

/// The serving origin with the fewest publications (this node, `me`, wins ties: no hop).
pub(crate) fn least_loaded_origin<'a>(nodes: &'a [NodeEntry], me: &str) -> Option<&'a NodeEntry> {
    nodes
        .iter()
        .filter(|n| {
            matches!(n.record.kind, NodeKind::Origin | NodeKind::Serve)
                && n.record.state == NodeState::Serving
        })
        .min_by_key(|n| {
            (
                n.record.load.publications,
                n.record.id != me,
                n.record.id.clone(),
            )
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id: &str, kind: NodeKind, publications: u64) -> NodeEntry {
        NodeEntry {
            record: NodeRecord {
                id: id.into(),
                kind,
                boot: "b".into(),
                http: format!("http://{id}"),
                ws: format!("ws://{id}/ws"),
                relay: None,
                fingerprint: None,
                region: None,
                capacity: None,
                load: Load {
                    viewers: 0,
                    publications,
                },
                streams: vec![],
                state: NodeState::Serving,
            },
            age: Duration::ZERO,
        }
    }

    #[test]
    fn least_loaded_origin_prefers_fewer_publications_then_itself() {
        let nodes = vec![
            record("a", NodeKind::Origin, 2),
            record("b", NodeKind::Origin, 1),
            record("c", NodeKind::Origin, 1),
            record("e", NodeKind::Edge, 0),
        ];
        assert_eq!(least_loaded_origin(&nodes, "a").unwrap().record.id, "b");
        assert_eq!(least_loaded_origin(&nodes, "c").unwrap().record.id, "c");
        let mut draining = nodes.clone();
        draining[1].record.state = NodeState::Draining;
        draining[2].record.state = NodeState::Draining;
        assert_eq!(least_loaded_origin(&draining, "c").unwrap().record.id, "a");
        assert!(least_loaded_origin(&nodes[3..], "e").is_none());
    }

    #[test]
    fn a_record_round_trips_as_json() {
        let r = record("o1", NodeKind::Origin, 3).record;
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains(r#""kind":"origin""#) && j.contains(r#""state":"serving""#));
        assert_eq!(serde_json::from_str::<NodeRecord>(&j).unwrap(), r);
    }
}
