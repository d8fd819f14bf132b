//! Zero-copy RTP (RFC 3550) view with RFC 8285 header extensions, and in-place header rewrite.
//!
//! `RtpView::parse` validates the fixed header, CSRC list, extension block and padding once, so
//! every accessor afterwards is a plain slice read that cannot fail or panic.

use std::fmt;

/// Why a datagram is not a usable RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header.
    TooShort,
    /// Version field is not 2.
    BadVersion(u8),
    /// The CSRC count points past the end of the packet.
    CsrcOverflow,
    /// The X bit is set but the extension header or its data runs past the end.
    ExtensionOverflow,
    /// P bit set with a padding count of zero or larger than what follows the header.
    BadPadding,
}

impl fmt::Display for RtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RtpError::TooShort => write!(f, "RTP packet shorter than the 12-byte header"),
            RtpError::BadVersion(v) => write!(f, "RTP version {v}, expected 2"),
            RtpError::CsrcOverflow => write!(f, "RTP CSRC list runs past the packet end"),
            RtpError::ExtensionOverflow => {
                write!(f, "RTP header extension runs past the packet end")
            }
            RtpError::BadPadding => write!(f, "RTP padding count is zero or exceeds the packet"),
        }
    }
}

impl std::error::Error for RtpError {}

/// RFC 8285 one-byte header extension profile.
pub(crate) const ONE_BYTE_PROFILE: u16 = 0xBEDE;
/// RFC 8285 two-byte header extension profile (the low 4 bits are app bits).
pub(crate) const TWO_BYTE_PROFILE_MASK: u16 = 0xFFF0;
pub(crate) const TWO_BYTE_PROFILE: u16 = 0x1000;

const FIXED_HEADER: usize = 12;

/// A validated, borrowed RTP packet.
#[derive(Clone, Copy)]
pub struct RtpView<'a> {
    buf: &'a [u8],
    /// Offset of the extension block header (profile, length), when the X bit is set.
    ext_at: Option<usize>,
    payload_at: usize,
    payload_end: usize,
}

impl fmt::Debug for RtpView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RtpView")
            .field("pt", &self.payload_type())
            .field("seq", &self.sequence_number())
            .field("ts", &self.timestamp())
            .field("ssrc", &self.ssrc())
            .field("marker", &self.marker())
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

