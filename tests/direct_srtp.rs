//! The edge's direct send path (its own SRTP sealing, bypassing str0m's send path) against an
//! independent receiver: a str0m client connected in memory must decrypt every packet, in
//! order, with the payload, sequence numbers, level and mid the edge meant, across the packets
//! that still go through str0m.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::net::{Protocol, Receive};
use str0m::{Event, Input, Output};

use chorus::edge::viewer::{Direct, Sent};
use chorus::media::rewrite::{Feed, InputPacket};
use chorus::media::SourceIdx;
use chorus::rtc::loopback::{pair, SERVER};
use chorus::rtc::peers::Sink;
use chorus::rtc::udp::SendBatch;

#[test]
fn direct_packets_decrypt_in_a_str0m_client_in_order() {
    let mut p = pair(7, 2, false);
    let srtp = p
        .srtp
        .take()
        .expect("str0m and chorus negotiate an AES-GCM profile");
    // The client's end of the direct path: a real loopback socket at the client's address.
    let rx = UdpSocket::bind(p.client_addr).expect("bind the client address on loopback");
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut batch = SendBatch::default();
    let mut scratch = Vec::new();
    let server_addr = SERVER.parse().unwrap();
    let start = Instant::now();
    // The input crosses a rollover; the viewer's own numbering starts low (see OutTrack::new).
    let first_seq: u16 = 65_500;
    let n = 120u16;
    let mut direct_count = 0;
    let mut str0m_count = 0;
    let mut sent_payloads = Vec::new();
    for i in 0..n {
        let payload: Arc<[u8]> = Arc::from(vec![i as u8; 20 + (i as usize % 50)]);
        let input = InputPacket {
            source: Feed::Source(SourceIdx(1)),
            ssrc: 99,
            seq: first_seq.wrapping_add(i),
            ts: 960 * i as u32,
            marker: i == 0,
            samples: 960,
        };
        let now = start + Duration::from_millis(20 * i as u64);
        let direct = Direct {
            srtp: &srtp,
            dest: p.client_addr,
            sink: Sink::new(&tx, &mut batch),
            scratch: &mut scratch,
        };
        let level = Some((i % 2 == 0, (i % 100) as u8));
        match p.tracks[0].write(
            &mut p.server,
            20_000 * i as u64,
            now,
            &input,
            level,
            &payload,
            Some(direct),
        ) {
            Sent::Direct => direct_count += 1,
            Sent::Str0m => {
                str0m_count += 1;
                // What str0m queued leaves through the in-memory link, as on the edge's flush.
                // As the edge's flush does: str0m releases a stream's very first packet only
                // on the timeout after the one that queued it.
                for k in 0..2 {
                    p.server
                        .handle_input(Input::Timeout(now + Duration::from_micros(k)))
                        .unwrap();
                    loop {
                        match p.server.poll_output().unwrap() {
                            Output::Timeout(_) => break,
                            Output::Transmit(t) => batch.push(&tx, t.destination, &t.contents),
                            Output::Event(_) => {}
                        }
                    }
                }
            }
            Sent::Dropped(why) => panic!("packet {i} not sent: {why:?}"),
        }
        batch.flush(&tx);
        sent_payloads.push((payload, level));
    }
    assert!(
        direct_count > 100,
        "most packets go direct ({direct_count})"
    );
    assert!(
        str0m_count >= 2,
        "some still go through str0m ({str0m_count})"
    );

    // Feed what arrived to the client and collect what it decrypts.
    let mut got = Vec::new();
    let mut buf = [0u8; 2000];
    let mut t = start;
    while got.len() < n as usize {
        let Ok(len) = rx.recv(&mut buf) else { break };
        t += Duration::from_millis(1);
        let r = Receive {
            proto: Protocol::Udp,
            source: server_addr,
            destination: p.client_addr,
            contents: (&buf[..len]).try_into().unwrap(),
        };
        p.client.handle_input(Input::Receive(t, r)).unwrap();
        loop {
            match p.client.poll_output().unwrap() {
                Output::Timeout(_) => break,
                Output::Event(Event::RtpPacket(pkt)) => got.push(pkt),
                _ => {}
            }
        }
    }
    let seqs: Vec<u64> = got.iter().map(|p| *p.seq_no).collect();
    assert_eq!(
        got.len(),
        n as usize,
        "every packet decrypts at the client: {seqs:?}"
    );
    let first = *got[0].seq_no;
    for (i, pkt) in got.iter().enumerate() {
        assert_eq!(*pkt.seq_no, first + i as u64, "gapless and in order");
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
        assert_eq!(pkt.header.ssrc, got[0].header.ssrc, "one SSRC");
    }
}
