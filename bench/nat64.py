"""NAT64: what a connection through a host's translator (tayga, user space) costs against direct
IPv6 to the same outside router, in the same run.

    python bench/nat64.py [--quick]

A 1-host IPv6-only lab with NAT64 (its own prefix, torn down at the end), one container. From the
container, in-process: TCP connects (SYN to established, then closed) to the outside router's
IPv6 address (``path`` direct) and to its IPv4-only service address through NAT64 (``path`` nat64:
the synthesized fd00:64::a63:50), alternating, to a listener of this process that accepts at once,
400 each (100 with --quick): ``tcp_connect_ms`` with labels stat (p50, p99) and path. Then a bulk
TCP stream to a sink on the outside router, 200 MB
(40 MB with --quick) per path: ``throughput_mbit`` with label path.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

METRICS = ("tcp_connect_ms", "throughput_mbit")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.lab import lab as L  # noqa: E402
from tabby.lab import netns, probe  # noqa: E402
from tabby.lab.topology import OUTSIDE_SERVICE_V4, OUTSIDE_V6, topology  # noqa: E402

NAT64_ADDR = "fd00:64::a63:50"  # the lab's NAT64 prefix + OUTSIDE_SERVICE_V4
SINK_PORT = 8099
ACCEPT_PORT = 8098  # an in-process listener on the outside router: accepts and closes, backlog 1024


def connect_ms(address: str, port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection((address, port), timeout=5):
        pass
    return (time.perf_counter() - t0) * 1000


def stream_mbit(address: str, port: int, total: int) -> float:
    chunk = b"\0" * (256 << 10)
    with socket.create_connection((address, port), timeout=10) as s:
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has read everything: the bytes arrived
        return sent * 8 / (time.perf_counter() - t0) / 1e6


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    quick = ap.parse_args().quick
    n, total = (100, 40 << 20) if quick else (400, 200 << 20)
    prefix = "b" + uuid.uuid4().hex[:5]
    the_lab = L.Lab(topology(1, 1, True, prefix, vms=0, nat64=True), L.default_store(prefix))
    try:
        the_lab.up()
        state = the_lab.wait_routed(60)
        if not state["ok"]:
            raise RuntimeError(f"lab not routed: {state}")
        out_ns = the_lab.topo.outside_ns
        # sinks on the outside router, one per family: read to the end, then close (the sender waits for it)
        for listen in (f"TCP6-LISTEN:{SINK_PORT},bind=[{OUTSIDE_V6}],reuseaddr,fork",
                       f"TCP4-LISTEN:{SINK_PORT},bind={OUTSIDE_SERVICE_V4},reuseaddr,fork"):
            netns.spawn(out_ns, ["socat", "-u", listen, "OPEN:/dev/null"], the_lab.dir / "sink.log")
        ns = the_lab.topo.workloads[0].ns
        # the lab's own listeners fork a process per connection (socat, backlog 5): a burst of connects
        # would measure their SYN drops, not the path; these accept in a thread of this process
        for family, addr in ((socket.AF_INET6, OUTSIDE_V6), (socket.AF_INET, OUTSIDE_SERVICE_V4)):
            lsock = probe.in_ns(out_ns, lambda family=family, addr=addr: _listener(family, addr, ACCEPT_PORT))
            threading.Thread(target=_accept_and_close, args=(lsock,), daemon=True).start()
        paths = {"direct": (OUTSIDE_V6, ACCEPT_PORT), "nat64": (NAT64_ADDR, ACCEPT_PORT)}
        netns.wait_for(lambda: all(_connects(ns, *a) for a in paths.values()), 30, 0.5, "both paths answering")
        times: dict[str, list[float]] = {p: [] for p in paths}

        def run_connects() -> None:
            for _ in range(n):
                for p, (addr, port) in paths.items():
                    times[p].append(connect_ms(addr, port))

        probe.in_ns(ns, run_connects)
        for p, xs in times.items():
            for stat, value in (("p50", statistics.median(xs)), ("p99", p99(xs))):
                print(json.dumps({"bench": "nat64", "metric": "tcp_connect_ms", "value": round(value, 3), "unit": "ms",
                                  "stat": stat, "path": p, "n": len(xs)}), flush=True)
        sinks = {"direct": (OUTSIDE_V6, SINK_PORT), "nat64": (NAT64_ADDR, SINK_PORT)}
        netns.wait_for(lambda: all(_connects(ns, *a) for a in sinks.values()), 10, 0.2, "the sinks listening")
        for p, (addr, port) in sinks.items():
            mbit = probe.in_ns(ns, lambda addr=addr, port=port: stream_mbit(addr, port, total))
            print(json.dumps({"bench": "nat64", "metric": "throughput_mbit", "value": round(mbit, 1),
                              "unit": "Mbit/s", "path": p, "bytes": total}), flush=True)
    finally:
        L.down(prefix)


def _listener(family: int, addr: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(1024)
    return s


def _accept_and_close(lsock: socket.socket) -> None:
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        conn.close()


def _connects(ns: str, addr: str, port: int) -> bool:
    def go() -> bool:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return True
        except OSError:
            return False
    return probe.in_ns(ns, go)


if __name__ == "__main__":
    main()
