"""Ports and subnets through a real neutron-server and a real lab. Port security and allowed
address pairs: VM namespaces on Neutron's ports send from addresses that are not theirs, and the
real nftables guards on their hosts let that through only where Neutron says so; a VIP follows its
holder. SLAAC and DHCPv6-stateless subnets: VM namespaces form Neutron's EUI-64 address with the
kernel's own SLAAC from tabby's RAs. One neutron-server and lab for the module."""

from __future__ import annotations

import http.server
import ipaddress
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from lablib import lab
from neutronlib import neutron_server, resync
from test_openstack import Neutron, ping, vm_addresses

from tabby.client import ResourceClient
from tabby.lab import lab as L
from tabby.lab import netns, probe
from tabby.lab.topology import LabVm
from tabby.openstack.translate import endpoint_name
from tabby.store import open_store

UDP_PORT = 9999
PAGE_SIZE = 3  # Neutron's pagination_max_limit here: a resync must follow its pages
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

# in a VM: a router solicitation on eth0, then the first RA's flags, prefixes and DNS servers (JSON)
RA = """
import json, socket, struct, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.settimeout(1)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    s.sendto(bytes([133, 0, 0, 0, 0, 0, 0, 0]), ("ff02::2", 0, 0, socket.if_nametoindex("eth0")))
    try:
        data, src = s.recvfrom(2000)
    except TimeoutError:
        continue
    if data[0] != 134:
        continue
    out = {"router": src[0].split("%")[0], "m": bool(data[5] & 0x80), "o": bool(data[5] & 0x40),
           "prefixes": [], "dns": []}
    off = 16
    while off + 2 <= len(data) and data[off + 1]:
        kind, size = data[off], data[off + 1] * 8
        if kind == 3:
            out["prefixes"].append({"prefix": socket.inet_ntop(socket.AF_INET6, data[off + 16: off + 32]),
                                    "len": data[off + 2], "l": bool(data[off + 3] & 0x80),
                                    "a": bool(data[off + 3] & 0x40)})
        elif kind == 25:
            out["dns"] += [socket.inet_ntop(socket.AF_INET6, data[i: i + 16]) for i in range(off + 8, off + size, 16)]
        off += size
    print(json.dumps(out))
    break
"""


class Cloud:
    """The module's lab, neutron-server and one dual-stack network with an open security group."""

    def __init__(self, the_lab: L.Lab, url: str, d: Path) -> None:
        self.lab, self.n, self.dir, self.url = the_lab, Neutron(url), d, url
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

    def vm(self, host: Any, network: dict[str, Any] | None = None, slaac: bool = False,
           **port: Any) -> tuple[dict[str, Any], LabVm]:
        """A port on the host and a VM namespace on it that has its Neutron addresses: by DHCP, or
        (slaac: an IPv6-only SLAAC network) by the kernel's own SLAAC from the RAs."""
        self.vms += 1
        body = {"network_id": (network or self.net)["id"], "binding:host_id": host.name,
                "device_owner": "compute:nova", "device_id": f"vm{self.vms}", "security_groups": [self.sg["id"]],
                **port}
        p = self.n.post("port", body)
        v = LabVm(host, self.vms, "dhclient", tap_name="tap" + p["id"][:11], mac_address=p["mac_address"],
                  ipv4=not slaac)
        self.lab.add_vm(v, orchestrate=False, start_client=not slaac)
        want = sorted(f["ip_address"] for f in p["fixed_ips"])
        assert L.wait_until(lambda: sorted(a for fam in vm_addresses(v.ns) for a in fam) == want, 60), \
            (vm_addresses(v.ns), want)
        return p, v

    def network(self, name: str, cidr: str, mode: str, dns: str) -> dict[str, Any]:
        """An IPv6-only network with one subnet in the given mode (RA mode unset: tabby's RAs)."""
        net = self.n.post("network", {"name": name, "provider:network_type": "flat", "provider:physical_network": name})
        self.n.post("subnet", {"network_id": net["id"], "ip_version": 6, "cidr": cidr, "ipv6_address_mode": mode,
                               "dns_nameservers": [dns]})
        return net

    def receiver(self, v: LabVm) -> Path:
        log = self.dir / f"udp-{v.name}.log"
        netns.spawn(v.ns, [sys.executable, "-c", RECEIVE], log)  # ended by the lab's teardown (by pid)
        return log


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    d = tmp_path_factory.mktemp("neutron-ports")
    with lab(2, 0) as the_lab, neutron_server(d / "neutron", the_lab.store_url, PAGE_SIZE) as url:
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
    # keepalived moves the VIP to b and back: reachability follows each time, with no Neutron call
    # (only the guests know who holds it)
    for old, new in ((a, b), (b, a)):
        for vip in vips.values():
            vip_on(old, vip, False)
            vip_on(new, vip, True)
            moved = time.monotonic()
            assert L.wait_until(lambda vip=vip: probe.in_ns(c.ns, lambda: probe.ping(vip, 0.3, 0.1))[0], 20), \
                (vip, time.monotonic() - moved)
    tap_a = "tap" + pa["id"][:11]
    assert tap_a in netns.ip("-6", "route", "show", vips[6], ns=h1.ns)
    assert tap_a in netns.ip("route", "show", vips[4], ns=h1.ns)


