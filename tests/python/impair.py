#!/usr/bin/env python3
"""A lossy, jittery network for the packets an iptables NFQUEUE rule hands it.

    impair.py --queue 0 --loss 0.05 --delay-ms 50 --jitter-ms 40 [--seed N]

Each queued packet is dropped with probability --loss, else let through after a delay drawn
uniformly from [delay - jitter, delay + jitter] ms (so packets reorder, as behind netem with
jitter). This stands in for `tc qdisc ... netem`, which this kernel does not have
(CONFIG_NET_SCH_NETEM is not set): the kernel queues the packets (NFQUEUE, legacy iptables),
this process gives each its verdict when its time comes. It speaks nfnetlink_queue itself
(no libnetfilter_queue): bind the queue, copy metadata only, verdict by packet id.

Runs until SIGTERM/SIGINT or stdin closes, then prints one JSON line: packets seen, dropped,
passed, and the delays given. Python standard library only; needs root (its own namespace).
"""

import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def attr(kind, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def message(msg, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def attrs_of(buf):
    out, at = {}, 0
    while at + 4 <= len(buf):
        n, kind = struct.unpack_from("=HH", buf, at)
        if n < 4:
            break
        out[kind & 0x7FFF] = buf[at + 4 : at + n]
        at += (n + 3) & ~3
    return out


def expect_ack(sock, what):
    data = sock.recv(65536)
    n, kind = struct.unpack_from("=IH", data, 0)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        if err != 0:
            sys.exit(f"impair.py: {what} refused: {os.strerror(-err)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--loss", type=float, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if not 0.0 <= a.loss < 1.0 or a.jitter_ms > a.delay_ms or a.delay_ms > 1000:
        sys.exit("impair.py: loss in [0, 1), jitter at most the delay, delay at most 1 s")
    rng = random.Random(a.seed)

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    cmd = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)
    sock.send(message(NFQNL_MSG_CONFIG, a.queue, [attr(NFQA_CFG_CMD, cmd)], NLM_F_REQUEST | NLM_F_ACK, 1))
    expect_ack(sock, "binding the queue")
    params = struct.pack("!IB", 0, NFQNL_COPY_META)
    sock.send(message(NFQNL_MSG_CONFIG, a.queue, [attr(NFQA_CFG_PARAMS, params)], NLM_F_REQUEST | NLM_F_ACK, 2))
    expect_ack(sock, "setting the copy mode")
    print(json.dumps({"event": "ready", "queue": a.queue, "loss": a.loss}), flush=True)

    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(1))
    due = []  # (when, seq, packet id)
    seen = dropped = passed = 0
    delays = []
    order = 0
    watch = [sock, sys.stdin]
    while not stop:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, pid = heapq.heappop(due)
            v = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))
            sock.send(message(NFQNL_MSG_VERDICT, a.queue, [v]))
            passed += 1
        timeout = max(0.0, due[0][0] - now) if due else 0.5
        try:
            ready, _, _ = select.select(watch, [], [], timeout)
        except InterruptedError:
            continue
        if sys.stdin in ready and not sys.stdin.readline():
            break
        if sock not in ready:
            continue
        data = sock.recv(65536)
        at = 0
        while at + 16 <= len(data):
            n, kind = struct.unpack_from("=IH", data, at)
            if n < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                hdr = attrs_of(data[at + 20 : at + n]).get(NFQA_PACKET_HDR)
                if hdr is not None:
                    (pid,) = struct.unpack_from("!I", hdr, 0)
                    seen += 1
                    if rng.random() < a.loss:
                        v = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_DROP, pid))
                        sock.send(message(NFQNL_MSG_VERDICT, a.queue, [v]))
                        dropped += 1
                    else:
                        d = a.delay_ms + rng.uniform(-a.jitter_ms, a.jitter_ms)
                        delays.append(d)
                        order += 1
                        heapq.heappush(due, (time.monotonic() + d / 1000.0, order, pid))
            at += (n + 3) & ~3
    # Whatever is still held goes through now: nothing is left queued in the kernel.
    for _, _, pid in due:
        v = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))
        sock.send(message(NFQNL_MSG_VERDICT, a.queue, [v]))
        passed += 1
    delays.sort()
    pct = lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))], 1) if delays else None
    print(json.dumps({
        "event": "report", "seen": seen, "dropped": dropped, "passed": passed,
        "loss": round(dropped / seen, 4) if seen else None,
        "delay_ms": {"min": pct(0.0), "p50": pct(0.5), "max": pct(0.999)},
    }), flush=True)


if __name__ == "__main__":
    main()