impl<'a> RtpView<'a> {
    /// Validates the header, CSRCs, extension block and padding of `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        if buf.len() < FIXED_HEADER {
            return Err(RtpError::TooShort);
        }
        let version = buf[0] >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let csrc_count = (buf[0] & 0x0F) as usize;
        let mut at = FIXED_HEADER + 4 * csrc_count;
        if at > buf.len() {
            return Err(RtpError::CsrcOverflow);
        }
        let mut ext_at = None;
        if buf[0] & 0x10 != 0 {
            if at + 4 > buf.len() {
                return Err(RtpError::ExtensionOverflow);
            }
            let words = u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize;
            let end = at + 4 + 4 * words;
            if end > buf.len() {
                return Err(RtpError::ExtensionOverflow);
            }
            ext_at = Some(at);
            at = end;
        }
        let mut payload_end = buf.len();
        if buf[0] & 0x20 != 0 {
            let pad = buf[buf.len() - 1] as usize;
            if pad == 0 || at + pad > buf.len() {
                return Err(RtpError::BadPadding);
            }
            payload_end -= pad;
        }
        Ok(RtpView {
            buf,
            ext_at,
            payload_at: at,
            payload_end,
        })
    }

    /// The whole packet.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
    /// The M bit.
    pub fn marker(&self) -> bool {
        self.buf[1] & 0x80 != 0
    }
    /// The payload type (7 bits).
    pub fn payload_type(&self) -> u8 {
        self.buf[1] & 0x7F
    }
    /// The sequence number.
    pub fn sequence_number(&self) -> u16 {
        u16::from_be_bytes([self.buf[2], self.buf[3]])
    }
    /// The RTP timestamp.
    pub fn timestamp(&self) -> u32 {
        u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]])
    }
    /// The sender's SSRC.
    pub fn ssrc(&self) -> u32 {
        u32::from_be_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]])
    }
    /// The P bit.
    pub fn has_padding(&self) -> bool {
        self.buf[0] & 0x20 != 0
    }
    /// Bytes of padding at the end (0 when the P bit is clear).
    pub fn padding_len(&self) -> usize {
        self.buf.len() - self.payload_end
    }
    /// The CC field: how many CSRCs follow the fixed header.
    pub fn csrc_count(&self) -> usize {
        (self.buf[0] & 0x0F) as usize
    }
    /// The contributing sources' SSRCs.
    pub fn csrcs(&self) -> impl Iterator<Item = u32> + 'a {
        let buf = self.buf;
        (0..self.csrc_count()).map(move |i| {
            let o = FIXED_HEADER + 4 * i;
            u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]])
        })
    }
    /// The extension block's profile field (0xBEDE for one-byte elements), if the X bit is set.
    pub(crate) fn extension_profile(&self) -> Option<u16> {
        self.ext_at
            .map(|o| u16::from_be_bytes([self.buf[o], self.buf[o + 1]]))
    }
    /// The raw extension data after the 4-byte extension header.
    pub fn extension_data(&self) -> Option<&'a [u8]> {
        self.ext_at.map(|o| &self.buf[o + 4..self.payload_at])
    }
    /// RFC 8285 elements. Empty for profiles other than one-byte and two-byte.
    pub fn extensions(&self) -> Extensions<'a> {
        match (self.extension_profile(), self.extension_data()) {
            (Some(ONE_BYTE_PROFILE), Some(data)) => Extensions {
                data,
                at: 0,
                form: ExtForm::OneByte,
            },
            (Some(p), Some(data)) if p & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE => Extensions {
                data,
                at: 0,
                form: ExtForm::TwoByte,
            },
            _ => Extensions {
                data: &[],
                at: 0,
                form: ExtForm::OneByte,
            },
        }
    }
    /// The data of the first RFC 8285 element with this id, if present and well formed.
    pub fn extension(&self, id: u8) -> Option<&'a [u8]> {
        self.extensions()
            .map_while(Result::ok)
            .find(|(i, _)| *i == id)
            .map(|(_, d)| d)
    }
    /// Offset of the payload in the packet, i.e. the full header length.
    pub fn header_len(&self) -> usize {
        self.payload_at
    }
    /// The payload, without the padding.
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.payload_at..self.payload_end]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExtForm {
    OneByte,
    TwoByte,
}

/// An RFC 8285 element is malformed: its length runs past the extension block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionMalformed;

/// Iterator over RFC 8285 `(id, data)` elements. Yields one `Err` and stops on a malformed element.
pub struct Extensions<'a> {
    data: &'a [u8],
    at: usize,
    form: ExtForm,
}

impl<'a> Iterator for Extensions<'a> {
    type Item = Result<(u8, &'a [u8]), ExtensionMalformed>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let b = *self.data.get(self.at)?;
            match self.form {
                ExtForm::OneByte => {
                    let id = b >> 4;
                    if b == 0 {
                        // Padding byte between elements.
                        self.at += 1;
                        continue;
                    }
                    if id == 0 {
                        // ID 0 with a length is not padding (RFC 8285 §4.2): as libwebrtc
                        // does, stop reading the block there.
                        self.at = self.data.len();
                        return None;
                    }
                    if id == 15 {
                        // Reserved id: RFC 8285 says stop processing the block.
                        self.at = self.data.len();
                        return None;
                    }
                    let len = (b & 0x0F) as usize + 1;
                    let start = self.at + 1;
                    return Some(self.take(id, start, len));
                }
                ExtForm::TwoByte => {
                    if b == 0 {
                        self.at += 1;
                        continue;
                    }
                    let Some(&len) = self.data.get(self.at + 1) else {
                        self.at = self.data.len();
                        return Some(Err(ExtensionMalformed));
                    };
                    let start = self.at + 2;
                    return Some(self.take(b, start, len as usize));
                }
            }
        }
    }
}

impl<'a> Extensions<'a> {
    fn take(
        &mut self,
        id: u8,
        start: usize,
        len: usize,
    ) -> Result<(u8, &'a [u8]), ExtensionMalformed> {
        let end = start + len;
        if end > self.data.len() {
            self.at = self.data.len();
            return Err(ExtensionMalformed);
        }
        self.at = end;
        Ok((id, &self.data[start..end]))
    }
}

/// RFC 6464 client-to-mixer audio level: `(voice_activity_flag, level)` where level is -dBov,
/// 0 the loudest and 127 silence.
pub(crate) fn parse_audio_level(data: &[u8]) -> Option<(bool, u8)> {
    let b = *data.first()?;
    Some((b & 0x80 != 0, b & 0x7F))
}

