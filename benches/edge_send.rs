//! What one forwarded packet costs the edge after the packet core: the per-viewer rewrite, the
//! str0m write, str0m's timeout handling and SRTP, measured on real str0m peers connected in
//! memory (ICE, DTLS and SRTP all done for real, no socket), next to the floor the issue names:
//! one AES-128-GCM seal of the same packet.
//!
//! - `flush_each_default_extensions`: the same with str0m's default header extensions
//!   (transport-cc, abs-send-time, ...) instead of the edge's viewer configuration.
//! - `flush_each`: every packet is written and flushed on its own (one `Timeout` + poll per
//!   packet per viewer).
//! - `flush_batch/K`: K packets are written to a viewer's tracks, then one flush sends them.
//! - `lean`: the edge's own path after the handshake (`rtc::established`): header written and
//!   sealed by the viewer's lean state (AES-GCM, as str0m negotiated), counted for its sender
//!   reports and kept for NACK; every packet, no str0m; the batch is discarded, not sent.
//! - `floor_gcm`: AES-128-GCM over a 12-byte header (AAD) and 100-byte payload.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use str0m::{Input, Output, Rtc};

use chorus::edge::loopback::pair;
use chorus::edge::viewer::{OutTrack, Sent};
use chorus::media::rewrite::{Feed, InputPacket};
use chorus::media::SourceIdx;
use chorus::net::send::SendBatch;
use chorus::rtc::peers::{PeerOut, Sink};

const TRACKS: usize = 3;

fn input(seq: u16) -> InputPacket {
    InputPacket {
        source: Feed::Source(SourceIdx(1)),
        ssrc: 42,
        seq,
        ts: seq as u32 * 960,
        marker: false,
        samples: 960,
    }
}

/// Sends what the server queued, counting datagrams (they go nowhere, as on a socket).
fn flush(server: &mut Rtc, now: Instant) -> usize {
    server.handle_input(Input::Timeout(now)).unwrap();
    let mut n = 0;
    loop {
        match server.poll_output().unwrap() {
            Output::Timeout(_) => return n,
            Output::Transmit(t) => {
                black_box(&t.contents);
                n += 1;
            }
            Output::Event(_) => {}
        }
    }
}

/// One packet written to a track at packet time `us` (a voiced level), as the edge does.
fn write(t: &mut OutTrack, out: PeerOut<'_>, seq: u16, us: u64, payload: &Bytes) -> Sent {
    t.write(
        out,
        us,
        Instant::now(),
        &input(seq),
        Some((true, 30)),
        payload,
    )
}

fn bench_send(c: &mut Criterion) {
    let mut g = c.benchmark_group("edge_send");
    g.measurement_time(Duration::from_secs(4));
    let payload = Bytes::from_static(&[0x78u8; 100]);
    let mut seq = 0u16;
    let mut us = 0u64;
    let mut all = pair(2, TRACKS, true);
    let _ = &all.client;
    g.bench_function("flush_each_default_extensions", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            us += 20_000;
            let now = Instant::now();
            let out = PeerOut::Str0m(&mut all.server);
            write(&mut all.tracks[0], out, seq, us, &payload);
            black_box(flush(&mut all.server, now));
        })
    });
    let mut p = pair(1, TRACKS, false);
    let _ = &p.client;
    g.bench_function("flush_each", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            us += 20_000;
            let now = Instant::now();
            write(
                &mut p.tracks[0],
                PeerOut::Str0m(&mut p.server),
                seq,
                us,
                &payload,
            );
            black_box(flush(&mut p.server, now));
        })
    });
    for k in [3usize, 9] {
        g.bench_with_input(BenchmarkId::new("flush_batch", k), &k, |b, &k| {
            b.iter(|| {
                let now = Instant::now();
                for i in 0..k {
                    seq = seq.wrapping_add(1);
                    us += 20_000;
                    let out = PeerOut::Str0m(&mut p.server);
                    write(&mut p.tracks[i % TRACKS], out, seq, us, &payload);
                }
                black_box(flush(&mut p.server, now));
            })
        });
    }
    // The lean path: the same write sealed by the viewer's lean state, queued in a send batch
    // that is discarded instead of sent.
    let mut d = pair(3, TRACKS, false);
    let _ = &d.client;
    let mut lean = d.go_lean(Instant::now()).expect("AES-GCM negotiated");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut batch = SendBatch::default();
    let mut scratch = Vec::with_capacity(1500);
    g.bench_function("lean", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            us += 20_000;
            let out = PeerOut::Lean {
                lean: &mut lean,
                sink: Sink::new(&sock, &mut batch),
                scratch: &mut scratch,
            };
            let sent = write(&mut d.tracks[0], out, seq, us, &payload);
            assert_eq!(sent, Sent::Direct);
            batch.discard();
        })
    });
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    let mut buf = vec![0u8; 100];
    let header = [0x80u8; 12];
    let mut n = 0u32;
    g.bench_function("floor_gcm", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let mut iv = [0u8; 12];
            iv[8..].copy_from_slice(&n.to_be_bytes());
            buf.truncate(100);
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(&header),
                &mut buf,
            )
            .unwrap();
            black_box(&buf);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_send);
criterion_main!(benches);
