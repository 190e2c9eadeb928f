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

import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from pydantic import ValidationError

from tabby.model.names import check_label_key
from tabby.model.resources import _WORKLOAD_ID, MAX_DNS_SERVERS, Rule

OWNER_LABEL = "openstack"  # on everything this module makes: resync deletes only what carries it
SG_LABEL = "sg.openstack/"  # + security group id: a port's membership, for remote-group rules
NO_PORT_SECURITY = "openstack-no-port-security"  # the Profile of ports with port security off
# Neutron's protocol names and their numbers (neutron-lib's IP_PROTOCOL_MAP); a rule may give
# either, or the number as text. 0 ("ip", "hopopt") is any protocol, as Neutron's firewalls read it.
_NUMBERS = {"ah": 51, "dccp": 33, "egp": 8, "esp": 50, "gre": 47, "hopopt": 0, "icmp": 1, "igmp": 2, "ip": 0,
            "ipip": 4, "ipv6-encap": 41, "ipv6-frag": 44, "ipv6-icmp": 58, "icmpv6": 58, "ipv6-nonxt": 59,
            "ipv6-opts": 60, "ipv6-route": 43, "ospf": 89, "pgm": 113, "rsvp": 46, "sctp": 132, "tcp": 6,
            "udp": 17, "udplite": 136, "vrrp": 112}
_NAMED = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}  # what a tabby rule names
_PORTED = (33, 136)  # dccp, udplite: Neutron takes a port range on them, a tabby rule cannot


class Unsupported(ValueError):
    """A Neutron setting tabby does not serve; the message is shown to the Neutron user."""


class Malformed(ValueError):
    """A Neutron record not in the shape Neutron's API gives (a field missing, of another type, or
    holding what no Neutron would): the record is not translated, and the message names the field."""


