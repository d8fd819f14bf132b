//! The edge's lean send path (its own SRTP and SRTCP after the handshake, no str0m) against an
//! independent receiver: a str0m client connected in memory must decrypt every packet, in
//! order, with the payload, sequence numbers, level and mid the edge meant; the sender reports
//! it receives count every packet sent on the track; a packet lost on the way is NACKed by the
//! client and sent again from the history; its consent checks are answered.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::net::{Protocol, Receive};
use str0m::rtp::rtcp::Rtcp;
use str0m::rtp::RawPacket;
use str0m::{Event, Input, Output};

use chorus::edge::loopback::{pair, SERVER};
use chorus::edge::viewer::Sent;
use chorus::media::rewrite::{Feed, InputPacket};
use chorus::media::SourceIdx;
use chorus::net::send::SendBatch;
use chorus::rtc::established::{Established, RtcpStats};
use chorus::rtc::peers::{PeerOut, Sink};

/// Counts the bytes this thread holds (allocated minus freed), for the memory test.
struct LiveBytes;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn live() -> isize {
    LIVE.with(Cell::get)
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

unsafe impl GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: LiveBytes = LiveBytes;

/// What the client got: RTP packets and the (packets, octets) of the sender reports.
#[derive(Default)]
struct Got {
    rtp: Vec<str0m::rtp::RtpPacket>,
    reports: Vec<(u32, u32, u32)>,
}

/// Hands every datagram waiting at the client's socket to the client, and everything the
/// client sends back to the edge's lean state (as the peer set routes it: STUN, SRTCP).
#[allow(clippy::too_many_arguments)]
fn exchange(
    p: &mut chorus::edge::loopback::Pair,
    lean: &mut Established,
    rx: &UdpSocket,
    tx: &UdpSocket,
    batch: &mut SendBatch,
    scratch: &mut Vec<u8>,
    stats: &RtcpStats,
    now: Instant,
    got: &mut Got,
) {
    let server: SocketAddr = SERVER.parse().unwrap();
    let mut buf = [0u8; 2000];
    loop {
        let len = match rx.recv(&mut buf) {
            Ok(len) => len,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("recv: {e}"),
        };
        let r = Receive {
            proto: Protocol::Udp,
            source: server,
            destination: p.client_addr,
            contents: (&buf[..len]).try_into().unwrap(),
        };
        p.client.handle_input(Input::Receive(now, r)).unwrap();
        drain(p, lean, tx, batch, scratch, stats, now, got);
    }
    p.client.handle_input(Input::Timeout(now)).unwrap();
    drain(p, lean, tx, batch, scratch, stats, now, got);
    batch.flush(tx);
}

/// Polls the client until it sleeps (str0m wants that after every input).
#[allow(clippy::too_many_arguments)]
fn drain(
    p: &mut chorus::edge::loopback::Pair,
    lean: &mut Established,
    tx: &UdpSocket,
    batch: &mut SendBatch,
    scratch: &mut Vec<u8>,
    stats: &RtcpStats,
    now: Instant,
    got: &mut Got,
) {
    loop {
        match p.client.poll_output().unwrap() {
            Output::Timeout(_) => break,
            Output::Event(Event::RtpPacket(pkt)) => got.rtp.push(pkt),
            Output::Event(Event::RawPacket(raw)) => {
                if let RawPacket::RtcpRx(Rtcp::SenderReport(sr)) = *raw {
                    let i = sr.sender_info;
                    got.reports
                        .push((*i.ssrc, i.sender_packet_count, i.sender_octet_count));
                }
            }
            Output::Event(_) => {}
            Output::Transmit(t) => {
                let mut sink = Sink::new(tx, batch);
                match t.contents[0] {
                    0..=3 => {
                        lean.handle_stun(now, p.client_addr, &t.contents, stats, &mut sink);
                    }
                    128..=191 => {
                        let authentic = lean.handle_rtcp(&t.contents, scratch, stats, &mut sink);
                        assert!(authentic, "the client's SRTCP opens with its own key");
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn lean_packets_and_reports_decrypt_in_a_str0m_client_and_a_nack_is_answered() {
    let start = Instant::now();
    let mut p = pair(7, 2, false);
    let mut lean = p
        .go_lean(start)
        .expect("str0m and chorus negotiate an AES-GCM profile");
    // The client NACKs Opus only when asked (no RTX for audio): ask, as a browser may.
    let ssrc = p
        .server
        .direct_api()
        .stream_tx_by_mid(p.tracks[0].mid, None)
        .unwrap()
        .ssrc();
    // The client's end: a real loopback socket at the client's address.
    let rx = UdpSocket::bind(p.client_addr).expect("bind the client address on loopback");
    rx.set_nonblocking(true).unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (mut batch, mut lost) = (SendBatch::default(), SendBatch::default());
    let mut scratch = Vec::new();
    let stats = RtcpStats::default();
    let mut got = Got::default();
    // The input crosses a rollover; the viewer's own numbering starts low (see OutTrack::new).
    let first_seq: u16 = 65_500;
    let n = 150u16;
    let dropped = 60u16;
    let mut sent_payloads = Vec::new();
    let mut expected_reports = Vec::new();
    let (mut packets, mut octets) = (0u32, 0u32);
    for i in 0..n {
        let now = start + Duration::from_millis(20 * i as u64);
        if i == 1 {
            p.client
                .direct_api()
                .stream_rx(&ssrc)
                .expect("the client knows the stream")
                .suppress_nack(false);
        }
        let payload = Bytes::from(vec![i as u8; 20 + (i as usize % 50)]);
        let input = InputPacket {
            source: Feed::Source(SourceIdx(1)),
            ssrc: 99,
            seq: first_seq.wrapping_add(i),
            ts: 960 * i as u32,
            marker: i == 0,
            samples: 960,
        };
        let level = Some((i % 2 == 0, (i % 100) as u8));
        // One packet is lost on the way: it goes into a batch that is never sent.
        let out = PeerOut::Lean {
            lean: &mut lean,
            sink: Sink::new(&tx, if i == dropped { &mut lost } else { &mut batch }),
            scratch: &mut scratch,
        };
        let sent = p.tracks[0].write(out, 20_000 * i as u64, now, &input, level, &payload);
        assert_eq!(sent, Sent::Direct, "packet {i}");
        packets += 1;
        octets += payload.len() as u32;
        if now >= lean.poll_timeout() {
            let mut sink = Sink::new(&tx, &mut batch);
            lean.handle_timeout(now, &mut scratch, &stats, &mut sink)
                .expect("consent holds: the client's checks are answered");
            expected_reports.push((*ssrc, packets, octets));
        }
        batch.flush(&tx);
        exchange(
            &mut p,
            &mut lean,
            &rx,
            &tx,
            &mut batch,
            &mut scratch,
            &stats,
            now,
            &mut got,
        );
        sent_payloads.push((payload, level));
    }
    // Let the client's NACK timer and our answer run out.
    for k in 1..=20 {
        let now = start + Duration::from_millis(20 * n as u64 + 50 * k);
        exchange(
            &mut p,
            &mut lean,
            &rx,
            &tx,
            &mut batch,
            &mut scratch,
            &stats,
            now,
            &mut got,
        );
    }

    let mut seqs: Vec<u64> = got.rtp.iter().map(|p| *p.seq_no).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        n as usize,
        "every packet decrypts at the client, the lost one after its NACK: {seqs:?}"
    );
    assert!(
        stats.nack_resent.load(Ordering::Relaxed) >= 1,
        "the client's NACK was answered"
    );
    assert!(
        stats.stun_answered.load(Ordering::Relaxed) >= 1,
        "consent checks answered"
    );
    assert_eq!(stats.unauthenticated.load(Ordering::Relaxed), 0);
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
    let first = seqs[0];
    for pkt in &got.rtp {
        let i = (*pkt.seq_no - first) as usize;
        assert_eq!(&pkt.payload[..], &sent_payloads[i].0[..], "payload {i}");
        let (voice, level) = sent_payloads[i].1.unwrap();
        assert_eq!(
            pkt.header.ext_vals.audio_level,
            Some(-(level as i8)),
            "level {i}"
        );
        assert_eq!(
            pkt.header.ext_vals.voice_activity,
            Some(voice),
            "V flag {i}"
        );
        assert_eq!(
            pkt.header.ext_vals.mid,
            Some(p.tracks[0].mid),
            "mid extension {i}"
        );
        assert_eq!(pkt.header.ssrc, ssrc, "one SSRC");
    }
    let in_order: Vec<u64> = got
        .rtp
        .iter()
        .map(|p| *p.seq_no)
        .filter(|s| *s != first + dropped as u64)
        .collect();
    let expected: Vec<u64> = (0..n as u64)
        .filter(|i| *i != dropped as u64)
        .map(|i| first + i)
        .collect();
    assert_eq!(
        in_order, expected,
        "gapless and in order but for the resent one"
    );
    assert!(expected_reports.len() >= 2, "{expected_reports:?}");
    assert_eq!(
        got.reports, expected_reports,
        "each SR counts every packet sent on the track before it"
    );
}

/// The heap a connected viewer's transport holds (this thread's allocator count, N viewers of
/// 3 tracks): its str0m `Rtc` freshly connected and after 150 packets per track went through
/// it (what every viewer held before, and what a viewer that keeps str0m still holds), against
/// its lean state after the switch, with a full NACK history.
#[test]
fn a_lean_viewer_holds_a_fraction_of_its_str0m_peer() {
    const N: usize = 10;
    let now = Instant::now();
    let payload = Bytes::from(vec![0x78u8; 80]);
    let mut servers = Vec::new();
    let mut rest = Vec::new();
    for i in 0..N {
        let mut p = pair(200 + i as u16, 3, false);
        let server = Box::new(std::mem::replace(
            &mut p.server,
            str0m::RtcConfig::new().build(now),
        ));
        servers.push(server);
        rest.push(p);
    }
    // Freshly connected.
    let before = live();
    drop(servers.pop());
    let fresh = before - live();
    // After media through str0m (its send buffers and stream state fill up).
    for (server, p) in servers.iter_mut().zip(&mut rest) {
        for k in 0..450u16 {
            let input = InputPacket {
                source: Feed::Source(SourceIdx(1)),
                ssrc: 5,
                seq: k,
                ts: 960 * k as u32,
                marker: false,
                samples: 960,
            };
            let t = &mut p.tracks[(k % 3) as usize];
            let out = PeerOut::Str0m(server);
            let at = now + Duration::from_millis(20 * k as u64 / 3);
            t.write(
                out,
                20_000 * (k / 3) as u64,
                at,
                &input,
                Some((true, 30)),
                &payload,
            );
            server.handle_input(Input::Timeout(at)).unwrap();
            while let Ok(o) = server.poll_output() {
                if let Output::Timeout(_) = o {
                    break;
                }
            }
        }
    }
    let before = live();
    drop(servers);
    let used = (before - live()) / (N as isize - 1);
    // Lean: the switch, then a full history on every track.
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut batch = SendBatch::default();
    let mut scratch = Vec::with_capacity(1500);
    // (The pairs' servers are stand-ins now; the lean state needs their negotiation: new pairs.)
    let mut leans = Vec::new();
    let mut pairs: Vec<_> = (0..N).map(|i| pair(300 + i as u16, 3, false)).collect();
    let before = live();
    for p in &mut pairs {
        leans.push(Box::new(p.go_lean(now).unwrap()));
    }
    for (lean, p) in leans.iter_mut().zip(&mut pairs) {
        for k in 0..150u16 {
            let input = InputPacket {
                source: Feed::Source(SourceIdx(1)),
                ssrc: 5,
                seq: k,
                ts: 960 * k as u32,
                marker: false,
                samples: 960,
            };
            for t in &mut p.tracks {
                let out = PeerOut::Lean {
                    lean,
                    sink: Sink::new(&tx, &mut batch),
                    scratch: &mut scratch,
                };
                t.write(
                    out,
                    20_000 * k as u64,
                    now,
                    &input,
                    Some((true, 30)),
                    &payload,
                );
            }
            batch.discard();
        }
    }
    let lean = (live() - before) / N as isize;
    eprintln!(
        "per viewer, 3 tracks: str0m Rtc {fresh} B connected, {used} B after 150 packets a \
         track; lean state {lean} B"
    );
    eprintln!(
        "inline sizes: Established {} B (boxed, counted above), Rtc {} B, OutTrack {} B, \
         Peer<Viewer> {} B",
        std::mem::size_of::<Established>(),
        std::mem::size_of::<str0m::Rtc>(),
        std::mem::size_of::<chorus::edge::viewer::OutTrack>(),
        std::mem::size_of::<chorus::rtc::peers::Peer<chorus::edge::viewer::Viewer>>(),
    );
    assert!(lean * 5 < fresh, "lean {lean} B vs str0m {fresh} B");
    assert!(lean < 16 * 1024, "lean {lean} B");
}
