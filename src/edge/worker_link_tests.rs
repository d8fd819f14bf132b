//! The media thread's side of the origin link: source lists, channels and a lost link.

use super::*;
use crate::relay::proto::TrackInfo;

fn worker() -> Worker {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (link, _rx) = LinkCtl::detached();
    let bell = Doorbell::new().unwrap();
    Worker::new(socket, link, Arc::default(), bell, Arc::default()).unwrap()
}

fn source(index: u16, id: &str) -> SourceInfo {
    SourceInfo {
        index,
        source_id: Some(id.into()),
        tracks: vec![TrackInfo {
            media: "audio".into(),
            mid: "0".into(),
        }],
        audio_level: true,
    }
}

/// A stream followed by this thread, with one viewer whose events land in the returned queue.
fn follow(w: &mut Worker, name: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let mut st = EdgeStream::new(1);
    let group = st.core.join(GroupKey::new(1, None, []));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    st.viewers.insert(
        PeerId(1),
        ViewerHandle {
            events: tx,
            group,
            mids: vec!["1".into()],
        },
    );
    st.groups.insert(group, vec![PeerId(1)]);
    w.streams.insert(name.to_owned(), st);
    rx
}

fn names(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(v) = rx.try_recv() {
        out.push(format!(
            "{} {}",
            v["name"].as_str().unwrap(),
            v["data"]["sourceId"].as_str().unwrap_or("-")
        ));
    }
    out
}

#[test]
fn a_restarted_origin_renumbering_channels_reaches_every_stream() {
    let mut w = worker();
    let mut a = follow(&mut w, "a");
    let mut z = follow(&mut w, "z");
    // The old origin: z subscribed first.
    w.sources("z", 1, vec![source(0, "zed")]);
    w.sources("a", 2, vec![source(0, "ana"), source(1, "bo")]);
    assert_eq!(names(&mut a), ["active ana", "active bo"]);
    assert_eq!(names(&mut z), ["active zed"]);
    // The link goes: every active source goes inactive, no `stopped`.
    w.link_down();
    assert_eq!(names(&mut a), ["inactive ana", "inactive bo"]);
    assert_eq!(names(&mut z), ["inactive zed"]);
    assert!(w.channels.is_empty() && w.known_channels.is_empty());
    // The new origin numbers the streams in name order, and bo published first this time.
    w.sources("a", 1, vec![source(0, "bo"), source(1, "ana")]);
    w.sources("z", 2, vec![source(0, "zed")]);
    assert_eq!(names(&mut a), ["active bo", "active ana"]);
    assert_eq!(names(&mut z), ["active zed"]);
    assert_eq!(w.channels.get(&1).map(String::as_str), Some("a"));
    assert_eq!(w.channels.get(&2).map(String::as_str), Some("z"));
    let st = &w.streams["a"];
    let bo = st.core.lookup("bo").unwrap();
    let ana = st.core.lookup("ana").unwrap();
    assert_eq!(st.by_relay.get(&0), Some(&bo));
    assert_eq!(st.by_relay.get(&1), Some(&ana));
    assert!(st.core.is_live(bo) && st.core.is_live(ana));
}

#[test]
fn a_source_list_forgets_indices_it_no_longer_names() {
    let mut w = worker();
    let _a = follow(&mut w, "a");
    w.sources("a", 1, vec![source(0, "ana"), source(1, "bo")]);
    w.sources("a", 1, vec![source(1, "bo")]);
    let st = &w.streams["a"];
    assert_eq!(st.by_relay.get(&0), None);
    // Gone: not live, and (no view names it) its name released by the core.
    assert!(st.core.lookup("ana").is_none_or(|i| !st.core.is_live(i)));
}

#[test]
fn swapped_channels_keep_both_streams_mapped_even_without_a_link_down() {
    let mut w = worker();
    let _a = follow(&mut w, "a");
    let _z = follow(&mut w, "z");
    w.sources("z", 1, vec![source(0, "zed")]);
    w.sources("a", 2, vec![source(0, "ana")]);
    // a takes 1 from z, then z takes 2 from a: neither may unmap the other's new channel.
    w.sources("a", 1, vec![source(0, "ana")]);
    w.sources("z", 2, vec![source(0, "zed")]);
    assert_eq!(w.channels.get(&1).map(String::as_str), Some("a"));
    assert_eq!(w.channels.get(&2).map(String::as_str), Some("z"));
}
