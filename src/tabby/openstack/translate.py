"""Neutron's records (plain dicts, as its API and its plugin give them) -> tabby resources. Pure.

No Neutron import here: the ML2 driver (inside neutron-server) and ``tabby openstack resync``
(over Neutron's HTTP API) both use these functions, and the tests call them directly.

- a subnet -> a disabled IPPool ``subnet-<id>`` (BGP exports and imports, and dnsmasq's ranges
  follow pools; disabled: Neutron allocates its addresses, tabby's IPAM must not), with its IPv6
  mode (DHCPv6-stateful, DHCPv6-stateless, SLAAC) and DNS servers, which tabby's RAs and
  dnsmasq serve; for SLAAC Neutron computes each port's EUI-64 address and lists it in fixed_ips
- a bound port -> an Endpoint ``os-<port id>`` on its binding host, tap ``tap`` + 11 characters of
  the id (what Nova names it), its fixed IPs, its allowed address pairs as allowed sources (single
  addresses only: a CIDR pair is refused before commit), and one Profile per security group;
  port security off -> no guards on the tap and the allow-all Profile
- a security group -> a Profile ``sg-<id>``: Neutron rules only allow; what no rule allows is
  denied, which is a Profile's default too. A remote group is a label every member port carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import ip_address, ip_network
from typing import Any

from tabby.model.resources import MAX_DNS_SERVERS

OWNER_LABEL = "openstack"  # on everything this module makes: resync deletes only what carries it
SG_LABEL = "sg.openstack/"  # + security group id: a port's membership, for remote-group rules
NO_PORT_SECURITY = "openstack-no-port-security"  # the Profile of ports with port security off
_PROTO = {"tcp": "tcp", "udp": "udp", "sctp": "sctp", "icmp": "icmp", "ipv6-icmp": "icmpv6", "icmpv6": "icmpv6"}


class Unsupported(ValueError):
    """A Neutron setting tabby does not serve; the message is shown to the Neutron user."""


def endpoint_name(port_id: str) -> str:
    return f"os-{port_id}"


def tap_name(port_id: str) -> str:
    return f"tap{port_id[:11]}"


def pool_name(subnet_id: str) -> str:
    return f"subnet-{subnet_id}"


def profile_name(sg_id: str) -> str:
    return f"sg-{sg_id}"


IPV6_MODES = ("dhcpv6-stateful", "dhcpv6-stateless", "slaac")  # all of Neutron's, served as IPPool.ipv6_mode


def check_subnet(subnet: Mapping[str, Any]) -> None:
    """Raise Unsupported for what tabby cannot serve (checked before Neutron commits the subnet)."""
    if subnet.get("ip_version") == 6:
        mode, ra = subnet.get("ipv6_address_mode"), subnet.get("ipv6_ra_mode")
        if mode not in IPV6_MODES:
            raise Unsupported(f"tabby serves IPv6 subnets with ipv6_address_mode {', '.join(IPV6_MODES)}, not {mode}: "
                              "its RAs say how VMs get their addresses, so the mode must be set")
        if ra not in (None, mode):
            raise Unsupported(f"ipv6_ra_mode {ra} differs from ipv6_address_mode {mode}: tabby sends the RAs, "
                              "and they follow the address mode; leave ipv6_ra_mode unset or the same")
        if mode != "dhcpv6-stateful" and ip_network(subnet["cidr"]).prefixlen != 64:
            raise Unsupported(f"ipv6_address_mode {mode} needs a /64: SLAAC forms addresses from the MAC (EUI-64)")
    if not subnet.get("enable_dhcp", True):
        raise Unsupported("tabby assigns fixed IPs to VMs by DHCP and RA: enable_dhcp must be true")


def check_port(port: Mapping[str, Any]) -> None:
    """Raise Unsupported for allowed address pairs tabby cannot serve: a pair is routed to its port
    as a host route, so it must be one address, not a network."""
    for pair in port.get("allowed_address_pairs") or []:
        if (net := ip_network(pair["ip_address"], strict=False)).prefixlen != net.max_prefixlen:
            raise Unsupported(f"allowed address pair {pair['ip_address']}: tabby routes each allowed address on its "
                              "own; give single addresses, not a network")


def pool_doc(subnet: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"cidr": str(ip_network(subnet["cidr"])), "disabled": True}  # Neutron allocates, not tabby
    if subnet.get("ip_version") == 6 and subnet.get("ipv6_address_mode") in IPV6_MODES:
        spec["ipv6_mode"] = subnet["ipv6_address_mode"]
    if subnet.get("dns_nameservers"):
        spec["dns_servers"] = [str(ip_address(a)) for a in subnet["dns_nameservers"]][:MAX_DNS_SERVERS]
    return {"kind": "IPPool", "metadata": {"name": pool_name(subnet["id"]), "labels": {OWNER_LABEL: "subnet"}},
            "spec": spec}


def endpoint_doc(port: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Endpoint of a port bound to a host by tabby (VIF type tap), or None."""
    host = port.get("binding:host_id")
    if port.get("binding:vif_type") != "tap" or not host:
        return None
    ips = [ip_address(f["ip_address"]) for f in port.get("fixed_ips", [])]
    if not ips:
        return None
    groups = list(port.get("security_groups") or [])
    secured = port.get("port_security_enabled", True)
    profiles = [profile_name(g) for g in groups] if secured else [NO_PORT_SECURITY]
    labels = {OWNER_LABEL: "port", "openstack.network": port["network_id"]}
    labels.update({SG_LABEL + g: "" for g in groups})
    # a CIDR pair is refused before commit; one that predates the driver is left out here and the
    # Endpoint written without it (validation would refuse the whole Endpoint otherwise)
    pairs = [{"address": str(net.network_address), "mac": p.get("mac_address") or port["mac_address"]}
             for p in port.get("allowed_address_pairs") or []
             if (net := ip_network(p["ip_address"], strict=False)).prefixlen == net.max_prefixlen]
    spec: dict[str, Any] = {
        "host": host, "orchestrator": "vm", "workload_id": port.get("device_id") or port["id"],
        "interface": tap_name(port["id"]), "mac": port["mac_address"],
        "ipv6_addresses": [str(a) for a in ips if a.version == 6],
        "ipv4_addresses": [str(a) for a in ips if a.version == 4], "profiles": profiles}
    if pairs:
        spec["allowed_sources"] = pairs
    if not secured:
        spec["port_security"] = False
    return {"kind": "Endpoint", "metadata": {"name": endpoint_name(port["id"]), "labels": labels}, "spec": spec}


