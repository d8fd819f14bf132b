//! Abuse tests of the HTTP and WebSocket surface: who may end a WHIP/WHEP session, what the
//! public listener shows, sockets that do not read or send too much or too fast, slowloris
//! connections, offer floods, silent sockets, room command floods and dev mode on a public
//! address. Attackers connect from other loopback addresses (127.0.0.2...) than the honest pair
//! (127.0.0.1), as distinct clients would: per-address limits must not touch the honest viewer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, get_json, http, post_json};
use crate::honest::{assert_rss_below, rss_kib, Honest};

const TOKEN: &str = "http-abuse-token";
/// RSS bound of `serve` under each attack here: the honest pair plus the attack's bounded cost
/// (measured: 37 to 44 MiB in a debug build).
const RSS_BOUND_KIB: u64 = 150 * 1024;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A TCP connection to `to` from the loopback address 127.0.0.`host`.
async fn connect_from(host: u8, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))
    .unwrap();
    s.connect(to).await.unwrap()
}

type ClientWs = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket to `url` (path and query on `to`) from 127.0.0.`host`.
async fn ws_from(host: u8, to: SocketAddr, path: &str) -> ClientWs {
    let tcp = connect_from(host, to).await;
    tokio_tungstenite::client_async(format!("ws://{to}{path}"), tcp)
        .await
        .unwrap_or_else(|e| panic!("ws {path}: {e}"))
        .0
}

/// A WebSocket handshake on a raw TCP connection from 127.0.0.`host` (the test then speaks
/// frames itself: it may stop reading or answering pings, or send what no library would).
async fn raw_ws_from(host: u8, to: SocketAddr, path: &str) -> TcpStream {
    let mut tcp = connect_from(host, to).await;
    tcp.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read the 101 response head byte by byte: frames may follow it at once.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// The server's frames on a raw socket until it closes: (opcode, payload).
async fn frames_until_closed(tcp: &mut TcpStream, within: Duration) -> Vec<(u8, Vec<u8>)> {
    let mut data = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut data))
        .await
        .expect("the server closed the socket")
        .ok();
    let mut frames = Vec::new();
    let mut rest = &data[..];
    while rest.len() >= 2 {
        let (op, mut len, mut at) = (rest[0] & 0x0f, usize::from(rest[1] & 0x7f), 2);
        if len == 126 {
            len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            at = 4;
        }
        if rest.len() < at + len {
            break;
        }
        frames.push((op, rest[at..at + len].to_vec()));
        rest = &rest[at + len..];
    }
    frames
}

/// The code and reason of the close frame among `frames`.
fn close_frame(frames: &[(u8, Vec<u8>)]) -> (u16, String) {
    let (_, p) = frames
        .iter()
        .find(|(op, _)| *op == 8)
        .unwrap_or_else(|| panic!("no close frame among {} frames", frames.len()));
    (
        u16::from_be_bytes([p[0], p[1]]),
        String::from_utf8_lossy(&p[2..]).into_owned(),
    )
}

