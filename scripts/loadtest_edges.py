#!/usr/bin/env python3
"""Per-edge figures of `scripts/loadtest.sh --cluster`: samples each edge's /metrics and CPU.

    loadtest_edges.py --edge NAME=PID=http://127.0.0.1:PORT ... --every SECS --out edges.jsonl

Every SECS until killed (or --samples N), one JSON line per edge: its viewers (gauge), packets
written to viewers and dropped (all reasons) per second since the last sample, and its CPU %
(utime + stime from /proc/PID/stat). A sample of an edge that stopped answering is skipped.
"""

import argparse
import json
import os
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=2).read().decode()
    out = {"viewers": 0.0, "packets_out": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name == "chorus_edge_viewers":
            out["viewers"] = float(value)
        elif name == "chorus_edge_packets_out_total":
            out["packets_out"] = float(value)
        elif name.startswith("chorus_edge_dropped_total"):
            out["dropped"] += float(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--edge", action="append", required=True, help="NAME=PID=URL")
    p.add_argument("--every", type=float, default=8.0)
    p.add_argument("--samples", type=int, default=0, help="stop after this many rounds (0: until killed)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    edges = []
    for e in a.edge:
        name, pid, url = e.split("=", 2)
        edges.append((name, int(pid), url))
    last = {}
    rounds = 0
    with open(a.out, "a") as out:
        while a.samples == 0 or rounds < a.samples:
            rounds += 1
            for name, pid, url in edges:
                try:
                    now, m, cpu = time.time(), scrape(url), cpu_s(pid)
                except (OSError, ValueError):
                    continue
                prev = last.get(name)
                last[name] = (now, m, cpu)
                if prev is None:
                    continue
                secs = max(now - prev[0], 1e-9)
                out.write(json.dumps({
                    "t": round(now, 3),
                    "edge": name,
                    "viewers": int(m["viewers"]),
                    "pkts_per_s": round((m["packets_out"] - prev[1]["packets_out"]) / secs, 1),
                    "drops_per_s": round((m["dropped"] - prev[1]["dropped"]) / secs, 1),
                    "cpu_pct": round((cpu - prev[2]) / secs * 100, 1),
                }) + "\n")
                out.flush()
            time.sleep(a.every)


if __name__ == "__main__":
    main()
