"""Valid records that conflict are refused, not obeyed; a policy that cannot be written holds new
workloads back. In a real 3-host lab, with real traffic."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lablib import lab

from tabby.client import ResourceClient
from tabby.ipam import IPAM
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.model import validate
from tabby.model.status import decode_status
from tabby.store import NotFound, open_store

GW6 = "fe80::ecee:eeff:feee:eeee"  # the host end of every tabby veth (see TRIALS.md)


@pytest.fixture(scope="module")
def the_lab() -> Iterator[L.Lab]:
    with lab(hosts=3, containers=1, vms=0) as the_lab:
        assert L.wait_until(lambda: all(r["ok"] for r in the_lab.matrix(("v6",), tcp=False)), 60)
        yield the_lab


def client(the_lab: L.Lab) -> ResourceClient:
    return ResourceClient(open_store(the_lab.store_url))


def ns_of(the_lab: L.Lab, name: str) -> str:
    return next(w for w in the_lab.topo.workloads if w.name == name).ns


def ping(src_ns: str, addr: str, count: int = 3) -> bool:
    return subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-c", str(count), "-i", "0.2", "-W", "1", addr],
                          capture_output=True).returncode == 0


def tabby_routes(host_ns: str, fam: str = "-6") -> dict[str, str]:
    return {r["dst"]: r.get("dev", "") for r in json.loads(netns.ip("-j", fam, "route", "show", "proto", "77",
                                                                    ns=host_ns) or "[]")}


def route_to(host_ns: str, addr: str) -> dict[str, Any]:
    return json.loads(netns.ip("-j", "route", "get", addr, ns=host_ns))[0]


def echo_requests_seen(ns: str) -> int:
    for line in netns.nsexec(ns, ["cat", "/proc/net/snmp6"]).stdout.splitlines():
        if line.startswith("Icmp6InEchos "):
            return int(line.split()[1])
    raise AssertionError("no Icmp6InEchos")


def endpoint_state(the_lab: L.Lab, host: str, name: str) -> Any:
    kv = open_store(the_lab.store_url).get(f"/tabby/status/endpoints/{host}/{name}")
    return decode_status(kv.key, kv.value) if kv else None


def workload(host_ns: str, ns: str, iface: str, addrs: list[str]) -> None:
    """A container's namespace wired as tabby-cni wires one (veth, /128, default via the host end)."""
    netns.add_netns(ns)
    netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", iface, ns=ns)
    netns.ip("link", "set", iface, "netns", host_ns, ns=ns)
    netns.ip("link", "set", iface, "address", "ee:ee:ee:ee:ee:ee", ns=host_ns)
    netns.nsexec(host_ns, ["sysctl", "-qw", f"net.ipv6.conf.{iface}.accept_dad=0"])
    netns.ip("link", "set", iface, "up", ns=host_ns)
    netns.nsexec(ns, ["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"])
    netns.ip("link", "set", "eth0", "up", ns=ns)
    for a in addrs:
        netns.ip("addr", "add", f"{a}/128" if ":" in a else f"{a}/32", "dev", "eth0", ns=ns)
    netns.ip("-6", "route", "add", "default", "via", GW6, "dev", "eth0", ns=ns)


def endpoint_doc(name: str, host: str, iface: str, mac: str, addrs: list[str]) -> Any:
    return validate({"kind": "Endpoint", "metadata": {"name": name, "labels": {"lab.workload": name}},
                     "spec": {"host": host, "orchestrator": "container", "workload_id": name, "interface": iface,
                              "mac": mac, "profiles": ["lab-open"],
                              "ipv6_addresses": [a for a in addrs if ":" in a],
                              "ipv4_addresses": [a for a in addrs if ":" not in a]}})


def mac_of(ns: str) -> str:
    return json.loads(netns.ip("-j", "link", "show", "eth0", ns=ns))[0]["address"]