fn subscribe_jwt(a: SocketAddr, stream: &str) -> String {
    let (s, v) = post_json(
        a,
        "/api/director/subscribe",
        None,
        &json!({"streamName": stream, "streamAccountId": "chorus"}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    v["data"]["jwt"].as_str().unwrap().to_owned()
}

/// An SDP offer from a str0m client: `send` audio m-lines sendonly, or 1 + `recv` recvonly.
fn offer(send: bool, lines: usize) -> String {
    use str0m::media::{Direction, MediaKind};
    let mut rtc = str0m::Rtc::builder().build(Instant::now());
    let mut api = rtc.sdp_api();
    let dir = if send {
        Direction::SendOnly
    } else {
        Direction::RecvOnly
    };
    for _ in 0..lines {
        api.add_media(MediaKind::Audio, dir, None, None, None);
    }
    let (offer, _pending) = api.apply().expect("an offer");
    offer.to_sdp_string()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body).unwrap_or(Value::Null)["data"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Hole 2: a WHIP publication (and a WHEP view) is ended only with the bearer that created it;
/// its resource id is not the publisherId operators see, and guessing fails.
#[test]
fn whip_and_whep_sessions_end_only_with_their_creating_bearer() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let a = p.http();
    let h = Honest::start(Honest::at(a, TOKEN, "honest-bearer").seconds(8));

    let bearer = format!("Bearer {TOKEN}");
    let sdp = ("Content-Type", "application/sdp");
    let (s, head, body) = http(
        a,
        "POST",
        "/whip/victim?sourceId=v",
        &[sdp, ("Authorization", &bearer)],
        offer(true, 1).as_bytes(),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&body));
    let location = header(&head, "location").expect("Location").to_owned();
    let (_, v) = get_json(a, "/api/streams/victim");
    let publisher_id = v["sources"][0]["publisherId"]
        .as_str()
        .unwrap_or_else(|| panic!("a publisherId in {v}"))
        .to_owned();
    assert!(
        !location.contains(&publisher_id),
        "{location} is built from {publisher_id}"
    );
    // The publisherId (what /api/streams shows) names no resource.
    let by_publisher = format!("/whip/resource/{publisher_id}");
    let (s, _, _) = http(
        a,
        "DELETE",
        &by_publisher,
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(s, 404);
    // Without the bearer, or with another one: 401, and the publication stays.
    let (s, _, b) = http(a, "DELETE", &location, &[], b"");
    assert_eq!(s, 401, "{}", String::from_utf8_lossy(&b));
    assert!(
        message(&b).contains("same Authorization: Bearer"),
        "{}",
        message(&b)
    );
    let (s, _, _) = http(
        a,
        "DELETE",
        &location,
        &[("Authorization", "Bearer guess")],
        b"",
    );
    assert_eq!(s, 401);
    let (s, _, _) = http(a, "PATCH", &location, &[], b"");
    assert_eq!(s, 401);
    let (s, _, _) = http(a, "PATCH", &location, &[("Authorization", &bearer)], b"");
    assert_eq!(
        s, 405,
        "trickle ICE is not supported, told to the resource's holder"
    );
    assert_eq!(
        get_json(a, "/api/streams/victim").1["sources"][0]["publisherId"],
        publisher_id.as_str()
    );
    // A guessed resource id: 404.
    let (s, _, _) = http(
        a,
        "DELETE",
        "/whip/resource/AAAAAAAAAAAAAAAAAAAAAA",
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(s, 404);
    // The creator's bearer ends it, once.
    let (s, _, _) = http(a, "DELETE", &location, &[("Authorization", &bearer)], b"");
    assert_eq!(s, 200);
    let (s, _, _) = http(a, "DELETE", &location, &[("Authorization", &bearer)], b"");
    assert_eq!(s, 404);

    // WHEP: a view made with a bearer (a subscribe JWT) is ended only with it.
    let jwt = format!("Bearer {}", subscribe_jwt(a, "victim"));
    let (s, head, body) = http(
        a,
        "POST",
        "/whep/victim?tracks=1",
        &[sdp, ("Authorization", &jwt)],
        offer(false, 2).as_bytes(),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&body));
    let location = header(&head, "location").expect("Location").to_owned();
    assert_eq!(http(a, "DELETE", &location, &[], b"").0, 401);
    assert_eq!(
        http(a, "DELETE", &location, &[("Authorization", &bearer)], b"").0,
        401
    );
    assert_eq!(
        http(a, "DELETE", &location, &[("Authorization", &jwt)], b"").0,
        200
    );

    h.assert_gapless();
    assert_rss_below(
        p.child.id(),
        RSS_BOUND_KIB,
        "serve after the DELETE attempts",
    );
}

/// Hole 13: with a token file, /metrics and /api/streams are not on the public listener, only on
/// --admin-http; dev mode on loopback keeps them on its one address.
#[test]
fn metrics_and_stream_state_are_only_on_the_admin_listener() {
    let _serial = common::serial();
    let file = common::tempdir("http-admin").join("tokens.json");
    std::fs::write(
        &file,
        json!({"tokens": [{"token": "pub-a", "stream": "a", "kind": "publish"}]}).to_string(),
    )
    .unwrap();
    let p = common::serve_token_file(&file, &["--admin-http", "127.0.0.1:0"]);
    let a = p.http();
    let admin: SocketAddr = p.info["admin"]
        .as_str()
        .expect("the ready line names the admin address")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    assert_eq!(http(a, "GET", "/metrics", &[], b"").0, 404);
    assert_eq!(get_json(a, "/api/streams/a").0, 404);
    let (s, _, body) = http(admin, "GET", "/metrics", &[], b"");
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("chorus_http_connections"), "{text}");
    assert_eq!(
        get_json(admin, "/api/streams/a").0,
        404,
        "no stream a is live"
    );
    assert_eq!(get_json(admin, "/healthz").0, 200);
    // The admin listener has no director, signalling or WHIP.
    assert_eq!(
        post_json(
            admin,
            "/api/director/publish",
            Some("pub-a"),
            r#"{"streamName":"a"}"#
        )
        .0,
        404
    );
    drop(p);

    // Without --admin-http and with a token file, nothing serves them.
    let p = common::serve_token_file(&file, &[]);
    assert!(p.info["admin"].is_null());
    assert_eq!(http(p.http(), "GET", "/metrics", &[], b"").0, 404);
    drop(p);

    // Dev mode on loopback: on the main address, as before.
    let p = common::serve(TOKEN);
    assert!(common::metric(p.http(), "chorus_http_connections").is_some());
}

/// Reads close frames and messages until the socket ends: the close frame, if one came.
async fn close_of(ws: &mut ClientWs, within: Duration) -> Option<(u16, String)> {
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return Some((u16::from(f.code), f.reason.to_string()))
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_)))) => continue,
            Ok(other) => {
                eprintln!("socket ended without a close reason: {other:?}");
                return None;
            }
            Err(_) => panic!("the socket was not closed within {within:?}"),
        }
    }
}

