//! The lean state without sockets: consent answers checked by str0m's own STUN parser, RTCP
//! by the `rtcp` crate (an independent implementation), SRTCP both ways.

use super::*;
use rtcp::packet::Packet;
use str0m::ice::TransId;

const SSRC: u32 = 0x1234_5678;
const VIEWER_SSRC: u32 = 0xBEEF;

fn material() -> Vec<u8> {
    (0..56u8).collect()
}

fn ice() -> IceLite {
    IceLite {
        local_ufrag: "edge".into(),
        local_pwd: "edge-password-edge-password".into(),
        remote_ufrag: "view".into(),
    }
}

fn viewer_addr() -> SocketAddr {
    "127.0.0.2:5000".parse().unwrap()
}

fn spec(ssrc: u32) -> TrackSpec {
    TrackSpec {
        ssrc,
        pt: 111,
        red_pt: Some(63),
        clock_rate: 48_000,
        level_id: Some(1),
        mid_id: Some(4),
        mid: SmallVec::from_slice(b"1"),
    }
}

/// The edge (DTLS server) with one track of this spec.
fn lean_one(spec: TrackSpec, now: Instant) -> Established {
    Established::new(
        ice(),
        &material(),
        SrtpProfile::AEAD_AES_128_GCM,
        false,
        [spec],
        viewer_addr(),
        now,
    )
    .unwrap()
}

/// The edge (DTLS server) with two tracks.
fn lean(now: Instant) -> Established {
    let tracks = [spec(SSRC), spec(SSRC + 1)];
    Established::new(
        ice(),
        &material(),
        SrtpProfile::AEAD_AES_128_GCM,
        false,
        tracks,
        viewer_addr(),
        now,
    )
    .expect("AES-GCM")
}

/// The viewer's SRTCP: it seals with the client's keys and opens with the server's.
fn viewer_srtcp() -> (Srtcp, Srtcp) {
    let m = material();
    (
        Srtcp::new(&m, SrtpProfile::AEAD_AES_128_GCM, true).unwrap(),
        Srtcp::new(&m, SrtpProfile::AEAD_AES_128_GCM, false).unwrap(),
    )
}

fn binding_request(user: &str, pwd: &str, use_candidate: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let msg = StunMessage::binding_request(user, TransId::new(), true, 7, 100, use_candidate);
    let n = msg
        .to_bytes(Some(pwd.as_bytes()), &mut buf, sha1_hmac)
        .unwrap();
    buf.truncate(n);
    buf
}

fn send(
    e: &mut Established,
    now: Instant,
    track: usize,
    ext_seq: u64,
    out: &mut Vec<(SocketAddr, Vec<u8>)>,
) {
    let payload = Bytes::from(vec![ext_seq as u8; 40]);
    let mut scratch = Vec::new();
    assert!(e.send_rtp(
        now,
        track,
        ext_seq,
        960 * ext_seq as u32,
        false,
        Some(0x85),
        &payload,
        &mut scratch,
        out
    ));
}

#[test]
fn a_consent_check_is_answered_and_verified_by_str0ms_parser() {
    let now = Instant::now();
    let mut e = lean(now);
    let stats = RtcpStats::default();
    let mut out = Vec::new();
    let from: SocketAddr = "127.0.0.3:6000".parse().unwrap();
    let req = binding_request("edge:view", &ice().local_pwd, true);
    assert!(e.accepts_stun(&req));
    assert!(e.handle_stun(now, from, &req, &stats, &mut out));
    assert_eq!(out.len(), 1);
    let (to, reply) = &out[0];
    assert_eq!(*to, from);
    let msg = StunMessage::parse(reply).expect("str0m parses the reply (FINGERPRINT checked)");
    assert!(msg.is_successful_binding_response());
    assert_eq!(msg.mapped_address(), Some(from), "XOR-MAPPED-ADDRESS");
    assert!(
        msg.verify(ice().local_pwd.as_bytes(), sha1_hmac),
        "MESSAGE-INTEGRITY"
    );
    assert_eq!(e.dest(), from, "USE-CANDIDATE moves the media");
    assert_eq!(stats.stun_answered.load(Ordering::Relaxed), 1);

    // Wrong password, wrong ufrags, not STUN: refused, counted, nothing sent.
    for bad in [
        binding_request("edge:view", "another-password-entirely", false),
        binding_request("edge:else", &ice().local_pwd, false),
        binding_request("else:view", &ice().local_pwd, false),
        vec![0u8; 30],
    ] {
        assert!(!e.accepts_stun(&bad));
        assert!(!e.handle_stun(now, from, &bad, &stats, &mut out));
    }
    assert_eq!(out.len(), 1);
    assert_eq!(stats.stun_refused.load(Ordering::Relaxed), 4);
}

