//! A corpus speaker as plain RTP, for a server fed outside WebRTC (Janus's streaming
//! mountpoint ports): the same frames, the same 20 ms clock and per-source phase as a chorus
//! publisher, sent from one UDP socket with no SRTP, no extensions, and one buffer reused.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::media::rtp::{write_packet, HeaderFields};

/// One speaker's RTP stream to one address.
pub(crate) struct PlainFeed {
    pub source: usize,
    pub socket: UdpSocket,
    pub dest: SocketAddr,
    pt: u8,
    ssrc: u32,
    seq: u16,
    ts: u32,
    /// Frames sent since the common start.
    pub sent: u64,
    /// One frame's duration (the publishers' clock).
    period: Duration,
    /// Offset within the period, as publishers have it (sources are not aligned).
    phase: Duration,
}

impl PlainFeed {
    pub(crate) fn new(
        source: usize,
        sources: usize,
        socket: UdpSocket,
        dest: SocketAddr,
        pt: u8,
        period: Duration,
    ) -> PlainFeed {
        let n = sources.max(1) as u32;
        PlainFeed {
            source,
            socket,
            dest,
            pt,
            ssrc: rand::random(),
            seq: rand::random::<u16>() & 0x0FFF,
            ts: rand::random(),
            sent: 0,
            period,
            phase: period * (source as u32 % n) / n,
        }
    }

    /// When frame number `self.sent` is due.
    pub(crate) fn due(&self, t0: Instant) -> Instant {
        t0 + self.phase + self.period * self.sent as u32
    }

    /// Writes the next packet (carrying `payload`, `samples` long at 48 kHz) into `buf` (cleared; its capacity is reused) and
    /// returns its length; the caller sends it. The first packet has the marker bit (a talk
    /// spurt's start for a receiver).
    pub(crate) fn packet(&mut self, payload: &[u8], samples: u32, buf: &mut Vec<u8>) -> usize {
        let hdr = HeaderFields {
            payload_type: self.pt,
            sequence_number: self.seq,
            timestamp: self.ts,
            ssrc: self.ssrc,
            marker: self.sent == 0,
        };
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(samples);
        self.sent += 1;
        write_packet(buf, &hdr, &[], payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// What the feed writes parses as RTP: version 2, the payload type, the marker on the
    /// first packet only, consecutive sequence numbers, the timestamp advancing by the frame's
    /// samples, one SSRC, the payload untouched; and its frames keep a publisher's phase.
    #[test]
    fn packets_parse_as_consecutive_rtp() {
        use crate::media::rtp::RtpView;
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = sock.local_addr().unwrap();
        let frame = Duration::from_millis(20);
        let mut f = PlainFeed::new(1, 4, sock, dest, 111, frame);
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        for p in [&b"first"[..], b"second", b"third"] {
            let n = f.packet(p, 960, &mut buf);
            let v = RtpView::parse(&buf[..n]).unwrap();
            seen.push((
                v.payload_type(),
                v.marker(),
                v.sequence_number(),
                v.timestamp(),
                v.ssrc(),
                v.payload().to_vec(),
            ));
        }
        assert_eq!(f.sent, 3);
        assert!(seen.iter().all(|s| s.0 == 111 && s.4 == seen[0].4));
        assert_eq!(
            seen.iter().map(|s| s.1).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert_eq!(seen[1].2, seen[0].2.wrapping_add(1));
        assert_eq!(seen[2].3, seen[0].3.wrapping_add(1920));
        assert_eq!(seen[1].5, b"second");
        // Source 1 of 4 runs a quarter period after source 0, as its publisher would.
        let t0 = Instant::now();
        assert_eq!(f.due(t0), t0 + Duration::from_millis(5) + frame * 3);
    }
}
