//! Abuse and fault tests of the origin-edge link (holes 9, 11, 12, 15 of issue 10): an origin
//! restart under a split deployment, peers that never answer or never read, and a flood of
//! datagrams on the link. The fakes on the other end of the link are quinn endpoints in the test
//! itself, speaking the relay protocol (or refusing to).

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, corpus, node_harness, wait_for, Proc, Reaped};
use crate::honest::{assert_rss_below, Honest, Lines};

const TOKEN: &str = "link-token";
const CLUSTER: &str = "link-cluster";

/// RSS bound of a chorus process under each attack here (debug build), KiB.
const RSS_BOUND_KIB: u64 = 400 * 1024;

/// Free loopback ports for a TCP (HTTP) and a UDP (QUIC) listener, so a restarted origin can
/// take the same ones.
fn free_ports() -> (SocketAddr, SocketAddr) {
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    (t.local_addr().unwrap(), u.local_addr().unwrap())
}

fn start_origin(http: SocketAddr, cluster: SocketAddr, data_dir: &std::path::Path) -> Proc {
    Proc::start(
        "origin",
        &[
            "origin",
            "--http",
            &http.to_string(),
            "--cluster",
            &cluster.to_string(),
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[
            ("CHORUS_PUBLISH_TOKEN", TOKEN),
            ("CHORUS_CLUSTER_TOKEN", CLUSTER),
        ],
    )
}

fn whip(http: SocketAddr, stream: &str, source: &str, speaker: &str) -> (Reaped, Lines) {
    let mut c = common::whip_command_as(http, stream, source, speaker, TOKEN, 120)
        .stdout(Stdio::piped())
        .spawn()
        .expect("whip_publish.py starts");
    let lines = Lines::follow(&mut c);
    (Reaped(c), lines)
}

/// The issue's fault test (hole 15): origin + edge as two processes, a WHIP publisher at the
/// origin and an SDK viewer in Chromium at the edge. The origin is SIGKILLed, restarted on the
/// same ports and the publisher republishes: the viewer keeps its session (one peer connection,
/// no reconnect), hears `inactive` then `active`, and audio flows in its tracks again. A WHEP
/// viewer of another stream, subscribed before it, checks that the restarted origin's new
/// channel numbers (given in another order) reach the right streams.
#[test]
fn link_origin_restart_viewers_keep_their_session_and_audio_returns() {
    let _serial = common::serial();
    let (http, cluster) = free_ports();
    let data_dir = common::tempdir("link-restart");
    let mut origin = start_origin(http, cluster, &data_dir);
    let edge = common::edge(&origin, CLUSTER);
    // "zz-other" is subscribed at the old origin before "fault"; the new origin numbers them in
    // name order: their channels swap.
    let (other_pub, other_lines) = whip(http, "zz-other", "other", "ana");
    other_lines.wait("other publisher connected", Duration::from_secs(30), |v| {
        v["event"] == "connected"
    });
    let mut other_view = common::whep_command(
        edge.http(),
        "zz-other",
        &["--tracks", "1", "--pinned", "other", "--seconds", "45"],
    )
    .spawn()
    .unwrap();
    let other_view_lines = Lines::follow(&mut other_view);
    let other_view = Reaped(other_view);
    other_view_lines.wait("other viewer connected", Duration::from_secs(30), |v| {
        v["event"] == "connected"
    });
    // The SDK viewer at the edge: unpinned, two multiplexed tracks.
    let spec = json!([{"name": "listener", "view": {"tracks": 2}}]);
    let (dir, script) = node_harness("room.mjs");
    let mut node = Command::new("node")
        .current_dir(&dir)
        .arg(script)
        .args([
            "--endpoint",
            &format!("http://{}", edge.http()),
            "--stream",
            "fault",
            "--token",
            TOKEN,
        ])
        .arg("--corpus")
        .arg(corpus())
        .args(["--seconds", "60", "--spec", &spec.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = node.stdin.take().unwrap();
    let sdk = Lines::follow(&mut node);
    let node = Reaped(node);
    sdk.wait("the SDK viewer views", Duration::from_secs(40), |v| {
        v["event"] == "viewing"
    });
    // host talks from 0 to 6 s of the corpus: publish now, kill the origin while it talks.
    let (first_pub, first_lines) = whip(http, "fault", "host", "host");
    first_lines.wait("publisher connected", Duration::from_secs(30), |v| {
        v["event"] == "connected"
    });
    sdk.wait("active host", Duration::from_secs(15), |v| {
        v["event"] == "broadcast" && v["type"] == "active" && v["data"]["sourceId"] == "host"
    });
    std::thread::sleep(Duration::from_secs(4));
    let killed_at = common::unix_ms();
    origin.child.kill().unwrap(); // SIGKILL
    let _ = origin.child.wait();
    drop(first_pub);
    drop(other_pub);
    std::thread::sleep(Duration::from_millis(500));
    origin = start_origin(http, cluster, &data_dir);
    let restarted_at = common::unix_ms();
    // The other stream republishes at once (its list reaches the edge with the relink); this one
    // once the edge has relinked (its list follows the publication).
    let (_other_pub2, other_lines2) = whip(http, "zz-other", "other", "ana");
    let inactive_seen = sdk.wait("inactive host", Duration::from_secs(20), |v| {
        v["event"] == "broadcast" && v["type"] == "inactive" && v["data"]["sourceId"] == "host"
    });
    let (_pub2, lines2) = whip(http, "fault", "host", "host");
    let republished = lines2.wait("republished", Duration::from_secs(30), |v| {
        v["event"] == "connected"
    });
    let republished_at = republished["t"].as_f64().unwrap() * 1000.0;
    other_lines2.wait("other republished", Duration::from_secs(30), |v| {
        v["event"] == "connected"
    });
    let back = sdk.wait("active host again", Duration::from_secs(30), |v| {
        v["event"] == "broadcast"
            && v["type"] == "active"
            && v["data"]["sourceId"] == "host"
            && v["t"].as_f64().unwrap() > killed_at
    });
    let active_again_at = back["t"].as_f64().unwrap();
    // Let audio flow for a while, then collect what the page recorded.
    std::thread::sleep(Duration::from_secs(6));
    writeln!(stdin, "quit").unwrap();
    let rep = sdk.wait("the SDK report", Duration::from_secs(30), |v| {
        v["event"] == "report"
    });
    drop(stdin);
    drop(node);
    let v = &rep["participants"]["listener"]["view"];
    // One session all through: one peer connection that never failed, no reconnect.
    assert_eq!(
        sdk.count(|v| v["event"] == "viewing"),
        1,
        "the viewer reconnected"
    );
    let states: Vec<&str> = v["pcStates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s[1].as_str())
        .collect();
    assert!(
        !states.iter().any(|s| matches!(*s, "failed" | "closed")),
        "the viewer's peer connection ended: {states:?}"
    );
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "{}",
        v["errors"]
    );
    // inactive after the kill, then active again.
    let events: Vec<(f64, &str, Value)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["t"].as_f64().unwrap(),
                e["name"].as_str().unwrap_or(""),
                e["data"].clone(),
            )
        })
        .collect();
    let inactive = events
        .iter()
        .find(|(t, n, d)| *t > killed_at && *n == "inactive" && d["sourceId"] == "host")
        .expect("inactive host after the kill");
    assert!(
        events
            .iter()
            .any(|(t, n, d)| *t > inactive.0 && *n == "active" && d["sourceId"] == "host"),
        "no active host after the inactive: {events:?}"
    );
    // The multiplexed tracks fill again: a vad naming host after the relink...
    let vad_back = events
        .iter()
        .find(|(t, n, d)| *t > inactive.0 && *n == "vad" && d["sourceId"] == "host")
        .expect("a vad naming host after the relink");
    // ...and audio plays in that track.
    let mid = vad_back.2["mediaId"].as_str().unwrap().to_owned();
    let energy = v["tracks"][&mid]["energy"].as_array().unwrap();
    let audio_back_at = energy
        .iter()
        .map(|x| (x[0].as_f64().unwrap(), x[1].as_f64().unwrap()))
        .find(|(t, e)| *t > vad_back.0 && *e > 0.01)
        .map(|(t, _)| t)
        .unwrap_or_else(|| panic!("mid {mid} stays silent after the relink"));
    let stats = v["stats"][&mid].as_array().unwrap();
    let received = |at: f64| {
        stats
            .iter()
            .filter(|s| s["t"].as_f64().unwrap() <= at)
            .filter_map(|s| s["packetsReceived"].as_f64())
            .next_back()
            .unwrap_or(0.0)
    };
    let gap_kill = (audio_back_at - killed_at) / 1000.0;
    let gap_republish = (audio_back_at - republished_at) / 1000.0;
    eprintln!(
        "origin restart: kill -> origin up {:.1} s, kill -> inactive (link loss noticed) {:.1} s, \
         kill -> publisher connected {:.1} s, kill -> active {:.1} s, \
         kill -> first audio back {gap_kill:.1} s, republish -> first audio back {gap_republish:.1} s",
        (restarted_at - killed_at) / 1000.0,
        (inactive_seen["t"].as_f64().unwrap() - killed_at) / 1000.0,
        (republished_at - killed_at) / 1000.0,
        (active_again_at - killed_at) / 1000.0,
    );
    let last_t = stats.last().unwrap()["t"].as_f64().unwrap();
    let after = received(last_t) - received(audio_back_at);
    eprintln!(
        "mid {mid}: {after} packets in the {:.1} s after audio came back",
        (last_t - audio_back_at) / 1000.0
    );
    assert!(
        after > 150.0,
        "mid {mid} got too few packets after audio came back: {stats:?}"
    );
    assert!(gap_kill < 20.0, "audio back {gap_kill:.1} s after the kill");
    assert!(
        gap_republish < 12.0,
        "audio back {gap_republish:.1} s after the republish"
    );
    // The other stream, whose channel number changed with the restart, plays again too.
    let other = other_view_lines.wait("other viewer report", Duration::from_secs(60), |v| {
        v["event"] == "report"
    });
    drop(other_view);
    let main = &other["tracks"]["0"];
    let last = main["last_arrival"].as_f64().unwrap_or(0.0) * 1000.0;
    assert!(
        last > republished_at + 5000.0,
        "the other stream's viewer stopped hearing it after the restart: {main}"
    );
    let m = |name: &str| common::metric(edge.http(), name).unwrap_or(-1.0);
    assert!(m("chorus_edge_link_losses_total") >= 1.0);
    assert_rss_below(
        edge.child.id(),
        RSS_BOUND_KIB,
        "edge after the origin restart",
    );
    assert_rss_below(origin.child.id(), RSS_BOUND_KIB, "restarted origin");
}

