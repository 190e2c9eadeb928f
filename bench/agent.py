"""Agent programming speed against ``ip -batch``, and endpoint add latency, in scratch namespaces.

    python bench/agent.py [--quick]

program_s: a cold agent (in-process, in its own namespace) from start to every route and
  permanent neighbour of N dual-stack endpoints in the kernel, with policy on (every endpoint has
  a profile and one of 100 label sets, 100 policies select them and allow TCP from the next
  set's endpoints; the policy table is written before the routes, as the agent fails closed):
  Store list and decode, the calculation, the policy transaction and the pipelined netlink
  writes. The per-interface sysctls that follow are reported on their own as sysctl_s.
ip_batch_s: ``ip -batch`` writing the same routes and neighbours into an identical namespace.
ratio: program_s / ip_batch_s.
kernel_writes_s: of program_s, the wall time of the agent's two kinds of kernel write (the policy
  transaction, and the chunks of route and neighbour messages: the kernel does their work inside
  the send); kernel_ratio: kernel_writes_s / ip_batch_s, the ratio an agent would have that spent
  no time at all outside those writes and did them one after the other (the policy first, as it
  fails closed).
add_p50_ms / add_p99_ms: a running agent; one endpoint written to the Store -> its route in the
  kernel, per backend (SQLite; etcd running inside the namespace).
Each endpoint has its own veth, as on a real host. Label host_ipv4: "lo", the host has an IPv4
address (a /32 on lo here; most hosts have one on their uplink), or "none", it has no IPv4 address
anywhere (a host on an IPv6-only fabric carrying its workloads' IPv4 over IPv6 next hops). With
none, the kernel looks for each IPv4 route's preferred source on every device in turn
(inet_select_addr), a cost quadratic in veths that a host with an IPv4 address does not pay
(measured at 2,000: ip -batch 0.41 s with none, 0.12-0.18 s with one); the agent and ip -batch
pay it alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.lab import netns  # noqa: E402
from tabby.lab.etcd import EtcdServer  # noqa: E402
from tabby.model import encode, key_of, validate  # noqa: E402
from tabby.store import open_store  # noqa: E402

METRICS = ("program_s", "sysctl_s", "ip_batch_s", "ratio", "kernel_writes_s", "kernel_ratio", "add_p50_ms",
           "add_p99_ms")

WORKER = str(ROOT / "bench" / "_agent_worker.py")


def emit(metric: str, value: float, unit: str, **labels: object) -> None:
    print(json.dumps({"bench": "agent", "metric": metric, "value": round(value, 4), "unit": unit, **labels}),
          flush=True)


HOST_V4 = "10.255.0.1/32"  # the host's own address, inside the bench namespace only


def make_veths(ns: str, n: int, host_v4: bool = True) -> None:
    """n veths, and the host's IPv4 address unless host_v4 is False (see the docstring)."""
    lines = ["link set lo up", *([f"address add {HOST_V4} dev lo"] if host_v4 else [])]
    lines += [f"link add tbe{i} type veth peer name tbp{i}" for i in range(n)]
    lines += [f"link set tbe{i} up" for i in range(n)]
    netns.ip("-batch", "-", ns=ns, input="\n".join(lines) + "\n")


def addrs(i: int) -> tuple[str, str]:
    return f"fd00:e::{i // 65536:x}:{i % 65536:x}", f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def mac(i: int) -> str:
    return f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def time_ip_batch(ns: str, batch: Path, n: int, dev: Callable[[int], str]) -> float:
    """``ip -batch`` writing the same routes and neighbours the agent writes: the yardstick."""
    with batch.open("w") as f:
        for i in range(n):
            v6, v4 = addrs(i)
            f.write(f"route replace {v6}/128 dev {dev(i)} proto 77 metric 10\n")
            f.write(f"route replace {v4}/32 dev {dev(i)} proto 77 metric 10\n")
            f.write(f"neigh replace {v6} lladdr {mac(i)} dev {dev(i)} nud permanent\n")
            f.write(f"neigh replace {v4} lladdr {mac(i)} dev {dev(i)} nud permanent\n")
    t0 = time.perf_counter()
    netns.ip("-batch", str(batch), ns=ns)
    return time.perf_counter() - t0


APPS = 100


def policy_resources() -> list[Any]:
    """A profile every endpoint names, and a policy per label set allowing TCP from the next."""
    out = [validate({"kind": "Profile", "metadata": {"name": "bench-open"},
                     "spec": {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}})]
    for a in range(APPS):
        out.append(validate({"kind": "Policy", "metadata": {"name": f"p{a}"},
                             "spec": {"order": a, "selector": f'app == "a{a}"',
                                      "ingress": [{"action": "allow", "protocol": "tcp", "dst_ports": [8000 + a],
                                                   "src_selector": f'app == "a{(a + 1) % APPS}"'}],
                                      "egress": [{"action": "allow"}]}}))
    return out


