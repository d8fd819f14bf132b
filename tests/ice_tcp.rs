//! ICE-TCP: passive TCP host candidates (RFC 6544) on the origin's and the edge's media
//! sockets. The official SDK in headless Chromium with UDP unavailable
//! (`--webrtc-ip-handling-policy=disable_non_proxied_udp`: it gathers no UDP candidate)
//! publishes and views over TCP, and bad TCP clients are closed and counted while an honest
//! viewer is not disturbed.
//! Needs scripts/setup-test-deps.sh (scripts/test.sh runs it).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::room_tool;
use serde_json::json;

const TOKEN: &str = "test-publish-token";
/// Chromium without UDP: only TCP candidates, so ICE can only succeed over ICE-TCP.
const NO_UDP: (&str, &str) = (
    "CHORUS_CHROMIUM_ARGS",
    "--webrtc-ip-handling-policy=disable_non_proxied_udp",
);

/// Two SDK publishers and one SDK viewer in Chromium without UDP: every selected candidate
/// pair is TCP to chorus's host candidate, the viewer gets `vad` naming both talkers and hears
/// the track that names each.
#[test]
fn sdk_publishes_and_views_over_ice_tcp_without_udp() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let spec = json!([
        {"name": "p-ana", "publish": "ana"},
        {"name": "p-bo", "publish": "bo"},
        {"name": "listener", "view": {"tracks": 2}},
    ]);
    let started = Instant::now();
    let rep = room_tool::run_with_env(p.http(), "panel", TOKEN, 14, &spec, &[NO_UDP]);
    eprintln!("ICE-TCP room: {:.1} s", started.elapsed().as_secs_f64());
    let parts = &rep["participants"];
    for (name, role) in [
        ("p-ana", "publish"),
        ("p-bo", "publish"),
        ("listener", "view"),
    ] {
        let pair = &parts[name][role]["pair"];
        assert_eq!(pair["local"]["protocol"], "tcp", "{name}: {pair}");
        assert_eq!(pair["remote"]["protocol"], "tcp", "{name}: {pair}");
        assert_eq!(pair["remote"]["type"], "host", "{name}: {pair}");
    }
    for side in ["origin", "edge"] {
        let accepted = common::metric(
            p.http(),
            &format!("chorus_{side}_ice_tcp_connections_total{{event=\"accepted\"}}"),
        );
        assert!(
            accepted >= Some(1.0),
            "{side}: {accepted:?} TCP connections"
        );
    }
    room_tool::assert_vad_and_sound(&parts["listener"]["view"], &["ana", "bo"]);
}

/// A WHEP/WHIP offer by hand (audio only; the peer it makes never connects): enough for an
/// answer and its candidates.
fn offer(direction: &str) -> String {
    let fp: Vec<String> = (0..32).map(|i| format!("{:02X}", i * 7 % 256)).collect();
    format!(
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
         a=fingerprint:sha-256 {}\r\na=ice-ufrag:tcpt\r\na=ice-pwd:icetcptesticetcptesticetc\r\n\
         a=setup:actpass\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
         a={direction}\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=ssrc:1 cname:x\r\n",
        fp.join(":")
    )
}

/// The (UDP, TCP) candidates of an answer: (port, priority) each; the TCP one must be
/// `tcptype passive`.
fn candidates(answer: &str) -> ((u16, u64), (u16, u64)) {
    let find = |proto: &str| {
        let l = answer
            .lines()
            .find(|l| l.starts_with("a=candidate:") && l.split(' ').nth(2) == Some(proto))
            .unwrap_or_else(|| panic!("no {proto} candidate in {answer}"));
        let f: Vec<&str> = l.split(' ').collect();
        if proto == "tcp" {
            assert!(l.contains("typ host tcptype passive"), "{l}");
        }
        (f[5].parse().unwrap(), f[3].parse().unwrap())
    };
    (find("udp"), find("tcp"))
}