def test_an_address_claimed_twice_stays_with_its_first_holder(the_lab: L.Lab) -> None:
    h1, h2, h3 = the_lab.topo.hosts
    addrs = the_lab.addresses()
    x = addrs["h1-c1"]["v6"][0]
    holder = the_lab.endpoint_of(next(w for w in the_lab.topo.workloads if w.name == "h1-c1"))
    thief_ns = f"{the_lab.topo.prefix}-thief"
    c = client(the_lab)
    try:
        workload(h2.ns, thief_ns, "tbythief0", [x])
        before = echo_requests_seen(thief_ns)
        c.apply(endpoint_doc("thief", h2.name, "tbythief0", mac_of(thief_ns), [x]))
        assert L.wait_until(lambda: (st := endpoint_state(the_lab, h2.name, "thief")) is not None
                            and st.state == "conflict", 15, 0.2), endpoint_state(the_lab, h2.name, "thief")
        assert endpoint_state(the_lab, h2.name, "thief").reason == f"conflict: {x} held by {holder}"
        time.sleep(2)  # what a hijack would need: the route on h2 and its BGP announcement
        for h in (h1, h2, h3):
            assert "tbythief0" not in tabby_routes(h.ns).values(), h.name
        assert route_to(h2.ns, x).get("gateway") == h1.v6  # h2 itself still sends x to h1
        assert route_to(h3.ns, x).get("gateway") == h1.v6
        assert ping(ns_of(the_lab, "h3-c1"), x, count=5)  # the first holder keeps being reached
        assert echo_requests_seen(thief_ns) == before  # and the thief saw none of it
        # the thief's host never lets it send from the address either: not in the policy's sets
        r = netns.nsexec(h2.ns, ["nft", "-j", "list", "set", "inet", "tabby", "wl_src6"])
        assert "tbythief0" not in r.stdout
        r = subprocess.run([sys.executable, "-m", "tabby.cli", "--store", the_lab.store_url, "status", "-o", "json"],
                           capture_output=True, text=True)
        assert r.returncode == 0
        assert {"endpoint": "thief", "host": h2.name, "state": "conflict",
                "reason": f"conflict: {x} held by {holder}", "host_alive": True} in json.loads(r.stdout)["endpoints"]
    finally:
        with contextlib.suppress(NotFound):  # (not there if the apply above failed: that error shows)
            c.delete("Endpoint", "thief")
        netns.del_netns(thief_ns)
    assert ping(ns_of(the_lab, "h3-c1"), x)


OWNED_COPY = r"""
import sys, time
import nftables
nft = nftables.Nftables()
rc, out, err = nft.cmd("list table inet tabby")
assert rc == 0, err
# the same table, owned by this process: nobody else may change or delete it while we live
copy = out.replace("table inet tabby {", "table inet tabby {\n\tflags owner", 1)
rc, _, err = nft.cmd("delete table inet tabby\n" + copy)
print("ready" if rc == 0 else f"failed: {err}", flush=True)
time.sleep(600)
"""


def test_a_policy_that_cannot_be_written_holds_new_workloads_back(the_lab: L.Lab) -> None:
    h1 = the_lab.topo.hosts[0]
    addrs = the_lab.addresses()
    old = addrs["h1-c1"]["v6"][0]
    log = the_lab.dir / "owned-nft.log"
    blocker = netns.spawn(h1.ns, [sys.executable, "-c", OWNED_COPY], log)
    new_ns = f"{the_lab.topo.prefix}-late"
    ipam, c = IPAM(open_store(the_lab.store_url)), client(the_lab)
    got: list[str] = []
    try:
        try:
            netns.wait_for(lambda: "ready" in log.read_text() or "failed" in log.read_text(), 15, 0.1, "owned table")
            assert "ready" in log.read_text(), log.read_text()
            got = [str(a.ip) for a in ipam.assign("conflict-test.late", h1.name, ipv6=1, endpoint="late")]
            workload(h1.ns, new_ns, "tbylate0", got)
            c.apply(endpoint_doc("late", h1.name, "tbylate0", mac_of(new_ns), got))
            assert L.wait_until(lambda: (st := endpoint_state(the_lab, h1.name, "late")) is not None
                                and "waiting for policy" in st.reason, 20, 0.2), \
                endpoint_state(the_lab, h1.name, "late")
            assert endpoint_state(the_lab, h1.name, "late").state == "down"
            time.sleep(2)
            assert "tbylate0" not in tabby_routes(h1.ns).values()  # no route while its policy is not in
            assert not ping(ns_of(the_lab, "h3-c1"), got[0], count=2)
            # the existing workload keeps its route and its policy (the table as it was)
            assert tabby_routes(h1.ns).get(old) is not None
            assert ping(ns_of(the_lab, "h3-c1"), old)
            assert "h1-c1" in netns.nsexec(h1.ns, ["nft", "list", "table", "inet", "tabby"]).stdout or \
                old in netns.nsexec(h1.ns, ["nft", "list", "set", "inet", "tabby", "wl_src6"]).stdout
        finally:
            netns.stop(blocker)  # its table goes with it; the agent writes its own again
        assert L.wait_until(lambda: "tbylate0" in tabby_routes(h1.ns).values(), 20, 0.2)
        assert L.wait_until(lambda: (st := endpoint_state(the_lab, h1.name, "late")) is not None
                            and st.state == "up", 20, 0.2), endpoint_state(the_lab, h1.name, "late")
        assert L.wait_until(lambda: ping(ns_of(the_lab, "h3-c1"), got[0], count=2), 20, 0.5)
    finally:
        with contextlib.suppress(NotFound):
            c.delete("Endpoint", "late")
        ipam.release_handle("conflict-test.late")
        netns.del_netns(new_ns)