/// A multi-thread tokio runtime for the test's own QUIC peers.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A fake origin's QUIC server config: a fresh certificate, as an origin without a data dir.
fn fake_origin_config() -> (quinn::ServerConfig, String) {
    let id = chorus::auth::identity::Identity::load(None, None).unwrap();
    chorus::relay::tls::server_config(&id.cert_der, &id.cert_key_der).unwrap()
}

/// A QUIC endpoint that completes the handshake and accepts the control stream, then never
/// answers `Hello`: the edge must give up within its hello deadline, with a clear error.
#[test]
fn link_edge_gives_up_on_an_origin_that_never_welcomes() {
    let _serial = common::serial();
    let rt = runtime();
    let (server_cfg, _) = fake_origin_config();
    let endpoint = rt.block_on(async {
        quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap()
    });
    let addr = endpoint.local_addr().unwrap();
    let silent = endpoint.clone();
    rt.spawn(async move {
        while let Some(inc) = silent.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                // Read the hello, answer nothing, keep the connection open.
                if let Ok((_send, mut recv)) = conn.accept_bi().await {
                    let mut buf = [0u8; 1024];
                    while let Ok(Some(_)) = recv.read(&mut buf).await {}
                }
                conn.closed().await;
            });
        }
    });
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "edge",
            "--http",
            "127.0.0.1:0",
            "--origin",
            &addr.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(out, Duration::from_secs(20));
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the edge started without a welcome");
    assert!(
        stderr.contains("did not answer hello within"),
        "unclear refusal: {stderr}"
    );
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
    eprintln!("edge gave up on a silent origin after {took:?}");
    endpoint.close(0u32.into(), b"");
}