def _shown(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(rec: Mapping[str, Any], key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v:
        raise Malformed(f"{where}: {key} is {_shown(v)}, not a non-empty string")
    return v


def _maybe_text(rec: Mapping[str, Any], key: str, where: str) -> str | None:
    """A string field Neutron may leave unset (None or empty)."""
    return None if rec.get(key) in (None, "") else _text(rec, key, where)


def _items(rec: Mapping[str, Any], key: str, where: str) -> list[Any]:
    v = rec.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise Malformed(f"{where}: {key} is {_shown(v)}, not a list")
    return v


def _record(v: object, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise Malformed(f"{where} is {_shown(v)}, not an object")
    return v


def _address(v: object, where: str) -> IPv4Address | IPv6Address:
    if not isinstance(v, str) or "%" in v:  # ipaddress takes a %zone, and 5 for 0.0.0.5
        raise Malformed(f"{where} is {_shown(v)}, not an address")
    try:
        return ip_address(v)
    except ValueError as e:
        raise Malformed(f"{where}: {e}") from None


def _network(v: object, where: str) -> IPv4Network | IPv6Network:
    if not isinstance(v, str) or "%" in v:
        raise Malformed(f"{where} is {_shown(v)}, not a network")
    try:
        return ip_network(v, strict=False)
    except ValueError as e:
        raise Malformed(f"{where}: {e}") from None


def _group_label(g: object, where: str) -> str:
    """A security group id as the label its ports carry (it also goes into a selector's text)."""
    try:
        return check_label_key(SG_LABEL + g) if isinstance(g, str) else ""
    except ValueError:
        pass
    raise Malformed(f"{where}: security group id {_shown(g)} cannot name a label")


def _port_number(v: object, where: str) -> int | None:
    if v is None:
        return None
    if type(v) is not int or not 0 <= v <= 65535:
        raise Malformed(f"{where} is {_shown(v)}, not a port or type number")
    return v


def endpoint_name(port_id: str) -> str:
    return f"os-{port_id}"


def tap_name(port_id: str) -> str:
    return f"tap{port_id[:11]}"


def pool_name(subnet_id: str) -> str:
    return f"subnet-{subnet_id}"


def profile_name(sg_id: str) -> str:
    return f"sg-{sg_id}"


IPV6_MODES = ("dhcpv6-stateful", "dhcpv6-stateless", "slaac")  # all of Neutron's, served as IPPool.ipv6_mode


def _subnet_cidr(subnet: Mapping[str, Any]) -> IPv4Network | IPv6Network:
    cidr = subnet.get("cidr")
    if not isinstance(cidr, str) or "%" in cidr:
        raise Malformed(f"subnet {_shown(subnet.get('id'))}: cidr is {_shown(cidr)}, not a network")
    try:
        return ip_network(cidr)  # strict: a subnet's cidr has no host bits
    except ValueError as e:
        raise Malformed(f"subnet {_shown(subnet.get('id'))}: cidr: {e}") from None


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
        if mode != "dhcpv6-stateful" and _subnet_cidr(subnet).prefixlen != 64:
            raise Unsupported(f"ipv6_address_mode {mode} needs a /64: SLAAC forms addresses from the MAC (EUI-64)")
    if not subnet.get("enable_dhcp", True):
        raise Unsupported("tabby assigns fixed IPs to VMs by DHCP and RA: enable_dhcp must be true")


PRECOMMIT_HOST = "precommit-check"  # a host name for judging a port that is not bound yet


def check_port(port: Mapping[str, Any]) -> None:
    """Raise Unsupported for a port tabby cannot serve, before Neutron commits it: an allowed
    address pair that is a network (each is routed to its port as a host route), and whatever the
    model would refuse of its Endpoint once the port is bound (a link-local or multicast pair, more
    than 64 of them...). Refused after the commit, the port had no Endpoint (its VM unreachable,
    nobody told) or, on an update, kept its old one (old host, old groups, old pairs). Malformed
    for a port not in Neutron's shape."""
    for i, pair in enumerate(_items(port, "allowed_address_pairs", "port")):
        where = f"port allowed_address_pairs[{i}]"
        net = _network(_record(pair, where).get("ip_address"), f"{where} ip_address")
        if net.prefixlen != net.max_prefixlen:
            raise Unsupported(f"allowed address pair {net}: tabby routes each allowed address on its "
                              "own; give single addresses, not a network")
    from tabby.model import validate

    doc = endpoint_doc({**port, "binding:vif_type": "tap", "binding:host_id": PRECOMMIT_HOST})
    if doc is not None:
        try:
            validate(doc)
        except ValueError as e:
            raise Unsupported(f"tabby cannot serve this port: {e}") from None


def pool_doc(subnet: Mapping[str, Any]) -> dict[str, Any]:
    sid = _text(subnet, "id", "subnet")
    where = f"subnet {_shown(sid)}"
    net = _subnet_cidr(subnet)
    spec: dict[str, Any] = {"cidr": str(net), "disabled": True}  # Neutron allocates, not tabby
    if subnet.get("ip_version") == 6 and subnet.get("ipv6_address_mode") in IPV6_MODES:
        spec["ipv6_mode"] = subnet["ipv6_address_mode"]
    servers = _items(subnet, "dns_nameservers", where)
    if servers:
        spec["dns_servers"] = [str(_address(a, f"{where} dns_nameservers[{i}]"))
                               for i, a in enumerate(servers)][:MAX_DNS_SERVERS]
    return {"kind": "IPPool", "metadata": {"name": pool_name(sid), "labels": {OWNER_LABEL: "subnet"}},
            "spec": spec}


def endpoint_doc(port: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Endpoint of a port bound to a host by tabby (VIF type tap), or None."""
    pid = _text(port, "id", "port")
    where = f"port {_shown(pid)}"
    host = _maybe_text(port, "binding:host_id", where)
    if port.get("binding:vif_type") != "tap" or not host:
        return None
    ips = [_address(_record(f, f"{where} fixed_ips[{i}]").get("ip_address"), f"{where} fixed_ips[{i}] ip_address")
           for i, f in enumerate(_items(port, "fixed_ips", where))]
    if not ips:
        return None
    groups = _items(port, "security_groups", where)
    labels = {OWNER_LABEL: "port", "openstack.network": _text(port, "network_id", where)}
    labels.update({_group_label(g, f"{where} security_groups"): "" for g in groups})
    # Neutron's default is on; anything but false keeps the guards (a None or "false" opens nothing)
    secured = port.get("port_security_enabled", True) is not False
    profiles = [profile_name(g) for g in groups] if secured else [NO_PORT_SECURITY]
    mac = _text(port, "mac_address", where)
    # a CIDR pair is refused before commit; one that predates the driver is left out here and the
    # Endpoint written without it (validation would refuse the whole Endpoint otherwise)
    pairs = []
    for i, p in enumerate(_items(port, "allowed_address_pairs", where)):
        at = f"{where} allowed_address_pairs[{i}]"
        net = _network(_record(p, at).get("ip_address"), f"{at} ip_address")
        pair = {"address": str(net.network_address), "mac": (_maybe_text(p, "mac_address", at) or mac).lower()}
        if net.prefixlen == net.max_prefixlen and pair not in pairs:  # "10.0.0.9" and "10.0.0.9/32" are one
            pairs.append(pair)
    # device_id is the owner's free text (an instance uuid, or anything a port owner sets): it names
    # the workload only where it is an id the model takes, else the port's id does
    device = _maybe_text(port, "device_id", where)
    spec: dict[str, Any] = {
        "host": host, "orchestrator": "vm",
        "workload_id": device if device and re.fullmatch(_WORKLOAD_ID, device) else pid,
        "interface": tap_name(pid), "mac": mac,
        "ipv6_addresses": [str(a) for a in ips if a.version == 6],
        "ipv4_addresses": [str(a) for a in ips if a.version == 4], "profiles": profiles}
    if pairs:
        spec["allowed_sources"] = pairs
    if not secured:
        spec["port_security"] = False
    return {"kind": "Endpoint", "metadata": {"name": endpoint_name(pid), "labels": labels}, "spec": spec}


def _rule(rule: Mapping[str, Any]) -> dict[str, Any] | None:
    """One Neutron rule; None for what tabby cannot express (a remote address group, a port range
    on dccp or udplite): the rule is left out, which denies more, never less."""
    where = f"security group rule {_shown(rule.get('id'))}"
    if rule.get("remote_address_group_id"):
        return None
    ethertype = rule.get("ethertype")
    if ethertype not in ("IPv4", "IPv6"):  # read as the other family, a rule would allow what Neutron does not
        raise Malformed(f"{where}: ethertype is {_shown(ethertype)}, not IPv4 or IPv6")
    version = 6 if ethertype == "IPv6" else 4
    out: dict[str, Any] = {"action": "allow", "ip_version": version}
    proto = rule.get("protocol")
    number: int | None = None
    if isinstance(proto, str) and proto.lower() in _NUMBERS:
        number = _NUMBERS[proto.lower()]
    elif isinstance(proto, str) and proto.isascii() and proto.isdigit() and int(proto) <= 255:
        number = int(proto)
    elif type(proto) is int and 0 <= proto <= 255:
        number = proto
    elif proto not in (None, "", "any"):
        raise Malformed(f"{where}: protocol is {_shown(proto)}, not a protocol name or number")
    if number == 1 and version == 6:
        number = 58  # Neutron accepts "icmp" on an IPv6 rule and means ICMPv6
    if number in (1, 58) and number != (1 if version == 4 else 58):
        raise Malformed(f"{where}: protocol {proto} is not of ethertype {ethertype}")
    if number:
        out["protocol"] = _NAMED.get(number, number)
    lo = _port_number(rule.get("port_range_min"), f"{where} port_range_min")
    hi = _port_number(rule.get("port_range_max"), f"{where} port_range_max")
    if lo is None and hi is not None:  # Neutron refuses a max without a min: read alone, it would allow all
        raise Malformed(f"{where}: port_range_max {hi} without port_range_min")
    if lo is not None and number not in (6, 17, 132, 1, 58, *_PORTED):
        raise Malformed(f"{where}: a port range on protocol {_shown(proto)}, which has no ports")
    if number in (6, 17, 132) and lo is not None:
        if hi is not None and hi < lo:
            raise Malformed(f"{where}: port_range_min {lo} is above port_range_max {hi}")
        out["dst_ports"] = [lo if hi in (None, lo) else f"{lo}:{hi}"]
    elif number in (1, 58) and lo is not None:
        out["icmp_type"] = lo
        if hi is not None:
            out["icmp_code"] = hi
    elif number in _PORTED and lo is not None:
        return None
    ingress = rule.get("direction") == "ingress"
    if rule.get("remote_ip_prefix"):
        net = _network(rule["remote_ip_prefix"], f"{where} remote_ip_prefix")
        out["src_nets" if ingress else "dst_nets"] = [str(net)]
    if rule.get("remote_group_id"):
        out["src_selector" if ingress else "dst_selector"] = f"has({_group_label(rule['remote_group_id'], where)})"
    try:  # the rule alone, so that one the model refuses (an ICMP type of 300, a v6 prefix on an IPv4
        Rule.model_validate(out)  # rule) is left out alone, not the whole group's Profile with it
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'rule'}: {x['msg']}" for x in e.errors())
        raise Malformed(f"{where}: {why}") from None
    return out


def profile_doc(sg: Mapping[str, Any], problems: list[str] | None = None) -> dict[str, Any]:
    """A group's Profile. A rule not in Neutron's shape is left out (denies more, never less) and
    told in ``problems``; the rest of the group still holds."""
    gid = _text(sg, "id", "security group")
    where = f"security group {_shown(gid)}"
    rules = [_record(r, f"{where} security_group_rules[{i}]")
             for i, r in enumerate(_items(sg, "security_group_rules", where))]
    rules.sort(key=lambda r: str(r.get("id", "")))
    spec: dict[str, list[dict[str, Any]]] = {"ingress": [], "egress": []}
    for r in rules:
        if r.get("direction") not in spec:
            continue
        try:
            x = _rule(r)
        except Malformed as e:
            if problems is not None:
                problems.append(f"{where}: {e} (the rule is left out)")
            continue
        if x is not None:
            spec[r["direction"]].append(x)
    return {"kind": "Profile", "metadata": {"name": profile_name(gid), "labels": {OWNER_LABEL: "sg"}},
            "spec": spec}


def no_port_security_doc() -> dict[str, Any]:
    return {"kind": "Profile", "metadata": {"name": NO_PORT_SECURITY, "labels": {OWNER_LABEL: "builtin"}},
            "spec": {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}}


def desired(subnets: Iterable[Any], ports: Iterable[Any], groups: Iterable[Any],
            problems: list[str] | None = None, kept: set[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Everything the Store should hold for this Neutron: what a resync makes true. A record that
    cannot be translated is told in ``problems``, and its resource, where its id names one, in
    ``kept``: the Store keeps what it had for it rather than lose it."""
    docs: list[dict[str, Any]] = [no_port_security_doc()]
    told = problems if problems is not None else []
    held = kept if kept is not None else set()

    def each(records: Iterable[Any], kind: str, what: str, name: Any, make: Any) -> None:
        for rec in records:
            try:
                doc = make(_record(rec, what))
            except Unsupported:
                continue  # created before the driver, or by hand: not ours to serve
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # Malformed, or a shape none foresaw
                told.append(str(e) if isinstance(e, Malformed) else f"{what}: {type(e).__name__}: {e}")
                rid = rec.get("id") if isinstance(rec, Mapping) else None
                if isinstance(rid, str) and rid:
                    held.add((kind, name(rid)))
                continue
            if doc is not None:
                docs.append(doc)

    each(subnets, "IPPool", "a subnet", pool_name, lambda s: (check_subnet(s), pool_doc(s))[1])
    each(groups, "Profile", "a security group", profile_name, lambda g: profile_doc(g, told))
    each(ports, "Endpoint", "a port", endpoint_name, endpoint_doc)
    return docs