/// Hole 5: a signalling client that never reads and keeps sending bad commands is closed (1008)
/// after a bounded number; an 8 MiB frame is refused from its header (1009) before its payload
/// arrives; the server's memory stays bounded and the honest viewer gapless.
#[test]
fn a_socket_that_never_reads_and_floods_bad_commands_is_closed() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let a = p.http();
    let h = Honest::start(Honest::at(a, TOKEN, "honest-sockets").seconds(10));
    let before = rss_kib(p.child.id());
    let jwt = subscribe_jwt(a, "attack");
    rt().block_on(async {
        // Eight clients, each sending 2,000 bad commands without reading, as fast as it can
        // (or until the server stops taking them), then reading what it got.
        let mut sent_total = 0u64;
        for host in 2..10u8 {
            let mut ws = ws_from(host, a, &format!("/ws?token={jwt}")).await;
            let mut sent = 0u64;
            while sent < 2000 {
                let bad = json!({"type": "cmd", "transId": sent, "name": "nope", "data": {"x": "y".repeat(200)}});
                match tokio::time::timeout(
                    Duration::from_millis(500),
                    ws.send(Message::Text(bad.to_string().into())),
                )
                .await
                {
                    Ok(Ok(())) => sent += 1,
                    _ => break,
                }
            }
            sent_total += sent;
            let (code, reason) = close_of(&mut ws, Duration::from_secs(5))
                .await
                .expect("a close frame");
            assert_eq!(code, 1008, "{reason}");
            assert!(reason.contains("commands refused"), "{reason}");
        }
        eprintln!("bad commands sent by 8 non-reading clients: {sent_total}");

        // An 8 MiB frame: the header says so; the server answers 1009 before the payload.
        let mut tcp = raw_ws_from(10, a, &format!("/ws?token={jwt}")).await;
        let mut buf = vec![0u8; 4096];
        let len: u64 = 8 << 20;
        let mut frame = vec![0x81u8, 0x80 | 127];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend_from_slice(&[b'x'; 1024]);
        let t0 = Instant::now();
        tcp.write_all(&frame).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
            .await
            .expect("an answer to the frame header at once")
            .unwrap();
        let answered = t0.elapsed();
        assert!(n >= 4 && buf[0] == 0x88, "a close frame: {:?}", &buf[..n]);
        let code = u16::from_be_bytes([buf[2], buf[3]]);
        let reason = String::from_utf8_lossy(&buf[4..n]).into_owned();
        assert_eq!(code, 1009, "{reason}");
        assert!(reason.contains("at most 65536 bytes"), "{reason}");
        eprintln!("8 MiB frame refused after {answered:?}, 1 KiB of its payload sent");
    });
    assert_eq!(
        common::metric(a, "chorus_ws_closed_total{reason=\"too_many_refused\"}"),
        Some(8.0)
    );
    assert_eq!(
        common::metric(a, "chorus_ws_closed_total{reason=\"frame_too_large\"}"),
        Some(1.0)
    );
    let after = rss_kib(p.child.id());
    eprintln!("serve RSS {before} KiB before the socket attacks, {after} KiB after");
    h.assert_gapless();
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve after the socket floods");
}

