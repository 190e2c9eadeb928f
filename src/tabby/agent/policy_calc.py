"""The pure policy calculation: Policies, Profiles, Pools and Endpoints -> this host's nftables.

No I/O. The result has two parts that change at very different rates:

- ``Structure``: chains and rules, a function of Policies, Profiles and Pools only. It changes when
  an operator edits policy, and is then applied as one replacement transaction.
- set elements: which local interfaces each policy or profile applies to, which addresses each
  label selector in a rule stands for (endpoints of every host), and each local interface's own
  addresses and MAC for the anti-spoofing guards. They change with every endpoint, and are
  patched element by element, so adding an endpoint never touches a chain.

Selectors are indexed by the label pairs they require (``key == "v"``, ``key in {...}``, and an
``&&`` with either), so an endpoint's update evaluates only the selectors that could match it,
not all of them: the cost of one endpoint is independent of how many endpoints and rules exist.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_ntop
from typing import Any, NamedTuple

from tabby.dataplane.nft_structure import (  # the shapes the dataplane renders; pure, below the agent
    WL_IF,
    WL_MAC,
    WL_OPEN,
    WL_SRC4,
    WL_SRC6,
    Element,
    PolicyPlan,
    Structure,
    applies_set,
    selector_set,
)
from tabby.model.selector import Node, Selector, parse_selector


class EndpointInfo(NamedTuple):
    """What the calculation needs of an Endpoint. A tuple, not a frozen dataclass: 10,000 of
    them are built at a cold start, and a frozen dataclass's __init__ costs 3x as much."""

    labels: Mapping[str, str]
    label_key: tuple[tuple[str, str], ...]  # the labels sorted: what a rebuild memoizes on
    v6: tuple[Element, ...]  # each address as a one-field element, the kernel's text (allowed sources too)
    v4: tuple[Element, ...]
    interface: str
    mac: str
    profiles: tuple[str, ...]
    local: bool  # on this host and the owner of its interface
    pair_macs: tuple[str, ...]  # allowed sources' MACs other than its own (usually none)
    open: bool  # port security off: its interface skips the guards


def endpoint_info(ep: Any, local: bool) -> EndpointInfo:
    """Addresses as the kernel's own text (inet_ntop): what nft lists back, so the drift check
    compares like with like (ipaddress writes ::ffff:1.2.3.4 as ::ffff:102:304), and 5x faster
    than ipaddress's pure-Python formatting.

    Allowed sources count as the endpoint's addresses here, both for its anti-spoofing sets and
    for the selectors that match it (Neutron's remote-group rules include allowed address pairs)."""
    s = ep.spec
    labels = ep.metadata.labels  # a frozen model's: nobody changes it
    v6 = tuple((inet_ntop(AF_INET6, a.packed),) for a in s.ipv6_addresses)
    v4 = tuple((inet_ntop(AF_INET, a.packed),) for a in s.ipv4_addresses)
    mac = s.mac.lower()
    pair_macs: tuple[str, ...] = ()
    if s.allowed_sources:
        v6 += tuple((inet_ntop(AF_INET6, a.address.packed),) for a in s.allowed_sources if a.address.version == 6)
        v4 += tuple((inet_ntop(AF_INET, a.address.packed),) for a in s.allowed_sources if a.address.version == 4)
        pair_macs = tuple(sorted({a.mac for a in s.allowed_sources if a.mac is not None and a.mac != mac}))
    # an ip_interface is an ip_address subclass: .packed without building .ip
    return EndpointInfo(labels, tuple(sorted(labels.items())), v6, v4, s.interface, mac, tuple(s.profiles), local,
                        pair_macs, not s.port_security)


_Matched = tuple[list[str], list[str], list[str]]


def _required_pairs(node: Node) -> list[tuple[str, str | None]] | None:
    """Label pairs one of which a match needs, (key, None) for the key with any value (``has``);
    None when the selector can match without any. ``has`` indexed too: OpenStack's remote-group
    rules are all ``has(sg.openstack/<id>)``, and unindexed each was evaluated for every label set
    (4,000 groups: a 3.5 s rebuild)."""
    op = node[0]
    if op == "has":
        return [(node[1], None)]
    if op == "eq":
        return [(node[1], node[2])]
    if op == "in":
        return [(node[1], v) for v in sorted(node[2])]
    if op == "and":
        return _required_pairs(node[1]) or _required_pairs(node[2])
    if op == "or":
        a, b = _required_pairs(node[1]), _required_pairs(node[2])
        return a + b if a is not None and b is not None else None
    return None


