"""OpenStack through a real neutron-server (ML2 with tabby's driver) and a real lab: networks,
subnets, a security group and ports made over Neutron's HTTP API become Store records, the lab's
agents program them, and VM namespaces on those ports get their Neutron addresses by DHCP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests
from lablib import lab
from neutronlib import neutron_server, resync

from tabby.client import ResourceClient
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.topology import LabVm
from tabby.openstack.translate import endpoint_name, profile_name
from tabby.store import open_store


class Neutron:
    def __init__(self, url: str) -> None:
        self.url = url + "/v2.0"

    def post(self, kind: str, body: dict[str, Any], expect: int = 201) -> dict[str, Any]:
        r = requests.post(f"{self.url}/{kind}s", json={kind.replace("-", "_"): body}, timeout=30)
        assert r.status_code == expect, r.text
        return r.json().get(kind.replace("-", "_"), r.json())

    def put(self, kind: str, id_: str, body: dict[str, Any]) -> dict[str, Any]:
        r = requests.put(f"{self.url}/{kind}s/{id_}", json={kind: body}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()[kind]

    def get(self, kind: str, id_: str) -> dict[str, Any]:
        r = requests.get(f"{self.url}/{kind}s/{id_}", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()[kind]

    def delete(self, kind: str, id_: str) -> None:
        assert requests.delete(f"{self.url}/{kind}s/{id_}", timeout=30).status_code == 204


def vm_addresses(ns: str) -> tuple[list[str], list[str]]:
    addrs = json.loads(netns.ip("-j", "addr", "show", "dev", "eth0", ns=ns))[0].get("addr_info", [])
    return ([a["local"] for a in addrs if a["family"] == "inet6" and a["scope"] == "global"],
            [a["local"] for a in addrs if a["family"] == "inet"])


def ping(ns: str, addr: str) -> bool:
    return netns.nsexec(ns, ["ping", "-6" if ":" in addr else "-4", "-c", "2", "-i", "0.2", "-W", "1",
                             addr]).returncode == 0


def test_neutron_networks_ports_and_security_groups_reach_real_vms(tmp_path: Path) -> None:
    with lab(2, 0) as the_lab, neutron_server(tmp_path / "neutron", the_lab.store_url) as url:
        n = Neutron(url)
        store = open_store(the_lab.store_url)
        client = ResourceClient(store)
        h1, h2 = the_lab.topo.hosts
        net = n.post("network", {"name": "dual", "provider:network_type": "flat",
                                 "provider:physical_network": "tabby"})
        # what tabby does not serve is refused, with a reason the user can act on
        err = n.post("subnet", {"network_id": net["id"], "ip_version": 4, "cidr": "10.65.0.0/24",
                                "enable_dhcp": False}, expect=400)
        assert "enable_dhcp must be true" in json.dumps(err)
        s6 = n.post("subnet", {"network_id": net["id"], "ip_version": 6, "cidr": "fd00:5::/64",
                               "ipv6_address_mode": "dhcpv6-stateful", "ipv6_ra_mode": "dhcpv6-stateful"})
        s4 = n.post("subnet", {"network_id": net["id"], "ip_version": 4, "cidr": "10.66.0.0/24"})
        sg = n.post("security-group", {"name": "web"})
        rules = [
            {"direction": "ingress", "ethertype": "IPv6", "protocol": "ipv6-icmp"},
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"},
            {"direction": "ingress", "ethertype": "IPv6", "protocol": "tcp", "port_range_min": 8080,
             "port_range_max": 8080, "remote_group_id": sg["id"]},
            {"direction": "egress", "ethertype": "IPv6"},
            {"direction": "egress", "ethertype": "IPv4"},
            # a protocol by number keeps its ports (it once lost them: all of TCP allowed), and any
            # protocol Neutron names is read (vrrp once stopped every resync)
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "6", "port_range_min": 22,
             "port_range_max": 22, "remote_ip_prefix": "10.66.0.0/24"},
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "vrrp"},
        ]
        for rule in rules:
            n.post("security-group-rule", {"security_group_id": sg["id"], **rule})
        ports = [n.post("port", {"network_id": net["id"], "binding:host_id": h.name, "device_owner": "compute:nova",
                                 "device_id": f"vm-{h.name}", "security_groups": [sg["id"]]}) for h in (h1, h2)]
        assert all(p["binding:vif_type"] == "tap" for p in ports)

        # the Store holds what Neutron says
        eps = [client.get("Endpoint", endpoint_name(p["id"])) for p in ports]
        for p, ep, h in zip(ports, eps, (h1, h2), strict=True):
            assert ep is not None and ep.spec.host == h.name and ep.spec.mac == p["mac_address"]
            assert ep.spec.interface == "tap" + p["id"][:11]
            fixed = {f["ip_address"] for f in p["fixed_ips"]}
            assert {str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)} == fixed
            assert ep.spec.profiles == (profile_name(sg["id"]),)
        prof = client.get("Profile", profile_name(sg["id"]))
        assert prof is not None and len(prof.spec.ingress) == 5 and len(prof.spec.egress) == 2
        assert sorted(map(str, (r.protocol for r in prof.spec.ingress))) == ["112", "icmp", "icmpv6", "tcp", "tcp"]
        tcp = next(r for r in prof.spec.ingress if r.protocol == "tcp" and r.ip_version == 6)
        assert tcp.dst_ports == (8080,) and tcp.src_selector == f"has(sg.openstack/{sg['id']})"
        ssh = next(r for r in prof.spec.ingress if r.protocol == "tcp" and r.ip_version == 4)
        assert ssh.dst_ports == (22,) and [str(n) for n in ssh.src_nets] == ["10.66.0.0/24"]
        pools = {p.metadata.name: p for p in client.list("IPPool")[0]}
        assert str(pools[f"subnet-{s6['id']}"].spec.cidr) == "fd00:5::/64"
        assert str(pools[f"subnet-{s4['id']}"].spec.cidr) == "10.66.0.0/24"

        # VMs on those ports: their own DHCP clients get Neutron's addresses; they reach each other
        vms = [LabVm(h, 1, client, tap_name="tap" + p["id"][:11], mac_address=p["mac_address"])
               for h, p, client in ((h1, ports[0], "dhclient"), (h2, ports[1], "dhcpcd"))]
        for v in vms:
            the_lab.add_vm(v, orchestrate=False)
        for v, p in zip(vms, ports, strict=True):
            want6 = [f["ip_address"] for f in p["fixed_ips"] if ":" in f["ip_address"]]
            want4 = [f["ip_address"] for f in p["fixed_ips"] if ":" not in f["ip_address"]]
            assert L.wait_until(lambda v=v, w6=want6, w4=want4: vm_addresses(v.ns) == (w6, w4), 60), \
                (vm_addresses(v.ns), want6, want4)
        a6 = vm_addresses(vms[1].ns)[0][0]
        a4 = vm_addresses(vms[1].ns)[1][0]
        assert L.wait_until(lambda: ping(vms[0].ns, a6) and ping(vms[0].ns, a4), 30)
        # Neutron learns that the ports are up, from the agents' endpoint status
        assert L.wait_until(lambda: all(n.get("port", p["id"])["status"] == "ACTIVE" for p in ports), 30)

        # an IPv6-only network works the same
        net6 = n.post("network", {"name": "v6only", "provider:network_type": "flat",
                                  "provider:physical_network": "tabby6"})
        n.post("subnet", {"network_id": net6["id"], "ip_version": 6, "cidr": "fd00:6::/64",
                          "ipv6_address_mode": "dhcpv6-stateful"})
        ports6 = [n.post("port", {"network_id": net6["id"], "binding:host_id": h.name, "device_owner": "compute:nova",
                                  "device_id": f"vm6-{h.name}", "security_groups": [sg["id"]]}) for h in (h1, h2)]
        vms6 = [LabVm(h, 2, "dhclient", tap_name="tap" + p["id"][:11], mac_address=p["mac_address"], ipv4=False)
                for h, p in zip((h1, h2), ports6, strict=True)]
        for v in vms6:
            the_lab.add_vm(v, orchestrate=False)
        for v, p in zip(vms6, ports6, strict=True):
            want = [f["ip_address"] for f in p["fixed_ips"]]
            assert all(":" in a for a in want)
            assert L.wait_until(lambda v=v, w=want: vm_addresses(v.ns) == (w, []), 60), vm_addresses(v.ns)
        assert L.wait_until(lambda: ping(vms6[0].ns, vm_addresses(vms6[1].ns)[0][0]), 30)

        # a new fixed IP, and a move to another host (live migration), follow into the Store
        p0 = ports6[0]
        extra = "fd00:6::77"
        n.put("port", p0["id"], {"fixed_ips": [*p0["fixed_ips"], {"subnet_id": p0["fixed_ips"][0]["subnet_id"],
                                                                   "ip_address": extra}]})
        assert L.wait_until(lambda: extra in {str(a.ip) for a in
                                              client.get("Endpoint", endpoint_name(p0["id"])).spec.ipv6_addresses}, 10)
        n.put("port", p0["id"], {"binding:host_id": h2.name})
        assert L.wait_until(lambda: client.get("Endpoint", endpoint_name(p0["id"])).spec.host == h2.name, 10)

        # a wiped record is repaired by a resync on demand (a Profile: an Endpoint would be written
        # again by the driver itself as soon as its port's status changes); a deleted port takes its
        # Endpoint with it
        client.delete("Profile", profile_name(sg["id"]))
        r = resync(the_lab.store_url, {"OS_AUTH_TYPE": "admin_token", "OS_TOKEN": "unchecked", "OS_ENDPOINT": url})
        assert r.returncode == 0 and "created 1" in r.stdout, r.stdout + r.stderr
        assert client.get("Profile", profile_name(sg["id"])) is not None
        n.delete("port", ports6[1]["id"])
        assert L.wait_until(lambda: client.get("Endpoint", endpoint_name(ports6[1]["id"])) is None, 10)
