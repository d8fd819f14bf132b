//! What happens to an SDP offer before and when str0m sees it (`rtc::offer` and
//! `rtc::peers::answer_offer`, through `chorus::fuzzing`), on arbitrary text.
//!
//! 1. `check_offer` (all four requirement sets), `mlines` and `normalize` never panic.
//! 2. `check_offer` accepts only what it documents: at most `MAX_OFFER_BYTES`, starting with
//!    `v=0`, with an m-line, and an audio m-line in the required direction (checked against
//!    `mlines`).
//! 3. `normalize` is idempotent, keeps the m-line summary (`mlines`) unchanged, and keeps every
//!    non-empty line (up to `a=fmtp` spacing) in the same media section.
//! 4. An offer `check_offer` passes goes through `answer_offer` as the WHIP/WHEP/signalling
//!    path does (`normalize`, str0m's `SdpOffer::from_sdp_string`, `accept_offer`): no panic
//!    gets out (str0m's own, caught inside, are refusals), and an answer str0m produced parses
//!    back as an answer.
#![no_main]

use std::net::SocketAddr;

use chorus::fuzzing::{
    answer_offer, check_offer, media_config, mlines, normalize, OfferError, OfferRequirements,
    MAX_OFFER_BYTES,
};
use libfuzzer_sys::fuzz_target;
use str0m::change::SdpAnswer;

fuzz_target!(|data: &[u8]| {
    // Offers arrive as UTF-8 text (a WHIP/WHEP body or a JSON string); anything else is refused
    // before this code runs.
    let Ok(sdp) = std::str::from_utf8(data) else {
        return;
    };
    let lines = mlines(sdp);
    let mut accepted = false;
    for (audio_send, audio_recv) in [(false, false), (true, false), (false, true), (true, true)] {
        let req = OfferRequirements {
            audio_send,
            audio_recv,
        };
        let got = check_offer(sdp, req);
        let wants = |dirs: [&str; 2]| {
            lines
                .iter()
                .any(|m| m.media == "audio" && dirs.contains(&m.direction.as_str()))
        };
        let valid = sdp.len() <= MAX_OFFER_BYTES
            && sdp.trim_start().starts_with("v=0")
            && !lines.is_empty()
            && (!audio_recv || wants(["recvonly", "sendrecv"]))
            && (!audio_send || wants(["sendonly", "sendrecv"]));
        assert_eq!(got.is_ok(), valid, "{req:?}: {got:?}");
        if let Err(e) = &got {
            assert!(
                matches!(e, OfferError::Malformed(_) | OfferError::Unacceptable(_)),
                "{e:?}"
            );
            assert!(!e.to_string().is_empty());
        }
        accepted |= got.is_ok() && (audio_send || audio_recv);
    }

    let n = normalize(sdp);
    assert_eq!(normalize(&n), n, "normalize is not idempotent");
    assert_eq!(mlines(&n), lines, "normalize changed the m-lines");
    assert_eq!(sections(&n), sections(sdp), "normalize lost or moved lines");

    if accepted {
        let candidate: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        if let Ok((_rtc, ufrag, answer)) =
            str0m_quiet(|| answer_offer(sdp, media_config(), candidate))
        {
            assert!(!ufrag.is_empty());
            SdpAnswer::from_sdp_string(&answer).expect("str0m parses its own answer");
        }
    }
});

/// libfuzzer-sys's panic hook aborts on every panic, even one caught further in, and
/// `answer_offer` catches str0m's panics on purpose (they refuse the offer): the hook is silent
/// for the call. A panic that escapes `answer_offer` is re-raised with the fuzzer's hook back.
fn str0m_quiet<T>(f: impl FnOnce() -> T) -> T {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match r {
        Ok(v) => v,
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned());
            panic!("answer_offer let a panic out: {why:?}")
        }
    }
}

/// Each media section's non-empty lines (trailing whitespace and `a=fmtp` spacing aside),
/// sorted: what `normalize` may reorder but must keep.
fn sections(sdp: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for line in sdp.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        if line.starts_with("m=") {
            out.push(Vec::new());
        }
        // `a=fmtp:<pt> <params>`: the params without empty ones or spaces around the `;`s.
        let line = match line.strip_prefix("a=fmtp:").and_then(|f| f.split_once(' ')) {
            Some((pt, params)) => {
                let params: Vec<&str> = params
                    .split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect();
                format!("a=fmtp:{pt} {}", params.join(";"))
                    .trim_end()
                    .to_owned()
            }
            None => line.to_owned(),
        };
        out.last_mut().expect("one section").push(line);
    }
    for s in &mut out {
        s.sort();
    }
    out
}
