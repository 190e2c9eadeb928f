"""Port security and allowed address pairs through a real neutron-server and a real lab: VM
namespaces on Neutron's ports send from addresses that are not theirs, and the real nftables guards
on their hosts let that through only where Neutron says so. One neutron-server and lab for the
module."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lablib import lab
from neutronlib import neutron_server
from test_openstack import Neutron, ping, vm_addresses

from tabby.lab import lab as L
from tabby.lab import netns, probe
from tabby.lab.topology import LabVm

UDP_PORT = 9999
# prints the source address of every UDP datagram it gets, one a line
RECEIVE = f"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", {UDP_PORT}))
while True:
    data, addr = s.recvfrom(100)
    print(addr[0].removeprefix("::ffff:"), flush=True)
"""
# sends one datagram from the address given, whether or not the interface has it
SEND = f"""
import socket, sys
src, dst = sys.argv[1], sys.argv[2]
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
# IPV6_TRANSPARENT / IP_TRANSPARENT: bind to and route from an address the host does not have
s.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, 75 if v6 else 19, 1)
s.bind((src, 0))
s.sendto(b"x", (dst, {UDP_PORT}))
"""


class Cloud:
    """The module's lab, neutron-server and one dual-stack network with an open security group."""

    def __init__(self, the_lab: L.Lab, url: str, d: Path) -> None:
        self.lab, self.n, self.dir = the_lab, Neutron(url), d
        self.net = self.n.post("network", {"name": "ports", "provider:network_type": "flat",
                                           "provider:physical_network": "ports"})
        self.n.post("subnet", {"network_id": self.net["id"], "ip_version": 6, "cidr": "fd00:7::/64",
                               "ipv6_address_mode": "dhcpv6-stateful"})
        self.n.post("subnet", {"network_id": self.net["id"], "ip_version": 4, "cidr": "10.67.0.0/24"})
        self.sg = self.n.post("security-group", {"name": "open"})
        for d_ in ("ingress", "egress"):
            for eth in ("IPv6", "IPv4"):
                self.n.post("security-group-rule", {"security_group_id": self.sg["id"], "direction": d_,
                                                    "ethertype": eth})
        self.vms = 0

    def vm(self, host: Any, **port: Any) -> tuple[dict[str, Any], LabVm]:
        """A port on the host and a VM namespace on it that has its Neutron addresses by DHCP."""
        self.vms += 1
        body = {"network_id": self.net["id"], "binding:host_id": host.name, "device_owner": "compute:nova",
                "device_id": f"vm{self.vms}", "security_groups": [self.sg["id"]], **port}
        p = self.n.post("port", body)
        v = LabVm(host, self.vms, "dhclient", tap_name="tap" + p["id"][:11], mac_address=p["mac_address"])
        self.lab.add_vm(v, orchestrate=False)
        want = sorted(f["ip_address"] for f in p["fixed_ips"])
        assert L.wait_until(lambda: sorted(a for fam in vm_addresses(v.ns) for a in fam) == want, 60), \
            (vm_addresses(v.ns), want)
        return p, v

    def receiver(self, v: LabVm) -> Path:
        log = self.dir / f"udp-{v.name}.log"
        netns.spawn(v.ns, [sys.executable, "-c", RECEIVE], log)  # ended by the lab's teardown (by pid)
        return log


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    d = tmp_path_factory.mktemp("neutron-ports")
    with lab(2, 0) as the_lab, neutron_server(d / "neutron", the_lab.store_url) as url:
        yield Cloud(the_lab, url, d)


def send(v: LabVm, src: str, dst: str) -> bool:
    """False while the guest has no route yet (its first RA may still be on the way)."""
    return netns.nsexec(v.ns, [sys.executable, "-c", SEND, src, dst]).returncode == 0


def received(log: Path) -> set[str]:
    return set(log.read_text().split()) if log.exists() else set()


def arrives(v: LabVm, src: str, dst: str, log: Path) -> bool:
    """Sent (again) from src, until the receiver logging to ``log`` has heard src."""
    return L.wait_until(lambda: send(v, src, dst) and src in received(log), 20)


