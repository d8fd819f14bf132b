//! Who talks, per stream, from the edge's own voice activity: once a tick the edge core hands
//! every stream's packet core to [`TalkingWatch::update`], which tells the origin (a link request
//! in the core's output) each time a source starts or stops talking. Rooms turn that into `member.talking` events.
//! Talking is the packet core's judgement (a talkspurt or its hangover), so short pauses between
//! words do not flicker. Nothing is allocated per tick, only per flip.

use std::collections::HashMap;

use crate::media::activity::Voice;
use crate::media::stream::StreamCore;
use crate::media::SourceIdx;

/// Where the flips go: the edge core's output queue (a trait so tests can watch).
pub(crate) trait TalkingSink {
    fn talking(&mut self, stream: &str, source: &str, talking: bool);
}

#[derive(Default)]
pub(crate) struct TalkingWatch {
    /// Stream -> (the update it was last seen in, the sources reported talking).
    streams: HashMap<String, (u64, Vec<(SourceIdx, String)>)>,
    updates: u64,
}

impl TalkingWatch {
    /// Compares every live source's voice with what was last reported and reports the flips. A
    /// stream no longer listed (its last viewer left this edge) reports its talkers as silent.
    pub(crate) fn update<'a>(
        &mut self,
        streams: impl Iterator<Item = (&'a String, &'a StreamCore)>,
        now_us: u64,
        sink: &mut impl TalkingSink,
    ) {
        self.updates += 1;
        let now = self.updates;
        for (name, core) in streams {
            let entry = match self.streams.get_mut(name.as_str()) {
                Some(e) => e,
                None => self.streams.entry(name.clone()).or_default(),
            };
            entry.0 = now;
            let talkers = &mut entry.1;
            for s in core.live_sources() {
                let talking = core.voice(s, now_us) != Voice::Silent;
                // By name too: an index released and reused between two updates is another source.
                let known = talkers
                    .iter()
                    .position(|(i, n)| *i == s && n == core.name(s));
                match (talking, known) {
                    (true, None) => {
                        talkers.push((s, core.name(s).to_owned()));
                        sink.talking(name, core.name(s), true);
                    }
                    (false, Some(k)) => {
                        talkers.swap_remove(k);
                        sink.talking(name, core.name(s), false);
                    }
                    _ => {}
                }
            }
            // Talkers whose source went away.
            talkers.retain(|(s, source)| {
                let live = core.is_live(*s) && core.name(*s) == source;
                if !live {
                    sink.talking(name, source, false);
                }
                live
            });
        }
        self.streams.retain(|name, (seen, talkers)| {
            if *seen != now {
                for (_, source) in talkers.iter() {
                    sink.talking(name, source, false);
                }
            }
            *seen == now
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::stream::{CoreConfig, SourceConfig};
    use std::cell::RefCell;

    #[derive(Default)]
    struct Seen(RefCell<Vec<(String, String, bool)>>);

    impl TalkingSink for Seen {
        fn talking(&mut self, stream: &str, source: &str, talking: bool) {
            self.0
                .borrow_mut()
                .push((stream.into(), source.into(), talking));
        }
    }

    /// An RTP packet with an RFC 6464 level (extension id 1).
    fn packet(seq: u16, level: u8) -> Vec<u8> {
        let mut p = vec![0x90, 111];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 960).to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, level, 0, 0]);
        p.extend_from_slice(&[0x78; 40]);
        p
    }

    #[test]
    fn flips_are_reported_once_and_a_vanished_stream_goes_silent() {
        let mut core = StreamCore::new(CoreConfig::default());
        let ana = core.publish(
            "ana",
            SourceConfig {
                level_ext_id: Some(1),
            },
        );
        let name = "room".to_owned();
        let (mut w, mut seen) = (TalkingWatch::default(), Seen::default());
        let mut t = 0;
        // Quiet, then loud speech for a second: one "talking" flip.
        for seq in 0..150u16 {
            let level = if seq < 100 { 90 } else { 20 + (seq % 7) as u8 };
            core.on_packet(t, ana, &packet(seq, level), &mut |_| {})
                .unwrap();
            w.update(std::iter::once((&name, &core)), t, &mut seen);
            t += 20_000;
        }
        let flips = seen.0.borrow().clone();
        assert_eq!(flips, vec![("room".into(), "ana".into(), true)]);
        // Silence long past the hangover: one "silent" flip.
        for _ in 0..100 {
            w.update(std::iter::once((&name, &core)), t, &mut seen);
            t += 20_000;
        }
        assert_eq!(seen.0.borrow().len(), 2);
        assert!(!seen.0.borrow()[1].2);
        // Talking again, then the stream vanishes from the edge.
        for seq in 150..200u16 {
            core.on_packet(t, ana, &packet(seq, 20 + (seq % 5) as u8), &mut |_| {})
                .unwrap();
            w.update(std::iter::once((&name, &core)), t, &mut seen);
            t += 20_000;
        }
        assert!(seen.0.borrow()[2].2);
        w.update(std::iter::empty(), t, &mut seen);
        assert_eq!(
            seen.0.borrow().last().unwrap(),
            &("room".into(), "ana".into(), false)
        );
        assert!(w.streams.is_empty());
    }
}