def eui64(prefix: str, mac: str) -> str:
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return str(ipaddress.IPv6Address(ipaddress.IPv6Network(prefix).network_address.packed[:8] + iid))


def settled(v: LabVm) -> bool:
    """The guest's addresses are past DAD and it has its default route from an RA again."""
    return not netns.ip("-6", "addr", "show", "dev", "eth0", "tentative", ns=v.ns).strip() and \
        "default" in netns.ip("-6", "route", "show", "default", ns=v.ns)


def test_slaac_and_dhcpv6_stateless_subnets_give_vms_exactly_neutrons_eui64_address(cloud: Cloud) -> None:
    h1, h2 = cloud.lab.topo.hosts
    nets = {"slaac": (cloud.network("slaac", "fd00:8::/64", "slaac", "fd00:8::53"), "fd00:8::/64", "fd00:8::53"),
            "dhcpv6-stateless": (cloud.network("stateless", "fd00:9::/64", "dhcpv6-stateless", "fd00:9::53"),
                                 "fd00:9::/64", "fd00:9::53")}
    vms = {}
    for (mode, (net, cidr, dns)), host in zip(nets.items(), (h1, h2), strict=True):
        p, v = cloud.vm(host, net, slaac=True)  # waits for the kernel's SLAAC address to be Neutron's
        (fixed,) = [f["ip_address"] for f in p["fixed_ips"]]
        assert fixed == eui64(cidr, p["mac_address"])  # Neutron's EUI-64, formed by the guest itself
        ra = json.loads(netns.nsexec(v.ns, [sys.executable, "-c", RA]).stdout)
        assert (ra["m"], ra["o"]) == (False, mode == "dhcpv6-stateless")
        assert ra["prefixes"] == [{"prefix": cidr.split("/")[0], "len": 64, "l": False, "a": True}]
        tap_ll = json.loads(netns.ip("-j", "-6", "addr", "show", "dev", v.tap, "scope", "link",
                                     ns=host.ns))[0]["addr_info"][0]["local"]
        assert ra["router"] == tap_ll
        routes = json.loads(netns.ip("-j", "-6", "route", "show", ns=v.ns))
        assert not [r for r in routes if r["dst"] == cidr]  # no on-link prefix route
        assert [(r.get("gateway"), r["dev"]) for r in routes if r["dst"] == "default"] == [(tap_ll, "eth0")]
        if mode == "dhcpv6-stateless":
            assert dns in ra["dns"]
        vms[mode] = (p, v)
    a, b = vms["slaac"][1], vms["dhcpv6-stateless"][1]
    for src, dst in ((a, b), (b, a)):  # across hosts, and to the outside
        assert L.wait_until(lambda s=src, d=dst: ping(s.ns, vm_addresses(d.ns)[0][0]), 20)
        assert L.wait_until(lambda s=src: ping(s.ns, "fd00:99::1"), 20)

    # a guest with privacy extensions and random interface ids forms other addresses: anti-spoofing
    # drops what it sends from them, until `tabby guest render` for the subnet has turned them off
    p, c = cloud.vm(h1, nets["slaac"][0], slaac=True)
    netns.nsexec(c.ns, ["sysctl", "-qw", "net.ipv6.conf.eth0.use_tempaddr=2", "net.ipv6.conf.eth0.addr_gen_mode=3"],
                 check=True)
    netns.ip("link", "set", "eth0", "down", ns=c.ns)
    netns.ip("link", "set", "eth0", "up", ns=c.ns)
    (fixed,) = [f["ip_address"] for f in p["fixed_ips"]]
    assert L.wait_until(lambda: len(vm_addresses(c.ns)[0]) >= 2 and fixed not in vm_addresses(c.ns)[0]
                        and settled(c), 30), vm_addresses(c.ns)
    before = guard_counter(h1.ns, "spoofed IPv6 source")
    assert not ping(c.ns, vm_addresses(b.ns)[0][0])
    assert guard_counter(h1.ns, "spoofed IPv6 source") > before
    root = cloud.dir / "guest-root"
    root.mkdir(exist_ok=True)  # as an image's mounted root is there
    r = subprocess.run([sys.executable, "-m", "tabby.cli", "guest", "render", "--distro", "debian", "--ipv6", "slaac",
                        "--no-ipv4", "--root", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    netns.nsexec(c.ns, ["sysctl", "-q", "-p", str(root / "etc/sysctl.d/30-eth0-rs-delay.conf")], check=True)
    netns.ip("link", "set", "eth0", "down", ns=c.ns)
    netns.ip("link", "set", "eth0", "up", ns=c.ns)
    assert L.wait_until(lambda: vm_addresses(c.ns)[0] == [fixed] and settled(c), 30), vm_addresses(c.ns)
    assert L.wait_until(lambda: ping(c.ns, vm_addresses(b.ns)[0][0]), 20)


class TokenGate:
    """In front of neutron-server (which runs noauth here): answers 401 unless X-Auth-Token is the
    token, else forwards; records each request's path. Stands in for keystonemiddleware."""

    def __init__(self, upstream: str, token: str) -> None:
        gate = self
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("X-Auth-Token") != token:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                gate.paths.append(self.path)
                r = requests.get(upstream + self.path, timeout=30)
                body = r.content.replace(upstream.encode(), gate.url.encode())  # next links point here
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_resync_reads_every_page_with_a_token_from_the_environment(cloud: Cloud) -> None:
    h1, _ = cloud.lab.topo.hosts
    client = ResourceClient(open_store(cloud.lab.store_url))
    ports = [cloud.n.post("port", {"network_id": cloud.net["id"], "binding:host_id": h1.name,
                                   "device_owner": "compute:nova", "device_id": f"paged{k}",
                                   "security_groups": [cloud.sg["id"]]}) for k in range(2 * PAGE_SIZE + 1)]
    for p in ports:  # lost from the Store (a wiped Store, a driver that was down)
        client.delete("Endpoint", endpoint_name(p["id"]))
    token = uuid.uuid4().hex
    gate = TokenGate(cloud.url, token)
    try:
        env = {"OS_AUTH_TYPE": "admin_token", "OS_ENDPOINT": gate.url}
        denied = resync(cloud.lab.store_url, {**env, "OS_TOKEN": "wrong"})
        assert denied.returncode == 1 and "cannot read Neutron" in denied.stderr + denied.stdout, denied
        assert resync(cloud.lab.store_url, env, "--token", token).returncode == 2  # no such option: never argv
        r = resync(cloud.lab.store_url, {**env, "OS_TOKEN": token})
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"created {len(ports)}" in r.stdout, r.stdout
    finally:
        gate.close()
    assert all(client.get("Endpoint", endpoint_name(p["id"])) is not None for p in ports)
    # Neutron paged the ports (pagination_max_limit): the resync followed its next links
    assert sum(1 for path in gate.paths if path.startswith("/v2.0/ports") and "marker=" in path) >= 2
