//! Shared helpers of the process-level tests: start chorus binaries, talk HTTP and WebSocket.
#![allow(dead_code)]

pub mod hearing;
pub mod netns;
pub mod room_tool;
pub mod ws;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn corpus() -> PathBuf {
    repo().join("tests/corpus/panel")
}

/// A chorus process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub info: Value,
    pub name: &'static str,
}

impl Proc {
    /// Starts `chorus <args>` and waits for the JSON line it prints when ready.
    pub fn start(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start_logging_to(name, args, env, Stdio::inherit())
    }

    /// [`Proc::start`] with the process's log (stderr) sent to `stderr`.
    pub fn start_logging_to(
        name: &'static str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
        cmd.args(args).stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(name, cmd)
    }

    /// Starts `cmd`, a chorus command line (or one that execs chorus, as `ip netns exec`
    /// does, so that the child is chorus itself), and waits for its ready line.
    pub fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        // stderr is the caller's choice (inherited unless it set one).
        cmd.stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("chorus starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ready line");
        let info: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name}: bad ready line {line:?}: {e}"));
        Proc { child, info, name }
    }

    pub fn http(&self) -> SocketAddr {
        self.info["http"]
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .parse()
            .unwrap()
    }

    pub fn cluster(&self) -> String {
        self.info["cluster"].as_str().unwrap().to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client: one request per connection. Returns (status, headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

pub fn post_json(addr: SocketAddr, path: &str, bearer: Option<&str>, body: &str) -> (u16, Value) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (status, _, body) = http(addr, "POST", path, &headers, body.as_bytes());
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, v)
}

pub fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = http(addr, "GET", path, &[], b"");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The payload of a JWT, unverified.
pub fn jwt_payload(jwt: &str) -> Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Wall-clock milliseconds since the Unix epoch (what the browser tools' `t` fields are).
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Python of the test venv made by scripts/setup-test-deps.sh.
pub fn python() -> PathBuf {
    let venv = repo().join("tests/python/.venv/bin/python");
    assert!(
        venv.exists(),
        "{} missing: run scripts/setup-test-deps.sh (scripts/test.sh does)",
        venv.display()
    );
    venv
}

pub fn node_harness(script: &str) -> (PathBuf, PathBuf) {
    let dir = repo().join("tests/browser");
    assert!(
        dir.join("node_modules").exists() && Path::new("/usr/bin/chromium").exists(),
        "browser harness not installed: run scripts/setup-test-deps.sh (scripts/test.sh does)"
    );
    (dir.clone(), dir.join(script))
}

/// Process-level tests of one binary hold this while they run: Chromium, aiortc and chorus on
/// two cores make timing checks meaningless when two such tests overlap.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// One sample of a process's /metrics (the line starting with `name`, labels included).
pub fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, _, body) = http(addr, "GET", "/metrics", &[], b"");
    metric_in(&String::from_utf8_lossy(&body), name)
}

