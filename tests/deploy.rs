//! chorus deployed as people deploy it: Debian's nginx in front, ending TLS with a certificate
//! this test makes, chorus under a path prefix behind it, configured from a TOML file. The
//! shipped `scripts/deploy/nginx-chorus.conf` is what runs (its listen addresses, certificate
//! and upstream swapped for the test's). The SDK in Chromium publishes, views and joins a room
//! through it (director, `wss://` signalling, the room socket), and a publisher that sends no
//! signalling message for 3 minutes is still published at the end: nginx closes a proxied
//! connection after 60 s without a byte from chorus, and only chorus's pings carry it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::room_tool::{energy, loudest, until};
use serde_json::{json, Value};

const TOKEN: &str = "deploy-publish-token";
const BASE: &str = "/chorus";
const STREAM: &str = "deploy";
/// How long the publisher stays silent on its signalling socket: three times nginx's
/// `proxy_read_timeout` of the shipped site.
const IDLE: Duration = Duration::from_secs(180);

fn nginx_bin() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx missing: run scripts/setup-test-deps.sh (scripts/test.sh does)")
}

/// A free TCP port on loopback (closed again at once: nginx binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `text` with `from` replaced; panics when `from` is not in it (the shipped file changed).
fn swap(text: String, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "scripts/deploy/nginx-chorus.conf no longer has {from:?}"
    );
    text.replace(from, to)
}

/// nginx's master process, stopped with SIGTERM (which stops its workers too; a SIGKILL would
/// leave them running) when dropped.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx as this test's child, in `dir`, with the shipped site serving TLS on `https` and its
/// plain-HTTP redirect on `plain`, in front of chorus at `upstream`.
fn nginx(dir: &Path, https: u16, plain: u16, upstream: SocketAddr) -> Nginx {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let site =
        std::fs::read_to_string(common::repo().join("scripts/deploy/nginx-chorus.conf")).unwrap();
    assert!(
        site.contains("proxy_read_timeout 60s;"),
        "the shipped site's read timeout"
    );
    let site = swap(
        site,
        "listen 443 ssl;",
        &format!("listen 127.0.0.1:{https} ssl;"),
    );
    let site = swap(site, "listen [::]:443 ssl;", "");
    let site = swap(site, "listen 80;", &format!("listen 127.0.0.1:{plain};"));
    let site = swap(site, "listen [::]:80;", "");
    let site = swap(
        site,
        "server 127.0.0.1:8080;",
        &format!("server {upstream};"),
    );
    let site = swap(
        site,
        "/etc/letsencrypt/live/live.example.com/fullchain.pem",
        &dir.join("cert.pem").display().to_string(),
    );
    let site = swap(
        site,
        "/etc/letsencrypt/live/live.example.com/privkey.pem",
        &dir.join("key.pem").display().to_string(),
    );
    std::fs::write(dir.join("site.conf"), site).unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let d = dir.display();
    let main = format!(
        "user root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log {d}/logs/access.log;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let conf = dir.join("nginx.conf");
    let child = Command::new(nginx_bin())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let nginx = Nginx(child);
    common::wait_for("nginx to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", https)).ok()
    });
    nginx
}

/// `curl -k` (the test's certificate) with `args`: (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

