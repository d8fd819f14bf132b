//! The generator's own SRTP receive path for the viewers that measure latency.
//!
//! Feeding every packet of a sampled viewer to str0m (SRTP context, RTP parsing, its stream
//! state, one event per packet, an allocation for its payload) cost more than the rest of the
//! generator's per-packet work together. Once a sampled viewer's DTLS is up, its SRTP packets
//! skip str0m: the header is read here (seq and SSRC are in clear, and already counted by
//! [`super::counter`]), the payload opened with AES-GCM (RFC 7714) with the session key and salt
//! derived (RFC 3711 §4.3) from the keying material the DTLS tap
//! ([`crate::rtc::srtp_out::tapping_provider`]) reports, and matched to its send time as before.
//! A packet that fails to open is counted (`open_failed`), never matched. ICE, DTLS and RTCP stay
//! str0m's.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce};
use str0m::crypto::dtls::SrtpProfile;

use crate::rtc::srtp_out::session;

/// AES-GCM authentication tag at the end of every SRTP packet.
const TAG_LEN: usize = 16;
const SALT_LEN: usize = 12;

/// The receiving half of one peer's SRTP session (AEAD AES-GCM only).
pub(crate) struct SrtpIn {
    key: LessSafeKey,
    salt: [u8; SALT_LEN],
}

impl SrtpIn {
    /// From DTLS-SRTP keying material (RFC 5764 §4.2: client key, server key, client salt,
    /// server salt). `sender_is_client` says whose packets this opens. None for profiles other
    /// than AES-GCM (those peers stay on str0m's path).
    pub(crate) fn new(
        material: &[u8],
        profile: SrtpProfile,
        sender_is_client: bool,
    ) -> Option<SrtpIn> {
        let (key, salt) = session(material, profile, sender_is_client, 0x00)?;
        Some(SrtpIn { key, salt })
    }

    /// Opens the SRTP packet `packet` in place; returns its RTP payload (padding removed), or
    /// None when the packet is malformed or does not authenticate. `roc` is the sender's
    /// rollover counter for this packet's sequence number.
    pub(crate) fn open<'a>(&self, packet: &'a mut [u8], roc: u32) -> Option<&'a [u8]> {
        let header_len = rtp_header_len(packet)?;
        if packet.len() < header_len + TAG_LEN {
            return None;
        }
        let padded = packet[0] & 0x20 != 0;
        let mut iv = [0u8; SALT_LEN];
        iv[2..6].copy_from_slice(&packet[8..12]);
        iv[6..10].copy_from_slice(&roc.to_be_bytes());
        iv[10..12].copy_from_slice(&packet[2..4]);
        for (b, s) in iv.iter_mut().zip(self.salt) {
            *b ^= s;
        }
        let (header, body) = packet.split_at_mut(header_len);
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(&*header), body)
            .ok()?;
        if padded {
            let pad = *plain.last()? as usize;
            if pad == 0 || pad > plain.len() {
                return None;
            }
            let n = plain.len() - pad;
            return Some(&plain[..n]);
        }
        Some(plain)
    }
}

/// Length of the RTP header (fixed part, CSRCs, header extension), None when it does not fit.
pub(crate) fn rtp_header_len(p: &[u8]) -> Option<usize> {
    if p.len() < 12 {
        return None;
    }
    let mut len = 12 + 4 * (p[0] & 0x0f) as usize;
    if p[0] & 0x10 != 0 {
        let words = u16::from_be_bytes([*p.get(len + 2)?, *p.get(len + 3)?]) as usize;
        len += 4 + 4 * words;
    }
    (len <= p.len()).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtc::srtp_out::SrtpOut;

    fn material() -> Vec<u8> {
        (0..56u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect()
    }

    /// What the edge seals (its own independent implementation) opens here, with one-byte
    /// header extensions, CSRCs and padding; a flipped bit, a wrong ROC or the other side's key
    /// does not.
    #[test]
    fn opens_what_the_edge_seals_and_nothing_else() {
        let m = material();
        let edge = SrtpOut::new(&m, SrtpProfile::AEAD_AES_128_GCM, false).unwrap();
        let rx = SrtpIn::new(&m, SrtpProfile::AEAD_AES_128_GCM, false).unwrap();
        let wrong_side = SrtpIn::new(&m, SrtpProfile::AEAD_AES_128_GCM, true).unwrap();
        // V=2, X=1, CC=1, seq 0xfffe, ts, ssrc, one CSRC, a one-word extension.
        let mut header = vec![0x91, 111, 0xff, 0xfe, 0, 0, 3, 0xc0, 1, 2, 3, 4, 9, 9, 9, 9];
        header.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0xaa, 0, 0]);
        let payload: Vec<u8> = (0..90u8).collect();
        let mut packet = header.clone();
        packet.extend_from_slice(&payload);
        assert_eq!(rtp_header_len(&packet), Some(header.len()));
        assert!(edge.protect(&mut packet, header.len(), 3));
        assert_eq!(rx.open(&mut packet.clone(), 3), Some(&payload[..]));
        assert_eq!(rx.open(&mut packet.clone(), 2), None, "wrong ROC");
        assert_eq!(wrong_side.open(&mut packet.clone(), 3), None);
        let mut flipped = packet.clone();
        flipped[30] ^= 1;
        assert_eq!(rx.open(&mut flipped, 3), None);
        assert_eq!(rx.open(&mut packet[..20].to_vec(), 3), None, "truncated");

        // Padding (P bit): the last byte counts the padding bytes, removed from the payload.
        let mut padded = vec![0xa0, 111, 0, 1, 0, 0, 0, 1, 5, 6, 7, 8];
        padded.extend_from_slice(&[1, 2, 3, 0, 0, 3]);
        assert!(edge.protect(&mut padded, 12, 0));
        assert_eq!(rx.open(&mut padded, 0), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn refuses_what_it_cannot_open() {
        let m = material();
        assert!(SrtpIn::new(&m, SrtpProfile::AES128_CM_SHA1_80, false).is_none());
        assert!(SrtpIn::new(&m[..20], SrtpProfile::AEAD_AES_128_GCM, false).is_none());
        assert!(SrtpIn::new(&m, SrtpProfile::AEAD_AES_256_GCM, true).is_none());
        let m256: Vec<u8> = (0..88u8).collect();
        assert!(SrtpIn::new(&m256, SrtpProfile::AEAD_AES_256_GCM, true).is_some());
        assert_eq!(rtp_header_len(&[0x90; 13]), None, "extension past the end");
        assert_eq!(rtp_header_len(&[0x80; 11]), None);
    }
}
