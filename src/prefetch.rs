//! A hint that a value will be read soon. The edge's media thread writes one packet to each
//! viewer of a group in turn, and each write reads a few cache lines of that viewer's state
//! (its peer entry, lean state, track and NACK slot) that the thousand viewers written before
//! it pushed out of the core's caches. Asking for the lines of the viewers a few writes ahead
//! lets those misses overlap with the current write's sealing and sending.

/// Starts loading the cache line that holds `p`. Any address will do: a prefetch never faults
/// and changes nothing but the cache.
#[inline(always)]
pub(crate) fn prefetch<T: ?Sized>(p: *const T) {
    // SAFETY: SSE is part of x86_64, and a prefetch of any address is defined (a hint only).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] of every line `v` spans (at most the first 4: the fields a write reads come
/// first).
#[inline(always)]
pub(crate) fn prefetch_all<T>(v: &T) {
    prefetch_span(v as *const T as *const u8, size_of::<T>(), 4);
}

/// [`prefetch`] of every line the `len` bytes from `start` span, at most `max_lines` of them.
#[inline(always)]
pub(crate) fn prefetch_span(start: *const u8, len: usize, max_lines: usize) {
    const LINE: usize = 64;
    let end = start.wrapping_add(len.saturating_sub(1));
    let lines = ((end as usize / LINE) - (start as usize / LINE) + 1).min(max_lines);
    for i in 0..lines {
        prefetch(start.wrapping_add(i * LINE));
    }
}