/// Waits for a child to exit (killing it after `limit`) and collects its output.
fn wait_output(mut c: Child, limit: Duration) -> std::process::Output {
    let end = Instant::now() + limit;
    while c.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.wait_with_output().unwrap()
}

/// A hand-made edge: a QUIC client (receive window `window`) that says `Hello` with the
/// cluster token on its control stream.
async fn hand_made_edge(
    origin: SocketAddr,
    window: u32,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(fake_edge_config(window));
    let c = ep
        .connect(origin, chorus::auth::identity::CERT_SERVER_NAME)
        .unwrap()
        .await
        .expect("handshake");
    let (mut send, recv) = c.open_bi().await.unwrap();
    use chorus::relay::proto::{encode_frame, EdgeMsg};
    send.write_all(&encode_frame(&EdgeMsg::Hello {
        token: Some(CLUSTER.to_owned()),
        ws_url: None,
    }))
    .await
    .unwrap();
    (ep, c, send, recv)
}

/// A client config for the test's fake edges: the relay's own, with a receive window for the
/// control stream of `window` bytes (a small one fills as soon as the peer stops reading).
fn fake_edge_config(window: u32) -> quinn::ClientConfig {
    let mut cfg = chorus::relay::tls::client_config(None).unwrap();
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(window.into());
    t.receive_window(window.into());
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.datagram_receive_buffer_size(Some(64 * 1024));
    cfg.transport_config(Arc::new(t));
    cfg
}