#[test]
fn consent_expires_without_checks_and_is_refreshed_by_them() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let req = binding_request("edge:view", &ice().local_pwd, false);
    let t1 = t0 + CONSENT_TIMEOUT - Duration::from_secs(1);
    assert!(e.handle_stun(t1, viewer_addr(), &req, &stats, &mut out));
    assert!(e.poll_timeout() <= t1 + CONSENT_TIMEOUT);
    assert_eq!(
        e.handle_timeout(t0 + CONSENT_TIMEOUT, &mut scratch, &stats, &mut out),
        Ok(())
    );
    assert_eq!(
        e.handle_timeout(t1 + CONSENT_TIMEOUT, &mut scratch, &stats, &mut out),
        Err(Ended::ConsentExpired)
    );
}

#[test]
fn sender_reports_count_every_packet_and_map_the_rtp_clock() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    for i in 0..30u64 {
        send(
            &mut e,
            t0 + Duration::from_millis(20 * i),
            0,
            100 + i,
            &mut out,
        );
    }
    send(&mut e, t0, 1, 7, &mut out);
    assert_eq!(e.counts(0), (30, 30 * 40));
    out.clear();
    // Nothing due before the interval; at it, one SR per track that sent.
    let last_at = t0 + Duration::from_millis(20 * 29);
    e.handle_timeout(
        t0 + Duration::from_millis(999),
        &mut scratch,
        &stats,
        &mut out,
    )
    .unwrap();
    assert!(out.is_empty());
    let at = t0 + REPORT_INTERVAL;
    e.handle_timeout(at, &mut scratch, &stats, &mut out)
        .unwrap();
    assert_eq!(out.len(), 1, "both tracks' reports in one compound packet");
    assert_eq!(stats.sr_sent.load(Ordering::Relaxed), 2);
    let (_, opener) = viewer_srtcp();
    let mut sealed = out[0].1.clone();
    let (plain, index) = opener
        .open(&mut sealed)
        .expect("the viewer opens our SRTCP");
    assert_eq!(index, 0);
    let pkts = rtcp::packet::unmarshal(&mut Bytes::copy_from_slice(plain)).expect("rtcp parses");
    let sr = pkts[0]
        .as_any()
        .downcast_ref::<rtcp::sender_report::SenderReport>()
        .expect("an SR first");
    assert_eq!(sr.ssrc, SSRC);
    assert_eq!((sr.packet_count, sr.octet_count), (30, 1200));
    let expected_ts = 960 * 129 + ((at - last_at).as_micros() as u64 * 48 / 1000) as u32;
    assert_eq!(
        sr.rtp_time, expected_ts,
        "the RTP time of the report's NTP time"
    );
    assert_eq!(sr.ntp_time, ntp(at));
    let sr1 = pkts[1]
        .as_any()
        .downcast_ref::<rtcp::sender_report::SenderReport>()
        .expect("the second track's SR next");
    assert_ne!(sr1.ssrc, SSRC);
    assert_eq!((sr1.packet_count, sr1.octet_count), (1, 40));
    assert_eq!(sr1.ntp_time, ntp(at));
    let sdes = pkts[2]
        .as_any()
        .downcast_ref::<rtcp::source_description::SourceDescription>()
        .expect("then one SDES");
    let named: Vec<u32> = sdes.chunks.iter().map(|c| c.source).collect();
    assert_eq!(named, [SSRC, sr1.ssrc], "it names both sources");
    assert!(sdes.chunks.iter().all(|c| c.items[0].text == "chorus"));
    assert_eq!(pkts.len(), 3);
    // The next interval's report takes the next SRTCP index.
    out.clear();
    e.handle_timeout(at + REPORT_INTERVAL, &mut scratch, &stats, &mut out)
        .unwrap();
    let mut second = out[0].1.clone();
    assert_eq!(
        opener.open(&mut second).unwrap().1,
        1,
        "one index per SRTCP packet"
    );
}

fn sealed_from_viewer(index: u32, pkts: &[Box<dyn Packet + Send + Sync>]) -> Vec<u8> {
    let (sealer, _) = viewer_srtcp();
    let mut buf = rtcp::packet::marshal(pkts).unwrap().to_vec();
    assert!(sealer.seal(&mut buf, index));
    buf
}

