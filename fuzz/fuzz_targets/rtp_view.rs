//! `RtpView` on arbitrary bytes.
//!
//! 1. It never panics, and every accessor is self-consistent (lengths add up, extension elements
//!    stay inside the block, the iterator stops after an error, `extension(id)` agrees with it).
//! 2. It agrees with a small independent RFC 3550 / RFC 8285 reference written here (`spec`).
//! 3. In-place rewrite with `RtpHeaderMut` changes only the four fields and keeps the packet valid.
//! 4. Differential against webrtc-rs `rtp` 0.17 (`Packet::unmarshal`) on the subset where both
//!    parsers are meant to agree. Known, legitimate differences (the oracle is the lax side in
//!    every one of them) are excluded explicitly; see `oracle_walk` and `differential`.
#![no_main]

use bytes::Bytes;
use chorus::fuzzing::{
    parse_audio_level, RtpViewFuzz, ONE_BYTE_PROFILE, TWO_BYTE_PROFILE, TWO_BYTE_PROFILE_MASK,
};
use chorus::media::rtp::{ExtensionMalformed, RtpError, RtpHeaderMut, RtpView};
use libfuzzer_sys::fuzz_target;
use webrtc_util::marshal::Unmarshal;

fuzz_target!(|data: &[u8]| {
    let parsed = RtpView::parse(data);
    let reference = spec::parse(data);
    match (&parsed, &reference) {
        (Ok(v), Ok(r)) => {
            check_view(data, v);
            check_against_spec(v, r);
            check_rewrite(data, v);
        }
        (Err(e), Err(r)) => assert_eq!(e, r, "error kind differs from the reference"),
        _ => panic!(
            "chorus {parsed:?} vs reference {reference:?} on {}",
            hex(data)
        ),
    }
    differential(data, parsed.ok().as_ref());
});

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Accessor self-consistency.
fn check_view(data: &[u8], v: &RtpView<'_>) {
    assert!(std::ptr::eq(v.as_bytes(), data));
    let _ = format!("{v:?}");
    assert_eq!(v.payload_type(), data[1] & 0x7F);
    assert_eq!(v.marker(), data[1] & 0x80 != 0);
    let csrcs: Vec<u32> = v.csrcs().collect();
    assert_eq!(csrcs.len(), v.csrc_count());
    assert_eq!(
        v.header_len() + v.payload().len() + v.padding_len(),
        data.len()
    );
    assert_eq!(
        v.has_padding(),
        v.padding_len() > 0,
        "P bit set but no padding, or vice versa"
    );
    if v.has_padding() {
        assert_eq!(v.padding_len(), *data.last().unwrap() as usize);
    }
    let ext_len = match (v.extension_profile(), v.extension_data()) {
        (Some(_), Some(d)) => {
            assert_eq!(d.len() % 4, 0);
            4 + d.len()
        }
        (None, None) => 0,
        other => panic!("profile/data disagree: {other:?}"),
    };
    assert_eq!(v.header_len(), 12 + 4 * v.csrc_count() + ext_len);
    assert_eq!(v.extension_profile().is_some(), data[0] & 0x10 != 0);

    // Elements: inside the block, ids and lengths in range for the form, fused after an error.
    let block = v.extension_data().unwrap_or(&[]);
    let block_range = block.as_ptr_range();
    let form = v.extension_profile().map(|p| {
        if p == ONE_BYTE_PROFILE {
            1
        } else if p & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE {
            2
        } else {
            0
        }
    });
    let mut it = v.extensions();
    let mut seen: Vec<(u8, &[u8])> = Vec::new();
    let mut errored = false;
    for e in it.by_ref() {
        assert!(!errored, "extensions iterator continued after an error");
        match e {
            Ok((id, d)) => {
                let r = d.as_ptr_range();
                assert!(block_range.start <= r.start && r.end <= block_range.end);
                match form {
                    Some(1) => assert!((1..=14).contains(&id) && (1..=16).contains(&d.len())),
                    Some(2) => assert!(id >= 1 && d.len() <= 255),
                    _ => panic!("elements yielded for a non-RFC 8285 profile"),
                }
                let _ = parse_audio_level(d);
                seen.push((id, d));
            }
            Err(ExtensionMalformed) => errored = true,
        }
    }
    assert!(it.next().is_none());
    for id in 0..=255u8 {
        let first = seen.iter().find(|(i, _)| *i == id).map(|(_, d)| *d);
        assert_eq!(
            v.extension(id),
            first,
            "extension({id}) disagrees with the iterator"
        );
    }
}

