//! WebRTC peers (str0m) on media threads: offer checks, the socket-owning loop, peer routing.
//! The origin's media thread is [`crate::origin::media_thread`], the edge's [`crate::edge::worker`].

pub(crate) mod ended;
pub mod established;
pub(crate) mod gcm;
// Crate-private but for the fuzz targets, which reach it through `crate::fuzzing` (feature
// `tools`): its `pub` items are unreachable in the server build alone, where the lint would
// flag them; the default build still checks them.
#[cfg_attr(not(feature = "tools"), allow(unreachable_pub))]
pub(crate) mod offer;
pub mod peers;
pub(crate) mod reaper;
pub(crate) mod srtp_out;
pub(crate) mod supervise;
pub mod tcp;
