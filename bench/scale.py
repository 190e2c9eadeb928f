"""The lab at scale (issue 16): how long a many-host fabric takes to come up and route, what it
costs at idle per agent, and how fast a new endpoint's route reaches every other host.

    python bench/scale.py [--quick] [--hosts 3,20,50,100] [--backend sqlite|etcd]

Per size: a lab of N hosts x 2 containers, host 1 the route reflector, no VMs (its own prefix,
torn down at the end, also on failure). Figures, labelled hosts and backend:
  lab_up_s                 building it (namespaces, Store, agents, BIRD, containers)
  routes_complete_s        from the start until every agent is in sync and every host's kernel has a
                           route for every other host's workloads (``Lab.wait_routed``)
  idle_cpu_pct_per_agent   utime+stime of the agents (/proc/PID/stat) over an idle window, per agent,
                           in % of one core
  idle_store_writes_per_s  the Store's revision advance over that window
  idle_events_per_agent_per_s  Store watch events the agents received, any key, used or dropped
                           (their tabby_store_watch_events_total); label updates_per_s: those
                           their syncers delivered as changes (tabby_store_events_total)
  rss_mb_per_host          resident memory of everything in a host's namespace (agent, BIRD, CNI server)
  route_everywhere_p99_ms  churn: endpoint adds on random hosts at 20/s, each with an address
                           outside every IPAM block (so it travels as its own /128); per add, from the
                           Store write until every other host's kernel has the route, seen by a netlink
                           route monitor per host namespace (no process per look). Label adds.
--quick: 3 and 20 hosts, a 4 s idle window, 50 adds (the full run: 30 s, 200 adds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

METRICS = ("lab_up_s", "routes_complete_s", "idle_cpu_pct_per_agent", "idle_store_writes_per_s",
           "idle_events_per_agent_per_s", "rss_mb_per_host", "route_everywhere_p99_ms")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.dataplane.netlink import Monitor  # noqa: E402
from tabby.lab import lab as L  # noqa: E402
from tabby.lab import netns, probe  # noqa: E402
from tabby.lab.topology import topology  # noqa: E402
from tabby.model import encode, key_of, validate  # noqa: E402
from tabby.store import open_store  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
ADD_RATE = 20.0  # adds per second (the churn)
CHURN_BASE = 0xF000  # fd00:e::f000 and up: inside the pool, far past any block the lab's hosts claim


def emit(metric: str, value: float, unit: str, hosts: int, backend: str, **labels: Any) -> None:
    print(json.dumps({"bench": "scale", "metric": metric, "value": round(value, 3), "unit": unit,
                      "hosts": hosts, "backend": backend, **labels}), flush=True)


def ns_pids(ns: str) -> list[int]:
    return [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]


def agent_pid(ns: str) -> int | None:
    for pid in ns_pids(ns):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tabby.cli" in cmd and b"agent" in cmd:
            return pid
    return None


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def store_events(ns: str) -> tuple[float, float]:
    """The agent's (tabby_store_watch_events_total, tabby_store_events_total), from its /metrics."""
    text = probe.NsProbe(ns).get("/metrics")
    got: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("tabby_store_watch_events_total", "tabby_store_events_total"):
            got[name] = float(value)
    if len(got) != 2:
        raise RuntimeError(f"{ns}: no tabby_store_watch_events_total / tabby_store_events_total in /metrics")
    return got["tabby_store_watch_events_total"], got["tabby_store_events_total"]