#[test]
fn a_nack_is_answered_with_the_packets_from_the_history() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    // Across a rollover: 65530..65550 extended.
    for s in 65_530u64..65_550 {
        send(&mut e, t0, 0, s, &mut out);
    }
    let originals: Vec<Vec<u8>> = out.drain(..).map(|(_, d)| d).collect();
    let nack = rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack {
        sender_ssrc: VIEWER_SSRC,
        media_ssrc: SSRC,
        nacks: vec![
            // 65535 and 0 (= 65536) and 2 (= 65538).
            rtcp::transport_feedbacks::transport_layer_nack::NackPair {
                packet_id: 65_535,
                lost_packets: 0b101,
            },
            // Too old (out of the history).
            rtcp::transport_feedbacks::transport_layer_nack::NackPair {
                packet_id: 65_530,
                lost_packets: 0,
            },
        ],
    };
    let datagram = sealed_from_viewer(0, &[Box::new(nack.clone())]);
    e.handle_rtcp(&datagram, &mut scratch, &stats, &mut out);
    let resent: Vec<&Vec<u8>> = out.iter().map(|(_, d)| d).collect();
    let want: Vec<&Vec<u8>> = [65_535usize, 65_536, 65_538]
        .iter()
        .map(|s| &originals[s - 65_530])
        .collect();
    assert_eq!(
        resent, want,
        "the very packets, sealed with their own index"
    );
    assert_eq!(stats.nack_requested.load(Ordering::Relaxed), 4);
    assert_eq!(stats.nack_resent.load(Ordering::Relaxed), 3);
    assert_eq!(stats.nack_missed.load(Ordering::Relaxed), 1);
    // The same datagram again is a replay; fresh NACKs for the same packets are answered
    // until MAX_RESENDS.
    e.handle_rtcp(&datagram, &mut scratch, &stats, &mut out);
    assert_eq!(stats.unauthenticated.load(Ordering::Relaxed), 1);
    for i in 1..=3 {
        let d = sealed_from_viewer(i, &[Box::new(nack.clone())]);
        e.handle_rtcp(&d, &mut scratch, &stats, &mut out);
    }
    assert_eq!(
        stats.nack_resent.load(Ordering::Relaxed),
        3 * MAX_RESENDS as u64
    );
}

#[test]
fn receiver_reports_and_plis_are_counted() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let rr = |lost: u32| rtcp::receiver_report::ReceiverReport {
        ssrc: VIEWER_SSRC,
        reports: vec![
            rtcp::reception_report::ReceptionReport {
                ssrc: SSRC,
                fraction_lost: 10,
                total_lost: lost,
                ..Default::default()
            },
            rtcp::reception_report::ReceptionReport {
                ssrc: 999,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let pli = rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
        sender_ssrc: VIEWER_SSRC,
        media_ssrc: SSRC,
    };
    e.handle_rtcp(
        &sealed_from_viewer(0, &[Box::new(rr(3)), Box::new(pli)]),
        &mut scratch,
        &stats,
        &mut out,
    );
    e.handle_rtcp(
        &sealed_from_viewer(1, &[Box::new(rr(5))]),
        &mut scratch,
        &stats,
        &mut out,
    );
    assert_eq!(
        stats.rr_blocks.load(Ordering::Relaxed),
        2,
        "only blocks about our tracks"
    );
    assert_eq!(stats.rr_lost.load(Ordering::Relaxed), 5);
    assert_eq!(stats.pli.load(Ordering::Relaxed), 1);
    assert!(out.is_empty());
}

/// The peer set ends str0m's DTLS grace at the first `true` (`rtc::peers`): only the viewer's
/// own, fresh SRTCP may say so.
#[test]
fn only_the_viewers_fresh_srtcp_is_authentic() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let rr = rtcp::receiver_report::ReceiverReport {
        ssrc: VIEWER_SSRC,
        ..Default::default()
    };
    let sealed = |i| sealed_from_viewer(i, &[Box::new(rr.clone())]);
    let first = sealed(0);
    assert!(e.handle_rtcp(&first, &mut scratch, &stats, &mut out));
    assert!(
        !e.handle_rtcp(&first, &mut scratch, &stats, &mut out),
        "a replay"
    );
    let (_, ours) = viewer_srtcp();
    let mut wrong = vec![0x80, RR, 0, 1, 0, 0, 0, 1];
    assert!(ours.seal(&mut wrong, 1));
    assert!(
        !e.handle_rtcp(&wrong, &mut scratch, &stats, &mut out),
        "our own key"
    );
    let mut flipped = sealed(2);
    let last = flipped.len() - 1;
    flipped[last - 4] ^= 1;
    assert!(
        !e.handle_rtcp(&flipped, &mut scratch, &stats, &mut out),
        "a flipped bit"
    );
    assert!(!e.handle_rtcp(&[0u8; 3000], &mut scratch, &stats, &mut out));
    // Authentic but not RTCP inside: still the viewer's, though counted as malformed.
    let (sealer, _) = viewer_srtcp();
    let mut inner = vec![0x80, RR, 0, 9, 0, 0, 0, 1];
    assert!(sealer.seal(&mut inner, 3));
    assert!(e.handle_rtcp(&inner, &mut scratch, &stats, &mut out));
    assert_eq!(stats.unauthenticated.load(Ordering::Relaxed), 3);
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
}

