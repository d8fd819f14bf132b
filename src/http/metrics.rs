//! Prometheus text exposition of what this process does.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::App;
use crate::edge::Edge;
use crate::origin::Origin;
use crate::rtc::peers::{ConnectSlot, PeerStats};

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// How a media thread's peers ended, by reason.
fn peers_closed(out: &mut String, name: &str, p: &PeerStats) {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric(
        out,
        name,
        "counter",
        "Peers ended, by reason (connect_timeout: answered, never connected in time).",
        &[
            ("reason=\"removed\"", g(&p.closed_removed)),
            ("reason=\"connect_timeout\"", g(&p.closed_connect_timeout)),
            ("reason=\"ice_timeout\"", g(&p.closed_ice_timeout)),
            ("reason=\"remote_closed\"", g(&p.closed_remote)),
            ("reason=\"failed\"", g(&p.closed_failed)),
        ],
    );
}

/// The ICE-TCP connections a media side dropped, by reason (`crate::rtc::tcp`): samples of
/// its `_dropped_total`, where they count connections, not packets.
fn tcp_dropped(p: &PeerStats) -> [(&'static str, u64); 5] {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let t = &p.tcp;
    [
        ("tcp_limit", g(&t.limit)),
        ("tcp_refused", g(&t.refused)),
        ("tcp_bad_frame", g(&t.bad_frame)),
        ("tcp_idle", g(&t.idle)),
        ("tcp_slow", g(&t.slow)),
    ]
}

/// What the origin did not relay, by reason: `chorus_origin_dropped_total` and the dashboard.
pub(crate) fn origin_drops(o: &Origin) -> Vec<(&'static str, u64)> {
    let (m, p) = (&o.metrics, o.peer_stats());
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        ("padding", g(&m.padding_dropped)),
        ("muted", g(&m.muted_dropped)),
        ("relay", g(&m.relay_drops)),
        ("undeclared_ssrc", g(&p.undeclared_ssrc)),
    ]
    .into_iter()
    .chain(peer_drops(p, "publisher_flood"))
    .chain(recording_dropped(o.recorder().map(|r| &*r.stats)))
    .collect()
}

/// What a media thread's socket dropped, by reason (`flood`: the name of its flood drops).
fn peer_drops(p: &PeerStats, flood: &'static str) -> impl Iterator<Item = (&'static str, u64)> {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        (flood, g(&p.flood_drops)),
        ("unroutable", g(&p.unroutable)),
        ("stun_refused", g(&p.stun_refused)),
        // Consent checks of peers the server ended: answered with a STUN 403.
        ("stun_ended", g(&p.stun_ended)),
        ("udp_send", g(&p.send_errors)),
    ]
    .into_iter()
    .chain(tcp_dropped(p))
}

/// Datagrams to edges lost on the link, by reason: `chorus_origin_relay_dropped_total` and
/// the dashboard.
pub(crate) fn relay_drops(o: &Origin) -> Vec<(&'static str, u64)> {
    crate::origin::RelayDrop::ALL
        .iter()
        .map(|r| {
            let n = o.metrics.relay_drops_by[*r as usize].load(Ordering::Relaxed);
            (r.label(), n)
        })
        .collect()
}

/// What the edge dropped, by reason: `chorus_edge_dropped_total` and the dashboard.
pub(crate) fn edge_drops(e: &Edge) -> Vec<(&'static str, u64)> {
    let m = &e.metrics;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        ("unknown_source", g(&m.dropped_unknown)),
        ("unknown_channel", g(&m.dropped_unknown_channel)),
        ("malformed", g(&m.dropped_malformed)),
        ("red_opaque", g(&m.dropped_red_opaque)),
        ("relay_malformed", g(&m.dropped_relay_malformed)),
        ("lane_full", g(&m.dropped_lane_full)),
        ("stale", g(&m.dropped_stale)),
        ("core", g(&m.dropped_core)),
        ("before_switch", g(&m.dropped_before_switch)),
        ("preroll_missing", g(&m.dropped_preroll_missing)),
        ("replay_full", g(&m.dropped_replay_full)),
        ("viewer_before_switch", g(&m.dropped_viewer_before_switch)),
        ("not_negotiated", g(&m.dropped_not_negotiated)),
        ("seal", g(&m.dropped_seal)),
    ]
    .into_iter()
    .chain(peer_drops(&m.peers, "viewer_flood"))
    .collect()
}

/// A counter with one sample per `reason`.
fn by_reason(out: &mut String, name: &str, help: &str, drops: &[(&str, u64)]) {
    let labels: Vec<(String, u64)> = drops
        .iter()
        .map(|(r, v)| (format!("reason=\"{r}\""), *v))
        .collect();
    let samples: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(out, name, "counter", help, &samples);
}