/// The RFC 6464 extension byte for `(voice_activity_flag, level)`: the inverse of
/// [`parse_audio_level`].
pub fn audio_level_byte(voice: bool, level: u8) -> u8 {
    (voice as u8) << 7 | (level & 0x7F)
}

/// In-place rewrite of the fields an edge changes when it forwards a packet into another track.
pub struct RtpHeaderMut<'a> {
    buf: &'a mut [u8],
}

impl<'a> RtpHeaderMut<'a> {
    /// Checks only what the setters touch: the fixed header is present and the version is 2.
    pub fn new(buf: &'a mut [u8]) -> Result<Self, RtpError> {
        if buf.len() < FIXED_HEADER {
            return Err(RtpError::TooShort);
        }
        let version = buf[0] >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        Ok(RtpHeaderMut { buf })
    }
    /// Sets the M bit.
    #[inline]
    pub fn set_marker(&mut self, marker: bool) {
        self.buf[1] = (self.buf[1] & 0x7F) | if marker { 0x80 } else { 0 };
    }
    /// Sets the payload type (its low 7 bits).
    #[inline]
    pub fn set_payload_type(&mut self, pt: u8) {
        self.buf[1] = (self.buf[1] & 0x80) | (pt & 0x7F);
    }
    /// Sets the sequence number.
    #[inline]
    pub fn set_sequence_number(&mut self, seq: u16) {
        self.buf[2..4].copy_from_slice(&seq.to_be_bytes());
    }
    /// Sets the RTP timestamp.
    #[inline]
    pub fn set_timestamp(&mut self, ts: u32) {
        self.buf[4..8].copy_from_slice(&ts.to_be_bytes());
    }
    /// Sets the SSRC.
    #[inline]
    pub fn set_ssrc(&mut self, ssrc: u32) {
        self.buf[8..12].copy_from_slice(&ssrc.to_be_bytes());
    }
}