fn check_against_spec(v: &RtpView<'_>, r: &spec::Packet<'_>) {
    assert_eq!(v.header_len(), r.header_len);
    assert_eq!(v.payload(), r.payload);
    assert_eq!(v.extension_profile(), r.profile);
    let got: Vec<_> = v.extensions().collect();
    assert_eq!(
        got, r.elements,
        "RFC 8285 elements differ from the reference"
    );
}

/// Rewrites the four forwarded fields in a copy and re-parses it.
fn check_rewrite(data: &[u8], v: &RtpView<'_>) {
    let mut buf = data.to_vec();
    let (seq, ts, ssrc, marker, pt) = (
        !v.sequence_number(),
        v.timestamp().rotate_left(7) ^ 0x5A5A_5A5A,
        !v.ssrc(),
        !v.marker(),
        v.payload_type() ^ 0x55,
    );
    {
        let mut h = RtpHeaderMut::new(&mut buf).expect("a parsed packet is rewritable");
        h.set_sequence_number(seq);
        h.set_timestamp(ts);
        h.set_ssrc(ssrc);
        h.set_marker(marker);
        h.set_payload_type(pt | 0x80); // the high bit must not leak into the marker
    }
    let w = RtpView::parse(&buf).expect("rewritten packet still parses");
    assert_eq!(
        (
            w.sequence_number(),
            w.timestamp(),
            w.ssrc(),
            w.marker(),
            w.payload_type()
        ),
        (seq, ts, ssrc, marker, pt & 0x7F)
    );
    assert_eq!(buf[0], data[0]);
    assert_eq!(&buf[12..], &data[12..]);
    assert_eq!(w.header_len(), v.header_len());
    assert_eq!(w.payload(), v.payload());
}

/// Independent reference, written from the RFC text rather than from chorus.
mod spec {
    use super::*;

    #[derive(Debug)]
    pub struct Packet<'a> {
        pub header_len: usize,
        pub profile: Option<u16>,
        pub payload: &'a [u8],
        pub elements: Vec<Result<(u8, &'a [u8]), ExtensionMalformed>>,
    }

    /// RFC 3550 §5.1 / §5.3.1 plus RFC 8285 §4.2 / §4.3. Checks in header order, so the first
    /// failing field decides the error (that is the order chorus documents).
    pub fn parse(b: &[u8]) -> Result<Packet<'_>, RtpError> {
        if b.len() < 12 {
            return Err(RtpError::TooShort);
        }
        if b[0] >> 6 != 2 {
            return Err(RtpError::BadVersion(b[0] >> 6));
        }
        let cc = (b[0] & 0x0F) as usize;
        let mut off = 12 + 4 * cc;
        if b.len() < off {
            return Err(RtpError::CsrcOverflow);
        }
        let mut profile = None;
        let mut block: &[u8] = &[];
        if b[0] & 0x10 != 0 {
            if b.len() < off + 4 {
                return Err(RtpError::ExtensionOverflow);
            }
            let p = u16::from_be_bytes([b[off], b[off + 1]]);
            let words = u16::from_be_bytes([b[off + 2], b[off + 3]]) as usize;
            if b.len() < off + 4 + 4 * words {
                return Err(RtpError::ExtensionOverflow);
            }
            profile = Some(p);
            block = &b[off + 4..off + 4 + 4 * words];
            off += 4 + 4 * words;
        }
        let mut end = b.len();
        if b[0] & 0x20 != 0 {
            // "The last octet of the padding contains a count of how many padding octets should
            // be ignored, including itself": so at least 1, and not into the header.
            let n = b[b.len() - 1] as usize;
            if n == 0 || n > b.len() - off {
                return Err(RtpError::BadPadding);
            }
            end -= n;
        }
        let elements = match profile {
            Some(ONE_BYTE_PROFILE) => one_byte(block),
            Some(p) if p >> 4 == 0x100 => two_byte(block),
            _ => Vec::new(),
        };
        Ok(Packet {
            header_len: off,
            profile,
            payload: &b[off..end],
            elements,
        })
    }

    fn one_byte(d: &[u8]) -> Vec<Result<(u8, &[u8]), ExtensionMalformed>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < d.len() {
            let (id, len) = (d[i] >> 4, (d[i] & 0x0F) as usize + 1);
            // §4.2: the byte 0x00 is padding. A byte with ID 0 but a non-zero length nibble is
            // neither a valid element nor padding; chorus (and this reference) stop reading the
            // block there, as libwebrtc does.
            if d[i] == 0 {
                i += 1;
                continue;
            }
            if id == 0 {
                break;
            }
            // §4.2: ID 15: stop, keep only the elements before it.
            if id == 15 {
                break;
            }
            if i + 1 + len > d.len() {
                out.push(Err(ExtensionMalformed));
                break;
            }
            out.push(Ok((id, &d[i + 1..i + 1 + len])));
            i += 1 + len;
        }
        out
    }

    fn two_byte(d: &[u8]) -> Vec<Result<(u8, &[u8]), ExtensionMalformed>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < d.len() {
            if d[i] == 0 {
                i += 1; // §4.3: padding
                continue;
            }
            if i + 2 > d.len() {
                out.push(Err(ExtensionMalformed));
                break;
            }
            let len = d[i + 1] as usize;
            if i + 2 + len > d.len() {
                out.push(Err(ExtensionMalformed));
                break;
            }
            out.push(Ok((d[i], &d[i + 2..i + 2 + len])));
            i += 2 + len;
        }
        out
    }
}

