//! WebRTC peers (str0m) on media threads: offer checks, the socket-owning loop, peer routing.
//! The origin's media thread is [`crate::origin::media_thread`], the edge's [`crate::edge::worker`].

pub mod established;
pub mod offer;
pub mod peers;
pub(crate) mod srtp_out;
pub(crate) mod supervise;
