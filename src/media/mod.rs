//! The packet core: everything that decides what happens to a packet, with no I/O and no clock.
//! Time is always an argument (microseconds of packet time), so a run is deterministic and can be
//! replayed, fuzzed and benchmarked alone.

pub mod activity;
pub mod floor;
pub(crate) mod frame_clock;
pub(crate) mod opus;
pub mod red;
pub mod rewrite;
pub mod rtp;
pub mod selection;
pub mod stream;

/// A source of a stream, by its index in the stream's source table (interned sourceId).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceIdx(pub u32);
