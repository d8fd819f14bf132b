//! RFC 2198 redundant audio (RED) as Chrome sends it for Opus: a zero-copy layout of the blocks,
//! and the per-viewer shape of a forwarded packet (RED passed through, its stale redundancy
//! stripped after a switch, or the primary block alone as plain Opus).
//!
//! A RED payload is a list of block headers, then the blocks' data in the same order:
//!
//! ```text
//! redundant header (4 bytes): F=1 | block PT (7) | timestamp offset (14) | length (10)
//! primary header   (1 byte):  F=0 | block PT (7)
//! redundant data..., primary data
//! ```
//!
//! A redundant block's timestamp is the packet's minus its offset, so the offsets stay right
//! through any rewrite that shifts the packet's timestamp: only a block that points before the
//! track's current feed started (another source's audio, at that output time) must go.

use std::ops::Range;

/// The payload type of Opus on the origin-edge link, whatever a publisher negotiated: the origin
/// rewrites each packet's (and each RED block's) to it, so an edge needs no publisher's SDP.
pub const RELAY_OPUS_PT: u8 = 111;
/// The payload type of RED (of Opus) on the origin-edge link.
pub const RELAY_RED_PT: u8 = 63;

/// Blocks one RED packet may hold, the primary included: libwebrtc sends at most 9 redundant
/// encodings (1 or 2 by default), and a longer list is not redundancy worth forwarding.
pub const MAX_RED_BLOCKS: usize = 10;

/// Why a RED payload is not usable. Each is a counted drop, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RedError {
    /// No bytes at all, or the headers end before the primary's one-byte header.
    #[error("RED payload truncated in its block headers")]
    Truncated,
    /// More than [`MAX_RED_BLOCKS`] blocks.
    #[error("RED payload with more than {MAX_RED_BLOCKS} blocks")]
    TooManyBlocks,
    /// The redundant blocks' lengths run past the payload.
    #[error("RED block lengths run past the payload")]
    BlockOverflow,
    /// The primary block has no data.
    #[error("RED payload with an empty primary block")]
    EmptyPrimary,
    /// A block of another payload type than the stream's Opus (this edge only unwraps Opus).
    #[error("RED block of payload type {0}, not Opus")]
    NotOpus(u8),
}

/// Where the blocks of a validated RED payload are, relative to the payload's start. Plain data
/// (no allocation), parsed once per packet and shared by every viewer it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedLayout {
    /// Redundant blocks (the primary is not counted).
    redundant: u8,
    /// Each redundant block's timestamp offset, in header order.
    offsets: [u16; MAX_RED_BLOCKS - 1],
    /// Where each redundant block's data ends, in header order.
    ends: [u16; MAX_RED_BLOCKS - 1],
    /// The payload's length.
    len: u16,
    /// Not parsed: see [`RedLayout::opaque`].
    opaque: bool,
}

impl RedLayout {
    /// Validates `payload` as RED whose blocks are all of payload type `opus_pt`.
    pub fn parse(payload: &[u8], opus_pt: u8) -> Result<RedLayout, RedError> {
        let mut l = RedLayout {
            redundant: 0,
            offsets: [0; MAX_RED_BLOCKS - 1],
            ends: [0; MAX_RED_BLOCKS - 1],
            len: 0,
            opaque: false,
        };
        // Longer than any RTP payload the core forwards: no offset below overflows a u16.
        if payload.len() > u16::MAX as usize {
            return Err(RedError::BlockOverflow);
        }
        let mut at = 0;
        let mut lens = [0u16; MAX_RED_BLOCKS - 1];
        loop {
            let b = *payload.get(at).ok_or(RedError::Truncated)?;
            if b & 0x7F != opus_pt {
                return Err(RedError::NotOpus(b & 0x7F));
            }
            if b & 0x80 == 0 {
                break;
            }
            let h = payload.get(at..at + 4).ok_or(RedError::Truncated)?;
            let n = l.redundant as usize;
            if n == MAX_RED_BLOCKS - 1 {
                return Err(RedError::TooManyBlocks);
            }
            l.offsets[n] = (h[1] as u16) << 6 | (h[2] as u16) >> 2;
            lens[n] = ((h[2] & 0x03) as u16) << 8 | h[3] as u16;
            l.redundant += 1;
            at += 4;
        }
        let mut end = at + 1;
        for (len, e) in lens
            .iter()
            .zip(l.ends.iter_mut())
            .take(l.redundant as usize)
        {
            end += *len as usize;
            *e = end as u16;
        }
        if end > payload.len() {
            return Err(RedError::BlockOverflow);
        }
        if end == payload.len() {
            return Err(RedError::EmptyPrimary);
        }
        l.len = payload.len() as u16;
        Ok(l)
    }

