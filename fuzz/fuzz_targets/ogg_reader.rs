//! The Ogg Opus reader (`chorus::replay::ogg`) on arbitrary bytes.
//!
//! The first byte picks how the rest is used:
//! - as is: `read_packets` and `read_ogg_opus` never panic; errors point inside the input;
//! - with every page's CRC fixed up first (walking the pages as the reader does), so the fuzzer
//!   gets past the checksum: then no `BadChecksum`, and on success the packets are exactly the
//!   lacing of the pages (checked against a reference written here from RFC 3533: a segment of
//!   255 continues a packet, a shorter one ends it; a packet still open at the end is dropped),
//!   and `read_ogg_opus` agrees with `read_packets` (OpusHead first, OpusTags skipped).
#![no_main]

use chorus::replay::ogg::{read_ogg_opus, read_packets, OggError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(rest, false);
    } else {
        let mut fixed = rest.to_vec();
        fix_crcs(&mut fixed);
        check(&fixed, true);
    }
});

fn check(data: &[u8], crcs_fixed: bool) {
    let packets = read_packets(data);
    match &packets {
        Ok(p) => {
            let total: usize = p.iter().map(Vec::len).sum();
            assert!(total <= data.len());
            if crcs_fixed {
                assert_eq!(p, &reference(data), "lacing differs from the reference");
            }
        }
        Err(e) => {
            let at = match e {
                OggError::BadCapture(at) | OggError::Truncated(at) | OggError::BadChecksum(at) => {
                    *at
                }
                other => panic!("read_packets returned {other:?}"),
            };
            assert!(at < data.len(), "{e} in {} bytes", data.len());
            assert!(
                !(crcs_fixed && matches!(e, OggError::BadChecksum(_))),
                "CRC fixed yet {e}"
            );
        }
    }
    match read_ogg_opus(data) {
        Ok(o) => {
            let p = packets.expect("read_ogg_opus read what read_packets refused");
            assert!(p[0].starts_with(b"OpusHead") && p[0].len() >= 19);
            assert_eq!(o.channels, p[0][9]);
            assert_eq!(o.pre_skip, u16::from_le_bytes([p[0][10], p[0][11]]));
            let skip = if p.get(1).is_some_and(|t| t.starts_with(b"OpusTags")) {
                2
            } else {
                1
            };
            assert_eq!(o.packets, p[skip..]);
        }
        Err(e) => {
            if let Ok(p) = &packets {
                assert!(
                    matches!(e, OggError::NotOpus | OggError::UnsupportedVersion(_)),
                    "{e} after read_packets succeeded"
                );
                if let OggError::UnsupportedVersion(v) = e {
                    assert_eq!(v >> 4, p[0][8] >> 4);
                }
            }
        }
    }
}

/// Page boundaries as the reader walks them: (start, end of segment table, end of body).
fn pages(data: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len().saturating_sub(at) >= 27 && &data[at..at + 4] == b"OggS" {
        let nseg = usize::from(data[at + 26]);
        let table = at + 27 + nseg;
        if table > data.len() {
            break;
        }
        let end = table
            + data[at + 27..table]
                .iter()
                .map(|&s| usize::from(s))
                .sum::<usize>();
        if end > data.len() {
            break;
        }
        out.push((at, table, end));
        at = end;
    }
    out
}

fn fix_crcs(data: &mut [u8]) {
    for (at, _, end) in pages(data) {
        data[at + 22..at + 26].fill(0);
        let crc = crc32(&data[at..end]);
        data[at + 22..at + 26].copy_from_slice(&crc.to_le_bytes());
    }
}

/// RFC 3533's CRC-32: polynomial 0x04C11DB7, initial value 0, no reflection, no final xor.
fn crc32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |mut crc, &b| {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
        crc
    })
}

fn reference(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut open = Vec::new();
    for (at, table, _) in pages(data) {
        let mut body = table;
        for &len in &data[at + 27..table] {
            let len = usize::from(len);
            open.extend_from_slice(&data[body..body + len]);
            body += len;
            if len < 255 {
                out.push(std::mem::take(&mut open));
            }
        }
    }
    out
}
