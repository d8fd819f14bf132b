//! Redundant ingest: which of a source's feeds plays. Several publications may carry one
//! sourceId (a member on two devices, or an encoder and its backup, with the SDK's
//! `publish({priority})`); exactly one plays, the others stay connected as standby and one of
//! them takes over at once when the playing one ends. Nobody is closed for being second: that
//! closing is what made two clients of one sourceId replace each other forever (each one's SDK
//! reconnected and replaced the other).
//!
//! Sans-IO: feeds are plain numbers; the origin applies the choice.

/// Feeds (playing and standby) one sourceId holds at most: a main and a backup encoder, or a
/// member's phone and laptop, with room for one reconnecting; more is no redundancy but a
/// client in a loop, and each feed is a peer the origin keeps.
pub(crate) const MAX_FEEDS_PER_SOURCE: usize = 4;

/// One feed of a source, as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Feed {
    /// The publication number: a newer publication has a larger one.
    pub publication: u64,
    /// The publisher's `priority` (0 when it sent none), as Millicast takes it: any i32.
    pub priority: i32,
}

/// The standby that makes room when a source already holds [`MAX_FEEDS_PER_SOURCE`] feeds and
/// another publish comes: the one that would play last (the lowest priority, the oldest among
/// equals). The newest publish always gets in: refusing it would leave the publisher the user is
/// looking at silent behind three stale feeds (a client that reconnects in a loop, a WHIP
/// client that never sent DELETE).
pub(crate) fn evicted(standby: impl IntoIterator<Item = Feed>) -> Option<Feed> {
    standby
        .into_iter()
        .min_by_key(|f| (f.priority, f.publication))
}

/// The feed that plays: the highest priority; among equal priorities the newest (the
/// publisher that came last is the one its user is looking at). None for no feeds.
pub(crate) fn playing(feeds: impl IntoIterator<Item = Feed>) -> Option<Feed> {
    feeds
        .into_iter()
        .max_by_key(|f| (f.priority, f.publication))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_standby_that_would_play_last_makes_room() {
        let f = |publication, priority| super::Feed {
            publication,
            priority,
        };
        assert_eq!(super::evicted([]), None);
        assert_eq!(super::evicted([f(3, 0), f(2, 0), f(4, 1)]), Some(f(2, 0)));
        assert_eq!(super::evicted([f(3, 0), f(5, -1), f(4, 1)]), Some(f(5, -1)));
    }

    use super::*;

    fn f(publication: u64, priority: i32) -> Feed {
        Feed {
            publication,
            priority,
        }
    }

    #[test]
    fn the_highest_priority_plays_then_the_newest() {
        assert_eq!(playing([]), None);
        assert_eq!(playing([f(1, 0)]), Some(f(1, 0)));
        // Equal priority: the newest.
        assert_eq!(playing([f(1, 0), f(2, 0)]), Some(f(2, 0)));
        // A newer feed of lower priority stays standby.
        assert_eq!(playing([f(1, 5), f(2, 0)]), Some(f(1, 5)));
        assert_eq!(playing([f(3, -1), f(1, 5), f(2, 5)]), Some(f(2, 5)));
        // The whole i32 range.
        assert_eq!(
            playing([f(1, i32::MIN), f(2, i32::MAX), f(3, 0)]),
            Some(f(2, i32::MAX))
        );
        // The order given does not matter.
        assert_eq!(playing([f(2, 0), f(1, 0)]), Some(f(2, 0)));
    }
}