def cold(n: int, tmp: Path, tag: str, host_v4: bool) -> None:
    a, b = f"tbybA{tag}", f"tbybB{tag}"
    label = "lo" if host_v4 else "none"
    try:
        netns.add_netns(a)
        netns.add_netns(b)
        make_veths(a, n, host_v4)
        make_veths(b, n, host_v4)
        url = f"sqlite://{tmp}/cold-{n}.db"
        store = open_store(url)
        for res in policy_resources():
            store.put(key_of(res), encode(res))
        for i in range(n):
            v6, v4 = addrs(i)
            ep = validate({"kind": "Endpoint", "metadata": {"name": f"ep{i}", "labels": {"app": f"a{i % APPS}"}},
                           "spec": {"host": "hb", "orchestrator": "vm", "workload_id": f"w{i}", "interface": f"tbe{i}",
                                    "mac": mac(i), "ipv6_addresses": [v6], "ipv4_addresses": [v4],
                                    "profiles": ["bench-open"]}})
            store.put(key_of(ep), encode(ep))
        r = netns.nsexec(a, [sys.executable, WORKER, "cold", url, "hb"])
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["pending"] == 0 and res["endpoints"] == n, res
        got = len(netns.ip("-6", "route", "show", "proto", "77", ns=a).splitlines()) + \
            len(netns.ip("-4", "route", "show", "proto", "77", ns=a).splitlines())
        assert got == 2 * n, f"{got} routes programmed, wanted {2 * n}"

        ip_batch_s = time_ip_batch(b, tmp / "routes.batch", n, lambda i: f"tbe{i}")
        shape = "veth-per-endpoint"
        emit("program_s", res["program_s"], "s", n=n, shape=shape, policy="on", host_ipv4=label)
        emit("sysctl_s", res["sysctl_s"], "s", n=n, shape=shape, host_ipv4=label)
        emit("ip_batch_s", ip_batch_s, "s", n=n, shape=shape, host_ipv4=label)
        emit("ratio", res["program_s"] / ip_batch_s, "ratio", n=n, shape=shape, policy="on", host_ipv4=label)
        emit("kernel_writes_s", res["kernel_writes_s"], "s", n=n, shape=shape, policy="on", host_ipv4=label)
        emit("kernel_ratio", res["kernel_writes_s"] / ip_batch_s, "ratio", n=n, shape=shape, policy="on",
             host_ipv4=label)
    finally:
        netns.del_netns(a)
        netns.del_netns(b)


def one_veth(n: int, tmp: Path, tag: str) -> None:
    """The route/neighbour writer alone against ip -batch, every endpoint on one veth."""
    a, b = f"tbybC{tag}", f"tbybD{tag}"
    try:
        for ns in (a, b):
            netns.add_netns(ns)
            make_veths(ns, 1)
        r = netns.nsexec(a, [sys.executable, WORKER, "writer", str(n)])
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["applied"] == 4 * n and res["failed"] == 0, res
        ip_batch_s = time_ip_batch(b, tmp / "one.batch", n, lambda i: "tbe0")
        emit("program_s", res["writer_s"], "s", n=n, shape="one-veth", scope="routes+neighbours writer")
        emit("ip_batch_s", ip_batch_s, "s", n=n, shape="one-veth")
        emit("ratio", res["writer_s"] / ip_batch_s, "ratio", n=n, shape="one-veth")
    finally:
        netns.del_netns(a)
        netns.del_netns(b)


def add_latency(backend: str, count: int, tmp: Path, tag: str) -> None:
    ns = f"tbybL{tag}{backend[0]}"
    agent = None
    server = None
    try:
        netns.add_netns(ns)
        make_veths(ns, count + 1)
        if backend == "sqlite":
            url = f"sqlite://{tmp}/add.db"
        else:
            server = EtcdServer(name="tbyb-add", netns=ns).start()
            url = server.url
        agent = netns.spawn(ns, [sys.executable, "-m", "tabby.cli", "--store", url, "agent", "--host", "hb",
                                 "--metrics-port", "0", "--log-level", "warning"], tmp / f"agent-{backend}.log")
        # a first endpoint, so the agent is past start-up when we measure
        r = netns.nsexec(ns, [sys.executable, WORKER, "adds", url, "hb", "1", "0"], timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"warm-up: {r.stderr[-2000:]}")
        r = netns.nsexec(ns, [sys.executable, WORKER, "adds", url, "hb", str(count), "1"], timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        lat = sorted(json.loads(r.stdout.strip().splitlines()[-1])["latencies_ms"])
        emit("add_p50_ms", statistics.median(lat), "ms", backend=backend, adds=len(lat))
        emit("add_p99_ms", lat[min(len(lat) - 1, int(len(lat) * 0.99))], "ms", backend=backend, adds=len(lat))
    finally:
        if agent is not None:
            netns.stop(agent)
        if server is not None:
            server.stop()
        netns.del_netns(ns)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:4]
    with tempfile.TemporaryDirectory(prefix="tabby-bench-agent-") as d:
        tmp = Path(d)
        for n in (2000,) if args.quick else (2000, 10_000):
            for host_v4 in (True, False):
                cold(n, tmp, tag, host_v4)
        one_veth(2000 if args.quick else 10_000, tmp, tag)
        for backend in ("sqlite", "etcd"):
            add_latency(backend, 50 if args.quick else 200, tmp, tag)


if __name__ == "__main__":
    main()
