"""One host with 2,000 dual-stack endpoints (issue 16): the last one still reachable from another
host in both families.

1,999 endpoints are veths with the host end in the lab host's namespace (named like the CNI
plugin's, so the policy guards treat them as workloads) and the other end in a sink namespace,
their addresses taken from IPAM as the plugin takes them, their Endpoints written to the Store;
the 2,000th is a container made by tabby-cni. Everything lives under the lab's prefix, so
`lab down` removes it even when the test fails.
"""

from __future__ import annotations

import json
import subprocess

from lablib import kernel_routes, lab

from tabby.client import ResourceClient
from tabby.ipam import IPAM
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.topology import LabWorkload
from tabby.model import validate
from tabby.store import open_store

EXTRA = 1999


def _veths(host_ns: str, sink: str, names: list[str]) -> None:
    lines = [f"link add {n} type veth peer name s{n[3:]} netns {sink}" for n in names]
    lines += [f"link set {n} up" for n in names]
    netns.ip("-batch", "-", ns=host_ns, input="\n".join(lines) + "\n")


def _ping(ns: str, address: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", address], capture_output=True)
    return r.returncode == 0


def test_the_last_of_2000_endpoints_on_one_host_is_reachable_in_both_families() -> None:
    with lab(2, 1) as the_lab:
        h1, h2 = the_lab.topo.hosts
        sink = f"{the_lab.topo.prefix}-sink"
        netns.add_netns(sink)
        names = [f"tbyb{i:06x}" for i in range(EXTRA)]
        _veths(h1.ns, sink, names)

        store = open_store(the_lab.store_url)
        ipam, client = IPAM(store), ResourceClient(store)
        for i, name in enumerate(names):
            got = ipam.assign(f"big.{name}", h1.name, ipv6=1, ipv4=1, endpoint=f"big-{name}")
            v6 = [str(a.ip) for a in got if a.ip.version == 6]
            v4 = [str(a.ip) for a in got if a.ip.version == 4]
            client.apply(validate({
                "kind": "Endpoint", "metadata": {"name": f"big-{name}", "labels": {L.WORKLOAD_LABEL: name}},
                "spec": {"host": h1.name, "orchestrator": "container", "workload_id": f"big.{name}",
                         "interface": name, "mac": f"02:b1:00:00:{i >> 8 & 255:02x}:{i & 255:02x}",
                         "ipv6_addresses": v6, "ipv4_addresses": v4, "profiles": [L.OPEN_PROFILE]}}))

        def programmed() -> bool:
            mine = set(names)
            v6 = [r for r in kernel_routes(h1.ns) if r.get("dev") in mine]
            v4 = [r for r in kernel_routes(h1.ns, "-4") if r.get("dev") in mine]
            return len(v6) == EXTRA and len(v4) == EXTRA

        assert L.wait_until(programmed, 180, 1.0), "h1's agent did not program the 1,999 endpoints"

        last = LabWorkload(h1, 99)  # the 2,000th: a container through tabby-cni, as a runtime makes one
        the_lab._container(last)
        info = netns.ip("-j", "addr", "show", "dev", "eth0", ns=last.ns)
        got = json.loads(info)[0].get("addr_info", [])
        addrs = {"v6": [a["local"] for a in got if a["family"] == "inet6" and a["scope"] == "global"],
                 "v4": [a["local"] for a in got if a["family"] == "inet"]}
        assert addrs["v6"] and addrs["v4"], info
        peer = next(w for w in the_lab.topo.workloads if w.host is h2)
        for address in (addrs["v6"][0], addrs["v4"][0]):
            assert L.wait_until(lambda a=address: _ping(peer.ns, a), 30, 0.5), \
                f"{address} (endpoint 2,000 on {h1.name}) not reachable from {peer.name}"
        assert programmed()  # and the 1,999 are all still there
