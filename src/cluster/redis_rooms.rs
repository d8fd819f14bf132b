//! Rooms and viewer counts in Redis: `chorus:room:{name}` (a hash, member id → record JSON),
//! written only by the holder of `chorus:stream:{name}` (the check and the write are one Lua
//! script, so a lease lost a moment before cannot let a stale origin write), and
//! `chorus:viewers:{stream}` (a hash, node id → `count:written-at-ms` on Redis's clock, so
//! counts of nodes whose clocks differ compare; a count older than [`VIEWERS_TTL`] is dropped).

use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::{Fence, RegistryError, VIEWERS_TTL};

const ROOM_PREFIX: &str = "chorus:room:";
const STREAM_PREFIX: &str = "chorus:stream:";
const VIEWERS_PREFIX: &str = "chorus:viewers:";

/// KEYS: lease, room. ARGV: holder, expiry (Unix s), then member, record pairs. 1 when
/// written; else the lease's holder, or 0 when nobody holds it.
static ROOM_WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local h = redis.call('GET', KEYS[1])
if h ~= ARGV[1] then return h or 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
local exp = tonumber(ARGV[2])
if redis.call('EXPIRETIME', KEYS[2]) < exp then redis.call('EXPIREAT', KEYS[2], exp) end
return 1
",
    )
});

/// The fresh counts of a viewers hash but ARGV[1]'s, dropping stale ones (ARGV[2]: their
/// life in ms); `ms` is Redis's time.
const SUM_OTHERS: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #all, 2 do
  local n, at = string.match(all[i + 1], '^(%d+):(%d+)$')
  if n and ms - tonumber(at) < tonumber(ARGV[2]) then
    if all[i] ~= ARGV[1] then total = total + tonumber(n) end
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
";

const NOW_MS: &str = r"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: viewers. ARGV: node, life (ms), count. Writes the node's count (0 deletes it), keeps
/// the hash alive for the life, returns the others' total.
static VIEWERS_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW_MS}
if tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ':' .. ms)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
{SUM_OTHERS}
return total
"
    ))
});

/// KEYS: viewers. ARGV: '' (nobody left out), life (ms). Every fresh count together.
static VIEWERS_SUM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW_MS}
{SUM_OTHERS}
return total
"
    ))
});

fn err(e: redis::RedisError) -> RegistryError {
    RegistryError::Redis(e.to_string())
}

fn viewers_ms() -> u64 {
    VIEWERS_TTL.as_millis() as u64
}

pub(super) async fn room_write(
    mut c: ConnectionManager,
    room: &str,
    holder: &str,
    records: &[(String, String)],
    expires_at: u64,
) -> Result<Fence, RegistryError> {
    let mut inv = ROOM_WRITE.prepare_invoke();
    inv.key(format!("{STREAM_PREFIX}{room}"))
        .key(format!("{ROOM_PREFIX}{room}"))
        .arg(holder)
        .arg(expires_at);
    for (member, json) in records {
        inv.arg(member).arg(json);
    }
    let v: Value = inv.invoke_async(&mut c).await.map_err(err)?;
    match v {
        Value::Int(1) => Ok(Fence::Written),
        Value::Int(_) => Ok(Fence::NotHolder(None)),
        Value::BulkString(b) => Ok(Fence::NotHolder(Some(
            String::from_utf8_lossy(&b).into_owned(),
        ))),
        other => Err(RegistryError::Malformed {
            key: format!("{ROOM_PREFIX}{room}"),
            why: format!("unexpected script answer {other:?}"),
        }),
    }
}

pub(super) async fn room_read(
    mut c: ConnectionManager,
    room: &str,
) -> Result<Vec<(String, String)>, RegistryError> {
    let mut out: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(format!("{ROOM_PREFIX}{room}"))
        .query_async(&mut c)
        .await
        .map_err(err)?;
    out.sort();
    Ok(out)
}

pub(super) async fn put_viewers(
    mut c: ConnectionManager,
    stream: &str,
    node: &str,
    count: u64,
) -> Result<u64, RegistryError> {
    VIEWERS_PUT
        .key(format!("{VIEWERS_PREFIX}{stream}"))
        .arg(node)
        .arg(viewers_ms())
        .arg(count)
        .invoke_async(&mut c)
        .await
        .map_err(err)
}

pub(super) async fn viewers(mut c: ConnectionManager, stream: &str) -> Result<u64, RegistryError> {
    VIEWERS_SUM
        .key(format!("{VIEWERS_PREFIX}{stream}"))
        .arg("")
        .arg(viewers_ms())
        .invoke_async(&mut c)
        .await
        .map_err(err)
}