class SelectorIndex:
    """Which selectors could match a label set, without evaluating all of them."""

    def __init__(self) -> None:
        self.by_pair: dict[tuple[str, str | None], set[str]] = {}
        self.unindexed: set[str] = set()
        self.users: Counter[str] = Counter()
        # each selector held, parsed once: parse_selector's cache is bounded (4,096), and with more
        # selectors than that in use its hit rate fell to nothing (a 74 s rebuild at 4,200)
        self.parsed: dict[str, Selector] = {}

    def add(self, text: str) -> None:
        self.users[text] += 1
        if self.users[text] > 1:
            return
        self.parsed[text] = parse_selector(text)
        pairs = _required_pairs(self.parsed[text].tree)
        if pairs is None:
            self.unindexed.add(text)
        else:
            for p in pairs:
                self.by_pair.setdefault(p, set()).add(text)

    def remove(self, text: str) -> None:
        self.users[text] -= 1
        if self.users[text] > 0:
            return
        del self.users[text]
        self.unindexed.discard(text)
        pairs = _required_pairs(self.parsed.pop(text).tree) or []
        for p in pairs:
            texts = self.by_pair.get(p)
            if texts is not None:
                texts.discard(text)
                if not texts:
                    del self.by_pair[p]

    def matching(self, labels: Mapping[str, str]) -> list[str]:
        candidates = set(self.unindexed)
        for k, v in labels.items():
            candidates |= self.by_pair.get((k, v), set())
            candidates |= self.by_pair.get((k, None), set())
        parsed = self.parsed
        return [t for t in candidates if parsed[t].matches(labels)]


