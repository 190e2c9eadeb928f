"""Render the policy Structure as libnftables JSON: the one ``inet tabby`` table. Pure.

Layout (base chains accept what is not a workload's business: the fabric, BGP, the host itself):

    prerouting  (priority raw, before conntrack and routing) from a workload interface -> guard;
                from an unknown workload-named interface (Config: tap*, tby*, vnet*) -> drop;
                from one with port security off -> accept (no guards: Neutron's meaning).
                Covers traffic to the host (input) and through it (forward) alike; the host's own
                looped-back multicast is let be.
    forward  from a workload -> from_wl; to a workload -> to_wl; to an unknown workload-named one -> drop
    guard    RAs, DHCP server replies, foreign source MACs, spoofed IPv6/IPv4 sources: counted, dropped
    from_wl  invalid drop; established/related accept; always-allowed ICMPv6 accept;
             each policy (by order) whose applies-set holds the interface; then profiles; else drop
    to_wl    the same with ingress rules, keyed by the output interface
    po_*/pr_*_in|_eg   one chain per policy/profile and direction: first matching rule wins

Why a mark: a policy's "allow" must end only its own direction (the packet still meets the
destination's ingress policy in the same forward pass), and nftables' ``accept`` would end the
whole hook. So allow sets ACCEPT_MARK and returns; the caller returns when it sees the mark.

Every rule carries a comment that is unique within its chain: the drift check compares chains by
their comments, so a rule added, removed or reordered by hand is noticed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Set as AbstractSet
from typing import Any

from tabby.dataplane.dnsmasq_config import ANCHOR, ANCHOR_PEER, GROUP_ANCHOR
from tabby.dataplane.nat64_config import TUN as NAT64_TUN
from tabby.dataplane.nft_structure import (
    WL_IF,
    WL_MAC,
    WL_OPEN,
    WL_SRC4,
    WL_SRC6,
    Element,
    PolicyPlan,
    Structure,
    selector_set,
)

TABLE = "tabby"
FAMILY = "inet"
ACCEPT_MARK = 0x00100000
# NS/NA, RS, MLD and packet-too-big pass whatever the policy says (the seed's ND must never break)
ALWAYS_ICMPV6 = (2, 130, 131, 132, 133, 135, 136)
PACKET_LOOPBACK = 5  # skb->pkt_type of a looped-back copy of the host's own multicast
_PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}

Expr = dict[str, Any]


def _m(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def _pl(proto: str, field: str) -> Expr:
    return {"payload": {"protocol": proto, "field": field}}


_MARK = _meta("mark")
_SET_MARK = {"mangle": {"key": _MARK, "value": {"|": [_MARK, ACCEPT_MARK]}}}
_CLEAR_MARK = {"mangle": {"key": _MARK, "value": {"&": [_MARK, ~ACCEPT_MARK & 0xFFFFFFFF]}}}
_IF_MARKED = _m({"&": [_MARK, ACCEPT_MARK]}, ACCEPT_MARK)
_COUNT_DROP: list[Expr] = [{"counter": None}, {"drop": None}]


def _net(n: Any) -> Any:
    if n.prefixlen == n.max_prefixlen:
        return str(n.network_address)
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


def _port(p: int | str) -> Any:
    if isinstance(p, str):
        lo, hi = (int(x) for x in p.split(":"))
        return {"range": [lo, hi]} if lo != hi else lo
    return p


def _anon(items: list[Any]) -> Any:
    """One value, prefix or range stands alone; more become an anonymous set."""
    return items[0] if len(items) == 1 else {"set": items}


EXPAND_PORTS = 4  # up to this many ports/ranges become one rule each, not an anonymous set


def _port_options(field: str, ports: tuple[Any, ...]) -> list[list[Expr]]:
    """Why expand: each anonymous interval set costs libnftables ~0.2 ms to build (1,000 rules with
    a port list: 0.4 s of a full apply), while a rule with one value or range is a plain compare."""
    if not ports:
        return [[]]
    items = [_port(p) for p in ports]
    if len(items) <= EXPAND_PORTS:
        return [[_m(_pl("th", field), i)] for i in items]
    return [[_m(_pl("th", field), {"set": items})]]


def rule_matches(rule: Any) -> list[list[Expr]]:
    """A model Rule as nftables match lists: one per IP family it needs (none if it can't match),
    times one per port or range in a short port list."""
    families = {4, 6}
    if rule.ip_version:
        families &= {rule.ip_version}
    if rule.protocol == "icmp":
        families &= {4}
    elif rule.protocol == "icmpv6":
        families &= {6}
    for nets in (rule.src_nets, rule.dst_nets):
        if nets:
            families &= {n.version for n in nets}
    needs_family = bool(rule.ip_version or rule.src_nets or rule.dst_nets or rule.src_selector
                        or rule.dst_selector or rule.protocol in ("icmp", "icmpv6"))
    proto_match: list[Expr] = []
    if rule.protocol is not None:
        proto = _PROTO[rule.protocol] if isinstance(rule.protocol, str) else rule.protocol
        proto_match.append(_m(_meta("l4proto"), proto))
    ports = [sp + dp for sp in _port_options("sport", rule.src_ports) for dp in _port_options("dport", rule.dst_ports)]
    if not needs_family:
        return [proto_match + p for p in ports]
    out = []
    for v in (6, 4):
        if v not in families:
            continue
        ip = "ip6" if v == 6 else "ip"
        exprs: list[Expr] = [_m(_meta("nfproto"), "ipv6" if v == 6 else "ipv4")]
        for nets, fld in ((rule.src_nets, "saddr"), (rule.dst_nets, "daddr")):
            mine = [_net(n) for n in nets if n.version == v]
            if mine:
                exprs.append(_m(_pl(ip, fld), _anon(mine)))
        for sel, fld in ((rule.src_selector, "saddr"), (rule.dst_selector, "daddr")):
            if sel is not None:
                exprs.append(_m(_pl(ip, fld), "@" + selector_set(sel, v)))
        exprs.extend(proto_match)
        if rule.icmp_type is not None:
            icmp = "icmpv6" if v == 6 else "icmp"
            exprs.append(_m(_pl(icmp, "type"), rule.icmp_type))
            if rule.icmp_code is not None:
                exprs.append(_m(_pl(icmp, "code"), rule.icmp_code))
        out.extend(exprs + p for p in ports)
    return out


class _Table:
    """Collects JSON commands, numbering each chain's rules for their comments."""

    def __init__(self) -> None:
        self.cmds: list[dict[str, Any]] = []
        self.chains: dict[str, list[str]] = {}

    def chain(self, name: str, **base: Any) -> None:
        self.chains[name] = []
        self.cmds.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name, **base}}})

    def rule(self, chain: str, label: str, exprs: list[Expr]) -> None:
        comments = self.chains[chain]
        comment = f"{len(comments)}:{label}"[:120]
        comments.append(comment)
        self.cmds.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain,
                                           "expr": exprs, "comment": comment}}})


