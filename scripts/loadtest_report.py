"""Turns a scripts/loadtest.sh run (steps.jsonl, floor.json, and janus-steps.jsonl after
--peer janus) into report.md and report.png.

Usage: loadtest_report.py DIR
"""

import json
import sys
from pathlib import Path

# Where a step stops counting as within capacity.
P99_LIMIT_MS = 5.0
LOSS_LIMIT_PCT = 0.01
CPU_LIMIT_PCT = 95.0


def read_steps(path: Path):
    steps, summary = [], None
    for line in path.read_text().splitlines():
        if not line.strip().startswith("{"):
            continue
        v = json.loads(line)
        if "step" in v:
            steps.append(v)
        elif "summary" in v:
            summary = v["summary"]
    return steps, summary


def load(out: Path):
    steps, summary = read_steps(out / "steps.jsonl")
    floor = json.loads((out / "floor.json").read_text())
    return steps, summary, floor


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def within(s):
    """Why a step is past capacity, or None."""
    if (s.get("lat_p99_ms") or 0) > P99_LIMIT_MS:
        return f"p99 {s['lat_p99_ms']} ms > {P99_LIMIT_MS}"
    if (s.get("loss_pct") or 0) > LOSS_LIMIT_PCT:
        return f"loss {s['loss_pct']} % > {LOSS_LIMIT_PCT}"
    if (s.get("edge_cpu_pct") or 0) > CPU_LIMIT_PCT:
        return f"edge CPU {s['edge_cpu_pct']} % > {CPU_LIMIT_PCT}"
    if s.get("connected", 0) < s.get("viewers", 0):
        return f"only {s['connected']} of {s['viewers']} viewers connected"
    return None


def cpu_us_per_viewer_s(s):
    """CPU (µs per second) per connected viewer."""
    return (s.get("edge_cpu_s") or 0) / max(s.get("secs") or 1, 1e-9) / max(s.get("connected") or 0, 1) * 1e6


def ratio(a, b):
    return a / b if a and b else None


def profiles(summary):
    p = (summary or {}).get("srtp_profiles") or {}
    return ", ".join(f"{k} ({v} viewers)" for k, v in sorted(p.items())) or "not recorded"


def janus_section(out: Path, steps, summary):
    """The side-by-side table of a --peer janus run, empty without one."""
    path = out / "janus-steps.jsonl"
    if not path.exists():
        return [], []
    jsteps, jsum = read_steps(path)
    lines = [
        "",
        "## Janus, the same ramp on the same core",
        "",
        "The same str0m viewers watch one Janus streaming mountpoint with one Opus stream per track, "
        "each fed one corpus speaker as plain RTP on the publishers' clock. The work differs: Janus "
        "forwards every stream to every viewer, chorus only the talkers it selects, so compare per "
        "forwarded packet and per viewer, not per step.",
        "",
        f"SRTP negotiated: chorus {profiles(summary)}; Janus {profiles(jsum)}.",
        "",
        "| viewers | connected | pkts/s out | Janus CPU % | Janus ns / pkt | chorus ns / pkt | chorus / Janus per pkt "
        "| Janus µs CPU / viewer·s | chorus / Janus per viewer | loss % | latency p50 / p95 / p99 / max ms "
        "| Janus RSS KiB / viewer | chorus RSS KiB / viewer | joins/s Janus / chorus | join p99 ms Janus / chorus |",
        "|" + "---|" * 15,
    ]
    by_viewers = {s["viewers"]: s for s in steps}
    for j in jsteps:
        c = by_viewers.get(j["viewers"], {})
        jv = max(j.get("connected") or 0, 1)
        cv = max(c.get("connected") or 0, 1)
        jrss = j.get("edge_rss_kib")
        crss = c.get("edge_rss_kib")
        jns, cns = j.get("edge_ns_per_pkt"), c.get("edge_ns_per_pkt")
        jcpu, ccpu = cpu_us_per_viewer_s(j), cpu_us_per_viewer_s(c) if c else None
        lines.append(
            f"| {j['viewers']} | {j.get('connected')} | {fmt(j.get('pkts_per_s'), 0)} | {fmt(j.get('edge_cpu_pct'))} "
            f"| {fmt(jns, 0)} | {fmt(cns, 0)} | {fmt(ratio(cns, jns), 2)} "
            f"| {jcpu:.1f} | {fmt(ratio(ccpu, jcpu), 2)} | {fmt(j.get('loss_pct'), 4)} "
            f"| {fmt(j.get('lat_p50_ms'), 2)} / {fmt(j.get('lat_p95_ms'), 2)} / {fmt(j.get('lat_p99_ms'), 2)} / {fmt(j.get('lat_max_ms'), 2)} "
            f"| {fmt(jrss / jv if jrss else None, 1)} | {fmt(crss / cv if crss else None, 1)} "
            f"| {fmt(j.get('joins_per_s'))} / {fmt(c.get('joins_per_s'))} | {fmt(j.get('join_p99_ms'), 0)} / {fmt(c.get('join_p99_ms'), 0)} |"
        )
    if jsum:
        lines += ["", "Summary line from loadgen against Janus:", "", "```", json.dumps(jsum), "```"]
    return lines, jsteps