/// How rtp 0.17.2 `Header::unmarshal` walks an extension block (mirrored from its source):
/// it reads elements from the whole remaining packet, not just the block, so it can panic
/// (`Bytes::copy_to_bytes` / `get_u8` past the end) or stop somewhere other than the block end.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum OracleWalk {
    /// Would panic inside the oracle: do not call it.
    Panics,
    Ends {
        /// The walk ended exactly at the block end. If not, either an element overran the block
        /// (the oracle swallows payload bytes into it) or ID 15 stopped it (the oracle `break`s
        /// without skipping the rest of the block, which then becomes "payload"). Payload and
        /// padding are then not comparable.
        aligned: bool,
        /// A one-byte element with ID 0 and a non-zero length nibble was seen: the oracle keeps
        /// it as element id 0 with 1..16 data bytes, chorus stops reading there, so the element
        /// lists are not comparable.
        id0: bool,
    },
}

fn oracle_walk(data: &[u8], profile: u16, start: usize, end: usize) -> OracleWalk {
    let mut off = start;
    let mut id0 = false;
    match profile {
        ONE_BYTE_PROFILE => {
            while off < end {
                let b = data[off];
                off += 1;
                if b == 0 {
                    continue;
                }
                let len = (b & 0x0F) as usize + 1;
                if b >> 4 == 15 {
                    break;
                }
                id0 |= b >> 4 == 0;
                if off + len > data.len() {
                    return OracleWalk::Panics;
                }
                off += len;
            }
        }
        TWO_BYTE_PROFILE => {
            while off < end {
                let b = data[off];
                off += 1;
                if b == 0 {
                    continue;
                }
                let Some(&len) = data.get(off) else {
                    return OracleWalk::Panics;
                };
                off += 1;
                if off + len as usize > data.len() {
                    return OracleWalk::Panics;
                }
                off += len as usize;
            }
        }
        _ => off = end,
    }
    OracleWalk::Ends {
        aligned: off == end,
        id0,
    }
}

fn differential(data: &[u8], ours: Option<&RtpView<'_>>) {
    // Locate the extension block the way both parsers do (identical length checks) so the
    // oracle is only called when it cannot panic.
    let mut walk = OracleWalk::Ends {
        aligned: true,
        id0: false,
    };
    if data.len() >= 12 && data[0] & 0x10 != 0 {
        let at = 12 + 4 * (data[0] & 0x0F) as usize;
        if data.len() >= at + 4 {
            let profile = u16::from_be_bytes([data[at], data[at + 1]]);
            let words = u16::from_be_bytes([data[at + 2], data[at + 3]]) as usize;
            if data.len() >= at + 4 + 4 * words {
                walk = oracle_walk(data, profile, at + 4, at + 4 + 4 * words);
            }
        }
    }
    if walk == OracleWalk::Panics {
        // Only possible when an element overruns the block: chorus must report it (unless an
        // ID-0 byte, which the two parsers step over differently, is involved).
        if let Some(v) = ours {
            let has_id0 = v.extension_profile() == Some(ONE_BYTE_PROFILE)
                && v.extension_data()
                    .is_some_and(|d| d.iter().any(|&b| b != 0 && b >> 4 == 0));
            assert!(
                v.extensions().any(|e| e.is_err()) || has_id0,
                "oracle overruns the block but chorus sees no malformed element: {}",
                hex(data)
            );
        }
        return;
    }
    let mut raw = Bytes::copy_from_slice(data);
    let theirs = rtp::packet::Packet::unmarshal(&mut raw);

    let version = data.first().map(|b| b >> 6);
    let pad_zero = data.len() >= 12 && data[0] & 0x20 != 0 && data.last() == Some(&0);
    match (ours, &theirs) {
        (Some(v), Ok(p)) => compare(data, v, p, walk),
        (None, Err(_)) => {}
        (Some(v), Err(e)) => {
            // The oracle can only reject what chorus accepts when its misaligned extension walk
            // ate into the payload and the padding count then no longer fits.
            assert!(
                matches!(walk, OracleWalk::Ends { aligned: false, .. }) && v.has_padding(),
                "chorus accepts, oracle rejects ({e}): {}",
                hex(data)
            );
        }
        (None, Ok(p)) => {
            // Known: the oracle never checks the version (RFC 3550: V=2), and takes a padding
            // count of 0 as "no padding" (RFC 3550 §5.1: the count includes itself, so >= 1).
            // It may also accept after a misaligned walk moved its padding check.
            let explained = version != Some(2)
                || pad_zero
                || matches!(walk, OracleWalk::Ends { aligned: false, .. });
            assert!(
                explained,
                "oracle accepts ({:?}), chorus rejects ({:?}): {}",
                p.header,
                RtpView::parse(data).err(),
                hex(data)
            );
        }
    }
}