def guard_counter(host_ns: str, what: str) -> int:
    chain = json.loads(netns.nsexec(host_ns, ["nft", "-j", "list", "chain", "inet", "tabby", "guard"]).stdout)
    for item in chain["nftables"]:
        rule = item.get("rule")
        if rule and what in rule.get("comment", ""):
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise LookupError(what)


def own(v: LabVm, version: int) -> str:
    return vm_addresses(v.ns)[0 if version == 6 else 1][0]


def test_port_security_off_sends_from_any_source_and_its_neighbours_still_cannot(cloud: Cloud) -> None:
    h1, h2 = cloud.lab.topo.hosts
    _, free = cloud.vm(h1, port_security_enabled=False, security_groups=[])
    _, guarded = cloud.vm(h1)  # a neighbour on the same host
    _, dst = cloud.vm(h2)
    log = cloud.receiver(dst)
    for version, fake, fake2, what in ((6, "fd00:7::dead", "fd00:7::beef", "spoofed IPv6 source"),
                                       (4, "10.67.0.222", "10.67.0.223", "spoofed IPv4 source")):
        target = own(dst, version)
        # the path works with the guarded port's own source first, so a drop is the guard's, not a late route
        assert arrives(guarded, own(guarded, version), target, log)
        assert arrives(free, fake, target, log)
        before = guard_counter(h1.ns, what)
        for _ in range(3):
            assert send(guarded, fake2, target)
        assert L.wait_until(lambda w=what, b=before: guard_counter(h1.ns, w) >= b + 3, 10)
        assert fake2 not in received(log)


def vip_on(v: LabVm, addr: str, present: bool) -> None:
    """What keepalived does on becoming master (add) or backup (delete)."""
    netns.ip("addr", "add" if present else "del", addr + ("/128" if ":" in addr else "/32"), "dev", "eth0",
             *(("nodad",) if ":" in addr and present else ()), ns=v.ns)


def test_allowed_address_pairs_route_a_vip_to_its_holder_and_follow_a_keepalived_move(cloud: Cloud) -> None:
    h1, h2 = cloud.lab.topo.hosts
    vips = {6: "fd00:7::100", 4: "10.67.0.200"}
    pairs = [{"ip_address": a} for a in vips.values()]
    pa, a = cloud.vm(h1, allowed_address_pairs=pairs)
    pb, b = cloud.vm(h2, allowed_address_pairs=pairs)
    _, c = cloud.vm(h2)  # no pair
    assert {p["ip_address"] for p in cloud.n.get("port", pb["id"])["allowed_address_pairs"]} == set(vips.values())
    for addr in vips.values():
        vip_on(a, addr, True)  # a is keepalived's master
    log_c, log_a = cloud.receiver(c), cloud.receiver(a)
    for version, vip in vips.items():
        assert arrives(a, vip, own(c, version), log_c)  # the holder sends from the VIP, across hosts
        assert L.wait_until(lambda vip=vip: ping(c.ns, vip), 20)  # and receives on it
        assert arrives(c, own(c, version), own(a, version), log_a)
        what = f"spoofed IPv{version} source"
        before = guard_counter(h2.ns, what)
        for _ in range(3):
            assert send(c, vip, own(a, version))  # the third port cannot send from the VIP
        assert L.wait_until(lambda w=what, n=before: guard_counter(h2.ns, w) >= n + 3, 10)
        assert vip not in received(log_a)
    # keepalived moves the VIP to b and back: reachability follows within 2 s each time, with no
    # Neutron call (only the guests know who holds it)
    for old, new in ((a, b), (b, a)):
        for vip in vips.values():
            vip_on(old, vip, False)
            vip_on(new, vip, True)
            moved = time.monotonic()
            assert L.wait_until(lambda vip=vip: probe.in_ns(c.ns, lambda: probe.ping(vip, 0.3, 0.1))[0], 2), \
                (vip, time.monotonic() - moved)
    tap_a = "tap" + pa["id"][:11]
    assert tap_a in netns.ip("-6", "route", "show", vips[6], ns=h1.ns)
    assert tap_a in netns.ip("route", "show", vips[4], ns=h1.ns)