def main():
    out = Path(sys.argv[1])
    steps, summary, floor = load(out)
    floor_ns = floor["both_ns_per_pkt"]
    rows = [
        "| viewers | connected | pkts/s out | edge CPU % | edge µs CPU / viewer·s | edge ns / pkt | ratio to floor | "
        "loss % | latency p50 / p95 / p99 / max ms | pre-roll p50 / max ms | switch p50 / p95 ms | edge RSS KiB / viewer | "
        "joins/s | join p99 ms | gen CPU % | gen ns / pkt (viewer threads) | origin CPU % | gen core headroom % |",
        "|" + "---|" * 18,
    ]
    capacity, reason = None, None
    for s in steps:
        v = max(s.get("connected", 0), 1)
        cpu_per_viewer = (s.get("edge_cpu_s") or 0) / max(s.get("secs") or 1, 1e-9) / v * 1e6
        ns = s.get("edge_ns_per_pkt")
        ratio = (ns / floor_ns) if ns and floor_ns else None
        rss = s.get("edge_rss_kib")
        rows.append(
            f"| {s['viewers']} | {s.get('connected')} | {fmt(s.get('pkts_per_s'), 0)} | {fmt(s.get('edge_cpu_pct'))} "
            f"| {cpu_per_viewer:.1f} | {fmt(ns, 0)} | {fmt(ratio, 2)} | {fmt(s.get('loss_pct'), 4)} "
            f"| {fmt(s.get('lat_p50_ms'), 2)} / {fmt(s.get('lat_p95_ms'), 2)} / {fmt(s.get('lat_p99_ms'), 2)} / {fmt(s.get('lat_max_ms'), 2)} "
            f"| {fmt(s.get('preroll_lat_p50_ms'), 0)} / {fmt(s.get('preroll_lat_max_ms'), 0)} "
            f"| {fmt(s.get('switch_p50_ms'), 0)} / {fmt(s.get('switch_p95_ms'), 0)} "
            f"| {fmt(rss / v if rss else None, 1)} | {fmt(s.get('joins_per_s'))} | {fmt(s.get('join_p99_ms'), 0)} "
            f"| {fmt(s.get('loadgen_cpu_pct'))} | {fmt(s.get('loadgen_ns_per_pkt'), 0)} ({fmt(s.get('loadgen_viewers_ns_per_pkt'), 0)}) "
            f"| {fmt(s.get('origin_cpu_pct'))} | {fmt(s.get('gen_core_headroom_pct'))} |"
        )
        r = within(s)
        if r is None and reason is None:
            capacity = s
        elif r is not None and reason is None:
            reason = (s["viewers"], r)
    lines = ["# chorus load test", ""]
    lines.append(
        f"Floor (`chorus loadgen floor`, {floor['packets']} packets, batch {floor['batch']}): "
        f"{floor['encrypt_ns_per_pkt']} ns AES-GCM + {floor['send_ns_per_pkt']} ns sendmmsg = "
        f"{floor_ns} ns per packet (measured together)."
    )
    lines.append("")
    if capacity:
        ns = capacity.get("edge_ns_per_pkt")
        lines.append(
            f"Capacity point: {capacity['viewers']} viewers, {fmt(capacity.get('pkts_per_s'), 0)} packets/s forwarded "
            f"on one edge core at {fmt(capacity.get('edge_cpu_pct'))} % CPU, p99 {capacity.get('lat_p99_ms')} ms, "
            f"loss {capacity.get('loss_pct')} %, {fmt(ns, 0)} ns of edge CPU per packet = "
            f"{fmt(ns / floor_ns if ns else None, 2)}x the floor."
        )
        lines.append(
            f"The generator at that point: {fmt(capacity.get('loadgen_cpu_pct'))} % of its core "
            f"({fmt(capacity.get('loadgen_ns_per_pkt'), 0)} ns per received packet, "
            f"{fmt(capacity.get('loadgen_viewers_ns_per_pkt'), 0)} ns of it in the viewers' threads, "
            f"{fmt(capacity.get('pkts_per_recvmmsg'), 2)} packets per recvmmsg), the origin beside it "
            f"{fmt(capacity.get('origin_cpu_pct'))} %: {fmt(capacity.get('gen_core_headroom_pct'))} % of that core left."
        )
        if (capacity.get("gen_core_headroom_pct") or 100) < 10:
            lines.append("That core is nearly full: the generator, not the edge, may bound this figure.")
    else:
        lines.append("No step was within capacity.")
    if reason:
        lines.append(f"The next step ({reason[0]} viewers) is past it: {reason[1]}.")
    else:
        lines.append("No step reached the limits: the ramp ended first (raise --max-viewers).")
    lines.append("")
    lines += rows
    lines += per_edge(out)
    if summary:
        lines += ["", "Summary line from loadgen:", "", "```", json.dumps({"summary": summary}), "```"]
    janus, jsteps = janus_section(out, steps, summary)
    lines += janus
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, steps, jsteps)


