//! The registry in Redis (`--redis URL`): `chorus:node:{id}` records with an expiry, the
//! `chorus:nodes` set indexing them, and `chorus:stream:{name}` leases claimed with SET NX PX
//! and refreshed or released only by their holder (compare-and-set Lua scripts). The key is
//! the truth: the index only says which keys to read, and an expired record is dropped from it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::{
    redis_rooms, Claim, Fence, NodeEntry, NodeRecord, Pending, Refresh, Registry, RegistryError,
    LEASE_TTL, MAX_LISTED, NODE_TTL,
};

/// How long one Redis command may take before it counts as failed: a registry that does not
/// answer within it is down for this call (the caller retries on its next round); loopback or
/// a LAN answers in well under a millisecond.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_millis(1000);

/// The longest pause between reconnection attempts while Redis is down: it is back in use
/// within about this long after it returns.
pub(crate) const REDIS_RECONNECT_MAX: Duration = Duration::from_millis(1000);

const NODE_PREFIX: &str = "chorus:node:";
const NODES_INDEX: &str = "chorus:nodes";
const STREAM_PREFIX: &str = "chorus:stream:";

/// Every indexed record with its remaining life; ids whose record expired leave the index.
/// It reads keys it computes rather than ones passed in KEYS: fine on one Redis (the design's),
/// not on a Redis Cluster, where the keys would sit on other shards.
const NODES_SCRIPT: &str = r"
local ids = redis.call('SMEMBERS', KEYS[1])
local out = {}
local n = 0
for _, id in ipairs(ids) do
  local k = ARGV[1] .. id
  local v = redis.call('GET', k)
  if v then
    if n < tonumber(ARGV[2]) then
      table.insert(out, v)
      table.insert(out, redis.call('PTTL', k))
      n = n + 1
    end
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
";

/// SET NX PX, answering 1 when the lease is (now or already) the claimant's, else its holder.
const CLAIM_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local h = redis.call('GET', KEYS[1])
if h == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not h then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return h
";

/// 1: extended; 2: it had lapsed and was free, retaken; else the other holder.
const REFRESH_SCRIPT: &str = r"
local h = redis.call('GET', KEYS[1])
if h == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not h then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return h
";

/// Deletes the lease only if ARGV[1] holds it.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Gives the lease to ARGV[2] only if ARGV[1] still holds it.
const TAKE_OVER_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// The Redis registry: one multiplexed connection that reconnects by itself.
pub(crate) struct RedisRegistry {
    conn: ConnectionManager,
    nodes: Script,
    claim: Script,
    refresh: Script,
    release: Script,
    take_over: Script,
}

fn err(e: redis::RedisError) -> RegistryError {
    RegistryError::Redis(e.to_string())
}

