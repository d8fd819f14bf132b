//! chorus: an open real-time audio edge that forwards, to every viewer, only the few sources of a
//! stream that are talking, in a fixed set of multiplexed tracks.

pub mod auth;
pub mod edge;
pub mod http;
pub mod loadgen;
pub mod media;
pub mod millicast;
pub mod origin;
pub mod relay;
pub mod replay;
pub mod room;
pub mod rtc;
pub mod server;
