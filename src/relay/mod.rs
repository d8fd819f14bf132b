//! The origin-edge link over QUIC (quinn): a control stream and one datagram per RTP packet.

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
