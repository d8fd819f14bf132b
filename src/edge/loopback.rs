//! Real str0m peers connected in memory, no socket: a chorus edge viewer (answered by the edge's
//! own code and configuration) and a str0m client that offers `tracks` + 1 receive-only audio
//! m-lines. ICE, DTLS and SRTP all run for real. For benches and tests of the send path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::crypto::dtls::SrtpProfile;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use super::viewer::OutTrack;
use super::viewer_config;
use crate::rtc::established::{Established, IceLite};
use crate::rtc::peers::answer_offer;
use crate::rtc::srtp_out::{tapping_provider, with_key_slot, KeySlot};

/// The edge side's address (the client's is 127.0.0.2).
pub const SERVER: &str = "127.0.0.1:5000";

/// A connected edge viewer and its client, from [`pair`].
pub struct Pair {
    /// The edge's side of the viewer.
    pub server: Rtc,
    /// The viewer's client, which receives.
    pub client: Rtc,
    /// The multiplexed tracks, as the edge writes them.
    pub tracks: Vec<OutTrack>,
    /// The server's DTLS-SRTP keying material, profile and DTLS role, until
    /// [`Pair::go_lean`] takes it.
    pub keys: Option<(Vec<u8>, SrtpProfile, bool)>,
    /// The client's address, as the server sees it.
    pub client_addr: SocketAddr,
}

impl Pair {
    /// What the edge does on `Connected`: the server's lean state, built from its keys and
    /// str0m's negotiation, each track numbered into it. None unless AES-GCM was negotiated.
    pub fn go_lean(&mut self, now: Instant) -> Option<Established> {
        let (km, profile, client) = self.keys.take()?;
        let mut specs = Vec::new();
        for t in &mut self.tracks {
            t.lean = t.lean_spec(&mut self.server).map(|s| {
                specs.push(s);
                specs.len() - 1
            });
        }
        let creds = self.server.direct_api().local_ice_credentials();
        let ice = IceLite {
            local_ufrag: creds.ufrag,
            local_pwd: creds.pass,
            remote_ufrag: self.client.direct_api().local_ice_credentials().ufrag,
        };
        Established::new(ice, &km, profile, client, specs, self.client_addr, now)
    }
}

/// Feeds everything `from` sends to `to`; returns whether `from` reported Connected, and the
/// RTP packets `from` received meanwhile (sequence number, payload).
pub(crate) fn deliver(from: &mut Rtc, to: &mut Rtc, to_addr: SocketAddr, now: Instant) -> bool {
    let mut connected = false;
    loop {
        match from.poll_output().expect("poll") {
            Output::Timeout(_) => break,
            Output::Transmit(t) => {
                if t.destination == to_addr {
                    let r = Receive {
                        proto: Protocol::Udp,
                        source: t.source,
                        destination: t.destination,
                        contents: (&*t.contents).try_into().expect("datagram"),
                    };
                    to.handle_input(Input::Receive(now, r)).expect("receive");
                }
            }
            Output::Event(Event::Connected) => connected = true,
            Output::Event(_) => {}
        }
    }
    connected
}

/// Connects a viewer with `tracks` multiplexed tracks; `full_extensions` answers with str0m's
/// default header extensions instead of the edge's.
pub fn pair(i: u16, tracks: usize, full_extensions: bool) -> Pair {
    let now = Instant::now();
    let c_addr: SocketAddr = format!("127.0.0.2:{}", 10_000 + i).parse().unwrap();
    let s_addr: SocketAddr = SERVER.parse().unwrap();
    // Raw packets: a test reads the sender reports the client received.
    let mut client = RtcConfig::new()
        .set_rtp_mode(true)
        .enable_raw_packets(true)
        .build(now);
    client.add_local_candidate(Candidate::host(c_addr, "udp").unwrap());
    let mut api = client.sdp_api();
    let mids: Vec<Mid> = (0..=tracks)
        .map(|_| api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None))
        .collect();
    let (offer, pending) = api.apply().unwrap();
    let config = if full_extensions {
        RtcConfig::new().clear_codecs().enable_opus(true, false)
    } else {
        viewer_config()
    }
    .set_crypto_provider(tapping_provider());
    let keys = Arc::new(KeySlot::default());
    let (mut server, _, answer) = with_key_slot(keys.clone(), || {
        answer_offer(&offer.to_sdp_string(), config, s_addr, None)
    })
    .unwrap();
    client
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    let mut t = now;
    let mut up = (false, false);
    for _ in 0..2000 {
        client.handle_input(Input::Timeout(t)).unwrap();
        server.handle_input(Input::Timeout(t)).unwrap();
        let c = deliver(&mut client, &mut server, s_addr, t);
        let s = deliver(&mut server, &mut client, c_addr, t);
        up = (up.0 || c, up.1 || s);
        if up == (true, true) {
            break;
        }
        t += Duration::from_millis(5);
    }
    assert_eq!(up, (true, true), "in-memory pair connects");
    let tracks = mids[1..]
        .iter()
        .map(|m| OutTrack::new(*m, 48_000))
        .collect();
    Pair {
        server,
        client,
        tracks,
        keys: keys.take(),
        client_addr: c_addr,
    }
}
