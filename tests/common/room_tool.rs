//! Reading `tests/browser/room.mjs` (and the harness's other tools): its JSON lines and the
//! energy timelines of its report.

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

/// A view's report: `vad` named each of `sources`, and a track it named each on was loud.
pub fn assert_vad_and_sound(view: &Value, sources: &[&str]) {
    let events = view["events"].as_array().unwrap();
    for source in sources {
        let mids: Vec<&str> = events
            .iter()
            .filter(|e| e["name"] == "vad" && e["data"]["sourceId"] == *source)
            .filter_map(|e| e["data"]["mediaId"].as_str())
            .collect();
        assert!(!mids.is_empty(), "no vad for {source}: {events:?}");
        let loudest = mids
            .iter()
            .map(|m| loudest(&energy(view, m), 0.0, f64::MAX))
            .fold(0.0, f64::max);
        assert!(
            loudest > 0.02,
            "{source}'s track never loud: {loudest} (mids {mids:?})"
        );
        // The browser matched the edge's sender reports (one compound packet for all tracks)
        // to this track: its remote-outbound-rtp counts them and the packets they announce.
        for mid in &mids {
            let last = view["stats"][*mid]
                .as_array()
                .and_then(|s| s.last())
                .unwrap_or_else(|| panic!("no stats for track {mid}: {}", view["stats"]));
            assert!(
                last["reportsSent"].as_u64().unwrap_or(0) >= 1
                    && last["remotePacketsSent"].as_u64().unwrap_or(0) > 0,
                "track {mid} ({source}): no sender report reached the browser: {last}"
            );
        }
    }
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

/// The room.mjs command line for `spec`, `seconds` long, against `http` (more flags may follow).
pub fn command(
    http: std::net::SocketAddr,
    stream: &str,
    token: &str,
    seconds: u64,
    spec: &Value,
) -> std::process::Command {
    let (dir, script) = super::node_harness("room.mjs");
    let mut c = std::process::Command::new("node");
    c.current_dir(&dir)
        .arg(script)
        .args(["--endpoint", &format!("http://{http}")])
        .args(["--stream", stream, "--token", token])
        .arg("--corpus")
        .arg(super::corpus())
        .args(["--seconds", &seconds.to_string()])
        .args(["--spec", &spec.to_string()]);
    c
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
    run_with_env(http, stream, token, seconds, spec, &[])
}

/// [`run`] with these environment variables for room.mjs (e.g. `CHORUS_CHROMIUM_ARGS`).
pub fn run_with_env(
    http: std::net::SocketAddr,
    stream: &str,
    token: &str,
    seconds: u32,
    spec: &Value,
    env: &[(&str, &str)],
) -> Value {
    let out = command(http, stream, token, u64::from(seconds), spec)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    super::assert_succeeded(&out, "room.mjs");
    report(&out)
}

/// room.mjs running with `spec`, its stdin open for commands and its JSON lines drained on a
/// thread of its own (the tool never blocks on a full pipe); killed when dropped.
pub struct Live {
    pub stdin: std::process::ChildStdin,
    pub lines: std::sync::mpsc::Receiver<Value>,
    /// Every line [`Live::next`] read.
    pub seen: Vec<Value>,
    _child: super::Reaped,
}

impl Live {
    pub fn start(
        http: std::net::SocketAddr,
        stream: &str,
        token: &str,
        seconds: u64,
        spec: &Value,
    ) -> Live {
        Live::start_with_env(http, stream, token, seconds, spec, &[])
    }

    /// [`Live::start`] with these environment variables for room.mjs.
    pub fn start_with_env(
        http: std::net::SocketAddr,
        stream: &str,
        token: &str,
        seconds: u64,
        spec: &Value,
        env: &[(&str, &str)],
    ) -> Live {
        let mut c = command(http, stream, token, seconds, spec);
        c.envs(env.iter().copied());
        Live::spawn(c)
    }

    /// Any tool of the harness that writes JSON lines and reads commands (`cmd`, ready to run).
    pub fn spawn(mut cmd: std::process::Command) -> Live {
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = json_lines(child.stdout.take().unwrap());
        Live {
            stdin,
            lines,
            seen: Vec::new(),
            _child: super::Reaped(child),
        }
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
    }

    /// The next line that `pred` accepts, within `limit`.
    pub fn next(
        &mut self,
        limit: std::time::Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                let tail: Vec<String> = self
                    .seen
                    .iter()
                    .rev()
                    .take(15)
                    .map(Value::to_string)
                    .collect();
                panic!("no {what} within {limit:?}; last lines: {tail:#?}")
            });
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Reads what arrived so far into `seen`.
    pub fn drain(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// Waits (`limit` at most) for the tool's report, at the end of its `--seconds` or after a
    /// `quit`, then for its exit: the report, once room.mjs exited successfully.
    pub fn finish(mut self, limit: std::time::Duration) -> Value {
        let report = self.next(limit, "the report", |v| v["event"] == "report");
        // After its report the tool closes its pages and browsers (15 s at most, its own
        // forced exit); stdin stays open until then, as EOF is no command.
        let child = &mut self._child.0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "room.mjs did not exit within 20 s of its report"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        self.drain();
        let errors: Vec<&Value> = self
            .seen
            .iter()
            .filter(|v| v["event"] == "error" || v["event"] == "exit")
            .collect();
        assert!(status.success(), "room.mjs exited {status}: {errors:?}");
        report
    }
}

/// A tool's JSON stdout lines, read on a thread of their own (the tool never blocks on a full
/// pipe); other lines are skipped.
pub fn json_lines(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<Value> {
    use std::io::BufRead;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    lines
}

/// Levels-file turns of a corpus speaker, in wall-clock ms given when its playback started.
#[cfg(feature = "tools")]
pub fn turns_at(speaker: &str, start_ms: f64) -> Vec<(f64, f64)> {
    use chorus::replay::{corpus as corpus_files, truth};
    let file = super::corpus().join(format!("{speaker}.levels"));
    let levels = corpus_files::read_levels(&file).unwrap();
    truth::turns(&levels)
        .into_iter()
        .map(|t| {
            (
                start_ms + t.first_frame as f64 * 20.0,
                start_ms + t.last_frame as f64 * 20.0 + 20.0,
            )
        })
        .collect()
}