fn curl_json(args: &[&str]) -> (u16, Value) {
    let (s, body) = curl(args);
    (
        s,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Opens the demo page at `public` in Chromium and has its SDK ask the director for a view:
/// `{endpoint, url}` (the SDK's endpoint, the signalling URL of the answer).
fn demo_page_director(public: &str) -> Value {
    const SCRIPT: &str = r#"
import { launchBrowser } from './lib.mjs';
const browser = await launchBrowser();
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(process.argv[1] + '/', { waitUntil: 'load', timeout: 20000 });
  const out = await page.evaluate(async () => {
    const d = await millicast.Director.getSubscriber({ streamName: 'deploy', streamAccountId: 'chorus' });
    return { endpoint: millicast.Director.getEndpoint(), url: d.urls[0] };
  });
  console.log(JSON.stringify(out));
} finally { await browser.close(); }
"#;
    let (bdir, _) = common::node_harness("lib.mjs");
    let out = Command::new("node")
        .current_dir(&bdir)
        .args(["--input-type=module", "-e", SCRIPT, public])
        .env("CHORUS_CHROMIUM_ARGS", "--ignore-certificate-errors")
        .output()
        .expect("node runs");
    common::assert_succeeded(&out, "the demo page in Chromium");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// What the origin receives from `source` (packets), asked at chorus itself (dev mode on
/// loopback serves the admin routes under the base path).
fn packets_from(chorus: SocketAddr, source: &str) -> Option<u64> {
    let (s, v) = common::get_json(chorus, &format!("{BASE}/api/streams/{STREAM}"));
    if s != 200 {
        return None;
    }
    let sources = v["sources"].as_array()?;
    sources
        .iter()
        .find(|x| x["sourceId"] == source)
        .and_then(|x| x["audio"]["packets"].as_u64())
}

#[test]
fn sdk_through_nginx_tls_under_a_path_and_an_idle_publisher_stays_published() {
    let _serial = common::serial();
    let began = Instant::now();
    let dir = common::tempdir("deploy");
    // chorus from a config file, as the systemd unit runs it; the flag wins over the file.
    let config = dir.join("chorus.toml");
    std::fs::write(
        &config,
        format!(
            "http = \"127.0.0.1:9\"\nbase-path = \"{BASE}\"\ntrusted-proxy = [\"127.0.0.1\"]\n"
        ),
    )
    .unwrap();
    let chorus = common::Proc::start(
        "serve",
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ],
        &[("CHORUS_PUBLISH_TOKEN", TOKEN)],
    );
    let api_key = chorus.info["apiKey"].as_str().unwrap().to_owned();
    let (https, plain) = (free_port(), free_port());
    let _nginx = nginx(&dir, https, plain, chorus.http());
    let public = format!("https://127.0.0.1:{https}{BASE}");

    // The demo page and its assets under the prefix, through TLS.
    let (s, page) = curl(&[&format!("{public}/")]);
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("src=\"sdk/millicast.umd.js\""), "{page}");
    for asset in [
        "demo.js",
        "demo.css",
        "base.css",
        "sdk/millicast.umd.js",
        "healthz",
        "rooms/townhall",
        "room.js",
        "room.css",
    ] {
        let (s, body) = curl(&["-L", &format!("{public}/{asset}")]);
        assert_eq!(s, 200, "{asset}: {body:.200}");
    }
    // The SDK's director call at the endpoint itself names wss://, the public host and port,
    // and the prefix; so do the explicit director paths.
    let publish_body = json!({"streamName": STREAM}).to_string();
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let want_ws = format!("wss://127.0.0.1:{https}{BASE}/ws");
    for url in [public.clone(), format!("{public}/api/director/publish")] {
        let (s, v) = curl_json(&["-X", "POST", &url, "-H", &bearer, "-d", &publish_body]);
        assert_eq!(s, 200, "{url}: {v}");
        assert_eq!(v["data"]["urls"][0], want_ws.as_str(), "{url}: {v}");
        let jwt = common::jwt_payload(v["data"]["jwt"].as_str().unwrap());
        assert_eq!(jwt["scope"], "publish", "{url}: {jwt}");
    }
    let subscribe_body = json!({"streamName": STREAM, "streamAccountId": "chorus"}).to_string();
    let (s, v) = curl_json(&["-X", "POST", &public, "-d", &subscribe_body]);
    assert_eq!((s, &v["data"]["urls"][0]), (200, &json!(want_ws)), "{v}");
    assert_eq!(
        common::jwt_payload(v["data"]["jwt"].as_str().unwrap())["scope"],
        "subscribe"
    );
    // The same forwarded headers from a peer that is no trusted proxy (127.0.0.2, straight to
    // chorus) are ignored: plain ws:// and its own Host.
    let direct = format!("http://{}{BASE}", chorus.http());
    let (s, v) = curl_json(&[
        "--interface",
        "127.0.0.2",
        "-X",
        "POST",
        &direct,
        "-H",
        "X-Forwarded-Proto: https",
        "-H",
        "X-Forwarded-Host: evil.example",
        "-d",
        &subscribe_body,
    ]);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["data"]["urls"][0],
        format!("ws://{}{BASE}/ws", chorus.http()).as_str()
    );
    // Outside the prefix there is nothing; the plain-HTTP server block redirects to https.
    let (s, _) = curl(&[&format!("https://127.0.0.1:{https}/api/director/publish")]);
    assert_eq!(s, 404);
    let (s, _) = curl(&[&format!("http://127.0.0.1:{plain}{BASE}/")]);
    assert_eq!(s, 301);
    // A room token through the proxy, for a listener that joins the room.
    let (s, v) = curl_json(&[
        "-X",
        "POST",
        &format!("{public}/api/rooms/{STREAM}/tokens"),
        "-H",
        &format!("Authorization: Bearer {api_key}"),
        "-d",
        r#"{"user_name":"Ana","join_as":"audience"}"#,
    ]);
    assert_eq!(s, 200, "{v}");
    let room_token = v["data"]["token"].as_str().unwrap().to_owned();

    // The demo page itself in Chromium, through nginx: it loads the SDK from under the prefix
    // and points it at https://host/chorus, whose director call (the SDK's, unmodified) answers.
    let demo = demo_page_director(&public);
    assert_eq!(demo["endpoint"], public.as_str(), "{demo}");
    assert_eq!(demo["url"], want_ws.as_str(), "{demo}");

    // The SDK in Chromium through nginx: a publisher of the corpus host, a listener with the
    // host pinned, and a room participant (room socket, view with its room token). Nobody sends
    // a signalling message after connecting.
    let spec = json!([
        {"name": "pub", "publish": "host", "sourceId": "host"},
        {"name": "listener", "view": {"tracks": 2, "pinned": "host"}},
        {"name": "ana", "room": room_token, "subscribeToken": room_token, "view": {"tracks": 2}},
    ]);
    let seconds = IDLE.as_secs() + 8;
    let (bdir, script) = common::node_harness("room.mjs");
    let mut child = common::Reaped(
        Command::new("node")
            .current_dir(&bdir)
            .arg(script)
            .args(["--endpoint", &public, "--stream", STREAM, "--token", TOKEN])
            .args([
                "--seconds",
                &seconds.to_string(),
                "--spec",
                &spec.to_string(),
            ])
            .env("CHORUS_CHROMIUM_ARGS", "--ignore-certificate-errors")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut seen: Vec<Value> = Vec::new();
    let mut next_match =
        |what: &str, pred: &dyn Fn(&Value) -> bool| until(&mut lines, &mut seen, what, pred);
    let joined = next_match("ana joins the room", &|v| v["event"] == "room-joined");
    assert_eq!(joined["role"], "audience", "{joined}");
    let published = next_match("the publisher publishes", &|v| v["event"] == "published");
    let published_at = published["t"].as_f64().unwrap();
    next_match("the corpus starts", &|v| v["event"] == "corpus-start");
    let setup_s = began.elapsed().as_secs_f64();
    let first = common::wait_for("the origin receives host", Duration::from_secs(10), || {
        packets_from(chorus.http(), "host").filter(|n| *n > 0)
    });

    // Three idle minutes later the origin still takes host's packets.
    let idle_end = Instant::now()
        + IDLE.saturating_sub(Duration::from_secs_f64(
            (common::unix_ms() - published_at) / 1000.0,
        ));
    std::thread::sleep(idle_end.saturating_duration_since(Instant::now()));
    let late = packets_from(chorus.http(), "host").expect("host still published");
    std::thread::sleep(Duration::from_secs(2));
    let later = packets_from(chorus.http(), "host").expect("host still published");
    assert!(
        later > late && late > first,
        "host's packets at the origin: {first}, then {late}, then {later}"
    );
    let silent_for_s = (common::unix_ms() - published_at) / 1000.0;
    let report = next_match("the report", &|v| v["event"] == "report");
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "room.mjs reported an error (an SDK or server error, or a socket closed by the server)"
    );
    // Every page's sockets stayed open through nginx; the views still hear the host.
    let parts = &report["participants"];
    for who in ["pub", "listener", "ana"] {
        let p = &parts[who];
        for role in ["publish", "view", "room"] {
            let errors = &p[role]["errors"];
            assert!(
                errors.is_null() || errors.as_array().unwrap().is_empty(),
                "{who} {role}: {errors}"
            );
        }
    }
    assert!(
        parts["ana"]["room"]["closedAt"].is_null(),
        "{}",
        parts["ana"]["room"]
    );
    assert!(parts["listener"]["view"]["wsClosedAt"].is_null());
    let end = common::unix_ms();
    // The corpus loops every 30 s; the host speaks in every loop.
    let heard = loudest(
        &energy(&parts["listener"]["view"], "0"),
        end - 35_000.0,
        end,
    );
    assert!(heard > 0.02, "the listener no longer hears host: {heard}");
    let ana_hears = parts["ana"]["view"]["tracks"]
        .as_object()
        .unwrap()
        .keys()
        .map(|mid| loudest(&energy(&parts["ana"]["view"], mid), end - 35_000.0, end))
        .fold(0.0, f64::max);
    assert!(ana_hears > 0.02, "ana no longer hears anyone: {ana_hears}");
    let (_, _, metrics) = common::http(chorus.http(), "GET", &format!("{BASE}/metrics"), &[], b"");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("chorus_ws_closed_total{reason=\"silent\"} 0"),
        "chorus closed a socket as silent, or has no such counter: {metrics:.2000}"
    );
    let errors = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
    assert!(
        !errors.contains("timed out"),
        "nginx timed a connection out: {errors}"
    );
    eprintln!(
        "deploy: setup {setup_s:.1} s, publisher silent on signalling for {silent_for_s:.0} s, \
         host's packets at the origin {first} -> {later}, listener's loudest in the last 35 s {heard:.3}, \
         whole test {:.0} s",
        began.elapsed().as_secs_f64()
    );
}

/// The shipped `scripts/deploy/chorus.toml` is a valid configuration: chorus starts from it,
/// with only its addresses and paths overridden by flags (which win over the file).
#[test]
fn the_shipped_config_file_starts_chorus() {
    let dir = common::tempdir("deploy-toml");
    // A missing token file is an empty one: nobody may publish, which is all this needs.
    let tokens = dir.join("tokens.json");
    let config = common::repo().join("scripts/deploy/chorus.toml");
    let p = common::Proc::start(
        "serve",
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--admin-http",
            "127.0.0.1:0",
            "--media-ip",
            "127.0.0.1",
            "--public-ip",
            "127.0.0.1",
            "--media-port",
            "0",
            "--edge-media-port",
            "0",
        ],
        &[],
    );
    // The file's base path holds: the routes are under /chorus.
    let (s, _, _) = common::http(p.http(), "GET", &format!("{BASE}/healthz"), &[], b"");
    assert_eq!(s, 200);
    let (s, _, _) = common::http(p.http(), "GET", "/healthz", &[], b"");
    assert_eq!(s, 404);
}