#[test]
fn garbage_is_counted_and_dropped() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    // Not authenticated: random bytes, a packet sealed with our own (the wrong) key.
    e.handle_rtcp(
        &[
            0x80, 201, 0, 1, 0, 0, 0, 1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
            9, 0x80, 0, 0, 0,
        ],
        &mut scratch,
        &stats,
        &mut out,
    );
    let (_, ours) = viewer_srtcp();
    let mut wrong = vec![0x80, RR, 0, 1, 0, 0, 0, 1];
    ours.seal(&mut wrong, 0);
    e.handle_rtcp(&wrong, &mut scratch, &stats, &mut out);
    e.handle_rtcp(&[0u8; 3000], &mut scratch, &stats, &mut out);
    assert_eq!(stats.unauthenticated.load(Ordering::Relaxed), 2);
    // Authenticated but not RTCP inside: a length past the end, a wrong version.
    let (sealer, _) = viewer_srtcp();
    for (i, mut inner) in [
        vec![0x80, RR, 0, 9, 0, 0, 0, 1],
        vec![0x40, RR, 0, 1, 0, 0, 0, 1],
        vec![0x81, RR, 0, 1, 0, 0, 0, 1],
    ]
    .into_iter()
    .enumerate()
    {
        sealer.seal(&mut inner, i as u32);
        e.handle_rtcp(&inner, &mut scratch, &stats, &mut out);
    }
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 4);
    assert!(out.is_empty());
    // A late handshake record and an alert are counted, never acted on.
    assert_eq!(e.handle_dtls(&[22, 0xfe, 0xfd], &stats), None);
    assert_eq!(e.handle_dtls(&[21, 0xfe, 0xfd], &stats), None);
    assert_eq!(stats.unexpected.load(Ordering::Relaxed), 2);
}

/// Found by reading for the fuzz target: a DTLS alert is unauthenticated once str0m is gone,
/// so one forged byte 21 from anyone who knows the 5-tuple ended the viewer.
#[test]
fn a_forged_dtls_alert_does_not_end_the_viewer() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    // close_notify as a DTLS 1.2 record of epoch 1 would carry it, but not sealed by anyone.
    let alert = [21, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 2, 1, 0];
    assert_eq!(e.handle_dtls(&alert, &stats), None);
    assert!(e.poll_timeout() > t0);
    assert_eq!(
        e.handle_timeout(
            t0 + Duration::from_millis(10),
            &mut scratch,
            &stats,
            &mut out
        ),
        Ok(())
    );
}

/// A viewer that closes says BYE in authenticated SRTCP: the next timeout ends it (at once:
/// its deadline is already past).
#[test]
fn an_authenticated_bye_ends_the_viewer_at_its_next_timeout() {
    let t0 = Instant::now();
    let mut e = lean(t0);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let bye = rtcp::goodbye::Goodbye {
        sources: vec![VIEWER_SSRC],
        reason: Bytes::new(),
    };
    let rr = rtcp::receiver_report::ReceiverReport {
        ssrc: VIEWER_SSRC,
        ..Default::default()
    };
    e.handle_rtcp(
        &sealed_from_viewer(0, &[Box::new(rr), Box::new(bye)]),
        &mut scratch,
        &stats,
        &mut out,
    );
    let t1 = t0 + Duration::from_millis(1);
    assert!(e.poll_timeout() <= t1);
    assert_eq!(
        e.handle_timeout(t1, &mut scratch, &stats, &mut out),
        Err(Ended::Closed)
    );
}

/// An SR's RTP time after a long silence at a high clock rate: computed in u128, no overflow.
#[test]
fn a_long_silence_at_a_high_clock_rate_does_not_overflow_the_report() {
    let t0 = Instant::now();
    let mut e = lean_one(
        TrackSpec {
            clock_rate: u32::MAX,
            ..spec(SSRC)
        },
        t0,
    );
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    send(&mut e, t0, 0, 1, &mut out);
    // Consent kept for two hours: elapsed µs times 2^32 is past u64.
    let req = binding_request("edge:view", &ice().local_pwd, false);
    let mut now = t0;
    for _ in 0..(2 * 3600 / 10) {
        now += Duration::from_secs(10);
        assert!(e.handle_stun(now, viewer_addr(), &req, &stats, &mut out));
    }
    assert_eq!(
        e.handle_timeout(now, &mut scratch, &stats, &mut out),
        Ok(())
    );
    assert_eq!(stats.sr_sent.load(Ordering::Relaxed), 1);
}

