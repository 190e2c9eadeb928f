"""Neutron records -> tabby resources, the pure part of the OpenStack integration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tabby.client import ResourceClient
from tabby.model import validate
from tabby.openstack.sync import reconcile
from tabby.openstack.translate import (
    NO_PORT_SECURITY,
    Malformed,
    Unsupported,
    check_port,
    check_subnet,
    desired,
    endpoint_doc,
    pool_doc,
    profile_doc,
)

PORT = {"id": "0123456789abcdef-0000", "network_id": "net-1", "mac_address": "fa:16:3e:00:00:01",
        "binding:host_id": "h1", "binding:vif_type": "tap", "device_id": "vm-1", "security_groups": ["sg-a"],
        "port_security_enabled": True,
        "fixed_ips": [{"subnet_id": "s6", "ip_address": "fd00:5::10"}, {"subnet_id": "s4", "ip_address": "10.66.0.5"}]}


def test_a_bound_port_becomes_an_endpoint_and_an_unbound_one_nothing() -> None:
    ep = validate(endpoint_doc(PORT))
    assert ep.metadata.name == "os-0123456789abcdef-0000"
    assert ep.spec.interface == "tap0123456789a" and ep.spec.host == "h1" and ep.spec.workload_id == "vm-1"
    assert [str(a) for a in ep.spec.ipv6_addresses] == ["fd00:5::10/128"]
    assert [str(a) for a in ep.spec.ipv4_addresses] == ["10.66.0.5/32"]
    assert ep.spec.profiles == ("sg-sg-a",) and "sg.openstack/sg-a" in ep.metadata.labels
    assert endpoint_doc({**PORT, "binding:vif_type": "binding_failed"}) is None
    assert endpoint_doc({**PORT, "binding:host_id": ""}) is None
    assert validate(endpoint_doc({**PORT, "port_security_enabled": False})).spec.profiles == (NO_PORT_SECURITY,)


def test_subnet_modes() -> None:
    for mode in ("dhcpv6-stateful", "dhcpv6-stateless", "slaac"):
        for ra in (None, mode):
            sub = {"id": "s6", "ip_version": 6, "cidr": "fd00:5::/64", "ipv6_address_mode": mode, "ipv6_ra_mode": ra,
                   "dns_nameservers": ["fd00:5::53", "10.0.0.53"]}
            check_subnet(sub)
            pool = validate(pool_doc(sub))
            assert pool.spec.ipv6_mode == mode
            assert [str(a) for a in pool.spec.dns_servers] == ["fd00:5::53", "10.0.0.53"]
    check_subnet({"ip_version": 4, "cidr": "10.0.0.0/24", "enable_dhcp": True})
    for bad, why in (({"ip_version": 6, "cidr": "fd00:5::/64", "ipv6_address_mode": None}, "must be set"),
                     ({"ip_version": 6, "cidr": "fd00:5::/64", "ipv6_address_mode": "dhcpv6-stateful",
                       "ipv6_ra_mode": "slaac"}, "differs"),
                     ({"ip_version": 6, "cidr": "fd00:5::/80", "ipv6_address_mode": "slaac"}, "needs a /64"),
                     ({"ip_version": 4, "cidr": "10.0.0.0/24", "enable_dhcp": False}, "enable_dhcp")):
        with pytest.raises(Unsupported, match=why):
            check_subnet(bad)
    pool = validate(pool_doc({"id": "s6", "cidr": "fd00:5::/64", "ip_version": 6}))
    assert pool.spec.disabled and str(pool.spec.cidr) == "fd00:5::/64"  # Neutron allocates, not tabby
    assert pool.spec.ipv6_mode == "dhcpv6-stateful"


def test_allowed_address_pairs_and_port_security() -> None:
    pairs = [{"ip_address": "fd00:5::100"}, {"ip_address": "10.66.0.200/32", "mac_address": "fa:16:3e:00:00:99"}]
    ep = validate(endpoint_doc({**PORT, "allowed_address_pairs": pairs}))
    assert [(str(a.address.ip), a.mac) for a in ep.spec.allowed_sources] == [
        ("fd00:5::100", "fa:16:3e:00:00:01"), ("10.66.0.200", "fa:16:3e:00:00:99")]
    assert ep.spec.port_security
    check_port({**PORT, "allowed_address_pairs": pairs})
    with pytest.raises(Unsupported, match="single addresses"):
        check_port({**PORT, "allowed_address_pairs": [{"ip_address": "10.66.0.0/24"}]})
    assert not validate(endpoint_doc({**PORT, "port_security_enabled": False})).spec.port_security


def test_security_group_rules() -> None:
    sg = {"id": "g1", "security_group_rules": [
        {"id": "1", "direction": "ingress", "ethertype": "IPv6", "protocol": "icmp", "port_range_min": 128},
        {"id": "2", "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 80,
         "port_range_max": 90, "remote_ip_prefix": "10.0.0.0/8"},
        {"id": "3", "direction": "ingress", "ethertype": "IPv6", "protocol": "udp", "port_range_min": 53,
         "port_range_max": 53, "remote_group_id": "g2"},
        {"id": "4", "direction": "egress", "ethertype": "IPv6", "protocol": None, "remote_ip_prefix": "::/0"},
        {"id": "5", "direction": "ingress", "ethertype": "IPv4", "protocol": "132"},
        {"id": "6", "direction": "ingress", "ethertype": "IPv4", "remote_address_group_id": "ag"},
    ]}
    prof = validate(profile_doc(sg))
    icmp, tcp, udp, sctp = prof.spec.ingress  # the address-group rule is left out: denies more, never less
    assert icmp.protocol == "icmpv6" and icmp.icmp_type == 128 and icmp.ip_version == 6
    assert tcp.dst_ports == ("80:90",) and [str(n) for n in tcp.src_nets] == ["10.0.0.0/8"]
    assert udp.dst_ports == (53,) and udp.src_selector == "has(sg.openstack/g2)"
    assert sctp.protocol == "sctp"  # "132", as Neutron may give it
    (eg,) = prof.spec.egress
    assert eg.ip_version == 6 and [str(n) for n in eg.dst_nets] == ["::/0"]


def test_desired_skips_subnets_tabby_does_not_serve() -> None:
    docs = desired([{"id": "a", "cidr": "fd00:7::/64", "ip_version": 6, "ipv6_address_mode": None},
                    {"id": "b", "cidr": "fd00:8::/64", "ip_version": 6, "ipv6_address_mode": "dhcpv6-stateful"}],
                   [PORT], [{"id": "sg-a", "security_group_rules": []}])
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("IPPool", "subnet-b") in names and ("IPPool", "subnet-a") not in names
    assert ("Endpoint", "os-0123456789abcdef-0000") in names and ("Profile", "sg-sg-a") in names


def _one(rule: dict[str, Any]) -> Any:
    """The one ingress rule a group of this Neutron rule becomes, or None if it is left out."""
    problems: list[str] = []
    got = validate(profile_doc({"id": "g", "security_group_rules": [
        {"id": "r", "direction": "ingress", "ethertype": "IPv4", **rule}]}, problems)).spec.ingress
    assert len(got) <= 1
    return (got[0] if got else None), problems


@pytest.mark.parametrize("proto", ["6", 6, "tcp", "TCP"])
def test_a_protocol_given_by_number_keeps_its_ports(proto: object) -> None:
    """"6" used to become protocol 6 with the port range dropped: all of TCP allowed, not port 22."""
    rule, _ = _one({"protocol": proto, "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0"})
    assert rule.protocol == "tcp" and rule.dst_ports == (22,)


def test_icmp_by_number_keeps_its_type_and_code_and_every_neutron_protocol_name_is_read() -> None:
    rule, _ = _one({"protocol": "1", "port_range_min": 8, "port_range_max": 0})
    assert (rule.protocol, rule.icmp_type, rule.icmp_code) == ("icmp", 8, 0)
    for name, number in (("vrrp", 112), ("gre", 47), ("ah", 51), ("esp", 50), ("ospf", 89), ("dccp", 33),
                         ("udplite", 136)):
        assert _one({"protocol": name})[0].protocol == number, name
    assert _one({"protocol": "ip"})[0].protocol is None  # 0: any protocol, as Neutron's firewalls read it
    # a port range on dccp or udplite cannot be said in a tabby rule: left out, which denies more
    assert _one({"protocol": "dccp", "port_range_min": 5000}) == (None, [])


@pytest.mark.parametrize(("rule", "field"), [
    ({"protocol": "bogus"}, "protocol"),
    ({"protocol": 300}, "protocol"),
    ({"protocol": "tcp", "port_range_min": "22"}, "port_range_min"),
    ({"protocol": "tcp", "port_range_min": True}, "port_range_min"),
    ({"ethertype": "ipv6"}, "ethertype"),
    ({"remote_group_id": "x) || all("}, "security group id"),
    ({"remote_ip_prefix": 5}, "remote_ip_prefix"),
    ({"remote_ip_prefix": "fe80::/10%eth0"}, "remote_ip_prefix"),
    # what Neutron refuses, and what read as it stands would allow more than the rule says, or make
    # the model refuse the whole group's Profile
    ({"protocol": "tcp", "port_range_min": 80, "port_range_max": 22}, "above"),
    ({"protocol": "tcp", "port_range_max": 22}, "without port_range_min"),
    ({"protocol": "icmp", "port_range_max": 0}, "without port_range_min"),
    ({"protocol": "gre", "port_range_min": 1}, "no ports"),
    ({"protocol": "icmp", "port_range_min": 300}, "icmp_type"),
    ({"protocol": "ipv6-icmp"}, "ethertype"),
    ({"remote_ip_prefix": "fd00::/64"}, "not IPv4"),
])
def test_a_malformed_rule_is_left_out_and_told(rule: dict[str, Any], field: str) -> None:
    got, problems = _one(rule)
    assert got is None and len(problems) == 1 and field in problems[0], problems


@pytest.mark.parametrize(("change", "field"), [
    ({"id": 12345}, "id"),
    ({"network_id": None}, "network_id"),
    ({"mac_address": ["fa:16:3e:00:00:01"]}, "mac_address"),
    ({"security_groups": "web"}, "security_groups"),
    ({"security_groups": ["x) || all("]}, "security group id"),
    ({"fixed_ips": [{"ip_address": 5}]}, "fixed_ips[0] ip_address"),
    ({"fixed_ips": [{"ip_address": "fd00:5::10%eth0"}]}, "fixed_ips[0] ip_address"),
    ({"fixed_ips": ["fd00:5::10"]}, "fixed_ips[0]"),
    ({"fixed_ips": {"ip_address": "fd00:5::10"}}, "fixed_ips"),
    ({"allowed_address_pairs": ["10.0.0.1"]}, "allowed_address_pairs[0]"),
    ({"allowed_address_pairs": [{"ip_address": None}]}, "allowed_address_pairs[0] ip_address"),
])
def test_a_malformed_port_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(Malformed, match=re.escape(field)):
        endpoint_doc({**PORT, **change})


def test_port_security_is_off_only_when_neutron_says_false() -> None:
    for value in (None, "false", 0):
        assert validate(endpoint_doc({**PORT, "port_security_enabled": value})).spec.port_security, value


def test_one_malformed_record_costs_only_itself_and_the_store_keeps_what_it_had(tmp_path: Path) -> None:
    from tabby.store import open_store

    client = ResourceClient(open_store(f"sqlite://{tmp_path}/s.db"))
    sub = {"id": "s6", "cidr": "fd00:5::/64", "ip_version": 6, "ipv6_address_mode": "dhcpv6-stateful"}
    sg = {"id": "sg-a", "security_group_rules": []}
    two = {**PORT, "id": "fedcba9876543210-0000", "fixed_ips": [{"ip_address": "fd00:5::11"}]}
    assert reconcile(client, [sub], [PORT, two], [sg])["created"] == 5  # + the no-port-security Profile
    bad = {**two, "fixed_ips": [{"ip_address": 5}]}
    problems: list[str] = []
    kept: set[tuple[str, str]] = set()
    docs = desired([sub, "junk"], [PORT, bad, None], [sg, {"id": "sg-b", "security_group_rules": None}],
                   problems, kept)
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} >= {("Endpoint", "os-0123456789abcdef-0000"),
                                                                   ("Profile", "sg-sg-a"), ("IPPool", "subnet-s6")}
    assert kept == {("Endpoint", "os-fedcba9876543210-0000")}
    assert len(problems) == 3 and any("fixed_ips[0] ip_address" in p for p in problems), problems
    counts = reconcile(client, [sub], [PORT, bad], [sg])
    assert counts["invalid"] == 1 and counts["deleted"] == 0
    ep = client.get("Endpoint", "os-fedcba9876543210-0000")
    assert ep is not None and [str(a) for a in ep.spec.ipv6_addresses] == ["fd00:5::11/128"]
    # read, but refused by the model (a loopback address): kept too, as the driver's own write keeps it
    refused = {**two, "fixed_ips": [{"ip_address": "::1"}]}
    counts = reconcile(client, [sub], [PORT, refused], [sg])
    assert counts["invalid"] == 1 and counts["deleted"] == 0, counts
    ep = client.get("Endpoint", "os-fedcba9876543210-0000")
    assert ep is not None and [str(a) for a in ep.spec.ipv6_addresses] == ["fd00:5::11/128"]
    counts = reconcile(client, [sub], [PORT], [sg])  # the port gone from Neutron: deleted, as ever
    assert counts["deleted"] == 1 and client.get("Endpoint", "os-fedcba9876543210-0000") is None


def test_a_bad_rule_costs_only_itself_on_resync(tmp_path: Path) -> None:
    from tabby.store import open_store

    client = ResourceClient(open_store(f"sqlite://{tmp_path}/s.db"))
    sg = {"id": "sg1", "security_group_rules": [
        {"id": "1", "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 22},
        {"id": "2", "direction": "ingress", "ethertype": "IPv4", "protocol": "icmp", "port_range_min": 300}]}
    counts = reconcile(client, [], [], [sg])
    assert counts["deleted"] == 0 and counts["invalid"] == 1, counts
    prof = client.get("Profile", "sg-sg1")
    assert prof is not None and [r.dst_ports for r in prof.spec.ingress] == [(22,)]


def test_a_port_the_model_would_refuse_is_refused_before_neutron_commits_it() -> None:
    """Refused after the commit, a new port had no Endpoint (its VM unreachable, nobody told) and an
    updated one kept its old Endpoint (the old host, groups, pairs): so the whole Endpoint is judged
    at precommit, also for a port not bound yet. What is only cosmetic is mended instead."""
    unbound = {**PORT, "binding:host_id": "", "binding:vif_type": "unbound"}
    for pairs, why in (([{"ip_address": "fe80::1"}], "cannot be a workload address"),  # VRRPv3's
                       ([{"ip_address": "224.0.0.18"}], "cannot be a workload address"),
                       ([{"ip_address": f"10.66.1.{i}"} for i in range(65)], "at most 64")):
        for port in (PORT, unbound):
            with pytest.raises(Unsupported, match=why):
                check_port({**port, "allowed_address_pairs": pairs})
    # one address written twice (Neutron takes both strings) is one pair
    twice = {**PORT, "allowed_address_pairs": [{"ip_address": "10.66.0.9"}, {"ip_address": "10.66.0.9/32"}]}
    check_port(twice)
    assert [str(a.address.ip) for a in validate(endpoint_doc(twice)).spec.allowed_sources] == ["10.66.0.9"]
    # device_id is the port owner's free text: the port's id names the workload where it is no id
    for device in ("my vm", "vm-é", "x" * 300):
        odd = {**PORT, "device_id": device}
        check_port(odd)
        assert validate(endpoint_doc(odd)).spec.workload_id == PORT["id"]


def test_resync_refuses_a_listing_without_bindings_and_deletes_only_what_it_made(tmp_path: Path) -> None:
    """Neutron shows binding:* to admins only: with a project's credentials every port read as
    unbound and resync deleted every Endpoint. And "made by this integration" is the label's value
    per kind, not the key alone (a CNI netconf may label its containers "openstack")."""
    from tabby.openstack.sync import PartialListing
    from tabby.store import open_store

    client = ResourceClient(open_store(f"sqlite://{tmp_path}/s.db"))
    sub = {"id": "s6", "cidr": "fd00:5::/64", "ip_version": 6, "ipv6_address_mode": "dhcpv6-stateful"}
    sg = {"id": "sg-a", "security_group_rules": []}
    assert reconcile(client, [sub], [PORT], [sg])["created"] == 4
    cni = validate({"kind": "Endpoint", "metadata": {"name": "net1.c0ffee.eth0", "labels": {"openstack": "yes"}},
                    "spec": {"host": "h1", "orchestrator": "container", "workload_id": "c0ffee",
                             "interface": "tby0123456789a", "mac": "ee:ee:ee:ee:ee:ee",
                             "ipv6_addresses": ["fd00:e::5"]}})
    client.apply(cni)
    hidden = {k: v for k, v in PORT.items() if not k.startswith("binding:")}
    with pytest.raises(PartialListing, match="admin"):
        reconcile(client, [sub], [hidden], [sg])
    assert client.get("Endpoint", "os-0123456789abcdef-0000") is not None
    counts = reconcile(client, [sub], [], [sg])  # the port gone from Neutron
    assert counts["deleted"] == 1 and client.get("Endpoint", "os-0123456789abcdef-0000") is None
    assert client.get("Endpoint", "net1.c0ffee.eth0") is not None  # not the integration's


def test_a_port_bound_or_moved_while_neutron_was_listed_keeps_what_the_driver_wrote(tmp_path: Path) -> None:
    """The resync lists Neutron, then reconciles: a port the driver bound (or moved) meanwhile was
    deleted (or written back to its old host) from the older listing, until its next update."""
    from tabby.store import open_store

    client = ResourceClient(open_store(f"sqlite://{tmp_path}/s.db"))
    sub = {"id": "s6", "cidr": "fd00:5::/64", "ip_version": 6, "ipv6_address_mode": "dhcpv6-stateful"}
    sg = {"id": "sg-a", "security_group_rules": []}
    moving = {**PORT, "id": "fedcba9876543210-0000", "fixed_ips": [{"ip_address": "fd00:5::11"}]}
    reconcile(client, [sub], [PORT, moving], [sg])
    before = client.store.revision()
    # Neutron listed here (PORT alone, moving still on h1); meanwhile the driver binds a new port and moves one
    new = {**PORT, "id": "aaaaaaaaaaaaaaaa-0000", "fixed_ips": [{"ip_address": "fd00:5::12"}]}
    client.apply(validate(endpoint_doc(new)))
    client.apply(validate(endpoint_doc({**moving, "binding:host_id": "h2"})))
    counts = reconcile(client, [sub], [PORT, moving], [sg], listed_after=before)
    assert counts["kept"] == 2 and counts["deleted"] == 0, counts
    assert client.get("Endpoint", "os-aaaaaaaaaaaaaaaa-0000") is not None
    moved = client.get("Endpoint", "os-fedcba9876543210-0000")
    assert moved is not None and moved.spec.host == "h2"
    # the next resync, with a listing that has them, and one without the new port: deleted as ever
    counts = reconcile(client, [sub], [PORT, {**moving, "binding:host_id": "h2"}], [sg],
                       listed_after=client.store.revision())
    assert counts["deleted"] == 1 and client.get("Endpoint", "os-aaaaaaaaaaaaaaaa-0000") is None


def test_a_security_group_too_big_for_a_record_costs_only_itself_on_resync(tmp_path: Path) -> None:
    """It raised out of the resync (Profiles go first: nothing after it was written, the delete pass
    never ran, and the driver retried for ever)."""
    from tabby.store import open_store

    client = ResourceClient(open_store(f"sqlite://{tmp_path}/s.db"))
    sub = {"id": "s6", "cidr": "fd00:5::/64", "ip_version": 6, "ipv6_address_mode": "dhcpv6-stateful"}
    big = {"id": "sg-big", "security_group_rules": [
        {"id": f"r{i}", "direction": "ingress", "ethertype": "IPv6", "protocol": "tcp", "port_range_min": 1 + i,
         "port_range_max": 1 + i, "remote_ip_prefix": f"fd00:{i:x}::/64"} for i in range(6000)]}
    small = {"id": "sg-a", "security_group_rules": []}
    counts = reconcile(client, [sub], [PORT], [big, small])
    assert counts["invalid"] == 1, counts
    assert client.get("Profile", "sg-sg-a") is not None and client.get("Endpoint", "os-0123456789abcdef-0000")