def _policy_chain(t: _Table, plan: PolicyPlan, direction: str) -> str | None:
    rules = plan.ingress if direction == "in" else plan.egress
    if not rules:
        return None
    name = f"{plan.applies}_{direction}"
    t.chain(name)
    what = "policy" if plan.kind == "po" else "profile"
    for k, rule in enumerate(rules):
        verdict = [_SET_MARK, {"return": None}] if rule.action == "allow" else _COUNT_DROP
        for exprs in rule_matches(rule):
            t.rule(name, f"{what} {plan.name} {direction} {k} {rule.action}", [*exprs, *verdict])
    return name


def _guard(t: _Table) -> None:
    t.chain("guard")
    iif = _meta("iifname")
    t.rule("guard", "workload RA", [_m(_meta("l4proto"), 58), _m(_pl("icmpv6", "type"), 134), *_COUNT_DROP])
    t.rule("guard", "workload DHCPv6 server", [_m(_meta("l4proto"), 17), _m(_pl("udp", "sport"), 547),
                                               *_COUNT_DROP])
    t.rule("guard", "workload DHCPv4 server", [_m(_meta("l4proto"), 17), _m(_pl("udp", "sport"), 67),
                                               *_COUNT_DROP])
    t.rule("guard", "foreign source MAC", [_m({"concat": [iif, _pl("ether", "saddr")]}, "@" + WL_MAC, "!="),
                                           *_COUNT_DROP])
    t.rule("guard", "DHCPv4 discover", [_m(_meta("nfproto"), "ipv4"), _m(_pl("ip", "saddr"), "0.0.0.0"),
                                        _m(_meta("l4proto"), 17), _m(_pl("udp", "dport"), 67), {"return": None}])
    t.rule("guard", "spoofed IPv6 source", [
        _m(_meta("nfproto"), "ipv6"),
        _m(_pl("ip6", "saddr"), {"set": ["::", {"prefix": {"addr": "fe80::", "len": 10}}]}, "!="),
        _m({"concat": [iif, _pl("ip6", "saddr")]}, "@" + WL_SRC6, "!="), *_COUNT_DROP])
    t.rule("guard", "spoofed IPv4 source", [
        _m(_meta("nfproto"), "ipv4"), _m({"concat": [iif, _pl("ip", "saddr")]}, "@" + WL_SRC4, "!="),
        *_COUNT_DROP])