#[test]
fn only_aes_gcm_goes_lean() {
    let now = Instant::now();
    assert!(Established::new(
        ice(),
        &[0u8; 60],
        SrtpProfile::AES128_CM_SHA1_80,
        false,
        [spec(1)],
        viewer_addr(),
        now
    )
    .is_none());
    assert!(Established::new(
        ice(),
        &[0u8; 20],
        SrtpProfile::AEAD_AES_128_GCM,
        false,
        [spec(1)],
        viewer_addr(),
        now
    )
    .is_none());
}

/// A RED packet shaped for a viewer goes out in its two slices with the track's RED payload
/// type (the header is in the clear: SRTP encrypts the payload only); a track that did not
/// negotiate RED refuses it.
#[test]
fn a_red_payload_in_two_parts_goes_with_the_red_payload_type() {
    let now = Instant::now();
    let mut e = lean(now);
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    // A RED header byte, a block that is not sent, then the primary block.
    let data = Bytes::from_static(b"\x6fskipped-primary-opus");
    let parts = Parts::new(true, &data, 0..1, 9..data.len()).unwrap();
    assert!(e.send_rtp_parts(now, 0, 1, 960, false, None, parts, &mut scratch, &mut out));
    let (_, sealed) = out.last().unwrap();
    assert_eq!(sealed[1] & 0x7F, 63);
    let v = crate::media::rtp::RtpView::parse(sealed).unwrap();
    // 16 bytes of GCM tag after the payload.
    assert_eq!(v.payload().len(), 1 + 12 + 16);
    let plain = parts.with_red(false);
    assert!(e.send_rtp_parts(now, 0, 2, 1920, false, None, plain, &mut scratch, &mut out));
    assert_eq!(out.last().unwrap().1[1] & 0x7F, 111);

    let no_red = TrackSpec {
        red_pt: None,
        ..spec(SSRC)
    };
    let mut e = lean_one(no_red, now);
    assert!(!e.send_rtp_parts(now, 0, 1, 960, false, None, parts, &mut scratch, &mut out));
}

/// A RED packet stripped for a viewer (two slices of one datagram) comes back on a NACK byte
/// for byte: the history keeps the datagram and the slices' ranges, not a copy.
#[test]
fn a_nacked_packet_of_two_slices_is_sent_again_whole() {
    let now = Instant::now();
    let mut e = lean(now);
    let stats = RtcpStats::default();
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let data = Bytes::from_static(b"\x6fskipped-primary-opus");
    let parts = Parts::new(true, &data, 0..1, 9..data.len()).unwrap();
    assert!(e.send_rtp_parts(
        now,
        0,
        7,
        960,
        false,
        Some(3),
        parts,
        &mut scratch,
        &mut out
    ));
    let (_, original) = out.pop().unwrap();
    let nack = rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack {
        sender_ssrc: VIEWER_SSRC,
        media_ssrc: SSRC,
        nacks: vec![rtcp::transport_feedbacks::transport_layer_nack::NackPair {
            packet_id: 7,
            lost_packets: 0,
        }],
    };
    let datagram = sealed_from_viewer(0, &[Box::new(nack)]);
    e.handle_rtcp(&datagram, &mut scratch, &stats, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, original);
    assert_eq!(stats.nack_resent.load(Ordering::Relaxed), 1);
}

#[test]
fn parts_are_ranges_within_their_datagram() {
    let data = Bytes::from_static(b"0123456789");
    assert!(Parts::new(false, &data, 0..0, 0..10).is_some());
    assert!(Parts::new(true, &data, 0..1, 4..10).is_some());
    assert!(
        Parts::new(false, &data, 0..0, 0..11).is_none(),
        "past the end"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 5..4;
    assert!(Parts::new(false, &data, backwards, 0..10).is_none());
    let big = Bytes::from(vec![0u8; 70_000]);
    assert!(
        Parts::whole(&big).is_none(),
        "no relayed payload is over 64 KiB"
    );
    assert!(Parts::whole(&Bytes::new()).is_some());
}

#[test]
fn a_kept_packet_is_one_cache_line() {
    assert_eq!(std::mem::size_of::<Option<Kept>>(), 64);
    assert_eq!(std::mem::align_of::<Kept>(), 64);
}
