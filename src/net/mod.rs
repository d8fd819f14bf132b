//! Linux socket I/O shared by the media threads (edge, origin) and the load generator:
//! batched sends ([`send`]: `sendmmsg`) and receives ([`recv`]: `recvmmsg` with kernel
//! timestamps), waiting on sockets and waking a waiting thread ([`poll`]: epoll, eventfd, the
//! media threads' doorbell), socket options ([`sockopt`]) and address conversions ([`addr`]).
//!
//! Linux only, like the rest of the media path.

pub(crate) mod addr;
pub(crate) mod poll;
pub(crate) mod recv;
pub mod send;
pub(crate) mod sockopt;

use std::io;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