fn cluster_addr(p: &Proc) -> SocketAddr {
    p.cluster().parse().unwrap()
}

/// Edges that connect and never say who they are (no control stream at all, or a control stream
/// without `Hello`) are disconnected at the origin's hello deadline; the honest viewer (on the
/// origin's own edge) hears nothing of it.
#[test]
fn link_origin_disconnects_edges_that_never_say_hello() {
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--cluster-token", CLUSTER]);
    let h = Honest::start(Honest::at(p.http(), TOKEN, "honest-link-hello").seconds(12));
    let rt = runtime();
    let origin = cluster_addr(&p);
    let t0 = Instant::now();
    let reasons = rt.block_on(async move {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(fake_edge_config(1 << 20));
        let mut conns = Vec::new();
        // 50 that open nothing, 50 that open the control stream and send nothing.
        for i in 0..100 {
            let c = ep
                .connect(origin, chorus::auth::identity::CERT_SERVER_NAME)
                .unwrap()
                .await
                .expect("handshake");
            if i % 2 == 1 {
                let (mut send, _recv) = c.open_bi().await.unwrap();
                // A stream is only seen by the peer once something is sent on it: half a frame.
                send.write_all(&[0, 0]).await.unwrap();
                std::mem::forget(send);
            }
            conns.push(c);
        }
        let mut reasons = Vec::new();
        for c in conns {
            let r = tokio::time::timeout(Duration::from_secs(15), c.closed()).await;
            reasons.push(
                r.map(|e| e.to_string())
                    .unwrap_or_else(|_| "still open".into()),
            );
        }
        reasons
    });
    let took = t0.elapsed();
    assert!(
        reasons.iter().all(|r| r.contains("hello")),
        "not all silent edges were dropped for their missing hello: {reasons:?}"
    );
    eprintln!(
        "100 silent edges dropped within {took:?}: {}",
        reasons.first().unwrap()
    );
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve after 100 silent edges");
    h.assert_gapless();
}