/// `{prefix}_ice_tcp_connections_total`: accepted, and closed by their clients.
fn tcp_connections(out: &mut String, name: &str, p: &PeerStats) {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric(
        out,
        name,
        "counter",
        "ICE-TCP connections accepted, and closed by their clients (drops are in _dropped_total, reason tcp_*).",
        &[
            ("event=\"accepted\"", g(&p.tcp.accepted)),
            ("event=\"closed\"", g(&p.tcp.closed)),
        ],
    );
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut out = String::new();
    let (unconnected, refused) = ConnectSlot::gauges();
    metric(
        &mut out,
        "chorus_unconnected_peers",
        "gauge",
        "Answered peers (publishers and viewers) not connected yet.",
        &[("", unconnected as u64)],
    );
    metric(
        &mut out,
        "chorus_unconnected_refused_total",
        "counter",
        "Offers refused because too many answered peers were still connecting.",
        &[("", refused)],
    );
    if let Some(o) = &app.origin {
        let m = &o.metrics;
        let p = o.peer_stats();
        let (streams, sources, edges) = o.gauges();
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        metric(
            &mut out,
            "chorus_origin_streams",
            "gauge",
            "Streams with a source or an edge.",
            &[("", streams as u64)],
        );
        metric(
            &mut out,
            "chorus_origin_sources",
            "gauge",
            "Live publications.",
            &[("", sources as u64)],
        );
        metric(
            &mut out,
            "chorus_origin_edge_subscriptions",
            "gauge",
            "Edge subscriptions to streams.",
            &[("", edges as u64)],
        );
        metric(
            &mut out,
            "chorus_origin_packets_in_total",
            "counter",
            "RTP packets received from publishers.",
            &[
                ("kind=\"audio\"", g(&m.audio_packets)),
                ("kind=\"video\"", g(&m.video_packets)),
            ],
        );
        metric(
            &mut out,
            "chorus_origin_bytes_in_total",
            "counter",
            "Payload bytes received from publishers.",
            &[("", g(&m.bytes_in))],
        );
        metric(
            &mut out,
            "chorus_origin_red_packets_total",
            "counter",
            "RED (RFC 2198) packets relayed (publishers that negotiated RED send only those); opaque: blocks that do not parse (end-to-end encrypted, or broken), relayed untouched.",
            &[("", g(&m.red_packets)), ("kind=\"opaque\"", g(&m.red_malformed))],
        );
        by_reason(
            &mut out,
            "chorus_origin_dropped_total",
            "Packets not relayed, by reason (tcp_*: ICE-TCP connections closed).",
            &origin_drops(o),
        );
        if let Some(r) = o.recorder() {
            metric(
                &mut out,
                "chorus_origin_recordings_total",
                "counter",
                "Recordings opened (a stream's first recorded feed).",
                &[("", g(&r.stats.recordings))],
            );
            metric(
                &mut out,
                "chorus_origin_recorded_frames_total",
                "counter",
                "20 ms frames written to recordings, fillers included.",
                &[("", g(&r.stats.frames))],
            );
        }
        tcp_connections(&mut out, "chorus_origin_ice_tcp_connections_total", p);
        peers_closed(&mut out, "chorus_origin_peers_closed_total", p);
        by_reason(
            &mut out,
            "chorus_origin_relay_dropped_total",
            "Datagrams to edges lost on the link, by reason (send_buffer_full: the link's datagram buffer was full and quinn dropped the oldest queued one).",
            &relay_drops(o),
        );
        metric(
            &mut out,
            "chorus_origin_relay_datagrams_total",
            "counter",
            "Datagrams sent to edges.",
            &[("", g(&m.relay_datagrams))],
        );
        metric(
            &mut out,
            "chorus_origin_publications_total",
            "counter",
            "Publications accepted.",
            &[("", g(&m.publications_total))],
        );
        metric(
            &mut out,
            "chorus_origin_replacements_total",
            "counter",
            "Publications that took over from a live feed of the same sourceId (which stays connected as standby).",
            &[("", g(&m.replacements_total))],
        );
        metric(
            &mut out,
            "chorus_origin_standby_evicted_total",
            "counter",
            "Standby feeds closed to make room for a newer publish of their sourceId (at most 4 feeds a source).",
            &[("", g(&m.standby_evicted))],
        );
        metric(
            &mut out,
            "chorus_origin_publish_refused_total",
            "counter",
            "Publish attempts refused by a stream's source limits.",
            &[
                ("reason=\"sources_per_stream\"", g(&m.refused_sources_limit)),
                ("reason=\"index_space\"", g(&m.refused_index_space)),
            ],
        );
    }
    if let Some(r) = &app.rooms {
        let g = r.gauges();
        let m = &r.metrics;
        let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        metric(
            &mut out,
            "chorus_rooms",
            "gauge",
            "Rooms with a connected participant.",
            &[("", g.rooms as u64)],
        );
        metric(
            &mut out,
            "chorus_room_participants",
            "gauge",
            "Participants connected to a room socket, by role.",
            &[
                ("role=\"member\"", g.members as u64),
                ("role=\"audience\"", (g.participants - g.members) as u64),
            ],
        );
        metric(
            &mut out,
            "chorus_room_joins_total",
            "counter",
            "Room sockets opened.",
            &[("", c(&m.joins))],
        );
        metric(
            &mut out,
            "chorus_room_role_changes_total",
            "counter",
            "Promotions, demotions and removals.",
            &[
                ("change=\"promote\"", c(&m.promotions)),
                ("change=\"demote\"", c(&m.demotions)),
                ("change=\"remove\"", c(&m.removals)),
            ],
        );
        let d = &app.dashboard;
        metric(
            &mut out,
            "chorus_dashboard_clients",
            "gauge",
            "Live dashboards connected (at most 8).",
            &[("", d.clients() as u64)],
        );
        metric(
            &mut out,
            "chorus_dashboard_snapshots_total",
            "counter",
            "Dashboard snapshots: made, skipped by a slow client (it got a later one), and clients refused over the cap.",
            &[
                ("event=\"made\"", c(&d.metrics.snapshots)),
                ("event=\"skipped\"", c(&d.metrics.skipped)),
                ("event=\"client_refused\"", c(&d.metrics.refused)),
            ],
        );
    }
    if let Some(e) = &app.edge {
        let m = &e.metrics;
        let p = &m.peers;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        metric(
            &mut out,
            "chorus_edge_authorize_total",
            "counter",
            "Viewers this edge asked its origin about, by answer.",
            &[
                ("result=\"allowed\"", g(&m.authorize_allowed)),
                ("result=\"refused\"", g(&m.authorize_refused)),
                ("result=\"unavailable\"", g(&m.authorize_unavailable)),
            ],
        );
        metric(
            &mut out,
            "chorus_edge_viewers",
            "gauge",
            "Connected viewers.",
            &[("", g(&m.viewers))],
        );
        metric(
            &mut out,
            "chorus_edge_viewers_total",
            "counter",
            "Viewer offers answered.",
            &[("", g(&m.viewers_total))],
        );
        metric(
            &mut out,
            "chorus_edge_relay_packets_total",
            "counter",
            "Packets received from the origin.",
            &[("", g(&m.relay_packets))],
        );
        metric(
            &mut out,
            "chorus_edge_packets_out_total",
            "counter",
            "Packets written to viewers' multiplexed tracks.",
            &[("", g(&m.packets_out))],
        );
        metric(
            &mut out,
            "chorus_edge_red_packets_total",
            "counter",
            "RED (RFC 2198) packets written to viewers: passed as RED, unwrapped to their primary Opus block for viewers without RED, and (a subset of red) with a previous feed's redundant blocks stripped after a switch.",
            &[
                ("how=\"red\"", g(&m.red_out)),
                ("how=\"unwrapped\"", g(&m.red_unwrapped)),
                ("how=\"stripped\"", g(&m.red_stripped)),
                ("how=\"opaque\"", g(&m.red_opaque)),
            ],
        );
        metric(
            &mut out,
            "chorus_edge_preroll_packets_total",
            "counter",
            "Held packets replayed into a track as its source entered it (pre-roll), per group of viewers.",
            &[("", g(&m.preroll_packets))],
        );
        by_reason(
            &mut out,
            "chorus_edge_dropped_total",
            "Packets dropped at the edge, by reason (unknown_channel, lane_full and stale count per media thread: each gets its own copy; tcp_*: ICE-TCP connections closed).",
            &edge_drops(e),
        );
        tcp_connections(&mut out, "chorus_edge_ice_tcp_connections_total", p);
        peers_closed(&mut out, "chorus_edge_peers_closed_total", p);
        metric(
            &mut out,
            "chorus_edge_interned_names",
            "gauge",
            "sourceIds held by the packet cores: live sources and those current views name.",
            &[("", g(&m.interned_names))],
        );
        metric(
            &mut out,
            "chorus_edge_lane_commands_dropped_total",
            "counter",
            "Commands a stuck media thread's lane could not take.",
            &[("", g(&m.lane_control_full))],
        );
        metric(
            &mut out,
            "chorus_edge_link_requests_dropped_total",
            "counter",
            "Media threads' requests to the origin link (subscriptions, keyframes, talking) dropped for a full queue.",
            &[("", m.link_requests_dropped.load(Ordering::Relaxed))],
        );
        metric(
            &mut out,
            "chorus_edge_link_losses_total",
            "counter",
            "Times the link to the origin was lost (viewers were told their sources went inactive).",
            &[("", g(&m.link_losses))],
        );
        metric(
            &mut out,
            "chorus_edge_direct_viewers_total",
            "counter",
            "Viewers whose audio the edge seals and sends itself (AES-GCM SRTP), since start.",
            &[("", g(&m.direct_viewers))],
        );
        let l = &p.lean;
        metric(
            &mut out,
            "chorus_edge_lean_viewers_total",
            "counter",
            "Viewers that left str0m after their handshake (switched), and whose str0m state the DTLS grace then dropped.",
            &[
                ("state=\"switched\"", g(&p.lean_switched)),
                ("state=\"str0m_dropped\"", g(&p.lean_str0m_dropped)),
            ],
        );
        metric(
            &mut out,
            "chorus_edge_lean_rtcp_total",
            "counter",
            "What lean viewers' ICE consent checks and SRTCP brought and what the edge answered.",
            &[
                ("kind=\"stun_answered\"", g(&l.stun_answered)),
                ("kind=\"sender_reports\"", g(&l.sr_sent)),
                ("kind=\"rr_blocks\"", g(&l.rr_blocks)),
                ("kind=\"rr_lost_packets\"", g(&l.rr_lost)),
                ("kind=\"nack_requested\"", g(&l.nack_requested)),
                ("kind=\"nack_resent\"", g(&l.nack_resent)),
                ("kind=\"nack_missed\"", g(&l.nack_missed)),
                ("kind=\"pli\"", g(&l.pli)),
            ],
        );
        metric(
            &mut out,
            "chorus_edge_lean_dropped_total",
            "counter",
            "Datagrams from lean viewers dropped, by reason.",
            &[
                ("reason=\"stun_refused\"", g(&l.stun_refused)),
                ("reason=\"srtcp_unauthenticated\"", g(&l.unauthenticated)),
                ("reason=\"rtcp_malformed\"", g(&l.malformed)),
                ("reason=\"unexpected\"", g(&l.unexpected)),
            ],
        );
        metric(
            &mut out,
            "chorus_edge_udp_datagrams_sent_total",
            "counter",
            "Datagrams the viewers' socket sent (media, RTCP, ICE, DTLS).",
            &[("", g(&p.sent))],
        );
        metric(
            &mut out,
            "chorus_edge_sendmmsg_calls_total",
            "counter",
            "sendmmsg calls those datagrams took.",
            &[("", g(&p.send_calls))],
        );
        metric(
            &mut out,
            "chorus_edge_switches_total",
            "counter",
            "Multiplexed track changes.",
            &[("", g(&m.switches))],
        );
        metric(
            &mut out,
            "chorus_edge_events_total",
            "counter",
            "Events sent to viewers.",
            &[
                ("name=\"vad\"", g(&m.vad_events)),
                ("name=\"active\"", g(&m.active_events)),
            ],
        );
    }
    if let Some(h) = app.hooks.metrics() {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        metric(
            &mut out,
            "chorus_webhook_delivered_total",
            "counter",
            "Webhook events the receiver answered 2xx.",
            &[("", g(&h.delivered))],
        );
        metric(
            &mut out,
            "chorus_webhook_failed_attempts_total",
            "counter",
            "Webhook POSTs that failed (no connection, timeout, 5xx, 408, 429).",
            &[("", g(&h.failed_attempts))],
        );
        metric(
            &mut out,
            "chorus_webhook_dropped_total",
            "counter",
            "Webhook events not delivered, by reason.",
            &[
                ("reason=\"queue_full\"", g(&h.dropped_queue_full)),
                ("reason=\"gave_up\"", g(&h.dropped_gave_up)),
                ("reason=\"rejected\"", g(&h.dropped_rejected)),
            ],
        );
    }
    app.http_metrics.write(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The recorder's drops (`chorus_origin_dropped_total`), when the origin records.
fn recording_dropped(stats: Option<&crate::recording::RecorderStats>) -> Vec<(&'static str, u64)> {
    let Some(r) = stats else { return Vec::new() };
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    vec![
        ("recording_full", g(&r.queue_full)),
        ("recording_too_large", g(&r.too_large)),
        ("recording_late", g(&r.late)),
        ("recording_unknown_feed", g(&r.unknown)),
        ("recording_write_error", g(&r.write_errors)),
    ]
}