/// Writes an RTP header with one one-byte extension block holding the given elements, followed
/// by `payload`, into `out`. Returns the packet length. Used by packetizers and tests.
pub fn write_packet(
    out: &mut Vec<u8>,
    hdr: &HeaderFields,
    one_byte_exts: &[(u8, &[u8])],
    payload: &[u8],
) -> usize {
    out.clear();
    let x = if one_byte_exts.is_empty() { 0 } else { 0x10 };
    out.push(0x80 | x);
    out.push(if hdr.marker { 0x80 } else { 0 } | (hdr.payload_type & 0x7F));
    out.extend_from_slice(&hdr.sequence_number.to_be_bytes());
    out.extend_from_slice(&hdr.timestamp.to_be_bytes());
    out.extend_from_slice(&hdr.ssrc.to_be_bytes());
    if !one_byte_exts.is_empty() {
        let start = out.len();
        out.extend_from_slice(&ONE_BYTE_PROFILE.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        for (id, data) in one_byte_exts {
            debug_assert!((1..=14).contains(id) && (1..=16).contains(&data.len()));
            out.push((id << 4) | (data.len() as u8 - 1));
            out.extend_from_slice(data);
        }
        while !(out.len() - start - 4).is_multiple_of(4) {
            out.push(0);
        }
        let words = ((out.len() - start - 4) / 4) as u16;
        out[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out.len()
}

/// The header fields a packetizer chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFields {
    /// The payload type (7 bits).
    pub payload_type: u8,
    /// The sequence number.
    pub sequence_number: u16,
    /// The RTP timestamp.
    pub timestamp: u32,
    /// The SSRC.
    pub ssrc: u32,
    /// The M bit.
    pub marker: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_level_byte_is_what_parse_audio_level_reads() {
        for voice in [false, true] {
            for level in 0..=127u8 {
                let b = audio_level_byte(voice, level);
                assert_eq!(parse_audio_level(&[b]), Some((voice, level)));
            }
        }
        assert_eq!(
            audio_level_byte(false, 0xFF),
            0x7F,
            "the level cannot set the V flag"
        );
    }

    fn fields() -> HeaderFields {
        HeaderFields {
            payload_type: 111,
            sequence_number: 0xFFFE,
            timestamp: 0x1234_5678,
            ssrc: 0xDEAD_BEEF,
            marker: true,
        }
    }

    #[test]
    fn round_trips_header_and_one_byte_extensions() {
        let mut buf = Vec::new();
        write_packet(
            &mut buf,
            &fields(),
            &[(1, &[0x85]), (3, &[1, 2, 3])],
            b"opus",
        );
        let v = RtpView::parse(&buf).unwrap();
        assert_eq!(v.payload_type(), 111);
        assert_eq!(v.sequence_number(), 0xFFFE);
        assert_eq!(v.timestamp(), 0x1234_5678);
        assert_eq!(v.ssrc(), 0xDEAD_BEEF);
        assert!(v.marker());
        assert_eq!(v.payload(), b"opus");
        assert_eq!(v.extension(1), Some(&[0x85][..]));
        assert_eq!(v.extension(3), Some(&[1, 2, 3][..]));
        assert_eq!(v.extension(2), None);
        assert_eq!(parse_audio_level(v.extension(1).unwrap()), Some((true, 5)));
    }

    #[test]
    fn parses_two_byte_extensions_with_padding_and_empty_elements() {
        let mut p = vec![0x90, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2];
        // profile 0x1000, 3 words: [id 5 len 0] [pad] [id 20 len 3: a b c] [pad pad pad]
        p.extend_from_slice(&[0x10, 0x00, 0, 3]);
        p.extend_from_slice(&[5, 0, 0, 20, 3, b'a', b'b', b'c', 0, 0, 0, 0]);
        p.extend_from_slice(b"x");
        let v = RtpView::parse(&p).unwrap();
        let exts: Vec<_> = v.extensions().collect();
        assert_eq!(exts, vec![Ok((5, &[][..])), Ok((20, &b"abc"[..]))]);
        assert_eq!(v.payload(), b"x");
    }

    #[test]
    fn one_byte_id_15_stops_and_overflow_is_reported() {
        let mut p = vec![0x90, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xBE, 0xDE, 0, 1];
        p.extend_from_slice(&[0xF0, 0x10, 0xAA, 0]);
        let v = RtpView::parse(&p).unwrap();
        assert_eq!(v.extensions().count(), 0);
        p[16] = 0x13; // id 1, len 4: runs past the 4-byte block
        let v = RtpView::parse(&p).unwrap();
        assert_eq!(
            v.extensions().collect::<Vec<_>>(),
            vec![Err(ExtensionMalformed)]
        );
        assert_eq!(v.extension(1), None);
    }

    #[test]
    fn csrcs_and_padding() {
        let mut p = vec![
            0xA2, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 9,
        ];
        p.extend_from_slice(&[0xAB, 0xCD, 0, 0, 3]);
        let v = RtpView::parse(&p).unwrap();
        assert_eq!(v.csrcs().collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(v.payload(), &[0xAB, 0xCD]);
        assert_eq!(v.padding_len(), 3);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert_eq!(RtpView::parse(&[0x80; 11]).unwrap_err(), RtpError::TooShort);
        assert_eq!(
            RtpView::parse(&[0x40; 12]).unwrap_err(),
            RtpError::BadVersion(1)
        );
        assert_eq!(
            RtpView::parse(&[0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err(),
            RtpError::CsrcOverflow
        );
        let mut x = vec![
            0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE, 0, 2, 0, 0, 0, 0,
        ];
        assert_eq!(RtpView::parse(&x).unwrap_err(), RtpError::ExtensionOverflow);
        x.truncate(14);
        assert_eq!(RtpView::parse(&x).unwrap_err(), RtpError::ExtensionOverflow);
        let zero_pad = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(RtpView::parse(&zero_pad).unwrap_err(), RtpError::BadPadding);
        let big_pad = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3];
        assert_eq!(RtpView::parse(&big_pad).unwrap_err(), RtpError::BadPadding);
    }

    #[test]
    fn rewrite_in_place_keeps_everything_else() {
        let mut buf = Vec::new();
        write_packet(&mut buf, &fields(), &[(1, &[0x30])], b"payload");
        let before = buf.clone();
        let mut h = RtpHeaderMut::new(&mut buf).unwrap();
        h.set_sequence_number(7);
        h.set_timestamp(99);
        h.set_ssrc(42);
        h.set_marker(false);
        let v = RtpView::parse(&buf).unwrap();
        assert_eq!(
            (v.sequence_number(), v.timestamp(), v.ssrc(), v.marker()),
            (7, 99, 42, false)
        );
        assert_eq!(v.payload_type(), 111);
        assert_eq!(&buf[12..], &before[12..]);
    }
}