fn compare(data: &[u8], v: &RtpView<'_>, p: &rtp::packet::Packet, walk: OracleWalk) {
    let h = &p.header;
    let ctx = || hex(data);
    assert_eq!(h.version, 2, "{}", ctx());
    assert_eq!(h.padding, v.has_padding(), "{}", ctx());
    assert_eq!(h.marker, v.marker(), "{}", ctx());
    assert_eq!(h.payload_type, v.payload_type(), "{}", ctx());
    assert_eq!(h.sequence_number, v.sequence_number(), "{}", ctx());
    assert_eq!(h.timestamp, v.timestamp(), "{}", ctx());
    assert_eq!(h.ssrc, v.ssrc(), "{}", ctx());
    assert_eq!(h.csrc, v.csrcs().collect::<Vec<_>>(), "{}", ctx());
    assert_eq!(h.extension, v.extension_profile().is_some(), "{}", ctx());
    assert_eq!(
        h.extension_profile,
        v.extension_profile().unwrap_or(0),
        "{}",
        ctx()
    );

    let OracleWalk::Ends { aligned, id0 } = walk else {
        unreachable!("oracle not called when it would panic")
    };
    let ours_ok: Vec<(u8, &[u8])> = v.extensions().filter_map(Result::ok).collect();
    let ours_err = v.extensions().any(|e| e.is_err());
    let theirs: Vec<(u8, &[u8])> = h
        .extensions
        .iter()
        .map(|e| (e.id, &e.payload[..]))
        .collect();
    match v.extension_profile() {
        None => assert!(theirs.is_empty()),
        Some(ONE_BYTE_PROFILE | TWO_BYTE_PROFILE) if !id0 => {
            if aligned {
                assert!(
                    !ours_err,
                    "chorus reports a malformed element the oracle parsed: {}",
                    ctx()
                );
                assert_eq!(ours_ok, theirs, "RFC 8285 elements differ: {}", ctx());
            } else {
                // An element ran past the block (chorus: one Err; the oracle reads on into the
                // payload) or ID 15 stopped the walk. Either way the elements chorus yields
                // are exactly the oracle's leading ones.
                assert!(ours_ok.len() <= theirs.len(), "{}", ctx());
                assert_eq!(
                    ours_ok[..],
                    theirs[..ours_ok.len()],
                    "leading elements differ: {}",
                    ctx()
                );
            }
        }
        Some(ONE_BYTE_PROFILE | TWO_BYTE_PROFILE) => {} // id0: see OracleWalk
        Some(_) => {
            // The oracle recognises only 0xBEDE and exactly 0x1000. Any other profile, which
            // includes the RFC 8285 two-byte profiles with app bits (0x1001..=0x100F, RFC 8285
            // §4.3), comes back as one element id 0 holding the whole block. Compare the block.
            let block = v.extension_data().unwrap();
            assert_eq!(
                theirs,
                vec![(0u8, block)],
                "raw extension block differs: {}",
                ctx()
            );
        }
    }
    if aligned {
        assert_eq!(&p.payload[..], v.payload(), "payload differs: {}", ctx());
    }
}
