//! chorus: an open real-time audio edge that forwards, to every viewer, only the few sources of a
//! stream that are talking, in a fixed set of multiplexed tracks.

pub mod media;
pub mod replay;
