//! An AES-GCM sealing key whose context sits where chorus can see it.
//!
//! aws-lc-rs keeps each key's `EVP_AEAD_CTX` (the AES round keys and the GHASH table, 584
//! bytes) in an allocation of its own behind a private pointer. A viewer's key is read once
//! per packet sent to it, a thousand other viewers' keys apart, so its lines are always cold:
//! in a profile of the edge's steady 1000-viewer step the first touch of that context was the
//! costliest instruction of the lean path. Here the context is a `Box` chorus owns, so the
//! media thread can prefetch it a few writes ahead (`Established::prefetch_track`). It is the
//! same aws-lc code underneath (the `aws-lc-sys` that aws-lc-rs is built on); the RTCP keys,
//! read once a second, stay on aws-lc-rs.

use std::mem::MaybeUninit;

use aws_lc_sys::{
    EVP_AEAD_CTX_cleanup, EVP_AEAD_CTX_init, EVP_AEAD_CTX_seal_scatter, EVP_AEAD_CTX_zero,
    EVP_aead_aes_128_gcm, EVP_aead_aes_256_gcm, EVP_AEAD_CTX,
};

use crate::prefetch::prefetch_span;

/// The AES-GCM tag every seal appends (SRTP and SRTCP alike).
pub(crate) const TAG_LEN: usize = 16;
/// The nonce (IV) length.
pub(crate) const NONCE_LEN: usize = 12;

/// An AES-128-GCM or AES-256-GCM key (by the key's length), for sealing only.
pub(crate) struct SealKey {
    // Boxed and never moved out: aws-lc aligns the state inside the context by its address
    // when the key is set up.
    ctx: Box<EVP_AEAD_CTX>,
}

// SAFETY: the context is plain memory that only the key's owner touches (sealing reads it,
// `Drop` frees it); aws-lc keeps no thread-local or shared state for it.
unsafe impl Send for SealKey {}

impl SealKey {
    /// A key of 16 bytes (AES-128-GCM) or 32 (AES-256-GCM); None for any other length, or if
    /// aws-lc refuses it.
    pub(crate) fn new(key: &[u8]) -> Option<SealKey> {
        // SAFETY: these return pointers to aws-lc's static algorithm descriptions.
        let aead = match key.len() {
            16 => unsafe { EVP_aead_aes_128_gcm() },
            32 => unsafe { EVP_aead_aes_256_gcm() },
            _ => return None,
        };
        let mut ctx: Box<MaybeUninit<EVP_AEAD_CTX>> = Box::new_uninit();
        // SAFETY: `ctx` is valid for writes of an EVP_AEAD_CTX; zero makes it one that init
        // fills and cleanup accepts; the key slice is valid for `key.len()` bytes.
        let ok = unsafe {
            EVP_AEAD_CTX_zero(ctx.as_mut_ptr());
            EVP_AEAD_CTX_init(
                ctx.as_mut_ptr(),
                aead,
                key.as_ptr(),
                key.len(),
                TAG_LEN,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: zeroed then initialised (or left as zeroed, which cleanup accepts).
        let ctx = unsafe { ctx.assume_init() };
        let key = SealKey { ctx };
        (ok == 1).then_some(key)
    }

    /// Encrypts `in_out` in place with `aad` authenticated alongside, and writes the tag to
    /// `tag`. False if aws-lc refuses (it does not for the lengths of an RTP packet).
    pub(crate) fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &mut [u8; TAG_LEN],
    ) -> bool {
        let mut tag_len = 0usize;
        // SAFETY: the context was initialised in `new`; `in_out` is both the input and the
        // output (aws-lc allows them to alias exactly); every pointer is valid for the length
        // passed with it, and the tag buffer for TAG_LEN bytes.
        let ok = unsafe {
            EVP_AEAD_CTX_seal_scatter(
                &*self.ctx,
                in_out.as_mut_ptr(),
                tag.as_mut_ptr(),
                &mut tag_len,
                TAG_LEN,
                nonce.as_ptr(),
                NONCE_LEN,
                in_out.as_ptr(),
                in_out.len(),
                std::ptr::null(),
                0,
                aad.as_ptr(),
                aad.len(),
            )
        };
        ok == 1 && tag_len == TAG_LEN
    }

    /// Starts loading the context's lines (see [`crate::prefetch`]).
    pub(crate) fn prefetch(&self) {
        let start = &*self.ctx as *const EVP_AEAD_CTX as *const u8;
        prefetch_span(start, size_of::<EVP_AEAD_CTX>(), usize::MAX);
    }
}

impl Drop for SealKey {
    fn drop(&mut self) {
        // SAFETY: initialised (or zeroed) in `new`, cleaned up once, here.
        unsafe { EVP_AEAD_CTX_cleanup(&mut *self.ctx) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};

    /// aws-lc-rs, the same library through its safe API, is the oracle.
    #[test]
    fn seals_as_aws_lc_rs_does() {
        for (alg, len) in [(&AES_128_GCM, 16usize), (&AES_256_GCM, 32)] {
            let key: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let ours = SealKey::new(&key).unwrap();
            let theirs = LessSafeKey::new(UnboundKey::new(alg, &key).unwrap());
            for n in [0usize, 1, 15, 16, 17, 100, 1200] {
                let nonce = [n as u8; NONCE_LEN];
                let aad = [0x80u8, 111, 0, 1, 0, 0, 3, 192, 1, 2, 3, 4];
                let plain: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
                let mut a = plain.clone();
                let mut tag = [0u8; TAG_LEN];
                assert!(ours.seal(&nonce, &aad, &mut a, &mut tag));
                let mut b = plain.clone();
                let t = theirs
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut b,
                    )
                    .unwrap();
                assert_eq!(a, b, "{len}-byte key, {n}-byte payload");
                assert_eq!(&tag[..], t.as_ref());
            }
        }
    }

    #[test]
    fn only_aes_gcm_key_lengths() {
        assert!(SealKey::new(&[0; 16]).is_some());
        assert!(SealKey::new(&[0; 32]).is_some());
        for len in [0, 15, 24, 33] {
            assert!(SealKey::new(&vec![0; len]).is_none(), "{len} bytes");
        }
    }
}
