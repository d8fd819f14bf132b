//! Prometheus text exposition of what this process does.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::App;

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

pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut out = String::new();
    if let Some(o) = &app.origin {
        let m = &o.metrics;
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
            "chorus_origin_dropped_total",
            "counter",
            "Packets not relayed, by reason.",
            &[
                ("reason=\"padding\"", g(&m.padding_dropped)),
                ("reason=\"relay\"", g(&m.relay_drops)),
            ],
        );
        let by: Vec<(String, u64)> = crate::origin::RelayDrop::ALL
            .iter()
            .map(|r| {
                (
                    format!("reason=\"{}\"", r.label()),
                    g(&m.relay_drops_by[*r as usize]),
                )
            })
            .collect();
        let by: Vec<(&str, u64)> = by.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            &mut out,
            "chorus_origin_relay_dropped_total",
            "counter",
            "Datagrams to edges lost on the link, by reason (send_buffer_full: the link's datagram buffer was full and quinn dropped the oldest queued one).",
            &by,
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
            "Publications that replaced a live one of the same sourceId.",
            &[("", g(&m.replacements_total))],
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
    }
    if let Some(e) = &app.edge {
        let m = &e.metrics;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
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
            "chorus_edge_dropped_total",
            "counter",
            "Packets dropped at the edge, by reason (unknown_channel, lane_full and stale count per media thread: each gets its own copy).",
            &[
                ("reason=\"unknown_source\"", g(&m.dropped_unknown)),
                ("reason=\"unknown_channel\"", g(&m.dropped_unknown_channel)),
                ("reason=\"malformed\"", g(&m.dropped_malformed)),
                ("reason=\"relay_malformed\"", g(&m.dropped_relay_malformed)),
                ("reason=\"lane_full\"", g(&m.dropped_lane_full)),
                ("reason=\"stale\"", g(&m.dropped_stale)),
                ("reason=\"core\"", g(&m.dropped_core)),
                ("reason=\"before_switch\"", g(&m.dropped_before_switch)),
                ("reason=\"viewer_flood\"", g(&m.dropped_flood)),
                ("reason=\"udp_send\"", g(&m.udp_send_errors)),
            ],
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
        metric(
            &mut out,
            "chorus_edge_udp_datagrams_sent_total",
            "counter",
            "Datagrams the viewers' socket sent (media, RTCP, ICE, DTLS).",
            &[("", g(&m.udp_sent))],
        );
        metric(
            &mut out,
            "chorus_edge_sendmmsg_calls_total",
            "counter",
            "sendmmsg calls those datagrams took.",
            &[("", g(&m.udp_send_calls))],
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