    /// A RED payload whose blocks do not parse, taken whole: what an end-to-end encrypted RED
    /// payload looks like (Chrome's encoded transform may see the RED-wrapped frame, so the
    /// ciphertext covers the block headers). It passes untouched to viewers that negotiated RED
    /// (their transform decrypts it before their RED decoder splits it); a viewer without RED
    /// gets nothing of it ([`Shape::is_empty`]). `len` is the payload's length.
    pub fn opaque(len: usize) -> RedLayout {
        RedLayout {
            redundant: 0,
            offsets: [0; MAX_RED_BLOCKS - 1],
            ends: [0; MAX_RED_BLOCKS - 1],
            len: len.min(u16::MAX as usize) as u16,
            opaque: true,
        }
    }

    /// Whether it is [`opaque`](Self::opaque).
    pub fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// How many redundant blocks it carries.
    pub fn redundant(&self) -> usize {
        self.redundant as usize
    }

    /// The redundant blocks' timestamp offsets, in header order.
    pub fn offsets(&self) -> &[u16] {
        &self.offsets[..self.redundant as usize]
    }

    /// The primary block's data: the Opus frame this packet is about (the whole payload of an
    /// opaque one, as activity reads an encrypted Opus payload).
    pub fn primary(&self) -> Range<usize> {
        self.primary_start()..self.len as usize
    }

    fn primary_start(&self) -> usize {
        if self.opaque {
            return 0;
        }
        match self.redundant as usize {
            0 => 1,
            n => self.ends[n - 1] as usize,
        }
    }

    /// What goes to one viewer: RED if it negotiated RED, keeping only the redundant blocks that
    /// point no further back than `reach` samples (the audio its track carried of the current
    /// feed before this packet); otherwise the primary alone, as plain Opus.
    pub fn shape(&self, red: bool, reach: u32) -> Shape {
        if self.opaque {
            let all = if red { 0..self.len as usize } else { 0..0 };
            return Shape {
                red,
                head: 0..0,
                tail: all,
            };
        }
        if !red {
            return Shape {
                red: false,
                head: 0..0,
                tail: self.primary(),
            };
        }
        // Keep the blocks after the last one that reaches too far, so a kept block is never
        // older than a dropped one in the receiver's eyes (Chrome sends them oldest first).
        let n = self.redundant as usize;
        let keep_from = self
            .offsets()
            .iter()
            .rposition(|&o| o as u32 > reach)
            .map_or(0, |i| i + 1);
        if keep_from == 0 {
            return Shape {
                red: true,
                head: 0..0,
                tail: 0..self.len as usize,
            };
        }
        // The kept headers (and the primary's) are contiguous, and so is the kept data.
        let data_from = if keep_from == n {
            self.primary_start()
        } else {
            self.ends[keep_from - 1] as usize
        };
        Shape {
            red: true,
            head: 4 * keep_from..4 * n + 1,
            tail: data_from..self.len as usize,
        }
    }
}