/// Hole 8: the server pings signalling sockets and closes one that is silent (no message, no
/// pong) past the limit; a client that answers pings stays. Shortened intervals (hidden flags):
/// ping every 300 ms, silence limit 1.5 s (the real values: 20 s and 60 s).
#[test]
fn signalling_sockets_are_pinged_and_closed_when_silent() {
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--ws-ping-ms", "300", "--ws-silence-ms", "1500"]);
    let a = p.http();
    let jwt = subscribe_jwt(a, "quiet");
    rt().block_on(async {
        let mut alive = ws_from(2, a, &format!("/ws?token={jwt}")).await;
        let mut silent = raw_ws_from(3, a, &format!("/ws?token={jwt}")).await;
        // The live client reads (tungstenite answers each ping with a pong) for 3.5 s.
        let mut pings = 0;
        let end = tokio::time::Instant::now() + Duration::from_millis(3500);
        while let Ok(m) = tokio::time::timeout_at(end, alive.next()).await {
            match m {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the live socket got {other:?}"),
            }
        }
        assert!(pings >= 8, "{pings} pings in 3.5 s at one per 300 ms");
        alive
            .send(Message::Text(
                r#"{"type":"cmd","transId":1,"name":"nope"}"#.into(),
            ))
            .await
            .unwrap();
        let r = loop {
            match tokio::time::timeout(Duration::from_secs(2), alive.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => break serde_json::from_str::<Value>(&t).unwrap(),
                Ok(Some(Ok(Message::Ping(_)))) => continue,
                other => panic!("the live socket: {other:?}"),
            }
        };
        assert_eq!(r["type"], "error", "the live socket still answers: {r}");
        // The silent one answered nothing: pinged, then closed.
        let frames = frames_until_closed(&mut silent, Duration::from_secs(2)).await;
        let pings = frames.iter().filter(|(op, _)| *op == 9).count();
        assert!(
            (3..=6).contains(&pings),
            "{pings} pings before the 1.5 s silence limit"
        );
        let (code, reason) = close_frame(&frames);
        assert_eq!(code, u16::from(CloseCode::Away), "{reason}");
        assert!(reason.contains("silent for 1.5 s"), "{reason}");
    });
    assert_eq!(
        common::metric(a, "chorus_ws_closed_total{reason=\"silent\"}"),
        Some(1.0)
    );
}

