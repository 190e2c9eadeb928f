"""Policy with real traffic: a lab of two hosts (two containers and a VM each), nftables in every
host, packets really sent — allowed and blocked ports, a rogue workload, path MTU, NAT, drift."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from lablib import all_ok, lab

from tabby.agent.policy_verdict import Packet, verdict
from tabby.client import ResourceClient
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.topology import OUTSIDE_V4, OUTSIDE_V6
from tabby.model import validate
from tabby.model.status import decode_status
from tabby.store import open_store

ALT_PORT = 8081  # a second listener in some workloads: the port the test's policy does not allow


@pytest.fixture(scope="module")
def the_lab() -> Iterator[L.Lab]:
    with lab(2, 2, vms=1) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 90), [r for r in the_lab.matrix() if not r["ok"]]
        yield the_lab


def client(the_lab: L.Lab) -> ResourceClient:
    return ResourceClient(open_store(the_lab.store_url))


def ns_of(the_lab: L.Lab, name: str) -> str:
    return dict(the_lab.members())[name]


def tcp(src_ns: str, addr: str, port: int) -> bool:
    target = f"[{addr}]" if ":" in addr else addr
    r = subprocess.run(["ip", "netns", "exec", src_ns, "socat", "-T", "2", "-u",
                        f"TCP:{target}:{port},connect-timeout=1.5", "-"], capture_output=True, text=True, timeout=20)
    return r.returncode == 0 and bool(r.stdout.strip())


def ping(src_ns: str, addr: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return netns.nsexec(src_ns, ["ping", "-6" if ":" in addr else "-4", "-c", "2", "-i", "0.2", "-W", "1",
                                 *extra, addr])


def counters(host_ns: str, chain: str = "guard") -> dict[str, int]:
    out = json.loads(netns.nsexec(host_ns, ["nft", "-j", "list", "chain", "inet", "tabby", chain]).stdout)
    res = {}
    for item in out["nftables"]:
        r = item.get("rule")
        if r:
            pk = next((e["counter"]["packets"] for e in r["expr"] if "counter" in e), 0)
            res[r["comment"].split(":", 1)[1]] = pk
    return res


def endpoint(the_lab: L.Lab, name: str) -> Any:
    w = next(w for w in the_lab.topo.workloads if w.name == name)
    return client(the_lab).get("Endpoint", the_lab.endpoint_of(w))


def test_allowed_port_passes_and_others_are_blocked_both_ways(the_lab: L.Lab) -> None:
    names = ["h1-c1", "h1-c2", "h2-c1"]  # two on one host, one on the other
    addrs = the_lab.addresses()
    for n in names:
        netns.spawn(ns_of(the_lab, n), ["socat", f"TCP6-LISTEN:{ALT_PORT},fork,reuseaddr,ipv6only=0",
                                        f"SYSTEM:echo {n}"], the_lab.dir / f"alt-{n}.log")
    c = client(the_lab)
    pol = validate({"kind": "Policy", "metadata": {"name": "t-web"}, "spec": {
        "order": 10, "selector": 'lab.workload in {"h1-c1", "h1-c2", "h2-c1"}',
        "ingress": [{"action": "allow", "protocol": "tcp", "dst_ports": [8080]}, {"action": "deny"}]}})
    c.apply(pol)
    try:
        pairs = [(a, b, fam) for a in names for b in names if a != b for fam in ("v6", "v4")]

        def enforced() -> bool:
            return all(tcp(ns_of(the_lab, a), addrs[b][fam][0], 8080) and
                       not tcp(ns_of(the_lab, a), addrs[b][fam][0], ALT_PORT) for a, b, fam in pairs)

        assert L.wait_until(enforced, 30, 0.5), [
            (a, b, fam, tcp(ns_of(the_lab, a), addrs[b][fam][0], 8080),
             tcp(ns_of(the_lab, a), addrs[b][fam][0], ALT_PORT)) for a, b, fam in pairs]
        # ping is neither: denied by the policy's last rule
        assert ping(ns_of(the_lab, "h1-c1"), addrs["h2-c1"]["v6"][0]).returncode != 0
        # the evaluator `tabby diagnose` uses agrees with the kernel on every pair
        pols, profs, eps = c.list("Policy")[0], c.list("Profile")[0], c.list("Endpoint")[0]
        for a, b, fam in pairs:
            s, d = endpoint(the_lab, a), endpoint(the_lab, b)
            for port, expect in ((8080, True), (ALT_PORT, False)):
                pkt = Packet(addrs[a][fam][0], addrs[b][fam][0], 6, dst_port=port)
                assert verdict(s, d, pkt, pols, profs, eps).allowed is expect, (a, b, fam, port)
        # a workload the policy does not select still reaches ALT_PORT (the open profile)
        assert tcp(ns_of(the_lab, "h2-c2"), addrs["h2-c1"]["v6"][0], 8080)
    finally:
        c.delete("Policy", "t-web")
    assert L.wait_until(lambda: tcp(ns_of(the_lab, "h1-c2"), addrs["h1-c1"]["v6"][0], ALT_PORT), 20, 0.5)


RAW_SENDER = r"""
import socket, struct, sys
kind = sys.argv[1]
gw6 = "fe80::ecee:eeff:feee:eeee"
if kind == "ra":
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)  # else the rogue takes its own RA
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    # type 134, code 0, checksum (kernel), hop limit 64, flags 0, router lifetime 1800 s
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    # prefix information: fd00:bad::/64, on-link and autonomous
    pi = struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, "fd00:bad::")
    idx = socket.if_nametoindex("eth0")
    for dst in ("ff02::1", gw6):
        for _ in range(3):
            s.sendto(ra + pi, (dst, 0, 0, idx))