/// One viewer's payload of a RED packet: `payload[head]` then `payload[tail]`, sent with the
/// viewer's RED payload type when `red`, else its Opus one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Send with the RED payload type.
    pub red: bool,
    /// The block headers that stay (empty when the payload passes whole, or unwrapped).
    pub head: Range<usize>,
    /// The data that stays, to the payload's end.
    pub tail: Range<usize>,
}

impl Shape {
    /// The shaped payload's length.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// True if it has no bytes (never, for a shape of a valid layout).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rewrites every block header's payload type of a validated RED payload to `pt` (the origin
/// putting a publisher's Opus PT into the relay's).
pub fn set_block_pts(payload: &mut [u8], layout: &RedLayout, pt: u8) {
    for i in 0..=layout.redundant as usize {
        let b = &mut payload[4 * i];
        *b = (*b & 0x80) | (pt & 0x7F);
    }
}

/// Writes a RED payload of `primary` and `redundant` (timestamp offset, data) blocks, oldest
/// first, into `out`: what Chrome sends. For tests, benches and the load generator.
pub fn write_red(out: &mut Vec<u8>, opus_pt: u8, redundant: &[(u16, &[u8])], primary: &[u8]) {
    out.clear();
    for (offset, data) in redundant {
        debug_assert!(*offset < 1 << 14 && data.len() < 1 << 10);
        let len = data.len() as u16;
        out.push(0x80 | opus_pt);
        out.push((offset >> 6) as u8);
        out.push(((offset & 0x3F) << 2) as u8 | (len >> 8) as u8);
        out.push(len as u8);
    }
    out.push(opus_pt & 0x7F);
    for (_, data) in redundant {
        out.extend_from_slice(data);
    }
    out.extend_from_slice(primary);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaped(payload: &[u8], s: &Shape) -> Vec<u8> {
        let mut v = payload[s.head.clone()].to_vec();
        v.extend_from_slice(&payload[s.tail.clone()]);
        v
    }

    #[test]
    fn parses_what_chrome_sends_and_unwraps_the_primary() {
        let mut p = Vec::new();
        write_red(&mut p, 111, &[(960, b"previous")], b"current!!");
        let l = RedLayout::parse(&p, 111).unwrap();
        assert_eq!((l.redundant(), l.offsets()), (1, &[960][..]));
        assert_eq!(&p[l.primary()], b"current!!");
        // A viewer without RED: the primary alone, plain Opus.
        let s = l.shape(false, u32::MAX);
        assert!(!s.red);
        assert_eq!(shaped(&p, &s), b"current!!");
        // A RED viewer deep into the feed: the whole payload, untouched.
        let s = l.shape(true, 960);
        assert_eq!(
            (s.red, s.head.clone(), s.tail.clone()),
            (true, 0..0, 0..p.len())
        );
        // A primary-only RED packet is valid too.
        write_red(&mut p, 111, &[], b"x");
        let l = RedLayout::parse(&p, 111).unwrap();
        assert_eq!((l.redundant(), &p[l.primary()]), (0, &b"x"[..]));
    }

    #[test]
    fn offsets_and_lengths_use_all_their_bits() {
        let big = vec![7u8; 1023];
        let mut p = Vec::new();
        write_red(&mut p, 111, &[(16383, &big)], b"p");
        let l = RedLayout::parse(&p, 111).unwrap();
        assert_eq!(l.offsets(), [16383]);
        assert_eq!(&p[l.primary()], b"p");
    }

    #[test]
    fn at_a_switch_only_blocks_of_the_current_feed_stay() {
        let mut p = Vec::new();
        write_red(
            &mut p,
            111,
            &[(1920, b"two-back"), (960, b"one-back")],
            b"now",
        );
        let l = RedLayout::parse(&p, 111).unwrap();
        // The first packet after a switch: no redundancy is the new source's.
        let s = l.shape(true, 0);
        let out = shaped(&p, &s);
        let again = RedLayout::parse(&out, 111).unwrap();
        assert_eq!((again.redundant(), &out[again.primary()]), (0, &b"now"[..]));
        // The second: the block one frame back is, the older one is not.
        let out = shaped(&p, &l.shape(true, 960));
        let again = RedLayout::parse(&out, 111).unwrap();
        assert_eq!(again.offsets(), [960]);
        assert_eq!(
            &out[again.ends[0] as usize - 8..again.ends[0] as usize],
            b"one-back"
        );
        assert_eq!(&out[again.primary()], b"now");
        // From the third on, everything passes.
        assert_eq!(l.shape(true, 1920).head, 0..0);
        // Out of order offsets: nothing older than a dropped block stays.
        write_red(&mut p, 111, &[(960, b"a"), (1920, b"b")], b"now");
        let l = RedLayout::parse(&p, 111).unwrap();
        let out = shaped(&p, &l.shape(true, 960));
        assert_eq!(RedLayout::parse(&out, 111).unwrap().redundant(), 0);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert_eq!(RedLayout::parse(&[], 111), Err(RedError::Truncated));
        // A redundant header cut short, and headers with no primary.
        assert_eq!(
            RedLayout::parse(&[0x80 | 111, 0, 0], 111),
            Err(RedError::Truncated)
        );
        assert_eq!(
            RedLayout::parse(&[0x80 | 111, 0, 0, 0], 111),
            Err(RedError::Truncated)
        );
        // A block length past the end.
        let mut p = Vec::new();
        write_red(&mut p, 111, &[(960, b"abcd")], b"xy");
        p.truncate(p.len() - 3);
        assert_eq!(RedLayout::parse(&p, 111), Err(RedError::BlockOverflow));
        // Nothing left for the primary.
        write_red(&mut p, 111, &[(960, b"abcd")], b"");
        assert_eq!(RedLayout::parse(&p, 111), Err(RedError::EmptyPrimary));
        // Another codec inside.
        write_red(&mut p, 0, &[], b"pcmu");
        assert_eq!(RedLayout::parse(&p, 111), Err(RedError::NotOpus(0)));
        // Too many blocks.
        let blocks: Vec<(u16, &[u8])> =
            (0..MAX_RED_BLOCKS as u16).map(|i| (i, &b"z"[..])).collect();
        write_red(&mut p, 111, &blocks, b"p");
        assert_eq!(RedLayout::parse(&p, 111), Err(RedError::TooManyBlocks));
        write_red(&mut p, 111, &blocks[1..], b"p");
        assert!(RedLayout::parse(&p, 111).is_ok());
    }

    #[test]
    fn every_prefix_and_every_byte_string_parses_or_errs() {
        let mut p = Vec::new();
        write_red(&mut p, 111, &[(1920, b"two"), (960, b"one")], b"primary");
        for cut in 0..=p.len() {
            if let Ok(l) = RedLayout::parse(&p[..cut], 111) {
                for reach in [0, 960, 1920] {
                    for red in [false, true] {
                        let s = l.shape(red, reach);
                        assert!(s.tail.end <= cut && s.head.end <= cut && !s.is_empty());
                    }
                }
            }
        }
    }

    #[test]
    fn an_opaque_payload_passes_whole_to_red_viewers_only() {
        let l = RedLayout::opaque(50);
        assert!(l.is_opaque());
        assert_eq!(l.primary(), 0..50);
        let s = l.shape(true, 0);
        assert_eq!((s.red, s.head, s.tail), (true, 0..0, 0..50));
        assert!(l.shape(false, u32::MAX).is_empty());
    }

    #[test]
    fn block_pts_are_rewritten_in_place() {
        let mut p = Vec::new();
        write_red(&mut p, 109, &[(960, b"one")], b"now");
        let l = RedLayout::parse(&p, 109).unwrap();
        set_block_pts(&mut p, &l, 111);
        let again = RedLayout::parse(&p, 111).unwrap();
        assert_eq!(
            (again.offsets(), &p[again.primary()]),
            (&[960][..], &b"now"[..])
        );
    }
}