def _direction(t: _Table, s: Structure, name: str, key: str, direction: str, chains: dict[str, str | None]) -> None:
    t.chain(name)
    t.rule(name, "invalid", [_m({"ct": {"key": "state"}}, ["invalid"], "in"), *_COUNT_DROP])
    t.rule(name, "established", [_m({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}])
    t.rule(name, "always-allowed ICMPv6", [_m(_meta("l4proto"), 58),
                                           _m(_pl("icmpv6", "type"), {"set": list(ALWAYS_ICMPV6)}), {"accept": None}])
    t.rule(name, "clear mark", [_CLEAR_MARK])
    for plan in (*s.policies, *s.profiles):
        chain = chains.get(f"{plan.applies}_{direction}")
        if chain is None:
            continue
        t.rule(name, f"{plan.kind} {plan.name}", [_m(_meta(key), "@" + plan.applies), {"jump": {"target": chain}}])
        t.rule(name, f"{plan.kind} {plan.name} allowed", [_IF_MARKED, {"return": None}])
    t.rule(name, "default deny", _COUNT_DROP)


def _unknown_workloads(t: _Table, s: Structure, chain: str, key: str) -> None:
    for prefix in s.workload_prefixes:
        t.rule(chain, f"unknown {prefix}* {key}", [
            _m(_meta(key), prefix + "*"), _m(_meta(key), "@" + WL_IF, "!="),
            _m(_meta(key), {"set": [ANCHOR, ANCHOR_PEER, NAT64_TUN]}, "!="), *_group_anchor(prefix, key),
            *_host_links(s, prefix, key), *_COUNT_DROP])


def _group_anchor(prefix: str, key: str) -> list[Expr]:
    """dnsmasq's group anchors (tbys*) are named like workloads when a prefix covers them."""
    return [_m(_meta(key), GROUP_ANCHOR + "*", "!=")] if GROUP_ANCHOR.startswith(prefix) else []


def _host_links(s: Structure, prefix: str, key: str) -> list[Expr]:
    """The host's own links a prefix covers (Config "l", "en", "eth"): its traffic to itself, to the
    Store and to its peers is never a workload's."""
    covered = sorted(n for n in s.host_links if n.startswith(prefix))
    if not covered:
        return []
    return [_m(_meta(key), covered[0] if len(covered) == 1 else {"set": covered}, "!=")]


def _nat(t: _Table, s: Structure) -> None:
    t.chain("nat_out", type="nat", hook="postrouting", prio=100, policy="accept")
    for v, nat, pools in ((6, s.nat6, s.pools6), (4, s.nat4, s.pools4)):
        if not nat:
            continue
        ip = "ip6" if v == 6 else "ip"
        nets = [_net(ipaddress.ip_network(n)) for n in nat]
        every = [_net(ipaddress.ip_network(n)) for n in pools]
        t.rule("nat_out", f"NAT{'66' if v == 6 else '44'} outgoing", [
            _m(_meta("nfproto"), "ipv6" if v == 6 else "ipv4"), _m(_pl(ip, "saddr"), {"set": nets}),
            _m(_pl(ip, "daddr"), {"set": every}, "!="), {"counter": None}, {"masquerade": None}])
    if s.nat64_pool4 is not None:
        # what tayga translated leaves as the host: its pool is host-local (nat64_config)
        t.rule("nat_out", "NAT64 pool outgoing", [
            _m(_meta("nfproto"), "ipv4"), _m(_pl("ip", "saddr"), {"set": [_net(ipaddress.ip_network(s.nat64_pool4))]}),
            {"counter": None}, {"masquerade": None}])


def _nat64_guards(t: _Table, s: Structure) -> None:
    """The translator is this host's nat64 pools' and nobody else's: not another pool's workloads,
    not the fabric's (each host translates its own); and no new connection comes in through it
    (answers to the workloads' own are established)."""
    if s.nat64_pool4 is None:
        return
    to_tun = _m(_meta("oifname"), {"set": [NAT64_TUN]})
    nets = [_net(ipaddress.ip_network(n)) for n in s.nat64_pools]
    t.rule("forward", "NAT64 from outside the nat64 pools", [
        to_tun, _m(_meta("nfproto"), "ipv6"), *([_m(_pl("ip6", "saddr"), {"set": nets}, "!=")] if nets else []),
        *_COUNT_DROP])
    t.rule("forward", "NAT64 pool: no new connection in", [
        to_tun, _m(_meta("nfproto"), "ipv4"), _m({"ct": {"key": "state"}}, ["new"], "in"), *_COUNT_DROP])


def render(s: Structure) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """(commands that create the table's sets, chains and rules; chain -> rule comments)."""
    t = _Table()
    t.cmds.append({"add": {"table": {"family": FAMILY, "name": TABLE}}})
    for name, typ in s.set_names().items():
        t.cmds.append({"add": {"set": {"family": FAMILY, "table": TABLE, "name": name, "type": typ}}})
    _guard(t)
    chains: dict[str, str | None] = {}
    for plan in (*s.policies, *s.profiles):
        for d in ("in", "eg"):
            chains[f"{plan.applies}_{d}"] = _policy_chain(t, plan, d)
    _direction(t, s, "from_wl", "iifname", "eg", chains)
    _direction(t, s, "to_wl", "oifname", "in", chains)
    # guards in prerouting, before conntrack and before routing: a spoofed IPv4 source would
    # otherwise fall to rp_filter uncounted, and an RA to ff02::1 never reaches forward
    t.chain("prerouting", type="filter", hook="prerouting", prio=-300, policy="accept")
    # the host's own multicast (dnsmasq's RAs on a tap) comes back in with the tap as its input
    # interface; it is not the workload's, so the guards must not count or drop it
    t.rule("prerouting", "own multicast looped back", [_m(_meta("pkttype"), PACKET_LOOPBACK), {"accept": None}])
    _unknown_workloads(t, s, "prerouting", "iifname")
    # port security off (Neutron's meaning): no guards; forward's policy still applies, and an RA
    # or DHCP reply from it never leaves its tap, which is a link of its own
    t.rule("prerouting", "port security off", [_m(_meta("iifname"), "@" + WL_OPEN), {"accept": None}])
    t.rule("prerouting", "from workload", [_m(_meta("iifname"), "@" + WL_IF), {"jump": {"target": "guard"}}])
    t.chain("forward", type="filter", hook="forward", prio=0, policy="accept")
    _unknown_workloads(t, s, "forward", "oifname")
    _nat64_guards(t, s)
    t.rule("forward", "from workload", [_m(_meta("iifname"), "@" + WL_IF), {"jump": {"target": "from_wl"}}])
    t.rule("forward", "to workload", [_m(_meta("oifname"), "@" + WL_IF), {"jump": {"target": "to_wl"}}])
    _nat(t, s)
    return t.cmds, t.chains


def element_json(elem: Element) -> Any:
    return {"concat": list(elem)} if len(elem) > 1 else elem[0]


def _text(value: str) -> str:
    # set elements are validated names, inet_ntop addresses and canonical MACs: no quote or
    # backslash can occur, but a string that had one would still be written correctly
    return f'"{value}"' if '"' not in value and "\\" not in value else json.dumps(value)


def _element_text(elem: Element) -> str:
    if len(elem) == 1:
        return _text(elem[0])
    return '{"concat":[' + ",".join(_text(v) for v in elem) + "]}"


def element_commands_text(op: str, elements: dict[str, AbstractSet[Element]]) -> list[str]:
    """The element commands as JSON text. Why text: 70,000 elements built as dicts and passed
    through json.dumps cost ~0.15 s of a 10,000-endpoint replace; joined strings ~0.03 s."""
    head = f'{{"{op}":{{"element":{{"family":"{FAMILY}","table":"{TABLE}","name":'
    return [f'{head}{_text(name)},"elem":[' + ",".join(_element_text(e) for e in elems) + "]}}}"
            for name, elems in elements.items() if elems]


def replace_text(cmds: list[dict[str, Any]], elements: dict[str, AbstractSet[Element]]) -> str:
    """One atomic transaction that swaps whatever table is there for the desired one, as
    libnftables JSON text (``cmds`` from ``render``): the fallback to ``nft_encode``'s netlink."""
    head = [{"metainfo": {"json_schema_version": 1}}, {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}}, *cmds]
    parts = [json.dumps(c, separators=(",", ":")) for c in head] + element_commands_text("add", elements)
    return '{"nftables":[' + ",".join(parts) + "]}"