impl RedisRegistry {
    /// A registry at `url` (`redis://host:port/db`). It connects lazily: a node starts while
    /// Redis is down and registers once it is up.
    pub(crate) fn open(url: &str) -> Result<RedisRegistry, RegistryError> {
        let client = redis::Client::open(url).map_err(err)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(REDIS_RECONNECT_MAX);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(err)?;
        Ok(RedisRegistry {
            conn,
            nodes: Script::new(NODES_SCRIPT),
            claim: Script::new(CLAIM_SCRIPT),
            refresh: Script::new(REFRESH_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            take_over: Script::new(TAKE_OVER_SCRIPT),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs a lease script (claim or refresh) on `stream`'s key for `holder`: its code, or
    /// the other holder.
    async fn lease_script(
        &self,
        script: &Script,
        stream: &str,
        holder: &str,
    ) -> Result<Result<i64, String>, RegistryError> {
        let key = format!("{STREAM_PREFIX}{stream}");
        let mut c = self.conn();
        let v: Value = script
            .key(&key)
            .arg(holder)
            .arg(lease_ms())
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        code_or_holder(v, &key)
    }
}

fn lease_ms() -> u64 {
    LEASE_TTL.as_millis() as u64
}

/// A script's answer: 1 (or 2) or a holder's name.
fn code_or_holder(v: Value, key: &str) -> Result<Result<i64, String>, RegistryError> {
    match v {
        Value::Int(n) => Ok(Ok(n)),
        Value::BulkString(b) => Ok(Err(String::from_utf8_lossy(&b).into_owned())),
        other => Err(RegistryError::Malformed {
            key: key.to_owned(),
            why: format!("unexpected script answer {other:?}"),
        }),
    }
}

impl Registry for RedisRegistry {
    fn put_node<'a>(&'a self, node: &'a NodeRecord) -> Pending<'a, ()> {
        Box::pin(async move {
            let json = serde_json::to_string(node).map_err(|e| RegistryError::Malformed {
                key: node.id.clone(),
                why: e.to_string(),
            })?;
            let mut c = self.conn();
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(format!("{NODE_PREFIX}{}", node.id))
                .arg(json)
                .arg("PX")
                .arg(NODE_TTL.as_millis() as u64)
                .ignore()
                .cmd("SADD")
                .arg(NODES_INDEX)
                .arg(&node.id)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(err)
        })
    }

    fn nodes(&self) -> Pending<'_, Vec<NodeEntry>> {
        Box::pin(async move {
            let mut c = self.conn();
            let flat: Vec<Value> = self
                .nodes
                .key(NODES_INDEX)
                .arg(NODE_PREFIX)
                .arg(MAX_LISTED)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            let ttl = NODE_TTL.as_millis() as i64;
            let mut out = Vec::with_capacity(flat.len() / 2);
            for pair in flat.chunks_exact(2) {
                let (Value::BulkString(json), Value::Int(pttl)) = (&pair[0], &pair[1]) else {
                    continue;
                };
                match serde_json::from_slice::<NodeRecord>(json) {
                    Ok(record) => out.push(NodeEntry {
                        record,
                        age: Duration::from_millis(ttl.saturating_sub(*pttl).max(0) as u64),
                    }),
                    // A record this version cannot read (another version's node) is skipped,
                    // not fatal to the whole read.
                    Err(e) => tracing::debug!(error = %e, "unreadable node record skipped"),
                }
            }
            out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
            Ok(out)
        })
    }

    fn claim<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, Claim> {
        Box::pin(async move {
            Ok(
                match self.lease_script(&self.claim, stream, holder).await? {
                    Ok(_) => Claim::Won,
                    Err(h) => Claim::Held(h),
                },
            )
        })
    }

    fn refresh<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, Refresh> {
        Box::pin(async move {
            Ok(
                match self.lease_script(&self.refresh, stream, holder).await? {
                    Ok(2) => Refresh::Reclaimed,
                    Ok(_) => Refresh::Kept,
                    Err(h) => Refresh::Lost(h),
                },
            )
        })
    }

    fn release<'a>(&'a self, stream: &'a str, holder: &'a str) -> Pending<'a, bool> {
        Box::pin(async move {
            let mut c = self.conn();
            let n: i64 = self
                .release
                .key(format!("{STREAM_PREFIX}{stream}"))
                .arg(holder)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(n == 1)
        })
    }

    fn take_over<'a>(&'a self, stream: &'a str, from: &'a str, to: &'a str) -> Pending<'a, bool> {
        Box::pin(async move {
            let mut c = self.conn();
            let n: i64 = self
                .take_over
                .key(format!("{STREAM_PREFIX}{stream}"))
                .arg(from)
                .arg(to)
                .arg(lease_ms())
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(n == 1)
        })
    }

    fn owner<'a>(&'a self, stream: &'a str) -> Pending<'a, Option<String>> {
        Box::pin(async move {
            let mut c = self.conn();
            redis::cmd("GET")
                .arg(format!("{STREAM_PREFIX}{stream}"))
                .query_async::<Option<String>>(&mut c)
                .await
                .map_err(err)
        })
    }

    fn owners(&self) -> Pending<'_, Vec<(String, String)>> {
        Box::pin(async move {
            let mut c = self.conn();
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{STREAM_PREFIX}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 || keys.len() >= MAX_LISTED {
                    break;
                }
            }
            keys.truncate(MAX_LISTED);
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let holders: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            let mut out: Vec<(String, String)> = keys
                .iter()
                .zip(holders)
                .filter_map(|(k, h)| Some((k.strip_prefix(STREAM_PREFIX)?.to_owned(), h?)))
                .collect();
            out.sort();
            Ok(out)
        })
    }

    fn room_write<'a>(
        &'a self,
        room: &'a str,
        holder: &'a str,
        records: &'a [(String, String)],
        expires_at: u64,
    ) -> Pending<'a, Fence> {
        Box::pin(redis_rooms::room_write(
            self.conn(),
            room,
            holder,
            records,
            expires_at,
        ))
    }

    fn room_read<'a>(&'a self, room: &'a str) -> Pending<'a, Vec<(String, String)>> {
        Box::pin(redis_rooms::room_read(self.conn(), room))
    }

    fn put_viewers<'a>(&'a self, stream: &'a str, node: &'a str, count: u64) -> Pending<'a, u64> {
        Box::pin(redis_rooms::put_viewers(self.conn(), stream, node, count))
    }

    fn viewers<'a>(&'a self, stream: &'a str) -> Pending<'a, u64> {
        Box::pin(redis_rooms::viewers(self.conn(), stream))
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};

    use super::super::node::{Load, NodeKind, NodeState};
    use super::*;

    /// A redis-server of this test's own on a free loopback port, killed when dropped.
    struct Server {
        child: Child,
        port: u16,
    }

    impl Server {
        /// Like tests/common's `Redis` (which the crate's own tests cannot reach).
        fn start(port: u16) -> Server {
            let port_arg = port.to_string();
            let args = [
                "--port",
                &port_arg,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ];
            let child = Command::new("redis-server")
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs (scripts/setup-test-deps.sh installs it)");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not listen"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Server { child, port }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn record(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            kind: NodeKind::Edge,
            boot: "b1".into(),
            http: "http://127.0.0.1:1".into(),
            ws: "ws://127.0.0.1:1/ws".into(),
            relay: None,
            fingerprint: None,
            region: Some("eu".into()),
            capacity: Some(3),
            load: Load {
                viewers: 2,
                publications: 0,
            },
            streams: vec!["s".into()],
            state: NodeState::Serving,
        }
    }

    #[tokio::test]
    async fn leases_and_records_in_a_real_redis() {
        let server = Server::start(free_port());
        let r = RedisRegistry::open(&server.url()).unwrap();
        assert_eq!(r.claim("s", "a/1").await.unwrap(), Claim::Won);
        assert_eq!(
            r.claim("s", "b/1").await.unwrap(),
            Claim::Held("a/1".into())
        );
        assert_eq!(r.claim("s", "a/1").await.unwrap(), Claim::Won);
        assert_eq!(
            r.refresh("s", "b/1").await.unwrap(),
            Refresh::Lost("a/1".into())
        );
        assert!(!r.release("s", "b/1").await.unwrap());
        assert_eq!(r.owner("s").await.unwrap().as_deref(), Some("a/1"));
        assert_eq!(r.refresh("s", "a/1").await.unwrap(), Refresh::Kept);
        assert_eq!(r.refresh("t", "a/1").await.unwrap(), Refresh::Reclaimed);
        assert_eq!(
            r.owners().await.unwrap(),
            vec![("s".into(), "a/1".into()), ("t".into(), "a/1".into())]
        );
        // A takeover is fenced on the holder named.
        assert!(!r.take_over("s", "b/2", "c/3").await.unwrap());
        assert!(r.take_over("s", "a/1", "c/3").await.unwrap());
        assert_eq!(r.owner("s").await.unwrap(), Some("c/3".into()));
        assert!(r.take_over("s", "c/3", "a/1").await.unwrap());
        assert!(r.release("s", "a/1").await.unwrap());
        assert_eq!(r.owner("s").await.unwrap(), None);

        r.put_node(&record("e1")).await.unwrap();
        let nodes = r.nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].record, record("e1"));
        assert!(nodes[0].age < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn room_writes_are_fenced_and_viewer_counts_sum_in_a_real_redis() {
        let server = Server::start(free_port());
        let r = RedisRegistry::open(&server.url()).unwrap();
        let rec = [("m1".to_owned(), r#"{"role":"member"}"#.to_owned())];
        assert_eq!(
            r.room_write("s", "a/1", &rec, 4_000_000_000).await.unwrap(),
            Fence::NotHolder(None)
        );
        assert_eq!(r.claim("s", "b/1").await.unwrap(), Claim::Won);
        assert_eq!(
            r.room_write("s", "a/1", &rec, 4_000_000_000).await.unwrap(),
            Fence::NotHolder(Some("b/1".into()))
        );
        assert!(
            r.room_read("s").await.unwrap().is_empty(),
            "nothing written"
        );
        assert_eq!(
            r.room_write("s", "b/1", &rec, 4_000_000_000).await.unwrap(),
            Fence::Written
        );
        assert_eq!(r.room_read("s").await.unwrap(), rec.to_vec());

        assert_eq!(r.put_viewers("s", "e1", 3).await.unwrap(), 0);
        assert_eq!(r.put_viewers("s", "e2", 4).await.unwrap(), 3);
        assert_eq!(r.viewers("s").await.unwrap(), 7);
        assert_eq!(r.put_viewers("s", "e1", 0).await.unwrap(), 4);
        assert_eq!(r.viewers("s").await.unwrap(), 4);
    }

    #[tokio::test]
    async fn an_outage_fails_calls_and_the_registry_reconnects_by_itself() {
        let port = free_port();
        let server = Server::start(port);
        let r = RedisRegistry::open(&server.url()).unwrap();
        r.put_node(&record("e1")).await.unwrap();
        drop(server);
        assert!(r.nodes().await.is_err(), "Redis is down");
        let _back = Server::start(port);
        // An empty Redis (no persistence): the node's next heartbeat registers it again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if r.put_node(&record("e1")).await.is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no reconnection");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(r.nodes().await.unwrap().len(), 1);
    }
}
