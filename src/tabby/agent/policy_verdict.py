"""What the policy says about one packet between two endpoints, from the records alone. Pure.

The same semantics the nftables table enforces (see ``dataplane/nft_rules.py``): the source's
egress, then the destination's ingress; in each, the policies that select the endpoint by order
(then name), then its profiles by name; the first rule that matches decides; nothing matching is
a deny. ``tabby diagnose`` uses it to name the rule that blocks a pair, and the lab tests hold it
to what real traffic does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tabby.model.selector import parse_selector

_PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    protocol: int  # IP protocol number
    dst_port: int | None = None
    src_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


def _in_nets(addr: str, nets: Iterable[Any]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in nets)


def _port_ok(port: int | None, specs: tuple[Any, ...]) -> bool:
    if not specs:
        return True
    if port is None:
        return False
    for p in specs:
        if isinstance(p, str):
            lo, hi = (int(x) for x in p.split(":"))
            if lo <= port <= hi:
                return True
        elif p == port:
            return True
    return False


def rule_matches(rule: Any, pkt: Packet, labels_of: dict[str, dict[str, str]]) -> bool:
    """labels_of: address -> labels of the endpoint that holds it (for selectors)."""
    version = ipaddress.ip_address(pkt.src).version
    if rule.ip_version and rule.ip_version != version:
        return False
    if rule.protocol is not None:
        proto = _PROTO[rule.protocol] if isinstance(rule.protocol, str) else rule.protocol
        if proto != pkt.protocol:
            return False
    if rule.src_nets and not _in_nets(pkt.src, rule.src_nets):
        return False
    if rule.dst_nets and not _in_nets(pkt.dst, rule.dst_nets):
        return False
    for sel, addr in ((rule.src_selector, pkt.src), (rule.dst_selector, pkt.dst)):
        if sel is not None and (addr not in labels_of or not parse_selector(sel).matches(labels_of[addr])):
            return False
    if rule.icmp_type is not None and rule.icmp_type != pkt.icmp_type:
        return False
    if rule.icmp_code is not None and rule.icmp_code != pkt.icmp_code:
        return False
    return _port_ok(pkt.src_port, rule.src_ports) and _port_ok(pkt.dst_port, rule.dst_ports)


def _direction(ep: Any, direction: str, pkt: Packet, policies: list[Any], profiles: dict[str, Any],
               labels_of: dict[str, dict[str, str]]) -> Verdict:
    who = f"{'egress of' if direction == 'egress' else 'ingress to'} {ep.metadata.name}"
    ordered = sorted(policies, key=lambda p: (p.spec.order, p.metadata.name))
    chain = [("policy", p.metadata.name, getattr(p.spec, direction)) for p in ordered
             if parse_selector(p.spec.selector).matches(ep.metadata.labels)]
    chain += [("profile", n, getattr(profiles[n].spec, direction)) for n in sorted(set(ep.spec.profiles))
              if n in profiles]
    for kind, name, rules in chain:
        for k, rule in enumerate(rules):
            if rule_matches(rule, pkt, labels_of):
                return Verdict(rule.action == "allow", f"{who}: {kind} {name} {direction} rule {k} ({rule.action})")
    return Verdict(False, f"{who}: no policy or profile rule matches (default deny)")


def verdict(src_ep: Any, dst_ep: Any, pkt: Packet, policies: list[Any], profiles: list[Any],
            endpoints: list[Any]) -> Verdict:
    # as the kernel's selector sets hold them: an endpoint's addresses and its allowed sources
    # (policy_calc.endpoint_info; Neutron's remote-group rules include the pairs too)
    labels_of = {str(a): dict(e.metadata.labels) for e in endpoints
                 for a in (*(x.ip for x in (*e.spec.ipv6_addresses, *e.spec.ipv4_addresses)),
                           *(s.address.ip for s in e.spec.allowed_sources))}
    by_name = {p.metadata.name: p for p in profiles}
    out = _direction(src_ep, "egress", pkt, policies, by_name, labels_of)
    if not out.allowed:
        return out
    into = _direction(dst_ep, "ingress", pkt, policies, by_name, labels_of)
    return into if not into.allowed else Verdict(True, f"{out.reason}; {into.reason}")
