//! Reading `tests/browser/room.mjs`: its JSON lines and the energy timelines of its report.

use serde_json::Value;

/// Reads the tool's JSON lines into `seen` until one matches; panics at the end of its output.
pub fn until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    seen: &mut Vec<Value>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    for line in lines.by_ref() {
        let Ok(v) = serde_json::from_str::<Value>(&line.unwrap()) else {
            continue;
        };
        seen.push(v.clone());
        if pred(&v) {
            return v;
        }
    }
    let tail: Vec<String> = seen.iter().rev().take(15).map(Value::to_string).collect();
    panic!("room.mjs ended before {what}; last lines: {tail:#?}");
}

/// (t, rms) of one received track.
pub fn energy(view: &Value, mid: &str) -> Vec<(f64, f64)> {
    view["tracks"][mid]["energy"]
        .as_array()
        .unwrap_or_else(|| panic!("no track {mid}: {view}"))
        .iter()
        .map(|x| (x[0].as_f64().unwrap(), x[1].as_f64().unwrap()))
        .collect()
}

/// The loudest sample in [from, to).
pub fn loudest(e: &[(f64, f64)], from: f64, to: f64) -> f64 {
    e.iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|x| x.1)
        .fold(0.0, f64::max)
}

/// The final `report` line of a tool's stdout.
pub fn report(out: &std::process::Output) -> Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "report")
        .unwrap_or_else(|| {
            panic!(
                "no report; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Runs room.mjs with `spec` for `seconds` against `http` (publish token `token`) to its end;
/// its report, once it succeeded.
pub fn run(
    http: std::net::SocketAddr,
    stream: &str,
    token: &str,
    seconds: u32,
    spec: &Value,
) -> Value {
    let (dir, script) = super::node_harness("room.mjs");
    let out = std::process::Command::new("node")
        .current_dir(&dir)
        .arg(script)
        .args(["--endpoint", &format!("http://{http}")])
        .args(["--stream", stream, "--token", token])
        .arg("--corpus")
        .arg(super::corpus())
        .args([
            "--seconds",
            &seconds.to_string(),
            "--spec",
            &spec.to_string(),
        ])
        .output()
        .unwrap();
    super::assert_succeeded(&out, "room.mjs");
    report(&out)
}
