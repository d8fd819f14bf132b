//! Opus packet facts an edge can read without decoding: the TOC byte (RFC 6716 §3.1) and DTX.

/// Opus RTP clock rate (RFC 7587): always 48 kHz, whatever the coded bandwidth.
pub(crate) const CLOCK_RATE: u32 = 48_000;

/// A payload this small carries no speech: libopus DTX and comfort-noise frames are 1-3 bytes,
/// while the smallest active 20 ms SILK frame is well over 10.
pub(crate) const DTX_MAX_PAYLOAD: usize = 3;
/// A 20 ms Opus frame of digital silence (TOC 0xF8: CELT fullband 20 ms, mono, one frame; then
/// the range coder's encoding of silence): what a track ends with when it empties.
pub(crate) static SILENCE_FRAME: [u8; 3] = [0xF8, 0xFF, 0xFE];
/// Its duration in samples.
pub(crate) const SILENCE_SAMPLES: u32 = 960;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Silk,
    Hybrid,
    Celt,
}

#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bandwidth {
    Narrow,
    Medium,
    Wide,
    SuperWide,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpusError {
    Empty,
    /// Code 3 packet without its frame-count byte.
    MissingFrameCount,
    /// Code 3 with zero frames, or more than 120 ms of audio in one packet.
    BadFrameCount(u8),
}

impl std::fmt::Display for OpusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpusError::Empty => write!(f, "empty Opus payload"),
            OpusError::MissingFrameCount => {
                write!(f, "Opus code 3 packet without frame count byte")
            }
            OpusError::BadFrameCount(n) => write!(f, "Opus packet with invalid frame count {n}"),
        }
    }
}

impl std::error::Error for OpusError {}

/// The table of contents byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Toc {
    pub config: u8,
    pub stereo: bool,
    /// Frame packing code 0-3.
    pub code: u8,
}

impl Toc {
    pub(crate) fn from_byte(b: u8) -> Toc {
        Toc {
            config: b >> 3,
            stereo: b & 0x04 != 0,
            code: b & 0x03,
        }
    }
    pub(crate) fn mode(&self) -> Mode {
        match self.config {
            0..=11 => Mode::Silk,
            12..=15 => Mode::Hybrid,
            _ => Mode::Celt,
        }
    }
    #[cfg(test)]
    pub(crate) fn bandwidth(&self) -> Bandwidth {
        match self.config {
            0..=3 | 16..=19 => Bandwidth::Narrow,
            4..=7 => Bandwidth::Medium,
            8..=11 | 20..=23 => Bandwidth::Wide,
            12..=13 | 24..=27 => Bandwidth::SuperWide,
            _ => Bandwidth::Full,
        }
    }

    /// Duration of one frame in 48 kHz samples.
    pub(crate) fn frame_samples(&self) -> u32 {
        const SILK: [u32; 4] = [480, 960, 1920, 2880];
        const HYBRID: [u32; 2] = [480, 960];
        const CELT: [u32; 4] = [120, 240, 480, 960];
        let c = self.config as usize;
        match self.mode() {
            Mode::Silk => SILK[c % 4],
            Mode::Hybrid => HYBRID[c % 2],
            Mode::Celt => CELT[c % 4],
        }
    }
}

/// What the TOC (and, for code 3, the frame count byte) says about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PacketInfo {
    pub toc: Toc,
    pub frames: u8,
    /// Audio duration of the packet in 48 kHz samples.
    pub samples: u32,
}

/// Reads the TOC of an Opus payload. Does not validate frame lengths: an edge never decodes.
pub(crate) fn packet_info(payload: &[u8]) -> Result<PacketInfo, OpusError> {
    let toc = Toc::from_byte(*payload.first().ok_or(OpusError::Empty)?);
    let frames = match toc.code {
        0 => 1,
        1 | 2 => 2,
        _ => {
            let m = payload.get(1).ok_or(OpusError::MissingFrameCount)? & 0x3F;
            if m == 0 {
                return Err(OpusError::BadFrameCount(m));
            }
            m
        }
    };
    let samples = toc.frame_samples() * frames as u32;
    // RFC 6716: a packet holds at most 120 ms.
    if samples > 5760 {
        return Err(OpusError::BadFrameCount(frames));
    }
    Ok(PacketInfo {
        toc,
        frames,
        samples,
    })
}