/// The answer to a WHEP (or, with `publish`, WHIP) offer, and its (UDP, TCP) candidates.
fn answer(http: std::net::SocketAddr, publish: bool) -> ((u16, u64), (u16, u64)) {
    let (path, dir, auth) = match publish {
        true => (
            "/whip/panel?sourceId=probe",
            "sendonly",
            format!("Bearer {TOKEN}"),
        ),
        false => ("/whep/panel", "recvonly", String::new()),
    };
    let mut headers = vec![("Content-Type", "application/sdp")];
    if publish {
        headers.push(("Authorization", auth.as_str()));
    }
    let (status, _, body) = common::http(http, "POST", path, &headers, offer(dir).as_bytes());
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 201, "{path}: {body}");
    candidates(&body)
}

/// True once `s` is closed by the server (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Answers offer TCP candidates below UDP's priority, on the UDP port's number. Against the
/// edge's listener, while an SDK viewer listens over ICE-TCP on that same media thread: a
/// connection sending garbage, one announcing a 64 KiB frame and one sending nothing are each
/// closed and counted (`tcp_refused`, `tcp_bad_frame`, `tcp_idle`); the viewer keeps hearing.
#[test]
fn bad_tcp_clients_are_closed_and_counted_and_a_tcp_viewer_hears_on() {
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--media-workers", "1"]);
    for publish in [true, false] {
        let ((udp_port, udp_prio), (tcp_port, tcp_prio)) = answer(p.http(), publish);
        assert_eq!(udp_port, tcp_port, "the UDP port's number for TCP");
        assert!(tcp_prio < udp_prio, "TCP {tcp_prio} below UDP {udp_prio}");
    }
    let (_, (edge_tcp, _)) = answer(p.http(), false);
    let spec = json!([
        {"name": "p-ana", "publish": "ana"},
        {"name": "listener", "view": {"tracks": 1}},
    ]);
    let mut tool = room_tool::Live::start_with_env(p.http(), "panel", TOKEN, 20, &spec, &[NO_UDP]);
    tool.next(Duration::from_secs(40), "corpus start", |v| {
        v["event"] == "corpus-start"
    });
    let attack_at = common::unix_ms();
    let started = Instant::now();
    let edge = SocketAddr::from(([127, 0, 0, 1], edge_tcp));
    // Garbage in a well-formed frame: not a STUN request anyone accepts.
    let mut garbage = TcpStream::connect(edge).unwrap();
    garbage
        .write_all(&[0, 12, 0x80, 0x60, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1])
        .unwrap();
    // A length past any packet.
    let mut huge = TcpStream::connect(edge).unwrap();
    huge.write_all(&[0xff, 0xff, 1, 2, 3]).unwrap();
    let mut silent = TcpStream::connect(edge).unwrap();
    assert!(
        closed_within(&mut garbage, Duration::from_secs(2)),
        "garbage"
    );
    assert!(
        closed_within(&mut huge, Duration::from_secs(2)),
        "huge frame"
    );
    assert!(
        !closed_within(&mut silent, Duration::from_secs(3)),
        "a silent client is given its 5 s"
    );
    assert!(closed_within(&mut silent, Duration::from_secs(4)), "silent");
    eprintln!(
        "bad clients closed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for reason in ["tcp_refused", "tcp_bad_frame", "tcp_idle"] {
        let n = common::metric(
            p.http(),
            &format!("chorus_edge_dropped_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(n, Some(1.0), "{reason}");
    }
    std::thread::sleep(Duration::from_secs(3));
    tool.send("quit");
    let rep = tool.next(Duration::from_secs(30), "report", |v| {
        v["event"] == "report"
    });
    let v = &rep["participants"]["listener"]["view"];
    assert_eq!(v["pair"]["local"]["protocol"], "tcp", "{}", v["pair"]);
    assert!(
        v["reconnects"].as_array().is_none_or(|r| r.is_empty()),
        "{v}"
    );
    let loud = v["tracks"]
        .as_object()
        .unwrap()
        .keys()
        .map(|mid| room_tool::loudest(&room_tool::energy(v, mid), attack_at + 6_000.0, f64::MAX))
        .fold(0.0, f64::max);
    assert!(loud > 0.02, "the viewer went silent: {loud}");
}
