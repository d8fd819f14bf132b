//! WebRTC peers (str0m) on media threads: offer checks, the socket-owning loop, peer routing.

pub mod established;
pub mod host;
pub mod loopback;
pub mod offer;
pub mod peers;
pub mod srtp_out;
pub mod supervise;
pub mod udp;