@dataclass
class PolicyIndex:
    """Desired nftables state for one host, kept up to date one record at a time."""

    endpoints: dict[str, EndpointInfo] = field(default_factory=dict)
    policies: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)
    workload_prefixes: tuple[str, ...] = ("tap", "tby", "vnet")
    host_links: tuple[str, ...] = ("lo",)
    nat64_pool4: str | None = None  # this host runs NAT64 (agent): masquerade its pool
    nat64_pools: tuple[str, ...] = ()  # ... for these pools' workloads only
    elements: dict[str, Counter[Element]] = field(default_factory=dict)  # set -> element -> refcount
    delta: dict[str, dict[Element, bool]] = field(default_factory=dict)  # since take_delta()
    _structure: Structure | None = None
    _policy_sel: SelectorIndex = field(default_factory=SelectorIndex)  # policies' own selectors
    _rule_sel: SelectorIndex = field(default_factory=SelectorIndex)  # selectors inside rules
    _by_sel: dict[str, list[str]] = field(default_factory=dict)  # policy selector -> policy names
    # a policy or profile changed: every contribution is recomputed, once, when read. A new index
    # starts so: at start the Store lists every endpoint before the policies and profiles (key
    # order), and computing each endpoint alone first would be thrown away at their arrival
    _stale: bool = True

    # -- inputs ----------------------------------------------------------------------------

    def set_endpoint(self, name: str, ep: Any | None, local: bool = False) -> None:
        old = self.endpoints.pop(name, None)
        if ep is not None:
            self.endpoints[name] = endpoint_info(ep, local)
        if not self._stale:  # else the pending rebuild covers it
            self._refresh(old, self.endpoints.get(name))

    def set_policy(self, name: str, policy: Any | None) -> None:
        old = self.policies.pop(name, None)
        if old is not None:
            self._policy_sel.remove(old.spec.selector)
            for s in _rule_selectors(old):
                self._rule_sel.remove(s)
        if policy is not None:
            self.policies[name] = policy
            self._policy_sel.add(policy.spec.selector)
            for s in _rule_selectors(policy):
                self._rule_sel.add(s)
        self._invalidate()

    def set_profile(self, name: str, profile: Any | None) -> None:
        old = self.profiles.pop(name, None)
        if old is not None:
            for s in _rule_selectors(old):
                self._rule_sel.remove(s)
        if profile is not None:
            self.profiles[name] = profile
            for s in _rule_selectors(profile):
                self._rule_sel.add(s)
        self._invalidate()

    def set_workload_prefixes(self, prefixes: tuple[str, ...]) -> None:
        if prefixes != self.workload_prefixes:
            self.workload_prefixes = prefixes
            self._structure = None

    def set_host_links(self, links: tuple[str, ...]) -> None:
        """The host's own links (sorted, lo among them), exempt from the unknown-workload drops."""
        if links != self.host_links:
            self.host_links = links
            self._structure = None

    def set_nat64(self, pool4: str | None, pools: tuple[str, ...]) -> None:
        """This host translates (pool4, and the nat64 pools it translates for), or not (None)."""
        if (pool4, pools) != (self.nat64_pool4, self.nat64_pools):
            self.nat64_pool4, self.nat64_pools = pool4, pools
            self._structure = None

    def set_pool(self, name: str, pool: Any | None) -> None:
        if pool is None:
            self.pools.pop(name, None)
        else:
            self.pools[name] = pool
        self._structure = None

    # -- outputs ---------------------------------------------------------------------------

    def structure(self) -> Structure:
        if self._structure is None:
            pols = sorted(self.policies.values(), key=lambda p: (p.spec.order, p.metadata.name))
            pools = [p.spec for p in self.pools.values()]  # disabled: no new allocations, workloads stay
            self._structure = Structure(
                policies=tuple(PolicyPlan("po", p.metadata.name, p.spec.order, p.spec.ingress, p.spec.egress)
                               for p in pols),
                profiles=tuple(PolicyPlan("pr", n, 0.0, p.spec.ingress, p.spec.egress)
                               for n, p in sorted(self.profiles.items())),
                selectors=tuple(sorted(self._rule_sel.users)),
                pools6=tuple(sorted(str(p.cidr) for p in pools if p.cidr.version == 6)),
                pools4=tuple(sorted(str(p.cidr) for p in pools if p.cidr.version == 4)),
                nat6=tuple(sorted(str(p.cidr) for p in pools if p.cidr.version == 6 and p.nat_outgoing)),
                nat4=tuple(sorted(str(p.cidr) for p in pools if p.cidr.version == 4 and p.nat_outgoing)),
                workload_prefixes=self.workload_prefixes, host_links=self.host_links,
                nat64_pool4=self.nat64_pool4,
                nat64_pools=self.nat64_pools)
        return self._structure

    def desired_elements(self) -> dict[str, AbstractSet[Element]]:
        """Every set of the structure with its elements (empty sets included): views of the
        counts, not copies (70,000 elements at a cold start)."""
        self._rebuild_if_stale()
        out: dict[str, AbstractSet[Element]] = {name: frozenset() for name in self.structure().set_names()}
        for name, counts in self.elements.items():
            if name in out:
                out[name] = counts.keys()
        return out

    def take_delta(self) -> dict[str, dict[Element, bool]]:
        """Element changes since the last call: set -> element -> present."""
        self._rebuild_if_stale()
        d, self.delta = self.delta, {}
        return {k: v for k, v in d.items() if v}

    # -- the calculation -------------------------------------------------------------------

    def _applies(self, labels: Mapping[str, str]) -> list[str]:
        return [applies_set("po", pol) for text in self._policy_sel.matching(labels)
                for pol in self._policies_with_selector(text)]

    def _matches(self, info: EndpointInfo, memo: dict[Any, _Matched] | None = None) -> _Matched:
        """(applies-sets of the policies whose selector matches, IPv6 and IPv4 sets of the rule
        selectors that match).

        memo: label set -> the answer, for one rebuild. Why: workloads of one deployment share
        their labels, so a rebuild meets few distinct label sets (the bench: 100 among 10,000
        endpoints), and the selectors need evaluating once per label set, not per endpoint."""
        got = memo.get(info.label_key) if memo is not None else None
        if got is None:
            rule_sels = self._rule_sel.matching(info.labels)
            # one endpoint changed: the policy selectors matter only for a local one
            got = (self._applies(info.labels) if memo is not None or info.local else [],
                   [selector_set(t, 6) for t in rule_sels], [selector_set(t, 4) for t in rule_sels])
            if memo is not None:
                memo[info.label_key] = got
        return got

    def _contributions(self, info: EndpointInfo) -> list[tuple[str, Element]]:
        """One endpoint's elements. A pure function of the endpoint and the policies and profiles,
        which change only through a rebuild: so what an endpoint contributed is computed again
        from its old info when it changes, rather than kept for every endpoint."""
        applies, sel6, sel4 = self._matches(info)
        out: list[tuple[str, Element]] = []
        if info.local:
            i = info.interface
            ie = (i,)
            out.append((WL_IF, ie))
            out.extend((WL_SRC6, (i, a)) for a, in info.v6)
            out.extend((WL_SRC4, (i, a)) for a, in info.v4)
            out.append((WL_MAC, (i, info.mac)))
            out.extend((WL_MAC, (i, m)) for m in info.pair_macs)
            if info.open:
                out.append((WL_OPEN, ie))
            out.extend((name, ie) for name in applies)
            out.extend((applies_set("pr", p), ie) for p in info.profiles if p in self.profiles)
        for name in sel6:
            out.extend((name, e) for e in info.v6)
        for name in sel4:
            out.extend((name, e) for e in info.v4)
        return out

    def _policies_with_selector(self, text: str) -> list[str]:
        if text not in self._by_sel:
            self._by_sel[text] = [n for n, p in self.policies.items() if p.spec.selector == text]
        return self._by_sel[text]

    def _refresh(self, old_info: EndpointInfo | None, info: EndpointInfo | None) -> None:
        old = self._contributions(old_info) if old_info is not None else []
        new = self._contributions(info) if info is not None else []
        for set_name, elem in old:
            counts = self.elements[set_name]
            counts[elem] -= 1
            if counts[elem] <= 0:
                del counts[elem]
                d = self.delta.setdefault(set_name, {})
                if d.get(elem) is True:
                    del d[elem]  # added and removed within one delta: never reached the kernel
                else:
                    d[elem] = False
        for set_name, elem in new:
            counts = self.elements.get(set_name)
            if counts is None:
                counts = self.elements[set_name] = Counter()
            counts[elem] += 1
            if counts[elem] == 1:
                d = self.delta.setdefault(set_name, {})
                if d.get(elem) is False:
                    del d[elem]  # removed and re-added within one delta: no change
                else:
                    d[elem] = True

    def _invalidate(self) -> None:
        """Why lazy: at start the Store delivers every endpoint before the policies (key order), and
        recomputing all endpoints per policy cost 2.1 s for 100 policies and 2,000 endpoints."""
        self._structure = None
        self._by_sel.clear()
        self._stale = True

    def _rebuild_if_stale(self) -> None:
        """Every contribution anew; the delta becomes what the kernel lacks or has too much, so
        changes still pending before the rebuild are not lost (the structure may be unchanged, as
        when a relist delivers the same policy again, and then only the delta is written)."""
        if not self._stale:
            return
        self._stale = False
        kernel = {name: set(counts) for name, counts in self.elements.items()}
        for name, changes in self.delta.items():  # undo what is not written yet
            for elem, present in changes.items():
                (kernel.setdefault(name, set()).discard if present else kernel.setdefault(name, set()).add)(elem)
        # one pass that only collects, per set (Counter over a list counts in C); no delta
        # bookkeeping, since the delta is computed once below: 0.40 -> 0.21 s of calculation at
        # 10,000 endpoints; straight into per-set lists, no per-endpoint list: 0.21 -> 0.1x s
        by_set: defaultdict[str, list[Element]] = defaultdict(list)
        wl_if: list[Element] = []
        wl_src6: list[Element] = []
        wl_src4: list[Element] = []
        wl_mac: list[Element] = []
        wl_open: list[Element] = []
        memo: dict[Any, _Matched] = {}
        profile_sets = {n: applies_set("pr", n) for n in self.profiles}
        for info in self.endpoints.values():
            applies, sel6, sel4 = self._matches(info, memo)
            if info.local:
                i = info.interface
                ie = (i,)
                wl_if.append(ie)
                wl_src6.extend([(i, a) for a, in info.v6])
                wl_src4.extend([(i, a) for a, in info.v4])
                wl_mac.append((i, info.mac))
                if info.pair_macs:
                    wl_mac.extend([(i, m) for m in info.pair_macs])
                if info.open:
                    wl_open.append(ie)
                for name in applies:
                    by_set[name].append(ie)
                for p in info.profiles:
                    if p in profile_sets:
                        by_set[profile_sets[p]].append(ie)
            if info.v6:
                for name in sel6:
                    by_set[name].extend(info.v6)
            if info.v4:
                for name in sel4:
                    by_set[name].extend(info.v4)
        for name, elems in ((WL_IF, wl_if), (WL_SRC6, wl_src6), (WL_SRC4, wl_src4), (WL_MAC, wl_mac),
                            (WL_OPEN, wl_open)):
            if elems:
                by_set[name] = elems
        self.elements = {name: Counter(elems) for name, elems in by_set.items()}
        self.delta = {}
        for name in set(kernel) | set(self.elements):
            have, want = kernel.get(name, set()), set(self.elements.get(name, ()))
            changes = {e: True for e in want - have} | {e: False for e in have - want}
            if changes:
                self.delta[name] = changes


def _rule_selectors(res: Any) -> Iterable[str]:
    for rule in (*res.spec.ingress, *res.spec.egress):
        if rule.src_selector is not None:
            yield rule.src_selector
        if rule.dst_selector is not None:
            yield rule.dst_selector