/// A fake edge joins, then subscribes to thousands of streams (each answered with a source list
/// on its control stream) and never reads that stream: the origin's queue for it is bounded, and
/// the edge is disconnected, logged, instead of buffered for. The honest viewer stays gapless.
#[test]
fn link_origin_disconnects_an_edge_that_never_reads_its_control_stream() {
    use chorus::relay::proto::{encode_frame, EdgeMsg, FrameReader, OriginMsg};
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--cluster-token", CLUSTER]);
    let h = Honest::start(Honest::at(p.http(), TOKEN, "honest-link-read").seconds(12));
    let rt = runtime();
    let origin = cluster_addr(&p);
    let t0 = Instant::now();
    let (sent, reason) = rt.block_on(async move {
        let (_ep, c, mut send, mut recv) = hand_made_edge(origin, 4096).await;
        let mut reader = FrameReader::default();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = reader.next_msg::<OriginMsg>().unwrap() {
                assert!(matches!(m, OriginMsg::Welcome { .. }), "{m:?}");
                break;
            }
            let n = recv.read(&mut buf).await.unwrap().unwrap();
            reader.push(&buf[..n]);
        }
        // From now on nothing is read.
        let mut sent = 0;
        for i in 0..20_000 {
            let msg = encode_frame(&EdgeMsg::Subscribe {
                stream: format!("never-read-{i}"),
            });
            match tokio::time::timeout(Duration::from_secs(2), send.write_all(&msg)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
            if c.close_reason().is_some() {
                break;
            }
        }
        let r = tokio::time::timeout(Duration::from_secs(15), c.closed()).await;
        (
            sent,
            r.map(|e| e.to_string())
                .unwrap_or_else(|_| "still open".into()),
        )
    });
    eprintln!(
        "edge that never reads: disconnected after {sent} subscriptions, {:?}: {reason}",
        t0.elapsed()
    );
    assert!(
        reason.contains("control"),
        "not disconnected for its control backlog: {reason}"
    );
    // Its subscriptions went with it.
    wait_for(
        "the stalled edge's streams dropped",
        Duration::from_secs(10),
        || (common::metric(p.http(), "chorus_origin_streams ")? <= 1.0).then_some(()),
    );
    assert_rss_below(p.child.id(), RSS_BOUND_KIB, "serve after the stalled edge");
    h.assert_gapless();
}

