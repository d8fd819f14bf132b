//! The origin-edge wire format, sans-IO: control messages on one QUIC stream (u32 big-endian
//! length, then JSON), and one QUIC datagram per RTP packet with an 11-byte tag.

use serde::{Deserialize, Serialize};

/// Control messages larger than this are a protocol error: a source list is a few KiB.
pub(crate) const MAX_CONTROL_FRAME: usize = 1 << 20;
/// `channel` (u32) + source index (u16) + kind (u8) + the origin's send time (u32, ms).
pub(crate) const DATAGRAM_HEADER: usize = 11;
/// The one-way delay floor of a link is the least delay seen over the last one to two of these.
pub const DELAY_WINDOW_MS: u64 = 5_000;

/// A control message from an edge to the origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeMsg {
    /// First message: proves the edge may join the cluster.
    Hello {
        /// The cluster token (`--cluster-token`); None when the edge has none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Where this edge's viewers connect (its signalling socket), for the origin's director.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ws_url: Option<String>,
    },
    /// Start relaying this stream to the edge (its first viewer arrived).
    Subscribe {
        /// The stream's name.
        stream: String,
    },
    /// Stop relaying this stream to the edge (its last viewer left).
    Unsubscribe {
        /// The stream's name.
        stream: String,
    },
    /// A viewer needs a keyframe of this source's video.
    Keyframe {
        /// The stream's name.
        stream: String,
        /// The source's id; None = the main source.
        source: Option<String>,
    },
    /// This edge's voice activity says the source started (or stopped) talking.
    Talking {
        /// The stream's name.
        stream: String,
        /// The source's id.
        source: String,
        /// True when it started talking, false when it stopped.
        talking: bool,
    },
    /// A viewer at this edge asks to view `stream` with this bearer (none: an open stream):
    /// the origin's token policy decides, and signs the subscribe JWT (an edge cannot). Answered
    /// by `Authorized` or `Unauthorized` with the same `id`.
    Authorize {
        /// Chosen by the edge, echoed in the answer.
        id: u64,
        /// The stream the viewer asks for.
        stream: String,
        /// The viewer's bearer token or JWT; None = none given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
}

/// A control message from the origin to an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OriginMsg {
    /// Answer to `Hello`: the public key viewers' JWTs are checked with at the edge (Ed25519,
    /// base64 of the raw 32 bytes) and its id. It verifies; it cannot sign.
    Welcome {
        /// Base64 of the raw Ed25519 public key.
        jwt_key: String,
        /// The key's id, as JWTs name it in `kid`.
        key_id: String,
    },
    /// Answer to `Authorize`: the viewer may view; its subscribe JWT.
    Authorized {
        /// The `id` of the `Authorize` it answers.
        id: u64,
        /// The viewer's subscribe JWT.
        jwt: String,
    },
    /// Answer to `Authorize`: refused, with the HTTP status and message to give the viewer.
    Unauthorized {
        /// The `id` of the `Authorize` it answers.
        id: u64,
        /// The HTTP status to answer the viewer with.
        status: u16,
        /// The message to give the viewer.
        message: String,
    },
    /// The cluster token was wrong; the connection closes after this.
    Refused {
        /// Why, for the edge's log.
        reason: String,
    },
    /// The full source list of a subscribed stream, sent on subscribe and on every change.
    /// Datagrams for this stream carry `channel`.
    Sources {
        /// The stream's name.
        stream: String,
        /// Tags this stream's datagrams on this link.
        channel: u32,
        /// Every source the stream has now.
        sources: Vec<SourceInfo>,
    },
    /// A room member was removed: the edge ends its views and refuses its viewer JWTs.
    Revoke {
        /// The room's name.
        room: String,
        /// The removed member's id.
        member: String,
    },
}

/// One source of a stream, as the origin announces it to edges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Stable per stream for the life of the origin: datagrams carry it instead of the name.
    pub index: u16,
    /// None = the stream's main source (published without a sourceId).
    pub source_id: Option<String>,
    /// Its audio and video tracks, in the publisher's SDP order.
    pub tracks: Vec<TrackInfo>,
    /// Audio packets carry the RFC 6464 level as one-byte extension id [`LEVEL_EXT_ID`].
    pub audio_level: bool,
}

/// One track of a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// `audio` or `video`.
    pub media: String,
    /// The track's mid in the publisher's SDP.
    pub mid: String,
}

/// The extension id the origin uses for the audio level in relayed packets, whatever id the
/// publisher negotiated.
pub const LEVEL_EXT_ID: u8 = 1;

/// What a datagram's RTP packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An audio (Opus) packet.
    Audio = 0,
    /// A video packet.
    Video = 1,
}

/// The 11-byte tag in front of each relayed RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    /// The stream, as its `Sources` message named it.
    pub channel: u32,
    /// The source's [`SourceInfo::index`].
    pub source: u16,
    /// Audio or video.
    pub kind: Kind,
    /// When the origin handed the datagram to the link, in ms of its own clock
    /// ([`origin_clock_ms`]): the edge compares it with its own to see how long it queued.
    pub sent_ms: u32,
}

impl DatagramHeader {
    /// Appends the header's `DATAGRAM_HEADER` bytes to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.extend_from_slice(&self.source.to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
    }

    /// Splits a datagram into its header and RTP packet.
    pub(crate) fn parse(d: &[u8]) -> Option<(DatagramHeader, &[u8])> {
        if d.len() < DATAGRAM_HEADER {
            return None;
        }
        let kind = match d[6] {
            0 => Kind::Audio,
            1 => Kind::Video,
            _ => return None,
        };
        Some((
            DatagramHeader {
                channel: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                source: u16::from_be_bytes([d[4], d[5]]),
                kind,
                sent_ms: u32::from_be_bytes([d[7], d[8], d[9], d[10]]),
            },
            &d[DATAGRAM_HEADER..],
        ))
    }
}