/// Hole 9: slowloris connections (headers trickled in) are cut after the header deadline,
/// connections past the per-address cap are refused at once with 503, and a body trickled in is
/// answered 408; the honest viewer (another address) stays gapless.
#[test]
fn slowloris_connections_are_capped_and_cut() {
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--max-connections-per-ip", "40"]);
    let a = p.http();
    let h = Honest::start(Honest::at(a, TOKEN, "honest-slowloris").seconds(14));
    rt().block_on(async {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let mut tcp = connect_from(2, a).await;
            tasks.push(tokio::spawn(async move {
                let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
                // One header byte a second; read whatever the server says meanwhile.
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    tokio::select! {
                        r = tcp.read(&mut buf) => match r {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if tcp.write_all(b"X").await.is_err() { break; }
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(20) {
                        panic!("connection {i} still open after 20 s");
                    }
                }
                (t0.elapsed(), String::from_utf8_lossy(&got).into_owned())
            }));
        }
        // A body trickled in from a third address.
        let mut slow_body = connect_from(3, a).await;
        slow_body
            .write_all(
                b"POST /api/director/subscribe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        let body_task = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    r = slow_body.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => { got.extend_from_slice(&buf[..n]); if got.windows(4).any(|w| w == b"\r\n\r\n") { break; } }
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => { let _ = slow_body.write_all(b" ").await; }
                }
            }
            (t0.elapsed(), String::from_utf8_lossy(&got).into_owned())
        });
        let (mut refused, mut cut) = (0, 0);
        for t in tasks {
            let (at, got) = t.await.unwrap();
            if got.starts_with("HTTP/1.1 503") {
                assert!(got.contains("already holds 40 connections"), "{got}");
                assert!(at < Duration::from_secs(2), "refused after {at:?}");
                refused += 1;
            } else {
                assert!(got.is_empty(), "{got}");
                assert!(
                    at >= Duration::from_secs(9) && at < Duration::from_secs(13),
                    "slowloris cut after {at:?}"
                );
                cut += 1;
            }
        }
        assert_eq!((refused, cut), (20, 40));
        let (at, got) = body_task.await.unwrap();
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");
        assert!(at < Duration::from_secs(13), "408 after {at:?}");
        eprintln!("slowloris: 20 refused at once, 40 cut after the 10 s header deadline; trickled body 408 after {at:?}");
    });
    assert_eq!(
        common::metric(
            a,
            "chorus_http_refused_total{reason=\"connections_per_ip\"}"
        ),
        Some(20.0)
    );
    assert_eq!(
        common::metric(a, "chorus_http_refused_total{reason=\"header_timeout\"}"),
        Some(40.0)
    );
    h.assert_gapless();
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve after the slowloris");
}

/// Hole 9: an offer flood from one address gets 429 with Retry-After past its burst; the peers
/// it made are bounded by the rate, and the honest viewer stays gapless.
#[test]
fn an_offer_flood_is_rate_limited() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let a = p.http();
    let h = Honest::start(Honest::at(a, TOKEN, "honest-offers").seconds(10));
    let before = rss_kib(p.child.id());
    let body = offer(false, 2);
    let (answered, limited) = rt().block_on(async {
        let t0 = Instant::now();
        let (mut answered, mut limited) = (0u32, 0u32);
        while t0.elapsed() < Duration::from_secs(3) {
            let mut tcp = connect_from(2, a).await;
            let req = format!(
                "POST /whep/flood?tracks=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(req.as_bytes()).await.unwrap();
            let mut resp = Vec::new();
            tcp.read_to_end(&mut resp).await.unwrap();
            let resp = String::from_utf8_lossy(&resp);
            if resp.starts_with("HTTP/1.1 201") {
                answered += 1;
            } else {
                assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
                let head = resp.split("\r\n\r\n").next().unwrap();
                let retry: u64 = header(head, "retry-after").expect("Retry-After").parse().unwrap();
                assert!((1..=5).contains(&retry), "Retry-After {retry}");
                assert!(resp.contains("too many offers from 127.0.0.2"), "{resp}");
                limited += 1;
            }
        }
        (answered, limited)
    });
    // 50 at once (2.5 x 20), then 20 a second.
    eprintln!("offer flood for 3 s: {answered} answered, {limited} refused with 429");
    assert!(
        (50..=50 + 3 * 20 + 5).contains(&answered),
        "{answered} answered"
    );
    assert!(limited > 0);
    assert_eq!(
        common::metric(a, "chorus_http_refused_total{reason=\"offer_rate\"}"),
        Some(f64::from(limited))
    );
    let after = rss_kib(p.child.id());
    eprintln!("serve RSS {before} KiB before the flood, {after} KiB after");
    h.assert_gapless();
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve after the offer flood");
}