/// A fake origin welcomes a real edge, announces one source for the stream its viewer asks for
/// and then floods the link: valid audio far faster than a media thread forwards it, malformed
/// datagrams and datagrams of channels it never announced. The edge counts each by reason, its
/// lanes stay bounded (RSS bound), and it keeps serving.
#[test]
fn link_edge_bounds_and_counts_a_flooding_origin() {
    use chorus::relay::proto::{
        encode_frame, DatagramHeader, EdgeMsg, FrameReader, Kind, OriginMsg, SourceInfo, TrackInfo,
    };
    let _serial = common::serial();
    let rt = runtime();
    let (server_cfg, _) = fake_origin_config();
    let endpoint = rt.block_on(async {
        quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap()
    });
    let addr = endpoint.local_addr().unwrap();
    let flood_done = Arc::new(Mutex::new(None::<u64>));
    let done = flood_done.clone();
    let fake = endpoint.clone();
    rt.spawn(async move {
        while let Some(inc) = fake.accept().await {
            let done = done.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut reader = FrameReader::default();
                let mut buf = [0u8; 4096];
                // The fake origin signs like a real one: the edge asks it to authorize viewers.
                let signer = chorus::auth::jwt::JwtSigner::from_pkcs8(
                    &chorus::auth::jwt::JwtSigner::generate_pkcs8(),
                    60,
                )
                .unwrap();
                let key = signer.verify_key().clone();
                loop {
                    let Ok(Some(n)) = recv.read(&mut buf).await else {
                        return;
                    };
                    reader.push(&buf[..n]);
                    while let Ok(Some(m)) = reader.next_msg::<EdgeMsg>() {
                        match m {
                            EdgeMsg::Hello { .. } => {
                                let w = OriginMsg::Welcome {
                                    jwt_key: key.to_base64(),
                                    key_id: key.kid.clone(),
                                };
                                send.write_all(&encode_frame(&w)).await.unwrap();
                            }
                            EdgeMsg::Subscribe { stream } => {
                                let s = OriginMsg::Sources {
                                    stream,
                                    channel: 7,
                                    sources: vec![SourceInfo {
                                        index: 0,
                                        source_id: Some("flood".into()),
                                        tracks: vec![TrackInfo {
                                            media: "audio".into(),
                                            mid: "0".into(),
                                        }],
                                        audio_level: true,
                                    }],
                                };
                                send.write_all(&encode_frame(&s)).await.unwrap();
                                let conn = conn.clone();
                                let done = done.clone();
                                tokio::spawn(async move {
                                    let n = flood(&conn).await;
                                    *done.lock().unwrap() = Some(n);
                                });
                            }
                            EdgeMsg::Authorize { id, stream, .. } => {
                                let jwt =
                                    signer.issue(&stream, chorus::auth::jwt::Scope::Subscribe);
                                let a = OriginMsg::Authorized { id, jwt };
                                send.write_all(&encode_frame(&a)).await.unwrap();
                            }
                            _ => {}
                        }
                    }
                }
            });
        }
    });
    async fn flood(conn: &quinn::Connection) -> u64 {
        let mut sent = 0u64;
        let start = tokio::time::Instant::now();
        let mut seq: u16 = 0;
        while start.elapsed() < Duration::from_secs(6) {
            for _ in 0..200 {
                seq = seq.wrapping_add(1);
                let mut d = Vec::with_capacity(120);
                let channel = if seq.is_multiple_of(10) { 99 } else { 7 };
                DatagramHeader {
                    channel,
                    source: 0,
                    kind: Kind::Audio,
                    sent_ms: start.elapsed().as_millis() as u32,
                }
                .write(&mut d);
                // RTP: V=2, X=1 (one-byte extension with the level), PT 111.
                d.extend_from_slice(&[0x90, 111]);
                d.extend_from_slice(&seq.to_be_bytes());
                d.extend_from_slice(&(seq as u32 * 960).to_be_bytes());
                d.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                d.extend_from_slice(&[0xBE, 0xDE, 0, 1, 0x10, 20, 0, 0]);
                d.extend_from_slice(&[0x78; 80]);
                if seq % 10 == 5 {
                    d.truncate(3); // no relay header
                }
                if conn.send_datagram(d.into()).is_ok() {
                    sent += 1;
                }
            }
            tokio::task::yield_now().await;
        }
        sent
    }
    let edge = Proc::start(
        "edge",
        &[
            "edge",
            "--http",
            "127.0.0.1:0",
            "--origin",
            &addr.to_string(),
        ],
        &[],
    );
    let viewer = common::whep_command(
        edge.http(),
        "flooded",
        &["--tracks", "1", "--pinned", "flood", "--seconds", "10"],
    )
    .spawn()
    .unwrap();
    wait_for("the flood ran", Duration::from_secs(30), || {
        *flood_done.lock().unwrap()
    });
    let out = viewer.wait_with_output().unwrap();
    common::assert_succeeded(&out, "whep_view.py at the flooded edge");
    let m = |reason: &str| {
        common::metric(
            edge.http(),
            &format!("chorus_edge_dropped_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    let relayed = common::metric(edge.http(), "chorus_edge_relay_packets_total").unwrap();
    let (malformed, channel, full, stale) = (
        m("relay_malformed"),
        m("unknown_channel"),
        m("lane_full"),
        m("stale"),
    );
    eprintln!(
        "flood: {} datagrams sent, {relayed} reached the edge; dropped: relay_malformed {malformed}, \
         unknown_channel {channel}, lane_full {full}, stale {stale}",
        flood_done.lock().unwrap().unwrap()
    );
    assert!(
        malformed > 0.0 && channel > 0.0,
        "bad datagrams not counted"
    );
    assert!(
        full + stale > 0.0,
        "a flood faster than the media thread dropped nothing at its lane"
    );
    assert_eq!(common::get_json(edge.http(), "/healthz").0, 200);
    assert_rss_below(edge.child.id(), RSS_BOUND_KIB, "edge after the flood");
    endpoint.close(0u32.into(), b"");
}

/// A fake edge that reads its control stream but subscribes to more streams than any edge has
/// (and to one stream twice): the origin holds at most its stated limit of subscriptions for one
/// connection (each costs a stream entry), relays a doubly subscribed stream once, and drops them
/// all when the edge goes. The honest viewer stays gapless.
#[test]
fn link_origin_bounds_one_edges_subscriptions() {
    use chorus::relay::proto::{encode_frame, EdgeMsg, FrameReader, OriginMsg};
    let _serial = common::serial();
    let p = common::serve_with(TOKEN, &["--cluster-token", CLUSTER]);
    let h = Honest::start(Honest::at(p.http(), TOKEN, "honest-link-subs").seconds(14));
    let rt = runtime();
    let origin = cluster_addr(&p);
    let http = p.http();
    let limit = chorus::origin::relay_server::MAX_EDGE_SUBSCRIPTIONS;
    let (streams_held, lists, open) = rt.block_on(async move {
        let (_ep, c, mut send, mut recv) = hand_made_edge(origin, 1 << 20).await;
        // Read everything the origin says, counting its source lists.
        let lists = Arc::new(Mutex::new(0usize));
        let counted = lists.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::default();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                reader.push(&buf[..n]);
                while let Ok(Some(m)) = reader.next_msg::<OriginMsg>() {
                    if matches!(m, OriginMsg::Sources { .. }) {
                        *counted.lock().unwrap() += 1;
                    }
                }
            }
        });
        let mut batch = Vec::new();
        for name in ["honest-link-subs", "honest-link-subs"]
            .into_iter()
            .map(String::from)
            .chain((0..limit + 2_000).map(|i| format!("many-{i}")))
        {
            batch.extend(encode_frame(&EdgeMsg::Subscribe { stream: name }));
            if batch.len() > 32 * 1024 {
                send.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        send.write_all(&batch).await.unwrap();
        // Let the origin work through them.
        let held = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = tokio::task::spawn_blocking(move || {
                common::metric(http, "chorus_origin_streams ").unwrap_or(0.0)
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = tokio::task::spawn_blocking(move || {
                common::metric(http, "chorus_origin_streams ").unwrap_or(0.0)
            })
            .await
            .unwrap();
            if before == after && after > 1.0 {
                break after;
            }
        };
        let edges = tokio::task::spawn_blocking(move || {
            common::get_json(http, "/api/streams/honest-link-subs").1["edges"].as_u64()
        })
        .await
        .unwrap();
        // The fake edge plus the serve's own edge.
        assert_eq!(edges, Some(2), "a doubled subscription is held twice");
        let open = c.close_reason().is_none();
        let n = *lists.lock().unwrap();
        c.close(0u32.into(), b"done");
        (held, n, open)
    });
    eprintln!(
        "one edge asked for {} subscriptions: the origin holds {streams_held} streams, sent {lists} source lists",
        limit + 2_002
    );
    assert!(open, "the edge was disconnected instead of refused");
    // The honest stream is one of the subscribed ones.
    assert!(
        streams_held <= (limit + 1) as f64,
        "{streams_held} streams held for one edge"
    );
    assert!(lists <= limit, "{lists} source lists sent");
    wait_for(
        "the edge's streams dropped",
        Duration::from_secs(15),
        || (common::metric(p.http(), "chorus_origin_streams ")? <= 1.0).then_some(()),
    );
    assert_rss_below(
        p.child.id(),
        RSS_BOUND_KIB,
        "serve after 12,000 subscriptions",
    );
    let drops = |r: &str| {
        common::metric(
            p.http(),
            &format!("chorus_edge_dropped_total{{reason=\"{r}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    eprintln!(
        "edge drops meanwhile: stale {}, lane_full {}",
        drops("stale"),
        drops("lane_full")
    );
    h.assert_gapless();
}
