//! Minimal Ogg (RFC 3533) demuxer for Ogg Opus files (RFC 7845): one logical stream, packets out.

use std::fmt;

use crate::recording::ogg::crc32;

/// An Ogg Opus file that cannot be read (byte offsets are of the page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OggError {
    /// No "OggS" capture pattern where a page should start.
    BadCapture(usize),
    /// A page runs past the end of the file.
    Truncated(usize),
    /// A page fails its CRC.
    BadChecksum(usize),
    /// The first packet is not an OpusHead.
    NotOpus,
    /// An OpusHead version this reader does not know.
    UnsupportedVersion(u8),
}

impl fmt::Display for OggError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OggError::BadCapture(at) => write!(f, "no Ogg page at byte {at}"),
            OggError::Truncated(at) => write!(f, "Ogg page at byte {at} is truncated"),
            OggError::BadChecksum(at) => write!(f, "Ogg page at byte {at} fails its CRC"),
            OggError::NotOpus => write!(f, "not an Ogg Opus file (no OpusHead)"),
            OggError::UnsupportedVersion(v) => write!(f, "OpusHead version {v} is not supported"),
        }
    }
}

impl std::error::Error for OggError {}

/// The audio packets of an Ogg Opus file (after OpusHead and OpusTags), and its pre-skip.
#[derive(Debug, Clone)]
pub struct OggOpus {
    // The header's fields: replay needs only the packets, the ogg_reader fuzz target checks these.
    /// OpusHead's channel count.
    pub channels: u8,
    /// OpusHead's pre-skip (samples at 48 kHz).
    pub pre_skip: u16,
    /// The Opus packets, in order.
    pub packets: Vec<Vec<u8>>,
}

/// An Ogg Opus file: OpusHead first (version 0.x), OpusTags skipped, then the audio packets.
pub fn read_ogg_opus(data: &[u8]) -> Result<OggOpus, OggError> {
    let packets = read_packets(data)?;
    let head = packets.first().ok_or(OggError::NotOpus)?;
    if head.len() < 19 || &head[..8] != b"OpusHead" {
        return Err(OggError::NotOpus);
    }
    if head[8] >> 4 != 0 {
        return Err(OggError::UnsupportedVersion(head[8]));
    }
    let channels = head[9];
    let pre_skip = u16::from_le_bytes([head[10], head[11]]);
    let audio_from = match packets.get(1) {
        Some(p) if p.starts_with(b"OpusTags") => 2,
        _ => 1,
    };
    Ok(OggOpus {
        channels,
        pre_skip,
        packets: packets.into_iter().skip(audio_from).collect(),
    })
}

/// All packets of all pages, in order, with continued packets joined across pages.
pub fn read_packets(data: &[u8]) -> Result<Vec<Vec<u8>>, OggError> {
    let mut out = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < data.len() {
        if data.len() - at < 27 {
            return Err(OggError::Truncated(at));
        }
        if &data[at..at + 4] != b"OggS" {
            return Err(OggError::BadCapture(at));
        }
        let nseg = data[at + 26] as usize;
        let table_end = at + 27 + nseg;
        if table_end > data.len() {
            return Err(OggError::Truncated(at));
        }
        let body_len: usize = data[at + 27..table_end].iter().map(|&s| s as usize).sum();
        let end = table_end + body_len;
        if end > data.len() {
            return Err(OggError::Truncated(at));
        }
        let stored =
            u32::from_le_bytes([data[at + 22], data[at + 23], data[at + 24], data[at + 25]]);
        if crc32(&data[at..end], 22) != stored {
            return Err(OggError::BadChecksum(at));
        }
        let mut p = table_end;
        for &seg in &data[at + 27..table_end] {
            partial.extend_from_slice(&data[p..p + seg as usize]);
            p += seg as usize;
            if seg < 255 {
                out.push(std::mem::take(&mut partial));
            }
        }
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds one Ogg page holding `packets` (each < 255 bytes for simplicity).
    fn page(seq: u32, packets: &[&[u8]]) -> Vec<u8> {
        let mut p = b"OggS".to_vec();
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&seq.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.push(packets.len() as u8);
        p.extend(packets.iter().map(|x| x.len() as u8));
        for x in packets {
            p.extend_from_slice(x);
        }
        let c = crc32(&p, 22);
        p[22..26].copy_from_slice(&c.to_le_bytes());
        p
    }

    fn head() -> Vec<u8> {
        let mut h = b"OpusHead".to_vec();
        h.extend_from_slice(&[1, 1, 0x38, 1, 0x80, 0xBB, 0, 0, 0, 0, 0]);
        h
    }

    #[test]
    fn reads_packets_and_checks_crc() {
        let mut f = page(0, &[&head()]);
        f.extend(page(1, &[b"OpusTags\0\0\0\0\0\0\0\0"]));
        f.extend(page(2, &[&[0x78, 1, 2], &[0x78, 3]]));
        let o = read_ogg_opus(&f).unwrap();
        assert_eq!((o.channels, o.pre_skip), (1, 312));
        assert_eq!(o.packets, vec![vec![0x78, 1, 2], vec![0x78, 3]]);
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(read_ogg_opus(&bad), Err(OggError::BadChecksum(_))));
        assert!(matches!(
            read_ogg_opus(&f[..f.len() - 1]),
            Err(OggError::Truncated(_))
        ));
        assert!(matches!(
            read_ogg_opus(b"RIFF....................................."),
            Err(OggError::BadCapture(0))
        ));
        assert!(matches!(
            read_ogg_opus(&page(0, &[b"hello"])),
            Err(OggError::NotOpus)
        ));
    }

    #[test]
    fn reads_what_the_recorder_writes() {
        let out = crate::recording::ogg::sample_file();
        let o = read_ogg_opus(&out).expect("valid Ogg Opus");
        assert_eq!((o.channels, o.pre_skip), (1, 0));
        assert_eq!(o.packets.len(), 120);
        assert_eq!(o.packets[7].len(), 300);
        assert_eq!(o.packets[119], vec![0x78, 119]);
    }

    #[test]
    fn joins_a_packet_continued_over_255_byte_segments() {
        let big = vec![7u8; 300];
        let mut p = b"OggS".to_vec();
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&[0; 8 + 4 + 4 + 4]);
        p.extend_from_slice(&[2, 255, 45]);
        p.extend_from_slice(&big);
        let c = crc32(&p, 22);
        p[22..26].copy_from_slice(&c.to_le_bytes());
        assert_eq!(read_packets(&p).unwrap(), vec![big]);
    }
}
