//! chorus: an open real-time audio edge that forwards, to every viewer, only the few sources of a
//! stream that are talking, in a fixed set of multiplexed tracks.
//!
//! The feature `tools` (default) adds the test and measurement tools: `loadgen`, `replay`,
//! the in-memory peers `edge::loopback` and what the fuzz targets call (`fuzzing`); without it
//! the crate is the server alone.

#![warn(unreachable_pub, missing_docs)]
// What the tools share with the server (batched receive, the floor's send batch, socket options)
// is dead in a server-only build; the default build still reports dead code.
#![cfg_attr(not(feature = "tools"), allow(dead_code))]

pub mod auth;
pub(crate) mod cluster;
pub mod config_file;
pub mod drain;
pub mod edge;
/// The crate-private items the fuzz targets (`fuzz/`) call, re-exported or wrapped.
#[cfg(feature = "tools")]
pub mod fuzzing;
pub mod http;
#[cfg(feature = "tools")]
pub mod loadgen;
pub mod logs;
pub mod media;
pub mod millicast;
pub mod net;
pub mod origin;
pub(crate) mod prefetch;
pub(crate) mod recording;
pub mod relay;
#[cfg(feature = "tools")]
pub mod replay;
pub mod room;
pub mod rtc;
pub mod server;
pub(crate) mod webhooks;