def churn(the_lab: L.Lab, adds: int, rng: random.Random) -> tuple[list[float], int]:
    """Endpoint adds on random hosts at ADD_RATE; per add, ms until every other host has its /128."""
    hosts = the_lab.topo.hosts
    plan = [(i, rng.choice(hosts)) for i in range(adds)]
    for h in hosts:  # the interfaces first, as a runtime makes them before the Endpoint
        mine = [i for i, host in plan if host == h]
        if mine:
            lines = [f"link add tbs{i} type veth peer name tbq{i}" for i in mine] + \
                    [f"link set tbs{i} up" for i in mine]
            netns.ip("-batch", "-", ns=h.ns, input="\n".join(lines) + "\n")
    monitors = {h.ns: probe.in_ns(h.ns, Monitor) for h in hosts}
    sel = selectors.DefaultSelector()
    for ns, mon in monitors.items():
        sel.register(mon.sock, selectors.EVENT_READ, ns)
    dst_of = {i: f"fd00:e::{CHURN_BASE + i:x}" for i, _ in plan}
    want = {f"{dst_of[i]}/128": {o.ns for o in hosts if o != h} for i, h in plan}
    seen: dict[str, float] = {}
    written: dict[str, float] = {}

    def poll(until: float) -> None:
        while (left := until - time.perf_counter()) > 0:
            for key, _ in sel.select(left):
                ns = key.data
                for ch in monitors[ns].read():
                    if ch.kind == "route" and not ch.deleted and ch.key in want and ns in want[ch.key]:
                        want[ch.key].discard(ns)
                        if not want[ch.key]:
                            seen[ch.key] = time.perf_counter()

    failed: list[BaseException] = []

    def write() -> None:
        """The adds on their schedule, on a thread of their own: a write can take a while (etcd
        commits to disk), and while it waited the monitors were not read, so the routes that had
        come meanwhile were stamped late (at 100 hosts on etcd the bench measured its own lag:
        seconds, where the kernels had the routes in tens of milliseconds)."""
        store = open_store(the_lab.store_url)
        try:
            start = time.perf_counter()
            for n, (i, h) in enumerate(plan):
                if (wait := start + n / ADD_RATE - time.perf_counter()) > 0:
                    time.sleep(wait)
                ep = validate({"kind": "Endpoint", "metadata": {"name": f"churn{i}"},
                               "spec": {"host": h.name, "orchestrator": "container", "workload_id": f"churn{i}",
                                        "interface": f"tbs{i}", "mac": "ee:ee:ee:00:00:01",
                                        "ipv6_addresses": [dst_of[i]]}})
                written[f"{dst_of[i]}/128"] = time.perf_counter()  # before the write: it may come back late
                store.put(key_of(ep), encode(ep))
        except BaseException as e:  # the main thread raises it
            failed.append(e)
        finally:
            store.close()

    writer = threading.Thread(target=write, name="churn-writer", daemon=True)
    try:
        writer.start()
        while writer.is_alive():
            poll(time.perf_counter() + 0.1)
        if failed:
            raise failed[0]
        deadline = time.perf_counter() + 30
        while len(seen) < len(want) and time.perf_counter() < deadline:
            poll(min(deadline, time.perf_counter() + 0.5))
    finally:
        writer.join()
        for mon in monitors.values():
            mon.close()
    missing = len(want) - len(seen)
    lat = sorted((seen.get(k, deadline) - written[k]) * 1000 for k in want)  # a missing one counts as 30 s
    return lat, missing


def one_size(hosts: int, backend: str, idle_s: float, adds: int, rng: random.Random) -> None:
    prefix = "bs" + uuid.uuid4().hex[:5]
    the_lab = L.Lab(topology(hosts, 2, False, prefix, (1,), 0), L.default_store(prefix), store_kind=backend)
    try:
        t0 = time.monotonic()
        the_lab.up()
        emit("lab_up_s", time.monotonic() - t0, "s", hosts, backend)
        state = the_lab.wait_routed(600, 0.5)
        if not state["ok"]:
            raise RuntimeError(f"{hosts} hosts not routed in 600 s: {len(state['not_in_sync'])} agents not in "
                               f"sync, {sum(map(len, state['missing'].values()))} routes missing")
        emit("routes_complete_s", time.monotonic() - t0, "s", hosts, backend)
        time.sleep(min(2.0, idle_s))  # settle: the last status writes, BIRD's first checks
        pids = {h.ns: agent_pid(h.ns) for h in the_lab.topo.hosts}
        if None in pids.values():
            raise RuntimeError(f"agents missing: {[ns for ns, p in pids.items() if p is None]}")
        store = open_store(the_lab.store_url)
        ev0 = {ns: store_events(ns) for ns in pids}
        cpu0 = {ns: cpu_ticks(p) for ns, p in pids.items() if p}
        rev0, w0 = store.revision(), time.monotonic()
        time.sleep(idle_s)
        cpu1 = {ns: cpu_ticks(p) for ns, p in pids.items() if p}
        rev1, w1 = store.revision(), time.monotonic()
        ev1 = {ns: store_events(ns) for ns in pids}
        window = w1 - w0
        emit("idle_cpu_pct_per_agent", 100 * sum(cpu1[n] - cpu0[n] for n in cpu0) / CLK_TCK / window / hosts, "%",
             hosts, backend, window_s=round(window, 1))
        emit("idle_store_writes_per_s", (rev1 - rev0) / window, "writes/s", hosts, backend)
        emit("idle_events_per_agent_per_s", sum(ev1[n][0] - ev0[n][0] for n in ev0) / window / hosts, "events/s",
             hosts, backend, updates_per_s=round(sum(ev1[n][1] - ev0[n][1] for n in ev0) / window / hosts, 3))
        rss = sum(rss_kb(p) for h in the_lab.topo.hosts for p in ns_pids(h.ns))
        emit("rss_mb_per_host", rss / 1024 / hosts, "MB", hosts, backend)
        store.close()
        lat, missing = churn(the_lab, adds, rng)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        emit("route_everywhere_p99_ms", p99, "ms", hosts, backend, adds=adds, missing=missing,
             p50_ms=round(lat[len(lat) // 2], 1))
    finally:
        L.down(prefix)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hosts", help="comma-separated sizes (default 3,20,50,100; quick 3,20)")
    ap.add_argument("--backend", choices=("sqlite", "etcd"), default="sqlite")
    args = ap.parse_args()
    sizes = [int(x) for x in args.hosts.split(",")] if args.hosts else ([3, 20] if args.quick else [3, 20, 50, 100])
    rng = random.Random(16)
    for n in sizes:
        one_size(n, args.backend, 4.0 if args.quick else 30.0, 50 if args.quick else 200, rng)


if __name__ == "__main__":
    main()
