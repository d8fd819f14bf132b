//! Checks on an SDP offer before str0m sees it, so a refusal says what is wrong in words a
//! client developer can act on.

/// What the offer must contain to be accepted.
#[derive(Debug, Clone, Copy)]
pub struct OfferRequirements {
    /// A publisher's offer: some audio m-line sends.
    pub audio_send: bool,
    /// A viewer's offer: some audio m-line receives.
    pub audio_recv: bool,
}

/// Why an offer is refused (the message is the client's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferError {
    /// Not parseable as SDP.
    Malformed(String),
    /// Parseable, but not what this endpoint takes.
    Unacceptable(String),
    /// str0m refused it.
    Rejected(String),
    /// A stated limit is reached (sources per stream, peers still connecting): the message
    /// says which. Answered 503: it may clear.
    Limit(String),
    /// A fault of this side.
    Internal(String),
}

impl std::fmt::Display for OfferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OfferError::Malformed(m) => write!(f, "malformed SDP offer: {m}"),
            OfferError::Unacceptable(m) => write!(f, "{m}"),
            OfferError::Rejected(m) => write!(f, "SDP offer rejected: {m}"),
            OfferError::Limit(m) => write!(f, "{m}"),
            OfferError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for OfferError {}

/// Largest offer accepted: a browser offer with many m-lines is a few KiB.
pub const MAX_OFFER_BYTES: usize = 64 * 1024;

/// A summary of the offer's m-lines: (media, direction, has the RFC 6464 extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MLine {
    /// `audio`, `video`, ...
    pub media: String,
    /// `sendrecv` unless the section says otherwise.
    pub direction: String,
    /// Whether the section offers the RFC 6464 audio level extension.
    pub audio_level: bool,
    /// Its `a=mid`, if any.
    pub mid: Option<String>,
}

/// The offer's m-lines, in order.
pub fn mlines(sdp: &str) -> Vec<MLine> {
    let mut out: Vec<MLine> = Vec::new();
    for line in sdp.lines().map(str::trim_end) {
        if let Some(rest) = line.strip_prefix("m=") {
            out.push(MLine {
                media: rest.split(' ').next().unwrap_or("").to_owned(),
                direction: "sendrecv".into(),
                audio_level: false,
                mid: None,
            });
        } else if let Some(m) = out.last_mut() {
            match line {
                "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive" => {
                    m.direction = line[2..].to_owned()
                }
                _ if line.starts_with("a=mid:") => m.mid = Some(line[6..].to_owned()),
                _ if line.starts_with("a=extmap:")
                    && line.contains("urn:ietf:params:rtp-hdrext:ssrc-audio-level") =>
                {
                    m.audio_level = true
                }
                _ => {}
            }
        }
    }
    out
}

/// Moves each audio m-line's RED payload type (`a=rtpmap:N red/48000/2`) to the front of its
/// format list: libwebrtc sends the first codec of the remote description, so a publisher's
/// Chrome sends RED (with Opus inside) only when the answer lists it first.
pub(crate) fn red_first(sdp: &str) -> String {
    let sections: Vec<&str> = sdp.split_inclusive("\n").collect();
    let mut out = String::with_capacity(sdp.len());
    let mut i = 0;
    while i < sections.len() {
        let line = sections[i];
        if !line.starts_with("m=audio ") {
            out.push_str(line);
            i += 1;
            continue;
        }
        let end = (i + 1..sections.len())
            .find(|&j| sections[j].starts_with("m="))
            .unwrap_or(sections.len());
        let red = sections[i + 1..end].iter().find_map(|l| {
            let rest = l.trim_end().strip_prefix("a=rtpmap:")?;
            let (pt, codec) = rest.split_once(' ')?;
            codec
                .to_ascii_lowercase()
                .starts_with("red/48000")
                .then_some(pt)
        });
        let body = line.trim_end_matches(['\r', '\n']);
        let eol = &line[body.len()..];
        let mut fields: Vec<&str> = body.split(' ').collect();
        if let Some(pt) = red {
            // m=audio <port> <proto> <fmt>...
            if let Some(at) = fields.iter().skip(3).position(|f| *f == pt) {
                let f = fields.remove(3 + at);
                fields.insert(3, f);
            }
        }
        out.push_str(&fields.join(" "));
        out.push_str(eol);
        i += 1;
    }
    out
}