elif kind == "dhcp6":
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 547))
    idx = socket.if_nametoindex("eth0")
    for msg_type in (2, 7):  # ADVERTISE, REPLY
        for dst in (gw6, "ff02::1:2"):
            payload = bytes([msg_type, 0x12, 0x34, 0x56]) + b"\0\x01\0\x0a\0\x03\0\x01\x02\0\0\0\0\x01"
            s.sendto(payload, (dst, 546, 0, idx))
elif kind == "dhcp4":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    s.bind(("0.0.0.0", 67))
    offer = bytes([2, 1, 6, 0]) + bytes(232) + bytes([99, 130, 83, 99, 53, 1, 2, 255])
    for _ in range(3):
        s.sendto(offer, ("255.255.255.255", 68))
"""


def test_rogue_workload_is_stopped_and_its_neighbour_is_unharmed(the_lab: L.Lab) -> None:
    rogue, victim = ns_of(the_lab, "h1-c2"), ns_of(the_lab, "h1-v1")
    host_ns = the_lab.topo.hosts[0].ns
    addrs = the_lab.addresses()
    target6, target4 = addrs["h2-c1"]["v6"][0], addrs["h2-c1"]["v4"][0]
    def vm_routes() -> list[dict[str, Any]]:
        rows = json.loads(netns.ip("-j", "-6", "route", "show", ns=victim))
        return [{k: v for k, v in r.items() if k != "expires"} for r in rows]

    vm_routes_before = vm_routes()
    assert [r for r in vm_routes_before if r["dst"] == "default"]
    before = counters(host_ns)
    for kind in ("ra", "dhcp6", "dhcp4"):
        r = netns.nsexec(rogue, [sys.executable, "-c", RAW_SENDER, kind])
        assert r.returncode == 0, r.stderr
    # spoofed sources: addresses the rogue does not own, IPv6 and IPv4
    netns.ip("addr", "add", "fd00:e::fff0/128", "dev", "eth0", "nodad", ns=rogue)
    netns.ip("addr", "add", "10.65.255.250/32", "dev", "eth0", ns=rogue)
    try:
        assert ping(rogue, target6, "-I", "fd00:e::fff0").returncode != 0
        assert ping(rogue, target4, "-I", "10.65.255.250").returncode != 0
        assert ping(rogue, target6).returncode == 0  # its own address still works
        # a foreign source MAC: its own addresses, someone else's MAC
        mac = json.loads(netns.ip("-j", "link", "show", "eth0", ns=rogue))[0]["address"]
        netns.ip("link", "set", "eth0", "address", "02:de:ad:be:ef:01", ns=rogue)
        try:
            assert ping(rogue, target6).returncode != 0
            assert ping(rogue, target4).returncode != 0
        finally:
            netns.ip("link", "set", "eth0", "address", mac, ns=rogue)
        after = counters(host_ns)
        grew = {k: after[k] - before[k] for k in after}
        assert grew["workload RA"] >= 6, grew
        assert grew["workload DHCPv6 server"] >= 2, grew  # the unicast ones (the host is in no DHCP group)
        assert grew["workload DHCPv4 server"] >= 3, grew
        assert grew["spoofed IPv6 source"] >= 2, grew
        assert grew["spoofed IPv4 source"] >= 2, grew
        assert grew["foreign source MAC"] >= 4, grew
        # the rogue's RA changed nothing on the host or in the VM next door
        assert vm_routes() == vm_routes_before
        assert "fd00:bad" not in netns.ip("-6", "route", "show", ns=host_ns)
        assert "fd00:bad" not in netns.ip("-6", "addr", "show", ns=victim)
        assert "fd00:bad" not in netns.ip("-6", "addr", "show", ns=the_lab.topo.hosts[0].ns)
    finally:  # the rogue is the module's: it gets back only its own addresses
        netns.ip("addr", "del", "fd00:e::fff0/128", "dev", "eth0", ns=rogue, check=False)
        netns.ip("addr", "del", "10.65.255.250/32", "dev", "eth0", ns=rogue, check=False)
    assert L.wait_until(lambda: ping(rogue, target4).returncode == 0, 10)


def test_packet_too_big_comes_back_through_the_policy(the_lab: L.Lab) -> None:
    src, dst = "h1-c1", "h2-c2"
    src_ns, dst_addr = ns_of(the_lab, src), the_lab.addresses()[dst]["v6"][0]
    dst_if = endpoint(the_lab, dst).spec.interface
    h2 = the_lab.topo.hosts[1].ns
    c = client(the_lab)
    # the source takes no new connection from anywhere: the packet-too-big must still reach it
    c.apply(validate({"kind": "Policy", "metadata": {"name": "t-closed"}, "spec": {
        "order": 5, "selector": f'lab.workload == "{src}"', "ingress": [{"action": "deny"}]}}))
    netns.ip("link", "set", dst_if, "mtu", "1400", ns=h2)
    netns.ip("link", "set", "eth0", "mtu", "1400", ns=ns_of(the_lab, dst))  # both ends of the narrow link
    try:
        assert L.wait_until(lambda: ping(ns_of(the_lab, "h2-c1"), the_lab.addresses()[src]["v6"][0])
                            .returncode != 0, 20)
        assert ping(src_ns, dst_addr).returncode == 0  # small packets pass
        # a 1500-byte packet (1452 + 8 + 40) into the 1400-byte hop: the first is answered by a
        # packet-too-big from host 2, which the source's kernel remembers as the path MTU
        ping(src_ns, dst_addr, "-M", "do", "-s", "1452")
        route = netns.nsexec(src_ns, ["ip", "-6", "route", "get", dst_addr]).stdout
        assert "mtu 1400" in route, route
        # now fragmented at the source (and the reply at the destination); conntrack reassembles
        # both before the policy looks, so they pass as the established flow they are
        assert ping(src_ns, dst_addr, "-s", "1452").returncode == 0
    finally:
        netns.ip("link", "set", "eth0", "mtu", "1500", ns=ns_of(the_lab, dst))
        netns.ip("link", "set", dst_if, "mtu", "1500", ns=h2)
        c.delete("Policy", "t-closed")


def test_nat_outgoing_masquerades_only_traffic_leaving_the_fabric(the_lab: L.Lab) -> None:
    out_ns, h1 = the_lab.topo.outside_ns, the_lab.topo.hosts[0]
    netns.spawn(out_ns, ["socat", "TCP6-LISTEN:8090,fork,reuseaddr,ipv6only=0",
                         "SYSTEM:echo $SOCAT_PEERADDR"], the_lab.dir / "peer-echo.log")
    src_ns = ns_of(the_lab, "h1-c1")
    mine = the_lab.addresses()["h1-c1"]

    def seen_as(dst: str) -> str:
        target = f"[{dst}]" if ":" in dst else dst
        r = netns.nsexec(src_ns, ["socat", "-T", "2", "-u", f"TCP:{target}:8090,connect-timeout=2", "-"])
        if not r.stdout.strip():
            return ""
        ip = ipaddress.ip_address(r.stdout.strip().strip("[]"))  # socat writes [0000:...:0001]
        return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)

    assert L.wait_until(lambda: seen_as(OUTSIDE_V6) == mine["v6"][0], 10)
    assert seen_as(OUTSIDE_V4) == mine["v4"][0]
    c = client(the_lab)
    for name, cidr in (("lab-v6", "fd00:e::/112"), ("lab-v4", "10.65.0.0/16")):
        c.apply(validate({"kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr, "nat_outgoing": True}}))
    try:
        assert L.wait_until(lambda: seen_as(OUTSIDE_V6) == h1.v6, 15), seen_as(OUTSIDE_V6)
        assert seen_as(OUTSIDE_V4) == h1.v4
        # inside the fabric nothing is translated: h2's workloads still see the real source
        assert L.wait_until(lambda: all_ok(the_lab), 10), [r for r in the_lab.matrix() if not r["ok"]]
    finally:
        for name, cidr in (("lab-v6", "fd00:e::/112"), ("lab-v4", "10.65.0.0/16")):
            c.apply(validate({"kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr}}))
    assert L.wait_until(lambda: seen_as(OUTSIDE_V6) == mine["v6"][0], 15)


def test_hand_edits_are_undone_and_a_corrupt_policy_changes_nothing(the_lab: L.Lab) -> None:
    h1 = the_lab.topo.hosts[0].ns

    def listing() -> str:
        return netns.nsexec(h1, ["nft", "-s", "list", "table", "inet", "tabby"]).stdout

    good = listing()
    assert "chain forward" in good
    netns.nsexec(h1, ["nft", "insert", "rule", "inet", "tabby", "forward", "accept"])
    assert L.wait_until(lambda: listing() == good, 15), listing()
    netns.nsexec(h1, ["nft", "flush", "chain", "inet", "tabby", "guard"])
    assert L.wait_until(lambda: listing() == good, 15)
    netns.nsexec(h1, ["nft", "delete", "table", "inet", "tabby"])
    assert L.wait_until(lambda: listing() == good, 15)
    # a corrupt Policy record is skipped: the table and the matrix stay as they were
    store = open_store(the_lab.store_url)
    broken = "/tabby/v1/policies/broken"
    store.put(broken, b'{"kind": "Policy", "metadata": {"name": "broken"}, "spec": {"order": "x"')

    def h1_saw_it() -> bool:  # h1's agent names it in its host status once it has read (and skipped) it
        kv = store.get(f"/tabby/status/hosts/{the_lab.topo.hosts[0].name}")
        return kv is not None and any(c.key == broken for c in decode_status(kv.key, kv.value).corrupt)

    try:
        assert L.wait_until(h1_saw_it, 15, 0.2)
        assert all_ok(the_lab)
        assert listing() == good
    finally:
        store.delete(broken)
