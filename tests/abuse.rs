//! The abuse and fault suite: one test per hole an attacker (or a fault) finds, each against real
//! processes. Every test shows that the attack is refused with a clear error or bounded, that the
//! process stays up with its RSS under a stated bound, and that an honest viewer of another stream
//! ([`honest`]) stays gapless throughout.

mod common;

#[path = "abuse/honest.rs"]
mod honest;

#[path = "abuse/http.rs"]
mod http;
#[path = "abuse/link.rs"]
mod link;
#[path = "abuse/media.rs"]
mod media;
#[path = "abuse/origin.rs"]
mod origin;
