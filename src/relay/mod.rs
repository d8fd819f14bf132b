//! The origin-edge link over QUIC (quinn): a control stream and one datagram per RTP packet.
//! Its wire protocol, TLS and the edge's side live here; the origin's side, which serves the
//! origin's state, is [`crate::origin::relay_server`].

pub mod client;
#[cfg(feature = "tools")]
pub mod probe;
pub mod proto;
pub mod tls;