def _rule(rule: Mapping[str, Any]) -> dict[str, Any] | None:
    """One Neutron rule; None for what tabby cannot express (a remote address group): the rule is
    left out, which denies more, never less."""
    if rule.get("remote_address_group_id"):
        return None
    version = 6 if rule.get("ethertype") == "IPv6" else 4
    out: dict[str, Any] = {"action": "allow", "ip_version": version}
    proto = rule.get("protocol")
    if proto not in (None, "", "any", "0"):
        name = _PROTO.get(str(proto).lower())
        if name == "icmp" and version == 6:
            name = "icmpv6"  # Neutron accepts "icmp" on an IPv6 rule and means ICMPv6
        out["protocol"] = name if name else int(proto)
    lo, hi = rule.get("port_range_min"), rule.get("port_range_max")
    if out.get("protocol") in ("tcp", "udp", "sctp") and lo is not None:
        out["dst_ports"] = [int(lo) if hi in (None, lo) else f"{int(lo)}:{int(hi)}"]
    elif out.get("protocol") in ("icmp", "icmpv6") and lo is not None:
        out["icmp_type"] = int(lo)
        if hi is not None:
            out["icmp_code"] = int(hi)
    ingress = rule.get("direction") == "ingress"
    if rule.get("remote_ip_prefix"):
        out["src_nets" if ingress else "dst_nets"] = [str(ip_network(rule["remote_ip_prefix"], strict=False))]
    if rule.get("remote_group_id"):
        out["src_selector" if ingress else "dst_selector"] = f"has({SG_LABEL}{rule['remote_group_id']})"
    return out


def profile_doc(sg: Mapping[str, Any]) -> dict[str, Any]:
    rules = sorted(sg.get("security_group_rules", []), key=lambda r: r.get("id", ""))
    return {"kind": "Profile", "metadata": {"name": profile_name(sg["id"]), "labels": {OWNER_LABEL: "sg"}},
            "spec": {d: [x for x in (_rule(r) for r in rules if r.get("direction") == d) if x is not None]
                     for d in ("ingress", "egress")}}


def no_port_security_doc() -> dict[str, Any]:
    return {"kind": "Profile", "metadata": {"name": NO_PORT_SECURITY, "labels": {OWNER_LABEL: "builtin"}},
            "spec": {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}}


def desired(subnets: Iterable[Mapping[str, Any]], ports: Iterable[Mapping[str, Any]],
            groups: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Everything the Store should hold for this Neutron: what a resync makes true."""
    docs: list[dict[str, Any]] = [no_port_security_doc()]
    for s in subnets:
        try:
            check_subnet(s)
        except Unsupported:
            continue  # created before the driver, or by hand: not ours to serve
        docs.append(pool_doc(s))
    docs += [profile_doc(g) for g in groups]
    docs += [d for d in (endpoint_doc(p) for p in ports) if d is not None]
    return docs