/// Puts an offer in the shape RFC 8866 prescribes before a strict parser sees it. Browsers
/// emit well-ordered SDP, but SDKs munge it: the Millicast SDK inserts `a=rtpmap`/`a=fmtp`
/// lines for multiopus right after `m=` (before `c=`), and `stereo=1` after a `; `. A media
/// server must take what its clients send, so: within each media section the `i=`, `c=`, `b=`
/// and `k=` lines move right after `m=` in their original order, and spaces around the `;`
/// separators of `a=fmtp` parameters go.
pub fn normalize(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len() + 16);
    let mut section: Vec<&str> = Vec::new();
    let flush = |section: &mut Vec<&str>, out: &mut String| {
        let (head, rest): (Vec<&str>, Vec<&str>) = section.iter().skip(1).partition(|l| {
            matches!(l.as_bytes().first(), Some(b'i' | b'c' | b'b' | b'k'))
                && l.as_bytes().get(1) == Some(&b'=')
        });
        for line in section
            .first()
            .into_iter()
            .chain(head.iter())
            .chain(rest.iter())
        {
            if let Some(fmtp) = line.strip_prefix("a=fmtp:") {
                match fmtp.split_once(' ') {
                    Some((pt, params)) => {
                        let params: Vec<&str> = params
                            .split(';')
                            .map(str::trim)
                            .filter(|p| !p.is_empty())
                            .collect();
                        // No parameters left: no trailing space either (it would be
                        // trimmed on a second pass, and a strict parser may trip on it).
                        if params.is_empty() {
                            out.push_str(&format!("a=fmtp:{}", pt.trim_end()));
                        } else {
                            out.push_str(&format!("a=fmtp:{pt} {}", params.join(";")));
                        }
                    }
                    None => out.push_str(line),
                }
            } else {
                out.push_str(line);
            }
            out.push_str("\r\n");
        }
        section.clear();
    };
    for line in sdp.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        if line.starts_with("m=") {
            flush(&mut section, &mut out);
        }
        if line.starts_with("m=") || !section.is_empty() {
            section.push(line);
        } else {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    flush(&mut section, &mut out);
    out
}

/// Refuses, with the reason, an offer that is too large, not SDP-like, without an m-line, or
/// without an audio m-line in the direction `req` needs.
pub fn check_offer(sdp: &str, req: OfferRequirements) -> Result<(), OfferError> {
    if sdp.len() > MAX_OFFER_BYTES {
        return Err(OfferError::Malformed(format!(
            "{} bytes, more than {MAX_OFFER_BYTES}",
            sdp.len()
        )));
    }
    if !sdp.trim_start().starts_with("v=0") {
        return Err(OfferError::Malformed("does not start with v=0".into()));
    }
    let lines = mlines(sdp);
    if lines.is_empty() {
        return Err(OfferError::Malformed("no m= line".into()));
    }
    if req.audio_recv
        && !lines
            .iter()
            .any(|m| m.media == "audio" && matches!(m.direction.as_str(), "recvonly" | "sendrecv"))
    {
        return Err(OfferError::Unacceptable(
            "offer has no audio m-line to receive".into(),
        ));
    }
    if req.audio_send
        && !lines
            .iter()
            .any(|m| m.media == "audio" && matches!(m.direction.as_str(), "sendonly" | "sendrecv"))
    {
        return Err(OfferError::Unacceptable(
            "offer has no audio m-line to publish".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn red_goes_first_in_audio_m_lines_only() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 63\r\na=rtpmap:96 VP8/90000\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        let got = red_first(sdp);
        assert_eq!(got, sdp.replacen("SAVPF 111 63", "SAVPF 63 111", 1));
        assert_eq!(red_first(&got), got);
    }

    const PUB: OfferRequirements = OfferRequirements {
        audio_send: true,
        audio_recv: false,
    };

    #[test]
    fn refuses_offers_without_publishable_audio() {
        let video_only = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n";
        assert_eq!(
            check_offer(video_only, PUB),
            Err(OfferError::Unacceptable(
                "offer has no audio m-line to publish".into()
            ))
        );
        let recv_audio = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n";
        assert!(check_offer(recv_audio, PUB).is_err());
        let ok = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\na=sendonly\r\n";
        assert_eq!(check_offer(ok, PUB), Ok(()));
        assert!(mlines(ok)[0].audio_level);
        assert!(matches!(
            check_offer("hello", PUB),
            Err(OfferError::Malformed(_))
        ));
        assert!(matches!(
            check_offer("v=0\r\n", PUB),
            Err(OfferError::Malformed(_))
        ));
    }

    #[test]
    fn normalizes_munged_sdk_offers() {
        let munged = "v=0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 96\r\na=rtpmap:96 multiopus/48000/6\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=fmtp:111 minptime=10;useinbandfec=1; stereo=1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\nb=AS:500\r\na=mid:1\r\n";
        let n = normalize(munged);
        assert_eq!(
            n,
            "v=0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 multiopus/48000/6\r\na=mid:0\r\na=fmtp:111 minptime=10;useinbandfec=1;stereo=1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\nb=AS:500\r\na=mid:1\r\n"
        );
        assert_eq!(normalize(&n), n, "idempotent");
    }

    /// Found by fuzz/fuzz_targets/sdp_offer.rs: an `a=fmtp` whose parameters are all empty came
    /// out with a trailing space, which the next pass trimmed (normalize was not idempotent).
    #[test]
    fn fmtp_without_parameters_has_no_trailing_space() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fmtp:111 ; \r\n";
        let n = normalize(sdp);
        assert_eq!(
            n,
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fmtp:111\r\n"
        );
        assert_eq!(normalize(&n), n);
        // Nor does a payload type that ends in other whitespace (a lone CR or a tab).
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fmtp:111\r ;\r\n";
        let n = normalize(sdp);
        assert_eq!(
            n,
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fmtp:111\r\n"
        );
        assert_eq!(normalize(&n), n);
    }
}