/// True when the payload is a DTX / comfort-noise frame rather than coded audio.
pub(crate) fn is_dtx_payload(payload: &[u8]) -> bool {
    payload.len() <= DTX_MAX_PAYLOAD
}

/// Detects DTX gaps: consecutive sequence numbers whose timestamps advance by more than the
/// previous packet's duration mean the sender stopped sending during silence.
#[derive(Debug, Default, Clone)]
pub(crate) struct DtxGap {
    last: Option<(u16, u32, u32)>,
}

impl DtxGap {
    /// Feeds a packet in arrival order; returns the silent gap before it in samples (0 if none).
    /// Reordered or lost packets never report a gap: only a consecutive sequence number can.
    pub(crate) fn observe(&mut self, seq: u16, ts: u32, samples: u32) -> u32 {
        let gap = match self.last {
            Some((lseq, lts, lsamples)) if seq == lseq.wrapping_add(1) => {
                let advance = ts.wrapping_sub(lts);
                // A huge advance is a timestamp jump (restart), not DTX.
                if advance > lsamples && advance < CLOCK_RATE * 60 {
                    advance - lsamples
                } else {
                    0
                }
            }
            _ => 0,
        };
        match self.last {
            Some((lseq, ..)) if (seq.wrapping_sub(lseq) as i16) <= 0 => {}
            _ => self.last = Some((seq, ts, samples)),
        }
        gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_configs() {
        // 0x78: config 15 (hybrid FB 20 ms), mono, code 0: what libopus sends at 32 kb/s.
        let i = packet_info(&[0x78, 1, 2]).unwrap();
        assert_eq!(
            (i.toc.mode(), i.toc.bandwidth(), i.samples, i.frames),
            (Mode::Hybrid, Bandwidth::Full, 960, 1)
        );
        // config 1 SILK NB 20 ms, stereo, code 1: two frames.
        let i = packet_info(&[(1 << 3) | 0x04 | 1]).unwrap();
        assert_eq!(
            (i.toc.mode(), i.toc.stereo, i.samples),
            (Mode::Silk, true, 1920)
        );
        // config 16 CELT NB 2.5 ms, code 3 with 48 frames = 120 ms, the maximum.
        let i = packet_info(&[(16 << 3) | 3, 48]).unwrap();
        assert_eq!((i.toc.mode(), i.samples), (Mode::Celt, 5760));
        assert_eq!(
            packet_info(&[(16 << 3) | 3, 49]),
            Err(OpusError::BadFrameCount(49))
        );
        assert_eq!(
            packet_info(&[(3 << 3) | 3, 3]),
            Err(OpusError::BadFrameCount(3))
        );
        assert_eq!(
            packet_info(&[(3 << 3) | 3]),
            Err(OpusError::MissingFrameCount)
        );
        assert_eq!(
            packet_info(&[(16 << 3) | 3, 0]),
            Err(OpusError::BadFrameCount(0))
        );
        assert_eq!(packet_info(&[]), Err(OpusError::Empty));
    }

    #[test]
    fn every_toc_byte_has_a_sane_duration() {
        for b in 0..=255u8 {
            let s = Toc::from_byte(b).frame_samples();
            assert!([120, 240, 480, 960, 1920, 2880].contains(&s), "toc {b:#x}");
        }
    }

    #[test]
    fn dtx_gap_needs_consecutive_sequence_numbers() {
        let mut d = DtxGap::default();
        assert_eq!(d.observe(10, 0, 960), 0);
        assert_eq!(d.observe(11, 960, 960), 0);
        // 400 ms DTX interval: consecutive seq, timestamp jumps 20 frames.
        assert_eq!(d.observe(12, 960 + 20 * 960, 960), 19 * 960);
        // Loss (seq 14 after 12) with a timestamp gap is not DTX.
        assert_eq!(d.observe(14, 960 + 22 * 960, 960), 0);
        // A late packet does not move the reference.
        assert_eq!(d.observe(13, 960 + 21 * 960, 960), 0);
        assert_eq!(d.observe(15, 960 + 23 * 960, 960), 0);
        assert!(is_dtx_payload(&[0x78]) && !is_dtx_payload(&[0x78; 20]));
    }
}
