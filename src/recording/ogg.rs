//! Ogg Opus (RFC 3533, RFC 7845) writing, sans-IO: packets in, whole pages out as bytes.
//!
//! One logical stream per file. Pages are cut every [`PACKETS_PER_PAGE`] packets (or when the
//! 255-segment table is full), so whoever writes them out flushes about once a second of audio
//! and a crash loses at most that much.

/// Packets per page: one second of 20 ms frames.
pub(crate) const PACKETS_PER_PAGE: usize = 50;

/// The serial number of the one logical stream (any value is valid for a single-stream file).
const SERIAL: u32 = 0x6368_6f72;

/// The page header's type flags.
const BOS: u8 = 0x02;
const EOS: u8 = 0x04;

/// Writes one Ogg Opus logical stream into caller-owned buffers.
#[derive(Debug)]
pub(crate) struct OggWriter {
    page_seq: u32,
    /// Samples (48 kHz) of every packet completed so far: the granule position.
    granule: u64,
    lacing: Vec<u8>,
    body: Vec<u8>,
    packets: usize,
}

impl OggWriter {
    /// A writer whose first pages (OpusHead, then OpusTags) are appended to `out` now.
    pub(crate) fn new(out: &mut Vec<u8>) -> OggWriter {
        let mut w = OggWriter {
            page_seq: 0,
            granule: 0,
            lacing: Vec::with_capacity(255),
            body: Vec::with_capacity(4096),
            packets: 0,
        };
        // Version 1, mono, pre-skip 0 (RTP carries no encoder delay), 48 kHz input, gain 0,
        // mapping family 0: what any Opus decoder plays.
        let mut head = b"OpusHead".to_vec();
        head.extend_from_slice(&[1, 1, 0, 0]);
        head.extend_from_slice(&48_000u32.to_le_bytes());
        head.extend_from_slice(&[0, 0, 0]);
        w.add(&head);
        w.emit(BOS, out);
        let vendor = b"chorus";
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes());
        w.add(&tags);
        w.emit(0, out);
        w
    }

    /// Adds one audio packet of `samples` (48 kHz); a full page is appended to `out`.
    pub(crate) fn push(&mut self, packet: &[u8], samples: u32, out: &mut Vec<u8>) {
        if self.lacing.len() + packet.len() / 255 + 1 > 255 {
            self.emit(0, out);
        }
        self.add(packet);
        self.granule += samples as u64;
        if self.packets >= PACKETS_PER_PAGE {
            self.emit(0, out);
        }
    }

    /// Appends the pending packets' page (if any) to `out`.
    pub(crate) fn flush(&mut self, out: &mut Vec<u8>) {
        if self.packets > 0 {
            self.emit(0, out);
        }
    }

    /// Appends the last page, marked end of stream (empty when nothing is pending).
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) {
        self.emit(EOS, out);
    }

    fn add(&mut self, packet: &[u8]) {
        let mut left = packet.len();
        while left >= 255 {
            self.lacing.push(255);
            left -= 255;
        }
        self.lacing.push(left as u8);
        self.body.extend_from_slice(packet);
        self.packets += 1;
    }

    fn emit(&mut self, flags: u8, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(b"OggS");
        out.push(0);
        out.push(flags);
        out.extend_from_slice(&self.granule.to_le_bytes());
        out.extend_from_slice(&SERIAL.to_le_bytes());
        out.extend_from_slice(&self.page_seq.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push(self.lacing.len() as u8);
        out.extend_from_slice(&self.lacing);
        out.extend_from_slice(&self.body);
        let crc = crc32(&out[start..], 22);
        out[start + 22..start + 26].copy_from_slice(&crc.to_le_bytes());
        self.page_seq += 1;
        self.lacing.clear();
        self.body.clear();
        self.packets = 0;
    }
}

/// A file of 120 frames (two full pages and 20 pending at the end), frame 7 of 300 bytes (laced
/// in two segments), frame k else `[0x78, k]`: what the tests of both ends read.
#[cfg(test)]
pub(crate) fn sample_file() -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = OggWriter::new(&mut out);
    for k in 0..120u32 {
        let p = if k == 7 {
            vec![0x78; 300]
        } else {
            vec![0x78, k as u8]
        };
        w.push(&p, 960, &mut out);
    }
    w.finish(&mut out);
    out
}

/// Ogg's CRC-32 (polynomial 0x04C11DB7, no reflection), with the 4-byte checksum field at
/// `crc_field_at` read as zero.
pub(crate) fn crc32(page: &[u8], crc_field_at: usize) -> u32 {
    let mut crc = 0u32;
    for (i, &b) in page.iter().enumerate() {
        let b = if (crc_field_at..crc_field_at + 4).contains(&i) {
            0
        } else {
            b
        };
        crc ^= (b as u32) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (flags, granule, page sequence) of every page, walking the headers.
    fn pages(data: &[u8]) -> Vec<(u8, u64, u32)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            assert_eq!(&data[at..at + 4], b"OggS", "page at {at}");
            let granule = u64::from_le_bytes(data[at + 6..at + 14].try_into().unwrap());
            let seq = u32::from_le_bytes(data[at + 18..at + 22].try_into().unwrap());
            let n = data[at + 26] as usize;
            let body: usize = data[at + 27..at + 27 + n].iter().map(|&s| s as usize).sum();
            out.push((data[at + 5], granule, seq));
            at += 27 + n + body;
        }
        out
    }

    #[test]
    fn headers_pages_granules_and_eos() {
        let out = sample_file();
        let p = pages(&out);
        assert_eq!(p.len(), 5);
        assert_eq!(p[0], (BOS, 0, 0));
        assert_eq!(p[1], (0, 0, 1));
        assert_eq!(p[2], (0, 50 * 960, 2));
        assert_eq!(p[3], (0, 100 * 960, 3));
        assert_eq!(p[4], (EOS, 120 * 960, 4));
    }

    #[test]
    fn a_full_segment_table_cuts_the_page_early_and_flush_ends_a_page() {
        let mut out = Vec::new();
        let mut w = OggWriter::new(&mut out);
        let headers = out.len();
        // 1300-byte packets take 6 segments: 42 fit one table, the 43rd starts a page.
        for _ in 0..42 {
            w.push(&[1; 1300], 960, &mut out);
        }
        assert_eq!(
            pages(&out[headers..]).len(),
            0,
            "42 packets, 252 segments: pending"
        );
        w.push(&[1; 1300], 960, &mut out);
        assert_eq!(pages(&out[headers..]), vec![(0, 42 * 960, 2)]);
        w.flush(&mut out);
        w.flush(&mut out);
        assert_eq!(
            pages(&out[headers..]).len(),
            2,
            "a second flush adds nothing"
        );
        w.finish(&mut out);
        assert_eq!(pages(&out[headers..]).len(), 3);
    }
}
