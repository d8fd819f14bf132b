//! The origin-edge wire format (`chorus::relay::proto`) on arbitrary input.
//!
//! 1. A `FrameReader` fed arbitrary bytes in arbitrary chunks, read as `EdgeMsg` (what the origin
//!    reads) and as `OriginMsg` (what the edge reads): never panics, refuses only frames over
//!    `MAX_CONTROL_FRAME`, and yields the same messages (and the same first error) however the
//!    bytes are split. After an error the reader is abandoned, as the relay
//!    closes the connection.
//! 2. `DatagramHeader::parse` on arbitrary bytes: `Some` only for 7+ bytes with a known kind, and
//!    `write` reproduces the 7 header bytes exactly.
//! 3. Round trip: arbitrary messages of both directions, `encode_frame`d back to back and fed in
//!    arbitrary chunks, read back equal and in order.
#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use chorus::fuzzing::{DatagramHeaderFuzz, DATAGRAM_HEADER, MAX_CONTROL_FRAME};
use chorus::relay::proto::{
    encode_frame, DatagramHeader, EdgeMsg, FrameError, FrameReader, Kind, OriginMsg, SourceInfo,
    TrackInfo,
};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    match mode % 3 {
        0 => {
            let rest = u.take_rest();
            datagram(rest);
            // Byte 0 of the rest says how to split the stream bytes that follow.
            if let Some((&split, bytes)) = rest.split_first() {
                stream::<EdgeMsg>(bytes, split);
                stream::<OriginMsg>(bytes, split);
            }
        }
        1 => {
            let _ = round_trip(&mut u);
        }
        _ => datagram(u.take_rest()),
    }
});

/// What a reader yields from `bytes`: the messages, then the first error if there is one.
fn read_all<T>(bytes: &[u8], chunks: impl Iterator<Item = usize>) -> (Vec<T>, Option<FrameError>)
where
    T: for<'de> Deserialize<'de>,
{
    let mut r = FrameReader::default();
    let mut got = Vec::new();
    let mut at = 0;
    let mut chunks = chunks;
    while at < bytes.len() {
        let n = chunks
            .next()
            .unwrap_or(bytes.len())
            .clamp(1, bytes.len() - at);
        r.push(&bytes[at..at + n]);
        at += n;
        loop {
            match r.next_msg::<T>() {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(e) => {
                    if let FrameError::TooLarge(len) = e {
                        assert!(len > MAX_CONTROL_FRAME, "refused a {len}-byte frame");
                    }
                    return (got, Some(e));
                }
            }
        }
    }
    (got, None)
}

fn stream<T>(bytes: &[u8], split: u8)
where
    T: for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let whole = read_all::<T>(bytes, std::iter::once(bytes.len()));
    // Chunk sizes 1..=split cycling, from the split byte (1 = byte by byte).
    let step = usize::from(split % 16) + 1;
    let sizes = (0..).map(move |i| i % step + 1);
    let chunked = read_all::<T>(bytes, sizes);
    assert_eq!(whole, chunked, "split every 1..={step} bytes");
}

fn datagram(d: &[u8]) {
    match DatagramHeader::parse(d) {
        Some((h, rtp)) => {
            assert!(d.len() >= DATAGRAM_HEADER);
            assert!(matches!(d[6], 0 | 1));
            assert_eq!(rtp, &d[DATAGRAM_HEADER..]);
            assert_eq!(h.kind, if d[6] == 0 { Kind::Audio } else { Kind::Video });
            let mut out = Vec::new();
            h.write(&mut out);
            assert_eq!(out, &d[..DATAGRAM_HEADER]);
        }
        None => assert!(
            d.len() < DATAGRAM_HEADER || d[6] > 1,
            "refused a valid header"
        ),
    }
}

fn opt_string(u: &mut Unstructured) -> Result<Option<String>> {
    u.arbitrary()
}

fn edge_msg(u: &mut Unstructured) -> Result<EdgeMsg> {
    Ok(match u.int_in_range(0..=5)? {
        0 => EdgeMsg::Hello {
            token: opt_string(u)?,
            ws_url: opt_string(u)?,
        },
        1 => EdgeMsg::Subscribe {
            stream: u.arbitrary()?,
        },
        2 => EdgeMsg::Unsubscribe {
            stream: u.arbitrary()?,
        },
        3 => EdgeMsg::Keyframe {
            stream: u.arbitrary()?,
            source: opt_string(u)?,
        },
        4 => EdgeMsg::Talking {
            stream: u.arbitrary()?,
            source: u.arbitrary()?,
            talking: u.arbitrary()?,
        },
        _ => EdgeMsg::Authorize {
            id: u.arbitrary()?,
            stream: u.arbitrary()?,
            token: opt_string(u)?,
        },
    })
}

fn origin_msg(u: &mut Unstructured) -> Result<OriginMsg> {
    Ok(match u.int_in_range(0..=5)? {
        0 => OriginMsg::Welcome {
            jwt_key: u.arbitrary()?,
            key_id: u.arbitrary()?,
        },
        1 => OriginMsg::Refused {
            reason: u.arbitrary()?,
        },
        2 => OriginMsg::Authorized {
            id: u.arbitrary()?,
            jwt: u.arbitrary()?,
        },
        3 => OriginMsg::Unauthorized {
            id: u.arbitrary()?,
            status: u.arbitrary()?,
            message: u.arbitrary()?,
        },
        4 => OriginMsg::Revoke {
            room: u.arbitrary()?,
            member: u.arbitrary()?,
        },
        _ => {
            let n = u.int_in_range(0..=8)?;
            let mut sources = Vec::with_capacity(n);
            for _ in 0..n {
                let t = u.int_in_range(0..=3)?;
                let mut tracks = Vec::with_capacity(t);
                for _ in 0..t {
                    tracks.push(TrackInfo {
                        media: u.arbitrary()?,
                        mid: u.arbitrary()?,
                    });
                }
                sources.push(SourceInfo {
                    index: u.arbitrary()?,
                    source_id: opt_string(u)?,
                    tracks,
                    audio_level: u.arbitrary()?,
                });
            }
            OriginMsg::Sources {
                stream: u.arbitrary()?,
                channel: u.arbitrary()?,
                sources,
            }
        }
    })
}

fn round_trip(u: &mut Unstructured) -> Result<()> {
    let n = u.int_in_range(1..=6)?;
    let (mut edge, mut origin) = (Vec::new(), Vec::new());
    for _ in 0..n {
        edge.push(edge_msg(u)?);
        origin.push(origin_msg(u)?);
    }
    let edge_bytes: Vec<u8> = edge.iter().flat_map(encode_frame).collect();
    let origin_bytes: Vec<u8> = origin.iter().flat_map(encode_frame).collect();
    let sizes: Vec<usize> = Vec::<u8>::arbitrary(u)?
        .into_iter()
        .map(|s| usize::from(s) + 1)
        .collect();
    let got = read_all::<EdgeMsg>(&edge_bytes, sizes.clone().into_iter().cycle());
    assert_eq!(got, (edge, None), "EdgeMsg round trip");
    let got = read_all::<OriginMsg>(&origin_bytes, sizes.into_iter().cycle());
    assert_eq!(got, (origin, None), "OriginMsg round trip");
    Ok(())
}