/// Hole 13: room commands are rate-limited per socket and a socket that keeps sending refused
/// commands is closed.
#[test]
fn a_room_command_flood_is_limited_and_closed() {
    let _serial = common::serial();
    let p = common::serve(TOKEN);
    let a = p.http();
    let key = p.info["apiKey"].as_str().unwrap().to_owned();
    let (s, v) = post_json(
        a,
        "/api/rooms/hall/tokens",
        Some(&key),
        r#"{"user_name":"Mallory","join_as":"audience"}"#,
    );
    assert_eq!(s, 200, "{v}");
    let token = v["data"]["token"].as_str().unwrap().to_owned();
    rt().block_on(async {
        let mut ws = ws_from(2, a, &format!("/api/rooms/hall/ws?token={token}")).await;
        // `state` is allowed: 20 at once pass (2 x 10 per second), the rest are refused for rate.
        for i in 0..60u64 {
            let cmd = json!({"type": "cmd", "transId": i, "name": "state", "data": {}});
            if ws
                .send(Message::Text(cmd.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let (mut ok, mut limited) = (0, 0);
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("response") => ok += 1,
                        Some("error") => {
                            let m = v["data"]["message"].as_str().unwrap_or_default();
                            assert!(m.contains("too many room commands"), "{m}");
                            limited += 1;
                        }
                        _ => {}
                    }
                }
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    break (u16::from(f.code), f.reason.to_string())
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no close frame: {other:?}"),
            }
        };
        assert!((20..=22).contains(&ok), "{ok} answered");
        assert_eq!(limited, 32);
        assert_eq!(code.0, 1008, "{code:?}");
        assert!(code.1.contains("32 commands refused"), "{code:?}");
    });
    assert_eq!(
        common::metric(a, "chorus_ws_commands_limited_total"),
        Some(32.0)
    );
    assert_eq!(get_json(a, "/healthz").0, 200);
}

/// Hole 16: dev mode (no --tokens) refuses to bind HTTP or media beyond loopback without
/// --dev-public, and says why.
#[test]
fn dev_mode_refuses_a_public_address() {
    // Short as it is, it takes the lock too: no abuse test shares the machine with another
    // one's processes while an honest viewer counts packets.
    let _serial = common::serial();
    for args in [
        ["serve", "--http", "0.0.0.0:0", "--media-ip", "127.0.0.1"],
        ["serve", "--http", "127.0.0.1:0", "--media-ip", "0.0.0.0"],
        ["origin", "--http", "0.0.0.0:0", "--cluster", "127.0.0.1:0"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed a ready line");
        assert!(
            err.contains("refusing to start: dev mode (no --tokens)"),
            "{err}"
        );
        assert!(err.contains("--dev-public"), "{err}");
    }
}

/// Hole 13: removing a room member ends the view it already has, at an edge of a split
/// deployment (told over the origin link), and its viewer JWT no longer opens a view there.
#[test]
fn removing_a_member_ends_its_view_at_the_edge() {
    let _serial = common::serial();
    let origin = common::origin(TOKEN, "http-abuse-cluster");
    let edge = common::edge(&origin, "http-abuse-cluster");
    let (o, e) = (origin.http(), edge.http());
    let key = origin.info["apiKey"].as_str().unwrap().to_owned();
    // Another viewer at the same edge, of another stream, hears every packet throughout.
    let h = Honest::start(Honest::at(o, TOKEN, "honest-room").view_at(e).seconds(8));
    let token = |user: &str, join_as: &str, perms: &[&str]| {
        let body = json!({"user_name": user, "join_as": join_as, "permissions": perms});
        let (s, v) = post_json(o, "/api/rooms/hall/tokens", Some(&key), &body.to_string());
        assert_eq!(s, 200, "{v}");
        (
            v["data"]["token"].as_str().unwrap().to_owned(),
            v["data"]["memberId"].as_str().unwrap().to_owned(),
        )
    };
    let (host, _) = token("Host", "member", &["room.member.remove"]);
    let (ana, ana_id) = token("Ana", "audience", &[]);
    common::wait_for("the edge to link", Duration::from_secs(10), || {
        (post_json(
            o,
            "/api/director/subscribe",
            Some(&ana),
            r#"{"streamName":"hall"}"#,
        )
        .0 == 200)
            .then_some(())
    });
    let (s, v) = post_json(
        o,
        "/api/director/subscribe",
        Some(&ana),
        r#"{"streamName":"hall"}"#,
    );
    assert_eq!(s, 200, "{v}");
    let url = v["data"]["urls"][0].as_str().unwrap().to_owned();
    let jwt = v["data"]["jwt"].as_str().unwrap().to_owned();
    assert!(url.contains(&e.to_string()), "{url} is the edge's");
    assert_eq!(
        common::jwt_payload(&jwt)["room"]["memberId"],
        ana_id.as_str()
    );
    rt().block_on(async {
        let mut view = ws_from(2, e, &format!("/ws?token={jwt}")).await;
        let cmd = json!({"type": "cmd", "transId": 1, "name": "view",
            "data": {"streamId": "hall", "sdp": offer(false, 2)}});
        view.send(Message::Text(cmd.to_string().into()))
            .await
            .unwrap();
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(5), view.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] != "event" {
                        break v;
                    }
                }
                other => panic!("no answer to view: {other:?}"),
            }
        };
        assert_eq!(answer["type"], "response", "{answer}");
        common::wait_for("the viewer at the edge", Duration::from_secs(5), || {
            (common::metric(e, "chorus_edge_viewers ") == Some(2.0)).then_some(())
        });
        let mut h = ws_from(3, o, &format!("/api/rooms/hall/ws?token={host}")).await;
        let cmd =
            json!({"type": "cmd", "transId": 1, "name": "remove", "data": {"memberId": ana_id}});
        h.send(Message::Text(cmd.to_string().into())).await.unwrap();
        let (code, reason) = close_of(&mut view, Duration::from_secs(5))
            .await
            .expect("the view's socket is closed with a reason");
        assert_eq!(code, 4000, "{reason}");
        assert!(reason.contains("removed from room \"hall\""), "{reason}");
        common::wait_for("the viewer to go", Duration::from_secs(5), || {
            (common::metric(e, "chorus_edge_viewers ") == Some(1.0)).then_some(())
        });
        // The same JWT, still within its life, no longer opens a view at the edge.
        let again = tokio_tungstenite::client_async(
            format!("ws://{e}/ws?token={jwt}"),
            connect_from(2, e).await,
        )
        .await;
        match again {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status().as_u16(), 403)
            }
            other => panic!(
                "the removed member's JWT opened a socket: {:?}",
                other.map(|_| ())
            ),
        }
    });
    h.assert_gapless();
    assert_rss_below(edge.child.id(), RSS_BOUND_KIB, "edge after the removal");
}

