//! What the fuzz targets (`fuzz/fuzz_targets`, run by `scripts/fuzz.sh`) call that the server
//! keeps crate-private: present with the feature `tools` only, so the server build alone
//! (`--no-default-features`) has none of it in its public API.
//!
//! - The modules only the targets use from outside (the rooms' state machine, the signalling
//!   commands' parsers, the offer checks) are crate-private; the items the targets need are
//!   `pub` inside them and re-exported here.
//! - Items of public modules (`media::rtp`, `media::stream`, `rtc::established`, `rtc::peers`,
//!   `relay::proto`, `millicast`) stay crate-private there: constants are repeated here,
//!   functions wrapped, and methods wrapped by an extension trait of the same method names, so
//!   a target calls `view.extension_profile()` as the crate does once it imports the trait.
//!
//! Nothing here changes what it wraps: each wrapper is one call.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use str0m::crypto::dtls::SrtpProfile;
use str0m::{Rtc, RtcConfig};

use crate::media::rtp::RtpView;
use crate::media::stream::{Output, StreamCore};
use crate::media::SourceIdx;
use crate::relay::proto::DatagramHeader;
use crate::rtc::established::{Emit, Ended, Established, IceLite, RtcpStats, TrackSpec};

pub use crate::http::signal_cmd::{
    CmdError, ProjectCmd, PublishCmd, Target, UnprojectCmd, UnpublishCmd, ViewCmd, ViewTracks,
    MAX_SOURCE_LIST,
};
pub use crate::http::socket::{parse_command, WsCommand};
pub use crate::room::state::{
    Effect, Gauges, Grant, Media, Permission, PublishRight, Role, RoomError, Rooms, COMMANDS,
};
pub use crate::rtc::offer::{
    check_offer, mlines, normalize, MLine, OfferError, OfferRequirements, MAX_OFFER_BYTES,
};

/// `media::rtp`: RFC 8285 one-byte header extension profile.
pub const ONE_BYTE_PROFILE: u16 = crate::media::rtp::ONE_BYTE_PROFILE;
/// `media::rtp`: RFC 8285 two-byte header extension profile (the low 4 bits are app bits).
pub const TWO_BYTE_PROFILE: u16 = crate::media::rtp::TWO_BYTE_PROFILE;
/// `media::rtp`: the mask of [`TWO_BYTE_PROFILE`] (without the app bits).
pub const TWO_BYTE_PROFILE_MASK: u16 = crate::media::rtp::TWO_BYTE_PROFILE_MASK;

/// `media::rtp::parse_audio_level`: RFC 6464 `(voice_activity_flag, level)`, level in -dBov.
pub fn parse_audio_level(data: &[u8]) -> Option<(bool, u8)> {
    crate::media::rtp::parse_audio_level(data)
}

/// The crate-private methods of [`RtpView`].
pub trait RtpViewFuzz {
    /// The extension block's profile field, if the X bit is set.
    fn extension_profile(&self) -> Option<u16>;
}

impl RtpViewFuzz for RtpView<'_> {
    fn extension_profile(&self) -> Option<u16> {
        RtpView::extension_profile(self)
    }
}

/// The crate-private methods of [`StreamCore`].
pub trait StreamCoreFuzz {
    /// The source stopped: its tracks empty now.
    fn unpublish(&mut self, now_us: u64, s: SourceIdx, out: &mut impl FnMut(Output));
    /// Whether the source is published.
    fn is_live(&self, s: SourceIdx) -> bool;
}

impl StreamCoreFuzz for StreamCore {
    fn unpublish(&mut self, now_us: u64, s: SourceIdx, out: &mut impl FnMut(Output)) {
        StreamCore::unpublish(self, now_us, s, out)
    }

    fn is_live(&self, s: SourceIdx) -> bool {
        StreamCore::is_live(self, s)
    }
}

/// `rtc::established`: packets remembered per track for NACK.
pub const NACK_HISTORY: usize = crate::rtc::established::NACK_HISTORY;
/// `rtc::established`: times one remembered packet may be sent again.
pub const MAX_RESENDS: u8 = crate::rtc::established::MAX_RESENDS;

/// The crate-private functions of [`Established`].
pub trait EstablishedFuzz: Sized {
    /// The lean state of a viewer whose handshake gave `material`; None unless AEAD AES-GCM.
    fn new(
        ice: IceLite,
        material: &[u8],
        profile: SrtpProfile,
        client: bool,
        tracks: impl IntoIterator<Item = TrackSpec>,
        dest: SocketAddr,
        now: Instant,
    ) -> Option<Self>;

    /// Builds, seals and emits one RTP packet of track `track`. False if it could not be sealed.
    #[allow(clippy::too_many_arguments)]
    fn send_rtp(
        &mut self,
        now: Instant,
        track: usize,
        ext_seq: u64,
        ts: u32,
        marker: bool,
        level: Option<u8>,
        payload: &Bytes,
        scratch: &mut Vec<u8>,
        out: &mut impl Emit,
    ) -> bool;

    /// A DTLS record after the switch: counted, never acted on.
    fn handle_dtls(&mut self, data: &[u8], stats: &RtcpStats) -> Option<Ended>;
}

impl EstablishedFuzz for Established {
    fn new(
        ice: IceLite,
        material: &[u8],
        profile: SrtpProfile,
        client: bool,
        tracks: impl IntoIterator<Item = TrackSpec>,
        dest: SocketAddr,
        now: Instant,
    ) -> Option<Self> {
        Established::new(ice, material, profile, client, tracks, dest, now)
    }

    fn send_rtp(
        &mut self,
        now: Instant,
        track: usize,
        ext_seq: u64,
        ts: u32,
        marker: bool,
        level: Option<u8>,
        payload: &Bytes,
        scratch: &mut Vec<u8>,
        out: &mut impl Emit,
    ) -> bool {
        Established::send_rtp(
            self, now, track, ext_seq, ts, marker, level, payload, scratch, out,
        )
    }

    fn handle_dtls(&mut self, data: &[u8], stats: &RtcpStats) -> Option<Ended> {
        Established::handle_dtls(self, data, stats)
    }
}

/// `rtc::peers::answer_offer`: the offer normalized, parsed and accepted by a new str0m peer
/// (`config`, host candidate `candidate`): the peer, its ICE ufrag and the answer.
pub fn answer_offer(
    offer_sdp: &str,
    config: RtcConfig,
    candidate: SocketAddr,
) -> Result<(Rtc, String, String), OfferError> {
    crate::rtc::peers::answer_offer(offer_sdp, config, candidate, None)
}

/// `rtc::peers::media_config`: the str0m configuration of every media peer.
pub fn media_config() -> RtcConfig {
    crate::rtc::peers::media_config()
}

/// `relay::proto`: control messages larger than this are a protocol error.
pub const MAX_CONTROL_FRAME: usize = crate::relay::proto::MAX_CONTROL_FRAME;
/// `relay::proto`: the bytes of a datagram's header before its RTP packet.
pub const DATAGRAM_HEADER: usize = crate::relay::proto::DATAGRAM_HEADER;

/// The crate-private functions of [`DatagramHeader`].
pub trait DatagramHeaderFuzz: Sized {
    /// Splits a datagram into its header and RTP packet.
    fn parse(d: &[u8]) -> Option<(Self, &[u8])>;
}

impl DatagramHeaderFuzz for DatagramHeader {
    fn parse(d: &[u8]) -> Option<(Self, &[u8])> {
        DatagramHeader::parse(d)
    }
}

/// `millicast`: the longest sourceId, in bytes.
pub const MAX_SOURCE_ID: usize = crate::millicast::MAX_SOURCE_ID;