def per_edge(out: Path):
    """The per-edge table of a --cluster run (edges.jsonl), empty otherwise."""
    path = out / "edges.jsonl"
    if not path.exists():
        return []
    samples = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    if not samples:
        return []
    t0 = samples[0]["t"]
    lines = ["", "Per edge (sampled every step):", "",
             "| s | edge | viewers | pkts/s out | drops/s | CPU % |", "|---|---|---|---|---|---|"]
    for s in samples:
        lines.append(f"| {s['t'] - t0:.0f} | {s['edge']} | {s['viewers']} | {s['pkts_per_s']:.0f} "
                     f"| {s['drops_per_s']:.1f} | {s['cpu_pct']:.1f} |")
    peak = {}
    for s in samples:
        if s["viewers"] >= peak.get(s["edge"], {}).get("viewers", -1):
            peak[s["edge"]] = s
    split = ", ".join(f"{e} {p['viewers']} viewers ({p['cpu_pct']:.0f} % CPU)" for e, p in sorted(peak.items()))
    lines += ["", f"At the most: {split}."]
    return lines


def plot(out: Path, steps, jsteps=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    ax2 = ax[0].twinx()
    # chorus in blue, Janus (a --peer janus run) in orange, dashed.
    for name, ss, color, line in (("chorus", steps, "tab:blue", "-"), ("Janus", jsteps, "tab:orange", "--")):
        if not ss:
            continue
        x = [s.get("connected") or s["viewers"] for s in ss]
        ax[0].plot(x, [cpu_us_per_viewer_s(s) for s in ss], "o" + line, color=color, label=name)
        ax2.plot(x, [s.get("edge_cpu_pct") or 0 for s in ss], "s:", color=color, alpha=0.5)
        ax[1].plot(x, [s.get("loss_pct") or 0 for s in ss], "o" + line, color=color, label=name)
        for key, mark in (("lat_p50_ms", "o"), ("lat_p95_ms", "s"), ("lat_p99_ms", "^"), ("lat_max_ms", "x")):
            ax[2].plot(x, [s.get(key) for s in ss], mark + line, color=color, label=f"{name} {key.split('_')[1]}",
                       alpha=1.0 if key != "lat_max_ms" else 0.5)
    ax[0].set_title("CPU per viewer (µs per second; dotted: CPU %)")
    ax[0].set_xlabel("viewers")
    ax2.set_ylabel("CPU %")
    ax[0].legend()
    ax[1].axhline(LOSS_LIMIT_PCT, linestyle=":", color="grey")
    ax[1].set_title("loss %")
    ax[1].set_xlabel("viewers")
    ax[1].legend()
    ax[2].axhline(P99_LIMIT_MS, linestyle=":", color="grey")
    ax[2].set_title("added latency (ms)")
    ax[2].set_xlabel("viewers")
    ax[2].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=90)


if __name__ == "__main__":
    main()