/// The value of the first line of a /metrics text that starts with `name` (labels included).
pub fn metric_in(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Media packets a chorus process counted as dropped (every `reason` of its /metrics that is
/// audio lost on the way, not refused input): a gap a viewer may see that the server reported.
pub fn media_drops(addr: SocketAddr) -> u64 {
    const LOSSES: &[&str] = &[
        "chorus_edge_dropped_total{reason=\"lane_full\"}",
        "chorus_edge_dropped_total{reason=\"stale\"}",
        "chorus_edge_dropped_total{reason=\"core\"}",
        "chorus_edge_dropped_total{reason=\"seal\"}",
        "chorus_edge_dropped_total{reason=\"udp_send\"}",
        "chorus_origin_dropped_total{reason=\"relay\"}",
        "chorus_origin_dropped_total{reason=\"udp_send\"}",
        "chorus_origin_relay_dropped_total{reason=\"send_buffer_full\"}",
    ];
    let (_, _, body) = http(addr, "GET", "/metrics", &[], b"");
    let body = String::from_utf8_lossy(&body);
    body.lines()
        .filter(|l| LOSSES.iter().any(|n| l.starts_with(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// UDP datagrams the kernel dropped on receipt for a full socket buffer, in this network
/// namespace (`RcvbufErrors` of /proc/net/snmp): a loss no process saw, browsers' included.
pub fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `chorus serve` in dev mode with this publish token, HTTP on a free port.
pub fn serve(publish_token: &str) -> Proc {
    serve_with(publish_token, &[])
}

/// [`serve`] with more arguments.
pub fn serve_with(publish_token: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["serve", "--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proc::start("serve", &args, &[("CHORUS_PUBLISH_TOKEN", publish_token)])
}

/// Arguments that lift the per-address offer rates and connection cap, for tests whose many
/// offers all come from 127.0.0.1 on purpose (they test another limit).
pub const LIFT_ADDRESS_LIMITS: &[&str] = &[
    "--offers-per-sec",
    "100000",
    "--offers-per-sec-per-ip",
    "100000",
    "--max-connections-per-ip",
    "100000",
];

/// `chorus serve` with a token file (no dev mode), HTTP on a free port, plus `extra` arguments.
pub fn serve_token_file(file: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "serve",
        "--http",
        "127.0.0.1:0",
        "--tokens",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::start("serve", &args, &[])
}

/// A fresh directory for one test's files.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chorus-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `chorus origin` in dev mode, HTTP and QUIC on free ports, edges joining with `cluster_token`.
pub fn origin(publish_token: &str, cluster_token: &str) -> Proc {
    origin_with(publish_token, cluster_token, &[], &[])
}

/// An origin of a test cluster: on the registry at `redis_url` as node `id`, with the room API
/// key and the JWT secret every origin of the test shares (so a publish JWT of any director
/// works at the stream's owner), and `extra` arguments.
pub fn cluster_origin(
    publish_token: &str,
    cluster_token: &str,
    api_key: &str,
    jwt_secret: &str,
    redis_url: &str,
    id: &str,
    extra: &[&str],
) -> Proc {
    let mut args = vec!["--redis", redis_url, "--node-id", id, "--api-key", api_key];
    args.extend_from_slice(extra);
    origin_with(
        publish_token,
        cluster_token,
        &args,
        &[("CHORUS_JWT_SECRET", jwt_secret)],
    )
}

/// [`origin`] with more arguments and environment.
pub fn origin_with(
    publish_token: &str,
    cluster_token: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut all = vec![
        "origin",
        "--http",
        "127.0.0.1:0",
        "--cluster",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    let mut vars = vec![
        ("CHORUS_PUBLISH_TOKEN", publish_token),
        ("CHORUS_CLUSTER_TOKEN", cluster_token),
    ];
    vars.extend_from_slice(env);
    Proc::start("origin", &all, &vars)
}

/// `chorus edge` linked to `origin` (pinning its certificate), HTTP on a free port.
pub fn edge(origin: &Proc, cluster_token: &str) -> Proc {
    Proc::start(
        "edge",
        &[
            "edge",
            "--http",
            "127.0.0.1:0",
            "--origin",
            &origin.cluster(),
            "--origin-fingerprint",
            origin.info["fingerprint"].as_str().unwrap(),
        ],
        &[("CHORUS_CLUSTER_TOKEN", cluster_token)],
    )
}

/// Asserts that a tool run by a test exited successfully, showing its stderr when it did not.
pub fn assert_succeeded(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A helper process that is killed when the test ends, pass or fail.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// tests/python/whip_publish.py publishing the corpus speaker `source` as that sourceId.
pub fn whip_command(
    http: SocketAddr,
    stream: &str,
    source: &str,
    token: &str,
    seconds: u32,
) -> Command {
    whip_command_as(http, stream, source, source, token, seconds)
}

/// tests/python/whip_publish.py publishing the corpus speaker `speaker` as sourceId `source`.
pub fn whip_command_as(
    http: SocketAddr,
    stream: &str,
    source: &str,
    speaker: &str,
    token: &str,
    seconds: u32,
) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/python/whip_publish.py"))
        .arg("--url")
        .arg(format!("http://{http}/whip/{stream}"))
        .args([
            "--source-id",
            source,
            "--token",
            token,
            "--seconds",
            &seconds.to_string(),
        ])
        .arg("--file")
        .arg(corpus().join(format!("{speaker}.opus")));
    cmd
}

/// tests/python/whep_view.py viewing `stream` (stdout piped), with `args`.
pub fn whep_command(http: SocketAddr, stream: &str, args: &[&str]) -> Command {
    let mut c = Command::new(python());
    c.arg(repo().join("tests/python/whep_view.py"))
        .arg("--url")
        .arg(format!("http://{http}/whep/{stream}"))
        .args(args)
        .stdout(Stdio::piped());
    c
}

/// A free TCP port on loopback (bound, then let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (10 s at most) until `what` accepts TCP connections on loopback `port`.
pub fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server of the test's own on a free loopback port, no persistence, killed when
/// dropped. Tests never assume one runs (`scripts/setup-test-deps.sh` installs the binary).
pub struct Redis {
    pub child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// On a given port (a restart where the nodes already point).
    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/setup-test-deps.sh installs it)");
        Redis::listening(child, port)
    }

    /// Waits until the server `child` listens on `port`.
    fn listening(child: Child, port: u16) -> Redis {
        wait_listening(port, "redis-server");
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// On `port` with the data in `dir` and persistence as `args` say (e.g. AOF on): a
    /// restart with the same port and dir finds what was written.
    pub fn start_persistent(port: u16, dir: &Path, args: &[&str]) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/setup-test-deps.sh installs it)");
        Redis::listening(child, port)
    }

    /// `redis-cli` on this server: its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Sends `sig` ("KILL", "TERM") to a chorus process; its `Proc` still reaps it when dropped.
pub fn signal(p: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {}", p.child.id());
}

/// Runs `scripts/loadtest.sh` with this build's binary, `args` and `--out out`, and asserts that
/// it succeeded.
pub fn loadtest(args: &[&str], out: &Path) {
    let status = Command::new(repo().join("scripts/loadtest.sh"))
        .args(["--bin", env!("CARGO_BIN_EXE_chorus")])
        .args(args)
        .arg("--out")
        .arg(out)
        .status()
        .expect("loadtest.sh runs");
    assert!(
        status.success(),
        "loadtest.sh failed: see {}",
        out.display()
    );
}