/// Hole 9: the process-wide caps hold against many addresses: past `--max-connections` a
/// connection gets 503 at once, past `--offers-per-sec` an offer from a fresh address gets 429.
#[test]
fn the_process_wide_connection_and_offer_caps_hold_across_addresses() {
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--max-connections", "30", "--offers-per-sec", "5"]);
    let a = p.http();
    let body = offer(false, 2);
    rt().block_on(async {
        // 30 idle connections from 30 addresses fill the process; the 31st is refused.
        let mut held = Vec::new();
        for host in 2..32u8 {
            held.push(connect_from(host, a).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = connect_from(40, a).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut got))
            .await
            .expect("refused at once")
            .ok();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 503"), "{got}");
        assert!(got.contains("maximum of 30 connections"), "{got}");
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // 10 offers at once pass (2 x 5 per second), from 10 addresses; the next is refused
        // whatever its address.
        let mut statuses = Vec::new();
        for host in 50..62u8 {
            let mut tcp = connect_from(host, a).await;
            let req = format!(
                "POST /whep/caps?tracks=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(req.as_bytes()).await.unwrap();
            let mut resp = Vec::new();
            tcp.read_to_end(&mut resp).await.unwrap();
            let resp = String::from_utf8_lossy(&resp).into_owned();
            if !resp.starts_with("HTTP/1.1 201") {
                assert!(resp.contains("at most 5 offers per second"), "{resp}");
            }
            statuses.push(resp[9..12].to_owned());
        }
        let answered = statuses.iter().filter(|s| *s == "201").count();
        assert!((10..=11).contains(&answered), "{statuses:?}");
        assert_eq!(statuses.last().map(String::as_str), Some("429"), "{statuses:?}");
    });
    assert_eq!(
        common::metric(a, "chorus_http_refused_total{reason=\"connections\"}"),
        Some(1.0)
    );
    assert_eq!(get_json(a, "/healthz").0, 200);
}