/// The origin's clock for [`DatagramHeader::sent_ms`]: ms since the process first asked,
/// wrapping (only differences matter).
pub(crate) fn origin_clock_ms() -> u32 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

/// How long a link's datagrams queued on their way (origin send buffer, network queues, the
/// receiver's buffer), from their send stamps: the one-way delay of each, less the least delay
/// seen over the last [`DELAY_WINDOW_MS`] to twice that. The two clocks need not agree (only
/// their difference is used), and the window follows their drift.
#[derive(Debug, Default)]
pub(crate) struct LinkDelay {
    /// The first delay seen: later ones are kept relative to it, so wrapping clocks compare.
    base: Option<u32>,
    bucket: u64,
    cur_min: Option<i64>,
    prev_min: Option<i64>,
}

impl LinkDelay {
    /// The queueing age in ms of a datagram stamped `sent_ms` that arrived at `now_ms` (the
    /// receiver's clock).
    pub(crate) fn age_ms(&mut self, now_ms: u64, sent_ms: u32) -> u32 {
        let delay = (now_ms as u32).wrapping_sub(sent_ms);
        let base = *self.base.get_or_insert(delay);
        let rel = delay.wrapping_sub(base) as i32 as i64;
        let bucket = now_ms / DELAY_WINDOW_MS;
        if bucket != self.bucket {
            self.prev_min = if bucket == self.bucket + 1 {
                self.cur_min
            } else {
                None
            };
            self.cur_min = None;
            self.bucket = bucket;
        }
        let cur = self.cur_min.map_or(rel, |m| m.min(rel));
        self.cur_min = Some(cur);
        let floor = self.prev_min.map_or(cur, |p| p.min(cur));
        (rel - floor).clamp(0, u32::MAX as i64) as u32
    }
}

/// Encodes one control frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("control messages serialize");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A control frame that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is past `MAX_CONTROL_FRAME` (the length).
    TooLarge(usize),
    /// The body is not a valid message (the parser's message).
    Json(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => {
                write!(f, "control frame of {n} bytes exceeds {MAX_CONTROL_FRAME}")
            }
            FrameError::Json(e) => write!(f, "control frame is not a valid message: {e}"),
        }
    }
}

/// Accumulates stream bytes and yields whole frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has fully arrived.
    pub fn next_msg<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_CONTROL_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&self.buf[4..4 + len])
            .map_err(|e| FrameError::Json(e.to_string()));
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_arbitrary_splits() {
        let msgs = vec![
            EdgeMsg::Hello {
                token: None,
                ws_url: Some("ws://127.0.0.1:8081/ws".into()),
            },
            EdgeMsg::Subscribe {
                stream: "panel".into(),
            },
            EdgeMsg::Keyframe {
                stream: "panel".into(),
                source: Some("ana".into()),
            },
            EdgeMsg::Talking {
                stream: "panel".into(),
                source: "ana".into(),
                talking: true,
            },
            EdgeMsg::Authorize {
                id: 3,
                stream: "panel".into(),
                token: Some("t".into()),
            },
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(encode_frame).collect();
        for split in [1, 3, 7, bytes.len()] {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(split) {
                r.push(chunk);
                while let Some(m) = r.next_msg::<EdgeMsg>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs);
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut r = FrameReader::default();
        r.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            r.next_msg::<EdgeMsg>(),
            Err(FrameError::TooLarge(_))
        ));
        let mut r = FrameReader::default();
        r.push(&[0, 0, 0, 2, b'{', b'x']);
        assert!(matches!(r.next_msg::<EdgeMsg>(), Err(FrameError::Json(_))));
    }

    #[test]
    fn datagram_header_round_trip() {
        let h = DatagramHeader {
            channel: 9,
            source: 3,
            kind: Kind::Video,
            sent_ms: 0xDEAD_BEEF,
        };
        let mut d = Vec::new();
        h.write(&mut d);
        assert_eq!(d.len(), DATAGRAM_HEADER);
        d.extend_from_slice(b"rtp");
        assert_eq!(DatagramHeader::parse(&d), Some((h, &b"rtp"[..])));
        assert_eq!(DatagramHeader::parse(&d[..DATAGRAM_HEADER - 1]), None);
        d[6] = 9;
        assert_eq!(DatagramHeader::parse(&d), None);
    }

    #[test]
    fn link_delay_sees_queueing_whatever_the_clocks() {
        // The clocks are ~49 days apart and wrap in between; the path takes 20 ms.
        let offset: u32 = u32::MAX - 1_000;
        let sent =
            |edge_ms: u64, queued: u64| ((edge_ms - 20 - queued) as u32).wrapping_sub(offset);
        let mut l = LinkDelay::default();
        for t in (10_000..12_000).step_by(20) {
            assert_eq!(l.age_ms(t, sent(t, 0)), 0);
        }
        // A burst that sat 150 ms in a queue, then the queue drains.
        assert_eq!(l.age_ms(12_000, sent(12_000, 150)), 150);
        assert_eq!(l.age_ms(12_020, sent(12_020, 80)), 80);
        assert_eq!(l.age_ms(12_040, sent(12_040, 0)), 0);
        // The path gets 40 ms slower for good: after a window or two that is the new floor.
        for t in (12_060..30_000).step_by(20) {
            l.age_ms(t, sent(t, 40));
        }
        assert_eq!(l.age_ms(30_000, sent(30_000, 40)), 0);
    }
}
