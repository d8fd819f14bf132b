//! The client side of a WebRTC peer with str0m: one host candidate on the peer's own loopback
//! socket, SRTP, RTP mode. Against chorus the client offers (ICE controlling, DTLS active, the
//! server answers passive); against Janus it answers Janus's offer (ICE controlled).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::rtp::Extension;
use str0m::{Candidate, Rtc, RtcConfig};

use crate::rtc::srtp_out::{tapping_provider, with_key_slot, KeySlot};

/// What every peer of a run shares: the crypto provider and one DTLS certificate (making an
/// ECDSA key per peer would cost more than the join itself).
#[derive(Clone)]
pub(crate) struct ClientCrypto {
    provider: Arc<CryptoProvider>,
    cert: DtlsCert,
}

impl ClientCrypto {
    /// str0m's provider behind the edge's DTLS tap: one shared DTLS configuration for every
    /// peer (cheaper joins), and the keying material of the peers that ask for it
    /// ([`viewer_offer`] with a key slot), for the generator's own SRTP receive path.
    pub(crate) fn new() -> Result<ClientCrypto, String> {
        let provider = tapping_provider();
        let cert = provider
            .dtls_provider
            .generate_certificate()
            .ok_or("the crypto provider cannot make a DTLS certificate")?;
        Ok(ClientCrypto { provider, cert })
    }
}

/// An offer waiting for its answer.
pub(crate) struct Offer {
    pub rtc: Rtc,
    pub sdp: String,
    pending: SdpPendingOffer,
    /// The audio m-lines, in offer order.
    pub mids: Vec<Mid>,
}

fn config(crypto: &ClientCrypto) -> RtcConfig {
    RtcConfig::new()
        .set_crypto_provider(crypto.provider.clone())
        .set_dtls_cert(crypto.cert.clone())
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
}

/// A peer with its one host candidate on `local`; with `keys`, its DTLS keying material lands
/// there once the handshake ends.
fn build(cfg: RtcConfig, local: SocketAddr, keys: Option<Arc<KeySlot>>) -> Result<Rtc, String> {
    let mut rtc = match keys {
        Some(slot) => with_key_slot(slot, || cfg.build(Instant::now())),
        None => cfg.build(Instant::now()),
    };
    let cand = Candidate::host(local, "udp").map_err(|e| format!("host candidate: {e}"))?;
    rtc.add_local_candidate(cand);
    Ok(rtc)
}

fn offer(
    cfg: RtcConfig,
    local: SocketAddr,
    dir: Direction,
    mlines: usize,
    keys: Option<Arc<KeySlot>>,
) -> Result<Offer, String> {
    let mut rtc = build(cfg, local, keys)?;
    let mut api = rtc.sdp_api();
    let mids: Vec<Mid> = (0..mlines)
        .map(|_| api.add_media(MediaKind::Audio, dir, None, None, None))
        .collect();
    let (offer, pending) = api.apply().ok_or("str0m made no offer")?;
    Ok(Offer {
        sdp: offer.to_sdp_string(),
        rtc,
        pending,
        mids,
    })
}

/// A publisher: one send-only Opus m-line with the RFC 6464 level, as a browser sends (and
/// no transport-cc, like the origin asks).
pub(crate) fn publisher_offer(crypto: &ClientCrypto, local: SocketAddr) -> Result<Offer, String> {
    let cfg = config(crypto)
        .clear_extension_map()
        .set_extension(1, Extension::AudioLevel)
        .set_extension(4, Extension::RtpMid);
    offer(cfg, local, Direction::SendOnly, 1, None)
}

/// A viewer: the main audio m-line plus `tracks` multiplexed ones, all receive-only, with
/// str0m's (browser-like) default extensions. With `keys`, the DTLS keying material lands there
/// once the handshake ends.
pub(crate) fn viewer_offer(
    crypto: &ClientCrypto,
    local: SocketAddr,
    tracks: usize,
    keys: Option<Arc<KeySlot>>,
) -> Result<Offer, String> {
    offer(config(crypto), local, Direction::RecvOnly, 1 + tracks, keys)
}

/// A viewer answering a server's offer (Janus offers its mountpoint's streams): receive-only
/// Opus on every offered m-line, our one host candidate in the answer. Returns the peer and
/// the answer's SDP. With `keys`, the DTLS keying material lands there once the handshake ends.
pub(crate) fn viewer_answer(
    crypto: &ClientCrypto,
    local: SocketAddr,
    offer_sdp: &str,
    keys: Option<Arc<KeySlot>>,
) -> Result<(Rtc, String), String> {
    let mut rtc = build(config(crypto), local, keys)?;
    let offer = SdpOffer::from_sdp_string(offer_sdp)
        .map_err(|e| format!("the server's SDP offer does not parse: {e}"))?;
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| format!("the server's SDP offer is not acceptable: {e}"))?;
    Ok((rtc, answer.to_sdp_string()))
}

/// Applies the server's answer; the peer is then ready to connect.
pub(crate) fn accept(o: Offer, answer_sdp: &str) -> Result<(Rtc, Vec<Mid>), String> {
    let Offer {
        mut rtc,
        pending,
        mids,
        ..
    } = o;
    let answer = SdpAnswer::from_sdp_string(answer_sdp)
        .map_err(|e| format!("the server's SDP answer does not parse: {e}"))?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| format!("the server's SDP answer is not acceptable: {e}"))?;
    Ok((rtc, mids))
}
