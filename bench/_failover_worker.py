"""Worker of bench/etcd_failover.py, run inside the bench's host namespace (where the cluster and the
agent are): writes the host's Endpoints, then measures while the parent kills the leader.

    _failover_worker.py URL HOST N

stdout: "ready" once the agent has programmed the N endpoints and the measuring has begun; stdin:
"kill T_KILL" when the parent has killed the leader at T_KILL (monotonic seconds: the clock is the
machine's, the same in every namespace). An Endpoint is then written, retrying until the cluster
takes it; SETTLE_S after its route is in the kernel, the last stdout line: the figures as one JSON
object.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import itertools

from tabby.client import ResourceClient
from tabby.model import validate
from tabby.store import NotFound, Unavailable, open_store

PACE_S = 0.01  # one write every 10 ms: gaps are measured to about that
SETTLE_S = 2.0  # measuring goes on this long after the Endpoint written during the outage is programmed


def endpoint(i: int, host: str) -> object:
    return validate({"kind": "Endpoint", "metadata": {"name": f"fo{i}"}, "spec": {
        "host": host, "orchestrator": "vm", "workload_id": f"fo{i}", "interface": f"tbf{i}",
        "mac": f"52:54:00:00:01:{i:02x}", "ipv6_addresses": [f"fd00:e::f:{i + 1:x}"]}})


def routes() -> set[str]:
    out = subprocess.run(["ip", "-6", "route", "show", "proto", "77"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line}


def main() -> None:
    url, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_store(url)
    client = ResourceClient(store)
    client.apply(validate({"kind": "Host", "metadata": {"name": host}, "spec": {"ipv6_address": "fd00:f::1"}}))
    for i in range(n):
        client.apply(endpoint(i, host))
    # the Endpoint written during the outage, gone again first: a run after the first would write it
    # "unchanged" and time nothing but a read (its route has been in since the first run)
    new = f"fd00:e::f:{n + 1:x}"
    with contextlib.suppress(NotFound):
        client.delete("Endpoint", f"fo{n}")
    deadline = time.monotonic() + 60
    while (len(routes()) < n or new in routes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if new in routes() or len(routes()) < n:
        raise SystemExit(f"worker: the agent did not program the {n} endpoints (or remove fo{n}) in 60 s")
    before = routes()
    monitor = subprocess.Popen(["ip", "monitor", "route"], stdout=subprocess.PIPE, text=True)
    withdrawn: list[str] = []
    threading.Thread(target=lambda: withdrawn.extend(
        line.strip() for line in monitor.stdout or [] if line.startswith("Deleted") and "proto 77" in line),
        daemon=True).start()

    stop = threading.Event()
    writes: list[float] = []
    events: list[float] = []
    _, rev = store.list("/bench/failover/")

    def writer() -> None:
        s = open_store(url)
        i = 0
        while not stop.is_set():
            try:
                s.put(f"/bench/failover/k{i % 10}", b"%d" % i)
                writes.append(time.monotonic())
                i += 1
            except Unavailable:
                pass
            time.sleep(PACE_S)

    watch = store.watch("/bench/failover/", rev)

    def watcher() -> None:
        try:
            for _ in watch:
                events.append(time.monotonic())
        except Unavailable as e:  # the watch gave up riding out: the gap says it
            print(f"watch: {e}", file=sys.stderr)

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=watcher, daemon=True)]
    for t in threads:
        t.start()
    print("ready", flush=True)

    programmed: list[float] = []

    def during() -> None:
        s = open_store(url)
        c = ResourceClient(s)
        while True:
            try:
                c.apply(endpoint(n, host))
                break
            except Unavailable:
                time.sleep(0.05)
        deadline = time.monotonic() + 60
        while new not in routes() and time.monotonic() < deadline:
            time.sleep(0.02)
        programmed.append(time.monotonic() if new in routes() else float("nan"))

    cmd, t_kill = sys.stdin.readline().split()
    assert cmd == "kill"
    k = float(t_kill)
    threading.Thread(target=during, daemon=True).start()
    while not programmed:
        time.sleep(0.05)
    time.sleep(SETTLE_S)  # the writer and the watch have come back by now, or the gap says they did not
    stop.set()
    watch.close()
    monitor.terminate()
    end = time.monotonic()

    def gap(times: list[float]) -> float:
        """The longest time without one, from the kill to the end."""
        marks = [k, *(t for t in times if t > k), end]
        return max(b - a for a, b in itertools.pairwise(marks))

    print(json.dumps({"write_gap_s": gap(writes), "watch_gap_s": gap(events), "withdrawn": withdrawn,
                      "lost": sorted(before - routes()), "program_s": programmed[0] - k,
                      "writes": len(writes), "events": len(events)}), flush=True)


if __name__ == "__main__":
    main()
