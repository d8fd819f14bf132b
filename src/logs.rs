//! The process's log lines: human text (the default) or one JSON object per line for a log
//! shipper (`--log-format json`), each with the node's id once it is known.
//!
//! The JSON shape is flat so a shipper indexes it without a schema: `ts` (RFC 3339, UTC),
//! `level`, `target` (the module), `node`, `msg`, then the event's own fields under their names
//! (`stream`, `source`, `session`, `id` for a peer, `subscriber`, ...). Fields of the spans an
//! event is in are not repeated: chorus logs its ids on the event itself.

use std::fmt;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// tracing's human format: time, level, target, message, `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line (see the module's documentation for its keys).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

/// The filter when `CHORUS_LOG` is unset: chorus's own events, its libraries' warnings.
const DEFAULT_FILTER: &str = "info,str0m=warn,dimpl=warn,quinn=warn";

/// The node id every JSON line carries, set once the server knows it.
static NODE: OnceLock<String> = OnceLock::new();

/// Installs the process's subscriber, writing to stderr; the filter is `CHORUS_LOG` (an
/// `EnvFilter`). A second call (a process that runs two commands) keeps the first.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CHORUS_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(JsonLine).try_init(),
    };
}

/// Names this process in every later JSON line (`node`). The first id set stays.
pub fn set_node(id: &str) {
    let _ = NODE.set(id.to_owned());
}

/// Formats one event as one JSON object.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut ts = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        let msg = fields.remove("msg").unwrap_or(Value::Null);
        // The fixed keys first, in this order, so a person reading the raw lines finds them.
        let head: [(&str, Value); 5] = [
            ("ts", ts.into()),
            ("level", meta.level().as_str().into()),
            ("target", meta.target().into()),
            (
                "node",
                NODE.get().map_or(Value::Null, |n| n.as_str().into()),
            ),
            ("msg", msg),
        ];
        let mut sep = '{';
        for (k, v) in head
            .iter()
            .map(|(k, v)| (*k, v))
            .chain(fields.iter().map(|(k, v)| (k.as_str(), v)))
        {
            let (k, v) = (json(&k)?, json(v)?);
            write!(w, "{sep}{k}:{v}")?;
            sep = ',';
        }
        writeln!(w, "}}")
    }
}

/// One key or value as JSON text.
fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, fmt::Error> {
    serde_json::to_string(v).map_err(|_| fmt::Error)
}

/// Collects an event's fields into the line; `message` becomes `msg`. A field named like one
/// of the line's own keys is kept beside it with a `field.` prefix rather than replacing it.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = match field.name() {
            "message" => "msg".to_owned(),
            n @ ("ts" | "level" | "target" | "node" | "msg") => format!("field.{n}"),
            n => n.to_owned(),
        };
        self.0.insert(name, value);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, debug_value(format!("{value:?}")));
    }
}

/// A field logged with `?` as a JSON value: chorus logs optional ids that way (`source = ?id`),
/// and a shipper wants `"ana"` or `null`, not `"Some(\"ana\")"`. Anything else stays the text.
fn debug_value(text: String) -> Value {
    if text == "None" {
        return Value::Null;
    }
    if let Some(inner) = text.strip_prefix("Some(").and_then(|t| t.strip_suffix(')')) {
        // Debug quotes a string much as JSON does; when it does not parse, keep the text.
        if let Ok(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) =
            serde_json::from_str::<Value>(inner)
        {
            return v;
        }
    }
    Value::String(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, for one test's subscriber.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(f: impl FnOnce()) -> Vec<Value> {
        let buf = Buf::default();
        let sink = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn one_flat_object_per_event_with_its_fields() {
        let source: Option<&str> = Some("ana");
        let got = lines(|| {
            tracing::info!(stream = "panel", source = ?source, viewers = 3u64, ok = true, "source published");
            tracing::warn!(msg = "clash", gone = ?None::<u32>, addr = ?"x".len(), "a \"quoted\"\nmessage");
        });
        assert_eq!(got.len(), 2);
        let a = &got[0];
        assert_eq!(a["level"], "INFO");
        assert_eq!(a["msg"], "source published");
        assert_eq!(a["stream"], "panel");
        assert_eq!(a["source"], "ana");
        assert_eq!(a["viewers"], 3);
        assert_eq!(a["ok"], true);
        assert!(a["target"].as_str().unwrap().starts_with("chorus::logs"));
        assert!(a["ts"].as_str().unwrap().ends_with('Z'), "{a}");
        let keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(keys.contains(&"node"), "{keys:?}");
        // A field named like a key of the line does not replace it; the message's newline and
        // quotes stay inside one line.
        let b = &got[1];
        assert_eq!(b["msg"], "a \"quoted\"\nmessage");
        assert_eq!(b["field.msg"], "clash");
        assert_eq!(b["gone"], Value::Null);
        assert_eq!(b["addr"], "1");
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
